//! The per-VM directory: every file a VM owns (sockets, console log, memory files)
//! lives in one directory, removed with the VM; its disk overlay lives on the state disk
//! ([`DiskFile`]): the run directory is memory (tmpfs), and what a guest writes to its
//! disk must not cost the host memory.
//!
//! The directory records the owning process, so a directory left behind by an owner that
//! died without cleaning up (a test killed on timeout, a crashed daemon) is found and
//! removed, and its QEMU killed, the next time any owner starts ([`reap_orphans`]).
//!
//! QEMU (the VM user) can create files in the directory, so what the daemon reads back
//! from it is never trusted by name: its own records ([`DAEMON_FILES`]) are written
//! only through a name QEMU did not make first, and read only if they are regular
//! files (no links followed) owned by the daemon's user. The directory is the
//! daemon's, sticky and group-writable for the VM user, so QEMU can neither replace
//! nor remove them.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const OWNER_FILE: &str = "owner.pid";
const QEMU_PID_FILE: &str = "qemu.pid";
/// The launch record ([`crate::qemu`]): how to adopt the VM after a restart.
pub const LAUNCH_RECORD: &str = "launch.json";
/// The files in a VM directory only the daemon writes: never handed to the VM user.
pub const DAEMON_FILES: &[&str] = &[OWNER_FILE, QEMU_PID_FILE, LAUNCH_RECORD];
/// The most a daemon file may hold.
const DAEMON_FILE_MAX: u64 = 1 << 20;

/// Writes the daemon's file `name` in `dir`: a new file, or (`replace`) one that is
/// already the daemon's. Never through a link or a file another user made.
pub fn write_daemon_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    replace: bool,
) -> std::io::Result<()> {
    let path = dir.join(name);
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if replace && e.kind() == std::io::ErrorKind::AlreadyExists => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            ours(&f.metadata()?, &path)?;
            f.set_len(0)?;
            f
        }
        Err(e) => return Err(e),
    };
    f.write_all(bytes)
}

/// Reads the daemon's file `name` in `dir`, refusing a link, a non-regular file, one
/// another user owns (QEMU made it) or one over a megabyte.
pub fn read_daemon_file(dir: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)?;
    let meta = f.metadata()?;
    ours(&meta, &path)?;
    if meta.len() > DAEMON_FILE_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is {} bytes: not the daemon's",
                path.display(),
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    f.take(DAEMON_FILE_MAX).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Fails unless `meta` is a regular file owned by this process's user.
fn ours(meta: &std::fs::Metadata, path: &Path) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a regular file of uid {me} (uid {}): not trusted",
                path.display(),
                meta.uid()
            ),
        ));
    }
    Ok(())
}

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
        write_daemon_file(
            &dir.path,
            OWNER_FILE,
            process_identity(std::process::id())?.as_bytes(),
            false,
        )?;
        Ok(dir)
    }

    /// Becomes the owner of an existing VM directory (adopting its VM).
    pub fn take_over(path: &Path) -> std::io::Result<Self> {
        write_daemon_file(
            path,
            OWNER_FILE,
            process_identity(std::process::id())?.as_bytes(),
            true,
        )?;
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
        write_daemon_file(&self.path, QEMU_PID_FILE, pid.to_string().as_bytes(), true)
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
        let text = |name| {
            read_daemon_file(&dir, name)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let owner = text(OWNER_FILE);
        if owner.is_empty() || owner_alive(&owner) {
            // No owner file yet: a VM being created right now.
            continue;
        }
        if let Some(pid) = Some(text(QEMU_PID_FILE)).and_then(|p| p.trim().parse::<i32>().ok()) {
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
        // A record another user wrote is not trusted: its directory is left alone.
        std::fs::create_dir_all(run.join("forged")).unwrap();
        std::fs::write(run.join("forged").join(OWNER_FILE), "1 123456789").unwrap();
        std::os::unix::fs::chown(run.join("forged").join(OWNER_FILE), Some(65534), None).unwrap();
        assert_eq!(reap_orphans(&run, None, &[]), 1);
        assert!(!run.join("dead").exists());
        assert!(run.join("forged").exists());
        assert!(live.path().exists());
        drop(live);
        let _ = std::fs::remove_dir_all(&run);
    }
}
