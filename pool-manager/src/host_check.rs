//! The host check (`nullspace-pool-manager check`, and the first thing `serve` does):
//! whether this machine can run VMs, one line per thing the daemon relies on, each ✓ or
//! ✗ with the fix. A fatal ✗ stops `serve` before it listens, so a broken host fails at
//! once instead of answering every create with a 500.

use std::path::{Path, PathBuf};

/// How VMs are networked (`--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// Isolated where the host can; a host that cannot is an error (never a silent
    /// fall back to user-mode networking).
    Auto,
    /// Each VM in its own namespace behind the egress proxy.
    Isolated,
    /// QEMU's user-mode network, restricted: guests are offline. Only by name.
    User,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "isolated" => Ok(Self::Isolated),
            "user" => Ok(Self::User),
            other => Err(format!("--network {other}: send auto, isolated or user")),
        }
    }
}

/// What the check looks at.
#[derive(Debug, Clone)]
pub struct HostCheckInput {
    pub qemu_binary: PathBuf,
    pub accel: vmm::AccelChoice,
    pub network: NetworkMode,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub min_free_disk_mib: u64,
    /// `--insecure-unconfined-qemu`: QEMU as root, without seccomp or without cgroups is
    /// not fatal.
    pub allow_unconfined: bool,
}

/// One line of the check.
#[derive(Debug, Clone)]
pub struct CheckLine {
    /// What was checked.
    pub name: &'static str,
    /// What was found.
    pub detail: String,
    /// `None`: fine. `Some(fix)`: wrong, and what to do about it.
    pub fix: Option<String>,
    /// Whether a VM cannot run (or a built-in template cannot be made) without it.
    pub fatal: bool,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fix {
            None => write!(f, "✓ {}: {}", self.name, self.detail),
            Some(fix) => write!(
                f,
                "✗ {}: {} — fix: {fix}{}",
                self.name,
                self.detail,
                if self.fatal { "" } else { " (not fatal)" }
            ),
        }
    }
}

/// Every line of the check.
#[derive(Debug, Clone)]
pub struct HostCheck {
    pub lines: Vec<CheckLine>,
}

impl HostCheck {
    /// The lines that stop `serve`.
    pub fn fatal(&self) -> impl Iterator<Item = &CheckLine> {
        self.lines.iter().filter(|l| l.fatal && l.fix.is_some())
    }

    /// Every line, one per row.
    pub fn report(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    }
}

fn ok(name: &'static str, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        name,
        detail: detail.into(),
        fix: None,
        fatal: false,
    }
}

fn bad(
    name: &'static str,
    detail: impl Into<String>,
    fix: impl Into<String>,
    fatal: bool,
) -> CheckLine {
    CheckLine {
        name,
        detail: detail.into(),
        fix: Some(fix.into()),
        fatal,
    }
}

use vmm::qemu::first_line_of as first_line;

/// The `X.Y.Z` after "version" in a `--version` line.
fn version_in(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "version")?;
    words.next()
}

/// Runs every check. Takes a second or less: no VM is booted (the accelerator probe
/// runs when `serve` starts the driver).
pub fn run(input: &HostCheckInput) -> HostCheck {
    let mut lines = Vec::new();
    let install =
        "run deploy/install-deps.sh (it installs qemu-system-x86 and qemu-utils of one version)";

    let qemu = first_line(&input.qemu_binary, "--version");
    lines.push(match &qemu {
        Ok(v) => ok("QEMU", v.clone()),
        Err(e) => bad(
            "QEMU",
            e.clone(),
            format!("{install}, or set NULLSPACE_QEMU"),
            true,
        ),
    });
    let img = first_line(Path::new("qemu-img"), "--version");
    // A QEMU of the operator's own (NULLSPACE_QEMU) may differ from Debian's qemu-img.
    let own_qemu = std::env::var_os("NULLSPACE_QEMU").is_some();
    lines.push(match (&qemu, &img) {
        (_, Err(e)) => bad("qemu-img", e.clone(), install, true),
        (Ok(q), Ok(i)) if !own_qemu && version_in(q) != version_in(i) => bad(
            "qemu-img",
            format!("{i}, but QEMU is {}", version_in(q).unwrap_or("unknown")),
            install,
            true,
        ),
        (_, Ok(i)) => ok("qemu-img", i.clone()),
    });

    lines.push(accelerator(input.accel));

    // Running as root with no VM account would run QEMU as root: fatal. Not root at
    // all (a developer's `--network user`) is only reported.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    lines.push(match vmm::qemu::check_vm_user() {
        Ok(who) => ok("VM user", format!("QEMU runs as {who}")),
        Err(e) => bad(
            "VM user",
            e,
            "run deploy/install-deps.sh as root",
            root && !input.allow_unconfined,
        ),
    });
    lines.push(if vmm::qemu::seccomp_available(&input.qemu_binary) {
        ok("seccomp", "QEMU runs under -sandbox")
    } else {
        bad(
            "seccomp",
            "this kernel has no seccomp or this QEMU no -sandbox: a guest escaping QEMU would own the host",
            "use Debian's qemu-system-x86 on a kernel with seccomp, or accept the risk with --insecure-unconfined-qemu",
            !input.allow_unconfined,
        )
    });

    lines.push(
        if vmm::qemu::maps_read_only_files_private(&input.qemu_binary) {
            ok(
                "template memory",
                "read-only to VMs (QEMU maps it copy-on-write with rom=off)",
            )
        } else {
            bad(
                "template memory",
                "this QEMU opens a template's memory file read-write to map it copy-on-write, so the file is group-writable by VMs (a guest that escapes QEMU could alter later restores)",
                "use QEMU 8.2 or later (Debian: qemu-system-x86 from bookworm-backports)",
                false,
            )
        },
    );
    // Without it live migrations into this host are pre-copy only (a soft line).
    lines.push(match vmm::qemu::postcopy_access() {
        Ok(_) => ok(
            "post-copy",
            "incoming live migrations' QEMU opens /dev/userfaultfd (group nullspace-uffd)",
        ),
        Err(why) => bad(
            "post-copy",
            format!("live migrations into this host are pre-copy only: {why}"),
            "run deploy/install-deps.sh",
            false,
        ),
    });
    lines.push(match vmm::cgroup::Cgroups::detect() {
        Ok(c) => ok(
            "cgroups",
            format!("{}: each VM's memory, CPU, threads and I/O limited", c.describe()),
        ),
        Err(e) => bad(
            "cgroups",
            format!("{e}: a guest could take all of the host's memory and CPU"),
            "run as root on a host with cgroup v2 (or v1 memory, cpu, pids) mounted, or accept the risk with --insecure-unconfined-qemu",
            !input.allow_unconfined,
        ),
    });

    lines.extend(network(input.network));

    for (name, dir) in [("state dir", &input.state_dir), ("run dir", &input.run_dir)] {
        lines.push(match directory(dir) {
            Ok(detail) => ok(name, detail),
            Err((detail, fix)) => bad(name, detail, fix, true),
        });
    }

    lines.push(match vmm::ImageSet::from_env() {
        Ok(set) => match set.rootfs("base").and(set.rootfs("minimal")) {
            Ok(_) => ok("guest images", set.dir().display().to_string()),
            Err(e) => bad("guest images", e.to_string(), "run deploy/build.sh", true),
        },
        Err(e) => bad("guest images", e.to_string(), "run deploy/build.sh", true),
    });

    lines.push(memory());
    lines.push(disk(&input.state_dir, input.min_free_disk_mib));

    lines.push(match first_line(Path::new("mkfs.ext4"), "-V") {
        Ok(_) => ok("mkfs.ext4", "formats volumes"),
        Err(e) => bad(
            "mkfs.ext4",
            e,
            "apt-get install e2fsprogs (volumes need it)",
            false,
        ),
    });
    HostCheck { lines }
}

fn accelerator(choice: vmm::AccelChoice) -> CheckLine {
    use vmm::{Accel, AccelChoice};
    let device = vmm::accel::kvm_device_usable().and(vmm::qemu::check_vm_user_kvm());
    match (choice, device) {
        (AccelChoice::Fixed(Accel::Tcg), _) => ok("accelerator", "TCG (NULLSPACE_ACCEL=tcg)"),
        (AccelChoice::Fixed(Accel::Kvm), Ok(())) => ok("accelerator", "KVM (NULLSPACE_ACCEL=kvm)"),
        (AccelChoice::Fixed(Accel::Kvm), Err(e)) => bad(
            "accelerator",
            format!("KVM was asked for but {e}"),
            "give the host a usable /dev/kvm (deploy/install-deps.sh sets root:kvm 0660), or set NULLSPACE_ACCEL=auto",
            true,
        ),
        (AccelChoice::Auto, Ok(())) => ok(
            "accelerator",
            "/dev/kvm opens; KVM if a guest boots under it at start, else TCG",
        ),
        (AccelChoice::Auto, Err(e)) => bad(
            "accelerator",
            format!("{e}: VMs run under TCG (software, several times slower)"),
            "give the host a usable /dev/kvm (deploy/install-deps.sh sets root:kvm 0660)",
            false,
        ),
    }
}

fn network(mode: NetworkMode) -> Vec<CheckLine> {
    if mode == NetworkMode::User {
        return vec![bad(
            "network",
            "user-mode networking (--network user): every guest is offline and egress policies cannot be enforced",
            "--network auto on a host with /dev/net/tun, ip and nft",
            false,
        )];
    }
    let fix = "run deploy/install-deps.sh as root (iproute2, nftables), modprobe tun";
    let nft = match first_line(Path::new("nft"), "--version") {
        Ok(v) => ok("nftables", v),
        Err(e) => bad("nftables", e, "apt-get install nftables", true),
    };
    let tap = match vmm::net::GuestNet::check_host()
        .and_then(|()| vmm::net::GuestNet::create().map_err(|e| e.to_string()))
    {
        Ok(_) => ok(
            "tap",
            "a VM namespace with its tap and rules was made (QEMU is handed the tap's descriptor; it never opens /dev/net/tun)",
        ),
        Err(e) => bad("tap", format!("cannot isolate a VM: {e}"), fix, true),
    };
    vec![tap, nft]
}

/// A directory the daemon writes and QEMU (as the VM user) reads under.
fn directory(dir: &Path) -> Result<String, (String, String)> {
    std::fs::create_dir_all(dir).map_err(|e| {
        (
            format!("{}: {e}", dir.display()),
            "create it, or choose another with --state-dir / NULLSPACE_RUN_DIR".to_string(),
        )
    })?;
    let probe = dir.join(format!(".host-check-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| {
        (
            format!("{} is not writable: {e}", dir.display()),
            format!("make {} writable by the pool manager", dir.display()),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    vmm::qemu::check_vm_user_can_reach(dir).map_err(|e| {
        (
            e,
            format!("chmod o+x {} (and each directory above it)", dir.display()),
        )
    })?;
    Ok(format!(
        "{} (writable; the VM user can reach it)",
        dir.display()
    ))
}

fn memory() -> CheckLine {
    let available = crate::sandboxes::meminfo_kib("MemAvailable").map(|kib| kib / 1024);
    match available {
        None => bad(
            "memory",
            "/proc/meminfo has no MemAvailable",
            "run on Linux 3.14 or later",
            false,
        ),
        // Never fatal: a host restarting with its VMs kept (their memory is not
        // "available") must still start and adopt them.
        Some(mib) if mib < 512 => bad(
            "memory",
            format!("{mib} MiB available: not enough for a new VM and its template"),
            "free memory (stop other services) or add memory",
            false,
        ),
        Some(mib) if mib < 2048 => bad(
            "memory",
            format!("{mib} MiB available: only a few small VMs fit"),
            "free memory or add memory",
            false,
        ),
        Some(mib) => ok("memory", format!("{mib} MiB available")),
    }
}

fn disk(state_dir: &Path, min_free_mib: u64) -> CheckLine {
    match crate::sandboxes::free_bytes(state_dir) {
        Err(e) => bad("disk", format!("{}: {e}", state_dir.display()), "check the state directory", false),
        Ok(bytes) if bytes / (1024 * 1024) < min_free_mib => bad(
            "disk",
            format!(
                "{} MiB free under {}, below --min-free-disk-mib {min_free_mib}: snapshots will be refused",
                bytes / (1024 * 1024),
                state_dir.display()
            ),
            "free disk space, or lower --min-free-disk-mib",
            false,
        ),
        Ok(bytes) => ok(
            "disk",
            format!("{} MiB free under {}", bytes / (1024 * 1024), state_dir.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_version_lines() {
        assert_eq!(
            version_in("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some("7.2.22")
        );
        assert_eq!(
            version_in("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some("10.0.2")
        );
        assert_eq!(version_in("nothing here"), None);
    }

    #[test]
    fn a_line_names_the_fix_and_whether_it_is_fatal() {
        let line = bad("qemu-img", "missing", "apt-get install qemu-utils", true);
        assert_eq!(
            line.to_string(),
            "✗ qemu-img: missing — fix: apt-get install qemu-utils"
        );
        let soft = bad("memory", "little", "add memory", false);
        assert!(soft.to_string().ends_with("(not fatal)"), "{soft}");
        assert_eq!(ok("QEMU", "7.2").to_string(), "✓ QEMU: 7.2");
        let check = HostCheck {
            lines: vec![line, soft, ok("QEMU", "7.2")],
        };
        assert_eq!(check.fatal().count(), 1);
    }

    #[test]
    fn a_missing_qemu_is_fatal_with_its_fix() {
        let check = run(&HostCheckInput {
            qemu_binary: "/nonexistent/qemu-system-x86_64".into(),
            accel: vmm::AccelChoice::Fixed(vmm::Accel::Tcg),
            network: NetworkMode::User,
            state_dir: std::env::temp_dir().join(format!("host-check-{}", std::process::id())),
            run_dir: std::env::temp_dir().join(format!("host-check-run-{}", std::process::id())),
            min_free_disk_mib: 0,
            allow_unconfined: false,
        });
        let qemu = check.lines.iter().find(|l| l.name == "QEMU").unwrap();
        assert!(
            qemu.fatal && qemu.fix.as_deref().unwrap().contains("install-deps"),
            "{qemu}"
        );
        assert!(check.fatal().any(|l| l.name == "QEMU"));
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("host-check-{}", std::process::id())),
        );
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("host-check-run-{}", std::process::id())),
        );
    }
}
