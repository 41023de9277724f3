//! Each VM's QEMU runs as a user and group of its own, after Firecracker's jailer: a
//! guest that escapes into its QEMU can neither signal, trace nor read the files of
//! another VM's QEMU, nor write what the daemon keeps.
//!
//! IDs come from a fixed range no account uses ([`UID_BASE`], [`UID_COUNT`]). A VM
//! claims one by creating `/run/nullspace/vm-uids/<uid>` (exclusively, so two
//! daemons on one host never share an ID) holding its VM directory; the claim goes
//! with the VM. The group is the same number. Files every VM may read (template
//! snapshots, guest images) are shared through the `nullspace-vm` group, which each
//! VM's QEMU keeps as a supplementary group (with `kvm`).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The first ID VMs run as.
pub const UID_BASE: u32 = 1_600_000_000;
/// How many IDs VMs may run as.
pub const UID_COUNT: u32 = 1_000_000;
/// Where claims live: on tmpfs, so a reboot (which ends every VM) frees them all.
pub const CLAIMS_DIR: &str = "/run/nullspace/vm-uids";

/// Whether `uid` is one VMs run as.
pub fn is_vm_uid(uid: u32) -> bool {
    (UID_BASE..UID_BASE + UID_COUNT).contains(&uid)
}

/// A claimed VM user ID; the claim is released on drop unless kept.
#[derive(Debug)]
pub struct VmUid {
    uid: u32,
    claim: PathBuf,
    keep: bool,
}

impl VmUid {
    /// Claims a free ID for the VM in `vm_dir` (VM `id`), starting from one derived
    /// from the ID so that most claims succeed at the first try.
    pub fn claim(claims_dir: &Path, vm_dir: &Path, id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(claims_dir)?;
        // One claimer at a time on this host (a stale claim is checked and replaced in
        // two steps); released when `_lock` closes.
        let _lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(claims_dir.join(".lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&_lock), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let start = id
            .strip_prefix("vm-")
            .and_then(|h| u64::from_str_radix(&h[h.len().saturating_sub(15)..], 16).ok())
            .unwrap_or(0);
        for i in 0..UID_COUNT as u64 {
            let uid = UID_BASE + ((start + i) % UID_COUNT as u64) as u32;
            let claim = claims_dir.join(uid.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&claim)
            {
                Ok(mut f) => {
                    f.write_all(vm_dir.as_os_str().as_bytes())?;
                    return Ok(Self {
                        uid,
                        claim,
                        keep: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A claim whose VM directory is gone and whose ID no process runs
                    // as was left by an owner that died: take it over.
                    let holder = std::fs::read(&claim).unwrap_or_default();
                    let holder = Path::new(std::ffi::OsStr::from_bytes(&holder));
                    if !holder.exists() && !uid_in_use(uid) {
                        // Under the lock: no other claimer is between its check and
                        // its claim.
                        let _ = std::fs::remove_file(&claim);
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&claim)
                        {
                            f.write_all(vm_dir.as_os_str().as_bytes())?;
                            return Ok(Self {
                                uid,
                                claim,
                                keep: false,
                            });
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "all {UID_COUNT} VM user IDs are claimed under {}",
            claims_dir.display()
        )))
    }

    /// The claim of a VM a previous owner started, to be released with it.
    pub fn adopted(claims_dir: &Path, uid: u32) -> Self {
        Self {
            uid,
            claim: claims_dir.join(uid.to_string()),
            keep: false,
        }
    }

    /// The ID (user and group).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Keeps the claim on drop (the VM goes on under a later owner).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for VmUid {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.claim);
        }
    }
}

/// Whether any process runs as `uid` (real or effective).
fn uid_in_use(uid: u32) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .any(|e| {
            std::fs::read_to_string(e.path().join("status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .map(|u| u.split_whitespace().take(2).any(|x| x.parse() == Ok(uid)))
                })
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_and_released() {
        let dir = std::env::temp_dir().join(format!("vm-uids-{}", std::process::id()));
        let here = std::env::temp_dir();
        let a = VmUid::claim(&dir, &here, "vm-00000000000000aa").unwrap();
        // The same starting point: the next free ID.
        let b = VmUid::claim(&dir, &here, "vm-00000000000000aa").unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(is_vm_uid(a.uid()) && is_vm_uid(b.uid()));
        let a_uid = a.uid();
        drop(a);
        let c = VmUid::claim(&dir, &here, "vm-00000000000000aa").unwrap();
        assert_eq!(c.uid(), a_uid, "a released ID is claimed again");
        // A claim whose VM directory is gone is stale.
        std::fs::write(dir.join((a_uid + 7).to_string()), "/nonexistent/vm-dir").unwrap();
        let start = format!("vm-{:016x}", (a_uid + 7 - UID_BASE) as u64);
        let d = VmUid::claim(&dir, &here, &start).unwrap();
        assert_eq!(d.uid(), a_uid + 7);
        drop((b, c, d));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
