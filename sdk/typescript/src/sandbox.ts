/**
 * `Sandbox`: create, connect, list and inspect sandboxes, and everything one sandbox
 * does — its lifecycle, snapshots, forks, previews, metrics, logs, recordings, event
 * stream, egress and security policy — with `.commands`, `.files`, `.pty` and `.desktop`,
 * and the code interpreter (`runCode`).
 *
 * @module
 */

import {
  type CodeContext,
  type CodeContextOpts,
  type Execution,
  type RunCodeOpts,
  createCodeContext,
  removeCodeContext,
  runCode,
} from "./code.js";
import { Commands, type RunOpts } from "./commands.js";
import { Config, type ConnectionOpts, type RequestOpts } from "./config.js";
import { NotFoundError, SandboxTimeoutError, errorFor, invalid } from "./errors.js";
import { Desktop } from "./desktop.js";
import { type StreamEventsOpts, streamEvents } from "./events.js";
import { Filesystem } from "./files.js";
import { DataPlane, INSPECT, call, callBytes, hide } from "./http.js";
import {
  type CommandResult,
  type LogLine,
  type Migration,
  type Recording,
  type SandboxEvent,
  type SandboxInfo,
  type SandboxMetrics,
  type SandboxState,
  type SnapshotInfo,
  parseMetrics,
  parseRecording,
  parseSandbox,
  parseSnapshot,
} from "./models.js";
import {
  type EgressOpts,
  type SandboxOpts,
  checkKeys,
  checkPort,
  createBody,
  egressBody,
  fieldsQuery,
  metricsQuery,
  onlyFields,
} from "./options.js";
import type { Preview, PreviewProxyTarget } from "./previews.js";
import { Pty } from "./pty.js";
import {
  type AuditPage,
  type AuditRecord,
  type SecurityPolicy,
  auditParams,
  parseAuditPage,
  securityPolicyBody,
} from "./security.js";
import { Snapshot } from "./snapshots.js";

type Doc = Record<string, any>;

/** Which sandboxes `Sandbox.list` returns. */
export interface SandboxQuery {
  /** One state or several (default: every state but deleted). */
  state?: SandboxState | SandboxState[] | string | string[];
  /** Sandboxes whose metadata has all these entries. */
  metadata?: Record<string, string>;
}

/** Options of `Sandbox.list`. */
export interface ListOpts extends ConnectionOpts {
  /** Which sandboxes: by `state` and `metadata`. */
  query?: SandboxQuery;
  /** Sandboxes per page. */
  limit?: number;
  /** A previous page's `nextToken`. */
  nextToken?: string | null;
  /** Only these names per sandbox (e.g. `["id", "status"]`): raw objects instead of infos. */
  fields?: string[];
}

/** One page of `Sandbox.list`. */
export interface SandboxPage {
  /** The sandboxes of this page, oldest first. */
  sandboxes: SandboxInfo[];
  /** Pass as `nextToken` for the next page; null on the last. */
  nextToken: string | null;
}

/** One page of `Sandbox.list({ fields })`: each sandbox with just the names asked for. */
export interface ProjectedPage {
  /** Each sandbox with just the names asked for. */
  sandboxes: Array<Record<string, unknown>>;
  /** Pass as `nextToken` for the next page; null on the last. */
  nextToken: string | null;
}

/** Options of `Sandbox.connect` and `sandbox.connect`. */
export interface ConnectOpts extends ConnectionOpts {
  /** A new timeout in seconds from now. */
  timeout?: number;
}

/** Options of `Sandbox.restore` and `snapshot.restore`. */
export interface RestoreOpts extends ConnectionOpts {
  /** The snapshot (default: the newest; pause, then periodic, then manual). */
  snapshotId?: string | SnapshotInfo;
  /** Seconds to live (default 300). */
  timeout?: number;
  /** Default: the original's. */
  metadata?: Record<string, string>;
  /** What it does with the original's read-write volumes (default `"readonly"`). */
  volumes?: VolumeInheritance;
}

/**
 * What a fork child or a restored copy does with the original's read-write volumes:
 * `"readonly"` mounts the same volume read-only (a write fails with EROFS; the original
 * keeps writing it), `"copy"` a new volume of its content (named in the new sandbox's
 * `mounts`), read-write and saved like any other.
 */
export type VolumeInheritance = "readonly" | "copy";

/** Options of `sbx.fork`. */
export interface ForkOpts extends RequestOpts {
  /** What the children do with its read-write volumes (default `"readonly"`). */
  volumes?: VolumeInheritance;
}

function volumesMode(where: string, volumes: unknown): VolumeInheritance | undefined {
  if (volumes === undefined || volumes === "readonly" || volumes === "copy") return volumes;
  throw invalid(`${where}: volumes must be "readonly" (the default: the same volume, read-only) or "copy" (a new volume of its content); got ${JSON.stringify(volumes)}`);
}

/** Options of `Sandbox.runOnce`: the sandbox's and the command's. */
export interface RunOnceOpts extends SandboxOpts {
  /** The command's options (not `background`). */
  run?: Omit<RunOpts, "background">;
}

const LIST_KEYS = new Set(["query", "limit", "nextToken", "fields", "apiKey", "domain", "requestTimeoutMs"]);
const CONNECT_KEYS = new Set(["timeout", "apiKey", "domain", "requestTimeoutMs"]);
const RESTORE_KEYS = new Set(["snapshotId", "timeout", "metadata", "volumes", "apiKey", "domain", "requestTimeoutMs"]);

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * A connected sandbox. Create one with {@link Sandbox.create}, or reach an existing one
 * with {@link Sandbox.connect}; `sandbox.commands`, `sandbox.files` and `sandbox.pty`
 * work on it.
 */
export class Sandbox {
  /** Its ID (`sbx-…`). */
  readonly sandboxId: string;
  /** Commands in the sandbox. */
  readonly commands: Commands;
  /** The sandbox's filesystem. */
  readonly files: Filesystem;
  /** Terminals in the sandbox. */
  readonly pty: Pty;
  /** The desktop of a `desktop` sandbox: its viewer's URL, screenshots, mouse and keyboard. */
  readonly desktop: Desktop;
  /** @internal Its data plane (API key and runtime token: not enumerable, not printed). */
  declare readonly dp: DataPlane;
  /** The state it was last seen in (by create, connect, getInfo, waitReady, ...). */
  private declare lastState: string | undefined;

  /**
   * A sandbox object for an API description (what create, connect and restore return);
   * prefer the static methods.
   */
  constructor(info: SandboxInfo, config: Config) {
    this.sandboxId = info.sandboxId;
    hide(this, "dp", new DataPlane(info.sandboxId, config, info.runtime ?? null));
    hide(this, "lastState", info.state);
    this.commands = new Commands(this.dp);
    this.files = new Filesystem(this.dp);
    this.pty = new Pty(this.dp);
    this.desktop = new Desktop(this);
  }

  /**
   * What `console.log` and `util.inspect` show: the ID and the state it was last seen
   * in, never the API key or the runtime token.
   */
  [INSPECT](): string {
    return `Sandbox { sandboxId: '${this.sandboxId}', state: '${this.lastState ?? "unknown"}' }`;
  }

  private get config(): Config {
    return this.dp.config;
  }

  // -- static ------------------------------------------------------------------------

  /**
   * Creates a sandbox and resolves once it runs (unless `waitReady: false`).
   *
   * ```ts
   * const sandbox = await Sandbox.create("base", { timeout: 1800, envVars: { FOO: "bar" } });
   * ```
   *
   * @param template - the template (default `base`), or the options with `template` in them
   * @param opts - timeout, envVars, metadata, resources, network, lifecycle, ... (see {@link SandboxOpts})
   */
  static async create(template?: string | SandboxOpts, opts?: SandboxOpts): Promise<Sandbox> {
    let tpl: string | undefined;
    let o: SandboxOpts;
    if (typeof template === "object" && template !== null) {
      if (opts !== undefined) throw invalid("Sandbox.create takes (template, opts) or (opts); got two option objects");
      o = template;
    } else {
      tpl = template;
      o = opts ?? {};
    }
    const body = createBody(tpl, o);
    const config = Config.resolve(o);
    const doc = await call<Doc>(config, "POST", "/sandboxes", { json: body });
    return new Sandbox(parseSandbox(doc), config);
  }

  /**
   * Connects to an existing sandbox, resuming it if it is paused, and takes fresh
   * data-plane access; `timeout` (seconds) sets a new timeout from now.
   */
  static async connect(sandboxId: string, opts: ConnectOpts = {}): Promise<Sandbox> {
    checkKeys("Sandbox.connect", opts, CONNECT_KEYS);
    const config = Config.resolve(opts);
    const doc = await call<Doc>(config, "POST", `/sandboxes/${encodeURIComponent(sandboxId)}/connect`, {
      json: opts.timeout === undefined ? {} : { timeout: opts.timeout },
    });
    return new Sandbox(parseSandbox(doc), config);
  }

  /**
   * One page of the team's sandboxes, oldest first. `query` filters by `state` and
   * `metadata`; with `fields` each sandbox is an object of just those names (the seeds'
   * `id` and `status` included).
   */
  static list(opts: ListOpts & { fields: string[] }): Promise<ProjectedPage>;
  static list(opts?: ListOpts): Promise<SandboxPage>;
  static async list(opts: ListOpts = {}): Promise<SandboxPage | ProjectedPage> {
    checkKeys("Sandbox.list", opts, LIST_KEYS);
    const params: Array<[string, string]> = [];
    const projection = fieldsQuery(opts.fields);
    if (projection !== undefined) params.push(["fields", projection]);
    const query = opts.query ?? {};
    checkKeys("Sandbox.list's query", query, new Set(["state", "metadata"]));
    if (query.state) params.push(["state", Array.isArray(query.state) ? query.state.join(",") : query.state]);
    for (const [k, v] of Object.entries(query.metadata ?? {})) params.push(["metadata", `${k}=${v}`]);
    if (opts.limit !== undefined) params.push(["limit", String(opts.limit)]);
    if (opts.nextToken) params.push(["nextToken", opts.nextToken]);
    const config = Config.resolve(opts);
    const doc = await call<Doc>(config, "GET", "/sandboxes", { query: params });
    const nextToken = doc.nextToken ?? null;
    if (opts.fields) return { sandboxes: doc.sandboxes.map((d: Doc) => onlyFields(d, opts.fields!)), nextToken };
    return { sandboxes: doc.sandboxes.map(parseSandbox), nextToken };
  }

  /**
   * A sandbox's description; read-only, it never wakes a paused one. With `fields`
   * (e.g. `["id", "status"]`) an object of just those names.
   */
  static getInfoById(sandboxId: string, opts: ConnectionOpts & { fields: string[] }): Promise<Record<string, unknown>>;
  static getInfoById(sandboxId: string, opts?: ConnectionOpts): Promise<SandboxInfo>;
  static async getInfoById(
    sandboxId: string,
    opts: ConnectionOpts & { fields?: string[] } = {},
  ): Promise<SandboxInfo | Record<string, unknown>> {
    checkKeys("Sandbox.getInfoById", opts, new Set(["fields", "apiKey", "domain", "requestTimeoutMs"]));
    const projection = fieldsQuery(opts.fields);
    const config = Config.resolve(opts);
    const doc = await call<Doc>(config, "GET", `/sandboxes/${encodeURIComponent(sandboxId)}`, {
      query: projection === undefined ? undefined : { fields: projection },
    });
    return opts.fields ? onlyFields(doc, opts.fields) : parseSandbox(doc);
  }

  /**
   * Starts a new sandbox from a snapshot of `sandboxId` (which may be deleted, or on
   * another worker): `snapshotId`, or the newest. Resolves to it, connected.
   */
  static async restore(sandboxId: string, opts: RestoreOpts = {}): Promise<Sandbox> {
    checkKeys("Sandbox.restore", opts, RESTORE_KEYS);
    const body: Doc = { sandboxID: sandboxId };
    const snap = opts.snapshotId;
    if (snap !== undefined) body.snapshotID = typeof snap === "string" ? snap : snap.snapshotId;
    if (opts.timeout !== undefined) body.timeout = opts.timeout;
    if (opts.metadata !== undefined) body.metadata = opts.metadata;
    const volumes = volumesMode("Sandbox.restore", opts.volumes);
    if (volumes !== undefined) body.volumes = volumes;
    const config = Config.resolve(opts);
    const doc = await call<Doc>(config, "POST", "/sandboxes/restore", { json: body });
    return new Sandbox(parseSandbox(doc), config);
  }

  /**
   * Creates a sandbox (default template `base`), runs `cmd`, and kills the sandbox
   * whatever happened; resolves to the command's result.
   */
  static async runOnce(cmd: string | string[], opts: RunOnceOpts = {}): Promise<CommandResult> {
    const { run, ...create } = opts;
    const sbx = await Sandbox.create(create);
    try {
      return await sbx.commands.run(cmd, { ...run, background: false });
    } finally {
      await sbx.kill().catch(() => false);
    }
  }

  // -- the control plane ---------------------------------------------------------------

  private control<T = Doc>(method: string, action: string, opts: { json?: unknown; query?: Doc; requestTimeoutMs?: number } = {}): Promise<T> {
    const path = `/sandboxes/${this.sandboxId}${action ? `/${action}` : ""}`;
    return call<T>(this.config, method, path, opts);
  }

  /** Reconnects: resumes it if paused and takes fresh data-plane access; resolves to itself. */
  async connect(opts: { timeout?: number; requestTimeoutMs?: number } = {}): Promise<this> {
    checkKeys("sandbox.connect", opts, new Set(["timeout", "requestTimeoutMs"]));
    const doc = await this.control("POST", "connect", {
      json: opts.timeout === undefined ? {} : { timeout: opts.timeout },
      requestTimeoutMs: opts.requestTimeoutMs,
    });
    const info = parseSandbox(doc);
    this.dp.runtime = info.runtime ?? null;
    this.lastState = info.state;
    return this;
  }

  /** Its description (read-only). */
  async getInfo(opts: RequestOpts = {}): Promise<SandboxInfo> {
    const info = parseSandbox(await this.control("GET", "", opts));
    this.lastState = info.state;
    return info;
  }

  /** Whether it is running. */
  async isRunning(opts: RequestOpts = {}): Promise<boolean> {
    return (await this.getInfo(opts)).state === "running";
  }

  /**
   * Waits until it runs (after `create(..., { waitReady: false })`) and takes its
   * data-plane access. A {@link SandboxTimeoutError} after `timeoutMs` (default 60000);
   * the failure's code if it ends in `error`. `requestTimeoutMs` bounds each status
   * request (default: the sandbox's, at most what is left of `timeoutMs`, at least 1 s).
   */
  async waitReady(opts: { timeoutMs?: number } & RequestOpts = {}): Promise<void> {
    checkKeys("waitReady", opts, new Set(["timeoutMs", "requestTimeoutMs"]));
    const timeoutMs = opts.timeoutMs ?? 60_000;
    if (typeof timeoutMs !== "number" || !(timeoutMs > 0)) throw invalid("timeoutMs must be a positive number of milliseconds");
    const perRequest = opts.requestTimeoutMs ?? this.config.requestTimeoutMs;
    if (typeof perRequest !== "number" || !(perRequest > 0)) {
      throw invalid("requestTimeoutMs must be a positive number of milliseconds");
    }
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      const info = await this.getInfo({ requestTimeoutMs: Math.max(Math.min(left, perRequest), 1_000) });
      if (info.state === "running") {
        this.dp.runtime = info.runtime ?? null;
        return;
      }
      if (info.state === "error" || info.state === "deleted") {
        const d = info.diagnostic ?? {};
        throw errorFor(
          d.code ?? "sandbox_failed",
          `sandbox ${this.sandboxId} is ${info.state}, it will not become ready: ${d.message ?? "no diagnostic recorded"}`,
          0,
          info.diagnostic ?? undefined,
        );
      }
      if (left <= 0) {
        throw new SandboxTimeoutError("timeout", `sandbox ${this.sandboxId} is still ${info.state} after ${timeoutMs} ms`);
      }
      await sleep(Math.min(200, Math.max(left, 0)));
    }
  }

  /** Ends the sandbox; resolves to false if it was already gone. */
  async kill(opts: RequestOpts = {}): Promise<boolean> {
    try {
      await this.control("DELETE", "", opts);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Same as {@link Sandbox.kill} (seed 003's name). */
  delete(opts: RequestOpts = {}): Promise<boolean> {
    return this.kill(opts);
  }

  /** Sets its timeout: `timeout` seconds from now. */
  async setTimeout(timeout: number, opts: RequestOpts = {}): Promise<void> {
    if (typeof timeout !== "number" || !Number.isInteger(timeout) || timeout < 1) {
      throw invalid(`timeout is in seconds, an integer from 1; got ${JSON.stringify(timeout)}`);
    }
    await this.control("POST", "timeout", { json: { timeout }, ...opts });
  }

  /** Extends its life by `duration` seconds from now (default: its timeout). */
  async refresh(duration?: number | ({ duration?: number } & RequestOpts), opts: RequestOpts = {}): Promise<void> {
    const o = typeof duration === "object" && duration !== null ? duration : { duration, ...opts };
    await this.control("POST", "refreshes", {
      json: o.duration === undefined ? {} : { duration: o.duration },
      requestTimeoutMs: o.requestTimeoutMs,
    });
  }

  /** Pauses it: memory and disk kept in a snapshot on the worker, the VM ended. */
  async pause(opts: RequestOpts = {}): Promise<void> {
    await this.control("POST", "pause", { json: {}, ...opts });
  }

  /** Resumes it after a pause or hibernate, with fresh data-plane access. */
  async resume(opts: RequestOpts = {}): Promise<void> {
    const doc = await this.control("POST", "resume", { json: {}, ...opts });
    this.dp.runtime = parseSandbox(doc).runtime ?? null;
  }

  /** Pauses into object storage: any worker sharing the store can resume it. */
  async hibernate(opts: RequestOpts = {}): Promise<void> {
    await this.control("POST", "hibernate", { json: {}, ...opts });
  }

  /**
   * Moves it to another host of the cluster without stopping it (an operator key): to
   * `host`, or where placement chooses. Its processes run on; command streams,
   * terminals and previews reconnect.
   */
  async migrate(host?: string, opts: RequestOpts = {}): Promise<Migration> {
    const json = host === undefined ? {} : { host };
    return (await this.control("POST", "migrate", { json, ...opts })) as Migration;
  }

  /**
   * Replaces its egress policy (`internet`, `allow`, `deny`); a running sandbox follows
   * it at once (open connections it no longer allows are reset).
   */
  async setEgress(egress: EgressOpts = {}, opts: RequestOpts = {}): Promise<SandboxInfo> {
    return parseSandbox(await this.control("PUT", "egress", { json: egressBody(egress), ...opts }));
  }

  /**
   * Replaces its security policy; a running sandbox follows it at once. Masked secrets
   * keep their placeholders; one not given at create cannot be added live (400).
   * Resolves to the new description (`securityPolicy` as the API keeps it).
   */
  async setSecurityPolicy(policy: SecurityPolicy, opts: RequestOpts = {}): Promise<SandboxInfo> {
    const body = securityPolicyBody(policy);
    return parseSandbox(await this.control("PUT", "security-policy", { json: body, ...opts }));
  }

  /**
   * One page of its audit: at most `limit` (1 to 1000, default 100) records with an ID
   * above `after` (default 0), oldest first. Pass the page's `next` as `after` for the
   * next page; `more` says whether there are more now. Without a security policy the
   * page is empty (`next` 0).
   */
  async getAudit(opts: { after?: number; limit?: number } & RequestOpts = {}): Promise<AuditPage> {
    const { after, limit } = auditParams(opts.after ?? 0, opts.limit ?? 100);
    const doc = await this.control("GET", "audit", { query: { after, limit }, requestTimeoutMs: opts.requestTimeoutMs });
    return parseAuditPage(doc, after);
  }

  /**
   * Every audit record with an ID above `after`, oldest first, page after page, up to
   * the newest there is now: `for await (const r of sandbox.audit()) ...`.
   */
  audit(opts: { after?: number } & RequestOpts = {}): AsyncGenerator<AuditRecord, void, undefined> {
    auditParams(opts.after ?? 0, 1);
    return this.auditPages(opts.after ?? 0, opts.requestTimeoutMs);
  }

  private async *auditPages(after: number, requestTimeoutMs?: number): AsyncGenerator<AuditRecord, void, undefined> {
    for (;;) {
      const page = await this.getAudit({ after, limit: 1000, requestTimeoutMs });
      yield* page.records;
      if (!page.more || page.next <= after) return;
      after = page.next;
    }
  }

  // -- snapshots and forks -------------------------------------------------------------

  /**
   * Takes a snapshot to object storage; the sandbox keeps running. Its ID works as a
   * template; a `name` (unique in the team) makes it a start source (`snapshotName`).
   */
  async createSnapshot(opts: { name?: string } & RequestOpts = {}): Promise<SnapshotInfo> {
    const doc = await this.control("POST", "snapshots", {
      json: opts.name === undefined ? {} : { name: opts.name },
      requestTimeoutMs: opts.requestTimeoutMs,
    });
    return parseSnapshot(doc);
  }

  /**
   * A manual snapshot as a {@link Snapshot}, which restores (`snap.restore()`) and
   * deletes itself. Manual snapshots accumulate and survive `kill()`.
   */
  async snapshot(opts: { name?: string } & RequestOpts = {}): Promise<Snapshot> {
    return new Snapshot(await this.createSnapshot(opts), this.config);
  }

  /** Its snapshots (pause, periodic, manual), newest first. */
  async listSnapshots(opts: RequestOpts = {}): Promise<Snapshot[]> {
    const doc = await this.control("GET", "snapshots", opts);
    return doc.snapshots.map((d: Doc) => new Snapshot(parseSnapshot(d), this.config));
  }

  /** Deletes one of its snapshots from the store. */
  async deleteSnapshot(snapshotId: string, opts: RequestOpts = {}): Promise<void> {
    await this.control("DELETE", `snapshots/${encodeURIComponent(snapshotId)}`, opts);
  }

  /**
   * Branches it into `count` (default 1) running children with its memory, processes
   * and disk; it keeps running. `opts.volumes`: what the children do with its
   * read-write volumes (see {@link VolumeInheritance}).
   */
  async fork(count = 1, opts: ForkOpts = {}): Promise<Sandbox[]> {
    if (!Number.isInteger(count) || count < 1) throw invalid(`count must be an integer from 1; got ${JSON.stringify(count)}`);
    const { volumes, ...request } = opts;
    const json: Doc = { count };
    const mode = volumesMode("fork", volumes);
    if (mode !== undefined) json.volumes = mode;
    const doc = await this.control("POST", "fork", { json, ...request });
    return doc.sandboxes.map((c: Doc) => new Sandbox(parseSandbox(c), this.config));
  }

  // -- previews ------------------------------------------------------------------------

  /**
   * A signed preview URL for `port`: `{ url, token, host, expiresAt, public,
   * proxyTarget }`. Redact it before logging (`redactPreviewUrl`).
   */
  async getPreviewUrl(port: number, opts: RequestOpts = {}): Promise<Preview> {
    return this.control<Preview>("POST", "previews", { json: { port: checkPort(port) }, ...opts });
  }

  /**
   * For application proxies: `{ url, header, token }` — forward to `url` with `token`
   * in the `x-nullspace-preview-proxy-token` header (no token in browser-visible URLs).
   */
  async createPreviewProxyTarget(port: number, opts: RequestOpts = {}): Promise<PreviewProxyTarget> {
    return (await this.getPreviewUrl(port, opts)).proxyTarget;
  }

  /** Makes `port` reachable without a token (or private again with `false`). */
  async setPortPublic(port: number, isPublic = true, opts: RequestOpts = {}): Promise<Preview> {
    return this.control<Preview>("POST", "previews", { json: { port: checkPort(port), public: isPublic }, ...opts });
  }

  /**
   * The preview host name of `port`: `<port>-<sandboxId>.<preview domain>`. A browser
   * needs `getPreviewUrl` (its token) unless the port is public.
   */
  async getHost(port: number, opts: RequestOpts = {}): Promise<string> {
    return (await this.getPreviewUrl(port, opts)).host;
  }

  // -- the code interpreter ------------------------------------------------------------

  /**
   * Runs `code` in a Jupyter kernel of a `code-interpreter` sandbox (the `default`
   * context, or `context`'s own kernel) and resolves to its {@link Execution}: `results`
   * (each with `text`, `png`, `svg`, `html`, `json`, `markdown`, ... where the kernel
   * gave them), `logs`, `error` (the exception the code raised; not thrown). State is
   * kept between runs in a context. Past `timeoutMs` (default 60000) the kernel is
   * interrupted (`execution.timedOut`); `language: "bash"` runs the code with bash.
   * Output streams to `onStdout`/`onStderr`, results to `onResult`, the exception to
   * `onError`. A sandbox without the interpreter: a {@link SandboxError} with code
   * `code_interpreter`.
   *
   * ```ts
   * const ex = await sandbox.runCode("import math; math.pi * 2");
   * console.log(ex.text);   // 6.283185307179586
   * ```
   */
  async runCode(code: string, opts: RunCodeOpts = {}): Promise<Execution> {
    return runCode(this, code, opts);
  }

  /** A new kernel of its own (separate variables and imports) for `runCode({ context })`. */
  async createCodeContext(opts: CodeContextOpts = {}): Promise<CodeContext> {
    return createCodeContext(this, opts);
  }

  /** Ends a context's kernel (made by {@link Sandbox.createCodeContext}). */
  async removeCodeContext(context: CodeContext | string, opts: RequestOpts = {}): Promise<void> {
    return removeCodeContext(this, context, opts);
  }

  // -- observing -----------------------------------------------------------------------

  /**
   * Resource samples from `start` (default: its creation) to `end` (default: now), as
   * Dates or Unix seconds: every 5 s for the last hour, coarser before.
   */
  async getMetrics(opts: { start?: Date | number; end?: Date | number } & RequestOpts = {}): Promise<SandboxMetrics[]> {
    const doc = await this.control("GET", "metrics", {
      query: metricsQuery(opts.start, opts.end),
      requestTimeoutMs: opts.requestTimeoutMs,
    });
    return doc.metrics.map(parseMetrics);
  }

  /**
   * Its log lines from line `offset` (default 0): boot console, lifecycle events,
   * diagnostics, the template's start command (`source: "start"`) and background
   * commands (`"process"`). At most `limit` (1 to 1000); without it, every page.
   */
  async logs(opts: { offset?: number; limit?: number } & RequestOpts = {}): Promise<LogLine[]> {
    let offset = opts.offset ?? 0;
    if (!Number.isInteger(offset) || offset < 0) throw invalid(`offset must be a line number from 0; got ${JSON.stringify(offset)}`);
    if (opts.limit !== undefined && (!Number.isInteger(opts.limit) || opts.limit < 1 || opts.limit > 1000)) {
      throw invalid(`limit must be 1 to 1000 lines; got ${JSON.stringify(opts.limit)}`);
    }
    const out: LogLine[] = [];
    for (;;) {
      const doc = await this.control("GET", "logs", {
        query: { offset, limit: opts.limit },
        requestTimeoutMs: opts.requestTimeoutMs,
      });
      out.push(...doc.logs);
      if (opts.limit !== undefined || doc.next === undefined || doc.next === null) return out;
      offset = doc.next;
    }
  }

  /** Its recordings (created with `recording: true`); also after it was killed. */
  async listRecordings(opts: RequestOpts = {}): Promise<Recording[]> {
    const doc = await this.control("GET", "recordings", opts);
    return doc.recordings.map(parseRecording);
  }

  /** A recording's bytes: JSON lines of commands, or an asciicast v2 terminal session. */
  async getRecording(recordingId: string, opts: RequestOpts = {}): Promise<Uint8Array> {
    return callBytes(
      this.config,
      `/sandboxes/${this.sandboxId}/recordings/${encodeURIComponent(recordingId)}`,
      opts.requestTimeoutMs,
    );
  }

  /**
   * Its lifecycle events `{ id, at, type, data }` as they happen, as an async iterator:
   * replayed from the first (or after `afterEventId`; `liveOnly` skips the replay, see
   * {@link StreamEventsOpts.liveOnly} for its one limit), then live. Reconnects by itself
   * (a half-open connection is detected: `keepAliveMs`) and resumes after the last event
   * it yielded (no gap, no duplicate); ends after `sandbox.deleted`, when the sandbox is
   * found deleted at a reconnect, or when `signal` aborts or the loop breaks. A refused
   * key (401, 403) or a sandbox that is gone (404) ends it at once with a
   * {@link StreamError} carrying that status.
   */
  streamEvents(opts: StreamEventsOpts = {}): AsyncGenerator<SandboxEvent, void, undefined> {
    checkKeys("streamEvents", opts, new Set(["afterEventId", "liveOnly", "signal", "maxReconnects", "keepAliveMs"]));
    return streamEvents(
      {
        dp: this.dp,
        refresh: async (signal) => {
          const info = parseSandbox(await call<Doc>(this.config, "GET", `/sandboxes/${this.sandboxId}`, { signal }));
          this.lastState = info.state;
          if (info.runtime) this.dp.runtime = info.runtime;
          return info.state;
        },
        newestEventId: async (signal) => {
          let after = 0;
          for (;;) {
            const doc = await call<{ events: Array<{ id: number }> }>(this.config, "GET", `/sandboxes/${this.sandboxId}/events`, {
              query: { after_event_id: after, limit: 1000 },
              signal,
            });
            const events = doc?.events ?? [];
            if (events.length) after = Math.max(after, events[events.length - 1]!.id);
            if (events.length < 1000) return after;
          }
        },
      },
      opts,
    );
  }

  /** @internal */
  toJSON(): { sandboxId: string } {
    return { sandboxId: this.sandboxId };
  }
}
