/**
 * Seed 001's security policy and the audit. A sandbox with a policy has its TLS
 * connections intercepted (the guest trusts its team's CA); each HTTP request is
 * checked, rewritten and audited. Sent as `securityPolicy` at create (`secure: true`
 * alone sends `{}`: interception with the audit only) or live with
 * `sandbox.setSecurityPolicy(policy)`.
 *
 * @module
 */

import { invalid } from "./errors.js";

/** What a PII detector does with what it finds. */
export type PiiAction = "log" | "redact" | "block";

/**
 * A security policy; every part is optional. The names are the REST names, so a
 * sandbox's `info.securityPolicy` can be sent back changed.
 */
export interface SecurityPolicy {
  /**
   * For what the guest sends: `{ detectors: { email: "redact", card: "block" } }`;
   * detectors `email`, `phone`, `card`, `iban`, `ipv4`, `ipv6`, `jwt`, `privateKey`,
   * `apiKey` (absent ones are off).
   */
  pii?: { detectors: Partial<Record<string, PiiAction>> };
  /** Prompt injection in what the guest receives: `{ action: "flag" | "strip" | "block" }`. */
  injectionDefense?: { action: "flag" | "strip" | "block" };
  /**
   * Header rewrites per host: `[{ host: "api.example.com" (or "*.example.com"),
   * requestHeaders: { set: {...}, remove: [...] }, responseHeaders: {...},
   * upstreamHost: "host[:port]" }]`.
   */
  transforms?: Array<{
    host: string;
    requestHeaders?: { set?: Record<string, string>; remove?: string[] };
    responseHeaders?: { set?: Record<string, string>; remove?: string[] };
    upstreamHost?: string;
  }>;
  /** One record per request (the default): `true`/`false` are short for `{ enabled }`. */
  audit?: boolean | { enabled: boolean };
  /**
   * Secrets the guest only sees as placeholders: `{ secrets: [{ name: "OPENAI_API_KEY",
   * hosts: ["api.openai.com"], placeholder?: "16+ characters" }] }`. The real value goes
   * in `envVars` under the same name at create; the proxy swaps it in on requests to
   * `hosts`. A secret not given at create cannot be added live (400).
   */
  envMasking?: { secrets: Array<{ name: string; hosts: string[]; placeholder?: string }> };
}

/** A security policy as the API keeps it (`audit` always an object). */
export type SecurityPolicyDoc = Omit<SecurityPolicy, "audit"> & { audit?: { enabled: boolean } };

const PARTS: Record<string, { list: boolean; example: string }> = {
  pii: { list: false, example: '{ detectors: { email: "redact", card: "block" } }' },
  injectionDefense: { list: false, example: '{ action: "flag" }' },
  transforms: { list: true, example: '[{ host: "api.example.com", requestHeaders: { set: { "x-team": "a" } } }]' },
  audit: { list: false, example: "{ enabled: true }" },
  envMasking: { list: false, example: '{ secrets: [{ name: "OPENAI_API_KEY", hosts: ["api.openai.com"] }] }' },
};

/**
 * The REST `securityPolicy` of a policy: unknown parts and parts of the wrong JSON type
 * are refused (`invalid_request`, saying what to send); `audit: true` becomes
 * `{ enabled: true }`. The API checks the rest.
 */
export function securityPolicyBody(policy: unknown): SecurityPolicyDoc {
  if (!policy || typeof policy !== "object" || Array.isArray(policy)) {
    throw invalid(
      `securityPolicy must be an object with pii, injectionDefense, transforms, audit or envMasking; got ${describe(policy)}`,
    );
  }
  const entries = Object.entries(policy as Record<string, unknown>);
  const unknown = entries.map(([k]) => k).filter((k) => !(k in PARTS));
  if (unknown.length) {
    throw invalid(
      `securityPolicy has unknown keys ${JSON.stringify(unknown.sort())}; send ${Object.keys(PARTS).join(", ")}`,
    );
  }
  const body: Record<string, unknown> = {};
  for (const [name, raw] of entries) {
    if (raw === undefined || raw === null) continue;
    let v = raw;
    if (name === "audit" && typeof v === "boolean") v = { enabled: v };
    const part = PARTS[name]!;
    const ok = part.list ? Array.isArray(v) : typeof v === "object" && !Array.isArray(v);
    if (!ok) {
      throw invalid(
        `securityPolicy.${name} must be ${part.list ? "an array" : "an object"}, e.g. ${part.example}; got ${describe(v)}`,
      );
    }
    body[name] = v;
  }
  return body as SecurityPolicyDoc;
}

/** The kind of a value only: policies may hold secrets, and messages never copy them. */
function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return "an object";
  return `a ${typeof v}`;
}

/**
 * One thing the policy found: `kind` (a PII detector such as `card`,
 * `injection:<rule>`, `secret:<name>`), `where` (`url`, `requestHeader:<name>`,
 * `requestBody`, `responseBody`, ...) and the `action` taken.
 */
export interface AuditDetection {
  /** What was found: a PII detector, `injection:<rule>`, `secret:<name>`. */
  kind: string;
  /** Where: `url`, `requestHeader:<name>`, `requestBody`, `responseBody`, ... */
  where: string;
  /** What was done: `log`, `redact`, `block`, `flag`, ... */
  action: string;
}

/**
 * One HTTP request a sandbox with a security policy made. `action`: `allowed`,
 * `modified` (redacted, stripped, secrets swapped), `blocked` or `error` (the upstream
 * failed). `path` is what went upstream (redacted); `status` 0: the guest got no
 * answer; `bytesIn` came from the upstream, `bytesOut` went to it.
 */
export interface AuditRecord {
  /** Increasing per sandbox. */
  id: number;
  /** ISO 8601 (up to nanoseconds). */
  time: string;
  /** `time` as a Date (millisecond precision); null without one. */
  timestamp: Date | null;
  /** The HTTP method. */
  method: string;
  /** The host it went to. */
  host: string;
  /** Path and query as sent upstream (redacted; never a secret's value). */
  path: string;
  /** The status the guest got (0: none). */
  status: number;
  /** Bytes from the upstream. */
  bytesIn: number;
  /** Bytes to the upstream. */
  bytesOut: number;
  /** How long the request took, milliseconds. */
  durationMs: number;
  /** What the policy found in it. */
  detections: AuditDetection[];
  /** What became of it: `allowed`, `modified`, `blocked` or `error`. */
  action: "allowed" | "modified" | "blocked" | "error" | string;
}

/**
 * One page of a sandbox's audit: `records` oldest first, `next` (pass it as `after`
 * for the next page) and `more` (whether records past `next` exist now).
 */
export interface AuditPage {
  /** The records, oldest first. */
  records: AuditRecord[];
  /** Pass as `after` for the next page. */
  next: number;
  /** Whether records past `next` exist now. */
  more: boolean;
}

/** @internal An ISO 8601 time (any number of fractional digits) as a Date. */
export function parseTime(text: string | undefined): Date | null {
  if (!text) return null;
  const trimmed = text.replace(/\.(\d{1,3})\d*/, ".$1");
  const d = new Date(trimmed);
  return Number.isNaN(d.getTime()) ? null : d;
}

/** @internal */
export function parseAuditRecord(doc: Record<string, any>): AuditRecord {
  return {
    id: doc.id,
    time: doc.time ?? "",
    timestamp: parseTime(doc.time),
    method: doc.method ?? "",
    host: doc.host ?? "",
    path: doc.path ?? "",
    status: doc.status ?? 0,
    bytesIn: doc.bytesIn ?? 0,
    bytesOut: doc.bytesOut ?? 0,
    durationMs: doc.durationMs ?? 0,
    detections: (doc.detections ?? []).map((d: Record<string, string>) => ({
      kind: d.kind ?? "",
      where: d.where ?? "",
      action: d.action ?? "",
    })),
    action: doc.action ?? "",
  };
}

/** @internal A REST audit page; a missing `next` is the last record's ID (or `after`). */
export function parseAuditPage(doc: Record<string, any>, after: number): AuditPage {
  const records = (doc.records ?? []).map(parseAuditRecord);
  let next = doc.next;
  if (next === undefined || next === null) next = records.length ? records[records.length - 1].id : after;
  return { records, next, more: Boolean(doc.more) };
}

/** @internal `after` and `limit` of an audit page, checked. */
export function auditParams(after: unknown, limit: unknown): { after: number; limit: number } {
  if (typeof after !== "number" || !Number.isInteger(after) || after < 0) {
    throw invalid(`after must be an audit record ID from 0 (a page's next); got ${JSON.stringify(after)}`);
  }
  if (typeof limit !== "number" || !Number.isInteger(limit) || limit < 1 || limit > 1000) {
    throw invalid(`limit must be 1 to 1000 records; got ${JSON.stringify(limit)}`);
  }
  return { after, limit };
}
