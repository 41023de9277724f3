/**
 * HTTP with `fetch`: the control plane (the public API, `X-API-Key`) and a sandbox's
 * data plane (its runtime target, `Authorization: Bearer <runtime token>`), with
 * deadlines on every request and streams read chunk by chunk. Internal to the SDK.
 *
 * @module
 */

import { Config, INSPECT } from "./config.js";
import { ConfigError, ConnectionError, SandboxError, SandboxTimeoutError, StreamError, errorFromBody } from "./errors.js";
import type { RuntimeAccess } from "./models.js";

export { INSPECT };

/**
 * Sets `obj[key]` as a writable but non-enumerable property: credentials (API keys,
 * runtime tokens) stay out of `console.log`, `JSON.stringify` and spreads.
 */
export function hide<T extends object>(obj: T, key: string, value: unknown): void {
  Object.defineProperty(obj, key, { value, writable: true, enumerable: false, configurable: true });
}

/** Query parameters: a record (undefined values left out) or repeated pairs. */
export type Query = Record<string, string | number | boolean | undefined> | Array<[string, string]>;

/** A request body fetch can send, streams included. */
export type Body = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array>;

/** What one request sends and how long it may take. */
export interface SendOpts {
  headers?: Record<string, string>;
  query?: Query;
  /** A JSON body (sent with `content-type: application/json`). */
  json?: unknown;
  /** A raw body (bytes, text, a stream). */
  body?: Body;
  /** Milliseconds: the whole request, or the longest silence of a stream. */
  timeoutMs: number;
  /** Cancels the request (and its stream). */
  signal?: AbortSignal;
  /** What to call the request in a timeout's message. */
  what?: string;
}

/** The longest delay a timer takes (about 24.8 days); longer ones are capped to it. */
export const MAX_TIMER_MS = 2_147_483_647;

/**
 * A deadline that can be re-armed (an idle timeout for streams), tied to a caller's
 * `AbortSignal`. Its `signal` aborts with a {@link SandboxTimeoutError} when it passes.
 */
export class Deadline {
  /** Aborts the request this deadline guards. */
  readonly controller = new AbortController();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly onAbort: (() => void) | undefined;

  constructor(
    private readonly ms: number,
    private readonly what: string,
    private readonly user?: AbortSignal,
  ) {
    if (user) {
      if (user.aborted) this.controller.abort(user.reason);
      else {
        this.onAbort = () => this.controller.abort(user.reason);
        user.addEventListener("abort", this.onAbort, { once: true });
      }
    }
    this.arm();
  }

  /** The signal to give fetch. */
  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Starts (or restarts) the countdown. */
  arm(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    if (this.controller.signal.aborted) return;
    this.timer = setTimeout(() => {
      this.controller.abort(
        new SandboxTimeoutError("timeout", `${this.what}: nothing within ${this.ms} ms (requestTimeoutMs)`),
      );
    }, Math.min(this.ms, MAX_TIMER_MS));
    (this.timer as { unref?: () => void }).unref?.();
  }

  /** Stops the countdown for now (the consumer has the data); `arm()` restarts it. */
  pause(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Stops the countdown and lets go of the caller's signal. */
  done(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.user && this.onAbort) this.user.removeEventListener("abort", this.onAbort);
  }

  /**
   * The error to throw for a failure: the abort's reason (a timeout, or the caller's
   * own) if the request was aborted, else a {@link ConnectionError} naming the URL.
   */
  failure(e: unknown, url: string): unknown {
    if (this.controller.signal.aborted) return this.controller.signal.reason ?? e;
    if (e instanceof SandboxError) return e;
    const cause = (e as { cause?: { message?: string; code?: string } })?.cause;
    const why = cause?.code ?? cause?.message ?? (e as Error)?.message ?? String(e);
    let origin = url;
    try {
      origin = new URL(url).origin;
    } catch {
      // keep the URL as it is
    }
    return new ConnectionError("unreachable", `cannot reach ${origin}: ${why}`, 0, undefined, { cause: e });
  }
}

function withQuery(url: string, query: Query | undefined): string {
  if (!query) return url;
  const params = new URLSearchParams();
  const pairs = Array.isArray(query) ? query : Object.entries(query);
  for (const [k, v] of pairs) if (v !== undefined) params.append(k, String(v));
  const qs = params.toString();
  return qs ? `${url}${url.includes("?") ? "&" : "?"}${qs}` : url;
}

/** An answer whose body was read whole. */
export interface Answer {
  status: number;
  bytes: Uint8Array;
  headers: Headers;
}

/** An answer whose body is still to be read (a stream), with the deadline that guards it. */
export interface Streaming {
  response: Response;
  deadline: Deadline;
  url: string;
}

/** The answer's body as text (invalid UTF-8 replaced). */
export function text(a: Answer): string {
  return new TextDecoder().decode(a.bytes);
}

/**
 * The answer's body as JSON; a body that is not JSON is a {@link StreamError} (code
 * `protocol`, the answer's status), never a bare `SyntaxError`.
 */
export function json<T>(a: Answer): T {
  const body = text(a);
  try {
    return JSON.parse(body) as T;
  } catch {
    throw new StreamError(
      "protocol",
      `the answer (HTTP ${a.status}, ${a.headers.get("content-type") ?? "no content-type"}) is not JSON: ${body.slice(0, 200)}`,
      a.status,
    );
  }
}

/** Request bodies above this size are sent in slices, each re-arming the deadline. */
const SLICE_BYTES = 256 * 1024;

function sliced(bytes: Uint8Array): ReadableStream<Uint8Array> {
  let offset = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (offset >= bytes.byteLength) {
        controller.close();
        return;
      }
      const end = Math.min(offset + SLICE_BYTES, bytes.byteLength);
      controller.enqueue(bytes.subarray(offset, end));
      offset = end;
    },
  });
}

/** Throws the API's error for a non-2xx answer. */
export function expectOk(a: Answer): Answer {
  if (a.status < 200 || a.status >= 300) throw errorFromBody(a.status, text(a));
  return a;
}

async function start(method: string, url: string, opts: SendOpts): Promise<Streaming> {
  const headers: Record<string, string> = { ...opts.headers };
  let body: Body | undefined = opts.body;
  if (opts.json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  const full = withQuery(url, opts.query);
  const deadline = new Deadline(opts.timeoutMs, opts.what ?? `${method} ${full}`, opts.signal);
  const init: RequestInit & { duplex?: "half" } = { method, headers, signal: deadline.signal };
  if (body !== undefined) {
    // A large body is streamed in slices: the deadline is then one of idleness (as for
    // a stream), not of the whole upload.
    if (body instanceof ArrayBuffer && body.byteLength > SLICE_BYTES) body = sliced(new Uint8Array(body));
    else if (body instanceof Uint8Array && body.byteLength > SLICE_BYTES) body = sliced(body);
    else if (typeof Blob !== "undefined" && body instanceof Blob && body.size > SLICE_BYTES) {
      body = body.stream() as unknown as ReadableStream<Uint8Array>;
    }
    if (typeof ReadableStream !== "undefined" && body instanceof ReadableStream) {
      // A streamed upload may take longer than one deadline: each chunk sent re-arms it.
      const reader = body.getReader();
      body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          const r = await reader.read();
          deadline.arm();
          if (r.done) controller.close();
          else controller.enqueue(r.value);
        },
        cancel(reason) {
          return reader.cancel(reason);
        },
      });
      init.duplex = "half";
    }
    init.body = body as RequestInit["body"];
  }
  try {
    const response = await fetch(full, init);
    return { response, deadline, url: full };
  } catch (e) {
    deadline.done();
    throw deadline.failure(e, full);
  }
}

/**
 * Sends a request and reads its whole answer (any status). The deadline covers the
 * request up to the answer's headers, then each chunk of the answer's body (an idle
 * deadline, as for streams): a large body that keeps arriving is not cut.
 */
export async function send(method: string, url: string, opts: SendOpts): Promise<Answer> {
  const s = await start(method, url, opts);
  const parts: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of chunks(s)) {
    parts.push(chunk);
    size += chunk.byteLength;
  }
  let bytes: Uint8Array;
  if (parts.length === 1) bytes = parts[0]!;
  else {
    bytes = new Uint8Array(size);
    let at = 0;
    for (const p of parts) {
      bytes.set(p, at);
      at += p.byteLength;
    }
  }
  return { status: s.response.status, bytes, headers: s.response.headers };
}

/**
 * Sends a request whose answer is a stream; a non-2xx answer is read and thrown. The
 * deadline becomes an idle timeout: each chunk read re-arms it.
 */
export async function openStream(method: string, url: string, opts: SendOpts): Promise<Streaming> {
  const s = await start(method, url, opts);
  if (s.response.status < 200 || s.response.status >= 300) {
    let body = "";
    try {
      body = await s.response.text();
    } catch (e) {
      throw s.deadline.failure(e, s.url);
    } finally {
      s.deadline.done();
    }
    throw errorFromBody(s.response.status, body);
  }
  return s;
}

/**
 * The chunks of a streamed answer; stops the stream when the consumer stops early.
 * The idle deadline runs only while a chunk is awaited, not while the consumer holds
 * one (the generator is suspended at `yield`).
 */
export async function* chunks(s: Streaming): AsyncGenerator<Uint8Array, void, undefined> {
  const body = s.response.body;
  if (!body) {
    s.deadline.done();
    return;
  }
  const reader = body.getReader();
  let finished = false;
  try {
    for (;;) {
      s.deadline.arm();
      let r: { done: true; value?: undefined } | { done: false; value: Uint8Array };
      try {
        r = await reader.read();
      } catch (e) {
        finished = true;
        throw s.deadline.failure(e, s.url);
      }
      if (r.done) {
        finished = true;
        return;
      }
      s.deadline.pause();
      if (r.value.byteLength) yield r.value;
    }
  } finally {
    s.deadline.done();
    if (!finished) {
      reader.cancel().catch(() => undefined);
      s.deadline.controller.abort();
    }
  }
}

/** The non-empty lines of a streamed answer (NDJSON), decoded as UTF-8. */
export async function* lines(s: Streaming): AsyncGenerator<string, void, undefined> {
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const chunk of chunks(s)) {
    buffered += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) yield line;
    }
  }
  buffered += decoder.decode();
  if (buffered.trim()) yield buffered.trim();
}

/** One JSON value per line of a streamed answer. */
export async function* ndjson<T>(s: Streaming): AsyncGenerator<T, void, undefined> {
  for await (const line of lines(s)) {
    let value: T;
    try {
      value = JSON.parse(line) as T;
    } catch {
      throw new StreamError("protocol", `a stream line is not JSON: ${line.slice(0, 200)}`);
    }
    yield value;
  }
}

/** Options of one control-plane call. */
export interface CallOpts {
  json?: unknown;
  query?: Query;
  requestTimeoutMs?: number;
  /** Cancels the call. */
  signal?: AbortSignal;
}

/**
 * One public-API call: `X-API-Key`, JSON in and out; the API's error for a non-2xx
 * answer; `undefined` for 204.
 */
export async function call<T = unknown>(config: Config, method: string, path: string, opts: CallOpts = {}): Promise<T> {
  const a = await send(method, config.url(path), {
    headers: { "x-api-key": config.apiKey, accept: "application/json" },
    json: opts.json,
    query: opts.query,
    timeoutMs: opts.requestTimeoutMs ?? config.requestTimeoutMs,
    signal: opts.signal,
    what: `${method} /api/v1${path}`,
  });
  expectOk(a);
  if (a.status === 204 || a.bytes.length === 0) return undefined as T;
  return json<T>(a);
}

/** Reads a public-API resource as bytes (recordings). */
export async function callBytes(config: Config, path: string, requestTimeoutMs?: number): Promise<Uint8Array> {
  const a = await send("GET", config.url(path), {
    headers: { "x-api-key": config.apiKey },
    timeoutMs: requestTimeoutMs ?? config.requestTimeoutMs,
    what: `GET /api/v1${path}`,
  });
  return expectOk(a).bytes;
}

/**
 * A sandbox's data plane: its runtime target and token (from create, connect, resume
 * or a running sandbox's detail). Commands, files, terminals and the event stream go
 * through it.
 */
export class DataPlane {
  /** The connection's configuration (its API key: not enumerable, not printed). */
  declare config: Config;
  /** The runtime target and token (not enumerable, not printed). */
  declare runtime: RuntimeAccess | null;

  constructor(
    readonly sandboxId: string,
    config: Config,
    runtime: RuntimeAccess | null,
  ) {
    hide(this, "config", config);
    hide(this, "runtime", runtime);
  }

  /** What `console.log` shows: the sandbox ID, no credential. */
  [INSPECT](): string {
    return `DataPlane { sandboxId: '${this.sandboxId}' }`;
  }

  private target(path: string): { url: string; headers: Record<string, string> } {
    if (!this.runtime) {
      throw new ConfigError(
        "config",
        `no data-plane access to ${this.sandboxId}: connect to it first (it may be paused): ` +
          "await sandbox.connect() or Sandbox.connect(id)",
      );
    }
    return {
      url: this.runtime.target.baseUrl + path,
      headers: { authorization: `Bearer ${this.runtime.token}` },
    };
  }

  /** A data-plane request, its answer read whole (any status). */
  async request(
    method: string,
    path: string,
    opts: Omit<SendOpts, "timeoutMs" | "headers"> & { requestTimeoutMs?: number } = {},
  ): Promise<Answer> {
    const t = this.target(path);
    return send(method, t.url, {
      ...opts,
      headers: t.headers,
      timeoutMs: opts.requestTimeoutMs ?? this.config.requestTimeoutMs,
      what: `${method} ${path} of ${this.sandboxId}`,
    });
  }

  /** A data-plane request whose answer streams (a non-2xx answer is thrown). */
  async stream(
    method: string,
    path: string,
    opts: Omit<SendOpts, "timeoutMs" | "headers"> & { requestTimeoutMs?: number } = {},
  ): Promise<Streaming> {
    const t = this.target(path);
    return openStream(method, t.url, {
      ...opts,
      headers: t.headers,
      timeoutMs: opts.requestTimeoutMs ?? this.config.requestTimeoutMs,
      what: `${method} ${path} of ${this.sandboxId}`,
    });
  }

  /** The `ws://` (or `wss://`) URL of a data-plane path, and the bearer header. */
  webSocket(path: string): { url: string; headers: Record<string, string> } {
    const t = this.target(path);
    return { url: t.url.replace(/^http/, "ws"), headers: t.headers };
  }
}
