//! Snapshots: what a VM's memory, device state and disk were at one instant, and what is
//! needed to restore them.
//!
//! A snapshot is a directory:
//!
//! - `state` — QEMU's migration stream. With [`MemoryFormat::File`] it holds only device
//!   state: the `x-ignore-shared` capability leaves a VM's own (shared) RAM out, and a
//!   copy-on-write VM's RAM, which QEMU must send, is split out of the stream into
//!   `memory` ([`crate::ram_stream`]). [`MemoryFormat::Stream`] snapshots (older ones,
//!   or one whose stream this build could not split, saved again without
//!   `x-ignore-shared`) hold RAM too.
//! - `memory` — guest RAM as a sparse positional image ([`MemoryFormat::File`] only):
//!   page N at offset N × 4 KiB, so successive snapshots and a fork family share every
//!   unchanged chunk. Restores map it `share=off`: pages are copied only when a child
//!   writes them.
//! - `disk.qcow2` — the VM's disk overlay at that instant; its backing chain ends at the
//!   image set's read-only root filesystem.
//! - `manifest.json` — written last (rename), so a snapshot is wholly there or absent;
//!   for a snapshot kept on this host, only once the other files and the directory are
//!   flushed to disk (`Snapshot::commit`).

use crate::{Accel, VmmError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The files a snapshot directory holds besides its manifest (`memory` only in
/// [`MemoryFormat::File`] snapshots).
pub const FILES: &[&str] = &["state", "memory", "disk.qcow2"];

/// Version of the snapshot layout.
pub const FORMAT_VERSION: u32 = 1;

/// Where guest RAM is in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryFormat {
    /// In the `memory` file.
    File,
    /// Inside the `state` migration stream.
    Stream,
}

/// Everything a restore must match or reproduce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format_version: u32,
    pub id: String,
    /// The VM it was taken from.
    pub source_vm: String,
    pub created_unix_ms: u64,
    /// `qemu -version`'s first line: device state only loads into the same QEMU.
    pub qemu_version: String,
    pub accel: Accel,
    /// The image set's kernel layer key: RAM holds a running kernel.
    pub kernel_key: String,
    pub rootfs: String,
    /// The read-only root filesystem image `disk.qcow2` is layered on (its only
    /// dependency outside the snapshot).
    pub rootfs_image: PathBuf,
    /// QEMU's machine arguments (no per-VM paths); a restore uses them verbatim.
    pub machine_args: Vec<String>,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub disk_mib: u64,
    pub egress: bool,
    pub memory: MemoryFormat,
    /// Whether the VM was on a tap device in its own namespace (QEMU saves user-mode
    /// networking's state, so a snapshot restores only into the same kind of network).
    #[serde(default)]
    pub isolated_network: bool,
    /// Volume slots: each has its image in the snapshot as `volume-<lun>.img`.
    #[serde(default)]
    pub volumes: Vec<VolumeSlot>,
}

/// A volume attached when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSlot {
    pub lun: u8,
    pub read_only: bool,
}

/// A snapshot on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    manifest: SnapshotManifest,
}

impl Snapshot {
    /// Opens the snapshot in `dir`; fails if it is incomplete or of another layout.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, VmmError> {
        let dir = dir.into();
        let text = std::fs::read_to_string(dir.join("manifest.json")).map_err(|e| {
            VmmError::Snapshot(format!(
                "{} is not a complete snapshot (manifest.json: {e})",
                dir.display()
            ))
        })?;
        let manifest: SnapshotManifest = serde_json::from_str(&text).map_err(|e| {
            VmmError::Snapshot(format!("{}: unreadable manifest: {e}", dir.display()))
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(VmmError::Snapshot(format!(
                "{} has snapshot format {}, this build reads {FORMAT_VERSION}",
                dir.display(),
                manifest.format_version
            )));
        }
        Ok(Self { dir, manifest })
    }

    pub(crate) fn new(dir: PathBuf, manifest: SnapshotManifest) -> Self {
        Self { dir, manifest }
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it records.
    pub fn manifest(&self) -> &SnapshotManifest {
        &self.manifest
    }

    /// Bytes it occupies on disk (allocated, not apparent).
    pub fn disk_usage(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum()
    }

    /// Deletes it. Running VMs restored from it keep working: their mappings and open
    /// backing files outlive the names.
    pub fn delete(self) -> std::io::Result<()> {
        std::fs::remove_dir_all(&self.dir)
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub(crate) fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    pub(crate) fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    /// Checks that this host can restore it: same QEMU, kernel and accelerator.
    pub(crate) fn check_compatible(
        &self,
        qemu_version: &str,
        kernel_key: &str,
        accel: Accel,
        isolated_network: bool,
    ) -> Result<(), VmmError> {
        let m = &self.manifest;
        let mismatch = |what: &str, theirs: &str, ours: &str| {
            Err(VmmError::SnapshotMismatch(format!(
                "snapshot {} was taken with {what} {theirs}, this host has {ours}; restore it on a host with the same {what}, or take a new snapshot here",
                m.id
            )))
        };
        if m.isolated_network != isolated_network {
            let kind = |isolated| if isolated { "isolated" } else { "user-mode" };
            return mismatch(
                "network kind (--network)",
                kind(m.isolated_network),
                kind(isolated_network),
            );
        }
        if m.qemu_version != qemu_version {
            return mismatch("QEMU", &m.qemu_version, qemu_version);
        }
        if m.kernel_key != kernel_key {
            return mismatch("guest kernel", &m.kernel_key, kernel_key);
        }
        if m.accel != accel {
            return mismatch("accelerator", &m.accel.to_string(), &accel.to_string());
        }
        Ok(())
    }

    /// Writes the manifest last, atomically: before it, the snapshot does not exist.
    ///
    /// `durable`: every file of the snapshot, and the directory naming them, is flushed
    /// to disk before the manifest is written, and the directory again after its
    /// rename, so a manifest that survives a host crash never names data the crash lost.
    /// Without it (a snapshot that never outlives this boot of the host: scratch space
    /// published elsewhere, a fork's base) only the manifest itself is flushed.
    ///
    /// Blocking (fsync of GiB of memory and disk): async callers run it on a blocking
    /// thread.
    pub(crate) fn commit(&self, durable: bool) -> Result<(), VmmError> {
        if durable {
            sync_files(&self.dir).map_err(|e| {
                VmmError::Snapshot(format!(
                    "flushing the snapshot's files in {} to disk: {e}",
                    self.dir.display()
                ))
            })?;
        }
        let tmp = self.dir.join("manifest.json.tmp");
        let io = |e: std::io::Error| VmmError::Snapshot(format!("writing the manifest: {e}"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.manifest).expect("json"),
        )
        .map_err(io)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, self.dir.join("manifest.json")).map_err(io)?;
        if durable {
            sync_dir(&self.dir).map_err(io)?;
        }
        Ok(())
    }
}

/// Flushes every regular file directly in `dir` to disk, then `dir` itself (the names).
fn sync_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // The entry's own type: a link is not followed, and only regular files count.
        if !entry.file_type()?.is_file() {
            continue;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(entry.path())?
            .sync_all()?;
    }
    sync_dir(dir)
}

/// Flushes a directory's entries (names created, renamed or removed in it) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Copies `src` to `dst` preserving holes: only allocated ranges are read and written,
/// so a mostly untouched guest RAM file costs what the guest touched.
pub fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<u64> {
    // The source may sit where QEMU can write (a VM's memory file): never follow a
    // link or read a device or pipe as root.
    let from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)?;
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", src.display()),
        ));
    }
    let len = meta.len();
    let to = File::create(dst)?;
    to.set_len(len)?;
    let (ifd, ofd) = (from.as_raw_fd(), to.as_raw_fd());
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(ifd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(ifd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: offsets are valid pointers to our locals.
            let n = unsafe {
                libc::copy_file_range(
                    ifd,
                    &mut off_in,
                    ofd,
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                // Across filesystems (tmpfs to disk) some kernels refuse; copy by hand.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                ) {
                    copied += copy_range(&from, &to, off_in as u64, (hole - off_in) as u64)?;
                    break;
                }
                return Err(err);
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

/// Copies `len` bytes at `offset` from one file to the same offset in another.
fn copy_range(from: &File, to: &File, offset: u64, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = from.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let copied = copy_sparse(&src, &dst).unwrap();
        assert!(
            copied < 1 << 20,
            "copied {copied} bytes of a 64 MiB sparse file"
        );
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).unwrap());
        assert!(blocks * 512 < 1 << 20, "destination is not sparse");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_committed_snapshot_opens_with_its_files_and_no_temporary_manifest() {
        let dir = std::env::temp_dir().join(format!("snap-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), b"device state").unwrap();
        std::fs::write(dir.join("memory"), vec![1u8; 8192]).unwrap();
        // Not a file of the snapshot's own: skipped, not followed.
        std::os::unix::fs::symlink("/nonexistent", dir.join("link")).unwrap();
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            id: "snap-commit".into(),
            source_vm: "vm-x".into(),
            created_unix_ms: 0,
            qemu_version: "q".into(),
            accel: Accel::Tcg,
            kernel_key: "k".into(),
            rootfs: "base".into(),
            rootfs_image: "/nonexistent".into(),
            machine_args: Vec::new(),
            vcpus: 1,
            mem_mib: 512,
            disk_mib: 1024,
            egress: true,
            memory: MemoryFormat::File,
            isolated_network: false,
            volumes: Vec::new(),
        };
        for durable in [true, false] {
            let _ = std::fs::remove_file(dir.join("manifest.json"));
            Snapshot::new(dir.clone(), manifest.clone())
                .commit(durable)
                .unwrap();
            assert_eq!(Snapshot::open(&dir).unwrap().manifest(), &manifest);
            assert!(!dir.join("manifest.json.tmp").exists());
            assert_eq!(std::fs::read(dir.join("memory")).unwrap(), vec![1u8; 8192]);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn incomplete_snapshots_are_refused() {
        let dir = std::env::temp_dir().join(format!("snap-incomplete-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), b"x").unwrap();
        let err = Snapshot::open(&dir).unwrap_err().to_string();
        assert!(err.contains("not a complete snapshot"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
