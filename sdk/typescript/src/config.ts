/**
 * Where the API is and who calls it: `NULLSPACE_API_URL` and `NULLSPACE_API_KEY`, else
 * the dev stack's env file (`$XDG_STATE_HOME/nullspace/dev.env`, default
 * `~/.local/state/nullspace/dev.env`, written by `deploy/up.sh`), overridden per call
 * by `apiKey`, `domain` and `requestTimeoutMs`.
 *
 * @module
 */

import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";

import { ConfigError, invalid } from "./errors.js";

/** The API's address when nothing else names one (what `deploy/up.sh` serves). */
export const DEFAULT_API_URL = "http://127.0.0.1:7080";

/** How long one request may take unless `requestTimeoutMs` says otherwise (5 minutes). */
export const DEFAULT_REQUEST_TIMEOUT_MS = 300_000;

/**
 * The key `console.log` and `util.inspect` (Node, Bun, Deno) call for an object's own
 * view: the SDK's objects show their IDs and state there, never a credential.
 */
export const INSPECT: unique symbol = Symbol.for("nodejs.util.inspect.custom");

/** The per-call connection options every call that reaches the API accepts. */
export interface ConnectionOpts {
  /** The team's API key (default: `NULLSPACE_API_KEY`, then the dev env file). */
  apiKey?: string;
  /**
   * The API's address: `host:port` or a URL, with or without `/api/v1` (default:
   * `NULLSPACE_API_URL`, then the dev env file, then `http://127.0.0.1:7080`).
   */
  domain?: string;
  /**
   * Milliseconds one HTTP request may take (default 300000). For a stream (command
   * output, a download, a watch) it is the longest silence between two chunks.
   */
  requestTimeoutMs?: number;
}

/** Per-call options of calls on an existing object: only the request timeout. */
export interface RequestOpts {
  /** Milliseconds this request may take (default: the sandbox's `requestTimeoutMs`). */
  requestTimeoutMs?: number;
}

function env(name: string): string | undefined {
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  const value = proc?.env?.[name];
  return value === undefined || value === "" ? undefined : value;
}

/** The dev stack's env file as a map (empty when it does not exist or cannot be read). */
export function readDevEnv(): Record<string, string> {
  let base = env("XDG_STATE_HOME");
  try {
    base ??= join(env("HOME") ?? homedir(), ".local", "state");
  } catch {
    return {};
  }
  let text: string;
  try {
    text = readFileSync(join(base, "nullspace", "dev.env"), "utf8");
  } catch {
    return {};
  }
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const eq = line.indexOf("=");
    if (eq > 0) out[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
  }
  return out;
}

/** `url` as `scheme://host[:port]`, without a trailing `/` or `/api/v1`. */
export function normalizeUrl(url: string): string {
  let u = url.trim().replace(/\/+$/, "");
  if (u.endsWith("/api/v1")) u = u.slice(0, -"/api/v1".length);
  return u.includes("://") ? u : `http://${u}`;
}

/** A resolved configuration: the API's base URL, the key, the request timeout. */
export class Config {
  /**
   * @param apiUrl - `scheme://host[:port]` of the public API
   * @param apiKey - the team's API key, sent as `X-API-Key`
   * @param requestTimeoutMs - milliseconds one request may take
   */
  constructor(
    readonly apiUrl: string,
    readonly apiKey: string,
    readonly requestTimeoutMs: number = DEFAULT_REQUEST_TIMEOUT_MS,
  ) {}

  /** What `JSON.stringify` writes: the URL and the timeout, the API key masked. */
  toJSON(): { apiUrl: string; apiKey: string; requestTimeoutMs: number } {
    return { apiUrl: this.apiUrl, apiKey: `${this.apiKey.slice(0, 3)}…REDACTED`, requestTimeoutMs: this.requestTimeoutMs };
  }

  /** What `console.log` and `util.inspect` show: the URL, the API key masked. */
  [INSPECT](): string {
    const { apiUrl, apiKey, requestTimeoutMs } = this.toJSON();
    return `Config { apiUrl: '${apiUrl}', apiKey: '${apiKey}', requestTimeoutMs: ${requestTimeoutMs} }`;
  }

  /**
   * The configuration for a call: its `apiKey`, `domain` and `requestTimeoutMs`, else
   * the environment, else the dev env file. Throws a {@link ConfigError} (code
   * `config`) when no key is found, naming where to put one.
   */
  static resolve(opts: ConnectionOpts = {}): Config {
    const dev = readDevEnv();
    const key = opts.apiKey || env("NULLSPACE_API_KEY") || dev["NULLSPACE_API_KEY"];
    if (!key) {
      throw new ConfigError(
        "config",
        "no API key: pass { apiKey } or set NULLSPACE_API_KEY " +
          "(deploy/up.sh writes one to ~/.local/state/nullspace/dev.env)",
      );
    }
    const url = opts.domain || env("NULLSPACE_API_URL") || dev["NULLSPACE_API_URL"] || DEFAULT_API_URL;
    return new Config(normalizeUrl(url), key, checkTimeout(opts.requestTimeoutMs) ?? DEFAULT_REQUEST_TIMEOUT_MS);
  }

  /** The URL of a public API path (`/sandboxes` → `<apiUrl>/api/v1/sandboxes`). */
  url(path: string): string {
    return `${this.apiUrl}/api/v1${path}`;
  }

  /** This configuration with another request timeout (when one is given). */
  withTimeout(requestTimeoutMs: number | undefined): Config {
    const t = checkTimeout(requestTimeoutMs);
    return t === undefined ? this : new Config(this.apiUrl, this.apiKey, t);
  }
}

/** `requestTimeoutMs` checked: a positive number of milliseconds, or undefined. */
export function checkTimeout(ms: unknown, name = "requestTimeoutMs"): number | undefined {
  if (ms === undefined || ms === null) return undefined;
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0) {
    throw invalid(`${name} must be a positive number of milliseconds, e.g. 30000; got ${String(ms)}`);
  }
  return ms;
}
