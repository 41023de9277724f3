/**
 * A sandbox's lifecycle events as an async iterator (`sandbox.streamEvents()`): replayed
 * from the start (or after `afterEventId`), then live; reconnects by itself and resumes
 * after the last event it yielded, so nothing is missed or repeated.
 *
 * @module
 */

import { AuthenticationError, ForbiddenError, NotFoundError, StreamError, invalid } from "./errors.js";
import type { DataPlane } from "./http.js";
import type { SandboxEvent } from "./models.js";
import { openWebSocket } from "./ws.js";

/** Options of an event stream. */
export interface StreamEventsOpts {
  /** Resume after this event ID (events with a higher ID only). */
  afterEventId?: number;
  /** Skip the replay: only events from now on (reconnects still resume without a gap). */
  liveOnly?: boolean;
  /** Ends the iteration (it returns without an error). */
  signal?: AbortSignal;
  /** Reconnects in a row that may fail before the stream gives up (default 60). */
  maxReconnects?: number;
}

/** @internal What the event stream needs of its sandbox. */
export interface EventSource {
  dp: DataPlane;
  /** Re-reads the sandbox's runtime access (it may have moved); throws if it is gone. */
  refresh(): Promise<void>;
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

/**
 * @internal The event stream of `src`: yields `{ id, at, type, data }`; ends after
 * `sandbox.deleted` or when `signal` aborts.
 */
export async function* streamEvents(src: EventSource, opts: StreamEventsOpts = {}): AsyncGenerator<SandboxEvent, void, undefined> {
  let last = opts.afterEventId;
  if (last !== undefined && (!Number.isInteger(last) || last < 0)) {
    throw invalid(`afterEventId must be an event ID from 0; got ${JSON.stringify(last)}`);
  }
  const maxReconnects = opts.maxReconnects ?? 60;
  let failures = 0;
  let lastError = "";
  const signal = opts.signal;
  while (!signal?.aborted) {
    const query = last !== undefined ? `?after_event_id=${last}` : opts.liveOnly ? "?live_only=true" : "";
    let conn;
    try {
      const { url } = src.dp.webSocket(`/lifecycle/ws${query}`);
      conn = await openWebSocket(url, { "x-api-key": src.dp.config.apiKey });
    } catch (e) {
      conn = undefined;
      lastError = (e as Error).message;
    }
    if (conn) {
      const c = conn;
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
    try {
      await src.refresh();
    } catch (e) {
      if (e instanceof NotFoundError || e instanceof AuthenticationError || e instanceof ForbiddenError) {
        throw new StreamError("stream_failed", `event stream: ${(e as Error).message}`, (e as StreamError).status);
      }
      // a restarting API: try again
    }
  }
}
