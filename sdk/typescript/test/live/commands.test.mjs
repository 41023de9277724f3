// Commands and terminals against the live stack: output streamed while the command
// runs, exit codes, environment, argv, background handles, stdin, signals, deadlines,
// and a terminal with a resize.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { CommandHandle, Sandbox, SandboxTimeoutError } from "nullspace";

import { RUN, SMALL, within } from "./lib.mjs";

let sbx;
before(async () => {
  sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN }, envVars: { GREETING: "hello" } });
});
after(async () => {
  await sbx?.kill();
});

test("foreground output streams to the callbacks while the command runs", async () => {
  const chunks = [];
  const errs = [];
  const t0 = Date.now();
  const r = await sbx.commands.run("echo one; sleep 3; echo two; echo warn >&2; exit 3", {
    onStdout: (d) => chunks.push([d, Date.now() - t0]),
    onStderr: (d) => errs.push(d),
    timeoutMs: 60_000,
  });
  const ended = Date.now() - t0;
  assert.equal(r.stdout, "one\ntwo\n");
  assert.equal(r.stderr, "warn\n");
  assert.equal(r.exitCode, 3);
  assert.equal(r.signal, null);
  assert.ok(r.pid > 0);
  assert.equal(chunks.map(([d]) => d).join(""), r.stdout);
  assert.equal(errs.join(""), "warn\n");
  // "one" arrived before the command slept 3 s, not with the result.
  assert.equal(chunks[0][0], "one\n");
  assert.ok(ended - chunks[0][1] >= 1500, `the first chunk came ${ended - chunks[0][1]} ms before the end`);
});

test("environment, working directory, user, argv, non-UTF-8 output", async () => {
  const r = await sbx.commands.run('echo "$GREETING $EXTRA $(pwd) $(whoami)"', { envs: { EXTRA: "ts" }, cwd: "/tmp" });
  assert.equal(r.stdout, "hello ts /tmp user\n");
  assert.equal((await sbx.commands.run("whoami", { user: "root" })).stdout, "root\n");
  assert.equal((await sbx.commands.run(["printf", "%s-%s", "a b", "$HOME"])).stdout, "a b-$HOME");
  assert.equal((await sbx.commands.run("printf 'x\\377y'")).stdout, "x\uFFFDy");
});

test("background commands: handles, list, re-attach, kill, signals", async () => {
  const handle = await sbx.commands.run("echo later; sleep 0.5; echo done", { background: true });
  assert.ok(handle instanceof CommandHandle && handle.pid > 0);
  assert.ok((await sbx.commands.list()).some((p) => p.pid === handle.pid));
  const again = await sbx.commands.connect(handle.pid).wait({ timeoutMs: 30_000 });
  assert.equal(again.stdout, "later\ndone\n");
  assert.equal(again.exitCode, 0);

  const sleeper = await sbx.commands.run("sleep 300", { background: true });
  assert.equal(await sleeper.signal("SIGTERM"), true);
  assert.equal((await sleeper.wait({ timeoutMs: 30_000 })).signal, 15);
  const other = await sbx.commands.run("sleep 300", { background: true });
  assert.equal(await other.kill(), true);
  assert.equal((await other.wait({ timeoutMs: 30_000 })).signal, 9);
  assert.equal(await sbx.commands.kill(999_999), false);
});

test("stdin: written while someone waits, then closed", async () => {
  const handle = await sbx.commands.run("tr a-z A-Z", { background: true, stdin: true });
  const result = handle.wait({ timeoutMs: 30_000 });
  await handle.sendStdin("hello ");
  await handle.sendStdin(new TextEncoder().encode("world"), { eof: true });
  const r = await result;
  assert.equal(r.stdout, "HELLO WORLD");
  assert.equal(r.exitCode, 0);
  // Nobody waiting: the API says why.
  const lonely = await sbx.commands.run("cat", { background: true, stdin: true });
  await assert.rejects(lonely.sendStdin("x"), (e) => e.code === "invalid_state" && e.status === 409);
  await lonely.kill();
});

test("a command past its timeoutMs is a SandboxTimeoutError naming its pid", async () => {
  const t0 = Date.now();
  await assert.rejects(sbx.commands.run("sleep 60", { timeoutMs: 1500 }), (e) => {
    assert.ok(e instanceof SandboxTimeoutError, String(e));
    assert.equal(e.code, "timeout");
    assert.ok(e.details.pid > 0);
    return true;
  });
  assert.ok(Date.now() - t0 < 15_000);
  const ctl = new AbortController();
  const p = sbx.commands.run("sleep 60", { signal: ctl.signal });
  setTimeout(() => ctl.abort(), 500);
  await assert.rejects(within(15_000, "an aborted wait", p), (e) => e.name === "AbortError");
});

test("a terminal: keystrokes, output, resize, exit code", async () => {
  const term = await sbx.pty.create({ cols: 80, rows: 24 });
  let out = "";
  const decoder = new TextDecoder();
  const untilSeen = async (want) => {
    while (!out.includes(want)) {
      const chunk = await term.recv({ timeoutMs: 20_000 });
      assert.ok(chunk !== null, `the terminal ended before "${want}": ${out}`);
      out += decoder.decode(chunk);
    }
  };
  try {
    await term.send("stty size; echo ts-$((6*7))\n");
    await untilSeen("ts-42");
    await untilSeen("24 80");
    await term.resize(100, 30);
    await term.send("stty size\n");
    await untilSeen("30 100");
    await term.send("exit 4\n");
    assert.equal(await term.wait({ timeoutMs: 20_000 }), 4);
    assert.equal(term.exitCode, 4);
    assert.equal(await term.recv(), null);
  } finally {
    await term.close();
  }
});
