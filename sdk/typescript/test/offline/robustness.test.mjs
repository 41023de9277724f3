// The SDK's edges against the fake API (no stack): output split inside a character,
// typed errors by status, credentials kept out of logs and messages, downloads that
// fail, streams that are cancelled, terminals left early, builds and event streams
// that must not wait forever.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { inspect } from "node:util";

import {
  AuthenticationError,
  CommandDetachedError,
  Config,
  ForbiddenError,
  InvalidRequestError,
  InvalidStateError,
  QuotaExceededError,
  RateLimitError,
  Sandbox,
  SandboxError,
  SandboxTimeoutError,
  StreamError,
  Template,
  createBody,
  errorFor,
  signalNumber,
} from "nullspace";

import { KEY, SBX, TOKEN, startFake } from "./fake.mjs";

let fake;
let conn;
before(async () => {
  fake = await startFake();
  conn = { apiKey: KEY, domain: fake.base };
});
after(() => fake.close());

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test("output split inside a UTF-8 character decodes whole, per stream", async () => {
  const sbx = await Sandbox.create("base", conn);
  const out = [];
  const err = [];
  const r = await sbx.commands.run("split", { onStdout: (d) => out.push(d), onStderr: (d) => err.push(d) });
  // (The fake sends "hé" and the invalid byte 0xff + "A" first, for every command.)
  assert.equal(r.stdout, "héa€b😀c");
  assert.equal(out.join(""), "héa€b😀c");
  assert.ok(!out.some((d) => d.includes("\uFFFD")), JSON.stringify(out));
  assert.equal(r.stderr, "\uFFFDA\uFFFD");
  assert.equal(err.join(""), "\uFFFDA\uFFFD");
});

test("a detached command stream is its own error", async () => {
  const sbx = await Sandbox.create("base", conn);
  await assert.rejects(sbx.commands.run("detach"), (e) => {
    assert.ok(e instanceof CommandDetachedError && e instanceof StreamError);
    assert.equal(e.code, "detached");
    assert.match(e.message, /another client attached/);
    return true;
  });
});

test("errors are typed by status where the code says nothing; non-JSON bodies are protocol errors", async () => {
  await assert.rejects(Sandbox.getInfoById("sbx-revoked", conn), (e) => e instanceof AuthenticationError && e.code === "token_revoked");
  await assert.rejects(Sandbox.getInfoById("sbx-forbidden", conn), (e) => e instanceof ForbiddenError && e.status === 403);
  await assert.rejects(Sandbox.getInfoById("sbx-conflict", conn), (e) => e instanceof InvalidStateError && e.code === "busy");
  await assert.rejects(Sandbox.getInfoById("sbx-slow-down", conn), (e) => e instanceof RateLimitError && e.status === 429);
  assert.ok(errorFor("team_quota", "x", 429) instanceof QuotaExceededError);
  assert.ok(errorFor("token_revoked", "x", 401) instanceof AuthenticationError);
  await assert.rejects(Sandbox.getInfoById("sbx-html", conn), (e) => {
    assert.ok(e instanceof SandboxError, `not a SandboxError: ${e}`);
    assert.equal(e.code, "protocol");
    assert.match(e.message, /not JSON/);
    return true;
  });
});

test("signal names: every standard Linux signal, x86-64 numbers", () => {
  const want = {
    SIGHUP: 1, SIGQUIT: 3, SIGILL: 4, SIGTRAP: 5, SIGABRT: 6, SIGBUS: 7, SIGFPE: 8, SIGUSR1: 10, SIGSEGV: 11,
    SIGUSR2: 12, SIGPIPE: 13, SIGALRM: 14, SIGCHLD: 17, SIGCONT: 18, SIGSTOP: 19, SIGTSTP: 20, SIGTTIN: 21,
    SIGTTOU: 22, SIGURG: 23, SIGXCPU: 24, SIGXFSZ: 25, SIGVTALRM: 26, SIGPROF: 27, SIGWINCH: 28, SIGIO: 29,
    SIGPWR: 30, SIGSYS: 31,
  };
  for (const [name, n] of Object.entries(want)) {
    assert.equal(signalNumber(name), n, name);
    assert.equal(signalNumber(name.slice(3).toLowerCase()), n, name);
  }
  assert.throws(() => signalNumber("SIGNOPE"), InvalidRequestError);
});

test("resources: {} sends nothing", () => {
  assert.equal("resources" in createBody("base", { resources: {} }), false);
  assert.deepEqual(createBody("base", { resources: { cpu: 1 } }).resources, { vcpus: 1, memMiB: 2048, diskSizeMiB: 8192 });
  assert.throws(() => createBody("base", { resources: 4 }), /resources must be an object/);
});

test("console.log shows no API key and no runtime token", async () => {
  const sbx = await Sandbox.create("base", conn);
  const handle = sbx.commands.connect(7);
  for (const [name, obj] of [
    ["sandbox", sbx],
    ["commands", sbx.commands],
    ["files", sbx.files],
    ["pty", sbx.pty],
    ["desktop", sbx.desktop],
    ["handle", handle],
    ["config", Config.resolve(conn)],
  ]) {
    const views = [inspect(obj, { depth: 10 }), JSON.stringify(obj) ?? "", String(obj)];
    // Without the custom views, the credentials are not enumerable either.
    if (name !== "config") views.push(inspect(obj, { depth: 10, customInspect: false }));
    for (const view of views) {
      assert.ok(!view.includes(KEY), `${name} shows the API key: ${view}`);
      assert.ok(!view.includes(TOKEN), `${name} shows the runtime token: ${view}`);
    }
  }
  assert.match(inspect(sbx), new RegExp(`${SBX}.*running`));
  assert.match(inspect(handle), /pid: 7/);
  assert.deepEqual(Object.keys(sbx).sort(), ["commands", "desktop", "files", "pty", "sandboxId"]);
  // Still there for the SDK's own use.
  assert.equal(sbx.dp.runtime.token, TOKEN);
});

test("validation errors name the field, never the caller's values", async () => {
  const secret = "hunter2-very-secret";
  for (const opts of [
    { envVars: { TOKEN: secret, N: 5 } },
    { metadata: { owner: secret, n: 1 } },
    { envVars: [secret] },
    { securityPolicy: { transforms: { secret } } },
    { securityPolicy: { envMasking: [secret] } },
  ]) {
    assert.throws(
      () => createBody("base", opts),
      (e) => {
        assert.ok(e instanceof InvalidRequestError, String(e));
        assert.ok(!e.message.includes(secret), e.message);
        return true;
      },
    );
  }
});

test("a failing download rejects (no crash) and leaves no partial file", async () => {
  const sbx = await Sandbox.create("base", conn);
  const dir = mkdtempSync(join(tmpdir(), "ns-ts-dl-"));
  try {
    const ok = join(dir, "ok.bin");
    assert.equal(await sbx.files.download("data.bin", ok), 128 * 1024);
    assert.equal(readFileSync(ok).length, 128 * 1024);
    const bad = join(dir, "no-such-dir", "x.bin");
    await assert.rejects(sbx.files.download("data.bin", bad), (e) => e.code === "ENOENT");
    assert.equal(existsSync(`${bad}.nullspace-partial`), false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a read stream's cancel() aborts the download at once; a slow consumer is not timed out", async () => {
  const sbx = await Sandbox.create("base", { ...conn, requestTimeoutMs: 400 });
  const stream = await sbx.files.read("endless", { format: "stream" });
  const reader = stream.getReader();
  assert.equal((await reader.read()).value.byteLength, 1024);
  const pending = reader.read(); // waits on the server, which sends nothing more
  const t0 = Date.now();
  await reader.cancel();
  await pending.catch(() => undefined);
  for (let i = 0; i < 50 && fake.state.fileCancelled === 0; i++) await sleep(10);
  assert.equal(fake.state.fileCancelled, 1, "the server did not see the request end");
  assert.ok(Date.now() - t0 < 300, "cancel waited for the idle deadline");

  // Chunks held by the consumer longer than the idle deadline: not a timeout.
  const s2 = await sbx.files.read("data.bin", { format: "stream" });
  let n = 0;
  for await (const chunk of s2) {
    n += chunk.byteLength;
    await sleep(600);
  }
  assert.equal(n, 128 * 1024);
});

test("a whole answer may take longer than the deadline while it keeps arriving", async () => {
  const { call } = await import("../../dist/esm/http.js");
  const t0 = Date.now();
  const got = await call(new Config(fake.base, KEY, 400), "GET", "/trickle");
  assert.deepEqual(got, [1, 1, 1, 1, 1, 1]);
  assert.ok(Date.now() - t0 > 800);
});

test("pty: leaving the loop closes the terminal; recv has a default timeout", async () => {
  const sbx = await Sandbox.create("base", conn);
  const term = await sbx.pty.create();
  let chunks = 0;
  for await (const chunk of term) {
    assert.ok(chunk.byteLength > 0);
    if (++chunks === 2) break;
  }
  for (let i = 0; i < 100 && fake.state.ptyClosed === 0; i++) await sleep(10);
  assert.equal(fake.state.ptyClosed, 1, "breaking out did not close the WebSocket");
  const quiet = await sbx.pty.create({ cmd: "quiet", recvTimeoutMs: 200 });
  const t0 = Date.now();
  await assert.rejects(quiet.recv(), (e) => e instanceof SandboxTimeoutError && /200 ms/.test(e.message));
  assert.ok(Date.now() - t0 < 2000);
  await quiet.close();
});

test("Template.waitBuilt: an overall deadline and a signal", async () => {
  const t0 = Date.now();
  await assert.rejects(Template.waitBuilt("tpl-slow", { ...conn, timeoutMs: 300 }), (e) => e instanceof SandboxTimeoutError && e.code === "timeout");
  assert.ok(Date.now() - t0 < 2000);
  const ac = new AbortController();
  setTimeout(() => ac.abort(new Error("stop")), 100);
  await assert.rejects(Template.waitBuilt("tpl-slow", { ...conn, signal: ac.signal }), /stop/);
});

test("waitReady takes requestTimeoutMs", async () => {
  const sbx = await Sandbox.create("base", conn);
  await sbx.waitReady({ timeoutMs: 5000, requestTimeoutMs: 2000 });
  await assert.rejects(sbx.waitReady({ requestTimeoutMs: -1 }), /requestTimeoutMs/);
});

test("event stream: liveOnly resumes after the newest event even when dropped before the first", async () => {
  const local = await startFake();
  try {
    const sbx = await Sandbox.create("base", { apiKey: KEY, domain: local.base });
    local.state.dropNext = 1;
    // While it is disconnected, event 6 happens: the reconnect must not skip it.
    local.state.onDrop = () => local.state.events.push({ id: 6, at: "2026-01-01T00:00:00Z", type: "e6", data: {} });
    const it = sbx.streamEvents({ liveOnly: true });
    assert.equal((await it.next()).value.id, 6);
    await it.return();
    assert.deepEqual(local.state.wsUrls.map((u) => u.split("?")[1]), ["after_event_id=5", "after_event_id=5"]);
  } finally {
    await local.close();
  }
});

test("event stream: a half-open connection is detected and re-made", async () => {
  const local = await startFake();
  try {
    const sbx = await Sandbox.create("base", { apiKey: KEY, domain: local.base });
    local.state.silentNext = 1;
    const it = sbx.streamEvents({ keepAliveMs: 300 });
    const t0 = Date.now();
    assert.equal((await it.next()).value.id, 1);
    assert.ok(Date.now() - t0 < 5000);
    assert.equal(local.state.wsUrls.length, 2);
    await it.return();
  } finally {
    await local.close();
  }
});

test("event stream: a deleted sandbox ends it; signal stops it at once, without a refresh", async () => {
  const local = await startFake();
  try {
    const sbx = await Sandbox.create("base", { apiKey: KEY, domain: local.base });
    local.state.dropNext = 1;
    local.state.onDrop = () => {
      local.state.sandboxState = "deleted";
    };
    const seen = [];
    for await (const e of sbx.streamEvents()) seen.push(e.id);
    assert.deepEqual(seen, []);
    local.state.sandboxState = "running";

    // Aborted while it waits to reconnect: it returns at once and reads nothing more.
    local.state.dropNext = 100;
    local.state.onDrop = null;
    const ac = new AbortController();
    const it = sbx.streamEvents({ signal: ac.signal });
    const next = it.next();
    while (local.state.dropNext === 100) await sleep(5);
    const details = () => local.state.requests.filter((q) => q.path === `/api/v1/sandboxes/${SBX}` && q.method === "GET").length;
    const before = details();
    ac.abort();
    const t0 = Date.now();
    assert.equal((await next).done, true);
    assert.ok(Date.now() - t0 < 100);
    await sleep(300);
    assert.equal(details(), before, "refreshed after the abort");
  } finally {
    await local.close();
  }
});

test("event stream: a refused key stops at once, without retries", async () => {
  const local = await startFake();
  try {
    const info = await Sandbox.getInfoById(SBX, { apiKey: KEY, domain: local.base });
    const refused = new Sandbox(info, new Config(local.base, "ns_wrong", 5000));
    await assert.rejects(refused.streamEvents().next(), (e) => e instanceof StreamError && e.status === 401);
    assert.equal(local.state.wsUrls.length, 1);
  } finally {
    await local.close();
  }
});
