//! Choosing the accelerator: KVM only where a standard guest really boots under it.
//!
//! `/dev/kvm` existing is not enough: on PVM-backed hosts it opens fine and a stock
//! kernel then hangs during boot. So auto-detection boots our own minimal image under
//! KVM with a short deadline and falls back to TCG if the agent does not answer. The
//! result is cached per host boot and image set, since the probe costs seconds.

use crate::VmmError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How guest instructions are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The configured accelerator: detected, or forced by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe (KVM if a guest boots under it, else TCG).
    #[default]
    Auto,
    /// Use this one, no probe.
    Fixed(Accel),
}

impl FromStr for AccelChoice {
    type Err = VmmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Fixed(Accel::Kvm)),
            "tcg" => Ok(Self::Fixed(Accel::Tcg)),
            other => Err(VmmError::InvalidSpec(format!(
                "unknown accelerator '{other}'; send auto, kvm or tcg"
            ))),
        }
    }
}

/// The outcome of detection, with the reason for people reading logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    pub accel: Accel,
    pub reason: String,
}

/// Whether `/dev/kvm` can be opened for use; the error says why not.
pub fn kvm_device_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Whether a failed KVM probe says something about KVM on this host (worth caching
/// for the rest of the host's boot): the guest started and never answered (the hang
/// seen on PVM-backed hosts), or QEMU itself failed in KVM (it said so in its log, as
/// "failed to set MSR" on some nested hosts). Anything else (a missing tool, a
/// directory QEMU cannot write) is the host's configuration, fixed without a reboot.
pub(crate) fn is_verdict_about_kvm(e: &VmmError) -> bool {
    match e {
        VmmError::Boot {
            reason, qemu_log, ..
        } => {
            let log = qemu_log.to_ascii_lowercase();
            // QEMU that could not open /dev/kvm also names it: that is the host's
            // configuration (its mode, the VM user's groups), not KVM's verdict.
            let cannot_open = ["permission denied", "no such file", "could not access kvm"]
                .iter()
                .any(|m| log.contains(m));
            matches!(**reason, VmmError::Timeout(_) | VmmError::Agent(_))
                || (log.contains("kvm") && !cannot_open)
        }
        _ => false,
    }
}

/// Key of a cached detection: the host boot and the image set probed.
pub(crate) fn cache_key(image_key: &str) -> String {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}:{image_key}", boot_id.trim())
}

#[derive(Serialize, Deserialize)]
struct CachedDetection {
    key: String,
    detection: Detection,
}

pub(crate) fn load_cached(path: &std::path::Path, key: &str) -> Option<Detection> {
    let text = std::fs::read_to_string(path).ok()?;
    let cached: CachedDetection = serde_json::from_str(&text).ok()?;
    (cached.key == key).then_some(cached.detection)
}

pub(crate) fn store_cached(path: &std::path::Path, key: &str, detection: &Detection) {
    let cached = CachedDetection {
        key: key.to_string(),
        detection: detection.clone(),
    };
    let tmp = path.with_extension("tmp");
    if std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new("/"))).is_ok()
        && std::fs::write(&tmp, serde_json::to_vec(&cached).expect("json")).is_ok()
    {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_of_the_guest_or_of_kvm_are_verdicts() {
        let boot = |reason: VmmError, qemu_log: &str| VmmError::Boot {
            reason: Box::new(reason),
            console: String::new(),
            qemu_log: qemu_log.into(),
        };
        let hung = boot(VmmError::Agent("handshake timed out".into()), "");
        assert!(is_verdict_about_kvm(&hung));
        let msr = boot(
            VmmError::Exited("signal 6".into()),
            "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed",
        );
        assert!(is_verdict_about_kvm(&msr));
        let tun = boot(
            VmmError::Exited("exit status: 1".into()),
            "could not open /dev/net/tun: Permission denied",
        );
        assert!(!is_verdict_about_kvm(&tun));
        let no_access = boot(
            VmmError::Exited("exit status: 1".into()),
            "Could not access KVM kernel module: Permission denied\nqemu-system-x86_64: failed to initialize kvm: Permission denied",
        );
        assert!(!is_verdict_about_kvm(&no_access));
        let no_img =
            VmmError::Host("qemu-img create failed: running qemu-img: No such file".into());
        assert!(!is_verdict_about_kvm(&no_img));
    }

    #[test]
    fn parses_choices_and_rejects_unknown_ones() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!(
            "KVM".parse::<AccelChoice>().unwrap(),
            AccelChoice::Fixed(Accel::Kvm)
        );
        let err = "hvf".parse::<AccelChoice>().unwrap_err().to_string();
        assert!(err.contains("send auto, kvm or tcg"), "{err}");
    }

    #[test]
    fn cached_detection_is_used_only_for_the_same_key() {
        let path = std::env::temp_dir().join(format!("accel-cache-{}.json", std::process::id()));
        let d = Detection {
            accel: Accel::Tcg,
            reason: "probe".into(),
        };
        store_cached(&path, "k1", &d);
        assert_eq!(load_cached(&path, "k1"), Some(d));
        assert_eq!(load_cached(&path, "k2"), None);
        let _ = std::fs::remove_file(path);
    }
}
