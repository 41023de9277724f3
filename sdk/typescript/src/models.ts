/**
 * What the API describes, with JavaScript's names: `sandboxID` becomes `sandboxId`,
 * `templateID` `templateId`, and so on; everything else keeps the REST name.
 *
 * @module
 */

import type { SecurityPolicyDoc } from "./security.js";

/** A sandbox's public state. */
export type SandboxState = "starting" | "running" | "paused" | "deleted" | "error";

/** A VM shape as the API reports it. */
export interface Resources {
  /** Virtual CPUs. */
  vcpus: number;
  /** Memory, MiB. */
  memMiB: number;
  /** Root disk, MiB. */
  diskSizeMiB: number;
}

/** Where a sandbox's data plane is and the bearer token for it. */
export interface RuntimeAccess {
  /** Where the data plane is: `baseUrl` is the sandbox's. */
  target: { transport: string; host: string; baseUrl: string };
  /** The bearer token for the data plane. */
  token: string;
  /** When the token expires (ISO 8601); `connect` issues a fresh one. */
  tokenExpiresAt: string;
}

/** An egress policy: `internet` off leaves only `allow` reachable; `deny` always wins. */
export interface EgressPolicy {
  /** False: only `allow` is reachable. */
  internet: boolean;
  /** Reachable destinations. */
  allow: string[];
  /** Blocked destinations (deny wins). */
  deny: string[];
}

/** A volume mounted in a sandbox. */
export interface Mount {
  /** The guest path. */
  path: string;
  /** The volume mounted there. */
  volumeId: string;
  /** `rw` (one holder) or `ro`. */
  type: "rw" | "ro";
  /** A fork child's or restored copy's mount: where it came from, and how. */
  inherited?: { fromSandboxId: string; fromVolumeId: string; how: "readonly" | "copy" };
}

/** What the timeout does, as the API reports it. */
export interface LifecycleInfo {
  /** What the timeout does. */
  onTimeout?: "kill" | "pause" | "hibernate";
  /** Traffic and SDK calls wake it once paused. */
  autoResume?: boolean;
  /** Seconds idle before `onTimeout` (0: off). */
  idleTimeout?: number;
}

/** A sandbox as the API describes it. */
export interface SandboxInfo {
  /** Its ID (`sbx-…`). */
  sandboxId: string;
  /** The template it started from. */
  templateId: string;
  /** `starting`, `running`, `paused`, `deleted` or `error`. */
  state: SandboxState;
  /** The metadata it was created with. */
  metadata: Record<string, string>;
  /** Seconds. */
  timeout: number;
  /** ISO 8601. */
  createdAt: string;
  /** ISO 8601. */
  expiresAt: string;
  /** Its VM shape. */
  resources?: Resources;
  /** What its timeout does. */
  lifecycle?: LifecycleInfo;
  /** Timestamped lifecycle steps. */
  timeline: Array<{ at: string; step: string; detail?: string }>;
  /** Why it failed and what to do, if it did. */
  diagnostic?: { code?: string; message?: string; action?: string } | null;
  /** Data-plane access; only while it runs. */
  runtime?: RuntimeAccess | null;
  /** Seconds between periodic snapshots (0: off). */
  snapshotInterval: number;
  /** Paused into object storage. */
  hibernated: boolean;
  /** Its egress policy. */
  egress?: EgressPolicy;
  /** Its mounted volumes. */
  mounts: Mount[];
  /** Its commands and terminal sessions are recorded. */
  recording: boolean;
  /**
   * Its security policy as the API keeps it (masked secrets with their generated
   * `placeholder`, never a real value); undefined without one.
   */
  securityPolicy?: SecurityPolicyDoc;
  /** The host that runs it (operators of a cluster). */
  hostId?: string;
  /** Its page in the dashboard. */
  dashboardUrl?: string;
}

type Doc = Record<string, any>;

/** @internal A REST sandbox as a {@link SandboxInfo}. */
export function parseSandbox(doc: Doc): SandboxInfo {
  const info: SandboxInfo = {
    sandboxId: doc.sandboxID,
    templateId: doc.templateID ?? "",
    state: doc.state ?? "",
    metadata: doc.metadata ?? {},
    timeout: doc.timeout ?? 0,
    createdAt: doc.createdAt ?? "",
    expiresAt: doc.expiresAt ?? "",
    timeline: doc.timeline ?? [],
    snapshotInterval: doc.snapshotInterval ?? 0,
    hibernated: Boolean(doc.hibernated),
    mounts: (doc.mounts ?? []).map((m: Doc) => ({
      path: m.path,
      volumeId: m.volumeID,
      type: m.type,
      ...(m.inherited
        ? { inherited: { fromSandboxId: m.inherited.fromSandboxID, fromVolumeId: m.inherited.fromVolumeID, how: m.inherited.how } }
        : {}),
    })),
    recording: Boolean(doc.recording),
  };
  const optional: Array<[keyof SandboxInfo, unknown]> = [
    ["resources", doc.resources],
    ["lifecycle", doc.lifecycle],
    ["diagnostic", doc.diagnostic],
    ["runtime", doc.runtime],
    ["egress", doc.egress],
    ["securityPolicy", doc.securityPolicy],
    ["hostId", doc.hostID],
    ["dashboardUrl", doc.dashboardUrl],
  ];
  for (const [k, v] of optional) if (v !== undefined) (info as unknown as Doc)[k] = v;
  return info;
}

/** A snapshot: a sandbox's memory, processes and disk at one instant. */
/** What a live migration did (`Sandbox.migrate`). */
export interface Migration {
  sandboxId: string;
  /** The host it left. */
  from: string;
  /** The host it runs on now. */
  to: string;
  /** How long the guest stood still: the last pass of RAM and the hand-over. */
  downtimeMs: number;
  /** The whole move, from the request. */
  totalMs: number;
  /** Bytes of RAM and device state sent. */
  ramBytes: number;
  /** Bytes of disk copied. */
  diskBytes: number;
  /** Passes over RAM. */
  passes: number;
  /** Whether it switched to post-copy (the guest ran on the destination before all its RAM arrived). */
  postcopy: boolean;
}

export interface SnapshotInfo {
  /** Works as a template: `Sandbox.create(snapshotId)`. */
  snapshotId: string;
  /** The sandbox it was taken of. */
  sandboxId: string;
  /** The template that sandbox started from. */
  templateId: string;
  /** `pause` (taken on pause), `periodic` or `manual`. */
  kind: "pause" | "periodic" | "manual";
  /** ISO 8601. */
  createdAt: string;
  /** Bytes a restore materializes. */
  sizeBytes: number;
  /** Bytes of data it references in the store. */
  storedBytes: number;
  /** `object` (any worker sharing the store) or `local` (this worker's pause snapshot). */
  storage: "object" | "local";
  /** The VM shape it restores with. */
  resources?: Resources;
  /** The team-unique name it was given, if any (a start source: `snapshotName`). */
  name?: string;
  /** Only on the snapshot just taken: the bytes it sent to the store (what the store lacked of it). */
  uploadedBytes?: number;
}

/** @internal */
export function parseSnapshot(doc: Doc): SnapshotInfo {
  const s: SnapshotInfo = {
    snapshotId: doc.snapshotID,
    sandboxId: doc.sandboxID ?? "",
    templateId: doc.templateID ?? "",
    kind: doc.kind,
    createdAt: doc.createdAt ?? "",
    sizeBytes: doc.sizeBytes ?? 0,
    storedBytes: doc.storedBytes ?? 0,
    storage: doc.storage,
  };
  if (doc.resources) s.resources = doc.resources;
  if (doc.name !== undefined && doc.name !== null) s.name = doc.name;
  if (typeof doc.uploadedBytes === "number") s.uploadedBytes = doc.uploadedBytes;
  return s;
}

/** How a command ended, with its output. */
export interface CommandResult {
  /** Everything it wrote to stdout (UTF-8; invalid bytes replaced). */
  stdout: string;
  /** Everything it wrote to stderr. */
  stderr: string;
  /** Its exit code; null when a signal ended it. */
  exitCode: number | null;
  /** The signal that ended it, if one did. */
  signal: number | null;
  /** Its process ID. */
  pid: number | null;
}

/** A file or directory in a sandbox. */
export interface EntryInfo {
  /** Its name. */
  name: string;
  /** Its path. */
  path: string;
  /** `file`, `dir`, `symlink` or `other`. */
  type: "file" | "dir" | "symlink" | "other";
  /** Size, bytes. */
  size: number;
  /** Permission bits. */
  mode: number;
  /** Seconds since the epoch. */
  mtime: number;
  /** Where a symlink points. */
  symlinkTarget?: string;
}

/** @internal */
export function parseEntry(doc: Doc): EntryInfo {
  const e: EntryInfo = {
    name: doc.name ?? "",
    path: doc.path ?? "",
    type: doc.type ?? "other",
    size: doc.size ?? 0,
    mode: doc.mode ?? 0,
    mtime: doc.mtime ?? 0,
  };
  if (doc.symlink_target) e.symlinkTarget = doc.symlink_target;
  return e;
}

/** One resource sample (every 5 s for the last hour, coarser before). */
export interface SandboxMetrics {
  /** When it was sampled. */
  timestamp: Date;
  /** CPU used, percent of its vCPUs. */
  cpuUsedPct: number;
  /** Its vCPUs. */
  cpuCount: number;
  /** Memory used, MiB. */
  memUsedMiB: number;
  /** Memory of the VM, MiB. */
  memTotalMiB: number;
  /** Root disk used, bytes. */
  diskUsedBytes: number;
  /** Root disk size, bytes. */
  diskTotalBytes: number;
  /** Bytes received. */
  netRxBytes: number;
  /** Bytes sent. */
  netTxBytes: number;
  /** Processes and threads. */
  tasks: number;
  /** The VM process's CPU on the host. */
  hostCpuPct: number;
  /** Memory used, bytes. */
  memUsed: number;
  /** Memory of the VM, bytes. */
  memTotal: number;
  /** Root disk used, bytes. */
  diskUsed: number;
  /** Root disk size, bytes. */
  diskTotal: number;
}

/** @internal */
export function parseMetrics(doc: Doc): SandboxMetrics {
  const mib = 1024 * 1024;
  return {
    timestamp: new Date((doc.timestamp ?? 0) * 1000),
    cpuUsedPct: doc.cpuUsedPct ?? 0,
    cpuCount: doc.cpuCount ?? 0,
    memUsedMiB: doc.memUsedMiB ?? 0,
    memTotalMiB: doc.memTotalMiB ?? 0,
    diskUsedBytes: doc.diskUsedBytes ?? 0,
    diskTotalBytes: doc.diskTotalBytes ?? 0,
    netRxBytes: doc.netRxBytes ?? 0,
    netTxBytes: doc.netTxBytes ?? 0,
    tasks: doc.tasks ?? 0,
    hostCpuPct: doc.hostCpuPct ?? 0,
    memUsed: (doc.memUsedMiB ?? 0) * mib,
    memTotal: (doc.memTotalMiB ?? 0) * mib,
    diskUsed: doc.diskUsedBytes ?? 0,
    diskTotal: doc.diskTotalBytes ?? 0,
  };
}

/** One lifecycle event of a sandbox (`sandbox.created`, `sandbox.paused`, ...). */
export interface SandboxEvent {
  /** 1, 2, 3 ... per sandbox. */
  id: number;
  /** ISO 8601. */
  at: string;
  /** What happened: `sandbox.created`, `sandbox.running`, `sandbox.paused`, ... */
  type: string;
  /** Details of the event. */
  data: Record<string, any>;
}

/** One line of a sandbox's logs. */
export interface LogLine {
  /** When (ISO 8601). */
  time?: string;
  /** `console`, `lifecycle`, `diagnostic`, `start`, `process`. */
  source: string;
  /** The line. */
  text: string;
  /** A background command's pid (`source: "process"`). */
  pid?: number;
  /** `stdout` or `stderr` (`source: "process"`). */
  stream?: string;
}

/** A recording of a sandbox created with `recording: true`. */
export interface Recording {
  /** Its ID (`commands.jsonl`, `pty-N.cast`). */
  recordingId: string;
  /** `commands` (JSON lines) or `pty` (asciicast v2). */
  kind: "commands" | "pty";
  /** Its size, bytes. */
  sizeBytes: number;
  /** When it started (ISO 8601). */
  createdAt: string;
  /** It reached the sandbox's 64 MiB and ends with a marker. */
  truncated: boolean;
}

/** @internal */
export function parseRecording(doc: Doc): Recording {
  return {
    recordingId: doc.recordingID,
    kind: doc.kind,
    sizeBytes: doc.sizeBytes ?? 0,
    createdAt: doc.createdAt ?? "",
    truncated: Boolean(doc.truncated),
  };
}

/** A process in a sandbox (`commands.list()`). */
export interface ProcessInfo {
  /** Its process ID. */
  pid: number;
  /** What was run (`cmd` or `argv`). */
  command: Record<string, unknown>;
  /** The user it runs as. */
  user: string;
  /** Its working directory. */
  cwd: string;
  /** Started with `background: true`. */
  background: boolean;
  /** Someone is waiting on it. */
  attached: boolean;
  /** How it ended, once it did. */
  exit?: { code: number | null; signal: number | null } | null;
}
