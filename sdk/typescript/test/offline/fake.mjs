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
  };
  let base = "";
  const view = (extra = {}) => ({
    sandboxID: SBX,
    templateID: "base",
    state: "running",
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
        res.writeHead(200, { "content-type": "application/x-ndjson" });
        res.write(JSON.stringify({ event: "start", pid: 7 }) + "\n");
        if (cmd === "slow") {
          await new Promise((r) => setTimeout(r, 3000));
        }
        res.write(JSON.stringify({ event: "stdout", data: "hé" }) + "\n");
        res.write(JSON.stringify({ event: "stderr", dataBase64: Buffer.from([0xff, 0x41]).toString("base64") }) + "\n");
        if (cmd === "cut") return res.end();
        if (cmd === "fail") return res.end(JSON.stringify({ event: "error", code: "not_found", message: "no such user" }) + "\n");
        // Split one event over two writes: the SDK must join the lines.
        const exit = JSON.stringify({ event: "exit", exitCode: 3, signal: null }) + "\n";
        res.write(exit.slice(0, 9));
        await new Promise((r) => setTimeout(r, 20));
        return res.end(exit.slice(9));
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
    state.wsUrls.push(req.url);
    state.wsHeaders.push(req.headers);
    if (req.headers["x-api-key"] !== KEY) {
      socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const url = new URL(req.url, "http://fake");
      const after = Number(url.searchParams.get("after_event_id") ?? 0);
      const first = state.wsUrls.length === 1;
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
    close: () =>
      new Promise((r) => {
        for (const c of wss.clients) c.terminate();
        server.closeAllConnections?.();
        server.close(() => r());
      }),
  };
}
