//! The QEMU `microvm` driver.
//!
//! One QEMU process per VM, with its control sockets, disk overlay and console log in the
//! VM's own directory ([`VmDir`]). The disk is the image set's read-only root filesystem
//! under a per-VM qcow2 overlay whose virtual size is the asked disk size; the agent
//! grows the filesystem to fill it at boot.

use crate::accel::{self, Accel, AccelChoice, Detection};
use crate::cgroup::{Cgroups, VmCgroup, VmLimits};
use crate::images::ImageSet;
use crate::net::{EgressSockets, GuestNet};
use crate::qmp::Qmp;
use crate::snapshot::{self, MemoryFormat, Snapshot, SnapshotManifest};
use crate::vm_dir::{self, DiskFile, VmDir, LAUNCH_RECORD};
use crate::vm_user::{self, VmUid};
use crate::{space, tsc, Vm, VmSpec, Vmm, VmmError};
use agent_client::AgentClient;
use serde_json::json;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tracing::{info, warn, Instrument};

mod live;
pub use live::{
    IncomingSocket, IncomingSpec, IncomingVolume, LiveOptions, MigrationStats, Switchover,
};

/// The unprivileged account QEMU runs as when the daemon runs as root.
pub const VM_USER: &str = "nullspace-vm";
/// How long auto-detection waits for a guest under KVM before settling for TCG.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Operator settings of the driver.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// Where per-VM directories go. On tmpfs: memory files live there too.
    pub run_dir: PathBuf,
    /// Where VMs' disk overlays go: on disk, never tmpfs (a guest filling its disk
    /// would otherwise fill host memory).
    pub disk_dir: PathBuf,
    /// Accelerator, or auto-detection.
    pub accel: AccelChoice,
    /// VMs outlive this process (a daemon): no parent-death signal, a session of their
    /// own, and a restarted owner re-adopts them ([`QemuVmm::adopt`]). Otherwise QEMU
    /// dies with the thread that started it.
    pub detach_vms: bool,
    /// Each VM in its own network namespace behind a tap device, its traffic handed to
    /// the owner's egress proxy ([`QemuVm::take_egress`]); otherwise QEMU's user-mode
    /// network, restricted: the guest reaches nothing (only the agent's channel).
    pub isolated_network: bool,
    /// Lets QEMU run as root (no VM account) or without seccomp (`-sandbox`), with a
    /// warning. Off: the driver refuses, since a guest that escapes QEMU would then own
    /// the host. Only ever set by an explicit operator choice.
    pub allow_unconfined: bool,
    /// Each VM's QEMU in cgroups of its own ([`crate::cgroup`]). Off counts as
    /// unconfined: only with `allow_unconfined` (`NULLSPACE_CGROUPS=off`, for
    /// measuring what the limits cost).
    pub cgroups: bool,
    /// MiB that must stay free in the disk and run directories after a VM starts
    /// ([`crate::space`]).
    pub min_free_mib: u64,
}

impl QemuConfig {
    /// Defaults, overridden by `NULLSPACE_QEMU`, `NULLSPACE_RUN_DIR`, `NULLSPACE_ACCEL`,
    /// `NULLSPACE_NETWORK` (`user`, or `isolated` or `auto`: isolated).
    pub fn from_env() -> Result<Self, VmmError> {
        Ok(Self {
            qemu_binary: std::env::var_os("NULLSPACE_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            run_dir: std::env::var_os("NULLSPACE_RUN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/dev/shm/nullspace".into()),
            disk_dir: std::env::var_os("NULLSPACE_DISK_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/lib/nullspace/disks".into()),
            accel: std::env::var("NULLSPACE_ACCEL")
                .unwrap_or_default()
                .parse()?,
            detach_vms: false,
            // Set and not empty is on, unless it says 0, false, no or off: as the pool
            // manager reads it (`--insecure-unconfined-qemu`). Empty is off: a cleared
            // variable never unconfines QEMU.
            allow_unconfined: std::env::var("NULLSPACE_INSECURE_UNCONFINED_QEMU").is_ok_and(|v| {
                !matches!(
                    v.to_ascii_lowercase().as_str(),
                    "" | "0" | "false" | "no" | "off"
                )
            }),
            cgroups: match std::env::var("NULLSPACE_CGROUPS").as_deref() {
                Ok("on") | Err(_) => true,
                Ok("off") => false,
                Ok(other) => {
                    return Err(VmmError::InvalidSpec(format!(
                        "NULLSPACE_CGROUPS={other}: send on or off"
                    )))
                }
            },
            min_free_mib: match std::env::var("NULLSPACE_MIN_FREE_MIB") {
                Ok(v) => v.parse().map_err(|_| {
                    VmmError::InvalidSpec(format!(
                        "NULLSPACE_MIN_FREE_MIB={v}: send a whole number of MiB"
                    ))
                })?,
                Err(_) => 1024,
            },
            // `auto` is the pool manager's `--network auto` (which it also reads from
            // here): isolated, or an error where the host cannot.
            isolated_network: match std::env::var("NULLSPACE_NETWORK").as_deref() {
                Ok("isolated" | "auto") => true,
                Ok("user") | Err(_) => false,
                Ok(other) => {
                    return Err(VmmError::InvalidSpec(format!(
                        "NULLSPACE_NETWORK={other}: send isolated, auto or user"
                    )))
                }
            },
        })
    }
}

/// Credentials QEMU is started with.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    /// The `nullspace-vm` group: what every VM may read (template snapshots).
    shared_gid: u32,
}

impl RunAs {
    /// One VM's credentials: its own ID as user and group, keeping the shared group
    /// and the VM account's others (`kvm`).
    fn for_vm(&self, uid: u32) -> RunAs {
        let mut groups = self.groups.clone();
        if !groups.contains(&self.shared_gid) {
            groups.push(self.shared_gid);
        }
        RunAs {
            uid,
            gid: uid,
            groups,
            shared_gid: self.shared_gid,
        }
    }
}

/// Boots QEMU microVMs from one image set.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    config: QemuConfig,
    images: ImageSet,
    accel: Detection,
    tsc_khz: u64,
    run_as: Option<RunAs>,
    seccomp: bool,
    /// Where each VM's QEMU gets its limits; `None` only when running unconfined.
    cgroups: Option<Cgroups>,
    /// QEMU maps a read-only file copy-on-write (`rom=off`, QEMU 8.2+): template
    /// memory files can then be read-only to VMs.
    private_rom: bool,
    qemu_version: String,
    /// The group that opens `/dev/userfaultfd` ([`postcopy_access`]), when incoming
    /// migrations can take post-copy here; `Some(None)` when QEMU runs as root.
    postcopy_gid: Option<Option<u32>>,
}

impl QemuVmm {
    /// A driver for `images`, resolving the accelerator (probing if asked to).
    pub async fn new(config: QemuConfig, images: ImageSet) -> Result<Self, VmmError> {
        let tsc_khz = tsc::host_tsc_khz().map_err(VmmError::Host)?;
        let run_as = unprivileged_user();
        let seccomp = seccomp_available(&config.qemu_binary);
        let cgroups = if config.cgroups {
            Cgroups::detect()
        } else {
            Err("switched off (NULLSPACE_CGROUPS=off)".into())
        };
        // SAFETY: geteuid has no preconditions.
        let as_root = run_as.is_none() && unsafe { libc::geteuid() } == 0;
        let unconfined = match (as_root, seccomp, &cgroups) {
            (true, _, _) => Some(format!(
                "QEMU would run as root (there is no '{VM_USER}' account; deploy/install-deps.sh makes it)"
            )),
            (false, false, _) => Some(format!(
                "QEMU would run without seccomp ({} or this kernel has no -sandbox)",
                config.qemu_binary.display()
            )),
            (false, true, Err(e)) => Some(format!("QEMU would run without per-VM limits: {e}")),
            (false, true, Ok(_)) => None,
        };
        let cgroups = cgroups.ok();
        if let Some(why) = unconfined {
            if !config.allow_unconfined {
                return Err(VmmError::Host(format!(
                    "{why}; fix the host, or accept the risk with --insecure-unconfined-qemu (NULLSPACE_INSECURE_UNCONFINED_QEMU=1)"
                )));
            }
            warn!("{why}: running it anyway (--insecure-unconfined-qemu)");
        }
        if !config.detach_vms {
            vm_dir::reap_orphans(&config.run_dir, Some(&config.disk_dir), &[]);
        }
        if let Some(c) = &cgroups {
            c.reap_orphans();
        }
        let qemu_version = qemu_version_of(&config.qemu_binary)?;
        let private_rom = maps_read_only_files_private(&config.qemu_binary);
        let postcopy_gid = match (&run_as, opens_userfaultfd_device(&qemu_version)) {
            (_, false) => None,
            (None, true) => Some(None),
            (Some(_), true) => match postcopy_access() {
                Ok(gid) => Some(Some(gid)),
                Err(why) => {
                    warn!("live migrations into this host are pre-copy only: {why}");
                    None
                }
            },
        };
        let mut vmm = Self {
            postcopy_gid,
            qemu_version,
            config,
            images,
            accel: Detection {
                accel: Accel::Tcg,
                reason: "not yet detected".into(),
            },
            tsc_khz,
            run_as,
            seccomp,
            cgroups,
            private_rom,
        };
        vmm.accel = match vmm.config.accel {
            AccelChoice::Fixed(Accel::Kvm) => {
                accel::kvm_device_usable().map_err(|e| {
                    VmmError::Host(format!(
                        "KVM was asked for but {e}; set NULLSPACE_ACCEL=tcg or auto"
                    ))
                })?;
                Detection {
                    accel: Accel::Kvm,
                    reason: "forced by configuration".into(),
                }
            }
            AccelChoice::Fixed(Accel::Tcg) => Detection {
                accel: Accel::Tcg,
                reason: "forced by configuration".into(),
            },
            AccelChoice::Auto => vmm.detect_accel(true).await,
        };
        info!(accel = %vmm.accel.accel, reason = %vmm.accel.reason, "accelerator chosen");
        Ok(vmm)
    }

    /// Auto-detects the accelerator: KVM only if our minimal guest boots under it.
    /// With `use_cache`, a verdict from earlier in this host boot is reused. Only a
    /// verdict about the guest under KVM is cached (it booted, or it started and never
    /// answered): a missing tool or a misconfigured host gives TCG for this start only,
    /// so fixing the host is enough.
    pub async fn detect_accel(&self, use_cache: bool) -> Detection {
        let cache_file = crate::cache_dir().join("accel.json");
        let key = accel::cache_key(&self.images.key());
        if use_cache {
            if let Some(d) = accel::load_cached(&cache_file, &key) {
                return d;
            }
        }
        // Neither is KVM's verdict: both are fixed on the host without a reboot.
        if let Err(e) = accel::kvm_device_usable().and(check_vm_user_kvm()) {
            return Detection {
                accel: Accel::Tcg,
                reason: format!("{e}; using TCG"),
            };
        }
        let mut probe = self.clone();
        probe.accel = Detection {
            accel: Accel::Kvm,
            reason: "probe".into(),
        };
        // The probe needs no network of its own: a namespace problem is not KVM's.
        probe.config.isolated_network = false;
        let spec = VmSpec {
            rootfs: "minimal".into(),
            vcpus: 1,
            mem_mib: 256,
            disk_mib: 256,
            egress: false,
            boot_timeout: KVM_PROBE_TIMEOUT,
        };
        let detection = match probe.boot(&spec).await {
            Ok(vm) => {
                vm.kill().await;
                Detection {
                    accel: Accel::Kvm,
                    reason: "a guest booted under KVM".into(),
                }
            }
            Err(e) if accel::is_verdict_about_kvm(&e) => Detection {
                accel: Accel::Tcg,
                reason: format!(
                    "/dev/kvm opens but a guest did not boot under it ({e}); using TCG"
                ),
            },
            Err(e) => {
                return Detection {
                    accel: Accel::Tcg,
                    reason: format!(
                        "the KVM probe could not run ({e}); using TCG until the host is fixed (not cached)"
                    ),
                }
            }
        };
        accel::store_cached(&cache_file, &key, &detection);
        detection
    }

    /// Kills the QEMU of, and removes, every VM directory whose owner is gone, except
    /// those in `keep` (VMs just adopted). Returns how many were reaped.
    pub fn reap_orphans(&self, keep: &[PathBuf]) -> usize {
        if let Some(c) = &self.cgroups {
            c.reap_orphans();
        }
        vm_dir::reap_orphans(&self.config.run_dir, Some(&self.config.disk_dir), keep)
    }

    /// Takes over a VM a previous owner left running in `dir` (the daemon restarted):
    /// reconnects QMP and the agent (a new agent session; processes keep running).
    pub async fn adopt(&self, dir: &Path) -> Result<QemuVm, VmmError> {
        // QEMU can write in `dir`: the record counts only if it is still the daemon's.
        let record: LaunchRecord = vm_dir::read_daemon_file(dir, LAUNCH_RECORD)
            .map_err(|e| VmmError::Host(format!("{}: {e}", dir.join(LAUNCH_RECORD).display())))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| VmmError::Host(format!("unreadable {LAUNCH_RECORD}: {e}")))
            })?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.pid)).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
            return Err(VmmError::Exited(format!(
                "QEMU {} of {} is no longer running",
                record.pid,
                dir.display()
            )));
        }
        // The process must also run as the VM's own user: never adopt (and later kill)
        // another.
        let run_as = match (&self.run_as, record.uid) {
            (Some(r), Some(uid)) if vm_user::is_vm_uid(uid) => Some(r.for_vm(uid)),
            (Some(r), None) => Some(r.clone()),
            (Some(_), Some(uid)) => {
                return Err(VmmError::Host(format!(
                    "{} records uid {uid}, outside the VM range: not adopted",
                    dir.display()
                )))
            }
            (None, _) => None,
        };
        if let Some(r) = &run_as {
            let uid = std::fs::read_to_string(format!("/proc/{}/status", record.pid))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok())
                });
            if uid != Some(r.uid) {
                return Err(VmmError::Host(format!(
                    "process {} of {} runs as uid {uid:?}, not the VM's {}: not adopted",
                    record.pid,
                    dir.display(),
                    r.uid
                )));
            }
        }
        let vm_dir = VmDir::take_over(dir)
            .map_err(|e| VmmError::Host(format!("taking over {}: {e}", dir.display())))?;
        // From the directory's name (the daemon chose it), never from the record.
        let id = dir.file_name().unwrap_or_default().to_string_lossy();
        let disk = DiskFile::for_vm(&self.config.disk_dir, &id)
            .map_err(|e| VmmError::Host(format!("the disk of {}: {e}", dir.display())))?;
        let mut vm = QemuVm {
            id: record.launch.id.clone(),
            child: None,
            pid: record.pid,
            qmp: None,
            agent: None,
            run_as,
            private_rom: self.private_rom,
            uid_claim: record
                .uid
                .map(|uid| VmUid::adopted(Path::new(vm_user::CLAIMS_DIR), uid)),
            qemu_version: self.qemu_version.clone(),
            kernel_key: self.images.kernel_key()?,
            net: if record.launch.isolated_network {
                Some(GuestNet::of_process(record.pid).map_err(|e| {
                    VmmError::Host(format!("re-entering the VM's network namespace: {e}"))
                })?)
            } else {
                None
            },
            holds: Vec::new(),
            cgroup: self.cgroups.as_ref().map(|c| c.existing(&id)),
            launch: record.launch,
            disk,
            dir: vm_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        vm.connect_qmp(deadline).await?;
        // A stopped guest never answers the handshake.
        vm.continue_adopted(deadline).await?;
        vm.connect_agent(deadline).await?;
        info!(vm = %vm.id, pid = vm.pid, "VM adopted");
        Ok(vm)
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &Detection {
        &self.accel
    }

    /// The image set VMs boot from.
    pub fn images(&self) -> &ImageSet {
        &self.images
    }

    /// Whether each VM gets its own network namespace (see [`crate::net`]).
    pub fn isolated_network(&self) -> bool {
        self.config.isolated_network
    }

    /// Whether QEMU runs under `-sandbox on`.
    pub fn seccomp(&self) -> bool {
        self.seccomp
    }

    /// The cgroups each VM is limited by (`None` only when running unconfined).
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    fn kernel_cmdline(&self) -> String {
        format!(
            "console=ttyS0 root=/dev/vda rw pci=off quiet loglevel=4 panic=-1 {}",
            tsc::kernel_params(self.tsc_khz)
        )
    }

    /// The QEMU version this driver runs (first line of `qemu -version`).
    /// Whether a live migration into this host can switch to post-copy.
    pub fn postcopy_available(&self) -> bool {
        self.postcopy_gid.is_some()
    }

    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// Machine arguments: everything that shapes the guest and must be identical between
    /// a snapshot and its restores. No per-VM paths.
    fn machine_args(&self, vcpus: u32, mem_mib: u32) -> Vec<String> {
        let accel = self.accel.accel;
        [
            "-M",
            &format!(
                "microvm,accel={accel},pic=off,pit=off,rtc=off,isa-serial=on,memory-backend=mem0"
            ),
            "-cpu",
            match accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            },
            "-smp",
            &vcpus.to_string(),
            "-m",
            &format!("{mem_mib}M"),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-append",
            &self.kernel_cmdline(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The per-VM half of the command line: files in `dir`, devices, and how RAM is backed.
    /// `tap_fd`: the tap device's descriptor, inherited by QEMU, under isolated
    /// networking.
    fn vm_args(
        &self,
        launch: &Launch,
        dir: &VmDir,
        disk: &Path,
        tap_fd: Option<i32>,
    ) -> Vec<String> {
        let path = |name: &str| dir.file(name).display().to_string();
        let (mem_path, share) = match &launch.memory {
            Memory::Owned => (path("memory"), "on"),
            // Opened read-only where QEMU can (the file is then read-only to VMs).
            Memory::CopyOnWrite(snapshot_memory) if self.private_rom => (
                snapshot_memory.display().to_string(),
                "off,readonly=on,rom=off",
            ),
            Memory::CopyOnWrite(snapshot_memory) => (snapshot_memory.display().to_string(), "off"),
        };
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("nullspace-{}", launch.id),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem0,size={}M,mem-path={mem_path},share={share}",
                launch.mem_mib
            ),
            "-kernel".into(),
            self.images.kernel().display().to_string(),
            "-initrd".into(),
            self.images.initrd().display().to_string(),
            "-chardev".into(),
            // Appended: the daemon truncates it when it grows past its cap.
            format!("file,id=console,path={},append=on", path("console.log")),
            "-serial".into(),
            "chardev:console".into(),
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                disk.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-netdev".into(),
            match tap_fd {
                // QEMU gets the tap this process opened: it never opens /dev/net/tun.
                Some(fd) => format!("tap,id=net0,fd={fd}"),
                // User-mode networking is only ever restricted: its gateway (10.0.2.2)
                // would otherwise reach this host's loopback services. The host reaches
                // the guest through the agent, which needs no network.
                None => "user,id=net0,restrict=on".into(),
            },
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
            "-device".into(),
            "virtio-rng-device".into(),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path("agent.sock")
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                agent_protocol::PORT_NAME
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path("qmp.sock")),
            // Volumes are SCSI disks on it: SCSI hotplugs on any machine, virtio-mmio
            // does not.
            "-device".into(),
            "virtio-scsi-device,id=scsi0".into(),
        ];
        for v in &launch.volumes {
            args.push("-blockdev".into());
            args.push(v.blockdev().to_string());
            args.push("-device".into());
            args.push(format!(
                "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun={lun},drive={node},id={dev}",
                lun = v.lun,
                node = v.node_name(),
                dev = v.device_id()
            ));
        }
        if launch.incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        if launch.start_paused {
            args.push("-S".into());
        }
        if self.seccomp {
            args.push("-sandbox".into());
            args.push(
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            );
        }
        args
    }

    fn validate(&self, spec: &VmSpec) -> Result<PathBuf, VmmError> {
        let rootfs = self.images.rootfs(&spec.rootfs)?;
        if !(1..=64).contains(&spec.vcpus) {
            return Err(VmmError::InvalidSpec(format!(
                "vcpus {} is out of range; send 1 to 64",
                spec.vcpus
            )));
        }
        if !(128..=256 * 1024).contains(&spec.mem_mib) {
            return Err(VmmError::InvalidSpec(format!(
                "memory {} MiB is out of range; send 128 to 262144 MiB",
                spec.mem_mib
            )));
        }
        let image_mib = std::fs::metadata(&rootfs)
            .map_err(|e| VmmError::Image(format!("{}: {e}", rootfs.display())))?
            .len()
            .div_ceil(1024 * 1024);
        if spec.disk_mib < image_mib || spec.disk_mib > 16 * 1024 * 1024 {
            return Err(VmmError::InvalidSpec(format!(
                "disk {} MiB is out of range for root filesystem '{}'; send {image_mib} to 16777216 MiB",
                spec.disk_mib, spec.rootfs
            )));
        }
        Ok(rootfs)
    }

    /// Checks what a snapshot's manifest would hand QEMU against this host. A manifest
    /// may come from a bucket anyone with its credentials can write, so nothing in it
    /// reaches QEMU unchecked: the shape must be one a boot accepts, the root filesystem
    /// this host's image of that name, and the machine arguments exactly the ones this
    /// host builds for that shape (an extra `-monitor` or `-chardev` would hand the
    /// bucket's writer the VM, or a file as root).
    fn check_manifest(&self, m: &SnapshotManifest) -> Result<(), VmmError> {
        let refuse = |why: String| {
            VmmError::SnapshotMismatch(format!(
                "snapshot {}: {why}; restore it on a host with the same guest images and configuration, or take a new snapshot here",
                m.id
            ))
        };
        let spec = VmSpec {
            rootfs: m.rootfs.clone(),
            vcpus: m.vcpus,
            mem_mib: m.mem_mib,
            disk_mib: m.disk_mib,
            egress: m.egress,
            boot_timeout: Duration::from_secs(1),
        };
        let rootfs = self.validate(&spec).map_err(|e| refuse(e.to_string()))?;
        if rootfs != m.rootfs_image {
            return Err(refuse(format!(
                "it is layered on {}, this host's '{}' root filesystem is {}",
                m.rootfs_image.display(),
                m.rootfs,
                rootfs.display()
            )));
        }
        let ours = self.machine_args(m.vcpus, m.mem_mib);
        if ours != m.machine_args {
            return Err(refuse(format!(
                "it records QEMU machine arguments {:?}, this host uses {:?} for that shape",
                m.machine_args, ours
            )));
        }
        Ok(())
    }

    /// Creates the VM directory and disk, starts QEMU and connects QMP. The agent is
    /// connected by the caller: after boot, or after an incoming migration. `prepare`
    /// gets the VM directory's path before QEMU starts (file work in it runs on a
    /// blocking thread).
    async fn launch<F>(
        &self,
        launch: Launch,
        prepare: impl FnOnce(PathBuf) -> F,
    ) -> Result<QemuVm, VmmError>
    where
        F: std::future::Future<Output = Result<(), VmmError>>,
    {
        // Refused before anything is made: a full disk or tmpfs would fail every VM
        // on the host, not only this one.
        let reserve = self.config.min_free_mib << 20;
        space::ensure(&self.config.disk_dir, 0, reserve, "VM disk overlays")?;
        let ram = match launch.memory {
            // Only the pages the guest writes, in QEMU's own memory.
            Memory::CopyOnWrite(_) => 0,
            Memory::Owned => u64::from(launch.mem_mib) << 20,
        };
        space::ensure(&self.config.run_dir, ram, reserve, "VM memory, on tmpfs")?;
        let dir = VmDir::create(&self.config.run_dir, &launch.id)
            .map_err(|e| VmmError::Host(format!("creating the VM directory: {e}")))?;
        let disk = DiskFile::for_vm(&self.config.disk_dir, &launch.id)
            .map_err(|e| VmmError::Host(format!("the VM's disk: {e}")))?;
        create_overlay(
            &launch.disk_backing,
            &launch.disk_backing_format,
            disk.path(),
            launch.disk_mib,
        )
        .await?;
        prepare(dir.path().to_path_buf()).await?;
        let mut net = if launch.isolated_network {
            Some(
                tokio::task::spawn_blocking(GuestNet::create)
                    .await
                    .map_err(|e| VmmError::Host(e.to_string()))?
                    .map_err(|e| VmmError::Host(format!("the VM's network namespace: {e}")))?,
            )
        } else {
            None
        };
        // Its own user and group, when QEMU runs unprivileged.
        let uid_claim = match &self.run_as {
            Some(_) => Some(
                VmUid::claim(Path::new(vm_user::CLAIMS_DIR), dir.path(), &launch.id)
                    .map_err(|e| VmmError::Host(format!("claiming the VM's user ID: {e}")))?,
            ),
            None => None,
        };
        let mut vm_run_as = self
            .run_as
            .as_ref()
            .zip(uid_claim.as_ref())
            .map(|(r, u)| r.for_vm(u.uid()));
        if let (true, Some(r), Some(Some(gid))) =
            (launch.postcopy, &mut vm_run_as, self.postcopy_gid)
        {
            r.groups.push(gid);
        }
        let netns_fd = net.as_ref().map(|n| n.netns_fd());
        // Kept open only until QEMU has inherited it.
        let tap = net.as_mut().and_then(GuestNet::take_tap);
        let tap_fd = tap.as_ref().map(|t| t.as_raw_fd());
        if let Some(run_as) = &vm_run_as {
            for entry in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !vm_dir::DAEMON_FILES.contains(&&*entry.file_name().to_string_lossy()) {
                    let _ =
                        std::os::unix::fs::chown(entry.path(), Some(run_as.uid), Some(run_as.gid));
                }
            }
            // The daemon's, sticky, writable by the VM group: QEMU makes its sockets and
            // logs there but cannot replace or remove the daemon's records.
            std::os::unix::fs::chown(dir.path(), Some(0), Some(run_as.gid))
                .and_then(|()| {
                    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1770))
                })
                .map_err(|e| VmmError::Host(format!("chown {}: {e}", dir.path().display())))?;
            // Its own files, 0600: no other VM's QEMU may read them.
            std::os::unix::fs::chown(disk.path(), Some(run_as.uid), Some(run_as.gid))
                .and_then(|()| {
                    std::fs::set_permissions(disk.path(), std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| VmmError::Host(format!("chown {}: {e}", disk.path().display())))?;
            for v in &launch.volumes {
                give_to(&v.path, run_as);
            }
        }
        let mut cgroup = match &self.cgroups {
            Some(c) => Some(
                c.create(&launch.id, &{
                    let limits = VmLimits::for_vm(launch.vcpus, launch.mem_mib);
                    if launch.machine_args.iter().any(|a| a.contains("accel=tcg")) {
                        limits.under_tcg()
                    } else {
                        limits
                    }
                })
                .map_err(|e| VmmError::Host(format!("the VM's cgroup: {e}")))?,
            ),
            None => None,
        };
        let join_cgroup = cgroup.as_ref().map(VmCgroup::join_fds).unwrap_or_default();
        let log = std::fs::File::create(dir.file("qemu.log"))
            .map_err(|e| VmmError::Host(format!("creating qemu.log: {e}")))?;
        let mut cmd = std::process::Command::new(&self.config.qemu_binary);
        // QEMU gets none of the daemon's environment: it holds the catalog's URL with
        // its password and the object store's keys, and QEMU runs what a guest may
        // escape into. Only what finding its own files and a sane locale need.
        cmd.env_clear();
        for keep in ["PATH", "LANG", "LC_ALL", "TZ"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.args(&launch.machine_args)
            .args(self.vm_args(&launch, &dir, disk.path(), tap_fd))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| VmmError::Host(e.to_string()))?)
            .stderr(log);
        let run_as = vm_run_as.clone();
        let detach = self.config.detach_vms;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // First, while root: everything QEMU allocates is the VM's.
                for fd in &join_cgroup {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = tap_fd {
                    // Inherited across exec: QEMU's `-netdev tap,fd=N`.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(r) = &run_as {
                    if libc::setgroups(r.groups.len(), r.groups.as_ptr()) != 0
                        || libc::setgid(r.gid) != 0
                        || libc::setuid(r.uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if detach {
                    // Out of the owner's session: a signal to its group spares VMs.
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    // QEMU dies with the thread that started it: no VM outlives a crashed
                    // owner. Set after the uid change, which would clear it.
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            VmmError::Host(format!(
                "starting {}: {e}; install qemu-system-x86 or set NULLSPACE_QEMU",
                self.config.qemu_binary.display()
            ))
        })?;
        drop(tap);
        if let Some(c) = &mut cgroup {
            c.joined();
        }
        let _ = dir.record_qemu(child.id());
        let record = LaunchRecord {
            pid: child.id(),
            launch: launch.clone(),
            uid: uid_claim.as_ref().map(VmUid::uid),
        };
        vm_dir::write_daemon_file(
            dir.path(),
            LAUNCH_RECORD,
            &serde_json::to_vec(&record).expect("json"),
            false,
        )
        .map_err(|e| VmmError::Host(format!("writing {LAUNCH_RECORD}: {e}")))?;
        let mut vm = QemuVm {
            id: launch.id.clone(),
            pid: child.id(),
            child: Some(child),
            qmp: None,
            agent: None,
            run_as: vm_run_as,
            private_rom: self.private_rom,
            uid_claim,
            qemu_version: self.qemu_version.clone(),
            kernel_key: self.images.kernel_key()?,
            launch,
            net,
            holds: Vec::new(),
            cgroup,
            disk,
            dir,
        };
        let deadline = Instant::now() + vm.launch.boot_timeout;
        if let Err(e) = vm.connect_qmp(deadline).await {
            return Err(vm.boot_failure(e).await);
        }
        Ok(vm)
    }

    /// Connects the agent of a just-launched VM, turning failure into a boot error.
    async fn finish_boot(&self, mut vm: QemuVm, started: Instant) -> Result<QemuVm, VmmError> {
        let deadline = started + vm.launch.boot_timeout;
        match vm.connect_agent(deadline).await {
            Ok(()) => {
                info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "VM ready"
                );
                Ok(vm)
            }
            Err(e) => Err(vm.boot_failure(e).await),
        }
    }

    async fn boot_in(&self, spec: &VmSpec, id: &str) -> Result<QemuVm, VmmError> {
        let started = Instant::now();
        let rootfs = self.validate(spec)?;
        let launch = Launch {
            id: id.to_string(),
            machine_args: self.machine_args(spec.vcpus, spec.mem_mib),
            memory: Memory::Owned,
            memory_base: None,
            disk_backing: rootfs.clone(),
            disk_backing_format: "raw".into(),
            rootfs_image: rootfs,
            disk_mib: spec.disk_mib,
            egress: spec.egress,
            isolated_network: self.config.isolated_network,
            volumes: Vec::new(),
            incoming: false,
            start_paused: false,
            postcopy: false,
            boot_timeout: spec.boot_timeout,
            rootfs: spec.rootfs.clone(),
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
        };
        let vm = self.launch(launch, |_| async { Ok(()) }).await?;
        self.finish_boot(vm, started).await
    }

    /// Starts a new VM from `snapshot`: same memory, processes, devices and disk.
    pub async fn restore(
        &self,
        snapshot: &Snapshot,
        options: &RestoreOptions,
    ) -> Result<QemuVm, VmmError> {
        let id = new_vm_id();
        let span = tracing::info_span!("vm", id = %id, snapshot = %snapshot.manifest().id);
        self.restore_in(snapshot, options, id)
            .instrument(span)
            .await
    }

    async fn restore_in(
        &self,
        snapshot: &Snapshot,
        options: &RestoreOptions,
        id: String,
    ) -> Result<QemuVm, VmmError> {
        let started = Instant::now();
        let m = snapshot.manifest();
        snapshot.check_compatible(
            &self.qemu_version,
            &self.images.kernel_key()?,
            self.accel.accel,
            self.config.isolated_network,
        )?;
        self.check_manifest(m)?;
        let memory = match (m.memory, options.memory) {
            (MemoryFormat::File, RestoreMemory::CopyOnWrite) => {
                Memory::CopyOnWrite(snapshot.memory())
            }
            // A stream snapshot carries RAM in its state: it loads into fresh memory.
            (MemoryFormat::File, RestoreMemory::Copy) | (MemoryFormat::Stream, _) => Memory::Owned,
        };
        let launch = Launch {
            id,
            machine_args: m.machine_args.clone(),
            memory: memory.clone(),
            memory_base: (m.memory == MemoryFormat::File).then(|| snapshot.memory()),
            disk_backing: snapshot.disk(),
            disk_backing_format: "qcow2".into(),
            rootfs_image: m.rootfs_image.clone(),
            disk_mib: m.disk_mib,
            egress: options.egress.unwrap_or(m.egress),
            isolated_network: self.config.isolated_network,
            volumes: volume_drives(m, &options.volumes)?,
            incoming: true,
            start_paused: false,
            postcopy: false,
            boot_timeout: options.timeout,
            rootfs: m.rootfs.clone(),
            vcpus: m.vcpus,
            mem_mib: m.mem_mib,
        };
        if let Some(asked) = options.disk_mib.filter(|&d| d < m.disk_mib) {
            return Err(VmmError::InvalidSpec(format!(
                "disk {asked} MiB is smaller than the snapshot's {} MiB; disks only grow, send at least {}",
                m.disk_mib, m.disk_mib
            )));
        }
        let copy_memory = m.memory == MemoryFormat::File && memory == Memory::Owned;
        let memory_source = copy_memory.then(|| snapshot.memory());
        let vm = self
            .launch(launch, |dir| async move {
                // GiB of guest RAM: copied on a blocking thread.
                if let Some(src) = memory_source {
                    blocking(move || {
                        snapshot::copy_sparse(&src, &dir.join("memory")).map_err(|e| {
                            VmmError::Snapshot(format!("copying the snapshot's memory: {e}"))
                        })
                    })
                    .await?;
                }
                Ok(())
            })
            .await?;
        let deadline = started + options.timeout;
        if let Err(e) = vm.migrate_in(snapshot, deadline).await {
            return Err(vm.boot_failure(e).await);
        }
        let mut vm = self.finish_boot(vm, started).await?;
        // Only a VM resumed from a snapshot shares another's random state: a booted one
        // seeds itself, and an adopted one is the same VM as before.
        reseed(vm.agent()).await?;
        if let Some(asked) = options.disk_mib.filter(|&d| d > m.disk_mib) {
            vm.grow_disk(asked).await?;
        }
        Ok(vm)
    }

    /// Makes the snapshot files fetched into `dir` (from object storage, say) a
    /// snapshot this host restores: checks the manifest against this host, lets QEMU
    /// read the files, flushes them to disk and writes the manifest last. Blocking (the
    /// flush): async callers run it on a blocking thread.
    pub fn import_snapshot(
        &self,
        dir: &Path,
        manifest: SnapshotManifest,
    ) -> Result<Snapshot, VmmError> {
        if manifest.format_version != snapshot::FORMAT_VERSION {
            return Err(VmmError::Snapshot(format!(
                "snapshot {} has format {}, this build reads {}",
                manifest.id,
                manifest.format_version,
                snapshot::FORMAT_VERSION
            )));
        }
        let snapshot = Snapshot::new(dir.to_path_buf(), manifest);
        snapshot.check_compatible(
            &self.qemu_version,
            &self.images.kernel_key()?,
            self.accel.accel,
            self.config.isolated_network,
        )?;
        self.check_manifest(snapshot.manifest())?;
        grant_restore_access(dir, self.run_as.as_ref(), self.private_rom);
        snapshot.commit(true)?;
        Ok(snapshot)
    }

    /// Size of root filesystem `name` in MiB: the smallest disk that holds it.
    pub fn rootfs_mib(&self, name: &str) -> Result<u64, VmmError> {
        let path = self.images.rootfs(name)?;
        Ok(std::fs::metadata(&path)
            .map_err(|e| VmmError::Image(format!("{}: {e}", path.display())))?
            .len()
            .div_ceil(1024 * 1024))
    }

    /// Snapshots `parent` (which keeps running) into `snapshot_dir` and restores `n`
    /// children from it, their memory mapped copy-on-write from the snapshot. The
    /// snapshot is not flushed to disk: it serves only its children, which a host crash
    /// ends too.
    ///
    /// `child_volumes(i, snapshot)` gives child `i` an image for each of the snapshot's
    /// volume slots (never the parent's own: one writer per image).
    pub async fn fork(
        &self,
        parent: &mut QemuVm,
        n: usize,
        snapshot_dir: &Path,
        child_volumes: impl Fn(usize, &Snapshot) -> Result<BTreeMap<u8, PathBuf>, VmmError>,
    ) -> Result<(Snapshot, Vec<QemuVm>), VmmError> {
        let snapshot = parent.snapshot_transient(snapshot_dir, true).await?;
        failpoint::hit("vm.fork.base_taken");
        let options = (0..n)
            .map(|i| {
                Ok(RestoreOptions {
                    memory: RestoreMemory::CopyOnWrite,
                    volumes: child_volumes(i, &snapshot)?,
                    ..RestoreOptions::default()
                })
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        let mut children = Vec::with_capacity(n);
        let results =
            futures::future::join_all(options.iter().map(|o| self.restore(&snapshot, o))).await;
        for r in results {
            children.push(r?);
        }
        Ok((snapshot, children))
    }
}

/// Runs blocking file work (copies and flushes of GiB-sized files) on a blocking
/// thread, off the runtime's workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VmmError> + Send + 'static,
) -> Result<T, VmmError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VmmError::Host(format!("blocking file work: {e}")))?
}

/// The migration bandwidth of a snapshot (bytes/s): as fast as QEMU writes.
const SNAPSHOT_BANDWIDTH: u64 = 1 << 40;

/// Where a copy-on-write VM's migration stream lands before its RAM is split out.
const STREAM_FILE: &str = "state.stream";

/// The RAM block of the guest's memory backend (`-object memory-backend-file,id=mem0`).
const RAM_BLOCK: &str = "mem0";

/// Splits the stream a copy-on-write VM wrote into `dest/state.stream` into `state` and
/// a positional `memory` image of `mem_mib` (see [`crate::ram_stream`]); the stream goes.
/// `false` if this build cannot read the stream (another QEMU's layout): nothing of it is
/// left, and the caller saves a whole stream instead. A failure to read or write (a full
/// disk) fails the snapshot.
async fn split_memory(dest: &Path, mem_mib: u32) -> Result<bool, VmmError> {
    use crate::ram_stream::SplitError;
    let dest = dest.to_path_buf();
    blocking(move || {
        let stream = dest.join(STREAM_FILE);
        let (state, memory) = (dest.join("state"), dest.join("memory"));
        let started = Instant::now();
        let split = (|| {
            let input = std::fs::File::open(&stream)?;
            let output = std::fs::File::create(&state)?;
            let image = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&memory)?;
            let block_bytes = u64::from(mem_mib) << 20;
            // Tests reach the fallback (a stream from another QEMU) this way.
            #[cfg(debug_assertions)]
            if std::env::var_os("NULLSPACE_TEST_REFUSE_RAM_SPLIT").is_some() {
                return Err(SplitError::Format("refused for a test".into()));
            }
            crate::ram_stream::split(input, RAM_BLOCK, block_bytes, &output, &image)
        })();
        let _ = std::fs::remove_file(&stream);
        match split {
            Ok(stats) => {
                tracing::debug!(
                    pages = stats.pages,
                    zero_pages = stats.zero_pages,
                    state_bytes = stats.state_bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "guest RAM split out of the migration stream"
                );
                Ok(true)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&memory);
                let _ = std::fs::remove_file(&state);
                match e {
                    SplitError::Format(why) => {
                        tracing::warn!(why, "the migration stream is saved with its RAM: this snapshot shares fewer chunks");
                        Ok(false)
                    }
                    SplitError::Io(e) => Err(VmmError::Snapshot(format!(
                        "writing the snapshot's memory image: {e}"
                    ))),
                }
            }
        }
    })
    .await
}

/// Lets the unprivileged QEMU of a later restore open a snapshot's files: the memory
/// file read-write (QEMU 7.2 cannot map a read-only file copy-on-write), the disk
/// read-only as a backing file.
fn grant_restore_access(dir: &Path, run_as: Option<&RunAs>, private_rom: bool) {
    let Some(r) = run_as else { return };
    for name in snapshot::FILES {
        let p = dir.join(name);
        if p.exists() {
            let _ = std::os::unix::fs::chown(&p, Some(0), Some(r.shared_gid));
            let mode = if *name == "memory" && !private_rom {
                0o660
            } else {
                0o640
            };
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        }
    }
}

/// How a restored VM gets its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMemory {
    /// A private copy in the VM's directory: the VM can be snapshotted cheaply again.
    #[default]
    Copy,
    /// The snapshot's file mapped copy-on-write: only written pages cost memory.
    CopyOnWrite,
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub memory: RestoreMemory,
    /// Egress of the restored VM; default as recorded in the snapshot.
    pub egress: Option<bool>,
    /// Deadline for the restored VM's agent to answer.
    pub timeout: Duration,
    /// Grow the disk to this size (MiB) after the restore; default the snapshot's.
    pub disk_mib: Option<u64>,
    /// The image each of the snapshot's volume slots uses (LUN → file), one for every
    /// slot its manifest lists.
    pub volumes: BTreeMap<u8, PathBuf>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            memory: RestoreMemory::Copy,
            egress: None,
            timeout: Duration::from_secs(60),
            disk_mib: None,
            volumes: BTreeMap::new(),
        }
    }
}

/// Where a VM's RAM lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Memory {
    /// `memory` in the VM directory, mapped shared: snapshots leave it out of the
    /// migration stream and copy the file.
    Owned,
    /// A snapshot's memory file, mapped private (copy-on-write).
    CopyOnWrite(PathBuf),
}

/// What a VM directory records of its launch, so a later owner can adopt the VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LaunchRecord {
    pid: u32,
    launch: Launch,
    /// The VM's own user and group ID ([`crate::vm_user`]); absent when QEMU runs as
    /// the caller.
    #[serde(default)]
    uid: Option<u32>,
}

/// Everything one QEMU launch needs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Launch {
    id: String,
    machine_args: Vec<String>,
    memory: Memory,
    /// The memory file the VM's RAM started as (the snapshot it was restored from,
    /// copy-on-write or copied): its later snapshots store their RAM as changes to it.
    #[serde(default)]
    memory_base: Option<PathBuf>,
    disk_backing: PathBuf,
    disk_backing_format: String,
    /// The read-only root filesystem image at the bottom of the disk chain.
    rootfs_image: PathBuf,
    disk_mib: u64,
    egress: bool,
    /// In a network namespace of its own (see [`crate::net`]).
    #[serde(default)]
    isolated_network: bool,
    /// Volume disks attached (at launch or since).
    #[serde(default)]
    volumes: Vec<VolumeDrive>,
    incoming: bool,
    /// Started with `-S`: an incoming live migration leaves the VM stopped until its
    /// new owner runs it (the switch-over is the owner's, not QEMU's).
    #[serde(default)]
    start_paused: bool,
    /// An incoming live migration that may switch to post-copy: its QEMU gets the
    /// group that opens `/dev/userfaultfd`, and only it.
    #[serde(default)]
    postcopy: bool,
    boot_timeout: Duration,
    rootfs: String,
    vcpus: u32,
    mem_mib: u32,
}

/// A volume: a raw disk image as a SCSI disk at `lun` on `scsi0`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeDrive {
    /// Its LUN (0 to 7).
    pub lun: u8,
    /// The image file.
    pub path: PathBuf,
    /// Whether the guest sees it write-protected.
    pub read_only: bool,
}

impl VolumeDrive {
    fn node_name(&self) -> String {
        format!("vol{}", self.lun)
    }

    fn device_id(&self) -> String {
        format!("volume{}", self.lun)
    }

    /// The `-blockdev` / `blockdev-add` description (JSON: paths may hold commas).
    fn blockdev(&self) -> serde_json::Value {
        json!({
            "driver": "raw",
            "node-name": self.node_name(),
            "read-only": self.read_only,
            "discard": "unmap",
            "file": {
                "driver": "file",
                "filename": self.path.display().to_string(),
                "read-only": self.read_only,
            }
        })
    }

    /// File name of this slot's image in a snapshot.
    pub fn snapshot_file(lun: u8) -> String {
        format!("volume-{lun}.img")
    }
}

/// The drives of a restore: one image per slot of the snapshot.
fn volume_drives(
    m: &SnapshotManifest,
    images: &BTreeMap<u8, PathBuf>,
) -> Result<Vec<VolumeDrive>, VmmError> {
    m.volumes
        .iter()
        .map(|slot| {
            let path = images.get(&slot.lun).ok_or_else(|| {
                VmmError::InvalidSpec(format!(
                    "snapshot {} has a volume at LUN {}: restore it with an image for it",
                    m.id, slot.lun
                ))
            })?;
            Ok(VolumeDrive {
                lun: slot.lun,
                path: path.clone(),
                read_only: slot.read_only,
            })
        })
        .collect()
}

/// Connects the unix socket `sock`, which QEMU may not have made yet, retrying until
/// `deadline`.
async fn connect_until(sock: &Path, deadline: Instant) -> Result<UnixStream, VmmError> {
    loop {
        match UnixStream::connect(sock).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => {
                return Err(VmmError::Host(format!(
                    "connecting {}: {e}",
                    sock.display()
                )))
            }
        }
    }
}

fn new_vm_id() -> String {
    format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

impl Vmm for QemuVmm {
    type Vm = QemuVm;

    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmmError> {
        let id = new_vm_id();
        let span =
            tracing::info_span!("vm", id = %id, rootfs = %spec.rootfs, accel = %self.accel.accel);
        self.boot_in(spec, &id).instrument(span).await
    }
}

async fn create_overlay(
    backing: &Path,
    backing_format: &str,
    overlay: &Path,
    size_mib: u64,
) -> Result<(), VmmError> {
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        backing_format.as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        overlay.as_os_str(),
        format!("{size_mib}M").as_ref(),
    ])
    .await
    .map_err(|e| VmmError::Host(format!("qemu-img create failed: {e}")))
}

/// Rebases a qcow2 overlay onto `rootfs` (raw), copying into it whatever of its
/// current backing chain differs from the rootfs.
async fn rebase(overlay: &Path, rootfs: &Path) -> Result<(), VmmError> {
    qemu_img(&[
        "rebase".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        "-b".as_ref(),
        rootfs.as_os_str(),
        overlay.as_os_str(),
    ])
    .await
    .map_err(|e| VmmError::Snapshot(format!("flattening the disk: qemu-img rebase failed: {e}")))
}

/// Checks that the qcow2 header of `copy` (the daemon's own copy of a VM's overlay,
/// which QEMU could write) still names `backing` and nothing else: a guest that escaped
/// into QEMU could point it at a host file (`/etc/shadow`) or an external data file,
/// and root's `qemu-img rebase`, or a later restore, would then read it into a
/// snapshot the guest's team can restore. `qemu-img info` opens no backing file.
async fn check_overlay_header(copy: &Path, backing: &Path) -> Result<(), VmmError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(copy)
        .output()
        .await
        .map_err(|e| VmmError::Host(format!("running qemu-img: {e}; install qemu-utils")))?;
    let refuse = |why: String| {
        VmmError::Snapshot(format!(
            "the VM's disk overlay {why}: not snapshotted (its QEMU may have rewritten it)"
        ))
    };
    if !out.status.success() {
        return Err(refuse(format!(
            "is unreadable ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| refuse(format!("has an unreadable header ({e})")))?;
    let named = info["backing-filename"].as_str().unwrap_or_default();
    if Path::new(named) != backing {
        return Err(refuse(format!(
            "names backing file {named:?}, not {}",
            backing.display()
        )));
    }
    if !info["format-specific"]["data"]["data-file"].is_null() {
        return Err(refuse("names an external data file".into()));
    }
    Ok(())
}

/// Runs `qemu-img` with `args`; the error is what it printed.
async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running qemu-img: {e}; install qemu-utils"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

/// Opens `path` without following a link in its last component.
fn open_nofollow(path: &Path, access: libc::c_int) -> std::io::Result<std::fs::File> {
    let write = access & (libc::O_WRONLY | libc::O_RDWR) != 0;
    // Non-blocking: QEMU could have put a FIFO there, and an open or read of one would
    // hang the daemon; and only a regular file is read at all.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file: not read", path.display()),
        ));
    }
    Ok(f)
}

/// The last `max` bytes of `path` (a link is not followed), read by seeking: memory
/// stays bounded however large the file grew.
fn read_tail(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_nofollow(path, libc::O_RDONLY)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
    let mut out = Vec::with_capacity(max.min(len as usize));
    f.take(max as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Bytes of host randomness each handshake gives the guest.
const RESEED_BYTES: usize = 64;

/// Gives a restored guest fresh randomness from the host: every VM restored from one
/// snapshot (a template, a fork's parent, a pause) would otherwise resume with the same
/// CRNG state and read the same bytes. A VM is never handed out with its snapshot's
/// state: a failed reseed fails the restore, except with an agent that predates the
/// request (a snapshot taken before it existed), which is only logged.
async fn reseed(agent: &AgentClient) -> Result<(), VmmError> {
    let mut entropy = [0u8; RESEED_BYTES];
    // SAFETY: getrandom fills at most the buffer's length.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if n != RESEED_BYTES as isize {
        return Err(VmmError::Host(format!(
            "reading host randomness: {}",
            std::io::Error::last_os_error()
        )));
    }
    match tokio::time::timeout(Duration::from_secs(10), agent.reseed(&entropy)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(agent_client::ClientError::Agent(e)))
            if e.code == agent_protocol::ErrorCode::Unsupported =>
        {
            warn!("the guest agent predates reseeding: this VM shares its snapshot's random state until its kernel reseeds");
            Ok(())
        }
        Ok(Err(e)) => Err(VmmError::Agent(format!("reseeding the guest's CRNG: {e}"))),
        Err(_) => Err(VmmError::Agent(
            "reseeding the guest's CRNG: no answer within 10 s".into(),
        )),
    }
}

/// Checks that the unprivileged VM user can reach files under `dir` (snapshots a VM
/// opens live there): every directory on the way must let others through. Errors say
/// which directory and what to do. Always fine when QEMU runs as the caller.
pub fn check_vm_user_can_reach(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(user) = unprivileged_user() else {
        return Ok(());
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    for d in dir.ancestors() {
        let meta = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        let mode = meta.permissions().mode();
        let through = {
            use std::os::unix::fs::MetadataExt;
            // Each VM runs as its own ID with the VM account's groups: only the group
            // and other bits let it through.
            mode & 0o001 != 0 || (user.groups.contains(&meta.gid()) && mode & 0o010 != 0)
        };
        if !through {
            return Err(format!(
                "{} (mode {:o}) does not let the VM user {VM_USER} through, so QEMU could not open snapshots under {}; run `chmod o+x {}` or choose another directory",
                d.display(),
                mode & 0o7777,
                dir.display(),
                d.display()
            ));
        }
    }
    Ok(())
}

/// The account QEMU runs as, described for a host check: `Err` says what is wrong
/// and how to fix it. Not root: QEMU runs as the caller, which is reported as an error
/// (nothing separates QEMU from the daemon then).
pub fn check_vm_user() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the pool manager is not root, so QEMU runs as its caller; run it as root".into(),
        );
    }
    let user = unprivileged_user().ok_or_else(|| {
        format!("no '{VM_USER}' account, so QEMU would run as root; run deploy/install-deps.sh (useradd --system {VM_USER})")
    })?;
    Ok(format!("{VM_USER} (uid {})", user.uid))
}

/// Whether the account QEMU runs as may open `/dev/kvm` (fine where there is none, or
/// QEMU runs as root); `Err` says how to fix it.
pub fn check_vm_user_kvm() -> Result<(), String> {
    let Some(user) = unprivileged_user() else {
        return Ok(());
    };
    let kvm = std::path::Path::new("/dev/kvm");
    if kvm.exists() {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(kvm).map_err(|e| format!("/dev/kvm: {e}"))?;
        let mode = meta.mode();
        let opens = mode & 0o006 == 0o006
            || (meta.uid() == user.uid && mode & 0o600 == 0o600)
            || (user.groups.contains(&meta.gid()) && mode & 0o060 == 0o060);
        if !opens {
            return Err(format!(
                "{VM_USER} cannot open /dev/kvm (mode {:o}, group {}), so VMs fall back to TCG; run deploy/install-deps.sh (chgrp kvm /dev/kvm; chmod 0660 /dev/kvm; usermod -a -G kvm {VM_USER})",
                mode & 0o777,
                meta.gid()
            ));
        }
    }
    Ok(())
}

fn unprivileged_user() -> Option<RunAs> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = CString::new(VM_USER).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return None;
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: buffer and its length are passed together.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(if rc < 0 { 0 } else { n as usize });
    Some(RunAs {
        uid,
        gid,
        groups,
        shared_gid: gid,
    })
}

/// The first line of `qemu -version`: snapshots only restore into the same build.
fn qemu_version_of(qemu: &Path) -> Result<String, VmmError> {
    first_line_of(qemu, "-version").map_err(|e| {
        VmmError::Host(format!(
            "{e}; install qemu-system-x86 or set NULLSPACE_QEMU"
        ))
    })
}

/// The first line `program arg` prints (a version, say), or why it did not run.
pub fn first_line_of(program: &Path, arg: &str) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .arg(arg)
        .output()
        .map_err(|e| format!("{} does not run: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {arg} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Whether this kernel has seccomp and `qemu` has `-sandbox`.
pub fn seccomp_available(qemu: &Path) -> bool {
    let kernel = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:")))
        .unwrap_or(false);
    let qemu_has_it = std::process::Command::new(qemu)
        .arg("-help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("-sandbox"))
        .unwrap_or(false);
    kernel && qemu_has_it
}

/// The group whose members may open `/dev/userfaultfd`: given to a VM's QEMU only
/// while it is the destination of a live migration, which needs userfaultfd for
/// post-copy (QEMU 8.1+ opens the device; the syscall itself needs
/// `vm.unprivileged_userfaultfd=1` or CAP_SYS_PTRACE, which no VM gets).
pub const UFFD_GROUP: &str = "nullspace-uffd";
/// The device post-copy's userfaultfd comes from.
const USERFAULTFD: &str = "/dev/userfaultfd";

/// The group ID an incoming VM's QEMU needs for post-copy, when this host allows it:
/// `/dev/userfaultfd` readable and writable by [`UFFD_GROUP`] and no one else.
/// Otherwise why not (post-copy is then off: migrations are pre-copy only).
pub fn postcopy_access() -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let fix = format!("run deploy/install-deps.sh (groupadd --system {UFFD_GROUP}; chgrp {UFFD_GROUP} {USERFAULTFD}; chmod 0660 {USERFAULTFD}, and the udev rule that keeps it)");
    let name = CString::new(UFFD_GROUP).expect("no NUL");
    // SAFETY: getgrnam returns a pointer into static storage or null; read at once.
    let gid = unsafe {
        let gr = libc::getgrnam(name.as_ptr());
        if gr.is_null() {
            return Err(format!("there is no group {UFFD_GROUP}: {fix}"));
        }
        (*gr).gr_gid
    };
    let meta = std::fs::metadata(USERFAULTFD)
        .map_err(|e| format!("{USERFAULTFD}: {e} (a kernel before 6.1 has none): {fix}"))?;
    let mode = meta.mode() & 0o777;
    if meta.gid() != gid || mode & 0o060 != 0o060 || mode & 0o007 != 0 {
        return Err(format!(
            "{USERFAULTFD} is mode {mode:o}, group {}: {fix}",
            meta.gid()
        ));
    }
    Ok(gid)
}

/// Whether `version` (QEMU's version line) is 8.1 or later: the first to open
/// `/dev/userfaultfd` instead of calling the syscall.
fn opens_userfaultfd_device(version: &str) -> bool {
    let numbers = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or("");
    let mut parts = numbers.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (8, 1)
}

/// Hands a file the VM uses (a volume image) to its QEMU alone: its uid, mode 0600.
fn give_to(path: &Path, run_as: &RunAs) {
    let _ = std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid));
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// Takes a file back from a VM that ended: its uid is claimed again by later VMs, of
/// any team.
fn take_back(path: &Path) {
    let _ = std::os::unix::fs::chown(path, Some(0), Some(0));
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// Whether `qemu` can map a file it opened read-only as private, writable guest RAM
/// (`memory-backend-file,readonly=on,rom=off`, QEMU 8.2+). Without it a template's
/// memory file must be writable by the VM group (QEMU 7.2 opens it read-write, though
/// its writes never reach the file).
pub fn maps_read_only_files_private(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .args(["-object", "memory-backend-file,help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rom="))
        .unwrap_or(false)
}

/// A running QEMU microVM. Dropping it kills QEMU and removes its directory.
pub struct QemuVm {
    id: String,
    /// Set when this process started QEMU; an adopted VM has only its `pid`.
    child: Option<Child>,
    pid: u32,
    /// Shared so that a watch on a migration can outlive a borrow of the VM.
    qmp: Option<Arc<Qmp>>,
    agent: Option<AgentClient>,
    run_as: Option<RunAs>,
    /// Its driver's `private_rom`: template memory opened read-only.
    private_rom: bool,
    /// Its own user ID's claim, released after QEMU is dead.
    uid_claim: Option<VmUid>,
    qemu_version: String,
    kernel_key: String,
    launch: Launch,
    /// Its network namespace, when it has one.
    net: Option<GuestNet>,
    /// What lives exactly as long as this VM handle (its egress proxy, say).
    holds: Vec<Box<dyn std::any::Any + Send + Sync>>,
    /// Its cgroups (the host's limits on QEMU); removed after QEMU is dead.
    cgroup: Option<VmCgroup>,
    /// Its disk overlay, on the state disk; removed after QEMU is dead.
    disk: DiskFile,
    // Last: removed after QEMU is dead.
    dir: VmDir,
}

impl QemuVm {
    /// Waits for QEMU's sockets and negotiates QMP.
    async fn connect_qmp(&mut self, deadline: Instant) -> Result<(), VmmError> {
        let qmp_sock = self.dir.file("qmp.sock");
        let agent_sock = self.dir.file("agent.sock");
        while !(qmp_sock.exists() && agent_sock.exists()) {
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(VmmError::Timeout("QEMU's sockets to appear".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The socket file appears at bind(), a moment before QEMU listens on it.
        let qmp = loop {
            match UnixStream::connect(&qmp_sock).await {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    self.check_alive()?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(VmmError::Host(format!("connecting QMP: {e}"))),
            }
        };
        self.check_peer(&qmp, "QMP")?;
        self.qmp = Some(Arc::new(Qmp::connect(qmp).await?));
        Ok(())
    }

    /// Runs an adopted VM again if its previous owner left it stopped: a pause,
    /// snapshot, fork or hibernate it never finished (`stop`, then `migrate` to the
    /// owner's socket). A migration still under way is cancelled (nobody receives it any
    /// more) and one finishing is waited for; a completed one leaves `postmigrate`,
    /// which `cont` leaves too (QEMU takes the disk back): the guest carries on where it
    /// stopped, and the half-made snapshot is the owner's to discard.
    async fn continue_adopted(&self, deadline: Instant) -> Result<(), VmmError> {
        let mut cancelled = false;
        loop {
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(
                    "an adopted VM's interrupted migration to end".into(),
                ));
            }
            let migration = self.qmp().execute("query-migrate", None).await?;
            match migration["status"].as_str().unwrap_or("") {
                "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
                | "postcopy-active" | "postcopy-paused" | "postcopy-recover" => {
                    if !cancelled {
                        warn!(vm = %self.id, status = %migration["status"], "adopted VM was migrating: cancelled");
                        let _ = self.qmp().execute("migrate_cancel", None).await;
                        cancelled = true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                "cancelling" => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                _ => {}
            }
            let status = self.qmp().execute("query-status", None).await?;
            let state = status["status"].as_str().unwrap_or("");
            match state {
                "running" => return Ok(()),
                // Between a migration's end and its result (`cont` refuses meanwhile).
                "finish-migrate" | "save-vm" | "restore-vm" => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Stopped by its owner (`stop`, or a migration that ended, completed or
                // not, after one): it can go on.
                "paused" | "postmigrate" | "prelaunch" | "debug" | "io-error" => {
                    self.qmp().execute("cont", None).await?;
                    warn!(vm = %self.id, was = state, "adopted VM was stopped: continued");
                    return Ok(());
                }
                // Started to receive a snapshot that never came: it holds no guest.
                "inmigrate" => {
                    return Err(VmmError::Snapshot(
                        "the VM was still being restored when its owner stopped: not adopted"
                            .into(),
                    ))
                }
                "shutdown" | "internal-error" | "guest-panicked" => {
                    return Err(VmmError::Exited(format!("its guest ended: {state}")))
                }
                // Anything else (`suspended`, `watchdog`, ...): the handshake decides.
                _ => return Ok(()),
            }
        }
    }

    /// Fails unless the other end of `socket` is this VM's QEMU: the socket's file is in
    /// a directory QEMU writes, so it could be a link to another VM's socket.
    fn check_peer(&self, socket: &UnixStream, what: &str) -> Result<(), VmmError> {
        let peer = socket
            .peer_cred()
            .map_err(|e| VmmError::Host(format!("the {what} socket's peer: {e}")))?;
        if peer.pid() != Some(self.pid as i32) {
            return Err(VmmError::Host(format!(
                "the {what} socket of {} is served by process {:?}, not its QEMU {}: not used",
                self.id,
                peer.pid(),
                self.pid
            )));
        }
        Ok(())
    }

    /// Connects the agent socket and performs the handshake, watching QEMU meanwhile:
    /// a guest that panics ends QEMU (-no-reboot).
    async fn connect_agent(&mut self, deadline: Instant) -> Result<(), VmmError> {
        let agent = UnixStream::connect(self.dir.file("agent.sock"))
            .await
            .map_err(|e| VmmError::Host(format!("connecting the agent socket: {e}")))?;
        self.check_peer(&agent, "agent")?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let handshake = AgentClient::handshake(agent, remaining);
        tokio::pin!(handshake);
        loop {
            tokio::select! {
                result = &mut handshake => {
                    self.agent = Some(result.map_err(|e| VmmError::Agent(e.to_string()))?);
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => self.check_alive()?,
            }
        }
    }

    /// Kills the VM and turns `reason` into an error that carries what QEMU and the
    /// guest printed.
    async fn boot_failure(mut self, reason: VmmError) -> VmmError {
        let console = self.console_tail(2048);
        let qemu_log = read_tail(&self.dir.file("qemu.log"), 8192)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.kill_now();
        VmmError::Boot {
            reason: Box::new(reason),
            console,
            qemu_log,
        }
    }

    fn check_alive(&mut self) -> Result<(), VmmError> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmmError::Exited(status.to_string()));
            }
        }
        Ok(())
    }

    /// The guest agent connection.
    pub fn agent(&self) -> &AgentClient {
        self.agent
            .as_ref()
            .expect("a booted VM has an agent connection")
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &Qmp {
        self.qmp
            .as_deref()
            .expect("a launched VM has a QMP connection")
    }

    /// The QEMU process ID.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    /// Lets go of the VM without ending it: QEMU keeps running and its directory stays,
    /// for a later owner to [`adopt`](QemuVmm::adopt).
    pub fn release(mut self) {
        self.child = None;
        self.pid = 0;
        self.disk.keep();
        if let Some(c) = &mut self.cgroup {
            c.keep();
        }
        if let Some(u) = &mut self.uid_claim {
            u.keep();
        }
        self.dir.keep();
    }

    /// Hot-plugs a volume image as a SCSI disk; the guest sees a new `sd` device at
    /// `lun` (mounting it is the caller's). Recorded for snapshots and adoption.
    pub async fn attach_volume(&mut self, drive: VolumeDrive) -> Result<(), VmmError> {
        if self.launch.volumes.iter().any(|v| v.lun == drive.lun) {
            return Err(VmmError::InvalidSpec(format!(
                "LUN {} already holds a volume",
                drive.lun
            )));
        }
        if let Some(r) = &self.run_as {
            give_to(&drive.path, r);
        }
        self.qmp()
            .execute("blockdev-add", Some(drive.blockdev()))
            .await?;
        let added = self
            .qmp()
            .execute(
                "device_add",
                Some(json!({
                    "driver": "scsi-hd",
                    "bus": "scsi0.0",
                    "channel": 0,
                    "scsi-id": 0,
                    "lun": drive.lun,
                    "drive": drive.node_name(),
                    "id": drive.device_id(),
                })),
            )
            .await;
        if let Err(e) = added {
            let _ = self
                .qmp()
                .execute(
                    "blockdev-del",
                    Some(json!({ "node-name": drive.node_name() })),
                )
                .await;
            return Err(e.into());
        }
        self.launch.volumes.push(drive);
        self.write_launch_record()?;
        Ok(())
    }

    /// Rewrites the launch record after a change a restarted owner must see.
    fn write_launch_record(&self) -> Result<(), VmmError> {
        let record = LaunchRecord {
            pid: self.pid,
            launch: self.launch.clone(),
            uid: self.uid_claim.as_ref().map(VmUid::uid),
        };
        vm_dir::write_daemon_file(
            self.dir.path(),
            LAUNCH_RECORD,
            &serde_json::to_vec(&record).expect("json"),
            true,
        )
        .map_err(|e| VmmError::Host(format!("writing {LAUNCH_RECORD}: {e}")))
    }

    /// The sockets of this VM's egress proxy, once (none under user-mode networking).
    pub fn take_egress(&mut self) -> Option<EgressSockets> {
        self.net.as_mut()?.take_sockets()
    }

    /// Keeps `value` until this VM handle goes (killed, released or dropped): what
    /// serves the VM stops with it.
    pub fn hold(&mut self, value: impl std::any::Any + Send + Sync) {
        self.holds.push(Box::new(value));
    }

    /// The value of type `T` this VM [`QemuVm::hold`]s, if any.
    pub fn held<T: std::any::Any>(&self) -> Option<&T> {
        self.holds.iter().find_map(|h| h.downcast_ref::<T>())
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The memory file its RAM started as, if it was restored from a snapshot (for a
    /// [`MemoryFormat::Stream`] snapshot, none). Its snapshots' memory differs from it
    /// by the pages the guest wrote since: the base their chunks are stored against.
    pub fn memory_base(&self) -> Option<&Path> {
        self.launch.memory_base.as_deref()
    }

    /// Its disk overlay (on the state disk, not in [`QemuVm::dir`]).
    pub fn disk_path(&self) -> &Path {
        self.disk.path()
    }

    /// The last `max` bytes of the guest's serial console.
    pub fn console_tail(&self, max: usize) -> String {
        let current = read_tail(&self.dir.file("console.log"), max).unwrap_or_default();
        if current.len() >= max {
            return String::from_utf8_lossy(&current).into_owned();
        }
        // Just rotated: the rest of the tail is at the end of the rotated-out part.
        let mut bytes =
            read_tail(&self.dir.file("console.log.1"), max - current.len()).unwrap_or_default();
        bytes.extend_from_slice(&current);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Keeps the console log under `max` bytes however much the guest writes: past it,
    /// its last `max / 2` bytes move to `console.log.1` (replacing the one before) and
    /// the log starts over (QEMU appends, so its next write lands at the new end).
    /// Returns whether it rotated. Neither file is followed if it is a link: QEMU, which
    /// can write the directory, is not trusted.
    pub fn cap_console(&self, max: u64) -> std::io::Result<bool> {
        let path = self.dir.file("console.log");
        let log = open_nofollow(&path, libc::O_RDWR)?;
        if log.metadata()?.len() <= max {
            return Ok(false);
        }
        let tail = read_tail(&path, (max / 2) as usize)?;
        let rotated = self.dir.file("console.log.1");
        let _ = std::fs::remove_file(&rotated);
        let mut old = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&rotated)?;
        std::io::Write::write_all(&mut old, &tail)?;
        log.set_len(0)?;
        Ok(true)
    }

    /// Grows the disk to `mib` and the guest's root filesystem with it.
    pub async fn grow_disk(&mut self, mib: u64) -> Result<(), VmmError> {
        self.qmp()
            .execute(
                "block_resize",
                Some(json!({ "device": "root", "size": mib * 1024 * 1024 })),
            )
            .await?;
        // Snapshots record the size (restores size their overlays by it), and so does the
        // launch record a restarted daemon adopts the VM from.
        self.launch.disk_mib = mib;
        self.write_launch_record()?;
        // The guest learns the new size from a config interrupt, a moment after QMP
        // answers: growing the file system before it has would silently do nothing.
        let want_sectors = mib * 1024 * 1024 / 512;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // A number of a few digits: a guest sending more (or never ending) is cut
            // off, within the deadline.
            let read = async {
                let mut download = self.agent().download("/sys/block/vda/size").await?;
                let mut out = Vec::new();
                while let Some(chunk) = download.chunk().await? {
                    out.extend_from_slice(&chunk);
                    if out.len() > 64 {
                        break;
                    }
                }
                Ok::<_, agent_client::ClientError>(out)
            };
            let seen =
                tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), read)
                    .await
                    .map_err(|_| VmmError::Timeout("the guest's disk size".into()))?
                    .map_err(|e| VmmError::Agent(format!("reading the guest's disk size: {e}")))?;
            let sectors: u64 = String::from_utf8_lossy(&seen).trim().parse().unwrap_or(0);
            if sectors >= want_sectors {
                break;
            }
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(format!(
                    "the guest to see its disk grow to {mib} MiB (it sees {} MiB)",
                    sectors * 512 / (1024 * 1024)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The guest's own grow at boot may still hold the file system's resize (EBUSY):
        // wait for it, within a deadline of its own.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.agent().resize_rootfs().await {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.to_string().contains("busy")
                        && Instant::now() + Duration::from_millis(200) < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(VmmError::Agent(format!("growing the root filesystem: {e}"))),
            }
        }
    }

    /// Stops the vCPUs. Processes in the guest freeze; the agent channel stays open.
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.qmp().execute("stop", None).await?;
        Ok(())
    }

    /// Continues after [`pause`](Self::pause) and sets the guest clock, which stood
    /// still meanwhile.
    pub async fn resume(&self) -> Result<(), VmmError> {
        self.qmp().execute("cont", None).await?;
        self.agent()
            .resync(Duration::from_secs(10))
            .await
            .map_err(|e| VmmError::Agent(e.to_string()))
    }

    /// Writes a snapshot into the new directory `dest`. The VM is stopped while its
    /// state is saved, then continues if `keep_running` (and it was running), else
    /// stays stopped. Every file of the snapshot is flushed to disk before its manifest
    /// is written (after the VM continues): a snapshot that survives a host crash is
    /// whole.
    pub async fn snapshot(
        &mut self,
        dest: &Path,
        keep_running: bool,
    ) -> Result<Snapshot, VmmError> {
        self.snapshot_to(dest, keep_running, true).await
    }

    /// [`snapshot`](Self::snapshot) without the flush to disk, for a snapshot that never
    /// outlives this boot of the host: scratch space published elsewhere and removed, a
    /// fork's base. Saves writing GiB of memory to disk that would only be deleted.
    pub async fn snapshot_transient(
        &mut self,
        dest: &Path,
        keep_running: bool,
    ) -> Result<Snapshot, VmmError> {
        self.snapshot_to(dest, keep_running, false).await
    }

    async fn snapshot_to(
        &mut self,
        dest: &Path,
        keep_running: bool,
        durable: bool,
    ) -> Result<Snapshot, VmmError> {
        let started = Instant::now();
        let io = |what: &str, e: std::io::Error| VmmError::Snapshot(format!("{what}: {e}"));
        std::fs::create_dir(dest).map_err(|e| io(&format!("creating {}", dest.display()), e))?;
        let result = self.snapshot_into(dest).await;
        let was_running = result.as_ref().map(|(_, r)| *r).unwrap_or(true);
        if keep_running && was_running {
            self.resume().await?;
        }
        // The flush and the manifest: the copies are the snapshot's own, so the VM runs
        // again meanwhile.
        let result = match result {
            Ok((snapshot, _)) => {
                failpoint::hit("vm.snapshot.copied");
                let committed = snapshot.clone();
                blocking(move || committed.commit(durable))
                    .await
                    .map(|()| snapshot)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(snapshot) => {
                info!(
                    vm = %self.id,
                    snapshot = %snapshot.manifest().id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    bytes = snapshot.disk_usage(),
                    "snapshot taken"
                );
                Ok(snapshot)
            }
            Err(e) => {
                let dest = dest.to_path_buf();
                let _ = blocking(move || Ok(std::fs::remove_dir_all(dest))).await;
                Err(e)
            }
        }
    }

    /// Saves the VM's state and copies its files into `dest`; the manifest is the
    /// caller's to commit.
    async fn snapshot_into(&mut self, dest: &Path) -> Result<(Snapshot, bool), VmmError> {
        let status = self.qmp().execute("query-status", None).await?;
        let was_running = status["running"].as_bool().unwrap_or(false);
        if was_running {
            self.qmp().execute("stop", None).await?;
        }
        failpoint::hit("vm.snapshot.stopped");
        // With `x-ignore-shared`: a VM that owns its memory file leaves RAM out of the
        // stream; a copy-on-write one sends it, and its pages are taken out of the
        // stream into a positional memory image (`ram_stream`), which makes the same
        // snapshot a shared-memory VM's would be.
        let split_ram = matches!(self.launch.memory, Memory::CopyOnWrite(_));
        self.set_ignore_shared(true).await?;
        self.unthrottle_migration().await?;
        let format = if !split_ram {
            self.save_state(&dest.join("state")).await?;
            MemoryFormat::File
        } else {
            self.save_state(&dest.join(STREAM_FILE)).await?;
            match split_memory(dest, self.launch.mem_mib).await? {
                true => MemoryFormat::File,
                false => {
                    // A stream this build cannot split: saved again as a whole stream
                    // (RAM inside, `x-ignore-shared` off, as a restore of one expects).
                    // QEMU migrates no VM a migration left stopped (`postmigrate`): it
                    // continues for a moment (which takes its disks back) and stops.
                    self.qmp().execute("cont", None).await?;
                    self.qmp().execute("stop", None).await?;
                    self.set_ignore_shared(false).await?;
                    self.save_state(&dest.join("state")).await?;
                    MemoryFormat::Stream
                }
            }
        };
        failpoint::hit("vm.snapshot.state_saved");

        // Migration flushed and released the disk: the overlay is consistent to copy.
        // GiB of memory and disk: copied on a blocking thread.
        let disk = dest.join("disk.qcow2");
        let mut copies = Vec::new();
        if !split_ram {
            copies.push((
                self.dir.file("memory"),
                dest.join("memory"),
                "copying memory".to_string(),
            ));
        }
        copies.push((
            self.disk.path().to_path_buf(),
            disk.clone(),
            "copying the disk overlay".to_string(),
        ));
        for v in &self.launch.volumes {
            copies.push((
                v.path.clone(),
                dest.join(VolumeDrive::snapshot_file(v.lun)),
                format!("copying volume {}", v.lun),
            ));
        }
        blocking(move || {
            for (src, dst, what) in copies {
                snapshot::copy_sparse(&src, &dst)
                    .map_err(|e| VmmError::Snapshot(format!("{what}: {e}")))?;
            }
            Ok(())
        })
        .await?;
        check_overlay_header(&disk, &self.launch.disk_backing).await?;
        if self.launch.disk_backing != self.launch.rootfs_image {
            // This VM was restored: its overlay sits on another snapshot's disk. Fold
            // that layer in, so this snapshot depends only on the read-only rootfs and
            // survives the other snapshot's deletion.
            rebase(&disk, &self.launch.rootfs_image).await?;
        }
        grant_restore_access(dest, self.run_as.as_ref(), self.private_rom);
        let qemu_version = self.qemu_version.clone();
        let manifest = SnapshotManifest {
            format_version: snapshot::FORMAT_VERSION,
            id: format!("snap-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
            source_vm: self.id.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            qemu_version,
            accel: self.accel(),
            kernel_key: self.kernel_key.clone(),
            rootfs: self.launch.rootfs.clone(),
            rootfs_image: self.launch.rootfs_image.clone(),
            machine_args: self.launch.machine_args.clone(),
            vcpus: self.launch.vcpus,
            mem_mib: self.launch.mem_mib,
            disk_mib: self.launch.disk_mib,
            egress: self.launch.egress,
            memory: format,
            isolated_network: self.launch.isolated_network,
            volumes: self
                .launch
                .volumes
                .iter()
                .map(|v| snapshot::VolumeSlot {
                    lun: v.lun,
                    read_only: v.read_only,
                })
                .collect(),
        };
        Ok((Snapshot::new(dest.to_path_buf(), manifest), was_running))
    }

    /// Migrates the (stopped) VM's state into the file `path`: QEMU connects to a
    /// socket of ours and streams it. Not flushed: a durable snapshot's commit does.
    async fn save_state(&self, path: &Path) -> Result<u64, VmmError> {
        let sock = self.dir.file("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| VmmError::Host(format!("binding {}: {e}", sock.display())))?;
        if let Some(r) = &self.run_as {
            let _ = std::os::unix::fs::chown(&sock, Some(r.uid), Some(r.gid));
        }
        let state_path = path.to_path_buf();
        // At most the guest's RAM (a copy-on-write VM sends it) plus device state, from
        // this VM's QEMU only, within the migration's own deadline: a QEMU a guest took
        // over must not fill the state disk or hold the snapshot forever.
        let cap = (u64::from(self.launch.mem_mib) + 256) << 20;
        let qemu_pid = self.pid as i32;
        let receive = tokio::spawn(async move {
            let work = async {
                let (conn, _) = listener.accept().await?;
                if conn.peer_cred()?.pid() != Some(qemu_pid) {
                    return Err(std::io::Error::other("the state came from another process"));
                }
                let mut file = tokio::fs::File::create(&state_path).await?;
                let n =
                    tokio::io::copy(&mut tokio::io::AsyncReadExt::take(conn, cap + 1), &mut file)
                        .await?;
                if n > cap {
                    return Err(std::io::Error::other(format!(
                        "the device state outgrew {} MiB",
                        cap >> 20
                    )));
                }
                Ok::<u64, std::io::Error>(n)
            };
            tokio::time::timeout(Duration::from_secs(330), work)
                .await
                .map_err(|_| std::io::Error::other("timed out receiving the state"))?
        });
        let uri = format!("unix:{}", sock.display());
        let migrated = async {
            self.qmp()
                .execute("migrate", Some(json!({ "uri": uri })))
                .await?;
            self.wait_migration("taking a snapshot").await
        }
        .await;
        if let Err(e) = migrated {
            receive.abort();
            let _ = std::fs::remove_file(&sock);
            return Err(e);
        }
        let received = receive
            .await
            .map_err(|e| VmmError::Snapshot(format!("receiving the state: {e}")))?
            .map_err(|e| VmmError::Snapshot(format!("receiving the state: {e}")))?;
        let _ = std::fs::remove_file(&sock);
        tracing::debug!(bytes = received, "device state saved");
        Ok(received)
    }

    /// Loads a snapshot's state into this VM, started with `-incoming defer`, and runs it.
    async fn migrate_in(&self, snapshot: &Snapshot, deadline: Instant) -> Result<(), VmmError> {
        self.set_ignore_shared(snapshot.manifest().memory == MemoryFormat::File)
            .await?;
        let sock = self.dir.file("incoming.sock");
        let uri = format!("unix:{}", sock.display());
        self.qmp()
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        let mut conn = connect_until(&sock, deadline).await?;
        let mut state = tokio::fs::File::open(snapshot.state())
            .await
            .map_err(|e| VmmError::Snapshot(format!("opening the snapshot state: {e}")))?;
        tokio::io::copy(&mut state, &mut conn)
            .await
            .map_err(|e| VmmError::Snapshot(format!("sending the snapshot state: {e}")))?;
        drop(conn);
        self.wait_migration("restoring a snapshot").await?;
        let _ = std::fs::remove_file(&sock);
        self.qmp().execute("cont", None).await?;
        Ok(())
    }

    /// Lifts QEMU's migration bandwidth limit (128 MiB/s by default, meant for a live
    /// migration over a shared network) for a snapshot of a stopped VM into a local
    /// socket: a copy-on-write VM's RAM would otherwise take a second per 128 MiB.
    async fn unthrottle_migration(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": SNAPSHOT_BANDWIDTH })),
            )
            .await?;
        Ok(())
    }

    /// Sets `x-ignore-shared` for a snapshot's or restore's migration, which runs to
    /// its end by pre-copy: a live migration this VM took part in may have left
    /// post-copy (which QEMU refuses beside ignore-shared) or the pause before the
    /// switch-over on.
    async fn set_ignore_shared(&self, on: bool) -> Result<(), VmmError> {
        self.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [
                    { "capability": "x-ignore-shared", "state": on },
                    { "capability": "postcopy-ram", "state": false },
                    { "capability": "pause-before-switchover", "state": false },
                ] })),
            )
            .await?;
        Ok(())
    }

    /// Polls the migration until it completes; fails with QEMU's reason otherwise.
    async fn wait_migration(&self, what: &str) -> Result<(), VmmError> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let info = self.qmp().execute("query-migrate", None).await?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmmError::Snapshot(format!(
                        "{what}: migration {}: {}",
                        info["status"],
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(VmmError::Timeout(format!("{what} (migration)")))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// The accelerator this VM runs under.
    pub fn accel(&self) -> Accel {
        if self
            .launch
            .machine_args
            .iter()
            .any(|a| a.contains("accel=kvm"))
        {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn kill_now(&mut self) {
        let ends = self.child.is_some() || self.pid != 0;
        self.kill_qemu();
        if ends && self.run_as.is_some() {
            for v in &self.launch.volumes {
                take_back(&v.path);
            }
        }
    }

    fn kill_qemu(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        } else if self.pid != 0 {
            // Adopted: not our child, so no wait(); watch it go instead.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                    .map(|s| {
                        !s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('Z'))
                            .unwrap_or(true)
                    })
                    .unwrap_or(false)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.pid = 0;
    }
}

impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn agent(&self) -> &AgentClient {
        QemuVm::agent(self)
    }

    async fn kill(mut self) {
        // SIGKILL: the guest's state is being thrown away, so nothing to flush.
        self.kill_now();
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill_now();
    }
}
