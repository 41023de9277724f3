/**
 * The code interpreter of a `code-interpreter` sandbox (`sandbox.runCode`): code runs in
 * a Jupyter kernel that keeps its state between runs, through the template's helper
 * `/usr/local/bin/nullspace-code`, which the SDK runs over the commands data plane and
 * whose stdout is one JSON event a line (docs/TEMPLATES.md, "The code interpreter's
 * protocol"). The results are the kernel's MIME bundles: text, HTML, PNG figures, ...
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { randomUUID } from "node:crypto";

import type { Commands } from "./commands.js";
import type { RequestOpts } from "./config.js";
import { SandboxError, invalid } from "./errors.js";
import type { Filesystem } from "./files.js";
import type { CommandResult } from "./models.js";
import { checkKeys } from "./options.js";
import { shellQuote } from "./shell.js";

/** @internal The helper the code-interpreter template installs; it prints one JSON event a line. */
export const CODE_HELPER = "/usr/local/bin/nullspace-code";
/** @internal Code whose base64 is longer than this goes through a file, not the command line. */
export const CODE_ARGV_LIMIT = 96 * 1024;

/** The languages the code interpreter runs: a Jupyter kernel (`python`), or `bash` cells. */
export type CodeLanguage = "python" | "bash";

/** The formats a {@link Result} can have, each the name of its property. */
export type ResultFormat =
  | "text"
  | "html"
  | "markdown"
  | "svg"
  | "png"
  | "jpeg"
  | "pdf"
  | "latex"
  | "json"
  | "javascript";

/** MIME type → format, in the order `formats()` lists them (the Python SDK's). */
const MIME: ReadonlyArray<readonly [string, ResultFormat]> = [
  ["text/plain", "text"],
  ["text/html", "html"],
  ["text/markdown", "markdown"],
  ["image/svg+xml", "svg"],
  ["image/png", "png"],
  ["image/jpeg", "jpeg"],
  ["application/pdf", "pdf"],
  ["text/latex", "latex"],
  ["application/json", "json"],
  ["application/javascript", "javascript"],
];

/**
 * One output of an execution: the kernel's MIME bundle, by format. `isMainResult` is
 * the cell's value (`execute_result`); the others come from `display()` or figures.
 * `png` and `jpeg` are base64 strings, as Jupyter gives them (`pngBytes()` decodes).
 */
export class Result {
  /** `text/plain`: the value as the kernel prints it. */
  declare text?: string;
  /** `text/html` (a DataFrame's table, ...). */
  declare html?: string;
  /** `text/markdown`. */
  declare markdown?: string;
  /** `image/svg+xml`. */
  declare svg?: string;
  /** `image/png`, base64 (a matplotlib figure, ...). */
  declare png?: string;
  /** `image/jpeg`, base64. */
  declare jpeg?: string;
  /** `application/pdf`, base64. */
  declare pdf?: string;
  /** `text/latex`. */
  declare latex?: string;
  /** `application/json`, parsed. */
  declare json?: unknown;
  /** `application/javascript`. */
  declare javascript?: string;
  /** Whether this is the cell's value (`execute_result`), not a display or a figure. */
  readonly isMainResult: boolean;
  /** The whole MIME bundle as the kernel sent it, formats this class has no name for included. */
  readonly raw: Record<string, unknown>;

  /**
   * A result from a MIME bundle (`{"text/plain": "42", "image/png": "iVBOR..."}`), as
   * the helper's `result` event carries it. Values given as lists of lines are joined
   * (except JSON); newlines are removed from base64 images.
   *
   * @param data - the MIME bundle
   * @param isMainResult - whether it is the cell's value
   */
  constructor(data: Record<string, unknown> = {}, isMainResult = false) {
    this.isMainResult = isMainResult;
    this.raw = { ...data };
    for (const [mime, name] of MIME) {
      if (!(mime in data)) continue;
      let value = data[mime];
      if (name === "json") {
        this.json = value;
        continue;
      }
      if (Array.isArray(value)) value = value.join("");
      if (value === null || value === undefined) continue;
      let s = typeof value === "string" ? value : String(value);
      if (name === "png" || name === "jpeg") s = s.replace(/\n/g, "");
      this[name] = s;
    }
  }

  /** The formats this result has (`["text", "png"]`, ...), in a fixed order. */
  formats(): ResultFormat[] {
    return MIME.map(([, name]) => name).filter((name) => this[name] !== undefined);
  }

  /** The PNG decoded to bytes, if there is one. */
  pngBytes(): Uint8Array | undefined {
    return this.png === undefined ? undefined : new Uint8Array(Buffer.from(this.png, "base64"));
  }

  /** The JPEG decoded to bytes, if there is one. */
  jpegBytes(): Uint8Array | undefined {
    return this.jpeg === undefined ? undefined : new Uint8Array(Buffer.from(this.jpeg, "base64"));
  }

  /** Its text (`text/plain`), or `""`. */
  toString(): string {
    return this.text ?? "";
  }
}

/** The exception an execution raised: its class name, its message and the traceback. */
export class ExecutionError {
  /**
   * @param name - the exception's class name (`ZeroDivisionError`)
   * @param value - its message (`division by zero`)
   * @param traceback - the traceback's lines, ANSI colours removed
   */
  constructor(
    /** The exception's class name (`ZeroDivisionError`, `KeyboardInterrupt`, ...). */
    readonly name: string,
    /** Its message. */
    readonly value: string,
    /** The traceback's lines, ANSI colours removed. */
    readonly traceback: string[] = [],
  ) {}

  /** `name: value`. */
  toString(): string {
    return `${this.name}: ${this.value}`;
  }
}

/** What an execution printed, chunk by chunk, as the kernel streamed it. */
export interface Logs {
  /** Its stdout chunks. */
  stdout: string[];
  /** Its stderr chunks. */
  stderr: string[];
}

/**
 * An execution's outcome: its results, its output and the error it raised (if any).
 * `timedOut` says the kernel was interrupted when `timeoutMs` passed (a
 * `KeyboardInterrupt` error follows; the context's state is kept).
 */
export class Execution {
  /** Its results: the cell's value (`isMainResult`), displays and figures, in order. */
  results: Result[] = [];
  /** What it printed. */
  logs: Logs = { stdout: [], stderr: [] };
  /** The exception it raised, if any. */
  error: ExecutionError | undefined = undefined;
  /** The kernel's execution count after it (null when the kernel gave none). */
  executionCount: number | null = null;
  /** Whether it ran past its timeout and the kernel was interrupted. */
  timedOut = false;

  /** The main result's text (the cell's value), if it had one. */
  get text(): string | undefined {
    return this.results.find((r) => r.isMainResult)?.text;
  }
}

/** A kernel of its own (separate variables and imports) in a sandbox, for `runCode`. */
export interface CodeContext {
  /** Its ID (`default` is the template's own kernel). */
  id: string;
  /** The language its runs use by default. */
  language: CodeLanguage;
  /** Its working directory. */
  cwd: string;
}

/** Callbacks of `runCode`, each called as the event arrives. */
export interface CodeCallbacks {
  /** Each chunk the code prints to stdout. */
  onStdout?: (text: string) => void;
  /** Each chunk the code prints to stderr. */
  onStderr?: (text: string) => void;
  /** Each result (the cell's value, a display, a figure). */
  onResult?: (result: Result) => void;
  /** The exception the code raised. */
  onError?: (error: ExecutionError) => void;
}

/** Options of `sandbox.runCode`. */
export interface RunCodeOpts extends CodeCallbacks {
  /** `python` (default, or the context's language) or `bash` (a bash process per run). */
  language?: CodeLanguage;
  /** The context (or its ID) to run in; default: the template's `default` kernel. */
  context?: CodeContext | string;
  /** Environment of the helper's process, on top of the sandbox's. */
  envs?: Record<string, string>;
  /**
   * Milliseconds the code may run (default 60000); then the kernel is interrupted and
   * the execution resolves with `timedOut: true`.
   */
  timeoutMs?: number;
  /** Longest silence of the output stream, in milliseconds (default: `timeoutMs` + 60000). */
  requestTimeoutMs?: number;
  /** Stops waiting (the code keeps running in the sandbox until its timeout). */
  signal?: AbortSignal;
}

/** Options of `sandbox.createCodeContext`. */
export interface CodeContextOpts extends RequestOpts {
  /** The context's language (default `python`). */
  language?: CodeLanguage;
  /** Its working directory (default `/workspace`). */
  cwd?: string;
}

const RUN_CODE_KEYS = new Set([
  "language", "context", "onStdout", "onStderr", "onResult", "onError", "envs", "timeoutMs", "requestTimeoutMs", "signal",
]);

/**
 * The context ID and language a run uses: the context's (or `default`'s, `python`)
 * unless `language` is given.
 *
 * @internal
 */
export function codeContextArgs(context: unknown, language: unknown): [string, CodeLanguage] {
  let ctx: string;
  let lang: unknown;
  if (context === undefined || context === null) {
    ctx = "default";
    lang = language ?? "python";
  } else if (typeof context === "string") {
    ctx = context;
    lang = language ?? "python";
  } else if (typeof context === "object" && typeof (context as CodeContext).id === "string") {
    ctx = (context as CodeContext).id;
    lang = language ?? (context as CodeContext).language ?? "python";
  } else {
    throw invalid(`context must be a CodeContext, its id, or undefined; got ${JSON.stringify(context)}`);
  }
  if (lang !== "python" && lang !== "bash") {
    throw invalid(`language ${JSON.stringify(lang)} is not supported; send 'python' or 'bash'`);
  }
  return [ctx, lang];
}

/**
 * The shell command that runs code through the helper: inline as base64, or from a
 * file already in the sandbox.
 *
 * @internal
 */
export function codeCommand(
  ctx: string,
  language: CodeLanguage,
  timeoutSeconds: number,
  src: { codeB64: string } | { codeFile: string },
): string {
  const code = "codeB64" in src ? `--code-b64 ${src.codeB64}` : `--code-file ${shellQuote(src.codeFile)}`;
  return `${CODE_HELPER} run --context ${shellQuote(ctx)} --language ${language} --timeout ${timeoutSeconds} ${code}`;
}

/** One event of the helper's `run`. */
interface CodeEvent {
  type?: string;
  text?: unknown;
  isMainResult?: unknown;
  data?: unknown;
  name?: unknown;
  value?: unknown;
  traceback?: unknown;
  executionCount?: unknown;
}

/**
 * Reads the helper's events from stdout chunks (a line may be split across chunks)
 * into an {@link Execution}, calling back as they arrive.
 *
 * @internal
 */
export class CodeEventReader {
  private buffer = "";
  /** Whether the `done` event arrived. */
  done = false;

  constructor(
    readonly execution: Execution,
    private readonly callbacks: CodeCallbacks = {},
  ) {}

  /** A chunk of the helper's stdout. */
  feed(chunk: string): void {
    this.buffer += chunk;
    for (let nl = this.buffer.indexOf("\n"); nl >= 0; nl = this.buffer.indexOf("\n")) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (line.trim()) this.event(parseEvent(line));
    }
  }

  private event(e: CodeEvent): void {
    const x = this.execution;
    const str = (v: unknown) => (typeof v === "string" ? v : v === undefined || v === null ? "" : String(v));
    switch (e.type) {
      case "stdout":
      case "stderr": {
        const text = str(e.text);
        x.logs[e.type].push(text);
        if (e.type === "stdout") this.callbacks.onStdout?.(text);
        else this.callbacks.onStderr?.(text);
        break;
      }
      case "result": {
        const data = e.data && typeof e.data === "object" && !Array.isArray(e.data) ? (e.data as Record<string, unknown>) : {};
        const r = new Result(data, Boolean(e.isMainResult));
        x.results.push(r);
        this.callbacks.onResult?.(r);
        break;
      }
      case "error": {
        const tb = Array.isArray(e.traceback) ? e.traceback.map(str) : [];
        const err = new ExecutionError(str(e.name), str(e.value), tb);
        x.error = err;
        this.callbacks.onError?.(err);
        break;
      }
      case "timeout":
        x.timedOut = true;
        break;
      case "done":
        x.executionCount = typeof e.executionCount === "number" ? e.executionCount : null;
        this.done = true;
        break;
      default:
        break; // an event this SDK does not know yet
    }
  }

  /** The execution, once the helper's process ended; its error if no `done` came. */
  finish(result: CommandResult): Execution {
    if (this.buffer.trim()) this.feed("\n");
    this.buffer = "";
    if (!this.done) {
      const tail = (result.stderr || result.stdout || "").slice(-2000).trim();
      throw new SandboxError(
        "code_interpreter",
        `the code interpreter ended without a result (exit code ${result.exitCode ?? "none"}); ` +
          `is this a code-interpreter sandbox? ${tail}`.trimEnd(),
      );
    }
    return this.execution;
  }
}

function parseEvent(line: string): CodeEvent {
  let e: unknown;
  try {
    e = JSON.parse(line);
  } catch {
    throw new SandboxError(
      "code_interpreter",
      `the code interpreter printed a line that is not JSON (is this a code-interpreter sandbox?): ${line.slice(0, 200)}`,
    );
  }
  return e && typeof e === "object" && !Array.isArray(e) ? (e as CodeEvent) : {};
}

/** The helper's one event of a context call (its first line of stdout). */
function contextEvent(result: CommandResult): Record<string, unknown> {
  for (const line of result.stdout.split("\n")) {
    if (line.trim()) {
      const e = parseEvent(line);
      return e as Record<string, unknown>;
    }
  }
  throw new SandboxError(
    "code_interpreter",
    `the code interpreter gave no answer (exit code ${result.exitCode ?? "none"}); ` +
      `is this a code-interpreter sandbox? ${result.stderr.trim().slice(-2000)}`.trimEnd(),
  );
}

function positiveMs(name: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isFinite(value) || !(value > 0)) {
    throw invalid(`${name} must be a positive number of milliseconds; got ${typeof value === "number" ? value : JSON.stringify(value)}`);
  }
  return value;
}

/** What the code calls need of a sandbox. @internal */
export interface CodeHost {
  readonly commands: Commands;
  readonly files: Filesystem;
}

/** `sandbox.runCode` (see there). @internal */
export async function runCode(host: CodeHost, code: string, opts: RunCodeOpts = {}): Promise<Execution> {
  checkKeys("runCode", opts, RUN_CODE_KEYS);
  if (typeof code !== "string") throw invalid(`code must be a string; got ${JSON.stringify(code)}`);
  const [ctx, lang] = codeContextArgs(opts.context, opts.language);
  const timeoutMs = positiveMs("timeoutMs", opts.timeoutMs ?? 60_000);
  const requestTimeoutMs = positiveMs("requestTimeoutMs", opts.requestTimeoutMs ?? timeoutMs + 60_000);
  const b64 = Buffer.from(code, "utf8").toString("base64");
  let path: string | undefined;
  let cmd: string;
  if (b64.length > CODE_ARGV_LIMIT) {
    path = `/tmp/nullspace-code-${randomUUID().replace(/-/g, "")}`;
    await host.files.write(path, code);
    cmd = codeCommand(ctx, lang, timeoutMs / 1000, { codeFile: path });
  } else {
    cmd = codeCommand(ctx, lang, timeoutMs / 1000, { codeB64: b64 });
  }
  const reader = new CodeEventReader(new Execution(), opts);
  let result: CommandResult;
  try {
    result = await host.commands.run(cmd, {
      envs: opts.envs,
      onStdout: (d) => reader.feed(d),
      requestTimeoutMs,
      signal: opts.signal,
    });
  } catch (e) {
    if (path !== undefined) await host.files.remove(path).catch(() => undefined);
    throw e;
  }
  if (path !== undefined) await host.files.remove(path);
  return reader.finish(result);
}

/** `sandbox.createCodeContext` (see there). @internal */
export async function createCodeContext(host: CodeHost, opts: CodeContextOpts = {}): Promise<CodeContext> {
  checkKeys("createCodeContext", opts, new Set(["language", "cwd", "requestTimeoutMs"]));
  const [, lang] = codeContextArgs(undefined, opts.language ?? "python");
  let cmd = `${CODE_HELPER} create-context --language ${lang}`;
  if (opts.cwd !== undefined) {
    if (typeof opts.cwd !== "string") throw invalid(`cwd must be a directory path; got ${JSON.stringify(opts.cwd)}`);
    if (opts.cwd) cmd += ` --cwd ${shellQuote(opts.cwd)}`;
  }
  const result = await host.commands.run(cmd, { requestTimeoutMs: opts.requestTimeoutMs ?? 120_000 });
  const e = contextEvent(result);
  if (typeof e.id !== "string") {
    throw new SandboxError("code_interpreter", `the code interpreter's answer has no context id: ${JSON.stringify(e).slice(0, 200)}`);
  }
  const language = e.language === "python" || e.language === "bash" ? e.language : lang;
  return { id: e.id, language, cwd: typeof e.cwd === "string" ? e.cwd : "/workspace" };
}

/** `sandbox.removeCodeContext` (see there). @internal */
export async function removeCodeContext(host: CodeHost, context: CodeContext | string, opts: RequestOpts = {}): Promise<void> {
  checkKeys("removeCodeContext", opts, new Set(["requestTimeoutMs"]));
  if (context === undefined || context === null) throw invalid("removeCodeContext takes a CodeContext or its id");
  const [ctx] = codeContextArgs(context, undefined);
  const result = await host.commands.run(`${CODE_HELPER} remove-context ${shellQuote(ctx)}`, {
    requestTimeoutMs: opts.requestTimeoutMs,
  });
  contextEvent(result);
}
