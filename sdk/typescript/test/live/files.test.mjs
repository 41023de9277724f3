// Files against the live stack: text and bytes, directories, streamed upload and
// download (local files and web streams), a watch, presigned URLs.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { NotFoundError, Sandbox } from "nullspace";

import { RUN, SMALL, within } from "./lib.mjs";

let sbx;
let dir;
before(async () => {
  sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN } });
  dir = mkdtempSync(join(tmpdir(), "ns-ts-files-"));
});
after(async () => {
  await sbx?.kill();
  rmSync(dir, { recursive: true, force: true });
});

test("read, write, list, stat, mkdir, rename, remove", async () => {
  const written = await sbx.files.write("notes/a.txt", "alpha");
  assert.deepEqual(written, { path: "notes/a.txt", bytes: 5 });
  assert.equal(await sbx.files.read("notes/a.txt"), "alpha");
  assert.deepEqual(await sbx.files.read("/workspace/notes/a.txt", { format: "bytes" }), new TextEncoder().encode("alpha"));
  await sbx.files.makeDir("notes/deep/er");
  await sbx.files.rename("notes/a.txt", "notes/b.txt");
  assert.deepEqual((await sbx.files.list("notes")).map((e) => [e.name, e.type]), [
    ["b.txt", "file"],
    ["deep", "dir"],
  ]);
  const info = await sbx.files.getInfo("notes/b.txt");
  assert.equal(info.size, 5);
  assert.equal(info.type, "file");
  assert.equal(await sbx.files.exists("notes/a.txt"), false);
  assert.equal(await sbx.files.exists("notes/b.txt"), true);
  // What the command sees is what the files API wrote.
  assert.equal((await sbx.commands.run("cat /workspace/notes/b.txt")).stdout, "alpha");
  await sbx.files.remove("notes");
  await assert.rejects(sbx.files.read("notes/b.txt"), (e) => e instanceof NotFoundError && e.status === 404);
});

test("upload and download stream local files; web streams both ways", async () => {
  const blob = Buffer.alloc(3_000_000);
  for (let i = 0; i < blob.length; i++) blob[i] = (i * 7) % 251;
  writeFileSync(join(dir, "up.bin"), blob);
  assert.equal(await sbx.files.upload(join(dir, "up.bin"), "/workspace/up.bin"), blob.length);
  assert.equal((await sbx.commands.run("sha256sum < up.bin | cut -c1-64")).stdout.trim(),
    (await import("node:crypto")).createHash("sha256").update(blob).digest("hex"));
  assert.equal(await sbx.files.download("up.bin", join(dir, "down.bin")), blob.length);
  assert.ok(readFileSync(join(dir, "down.bin")).equals(blob));

  // An async iterable of chunks in; a ReadableStream out.
  async function* parts() {
    for (let i = 0; i < 64; i++) yield new TextEncoder().encode(`line ${i}\n`.repeat(1000));
  }
  const w = await sbx.files.write("streamed.txt", parts());
  const stream = await sbx.files.read("streamed.txt", { format: "stream" });
  assert.ok(stream instanceof ReadableStream);
  let text = "";
  const decoder = new TextDecoder();
  for await (const chunk of stream) text += decoder.decode(chunk, { stream: true });
  const expected = Array.from({ length: 64 }, (_, i) => `line ${i}\n`.repeat(1000)).join("");
  assert.equal(text, expected);
  assert.equal(w.bytes, expected.length);
  // A download of a file that does not exist leaves nothing behind.
  await assert.rejects(sbx.files.download("missing.bin", join(dir, "missing.bin")), NotFoundError);
  assert.throws(() => readFileSync(join(dir, "missing.bin")));
});

test("watching a directory yields its changes", async () => {
  const ctl = new AbortController();
  const changes = [];
  const watching = (async () => {
    for await (const change of sbx.files.watchDir("/workspace", { timeoutMs: 30_000, signal: ctl.signal })) {
      changes.push(change);
      if (change.type === "write" && change.path === "/workspace/watched") return true;
    }
    return false;
  })();
  // The watch is live once a change made now shows up; write until one does.
  const writer = (async () => {
    for (let i = 0; i < 20 && !changes.some((c) => c.path === "/workspace/watched"); i++) {
      await sbx.commands.run("echo hi >> /workspace/watched");
      await new Promise((r) => setTimeout(r, 500));
    }
  })();
  assert.equal(await within(40_000, "the write event", watching), true);
  await writer;
  ctl.abort();
  assert.ok(changes.some((c) => c.type === "write" && c.path === "/workspace/watched" && c.dir === false), JSON.stringify(changes));
});

test("presigned URLs need no credential, for their path and method only", async () => {
  await sbx.files.write("report.txt", "presigned");
  const get = await sbx.files.presign("report.txt", { expires: 120 });
  assert.equal(get.method, "GET");
  const r = await fetch(get.url);
  assert.equal(r.status, 200);
  assert.equal(await r.text(), "presigned");
  assert.equal((await fetch(get.url, { method: "PUT", body: "no" })).status, 403);
  const put = await sbx.files.presign("upload.txt", { method: "PUT" });
  assert.equal((await fetch(put.url, { method: "PUT", body: "uploaded" })).status, 200);
  assert.equal(await sbx.files.read("upload.txt"), "uploaded");
});
