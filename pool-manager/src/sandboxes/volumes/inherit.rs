//! Volumes a fork child or a restored copy inherits from the sandbox it came from.
//!
//! A child's RAM is its parent's, so its kernel has the parent's file systems mounted,
//! read-write ones included, with their page cache. Its volume disks are private copies
//! of the snapshot's images, which nothing saves. Left alone, the child's writes would
//! vanish. So each of the parent's read-write mounts becomes, by the fork's or the
//! restore's `volumes`:
//!
//! - `readonly` (the default): the same volume, held read-only (the parent keeps the
//!   write lock). In the guest the mount is made read-only (a read-only bind remount),
//!   so a write fails with EROFS at once.
//! - `copy`: a new volume of the team, created from the image the child starts with (the
//!   parent's content at the fork), held read-write and saved like any other.
//!
//! A fork freezes the parent's read-write file systems (sync + fsfreeze) around its
//! snapshot. The images are then clean (a copy's first version mounts anywhere), and
//! every child starts with them frozen: none of its writers runs before its mounts are
//! settled. A file open for writing keeps a mount from becoming read-only (EBUSY), so a
//! `readonly` fork whose parent holds one is refused up front, naming the files. A
//! restore comes from a snapshot taken without a freeze: its copy is frozen first
//! thing, then settled the same way (writes in the moment between its start and the
//! freeze land in its private copy: documented).

use super::super::Manager;
use super::guest_root;
use crate::error::ApiError;
use crate::model::SandboxRecord;
use api_model::{is_volume_id, InheritVolumes, Inherited, Mount, MountMode, VolumeCreateRequest};
use storage::volumes as stored;
use tracing::{info, warn};
use vmm::QemuVm;

/// One of the parent's read-write mounts as the child's guest must see it.
#[derive(Debug, Clone)]
pub(in crate::sandboxes) struct Settle {
    /// Its path in the guest.
    pub path: String,
    /// `readonly`: made read-only; `copy`: left read-write.
    pub how: InheritVolumes,
}

/// The child's mounts for the parent's `mounts`, and what its guest must do with them.
/// Read-only mounts stay as they were; read-write ones become read-only (`readonly`)
/// or stay read-write on a copy whose ID [`Manager::copy_inherited`] fills in (`copy`).
/// Every mount keeps its place: a mount's index is its disk's LUN.
///
/// `exists(volume)` says whether the team has the volume. One it has not (deleted
/// since the snapshot, or never the team's: a restore's manifest is the bucket's word)
/// can only be copied from the image: anything else is refused (409), naming it.
pub(in crate::sandboxes) fn inherit_mounts(
    from: &str,
    mounts: &[Mount],
    how: InheritVolumes,
    exists: impl Fn(&str) -> bool,
) -> Result<(Vec<Mount>, Vec<Settle>), ApiError> {
    let mut out = Vec::with_capacity(mounts.len());
    let mut settle = Vec::new();
    for m in mounts {
        let exists = exists(&m.volume);
        let copied = m.mode == MountMode::Rw && how == InheritVolumes::Copy;
        if !exists && !copied {
            return Err(ApiError::conflict(format!(
                "the volume mounted at {} ({}) is gone (deleted since, or not this team's): {}",
                m.path,
                m.volume,
                if m.mode == MountMode::Rw {
                    "restore with \"volumes\": \"copy\" to get its content from the snapshot as a new volume"
                } else {
                    "nothing can mount it read-only; restore another snapshot"
                }
            ))
            .with_details(serde_json::json!({ "volumeID": m.volume, "path": m.path })));
        }
        let inherited = |how| {
            Some(Inherited {
                from_sandbox: from.to_string(),
                from_volume: m.volume.clone(),
                how,
            })
        };
        match m.mode {
            MountMode::Ro => out.push(Mount {
                inherited: inherited(InheritVolumes::Readonly),
                ..m.clone()
            }),
            MountMode::Rw => {
                settle.push(Settle {
                    path: m.path.clone(),
                    how,
                });
                out.push(Mount {
                    mode: if copied { MountMode::Rw } else { MountMode::Ro },
                    inherited: inherited(how),
                    ..m.clone()
                });
            }
        }
    }
    Ok((out, settle))
}

use super::shell_quoted as quoted;

/// The marker a guest check prints before the files it found open for writing.
const OPEN_FOR_WRITE: &str = "open for writing:";

impl Manager {
    /// Before a `readonly` fork: refuses (409) when a process of the parent holds a
    /// file open for writing on one of its read-write volumes, since the child's mount
    /// could not become read-only. Names the files.
    pub(in crate::sandboxes) async fn check_no_writers(
        &self,
        r: &SandboxRecord,
        vm: &QemuVm,
        how: InheritVolumes,
    ) -> Result<(), ApiError> {
        if how != InheritVolumes::Readonly {
            return Ok(());
        }
        let paths: Vec<String> = r
            .mounts
            .iter()
            .filter(|m| m.mode == MountMode::Rw)
            .map(|m| quoted(&m.path))
            .collect();
        if paths.is_empty() {
            return Ok(());
        }
        // fdinfo's flags are octal; the low two bits are the access mode (0: read only).
        let script = format!(
            r#"found=
for P in {paths}; do
  for fd in /proc/[0-9]*/fd/*; do
    t=$(readlink "$fd" 2>/dev/null) || continue
    case "$t" in "$P"/*) ;; *) continue ;; esac
    pid=${{fd#/proc/}}; pid=${{pid%%/*}}
    fl=
    while read -r k v _; do [ "$k" = flags: ] && fl=$v && break; done 2>/dev/null < "/proc/$pid/fdinfo/${{fd##*/}}"
    [ -n "$fl" ] && [ $((0$fl & 3)) -ne 0 ] && found="$found $t (pid $pid)"
  done
done
[ -z "$found" ] || {{ echo "{OPEN_FOR_WRITE}$found" >&2; exit 3; }}"#,
            paths = paths.join(" ")
        );
        match guest_root(vm, &script).await {
            Ok(()) => Ok(()),
            Err(e) if e.message.starts_with(OPEN_FOR_WRITE) => {
                // The guest's word, so bounded: the first files say enough.
                let files: String = e.message[OPEN_FOR_WRITE.len()..]
                    .chars()
                    .take(1000)
                    .collect();
                Err(ApiError::conflict(format!(
                    "the children would get the volumes read-only, but the parent has files open for writing on them:{files}; close them first, or fork with \"volumes\": \"copy\" (each child gets a copy of its own)"
                )))
            }
            Err(e) => Err(ApiError::internal(format!(
                "checking the parent's volumes for open files: {}",
                e.message
            ))),
        }
    }

    /// Freezes the running VM's read-write file systems (flushed, journal checkpointed)
    /// for a fork's snapshot; returns the paths frozen, for [`thaw_paths`]. All or
    /// none: one that fails thaws the ones before it.
    pub(in crate::sandboxes) async fn freeze_for_fork(
        &self,
        r: &SandboxRecord,
        vm: &QemuVm,
    ) -> Result<Vec<String>, ApiError> {
        let mut frozen = Vec::new();
        for m in r.mounts.iter().filter(|m| m.mode == MountMode::Rw) {
            let path = quoted(&m.path);
            if let Err(e) =
                guest_root(vm, &format!("sync -f {path}; fsfreeze --freeze {path}")).await
            {
                thaw_paths(vm, &frozen).await;
                return Err(ApiError::internal(format!(
                    "freezing volume {} at {} for the fork: {}",
                    m.volume, m.path, e.message
                )));
            }
            frozen.push(m.path.clone());
        }
        Ok(frozen)
    }

    /// `copy`: makes each new volume the child's read-write inherited mounts name — its
    /// first version the child's own image of it, taken while its file system is frozen
    /// (clean, and still the original's content) — and puts its ID in the child's
    /// mounts. Pushes the new volumes' IDs to `copies` (to delete if the child does not
    /// start).
    pub(in crate::sandboxes) async fn copy_inherited(
        &self,
        child: &mut SandboxRecord,
        copies: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        let team = child.team_id.clone();
        for lun in 0..child.mounts.len() {
            let m = &child.mounts[lun];
            let from = match &m.inherited {
                Some(i) if i.how == InheritVolumes::Copy && m.mode == MountMode::Rw => {
                    i.from_volume.clone()
                }
                _ => continue,
            };
            let image = self.volume_image(&child.id, lun as u8, false);
            // The original's name and size only if it is the team's (never another
            // team's, whatever a manifest names).
            let parent = if is_volume_id(&from) {
                self.volume(&team, &from).await.ok()
            } else {
                None
            };
            let size_mib = match parent.as_ref() {
                Some(p) => p.size_mib,
                None => std::fs::metadata(&image)
                    .map(|m| m.len().div_ceil(1 << 20))
                    .map_err(|e| ApiError::internal(format!("reading {}: {e}", image.display())))?,
            };
            // `<parent's name>-<the child's ID>`: names are unique per team.
            let name = parent.and_then(|p| p.name).map(|n| {
                let short: String = n.chars().take(40).collect();
                format!("{short}-{}", &child.id[4..16])
            });
            let view = self
                .create_volume(
                    &team,
                    VolumeCreateRequest {
                        name,
                        size_mib: Some(size_mib),
                    },
                )
                .await?;
            copies.push(view.volume_id.clone());
            stored::save(
                self.store(),
                &view.volume_id,
                &child.id,
                &image,
                super::now_ms() as u64,
            )
            .await
            .map_err(super::volume_error)?;
            info!(sandbox = %child.id, from = %from, volume = %view.volume_id, "volume copied for a child");
            child.mounts[lun].volume = view.volume_id;
        }
        Ok(())
    }

    /// A fork's children, each with its VM (started with the inherited file systems
    /// frozen): their copies made, their holds taken and their guests' mounts settled.
    /// All or nothing is the caller's (it ends them all on an error, with
    /// [`Manager::release_holds`] and [`Manager::drop_copies`]).
    pub(in crate::sandboxes) async fn settle_children(
        &self,
        children: &mut [SandboxRecord],
        vms: &[QemuVm],
        settle: &[Settle],
        copies: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        for (child, vm) in children.iter_mut().zip(vms) {
            self.settle_child(child, vm, settle, true, copies).await?;
        }
        Ok(())
    }

    /// One new sandbox: its inherited read-write file systems frozen (a restored copy's
    /// here; a fork's child starts so), then [`Manager::copy_inherited`], its holds, and
    /// [`settle_inherited`]. On an error the file systems are thawed (the caller ends
    /// the VM anyway).
    pub(in crate::sandboxes) async fn settle_child(
        &self,
        child: &mut SandboxRecord,
        vm: &QemuVm,
        settle: &[Settle],
        frozen: bool,
        copies: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        if settle.is_empty() {
            return self.hold_volumes(child).await;
        }
        if !frozen {
            for s in settle {
                // One the snapshot caught frozen already is frozen: fine.
                let path = quoted(&s.path);
                let _ = guest_root(
                    vm,
                    &format!("sync -f {path}; fsfreeze --freeze {path} 2>/dev/null || true"),
                )
                .await;
            }
        }
        let settled = async {
            self.copy_inherited(child, copies).await?;
            self.hold_volumes(child).await?;
            settle_inherited(vm, settle).await
        }
        .await;
        if settled.is_err() {
            let paths: Vec<String> = settle.iter().map(|s| s.path.clone()).collect();
            thaw_paths(vm, &paths).await;
        }
        settled
    }

    /// Releases a child's holds (it did not start).
    pub(in crate::sandboxes) async fn release_holds(&self, child: &SandboxRecord) {
        for m in &child.mounts {
            let _ = stored::release(self.store(), &m.volume, &child.id).await;
        }
    }

    /// Whether `team` has volume `id` (a restore's manifest may name one since deleted,
    /// or, tampered with, another team's).
    pub(in crate::sandboxes) async fn team_has_volume(&self, team: &str, id: &str) -> bool {
        // An ID, never a name: a hold is kept under what the record names.
        is_volume_id(id) && self.volume(team, id).await.is_ok()
    }

    /// Deletes the volumes [`Manager::copy_inherited`] made for a child that did not
    /// start.
    pub(in crate::sandboxes) async fn drop_copies(&self, team: &str, copies: &[String]) {
        for id in copies {
            if let Err(e) = self.delete_volume(team, id).await {
                warn!(volume = %id, error = %e.message, "deleting a copy made for a child that did not start");
            }
        }
    }
}

/// Thaws `paths` in the guest (one not frozen answers with an error, ignored).
pub(in crate::sandboxes) async fn thaw_paths(vm: &QemuVm, paths: &[String]) {
    for p in paths {
        let _ = guest_root(vm, &format!("fsfreeze --unfreeze {} || true", quoted(p))).await;
    }
}

/// Settles a child's inherited read-write mounts in its guest, whose file systems are
/// frozen: `copy` ones thaw, read-write; `readonly` ones become read-only for good. First
/// the mount (a read-only bind remount: a frozen file system allows it, and no writer
/// gets through once it thaws), then it thaws, then the whole file system (every other
/// mount of it too: a container's bind mount, say) is remounted read-only, which fails
/// (EBUSY) while anything holds a file of it open for writing: the child then fails
/// rather than keep a writable way in.
pub(in crate::sandboxes) async fn settle_inherited(
    vm: &QemuVm,
    settle: &[Settle],
) -> Result<(), ApiError> {
    for s in settle {
        let path = quoted(&s.path);
        let script = match s.how {
            InheritVolumes::Readonly => format!(
                "mount -o remount,bind,ro {path} || exit 1\nfsfreeze --unfreeze {path}\nmount -o remount,ro {path}"
            ),
            InheritVolumes::Copy => format!("fsfreeze --unfreeze {path}"),
        };
        guest_root(vm, &script).await.map_err(|e| {
            // The guest's words, bounded.
            let said: String = e.message.chars().take(500).collect();
            match s.how {
                InheritVolumes::Readonly => ApiError::conflict(format!(
                    "making the volume at {} read-only in the new sandbox failed ({said}): a file of it is open for writing (perhaps through another mount of it, a container's); close it, or fork or restore with \"volumes\": \"copy\"",
                    s.path
                )),
                InheritVolumes::Copy => ApiError::internal(format!(
                    "thawing the copied volume at {} in the new sandbox failed: {said}",
                    s.path
                )),
            }
        })?;
    }
    Ok(())
}
