//! Snapshots in object storage: manual and periodic snapshots, hibernate and its resume,
//! restore into a new sandbox (on any worker sharing the store), snapshots used as
//! templates, fork, and garbage collection of unreferenced chunks.
//!
//! A snapshot is taken into a scratch directory under the state dir, published to the
//! store (chunks, then the manifest with a conditional put), and the scratch directory
//! removed whatever happened. A failed publish leaves no snapshot and the sandbox
//! running.

use super::volumes::inherit::{inherit_mounts, thaw_paths};
use super::{now_ms, Manager, Slot};
use crate::error::ApiError;
use crate::model::*;
use api_model::{ForkBody, RestoreBody};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage::snapshots::{self as stored, Kind, NewSnapshot, StoredSnapshot};
use storage::{ObjectStore, Store, StoreError};
use tracing::{info, warn};
use vmm::{QemuVm, RestoreMemory, RestoreOptions, Snapshot, SnapshotManifest, Vm};

/// Periodic snapshots kept per sandbox; older ones are deleted as new ones land.
const PERIODIC_KEPT: usize = 3;
/// A failing periodic snapshot's first extra wait; doubling, up to the cap.
const PERIODIC_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
const PERIODIC_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Files of a vmm snapshot directory that are published.
/// A snapshot's files: the VM's own, then the images of its volume slots (LUN 0 to 7;
/// absent ones are skipped).
pub(super) const SNAPSHOT_FILES: &[&str] = &[
    "state",
    "memory",
    "disk.qcow2",
    "volume-0.img",
    "volume-1.img",
    "volume-2.img",
    "volume-3.img",
    "volume-4.img",
    "volume-5.img",
    "volume-6.img",
    "volume-7.img",
];

/// Where snapshots go and the limits on taking them.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// The object store (local directory or S3).
    pub store: Store,
    /// Periodic snapshot interval of sandboxes whose create names none (0: off).
    pub periodic_default_s: u64,
    /// Disk the state dir's file system must keep free after a snapshot, in MiB.
    pub min_free_mib: u64,
}

pub(super) fn store_error(what: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::Corrupt { .. } => ApiError::new(
            500,
            "snapshot_corrupt",
            format!("{what}: {e}; the stored snapshot is damaged: restore another snapshot (list_snapshots)"),
        ),
        StoreError::NotFound(_) => ApiError::new(
            500,
            "snapshot_incomplete",
            format!("{what}: {e}; a chunk of the snapshot is missing from the store: restore another snapshot"),
        ),
        other => ApiError::storage(format!("{what}: {other}; check the snapshot store and retry")),
    }
}

/// The resources of a snapshot, given what the caller asked: memory and vCPUs are the
/// snapshot's, the disk may grow.
pub(super) fn snapshot_resources(
    snapshot: &StoredSnapshot,
    asked: Option<Resources>,
    template: &str,
) -> Result<Resources, ApiError> {
    let vm = vm_manifest(snapshot)?;
    let own = Resources {
        vcpus: vm.vcpus,
        mem_mib: vm.mem_mib,
        disk_mib: vm.disk_mib,
    };
    fixed_shape(own, asked, template)
}

/// The resources of a sandbox of a template whose snapshot has shape `own`, given what
/// the caller asked: memory and vCPUs stay, the disk may grow.
pub(super) fn fixed_shape(
    own: Resources,
    asked: Option<Resources>,
    template: &str,
) -> Result<Resources, ApiError> {
    let Some(asked) = asked else { return Ok(own) };
    if asked.vcpus != own.vcpus || asked.mem_mib != own.mem_mib {
        return Err(ApiError::bad_request(format!(
            "template {template} is a snapshot with {} vCPUs and {} MiB: a restore keeps them; omit resources, or send vcpus {} and memMiB {}",
            own.vcpus, own.mem_mib, own.vcpus, own.mem_mib
        ))
        .with_details(serde_json::json!({ "field": "resources" })));
    }
    if asked.disk_mib < own.disk_mib {
        return Err(ApiError::bad_request(format!(
            "resources.diskSizeMiB {} is smaller than snapshot {template}'s disk; send at least {}",
            asked.disk_mib, own.disk_mib
        )));
    }
    Ok(asked)
}

fn vm_manifest(snapshot: &StoredSnapshot) -> Result<SnapshotManifest, ApiError> {
    serde_json::from_value(snapshot.vm.clone()).map_err(|e| {
        ApiError::internal(format!(
            "snapshot {} has an unreadable VM manifest: {e}",
            snapshot.id
        ))
    })
}

fn view_of(s: &StoredSnapshot) -> SnapshotView {
    let vm = vm_manifest(s).ok();
    SnapshotView {
        snapshot_id: s.id.clone(),
        sandbox_id: s.sandbox_id.clone(),
        template_id: s.template_id.clone(),
        kind: s.kind.as_str(),
        created_at: iso8601(s.created_unix_ms as i64),
        size_bytes: s.size_bytes(),
        stored_bytes: s.data_bytes(),
        storage: "object",
        uploaded_bytes: None,
        name: None,
        resources: vm
            .map(|m| Resources {
                vcpus: m.vcpus,
                mem_mib: m.mem_mib,
                disk_mib: m.disk_mib,
            })
            .unwrap_or_default(),
    }
}

fn local_view(r: &SandboxRecord, s: &Snapshot) -> SnapshotView {
    let m = s.manifest();
    SnapshotView {
        snapshot_id: m.id.clone(),
        sandbox_id: r.id.clone(),
        template_id: r.template_id.clone(),
        kind: "pause",
        created_at: iso8601(m.created_unix_ms as i64),
        size_bytes: SNAPSHOT_FILES
            .iter()
            .filter_map(|f| std::fs::metadata(s.dir().join(f)).ok())
            .map(|md| md.len())
            .sum(),
        stored_bytes: s.disk_usage(),
        storage: "local",
        uploaded_bytes: None,
        name: None,
        resources: Resources {
            vcpus: m.vcpus,
            mem_mib: m.mem_mib,
            disk_mib: m.disk_mib,
        },
    }
}

pub(crate) use vmm::space::free_bytes;

/// Allocated bytes of a file (0 if absent).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

impl Manager {
    /// The store snapshots go to.
    pub fn store(&self) -> &Store {
        &self.snapshots.store
    }

    /// Refuses a snapshot of `vm` unless the state dir's file system keeps the
    /// configured reserve free after it (memory at most its full size, plus the disk
    /// overlay).
    pub(super) fn check_disk_space(&self, vm: &QemuVm, mem_mib: u32) -> Result<(), ApiError> {
        self.check_disk_space_for(vm, mem_mib, 1)
    }

    /// [`Manager::check_disk_space`] for `copies` snapshots of `vm` at once (a build
    /// caching a step must leave room for the template's own snapshot after it).
    pub(super) fn check_disk_space_for(
        &self,
        vm: &QemuVm,
        mem_mib: u32,
        copies: u64,
    ) -> Result<(), ApiError> {
        self.check_disk_space_at(&self.state_dir, vm, mem_mib, copies)
    }

    /// [`Manager::check_disk_space_for`] on the file system of `dir`.
    pub(super) fn check_disk_space_at(
        &self,
        dir: &Path,
        vm: &QemuVm,
        mem_mib: u32,
        copies: u64,
    ) -> Result<(), ApiError> {
        // Twice the memory: a copy-on-write VM's stream carries it, and the memory image
        // split out of the stream is written before the stream goes.
        let need = (mem_mib as u64) << 21;
        let need = (need + allocated(vm.disk_path())) * copies;
        let reserve = self.snapshots.min_free_mib << 20;
        let free = free_bytes(dir)
            .map_err(|e| ApiError::internal(format!("checking free disk space: {e}")))?;
        if free < need + reserve {
            return Err(ApiError::insufficient_storage(format!(
                "this worker has {} MiB of disk free; a snapshot of this sandbox may need {} MiB and {} MiB must stay free; free disk space (delete snapshots or sandboxes) and retry",
                free >> 20,
                need >> 20,
                self.snapshots.min_free_mib
            ))
            .with_details(serde_json::json!({ "freeMiB": free >> 20, "neededMiB": need >> 20, "reserveMiB": self.snapshots.min_free_mib })));
        }
        Ok(())
    }

    /// Where the page index of `vm`'s last stored memory is kept: in a directory of the
    /// daemon's (never the VM's, which its QEMU can write to), removed with the VM.
    fn memory_index_of(&self, vm: &mut QemuVm) -> PathBuf {
        let path = self
            .state_dir
            .join(PAGE_INDEXES)
            .join(format!("{}.index", vm.id()));
        if vm.held::<MemoryIndexFile>().is_none() {
            let _ = std::fs::create_dir_all(path.parent().expect("a parent"));
            vm.hold(MemoryIndexFile(path.clone()));
        }
        path
    }

    /// A scratch directory for one snapshot, removed by the caller.
    pub(super) fn scratch_dir(&self) -> PathBuf {
        self.state_dir
            .join("uploads")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Snapshots `vm` into scratch space (it keeps running if `keep_running`). On
    /// failure nothing is left and the VM is running again.
    async fn take(
        &self,
        vm: &mut QemuVm,
        r: &SandboxRecord,
        kind: Kind,
        keep_running: bool,
    ) -> Result<Taken, ApiError> {
        let started = std::time::Instant::now();
        let result = async {
            self.check_disk_space(vm, r.resources.mem_mib)?;
            let dir = self.scratch_dir();
            let _ = std::fs::create_dir_all(dir.parent().unwrap());
            // Scratch space, published and removed: not flushed to disk (the store
            // makes what it keeps durable).
            match vm.snapshot_transient(&dir, keep_running).await {
                Ok(snapshot) => Ok(Taken {
                    dir,
                    snapshot,
                    started,
                    memory_base: vm.memory_base().map(Path::to_path_buf),
                    memory_index: self.memory_index_of(vm),
                }),
                Err(e) => {
                    super::remove_tree(dir).await;
                    Err(ApiError::internal(format!("taking the snapshot: {e}")))
                }
            }
        }
        .await;
        if let Err(e) = &result {
            if !keep_running {
                let _ = vm.resume().await;
            }
            self.snapshot_failed(r, kind, e)?;
        }
        result
    }

    /// Publishes a taken snapshot as `kind`; the scratch space goes either way. Needs no
    /// lock on the sandbox: its VM may run on (and serve commands) meanwhile.
    async fn publish(
        &self,
        taken: Taken,
        r: &SandboxRecord,
        kind: Kind,
    ) -> Result<(StoredSnapshot, stored::PublishStats), ApiError> {
        let taken_ms = taken.started.elapsed().as_millis() as u64;
        let result = async {
            let _uploading = self.uploads.read().await;
            let new = NewSnapshot {
                id: stored::new_snapshot_id(&r.id),
                sandbox_id: r.id.clone(),
                team_id: r.team_id.clone(),
                kind,
                template_id: r.template_id.clone(),
                vm: serde_json::to_value(taken.snapshot.manifest()).expect("json"),
                sandbox: serde_json::json!({
                    "envVars": r.env_vars,
                    "metadata": r.metadata,
                    "onTimeout": r.on_timeout,
                    "autoResume": r.auto_resume,
                    "idleTimeout": r.idle_timeout_s,
                    "publicPorts": r.public_ports,
                    "timeout": r.timeout_s,
                    "egress": r.egress,
                    "mounts": r.mounts,
                    "recording": r.recording,
                    // Placeholders only: the secrets' values stay in the catalog.
                    "securityPolicy": r.security_policy,
                }),
            };
            let base = {
                let (file, index) = (taken.memory_base.clone(), taken.memory_index.clone());
                // The first snapshot against a file reads and hashes all of it.
                tokio::task::spawn_blocking(move || memory_base(file, &index))
                    .await
                    .unwrap_or(None)
            };
            let published = stored::publish_with(
                self.store(),
                &taken.dir,
                SNAPSHOT_FILES,
                new,
                base.as_ref(),
            )
            .await
            .map_err(|e| store_error("storing the snapshot", e))?;
            if let Some(index) = published.memory_index.clone() {
                let path = taken.memory_index.clone();
                let saved = tokio::task::spawn_blocking(move || index.save(&path)).await;
                if let Ok(Err(e)) = saved {
                    warn!(sandbox = %r.id, error = %e, "the next snapshot indexes the memory it builds on again: saving the page index");
                }
            }
            Ok((published.snapshot, published.stats))
        }
        .await;
        super::remove_tree(taken.dir.clone()).await;
        match result {
            Ok((s, stats)) => {
                self.catalog.record_item(
                    "snapshot",
                    &s.id,
                    &r.team_id,
                    s.size_bytes().div_ceil(1 << 20),
                )?;
                info!(sandbox = %r.id, snapshot = %s.id, kind = kind.as_str(), taken_ms,
                    total_ms = taken.started.elapsed().as_millis() as u64,
                    chunks = stats.chunks.chunks, uploaded = stats.chunks.uploaded,
                    reused = stats.chunks.reused, patched = stats.chunks.patched,
                    bytes_uploaded = stats.chunks.bytes_uploaded,
                    "snapshot stored");
                self.catalog.append_event(
                    &r.id,
                    "sandbox.snapshot",
                    &serde_json::json!({ "snapshotID": s.id, "kind": kind.as_str(), "sizeBytes": s.size_bytes(), "uploadedBytes": stats.chunks.bytes_uploaded }),
                )?;
                Ok((s, stats))
            }
            Err(e) => {
                self.snapshot_failed(r, kind, &e)?;
                Err(e)
            }
        }
    }

    /// Deletes a stored snapshot and takes it off its team's snapshot quota.
    pub(super) async fn delete_stored(
        &self,
        s: &StoredSnapshot,
    ) -> Result<(), storage::StoreError> {
        stored::delete(self.store(), s).await?;
        if let Err(e) = self.catalog.forget_item("snapshot", &s.id) {
            warn!(snapshot = %s.id, error = %e, "the snapshot is deleted but still counts against its team's quota");
        }
        Ok(())
    }

    /// Refuses a snapshot the team has no quota left for (counted before anything is
    /// taken); recorded as a failed snapshot like any other refusal. Otherwise holds
    /// the snapshot's place (its memory's size as the estimate) until it is published
    /// or fails.
    fn hold_snapshot_quota(
        &self,
        r: &SandboxRecord,
        kind: Kind,
    ) -> Result<super::admission::StoreHold<'_>, ApiError> {
        self.hold_store_quota(&r.team_id, "snapshot", r.resources.mem_mib as u64)
            .inspect_err(|e| {
                let _ = self.snapshot_failed(r, kind, e);
            })
    }

    /// Records a failed snapshot in the sandbox's events and the log.
    fn snapshot_failed(&self, r: &SandboxRecord, kind: Kind, e: &ApiError) -> Result<(), ApiError> {
        warn!(sandbox = %r.id, kind = kind.as_str(), error = %e.message, "snapshot failed");
        self.catalog.append_event(
            &r.id,
            "sandbox.snapshot_failed",
            &serde_json::json!({ "kind": kind.as_str(), "error": e.message }),
        )?;
        Ok(())
    }

    /// Locks a running sandbox: its slot guard, record and VM.
    async fn lock_running(
        &self,
        team: &str,
        id: &str,
        what: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<Option<QemuVm>>, SandboxRecord), ApiError> {
        let (guard, r) = self.lock_owned(team, id).await?;
        if r.state != InternalState::Active || guard.is_none() {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {} and cannot be {what}; resume it first",
                r.state.public()
            )));
        }
        Ok((guard, r))
    }

    /// Takes a manual snapshot of a running sandbox; it keeps running.
    pub async fn create_snapshot(
        &self,
        team: &str,
        id: &str,
        name: Option<String>,
    ) -> Result<SnapshotView, ApiError> {
        let taken_name = |name: &str| {
            ApiError::conflict(format!(
                "the team already has a snapshot named {name:?}; pick another name, or delete that snapshot"
            ))
            .with_details(serde_json::json!({ "field": "name" }))
        };
        if let Some(n) = &name {
            // Checked first: a snapshot taken for nothing costs a pause and GiB.
            if self.catalog.snapshot_named(team, n)?.is_some() {
                return Err(taken_name(n));
            }
        }
        let (mut guard, r) = self.lock_running(team, id, "snapshotted").await?;
        let _held = self.hold_snapshot_quota(&r, Kind::Manual)?;
        let intent = self.begin_op(
            id,
            super::recovery::op::SNAPSHOT,
            serde_json::json!({ "kind": Kind::Manual.as_str() }),
        )?;
        let vm = guard.as_mut().expect("checked");
        let taken = self.take(vm, &r, Kind::Manual, true).await?;
        intent.step("snapshot.taken", serde_json::json!({}));
        drop(guard);
        let (published, stats) = self.publish(taken, &r, Kind::Manual).await?;
        intent.step(
            "snapshot.published",
            serde_json::json!({ "snapshot": published.id }),
        );
        let mut view = view_of(&published);
        view.uploaded_bytes = Some(stats.chunks.bytes_uploaded);
        if let Some(n) = name {
            // Another create took the name meanwhile: the snapshot stays, unnamed.
            self.catalog
                .name_snapshot(team, &n, &published.id, id)
                .map_err(|_| {
                    ApiError::conflict(format!(
                        "snapshot {} was taken, but another request named a snapshot {n:?} meanwhile; it is kept without a name (use its ID, or delete it)",
                        published.id
                    ))
                })?;
            view.name = Some(n);
        }
        Ok(view)
    }

    /// The stored snapshots of `sandbox_id` that belong to `team`. The sandbox may be
    /// unknown here (deleted long ago, or made on another worker): the store decides.
    async fn stored_of(
        &self,
        team: &str,
        sandbox_id: &str,
    ) -> Result<Vec<StoredSnapshot>, ApiError> {
        let local = self.catalog.sandbox(sandbox_id)?;
        if local.as_ref().is_some_and(|r| r.team_id != team) {
            return Err(ApiError::not_found("sandbox", sandbox_id));
        }
        let all = stored::list(self.store(), sandbox_id)
            .await
            .map_err(|e| store_error("listing snapshots", e))?;
        let mine: Vec<StoredSnapshot> = all.into_iter().filter(|s| s.team_id == team).collect();
        if local.is_none() && mine.is_empty() {
            return Err(ApiError::not_found("sandbox", sandbox_id));
        }
        Ok(mine)
    }

    /// The local pause snapshot of a paused sandbox of `team`, if any.
    fn local_pause(&self, team: &str, sandbox_id: &str) -> Option<(SandboxRecord, Snapshot)> {
        let r = self.catalog.sandbox(sandbox_id).ok().flatten()?;
        if r.team_id != team {
            return None;
        }
        let s = Snapshot::open(r.pause_snapshot.as_ref()?).ok()?;
        Some((r, s))
    }

    /// A sandbox's snapshots, newest first: stored ones, and a local pause snapshot.
    pub async fn list_snapshots(
        &self,
        team: &str,
        id: &str,
    ) -> Result<Vec<SnapshotView>, ApiError> {
        let mut views: Vec<SnapshotView> = self
            .stored_of(team, id)
            .await?
            .iter()
            .map(view_of)
            .collect();
        for v in &mut views {
            v.name = self.catalog.snapshot_name(&v.snapshot_id)?;
        }
        if let Some((r, s)) = self.local_pause(team, id) {
            views.push(local_view(&r, &s));
        }
        views.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        Ok(views)
    }

    /// Deletes a stored snapshot; its chunks go unless another snapshot shares them.
    pub async fn delete_snapshot(
        &self,
        team: &str,
        id: &str,
        snapshot_id: &str,
    ) -> Result<(), ApiError> {
        let snapshots = self.stored_of(team, id).await?;
        let Some(s) = snapshots.iter().find(|s| s.id == snapshot_id) else {
            if self
                .local_pause(team, id)
                .is_some_and(|(_, l)| l.manifest().id == snapshot_id)
            {
                return Err(ApiError::conflict(format!(
                    "{snapshot_id} is the pause snapshot sandbox {id} resumes from; resume or delete the sandbox instead"
                )));
            }
            return Err(ApiError::not_found("snapshot", snapshot_id));
        };
        if self
            .catalog
            .sandbox(id)?
            .is_some_and(|r| r.hibernated.as_deref() == Some(snapshot_id))
        {
            return Err(ApiError::conflict(format!(
                "{snapshot_id} holds hibernated sandbox {id}; resume or delete the sandbox instead"
            )));
        }
        self.delete_stored(s)
            .await
            .map_err(|e| store_error("deleting the snapshot", e))?;
        self.catalog.forget_snapshot_name(snapshot_id)?;
        // This worker's cached copy (a template) goes once no live sandbox uses it.
        if !self.any_live(|r| r.template_id == snapshot_id)? {
            super::remove_tree(self.template_cache_dir(snapshot_id)).await;
        }
        let _ = self.catalog.append_event(
            id,
            "sandbox.snapshot_deleted",
            &serde_json::json!({ "snapshotID": snapshot_id }),
        );
        self.gc_wanted.notify_one();
        Ok(())
    }

    /// Whether a sandbox that is not deleted or failed matches `uses`.
    pub(super) fn any_live(&self, uses: impl Fn(&SandboxRecord) -> bool) -> Result<bool, ApiError> {
        Ok(self
            .catalog
            .sandboxes_in(crate::catalog::Catalog::LIVE)?
            .iter()
            .any(uses))
    }

    /// Collects garbage whenever a delete asks for it, off the request that deleted:
    /// a collection reads every manifest and lists every chunk. Runs until the process
    /// ends.
    pub async fn collect_garbage_when_asked(self: Arc<Self>) {
        loop {
            self.gc_wanted.notified().await;
            if let Some(again) = self.collect_garbage().await {
                // Chunks marked this round go only on a round a grace later (or another
                // worker held the lease): ask again then, not at the next delete.
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(again).await;
                    this.gc_wanted.notify_one();
                });
            }
        }
    }

    /// Marks and deletes chunks no snapshot or volume references (see `storage::gc`: one
    /// collector per bucket, a grace before a delete); says when to run again, if
    /// garbage is still waiting.
    async fn collect_garbage(&self) -> Option<std::time::Duration> {
        let _exclusive = self.uploads.write().await;
        match stored::collect_garbage(self.store()).await {
            Ok(gc) => {
                info!(
                    manifests = gc.manifests,
                    kept = gc.chunks_kept,
                    marked = gc.chunks_marked,
                    pending = gc.chunks_pending,
                    deleted = gc.chunks_deleted,
                    busy = gc.busy.as_deref().unwrap_or("-"),
                    "snapshot chunks collected"
                );
                let waiting = gc.chunks_marked + gc.chunks_pending > 0 || gc.busy.is_some();
                if !waiting {
                    return None;
                }
                let grace = storage::gc::grace(self.store())
                    .await
                    .unwrap_or(std::time::Duration::from_secs(600));
                Some(grace + std::time::Duration::from_secs(1))
            }
            Err(e) => {
                warn!(error = %e, "collecting snapshot chunks failed; the next delete retries");
                None
            }
        }
    }

    /// Deletes the hibernate snapshot of a sandbox that is ending (a sandbox's only
    /// stored pause snapshot: a resume consumes it).
    pub(super) async fn delete_hibernate_snapshot(&self, snapshot_id: &str) {
        if let Ok(s) = stored::get(self.store(), snapshot_id).await {
            if self.delete_stored(&s).await.is_ok() {
                self.gc_wanted.notify_one();
            }
        }
    }

    /// Pauses into object storage: the snapshot is stored, the local copy dropped and
    /// the VM ended, so any worker sharing the store can restore it.
    pub async fn hibernate(&self, team: &str, id: &str) -> Result<SandboxView, ApiError> {
        let (mut guard, mut r) = self.lock_owned(team, id).await?;
        match r.state {
            InternalState::Active => {}
            InternalState::Stopped if r.hibernated.is_some() => return Ok(self.view(&r, false)),
            other => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {} and cannot be hibernated",
                    other.public()
                )))
            }
        }
        super::test_stall_pause().await;
        let vm = guard
            .as_mut()
            .ok_or_else(|| ApiError::internal("running sandbox has no VM"))?;
        let kept_running = |e: ApiError| ApiError {
            message: format!("hibernate failed, the sandbox keeps running: {}", e.message),
            ..e
        };
        let intent = self.begin_op(id, super::recovery::op::HIBERNATE, serde_json::json!({}))?;
        // Clean copies of its read-write volumes, saved once the hibernate lands.
        self.quiesce_volumes(&r, vm, true).await;
        intent.step("hibernate.quiesced", serde_json::json!({}));
        let taken = self
            .take(vm, &r, Kind::Pause, false)
            .await
            .map_err(kept_running)?;
        intent.step("hibernate.taken", serde_json::json!({}));
        let s = match self.publish(taken, &r, Kind::Pause).await {
            Ok((s, _)) => s,
            Err(e) => {
                let _ = vm.resume().await;
                return Err(kept_running(e));
            }
        };
        // From here on a restart finishes the hibernate: the snapshot is stored. Unless
        // the catalog says so, a restart would undo it: undone now instead.
        if let Err(e) = intent.step_or_fail(
            "hibernate.published",
            serde_json::json!({ "snapshot": s.id }),
        ) {
            let _ = self.delete_stored(&s).await;
            let _ = vm.resume().await;
            return Err(kept_running(e));
        }
        guard.take().expect("checked").kill().await;
        intent.step("hibernate.vm_ended", serde_json::json!({}));
        // Its volumes' writes are saved, and a resume anywhere takes the images from the
        // snapshot: this host's copies would go stale if it resumed elsewhere.
        if self.save_volumes(&r, true).await {
            self.drop_volume_images(id);
        }
        intent.step("hibernate.volumes_saved", serde_json::json!({}));
        // A resumed VM's base snapshot is no longer needed by anyone.
        super::remove_tree(self.pauses_dir(id)).await;
        if let Some(old) = r.pause_snapshot.take() {
            if let Ok(snap) = Snapshot::open(&old) {
                self.catalog.forget_snapshot(&snap.manifest().id)?;
            }
        }
        r.hibernated = Some(s.id.clone());
        r.vm_dir = None;
        self.transition(&mut r, InternalState::Stopped, "hibernated")?;
        // It may resume on any worker: its transcripts so far are stored and end here
        // (a resume starts new ones, named after these).
        self.recordings.finish(&r).await;
        Ok(self.view(&r, false))
    }

    /// A sandbox this worker does not know, hibernated by another worker that shares
    /// the store, becomes this worker's (paused, to be resumed here): its newest pause
    /// snapshot in the store says what it was. Nothing happens for a known sandbox.
    pub(super) async fn adopt_hibernated(&self, team: &str, id: &str) -> Result<(), ApiError> {
        if !api_model::is_sandbox_id(id) || self.catalog.sandbox(id)?.is_some() {
            return Ok(());
        }
        let snapshots = stored::list(self.store(), id)
            .await
            .map_err(|e| store_error("looking for the sandbox in the store", e))?;
        let Some(s) = snapshots
            .into_iter()
            .find(|s| s.kind == Kind::Pause && s.team_id == team)
        else {
            return Ok(());
        };
        let vm = vm_manifest(&s)?;
        let origin: StoredSandbox = serde_json::from_value(s.sandbox.clone()).unwrap_or_default();
        let mut r = SandboxRecord {
            env_vars: origin.env_vars,
            metadata: origin.metadata,
            on_timeout: origin.on_timeout,
            auto_resume: origin.auto_resume,
            idle_timeout_s: origin.idle_timeout.unwrap_or(0),
            public_ports: origin.public_ports,
            // The same sandbox, moved: its policy, and its volume holds (the write lock
            // is the sandbox's, whatever worker runs it).
            egress: origin.egress,
            mounts: origin.mounts,
            recording: origin.recording,
            // Its secrets' values are in the catalog of the worker that had it, not in
            // the store: here their placeholders stay placeholders.
            security_policy: origin.security_policy,
            state: InternalState::Stopped,
            hibernated: Some(s.id.clone()),
            ..SandboxRecord::fresh(
                team,
                s.template_id.clone(),
                Resources {
                    vcpus: vm.vcpus,
                    mem_mib: vm.mem_mib,
                    disk_mib: vm.disk_mib,
                },
                origin.timeout.unwrap_or(api_model::DEFAULT_TIMEOUT_S),
                self.snapshots.periodic_default_s,
            )
        };
        r.id = id.to_string();
        r.step(
            "paused",
            Some(format!(
                "adopted from the store (hibernated on another worker, {})",
                s.id
            )),
        );
        self.admit(&r)?;
        self.catalog.append_event(
            id,
            "sandbox.adopted",
            &serde_json::json!({ "snapshotID": s.id, "state": "paused" }),
        )?;
        info!(sandbox = %id, snapshot = %s.id, "adopted a sandbox hibernated elsewhere");
        Ok(())
    }

    /// Resumes a hibernated sandbox from its stored pause snapshot. A claim written with
    /// a conditional put makes sure one worker only resumes it.
    pub(super) async fn resume_hibernated(
        &self,
        mut guard: tokio::sync::OwnedMutexGuard<Option<QemuVm>>,
        mut r: SandboxRecord,
    ) -> Result<SandboxView, ApiError> {
        let snapshot_id = r.hibernated.clone().expect("hibernated");
        let elsewhere = || {
            ApiError::conflict(format!(
                "sandbox {} was resumed from its hibernate snapshot by another worker (or the snapshot was deleted); connect through that worker, or restore one of its snapshots here",
                r.id
            ))
        };
        let s = match stored::get(self.store(), &snapshot_id).await {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => return Err(elsewhere()),
            Err(e) => return Err(store_error("reading the hibernate snapshot", e)),
        };
        // Claims stay: a claim deleted after the resume would let a late worker in.
        match self
            .store()
            .put_if_absent(
                &format!("claims/{}/{snapshot_id}", r.id),
                bytes::Bytes::from(self.edge_url.clone()),
            )
            .await
        {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => return Err(elsewhere()),
            Err(e) => return Err(store_error("claiming the hibernate snapshot", e)),
        }
        let dir = self
            .pauses_dir(&r.id)
            .join(uuid::Uuid::new_v4().simple().to_string());
        let vm = self
            .fetch_and_restore(&s, &dir, RestoreMemory::Copy, None, &r.id)
            .await
            .map_err(|e| ApiError {
                message: format!("resume failed, the sandbox stays hibernated: {}", e.message),
                ..e
            })?;
        if let Err(e) = self.secure_guest(&r, &vm).await {
            vm.kill().await;
            return Err(e);
        }
        self.install(&mut r, vm, &mut guard);
        r.expires_at_ms = now_ms() + r.timeout_s as i64 * 1000;
        r.hibernated = None;
        self.transition(&mut r, InternalState::Active, "resumed from object storage")?;
        // Consumed: a later hibernate stores a new one.
        if self.delete_stored(&s).await.is_ok() {
            self.gc_wanted.notify_one();
        }
        Ok(self.view(&r, true))
    }

    /// Fetches a stored snapshot into `dir` (which stays: the VM's disk is layered on
    /// it) and restores a VM from it.
    async fn fetch_and_restore(
        &self,
        s: &StoredSnapshot,
        dir: &Path,
        memory: RestoreMemory,
        disk_mib: Option<u64>,
        sandbox: &str,
    ) -> Result<QemuVm, ApiError> {
        let started = std::time::Instant::now();
        let snapshot = self.fetch(s, dir).await?;
        let fetched_ms = started.elapsed().as_millis() as u64;
        let vm = async {
            let options = RestoreOptions {
                memory,
                disk_mib,
                volumes: self.volume_images(sandbox, &snapshot)?,
                ..RestoreOptions::default()
            };
            self.vmm
                .restore(&snapshot, &options)
                .await
                .map_err(|e| super::vm_error("restore", e))
        }
        .await;
        if vm.is_err() {
            super::remove_tree(dir.to_path_buf()).await;
        }
        info!(snapshot = %s.id, fetched_ms, total_ms = started.elapsed().as_millis() as u64, "restored from the store");
        vm
    }

    /// Fetches and verifies a stored snapshot into the new directory `dir`.
    async fn fetch(&self, s: &StoredSnapshot, dir: &Path) -> Result<Snapshot, ApiError> {
        let vm = vm_manifest(s)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        let result = async {
            stored::fetch(self.store(), s, dir)
                .await
                .map_err(|e| store_error(&format!("fetching snapshot {}", s.id), e))?;
            // Flushes the fetched files to disk: on a blocking thread.
            let (driver, at) = (self.vmm.clone(), dir.to_path_buf());
            tokio::task::spawn_blocking(move || driver.import_snapshot(&at, vm))
                .await
                .map_err(|e| ApiError::internal(format!("importing the snapshot: {e}")))?
                .map_err(|e| ApiError::conflict(e.to_string()))
        }
        .await;
        if result.is_err() {
            super::remove_tree(dir.to_path_buf()).await;
        }
        result
    }

    /// A stored snapshot of `team` used as a template, if `template` names one.
    pub(super) async fn snapshot_template(
        &self,
        team: &str,
        template: &str,
    ) -> Result<Option<StoredSnapshot>, ApiError> {
        if stored::sandbox_of(template).is_none() {
            return Ok(None);
        }
        match stored::get(self.store(), template).await {
            Ok(s) if s.team_id == team => Ok(Some(s)),
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(store_error("reading the snapshot", e)),
        }
    }

    /// Where this host keeps its copy of a template's (or snapshot template's) snapshot.
    pub(super) fn template_cache_dir(&self, template: &str) -> PathBuf {
        self.state_dir.join("snapshot-templates").join(template)
    }

    /// The local snapshot of a custom template (`tpl-…`) or a snapshot used as a
    /// template, fetched from the store into this host's cache on first use. `team`
    /// `None` skips the team check (warm-pool refills act for whoever set the pool).
    pub(super) async fn template_snapshot(
        &self,
        team: Option<&str>,
        template: &str,
    ) -> Result<Snapshot, ApiError> {
        let cache = self.template_cache_dir(template);
        let _one = self.template_fetch.lock().await;
        if let Ok(s) = Snapshot::open(&cache) {
            return Ok(s);
        }
        let stored = if api_model::is_template_id(template) {
            let t = self
                .ready_template(team, template)?
                .ok_or_else(|| ApiError::not_found("template", template))?;
            let id = t
                .snapshot_id
                .ok_or_else(|| ApiError::not_found("template", template))?;
            stored::get(self.store(), &id)
                .await
                .map_err(|e| store_error("reading the template's snapshot", e))?
        } else {
            let team = team.ok_or_else(|| ApiError::not_found("template", template))?;
            self.snapshot_template(team, template)
                .await?
                .ok_or_else(|| ApiError::not_found("template", template))?
        };
        super::remove_tree(cache.clone()).await;
        self.fetch(&stored, &cache).await
    }

    /// Starts the VM of a sandbox whose template is custom or a stored snapshot: its
    /// snapshot (cached on this host) restored with its memory mapped copy-on-write.
    pub(super) async fn restore_snapshot_template(
        &self,
        team: Option<&str>,
        template: &str,
        resources: Resources,
    ) -> Result<QemuVm, ApiError> {
        let snapshot = self.template_snapshot(team, template).await?;
        self.vmm
            .restore(
                &snapshot,
                &RestoreOptions {
                    memory: RestoreMemory::CopyOnWrite,
                    disk_mib: Some(resources.disk_mib),
                    ..RestoreOptions::default()
                },
            )
            .await
            .map_err(|e| super::vm_error("restore", e))
    }

    /// Starts a new sandbox from a snapshot of `body.sandbox_id`: the one named, or the
    /// newest, preferring pause over periodic over manual.
    pub async fn restore(
        self: &Arc<Self>,
        team: &str,
        body: RestoreBody,
    ) -> Result<SandboxView, ApiError> {
        let timeout_s = body.validate()?;
        let source = &body.sandbox_id;
        let local = self.local_pause(team, source);
        let stored_list = match self.stored_of(team, source).await {
            Ok(list) => list,
            Err(e) if e.status == 404 && local.is_some() => Vec::new(),
            Err(e) => return Err(e),
        };
        enum Pick<'a> {
            Stored(&'a StoredSnapshot),
            Local(&'a SandboxRecord, &'a Snapshot),
        }
        let pick = match body.snapshot_id.as_deref() {
            Some(sid) => {
                if let Some(s) = stored_list.iter().find(|s| s.id == sid) {
                    Pick::Stored(s)
                } else if let Some((r, l)) = local.as_ref().filter(|(_, l)| l.manifest().id == sid)
                {
                    Pick::Local(r, l)
                } else {
                    return Err(ApiError::not_found("snapshot", sid));
                }
            }
            None => {
                // A local pause snapshot is the sandbox's newest pause state.
                match (&local, stored::preferred(&stored_list)) {
                    (Some((r, l)), _) => Pick::Local(r, l),
                    (None, Some(s)) => Pick::Stored(s),
                    (None, None) => {
                        return Err(ApiError::not_found("snapshot", &format!("of {source}"))
                            .with_details(serde_json::json!({
                                "hint": format!("sandbox {source} has no snapshots; take one with POST /api/v1/sandboxes/{source}/snapshots")
                            })))
                    }
                }
            }
        };
        let (template_id, vmm_manifest, origin, snapshot_id) = match &pick {
            Pick::Stored(s) => (
                s.template_id.clone(),
                vm_manifest(s)?,
                serde_json::from_value::<StoredSandbox>(s.sandbox.clone()).unwrap_or_default(),
                s.id.clone(),
            ),
            Pick::Local(r, l) => (
                r.template_id.clone(),
                l.manifest().clone(),
                StoredSandbox {
                    env_vars: r.env_vars.clone(),
                    metadata: r.metadata.clone(),
                    egress: r.egress.clone(),
                    mounts: r.mounts.clone(),
                    recording: r.recording,
                    security_policy: r.security_policy.clone(),
                    ..StoredSandbox::default()
                },
                l.manifest().id.clone(),
            ),
        };
        let resources = Resources {
            vcpus: vmm_manifest.vcpus,
            mem_mib: vmm_manifest.mem_mib,
            disk_mib: vmm_manifest.disk_mib,
        };
        // The policy and secrets' values of the sandbox it was, from this catalog's
        // record when it has one: a stored manifest is the bucket's word (it may be
        // tampered with, or older than a narrowed policy) and never pairs with values.
        let (security_policy, secret_values) =
            match self.catalog.sandbox(source)?.filter(|s| s.team_id == team) {
                Some(known) => (known.security_policy, known.secret_values),
                None => (origin.security_policy, Default::default()),
            };
        // Its volumes: the original's, read-only, or copies (volumes/inherit.rs). A
        // volume the team no longer has (or never had: the manifest is the bucket's
        // word) is not held.
        let mut have = std::collections::HashSet::new();
        for m in &origin.mounts {
            if self.team_has_volume(team, &m.volume).await {
                have.insert(m.volume.clone());
            }
        }
        let how = body.volumes.unwrap_or_default();
        let (mounts, settle) = inherit_mounts(source, &origin.mounts, how, |v| have.contains(v))?;
        let mut record = SandboxRecord {
            env_vars: origin.env_vars,
            metadata: body.metadata.unwrap_or(origin.metadata),
            egress: origin.egress,
            mounts,
            recording: origin.recording,
            security_policy,
            secret_values,
            ..SandboxRecord::fresh(
                team,
                template_id,
                resources,
                timeout_s,
                self.snapshots.periodic_default_s,
            )
        };
        record.step(
            "requested",
            Some(format!("restore of {snapshot_id} ({source})")),
        );
        let intent = self.begin_op(
            &record.id,
            super::recovery::op::RESTORE,
            serde_json::json!({ "snapshot": snapshot_id }),
        )?;
        self.admit(&record)?;
        self.catalog.append_event(
            &record.id,
            "sandbox.created",
            &serde_json::json!({ "restoredFrom": { "sandboxID": source, "snapshotID": snapshot_id }, "state": "starting" }),
        )?;
        intent.step("restore.admitted", serde_json::json!({}));
        let slot = self.slot(&record.id);
        let mut guard = slot.lock().await;
        self.transition(&mut record, InternalState::Creating, "restoring a snapshot")?;
        let dir = self
            .pauses_dir(&record.id)
            .join(uuid::Uuid::new_v4().simple().to_string());
        let result = match &pick {
            Pick::Stored(s) => {
                self.fetch_and_restore(s, &dir, RestoreMemory::Copy, None, &record.id)
                    .await
            }
            Pick::Local(_, l) => self.copy_and_restore(l, &dir, &record.id).await,
        };
        let mut copies = Vec::new();
        let result = match result {
            Ok(vm) => match self.secure_guest(&record, &vm).await {
                Ok(()) => match self
                    .settle_child(&mut record, &vm, &settle, false, &mut copies)
                    .await
                {
                    Ok(()) => Ok(vm),
                    Err(e) => {
                        vm.kill().await;
                        self.release_holds(&record).await;
                        self.drop_copies(team, &copies).await;
                        self.drop_volume_images(&record.id);
                        Err(e)
                    }
                },
                Err(e) => {
                    vm.kill().await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(vm) => {
                intent.step("restore.started", serde_json::json!({}));
                self.install(&mut record, vm, &mut guard);
                self.transition(
                    &mut record,
                    InternalState::Active,
                    "restored from a snapshot",
                )?;
                Ok(self.view(&record, true))
            }
            Err(e) => {
                record.diagnostic = Some(Diagnostic {
                    code: "restore_failed".into(),
                    message: e.message.clone(),
                    action: "restore another snapshot (list_snapshots), or retry".into(),
                });
                super::remove_tree(self.pauses_dir(&record.id)).await;
                self.transition(&mut record, InternalState::Failed, "restore failed")?;
                Err(e.with_details(serde_json::json!({ "sandboxID": record.id })))
            }
        }
    }

    /// Copies a local snapshot (another sandbox's pause, which may go away) into `dir`
    /// and restores it.
    async fn copy_and_restore(
        &self,
        from: &Snapshot,
        dir: &Path,
        sandbox: &str,
    ) -> Result<QemuVm, ApiError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        // GiB of memory and disk copied, then flushed to disk: on a blocking thread.
        let (driver, src_dir, dst_dir) = (
            self.vmm.clone(),
            from.dir().to_path_buf(),
            dir.to_path_buf(),
        );
        let manifest = from.manifest().clone();
        let snapshot = tokio::task::spawn_blocking(move || {
            for f in SNAPSHOT_FILES {
                let src = src_dir.join(f);
                if src.exists() {
                    vmm::snapshot::copy_sparse(&src, &dst_dir.join(f))
                        .map_err(|e| ApiError::internal(format!("copying the snapshot: {e}")))?;
                }
            }
            driver
                .import_snapshot(&dst_dir, manifest)
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .await
        .map_err(|e| ApiError::internal(format!("copying the snapshot: {e}")))??;
        let options = RestoreOptions {
            volumes: self.volume_images(sandbox, &snapshot)?,
            ..RestoreOptions::default()
        };
        self.vmm
            .restore(&snapshot, &options)
            .await
            .map_err(|e| super::vm_error("restore", e))
    }

    /// Branches a running sandbox into `count` children; the parent keeps running.
    pub async fn fork(
        self: &Arc<Self>,
        team: &str,
        id: &str,
        body: ForkBody,
    ) -> Result<Vec<SandboxView>, ApiError> {
        let count = body.validate()?;
        let how = body.volumes.unwrap_or_default();
        let (mut guard, parent) = self.lock_running(team, id, "forked").await?;
        let vm = guard.as_mut().expect("checked");
        self.check_disk_space(vm, parent.resources.mem_mib)?;
        // The children's volumes: the parent's, read-only, or copies (volumes/inherit.rs).
        self.check_no_writers(&parent, vm, how).await?;
        let (child_mounts, settle) = inherit_mounts(id, &parent.mounts, how, |_| true)?;
        let timeout_s = body.timeout.unwrap_or(parent.timeout_s);
        let dir = self
            .state_dir
            .join("forks")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let intent = self.begin_op(
            id,
            super::recovery::op::FORK,
            serde_json::json!({ "dir": dir.display().to_string() }),
        )?;
        let mut children = Vec::new();
        for _ in 0..count {
            let mut child = SandboxRecord {
                env_vars: parent.env_vars.clone(),
                metadata: body
                    .metadata
                    .clone()
                    .unwrap_or_else(|| parent.metadata.clone()),
                on_timeout: parent.on_timeout,
                auto_resume: parent.auto_resume,
                idle_timeout_s: parent.idle_timeout_s,
                public_ports: parent.public_ports.clone(),
                egress: parent.egress.clone(),
                mounts: child_mounts.clone(),
                recording: parent.recording,
                // The parent's guest had the CA and the placeholders: so do the children.
                security_policy: parent.security_policy.clone(),
                secret_values: parent.secret_values.clone(),
                fork_base: Some(dir.display().to_string()),
                ..SandboxRecord::fresh(
                    team,
                    parent.template_id.clone(),
                    parent.resources,
                    timeout_s,
                    parent.snapshot_interval_s,
                )
            };
            child.step("requested", Some(format!("fork of {id}")));
            if let Err(e) = self.admit(&child) {
                // All or nothing: the children already admitted give their creates back.
                if let Ok(l) = self.limits(team) {
                    self.create_rate
                        .refund(team, children.len() as u64, l.create_burst);
                }
                for mut c in children {
                    self.transition(&mut c, InternalState::Deleted, "fork refused")?;
                }
                return Err(e);
            }
            self.catalog.append_event(
                &child.id,
                "sandbox.created",
                &serde_json::json!({ "forkedFrom": id, "state": "starting" }),
            )?;
            children.push(child);
        }
        intent.step(
            "fork.admitted",
            serde_json::json!({ "children": children.iter().map(|c| c.id.clone()).collect::<Vec<_>>() }),
        );
        let _ = std::fs::create_dir_all(dir.parent().unwrap());
        let started = std::time::Instant::now();
        let child_ids: Vec<String> = children.iter().map(|c| c.id.clone()).collect();
        let child_volumes = |i: usize, snapshot: &Snapshot| {
            self.volume_images(&child_ids[i], snapshot)
                .map_err(|e| vmm::VmmError::Host(e.message))
        };
        // The parent's read-write volumes frozen around the snapshot: clean images, and
        // children that start with them frozen until their mounts are settled.
        let forked = match self.freeze_for_fork(&parent, vm).await {
            Ok(frozen) => {
                let forked = self.vmm.fork(vm, count as usize, &dir, child_volumes).await;
                thaw_paths(vm, &frozen).await;
                forked.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.message),
        };
        match forked {
            Ok((_snapshot, vms)) => {
                let own = self.memory_index_of(vm);
                inherit_memory_index(vm, own, &dir).await;
                info!(sandbox = %id, children = count, elapsed_ms = started.elapsed().as_millis() as u64, "forked");
                intent.step("fork.children_started", serde_json::json!({}));
                let mut copies = Vec::new();
                if let Err(e) = self
                    .settle_children(&mut children, &vms, &settle, &mut copies)
                    .await
                {
                    // All or nothing: no child runs with a mount it should not have.
                    for vm in vms {
                        vm.kill().await;
                    }
                    for mut c in children {
                        self.release_holds(&c).await;
                        self.drop_volume_images(&c.id);
                        c.diagnostic = Some(Diagnostic {
                            code: "fork_failed".into(),
                            message: e.message.clone(),
                            action: "see the message; the parent keeps running".into(),
                        });
                        c.fork_base = None;
                        // Every child is settled before any error is answered.
                        if let Err(t) =
                            self.transition(&mut c, InternalState::Failed, "fork failed")
                        {
                            warn!(sandbox = %c.id, error = %t.message, "recording a child's failure");
                        }
                    }
                    self.drop_copies(team, &copies).await;
                    super::remove_tree(dir).await;
                    return Err(e);
                }
                let mut views = Vec::new();
                for (mut child, vm) in children.into_iter().zip(vms) {
                    let slot = self.slot(&child.id);
                    self.install(&mut child, vm, &mut *slot.lock().await);
                    self.transition(&mut child, InternalState::Active, "forked")?;
                    intent.step("fork.child_running", serde_json::json!({}));
                    views.push(self.view(&child, true));
                }
                self.catalog.append_event(
                    id,
                    "sandbox.forked",
                    &serde_json::json!({ "children": views.iter().map(|v| v.sandbox_id.clone()).collect::<Vec<_>>() }),
                )?;
                Ok(views)
            }
            Err(e) => {
                for mut c in children {
                    c.diagnostic = Some(Diagnostic {
                        code: "fork_failed".into(),
                        message: e.to_string(),
                        action: "retry the fork".into(),
                    });
                    c.fork_base = None;
                    self.transition(&mut c, InternalState::Failed, "fork failed")?;
                }
                super::remove_tree(dir).await;
                Err(ApiError::internal(format!(
                    "fork failed, the parent keeps running: {e}"
                )))
            }
        }
    }

    /// Removes a fork snapshot once no live sandbox is restored from it.
    pub(super) fn release_fork_base(&self, dir: &str) -> Result<(), ApiError> {
        if !self.any_live(|r| r.fork_base.as_deref() == Some(dir))? {
            // GiB of memory and disk: moved aside at once (into scratch space, which a
            // restart clears), then removed on a blocking thread.
            let aside = self.scratch_dir();
            let moved = std::fs::create_dir_all(aside.parent().unwrap())
                .and_then(|()| std::fs::rename(dir, &aside));
            match (moved, tokio::runtime::Handle::try_current()) {
                (Ok(()), Ok(runtime)) => {
                    runtime.spawn_blocking(move || std::fs::remove_dir_all(aside));
                }
                (Ok(()), Err(_)) => {
                    let _ = std::fs::remove_dir_all(aside);
                }
                (Err(_), _) => {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        Ok(())
    }

    /// Takes periodic snapshots of running sandboxes that are due, one pass a second,
    /// until the process ends. A sandbox whose snapshots keep failing backs off
    /// exponentially on top of its interval.
    pub async fn sweep_periodic(self: Arc<Self>) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let now = now_ms();
            let due: Vec<SandboxRecord> = match self.catalog.sandboxes_in(&["active"]) {
                Ok(all) => all
                    .into_iter()
                    .filter(|r| {
                        r.snapshot_interval_s > 0
                            && now - r.last_periodic_ms >= r.snapshot_interval_s as i64 * 1000
                    })
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "periodic snapshot sweep could not read the catalog");
                    continue;
                }
            };
            let now = std::time::Instant::now();
            for r in due {
                let waiting = self
                    .periodic_backoff
                    .lock()
                    .unwrap()
                    .get(&r.id)
                    .is_some_and(|b| !b.ready(now));
                if waiting {
                    continue;
                }
                match self.periodic_snapshot(&r.team_id, &r.id).await {
                    Ok(()) => {
                        self.periodic_backoff.lock().unwrap().remove(&r.id);
                    }
                    Err(e) => {
                        let mut backoff = self.periodic_backoff.lock().unwrap();
                        let retry = backoff
                            .entry(r.id.clone())
                            .or_insert(crate::backoff::Backoff::new(
                                PERIODIC_RETRY,
                                PERIODIC_RETRY_CAP,
                            ))
                            .failed(std::time::Instant::now());
                        warn!(
                            sandbox = %r.id,
                            error = %e.message,
                            retry_in_s = retry.as_secs(),
                            "periodic snapshot failed"
                        );
                    }
                }
            }
            // Sandboxes gone or no longer snapshotting need no back-off.
            self.periodic_backoff.lock().unwrap().retain(|id, _| {
                self.catalog
                    .sandbox(id)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.state == InternalState::Active && r.snapshot_interval_s > 0)
            });
        }
    }

    async fn periodic_snapshot(&self, team: &str, id: &str) -> Result<(), ApiError> {
        let slot: Slot = self.slot(id);
        let mut guard = slot.lock_owned().await;
        let Some(mut r) = self.catalog.sandbox(id)? else {
            return Ok(());
        };
        if r.state != InternalState::Active || r.team_id != team {
            return Ok(());
        }
        let Some(vm) = guard.as_mut() else {
            return Ok(());
        };
        // Stamped first: a failing snapshot is retried at the next interval, not at once.
        r.last_periodic_ms = now_ms();
        self.catalog.put_sandbox(&r)?;
        let held = self.hold_snapshot_quota(&r, Kind::Periodic)?;
        let intent = self.begin_op(
            id,
            super::recovery::op::SNAPSHOT,
            serde_json::json!({ "kind": Kind::Periodic.as_str() }),
        )?;
        let taken = self.take(vm, &r, Kind::Periodic, true).await?;
        intent.step("snapshot.taken", serde_json::json!({}));
        drop(guard);
        let (published, _) = self.publish(taken, &r, Kind::Periodic).await?;
        intent.step(
            "snapshot.published",
            serde_json::json!({ "snapshot": published.id }),
        );
        drop(intent);
        drop(held);
        let periodic: Vec<StoredSnapshot> = stored::list(self.store(), id)
            .await
            .map_err(|e| store_error("listing snapshots", e))?
            .into_iter()
            .filter(|s| s.kind == Kind::Periodic)
            .collect();
        if periodic.len() > PERIODIC_KEPT {
            for old in &periodic[PERIODIC_KEPT..] {
                let _ = self.delete_stored(old).await;
            }
            self.gc_wanted.notify_one();
        }
        Ok(())
    }
}

/// A snapshot in scratch space, not yet published.
struct Taken {
    dir: PathBuf,
    snapshot: Snapshot,
    started: std::time::Instant,
    /// The memory file the VM's RAM started as (see [`QemuVm::memory_base`]).
    memory_base: Option<PathBuf>,
    /// Where the page index of the VM's last stored memory is kept.
    memory_index: PathBuf,
}

/// The daemon's directory (under its state directory) of its VMs' page indexes.
pub(super) const PAGE_INDEXES: &str = "page-indexes";

/// A VM's page index file, removed when the VM goes (held by it). A publish that ends
/// after that may write it again: the next start removes the directory.
struct MemoryIndexFile(PathBuf);

impl Drop for MemoryIndexFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gives a fork snapshot the page index the parent's snapshots are stored against
/// (that of its last stored memory, else of the memory it started as), so the
/// children's snapshots store their changes against the same chunks instead of the
/// fork snapshot's (which the store does not have). Without one, the children index
/// the fork snapshot itself.
async fn inherit_memory_index(parent: &QemuVm, own: PathBuf, fork_dir: &Path) {
    let base = parent.memory_base().map(Path::to_path_buf);
    let dest = fork_dir.join("memory.index");
    let _ =
        tokio::task::spawn_blocking(move || memory_base(base, &own)?.index.save(&dest).ok()).await;
}

/// What a snapshot's memory is stored against: the page index the VM's previous
/// snapshot left, else that of the memory file its RAM started as (made once, cached
/// beside that file). Either way the file fills in an anchor the store lacks. None
/// when neither is there: every chunk is stored whole, as before.
fn memory_base(file: Option<PathBuf>, index: &Path) -> Option<storage::chunks::Base> {
    use storage::pages::PageIndex;
    let file = file.filter(|f| f.is_file());
    let index = match PageIndex::load(index) {
        Ok(index) => index,
        Err(_) => {
            let f = file.as_ref()?;
            PageIndex::of_file_cached(f, storage::CHUNK_SIZE)
                .inspect_err(|e| warn!(base = %f.display(), error = %e, "indexing the memory a snapshot builds on"))
                .ok()?
        }
    };
    Some(storage::chunks::Base { index, file })
}

/// What a stored snapshot records of its sandbox, for restores elsewhere.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct StoredSandbox {
    env_vars: std::collections::BTreeMap<String, String>,
    metadata: std::collections::BTreeMap<String, String>,
    on_timeout: OnTimeout,
    timeout: Option<u64>,
    auto_resume: bool,
    idle_timeout: Option<u64>,
    public_ports: Vec<u16>,
    egress: api_model::EgressPolicy,
    mounts: Vec<api_model::Mount>,
    /// Whether the sandbox was recorded: its restores and resumes elsewhere are too.
    recording: bool,
    /// Its security policy (placeholders, never values).
    security_policy: Option<intercept::SecurityPolicy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_are_the_vms_and_every_volume_slot() {
        assert_eq!(&SNAPSHOT_FILES[..3], vmm::snapshot::FILES);
        for lun in 0..api_model::MAX_MOUNTS as u8 {
            assert!(SNAPSHOT_FILES.contains(&vmm::VolumeDrive::snapshot_file(lun).as_str()));
        }
    }

    fn stored_with(vcpus: u32, mem_mib: u32, disk_mib: u64) -> StoredSnapshot {
        StoredSnapshot {
            format: stored::FORMAT,
            id: "snap-0123-0123456789ab".into(),
            sandbox_id: "sbx-0123".into(),
            team_id: "team-1".into(),
            kind: Kind::Manual,
            created_unix_ms: 0,
            template_id: "base".into(),
            files: Default::default(),
            vm: serde_json::json!({
                "format_version": 1, "id": "snap-x", "source_vm": "vm-x", "created_unix_ms": 0,
                "qemu_version": "q", "accel": "tcg", "kernel_key": "k", "rootfs": "base",
                "rootfs_image": "/nonexistent", "machine_args": [], "vcpus": vcpus,
                "mem_mib": mem_mib, "disk_mib": disk_mib, "egress": true, "memory": "stream"
            }),
            sandbox: serde_json::json!({}),
        }
    }

    #[test]
    fn a_snapshot_template_keeps_its_cpus_and_memory_and_may_grow_its_disk() {
        let s = stored_with(1, 512, 1024);
        let own = snapshot_resources(&s, None, "t").unwrap();
        assert_eq!((own.vcpus, own.mem_mib, own.disk_mib), (1, 512, 1024));
        let bigger = Resources {
            disk_mib: 4096,
            ..own
        };
        assert_eq!(snapshot_resources(&s, Some(bigger), "t").unwrap(), bigger);
        let more_memory = Resources {
            mem_mib: 1024,
            ..own
        };
        let err = snapshot_resources(&s, Some(more_memory), "t").unwrap_err();
        assert!(err.message.contains("memMiB 512"), "{}", err.message);
        let smaller_disk = Resources {
            disk_mib: 512,
            ..own
        };
        assert_eq!(
            snapshot_resources(&s, Some(smaller_disk), "t")
                .unwrap_err()
                .status,
            400
        );
    }
}
