//! Rust SDK for Nullspace sandboxes.
//!
//! ```no_run
//! # async fn demo() -> nullspace::Result<()> {
//! use nullspace::{ConnectionConfig, CreateOptions, Sandbox};
//! let config = ConnectionConfig::from_env()?; // NULLSPACE_API_URL / NULLSPACE_API_KEY or dev.env
//! let sbx = Sandbox::create(&config, &CreateOptions::new("base").timeout(600)).await?;
//! let out = sbx.commands().run("python3 -c 'print(6*7)'").await?;
//! assert_eq!(out.stdout, "42\n");
//! sbx.files().write("hello.txt", "hi").await?;
//! sbx.kill().await?;
//! # Ok(()) }
//! ```
//!
//! The control plane (create, list, connect, pause, ...) goes to the public API with the
//! team's API key; commands and files go to the sandbox's data plane with the runtime
//! token the create or connect returned. [`blocking`] has the same calls without async.
//!
//! # The seed documents' names
//!
//! Code written against the seed documents' SDK (seed 001's `Sandbox.create(...)`,
//! seed 004's keyword forms) maps one to one onto this crate: each name is a builder
//! method of [`CreateOptions`] or a call on [`Sandbox`]. The REST API refuses the seeds'
//! SDK names that differ from its own (seed 003); this SDK translates them
//! ([`CreateOptions::to_body`]) and refuses combinations that would mean two things
//! (an [`Error::Local`] with code `invalid_request` that names what to send instead).
//!
//! | Seed name | Here | REST |
//! |---|---|---|
//! | `template` | [`CreateOptions::new`] | `templateID` |
//! | `timeout` | [`CreateOptions::timeout`] | `timeout` (seconds) |
//! | `metadata` | [`CreateOptions::metadata`] | `metadata` |
//! | `envs` | [`CreateOptions::env`] | `envVars` |
//! | `resources` `{"cpu", "memory_mb", "disk_mb"}` | [`CreateOptions::resources`]`(vcpus, mem_mib, disk_mib)` | `resources {vcpus, memMiB, diskSizeMiB}` |
//! | `allow_internet_access=False` | [`CreateOptions::allow_internet_access`]`(false)` | `egress {internet: false, allow: [], deny: []}` (`true`: nothing sent) |
//! | `network` (`SandboxNetworkOpts`) | [`CreateOptions::network`], [`SandboxNetworkOpts`] | `egress`: `allow` = `allow_out`; `deny` = `deny_out` without `0.0.0.0/0` / `::/0`, whose presence sets `internet: false` |
//! | `secure=True` | [`CreateOptions::secure`]`(true)` | `securityPolicy: {}` (interception with the audit only; `false`: nothing sent) |
//! | `security_policy` (`SecurityPolicy`) | [`CreateOptions::security_policy`], [`SecurityPolicy`] | `securityPolicy {pii, injectionDefense, transforms, audit, envMasking}` (a masked secret's value in `envVars`) |
//! | the policy, live | [`Sandbox::set_security_policy`]; [`SandboxInfo::security_policy`] | `PUT /sandboxes/:id/security-policy`; `securityPolicy` |
//! | the audit | [`Sandbox::audit_page`] → [`AuditPage`] of [`AuditRecord`], [`Sandbox::audit_all`], [`Sandbox::follow_audit`] | `GET /sandboxes/:id/audit?after=&limit=` → `{records, next, more}` |
//! | `lifecycle` (`SandboxLifecycle`) | [`CreateOptions::lifecycle`], [`SandboxLifecycle`] | `lifecycle {onTimeout, autoResume}` |
//! | `on_timeout=` (seed 004) | [`CreateOptions::on_timeout`] | `lifecycle.onTimeout` |
//! | `auto_resume=` (seed 004) | [`CreateOptions::auto_resume`] | `lifecycle.autoResume` |
//! | `warm_pool_mode=` (seed 004) | [`CreateOptions::warm_pool_mode`] (= [`CreateOptions::warm_pool`]) | `warmPool` |
//! | `wait_ready=False` | [`CreateOptions::wait_ready`]`(false)`, then [`Sandbox::wait_ready`] | `waitReady: false` |
//! | `api_key`, `domain` (`host:port`), `request_timeout` | [`ConnectionConfig::with_api_key`], [`ConnectionConfig::with_domain`], [`ConnectionConfig::with_request_timeout`] | `X-API-Key` header, base URL, HTTP timeout |
//! | `fields=["id", "status"]` | [`Sandbox::list_fields`], [`Sandbox::get_info_by_id_fields`] | `?fields=id,status` |
//! | `get_host(port)` / `getHost` | [`Sandbox::get_host`] | `POST /sandboxes/:id/previews {port}` → `host` |
//! | `get_metrics(start, end)` | [`Sandbox::get_metrics`] with [`MetricsTime`] (Unix seconds or `SystemTime`) | `GET /sandboxes/:id/metrics?start=&end=` (Unix seconds) |
//! | `snapshot()` → `Snapshot` | [`Sandbox::snapshot`] → [`Snapshot`] (`restore`, `delete`) | `POST /sandboxes/:id/snapshots` |
//! | `create_snapshot()` → `SnapshotInfo` | [`Sandbox::create_snapshot`] | `POST /sandboxes/:id/snapshots` |
//! | `lifecycle.idle_timeout`, `idle_timeout=` (seed 000) | [`SandboxLifecycle::idle_timeout`], [`CreateOptions::idle_timeout`] | `lifecycle.idleTimeout` |
//! | `imageName` / `imageId` (seed 002) | [`CreateOptions::image`]`(name, pin)` | `imageName`, `imageId` |
//! | `snapshotName` / `snapshotId` (seed 002) | [`Sandbox::snapshot_named`], then [`CreateOptions::snapshot_named`]`(name, pin)` | `POST …/snapshots {name}`; `snapshotName`, `snapshotId` |
//! | `region` (seed 002) | [`CreateOptions::region`] | `region` |
//! | `recording` (seed 002) | [`CreateOptions::recording`], [`Sandbox::recordings`], [`Sandbox::recording`] | `recording`; `GET …/recordings`, `GET …/recordings/:rid` |
//! | `files.presign` (seed 002) | [`Files::presign`] → [`Presigned`] | `POST …/files/presign {path, method, expires}` |
//! | logs (seed 003) | [`Sandbox::logs`], [`Sandbox::logs_page`] | `GET /sandboxes/:id/logs?offset=&limit=` |
//! | `run_code` (seed 000's code-interpreter template) | [`Sandbox::run_code`] → [`Execution`], [`Sandbox::create_code_context`] | the template's `nullspace-code` helper through `POST …/commands` (docs/TEMPLATES.md) |
//!
//! Conflicts refused before sending: `network` with `egress`; `allow_internet_access`
//! `false` with `egress`; `secure` `false` with `security_policy`; `lifecycle.on_timeout`
//! / `lifecycle.auto_resume` with a different `on_timeout=` / `auto_resume=`;
//! `warm_pool` with a different `warm_pool_mode`; an `allow_out` entry inside a
//! `deny_out` entry (the seed lets allow win, this API lets deny win); a
//! [`SecurityPolicy`] part of the wrong JSON type. `network`
//! overrides `allow_internet_access` without an error, as seed 001 says.
//!
//! ```no_run
//! # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
//! use nullspace::{CreateOptions, OnTimeout, Sandbox, SandboxNetworkOpts, WarmPoolMode};
//! // Seed 001: Sandbox.create(template="base", allow_internet_access=False)
//! let offline = Sandbox::create(config, &CreateOptions::new("base").allow_internet_access(false)).await?;
//! // Seed 001: network=SandboxNetworkOpts(allow_out=["203.0.113.7"], deny_out=["0.0.0.0/0"])
//! let net = SandboxNetworkOpts::new().allow_out("203.0.113.7").deny_out("0.0.0.0/0");
//! let fenced = Sandbox::create(config, &CreateOptions::new("base").network(net)).await?;
//! // Seed 004: on_timeout="pause", auto_resume=True, warm_pool_mode="prefer"
//! let napping = Sandbox::create(
//!     config,
//!     &CreateOptions::new("base")
//!         .on_timeout(OnTimeout::Pause)
//!         .auto_resume(true)
//!         .warm_pool_mode(WarmPoolMode::Prefer),
//! )
//! .await?;
//! # Ok(()) }
//! ```

pub mod blocking;
mod code;
mod commands;
mod config;
mod create;
mod desktop;
mod error;
mod files;
mod live;
mod models;
mod sandbox;
mod security;
mod snapshot;
mod templates;
mod time;
mod volumes;

pub use api_model::{
    EgressPolicy, InheritVolumes, Inherited, MigrateBody, Migration, Mount, MountMode, MountRequest,
};
pub use code::{
    CodeContext, CodeOptions, CodeResult, Execution, ExecutionError, Logs as ExecutionLogs,
    ResultCallback, CODE_HELPER,
};
pub use commands::{CommandHandle, Commands, OutputCallback, RunOptions};
pub use config::{ConnectionConfig, DEFAULT_REQUEST_TIMEOUT};
pub use create::{
    CreateOptions, Lifecycle, OnTimeout, SandboxLifecycle, SandboxNetworkOpts, SecurityPolicy,
    WarmPoolMode,
};
pub use desktop::{
    desktop_viewer_url, parse_windows, Desktop, Window, DESKTOP_VIEWER_PORT, DESKTOP_VIEW_ONLY_PORT,
};
pub use error::{Error, Result};
pub use files::{Files, Presigned};
pub use live::{
    redact_preview_token, redact_preview_url, Event, EventStream, EventStreamOptions, FsEvent,
    LogLine, Metric, MetricTimestamp, MetricsTime, PortConnection, Preview, ProxyTarget, Pty,
    PtyEvent, Recording, SandboxMetrics, Watch,
};
pub use models::{
    CommandResult, Diagnostic, FileInfo, ListQuery, ProcessInfo, Resources, RestoreOptions,
    RuntimeAccess, RuntimeTarget, SandboxInfo, SandboxPage, SnapshotInfo, TimelineStep,
};
pub use sandbox::{FieldsPage, Sandbox};
pub use security::{AuditDetection, AuditFollow, AuditPage, AuditRecord, MAX_AUDIT_PAGE};
pub use snapshot::Snapshot;
pub use templates::{
    BuildFailure, BuildLogLine, BuildLogPage, BuildStep, FileSpec, StepStatus, StepView, Template,
    TemplateBuild, TemplateStatus, Templates, WarmPool, WarmPoolSettings,
};
pub use volumes::{Volume, Volumes};
