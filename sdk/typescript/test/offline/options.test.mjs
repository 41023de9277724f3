// The seeds' names, checked without a stack: how each create option becomes REST, the
// conflicts that are refused before anything is sent, and the other local checks.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  InvalidRequestError,
  Sandbox,
  SandboxError,
  createBody,
  networkEgress,
  redactPreviewToken,
  redactPreviewUrl,
  resourcesBody,
  signalNumber,
} from "nullspace";

function refused(fn) {
  let err;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof InvalidRequestError, `expected an InvalidRequestError, got ${err}`);
  assert.equal(err.code, "invalid_request");
  assert.equal(err.status, 0);
  return err.message;
}

test("seed 003's example options become the REST create body", () => {
  assert.deepEqual(
    createBody("base", { timeout: 1800, waitReady: true, envVars: { FOO: "bar" }, metadata: { purpose: "demo" } }),
    { templateID: "base", timeout: 1800, envVars: { FOO: "bar" }, metadata: { purpose: "demo" } },
  );
  assert.deepEqual(createBody(undefined, {}), { templateID: "base" });
  assert.deepEqual(createBody(undefined, { template: "minimal", waitReady: false }), {
    templateID: "minimal",
    waitReady: false,
  });
  // envs (seed 001's name) is envVars; both disagreeing is refused.
  assert.deepEqual(createBody("base", { envs: { A: "1" } }).envVars, { A: "1" });
  assert.match(refused(() => createBody("base", { envs: { A: "1" }, envVars: { A: "2" } })), /send one of them/);
  assert.equal(createBody("base", { autoPause: true }).autoPause, true);
});

test("network names become the egress policy", () => {
  assert.deepEqual(createBody("base", { allowInternetAccess: false }).egress, { internet: false, allow: [], deny: [] });
  assert.equal(createBody("base", { allowInternetAccess: true }).egress, undefined);
  // network overrides allowInternetAccess (seed 001).
  assert.deepEqual(createBody("base", { allowInternetAccess: false, network: { denyOut: ["203.0.113.9"] } }).egress, {
    internet: true,
    allow: [],
    deny: ["203.0.113.9"],
  });
  assert.deepEqual(
    networkEgress({ allowOut: ["198.51.100.0/24", "api.example.com"], denyOut: ["0.0.0.0/0", "::/0"] }),
    { internet: false, allow: ["198.51.100.0/24", "api.example.com"], deny: [] },
  );
  // Here deny wins: an allow inside a deny is refused, not silently blocked.
  assert.match(refused(() => networkEgress({ allowOut: ["10.1.2.3"], denyOut: ["10.0.0.0/8"] })), /10\.1\.2\.3/);
  assert.match(refused(() => networkEgress({ allowOut: ["10.1.0.0/16"], denyOut: ["10.0.0.0/8"] })), /narrow/);
  assert.match(refused(() => networkEgress({ allowOut: ["2001:db8::1"], denyOut: ["2001:db8::/32"] })), /2001:db8::1/);
  assert.match(refused(() => networkEgress({ allowOut: ["a.example.com"], denyOut: ["*.example.com"] })), /\*\.example\.com/);
  assert.deepEqual(networkEgress({ allowOut: ["example.com"], denyOut: ["*.example.com"] }).allow, ["example.com"]);
  assert.deepEqual(networkEgress({ allowOut: ["11.0.0.1"], denyOut: ["10.0.0.0/8"] }).deny, ["10.0.0.0/8"]);
  assert.match(refused(() => networkEgress({ allow: ["1.2.3.4"] })), /allowOut/);
  assert.match(refused(() => networkEgress({ allowOut: "1.2.3.4" })), /array of strings/);
  assert.match(refused(() => createBody("base", { network: { denyOut: [] }, egress: { internet: false } })), /send one/);
  assert.match(refused(() => createBody("base", { allowInternetAccess: false, egress: { internet: false } })), /send one/);
  assert.deepEqual(createBody("base", { egress: { internet: false, allow: ["pypi.org"] } }).egress, {
    internet: false,
    allow: ["pypi.org"],
    deny: [],
  });
});

test("lifecycle, security, warm pool, start sources and resources", () => {
  assert.deepEqual(createBody("base", { onTimeout: "pause", autoResume: true }).lifecycle, {
    onTimeout: "pause",
    autoResume: true,
  });
  assert.deepEqual(createBody("base", { lifecycle: { onTimeout: "hibernate" } }).lifecycle, { onTimeout: "hibernate" });
  assert.deepEqual(createBody("base", { lifecycle: { onTimeout: "pause" }, onTimeout: "pause" }).lifecycle, {
    onTimeout: "pause",
  });
  assert.deepEqual(createBody("base", { lifecycle: { onTimeout: "pause" }, idleTimeout: 30 }).lifecycle, {
    onTimeout: "pause",
    idleTimeout: 30,
  });
  assert.match(refused(() => createBody("base", { lifecycle: { onTimeout: "kill" }, onTimeout: "pause" })), /disagree/);
  assert.match(refused(() => createBody("base", { onTimeout: "sleep" })), /"kill", "pause" or "hibernate"/);
  assert.match(refused(() => createBody("base", { lifecycle: { onTimeout: "pause", idle: 3 } })), /unknown keys/);
  assert.equal(createBody("base", { warmPoolMode: "require" }).warmPool, "require");
  assert.match(refused(() => createBody("base", { warmPool: "prefer", warmPoolMode: "require" })), /disagree/);
  assert.match(refused(() => createBody("base", { warmPoolMode: "always" })), /"require" or "prefer"/);
  assert.equal(createBody("base", { secure: false }).securityPolicy, undefined);
  assert.deepEqual(createBody("base", { secure: true }).securityPolicy, {});
  assert.deepEqual(createBody("base", { securityPolicy: { audit: true } }).securityPolicy, { audit: { enabled: true } });
  assert.match(refused(() => createBody("base", { secure: false, securityPolicy: { audit: true } })), /send one/);
  assert.deepEqual(createBody(undefined, { imageName: "web", imageId: "tpl-1" }), { imageName: "web", imageId: "tpl-1" });
  assert.deepEqual(createBody(undefined, { snapshotName: "s", snapshotId: "snap-1" }), {
    snapshotName: "s",
    snapshotId: "snap-1",
  });
  assert.equal(createBody("base", { region: "eu", recording: true }).region, "eu");
  assert.match(refused(() => createBody("base", { imageName: "web" })), /start source/);
  assert.match(refused(() => createBody(undefined, { imageId: "tpl-1" })), /imageName/);
  assert.match(refused(() => createBody("base", { template: "minimal" })), /disagree/);
  assert.deepEqual(createBody("base", { resources: { cpu: 1, memoryMb: 512, diskMb: 1024 } }).resources, {
    vcpus: 1,
    memMiB: 512,
    diskSizeMiB: 1024,
  });
  assert.deepEqual(resourcesBody({ vcpus: 4 }), { vcpus: 4, memMiB: 2048, diskSizeMiB: 8192 });
  assert.match(refused(() => resourcesBody({ memory: 512 })), /memory.*send vcpus/);
  assert.deepEqual(createBody("base", { mounts: { "/mnt/a": "vol", "/mnt/b": { id: "v2", type: "ro" } } }).mounts, {
    "/mnt/a": { id: "vol", type: "rw" },
    "/mnt/b": { id: "v2", type: "ro" },
  });
});

test("unknown and stale option names are refused, saying what to send", () => {
  assert.match(refused(() => createBody("base", { timeoutMs: 60000 })), /send timeout \(seconds\)/);
  assert.match(refused(() => createBody("base", { allow_internet_access: false })), /send allowInternetAccess/);
  assert.match(refused(() => createBody("base", { colour: "blue" })), /no option colour; it takes template, timeout/);
  assert.match(refused(() => createBody("base", { metadata: { n: 1 } })), /metadata must be an object of strings/);
});

test("calls refuse bad arguments before sending anything", async () => {
  // No API is listening on port 9: each call must fail before it tries.
  const none = { apiKey: "ns_test", domain: "127.0.0.1:9" };
  const reject = async (p, pattern) => {
    await assert.rejects(p, (e) => e instanceof InvalidRequestError && e.status === 0 && pattern.test(e.message));
  };
  await reject(Sandbox.create("base", { ...none, resources: { ram: 1 } }), /ram/);
  await reject(Sandbox.list({ ...none, fields: [] }), /fields must be a non-empty array/);
  await reject(Sandbox.list({ ...none, fields: "id" }), /fields must be/);
  await reject(Sandbox.list({ ...none, query: { states: ["running"] } }), /no option states/);
  await reject(Sandbox.getInfoById("sbx-x", { ...none, fields: [""] }), /fields/);
  await reject(Sandbox.connect("sbx-x", { ...none, timeoutMs: 1 }), /send timeout/);
  // A port nobody listens on: a ConnectionError with code unreachable.
  await assert.rejects(Sandbox.list(none), (e) => e instanceof SandboxError && e.code === "unreachable");
});

test("redaction, signals", () => {
  const url = "http://8000-sbx-1.localhost:1234/x?a=1&ns_preview_token=secret.token&b=2";
  assert.equal(redactPreviewUrl(url), "http://8000-sbx-1.localhost:1234/x?a=1&ns_preview_token=REDACTED&b=2");
  assert.equal(redactPreviewUrl("http://h/"), "http://h/");
  assert.equal(redactPreviewToken("abcdefghijkl"), "abcdef…REDACTED");
  assert.equal(signalNumber("SIGTERM"), 15);
  assert.equal(signalNumber("kill"), 9);
  assert.equal(signalNumber(2), 2);
  assert.match(refused(() => signalNumber("SIGNOPE")), /SIGTERM/);
});
