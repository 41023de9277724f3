/**
 * `Sandbox.create`'s options and how each becomes the REST create body: the seeds'
 * names (seed 001's `allowInternetAccess`, `network`, `secure`, `securityPolicy`,
 * `lifecycle`; seed 002's start sources; seed 003's `envVars` and `waitReady`; seed 004's
 * `onTimeout`, `autoResume`, `warmPoolMode`) translated, conflicting forms refused.
 *
 * @module
 */

import type { ConnectionOpts } from "./config.js";
import { invalid } from "./errors.js";
import type { EgressPolicy } from "./models.js";
import { type SecurityPolicy, securityPolicyBody } from "./security.js";

/**
 * A VM shape: `cpu` (or `vcpus`), `memoryMb` (or `memMiB`), `diskMb` (or `diskSizeMiB`).
 * Defaults 2 vCPUs, 2048 MiB, 8192 MiB.
 */
export interface ResourcesOpts {
  /** Virtual CPUs (same as `vcpus`). */
  cpu?: number;
  /** Virtual CPUs (default 2). */
  vcpus?: number;
  /** Memory, MiB (same as `memMiB`). */
  memoryMb?: number;
  /** Memory, MiB (default 2048). */
  memMiB?: number;
  /** Root disk, MiB (same as `diskSizeMiB`). */
  diskMb?: number;
  /** Root disk, MiB (default 8192). */
  diskSizeMiB?: number;
}

/**
 * Seed 001's network configuration: `denyOut: ["0.0.0.0/0"]` closes all outbound
 * traffic and `allowOut` lists what stays reachable. It becomes the REST `egress`
 * policy, where a deny rule wins: an `allowOut` entry inside a remaining `denyOut`
 * entry is refused rather than silently blocked.
 */
export interface SandboxNetworkOpts {
  /** IPs, CIDRs, domains and `*.domains` that stay reachable. */
  allowOut?: string[];
  /** IPs, CIDRs, domains and `*.domains` that are blocked (`0.0.0.0/0`: everything). */
  denyOut?: string[];
}

/** What the timeout does (seed 001's `SandboxLifecycle`). */
export interface SandboxLifecycle {
  /** `kill` (default), `pause` or `hibernate`. */
  onTimeout?: "kill" | "pause" | "hibernate";
  /** Only with pause or hibernate: preview traffic and SDK calls wake it. */
  autoResume?: boolean;
  /** Seconds without SDK calls, preview traffic or a foreground command: `onTimeout` early. */
  idleTimeout?: number;
}

/** A volume to mount: its ID or name (read-write), or `{ id, type: "rw" | "ro" }`. */
export type MountOpts = string | { id: string; type?: "rw" | "ro" };

/** An egress policy as sent: every part optional (`internet` default true). */
export interface EgressOpts {
  /** Default true; false leaves only `allow` reachable. */
  internet?: boolean;
  /** IPs, CIDRs, domains and `*.domains` that stay reachable. */
  allow?: string[];
  /** IPs, CIDRs, domains and `*.domains` that are blocked (deny wins). */
  deny?: string[];
}

/** Everything `Sandbox.create` takes. */
export interface SandboxOpts extends ConnectionOpts {
  /** The template (ID or name, or a snapshot ID); default `base`. The first argument wins. */
  template?: string;
  /** Seconds to live (default 300); see `setTimeout`, `refresh`. */
  timeout?: number;
  /** Default true: resolves once it runs. With false, call `waitReady()` before commands. */
  waitReady?: boolean;
  /** Environment of every command (seed 003's name). */
  envVars?: Record<string, string>;
  /** Same as `envVars` (seed 001's name); send one of them. */
  envs?: Record<string, string>;
  /** Searchable with `Sandbox.list({ query: { metadata } })`. */
  metadata?: Record<string, string>;
  /** The VM shape (default 2 vCPUs, 2048 MiB, 8192 MiB disk). */
  resources?: ResourcesOpts;
  /** Seed 001: `false` closes all outbound traffic. */
  allowInternetAccess?: boolean;
  /** Seed 001: fine-grained egress (overrides `allowInternetAccess`). */
  network?: SandboxNetworkOpts;
  /** The REST egress policy itself (instead of `network` / `allowInternetAccess`). */
  egress?: EgressOpts;
  /** `true`: the TLS-intercepting security proxy with the audit only (`securityPolicy: {}`). */
  secure?: boolean;
  /** The security proxy with this policy. */
  securityPolicy?: SecurityPolicy;
  /** What the timeout does (seed 001's `SandboxLifecycle`). */
  lifecycle?: SandboxLifecycle;
  /** Seed 004: `lifecycle.onTimeout`. */
  onTimeout?: "kill" | "pause" | "hibernate";
  /** Seed 004: `lifecycle.autoResume`. */
  autoResume?: boolean;
  /** Seed 000: `lifecycle.idleTimeout` (seconds). */
  idleTimeout?: number;
  /** Seed 003: short for `onTimeout: "pause"`. */
  autoPause?: boolean;
  /** Seed 004: check out a warm-pool instance: `require` or `prefer`. */
  warmPoolMode?: "require" | "prefer";
  /** Same as `warmPoolMode`. */
  warmPool?: "require" | "prefer";
  /** Seed 002: a team template by name (a start source instead of `template`). */
  imageName?: string;
  /** Seed 002: pins the template ID `imageName` must be. */
  imageId?: string;
  /** Seed 002: a named snapshot (a start source instead of `template`). */
  snapshotName?: string;
  /** Seed 002: pins the snapshot ID `snapshotName` must be. */
  snapshotId?: string;
  /** Seed 002: a region the operator configured. */
  region?: string;
  /** Seed 002: record commands and terminal sessions. */
  recording?: boolean;
  /** Seconds between periodic snapshots (0: off; 10 to 86400). */
  snapshotInterval?: number;
  /** Guest path → volume (at most 8). */
  mounts?: Record<string, MountOpts>;
}

const CREATE_KEYS = new Set<string>([
  "template", "timeout", "waitReady", "envVars", "envs", "metadata", "resources",
  "allowInternetAccess", "network", "egress", "secure", "securityPolicy", "lifecycle",
  "onTimeout", "autoResume", "idleTimeout", "autoPause", "warmPoolMode", "warmPool",
  "imageName", "imageId", "snapshotName", "snapshotId", "region", "recording",
  "snapshotInterval", "mounts", "apiKey", "domain", "requestTimeoutMs",
]);

/** Names people bring from elsewhere, and what to send instead. */
const INSTEAD: Record<string, string> = {
  timeoutMs: "timeout (seconds)",
  templateID: "template (or the first argument)",
  templateId: "template (or the first argument)",
  env: "envVars",
  allow_internet_access: "allowInternetAccess",
  security_policy: "securityPolicy",
  on_timeout: "onTimeout",
  auto_resume: "autoResume",
  warm_pool_mode: "warmPoolMode",
  wait_ready: "waitReady",
  volumeMounts: "mounts",
  volume_mounts: "mounts",
  api_key: "apiKey",
  request_timeout: "requestTimeoutMs",
  requestTimeout: "requestTimeoutMs (milliseconds)",
};

/**
 * What kind of value `v` is ("an object", "an array", "a string", "null"), for error
 * messages: they name a field and the type it needs, never the caller's values (which
 * may be secrets: environment variables, metadata, policies).
 */
export function kindOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (v === undefined) return "undefined";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

/** @internal Refuses option keys a call does not know, naming what to send instead. */
export function checkKeys(what: string, opts: object, known: Set<string>): void {
  for (const key of Object.keys(opts)) {
    if (known.has(key)) continue;
    const hint = INSTEAD[key];
    throw invalid(
      hint
        ? `${what} has no option ${key}; send ${hint}`
        : `${what} has no option ${key}; it takes ${[...known].join(", ")}`,
    );
  }
}

function strings(name: string, value: unknown): string[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || !value.every((v) => typeof v === "string")) {
    throw invalid(
      `${name} must be an array of strings (IPs, CIDRs or domains), e.g. ["10.0.0.0/8", "example.com"]; got ${JSON.stringify(value)}`,
    );
  }
  return value.map((v) => v.trim());
}

function oneOf<T>(name: string, first: T | undefined, otherName: string, other: T | undefined): T | undefined {
  if (first !== undefined && other !== undefined && first !== other) {
    throw invalid(`${name}=${JSON.stringify(first)} and ${otherName}=${JSON.stringify(other)} disagree; send one of them`);
  }
  return first !== undefined ? first : other;
}

/**
 * Whether `resources` asks for anything: undefined, null and `{}` send nothing (the
 * template's shape applies), as in the Python SDK. Anything else is checked by
 * {@link resourcesBody}.
 */
export function hasResources(resources: unknown): resources is ResourcesOpts {
  if (resources === undefined || resources === null) return false;
  return !(typeof resources === "object" && !Array.isArray(resources) && Object.keys(resources).length === 0);
}

/** `resources` with the SDK's aliases as the API's keys (defaults filled in). */
export function resourcesBody(resources: ResourcesOpts): { vcpus: number; memMiB: number; diskSizeMiB: number } {
  if (!resources || typeof resources !== "object") {
    throw invalid(`resources must be an object such as { cpu: 1, memoryMb: 512, diskMb: 1024 }; got ${kindOf(resources)}`);
  }
  const known = new Set(["vcpus", "cpu", "memMiB", "memoryMb", "diskSizeMiB", "diskMb"]);
  const unknown = Object.keys(resources).filter((k) => !known.has(k));
  if (unknown.length) {
    throw invalid(
      `resources has unknown keys ${JSON.stringify(unknown.sort())}; send vcpus (or cpu), memMiB (or memoryMb), diskSizeMiB (or diskMb)`,
    );
  }
  const r = resources as Record<string, number | undefined>;
  return {
    vcpus: oneOf("resources.vcpus", r.vcpus, "resources.cpu", r.cpu) ?? 2,
    memMiB: oneOf("resources.memMiB", r.memMiB, "resources.memoryMb", r.memoryMb) ?? 2048,
    diskSizeMiB: oneOf("resources.diskSizeMiB", r.diskSizeMiB, "resources.diskMb", r.diskMb) ?? 8192,
  };
}

/** An egress policy with defaults: internet on, nothing listed. */
export function egressBody(egress: EgressOpts = {}): EgressPolicy {
  if (!egress || typeof egress !== "object") {
    throw invalid(`egress must be an object { internet, allow, deny }; got ${kindOf(egress)}`);
  }
  checkKeys("egress", egress, new Set(["internet", "allow", "deny"]));
  if (egress.internet !== undefined && typeof egress.internet !== "boolean") {
    throw invalid(`egress.internet must be true or false; got ${JSON.stringify(egress.internet)}`);
  }
  return {
    internet: egress.internet ?? true,
    allow: strings("egress.allow", egress.allow),
    deny: strings("egress.deny", egress.deny),
  };
}

const ALL_V4 = "0.0.0.0/0";
const ALL_V6 = "::/0";

/** The REST `egress` policy a seed 001 network configuration stands for. */
export function networkEgress(network: SandboxNetworkOpts): EgressPolicy {
  if (!network || typeof network !== "object" || Array.isArray(network)) {
    throw invalid(`network must be an object { allowOut, denyOut }; got ${kindOf(network)}`);
  }
  const unknown = Object.keys(network).filter((k) => k !== "allowOut" && k !== "denyOut");
  if (unknown.length) {
    throw invalid(
      `network has unknown keys ${JSON.stringify(unknown.sort())}; send allowOut and denyOut (arrays of IPs, CIDRs, domains)`,
    );
  }
  const allow = strings("network.allowOut", network.allowOut);
  const denyOut = strings("network.denyOut", network.denyOut);
  const closed = denyOut.includes(ALL_V4);
  const deny = denyOut.filter((d) => d !== ALL_V4 && !(closed && d === ALL_V6));
  for (const a of allow) {
    for (const d of deny) {
      if (covers(d, a)) {
        throw invalid(
          `network.allowOut "${a}" is inside network.denyOut "${d}", and a deny rule wins here; ` +
            `remove "${a}" from allowOut or narrow "${d}"`,
        );
      }
    }
  }
  return { internet: !closed, allow, deny };
}

interface Net {
  v: 4 | 6;
  bits: bigint;
  prefix: number;
}

function parseV4(s: string): bigint | null {
  const parts = s.split(".");
  if (parts.length !== 4) return null;
  let out = 0n;
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
    out = (out << 8n) | BigInt(Number(p));
  }
  return out;
}

function parseV6(s: string): bigint | null {
  if (!/^[0-9a-fA-F:.]+$/.test(s) || !s.includes(":")) return null;
  let tail: bigint | null = null;
  let text = s;
  const lastColon = s.lastIndexOf(":");
  if (s.slice(lastColon + 1).includes(".")) {
    tail = parseV4(s.slice(lastColon + 1));
    if (tail === null) return null;
    text = s.slice(0, lastColon + 1) + "0:0";
  }
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const head = halves[0] ? halves[0].split(":") : [];
  const rest = halves.length === 2 && halves[1] ? halves[1].split(":") : [];
  const missing = 8 - head.length - rest.length;
  if ((halves.length === 1 && missing !== 0) || missing < 0) return null;
  const groups = [...head, ...Array(halves.length === 2 ? missing : 0).fill("0"), ...rest];
  let out = 0n;
  for (const g of groups) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
    out = (out << 16n) | BigInt(parseInt(g, 16));
  }
  if (tail !== null) out = (out & ~0xffffffffn) | tail;
  return out;
}

function parseNet(s: string): Net | null {
  const [addr, pfx, extra] = s.split("/");
  if (extra !== undefined || addr === undefined) return null;
  const v4 = parseV4(addr);
  const v: 4 | 6 = v4 !== null ? 4 : 6;
  const bits = v4 ?? parseV6(addr);
  if (bits === null) return null;
  const max = v === 4 ? 32 : 128;
  const prefix = pfx === undefined ? max : /^\d+$/.test(pfx) ? Number(pfx) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return null;
  const mask = prefix === 0 ? 0n : ((1n << BigInt(prefix)) - 1n) << BigInt(max - prefix);
  return { v, bits: bits & mask, prefix };
}

/** Whether destination rule `deny` matches everything `allow` names. */
export function covers(deny: string, allow: string): boolean {
  const d = parseNet(deny);
  const a = parseNet(allow);
  if (d && a) {
    if (d.v !== a.v || a.prefix < d.prefix) return false;
    const max = d.v === 4 ? 32 : 128;
    const mask = d.prefix === 0 ? 0n : ((1n << BigInt(d.prefix)) - 1n) << BigInt(max - d.prefix);
    return (a.bits & mask) === d.bits;
  }
  const dn = deny.toLowerCase().replace(/\.$/, "");
  const an = allow.toLowerCase().replace(/\.$/, "");
  if (dn.startsWith("*.")) {
    const suffix = dn.slice(1);
    return an.endsWith(suffix) && an !== suffix.slice(1);
  }
  return dn === an;
}

function lifecycleOf(value: unknown): SandboxLifecycle {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) {
    throw invalid(`lifecycle must be an object { onTimeout, autoResume, idleTimeout }; got ${kindOf(value)}`);
  }
  const unknown = Object.keys(value).filter((k) => !["onTimeout", "autoResume", "idleTimeout"].includes(k));
  if (unknown.length) {
    throw invalid(`lifecycle has unknown keys ${JSON.stringify(unknown.sort())}; send onTimeout, autoResume and idleTimeout`);
  }
  return { ...(value as SandboxLifecycle) };
}

/** A mount as the API takes it. */
export function mountBody(m: MountOpts): { id: string; type: "rw" | "ro" } {
  if (typeof m === "string") return { id: m, type: "rw" };
  if (!m || typeof m !== "object" || typeof m.id !== "string") {
    throw invalid(`a mount is a volume ID or name, or { id, type: "rw" | "ro" }; got ${JSON.stringify(m)}`);
  }
  return { id: m.id, type: m.type ?? "rw" };
}

function record(name: string, value: unknown): Record<string, string> | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "object" || Array.isArray(value) || !Object.values(value).every((v) => typeof v === "string")) {
    throw invalid(`${name} must be an object of strings, e.g. { FOO: "bar" }; got ${kindOf(value)}${
      value && typeof value === "object" && !Array.isArray(value) ? " with a value that is not a string" : ""
    }`);
  }
  return value as Record<string, string>;
}

/**
 * The REST create body for `Sandbox.create(template, opts)`. The start source is
 * `template` (default `base`), `imageName` or `snapshotName`: exactly one.
 */
export function createBody(template: string | undefined, opts: SandboxOpts = {}): Record<string, unknown> {
  if (typeof opts !== "object" || opts === null || Array.isArray(opts)) {
    throw invalid(`Sandbox.create's options must be an object, e.g. { timeout: 300 }; got ${kindOf(opts)}`);
  }
  checkKeys("Sandbox.create", opts, CREATE_KEYS);
  if (template !== undefined && typeof template !== "string") {
    throw invalid(`template must be a template ID or name such as "base"; got ${JSON.stringify(template)}`);
  }
  const tpl = oneOf("template (first argument)", template, "opts.template", opts.template);
  const sources = (
    [
      ["template", tpl],
      ["imageName", opts.imageName],
      ["snapshotName", opts.snapshotName],
    ] as const
  )
    .filter(([, v]) => v !== undefined)
    .map(([n]) => n);
  if (sources.length > 1) throw invalid(`${sources.join(" and ")} are each a start source; send one of them`);
  if (opts.imageId !== undefined && opts.imageName === undefined) {
    throw invalid("imageId pins the build of imageName; send it with imageName");
  }
  if (opts.snapshotId !== undefined && opts.snapshotName === undefined) {
    throw invalid("snapshotId pins the snapshot of snapshotName; send it with snapshotName");
  }
  const body: Record<string, unknown> = {};
  if (opts.imageName !== undefined) {
    body.imageName = opts.imageName;
    if (opts.imageId !== undefined) body.imageId = opts.imageId;
  } else if (opts.snapshotName !== undefined) {
    body.snapshotName = opts.snapshotName;
    if (opts.snapshotId !== undefined) body.snapshotId = opts.snapshotId;
  } else {
    body.templateID = tpl ?? "base";
  }
  if (opts.region !== undefined) body.region = opts.region;
  if (opts.recording !== undefined) body.recording = Boolean(opts.recording);

  // Network: `network` overrides `allowInternetAccess` (seed 001); `egress` is the REST
  // form, and two sources of one policy are a mistake, not a merge.
  if (opts.egress !== undefined && (opts.network !== undefined || opts.allowInternetAccess !== undefined)) {
    throw invalid("egress and network/allowInternetAccess both set the network policy; send one of them");
  }
  if (opts.network !== undefined) {
    body.egress = networkEgress(opts.network);
  } else if (opts.allowInternetAccess !== undefined) {
    if (typeof opts.allowInternetAccess !== "boolean") {
      throw invalid(`allowInternetAccess must be true or false; got ${JSON.stringify(opts.allowInternetAccess)}`);
    }
    if (!opts.allowInternetAccess) body.egress = egressBody({ internet: false });
  } else if (opts.egress !== undefined) {
    body.egress = egressBody(opts.egress);
  }

  if (opts.secure === false && opts.securityPolicy !== undefined) {
    throw invalid("secure: false turns the security proxy off, but securityPolicy configures it; send one of them");
  }
  if (opts.securityPolicy !== undefined) body.securityPolicy = securityPolicyBody(opts.securityPolicy);
  else if (opts.secure) body.securityPolicy = {};

  if (opts.mounts !== undefined) {
    if (typeof opts.mounts !== "object" || opts.mounts === null || Array.isArray(opts.mounts)) {
      throw invalid(`mounts must be an object of guest path → volume, e.g. { "/mnt/work": "work" }; got ${kindOf(opts.mounts)}`);
    }
    const entries = Object.entries(opts.mounts);
    if (entries.length) body.mounts = Object.fromEntries(entries.map(([p, m]) => [p, mountBody(m)]));
  }
  if (opts.snapshotInterval !== undefined) body.snapshotInterval = opts.snapshotInterval;
  const mode = oneOf("warmPool", opts.warmPool, "warmPoolMode", opts.warmPoolMode);
  if (mode !== undefined) {
    if (mode !== "require" && mode !== "prefer") {
      throw invalid(`warmPoolMode ${JSON.stringify(mode)} is not a mode; send "require" or "prefer"`);
    }
    body.warmPool = mode;
  }
  if (opts.timeout !== undefined) body.timeout = opts.timeout;
  const metadata = record("metadata", opts.metadata);
  if (metadata && Object.keys(metadata).length) body.metadata = metadata;
  const envVars = record("envVars", opts.envVars);
  const envs = record("envs", opts.envs);
  if (envVars && envs && JSON.stringify(envVars) !== JSON.stringify(envs)) {
    throw invalid("envVars and envs are the same setting and disagree; send one of them");
  }
  const env = envVars ?? envs;
  if (env && Object.keys(env).length) body.envVars = env;
  if (opts.autoPause !== undefined) body.autoPause = opts.autoPause;

  const lc = lifecycleOf(opts.lifecycle);
  lc.onTimeout = oneOf("lifecycle.onTimeout", lc.onTimeout, "onTimeout", opts.onTimeout);
  lc.autoResume = oneOf("lifecycle.autoResume", lc.autoResume, "autoResume", opts.autoResume);
  lc.idleTimeout = oneOf("lifecycle.idleTimeout", lc.idleTimeout, "idleTimeout", opts.idleTimeout);
  if (lc.onTimeout !== undefined && !["kill", "pause", "hibernate"].includes(lc.onTimeout)) {
    throw invalid(`onTimeout ${JSON.stringify(lc.onTimeout)} is not a timeout action; send "kill", "pause" or "hibernate"`);
  }
  const wire = Object.fromEntries(
    (
      [
        ["onTimeout", lc.onTimeout],
        ["autoResume", lc.autoResume],
        ["idleTimeout", lc.idleTimeout],
      ] as const
    ).filter(([, v]) => v !== undefined),
  );
  if (Object.keys(wire).length) body.lifecycle = wire;
  if (hasResources(opts.resources)) body.resources = resourcesBody(opts.resources);
  if (opts.waitReady === false) body.waitReady = false;
  return body;
}

/** @internal `fields=` for the REST API, checked; undefined without a projection. */
export function fieldsQuery(fields: unknown): string | undefined {
  if (fields === undefined) return undefined;
  if (!Array.isArray(fields) || !fields.length || !fields.every((f) => typeof f === "string" && f.trim())) {
    throw invalid(`fields must be a non-empty array of names, e.g. ["id", "status"]; got ${JSON.stringify(fields)}`);
  }
  return fields.map((f: string) => f.trim()).join(",");
}

/** @internal A projected sandbox with exactly the names asked for. */
export function onlyFields(doc: Record<string, unknown>, fields: string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of fields.map((x) => x.trim())) if (f in doc) out[f] = doc[f];
  return out;
}

/** @internal `start`/`end` (Dates or Unix seconds) as the metrics query. */
export function metricsQuery(start: unknown, end: unknown): Record<string, number> {
  const unix = (name: string, v: unknown, up: boolean): number => {
    let s: number;
    if (v instanceof Date) s = v.getTime() / 1000;
    else if (typeof v === "number" && Number.isFinite(v)) s = v;
    else throw invalid(`${name} must be a Date or Unix seconds; got ${JSON.stringify(v)}`);
    return up ? Math.ceil(s) : Math.floor(s);
  };
  const q: Record<string, number> = {};
  if (start !== undefined) q.start = unix("start", start, false);
  if (end !== undefined) q.end = unix("end", end, true);
  return q;
}

/** @internal A TCP port, checked. */
export function checkPort(port: unknown): number {
  if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw invalid(`port must be an integer from 1 to 65535; got ${JSON.stringify(port)}`);
  }
  return port;
}
