//! Per-VM control groups: the host's limits on one QEMU process, held by the kernel
//! whatever the guest (or a QEMU it has taken over) does.
//!
//! Each VM gets `<hierarchy>/nullspace/<vm id>` with
//! - memory: guest RAM plus [`overhead_mib`] (QEMU itself, its device queues and, under
//!   TCG, translated code); swap counted too where the kernel accounts it, so swapping
//!   is no way around the limit. Past it the kernel reclaims, then kills that QEMU only.
//! - CPU: at most its vCPUs' worth of time per period, and a weight by vCPU count, so
//!   busy guests share the host in proportion to what they were given.
//! - pids: QEMU's threads (vCPUs, its block I/O pool of up to 64) and no more.
//! - I/O: an equal weight, so one guest's disk traffic cannot starve the others'.
//!
//! Both cgroup versions are supported: v1 (a hierarchy per controller, as on this
//! project's CI hosts) and v2 (one unified tree). QEMU joins its group between fork and
//! exec (writing `0` to an already-open `cgroup.procs`), so everything it ever allocates
//! is charged to the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The directory under each hierarchy's root that holds the VMs' groups.
pub const PARENT: &str = "nullspace";
/// CPU accounting period; a VM gets `vcpus ×` this much CPU time in each.
const CPU_PERIOD_US: u64 = 100_000;
/// Threads QEMU may have beyond one per vCPU: main loop, RCU, its block I/O worker pool
/// (at most 64), VNC-less helpers. A QEMU that cannot start a thread aborts, so this
/// is generous; a guest cannot make QEMU fork anyway (seccomp denies spawning).
const PIDS_BASE: u64 = 128;
/// An empty group younger than this may belong to a VM being created right now, by
/// another process sharing the hierarchy: orphan reaping leaves it.
const REAP_MIN_AGE: Duration = Duration::from_secs(120);

/// Host memory QEMU may use beyond the guest's RAM.
///
/// Measured under TCG: a 256 MiB guest after a file-heavy workload peaked at 424 MiB of
/// QEMU RSS (168 MiB over its RAM: QEMU, translated code, device buffers); a 512 MiB
/// guest running a memory hog peaked at 546 MiB. The group also holds the page cache
/// of the VM's disk I/O, which the kernel reclaims at the limit rather than failing.
/// Page tables and dirty bitmaps grow with RAM, hence the share of it.
pub fn overhead_mib(mem_mib: u32) -> u64 {
    256 + u64::from(mem_mib) / 16
}

/// Host memory QEMU's TCG may fill with translated code beyond [`overhead_mib`]: its
/// code buffer is 1 GiB by default (QEMU 7.2, system emulation), filled as the guest
/// runs code it has not run before. Measured: a 2 GiB guest installing a few hundred
/// Debian packages (a workspace template's build) reached 1.25 GiB of anonymous QEMU
/// memory and was killed at RAM + 384 MiB.
pub const TCG_CODE_MIB: u64 = 1024;

/// The limits one VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Memory (and memory + swap) in bytes.
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: u64,
    /// Relative CPU weight (v2 scale 1..=10000, 100 per vCPU).
    pub cpu_weight: u64,
    /// Most threads.
    pub pids_max: u64,
    /// Relative I/O weight (1..=1000 on v1's BFQ, 1..=10000 on v2).
    pub io_weight: u64,
}

impl VmLimits {
    /// The same limits for a VM run under TCG: room for its translated code.
    pub fn under_tcg(mut self) -> Self {
        self.memory_bytes += TCG_CODE_MIB << 20;
        self
    }

    /// The limits of a VM with `vcpus` and `mem_mib` of RAM.
    pub fn for_vm(vcpus: u32, mem_mib: u32) -> Self {
        let vcpus = u64::from(vcpus.max(1));
        Self {
            memory_bytes: (u64::from(mem_mib) + overhead_mib(mem_mib)) << 20,
            cpu_quota_us: vcpus * CPU_PERIOD_US,
            cpu_weight: (100 * vcpus).min(10_000),
            pids_max: PIDS_BASE + vcpus,
            io_weight: 100,
        }
    }
}

/// Which cgroup version the host gives us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// A controller VMs are limited by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Cpu,
    Pids,
    Io,
}

impl Controller {
    const ALL: [Controller; 4] = [Self::Memory, Self::Cpu, Self::Pids, Self::Io];

    /// Its name in `/proc/self/mounts` (v1) and `cgroup.controllers` (v2).
    fn name(self, version: Version) -> &'static str {
        match (self, version) {
            (Self::Memory, _) => "memory",
            (Self::Cpu, _) => "cpu",
            (Self::Pids, _) => "pids",
            (Self::Io, Version::V1) => "blkio",
            (Self::Io, Version::V2) => "io",
        }
    }

    /// Whether a VM may run without it (I/O weights need a scheduler that honours them).
    fn required(self) -> bool {
        !matches!(self, Self::Io)
    }
}

/// The host's cgroup hierarchies, with `nullspace/` made in each.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: Version,
    /// `(controller, <hierarchy>/nullspace)`; under v2 one path for all.
    parents: Vec<(Controller, PathBuf)>,
}

impl Cgroups {
    /// Finds the hierarchies (v1 when its memory controller is mounted, else v2) and
    /// makes `nullspace/` under each, enabling the controllers for it under v2. The
    /// error says what is missing and how to fix it.
    pub fn detect() -> Result<Self, String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
        Self::detect_in(&mounts)
    }

    fn detect_in(mounts: &str) -> Result<Self, String> {
        let (v1, v2) = hierarchies(mounts);
        let cgroups = if v1.iter().any(|(c, _)| *c == Controller::Memory) {
            Self {
                version: Version::V1,
                parents: v1
                    .into_iter()
                    .map(|(c, root)| (c, root.join(PARENT)))
                    .collect(),
            }
        } else if let Some(root) = v2 {
            Self::enable_v2(&root)?
        } else {
            return Err(
                "no cgroup hierarchy with the memory controller is mounted; mount cgroup2 on /sys/fs/cgroup (or cgroup v1's memory, cpu and pids)".into(),
            );
        };
        for c in Controller::ALL.into_iter().filter(|c| c.required()) {
            if !cgroups.parents.iter().any(|(have, _)| *have == c) {
                return Err(format!(
                    "the cgroup {} controller is not available ({:?}); enable it in the kernel or the container runtime",
                    c.name(cgroups.version),
                    cgroups.version
                ));
            }
        }
        for (_, dir) in &cgroups.parents {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "creating {}: {e}; run as root with a writable cgroup hierarchy (a container needs one delegated to it)",
                    dir.display()
                )
            })?;
        }
        Ok(cgroups)
    }

    /// Under v2, turns on every controller VMs need below the root and below
    /// `nullspace/` (controllers reach a group only through its parent's
    /// `cgroup.subtree_control`).
    fn enable_v2(root: &Path) -> Result<Self, String> {
        let available = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|e| format!("reading {}/cgroup.controllers: {e}", root.display()))?;
        let parent = root.join(PARENT);
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("creating {}: {e}; run as root", parent.display()))?;
        let mut parents = Vec::new();
        for c in Controller::ALL {
            let name = c.name(Version::V2);
            if !available.split_whitespace().any(|a| a == name) {
                continue;
            }
            for dir in [root, parent.as_path()] {
                let control = dir.join("cgroup.subtree_control");
                if let Err(e) = write_file(&control, &format!("+{name}")) {
                    if c.required() {
                        return Err(format!(
                            "enabling {name} in {}: {e}; the daemon needs a delegated cgroup v2 subtree",
                            control.display()
                        ));
                    }
                }
            }
            parents.push((c, parent.clone()));
        }
        Ok(Self {
            version: Version::V2,
            parents,
        })
    }

    /// The version in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// One line for the host check: the version, controllers and where groups go.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self
            .parents
            .iter()
            .map(|(c, _)| c.name(self.version))
            .collect();
        let at = match self.version {
            Version::V1 => format!("/sys/fs/cgroup/<controller>/{PARENT}"),
            Version::V2 => self
                .parents
                .first()
                .map(|(_, p)| p.display().to_string())
                .unwrap_or_default(),
        };
        let v = match self.version {
            Version::V1 => "v1",
            Version::V2 => "v2",
        };
        format!("cgroup {v} ({}) under {at}", names.join(", "))
    }

    /// Makes VM `id`'s groups with `limits`, and opens their `cgroup.procs` for QEMU
    /// to join them before it runs ([`VmCgroup::join_fds`]).
    pub fn create(&self, id: &str, limits: &VmLimits) -> std::io::Result<VmCgroup> {
        if !crate::vm_dir::is_vm_id(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{id:?} is not a VM ID"),
            ));
        }
        let mut group = VmCgroup {
            dirs: Vec::new(),
            join: Vec::new(),
            memory: None,
            keep: false,
        };
        for (c, parent) in &self.parents {
            let dir = parent.join(id);
            if !group.dirs.contains(&dir) {
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    // Left by a VM of this ID that is gone (IDs are random).
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                group.dirs.push(dir.clone());
                group.join.push(
                    OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))?
                        .into(),
                );
            }
            self.apply(*c, &dir, limits)?;
            if *c == Controller::Memory {
                group.memory = Some(dir);
            }
        }
        Ok(group)
    }

    fn apply(&self, c: Controller, dir: &Path, l: &VmLimits) -> std::io::Result<()> {
        let set = |file: &str, value: String| write_file(&dir.join(file), &value);
        match (self.version, c) {
            (Version::V1, Controller::Memory) => {
                set("memory.limit_in_bytes", l.memory_bytes.to_string())?;
                if dir.join("memory.memsw.limit_in_bytes").exists() {
                    set("memory.memsw.limit_in_bytes", l.memory_bytes.to_string())?;
                } else {
                    // No swap accounting: keep the group out of swap instead.
                    let _ = set("memory.swappiness", "0".into());
                }
            }
            (Version::V1, Controller::Cpu) => {
                set("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                set("cpu.cfs_quota_us", l.cpu_quota_us.to_string())?;
                // v1 shares: 1024 is one "normal" task; v2 weight 100 is the same.
                set("cpu.shares", (l.cpu_weight * 1024 / 100).to_string())?;
            }
            (Version::V1, Controller::Pids) | (Version::V2, Controller::Pids) => {
                set("pids.max", l.pids_max.to_string())?;
            }
            (Version::V1, Controller::Io) => {
                // Best effort: only the BFQ scheduler (or CFQ on old kernels) has weights.
                let weight = l.io_weight.clamp(1, 1000).to_string();
                for file in ["blkio.bfq.weight", "blkio.weight"] {
                    if dir.join(file).exists() {
                        let _ = set(file, weight.clone());
                        break;
                    }
                }
            }
            (Version::V2, Controller::Memory) => {
                set("memory.max", l.memory_bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    set("memory.swap.max", "0".into())?;
                }
            }
            (Version::V2, Controller::Cpu) => {
                set("cpu.max", format!("{} {CPU_PERIOD_US}", l.cpu_quota_us))?;
                set("cpu.weight", l.cpu_weight.to_string())?;
            }
            (Version::V2, Controller::Io) => {
                for file in ["io.weight", "io.bfq.weight"] {
                    if dir.join(file).exists() {
                        let _ = set(file, format!("default {}", l.io_weight));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The groups of a VM a previous owner started (adoption); removed with the
    /// handle.
    pub fn existing(&self, id: &str) -> VmCgroup {
        let mut group = VmCgroup {
            dirs: Vec::new(),
            join: Vec::new(),
            memory: None,
            keep: false,
        };
        if !crate::vm_dir::is_vm_id(id) {
            return group;
        }
        for (c, parent) in &self.parents {
            let dir = parent.join(id);
            if *c == Controller::Memory {
                group.memory = Some(dir.clone());
            }
            if dir.is_dir() && !group.dirs.contains(&dir) {
                group.dirs.push(dir);
            }
        }
        group
    }

    /// Removes VM groups nobody runs in that are older than [`REAP_MIN_AGE`] (their
    /// owner died before removing them). Returns how many.
    pub fn reap_orphans(&self) -> usize {
        let mut reaped = 0;
        let now = SystemTime::now();
        for (_, parent) in &self.parents {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if !crate::vm_dir::is_vm_id(&name.to_string_lossy()) {
                    continue;
                }
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > REAP_MIN_AGE);
                // rmdir fails on a group with processes in it: only empty ones go.
                if old && std::fs::remove_dir(entry.path()).is_ok() {
                    reaped += 1;
                }
            }
        }
        reaped
    }
}

/// One VM's groups. Removed on drop (after its QEMU is gone), unless kept.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each group, open for writing, until QEMU has joined.
    join: Vec<OwnedFd>,
    memory: Option<PathBuf>,
    keep: bool,
}

impl VmCgroup {
    /// The `cgroup.procs` descriptors a child writes `0` to, between fork and exec, to
    /// join the groups (a write needs no allocation: safe in a forked child).
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.join.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Closes the join descriptors (QEMU has started).
    pub fn joined(&mut self) {
        self.join.clear();
    }

    /// Leaves the groups in place on drop (the VM goes on under a later owner).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The memory group's directory, if any (its limit and usage files).
    pub fn memory_dir(&self) -> Option<&Path> {
        self.memory.as_deref()
    }

    /// Bytes of memory charged to the VM now, if the host says.
    pub fn memory_usage(&self) -> Option<u64> {
        let dir = self.memory.as_ref()?;
        ["memory.current", "memory.usage_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.join.clear();
        if self.keep {
            return;
        }
        // The kernel lets a group go a moment after its last task has exited.
        let deadline = Instant::now() + Duration::from_secs(2);
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), "leaving a VM cgroup for orphan reaping: {e}");
                        break;
                    }
                }
            }
        }
    }
}

/// The v1 controllers VMs use with their mount points, and the first cgroup2 mount,
/// from a mount table.
fn hierarchies(mounts: &str) -> (Vec<(Controller, PathBuf)>, Option<PathBuf>) {
    let mut v1: Vec<(Controller, PathBuf)> = Vec::new();
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, fstype, options, ..] = f[..] else {
            continue;
        };
        match fstype {
            "cgroup" => {
                for c in Controller::ALL {
                    if options.split(',').any(|o| o == c.name(Version::V1))
                        && !v1.iter().any(|(have, _)| *have == c)
                    {
                        v1.push((c, PathBuf::from(dir)));
                    }
                }
            }
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(dir)),
            _ => {}
        }
    }
    (v1, v2)
}

/// Writes a control file in one `write` (the kernel parses each write whole).
fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes()).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_shape() {
        let l = VmLimits::for_vm(1, 256);
        assert_eq!(l.memory_bytes, (256 + 256 + 16) << 20);
        assert_eq!(l.cpu_quota_us, 100_000);
        assert_eq!(l.pids_max, 129);
        let big = VmLimits::for_vm(4, 8192);
        assert_eq!(big.cpu_quota_us, 400_000);
        assert_eq!(big.cpu_weight, 400);
        assert!(big.memory_bytes > 8192 << 20);
        let tcg = VmLimits::for_vm(1, 256).under_tcg();
        assert_eq!(tcg.memory_bytes, l.memory_bytes + (1024 << 20));
    }

    #[test]
    fn hierarchies_are_read_from_the_mount_table() {
        let hybrid = "\
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
        let (v1, v2) = hierarchies(hybrid);
        assert_eq!(
            v1,
            [
                (Controller::Cpu, "/sys/fs/cgroup/cpu".into()),
                (Controller::Memory, "/sys/fs/cgroup/memory".into()),
                (Controller::Pids, "/sys/fs/cgroup/pids".into()),
            ]
        );
        assert_eq!(v2, Some("/sys/fs/cgroup/unified".into()));
        let (v1, v2) = hierarchies("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n");
        assert!(v1.is_empty());
        assert_eq!(v2, Some("/sys/fs/cgroup".into()));
        let none = Cgroups::detect_in("proc /proc proc rw 0 0\n").unwrap_err();
        assert!(none.contains("mount cgroup2"), "{none}");
        let no_pids = Cgroups::detect_in("cgroup /x/memory cgroup rw,memory 0 0\n").unwrap_err();
        assert!(no_pids.contains("cpu"), "{no_pids}");
    }
}
