//! Growing the root filesystem to fill its disk.
//!
//! Every image's ext4 is only as large as its contents; the VM's disk (a qcow2 overlay)
//! has the size the sandbox asked for. The agent grows the mounted filesystem online, as
//! `resize2fs` would, with the `EXT4_IOC_RESIZE_FS` ioctl: no tool needed in the image.

use std::os::fd::AsRawFd;

/// `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
const ROOT_DEVICE: &str = "vda";

/// Grows `/` to the size of its block device if the device is larger.
pub fn grow() -> Result<Option<u64>, String> {
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{ROOT_DEVICE}/size"))
        .map_err(|e| format!("reading the size of /dev/{ROOT_DEVICE}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("size of /dev/{ROOT_DEVICE}: {e}"))?;
    let root = std::fs::File::open("/").map_err(|e| format!("open /: {e}"))?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(root.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("statfs /: {}", std::io::Error::last_os_error()));
    }
    let block = st.f_bsize as u64;
    let want = sectors * 512 / block;
    let have = st.f_blocks as u64;
    // f_blocks excludes metadata overhead, so compare with slack.
    if want <= have + have / 20 + 1024 {
        return Ok(None);
    }
    // SAFETY: the ioctl reads one u64 through the pointer.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want as *const u64) };
    if rc != 0 {
        return Err(format!(
            "growing / to {want} blocks: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some(want * block))
}
