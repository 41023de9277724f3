// The lifecycle event stream against the live stack: a connection dropped under the
// iterator is reopened with after_event_id and nothing is missed or repeated; liveOnly
// skips the replay; the stream ends after sandbox.deleted.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Sandbox, setWebSocketImplementation } from "nullspace";
import { WebSocket } from "ws";

import { RUN, SMALL, within } from "./lib.mjs";

/** A WebSocket class that records each URL and can cut the connection under the SDK. */
function instrumented() {
  const log = { urls: [], sockets: [], opened: [] };
  class Recorded extends WebSocket {
    constructor(url, init) {
      super(url, init);
      log.urls.push(url);
      log.sockets.push(this);
      log.opened.push(new Promise((r) => this.addEventListener("open", () => r())));
    }
  }
  return { log, Recorded };
}

test("the stream reconnects after a drop and resumes after the last event", async () => {
  const { log, Recorded } = instrumented();
  setWebSocketImplementation(Recorded);
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN } });
  try {
    const events = [];
    let lastBeforeDrop;
    const reading = (async () => {
      for await (const e of sbx.streamEvents()) {
        events.push(e);
        if (events.length === 2) {
          // The network drops: the socket dies without a close frame.
          lastBeforeDrop = e.id;
          log.sockets[0].terminate();
        }
        // Resumed: running again after the pause.
        if (e.type === "sandbox.running" && events.some((x) => x.type === "sandbox.paused")) return;
      }
    })();
    // Events that happen while (and after) the stream reconnects.
    await within(60_000, "the second connection", (async () => {
      while (log.urls.length < 2) await new Promise((r) => setTimeout(r, 50));
    })());
    await sbx.pause();
    await sbx.resume();
    await within(120_000, "sandbox.paused, then sandbox.running, on the stream", reading);

    const ids = events.map((e) => e.id);
    assert.deepEqual(ids, Array.from({ length: ids.length }, (_, i) => i + 1), `a gap or a duplicate: ${ids}`);
    assert.equal(events[0].type, "sandbox.created");
    const types = events.map((e) => e.type);
    assert.ok(types.indexOf("sandbox.paused") < types.lastIndexOf("sandbox.running"), types.join(" "));
    assert.ok(log.urls.length >= 2, `one connection only: ${log.urls}`);
    assert.ok(log.urls[0].endsWith("/lifecycle/ws"), log.urls[0]);
    // The reconnect asked for what came after the last event it had handed out.
    const resumedAt = Number(new URL(log.urls[1]).searchParams.get("after_event_id"));
    assert.ok(resumedAt >= lastBeforeDrop, `${log.urls[1]} (dropped after ${lastBeforeDrop})`);
    assert.ok(ids.includes(resumedAt + 1) || resumedAt === ids.at(-1));
  } finally {
    setWebSocketImplementation(undefined);
    await sbx.kill();
  }
});

test("liveOnly skips the replay; afterEventId resumes; the stream ends after sandbox.deleted", async () => {
  const { log, Recorded } = instrumented();
  setWebSocketImplementation(Recorded);
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN } });
  try {
    const live = sbx.streamEvents({ liveOnly: true });
    const first = live.next();
    await within(30_000, "the live stream's connection", (async () => {
      while (!log.opened.length) await new Promise((r) => setTimeout(r, 20));
      await log.opened[0];
    })());
    await sbx.setPortPublic(8000);
    const e = (await within(30_000, "the first live event", first)).value;
    assert.notEqual(e.type, "sandbox.created");
    assert.ok(e.id > 1);
    assert.equal(e.type, "sandbox.preview_port");
    assert.deepEqual(e.data, { port: 8000, public: true });
    // liveOnly reads the newest event's ID first and resumes after it (a reconnect
    // before the first live event then misses nothing).
    assert.match(log.urls[0], /\?after_event_id=\d+$/);
    assert.ok(Number(/after_event_id=(\d+)/.exec(log.urls[0])[1]) < e.id, log.urls[0]);

    const later = sbx.streamEvents({ afterEventId: 1 });
    assert.equal((await within(30_000, "event 2", later.next())).value.id, 2);
    await later.return();

    await sbx.kill();
    const rest = [];
    await within(60_000, "the end of the stream after the kill", (async () => {
      for await (const ev of { [Symbol.asyncIterator]: () => live }) rest.push(ev.type);
    })());
    assert.equal(rest.at(-1), "sandbox.deleted");
  } finally {
    setWebSocketImplementation(undefined);
    await sbx.kill();
  }
});
