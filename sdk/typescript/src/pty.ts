/**
 * Interactive terminals (`sandbox.pty`) over the data plane's WebSocket: send
 * keystrokes, receive output, resize; the exit code once the shell ends.
 *
 * @module
 */

import { SandboxTimeoutError, invalid } from "./errors.js";
import type { DataPlane } from "./http.js";
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

  /** @internal */
  constructor(private readonly conn: WsConnection) {}

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
   * closed). With `timeoutMs`, a {@link SandboxTimeoutError} when nothing arrives in
   * time.
   */
  async recv(opts: { timeoutMs?: number } = {}): Promise<Uint8Array | null> {
    while (!this.exited) {
      let m;
      try {
        m = await this.conn.next(opts.timeoutMs);
      } catch (e) {
        if (e instanceof SandboxTimeoutError) {
          throw new SandboxTimeoutError("timeout", `no terminal output within ${opts.timeoutMs} ms`);
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

  /** The output chunks until the process exits. */
  async *[Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    for (;;) {
      const chunk = await this.recv();
      if (chunk === null) return;
      yield chunk;
    }
  }
}

/** Terminals in a sandbox: `sandbox.pty`. */
export class Pty {
  /** @internal */
  constructor(private readonly dp: DataPlane) {}

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
    return new PtyHandle(await openWebSocket(url, headers, opts.openTimeoutMs));
  }
}
