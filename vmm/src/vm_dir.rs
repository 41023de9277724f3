//! The per-VM directory: every file a VM owns (sockets, console log, memory files)
//! lives in one directory, removed with the VM; its disk overlay lives on the state disk
//! ([`DiskFile`]): the run directory is memory (tmpfs), and what a guest writes to its
//! disk must not cost the host memory.
//!
//! The directory records the owning process, so a directory left behind by an owner that
//! died without cleaning up (a test killed on timeout, a crashed daemon) is found and
//! removed, and its QEMU killed, the next time any owner starts ([`reap_orphans`]).

use std::path::{Path, PathBuf};

const OWNER_FILE: &str = "owner.pid";
const QEMU_PID_FILE: &str = "qemu.pid";

/// A VM's directory. Removed on drop.
#[derive(Debug)]
pub struct VmDir {
    path: PathBuf,
    /// Left in place on drop (the VM was released to a later owner).
    keep: bool,
}

impl VmDir {
    /// Creates `run_dir/id`, recording this process as its owner.
    pub fn create(run_dir: &Path, id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        let path = run_dir.join(id);
        std::fs::create_dir(&path)?;
        let dir = Self { path, keep: false };
        std::fs::write(
            dir.path.join(OWNER_FILE),
            process_identity(std::process::id())?,
        )?;
        Ok(dir)
    }

    /// Becomes the owner of an existing VM directory (adopting its VM).
    pub fn take_over(path: &Path) -> std::io::Result<Self> {
        std::fs::write(path.join(OWNER_FILE), process_identity(std::process::id())?)?;
        Ok(Self {
            path: path.to_path_buf(),
            keep: false,
        })
    }

    /// Leaves the directory in place when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Records the QEMU process serving this directory.
    pub fn record_qemu(&self, pid: u32) -> std::io::Result<()> {
        std::fs::write(self.file(QEMU_PID_FILE), pid.to_string())
    }
}

/// A VM's disk overlay, `DISK_DIR/<vm id>.qcow2` on the state disk. Its path is always
/// derived from the VM's ID, never read from the VM directory (QEMU can write there).
/// Removed on drop.
#[derive(Debug)]
pub struct DiskFile {
    path: PathBuf,
    keep: bool,
}

impl DiskFile {
    /// The overlay of VM `id` under `disk_dir` (made, mode 0711, if missing: the VM user
    /// opens its own file by name, and lists nothing).
    pub fn for_vm(disk_dir: &Path, id: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if !is_vm_id(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{id:?} is not a VM ID"),
            ));
        }
        if !disk_dir.is_dir() {
            std::fs::create_dir_all(disk_dir)?;
            std::fs::set_permissions(disk_dir, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(Self {
            path: disk_dir.join(format!("{id}.qcow2")),
            keep: false,
        })
    }

    /// The overlay's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the file in place on drop (the VM was released to a later owner).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `id` is one [`crate::qemu`] makes (`vm-` and hex digits): safe in a path.
pub fn is_vm_id(id: &str) -> bool {
    id.strip_prefix("vm-")
        .is_some_and(|h| !h.is_empty() && h.len() <= 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
        // The run dir goes too once its last VM is gone; a racing create retries.
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `pid` plus its start time, so a recycled PID is not mistaken for the owner.
fn process_identity(pid: u32) -> std::io::Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Field 22 (starttime) counted after the ")" that ends the command name.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let start = after.split_whitespace().nth(19).unwrap_or("0");
    Ok(format!("{pid} {start}"))
}

fn owner_alive(identity: &str) -> bool {
    let Some(pid) = identity
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
    else {
        return false;
    };
    process_identity(pid)
        .map(|now| now == identity.trim())
        .unwrap_or(false)
}

/// Kills the QEMU of, and removes, every VM directory in `run_dir` whose owner is gone,
/// with its disk overlay in `disk_dir`. Returns how many were reaped.
pub fn reap_orphans(run_dir: &Path, disk_dir: Option<&Path>, keep: &[PathBuf]) -> usize {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if keep.contains(&dir) {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap_or_default();
        if owner.is_empty() || owner_alive(&owner) {
            // No owner file yet: a VM being created right now.
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(dir.join(QEMU_PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // Only kill the PID if it still is the QEMU of this directory.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        tracing::warn!(dir = %dir.display(), "removing a VM directory whose owner is gone");
        let _ = std::fs::remove_dir_all(&dir);
        let id = dir.file_name().unwrap_or_default().to_string_lossy();
        if let Some(disks) = disk_dir.filter(|_| is_vm_id(&id)) {
            let _ = std::fs::remove_file(disks.join(format!("{id}.qcow2")));
        }
        reaped += 1;
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_is_removed_on_drop_with_its_parent_when_empty() {
        let base = std::env::temp_dir().join(format!("vmdir-test-{}", std::process::id()));
        let run = base.join("run");
        {
            let d = VmDir::create(&run, "vm1").unwrap();
            std::fs::write(d.file("x"), "y").unwrap();
            assert!(d.path().is_dir());
        }
        assert!(!run.exists());
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn orphans_of_dead_owners_are_reaped_live_ones_kept() {
        let run = std::env::temp_dir().join(format!("vmdir-orphans-{}", std::process::id()));
        let live = VmDir::create(&run, "live").unwrap();
        std::fs::create_dir_all(run.join("dead")).unwrap();
        // PID 1 exists but with another start time than recorded: a dead owner.
        std::fs::write(run.join("dead").join(OWNER_FILE), "1 123456789").unwrap();
        assert_eq!(reap_orphans(&run, None, &[]), 1);
        assert!(!run.join("dead").exists());
        assert!(live.path().exists());
        drop(live);
    }
}
