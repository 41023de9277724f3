// What the live tests share. They run against a stack of their own
// (deploy/test-typescript-sdk.sh starts one with deploy/with-stack.sh, which exports
// NULLSPACE_API_URL, NULLSPACE_API_KEY and NULLSPACE_OPERATOR_KEY); without one they fail.
import assert from "node:assert/strict";
import { request } from "node:http";

assert.ok(
  process.env.NULLSPACE_API_URL && process.env.NULLSPACE_API_KEY,
  "the live tests need a stack: run deploy/test-typescript-sdk.sh (or deploy/with-stack.sh node --test ...)",
);

/** The smallest shape the suite boots: 1 vCPU, 512 MiB, 1 GiB disk. */
export const SMALL = Object.freeze({ cpu: 1, memoryMb: 512, diskMb: 1024 });

/** Polls `check` until it returns something truthy, failing after `withinMs`. */
export async function until(what, check, withinMs = 60_000, everyMs = 250) {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const got = await check();
    if (got) return got;
    assert.ok(Date.now() < deadline, `${what}: not within ${withinMs} ms`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Resolves `p`, or fails after `ms` saying what did not happen. */
export function within(ms, what, p) {
  let timer;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    }),
  ]);
}

function get(url, headers) {
  const u = new URL(url);
  const connectTo = u.hostname.endsWith(".localhost") || u.hostname === "localhost" ? "127.0.0.1" : u.hostname;
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: connectTo,
        port: u.port || 80,
        path: u.pathname + u.search,
        method: "GET",
        headers: { host: u.host, ...headers },
        timeout: 30_000,
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`GET ${url}: no answer within 30 s`)));
    req.on("error", reject);
    req.end();
  });
}

/**
 * An HTTP GET of `url` as a browser does it, to the preview listener: a `*.localhost`
 * host (the local stack's preview domain, loopback to a browser) is connected to on
 * 127.0.0.1 with the URL's host in the Host header, as the Rust preview tests do;
 * redirects are followed with the cookies they set (a preview token in the URL is
 * traded for a cookie). Resolves to `{ status, headers, body, hops }`, `hops` being
 * every answer on the way.
 */
export async function fetchUrl(url, headers = {}) {
  const jar = new Map();
  const hops = [];
  for (let i = 0; i < 5; i++) {
    const cookie = [...jar].map(([k, v]) => `${k}=${v}`).join("; ");
    const r = await get(url, cookie ? { ...headers, cookie } : headers);
    hops.push(r);
    for (const c of r.headers["set-cookie"] ?? []) {
      const [pair] = c.split(";");
      const eq = pair.indexOf("=");
      jar.set(pair.slice(0, eq), pair.slice(eq + 1));
    }
    if (r.status < 300 || r.status >= 400 || !r.headers.location) return { ...r, hops };
    url = new URL(r.headers.location, url).toString();
  }
  throw new Error(`GET ${url}: more than 5 redirects`);
}

/** A name unique to this test process, for metadata filters and volume names. */
export const RUN = `ts-${process.pid}`;
