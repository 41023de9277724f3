// Which WebSocket client the SDK uses: the `ws` package where the runtime has no global
// WebSocket (Node 20), the global one where it has (Node 22+, or Node 20 with
// --experimental-websocket); both send the handshake headers.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { Sandbox } from "nullspace";

import { KEY, SBX, startFake } from "./fake.mjs";

const PKG = fileURLToPath(new URL("../..", import.meta.url));

function node(args, env) {
  return new Promise((resolve) => {
    execFile(process.execPath, args, { cwd: PKG, env: { ...process.env, ...env }, timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (err.code ?? 1) : 0, stdout, stderr }),
    );
  });
}

const CHILD = `
import { Sandbox } from "nullspace";
let built = 0;
const Global = globalThis.WebSocket;
if (Global) globalThis.WebSocket = class extends Global { constructor(u, i) { super(u, i); built += 1; } };
const sbx = await Sandbox.create("base", { apiKey: process.env.KEY, domain: process.env.BASE });
const ids = [];
for await (const e of sbx.streamEvents()) { ids.push(e.id); if (ids.length === 3) break; }
console.log(JSON.stringify({ global: typeof Global, built, ids }));
`;

test("the ws package where there is no global WebSocket", async () => {
  assert.equal(typeof globalThis.WebSocket, "undefined", "this test needs Node 20 without --experimental-websocket");
  const fake = await startFake();
  try {
    const sbx = await Sandbox.create("base", { apiKey: KEY, domain: fake.base });
    const it = sbx.streamEvents();
    assert.equal((await it.next()).value.id, 1);
    await it.return();
    assert.equal(fake.state.wsHeaders[0]["x-api-key"], KEY);
    assert.equal(fake.state.wsUrls[0], `/v1/sandboxes/${SBX}/lifecycle/ws`);
  } finally {
    await fake.close();
  }
});

test("the global WebSocket where there is one, headers included", async () => {
  const fake = await startFake();
  try {
    const r = await node(["--experimental-websocket", "--no-warnings", "--input-type=module", "-e", CHILD], {
      KEY,
      BASE: fake.base,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), { global: "function", built: 1, ids: [1, 2, 3] });
    assert.equal(fake.state.wsHeaders[0]["x-api-key"], KEY);
  } finally {
    await fake.close();
  }
});
