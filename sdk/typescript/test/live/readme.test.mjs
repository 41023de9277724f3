// Every `ts` example of sdk/typescript/README.md compiles under `tsc --strict` against
// the built package and runs as written against the live stack; the block written for
// the top-level README's "Clients" section runs as pasted (from a copy of the package),
// and the top-level README carries it verbatim.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

const PKG = fileURLToPath(new URL("../..", import.meta.url));
const README = readFileSync(join(PKG, "README.md"), "utf8");
const EXAMPLES = [...README.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
const TOP = /<!-- top-readme-block -->\n([\s\S]*?)<!-- \/top-readme-block -->/.exec(README)?.[1];

function run(cmd, args, opts) {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 << 20, killSignal: "SIGKILL", ...opts }, (err, stdout, stderr) =>
      resolve({ code: err ? (err.code ?? err.signal ?? 1) : 0, stdout, stderr }),
    );
  });
}

let dir;
before(async () => {
  dir = mkdtempSync(join(tmpdir(), "ns-ts-readme-"));
  // A consumer project: the package and the Node types, as an npm install would give them.
  mkdirSync(join(dir, "node_modules", "@types"), { recursive: true });
  symlinkSync(PKG, join(dir, "node_modules", "nullspace"), "dir");
  symlinkSync(join(PKG, "node_modules", "@types", "node"), join(dir, "node_modules", "@types", "node"), "dir");
  EXAMPLES.forEach((code, i) => writeFileSync(join(dir, `example${i + 1}.mts`), code));
});
after(() => rmSync(dir, { recursive: true, force: true }));

test("the README has its examples", () => {
  assert.ok(EXAMPLES.length >= 8, `${EXAMPLES.length} ts examples`);
  assert.ok(TOP, "the top-level README block (between its markers) is missing");
});

test("every example compiles with tsc --strict against the package's declarations", async () => {
  const tsc = join(PKG, "node_modules", "typescript", "bin", "tsc");
  const files = EXAMPLES.map((_, i) => `example${i + 1}.mts`);
  const r = await run(
    process.execPath,
    [tsc, "--module", "nodenext", "--target", "es2022", "--strict", "--skipLibCheck", "--types", "node", "--outDir", "out", ...files],
    { cwd: dir, timeout: 120_000 },
  );
  assert.equal(r.code, 0, r.stdout + r.stderr);
});

for (let i = 0; i < EXAMPLES.length; i++) {
  test(`README example ${i + 1} runs as written`, async () => {
    const r = await run(process.execPath, [join(dir, "out", `example${i + 1}.mjs`)], { cwd: dir, timeout: 240_000 });
    assert.equal(r.code, 0, `example ${i + 1} failed:\n${r.stdout}\n${r.stderr}`);
  });
}

test("the top-level README's TypeScript block runs as pasted", async () => {
  // Run from a copy of the package laid out as in the repository, so its npm ci does
  // not touch the node_modules this suite runs from.
  const repo = join(dir, "repo");
  const copy = join(repo, "sdk", "typescript");
  mkdirSync(copy, { recursive: true });
  for (const f of ["package.json", "package-lock.json", "README.md", "tsconfig.json", "tsconfig.esm.json", "tsconfig.cjs.json", "src", "scripts"]) {
    cpSync(join(PKG, f), join(copy, f), { recursive: true });
  }
  // What the block leaves in /tmp goes again afterwards, unless it was there before.
  const leftovers = ["/tmp/ns-ts", "/tmp/nullspace-0.1.0.tgz"].filter((p) => !existsSync(p));
  const r = await run("bash", ["-euo", "pipefail", "-c", TOP.replace(/^```sh\n|```\n?$/g, "")], { cwd: repo, timeout: 300_000 });
  for (const p of leftovers) rmSync(p, { recursive: true, force: true });
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^42$/m);
  assert.match(r.stdout, /^0 hi \[.*'hello\.txt'.*\]$/m);
  assert.match(r.stdout, /^1 sandbox\.created$/m);
  assert.match(r.stdout, /^Linux /m);
});

test("the top-level README carries that block verbatim", () => {
  const top = readFileSync(join(PKG, "..", "..", "README.md"), "utf8");
  assert.ok(top.includes(TOP), "README.md's Clients section lacks the TypeScript block of sdk/typescript/README.md (From the repository's README): paste it there");
});
