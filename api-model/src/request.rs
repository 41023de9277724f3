//! Request bodies, and the checks on them that need no state.

use crate::egress::EgressPolicy;
use crate::volume::{validate_mounts, Mount, MountRequest};
use crate::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Timeout of a sandbox whose create names none, in seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 300;
/// Longest timeout a caller may set, in seconds (a week).
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// Fields that older APIs accepted and this one refuses, with what to send instead.
pub const STALE_FIELDS: &[(&str, &str)] = &[
    ("timeoutMs", "send `timeout` in seconds"),
    ("autoResume", "send `lifecycle.autoResume`"),
    (
        "secure",
        "omit it: runtime access is always token-protected",
    ),
    ("allow_internet_access", "send `egress`"),
    ("network", "send `egress`"),
    ("mcp", "omit it"),
    ("volume_mounts", "send `mounts`"),
    ("volumeMounts", "send `mounts`"),
];

/// CPU, memory and disk of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    #[serde(rename = "memMiB")]
    pub mem_mib: u32,
    /// Root disk in MiB.
    #[serde(rename = "diskSizeMiB")]
    pub disk_mib: u64,
}

impl Resources {
    /// Checks the ranges: 1-16 vCPUs, 256-65536 MiB, a disk of at most 1 TiB.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(1..=16).contains(&self.vcpus) {
            return Err(ApiError::bad_request(format!(
                "resources.vcpus {} is out of range; send 1 to 16",
                self.vcpus
            )));
        }
        if !(256..=65536).contains(&self.mem_mib) {
            return Err(ApiError::bad_request(format!(
                "resources.memMiB {} is out of range; send 256 to 65536",
                self.mem_mib
            )));
        }
        if self.disk_mib > 1024 * 1024 {
            return Err(ApiError::bad_request(format!(
                "resources.diskSizeMiB {} is out of range; send at most 1048576",
                self.disk_mib
            )));
        }
        Ok(())
    }
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            vcpus: 2,
            mem_mib: 2048,
            disk_mib: 8192,
        }
    }
}

/// What happens when a sandbox's timeout passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// End the sandbox.
    #[default]
    Kill,
    /// Pause it: memory and disk kept in a snapshot on the host.
    Pause,
    /// Pause into object storage.
    Hibernate,
}

/// `lifecycle` of a create request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleRequest {
    /// What the timeout does.
    #[serde(default)]
    pub on_timeout: Option<OnTimeout>,
    /// Wake on preview traffic and data-plane calls.
    #[serde(default)]
    pub auto_resume: Option<bool>,
    /// Seconds without data-plane calls, preview traffic or a running foreground
    /// command after which `onTimeout` applies (beside the lifetime `timeout`).
    #[serde(default)]
    pub idle_timeout: Option<u64>,
}

/// The body of a create.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    /// Template to boot from: a built-in, a template of the team (ID or name), or one of
    /// its snapshot IDs. Exactly one of `templateID`, `imageName` and `snapshotName`.
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// Seed 002's start source: a template by name.
    #[serde(default)]
    pub image_name: Option<String>,
    /// Pins the exact template build `imageName` must be (its `tpl-…` ID).
    #[serde(default)]
    pub image_id: Option<String>,
    /// Seed 002's start source: a snapshot by the name it was given.
    #[serde(default)]
    pub snapshot_name: Option<String>,
    /// Pins the exact snapshot `snapshotName` must be (its `snap-…` ID).
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Seed 002's top-level shape, an alternative to `resources`.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Seed 002's top-level shape, an alternative to `resources`.
    #[serde(rename = "memMiB", default)]
    pub mem_mib: Option<u32>,
    /// Seed 002's top-level shape, an alternative to `resources`.
    #[serde(rename = "diskSizeMiB", default)]
    pub disk_size_mib: Option<u64>,
    /// A region the operator configured; placement keeps the sandbox in it.
    #[serde(default)]
    pub region: Option<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Answer only once the sandbox runs (default true).
    #[serde(default)]
    pub wait_ready: Option<bool>,
    /// Environment of every command.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Caller's labels, filterable in a list.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Short form of `lifecycle.onTimeout: pause`.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// Timeout behaviour.
    #[serde(default)]
    pub lifecycle: Option<LifecycleRequest>,
    /// Shape; defaults 2 vCPUs, 2048 MiB, 8192 MiB disk.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Network egress policy (default: internet on, no lists).
    #[serde(default)]
    pub egress: Option<EgressPolicy>,
    /// Volume mounts: guest path → `{id, type}`.
    #[serde(default)]
    pub mounts: BTreeMap<String, MountRequest>,
    /// Warm-pool checkout: `require` (fail with `warm_pool_unavailable` when no ready
    /// instance matches) or `prefer` (fall back to a restore); absent: no checkout.
    #[serde(default)]
    pub warm_pool: Option<WarmPoolMode>,
    /// Seconds between periodic snapshots to object storage; 0 turns them off; absent:
    /// the pool manager's configured default.
    #[serde(default)]
    pub snapshot_interval: Option<u64>,
    /// The TLS-intercepting security proxy's policy (seed 001's `security_policy`; the
    /// SDKs send `{}` for `secure=True`): its TLS connections are intercepted. Its
    /// shape is the pool manager's to check (`intercept::SecurityPolicy`).
    #[serde(default)]
    pub security_policy: Option<Value>,
    /// Keep a transcript of every command and terminal session in object storage
    /// (`GET /sandboxes/{id}/recordings`); default off.
    #[serde(default)]
    pub recording: Option<bool>,
}

/// Where a sandbox starts from (seed 002's start sources).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartSource {
    /// `templateID`: a built-in, a template (ID or name) or a snapshot ID.
    Template(String),
    /// `imageName` (a template's name), optionally pinned to its ID by `imageId`.
    Image { name: String, id: Option<String> },
    /// `snapshotName` (a named snapshot), optionally pinned to its ID by `snapshotId`.
    Snapshot { name: String, id: Option<String> },
}

impl StartSource {
    /// The field the caller named it in, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            StartSource::Template(_) => "templateID",
            StartSource::Image { .. } => "imageName",
            StartSource::Snapshot { .. } => "snapshotName",
        }
    }
}

/// A create request that passed every stateless check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCreate {
    /// Where it starts from.
    pub source: StartSource,
    /// The shape the caller gave (`resources`, or the top-level fields), if any.
    pub resources_given: Option<Resources>,
    /// The region asked for (not yet checked against the configured ones).
    pub region: Option<String>,
    /// What the timeout does.
    pub on_timeout: OnTimeout,
    /// Lifetime in seconds.
    pub timeout_s: u64,
    /// Shape (the disk still has to fit the template: only a pool manager knows its size).
    pub resources: Resources,
    /// Whether to answer only once running.
    pub wait_ready: bool,
    /// Periodic snapshot interval in seconds (`Some(0)`: off; `None`: the default).
    pub snapshot_interval_s: Option<u64>,
    /// Warm-pool checkout mode, if asked for.
    pub warm_pool: Option<WarmPoolMode>,
    /// Whether preview traffic and data-plane calls wake the sandbox once paused.
    pub auto_resume: bool,
    /// Seconds of idleness after which the timeout action applies (0: off).
    pub idle_timeout_s: u64,
    /// The egress policy (checked).
    pub egress: EgressPolicy,
    /// The volumes to mount (checked; names not yet resolved).
    pub mounts: Vec<Mount>,
    /// Whether commands and terminal sessions are recorded.
    pub recording: bool,
}

impl CreateRequest {
    /// Exactly one start source, each ID pin only with its name.
    pub fn start_source(&self) -> Result<StartSource, ApiError> {
        let given: Vec<&str> = [
            ("templateID", self.template_id.is_some()),
            ("imageName", self.image_name.is_some()),
            ("snapshotName", self.snapshot_name.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| *name)
        .collect();
        if given.len() != 1 {
            return Err(ApiError::bad_request(format!(
                "send exactly one start source: templateID (e.g. \"base\"), imageName (a template's name) or snapshotName (a named snapshot); got {}",
                if given.is_empty() { "none".to_string() } else { given.join(" and ") }
            ))
            .with_details(json!({ "field": "templateID" })));
        }
        for (pin, name, set) in [
            ("imageId", "imageName", self.image_name.is_some()),
            ("snapshotId", "snapshotName", self.snapshot_name.is_some()),
        ] {
            let pinned = match pin {
                "imageId" => self.image_id.is_some(),
                _ => self.snapshot_id.is_some(),
            };
            if pinned && !set {
                return Err(ApiError::bad_request(format!(
                    "{pin} pins the exact build of {name}; send it together with {name}, or omit it"
                ))
                .with_details(json!({ "field": pin })));
            }
        }
        let checked = |field: &str, v: &str| -> Result<String, ApiError> {
            if v.is_empty() || v.len() > 128 {
                return Err(ApiError::bad_request(format!(
                    "{field} must be 1 to 128 characters; send e.g. \"base\""
                ))
                .with_details(json!({ "field": field })));
            }
            Ok(v.to_string())
        };
        Ok(if let Some(t) = &self.template_id {
            StartSource::Template(checked("templateID", t)?)
        } else if let Some(name) = &self.image_name {
            StartSource::Image {
                name: checked("imageName", name)?,
                id: self
                    .image_id
                    .as_deref()
                    .map(|i| checked("imageId", i))
                    .transpose()?,
            }
        } else {
            let name = self.snapshot_name.as_deref().unwrap_or_default();
            StartSource::Snapshot {
                name: checked("snapshotName", name)?,
                id: self
                    .snapshot_id
                    .as_deref()
                    .map(|i| checked("snapshotId", i))
                    .transpose()?,
            }
        })
    }

    /// The shape the caller gave: `resources`, or seed 002's top-level `vcpus`, `memMiB`
    /// and `diskSizeMiB` (the ones left out at their defaults); never both.
    pub fn resources_given(&self) -> Result<Option<Resources>, ApiError> {
        let top = self.vcpus.is_some() || self.mem_mib.is_some() || self.disk_size_mib.is_some();
        match (self.resources, top) {
            (Some(_), true) => Err(ApiError::bad_request(
                "send the shape once: either resources {vcpus, memMiB, diskSizeMiB} or the top-level vcpus, memMiB, diskSizeMiB, not both",
            )
            .with_details(json!({ "field": "resources" }))),
            (Some(r), false) => Ok(Some(r)),
            (None, true) => {
                let d = Resources::default();
                Ok(Some(Resources {
                    vcpus: self.vcpus.unwrap_or(d.vcpus),
                    mem_mib: self.mem_mib.unwrap_or(d.mem_mib),
                    disk_mib: self.disk_size_mib.unwrap_or(d.disk_mib),
                }))
            }
            (None, false) => Ok(None),
        }
    }

    /// Every check that needs no state: ranges, conflicts, features not yet available.
    pub fn validate(&self) -> Result<ValidCreate, ApiError> {
        let source = self.start_source()?;
        let resources_given = self.resources_given()?;
        if let Some(region) = &self.region {
            if region.is_empty() || region.len() > 64 {
                return Err(ApiError::bad_request(
                    "region must be 1 to 64 characters naming a configured region; omit it for any",
                )
                .with_details(json!({ "field": "region" })));
            }
        }
        // Checked in full by the pool manager (the proxy's own rules); here, its shape.
        if let Some(policy) = &self.security_policy {
            if !policy.is_object() {
                return Err(ApiError::bad_request(
                    "securityPolicy must be an object (pii, injectionDefense, transforms, audit, envMasking); send {} for interception with the audit only, or omit it",
                )
                .with_details(json!({ "field": "securityPolicy" })));
            }
        }
        let egress = self.egress.clone().unwrap_or_default();
        egress.compile()?;
        let mounts = validate_mounts(&self.mounts)?;
        let lifecycle = self.lifecycle.clone().unwrap_or_default();
        let on_timeout = match (self.auto_pause, lifecycle.on_timeout) {
            (Some(true), Some(OnTimeout::Kill)) | (Some(false), Some(OnTimeout::Pause)) => {
                return Err(ApiError::bad_request(
                    "autoPause and lifecycle.onTimeout disagree; send only lifecycle.onTimeout",
                ))
            }
            (_, Some(o)) => o,
            (Some(true), None) => OnTimeout::Pause,
            _ => OnTimeout::Kill,
        };
        let auto_resume = lifecycle.auto_resume.unwrap_or(false);
        if auto_resume && on_timeout == OnTimeout::Kill {
            return Err(ApiError::bad_request(
                "lifecycle.autoResume needs a sandbox that pauses on timeout; send lifecycle.onTimeout \"pause\" or \"hibernate\" with it, or omit autoResume",
            )
            .with_details(json!({ "field": "lifecycle.autoResume" })));
        }
        let timeout_s = validate_timeout(self.timeout.unwrap_or(DEFAULT_TIMEOUT_S))?;
        let idle_timeout_s = validate_idle_timeout(lifecycle.idle_timeout)?;
        let resources = resources_given.unwrap_or_default();
        resources.validate()?;
        if self.env_vars.len() > 256 {
            return Err(ApiError::bad_request(
                "envVars has more than 256 entries; send at most 256",
            ));
        }
        for key in self.env_vars.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ApiError::bad_request(format!(
                    "envVars key {key:?} is not a valid variable name; send names without '=' or NUL"
                )));
            }
        }
        if let Some((k, _)) = self.env_vars.iter().find(|(_, v)| v.contains('\0')) {
            return Err(ApiError::bad_request(format!(
                "envVars value of {k:?} contains NUL; send text without NUL"
            )));
        }
        // Kept in the catalog with the sandbox and in its snapshots: bounded, so one
        // team cannot grow the catalog every request reads.
        if let Some((k, _)) = self
            .env_vars
            .iter()
            .find(|(k, v)| k.len() > MAX_ENV_KEY_BYTES || v.len() > MAX_ENV_VALUE_BYTES)
        {
            return Err(ApiError::bad_request(format!(
                "envVars entry {:?} is too large; send names up to {MAX_ENV_KEY_BYTES} bytes and values up to {MAX_ENV_VALUE_BYTES} bytes",
                k.chars().take(64).collect::<String>()
            ))
            .with_details(json!({ "field": "envVars" })));
        }
        let total: usize = self.env_vars.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > MAX_ENV_TOTAL_BYTES {
            return Err(ApiError::bad_request(format!(
                "envVars hold {total} bytes; send at most {MAX_ENV_TOTAL_BYTES} in all (put large data in a file instead)"
            ))
            .with_details(json!({ "field": "envVars" })));
        }
        validate_metadata(&self.metadata)?;
        let snapshot_interval_s = self
            .snapshot_interval
            .map(validate_snapshot_interval)
            .transpose()?;
        Ok(ValidCreate {
            source,
            resources_given,
            region: self.region.clone(),
            on_timeout,
            timeout_s,
            resources,
            wait_ready: self.wait_ready.unwrap_or(true),
            snapshot_interval_s,
            warm_pool: self.warm_pool,
            auto_resume,
            idle_timeout_s,
            egress,
            mounts,
            recording: self.recording.unwrap_or(false),
        })
    }
}

/// The body of `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotBody {
    /// A name for the snapshot, unique in the team (seed 002's `snapshotName` start
    /// source finds it by this name).
    #[serde(default)]
    pub name: Option<String>,
}

impl SnapshotBody {
    /// Checks the name: 1 to 64 letters, digits, `.`, `_` or `-`, not starting like an
    /// ID (`snap-`), so that a name and an ID never collide.
    pub fn validate(&self) -> Result<(), ApiError> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !name.starts_with("snap-");
        if ok {
            Ok(())
        } else {
            Err(ApiError::bad_request(format!(
                "snapshot name {name:?} is invalid; send 1 to 64 letters, digits, '.', '_' or '-', not starting with \"snap-\""
            ))
            .with_details(json!({ "field": "name" })))
        }
    }
}

/// Shortest idle timeout, in seconds: idleness is checked twice a second, and a pause
/// takes longer than that.
pub const MIN_IDLE_TIMEOUT_S: u64 = 5;

/// Checks `lifecycle.idleTimeout`: absent or 0 is off, else 5 s to a week.
pub fn validate_idle_timeout(idle: Option<u64>) -> Result<u64, ApiError> {
    match idle {
        None | Some(0) => Ok(0),
        Some(s) if (MIN_IDLE_TIMEOUT_S..=MAX_TIMEOUT_S).contains(&s) => Ok(s),
        Some(s) => Err(ApiError::bad_request(format!(
            "lifecycle.idleTimeout {s} is out of range; send {MIN_IDLE_TIMEOUT_S} to {MAX_TIMEOUT_S} seconds, or 0 (off)"
        ))
        .with_details(json!({ "field": "lifecycle.idleTimeout" }))),
    }
}

/// How a create uses its template's warm pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmPoolMode {
    /// A ready instance or an error (`warm_pool_unavailable`), at once.
    Require,
    /// A ready instance if there is one, else a normal create.
    Prefer,
}

/// Most ready instances one warm pool may keep.
pub const MAX_WARM_POOL_SIZE: u32 = 16;

/// A template's warm pool, as `GET`/`PUT /templates/{id}/warm-pool` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// The template.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Ready instances it keeps.
    pub target: u32,
    /// Ready now.
    pub ready: u32,
    /// Being made.
    pub warming: u32,
    /// Creates that got an instance.
    pub checkouts: u64,
    /// Creates that asked and found none ready.
    pub misses: u64,
    /// The shape of its instances.
    pub resources: Resources,
    /// Whether it refills in the background.
    pub refill: bool,
    /// Why the last refill failed, while refills keep failing (they back off
    /// exponentially); `None` once one succeeds. Explains a pool stuck at `ready: 0`.
    #[serde(default)]
    pub last_error: Option<WarmPoolError>,
}

/// A warm pool's last refill failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolError {
    /// What went wrong.
    pub message: String,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// Refills failed in a row.
    pub failures: u32,
    /// Seconds from `at` until the next attempt.
    pub retry_in_s: u64,
}

/// Body of `PUT /templates/{id}/warm-pool`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmPoolBody {
    /// Ready instances to keep (0 empties the pool).
    pub size: u32,
    /// The shape of its instances (default 2 vCPUs, 2048 MiB, 8192 MiB disk); creates
    /// check out only with the same shape.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Whether the pool refills in the background (default true).
    #[serde(default)]
    pub refill: Option<bool>,
}

impl WarmPoolBody {
    /// Checks the size.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.size > MAX_WARM_POOL_SIZE {
            return Err(ApiError::bad_request(format!(
                "size {} is out of range; send 0 to {MAX_WARM_POOL_SIZE}",
                self.size
            ))
            .with_details(json!({ "field": "size" })));
        }
        Ok(())
    }
}

/// Body of `POST /sandboxes/{id}/previews`: a signed preview URL (and proxy target) for
/// a port, and optionally whether the port is public (reachable without a token).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreviewBody {
    /// The port inside the sandbox.
    pub port: u32,
    /// Make the port reachable without a token (`true`) or private again (`false`).
    #[serde(default)]
    pub public: Option<bool>,
    /// Seconds the tokens stay valid (60 to 86400, default 3600).
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl PreviewBody {
    /// Checks the port and lifetime; returns them.
    pub fn validate(&self) -> Result<(u16, u64), ApiError> {
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "port {} is not a TCP port; send 1 to 65535",
                    self.port
                ))
                .with_details(json!({ "field": "port" }))
            })?;
        let expires_in = self.expires_in.unwrap_or(3600);
        if !(60..=86_400).contains(&expires_in) {
            return Err(ApiError::bad_request(format!(
                "expiresIn {expires_in} is out of range; send 60 to 86400 seconds"
            ))
            .with_details(json!({ "field": "expiresIn" })));
        }
        Ok((port, expires_in))
    }
}

/// Shortest periodic snapshot interval, in seconds.
pub const MIN_SNAPSHOT_INTERVAL_S: u64 = 10;

/// A periodic snapshot interval: 0 (off) or 10 s to a day.
pub fn validate_snapshot_interval(seconds: u64) -> Result<u64, ApiError> {
    if seconds != 0 && !(MIN_SNAPSHOT_INTERVAL_S..=86_400).contains(&seconds) {
        return Err(ApiError::bad_request(format!(
            "snapshotInterval {seconds} is out of range; send 0 (off) or seconds from {MIN_SNAPSHOT_INTERVAL_S} to 86400"
        ))
        .with_details(json!({ "field": "snapshotInterval" })));
    }
    Ok(seconds)
}

/// Whether `id` has the shape of a sandbox ID (`sbx-` + 20 hex digits).
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sbx-")
        .is_some_and(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `id` has the shape of a snapshot ID: `snap-` + hex groups.
pub fn is_snapshot_id(id: &str) -> bool {
    id.strip_prefix("snap-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest
                .split('-')
                .all(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

/// Whether `id` has the shape of a recording ID: `commands.jsonl`, `commands-N.jsonl`
/// (a command transcript) or `pty-N.cast` (a terminal session), N a positive decimal
/// of at most 10 digits. Nothing else names a recording (no path can hide in one).
pub fn is_recording_id(id: &str) -> bool {
    let number = |n: &str| {
        (1..=10).contains(&n.len()) && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
    };
    if id == "commands.jsonl" {
        return true;
    }
    if let Some(n) = id
        .strip_prefix("commands-")
        .and_then(|r| r.strip_suffix(".jsonl"))
    {
        return number(n);
    }
    id.strip_prefix("pty-")
        .and_then(|r| r.strip_suffix(".cast"))
        .is_some_and(number)
}

/// Body of `POST /sandboxes/restore`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreBody {
    /// The sandbox whose snapshot to restore (it may be deleted, or on another worker).
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The snapshot; default the newest, preferring pause, then periodic, then manual.
    #[serde(rename = "snapshotID", default)]
    pub snapshot_id: Option<String>,
    /// Lifetime of the new sandbox in seconds (default 300).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Labels of the new sandbox (default: the original's).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// What the copy does with the original's read-write volumes (default `readonly`).
    #[serde(default)]
    pub volumes: Option<crate::InheritVolumes>,
}

impl RestoreBody {
    /// Checks IDs, timeout and metadata; returns the timeout.
    pub fn validate(&self) -> Result<u64, ApiError> {
        if !is_sandbox_id(&self.sandbox_id) {
            return Err(ApiError::bad_request(format!(
                "sandboxID {:?} is not a sandbox ID; send one like \"sbx-…\" (20 hex digits)",
                self.sandbox_id
            ))
            .with_details(json!({ "field": "sandboxID" })));
        }
        if let Some(s) = self.snapshot_id.as_deref().filter(|s| !is_snapshot_id(s)) {
            return Err(ApiError::bad_request(format!(
                "snapshotID {s:?} is not a snapshot ID; send one from list_snapshots, or omit it for the newest"
            ))
            .with_details(json!({ "field": "snapshotID" })));
        }
        if let Some(m) = &self.metadata {
            validate_metadata(m)?;
        }
        validate_timeout(self.timeout.unwrap_or(DEFAULT_TIMEOUT_S))
    }
}

/// Most children one fork makes.
pub const MAX_FORK_CHILDREN: u32 = 16;

/// Body of `POST /sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkBody {
    /// How many children (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Lifetime of each child in seconds (default: the parent's timeout).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Labels of the children (default: the parent's).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// What the children do with the parent's read-write volumes (default `readonly`).
    #[serde(default)]
    pub volumes: Option<crate::InheritVolumes>,
}

impl ForkBody {
    /// Checks the ranges; returns the count.
    pub fn validate(&self) -> Result<u32, ApiError> {
        let count = self.count.unwrap_or(1);
        if !(1..=MAX_FORK_CHILDREN).contains(&count) {
            return Err(ApiError::bad_request(format!(
                "count {count} is out of range; send 1 to {MAX_FORK_CHILDREN}"
            ))
            .with_details(json!({ "field": "count" })));
        }
        if let Some(t) = self.timeout {
            validate_timeout(t)?;
        }
        if let Some(m) = &self.metadata {
            validate_metadata(m)?;
        }
        Ok(count)
    }
}

/// Body of `POST /sandboxes/{id}/migrate` (operator): the host to move to, or none
/// for placement to choose.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// A host ID (`nullspace-pool-manager admin host list`).
    #[serde(default)]
    pub host: Option<String>,
    /// Whether the copy may switch to post-copy when pre-copy does not converge
    /// (default true, where the destination allows it). Post-copy always ends; its
    /// risk: a host lost before it completes loses the guest.
    #[serde(default)]
    pub postcopy: Option<bool>,
    /// How long pre-copy may run before the switch to post-copy, in ms (default
    /// [`DEFAULT_POSTCOPY_AFTER_MS`]; 0: at once).
    #[serde(default, rename = "postcopyAfterMs")]
    pub postcopy_after_ms: Option<u64>,
}

/// How long pre-copy runs before a migration switches to post-copy, by default.
pub const DEFAULT_POSTCOPY_AFTER_MS: u64 = 20_000;
/// The most `postcopyAfterMs` may be: the switch must come before the copy's deadline.
pub const MAX_POSTCOPY_AFTER_MS: u64 = 150_000;

impl MigrateBody {
    /// Checks the host ID's shape.
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(h) = &self.host {
            let ok = (1..=64).contains(&h.len())
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(ApiError::bad_request(
                    "host must be a host ID of 1 to 64 letters, digits, '.', '_' or '-' (see `nullspace-pool-manager admin host list`), or omitted for placement to choose",
                )
                .with_details(json!({ "field": "host" })));
            }
        }
        match (self.postcopy, self.postcopy_after_ms) {
            (Some(false), Some(_)) => {
                return Err(ApiError::bad_request(
                    "postcopyAfterMs is when to switch to post-copy, and postcopy is false: send one of them",
                )
                .with_details(json!({ "field": "postcopyAfterMs" })))
            }
            (_, Some(ms)) if ms > MAX_POSTCOPY_AFTER_MS => {
                return Err(ApiError::bad_request(format!(
                    "postcopyAfterMs must be 0 to {MAX_POSTCOPY_AFTER_MS} (the copy gives up at 180 s), or omitted for {DEFAULT_POSTCOPY_AFTER_MS}"
                ))
                .with_details(json!({ "field": "postcopyAfterMs" })))
            }
            _ => {}
        }
        Ok(())
    }

    /// When to switch to post-copy: `None` for pre-copy only.
    pub fn postcopy_after(&self) -> Option<std::time::Duration> {
        match self.postcopy {
            Some(false) => None,
            _ => Some(std::time::Duration::from_millis(
                self.postcopy_after_ms.unwrap_or(DEFAULT_POSTCOPY_AFTER_MS),
            )),
        }
    }
}

/// What a live migration did: the answer of `POST /sandboxes/{id}/migrate` and the
/// `sandbox.migrated` event's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// The sandbox.
    pub sandbox_id: String,
    /// The host it left.
    pub from: String,
    /// The host it runs on now.
    pub to: String,
    /// How long the guest stood still: from the source stopping it for the last pass
    /// to the destination running it.
    pub downtime_ms: u64,
    /// From the request to the destination running it.
    pub total_ms: u64,
    /// Bytes of RAM and device state sent.
    pub ram_bytes: u64,
    /// Bytes of disk the mirror copied.
    pub disk_bytes: u64,
    /// Passes over RAM.
    pub passes: u64,
    /// Whether it switched to post-copy (the guest ran on the destination before all
    /// its RAM had arrived).
    #[serde(default)]
    pub postcopy: bool,
}

/// Body of `connect` and `timeout`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    /// Seconds from now.
    #[serde(default)]
    pub timeout: Option<u64>,
}

impl TimeoutBody {
    /// The timeout if given, checked.
    pub fn checked(&self) -> Result<Option<u64>, ApiError> {
        self.timeout.map(validate_timeout).transpose()
    }
}

/// Body of `refreshes`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// Seconds to extend by (default: the sandbox's timeout).
    #[serde(default)]
    pub duration: Option<u64>,
}

impl RefreshBody {
    /// The duration if given, checked.
    pub fn checked(&self) -> Result<Option<u64>, ApiError> {
        self.duration.map(validate_timeout).transpose()
    }
}

/// A timeout in seconds, if in range.
pub fn validate_timeout(seconds: u64) -> Result<u64, ApiError> {
    if !(1..=MAX_TIMEOUT_S).contains(&seconds) {
        return Err(ApiError::bad_request(format!(
            "timeout {seconds} is out of range; send seconds from 1 to {MAX_TIMEOUT_S}"
        )));
    }
    Ok(seconds)
}

/// Longest environment variable name accepted.
pub const MAX_ENV_KEY_BYTES: usize = 256;
/// Longest environment variable value accepted.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Most bytes of environment (names and values) one sandbox may carry.
pub const MAX_ENV_TOTAL_BYTES: usize = 256 * 1024;

fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if m.len() > 64 {
        return Err(ApiError::bad_request(
            "metadata has more than 64 keys; send at most 64",
        ));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > 128 || v.len() > 1024 {
            return Err(ApiError::bad_request(format!(
                "metadata entry {k:?} is too large or empty; keys 1-128 bytes, values up to 1024"
            )));
        }
    }
    Ok(())
}

/// Parses a JSON body into `T`, refusing stale and unknown fields by name. An empty body
/// is `{}`.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        ApiError::bad_request(format!("body is not valid JSON ({e}); send a JSON object"))
    })?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::bad_request(
            "body is not a JSON object; send a JSON object such as {}",
        ));
    };
    for (field, instead) in STALE_FIELDS {
        if obj.contains_key(*field) {
            return Err(ApiError::bad_request(format!(
                "field `{field}` is no longer accepted; {instead}"
            ))
            .with_details(json!({ "field": field })));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let details = unknown_field(&msg).map(|f| json!({ "field": f }));
        let err = ApiError::bad_request(format!("invalid body: {msg}"));
        match details {
            Some(d) => err.with_details(d),
            None => err,
        }
    })
}

/// The field serde named in an "unknown field `x`" error.
fn unknown_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_ids_are_the_names_issued_and_nothing_else() {
        for ok in [
            "commands.jsonl",
            "commands-2.jsonl",
            "commands-1234567890.jsonl",
            "pty-1.cast",
            "pty-42.cast",
        ] {
            assert!(is_recording_id(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../..",
            "..%2F..",
            "commands",
            "commands-.jsonl",
            "commands-0.jsonl",
            "commands-02.jsonl",
            "commands-12345678901.jsonl",
            "commands-x.jsonl",
            "pty-.cast",
            "pty-0.cast",
            "pty-1.cast/",
            "pty-1.cast.json",
            "pty-1/../x.cast",
            "PTY-1.cast",
            "meta.json",
        ] {
            assert!(!is_recording_id(bad), "{bad}");
        }
    }

    #[test]
    fn recording_is_off_unless_asked() {
        let plain = parse_body::<CreateRequest>(br#"{"templateID":"base"}"#).unwrap();
        assert!(!plain.validate().unwrap().recording);
        let on = parse_body::<CreateRequest>(br#"{"templateID":"base","recording":true}"#).unwrap();
        assert!(on.validate().unwrap().recording);
        assert!(
            parse_body::<CreateRequest>(br#"{"templateID":"base","recording":"yes"}"#).is_err()
        );
    }

    #[test]
    fn stale_fields_are_named_with_their_replacement() {
        let err =
            parse_body::<CreateRequest>(br#"{"templateID":"base","timeoutMs":1000}"#).unwrap_err();
        assert!(
            err.message.contains("`timeoutMs`") && err.message.contains("`timeout`"),
            "{}",
            err.message
        );
        let err = parse_body::<CreateRequest>(br#"{"templateID":"base","bogus":1}"#).unwrap_err();
        assert!(err.message.contains("bogus"), "{}", err.message);
        assert_eq!(err.details["field"], "bogus");
    }

    #[test]
    fn environment_is_bounded_in_size() {
        let with = |env: serde_json::Value| {
            let body = json!({ "templateID": "base", "envVars": env }).to_string();
            parse_body::<CreateRequest>(body.as_bytes())
                .unwrap()
                .validate()
                .map(|_| ())
        };
        assert!(with(json!({ "A": "x".repeat(MAX_ENV_VALUE_BYTES) })).is_ok());
        let long_value = with(json!({ "A": "x".repeat(MAX_ENV_VALUE_BYTES + 1) })).unwrap_err();
        assert!(
            long_value.message.contains("values up to"),
            "{}",
            long_value.message
        );
        assert_eq!(long_value.details["field"], "envVars");
        assert!(with(json!({ "K".repeat(MAX_ENV_KEY_BYTES + 1): "x" })).is_err());
        let many: serde_json::Map<String, serde_json::Value> = (0..10)
            .map(|i| (format!("V{i}"), json!("x".repeat(MAX_ENV_VALUE_BYTES))))
            .collect();
        let total = with(serde_json::Value::Object(many)).unwrap_err();
        assert!(total.message.contains("in all"), "{}", total.message);
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert_eq!(parse_body::<TimeoutBody>(b"[1]").unwrap_err().status, 400);
        assert_eq!(parse_body::<TimeoutBody>(b"{").unwrap_err().status, 400);
        assert!(parse_body::<TimeoutBody>(b"  ").unwrap().timeout.is_none());
    }

    #[test]
    fn create_checks_ranges_and_conflicts() {
        let ok: CreateRequest = parse_body(br#"{"templateID":"base","autoPause":true}"#).unwrap();
        assert_eq!(ok.validate().unwrap().on_timeout, OnTimeout::Pause);
        for bad in [
            r#"{"templateID":"base","timeout":0}"#,
            r#"{"templateID":"base","resources":{"vcpus":0,"memMiB":512,"diskSizeMiB":1024}}"#,
            r#"{"templateID":"base","autoPause":true,"lifecycle":{"onTimeout":"kill"}}"#,
            r#"{"templateID":"","timeout":5}"#,
            r#"{"templateID":"base","envVars":{"A=B":"x"}}"#,
        ] {
            let req: CreateRequest = parse_body(bad.as_bytes()).unwrap();
            assert_eq!(req.validate().unwrap_err().status, 400, "{bad}");
        }
        let req: CreateRequest = parse_body(
            br#"{"templateID":"base","egress":{"internet":false,"allow":["10.0.0.0/40"]}}"#,
        )
        .unwrap();
        assert!(req
            .validate()
            .unwrap_err()
            .message
            .starts_with("egress.allow[0]"));
        let req: CreateRequest = parse_body(
            br#"{"templateID":"base","mounts":{"/mnt/w":{"id":"w","type":"ro"}},"egress":{"deny":["bad.test"]}}"#,
        )
        .unwrap();
        let v = req.validate().unwrap();
        assert_eq!((v.mounts.len(), v.egress.deny.len()), (1, 1));
        let req: CreateRequest =
            parse_body(br#"{"templateID":"base","warmPool":"require"}"#).unwrap();
        assert_eq!(
            req.validate().unwrap().warm_pool,
            Some(WarmPoolMode::Require)
        );
        assert_eq!(
            parse_body::<CreateRequest>(br#"{"templateID":"base","warmPool":"always"}"#)
                .unwrap_err()
                .status,
            400
        );
    }
}
