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

pub mod blocking;
mod commands;
mod config;
mod error;
mod files;
mod live;
mod models;
mod sandbox;
mod templates;
mod volumes;

pub use api_model::{EgressPolicy, Mount, MountMode, MountRequest};
pub use commands::{CommandHandle, Commands, OutputCallback, RunOptions};
pub use config::{ConnectionConfig, DEFAULT_REQUEST_TIMEOUT};
pub use error::{Error, Result};
pub use files::Files;
pub use live::{
    redact_preview_token, redact_preview_url, Event, EventStream, EventStreamOptions, FsEvent,
    LogLine, Metric, PortConnection, Preview, ProxyTarget, Pty, PtyEvent, Watch,
};
pub use models::{
    CommandResult, CreateOptions, Diagnostic, FileInfo, Lifecycle, ListQuery, OnTimeout,
    ProcessInfo, Resources, RestoreOptions, RuntimeAccess, RuntimeTarget, SandboxInfo, SandboxPage,
    SnapshotInfo, TimelineStep, WarmPoolMode,
};
pub use sandbox::Sandbox;
pub use templates::{
    BuildFailure, BuildLogLine, BuildLogPage, BuildStep, FileSpec, StepStatus, StepView, Template,
    TemplateBuild, TemplateStatus, Templates, WarmPool, WarmPoolSettings,
};
pub use volumes::{Volume, Volumes};
