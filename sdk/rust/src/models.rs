//! The shapes the API answers with, and the options calls take.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

// The same shapes the API component checks requests against.
pub use api_model::Resources;

/// Data-plane address and token of a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeAccess {
    /// Where the data plane is.
    pub target: RuntimeTarget,
    /// Bearer token for it.
    pub token: String,
    /// When the token stops working (ISO 8601); `connect` gives a new one.
    pub token_expires_at: String,
}

/// The data-plane address of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeTarget {
    /// `http`.
    pub transport: String,
    /// `host:port`.
    pub host: String,
    /// Base URL of this sandbox's data-plane routes.
    pub base_url: String,
}

/// One step of a sandbox's life.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TimelineStep {
    /// When (ISO 8601).
    pub at: String,
    /// What.
    pub step: String,
    /// More, for people.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Why something failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Diagnostic {
    /// Stable code.
    pub code: String,
    /// What happened.
    pub message: String,
    /// What to do.
    pub action: String,
}

/// A sandbox as the API describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    /// Its ID.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The template it booted from.
    #[serde(rename = "templateID", default)]
    pub template_id: String,
    /// `starting`, `running`, `paused`, `deleted` or `error`.
    #[serde(default)]
    pub state: String,
    /// Its shape.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Caller's labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Lifetime in seconds.
    #[serde(default)]
    pub timeout: u64,
    /// Created (ISO 8601).
    #[serde(default)]
    pub created_at: String,
    /// Ends or pauses at (ISO 8601).
    #[serde(default)]
    pub expires_at: String,
    /// Lifecycle steps.
    #[serde(default)]
    pub timeline: Vec<TimelineStep>,
    /// Why it failed, if it did.
    #[serde(default)]
    pub diagnostic: Option<Diagnostic>,
    /// Data-plane access, while running and when asked for (create, connect).
    #[serde(default)]
    pub runtime: Option<RuntimeAccess>,
    /// Seconds between periodic snapshots (0: none).
    #[serde(default)]
    pub snapshot_interval: u64,
    /// Paused into object storage (resumable on any worker).
    #[serde(default)]
    pub hibernated: bool,
    /// What it may reach.
    #[serde(default)]
    pub egress: Option<api_model::EgressPolicy>,
    /// Its volumes.
    #[serde(default)]
    pub mounts: Vec<api_model::Mount>,
    /// Its security policy as the API keeps it (`pii`, `injectionDefense`,
    /// `transforms`, `audit`, `envMasking`; each masked secret with its generated
    /// `placeholder`, never a real value); `None` without one. See
    /// [`crate::SecurityPolicy::from_body`].
    #[serde(default)]
    pub security_policy: Option<serde_json::Value>,
    /// Its page in the web dashboard (empty from a server without one).
    #[serde(default)]
    pub dashboard_url: String,
}

/// A snapshot of a sandbox: memory, processes and disk at one instant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    /// Its ID; works as a template ID in [`crate::CreateOptions::new`].
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The sandbox it was taken of.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// That sandbox's template.
    #[serde(rename = "templateID", default)]
    pub template_id: String,
    /// `pause`, `periodic` or `manual`.
    pub kind: String,
    /// Taken (ISO 8601).
    pub created_at: String,
    /// Bytes a restore materializes.
    pub size_bytes: u64,
    /// Bytes of data it references in the store.
    #[serde(default)]
    pub stored_bytes: u64,
    /// `object` (any worker sharing the store) or `local` (this worker).
    pub storage: String,
    /// The shape a restore gets.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// The name the team gave it (a start source: [`crate::CreateOptions::snapshot_named`]).
    #[serde(default)]
    pub name: Option<String>,
    /// Only on the snapshot just taken: the bytes it sent to the store (what the store
    /// lacked of it; the rest it shares with other snapshots).
    #[serde(default)]
    pub uploaded_bytes: Option<u64>,
}

/// Options of [`crate::Sandbox::restore`].
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreOptions {
    /// The snapshot; default the newest, preferring pause, then periodic, then manual.
    #[serde(rename = "snapshotID", skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Lifetime of the new sandbox in seconds (server default 300).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Labels of the new sandbox (default: the original's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// What it does with the original's read-write volumes (server default
    /// [`crate::InheritVolumes::Readonly`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<crate::InheritVolumes>,
}

/// Filters and paging of [`crate::Sandbox::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Public states to keep (default: all but deleted).
    pub states: Vec<String>,
    /// Labels that must all match.
    pub metadata: BTreeMap<String, String>,
    /// Page size, 1 to 100.
    pub limit: Option<u32>,
    /// The previous page's `next_token`.
    pub next_token: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone, Deserialize)]
pub struct SandboxPage {
    /// The sandboxes.
    pub sandboxes: Vec<SandboxInfo>,
    /// Pass back for the next page; `None` on the last.
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
}

/// A file or directory in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileInfo {
    /// Base name.
    #[serde(default)]
    pub name: String,
    /// Full path.
    #[serde(default)]
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Permission bits.
    #[serde(default)]
    pub mode: u32,
    /// Modified, seconds since the epoch.
    #[serde(default)]
    pub mtime: i64,
}

/// How a command ended, with its output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandResult {
    /// Standard output (non-UTF-8 bytes replaced).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
}

/// A process the sandbox started.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProcessInfo {
    /// Its ID in the sandbox.
    pub pid: u32,
    /// What was run.
    #[serde(default)]
    pub command: serde_json::Value,
    /// Started in the background.
    #[serde(default)]
    pub background: bool,
    /// Whether a client is attached to its output.
    #[serde(default)]
    pub attached: bool,
}
