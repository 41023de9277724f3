/**
 * A sandbox's lifecycle events as an async iterator (`sandbox.streamEvents()`): replayed
 * from the start (or after `afterEventId`), then live; reconnects by itself and resumes
 * after the last event it yielded, so nothing is missed or repeated.
 *
 * @module
 */

import { AuthenticationError, ForbiddenError, NotFoundError, SandboxError, StreamError, invalid } from "./errors.js";
import type { DataPlane } from "./http.js";
import type { SandboxEvent } from "./models.js";
import { type WsConnection, openWebSocket } from "./ws.js";

/** Options of an event stream. */
export interface StreamEventsOpts {
  /** Resume after this event ID (events with a higher ID only). */
  afterEventId?: number;
  /**
   * Skip the replay: only events after the newest one there is when the stream starts
   * (its ID is read first, from `GET /sandboxes/{id}/events`). Reconnects, even one
   * before the first event, resume after that ID or the last event yielded, without a
   * gap. Should that ID not be readable, the stream asks the server for live events
   * only (`live_only`), and a reconnect before the first event may then miss events
   * that happened while it was disconnected.
   */
  liveOnly?: boolean;
  /** Ends the iteration (it returns without an error), at once, even mid-reconnect. */
  signal?: AbortSignal;
  /** Reconnects in a row that may fail before the stream gives up (default 60). */
  maxReconnects?: number;
  /**
   * Milliseconds without a sign of life from the server after which the connection is
   * taken for dead (half-open) and re-made (default 45000; the server pings an idle
   * stream every 20 s). With the `ws` package the client also pings; with a runtime's
   * global WebSocket (whose pings are invisible) a quiet stream is simply re-made.
   */
  keepAliveMs?: number;
}

/** @internal What the event stream needs of its sandbox. */
export interface EventSource {
  dp: DataPlane;
  /**
   * Re-reads the sandbox (its runtime access may have moved) and resolves to its state;
   * throws if it is gone.
   */
  refresh(signal?: AbortSignal): Promise<string>;
  /** The ID of its newest event (0: none yet). */
  newestEventId?(signal?: AbortSignal): Promise<number>;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Errors that no reconnect can fix: the key is refused, or the sandbox is gone. */
function fatal(e: unknown): boolean {
  return e instanceof NotFoundError || e instanceof AuthenticationError || e instanceof ForbiddenError;
}

/**
 * @internal The event stream of `src`: yields `{ id, at, type, data }`; ends after
 * `sandbox.deleted`, when the sandbox is found deleted at a reconnect, or when `signal`
 * aborts.
 */
export async function* streamEvents(src: EventSource, opts: StreamEventsOpts = {}): AsyncGenerator<SandboxEvent, void, undefined> {
  let last = opts.afterEventId;
  if (last !== undefined && (!Number.isInteger(last) || last < 0)) {
    throw invalid("afterEventId must be an event ID (an integer from 0)");
  }
  const keepAliveMs = opts.keepAliveMs ?? 45_000;
  if (typeof keepAliveMs !== "number" || !(keepAliveMs > 0)) {
    throw invalid("keepAliveMs must be a positive number of milliseconds");
  }
  const maxReconnects = opts.maxReconnects ?? 60;
  const signal = opts.signal;
  if (signal?.aborted) return;
  if (last === undefined && opts.liveOnly && src.newestEventId) {
    // "From now on" as an event ID: a reconnect before the first event resumes there.
    try {
      last = await src.newestEventId(signal);
    } catch (e) {
      if (signal?.aborted) return;
      if (e instanceof AuthenticationError || e instanceof ForbiddenError) {
        throw new StreamError("stream_failed", `event stream: ${(e as Error).message}`, (e as SandboxError).status);
      }
      // Not readable (an older server): live_only, with the limit documented above.
    }
  }
  let failures = 0;
  let lastError = "";
  while (!signal?.aborted) {
    const query = last !== undefined ? `?after_event_id=${last}` : opts.liveOnly ? "?live_only=true" : "";
    let conn: WsConnection | undefined;
    let status = 0;
    try {
      const { url } = src.dp.webSocket(`/lifecycle/ws${query}`);
      conn = await openWebSocket(url, { "x-api-key": src.dp.config.apiKey }, 30_000, signal);
    } catch (e) {
      if (signal?.aborted) return;
      conn = undefined;
      lastError = (e as Error).message;
      status = e instanceof SandboxError ? e.status : 0;
      if (status === 401 || status === 403) {
        // The key is refused: no retry can fix it.
        throw new StreamError("stream_failed", `event stream: ${lastError}`, status);
      }
    }
    if (conn) {
      const c = conn;
      c.keepAlive({ pingEveryMs: Math.min(20_000, keepAliveMs / 3), deadlineMs: keepAliveMs, readIdle: true });
      const onAbort = () => c.close();
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        failures = 0;
        for (;;) {
          const m = await c.next();
          if (m === null) break;
          const text = typeof m === "string" ? m : new TextDecoder().decode(m);
          let event: SandboxEvent;
          try {
            event = JSON.parse(text) as SandboxEvent;
          } catch {
            continue;
          }
          if (last !== undefined && event.id <= last) continue;
          last = event.id;
          yield event;
          if (event.type === "sandbox.deleted") return;
        }
        lastError = c.error ?? `closed (code ${c.closeCode ?? "?"})`;
      } finally {
        signal?.removeEventListener("abort", onAbort);
        c.close();
      }
    }
    if (signal?.aborted) return;
    failures += 1;
    if (failures > maxReconnects) {
      throw new StreamError("stream_failed", `event stream: gave up after ${maxReconnects} reconnects: ${lastError}`);
    }
    await sleep(Math.min(100 * 2 ** Math.min(failures, 5), 2000), signal);
    if (signal?.aborted) return;
    // The sandbox's state before each reconnect: a deleted one ends the stream, a moved
    // one gives a new target.
    const before = src.dp.runtime?.target.baseUrl;
    let state: string | undefined;
    try {
      state = await src.refresh(signal);
    } catch (e) {
      if (signal?.aborted) return;
      if (fatal(e)) {
        throw new StreamError("stream_failed", `event stream: ${(e as Error).message}`, (e as SandboxError).status);
      }
      // a restarting API: try again
    }
    if (state === "deleted") return;
    if (status === 404 && state === "running" && src.dp.runtime?.target.baseUrl === before) {
      // The data plane does not know a running sandbox, and it has not moved: no retry helps.
      throw new StreamError("stream_failed", `event stream: ${lastError}`, 404);
    }
  }
}
