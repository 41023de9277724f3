/**
 * Interactive terminals (`sandbox.pty`) over the data plane's WebSocket: send
 * keystrokes, receive output, resize; the exit code once the shell ends.
 *
 * @module
 */

import { SandboxTimeoutError, invalid } from "./errors.js";
import { type DataPlane, INSPECT, hide } from "./http.js";
import { type WsConnection, openWebSocket } from "./ws.js";

/** How to open a terminal. */
export interface PtyCreateOpts {
  /** Columns (default 80). */
  cols?: number;
  /** Rows (default 24). */
  rows?: number;
  /** A command line instead of the user's login shell. */
  cmd?: string;
  /** The user (default `user`). */
  user?: string;
  /** The working directory. */
  cwd?: string;
  /** Milliseconds the WebSocket may take to open (default 30000). */
  openTimeoutMs?: number;
  /**
   * The default `timeoutMs` of `recv()`, `wait()` and `for await` on the handle: the
   * longest silence of the terminal before a {@link SandboxTimeoutError}. Default: no
   * limit (a terminal may well be quiet).
   */
  recvTimeoutMs?: number;
}

/**
 * An open terminal. `send` keystrokes, `recv` output (or iterate it with
 * `for await`), `resize`; after the process exits `recv` resolves to null and
 * `exitCode` is set. `close()` ends the session.
 */
export class PtyHandle implements AsyncIterable<Uint8Array> {
  /** The exit code once the process exited (null until then, or when a signal ended it). */
  exitCode: number | null = null;
  /** The signal that ended the process, if one did. */
  exitSignal: number | null = null;
  private exited = false;
  private declare readonly conn: WsConnection;
  private readonly recvTimeoutMs: number | undefined;

  /** @internal */
  constructor(conn: WsConnection, recvTimeoutMs?: number) {
    hide(this, "conn", conn);
    this.recvTimeoutMs = recvTimeoutMs;
  }

  /** What `console.log` shows: whether it exited, and how. */
  [INSPECT](): string {
    return `PtyHandle { exited: ${this.exited}, exitCode: ${this.exitCode} }`;
  }

  /** Sends keystrokes (text is sent as UTF-8). */
  async send(data: string | Uint8Array): Promise<void> {
    this.conn.send(typeof data === "string" ? new TextEncoder().encode(data) : data);
  }

  /** Resizes the terminal. */
  async resize(cols: number, rows: number): Promise<void> {
    this.conn.send(JSON.stringify({ type: "resize", cols, rows }));
  }

  /**
   * The terminal's next output; null once the process has exited (or the connection
   * closed). With `timeoutMs` (default: the terminal's `recvTimeoutMs`, else no limit),
   * a {@link SandboxTimeoutError} when nothing arrives in time.
   */
  async recv(opts: { timeoutMs?: number } = {}): Promise<Uint8Array | null> {
    const timeoutMs = opts.timeoutMs ?? this.recvTimeoutMs;
    while (!this.exited) {
      let m;
      try {
        m = await this.conn.next(timeoutMs);
      } catch (e) {
        if (e instanceof SandboxTimeoutError) {
          throw new SandboxTimeoutError("timeout", `no terminal output within ${timeoutMs} ms`);
        }
        throw e;
      }
      if (m === null) {
        this.exited = true;
        return null;
      }
      if (typeof m !== "string") return m;
      try {
        const ev = JSON.parse(m) as { type?: string; exitCode?: number | null; signal?: number | null };
        if (ev.type === "exit") {
          this.exitCode = ev.exitCode ?? null;
          this.exitSignal = ev.signal ?? null;
          this.exited = true;
        }
      } catch {
        // not a control message: ignore it
      }
    }
    return null;
  }

  /**
   * Reads output until the process exits (each chunk to `onData`, if given) and
   * resolves to the exit code; a {@link SandboxTimeoutError} after `timeoutMs` of
   * silence.
   */
  async wait(opts: { onData?: (data: Uint8Array) => void; timeoutMs?: number } = {}): Promise<number | null> {
    for (;;) {
      const chunk = await this.recv({ timeoutMs: opts.timeoutMs });
      if (chunk === null) return this.exitCode;
      opts.onData?.(chunk);
    }
  }

  /** Ends the session (the process gets a hangup). */
  async close(): Promise<void> {
    this.conn.close();
  }

  /**
   * The output chunks until the process exits. Leaving the loop early (`break`,
   * `return`, a throw) closes the terminal's connection.
   */
  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return {
      next: async (): Promise<IteratorResult<Uint8Array>> => {
        const chunk = await this.recv();
        if (chunk === null) {
          this.conn.close();
          return { done: true, value: undefined };
        }
        return { done: false, value: chunk };
      },
      return: async (): Promise<IteratorResult<Uint8Array>> => {
        this.conn.close();
        return { done: true, value: undefined };
      },
    };
  }
}

/** Terminals in a sandbox: `sandbox.pty`. */
export class Pty {
  private declare readonly dp: DataPlane;

  /** @internal */
  constructor(dp: DataPlane) {
    hide(this, "dp", dp);
  }

  /** What `console.log` shows: the sandbox ID, no credential. */
  [INSPECT](): string {
    return `Pty { sandboxId: '${this.dp.sandboxId}' }`;
  }

  /** Opens a terminal (the user's login shell, or `cmd`). */
  async create(opts: PtyCreateOpts = {}): Promise<PtyHandle> {
    const cols = opts.cols ?? 80;
    const rows = opts.rows ?? 24;
    for (const [name, v] of [
      ["cols", cols],
      ["rows", rows],
    ] as const) {
      if (!Number.isInteger(v) || v < 1 || v > 1000) throw invalid(`${name} must be an integer from 1 to 1000; got ${v}`);
    }
    const q = new URLSearchParams({ cols: String(cols), rows: String(rows) });
    if (opts.cmd) q.set("cmd", opts.cmd);
    if (opts.user) q.set("user", opts.user);
    if (opts.cwd) q.set("cwd", opts.cwd);
    const { url, headers } = this.dp.webSocket(`/pty?${q}`);
    if (opts.recvTimeoutMs !== undefined && !(typeof opts.recvTimeoutMs === "number" && opts.recvTimeoutMs > 0)) {
      throw invalid("recvTimeoutMs must be a positive number of milliseconds");
    }
    return new PtyHandle(await openWebSocket(url, headers, opts.openTimeoutMs), opts.recvTimeoutMs);
  }
}
