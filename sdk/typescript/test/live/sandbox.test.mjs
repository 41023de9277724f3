// The rest of the Sandbox surface against the live stack: list and projections,
// waitReady, timeouts, pause/resume/hibernate, snapshots, restore, fork, metrics,
// logs, recordings, egress, volumes, the security policy and its audit, runOnce.
import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidStateError, NotFoundError, Sandbox, Snapshot, Volume } from "nullspace";

import { RUN, SMALL, until } from "./lib.mjs";

test("list, fields, waitReady, timeouts, pause, resume, connect", async () => {
  const tag = `${RUN}-life`;
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 120, metadata: { tag }, waitReady: false });
  try {
    assert.ok(["starting", "running"].includes((await Sandbox.getInfoById(sbx.sandboxId)).state));
    await sbx.waitReady({ timeoutMs: 120_000 });
    assert.equal(await sbx.isRunning(), true);
    assert.equal((await sbx.commands.run("echo ready")).stdout, "ready\n");

    const page = await Sandbox.list({ query: { metadata: { tag }, state: ["running"] } });
    assert.deepEqual(page.sandboxes.map((s) => s.sandboxId), [sbx.sandboxId]);
    assert.equal(page.nextToken, null);
    assert.deepEqual(page.sandboxes[0].metadata, { tag });
    const projected = await Sandbox.list({ query: { metadata: { tag } }, fields: ["id", "status"] });
    assert.deepEqual(projected.sandboxes, [{ id: sbx.sandboxId, status: "running" }]);
    assert.deepEqual(await Sandbox.getInfoById(sbx.sandboxId, { fields: ["status"] }), { status: "running" });
    await assert.rejects(Sandbox.list({ fields: ["id", "nope"] }), (e) => e.code === "invalid_request" && /nope/.test(e.message));

    await sbx.setTimeout(90);
    assert.equal((await sbx.getInfo()).timeout, 90);
    const before = (await sbx.getInfo()).expiresAt;
    await sbx.refresh(3600);
    assert.ok((await sbx.getInfo()).expiresAt > before);

    await sbx.files.write("state.txt", "kept");
    await sbx.pause();
    const paused = await Sandbox.getInfoById(sbx.sandboxId);
    assert.equal(paused.state, "paused");
    assert.equal(paused.runtime ?? null, null);
    assert.ok(paused.dashboardUrl.endsWith(`/dashboard/sandboxes/${sbx.sandboxId}`), paused.dashboardUrl);
    await sbx.resume();
    assert.equal(await sbx.files.read("state.txt"), "kept");
    await sbx.pause();
    const again = await Sandbox.connect(sbx.sandboxId, { timeout: 60 });
    assert.equal(await again.files.read("state.txt"), "kept");
    assert.equal((await again.getInfo()).timeout, 60);
  } finally {
    await sbx.kill();
  }
});

test("snapshots restore, forks branch, hibernate resumes", async () => {
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN } });
  let snap;
  try {
    await sbx.files.write("/workspace/state.txt", "v1");
    snap = await sbx.snapshot({ name: `${RUN}-snap` });
    assert.ok(snap instanceof Snapshot);
    assert.equal(snap.kind, "manual");
    assert.equal(snap.id, snap.snapshotId);
    assert.equal(snap.name, `${RUN}-snap`);
    assert.ok(snap.size > 0 && snap.created instanceof Date && !Number.isNaN(snap.created.getTime()));
    assert.deepEqual((await sbx.listSnapshots()).map((s) => s.id), [snap.id]);

    const [child] = await sbx.fork(1);
    try {
      assert.notEqual(child.sandboxId, sbx.sandboxId);
      assert.equal(await child.files.read("/workspace/state.txt"), "v1");
    } finally {
      await child.kill();
    }

    await sbx.hibernate();
    const info = await sbx.getInfo();
    assert.equal(info.state, "paused");
    assert.equal(info.hibernated, true);
    await sbx.resume();
    await sbx.files.write("/workspace/state.txt", "v2");

    const restored = await snap.restore({ timeout: 60 });
    try {
      assert.equal(await restored.files.read("/workspace/state.txt"), "v1");
    } finally {
      await restored.kill();
    }
    // A named snapshot is a start source (seed 002's snapshotName).
    const named = await Sandbox.create({ snapshotName: `${RUN}-snap`, snapshotId: snap.id, timeout: 60 });
    try {
      assert.equal(await named.files.read("/workspace/state.txt"), "v1");
    } finally {
      await named.kill();
    }
  } finally {
    await sbx.kill();
  }
  // The manual snapshot outlives its sandbox.
  const copy = await Sandbox.restore(sbx.sandboxId, { snapshotId: snap.snapshotId, timeout: 60 });
  try {
    assert.equal(await copy.files.read("/workspace/state.txt"), "v1");
  } finally {
    await copy.kill();
  }
  await snap.delete();
  await assert.rejects(Sandbox.restore(sbx.sandboxId, { snapshotId: snap.snapshotId }), NotFoundError);
});

test("metrics, logs, recordings", async () => {
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 120, recording: true, metadata: { run: RUN } });
  try {
    const since = new Date(Date.now() - 5_000);
    await sbx.commands.run("echo recorded; exit 3");
    await sbx.commands.run("echo ts-bg-out; sleep 1", { background: true });
    const samples = await until("a metrics sample", async () => {
      const m = await sbx.getMetrics();
      return m.length ? m : null;
    });
    assert.ok(samples.at(-1).memTotal > 0 && samples.at(-1).cpuCount === 1);
    assert.ok(samples.at(-1).timestamp instanceof Date);
    const ranged = await sbx.getMetrics({ start: since, end: new Date() });
    assert.ok(ranged.every((m) => m.timestamp >= new Date(Math.floor(since.getTime() / 1000) * 1000)));
    assert.deepEqual(await sbx.getMetrics({ start: Date.now() / 1000 + 3600, end: Date.now() / 1000 + 7200 }), []);

    const lines = await until("the background output in the logs", async () => {
      const l = await sbx.logs();
      return l.some((x) => x.source === "process" && x.text === "ts-bg-out") ? l : null;
    });
    assert.ok(lines.some((l) => l.source === "lifecycle"));
    assert.equal((await sbx.logs({ offset: 0, limit: 1 })).length, 1);
  } finally {
    await sbx.kill();
  }
  const recs = await until("the commands recording", async () => {
    const r = await sbx.listRecordings();
    return r.some((x) => x.kind === "commands") ? r : null;
  });
  const transcript = new TextDecoder().decode(await sbx.getRecording(recs.find((r) => r.kind === "commands").recordingId));
  const events = transcript.trim().split("\n").map((l) => JSON.parse(l));
  assert.ok(events.some((e) => e.type === "start" && (e.cmd ?? "").startsWith("echo recorded")), transcript);
  assert.ok(events.some((e) => e.type === "exit" && e.exitCode === 3), transcript);
});

test("egress and volumes", async () => {
  const vol = await Volume.create({ name: `${RUN}-vol`, sizeMiB: 32 });
  assert.equal(vol.version, 0);
  assert.equal(vol.sizeMiB, 32);
  await assert.rejects(
    Sandbox.create("base", { resources: SMALL, egress: { allow: ["not a host"] } }),
    (e) => e.code === "invalid_request" && /egress\.allow\[0\]/.test(e.message),
  );
  const sbx = await Sandbox.create("base", {
    resources: SMALL,
    timeout: 120,
    allowInternetAccess: false,
    mounts: { "/mnt/ts": vol.name },
    metadata: { run: RUN },
  });
  try {
    const info = await sbx.getInfo();
    assert.deepEqual(info.egress, { internet: false, allow: [], deny: [] });
    assert.deepEqual(info.mounts, [{ path: "/mnt/ts", volumeId: vol.volumeId, type: "rw" }]);
    assert.equal((await sbx.commands.run("echo kept > /mnt/ts/f && cat /mnt/ts/f")).stdout, "kept\n");
    assert.deepEqual((await sbx.setEgress({ deny: ["10.0.0.0/8"] })).egress, { internet: true, allow: [], deny: ["10.0.0.0/8"] });
    await assert.rejects(Volume.delete(vol.volumeId), InvalidStateError);
    assert.equal((await Volume.get(vol.volumeId)).attachments[0].sandboxId, sbx.sandboxId);
  } finally {
    await sbx.kill();
  }
  assert.equal((await Volume.get(vol.name)).version, 1);
  assert.ok((await Volume.list()).some((v) => v.volumeId === vol.volumeId));
  await Volume.delete(vol.volumeId);
  await assert.rejects(Volume.get(vol.volumeId), NotFoundError);
});

test("the security policy: secure at create, a live change, the audit", async () => {
  const secret = "sk-live-0123456789abcdef";
  const sbx = await Sandbox.create("base", {
    resources: SMALL,
    timeout: 120,
    metadata: { run: RUN },
    envVars: { OPENAI_API_KEY: secret },
    securityPolicy: {
      pii: { detectors: { card: "block" } },
      envMasking: { secrets: [{ name: "OPENAI_API_KEY", hosts: ["api.openai.com"] }] },
    },
  });
  try {
    const sp = (await sbx.getInfo()).securityPolicy;
    assert.deepEqual(sp.pii, { detectors: { card: "block" } });
    const placeholder = sp.envMasking.secrets[0].placeholder;
    assert.ok(placeholder.length >= 16 && !JSON.stringify(sp).includes(secret));
    // The guest only ever sees the placeholder.
    assert.equal((await sbx.commands.run("echo $OPENAI_API_KEY")).stdout, `${placeholder}\n`);
    // A live change; the placeholder stays.
    const updated = await sbx.setSecurityPolicy({ ...sp, pii: { detectors: { card: "log" } } });
    assert.deepEqual(updated.securityPolicy.pii, { detectors: { card: "log" } });
    assert.equal(updated.securityPolicy.envMasking.secrets[0].placeholder, placeholder);
    // A secret not given at create cannot be added live.
    await assert.rejects(
      sbx.setSecurityPolicy({ envMasking: { secrets: [{ name: "NEW_TOKEN", hosts: ["api.example.com"] }] } }),
      (e) => e.status === 400,
    );
    const page = await sbx.getAudit({ after: 0, limit: 10 });
    assert.ok(Array.isArray(page.records) && typeof page.more === "boolean");
    const all = [];
    for await (const r of sbx.audit()) all.push(r);
    assert.deepEqual(all.map((r) => r.id), page.records.map((r) => r.id));
  } finally {
    await sbx.kill();
  }
  // secure: true alone: interception with the audit only; without it, no policy.
  const plain = await Sandbox.create("base", { resources: SMALL, timeout: 60, secure: true, metadata: { run: RUN } });
  try {
    assert.deepEqual((await plain.getInfo()).securityPolicy.audit, { enabled: true });
    assert.deepEqual(await plain.getAudit(), { records: [], next: 0, more: false });
  } finally {
    await plain.kill();
  }
});

test("runOnce creates, runs and cleans up", async () => {
  const r = await Sandbox.runOnce("echo once; exit 2", { resources: SMALL, metadata: { run: `${RUN}-once` } });
  assert.equal(r.stdout, "once\n");
  assert.equal(r.exitCode, 2);
  assert.deepEqual((await Sandbox.list({ query: { metadata: { run: `${RUN}-once` } } })).sandboxes, []);
});
