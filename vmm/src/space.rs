//! The free-space guard: nothing the daemon starts may fill a file system it writes.
//! A VM is refused (with [`VmmError::NoSpace`], which says how much is free and what to
//! do) unless its disk directory keeps the reserve free and its run directory (memory:
//! tmpfs) has room for its RAM plus the reserve.

use crate::VmmError;
use std::path::Path;

/// Bytes free for unprivileged use on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the struct we pass; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Fails with [`VmmError::NoSpace`] unless `dir` (or its nearest existing ancestor) has
/// `need` bytes free on top of `reserve`. `what` names the directory's use.
pub fn ensure(dir: &Path, need: u64, reserve: u64, what: &str) -> Result<(), VmmError> {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    let free = free_bytes(existing)
        .map_err(|e| VmmError::Host(format!("checking free space under {}: {e}", dir.display())))?;
    if free < need.saturating_add(reserve) {
        return Err(VmmError::NoSpace(format!(
            "{} ({what}) has {} MiB free; this VM needs {} MiB and {} MiB must stay free; free space there (end sandboxes, delete snapshots) or lower the reserve (--min-free-disk-mib)",
            dir.display(),
            free >> 20,
            need >> 20,
            reserve >> 20
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_reserve_and_names_the_directory() {
        let tmp = std::env::temp_dir();
        assert!(ensure(&tmp, 0, 0, "scratch").is_ok());
        let missing = tmp.join("not-yet-made/below");
        assert!(
            ensure(&missing, 0, 0, "scratch").is_ok(),
            "an ancestor is measured"
        );
        let e = ensure(&tmp, u64::MAX / 2, 1 << 20, "scratch").unwrap_err();
        assert!(matches!(e, VmmError::NoSpace(_)));
        assert!(e.to_string().contains("scratch"), "{e}");
    }
}
