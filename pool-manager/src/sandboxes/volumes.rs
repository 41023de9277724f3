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
//! the sandbox's own image; a fork child or a restored copy gets its own copy of the
//! snapshot's and holds no lock (it never writes the volume back).

use super::{now_ms, Manager};
use crate::error::ApiError;
use crate::model::*;
use agent_protocol::{Command, ExecRequest};
use api_model::{
    is_volume_id, Mount, MountMode, VolumeAttachment, VolumeCreateRequest, VolumeView,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use storage::volumes::{self as stored, Holder, StoredVolume, VolumeError};
use tracing::{info, warn};
use vmm::{QemuVm, VolumeDrive};

/// How long the guest gets to see a hot-plugged disk.
const DEVICE_WAIT_S: u32 = 20;

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
        let holders = stored::holders(self.store(), &v.id)
            .await
            .map_err(|e| volume_error(e.into()))?;
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
            let holder = Holder {
                sandbox_id: r.id.clone(),
                path: m.path.clone(),
                mode: m.mode.as_str().into(),
                since_unix_ms: now_ms() as u64,
            };
            if let Err(e) = stored::hold(self.store(), &m.volume, &holder).await {
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
            if let Err(e) = guest_root(vm, &format!("sync; fsfreeze -f '{}'", m.path)).await {
                warn!(sandbox = %r.id, volume = %m.volume, error = %e.message, "the guest did not freeze a volume");
                continue;
            }
            if thaw {
                let lun = lun as u8;
                let copied = vmm::snapshot::copy_sparse(
                    &self.volume_image(&r.id, lun, false),
                    &self.volume_image(&r.id, lun, true),
                );
                if let Err(e) = copied {
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "copying a frozen volume failed");
                }
                let _ = guest_root(vm, &format!("fsfreeze -u '{}'", m.path)).await;
            }
        }
    }

    /// Saves the sandbox's read-write volumes back to the store (its VM is stopped):
    /// each one's clean copy (`from_clean`: what [`Manager::quiesce_volumes`] made, then
    /// removed), else its image. Returns whether every save landed.
    pub(super) async fn save_volumes(&self, r: &SandboxRecord, from_clean: bool) -> bool {
        if r.volume_copies {
            return true;
        }
        let mut all = true;
        for (lun, m) in r.mounts.iter().enumerate() {
            let image = self.volume_image(&r.id, lun as u8, from_clean);
            if m.mode != MountMode::Rw || !image.exists() {
                continue;
            }
            let _uploading = self.uploads.read().await;
            match stored::save(self.store(), &m.volume, &r.id, &image, now_ms() as u64).await {
                Ok(v) => {
                    info!(sandbox = %r.id, volume = %m.volume, version = v.version, "volume saved")
                }
                Err(e) => {
                    all = false;
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "saving a volume failed; its image and write lock stay");
                }
            }
            if from_clean {
                let _ = std::fs::remove_file(&image);
            }
        }
        all
    }

    /// Ends the sandbox's hold on its volumes once its VM is gone: read-write content
    /// saved, locks released, local images removed. A failed save keeps the image and
    /// the write lock (nobody else may write over what was not saved).
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
        let saved = self.save_volumes(r, false).await;
        if !r.volume_copies {
            for m in &r.mounts {
                if !saved && m.mode == MountMode::Rw {
                    continue;
                }
                if let Err(e) = stored::release(self.store(), &m.volume, &r.id).await {
                    warn!(sandbox = %r.id, volume = %m.volume, error = %e, "releasing a volume failed");
                }
            }
        }
        if saved {
            let _ = std::fs::remove_dir_all(self.volume_dir(&r.id));
        }
    }

    /// Drops this host's images of a sandbox whose volumes were saved (hibernated: a
    /// resume anywhere takes them from its snapshot).
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

/// Output of a guest helper kept for its error message, per channel: the guest may
/// print without end, the host keeps only this much of the end.
const HELPER_OUTPUT_TAIL: usize = 64 * 1024;

/// Runs a shell script as root in the guest (at most 30 s); fails with (the end of) its
/// stderr.
async fn guest_root(vm: &QemuVm, script: &str) -> Result<(), ApiError> {
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
mkdir -p '{path}'
mount -t ext4 -o noatime,{options} "$dev" '{path}'"#,
        tries = DEVICE_WAIT_S * 10,
        path = m.path,
    );
    guest_root(vm, &script).await.map_err(|e| {
        ApiError::internal(format!(
            "mounting volume {} at {}: {}",
            m.volume, m.path, e.message
        ))
    })
}
