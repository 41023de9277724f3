//! The sandbox lifecycle: create (always a restore), get, list, connect, pause, resume,
//! refresh, timeout, delete, and the timeout sweeper.
//!
//! Each sandbox has a slot whose async mutex serializes its lifecycle operations and
//! holds its VM while it runs. Every state change is written to the catalog and appended
//! to the sandbox's event log before the call returns.

use crate::catalog::{Catalog, Durability};
use crate::error::ApiError;
use crate::model::*;
use crate::templates::{Templates, BUILTIN};
use crate::tokens::{TokenSigner, TOKEN_TTL_S};
use agent_client::AgentClient;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::{info, warn, Instrument};
use vmm::{QemuVm, QemuVmm, RestoreMemory, RestoreOptions, Snapshot, Vm};

mod activity;
mod admission;
mod builds;
mod migrate;
mod moves;
mod network;
mod observe;
mod previews;
pub mod recording;
mod recovery;
mod security;
mod snapshots;
mod volumes;
mod warm;
pub mod workspace;
pub use admission::Actor;
pub use migrate::{incoming_socket, MIGRATION_TOKEN};
pub use network::{NetworkSettings, USER_MODE_NETWORK};
pub use previews::{Wake, WAKE_WINDOW};
pub(crate) use snapshots::free_bytes;
use snapshots::snapshot_resources;
pub use snapshots::SnapshotSettings;
pub use warm::PoolStatus;
pub use workspace::WorkspaceMode;

type Slot = Arc<tokio::sync::Mutex<Option<QemuVm>>>;

/// Owns every sandbox on this host.
pub struct Manager {
    /// Shared with the intents of operations under way, which end their rows when dropped.
    pub catalog: Arc<Catalog>,
    vmm: QemuVmm,
    templates: Templates,
    tokens: TokenSigner,
    pub(crate) edge_url: String,
    /// The public API's origin, where the dashboard is served (`--public-url`; set once
    /// the public listener is bound when it derives from it).
    public_url: std::sync::OnceLock<String>,
    state_dir: PathBuf,
    /// The template builder's step cache.
    build_cache_dir: PathBuf,
    slots: Mutex<HashMap<String, Slot>>,
    /// Template snapshots already in the catalog.
    recorded_templates: Mutex<std::collections::HashSet<String>>,
    /// Live sandboxes a team may hold unless the catalog says otherwise.
    default_quota: u32,
    /// How long a deleted sandbox's record and events are kept (then pruned).
    deleted_retention_s: u64,
    /// Most memory one sandbox may have on this host (half of its RAM).
    max_mem_mib: u32,
    /// Serialises the quota check with the insert, so a burst cannot overshoot.
    admission: Mutex<()>,
    /// Per-team create rates.
    create_rate: crate::quotas::CreateRate,
    /// The region this host is in (`--region`).
    region: Option<String>,
    /// How long the timeout sweeper's last read of the catalog took (µs).
    sweep_scan_us: std::sync::atomic::AtomicU64,
    /// Where snapshots go, and the limits on taking them.
    snapshots: SnapshotSettings,
    /// Uploads hold it shared, garbage collection exclusively: a chunk uploaded for a
    /// manifest not yet written must not be collected.
    uploads: tokio::sync::RwLock<()>,
    /// Serialises fetches of snapshots used as templates into the local cache.
    template_fetch: tokio::sync::Mutex<()>,
    /// A delete left chunks that may be garbage.
    gc_wanted: tokio::sync::Notify,
    /// Ready VMs per template.
    warm: warm::WarmPools,
    /// Template builds.
    builds: builds::Builds,
    /// The workspace templates (`code-interpreter`, `desktop`, `agent`).
    workspace: workspace::Workspace,
    /// `HOST[:PORT]` preview URLs are made under.
    preview_domain: String,
    /// Resource samples of running sandboxes.
    samples: observe::Samples,
    /// Last traffic per running sandbox (idle timeouts).
    pub(crate) activity: Arc<activity::Activity>,
    /// Egress proxies and their policies.
    network: network::Network,
    /// Sandboxes whose periodic snapshots keep failing: each waits longer before the
    /// next attempt (on top of its interval).
    periodic_backoff: Mutex<HashMap<String, crate::backoff::Backoff>>,
    /// Transcripts of recorded sandboxes (`recording: true`), kept in the snapshot store.
    pub(crate) recordings: recording::Recordings,
    /// Each team's interception CA, loaded once.
    team_cas: security::TeamCas,
    /// VMs started here for live migrations on their way in, by sandbox ID.
    incoming: tokio::sync::Mutex<HashMap<String, migrate::IncomingSlot>>,
    /// Numbers the incoming VMs.
    incoming_generation: std::sync::atomic::AtomicU64,
    /// Sandboxes this host is moving to another now (what a destination asks).
    outgoing: Mutex<HashMap<String, String>>,
}

/// A `/proc/meminfo` field (`MemTotal`, `MemAvailable`) in KiB.
pub(crate) fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Half of this host's memory in MiB: no single sandbox gets more.
fn host_mem_budget_mib() -> u32 {
    let total_kib = meminfo_kib("MemTotal").unwrap_or(4 << 20);
    (total_kib / 1024 / 2).min(u32::MAX as u64) as u32
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// When sandbox `r` last started running (created, resumed, re-adopted), in ms since
/// the epoch.
fn last_running_ms(r: &SandboxRecord) -> i64 {
    r.timeline
        .iter()
        .rev()
        .find(|s| s.step == InternalState::Active.public())
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(&s.at).ok())
        .map(|t| t.timestamp_millis())
        .unwrap_or(r.created_at_ms)
}

/// When `path` was last written, in ms since the epoch (`i64::MIN` if unknown: older
/// than anything).
fn modified_ms(path: &Path) -> i64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(i64::MIN, |d| d.as_millis() as i64)
}

/// The backing file a qcow2 image's header names, if it is a readable qcow2 with one.
/// QEMU can write the image: the answer only ever spares a file, never picks one.
fn qcow2_backing(image: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut header = [0u8; 20];
    let mut file = std::fs::File::open(image).ok()?;
    file.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?);
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    let mut name = vec![0u8; size as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut name).ok()?;
    let name =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
    // A relative name is relative to the image's directory.
    Some(image.parent().unwrap_or(Path::new("/")).join(name))
}

/// The public API's origin when the operator names none and this process serves none:
/// where a separate `nullspace-api` listens by default.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:7080";

/// Where a manager keeps things and what it allows.
pub struct ManagerConfig {
    /// Base URL of this host's data plane, handed to clients.
    pub edge_url: String,
    /// Catalog, pause snapshots, fork snapshots, scratch space.
    pub state_dir: PathBuf,
    /// Template snapshots.
    pub templates_dir: PathBuf,
    /// Live sandboxes a team may hold unless its own quota says otherwise.
    pub default_quota: u32,
    /// How long a deleted sandbox's record and events are kept, in seconds.
    pub deleted_retention_s: u64,
    /// The snapshot store and its limits.
    pub snapshots: SnapshotSettings,
    /// `HOST[:PORT]` preview URLs are made under (`<port>-<sandbox>.HOST`).
    pub preview_domain: String,
    /// How VMs are networked.
    pub network: NetworkSettings,
    /// The region this host is in, if the operator named one.
    pub region: Option<String>,
    /// Whether this host builds the workspace templates.
    pub workspace_templates: WorkspaceMode,
    /// The template builder's step cache (`<state dir>/build-cache` unless the operator
    /// put it elsewhere).
    pub build_cache_dir: PathBuf,
}

impl Manager {
    /// A manager over `catalog`.
    pub fn new(catalog: Catalog, vmm: QemuVmm, tokens: TokenSigner, config: ManagerConfig) -> Self {
        let ManagerConfig {
            edge_url,
            state_dir,
            templates_dir,
            default_quota,
            deleted_retention_s,
            snapshots,
            preview_domain,
            network,
            region,
            workspace_templates,
            build_cache_dir,
        } = config;
        // Everything a workspace template's base snapshot depends on (as the
        // template snapshots' key has it).
        let base_inputs = format!(
            "{}|{}|{}|{:?}",
            vmm.images().key(),
            if vmm.isolated_network() {
                "isolated"
            } else {
                "user"
            },
            vmm.qemu_version(),
            vmm.accel().accel
        );
        Self {
            recordings: recording::Recordings::new(&state_dir, snapshots.store.clone()),
            team_cas: security::TeamCas::default(),
            catalog: Arc::new(catalog),
            templates: Templates::new(templates_dir, vmm.clone()),
            vmm,
            tokens,
            edge_url,
            public_url: std::sync::OnceLock::new(),
            state_dir,
            build_cache_dir,
            slots: Mutex::default(),
            recorded_templates: Mutex::default(),
            default_quota,
            deleted_retention_s,
            max_mem_mib: host_mem_budget_mib(),
            admission: Mutex::default(),
            create_rate: crate::quotas::CreateRate::default(),
            sweep_scan_us: std::sync::atomic::AtomicU64::new(0),
            snapshots,
            uploads: tokio::sync::RwLock::new(()),
            template_fetch: tokio::sync::Mutex::new(()),
            gc_wanted: tokio::sync::Notify::new(),
            warm: warm::WarmPools::default(),
            builds: builds::Builds::default(),
            workspace: workspace::Workspace::new(workspace_templates, &base_inputs),
            preview_domain,
            samples: observe::Samples::default(),
            activity: Arc::default(),
            network: network::Network::new(network),
            periodic_backoff: Mutex::default(),
            region,
            incoming: tokio::sync::Mutex::default(),
            incoming_generation: std::sync::atomic::AtomicU64::new(0),
            outgoing: Mutex::default(),
        }
    }

    /// Checks a create's `region` against the regions the operator configured (this
    /// host's, and on a cluster every live host's).
    pub fn check_region(&self, region: Option<&str>) -> Result<(), ApiError> {
        let Some(want) = region else {
            return Ok(());
        };
        let mut known: std::collections::BTreeSet<String> = self.region.iter().cloned().collect();
        if crate::cluster::this_host().is_some() {
            for h in self.catalog.hosts()? {
                if matches!(h.state.as_str(), "ready" | "draining" | "draining-live") {
                    known.extend(h.info.region);
                }
            }
        }
        if known.contains(want) {
            return Ok(());
        }
        let message = if known.is_empty() {
            format!("region {want:?} is not configured: this platform has no regions; omit region")
        } else {
            format!(
                "region {want:?} is not configured; send one of: {}",
                known.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
        Err(ApiError::bad_request(message).with_details(serde_json::json!({ "field": "region" })))
    }

    /// Makes the default-shape template snapshots now, so the first create is fast.
    pub async fn warm_templates(&self) -> Result<(), ApiError> {
        let r = Resources::default();
        for t in BUILTIN {
            self.templates
                .snapshot(t, r.vcpus, r.mem_mib)
                .await
                .map_err(|e| ApiError::internal(format!("making the {t} template: {e}")))?;
        }
        Ok(())
    }

    /// After a (re)start: adopts the VMs of running sandboxes that survived the previous
    /// daemon, marks those that did not, resolves half-done operations, then reaps VM
    /// directories nobody owns.
    pub async fn reconcile_after_start(&self) -> Result<(), ApiError> {
        let mut adopted = Vec::new();
        // Operations a crash cut short, by their intent records: first what needs
        // their VM before it is adopted as a plain running sandbox.
        let intents = self.catalog.intents()?;
        let settled = self.recover_before_states(&intents, &mut adopted).await?;
        for mut r in self.catalog.sandboxes_in(Catalog::NOT_DELETED)? {
            if settled.contains(&r.id) {
                continue;
            }
            match r.state {
                InternalState::Active => {
                    let dir = r.vm_dir.clone().unwrap_or_default();
                    match self.vmm.adopt(std::path::Path::new(&dir)).await {
                        Ok(vm) => {
                            // A pause the previous daemon did not finish: the VM runs on
                            // (adopt continued it), so what that pause made goes.
                            self.discard_unfinished_pauses(&r, vm.disk_path())?;
                            adopted.push(PathBuf::from(&dir));
                            let slot = self.slot(&r.id);
                            self.install(&mut r, vm, &mut *slot.lock().await);
                            r.step(
                                "running",
                                Some("re-adopted after a pool manager restart".into()),
                            );
                            self.catalog.put_sandbox(&r)?;
                            self.catalog.append_event(
                                &r.id,
                                "sandbox.readopted",
                                &serde_json::json!({ "state": "running" }),
                            )?;
                        }
                        Err(e) => {
                            // The daemon died after a pause had snapshotted and ended the
                            // VM, before it wrote the record: the pause stands.
                            if self.recover_pause(&mut r, &e)? {
                                continue;
                            }
                            r.diagnostic = Some(Diagnostic {
                                code: "host_restarted".into(),
                                message: format!("the pool manager restarted and this sandbox's VM could not be re-adopted: {e}"),
                                action: "create a new sandbox".into(),
                            });
                            r.vm_dir = None;
                            self.transition(&mut r, InternalState::Failed, "lost in a restart")?;
                            self.release_volumes(&r).await;
                        }
                    }
                }
                InternalState::New | InternalState::Creating => {
                    self.fail_interrupted_create(
                        &mut r,
                        "the pool manager restarted while this sandbox was being created",
                    )
                    .await?;
                }
                InternalState::Destroying => {
                    // As `destroy` does it: the VM (if it is still there) first, then
                    // what the sandbox holds.
                    if let Some(dir) = r.vm_dir.clone() {
                        if let Ok(vm) = self.vmm.adopt(std::path::Path::new(&dir)).await {
                            self.quiesce_volumes(&r, &vm, false).await;
                            vm.kill().await;
                        }
                    }
                    self.finish_destroy(&mut r, "deletion finished after a restart")
                        .await?;
                }
                _ => {}
            }
        }
        // A paused sandbox is only as good as its pause snapshot.
        for row in self.catalog.snapshots("pause")? {
            if Snapshot::open(&row.dir).is_ok() {
                continue;
            }
            self.catalog.forget_snapshot(&row.id)?;
            let dir = row.dir;
            if let Some(mut r) = row
                .sandbox_id
                .and_then(|id| self.catalog.sandbox(&id).ok().flatten())
            {
                if r.state == InternalState::Stopped {
                    r.diagnostic = Some(Diagnostic {
                        code: "snapshot_missing".into(),
                        message: format!("the pause snapshot in {dir} is gone or incomplete"),
                        action: "create a new sandbox".into(),
                    });
                    r.pause_snapshot = None;
                    self.transition(&mut r, InternalState::Failed, "pause snapshot missing")?;
                }
            }
        }
        self.fail_interrupted_builds()?;
        // Then the rest of each operation cut short, with every sandbox settled.
        self.recover_after_states(intents).await?;
        // Scratch space of snapshots a crash interrupted: never published, never needed.
        let _ = std::fs::remove_dir_all(self.state_dir.join("uploads"));
        // Page indexes of the previous daemon's VMs: its VMs' next snapshots index the
        // memory they started as instead (an index only saves work).
        let _ = std::fs::remove_dir_all(self.state_dir.join(snapshots::PAGE_INDEXES));
        // Fork snapshots no live child stands on (a fork the crash interrupted, or one
        // whose last child's delete did not get to it).
        let bases: std::collections::HashSet<String> = self
            .catalog
            .sandboxes_in(Catalog::LIVE)?
            .into_iter()
            .filter_map(|r| r.fork_base)
            .collect();
        if let Ok(forks) = std::fs::read_dir(self.state_dir.join("forks")) {
            for dir in forks.flatten() {
                if !bases.contains(&dir.path().display().to_string()) {
                    info!(dir = %dir.path().display(), "removing an unused fork snapshot");
                    let _ = std::fs::remove_dir_all(dir.path());
                }
            }
        }
        // Volume images of sandboxes that are not this host's (an incoming migration
        // the crash cut short, a sandbox that moved on): never to be taken for theirs.
        let here: std::collections::HashSet<String> = self
            .catalog
            .sandboxes_in(Catalog::NOT_DELETED)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        self.sweep_stray_volume_images(&here);
        let reaped = self.vmm.reap_orphans(&adopted);
        // Transcripts a previous run left of sandboxes that no longer record here
        // (ended, failed, hibernated) go to the store, in the background: a slow store
        // must not hold up the start. The others' are continued when next written.
        let recording_here: std::collections::HashSet<String> = self
            .catalog
            .sandboxes_in(Catalog::NOT_DELETED)?
            .into_iter()
            .filter(|r| {
                r.state == InternalState::Active
                    || (r.state == InternalState::Stopped && r.hibernated.is_none())
            })
            .map(|r| r.id)
            .collect();
        let recordings = self.recordings.clone();
        tokio::spawn(async move {
            recordings
                .upload_leftovers(|id| recording_here.contains(id))
                .await
        });
        info!(adopted = adopted.len(), reaped, "reconciled after start");
        Ok(())
    }

    /// A create a restart cut short: `error` (`host_restarted`, with `message`), its
    /// volume holds released.
    async fn fail_interrupted_create(
        &self,
        r: &mut SandboxRecord,
        message: &str,
    ) -> Result<(), ApiError> {
        r.diagnostic = Some(Diagnostic {
            code: "host_restarted".into(),
            message: message.into(),
            action: "create a new sandbox".into(),
        });
        self.transition(
            r,
            InternalState::Failed,
            "creation interrupted by a restart",
        )?;
        self.release_volumes(r).await;
        Ok(())
    }

    /// Every sandbox's slot, as of now (the map's lock is not held afterwards).
    fn all_slots(&self) -> Vec<(String, Slot)> {
        self.slots
            .lock()
            .unwrap()
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    fn slot(&self, id: &str) -> Slot {
        self.slots
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Sets the state, stamps the timeline, stores the record and logs the event.
    fn transition(
        &self,
        r: &mut SandboxRecord,
        state: InternalState,
        reason: &str,
    ) -> Result<(), ApiError> {
        let from = r.state;
        if from != state {
            // A start (or an end) begins the idle clock afresh.
            self.activity.reset(&r.id);
        }
        r.state = state;
        r.step(state.public(), Some(reason.to_string()));
        self.catalog.put_sandbox(r)?;
        // Internal steps within one public state (new → creating, destroying → deleted)
        // are timeline entries; the event log records what callers can observe.
        if from.public() != state.public() {
            self.catalog.append_event(
                &r.id,
                &format!("sandbox.{}", state.public()),
                &serde_json::json!({ "state": state.public(), "from": from.public(), "reason": reason }),
            )?;
        }
        info!(sandbox = %r.id, from = ?from, to = ?state, reason, "state change");
        Ok(())
    }

    /// The record `id` if it belongs to `team`; other teams' sandboxes do not exist.
    pub fn owned(&self, team: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        match self.catalog.sandbox(id)? {
            Some(r) if r.team_id == team => Ok(r),
            _ => Err(ApiError::not_found("sandbox", id)),
        }
    }

    /// Runtime access for running sandbox `r`: a token of its current runtime epoch
    /// (issuing one moves nothing; only `connect` ends the older tokens).
    pub fn runtime_access(&self, r: &SandboxRecord) -> RuntimeAccess {
        let id = &r.id;
        let expires = chrono::Utc::now().timestamp() + TOKEN_TTL_S;
        let host = self
            .edge_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        RuntimeAccess {
            target: RuntimeTarget {
                transport: "http".into(),
                host,
                base_url: format!("{}/v1/sandboxes/{id}", self.edge_url),
            },
            token: self
                .tokens
                .issue(id, crate::tokens::runtime_epoch(r), expires),
            token_expires_at: iso8601(expires * 1000),
        }
    }

    fn view(&self, r: &SandboxRecord, with_runtime: bool) -> SandboxView {
        let runtime =
            (with_runtime && r.state == InternalState::Active).then(|| self.runtime_access(r));
        let mut view = SandboxView::of(r, runtime);
        view.dashboard_url = format!("{}/dashboard/sandboxes/{}", self.public_url(), r.id);
        view
    }

    /// Sets the public API's origin (`http://HOST:PORT`, no trailing slash) that
    /// dashboard links and the data plane's CORS name. Only the first call counts: it is
    /// set once, at start.
    pub fn set_public_url(&self, url: &str) {
        let _ = self.public_url.set(url.trim_end_matches('/').to_string());
    }

    /// The public API's origin; [`DEFAULT_PUBLIC_URL`] until one is set.
    pub fn public_url(&self) -> &str {
        self.public_url
            .get()
            .map(String::as_str)
            .unwrap_or(DEFAULT_PUBLIC_URL)
    }

    /// Data-plane access to running sandbox `id` for one more client (the dashboard): a
    /// token of its current runtime epoch. Unlike `connect` it neither resumes a paused
    /// sandbox (looking is not waking) nor ends the tokens other clients hold.
    pub fn access(&self, team: &str, id: &str) -> Result<RuntimeAccess, ApiError> {
        let r = self.owned(team, id)?;
        if r.state != InternalState::Active {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}: the data plane reaches running sandboxes only; resume it (POST /api/v1/sandboxes/{id}/resume) first",
                r.state.public()
            )));
        }
        Ok(self.runtime_access(&r))
    }

    /// Validates a create request into a new record.
    async fn plan(
        &self,
        team: &str,
        req: CreateRequest,
    ) -> Result<(SandboxRecord, api_model::ValidCreate), ApiError> {
        let valid = req.validate()?;
        let (on_timeout, timeout_s, mut resources) =
            (valid.on_timeout, valid.timeout_s, valid.resources);
        let given = valid.resources_given;
        let source = self.resolve_start_source(team, &valid.source)?;
        let mut template_id = source.clone();
        let mut env_vars = req.env_vars.clone();
        if BUILTIN.contains(&source.as_str()) {
            // The common case: no lookup on the create path.
        } else if let Some(t) = self.ready_template(Some(team), &source)? {
            // A custom template (by ID or name): its shape, its env under the create's.
            resources = snapshots::fixed_shape(t.resources, given, &t.id)?;
            template_id = t.id;
            env_vars = t.env_vars.into_iter().chain(req.env_vars.clone()).collect();
        } else {
            // A snapshot ID works as a template: its shape is the snapshot's.
            let snapshot = self
                .snapshot_template(team, &source)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found("template", &source).with_details(
                        serde_json::json!({ "field": valid.source.field(), "available": BUILTIN, "hint": "or a template of your team (GET /templates), or one of its snapshot IDs" }),
                    )
                })?;
            resources = snapshot_resources(&snapshot, given, &source)?;
        }
        self.check_shape(&template_id, resources)?;
        self.network.check(&valid.egress)?;
        let security = security::plan(req.security_policy.as_ref(), &mut env_vars)?;
        if security.policy.is_some() {
            self.network.check_security()?;
        }
        let mut record = SandboxRecord {
            env_vars,
            security_policy: security.policy,
            secret_values: security.secret_values,
            metadata: req.metadata,
            on_timeout,
            auto_resume: valid.auto_resume,
            idle_timeout_s: valid.idle_timeout_s,
            recording: valid.recording,
            egress: valid.egress.clone(),
            mounts: self.resolve_mounts(team, valid.mounts.clone()).await?,
            ..SandboxRecord::fresh(
                team,
                template_id,
                resources,
                timeout_s,
                valid
                    .snapshot_interval_s
                    .unwrap_or(self.snapshots.periodic_default_s),
            )
        };
        record.step("requested", None);
        Ok((record, valid))
    }

    /// What a start source names as a template reference (a built-in, a template ID or
    /// name, or a snapshot ID): `imageName` is a template of the team by name (its
    /// `imageId` must be that template's ID), `snapshotName` a snapshot the team named
    /// (its `snapshotId` must be that snapshot).
    fn resolve_start_source(
        &self,
        team: &str,
        source: &api_model::StartSource,
    ) -> Result<String, ApiError> {
        use api_model::StartSource;
        match source {
            StartSource::Template(t) => Ok(t.clone()),
            StartSource::Image { name, id } if BUILTIN.contains(&name.as_str()) => match id {
                Some(_) => Err(ApiError::bad_request(format!(
                    "imageId pins a custom template's build; {name:?} is a built-in image: omit imageId"
                ))
                .with_details(serde_json::json!({ "field": "imageId" }))),
                None => Ok(name.clone()),
            },
            StartSource::Image { name, id } => {
                let t = self
                    .catalog
                    .template(Some(team), name)?
                    .filter(|t| t.name.as_deref() == Some(name.as_str()))
                    .ok_or_else(|| {
                        ApiError::not_found("template named", name).with_details(serde_json::json!({
                            "field": "imageName",
                            "hint": "imageName is the name a template was built with (GET /templates); send templateID for a built-in or an ID"
                        }))
                    })?;
                match id {
                    Some(pin) if *pin != t.id => Err(ApiError::conflict(format!(
                        "imageName {name:?} is template {} now, not the pinned imageId {pin}; send imageId {} or omit it",
                        t.id, t.id
                    ))
                    .with_details(serde_json::json!({ "field": "imageId", "current": t.id }))),
                    _ => Ok(t.id),
                }
            }
            StartSource::Snapshot { name, id } => {
                let snapshot = self.catalog.snapshot_named(team, name)?.ok_or_else(|| {
                    ApiError::not_found("snapshot named", name).with_details(serde_json::json!({
                        "field": "snapshotName",
                        "hint": "name a snapshot when taking it (POST /sandboxes/{id}/snapshots {\"name\": …}); send templateID for a snapshot ID"
                    }))
                })?;
                match id {
                    Some(pin) if *pin != snapshot => Err(ApiError::conflict(format!(
                        "snapshotName {name:?} is snapshot {snapshot} now, not the pinned snapshotId {pin}; send snapshotId {snapshot} or omit it"
                    ))
                    .with_details(serde_json::json!({ "field": "snapshotId", "current": snapshot }))),
                    _ => Ok(snapshot),
                }
            }
        }
    }

    /// The checks on a shape that need this host: memory within its budget, and for a
    /// built-in template a disk that holds its root file system. (Custom and snapshot
    /// templates fix their own shape, and their disks only grow.)
    pub(super) fn check_shape(&self, template: &str, resources: Resources) -> Result<(), ApiError> {
        resources.validate()?;
        if resources.mem_mib > self.max_mem_mib {
            return Err(ApiError::bad_request(format!(
                "resources.memMiB {} is more than this host gives one sandbox; send at most {}",
                resources.mem_mib, self.max_mem_mib
            )));
        }
        if BUILTIN.contains(&template) {
            let min_disk = self
                .vmm
                .rootfs_mib(template)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if resources.disk_mib < min_disk {
                return Err(ApiError::bad_request(format!(
                    "resources.diskSizeMiB {} is smaller than template {template}'s root file system; send at least {min_disk}",
                    resources.disk_mib
                )));
            }
        }
        Ok(())
    }

    /// Creates a sandbox: a restore of its template's snapshot for the asked shape.
    pub async fn create(
        self: &Arc<Self>,
        team: &str,
        req: CreateRequest,
    ) -> Result<SandboxView, ApiError> {
        let (record, valid) = self.plan(team, req).await?;
        if record.mounts.is_empty() {
            // Its intent is begun only if it restores (see `create_holding`).
            return self.create_holding(record, valid, None).await;
        }
        // Its volume holds are taken before its record exists: the intent names them,
        // and outlive a power loss, so the intent is synced.
        let volumes: Vec<&str> = record.mounts.iter().map(|m| m.volume.as_str()).collect();
        let intent = self.begin_op(
            &record.id,
            recovery::op::CREATE,
            serde_json::json!({ "volumes": volumes }),
        )?;
        self.hold_volumes(&record).await?;
        intent.step("create.held", serde_json::json!({}));
        let released = record.clone();
        let result = self.create_holding(record, valid, Some(intent)).await;
        if result.is_err() {
            // Nothing ran with the volumes (or the failure path already saved them).
            self.release_volumes(&released).await;
        }
        result
    }

    /// Creates a sandbox whose volume holds (if any) are taken, and whose intent is
    /// begun (`intent`) if it holds any.
    ///
    /// A create that holds no volume begins its intent here, and only where a restart
    /// would find something to undo: a warm checkout that readies nothing in the guest
    /// (no security policy) has none, as its record, written with the checkout in one
    /// transaction, says all there is (a running VM, which the next start adopts). Such
    /// an intent is not synced: what it covers (a VM, its files, which the next start
    /// reaps) a power loss ends anyway. (On PostgreSQL see `Catalog::begin_intent`: a
    /// database crash.)
    async fn create_holding(
        self: &Arc<Self>,
        mut record: SandboxRecord,
        valid: api_model::ValidCreate,
        mut intent: Option<recovery::OpIntent>,
    ) -> Result<SandboxView, ApiError> {
        let begin = |record: &SandboxRecord| {
            self.begin_op_with(
                &record.id,
                recovery::op::CREATE,
                serde_json::json!({ "volumes": [] }),
                Durability::UntilPowerLoss,
            )
        };
        let wait = valid.wait_ready;
        // The new sandbox's slot is held from before its record exists until its VM is
        // in it: a delete or connect that finds the record waits for a whole sandbox.
        // Nobody else knows the ID yet, so this never waits.
        let slot = self.slot(&record.id);
        let mut guard = slot.clone().lock_owned().await;
        let id = record.id.clone();
        let refused = |e: ApiError| {
            self.slots.lock().unwrap().remove(&id);
            e
        };
        if let Some(mode) = valid.warm_pool {
            if record.security_policy.is_some() && intent.is_none() {
                // Its team CA goes into the guest between the checkout and the install.
                intent = Some(begin(&record).map_err(refused)?);
            }
            // Quotas first, then the checkout and the record in one critical section.
            match self.admit_checkout(&mut record, |record, vm| {
                record.vm_dir = Some(vm.dir().display().to_string());
                // Timeouts count from the checkout.
                record.expires_at_ms = now_ms() + record.timeout_s as i64 * 1000;
                record.state = InternalState::Active;
                record.step("running", Some("checked out from the warm pool".into()));
                vec![
                    (
                        "sandbox.created",
                        serde_json::json!({ "templateID": record.template_id, "state": "starting", "warmPool": true }),
                    ),
                    (
                        "sandbox.running",
                        serde_json::json!({ "state": "running", "from": "starting", "reason": "checked out from the warm pool" }),
                    ),
                ]
            }).map_err(refused)? {
                Some(vm) => return self.adopt_warm(record, vm, guard, intent.as_ref()).await,
                None if mode == api_model::WarmPoolMode::Require => {
                    let r = record.resources;
                    self.slots.lock().unwrap().remove(&id);
                    return Err(ApiError::warm_pool_unavailable(format!(
                        "no ready instance of {} ({} vCPUs, {} MiB, {} MiB disk) in its warm pool; retry, send warmPool: prefer to fall back to a restore, or raise the pool's size",
                        record.template_id, r.vcpus, r.mem_mib, r.disk_mib
                    ))
                    .with_details(serde_json::json!({ "templateID": record.template_id })));
                }
                None => {}
            }
        }
        let intent = match intent {
            Some(intent) => intent,
            None => begin(&record).map_err(refused)?,
        };
        self.admit(&record).map_err(refused)?;
        self.catalog.append_event(
            &record.id,
            "sandbox.created",
            &serde_json::json!({ "templateID": record.template_id, "state": "starting" }),
        )?;
        intent.step("create.admitted", serde_json::json!({}));
        let starting = self.view(&record, false);
        let span = tracing::info_span!("sandbox", id = %record.id);
        let this = self.clone();
        let work = async move {
            let intent = intent;
            let result = match this.start_vm(&mut record).await {
                Ok(mut vm) => match this.prepare_guest(&record, &mut vm).await {
                    Ok(()) => {
                        intent.step("create.started", serde_json::json!({}));
                        Ok(vm)
                    }
                    Err(e) => {
                        vm.kill().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(vm) => {
                    this.install(&mut record, vm, &mut guard);
                    this.transition(&mut record, InternalState::Active, "restored from template")?;
                }
                Err(e) => {
                    // A full worker is said as such: the caller frees space or goes
                    // elsewhere, retrying here would fail the same way.
                    let full = e.status == 507;
                    record.diagnostic = Some(Diagnostic {
                        code: if full { "insufficient_storage" } else { "create_failed" }.into(),
                        message: e.message.clone(),
                        action: if full {
                            "free space on this worker (end sandboxes, delete snapshots) or create elsewhere"
                        } else {
                            "retry the create; if it fails again, check the pool manager's log"
                        }
                        .into(),
                    });
                    this.transition(&mut record, InternalState::Failed, "create failed")?;
                    this.release_volumes(&record).await;
                }
            }
            Ok::<SandboxRecord, ApiError>(record)
        }
        .instrument(span);
        if wait {
            let record = work.await?;
            if record.state == InternalState::Failed {
                let d = record.diagnostic.clone().unwrap();
                let error = if d.code == "insufficient_storage" {
                    ApiError::insufficient_storage(d.message.clone())
                } else {
                    ApiError::internal(d.message.clone())
                };
                return Err(error.with_details(serde_json::json!({
                    "sandboxID": record.id, "diagnostic": d
                })));
            }
            Ok(self.view(&record, true))
        } else {
            tokio::spawn(async move {
                if let Err(e) = work.await {
                    warn!(error = %e.message, "background create failed");
                }
            });
            Ok(starting)
        }
    }

    /// Makes a checked-out warm VM (its record already written by
    /// [`Manager::admit_checkout`]) the new sandbox's: its volumes are mounted and the
    /// VM goes into its slot, with no restore.
    async fn adopt_warm(
        &self,
        mut record: SandboxRecord,
        mut vm: QemuVm,
        mut guard: tokio::sync::OwnedMutexGuard<Option<QemuVm>>,
        intent: Option<&recovery::OpIntent>,
    ) -> Result<SandboxView, ApiError> {
        // Checked out and recorded, not yet installed: where a restart finds a record
        // that says running and a VM nobody holds (the kill -9 tests stop here).
        failpoint::hit("create.checked_out");
        if let Err(e) = self.prepare_guest(&record, &mut vm).await {
            vm.kill().await;
            record.diagnostic = Some(Diagnostic {
                code: "create_failed".into(),
                message: e.message.clone(),
                action: "check the volumes named in mounts, then create again".into(),
            });
            self.transition(
                &mut record,
                InternalState::Failed,
                "mounting volumes failed",
            )?;
            return Err(e);
        }
        // The record said `running` from the checkout on: a restart before this step
        // fails the sandbox (its volumes may be missing) instead of re-adopting it.
        // Without an intent there was nothing to ready: the record stands as written.
        if let Some(intent) = intent {
            intent.step("create.started", serde_json::json!({}));
        }
        self.install(&mut record, vm, &mut guard);
        info!(sandbox = %record.id, "checked out from the warm pool");
        Ok(self.view(&record, true))
    }

    /// What a new VM needs before it is the sandbox's: the team CA in its trust stores
    /// (a sandbox with a security policy), its volumes mounted.
    async fn prepare_guest(&self, record: &SandboxRecord, vm: &mut QemuVm) -> Result<(), ApiError> {
        self.secure_guest(record, vm).await?;
        self.mount_volumes(record, vm).await
    }

    async fn start_vm(&self, record: &mut SandboxRecord) -> Result<QemuVm, ApiError> {
        self.transition(
            record,
            InternalState::Creating,
            "restoring the template snapshot",
        )?;
        if !BUILTIN.contains(&record.template_id.as_str()) {
            return self
                .restore_snapshot_template(
                    Some(&record.team_id),
                    &record.template_id,
                    record.resources,
                )
                .await;
        }
        self.restore_template(&record.template_id, record.resources)
            .await
    }

    /// A new VM of a built-in template with this shape: a copy-on-write restore of its
    /// template snapshot, the disk grown to size.
    async fn restore_template(&self, template: &str, res: Resources) -> Result<QemuVm, ApiError> {
        let snapshot = self
            .templates
            .snapshot(template, res.vcpus, res.mem_mib)
            .await
            .map_err(|e| ApiError::internal(format!("template snapshot: {e}")))?;
        // Once per template snapshot, not on every create: it is a synchronous write.
        if self
            .recorded_templates
            .lock()
            .unwrap()
            .insert(snapshot.manifest().id.clone())
        {
            self.catalog
                .record_snapshot("template", None, Some(template), &snapshot)?;
        }
        let options = RestoreOptions {
            memory: RestoreMemory::CopyOnWrite,
            disk_mib: Some(res.disk_mib),
            ..RestoreOptions::default()
        };
        self.vmm
            .restore(&snapshot, &options)
            .await
            .map_err(|e| vm_error("restore", e))
    }

    /// The sandbox's record and view, read-only (never wakes it).
    pub fn get(&self, team: &str, id: &str) -> Result<SandboxView, ApiError> {
        let r = self.owned(team, id)?;
        Ok(self.view(&r, true))
    }

    /// A page of a team's sandboxes.
    pub fn list(
        &self,
        team: &str,
        q: &ListQuery,
    ) -> Result<(Vec<SandboxView>, Option<String>), ApiError> {
        let after = match &q.next_token {
            None => 0,
            Some(t) => decode_token(t)?,
        };
        let mut page: Vec<(i64, SandboxView)> = Vec::new();
        let mut more = false;
        let stored: Vec<&str> = match &q.states {
            Some(states) => states
                .iter()
                .flat_map(|s| InternalState::stored_names_of(s).iter().copied())
                .collect(),
            None => ["starting", "running", "paused", "error"]
                .iter()
                .flat_map(|s| InternalState::stored_names_of(s).iter().copied())
                .collect(),
        };
        // Without a metadata filter every row read is kept: one more than a page says
        // whether there is a next one, and nothing past it is parsed.
        let rows = q.metadata.is_empty().then_some(q.limit + 1);
        for (seq, r) in self.catalog.sandboxes_of(team, after, &stored, rows)? {
            let meta_ok = q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v));
            if !meta_ok {
                continue;
            }
            if page.len() == q.limit {
                more = true;
                break;
            }
            page.push((seq, self.view(&r, false)));
        }
        // The token is the position of the last item returned.
        let next = more.then(|| encode_token(page.last().map(|(s, _)| *s).unwrap_or(after)));
        Ok((page.into_iter().map(|(_, v)| v).collect(), next))
    }

    /// Resumes if paused, optionally sets the timeout, and hands out fresh runtime access:
    /// a token of a new runtime epoch, which ends every runtime token issued before it.
    pub async fn connect(
        &self,
        team: &str,
        id: &str,
        timeout: Option<u64>,
    ) -> Result<SandboxView, ApiError> {
        self.adopt_hibernated(team, id).await?;
        let r = self.owned(team, id)?;
        if r.state == InternalState::Stopped {
            self.resume(team, id).await?;
        }
        if let Some(t) = timeout {
            self.set_timeout(team, id, t)?;
        }
        let not_running = |state: InternalState| {
            ApiError::conflict(format!(
                "sandbox {id} is {}; create a new one",
                state.public()
            ))
        };
        // Checked before the lock too: one still starting answers now, not once its
        // create (which holds the lock) is done.
        match self.owned(team, id)?.state {
            InternalState::Active => {}
            other => return Err(not_running(other)),
        }
        // Under the slot's lock: a lifecycle operation writing the record from a read
        // made before this one would bring the old epoch (and the old tokens) back.
        let (_guard, mut r) = self.lock_owned(team, id).await?;
        if r.state != InternalState::Active {
            return Err(not_running(r.state));
        }
        crate::tokens::bump_runtime_epoch(&mut r, now_ms());
        // Synced before the token leaves: a record rolled back by a crash would refuse
        // the new token and take the old ones back.
        self.catalog.put_sandbox(&r)?;
        Ok(self.view(&r, true))
    }

    /// Locks the sandbox's slot and reads its record under the lock. Ownership is checked
    /// first, so another team's ID never gets a slot.
    async fn lock_owned(
        &self,
        team: &str,
        id: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<Option<QemuVm>>, SandboxRecord), ApiError> {
        self.owned(team, id)?;
        let guard = self.slot(id).lock_owned().await;
        let r = self.owned(team, id)?;
        here(&r)?;
        Ok((guard, r))
    }

    /// Takes a pause snapshot on this host's disk and ends the VM.
    pub async fn pause(&self, team: &str, id: &str) -> Result<SandboxView, ApiError> {
        let (mut vm_slot, mut r) = self.lock_owned(team, id).await?;
        match r.state {
            InternalState::Active => {}
            InternalState::Stopped => return Ok(self.view(&r, false)),
            other => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {} and cannot be paused",
                    other.public()
                )))
            }
        }
        test_stall_pause().await;
        let mut vm = vm_slot
            .take()
            .ok_or_else(|| ApiError::internal("running sandbox has no VM"))?;
        // A new directory per pause: a VM resumed from the previous pause still reads
        // that snapshot's disk as its backing file until this one is complete.
        let pauses = self.pauses_dir(id);
        let dir = pauses.join(uuid::Uuid::new_v4().simple().to_string());
        let intent = self.begin_op(
            id,
            recovery::op::PAUSE,
            serde_json::json!({ "dir": dir.display().to_string() }),
        )?;
        let _ = std::fs::create_dir_all(&pauses);
        match vm.snapshot(&dir, false).await {
            Ok(snapshot) => {
                intent.step("pause.snapshotted", serde_json::json!({}));
                self.catalog
                    .record_snapshot("pause", Some(id), None, &snapshot)?;
                vm.kill().await;
                intent.step("pause.vm_ended", serde_json::json!({}));
                // The new snapshot stands alone (its disk is rebased onto the template's
                // root file system): earlier pauses of this sandbox can go (GiB of files:
                // removed on a blocking thread).
                let keep = dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for old in std::fs::read_dir(&pauses).into_iter().flatten().flatten() {
                        if old.path() != keep {
                            let _ = std::fs::remove_dir_all(old.path());
                        }
                    }
                })
                .await;
                intent.step("pause.older_removed", serde_json::json!({}));
                r.pause_snapshot = Some(dir.display().to_string());
                r.vm_dir = None;
                self.transition(&mut r, InternalState::Stopped, "paused")?;
                // What it recorded is stored while it sleeps (in the background: the
                // files stay until they are, and the slot is not held for it); the
                // transcripts go on here when it resumes.
                let (recordings, sandbox) = (self.recordings.clone(), id.to_string());
                tokio::spawn(async move { recordings.flush(&sandbox).await });
                Ok(self.view(&r, false))
            }
            Err(e) => {
                // The VM is intact: keep it running and say why the pause failed.
                let _ = vm.resume().await;
                *vm_slot = Some(vm);
                Err(ApiError::internal(format!(
                    "pause failed, the sandbox keeps running: {e}"
                )))
            }
        }
    }

    /// Where a sandbox's pause snapshots live.
    fn pauses_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("pauses").join(id)
    }

    /// Restores a paused sandbox from its pause snapshot.
    pub async fn resume(&self, team: &str, id: &str) -> Result<SandboxView, ApiError> {
        self.adopt_hibernated(team, id).await?;
        let (mut vm_slot, mut r) = self.lock_owned(team, id).await?;
        match r.state {
            InternalState::Stopped => {}
            InternalState::Active => return Ok(self.view(&r, true)),
            other => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {} and cannot be resumed",
                    other.public()
                )))
            }
        }
        if r.hibernated.is_some() {
            return self.resume_hibernated(vm_slot, r).await;
        }
        let dir = r
            .pause_snapshot
            .clone()
            .ok_or_else(|| ApiError::internal("paused sandbox has no pause snapshot"))?;
        let snapshot = Snapshot::open(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let options = RestoreOptions {
            volumes: self.volume_images(&r.id, &snapshot)?,
            ..RestoreOptions::default()
        };
        let vm = self.vmm.restore(&snapshot, &options).await.map_err(|e| {
            ApiError::internal(format!("resume failed, the sandbox stays paused: {e}"))
        })?;
        // A policy set while it was paused needs the CA in the guest now.
        if let Err(e) = self.secure_guest(&r, &vm).await {
            vm.kill().await;
            return Err(e);
        }
        self.install(&mut r, vm, &mut vm_slot);
        // Timeouts count from the resume.
        r.expires_at_ms = now_ms() + r.timeout_s as i64 * 1000;
        r.pause_snapshot = None;
        self.transition(&mut r, InternalState::Active, "resumed")?;
        // The files stay: the running VM's disk is an overlay on this snapshot's disk.
        // The next pause or the delete removes them.
        self.catalog.forget_snapshot(&snapshot.manifest().id)?;
        Ok(self.view(&r, true))
    }

    /// Sets the timeout to `seconds` from now.
    pub fn set_timeout(&self, team: &str, id: &str, seconds: u64) -> Result<SandboxView, ApiError> {
        let seconds = api_model::validate_timeout(seconds)?;
        let mut r = self.owned(team, id)?;
        if matches!(
            r.state,
            InternalState::Deleted | InternalState::Destroying | InternalState::Failed
        ) {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}",
                r.state.public()
            )));
        }
        let expires_at_ms = now_ms() + seconds as i64 * 1000;
        // Patched in place: this call holds no lock on the sandbox, and rewriting the
        // record read above could undo a `connect` (its token epoch) made meanwhile.
        r = self
            .catalog
            .set_expiry(id, seconds, expires_at_ms)?
            .ok_or_else(|| ApiError::not_found("sandbox", id))?;
        self.catalog.append_event(
            id,
            "sandbox.timeout_set",
            &serde_json::json!({ "timeout": seconds, "expiresAt": iso8601(r.expires_at_ms) }),
        )?;
        Ok(self.view(&r, false))
    }

    /// Extends the lifetime by `seconds` (default: its timeout) from now.
    pub fn refresh(
        &self,
        team: &str,
        id: &str,
        seconds: Option<u64>,
    ) -> Result<SandboxView, ApiError> {
        let r = self.owned(team, id)?;
        self.set_timeout(team, id, seconds.unwrap_or(r.timeout_s))
    }

    /// Ends the sandbox and everything it owns on this host.
    pub async fn delete(&self, team: &str, id: &str) -> Result<(), ApiError> {
        // A second delete says so (404), so a caller learns whether its call ended the
        // sandbox without asking first.
        if self.owned(team, id)?.state == InternalState::Deleted {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("sandbox '{id}' is already deleted"),
            ));
        }
        self.destroy(id, "deleted by request").await
    }

    async fn destroy(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let slot = self.slot(id);
        let mut vm_slot = slot.lock().await;
        let Some(mut r) = self.catalog.sandbox(id)? else {
            return Ok(());
        };
        if r.state == InternalState::Deleted {
            return Ok(());
        }
        here(&r)?;
        let intent = self.begin_op(id, recovery::op::DELETE, serde_json::json!({}))?;
        self.transition(&mut r, InternalState::Destroying, reason)?;
        intent.step("delete.destroying", serde_json::json!({}));
        if let Some(vm) = vm_slot.take() {
            self.quiesce_volumes(&r, &vm, false).await;
            vm.kill().await;
        }
        intent.step("delete.vm_ended", serde_json::json!({}));
        self.finish_destroy(&mut r, reason).await?;
        drop(vm_slot);
        self.slots.lock().unwrap().remove(id);
        Ok(())
    }

    /// The rest of a deletion once the sandbox's VM is gone (`destroy`, or a restart
    /// that found it `destroying`): its volumes saved and released, its pause snapshots
    /// (local and stored) deleted, its fork base released, then `deleted`.
    async fn finish_destroy(&self, r: &mut SandboxRecord, reason: &str) -> Result<(), ApiError> {
        self.release_volumes(r).await;
        failpoint::hit("delete.volumes_released");
        if let Some(dir) = r.pause_snapshot.take() {
            if let Ok(snapshot) = Snapshot::open(&dir) {
                self.catalog.forget_snapshot(&snapshot.manifest().id)?;
            }
        }
        // Every pause snapshot of the sandbox, including one a resumed VM was using.
        let _ = std::fs::remove_dir_all(self.pauses_dir(&r.id));
        // Its stored pause snapshot ends with it; periodic and manual ones stay.
        if let Some(snapshot_id) = r.hibernated.take() {
            self.delete_hibernate_snapshot(&snapshot_id).await;
        }
        failpoint::hit("delete.snapshots_removed");
        // Its transcripts are complete: stored (a failed upload is retried at the next
        // start), then their local files go.
        self.recordings.finish(r).await;
        let fork_base = r.fork_base.take();
        self.network.forget(&r.id);
        // Its secrets' values go with it: a restore of its snapshots after the delete
        // gets placeholders only.
        r.secret_values = SecretValues::default();
        self.transition(r, InternalState::Deleted, reason)?;
        if let Some(dir) = fork_base {
            self.release_fork_base(&dir)?;
        }
        Ok(())
    }

    /// The pause snapshots of sandbox `r` made since it last started running (created,
    /// resumed or re-adopted): a pause a restart interrupted made them. The one a
    /// resumed VM's disk is layered on is older. Oldest first. Incomplete directories
    /// are removed: nothing finishes them after a restart.
    fn pauses_since_running(&self, r: &SandboxRecord) -> Vec<Snapshot> {
        let since = last_running_ms(r);
        let mut found = Vec::new();
        let pauses = self.pauses_dir(&r.id);
        for entry in std::fs::read_dir(&pauses).into_iter().flatten().flatten() {
            let path = entry.path();
            match Snapshot::open(&path) {
                // The manifest's file time, not its `created_unix_ms`: a snapshot
                // fetched from the store was made on another host's clock.
                Ok(s) if modified_ms(&path.join("manifest.json")) >= since => found.push(s),
                Ok(_) => {}
                Err(e) => {
                    warn!(sandbox = %r.id, error = %e, "removing an unfinished pause snapshot");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        found.sort_by_key(|s| s.manifest().created_unix_ms);
        found
    }

    /// After adopting running sandbox `r`'s VM (its disk overlay `disk`): the snapshots
    /// of a pause the previous daemon did not finish go, as a failed pause leaves none.
    /// The snapshot the overlay is layered on stays whatever its time says.
    fn discard_unfinished_pauses(&self, r: &SandboxRecord, disk: &Path) -> Result<(), ApiError> {
        let backing = qcow2_backing(disk);
        for s in self.pauses_since_running(r) {
            if backing.as_deref().is_some_and(|b| b.starts_with(s.dir())) {
                continue;
            }
            info!(sandbox = %r.id, snapshot = %s.manifest().id, "discarding the snapshot of a pause a restart interrupted: the sandbox keeps running");
            self.catalog.forget_snapshot(&s.manifest().id)?;
            let _ = s.delete();
        }
        Ok(())
    }

    /// Running sandbox `r` lost its VM in a restart (`lost`): if a pause had completed
    /// its snapshot first (the daemon died before writing the record), the sandbox is
    /// paused on it, as `pause` leaves it. Returns whether it was.
    fn recover_pause(&self, r: &mut SandboxRecord, lost: &vmm::VmmError) -> Result<bool, ApiError> {
        let Some(snapshot) = self.pauses_since_running(r).pop() else {
            return Ok(false);
        };
        let snapshot_id = snapshot.manifest().id.clone();
        self.catalog
            .record_snapshot("pause", Some(&r.id), None, &snapshot)?;
        for old in std::fs::read_dir(self.pauses_dir(&r.id))
            .into_iter()
            .flatten()
            .flatten()
        {
            if old.path() != snapshot.dir() {
                if let Ok(s) = Snapshot::open(old.path()) {
                    self.catalog.forget_snapshot(&s.manifest().id)?;
                }
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        r.pause_snapshot = Some(snapshot.dir().display().to_string());
        r.vm_dir = None;
        self.transition(
            r,
            InternalState::Stopped,
            "paused (recovered after a pool manager restart)",
        )?;
        self.catalog.append_event(
            &r.id,
            "sandbox.recovered",
            &serde_json::json!({
                "state": "paused",
                "snapshotID": snapshot_id,
                "reason": format!("the pool manager stopped after the pause's snapshot was complete; its VM was not re-adopted: {lost}"),
            }),
        )?;
        warn!(sandbox = %r.id, snapshot = %snapshot_id, "recovered an interrupted pause");
        Ok(true)
    }

    /// The agent of a running sandbox, for the data plane.
    pub async fn agent(
        &self,
        id: &str,
    ) -> Result<(AgentClient, BTreeMap<String, String>), ApiError> {
        let r = self
            .catalog
            .sandbox(id)?
            .ok_or_else(|| ApiError::not_found("sandbox", id))?;
        let agent = self.running_agent(&r).await?;
        Ok((agent, r.env_vars))
    }

    /// Ends or pauses sandboxes whose timeout passed, and prunes deleted sandboxes past
    /// their retention. Runs until the process ends.
    ///
    /// The loop never waits on a sandbox: each due sandbox's action runs in a task of
    /// its own, at most `SWEEP_PARALLEL` pauses and hibernates (they write GiB, or
    /// wait on a guest to freeze its file systems) and as many kills at once, and a
    /// sandbox whose action is still running is not started again. One slow hibernate
    /// delays no other sandbox's timeout.
    pub async fn sweep_timeouts(self: Arc<Self>) {
        let lanes = SweepLanes::default();
        let mut last_prune = std::time::Instant::now() - PRUNE_EVERY;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = now_ms();
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = std::time::Instant::now();
                let before = now - (self.deleted_retention_s as i64).saturating_mul(1000);
                match self.catalog.prune_deleted(before) {
                    Ok(0) => {}
                    Ok(n) => info!(pruned = n, "deleted sandboxes past their retention pruned"),
                    Err(e) => warn!(error = %e, "pruning deleted sandboxes failed"),
                }
            }
            let scan = std::time::Instant::now();
            let active = match self.catalog.sandboxes_in(&["active"]) {
                Ok(all) => all,
                Err(e) => {
                    warn!(error = %e, "timeout sweep could not read the catalog");
                    continue;
                }
            };
            self.activity
                .retain(&active.iter().map(|r| r.id.clone()).collect());
            let due: Vec<SandboxRecord> = active
                .into_iter()
                .filter(|r| r.expires_at_ms <= now || self.idle_past_timeout(r))
                .collect();
            // What one pass over the catalog costs: it must not grow with the history
            // (the catalog bench reads it from /metrics).
            self.sweep_scan_us.store(
                scan.elapsed().as_micros() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            for r in due {
                self.clone().spawn_timeout_action(r, &lanes);
            }
        }
    }

    /// Starts sandbox `r`'s timeout action in a task of its own, unless its previous one
    /// still runs. The task waits for a permit of the action's lane.
    fn spawn_timeout_action(self: Arc<Self>, r: SandboxRecord, lanes: &SweepLanes) {
        let Some(claim) = InFlight::claim(&lanes.in_flight, &r.id) else {
            return;
        };
        let lane = match r.on_timeout {
            OnTimeout::Pause | OnTimeout::Hibernate => lanes.snapshots.clone(),
            _ => lanes.kills.clone(),
        };
        let span = tracing::info_span!("timeout", sandbox = %r.id);
        tokio::spawn(
            async move {
                // Given back when the task ends, however it ends.
                let _claim = claim;
                let Ok(_permit) = lane.acquire_owned().await else {
                    return;
                };
                self.timeout_action(&r.id).await;
            }
            .instrument(span),
        );
    }

    /// Whether running sandbox `r` has an idle timeout and has been idle that long.
    fn idle_past_timeout(&self, r: &SandboxRecord) -> bool {
        r.idle_timeout_s > 0
            && self.activity.idle_for(&r.id) >= std::time::Duration::from_secs(r.idle_timeout_s)
    }

    /// Applies sandbox `id`'s timeout action if its timeout (or idle timeout) still
    /// stands: waiting for a permit may have taken a while, and a refresh, pause, delete
    /// or traffic meanwhile wins.
    async fn timeout_action(&self, id: &str) {
        let (r, why) = match self.catalog.sandbox(id) {
            Ok(Some(r)) if r.state == InternalState::Active && r.expires_at_ms <= now_ms() => {
                (r, "timeout")
            }
            Ok(Some(r)) if r.state == InternalState::Active && self.idle_past_timeout(&r) => {
                (r, "idleTimeout")
            }
            Ok(_) => return,
            Err(e) => {
                warn!(sandbox = %id, error = %e, "timeout sweep could not read the sandbox");
                return;
            }
        };
        let _ = self.catalog.append_event(
            &r.id,
            "sandbox.timeout",
            &serde_json::json!({ "onTimeout": r.on_timeout, "reason": why }),
        );
        let result = match r.on_timeout {
            OnTimeout::Pause => self.pause(&r.team_id, &r.id).await.map(drop),
            OnTimeout::Hibernate => self.hibernate(&r.team_id, &r.id).await.map(drop),
            _ => self.destroy(&r.id, "timeout").await,
        };
        if let Err(e) = result {
            warn!(sandbox = %r.id, error = %e.message, "timeout action failed");
        }
    }

    /// Daemon shutdown: ends every VM, or with `keep` leaves them running for the next
    /// start to adopt.
    pub async fn shutdown(&self, keep: bool) {
        // Build VMs and warm VMs belong to no sandbox: nothing would adopt them.
        self.cancel_builds().await;
        self.drain_warm_pools().await;
        for (id, slot) in self.all_slots() {
            if let Some(vm) = slot.lock().await.take() {
                if keep {
                    vm.release();
                    continue;
                }
                let record = self.catalog.sandbox(&id).ok().flatten();
                if let Some(r) = &record {
                    self.quiesce_volumes(r, &vm, false).await;
                }
                vm.kill().await;
                if let Some(mut r) = record {
                    // Its volume writes are saved and the volumes freed: it never runs again.
                    self.release_volumes(&r).await;
                    self.recordings.finish(&r).await;
                    r.diagnostic = Some(Diagnostic {
                        code: "host_stopped".into(),
                        message: "the pool manager was stopped and ended this sandbox's VM".into(),
                        action:
                            "create a new sandbox; pause sandboxes you want to keep across stops"
                                .into(),
                    });
                    r.vm_dir = None;
                    let _ = self.transition(&mut r, InternalState::Failed, "pool manager stopped");
                }
            }
        }
    }
}

/// Filters and paging of a list.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub states: Option<Vec<String>>,
    pub metadata: BTreeMap<String, String>,
    pub limit: usize,
    pub next_token: Option<String>,
}

fn encode_token(seq: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{seq}"))
}

fn decode_token(token: &str) -> Result<i64, ApiError> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("after:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| {
            ApiError::bad_request("nextToken is not one this server issued; send the nextToken of the previous page, or none")
        })
}

/// How often deleted sandboxes past their retention are pruned.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Timeout actions the sweeper runs at once per lane (pauses and hibernates; kills).
const SWEEP_PARALLEL: usize = 8;

/// What the timeout sweeper has under way: the sandboxes whose action runs, and the
/// permits of its two lanes. Pauses and hibernates (GiB to write, a guest's freeze to
/// wait for) have a lane of their own, so even a full lane of stalled ones holds up
/// no kill.
struct SweepLanes {
    in_flight: Arc<Mutex<std::collections::HashSet<String>>>,
    snapshots: Arc<tokio::sync::Semaphore>,
    kills: Arc<tokio::sync::Semaphore>,
}

impl Default for SweepLanes {
    fn default() -> Self {
        Self {
            in_flight: Arc::default(),
            snapshots: Arc::new(tokio::sync::Semaphore::new(SWEEP_PARALLEL)),
            kills: Arc::new(tokio::sync::Semaphore::new(SWEEP_PARALLEL)),
        }
    }
}

/// A sandbox's place in the sweeper's in-flight set, given up when dropped (when its
/// action ends, fails or panics).
struct InFlight {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl InFlight {
    /// The place of `id`, unless an action of it is already under way.
    fn claim(set: &Arc<Mutex<std::collections::HashSet<String>>>, id: &str) -> Option<Self> {
        let fresh = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        fresh.then(|| Self {
            set: set.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Removes a directory tree (a snapshot's GiB of memory and disk files) on a blocking
/// thread, off the runtime's workers; whether it went is not reported.
async fn remove_tree(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}

/// Test hook: how long each pause and hibernate waits (its sandbox locked, the VM
/// running) before it snapshots, from `NULLSPACE_TEST_STALL_PAUSE_MS`, read once.
/// Debug builds only (a release build ignores the variable): the sweeper's tests stall
/// one sandbox's timeout action with it.
#[cfg(debug_assertions)]
async fn test_stall_pause() {
    static STALL: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let stall = *STALL.get_or_init(|| {
        std::env::var("NULLSPACE_TEST_STALL_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(stall) = stall {
        warn!(
            stall_ms = stall.as_millis() as u64,
            "test hook: stalling a pause (NULLSPACE_TEST_STALL_PAUSE_MS)"
        );
        tokio::time::sleep(stall).await;
    }
}

#[cfg(not(debug_assertions))]
async fn test_stall_pause() {}

/// Refuses work on a sandbox another host took while the caller waited for its slot
/// (a live migration holds the slot until it has handed the sandbox over): the
/// request is to be retried, and routing sends it to the new owner.
pub(crate) fn here(r: &SandboxRecord) -> Result<(), ApiError> {
    match (crate::cluster::this_host(), r.host_id.as_deref()) {
        (Some(me), Some(owner)) if owner != me => Err(ApiError::new(
            503,
            "owner_moved",
            format!(
                "sandbox {} moved to host {owner} while this request waited; retry it (it goes there)",
                r.id
            ),
        )),
        _ => Ok(()),
    }
}

/// A VM that could not start, as the API says it: a full file system is the host's
/// storage (507, with what to free), anything else an internal error.
pub(crate) fn vm_error(what: &str, e: vmm::VmmError) -> ApiError {
    match e {
        vmm::VmmError::NoSpace(why) => ApiError::insufficient_storage(format!("{what}: {why}")),
        e => ApiError::internal(format!("{what}: {e}")),
    }
}
