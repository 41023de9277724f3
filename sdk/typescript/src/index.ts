/**
 * The Nullspace SDK for TypeScript and JavaScript: self-hosted microVM sandboxes.
 *
 * ```ts
 * import { Sandbox } from "nullspace";
 * const sandbox = await Sandbox.create("base", { timeout: 600 });
 * const result = await sandbox.commands.run("echo hi", { onStdout: (d) => process.stdout.write(d) });
 * await sandbox.kill();
 * ```
 *
 * Configuration: `NULLSPACE_API_URL` and `NULLSPACE_API_KEY`, else the dev stack's
 * `~/.local/state/nullspace/dev.env`; per call `apiKey`, `domain`, `requestTimeoutMs`.
 *
 * @packageDocumentation
 */

export { Sandbox } from "./sandbox.js";
export type {
  ConnectOpts,
  ForkOpts,
  ListOpts,
  ProjectedPage,
  RestoreOpts,
  RunOnceOpts,
  SandboxPage,
  SandboxQuery,
  VolumeInheritance,
} from "./sandbox.js";
export { Snapshot } from "./snapshots.js";
export { Commands, CommandHandle, SIGNALS, signalNumber } from "./commands.js";
export type { RunOpts, WaitOpts } from "./commands.js";
export { Filesystem } from "./files.js";
export type { FilesystemEvent, PresignedUrl, WatchOpts, WriteData, WriteInfo } from "./files.js";
export { Pty, PtyHandle } from "./pty.js";
export { Execution, ExecutionError, Result } from "./code.js";
export type { CodeCallbacks, CodeContext, CodeContextOpts, CodeLanguage, Logs, ResultFormat, RunCodeOpts } from "./code.js";
export { Desktop } from "./desktop.js";
export type { ViewerUrlOpts, WindowInfo } from "./desktop.js";
export type { PtyCreateOpts } from "./pty.js";
export type { StreamEventsOpts } from "./events.js";
export { Template } from "./templates.js";
export type { BuildFailure, BuildLogLine, BuildOpts, BuildStep, TemplateInfo, WaitBuiltOpts, WarmPool } from "./templates.js";
export { Volume } from "./volumes.js";
export type { VolumeInfo } from "./volumes.js";
export {
  PREVIEW_PROXY_HEADER,
  PREVIEW_TOKEN_PARAM,
  redactPreviewToken,
  redactPreviewUrl,
} from "./previews.js";
export type { Preview, PreviewProxyTarget } from "./previews.js";
export { securityPolicyBody } from "./security.js";
export type {
  AuditDetection,
  AuditPage,
  AuditRecord,
  PiiAction,
  SecurityPolicy,
  SecurityPolicyDoc,
} from "./security.js";
export { createBody, egressBody, networkEgress, resourcesBody } from "./options.js";
export type {
  EgressOpts,
  MountOpts,
  ResourcesOpts,
  SandboxLifecycle,
  SandboxNetworkOpts,
  SandboxOpts,
} from "./options.js";
export type {
  CommandResult,
  EgressPolicy,
  EntryInfo,
  LifecycleInfo,
  LogLine,
  Migration,
  Mount,
  ProcessInfo,
  Recording,
  Resources,
  RuntimeAccess,
  SandboxEvent,
  SandboxInfo,
  SandboxMetrics,
  SandboxState,
  SnapshotInfo,
} from "./models.js";
export { Config, DEFAULT_API_URL, DEFAULT_REQUEST_TIMEOUT_MS } from "./config.js";
export type { ConnectionOpts, RequestOpts } from "./config.js";
export {
  AuthenticationError,
  BuildFailedError,
  CommandDetachedError,
  ConfigError,
  ConnectionError,
  ForbiddenError,
  InvalidRequestError,
  InvalidStateError,
  NotFoundError,
  QuotaExceededError,
  RateLimitError,
  SandboxError,
  SandboxTimeoutError,
  StreamError,
  WarmPoolUnavailableError,
  errorFor,
} from "./errors.js";
export { setWebSocketImplementation } from "./ws.js";
export type { WebSocketConstructor, WebSocketLike } from "./ws.js";
export { createSandbox, getHost, getSandbox, setTimeout } from "./seed.js";

/** The SDK's version. */
export const VERSION = "0.1.0";
