//! Durable volumes: their records and contents live in the snapshot store (so every
//! worker sharing it sees them), and a sandbox mounts them at launch.
//!
//! A mounted volume is a raw ext4 image on this host (`<state>/volumes/<sandbox>/<lun>.img`)
//! hot-plugged into the VM as a SCSI disk at LUN = its index in the sandbox's `mounts`,
//! and mounted by the guest. A read-write mount takes the volume's write lock in the
//! store (one writer, whatever the worker); its content is saved back to the store as a
//! new version when the sandbox ends or hibernates. Read-only mounts see the newest
//! saved version.
//!
//! Snapshots carry a copy of every attached image (`volume-<lun>.img`): a resume reuses
//! the sandbox's own image; a fork child or a restored copy starts from a copy of the
//! snapshot's, and gets the original's read-write volumes read-only or as new volumes
//! ([`inherit`]). (Records from before that, `volume_copies`, kept a private copy that
//! was never written back.)
//!
//! Holds are leases ([`VOLUME_LEASE`], see `storage::volumes`): [`Manager::keep_volume_leases`]
//! renews those of this host's live sandboxes, and of its saves still being retried,
//! every third of it. A hold whose owner is gone (a daemon that died, a create that
//! never recorded its sandbox) expires, and the volume can be written or deleted again.
//!
//! A save that fails when a writer ends keeps the image and the write lock, and is
//! retried in the background with exponential back-off ([`SAVE_TRIES`] tries in all);
//! the queue is on disk (`<state>/volumes/<sandbox>/save-pending.json`), so a restarted
//! daemon goes on with it. A save that lands releases the hold. After the last failure
//! the sandbox gets a `volume.save_failed` event, the image stays on this host
//! (`save-failed.json` beside it names the volumes: only an operator can still upload
//! or remove it) and the lease is no longer renewed: once it expires the volume can be
//! taken over by another writer (from its last saved content) or deleted.

use super::{now_ms, Manager};
use crate::backoff::Backoff;
use crate::error::ApiError;
use crate::model::*;
use agent_protocol::{Command, ExecRequest};
use api_model::{
    is_volume_id, Mount, MountMode, VolumeAttachment, VolumeCreateRequest, VolumeView,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::volumes::{self as stored, Holder, Renewal, StoredVolume, VolumeError};
use tracing::{info, warn};
use vmm::{QemuVm, VolumeDrive};

pub(super) mod inherit;

/// How long the guest gets to see a hot-plugged disk.
const DEVICE_WAIT_S: u32 = 20;
/// How long a volume hold lasts unless renewed (renewed every third of it).
pub(crate) const VOLUME_LEASE: Duration = stored::DEFAULT_LEASE;
/// Tries of a volume's save when its writer ends, the first one included.
const SAVE_TRIES: u32 = 6;
/// The back-off between tries of a failed save: 10 s, doubling, at most 2 min (so a
/// save is given up about 4.5 min after its first failure).
const SAVE_RETRY_BASE: Duration = Duration::from_secs(10);
const SAVE_RETRY_CAP: Duration = Duration::from_secs(120);
/// How often the retry queue is looked at.
const SAVE_RETRY_TICK: Duration = Duration::from_secs(5);
/// A writer's saves still being retried (in its volume directory).
const PENDING_FILE: &str = "save-pending.json";
/// A writer's saves given up on.
const ABANDONED_FILE: &str = "save-failed.json";

/// Serialises this host's lease renewals with its releases: a renewal that read a hold
/// just before the release deleted it would write it back.
static LEASE_WRITES: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

/// The saves of an ended writer's volumes that failed, retried in the background.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PendingSave {
    sandbox_id: String,
    /// The volumes not saved yet.
    mounts: Vec<PendingMount>,
    /// Tries so far.
    tries: u32,
    /// The last failure.
    error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PendingMount {
    lun: u8,
    volume: String,
}

fn lease_end(now_unix_ms: u64) -> u64 {
    now_unix_ms + VOLUME_LEASE.as_millis() as u64
}

fn volume_error(e: VolumeError) -> ApiError {
    match e {
        VolumeError::NotFound(id) => ApiError::not_found("volume", &id),
        VolumeError::NameTaken(name) => ApiError::conflict(format!(
            "the team already has a volume named {name}; pick another name or use that volume"
        )),
        VolumeError::WriterExists { volume, holder } => ApiError::conflict(format!(
            "volume {volume} is mounted read-write by sandbox {} at {}; mount it with type \"ro\", or delete that sandbox first",
            holder.sandbox_id, holder.path
        ))
        .with_details(serde_json::json!({ "volumeID": volume, "heldBy": holder.sandbox_id })),
        VolumeError::Store(e) => ApiError::storage(format!("the volume store: {e}")),
    }
}

fn view(
    v: &StoredVolume,
    holders: Vec<Holder>,
    latest: Option<&stored::VolumeVersion>,
) -> VolumeView {
    VolumeView {
        volume_id: v.id.clone(),
        name: v.name.clone(),
        size_mib: v.size_mib,
        created_at: iso8601(v.created_unix_ms as i64),
        version: latest.map_or(0, |l| l.version),
        saved_at: latest.map(|l| iso8601(l.saved_unix_ms as i64)),
        attachments: holders
            .into_iter()
            .filter(|h| !h.expired(now_ms() as u64))
            .map(|h| VolumeAttachment {
                sandbox_id: h.sandbox_id,
                path: h.path,
                mode: if h.mode == "ro" {
                    MountMode::Ro
                } else {
                    MountMode::Rw
                },
            })
            .collect(),
    }
}

impl Manager {
    /// Creates an empty volume (formatted when first mounted).
    pub async fn create_volume(
        &self,
        team: &str,
        req: VolumeCreateRequest,
    ) -> Result<VolumeView, ApiError> {
        let (name, size_mib) = req.validate()?;
        let _held = self.hold_store_quota(team, "volume", size_mib)?;
        let volume = StoredVolume {
            format: stored::FORMAT,
            id: uuid::Uuid::new_v4().hyphenated().to_string(),
            team_id: team.to_string(),
            name,
            size_mib,
            created_unix_ms: now_ms() as u64,
        };
        stored::create(self.store(), &volume)
            .await
            .map_err(volume_error)?;
        self.catalog
            .record_item("volume", &volume.id, team, size_mib)?;
        info!(volume = %volume.id, size_mib, "volume created");
        Ok(view(&volume, Vec::new(), None))
    }

    /// The team's volume `id_or_name` (404 for another team's).
    async fn volume(&self, team: &str, id_or_name: &str) -> Result<StoredVolume, ApiError> {
        let id = if is_volume_id(id_or_name) {
            id_or_name.to_string()
        } else {
            stored::id_of_name(self.store(), team, id_or_name)
                .await
                .map_err(|e| volume_error(e.into()))?
                .ok_or_else(|| ApiError::not_found("volume", id_or_name))?
        };
        match stored::get(self.store(), &id).await {
            Ok(v) if v.team_id == team => Ok(v),
            Ok(_) | Err(VolumeError::NotFound(_)) => Err(ApiError::not_found("volume", id_or_name)),
            Err(e) => Err(volume_error(e)),
        }
    }

    async fn volume_view(&self, v: &StoredVolume) -> Result<VolumeView, ApiError> {
        let store_err = |e: storage::StoreError| volume_error(e.into());
        let holders = stored::holders(self.store(), &v.id)
            .await
            .map_err(store_err)?;
        let latest = stored::latest(self.store(), &v.id)
            .await
            .map_err(store_err)?;
        Ok(view(v, holders, latest.as_ref()))
    }

    /// A volume, who holds it and how often it was saved.
    pub async fn get_volume(&self, team: &str, id: &str) -> Result<VolumeView, ApiError> {
        let v = self.volume(team, id).await?;
        self.volume_view(&v).await
    }

    /// The team's volumes, oldest first.
    pub async fn list_volumes(&self, team: &str) -> Result<Vec<VolumeView>, ApiError> {
        let all = stored::list(self.store(), team)
            .await
            .map_err(|e| volume_error(e.into()))?;
        let mut out = Vec::with_capacity(all.len());
        for v in &all {
            out.push(self.volume_view(v).await?);
        }
        Ok(out)
    }

    /// Deletes a volume no sandbox holds, with its saved contents.
    pub async fn delete_volume(&self, team: &str, id: &str) -> Result<(), ApiError> {
        let v = self.volume(team, id).await?;
        let now = now_ms() as u64;
        let holders: Vec<Holder> = stored::holders(self.store(), &v.id)
            .await
            .map_err(|e| volume_error(e.into()))?
            .into_iter()
            // A hold whose lease ran out is gone (its owner stopped renewing it).
            .filter(|h| !h.expired(now))
            .collect();
        if !holders.is_empty() {
            let ids: Vec<&str> = holders.iter().map(|h| h.sandbox_id.as_str()).collect();
            return Err(ApiError::conflict(format!(
                "volume {} is mounted by {}; delete those sandboxes first (their writes are saved when they end)",
                v.id,
                ids.join(", ")
            ))
            .with_details(serde_json::json!({ "volumeID": v.id, "mountedBy": ids })));
        }
        stored::delete(self.store(), &v)
            .await
            .map_err(|e| volume_error(e.into()))?;
        self.catalog.forget_item("volume", &v.id)?;
        self.gc_wanted.notify_one();
        info!(volume = %v.id, "volume deleted");
        Ok(())
    }

    /// Resolves a create's mounts (names to IDs, the team's volumes only).
    pub(super) async fn resolve_mounts(
        &self,
        team: &str,
        mounts: Vec<Mount>,
    ) -> Result<Vec<Mount>, ApiError> {
        let mut out: Vec<Mount> = Vec::with_capacity(mounts.len());
        for m in mounts {
            let v = self.volume(team, &m.volume).await.map_err(|e| {
                e.with_details(serde_json::json!({ "field": format!("mounts[{:?}].id", m.path), "hint": "create one with POST /api/v1/volumes" }))
            })?;
            if out.iter().any(|o| o.volume == v.id) {
                return Err(ApiError::bad_request(format!(
                    "mounts names volume {} twice; mount each volume once",
                    v.id
                )));
            }
            out.push(Mount { volume: v.id, ..m });
        }
        Ok(out)
    }

    /// Takes the sandbox's holds on its volumes (the write lock for `rw`); all or none.
    pub(super) async fn hold_volumes(&self, r: &SandboxRecord) -> Result<(), ApiError> {
        for (i, m) in r.mounts.iter().enumerate() {
            let now = now_ms() as u64;
            let holder = Holder {
                sandbox_id: r.id.clone(),
                path: m.path.clone(),
                mode: m.mode.as_str().into(),
                since_unix_ms: now,
                // Renewed once the sandbox's record exists (a create that dies before
                // then leaves a hold that expires).
                expires_unix_ms: Some(lease_end(now)),
            };
            if let Err(e) = stored::hold(self.store(), &m.volume, &holder, now).await {
                for earlier in &r.mounts[..i] {
                    let _ = stored::release(self.store(), &earlier.volume, &r.id).await;
                }
                return Err(volume_error(e));
            }
        }
        Ok(())
    }

    fn volume_dir(&self, sandbox: &str) -> PathBuf {
        self.state_dir.join("volumes").join(sandbox)
    }

    /// The sandbox's image of the volume at `lun` (`clean`: its frozen copy, what a
    /// hibernate saves).
    fn volume_image(&self, sandbox: &str, lun: u8, clean: bool) -> PathBuf {
        let ext = if clean { "clean" } else { "img" };
        self.volume_dir(sandbox).join(format!("{lun}.{ext}"))
    }

    /// Puts each of the sandbox's volumes into its fresh VM and mounts it in the guest.
    pub(super) async fn mount_volumes(
        &self,
        r: &SandboxRecord,
        vm: &mut QemuVm,
    ) -> Result<(), ApiError> {
        if r.mounts.is_empty() {
            return Ok(());
        }
        let dir = self.volume_dir(&r.id);
        // Images are sparse and grow with what the guest writes: the reserve must be
        // there before one is fetched or made.
        vmm::space::ensure(&dir, 0, self.snapshots.min_free_mib << 20, "volume images")
            .map_err(|e| super::vm_error("mounting volumes", e))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        for (lun, m) in r.mounts.iter().enumerate() {
            let lun = lun as u8;
            let image = self.volume_image(&r.id, lun, false);
            self.prepare_image(&m.volume, &image).await?;
            vm.attach_volume(VolumeDrive {
                lun,
                path: image,
                read_only: m.mode == MountMode::Ro,
            })
            .await
            .map_err(|e| ApiError::internal(format!("attaching volume {}: {e}", m.volume)))?;
            mount_in_guest(vm, lun, m).await?;
        }
        Ok(())
    }

    /// The volume's newest content at `image`, or a fresh empty file system.
    async fn prepare_image(&self, volume: &str, image: &Path) -> Result<(), ApiError> {
        let store_err = |e: storage::StoreError| volume_error(e.into());
        match stored::latest(self.store(), volume)
            .await
            .map_err(store_err)?
        {
            Some(latest) => stored::fetch(self.store(), &latest, image)
                .await
                .map_err(store_err),
            None => {
                let v = stored::get(self.store(), volume)
                    .await
                    .map_err(volume_error)?;
                format_image(image, v.size_mib).await
            }
        }
    }

    /// The image each volume slot of a snapshot restores with: the sandbox's own image
    /// when it has one here (a resume), else a copy of the snapshot's.
    pub(super) fn volume_images(
        &self,
        sandbox: &str,
        snapshot: &vmm::Snapshot,
    ) -> Result<BTreeMap<u8, PathBuf>, ApiError> {
        let mut out = BTreeMap::new();
        if snapshot.manifest().volumes.is_empty() {
            return Ok(out);
        }
        let dir = self.volume_dir(sandbox);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        for slot in &snapshot.manifest().volumes {
            let image = self.volume_image(sandbox, slot.lun, false);
            if !image.exists() {
                let from = snapshot.dir().join(VolumeDrive::snapshot_file(slot.lun));
                vmm::snapshot::copy_sparse(&from, &image).map_err(|e| {
                    ApiError::internal(format!("copying volume {} of the snapshot: {e}", slot.lun))
                })?;
            }
            out.insert(slot.lun, image);
        }
        Ok(out)
    }

    /// Destination of a live migration: an empty image of each volume the incoming VM
    /// has (`volumes`), of its size, for the source's mirror to fill. The peer's list
    /// must be the sandbox's mounts (LUN = index, the same mode), each no larger than
    /// its volume in the store (which this host must therefore share).
    pub(super) async fn incoming_volume_images(
        &self,
        r: &SandboxRecord,
        volumes: &[vmm::IncomingVolume],
    ) -> Result<BTreeMap<u8, PathBuf>, ApiError> {
        if volumes.len() != r.mounts.len() {
            return Err(ApiError::bad_request(format!(
                "the incoming VM has {} volumes and sandbox {} mounts {}",
                volumes.len(),
                r.id,
                r.mounts.len()
            )));
        }
        if volumes.is_empty() {
            return Ok(BTreeMap::new());
        }
        let dir = self.volume_dir(&r.id);
        if dir.join(PENDING_FILE).exists() || dir.join(ABANDONED_FILE).exists() {
            return Err(ApiError::conflict(format!(
                "this host still keeps a save of sandbox {}'s volumes from when it ran here; migrate it to another host",
                r.id
            )));
        }
        // The images are sparse; the whole of each must fit beside the reserve.
        let need: u64 = volumes.iter().map(|v| v.size_bytes).sum();
        vmm::space::ensure(
            &dir,
            need,
            self.snapshots.min_free_mib << 20,
            "volume images",
        )
        .map_err(|e| super::vm_error("making the incoming volumes' images", e))?;
        let made = self.make_incoming_images(r, volumes).await;
        if made.is_err() {
            // Nothing half made stays to be taken for the sandbox's own later.
            self.drop_volume_images(&r.id);
        }
        made
    }

    async fn make_incoming_images(
        &self,
        r: &SandboxRecord,
        volumes: &[vmm::IncomingVolume],
    ) -> Result<BTreeMap<u8, PathBuf>, ApiError> {
        let mut out = BTreeMap::new();
        let dir = self.volume_dir(&r.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        for v in volumes {
            let m = r
                .mounts
                .get(usize::from(v.lun))
                .filter(|m| (m.mode == MountMode::Ro) == v.read_only)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "the incoming VM's volume at LUN {} ({}) is not one sandbox {} mounts",
                        v.lun,
                        if v.read_only { "ro" } else { "rw" },
                        r.id
                    ))
                })?;
            let stored = stored::get(self.store(), &m.volume)
                .await
                .map_err(volume_error)?;
            if v.size_bytes == 0 || v.size_bytes > stored.size_mib << 20 {
                return Err(ApiError::bad_request(format!(
                    "the incoming VM's image of volume {} is {} bytes; the volume has {} MiB",
                    m.volume, v.size_bytes, stored.size_mib
                )));
            }
            let image = self.volume_image(&r.id, v.lun, false);
            // A clean copy left from another time must never be saved as this one.
            let _ = std::fs::remove_file(self.volume_image(&r.id, v.lun, true));
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(v.size_bytes))
                .map_err(|e| ApiError::internal(format!("making {}: {e}", image.display())))?;
            out.insert(v.lun, image);
        }
        Ok(out)
    }

    /// Makes the running VM's read-write volumes clean on disk: the guest flushes and
    /// freezes each file system (its journal checkpointed, so the image mounts anywhere
    /// without recovery). With `thaw`, a clean copy is kept beside each image
    /// (`<lun>.clean`, what a later save stores) and the file systems thaw; without, they
    /// stay frozen for the VM's end. Best effort: an unanswering guest leaves the images
    /// as they are (ext4's journal still recovers them on a read-write mount).
    pub(super) async fn quiesce_volumes(&self, r: &SandboxRecord, vm: &QemuVm, thaw: bool) {
        if r.volume_copies {
            return;
        }
        for (lun, m) in r.mounts.iter().enumerate() {
            if m.mode != MountMode::Rw {
                continue;
            }
            let path = shell_quoted(&m.path);
            if let Err(e) = guest_root(vm, &format!("sync; fsfreeze --freeze {path}")).await {
                warn!(sandbox = %r.id, volume = %m.volume, error = %e.message, "the guest did not freeze a volume");
                continue;
            }
            failpoint::hit("volumes.frozen");
            if thaw {
                let lun = lun as u8;
                let copied = vmm::snapshot::copy_sparse(
                    &self.volume_image(&r.id, lun, false),
                    &self.volume_image(&r.id, lun, true),
                );
                if let Err(e) = copied {
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "copying a frozen volume failed");
                }
                let _ = guest_root(vm, &format!("fsfreeze --unfreeze {path}")).await;
            }
        }
    }

    /// Undoes [`Manager::quiesce_volumes`] with `thaw` cut short by a restart: the
    /// guest's read-write volumes thaw (a file system not frozen answers with an error,
    /// ignored) and their clean copies go.
    pub(super) async fn thaw_volumes(&self, r: &SandboxRecord, vm: &QemuVm) {
        if r.volume_copies {
            return;
        }
        for (lun, m) in r.mounts.iter().enumerate() {
            if m.mode != MountMode::Rw {
                continue;
            }
            let path = shell_quoted(&m.path);
            let _ = guest_root(vm, &format!("fsfreeze --unfreeze {path} || true")).await;
            let _ = std::fs::remove_file(self.volume_image(&r.id, lun as u8, true));
        }
    }

    /// Saves the sandbox's read-write volumes back to the store (its VM is stopped):
    /// each one's clean copy (`from_clean`: what [`Manager::quiesce_volumes`] made, then
    /// removed), else its image. Returns whether every save landed.
    pub(super) async fn save_volumes(&self, r: &SandboxRecord, from_clean: bool) -> bool {
        self.save_volume_images(r, from_clean).await.is_empty()
    }

    /// [`Manager::save_volumes`], returning the mounts whose save failed (their LUN)
    /// and the last error.
    async fn save_volume_images(
        &self,
        r: &SandboxRecord,
        from_clean: bool,
    ) -> Vec<(PendingMount, String)> {
        if r.volume_copies {
            return Vec::new();
        }
        let mut failed = Vec::new();
        for (lun, m) in r.mounts.iter().enumerate() {
            let image = self.volume_image(&r.id, lun as u8, from_clean);
            if m.mode != MountMode::Rw || !image.exists() {
                continue;
            }
            // Renewed first: a lock taken over by another writer (this one's lease ran
            // out, its host down) is not saved over.
            let now = now_ms() as u64;
            let renewed = {
                let _leases = LEASE_WRITES.lock().await;
                stored::renew(self.store(), &m.volume, &r.id, lease_end(now), now).await
            };
            match renewed {
                // A store that fails now fails the save too: it is retried.
                Ok(Renewal::Renewed) | Err(_) => {}
                Ok(Renewal::Lost(Some(other))) => {
                    warn!(sandbox = %r.id, volume = %m.volume, held_by = %other.sandbox_id, "not saving a volume whose write lock another writer took over (this one's lease expired)");
                    let _ = self.catalog.append_event(
                        &r.id,
                        "volume.save_failed",
                        &serde_json::json!({ "volumeID": m.volume, "error": "the write lock was lost (its lease expired)", "heldBy": other.sandbox_id }),
                    );
                    continue;
                }
                // Released already (a restart repeating a save that landed, its release
                // half or wholly done): another writer may have saved since.
                Ok(Renewal::Released | Renewal::Lost(None)) => {
                    info!(sandbox = %r.id, volume = %m.volume, "not saving a volume this sandbox no longer holds");
                    continue;
                }
            }
            let _uploading = self.uploads.read().await;
            match stored::save(self.store(), &m.volume, &r.id, &image, now_ms() as u64).await {
                Ok(v) => {
                    info!(sandbox = %r.id, volume = %m.volume, version = v.version, "volume saved")
                }
                Err(e) => {
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "saving a volume failed; its image and write lock stay");
                    failed.push((
                        PendingMount {
                            lun: lun as u8,
                            volume: m.volume.clone(),
                        },
                        e.to_string(),
                    ));
                }
            }
            if from_clean {
                let _ = std::fs::remove_file(&image);
            }
        }
        failed
    }

    /// Ends the sandbox's hold on its volumes once its VM is gone: read-write content
    /// saved, locks released, local images removed. A failed save keeps the image and
    /// the write lock (nobody else may write over what was not saved) and is retried in
    /// the background ([`Manager::keep_volume_leases`]).
    pub(super) async fn release_volumes(&self, r: &SandboxRecord) {
        if r.mounts.is_empty() {
            return;
        }
        if let Some(snapshot) = &r.hibernated {
            // Hibernated here, and its pause snapshot consumed: another worker resumed it
            // and holds its volumes now. This worker's stale record releases nothing.
            if matches!(
                storage::snapshots::get(self.store(), snapshot).await,
                Err(storage::StoreError::NotFound(_))
            ) {
                return;
            }
        }
        // Best effort: without the row a save cut short is still retried from the
        // record (a sandbox `destroying` finishes its delete at start).
        let intent = self
            .begin_op(&r.id, super::recovery::op::VOLUME_SAVE, serde_json::json!({}))
            .inspect_err(|e| warn!(sandbox = %r.id, error = %e.message, "recording a volume save's intent failed"))
            .ok();
        let failed = self.save_volume_images(r, false).await;
        if let Some(intent) = &intent {
            intent.step("volume_save.saved", serde_json::json!({}));
        }
        // The images go before the locks: a restart between the two must not find an
        // image to save again over what a next writer saved.
        if failed.is_empty() {
            let _ = std::fs::remove_dir_all(self.volume_dir(&r.id));
        }
        if !r.volume_copies {
            let _leases = LEASE_WRITES.lock().await;
            for m in &r.mounts {
                if failed.iter().any(|(f, _)| f.volume == m.volume) {
                    continue;
                }
                if let Err(e) = stored::release(self.store(), &m.volume, &r.id).await {
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "releasing a volume failed");
                }
            }
        }
        if failed.is_empty() {
            return;
        }
        let error = failed.last().map(|(_, e)| e.clone()).unwrap_or_default();
        let pending = PendingSave {
            sandbox_id: r.id.clone(),
            mounts: failed.into_iter().map(|(m, _)| m).collect(),
            tries: 1,
            error,
        };
        // Without the file nothing renews the hold: it expires after a lease.
        if let Err(e) = self.write_save_file(&pending, PENDING_FILE) {
            warn!(sandbox = %r.id, error = %e, "recording a volume save to retry failed; its write lock expires unrenewed");
        }
    }

    fn write_save_file(&self, pending: &PendingSave, name: &str) -> std::io::Result<()> {
        let dir = self.volume_dir(&pending.sandbox_id);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(pending).expect("json"))?;
        std::fs::rename(&tmp, dir.join(name))
    }

    /// The saves being retried on this host.
    fn pending_saves(&self) -> Vec<PendingSave> {
        let Ok(dirs) = std::fs::read_dir(self.state_dir.join("volumes")) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| {
                let bytes = std::fs::read(d.path().join(PENDING_FILE)).ok()?;
                serde_json::from_slice(&bytes).ok()
            })
            .collect()
    }

    /// Runs for the daemon's life: renews this host's volume holds every third of
    /// [`VOLUME_LEASE`] (live sandboxes', and those of saves being retried), and
    /// retries failed saves (a task of its own, so a slow upload delays no renewal).
    pub async fn keep_volume_leases(self: Arc<Self>) {
        tokio::spawn(self.clone().retry_volume_saves());
        let mut reported = HashSet::new();
        // At once first: a restarted daemon's holds were last renewed before it stopped.
        loop {
            self.renew_volume_leases(&mut reported).await;
            tokio::time::sleep(VOLUME_LEASE / 3).await;
        }
    }

    /// One round of renewals; a lost lock is reported once per sandbox and volume.
    async fn renew_volume_leases(&self, reported: &mut HashSet<(String, String)>) {
        let mut held: Vec<(String, String)> = Vec::new();
        match self
            .catalog
            .sandboxes_in(&["new", "creating", "active", "stopped", "destroying"])
        {
            Ok(records) => {
                for r in records.iter().filter(|r| !r.volume_copies) {
                    held.extend(r.mounts.iter().map(|m| (r.id.clone(), m.volume.clone())));
                }
            }
            Err(e) => warn!(error = %e, "renewing volume leases: the catalog could not be read"),
        }
        for p in self.pending_saves() {
            held.extend(
                p.mounts
                    .into_iter()
                    .map(|m| (p.sandbox_id.clone(), m.volume)),
            );
        }
        for (sandbox, volume) in held {
            let renewed = {
                let _leases = LEASE_WRITES.lock().await;
                let now = now_ms() as u64;
                stored::renew(self.store(), &volume, &sandbox, lease_end(now), now).await
            };
            match renewed {
                Ok(Renewal::Renewed | Renewal::Released) => {}
                Ok(Renewal::Lost(by)) => {
                    if !reported.insert((sandbox.clone(), volume.clone())) {
                        continue;
                    }
                    let by = by.map(|h| h.sandbox_id);
                    warn!(%sandbox, %volume, held_by = ?by, "a volume's write lock was lost (its lease expired unrenewed); this sandbox's writes will not be saved over the new writer's");
                    let _ = self.catalog.append_event(
                        &sandbox,
                        "volume.lease_lost",
                        &serde_json::json!({ "volumeID": volume, "heldBy": by }),
                    );
                }
                Err(e) => warn!(%sandbox, %volume, error = %e, "renewing a volume lease failed"),
            }
        }
    }

    /// Retries failed saves, each with its own back-off, until they land or run out of
    /// tries.
    async fn retry_volume_saves(self: Arc<Self>) {
        let mut backoffs: HashMap<String, Backoff> = HashMap::new();
        loop {
            tokio::time::sleep(SAVE_RETRY_TICK).await;
            let pending = self.pending_saves();
            backoffs.retain(|id, _| pending.iter().any(|p| &p.sandbox_id == id));
            for p in pending {
                let now = Instant::now();
                let backoff = backoffs.entry(p.sandbox_id.clone()).or_insert_with(|| {
                    // The tries so far (a restarted daemon goes on from the file).
                    let mut b = Backoff::new(SAVE_RETRY_BASE, SAVE_RETRY_CAP);
                    for _ in 0..p.tries.max(1) {
                        b.failed(now);
                    }
                    b
                });
                if backoff.ready(now) {
                    self.retry_save(p, backoff).await;
                }
            }
        }
    }

    /// One more try of a pending save: what lands is released; what fails waits for
    /// the next try, or after the last one is given up (see the module's comment).
    async fn retry_save(&self, mut p: PendingSave, backoff: &mut Backoff) {
        let mut still = Vec::new();
        for m in std::mem::take(&mut p.mounts) {
            let image = self.volume_image(&p.sandbox_id, m.lun, false);
            // Only a writer that still holds the lock may save (another may have taken
            // it over after the lease ran out).
            let now = now_ms() as u64;
            let held = {
                let _leases = LEASE_WRITES.lock().await;
                stored::renew(self.store(), &m.volume, &p.sandbox_id, lease_end(now), now).await
            };
            match held {
                Ok(Renewal::Renewed) => {}
                Ok(lost) => {
                    warn!(sandbox = %p.sandbox_id, volume = %m.volume, found = ?lost, "a volume save being retried lost its write lock; its writes are not saved");
                    let _ = self.catalog.append_event(
                        &p.sandbox_id,
                        "volume.save_failed",
                        &serde_json::json!({ "volumeID": m.volume, "tries": p.tries, "error": "the write lock was lost (its lease expired)" }),
                    );
                    continue;
                }
                Err(e) => {
                    p.error = e.to_string();
                    still.push(m);
                    continue;
                }
            }
            let saved = if image.exists() {
                let _uploading = self.uploads.read().await;
                stored::save(self.store(), &m.volume, &p.sandbox_id, &image, now)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            };
            match saved {
                Ok(v) => {
                    info!(sandbox = %p.sandbox_id, volume = %m.volume, version = v.map(|v| v.version), tries = p.tries + 1, "volume saved on a retry");
                    let _leases = LEASE_WRITES.lock().await;
                    if let Err(e) = stored::release(self.store(), &m.volume, &p.sandbox_id).await {
                        warn!(sandbox = %p.sandbox_id, volume = %m.volume, error = %e, "releasing a volume failed; its lease expires unrenewed");
                    }
                }
                Err(e) => {
                    p.error = e.to_string();
                    still.push(m);
                }
            }
        }
        let dir = self.volume_dir(&p.sandbox_id);
        if still.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        p.mounts = still;
        p.tries += 1;
        if p.tries < SAVE_TRIES {
            let wait = backoff.failed(Instant::now());
            warn!(sandbox = %p.sandbox_id, tries = p.tries, error = %p.error, retry_in_s = wait.as_secs(), "saving volumes failed again");
            if let Err(e) = self.write_save_file(&p, PENDING_FILE) {
                warn!(sandbox = %p.sandbox_id, error = %e, "recording a volume save to retry failed");
            }
            return;
        }
        // Given up: the file moves aside, so nothing renews the holds any more.
        let volumes: Vec<&str> = p.mounts.iter().map(|m| m.volume.as_str()).collect();
        warn!(sandbox = %p.sandbox_id, ?volumes, tries = p.tries, error = %p.error, dir = %dir.display(), "saving volumes failed for good; their images stay here and their write locks expire after a lease");
        if let Err(e) = self.write_save_file(&p, ABANDONED_FILE) {
            warn!(sandbox = %p.sandbox_id, error = %e, "recording a given-up volume save failed");
        }
        let _ = std::fs::remove_file(dir.join(PENDING_FILE));
        let _ = self.catalog.append_event(
            &p.sandbox_id,
            "volume.save_failed",
            &serde_json::json!({
                "volumeIDs": volumes,
                "tries": p.tries,
                "error": p.error,
                "image": dir.display().to_string(),
                "lockExpiresInS": VOLUME_LEASE.as_secs(),
            }),
        );
    }

    /// Drops this host's images of a sandbox whose volumes were saved (hibernated: a
    /// resume anywhere takes them from its snapshot).
    /// Removes the volume images of every sandbox not in `here` (this host's), except
    /// those with a save still to retry or given up (an operator's).
    pub(super) fn sweep_stray_volume_images(&self, here: &HashSet<String>) {
        let Ok(dirs) = std::fs::read_dir(self.state_dir.join("volumes")) else {
            return;
        };
        for dir in dirs.flatten() {
            let path = dir.path();
            let name = dir.file_name().to_string_lossy().to_string();
            if here.contains(&name)
                || path.join(PENDING_FILE).exists()
                || path.join(ABANDONED_FILE).exists()
            {
                continue;
            }
            info!(dir = %path.display(), "removing volume images of a sandbox that is not this host's");
            let _ = std::fs::remove_dir_all(&path);
        }
    }

    pub(super) fn drop_volume_images(&self, sandbox: &str) {
        let _ = std::fs::remove_dir_all(self.volume_dir(sandbox));
    }
}

/// A sparse image of `size_mib` with an empty ext4 file system whose root belongs to
/// the sandbox's default user.
async fn format_image(image: &Path, size_mib: u64) -> Result<(), ApiError> {
    let file = std::fs::File::create(image)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", image.display())))?;
    file.set_len(size_mib * 1024 * 1024)
        .map_err(|e| ApiError::internal(format!("sizing {}: {e}", image.display())))?;
    drop(file);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "root_owner=1000:1000,lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(image)
        .output()
        .await
        .map_err(|e| ApiError::internal(format!("running mkfs.ext4: {e}; install e2fsprogs")))?;
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `s` as one shell word, in single quotes: mount paths are checked at create, but a
/// restored record's come from a snapshot's manifest (the bucket's word).
pub(super) fn shell_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Output of a guest helper kept for its error message, per channel: the guest may
/// print without end, the host keeps only this much of the end.
const HELPER_OUTPUT_TAIL: usize = 64 * 1024;

/// Runs a shell script as root in the guest (at most 30 s); fails with (the end of) its
/// stderr.
pub(super) async fn guest_root(vm: &QemuVm, script: &str) -> Result<(), ApiError> {
    let request = ExecRequest {
        command: Command::Shell(script.to_string()),
        env: BTreeMap::new(),
        cwd: Some("/".into()),
        user: Some("root".into()),
        background: false,
        stdin: false,
        attach: true,
    };
    let run = vm.agent().run_tail(request, HELPER_OUTPUT_TAIL);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .map_err(|_| ApiError::internal("the guest took over 30 s"))?
        .map_err(|e| ApiError::internal(format!("the guest agent: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::internal(out.stderr_str().trim().to_string()));
    }
    Ok(())
}

/// Finds the disk at `lun` in the guest and mounts it at the mount's path.
async fn mount_in_guest(vm: &QemuVm, lun: u8, m: &Mount) -> Result<(), ApiError> {
    let options = if m.mode == MountMode::Ro {
        "ro,noload"
    } else {
        "rw"
    };
    let script = format!(
        r#"set -e
i=0
while :; do
  for d in /sys/bus/scsi/devices/*:0:0:{lun}/block/*; do
    [ -e "$d" ] && dev=/dev/$(basename "$d") && break 2
  done
  i=$((i + 1))
  [ "$i" -gt {tries} ] && {{ echo "the volume's disk (LUN {lun}) never appeared" >&2; exit 1; }}
  sleep 0.1
done
mkdir -p {path}
mount -t ext4 -o noatime,{options} "$dev" {path}"#,
        tries = DEVICE_WAIT_S * 10,
        path = shell_quoted(&m.path),
    );
    guest_root(vm, &script).await.map_err(|e| {
        ApiError::internal(format!(
            "mounting volume {} at {}: {}",
            m.volume, m.path, e.message
        ))
    })
}
