/**
 * Commands in a sandbox (`sandbox.commands`): run in the foreground with output streamed
 * to callbacks, or in the background with a {@link CommandHandle} to wait on, write to
 * (stdin) and signal.
 *
 * @module
 */

import { CommandDetachedError, SandboxTimeoutError, StreamError, errorFor, invalid } from "./errors.js";
import { type DataPlane, INSPECT, type Streaming, expectOk, hide, json, ndjson } from "./http.js";
import type { CommandResult, ProcessInfo } from "./models.js";
import { checkKeys } from "./options.js";

/** Output callbacks and deadlines of a command being waited on. */
export interface WaitOpts {
  /** Each chunk of stdout as it arrives (text). */
  onStdout?: (data: string) => void;
  /** Each chunk of stderr as it arrives (text). */
  onStderr?: (data: string) => void;
  /**
   * Milliseconds to wait for the command in all; past them a {@link SandboxTimeoutError}
   * (code `timeout`, `details.pid`) and the command keeps running (kill it with
   * `commands.kill(pid)`). Default: no limit.
   */
  timeoutMs?: number;
  /** Longest silence of the output stream, in milliseconds (default: the sandbox's). */
  requestTimeoutMs?: number;
  /** Stops waiting (the command keeps running). */
  signal?: AbortSignal;
}

/** How to run a command. */
export interface RunOpts extends WaitOpts {
  /** Return a {@link CommandHandle} at once instead of waiting. */
  background?: boolean;
  /** Environment on top of the sandbox's `envVars`. */
  envs?: Record<string, string>;
  /** Working directory (default `/workspace`). */
  cwd?: string;
  /** The user it runs as (default `user`). */
  user?: string;
  /** Give it a stdin pipe (else `/dev/null`): write with `sendStdin` while someone waits. */
  stdin?: boolean;
}

const RUN_KEYS = new Set([
  "background", "envs", "cwd", "user", "stdin", "onStdout", "onStderr", "timeoutMs", "requestTimeoutMs", "signal",
]);

/** Linux signal numbers by name (the guest is Linux on x86-64), aliases included. */
export const SIGNALS: Readonly<Record<string, number>> = Object.freeze({
  SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGILL: 4, SIGTRAP: 5, SIGABRT: 6, SIGIOT: 6, SIGBUS: 7,
  SIGFPE: 8, SIGKILL: 9, SIGUSR1: 10, SIGSEGV: 11, SIGUSR2: 12, SIGPIPE: 13, SIGALRM: 14,
  SIGTERM: 15, SIGSTKFLT: 16, SIGCHLD: 17, SIGCLD: 17, SIGCONT: 18, SIGSTOP: 19, SIGTSTP: 20,
  SIGTTIN: 21, SIGTTOU: 22, SIGURG: 23, SIGXCPU: 24, SIGXFSZ: 25, SIGVTALRM: 26, SIGPROF: 27,
  SIGWINCH: 28, SIGIO: 29, SIGPOLL: 29, SIGPWR: 30, SIGSYS: 31, SIGRTMIN: 34, SIGRTMAX: 64,
});

/** A signal as its number: `15`, `"SIGTERM"` or `"TERM"`. */
export function signalNumber(signal: number | string): number {
  if (typeof signal === "number" && Number.isInteger(signal) && signal > 0 && signal < 65) return signal;
  if (typeof signal === "string") {
    const name = signal.toUpperCase().startsWith("SIG") ? signal.toUpperCase() : `SIG${signal.toUpperCase()}`;
    const n = SIGNALS[name];
    if (n !== undefined) return n;
  }
  throw invalid(`signal must be a number from 1 to 64 or a name such as "SIGTERM"; got ${JSON.stringify(signal)}`);
}

interface CommandEvent {
  event: "start" | "stdout" | "stderr" | "exit" | "detached" | "error";
  pid?: number;
  data?: string;
  dataBase64?: string;
  exitCode?: number | null;
  signal?: number | null;
  code?: string;
  message?: string;
}

function base64Bytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** A command started with `background: true` (or re-attached with `commands.connect`). */
export class CommandHandle {
  private declare readonly commands: Commands;

  /** @internal */
  constructor(
    commands: Commands,
    /** Its process ID in the sandbox. */
    readonly pid: number,
  ) {
    hide(this, "commands", commands);
  }

  /** What `console.log` shows: the pid, no credential. */
  [INSPECT](): string {
    return `CommandHandle { pid: ${this.pid} }`;
  }

  /** Waits for its end; output produced so far (the last 1 MiB) is replayed first. */
  wait(opts: WaitOpts = {}): Promise<CommandResult> {
    return this.commands.wait(this.pid, opts);
  }

  /** Writes to its stdin (started with `stdin: true`) while someone waits on it. */
  sendStdin(data: string | Uint8Array, opts: { eof?: boolean } = {}): Promise<void> {
    return this.commands.sendStdin(this.pid, data, opts);
  }

  /** Closes its stdin. */
  closeStdin(): Promise<void> {
    return this.commands.sendStdin(this.pid, "", { eof: true });
  }

  /** Sends a signal to its process group (`"SIGTERM"`, `15`); false if it is gone. */
  signal(signal: number | string): Promise<boolean> {
    return this.commands.sendSignal(this.pid, signal);
  }

  /** SIGKILL to its process group; false if it is gone. */
  kill(): Promise<boolean> {
    return this.commands.kill(this.pid);
  }
}

/** Commands in one sandbox: `sandbox.commands`. */
export class Commands {
  /** Attaches in progress by pid: `sendStdin` waits for them (stdin needs a reader). */
  private readonly attaching = new Map<number, Promise<void>>();

  private declare readonly dp: DataPlane;

  /** @internal */
  constructor(dp: DataPlane) {
    hide(this, "dp", dp);
  }

  /** What `console.log` shows: the sandbox ID, no credential. */
  [INSPECT](): string {
    return `Commands { sandboxId: '${this.dp.sandboxId}' }`;
  }

  /**
   * Runs `cmd` with `/bin/sh -c` (an array runs as argv, without a shell). Waits and
   * resolves to a {@link CommandResult} (a non-zero exit is not an error: see
   * `exitCode`), streaming output to `onStdout`/`onStderr`; with `background: true`
   * resolves to a {@link CommandHandle} at once.
   */
  run(cmd: string | string[], opts: RunOpts & { background: true }): Promise<CommandHandle>;
  run(cmd: string | string[], opts?: RunOpts & { background?: false }): Promise<CommandResult>;
  run(cmd: string | string[], opts?: RunOpts): Promise<CommandResult | CommandHandle>;
  async run(cmd: string | string[], opts: RunOpts = {}): Promise<CommandResult | CommandHandle> {
    checkKeys("commands.run", opts, RUN_KEYS);
    const body: Record<string, unknown> = {};
    if (typeof cmd === "string") body.cmd = cmd;
    else if (Array.isArray(cmd) && cmd.length && cmd.every((a) => typeof a === "string")) body.argv = cmd;
    else throw invalid(`cmd must be a shell line or a non-empty argv array; got ${JSON.stringify(cmd)}`);
    body.background = Boolean(opts.background);
    body.stdin = Boolean(opts.stdin);
    if (opts.envs && Object.keys(opts.envs).length) body.envs = opts.envs;
    if (opts.cwd) body.cwd = opts.cwd;
    if (opts.user) body.user = opts.user;
    if (opts.background) {
      const a = expectOk(
        await this.dp.request("POST", "/commands", { json: body, requestTimeoutMs: opts.requestTimeoutMs, signal: opts.signal }),
      );
      return new CommandHandle(this, json<{ pid: number }>(a).pid);
    }
    return this.follow("POST", "/commands", body, opts);
  }

  /** Waits for a command by its pid (see {@link CommandHandle.wait}). */
  wait(pid: number, opts: WaitOpts = {}): Promise<CommandResult> {
    return this.follow("GET", `/commands/${pid}`, undefined, opts, pid);
  }

  private async follow(
    method: string,
    path: string,
    body: unknown,
    opts: WaitOpts,
    attachPid?: number,
  ): Promise<CommandResult> {
    const result: CommandResult = { stdout: "", stderr: "", exitCode: null, signal: null, pid: null };
    const total = opts.timeoutMs;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stop = new AbortController();
    const onAbort = () => stop.abort(opts.signal?.reason);
    if (opts.signal) {
      if (opts.signal.aborted) onAbort();
      else opts.signal.addEventListener("abort", onAbort, { once: true });
    }
    if (total !== undefined) {
      if (typeof total !== "number" || !(total > 0)) {
        throw invalid(`timeoutMs must be a positive number of milliseconds; got ${JSON.stringify(total)}`);
      }
      timer = setTimeout(() => {
        stop.abort(
          new SandboxTimeoutError("timeout", `the command (pid ${result.pid ?? "?"}) did not end within ${total} ms`, 0, {
            pid: result.pid,
          }),
        );
      }, total);
    }
    let attached: () => void = () => undefined;
    if (attachPid !== undefined) {
      this.attaching.set(attachPid, new Promise<void>((r) => (attached = r)));
    }
    let s: Streaming | undefined;
    try {
      try {
        s = await this.dp.stream(method, path, { json: body, requestTimeoutMs: opts.requestTimeoutMs, signal: stop.signal });
      } finally {
        attached();
        if (attachPid !== undefined) this.attaching.delete(attachPid);
      }
      // One streaming decoder per stream: the server sends each raw chunk as `data`
      // (valid UTF-8) or `dataBase64` (not valid on its own), so a character split
      // across chunks only decodes when its bytes are joined.
      const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
      const utf8 = new TextEncoder();
      const emit = (stream: "stdout" | "stderr", data: string) => {
        if (!data) return;
        if (stream === "stdout") {
          result.stdout += data;
          opts.onStdout?.(data);
        } else {
          result.stderr += data;
          opts.onStderr?.(data);
        }
      };
      for await (const ev of ndjson<CommandEvent>(s)) {
        if (ev.event === "start") {
          result.pid = ev.pid ?? null;
        } else if (ev.event === "stdout" || ev.event === "stderr") {
          const bytes =
            ev.data !== undefined ? utf8.encode(ev.data) : ev.dataBase64 !== undefined ? base64Bytes(ev.dataBase64) : undefined;
          if (bytes) emit(ev.event, decoders[ev.event].decode(bytes, { stream: true }));
        } else if (ev.event === "exit") {
          emit("stdout", decoders.stdout.decode());
          emit("stderr", decoders.stderr.decode());
          result.exitCode = ev.exitCode ?? null;
          result.signal = ev.signal ?? null;
          return result;
        } else if (ev.event === "detached") {
          throw new CommandDetachedError(
            "detached",
            `another client attached to the command (pid ${result.pid ?? attachPid ?? "?"}), so this one stopped ` +
              "following it; the command keeps running (wait on it again to take it back)",
            0,
            { pid: result.pid ?? attachPid ?? null },
          );
        } else if (ev.event === "error") {
          throw errorFor(ev.code ?? "sandbox_error", ev.message ?? "the command failed", 200);
        }
      }
      throw new StreamError("protocol", "the command's stream ended before its exit");
    } catch (e) {
      if (stop.signal.aborted && stop.signal.reason instanceof SandboxTimeoutError) {
        const reason = stop.signal.reason as SandboxTimeoutError;
        throw new SandboxTimeoutError(reason.code, reason.reason, 0, { pid: result.pid });
      }
      throw e;
    } finally {
      if (timer !== undefined) clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      stop.abort();
    }
  }

  /** Processes started in the sandbox that run or were not collected yet. */
  async list(): Promise<ProcessInfo[]> {
    const a = expectOk(await this.dp.request("GET", "/commands"));
    return json<{ processes: ProcessInfo[] }>(a).processes;
  }

  /** Sends a signal to a command's process group; false if there is no such process. */
  async sendSignal(pid: number, signal: number | string): Promise<boolean> {
    const a = await this.dp.request("POST", `/commands/${pid}/signal`, { json: { signal: signalNumber(signal) } });
    if (a.status === 404) return false;
    expectOk(a);
    return true;
  }

  /** SIGKILL to a command's process group; false if there is no such process. */
  kill(pid: number): Promise<boolean> {
    return this.sendSignal(pid, 9);
  }

  /**
   * Writes to the stdin of a command started with `stdin: true` while someone waits on
   * it (a `wait()` of this sandbox object that is attaching is waited for first);
   * `eof: true` closes it after the data. Nobody waiting: an `InvalidStateError` (409 `invalid_state`).
   */
  async sendStdin(pid: number, data: string | Uint8Array, opts: { eof?: boolean } = {}): Promise<void> {
    await this.attaching.get(pid);
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    expectOk(
      await this.dp.request("POST", `/commands/${pid}/stdin`, {
        query: { eof: opts.eof ? "true" : "false" },
        body: bytes,
      }),
    );
  }

  /** A handle on a running command (`await handle.wait()` re-attaches). */
  connect(pid: number): CommandHandle {
    if (typeof pid !== "number" || !Number.isInteger(pid) || pid <= 0) {
      throw invalid(`pid must be a process ID (a positive integer); got ${JSON.stringify(pid)}`);
    }
    return new CommandHandle(this, pid);
  }
}
