// The public API client: the API key (sessionStorage only), a fetch wrapper, the API's
// errors, the data plane (runtime access tokens, file calls, WebSocket URLs).

const KEY_STORAGE = "nullspace.apiKey";

export function getKey(): string | null {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

export function setKey(key: string): void {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey(): void {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage unavailable: nothing kept
  }
  accessCache.clear();
  summaryCache = null;
  summaryPending = null;
}

/** An error answer of the API (or the network). */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly details: unknown;
  constructor(status: number, code: string, message: string, details?: unknown) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** The suggested action the API gave, if any (in `details`). */
  get suggestion(): string | null {
    const d = this.details;
    if (d && typeof d === "object") {
      const o = d as Record<string, unknown>;
      for (const k of ["action", "suggestedAction", "suggestion", "hint"]) {
        if (typeof o[k] === "string" && o[k]) return o[k] as string;
      }
      const acts = o["suggestedActions"];
      if (Array.isArray(acts) && acts.length) return acts.map(String).join(" ");
    }
    return null;
  }
}

/** Turns any thrown value into an ApiError for display. */
export function asApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof Error) return new ApiError(0, "client_error", e.message);
  return new ApiError(0, "client_error", String(e));
}

async function errorFromResponse(res: Response): Promise<ApiError> {
  let text = "";
  try {
    text = await res.text();
  } catch {
    // body unreadable
  }
  try {
    const doc = JSON.parse(text) as { code?: unknown; message?: unknown; details?: unknown; action?: unknown };
    if (doc && typeof doc === "object" && typeof doc.message === "string") {
      const details =
        doc.details ?? (typeof doc.action === "string" ? { action: doc.action } : undefined);
      return new ApiError(res.status, typeof doc.code === "string" ? doc.code : `http_${res.status}`, doc.message, details);
    }
  } catch {
    // not JSON
  }
  const msg = text.trim().slice(0, 300) || res.statusText || "request failed";
  return new ApiError(res.status, `http_${res.status}`, `HTTP ${res.status}: ${msg}`);
}

let unauthorized: (message: string) => void = () => undefined;

/** Called on a 401 from the API after sign-in: the app goes back to the sign-in form. */
export function onUnauthorized(fn: (message: string) => void): void {
  unauthorized = fn;
}

export interface RequestOpts {
  query?: Record<string, string | number | undefined | null | string[]>;
  body?: unknown;
  signal?: AbortSignal;
  /** Use this key rather than the stored one (sign-in check); a 401 is then not global. */
  key?: string;
}

function buildQuery(q: RequestOpts["query"]): string {
  if (!q) return "";
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => p.append(k, x));
    else p.append(k, String(v));
  }
  const s = p.toString();
  return s ? `?${s}` : "";
}

/** Calls the public API (same origin): JSON in, JSON out; a non-2xx answer throws ApiError. */
export async function api<T>(method: string, path: string, opts: RequestOpts = {}): Promise<T> {
  const key = opts.key ?? getKey();
  const headers: Record<string, string> = { Accept: "application/json" };
  if (key) headers["X-API-Key"] = key;
  let body: string | undefined;
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
  }
  let res: Response;
  try {
    res = await fetch(`/api/v1${path}${buildQuery(opts.query)}`, {
      method,
      headers,
      body,
      signal: opts.signal,
      credentials: "omit",
      cache: "no-store",
    });
  } catch (e) {
    if (e instanceof DOMException && e.name === "AbortError") throw e;
    throw new ApiError(0, "network", `The API did not answer (${e instanceof Error ? e.message : String(e)}).`);
  }
  if (!res.ok) {
    const err = await errorFromResponse(res);
    if (res.status === 401 && opts.key === undefined) {
      clearKey();
      unauthorized(err.message);
    }
    throw err;
  }
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  if (!text) return undefined as T;
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new ApiError(res.status, "bad_response", "The API answered with something that is not JSON.");
  }
}

export const enc = encodeURIComponent;

// ---- Shapes (mirroring api-component/openapi.json and the TypeScript SDK) ----

export interface Resources {
  vcpus: number;
  memMiB: number;
  diskSizeMiB: number;
}

export interface RuntimeAccess {
  target: { transport: string; host: string; baseUrl: string };
  token: string;
  tokenExpiresAt: string;
}

export interface Sandbox {
  sandboxID: string;
  templateID?: string;
  state?: string;
  resources?: Resources;
  metadata?: Record<string, string>;
  lifecycle?: { onTimeout?: string; autoResume?: boolean; idleTimeout?: number };
  timeout?: number;
  createdAt?: string;
  expiresAt?: string;
  timeline?: { at: string; step: string; detail?: string }[];
  diagnostic?: { code?: string; message?: string; action?: string } | null;
  snapshotInterval?: number;
  hibernated?: boolean;
  mounts?: {
    path?: string;
    volumeID?: string;
    type?: string;
    inherited?: { fromSandboxID?: string; fromVolumeID?: string; how?: string };
  }[];
  hostID?: string;
  recording?: boolean;
  dashboardUrl?: string;
}

export interface SandboxList {
  sandboxes: Sandbox[];
  nextToken: string | null;
}

export interface SandboxEvent {
  id: number;
  at: string;
  type: string;
  data: Record<string, unknown>;
}

export interface Snapshot {
  snapshotID: string;
  sandboxID: string;
  templateID?: string;
  kind: string;
  createdAt: string;
  sizeBytes: number;
  storedBytes?: number;
  storage: string;
  name?: string;
}

export interface MetricSample {
  timestamp?: number;
  cpuUsedPct?: number;
  cpuCount?: number;
  memUsedMiB?: number;
  memTotalMiB?: number;
  diskUsedBytes?: number;
  diskTotalBytes?: number;
  netRxBytes?: number;
  netTxBytes?: number;
  tasks?: number;
  hostCpuPct?: number;
}

export interface LogLine {
  time?: string;
  source: string;
  text: string;
}

export interface Preview {
  port: number;
  public: boolean;
  host: string;
  url: string;
  expiresAt: string;
}

export interface BuildFailure {
  phase: string;
  step?: number;
  message: string;
  exitCode?: number;
  outputTail: string;
  action: string;
}

export interface Template {
  templateID: string;
  name?: string;
  builtin: boolean;
  from: string;
  status: string;
  resources: Resources;
  envVars: Record<string, string>;
  startCmd?: string;
  readyCmd?: string;
  steps: unknown[];
  error?: BuildFailure;
  createdAt: string;
  readyAt?: string;
  buildMs?: number;
}

export interface BuildLogPage {
  templateID: string;
  status: string;
  lines: { seq: number; time: string; step?: number; stream: string; text: string }[];
  next: number;
}

export interface WarmPool {
  templateID: string;
  target: number;
  ready: number;
  warming: number;
  checkouts: number;
  misses: number;
  refill?: boolean;
  resources?: Resources;
  lastError?: { message: string; at: string; failures?: number; retryInS?: number } | null;
  [k: string]: unknown;
}

export interface Volume {
  volumeID: string;
  name?: string;
  sizeMiB: number;
  createdAt: string;
  version: number;
  savedAt?: string;
  attachments: { sandboxID?: string; path?: string; type?: string }[];
}

export interface Summary {
  teamID: string;
  usage: { live: number; running: number; paused: number; starting: number; error: number; templates: number; quota: Record<string, number> };
  quotaChecks: { name: string; used?: number; limit: number; ok: boolean; burst?: number }[];
  limits: Record<string, number>;
  endpoints: { name?: string; url?: string; status?: string; detail?: string | null }[];
  suggestedActions: string[];
  network?: { mode?: string; warning?: string | null };
}

export interface FileInfo {
  name: string;
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  size?: number;
  mode?: number;
  mtime?: number;
  symlink_target?: string;
}

// ---- Observability summary (cached: the data plane's URL comes from it) ----

let summaryCache: { at: number; value: Summary } | null = null;
/** The request in flight: the sandboxes list opens a lifecycle socket per row at once,
 * and each asks for the data plane's URL — one request serves them all. */
let summaryPending: Promise<Summary> | null = null;

export async function summary(fresh = false): Promise<Summary> {
  if (!fresh && summaryCache && Date.now() - summaryCache.at < 60_000) return summaryCache.value;
  if (summaryPending) return summaryPending;
  const p = api<Summary>("GET", "/observability/summary").then((value) => {
    if (summaryPending === p) summaryCache = { at: Date.now(), value };
    return value;
  });
  summaryPending = p;
  try {
    return await p;
  } finally {
    if (summaryPending === p) summaryPending = null;
  }
}

/** The data-plane edge's base URL (the summary's "data plane" endpoint), or null. */
export async function dataPlaneUrl(): Promise<string | null> {
  const s = await summary();
  const ep = s.endpoints.find((e) => e.name === "data plane");
  return ep?.url ? ep.url.replace(/\/+$/, "") : null;
}

// ---- Runtime access (POST /sandboxes/{id}/access: no resume, no revocation) ----

const accessCache = new Map<string, RuntimeAccess>();

export async function runtimeAccess(id: string, fresh = false): Promise<RuntimeAccess> {
  const cached = accessCache.get(id);
  if (!fresh && cached && new Date(cached.tokenExpiresAt).getTime() - Date.now() > 60_000) return cached;
  const doc = await api<{ runtime: RuntimeAccess }>("POST", `/sandboxes/${enc(id)}/access`, { body: {} });
  if (!doc || !doc.runtime || !doc.runtime.target) {
    throw new ApiError(0, "bad_response", "The API did not return data-plane access for this sandbox.");
  }
  if (!/^https?:\/\//i.test(doc.runtime.target.baseUrl ?? "")) {
    throw new ApiError(0, "bad_response", "The API returned a data-plane address that is not an http(s) URL.");
  }
  accessCache.set(id, doc.runtime);
  return doc.runtime;
}

export function forgetAccess(id: string): void {
  accessCache.delete(id);
}

/** A data-plane call with the runtime token (never the API key); one retry with a fresh
 * token on 401. `signal` ends it when the user leaves the page. */
export async function dp(
  id: string,
  method: string,
  path: string,
  query: Record<string, string> = {},
  body?: BodyInit,
  signal?: AbortSignal,
): Promise<Response> {
  for (let attempt = 0; ; attempt++) {
    const access = await runtimeAccess(id, attempt > 0);
    const qs = new URLSearchParams(query).toString();
    let res: Response;
    try {
      res = await fetch(`${access.target.baseUrl}${path}${qs ? `?${qs}` : ""}`, {
        method,
        headers: { Authorization: `Bearer ${access.token}`, ...(body !== undefined ? { "Content-Type": "application/octet-stream" } : {}) },
        body,
        signal,
        credentials: "omit",
        cache: "no-store",
        mode: "cors",
        referrerPolicy: "no-referrer",
      });
    } catch (e) {
      if (e instanceof DOMException && e.name === "AbortError") throw e;
      throw new ApiError(0, "network", `The sandbox's data plane did not answer (${e instanceof Error ? e.message : String(e)}).`);
    }
    if (res.status === 401 && attempt === 0) continue;
    if (!res.ok) throw await errorFromResponse(res);
    return res;
  }
}

export async function dpJson<T>(id: string, method: string, path: string, query: Record<string, string> = {}, body?: BodyInit, signal?: AbortSignal): Promise<T> {
  const res = await dp(id, method, path, query, body, signal);
  return (await res.json()) as T;
}

/** A WebSocket URL on the data plane from an http(s) base URL. */
export function wsUrl(base: string, path: string, query: Record<string, string | number> = {}): string {
  const u = new URL(base + path);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(query)) u.searchParams.set(k, String(v));
  return u.toString();
}

/** The subprotocols that carry a credential (browsers cannot set headers on WebSockets). */
export function wsProtocols(credential: string): string[] {
  return ["nullspace.v1", `nullspace.auth.${credential}`];
}
