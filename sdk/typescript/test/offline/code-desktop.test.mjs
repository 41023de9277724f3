// The code interpreter (runCode, code contexts) and the desktop against the fake API
// (no stack): the helper's JSON lines split anywhere across output chunks become one
// Execution; the commands the SDK runs for them, quoted; large code through a file;
// the errors of a sandbox without the helper or the desktop; the viewer's URL.
import assert from "node:assert/strict";
import { after, before, beforeEach, test } from "node:test";
import { inspect } from "node:util";

import { Execution, ExecutionError, InvalidRequestError, Result, Sandbox, SandboxError } from "nullspace";

import { KEY, TOKEN, startFake } from "./fake.mjs";

const HELPER = "/usr/local/bin/nullspace-code";
const PNG_BYTES = Buffer.from("\x89PNG\r\n\x1a\nfake", "latin1");
const PNG = PNG_BYTES.toString("base64");

let fake;
let sbx;
before(async () => {
  fake = await startFake();
  sbx = await Sandbox.create("code-interpreter", { apiKey: KEY, domain: fake.base });
});
after(() => fake.close());
beforeEach(() => {
  fake.state.onCommand = null;
  fake.state.requests.length = 0;
});

/** The helper's stdout for `events`, cut into chunks of `size` characters. */
function chunked(events, size = 7) {
  const s = events.map((e) => JSON.stringify(e) + "\n").join("");
  const out = [];
  for (let i = 0; i < s.length; i += size) out.push(s.slice(i, i + size));
  return out;
}

/** Answers every command with `answer(body)` and remembers the bodies. */
function script(answer) {
  const seen = [];
  fake.state.onCommand = (body) => {
    seen.push(body);
    return answer(body);
  };
  return seen;
}

const EVENTS = [
  { type: "stdout", text: "hello\n" },
  { type: "stderr", text: "warn\n" },
  { type: "result", isMainResult: false, data: { "text/plain": "<Figure>", "image/png": `${PNG.slice(0, 8)}\n${PNG.slice(8)}\n` } },
  { type: "result", isMainResult: true, data: { "text/plain": ["4", "2"], "text/html": "<b>42</b>", "application/json": ["a", "b"] } },
  { type: "error", name: "ValueError", value: "bad", traceback: ["line 1", "bad"] },
  { type: "done", executionCount: 3 },
];

test("runCode: events split across chunks make one Execution, with callbacks", async () => {
  const seen = script(() => ({ stdout: chunked(EVENTS) }));
  const got = { stdout: [], stderr: [], result: [], error: [] };
  const ex = await sbx.runCode("print('hello')\n6 * 7", {
    envs: { A: "1" },
    onStdout: (t) => got.stdout.push(t),
    onStderr: (t) => got.stderr.push(t),
    onResult: (r) => got.result.push(r),
    onError: (e) => got.error.push(e),
  });
  assert.ok(ex instanceof Execution);
  // The command: the default context, python, 60 s, the code as base64.
  assert.equal(seen.length, 1);
  const m = /^\/usr\/local\/bin\/nullspace-code run --context default --language python --timeout 60 --code-b64 (\S+)$/.exec(seen[0].cmd);
  assert.ok(m, seen[0].cmd);
  assert.equal(Buffer.from(m[1], "base64").toString(), "print('hello')\n6 * 7");
  assert.deepEqual(seen[0].envs, { A: "1" });
  // The execution.
  assert.deepEqual(ex.logs, { stdout: ["hello\n"], stderr: ["warn\n"] });
  assert.deepEqual(ex.results.map((r) => r.isMainResult), [false, true]);
  const [fig, main] = ex.results;
  assert.ok(fig instanceof Result);
  assert.equal(fig.png, PNG);
  assert.deepEqual(Buffer.from(fig.pngBytes()), PNG_BYTES);
  assert.ok(fig.pngBytes() instanceof Uint8Array);
  assert.deepEqual(fig.formats(), ["text", "png"]);
  assert.equal(main.text, "42");
  assert.equal(main.html, "<b>42</b>");
  assert.deepEqual(main.json, ["a", "b"]);
  assert.equal(main.pngBytes(), undefined);
  assert.deepEqual(main.formats(), ["text", "html", "json"]);
  assert.equal(main.raw["text/html"], "<b>42</b>");
  assert.equal(String(main), "42");
  assert.equal(ex.text, "42");
  assert.ok(ex.error instanceof ExecutionError);
  assert.deepEqual([ex.error.name, ex.error.value, ex.error.traceback], ["ValueError", "bad", ["line 1", "bad"]]);
  assert.equal(String(ex.error), "ValueError: bad");
  assert.equal(ex.executionCount, 3);
  assert.equal(ex.timedOut, false);
  // The callbacks, as the events arrived.
  assert.deepEqual(got.stdout, ["hello\n"]);
  assert.deepEqual(got.stderr, ["warn\n"]);
  assert.equal(got.result.length, 2);
  assert.equal(got.result[1], main);
  assert.equal(got.error[0], ex.error);
});

test("runCode: a line split one character at a time, and a last line without its newline", async () => {
  const s = chunked([{ type: "stdout", text: "a" }, { type: "result", isMainResult: true, data: { "text/plain": "1" } }], 1);
  script(() => ({ stdout: [...s, JSON.stringify({ type: "done", executionCount: 1 })] }));
  const ex = await sbx.runCode("1");
  assert.equal(ex.text, "1");
  assert.deepEqual(ex.logs.stdout, ["a"]);
  assert.equal(ex.executionCount, 1);
});

test("runCode: a timeout interrupts the kernel and says so", async () => {
  const seen = script(() => ({
    stdout: chunked([
      { type: "timeout", seconds: 2.5 },
      { type: "error", name: "KeyboardInterrupt", value: "", traceback: [] },
      { type: "done", executionCount: 4 },
    ]),
    exitCode: 124,
  }));
  const ex = await sbx.runCode("import time; time.sleep(99)", { timeoutMs: 2500 });
  assert.match(seen[0].cmd, / --timeout 2\.5 --code-b64 /);
  assert.equal(ex.timedOut, true);
  assert.equal(ex.error.name, "KeyboardInterrupt");
  assert.equal(ex.text, undefined);
  assert.equal(ex.executionCount, 4);
});

test("runCode: no done event is a code_interpreter error with the exit code and stderr", async () => {
  script(() => ({ stderr: ["sh: 1: /usr/local/bin/nullspace-code: not found\n"], exitCode: 127 }));
  await assert.rejects(sbx.runCode("1"), (e) => {
    assert.ok(e instanceof SandboxError);
    assert.equal(e.code, "code_interpreter");
    assert.match(e.message, /ended without a result \(exit code 127\)/);
    assert.match(e.message, /is this a code-interpreter sandbox\?/);
    assert.match(e.message, /nullspace-code: not found$/);
    return true;
  });
  // Events, but the process died before its done.
  script(() => ({ stdout: chunked([{ type: "stdout", text: "x" }]), stderr: ["Killed"], exitCode: 137 }));
  await assert.rejects(sbx.runCode("1"), (e) => e.code === "code_interpreter" && /exit code 137/.test(e.message));
  // A line that is not JSON (not the helper answering).
  script(() => ({ stdout: ["hello there\n"], exitCode: 0 }));
  await assert.rejects(sbx.runCode("1"), (e) => e.code === "code_interpreter" && /not JSON/.test(e.message));
});

test("runCode: bash, contexts by object or id, quoted", async () => {
  const done = { stdout: chunked([{ type: "stdout", text: "42\n" }, { type: "done", executionCount: null }]) };
  const seen = script(() => done);
  const ex = await sbx.runCode("echo $((6 * 7))", { language: "bash" });
  assert.deepEqual(ex.logs.stdout, ["42\n"]);
  assert.equal(ex.executionCount, null);
  assert.match(seen[0].cmd, /^\S+ run --context default --language bash --timeout 60 --code-b64 \S+$/);
  // A context's language is its runs' default; an explicit language wins.
  await sbx.runCode("ls", { context: { id: "c1", language: "bash", cwd: "/workspace" } });
  assert.match(seen[1].cmd, / run --context c1 --language bash /);
  await sbx.runCode("1", { context: { id: "c1", language: "bash", cwd: "/" }, language: "python" });
  assert.match(seen[2].cmd, / run --context c1 --language python /);
  // An id with shell characters goes as one quoted word.
  await sbx.runCode("1", { context: "it's; rm -rf /" });
  assert.ok(seen[3].cmd.includes(` run --context 'it'"'"'s; rm -rf /' --language python `), seen[3].cmd);
});

test("runCode: code past 96 KiB of base64 goes through a file in /tmp, removed after", async () => {
  const code = `x = "${"é".repeat(40_000)}"\nlen(x)`;
  let file;
  const seen = script((body) => {
    const m = / --code-file (\/tmp\/nullspace-code-[0-9a-f]{32})$/.exec(body.cmd);
    assert.ok(m, body.cmd.slice(0, 200));
    file = fake.state.files.get(m[1]);
    return { stdout: chunked([{ type: "result", isMainResult: true, data: { "text/plain": "40000" } }, { type: "done", executionCount: 5 }], 5) };
  });
  const ex = await sbx.runCode(code);
  assert.equal(ex.text, "40000");
  assert.equal(seen.length, 1);
  assert.ok(!seen[0].cmd.includes("--code-b64"));
  assert.equal(file.toString("utf8"), code);
  assert.equal(fake.state.files.size, 0, "the code file was not removed");
  assert.ok(fake.state.requests.some((r) => r.method === "DELETE" && r.path.endsWith("/files")));
  // Just under the limit: inline.
  const small = "x".repeat(72_000); // base64: 96000 characters
  script(() => ({ stdout: chunked([{ type: "done", executionCount: 6 }]) }));
  fake.state.requests.length = 0;
  await sbx.runCode(small);
  assert.ok(!fake.state.requests.some((r) => r.path.endsWith("/files")));
});

test("runCode: bad arguments are refused before anything is sent", async () => {
  const seen = script(() => ({ stdout: [] }));
  await assert.rejects(sbx.runCode("1", { language: "r" }), (e) => {
    assert.ok(e instanceof InvalidRequestError);
    assert.match(e.message, /language "r" is not supported; send 'python' or 'bash'/);
    return true;
  });
  await assert.rejects(sbx.runCode("1", { context: { language: "python" } }), InvalidRequestError);
  await assert.rejects(sbx.runCode("1", { context: 7 }), /context must be a CodeContext/);
  await assert.rejects(sbx.runCode("1", { timeoutMs: 0 }), /timeoutMs must be a positive number/);
  await assert.rejects(sbx.runCode("1", { timeoutMs: NaN }), /timeoutMs must be a positive number/);
  await assert.rejects(sbx.runCode("1", { timeout: 5 }), /runCode has no option timeout/);
  await assert.rejects(sbx.runCode(42), /code must be a string/);
  await assert.rejects(sbx.createCodeContext({ language: "ruby" }), /send 'python' or 'bash'/);
  await assert.rejects(sbx.removeCodeContext(undefined), InvalidRequestError);
  assert.equal(seen.length, 0);
});

test("code contexts: create (with a quoted cwd) and remove", async () => {
  const seen = script((body) =>
    body.cmd.includes("create-context")
      ? { stdout: [JSON.stringify({ type: "context", id: "ab12", language: "python", cwd: "/my dir" }) + "\n"] }
      : { stdout: [JSON.stringify({ type: "removed", id: "ab12" }) + "\n"] },
  );
  const ctx = await sbx.createCodeContext({ cwd: "/my dir" });
  assert.deepEqual(ctx, { id: "ab12", language: "python", cwd: "/my dir" });
  assert.equal(seen[0].cmd, `${HELPER} create-context --language python --cwd '/my dir'`);
  await sbx.createCodeContext({ language: "bash" });
  assert.equal(seen[1].cmd, `${HELPER} create-context --language bash`);
  await sbx.removeCodeContext(ctx);
  assert.equal(seen[2].cmd, `${HELPER} remove-context ab12`);
  await sbx.removeCodeContext("x y");
  assert.equal(seen[3].cmd, `${HELPER} remove-context 'x y'`);
  // No answer: the helper is missing.
  script(() => ({ stderr: ["sh: nullspace-code: not found"], exitCode: 127 }));
  await assert.rejects(sbx.createCodeContext(), (e) => e.code === "code_interpreter" && /exit code 127/.test(e.message));
});

test("Result parses a MIME bundle as the Python SDK does", () => {
  const r = new Result({ "image/jpeg": ["/9j/", "4AAQ\n"], "image/svg+xml": ["<svg>", "</svg>"], "x/custom": 1 });
  assert.equal(r.jpeg, "/9j/4AAQ");
  assert.equal(r.svg, "<svg></svg>");
  assert.deepEqual(r.formats(), ["svg", "jpeg"]);
  assert.equal(r.isMainResult, false);
  assert.equal(r.raw["x/custom"], 1);
  assert.equal(String(r), "");
  assert.deepEqual(new Result().formats(), []);
});

test("desktop: the commands it runs, on display :0, and the windows it lists", async () => {
  const wm =
    "0x00e00003  0 321    10 20  640 480  sbx xterm: user@sbx\n" +
    "0x01200007 -1 0      0  0   1280 30  sbx \n" +
    "garbage line\n";
  const seen = script((body) => ({ stdout: body.cmd.startsWith("wmctrl") ? [wm] : [] }));
  const d = sbx.desktop;
  await d.moveMouse(10, 20);
  await d.leftClick();
  await d.leftClick(10, 20);
  await d.rightClick(5, 6);
  await d.doubleClick(1, 2);
  await d.scroll(3);
  await d.scroll(-2);
  await d.scroll();
  await d.typeText("it's");
  await d.press("ctrl+l", "Return");
  await d.open("https://example.com/?a=1&b=2");
  await d.open("/workspace/report.pdf");
  const wins = await d.windows();
  assert.deepEqual(
    seen.map((b) => b.cmd),
    [
      "xdotool mousemove --sync 10 20",
      "xdotool click --repeat 1 --delay 80 1",
      "xdotool mousemove --sync 10 20 && xdotool click --repeat 1 --delay 80 1",
      "xdotool mousemove --sync 5 6 && xdotool click --repeat 1 --delay 80 3",
      "xdotool mousemove --sync 1 2 && xdotool click --repeat 2 --delay 80 1",
      "xdotool click --repeat 3 --delay 30 5",
      "xdotool click --repeat 2 --delay 30 4",
      "xdotool click --repeat 1 --delay 30 5",
      `xdotool type --delay 15 -- 'it'"'"'s'`,
      "xdotool key -- ctrl+l Return",
      "setsid -f x-www-browser 'https://example.com/?a=1&b=2' >/dev/null 2>&1 </dev/null",
      "setsid -f xdg-open /workspace/report.pdf >/dev/null 2>&1 </dev/null",
      "wmctrl -l -p -G",
    ],
  );
  for (const b of seen) assert.deepEqual(b.envs, { DISPLAY: ":0" });
  assert.deepEqual(wins, [
    { id: "0x00e00003", desktop: 0, pid: 321, x: 10, y: 20, width: 640, height: 480, title: "xterm: user@sbx" },
    { id: "0x01200007", desktop: -1, pid: 0, x: 0, y: 0, width: 1280, height: 30, title: "" },
  ]);
});

test("desktop: bad arguments are refused, a failing tool is a desktop error", async () => {
  const seen = script(() => ({ stderr: ["Error: Can't open display: :0\n"], exitCode: 1 }));
  const d = sbx.desktop;
  await assert.rejects(d.moveMouse(1.5, 2), (e) => e instanceof InvalidRequestError && /x must be an integer; got 1\.5/.test(e.message));
  await assert.rejects(d.moveMouse(NaN, 2), /x must be an integer; got NaN/);
  await assert.rejects(d.moveMouse(1, "2"), /y must be an integer; got "2"/);
  await assert.rejects(d.leftClick(3), /both x and y, or neither/);
  await assert.rejects(d.scroll(Infinity), /amount must be an integer/);
  await assert.rejects(d.press(), /at least one key/);
  await assert.rejects(d.typeText(5), /text must be a string/);
  await assert.rejects(d.open(""), /URL or a file path/);
  assert.equal(seen.length, 0);
  await assert.rejects(d.leftClick(1, 2), (e) => {
    assert.ok(e instanceof SandboxError);
    assert.equal(e.code, "desktop");
    assert.match(e.message, /^desktop: the click failed \(exit code 1\): Error: Can't open display: :0; is this a desktop sandbox\?$/);
    return true;
  });
  await assert.rejects(d.screenshot(), (e) => e.code === "desktop" && /the screenshot failed/.test(e.message));
});

test("desktop: a screenshot is the PNG scrot wrote, removed after", async () => {
  const seen = script((body) => {
    const m = /^scrot -o -z (\/tmp\/nullspace-screenshot-[0-9a-f]{32}\.png)$/.exec(body.cmd);
    assert.ok(m, body.cmd);
    fake.state.files.set(m[1], PNG_BYTES);
    return { stdout: [] };
  });
  const png = await sbx.desktop.screenshot();
  assert.ok(png instanceof Uint8Array);
  assert.deepEqual(Buffer.from(png), PNG_BYTES);
  assert.equal(seen.length, 1);
  assert.equal(fake.state.files.size, 0, "the screenshot was not removed");
});

test("desktop: viewerUrl is noVNC's page of the signed preview URL", async () => {
  const url = await sbx.desktop.viewerUrl();
  const u = new URL(url);
  assert.equal(u.origin, "http://6080-sbx-0123456789abcdef0123.localhost:7072");
  assert.equal(u.pathname, "/vnc.html");
  assert.deepEqual(Object.fromEntries(u.searchParams), {
    ns_preview_token: "tok-6080",
    autoconnect: "1",
    resize: "scale",
    reconnect: "1",
    path: "websockify",
  });
  const viewOnly = new URL(await sbx.desktop.viewerUrl({ viewOnly: true }));
  assert.ok(viewOnly.host.startsWith("6081-"));
  assert.equal(viewOnly.searchParams.get("view_only"), "1");
  assert.equal(viewOnly.searchParams.get("ns_preview_token"), "tok-6081");
  const ports = fake.state.requests.filter((r) => r.path.endsWith("/previews")).map((r) => JSON.parse(r.body).port);
  assert.deepEqual(ports, [6080, 6081]);
  await assert.rejects(sbx.desktop.viewerUrl({ viewonly: true }), /has no option viewonly/);
  // Printing the desktop shows no credential.
  assert.equal(inspect(sbx.desktop), "Desktop { sandboxId: 'sbx-0123456789abcdef0123' }");
  assert.ok(!inspect(sbx.desktop, { showHidden: true, depth: 5 }).includes(TOKEN));
});
