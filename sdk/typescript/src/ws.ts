/**
 * WebSocket connections (terminals and the lifecycle event stream) with handshake
 * headers. The client is the runtime's global `WebSocket` where it can send headers
 * (Node 22+, Node 20 with `--experimental-websocket`, Bun), else the `ws` package (the
 * SDK's one dependency: Node 20, Deno). {@link setWebSocketImplementation} picks
 * another.
 *
 * @module
 */

import { ConfigError, SandboxTimeoutError, StreamError } from "./errors.js";

/**
 * A WebSocket class: constructed as `new Ctor(url, { headers })`, with the WHATWG
 * events (`open`, `message`, `close`, `error`), `send`, `close` and `binaryType`. The
 * `ws` package's class, Node's and Bun's global `WebSocket` are such classes.
 */
export type WebSocketConstructor = new (url: string, init: { headers: Record<string, string> }) => WebSocketLike;

/** The part of a WebSocket the SDK uses. */
export interface WebSocketLike {
  /** Set to `arraybuffer` by the SDK. */
  binaryType: string;
  /** The WHATWG ready state. */
  readonly readyState: number;
  /** Sends a text or binary message. */
  send(data: string | Uint8Array): void;
  /** Closes the connection. */
  close(code?: number, reason?: string): void;
  /** Listens for `open`, `message`, `close` and `error`. */
  addEventListener(type: string, listener: (event: any) => void): void;
  /** Sends a ping frame (the `ws` package; WHATWG WebSockets have none). */
  ping?: () => void;
  /** Listens for Node events such as `pong` and `ping` (the `ws` package). */
  on?: (event: string, listener: (...args: any[]) => void) => unknown;
  /** Drops the connection without a closing handshake (the `ws` package). */
  terminate?: () => void;
}

/** How a connection checks that its peer is still there. */
export interface KeepAliveOpts {
  /** Milliseconds between pings where the client can send them (the `ws` package). */
  pingEveryMs: number;
  /**
   * Milliseconds without anything from the peer (a message, a ping, a pong) after which
   * the connection is taken for dead and dropped.
   */
  deadlineMs: number;
  /**
   * Where the client cannot ping (a WHATWG WebSocket, whose pings and pongs are
   * invisible), also drop the connection after `deadlineMs` without a message.
   */
  readIdle: boolean;
}

let override: WebSocketConstructor | undefined;

/**
 * Uses `ctor` for every WebSocket the SDK opens from now on (undefined: back to the
 * default choice). For runtimes whose global `WebSocket` cannot send headers, or to
 * wrap connections (tests do).
 */
export function setWebSocketImplementation(ctor: WebSocketConstructor | undefined): void {
  override = ctor;
}

async function implementation(): Promise<WebSocketConstructor> {
  if (override) return override;
  const g = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  // Deno's global WebSocket sends no custom headers (stable releases): use ws there.
  const deno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";
  if (g && !deno) return g;
  try {
    const mod = (await import("ws")) as unknown as { WebSocket?: WebSocketConstructor; default?: WebSocketConstructor };
    const ctor = mod.WebSocket ?? mod.default;
    if (ctor) return ctor;
  } catch {
    // fall through
  }
  if (g) return g;
  throw new ConfigError(
    "config",
    "no WebSocket client: this runtime has no global WebSocket and the ws package is not " +
      "installed; run `npm install ws` (or use Node 22+)",
  );
}

/** A message: text as a string, binary as bytes. */
export type Message = string | Uint8Array;

/** An open WebSocket with its messages queued for {@link WsConnection.next}. */
export class WsConnection {
  private readonly queue: Message[] = [];
  private waiters: Array<(m: Message | null) => void> = [];
  private ended = false;
  private lastSeen = Date.now();
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  /** The close code once the connection ended (1006: dropped without a close frame). */
  closeCode: number | undefined;
  /** Why the connection failed, if it did. */
  error: string | undefined;

  /** @internal */
  constructor(private readonly ws: WebSocketLike) {
    ws.addEventListener("message", (ev: { data: unknown }) => {
      const data = ev.data;
      let m: Message;
      if (typeof data === "string") m = data;
      else if (data instanceof ArrayBuffer) m = new Uint8Array(data);
      else if (ArrayBuffer.isView(data)) m = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      else m = String(data);
      this.lastSeen = Date.now();
      const w = this.waiters.shift();
      if (w) w(m);
      else this.queue.push(m);
    });
    ws.addEventListener("close", (ev: { code?: number }) => {
      this.closeCode = ev.code;
      this.finish();
    });
    ws.addEventListener("error", (ev: { message?: string; error?: Error }) => {
      this.error = ev.message ?? ev.error?.message ?? "connection error";
      this.finish();
    });
  }

  /**
   * Checks that the peer is still there, so a half-open connection (the peer gone
   * without a close, e.g. a dropped network) ends instead of waiting forever: with the
   * `ws` package, a ping every `pingEveryMs` and the connection dropped when nothing (a
   * pong, a ping, a message) came for `deadlineMs`; with a WHATWG WebSocket and
   * `readIdle`, dropped after `deadlineMs` without a message.
   */
  keepAlive(opts: KeepAliveOpts): void {
    if (this.ended || this.heartbeat !== undefined) return;
    const ws = this.ws;
    const canPing = typeof ws.ping === "function" && typeof ws.on === "function";
    if (!canPing && !opts.readIdle) return;
    if (canPing) {
      const seen = () => {
        this.lastSeen = Date.now();
      };
      ws.on!("pong", seen);
      ws.on!("ping", seen);
    }
    this.lastSeen = Date.now();
    let lastPing = 0;
    const tick = Math.max(Math.min(opts.pingEveryMs, opts.deadlineMs) / 4, 10);
    this.heartbeat = setInterval(() => {
      const now = Date.now();
      if (now - this.lastSeen > opts.deadlineMs) {
        this.error = `nothing from the server within ${opts.deadlineMs} ms (a half-open connection?)`;
        try {
          if (ws.terminate) ws.terminate();
          else ws.close(4000, "keepalive deadline");
        } catch {
          // already closed
        }
        this.finish();
        return;
      }
      if (canPing && now - lastPing >= opts.pingEveryMs) {
        lastPing = now;
        try {
          ws.ping!();
        } catch {
          // closing: the close event ends it
        }
      }
    }, tick);
    (this.heartbeat as { unref?: () => void }).unref?.();
  }

  private finish(): void {
    if (this.heartbeat !== undefined) clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    this.ended = true;
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w(null);
  }

  /** Whether the connection ended (messages may still be queued). */
  get closed(): boolean {
    return this.ended;
  }

  /**
   * The next message; null once the connection ended and nothing is queued. With
   * `timeoutMs`, throws a {@link SandboxTimeoutError} when nothing arrives in time.
   */
  next(timeoutMs?: number): Promise<Message | null> {
    const queued = this.queue.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.ended) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const waiter = (m: Message | null) => {
        if (timer !== undefined) clearTimeout(timer);
        resolve(m);
      };
      this.waiters.push(waiter);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== waiter);
          reject(new SandboxTimeoutError("timeout", `no message within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  /** Sends text or bytes. */
  send(data: Message): void {
    if (this.ended) throw new StreamError("stream_failed", "the connection is closed");
    this.ws.send(data);
  }

  /** Closes the connection (normal closure). */
  close(): void {
    try {
      this.ws.close(1000);
    } catch {
      // already closed
    }
    this.finish();
  }
}

/**
 * Opens a WebSocket to `url` with `headers` in the handshake; fails with a
 * {@link StreamError} (code `stream_failed`, `status` when the server answered with one
 * and the client says which: the `ws` package does, a WHATWG WebSocket does not) if the
 * handshake fails, or a {@link SandboxTimeoutError} after `openTimeoutMs`. `signal`
 * aborts the opening at once (rejecting with its reason).
 */
export async function openWebSocket(
  url: string,
  headers: Record<string, string>,
  openTimeoutMs = 30_000,
  signal?: AbortSignal,
): Promise<WsConnection> {
  const aborted = () => signal?.reason ?? new StreamError("aborted", "the WebSocket's opening was aborted");
  if (signal?.aborted) throw aborted();
  const Ctor = await implementation();
  if (signal?.aborted) throw aborted();
  const ws = new Ctor(url, { headers });
  ws.binaryType = "arraybuffer";
  const conn = new WsConnection(ws);
  await new Promise<void>((resolve, reject) => {
    let settled = false;
    const onAbort = () => {
      try {
        ws.close();
      } catch {
        // not open yet
      }
      settle(aborted());
    };
    const settle = (err?: unknown) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      if (err) reject(err);
      else resolve();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(() => {
      try {
        ws.close();
      } catch {
        // not open yet
      }
      settle(new SandboxTimeoutError("timeout", `WebSocket ${redactQuery(url)}: not open within ${openTimeoutMs} ms`));
    }, openTimeoutMs);
    ws.addEventListener("open", () => settle());
    const failed = (why: string) => {
      const m = /Unexpected server response: (\d+)/.exec(why);
      const status = m ? Number(m[1]) : 0;
      settle(new StreamError("stream_failed", `WebSocket ${redactQuery(url)}: ${why}`, status));
    };
    ws.addEventListener("error", (ev: { message?: string; error?: Error }) =>
      failed(ev.message ?? ev.error?.message ?? "the handshake failed"),
    );
    ws.addEventListener("close", (ev: { code?: number }) => failed(`closed before it opened (code ${ev.code ?? "?"})`));
  });
  return conn;
}

function redactQuery(url: string): string {
  return url.split("?")[0] ?? url;
}
