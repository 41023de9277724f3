/**
 * Templates: custom template builds (steps, a start command and a ready check, ending
 * as a snapshot of the ready VM) and warm pools (ready capacity that
 * `Sandbox.create(template, { warmPoolMode })` checks out).
 *
 * @module
 */

import { Config, type ConnectionOpts } from "./config.js";
import { BuildFailedError, SandboxTimeoutError, invalid } from "./errors.js";
import { call } from "./http.js";
import type { Resources } from "./models.js";
import { type ResourcesOpts, checkKeys, hasResources, resourcesBody } from "./options.js";

/**
 * One build step: exactly one of `run` (a shell command), `packages` (Debian packages),
 * `files` (`[{ path, content }]`) or `env`; `user`, `cwd` and `timeout` where they apply.
 */
export interface BuildStep {
  /** A shell command (`/bin/sh -c`); a non-zero exit fails the build. */
  run?: string;
  /** Debian packages to install with apt. */
  packages?: string[];
  /** Files to write: `{ path, content, mode? }`. */
  files?: Array<{ path: string; content: string; mode?: string }>;
  /** Environment for later steps, the start command and the template's sandboxes. */
  env?: Record<string, string>;
  /** Run and files steps: the user (default root). */
  user?: string;
  /** Run steps: the working directory (default /). */
  cwd?: string;
  /** Seconds (run and packages steps). */
  timeout?: number;
}

/** Why a build failed: which step, its exit code and the end of its output. */
export interface BuildFailure {
  /** The index of the step that failed. */
  step?: number;
  /** Its exit code. */
  exitCode?: number;
  /** The end of its output. */
  outputTail?: string;
  /** What went wrong. */
  message?: string;
  [key: string]: unknown;
}

/** A template, built-in or the team's. */
export interface TemplateInfo {
  /** Its ID (`tpl-…`, or a built-in name such as `base`). */
  templateId: string;
  /** The team-unique name it was built with. */
  name?: string;
  /** One of the operator's built-in templates. */
  builtin: boolean;
  /** The template it was built from. */
  from: string;
  /** `building`, `ready` or `failed`. */
  status: "building" | "ready" | "failed";
  /** Its VM shape. */
  resources: Resources;
  /** Environment its sandboxes start with. */
  envVars: Record<string, string>;
  /** The long-running process its sandboxes start with. */
  startCmd?: string;
  /** The check that says it is ready. */
  readyCmd?: string;
  /** Its build steps and their state (done, cached, failed...). */
  steps: Array<Record<string, unknown>>;
  /** Why the build failed, if it did. */
  error?: BuildFailure;
  /** When the build was asked for (ISO 8601). */
  createdAt: string;
  /** When it became ready (ISO 8601). */
  readyAt?: string;
  /** How long the build took, milliseconds. */
  buildMs?: number;
}

/** One line of a build's log. */
export interface BuildLogLine {
  /** Its sequence number (increasing). */
  seq: number;
  /** When it was written (ISO 8601). */
  time: string;
  /** The step it belongs to. */
  step?: number;
  /** `stdout`, `stderr`, or `build` (the builder's own lines). */
  stream: "stdout" | "stderr" | "build";
  /** The line, without its newline. */
  text: string;
}

/** A template's warm pool. */
export interface WarmPool {
  /** The template it keeps instances of. */
  templateId: string;
  /** Instances to keep ready. */
  target: number;
  /** Instances ready for checkout now. */
  ready: number;
  /** Instances being prepared. */
  warming: number;
  /** Creates served from the pool. */
  checkouts: number;
  /** Creates that found no ready instance. */
  misses: number;
  /** The shape of its instances. */
  resources?: Resources;
  /** Whether checked-out instances are replaced. */
  refill?: boolean;
  /** Why the last refill failed, while refills keep failing. */
  lastError?: { message: string; at: string; failures?: number; retryInS?: number } | null;
}

/** Options of `Template.build`. */
export interface BuildOpts extends ConnectionOpts {
  /** Run in order; each step's result is cached. */
  steps?: BuildStep[];
  /** Unique within the team; usable as a template ID. */
  name?: string;
  /** `base` (default), `minimal`, or a ready template of the team. */
  fromTemplate?: string;
  /** A long-running process the template's sandboxes start with. */
  startCmd?: string;
  /** Exits 0 once the template is ready; retried until it does. */
  readyCmd?: string;
  /** Seconds the ready check may take (default 60). */
  readyTimeout?: number;
  /** The template's VM shape. */
  resources?: ResourcesOpts;
  /** Each log line as it arrives (with `wait`). */
  onLog?: (line: BuildLogLine) => void;
  /** With `wait`: milliseconds the build may take in all (see {@link WaitBuiltOpts}). */
  timeoutMs?: number;
  /** With `wait`: stops waiting (the build goes on). */
  signal?: AbortSignal;
  /** Default true: follow the build and resolve to the ready template. */
  wait?: boolean;
}

type Doc = Record<string, any>;

function parseTemplate(doc: Doc): TemplateInfo {
  const { templateID, ...rest } = doc;
  return { templateId: templateID, ...rest } as TemplateInfo;
}

function parseWarmPool(doc: Doc): WarmPool {
  const { templateID, ...rest } = doc;
  return { templateId: templateID, ...rest } as WarmPool;
}

const BUILD_KEYS = new Set([
  "steps", "name", "fromTemplate", "startCmd", "readyCmd", "readyTimeout", "resources", "onLog", "wait",
  "timeoutMs", "signal", "apiKey", "domain", "requestTimeoutMs",
]);

/** Options of {@link Template.waitBuilt}. */
export interface WaitBuiltOpts extends ConnectionOpts {
  /** Each log line as it arrives. */
  onLog?: (line: BuildLogLine) => void;
  /**
   * Milliseconds to wait for the build in all (default 1800000, 30 minutes); past them
   * a {@link SandboxTimeoutError} (code `timeout`) and the build goes on (wait again, or
   * read it with `Template.get`).
   */
  timeoutMs?: number;
  /** Stops waiting (rejects with the signal's reason); the build goes on. */
  signal?: AbortSignal;
}

/** Template builds and warm pools (all static). */
export class Template {
  private constructor() {}

  /**
   * Builds a template from `fromTemplate` and `steps`. With `wait` (default) the log
   * streams to `onLog` line by line and the ready template is returned; a failed build
   * throws a {@link BuildFailedError} (code `build_failed`) saying which step failed and
   * why (the failure is in `details`).
   */
  static async build(opts: BuildOpts = {}): Promise<TemplateInfo> {
    checkKeys("Template.build", opts, BUILD_KEYS);
    const config = Config.resolve(opts);
    const body: Doc = { from: opts.fromTemplate ?? "base", steps: opts.steps ?? [] };
    if (opts.name !== undefined) body.name = opts.name;
    if (opts.startCmd !== undefined) body.startCmd = opts.startCmd;
    if (opts.readyCmd !== undefined) body.readyCmd = opts.readyCmd;
    if (opts.readyTimeout !== undefined) body.readyTimeout = opts.readyTimeout;
    if (hasResources(opts.resources)) body.resources = resourcesBody(opts.resources);
    const template = parseTemplate(await call<Doc>(config, "POST", "/templates", { json: body }));
    if (opts.wait === false) return template;
    return Template.waitBuilt(template.templateId, {
      apiKey: opts.apiKey,
      domain: opts.domain,
      requestTimeoutMs: opts.requestTimeoutMs,
      onLog: opts.onLog,
      timeoutMs: opts.timeoutMs,
      signal: opts.signal,
    });
  }

  /**
   * Follows a build's log to its end; resolves to the template once ready (see `build`).
   * A {@link SandboxTimeoutError} after `timeoutMs` (default 30 minutes); `signal` stops
   * waiting at once. Neither stops the build.
   */
  static async waitBuilt(templateId: string, opts: WaitBuiltOpts = {}): Promise<TemplateInfo> {
    const config = Config.resolve(opts);
    const timeoutMs = opts.timeoutMs ?? 30 * 60_000;
    if (typeof timeoutMs !== "number" || !(timeoutMs > 0)) throw invalid("timeoutMs must be a positive number of milliseconds");
    const stop = new AbortController();
    const onAbort = () => stop.abort(opts.signal?.reason);
    if (opts.signal) {
      if (opts.signal.aborted) throw opts.signal.reason ?? new Error("aborted");
      opts.signal.addEventListener("abort", onAbort, { once: true });
    }
    const timer = setTimeout(
      () => stop.abort(new SandboxTimeoutError("timeout", `template ${templateId} was still building after ${timeoutMs} ms`)),
      Math.min(timeoutMs, 2_147_483_647),
    );
    try {
      return await Template.follow(templateId, config, opts, stop.signal);
    } catch (e) {
      if (stop.signal.aborted) throw stop.signal.reason ?? e;
      throw e;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
    }
  }

  private static async follow(templateId: string, config: Config, opts: WaitBuiltOpts, signal: AbortSignal): Promise<TemplateInfo> {
    // A page waits up to 20 s for a line: the request must be allowed longer.
    const pageTimeout = Math.max(config.requestTimeoutMs, 40_000);
    let after = 0;
    for (;;) {
      const page = await call<Doc>(config, "GET", `/templates/${encodeURIComponent(templateId)}/logs`, {
        query: { after, wait: 20 },
        requestTimeoutMs: pageTimeout,
        signal,
      });
      for (const line of page.lines) opts.onLog?.(line);
      after = page.next;
      if (page.status !== "building" && !page.lines.length) break;
    }
    const template = parseTemplate(
      await call<Doc>(config, "GET", `/templates/${encodeURIComponent(templateId)}`, { signal }),
    );
    if (template.status !== "ready") {
      const error = template.error ?? {};
      throw new BuildFailedError(
        "build_failed",
        `template ${templateId} failed to build: ${error.message ?? "no reason recorded"}`,
        422,
        error,
      );
    }
    return template;
  }

  /** A template (built-in or the team's, by ID or name). */
  static async get(templateId: string, opts: ConnectionOpts = {}): Promise<TemplateInfo> {
    return parseTemplate(await call<Doc>(Config.resolve(opts), "GET", `/templates/${encodeURIComponent(templateId)}`));
  }

  /** The built-in templates and the team's own. */
  static async list(opts: ConnectionOpts = {}): Promise<TemplateInfo[]> {
    const doc = await call<Doc>(Config.resolve(opts), "GET", "/templates");
    return doc.templates.map(parseTemplate);
  }

  /** Deletes a template (cancelling its build if it runs); its sandboxes keep running. */
  static async delete(templateId: string, opts: ConnectionOpts = {}): Promise<void> {
    await call(Config.resolve(opts), "DELETE", `/templates/${encodeURIComponent(templateId)}`);
  }

  /** A template's warm pool: target, ready, warming, checkouts, misses. */
  static async getWarmPool(template: string, opts: ConnectionOpts = {}): Promise<WarmPool> {
    return parseWarmPool(await call<Doc>(Config.resolve(opts), "GET", `/templates/${encodeURIComponent(template)}/warm-pool`));
  }

  /**
   * Keeps `size` ready instances of `template` with this shape; it fills in the
   * background. The built-in templates' pools are the operator's (a team key gets 403).
   */
  static async setWarmPool(
    template: string,
    size: number,
    opts: ConnectionOpts & { resources?: ResourcesOpts; refill?: boolean } = {},
  ): Promise<WarmPool> {
    if (!Number.isInteger(size) || size < 0) throw invalid(`size must be an integer from 0; got ${JSON.stringify(size)}`);
    const body: Doc = { size, refill: opts.refill ?? true };
    if (hasResources(opts.resources)) body.resources = resourcesBody(opts.resources);
    return parseWarmPool(
      await call<Doc>(Config.resolve(opts), "PUT", `/templates/${encodeURIComponent(template)}/warm-pool`, { json: body }),
    );
  }
}
