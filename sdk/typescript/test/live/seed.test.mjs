// The seed documents' JavaScript, as written there, against the live stack: seed 003's
// lifecycle example verbatim, and seed 004's API reference names as functions.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Sandbox, createSandbox, getHost, getSandbox, setTimeout as setSandboxTimeout } from "nullspace";

import { RUN, SMALL } from "./lib.mjs";

/** Records every request the SDK makes while `fn` runs: method, path, JSON body, status. */
async function recording(fn) {
  const seen = [];
  const real = globalThis.fetch;
  globalThis.fetch = async (url, init = {}) => {
    const resp = await real(url, init);
    const u = new URL(url);
    let body;
    try {
      body = typeof init.body === "string" ? JSON.parse(init.body) : undefined;
    } catch {
      body = init.body;
    }
    seen.push({ method: init.method ?? "GET", path: u.pathname, body, status: resp.status });
    return resp;
  };
  try {
    return { result: await fn(), seen };
  } finally {
    globalThis.fetch = real;
  }
}

test("seed 003's JavaScript example runs as written", async () => {
  const { result, seen } = await recording(async () => {
    // ---- seed 003, verbatim ---------------------------------------------------------
const sandbox = await Sandbox.create("base", {
timeout: 1800,
waitReady: true,
envVars: { FOO: "bar" },
metadata: { purpose: "demo" },
});
const sandboxId = sandbox.sandboxId;
await sandbox.connect({ timeout: 1800 });
// Or from a different process:
const reconnected = await Sandbox.connect(sandboxId, { timeout: 1800 });
await sandbox.setTimeout(3600);
await sandbox.refresh();
await sandbox.pause();
await sandbox.delete();
    // ---- end of the seed's example ----------------------------------------------------
    return { sandboxId, reconnected };
  });
  const { sandboxId, reconnected } = result;
  assert.match(sandboxId, /^sbx-[0-9a-f]{20}$/);
  assert.equal(reconnected.sandboxId, sandboxId);
  const base = `/api/v1/sandboxes/${sandboxId}`;
  assert.deepEqual(
    seen.map((r) => [r.method, r.path, r.body]),
    [
      ["POST", "/api/v1/sandboxes", { templateID: "base", timeout: 1800, envVars: { FOO: "bar" }, metadata: { purpose: "demo" } }],
      ["POST", `${base}/connect`, { timeout: 1800 }],
      ["POST", `${base}/connect`, { timeout: 1800 }],
      ["POST", `${base}/timeout`, { timeout: 3600 }],
      ["POST", `${base}/refreshes`, {}],
      ["POST", `${base}/pause`, {}],
      ["DELETE", base, undefined],
    ],
  );
  // Each step did what the seed says: the API answered 2xx, and the sandbox is gone.
  for (const r of seen) assert.ok(r.status >= 200 && r.status < 300, `${r.method} ${r.path}: ${r.status}`);
  const info = await Sandbox.getInfoById(sandboxId);
  assert.equal(info.state, "deleted");
  assert.equal(info.metadata.purpose, "demo");
  assert.equal(await reconnected.kill(), false, "deleting it again says it was gone");
});

test("seed 004's createSandbox, getSandbox, getHost and setTimeout", async () => {
  const sandbox = await createSandbox("base", { resources: SMALL, timeout: 120, metadata: { run: RUN, seed: "004" } });
  try {
    assert.ok(sandbox instanceof Sandbox);
    const info = await getSandbox(sandbox.sandboxId);
    assert.equal(info.state, "running");
    assert.deepEqual(info.resources, { vcpus: 1, memMiB: 512, diskSizeMiB: 1024 });
    assert.deepEqual(await getSandbox(sandbox.sandboxId, { fields: ["id", "status"] }), {
      id: sandbox.sandboxId,
      status: "running",
    });
    const host = await getHost(sandbox.sandboxId, 3000);
    assert.ok(host.startsWith(`3000-${sandbox.sandboxId}.`), host);
    assert.equal(await getHost(sandbox, 3000), host);
    await assert.rejects(getHost(sandbox, 0), (e) => e.code === "invalid_request" && /65535/.test(e.message));
    await setSandboxTimeout(sandbox.sandboxId, 90);
    assert.equal((await getSandbox(sandbox.sandboxId)).timeout, 90);
    await setSandboxTimeout(sandbox, 100);
    assert.equal((await sandbox.getInfo()).timeout, 100);
  } finally {
    await sandbox.kill();
  }
});
