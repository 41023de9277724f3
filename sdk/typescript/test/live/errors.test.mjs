// Error codes against the live stack: each failure is a typed class carrying the API's
// code and status, and what the SDK refuses itself never reaches the API.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AuthenticationError,
  ConfigError,
  ConnectionError,
  ForbiddenError,
  InvalidRequestError,
  InvalidStateError,
  NotFoundError,
  Sandbox,
  SandboxError,
  Template,
  WarmPoolUnavailableError,
} from "nullspace";

import { RUN, SMALL } from "./lib.mjs";

function is(cls, code, status) {
  return (e) => {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${e?.name}: ${e?.message}`);
    assert.ok(e instanceof SandboxError);
    assert.equal(e.code, code);
    assert.equal(e.status, status);
    return true;
  };
}

test("the API's error codes arrive as typed errors", async () => {
  await assert.rejects(Sandbox.getInfoById("sbx-0123456789abcdef0123"), is(NotFoundError, "not_found", 404));
  await assert.rejects(Sandbox.connect("sbx-0123456789abcdef0123"), is(NotFoundError, "not_found", 404));
  await assert.rejects(Sandbox.list({ apiKey: "ns_0123456789abcdef0123456789abcdef" }), is(AuthenticationError, "unauthorized", 401));
  await assert.rejects(Sandbox.create("no-such-template", { resources: SMALL }), is(NotFoundError, "not_found", 404));
  // The API's own checks: what it refuses, and what to send instead.
  await assert.rejects(Sandbox.create("base", { resources: SMALL, timeout: 0 }), (e) => {
    is(InvalidRequestError, "invalid_request", 400)(e);
    assert.match(e.message, /timeout/);
    return true;
  });
  await assert.rejects(Sandbox.create("base", { resources: SMALL, region: "mars" }), (e) => {
    is(InvalidRequestError, "invalid_request", 400)(e);
    assert.match(e.message, /region/);
    return true;
  });
  await assert.rejects(
    Sandbox.create("base", { resources: SMALL, securityPolicy: { pii: { detectors: { card: "shred" } } } }),
    (e) => is(InvalidRequestError, "invalid_request", 400)(e) && /securityPolicy/.test(e.message),
  );
  // No warm pool for this shape: require fails at once.
  await assert.rejects(
    Sandbox.create("base", { resources: SMALL, warmPoolMode: "require" }),
    is(WarmPoolUnavailableError, "warm_pool_unavailable", 409),
  );
  // The built-in templates' pools are the operator's.
  await assert.rejects(Template.setWarmPool("base", 1, { resources: SMALL }), is(ForbiddenError, "forbidden", 403));
  await assert.rejects(Template.get("no-such-template"), is(NotFoundError, "not_found", 404));
});

test("data-plane errors: a paused sandbox, a missing file, a deleted sandbox", async () => {
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 120, metadata: { run: RUN } });
  try {
    await assert.rejects(sbx.files.read("/nope"), is(NotFoundError, "not_found", 404));
    await sbx.pause();
    await assert.rejects(sbx.commands.run("true"), is(InvalidStateError, "invalid_state", 409));
    await sbx.connect();
    assert.equal((await sbx.commands.run("echo back")).stdout, "back\n");
  } finally {
    assert.equal(await sbx.kill(), true);
  }
  assert.equal(await sbx.kill(), false);
  await assert.rejects(sbx.files.read("x"), (e) => e instanceof SandboxError && e.status >= 400);
});

test("what the SDK refuses itself, and per-call configuration", async () => {
  await assert.rejects(
    Sandbox.create("base", { resources: { memory: 512 } }),
    (e) => is(InvalidRequestError, "invalid_request", 0)(e) && /memory/.test(e.message),
  );
  await assert.rejects(
    Sandbox.create("base", { timeoutMs: 60_000 }),
    (e) => is(InvalidRequestError, "invalid_request", 0)(e) && /send timeout \(seconds\)/.test(e.message),
  );
  // domain as host:port, per call, over the environment's.
  const hostPort = process.env.NULLSPACE_API_URL.split("://")[1];
  const saved = { url: process.env.NULLSPACE_API_URL, key: process.env.NULLSPACE_API_KEY, home: process.env.HOME, xdg: process.env.XDG_STATE_HOME };
  process.env.NULLSPACE_API_URL = "http://127.0.0.1:9";
  try {
    await assert.rejects(Sandbox.list(), is(ConnectionError, "unreachable", 0));
    assert.ok(Array.isArray((await Sandbox.list({ domain: hostPort })).sandboxes));
    // No key anywhere: a config error saying where to get one.
    delete process.env.NULLSPACE_API_KEY;
    process.env.HOME = "/nonexistent";
    delete process.env.XDG_STATE_HOME;
    await assert.rejects(Sandbox.list({ domain: hostPort }), (e) => is(ConfigError, "config", 0)(e) && /NULLSPACE_API_KEY/.test(e.message));
    assert.ok(Array.isArray((await Sandbox.list({ domain: hostPort, apiKey: saved.key })).sandboxes));
  } finally {
    process.env.NULLSPACE_API_URL = saved.url;
    process.env.NULLSPACE_API_KEY = saved.key;
    process.env.HOME = saved.home;
    if (saved.xdg !== undefined) process.env.XDG_STATE_HOME = saved.xdg;
  }
});
