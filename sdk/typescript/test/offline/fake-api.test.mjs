// The SDK against a fake API on loopback (no stack): configuration, error classes,
// request deadlines, NDJSON command streams, the audit's paging, template builds, and
// the event stream's reconnect and resume.
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  AuthenticationError,
  BuildFailedError,
  ConfigError,
  NotFoundError,
  QuotaExceededError,
  Sandbox,
  SandboxError,
  SandboxTimeoutError,
  StreamError,
  Template,
  Config,
} from "nullspace";

import { KEY, SBX, record, startFake } from "./fake.mjs";

let fake;
let conn;
before(async () => {
  fake = await startFake({ records: Array.from({ length: 1205 }, (_, i) => record(i + 1, { action: "allowed", detections: [] })) });
  conn = { apiKey: KEY, domain: fake.base };
});
after(() => fake.close());

function withEnv(vars, fn) {
  const saved = {};
  for (const k of Object.keys(vars)) {
    saved[k] = process.env[k];
    if (vars[k] === undefined) delete process.env[k];
    else process.env[k] = vars[k];
  }
  const restore = () => {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  let out;
  try {
    out = fn();
  } catch (e) {
    restore();
    throw e;
  }
  if (out && typeof out.then === "function") return out.finally(restore);
  restore();
  return out;
}

test("configuration: arguments, environment, the dev env file", async () => {
  const home = mkdtempSync(join(tmpdir(), "ns-ts-home-"));
  try {
    // Nothing anywhere: a ConfigError saying where to put a key.
    withEnv({ NULLSPACE_API_KEY: undefined, NULLSPACE_API_URL: undefined, XDG_STATE_HOME: undefined, HOME: home }, () => {
      assert.throws(() => Config.resolve(), (e) => e instanceof ConfigError && e.code === "config" && /NULLSPACE_API_KEY/.test(e.message));
    });
    // The dev env file (deploy/up.sh writes it).
    mkdirSync(join(home, "state", "nullspace"), { recursive: true });
    writeFileSync(join(home, "state", "nullspace", "dev.env"), `NULLSPACE_API_URL=${fake.base}/api/v1\nNULLSPACE_API_KEY=${KEY}\n`);
    await withEnv({ NULLSPACE_API_KEY: undefined, NULLSPACE_API_URL: undefined, XDG_STATE_HOME: join(home, "state") }, async () => {
      const c = Config.resolve();
      assert.equal(c.apiUrl, fake.base);
      assert.equal(c.apiKey, KEY);
      assert.equal((await Sandbox.list()).sandboxes[0].sandboxId, SBX);
      // The environment wins over the file, arguments over both.
      process.env.NULLSPACE_API_URL = "http://127.0.0.1:9";
      assert.equal(Config.resolve().apiUrl, "http://127.0.0.1:9");
      const hostPort = fake.base.slice("http://".length);
      assert.equal(Config.resolve({ domain: hostPort }).apiUrl, fake.base);
      assert.equal((await Sandbox.list({ domain: hostPort })).nextToken, null);
      await assert.rejects(Sandbox.list({ domain: hostPort, apiKey: "ns_wrong" }), AuthenticationError);
    });
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
  assert.equal(Config.resolve({ apiKey: "k", domain: "https://api.example.com/api/v1/" }).apiUrl, "https://api.example.com");
  assert.throws(() => Config.resolve({ apiKey: "k", requestTimeoutMs: -1 }), /requestTimeoutMs must be a positive number/);
});

test("errors are typed by the API's code", async () => {
  await assert.rejects(Sandbox.getInfoById("sbx-missing", conn), (e) => {
    assert.ok(e instanceof NotFoundError && e instanceof SandboxError && e instanceof Error);
    assert.equal(e.code, "not_found");
    assert.equal(e.status, 404);
    assert.equal(e.name, "NotFoundError");
    assert.match(e.reason, /no route GET/);
    return true;
  });
  await assert.rejects(Sandbox.getInfoById("sbx-quota", conn), (e) => e instanceof QuotaExceededError && e.status === 429);
  await assert.rejects(Sandbox.getInfoById("sbx-proxy", conn), (e) => e.code === "http_error" && e.status === 502 && /bad gateway/.test(e.message));
});

test("a request past requestTimeoutMs is a SandboxTimeoutError", async () => {
  const t0 = Date.now();
  // A route that answers after 3 s.
  const { call } = await import("../../dist/esm/http.js");
  await assert.rejects(call(new Config(fake.base, KEY, 300), "GET", "/slow"), (e) => e instanceof SandboxTimeoutError && e.code === "timeout");
  assert.ok(Date.now() - t0 < 2500, "the deadline did not cut the request");
});

test("command output streams as NDJSON: chunks, base64, split lines, errors", async () => {
  const sbx = await Sandbox.create("base", conn);
  const out = [];
  const err = [];
  const r = await sbx.commands.run("echo", { onStdout: (d) => out.push(d), onStderr: (d) => err.push(d) });
  assert.deepEqual(r, { stdout: "hé", stderr: "\uFFFDA", exitCode: 3, signal: null, pid: 7 });
  assert.deepEqual(out, ["hé"]);
  assert.deepEqual(err, ["\uFFFDA"]);
  const run = fake.state.requests.find((q) => q.path.endsWith("/commands"));
  assert.equal(run.headers.authorization, "Bearer runtime-token");
  assert.deepEqual(JSON.parse(run.body), { cmd: "echo", background: false, stdin: false });
  await assert.rejects(sbx.commands.run("cut"), (e) => e instanceof StreamError && e.code === "protocol");
  await assert.rejects(sbx.commands.run("fail"), (e) => e instanceof NotFoundError && /no such user/.test(e.message));
  await assert.rejects(
    sbx.commands.run("slow", { timeoutMs: 300 }),
    (e) => e instanceof SandboxTimeoutError && e.details.pid === 7,
  );
  await assert.rejects(sbx.files.read("nope.txt"), (e) => e instanceof NotFoundError && /nope\.txt/.test(e.message));
});

test("security policy and audit: the REST calls, paging, parsing", async () => {
  const sbx = await Sandbox.create("base", conn);
  const info = await sbx.setSecurityPolicy({ pii: { detectors: { email: "log" } }, audit: false });
  assert.deepEqual(fake.state.policy, { pii: { detectors: { email: "log" } }, audit: { enabled: false } });
  assert.deepEqual(info.securityPolicy, fake.state.policy);
  await assert.rejects(sbx.setSecurityPolicy({ piii: {} }), /unknown keys \["piii"\]/);
  await assert.rejects(sbx.setSecurityPolicy({ transforms: { host: "a" } }), /transforms must be an array/);

  const page = await sbx.getAudit();
  const q = fake.state.requests.at(-1);
  assert.equal(q.path, `/api/v1/sandboxes/${SBX}/audit`);
  assert.deepEqual(Object.fromEntries(q.query), { after: "0", limit: "100" });
  assert.deepEqual(page.records.map((r) => r.id), Array.from({ length: 100 }, (_, i) => i + 1));
  assert.deepEqual([page.next, page.more], [100, true]);
  const r = page.records[0];
  assert.equal(r.bytesIn, 12);
  assert.equal(r.timestamp.toISOString(), "2026-01-02T03:04:05.123Z");
  const last = await sbx.getAudit({ after: 1200, limit: 10 });
  assert.deepEqual(last.records.map((x) => x.id), [1201, 1202, 1203, 1204, 1205]);
  assert.deepEqual([last.next, last.more], [1205, false]);

  const before = fake.state.requests.length;
  const ids = [];
  for await (const rec of sbx.audit({ after: 3 })) ids.push(rec.id);
  assert.deepEqual(ids, Array.from({ length: 1202 }, (_, i) => i + 4));
  assert.deepEqual(fake.state.requests.slice(before).map((x) => x.query.get("limit")), ["1000", "1000"]);
  await assert.rejects(sbx.getAudit({ limit: 0 }), /1 to 1000/);
  await assert.rejects(sbx.getAudit({ after: -1 }), /from 0/);
  assert.throws(() => sbx.audit({ after: "3" }), /from 0/);
});

test("template builds stream their log; a failed build says why", async () => {
  const lines = [];
  const tpl = await Template.build({ ...conn, name: "t", steps: [{ run: "echo hello" }], onLog: (l) => lines.push(l.text) });
  assert.equal(tpl.templateId, "tpl-1");
  assert.equal(tpl.status, "ready");
  assert.deepEqual(lines, ["hello", "done"]);
  const build = fake.state.requests.find((q) => q.path === "/api/v1/templates" && q.method === "POST");
  assert.deepEqual(JSON.parse(build.body), { from: "base", steps: [{ run: "echo hello" }], name: "t" });
  fake.state.build.fail = true;
  await assert.rejects(Template.build({ ...conn, steps: [{ run: "exit 9" }] }), (e) => {
    assert.ok(e instanceof BuildFailedError);
    assert.equal(e.code, "build_failed");
    assert.deepEqual([e.details.step, e.details.exitCode, e.details.outputTail], [0, 9, "nope"]);
    return true;
  });
  fake.state.build.fail = false;
});

test("the event stream reconnects after a drop and resumes after the last event", async () => {
  const local = await startFake({ dropAfter: 2 });
  try {
    const sbx = await Sandbox.create("base", { apiKey: KEY, domain: local.base });
    const ids = [];
    for await (const e of sbx.streamEvents()) {
      ids.push(e.id);
      if (ids.length === 5) break;
    }
    assert.deepEqual(ids, [1, 2, 3, 4, 5]);
    assert.equal(local.state.wsUrls.length, 2);
    assert.equal(local.state.wsUrls[0], `/v1/sandboxes/${SBX}/lifecycle/ws`);
    assert.equal(local.state.wsUrls[1], `/v1/sandboxes/${SBX}/lifecycle/ws?after_event_id=2`);
    assert.equal(local.state.wsHeaders[0]["x-api-key"], KEY);
    // liveOnly: after the newest event there is when it starts (read first), as an ID.
    const opened = local.state.wsUrls.length;
    const live = sbx.streamEvents({ liveOnly: true });
    const first = live.next();
    while (local.state.wsUrls.length === opened) await new Promise((r) => setTimeout(r, 10));
    assert.match(local.state.wsUrls.at(-1), /\?after_event_id=5$/);
    local.push({ id: 6, at: "2026-01-01T00:00:00Z", type: "e6", data: {} });
    assert.equal((await first).value.id, 6);
    await live.return();
    // afterEventId: the query the data plane gets.
    const later = sbx.streamEvents({ afterEventId: 3 });
    assert.equal((await later.next()).value.id, 4);
    await later.return();
    assert.match(local.state.wsUrls.at(-1), /\?after_event_id=3$/);
    // A stream the server refuses (a wrong key) gives up with the API's error.
    const refused = new Sandbox(await Sandbox.getInfoById(SBX, { apiKey: KEY, domain: local.base }), new Config(local.base, "ns_wrong", 5000));
    await assert.rejects(refused.streamEvents().next(), (e) => e instanceof StreamError && e.status === 401);
  } finally {
    await local.close();
  }
});
