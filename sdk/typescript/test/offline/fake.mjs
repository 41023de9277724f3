// A fake Nullspace API on loopback for the offline tests: the public API routes of one
// sandbox (control plane, X-API-Key) and its data plane (Bearer token) and lifecycle
// WebSocket, each request remembered. Only what the offline tests need.
import { createServer } from "node:http";

import { WebSocketServer } from "ws";

export const SBX = "sbx-0123456789abcdef0123";
export const KEY = "ns_test";
export const TOKEN = "runtime-token";

export function record(i, extra = {}) {
  return {
    id: i,
    time: "2026-01-02T03:04:05.123456789Z",
    method: "POST",
    host: "api.example.com",
    path: "/v1/x?y",
    status: 403,
    bytesIn: 12,
    bytesOut: 34,
    durationMs: 3,
    detections: [{ kind: "card", where: "requestBody", action: "block" }],
    action: "blocked",
    ...extra,
  };
}

export async function startFake(opts = {}) {
  const state = {
    requests: [],
    policy: null,
    records: opts.records ?? [],
    events: opts.events ?? [1, 2, 3, 4, 5].map((id) => ({ id, at: "2026-01-01T00:00:00Z", type: `e${id}`, data: {} })),
    wsUrls: [],
    wsHeaders: [],
    dropAfter: opts.dropAfter ?? null,
    build: opts.build ?? { fail: false },
    // Lifecycle connections to drop at once (before any event), and what to do then.
    dropNext: 0,
    onDrop: null,
    // Lifecycle connections to leave half-open: accepted, then never read again.
    silentNext: 0,
    sockets: new Set(),
    sandboxState: "running",
    ptyClosed: 0,
    fileCancelled: 0,
    // A test's own commands: (body) => { stdout: [chunks], stderr: [chunks], exitCode }
    // for the command it answers, undefined for the default script below.
    onCommand: opts.onCommand ?? null,
    // Files written (PUT /files) by path, served back and removed by the data plane.
    files: new Map(),
  };
  let base = "";
  const view = (extra = {}) => ({
    sandboxID: SBX,
    templateID: "base",
    state: state.sandboxState,
    metadata: {},
    timeout: 300,
    createdAt: "2026-01-01T00:00:00Z",
    expiresAt: "2026-01-01T00:05:00Z",
    runtime: { target: { transport: "http", host: "fake", baseUrl: `${base}/v1/sandboxes/${SBX}` }, token: TOKEN, tokenExpiresAt: "" },
    ...extra,
  });
  const send = (res, status, doc, type = "application/json") => {
    const body = typeof doc === "string" ? doc : JSON.stringify(doc);
    res.writeHead(status, { "content-type": type });
    res.end(body);
  };
  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const body = Buffer.concat(chunks).toString();
    const url = new URL(req.url, "http://fake");
    state.requests.push({ method: req.method, path: url.pathname, query: url.searchParams, headers: req.headers, body });
    const p = url.pathname;
    if (p.startsWith("/v1/sandboxes/")) {
      if (req.headers.authorization !== `Bearer ${TOKEN}`) return send(res, 401, { code: "unauthorized", message: "bad token" });
      if (p.endsWith("/commands") && req.method === "POST") {
        const cmd = JSON.parse(body).cmd;
        const own = state.onCommand?.(JSON.parse(body));
        if (own) {
          res.writeHead(200, { "content-type": "application/x-ndjson" });
          res.write(JSON.stringify({ event: "start", pid: 8 }) + "\n");
          for (const data of own.stdout ?? []) res.write(JSON.stringify({ event: "stdout", data }) + "\n");
          for (const data of own.stderr ?? []) res.write(JSON.stringify({ event: "stderr", data }) + "\n");
          return res.end(JSON.stringify({ event: "exit", exitCode: own.exitCode ?? 0, signal: null }) + "\n");
        }
        res.writeHead(200, { "content-type": "application/x-ndjson" });
        res.write(JSON.stringify({ event: "start", pid: 7 }) + "\n");
        if (cmd === "slow") {
          await new Promise((r) => setTimeout(r, 3000));
        }
        res.write(JSON.stringify({ event: "stdout", data: "hé" }) + "\n");
        res.write(JSON.stringify({ event: "stderr", dataBase64: Buffer.from([0xff, 0x41]).toString("base64") }) + "\n");
        if (cmd === "cut") return res.end();
        if (cmd === "detach") return res.end(JSON.stringify({ event: "detached" }) + "\n");
        if (cmd === "split") {
          // "a€b😀c" with both characters split across raw chunks (base64 each).
          const euro = Buffer.from("€");
          const smile = Buffer.from("😀");
          const parts = [Buffer.concat([Buffer.from("a"), euro.subarray(0, 1)]), euro.subarray(1, 2),
            Buffer.concat([euro.subarray(2), Buffer.from("b"), smile.subarray(0, 2)]), smile.subarray(2)];
          for (const b of parts) res.write(JSON.stringify({ event: "stdout", dataBase64: b.toString("base64") }) + "\n");
          res.write(JSON.stringify({ event: "stdout", data: "c" }) + "\n");
          // A truncated character at the very end is replaced, not lost.
          res.write(JSON.stringify({ event: "stderr", dataBase64: smile.subarray(0, 3).toString("base64") }) + "\n");
          return res.end(JSON.stringify({ event: "exit", exitCode: 0, signal: null }) + "\n");
        }
        if (cmd === "fail") return res.end(JSON.stringify({ event: "error", code: "not_found", message: "no such user" }) + "\n");
        // Split one event over two writes: the SDK must join the lines.
        const exit = JSON.stringify({ event: "exit", exitCode: 3, signal: null }) + "\n";
        res.write(exit.slice(0, 9));
        await new Promise((r) => setTimeout(r, 20));
        return res.end(exit.slice(9));
      }
      const stored = url.searchParams.get("path");
      if (p.endsWith("/files") && req.method === "PUT") {
        state.files.set(stored, Buffer.concat(chunks));
        return send(res, 200, { path: stored, bytes: Buffer.concat(chunks).length });
      }
      if (p.endsWith("/files") && req.method === "GET" && state.files.has(stored)) {
        res.writeHead(200, { "content-type": "application/octet-stream" });
        return res.end(state.files.get(stored));
      }
      if (p.endsWith("/files") && req.method === "DELETE" && state.files.has(stored)) {
        state.files.delete(stored);
        res.writeHead(204);
        return res.end();
      }
      if (p.endsWith("/files") && req.method === "GET" && url.searchParams.get("path") === "data.bin") {
        res.writeHead(200, { "content-type": "application/octet-stream" });
        res.write(Buffer.alloc(64 * 1024, 1));
        await new Promise((r) => setTimeout(r, 20));
        return res.end(Buffer.alloc(64 * 1024, 2));
      }
      if (p.endsWith("/files") && req.method === "GET" && url.searchParams.get("path") === "endless") {
        // One chunk, then nothing until the client goes away.
        res.writeHead(200, { "content-type": "application/octet-stream" });
        res.write(Buffer.alloc(1024, 1));
        res.on("close", () => {
          state.fileCancelled += 1;
        });
        return;
      }
      if (p.endsWith("/files") && req.method === "GET") {
        return send(res, 404, { code: "not_found", message: `no such file: ${url.searchParams.get("path")}` });
      }
      return send(res, 404, { code: "not_found", message: p });
    }
    if (req.headers["x-api-key"] !== KEY) return send(res, 401, { code: "unauthorized", message: "unknown API key" });
    if (p === "/api/v1/sandboxes" && req.method === "POST") return send(res, 201, view());
    if (p === "/api/v1/sandboxes" && req.method === "GET") {
      return send(res, 200, { sandboxes: [view({ runtime: null })], nextToken: null });
    }
    if (p === `/api/v1/sandboxes/${SBX}` && req.method === "GET") return send(res, 200, view());
    if (p === `/api/v1/sandboxes/${SBX}/previews` && req.method === "POST") {
      const { port } = JSON.parse(body);
      const host = `${port}-${SBX}.localhost:7072`;
      return send(res, 200, {
        port,
        public: false,
        host,
        url: `http://${host}/?ns_preview_token=tok-${port}`,
        token: `tok-${port}`,
        expiresAt: "2026-01-01T01:00:00Z",
        proxyTarget: { url: `http://${host}/`, header: "x-nullspace-preview-proxy-token", token: `proxy-${port}` },
      });
    }
    if (p === `/api/v1/sandboxes/${SBX}/events` && req.method === "GET") {
      const after = Number(url.searchParams.get("after_event_id") ?? 0);
      const limit = Number(url.searchParams.get("limit") ?? 1000);
      return send(res, 200, { events: state.events.filter((e) => e.id > after).slice(0, limit) });
    }
    if (p === "/api/v1/trickle") {
      // 6 chunks 150 ms apart: longer in all than a 400 ms deadline, never silent as long.
      res.writeHead(200, { "content-type": "application/json" });
      res.write("[");
      for (let i = 0; i < 6; i++) {
        await new Promise((r) => setTimeout(r, 150));
        res.write(i ? ",1" : "1");
      }
      return res.end("]");
    }
    if (p === "/api/v1/sandboxes/sbx-revoked") return send(res, 401, { code: "token_revoked", message: "the token was revoked" });
    if (p === "/api/v1/sandboxes/sbx-forbidden") return send(res, 403, { code: "not_yours", message: "no" });
    if (p === "/api/v1/sandboxes/sbx-conflict") return send(res, 409, { code: "busy", message: "busy" });
    if (p === "/api/v1/sandboxes/sbx-slow-down") return send(res, 429, { code: "too_many", message: "slow down" });
    if (p === "/api/v1/sandboxes/sbx-html") return send(res, 200, "<html>a proxy page</html>", "text/html");
    if (p === `/api/v1/sandboxes/${SBX}/security-policy`) {
      state.policy = JSON.parse(body);
      return send(res, 200, view({ securityPolicy: state.policy }));
    }
    if (p === `/api/v1/sandboxes/${SBX}/audit`) {
      const after = Number(url.searchParams.get("after") ?? 0);
      const limit = Number(url.searchParams.get("limit") ?? 100);
      const rest = state.records.filter((r) => r.id > after);
      const page = rest.slice(0, limit);
      return send(res, 200, { records: page, next: page.length ? page[page.length - 1].id : after, more: rest.length > page.length });
    }
    if (p === "/api/v1/slow") {
      await new Promise((r) => setTimeout(r, 3000));
      return send(res, 200, {});
    }
    if (p === "/api/v1/sandboxes/sbx-quota") return send(res, 429, { code: "quota_exceeded", message: "4 of 4 sandboxes" });
    if (p === "/api/v1/sandboxes/sbx-proxy") return send(res, 502, "<html>bad gateway</html>", "text/html");
    if (p === "/api/v1/templates" && req.method === "POST") {
      return send(res, 202, { templateID: "tpl-1", status: "building", builtin: false, from: "base", steps: [], envVars: {} });
    }
    if (p === "/api/v1/templates/tpl-slow/logs") {
      await new Promise((r) => setTimeout(r, 50));
      return send(res, 200, { templateID: "tpl-slow", status: "building", lines: [], next: 0 });
    }
    if (p === "/api/v1/templates/tpl-1/logs") {
      const after = Number(url.searchParams.get("after"));
      const lines = after === 0 ? [{ seq: 1, time: "t", step: 0, stream: "stdout", text: "hello" }] : after === 1 ? [{ seq: 2, time: "t", step: 0, stream: "build", text: "done" }] : [];
      return send(res, 200, { templateID: "tpl-1", status: after >= 2 ? (state.build.fail ? "failed" : "ready") : "building", lines, next: after + lines.length });
    }
    if (p === "/api/v1/templates/tpl-1") {
      return send(res, 200, state.build.fail
        ? { templateID: "tpl-1", status: "failed", error: { step: 0, exitCode: 9, outputTail: "nope", message: "step 0 exited 9" } }
        : { templateID: "tpl-1", status: "ready", name: "t" });
    }
    return send(res, 404, { code: "not_found", message: `no route ${req.method} ${p}` });
  });
  const wss = new WebSocketServer({ noServer: true });
  server.on("upgrade", (req, socket, head) => {
    if (new URL(req.url, "http://fake").pathname.endsWith("/pty")) {
      if (req.headers.authorization !== `Bearer ${TOKEN}`) {
        socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
        return;
      }
      wss.handleUpgrade(req, socket, head, (ws) => {
        // Output now and then, until the client closes.
        const t = setInterval(() => ws.send(Buffer.from("tick\r\n")), 20);
        ws.on("close", () => {
          clearInterval(t);
          state.ptyClosed += 1;
        });
        if (new URL(req.url, "http://fake").searchParams.get("cmd") === "quiet") clearInterval(t);
      });
      return;
    }
    state.wsUrls.push(req.url);
    state.wsHeaders.push(req.headers);
    if (state.sandboxState === "deleted") {
      socket.end("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
      return;
    }
    if (req.headers["x-api-key"] !== KEY) {
      socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const url = new URL(req.url, "http://fake");
      const after = Number(url.searchParams.get("after_event_id") ?? 0);
      const first = state.wsUrls.length === 1;
      if (state.dropNext > 0) {
        state.dropNext -= 1;
        ws.terminate();
        state.onDrop?.();
        return;
      }
      if (state.silentNext > 0) {
        // Half-open: no more reads (so no pongs), nothing sent.
        state.silentNext -= 1;
        socket.pause();
        return;
      }
      state.sockets.add(ws);
      ws.on("close", () => state.sockets.delete(ws));
      // Replays overlap by one (an event the client already has) to check the dedupe.
      let sent = 0;
      for (const e of state.events.filter((e) => e.id >= Math.max(after, 1))) {
        ws.send(JSON.stringify(e));
        sent += 1;
        if (first && state.dropAfter !== null && sent >= state.dropAfter) {
          ws.terminate();
          return;
        }
      }
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${server.address().port}`;
  return {
    base,
    state,
    /** Appends an event and sends it to every open lifecycle stream. */
    push(event) {
      state.events.push(event);
      for (const ws of state.sockets) ws.send(JSON.stringify(event));
    },
    close: () =>
      new Promise((r) => {
        for (const c of wss.clients) c.terminate();
        server.closeAllConnections?.();
        server.close(() => r());
      }),
  };
}
