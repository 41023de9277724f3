//! Sandbox records, their states, and the JSON shapes of the internal API.

pub use api_model::{CreateRequest, Event, OnTimeout, Resources};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lifecycle states inside the pool manager. Never shown to callers: see
/// [`InternalState::public`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InternalState {
    New,
    Creating,
    Active,
    /// Paused: the VM is gone, its pause snapshot is on this host's disk.
    Stopped,
    Destroying,
    Deleted,
    Failed,
}

impl InternalState {
    /// The internal states (as stored) behind a public one; none for an unknown name.
    pub fn stored_names_of(public: &str) -> &'static [&'static str] {
        match public {
            "starting" => &["new", "creating"],
            "running" => &["active"],
            "paused" => &["stopped"],
            "deleted" => &["destroying", "deleted"],
            "error" => &["failed"],
            _ => &[],
        }
    }

    /// The state callers see.
    pub fn public(self) -> &'static str {
        match self {
            InternalState::New | InternalState::Creating => "starting",
            InternalState::Active => "running",
            InternalState::Stopped => "paused",
            InternalState::Destroying | InternalState::Deleted => "deleted",
            InternalState::Failed => "error",
        }
    }
}

/// One step of a sandbox's life, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineStep {
    pub at: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why something failed and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub code: String,
    pub message: String,
    pub action: String,
}

/// A sandbox as the catalog stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    pub state: InternalState,
    pub resources: Resources,
    pub env_vars: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub on_timeout: OnTimeout,
    pub timeout_s: u64,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub timeline: Vec<TimelineStep>,
    pub diagnostic: Option<Diagnostic>,
    /// Directory of the pause snapshot while paused.
    #[serde(default)]
    pub pause_snapshot: Option<String>,
    /// The VM's directory while running: a restarted daemon adopts the VM from it.
    #[serde(default)]
    pub vm_dir: Option<String>,
    /// While hibernated: the stored pause snapshot to resume from.
    #[serde(default)]
    pub hibernated: Option<String>,
    /// Seconds between periodic snapshots (0: none).
    #[serde(default)]
    pub snapshot_interval_s: u64,
    /// When the last periodic snapshot was attempted (ms since the epoch).
    #[serde(default)]
    pub last_periodic_ms: i64,
    /// The fork snapshot this sandbox's VM was restored from (kept while a child uses it).
    #[serde(default)]
    pub fork_base: Option<String>,
    /// Whether preview traffic and data-plane calls wake it once paused.
    #[serde(default)]
    pub auto_resume: bool,
    /// Seconds without traffic or a foreground command after which `on_timeout`
    /// applies (0: off).
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// Ports its preview URLs serve without a token.
    #[serde(default)]
    pub public_ports: Vec<u16>,
    /// What its guest may reach.
    #[serde(default)]
    pub egress: api_model::EgressPolicy,
    /// Volumes it holds (resolved IDs); each at LUN = its index.
    #[serde(default)]
    pub mounts: Vec<api_model::Mount>,
    /// Its volume images are copies (a fork child, a restored copy): no holds, never
    /// saved back.
    #[serde(default)]
    pub volume_copies: bool,
    /// The epoch of its runtime tokens: `connect` moves it on, ending the tokens issued
    /// before. 0: never moved (see `tokens::runtime_epoch`).
    #[serde(default)]
    pub runtime_token_epoch: u64,
    /// Per port, the epoch of its preview and proxy tokens: making the port private moves
    /// it on, ending the URLs issued before. A port not here never moved its epoch (see
    /// `tokens::preview_epoch`).
    #[serde(default)]
    pub preview_token_epochs: BTreeMap<u16, u64>,
    /// The host that owns it (runs it, or holds its pause snapshot): the one this
    /// daemon is when the record is made. None on a catalog from before hosts.
    #[serde(rename = "hostID", default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// How many times it changed hosts (failover, drain): a write of the record by a
    /// host holding an older epoch is refused, so a host that comes back after its
    /// sandboxes moved cannot write them back.
    #[serde(rename = "ownerEpoch", default)]
    pub owner_epoch: u64,
    /// Moved here by a drain while hibernated: its new host resumes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_after_move: bool,
    /// Its commands and terminal sessions are recorded (`sandboxes::recording`).
    #[serde(default)]
    pub recording: bool,
    /// Its security policy (`sandboxes::security`), each masked secret's placeholder
    /// filled in: its TLS connections are intercepted while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_policy: Option<intercept::SecurityPolicy>,
    /// The real values of its masked secrets, by name: only the proxy gets them (never
    /// the guest, a view, an event or a snapshot manifest).
    #[serde(default, skip_serializing_if = "SecretValues::is_empty")]
    pub secret_values: SecretValues,
}

/// Masked secrets' real values by name. Its `Debug` names them only: records are
/// logged, and a value must never be.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretValues {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for SecretValues {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for SecretValues {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl SandboxRecord {
    /// A new sandbox (fresh ID, state `New`, lifetime counted from now) with no
    /// environment, labels or history; the caller sets what else it has.
    pub fn fresh(
        team_id: &str,
        template_id: String,
        resources: Resources,
        timeout_s: u64,
        snapshot_interval_s: u64,
    ) -> Self {
        let now = chrono::Utc::now().timestamp_millis();
        Self {
            host_id: crate::cluster::this_host().map(str::to_string),
            owner_epoch: 0,
            resume_after_move: false,
            id: format!("sbx-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]),
            team_id: team_id.to_string(),
            template_id,
            state: InternalState::New,
            resources,
            env_vars: BTreeMap::new(),
            metadata: BTreeMap::new(),
            on_timeout: OnTimeout::Kill,
            timeout_s,
            expires_at_ms: now + timeout_s as i64 * 1000,
            created_at_ms: now,
            timeline: Vec::new(),
            diagnostic: None,
            pause_snapshot: None,
            vm_dir: None,
            hibernated: None,
            snapshot_interval_s,
            last_periodic_ms: now,
            fork_base: None,
            auto_resume: false,
            idle_timeout_s: 0,
            public_ports: Vec::new(),
            egress: api_model::EgressPolicy::default(),
            mounts: Vec::new(),
            volume_copies: false,
            runtime_token_epoch: 0,
            preview_token_epochs: BTreeMap::new(),
            recording: false,
            security_policy: None,
            secret_values: SecretValues::default(),
        }
    }

    /// Appends a timeline step stamped now.
    pub fn step(&mut self, step: &str, detail: Option<String>) {
        self.timeline.push(TimelineStep {
            at: iso8601(chrono::Utc::now().timestamp_millis()),
            step: step.to_string(),
            detail,
        });
    }
}

/// A snapshot as callers see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// `pause`, `periodic` or `manual`.
    pub kind: &'static str,
    pub created_at: String,
    /// Bytes a restore materializes (memory, device state and disk, holes included).
    pub size_bytes: u64,
    /// Bytes of data it references in the store (holes and zero pages left out).
    pub stored_bytes: u64,
    /// In the answer to a snapshot's creation: the bytes it sent to the store, what
    /// the store lacked of it (chunks, and patches of the pages that changed since the
    /// memory it builds on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_bytes: Option<u64>,
    /// `object` (restorable on any worker sharing the store) or `local` (this worker).
    pub storage: &'static str,
    pub resources: Resources,
    /// The name the team gave it, if any (`snapshotName` starts a sandbox from it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Milliseconds since the epoch as ISO 8601 (UTC).
pub fn iso8601(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Where and how a client reaches a sandbox's data plane.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeAccess {
    pub target: RuntimeTarget,
    pub token: String,
    pub token_expires_at: String,
}

/// The data-plane address of a sandbox.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeTarget {
    pub transport: String,
    pub host: String,
    pub base_url: String,
}

/// A sandbox as callers see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub state: &'static str,
    pub resources: Resources,
    pub metadata: BTreeMap<String, String>,
    pub lifecycle: serde_json::Value,
    pub timeout: u64,
    pub created_at: String,
    pub expires_at: String,
    pub timeline: Vec<TimelineStep>,
    pub diagnostic: Option<Diagnostic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeAccess>,
    /// Seconds between periodic snapshots (0: none).
    pub snapshot_interval: u64,
    /// Whether the pause snapshot is in object storage (resumable on any worker).
    pub hibernated: bool,
    /// What its guest may reach.
    pub egress: api_model::EgressPolicy,
    /// Its volumes: guest path, volume ID, `rw` or `ro`.
    pub mounts: Vec<api_model::Mount>,
    /// The host that runs it (or holds it paused), for operators of a cluster.
    #[serde(rename = "hostID", skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Whether its commands and terminal sessions are recorded.
    pub recording: bool,
    /// Its security policy (placeholders filled in, never a secret's value); absent
    /// when its connections are not intercepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_policy: Option<intercept::SecurityPolicy>,
    /// Its page in the web dashboard (`<public URL>/dashboard/sandboxes/<id>`).
    pub dashboard_url: String,
}

impl SandboxView {
    /// The caller's view of `r`, with runtime access if given.
    pub fn of(r: &SandboxRecord, runtime: Option<RuntimeAccess>) -> Self {
        Self {
            sandbox_id: r.id.clone(),
            template_id: r.template_id.clone(),
            state: r.state.public(),
            resources: r.resources,
            metadata: r.metadata.clone(),
            lifecycle: serde_json::json!({ "onTimeout": r.on_timeout, "autoResume": r.auto_resume, "idleTimeout": r.idle_timeout_s }),
            timeout: r.timeout_s,
            created_at: iso8601(r.created_at_ms),
            expires_at: iso8601(r.expires_at_ms),
            timeline: r.timeline.clone(),
            diagnostic: r.diagnostic.clone(),
            runtime,
            snapshot_interval: r.snapshot_interval_s,
            hibernated: r.hibernated.is_some(),
            egress: r.egress.clone(),
            mounts: r.mounts.clone(),
            host_id: r.host_id.clone(),
            recording: r.recording,
            security_policy: r.security_policy.clone(),
            dashboard_url: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_states_never_leak() {
        for (s, public) in [
            (InternalState::New, "starting"),
            (InternalState::Creating, "starting"),
            (InternalState::Active, "running"),
            (InternalState::Stopped, "paused"),
            (InternalState::Destroying, "deleted"),
            (InternalState::Failed, "error"),
        ] {
            assert_eq!(s.public(), public);
        }
    }

    #[test]
    fn live_states_are_all_but_deleted_and_failed() {
        use InternalState::*;
        for s in [New, Creating, Active, Stopped, Destroying, Deleted, Failed] {
            let stored = serde_json::to_value(s).unwrap();
            let stored = stored.as_str().unwrap();
            assert_eq!(
                crate::catalog::Catalog::LIVE.contains(&stored),
                !matches!(s, Deleted | Failed),
                "{stored}"
            );
        }
    }
}

/// A custom template as the catalog stores it: its definition, where its build is,
/// and (once ready) the stored snapshot sandboxes restore from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub id: String,
    pub team_id: String,
    pub name: Option<String>,
    pub request: api_model::TemplateBuildRequest,
    /// `from` resolved: a built-in template or a `tpl-…` ID.
    pub base: String,
    pub status: api_model::TemplateStatus,
    pub resources: Resources,
    /// Environment from its `env` steps (and its base's).
    pub env_vars: BTreeMap<String, String>,
    pub steps: Vec<api_model::StepView>,
    pub error: Option<api_model::BuildFailure>,
    /// The stored snapshot of the ready VM.
    pub snapshot_id: Option<String>,
    pub created_at_ms: i64,
    pub ready_at_ms: Option<i64>,
    pub build_ms: Option<u64>,
    /// The host building it: only that host fails the build when it restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_on: Option<String>,
}

impl TemplateRecord {
    /// Ends its build as failed: the running step failed, the ones after it skipped.
    pub fn fail(&mut self, failure: api_model::BuildFailure) {
        use api_model::StepStatus;
        for s in self.steps.iter_mut() {
            s.status = match s.status {
                StepStatus::Running => StepStatus::Failed,
                StepStatus::Pending => StepStatus::Skipped,
                done => done,
            };
        }
        self.status = api_model::TemplateStatus::Failed;
        self.error = Some(failure);
    }

    /// The view callers get.
    pub fn view(&self) -> api_model::TemplateView {
        api_model::TemplateView {
            template_id: self.id.clone(),
            name: self.name.clone(),
            builtin: false,
            from: self.base.clone(),
            status: self.status,
            resources: self.resources,
            env_vars: self.env_vars.clone(),
            start_cmd: self.request.start_cmd.clone(),
            ready_cmd: self.request.ready_cmd.clone(),
            steps: self.steps.clone(),
            error: self.error.clone(),
            created_at: iso8601(self.created_at_ms),
            ready_at: self.ready_at_ms.map(iso8601),
            build_ms: self.build_ms,
        }
    }
}
