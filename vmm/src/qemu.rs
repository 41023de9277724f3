//! The QEMU `microvm` driver.
//!
//! One QEMU process per VM, with its control sockets, disk overlay and console log in the
//! VM's own directory ([`VmDir`]). The disk is the image set's read-only root filesystem
//! under a per-VM qcow2 overlay whose virtual size is the asked disk size; the agent
//! grows the filesystem to fill it at boot.

use crate::accel::{self, Accel, AccelChoice, Detection};
use crate::images::ImageSet;
use crate::qmp::Qmp;
use crate::vm_dir::{self, VmDir};
use crate::{tsc, Vm, VmSpec, Vmm, VmmError};
use agent_client::AgentClient;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tracing::{info, warn, Instrument};

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
    /// Accelerator, or auto-detection.
    pub accel: AccelChoice,
}

impl QemuConfig {
    /// Defaults, overridden by `NULLSPACE_QEMU`, `NULLSPACE_RUN_DIR`, `NULLSPACE_ACCEL`.
    pub fn from_env() -> Result<Self, VmmError> {
        Ok(Self {
            qemu_binary: std::env::var_os("NULLSPACE_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            run_dir: std::env::var_os("NULLSPACE_RUN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/dev/shm/nullspace".into()),
            accel: std::env::var("NULLSPACE_ACCEL")
                .unwrap_or_default()
                .parse()?,
        })
    }
}

/// Credentials QEMU is started with.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
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
}

impl QemuVmm {
    /// A driver for `images`, resolving the accelerator (probing if asked to).
    pub async fn new(config: QemuConfig, images: ImageSet) -> Result<Self, VmmError> {
        let tsc_khz = tsc::host_tsc_khz().map_err(VmmError::Host)?;
        let run_as = unprivileged_user();
        if run_as.is_none() {
            warn!("QEMU runs with this process's own privileges (no '{VM_USER}' account, or not root)");
        }
        let seccomp = seccomp_available(&config.qemu_binary);
        if !seccomp {
            warn!("QEMU runs without -sandbox: this host or QEMU build has no seccomp");
        }
        vm_dir::reap_orphans(&config.run_dir);
        let mut vmm = Self {
            config,
            images,
            accel: Detection {
                accel: Accel::Tcg,
                reason: "not yet detected".into(),
            },
            tsc_khz,
            run_as,
            seccomp,
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
    /// With `use_cache`, a result from earlier in this host boot is reused.
    pub async fn detect_accel(&self, use_cache: bool) -> Detection {
        let cache_file = crate::cache_dir().join("accel.json");
        let key = accel::cache_key(&self.images.key());
        if use_cache {
            if let Some(d) = accel::load_cached(&cache_file, &key) {
                return d;
            }
        }
        let detection = match accel::kvm_device_usable() {
            Err(e) => Detection {
                accel: Accel::Tcg,
                reason: format!("{e}; using TCG"),
            },
            Ok(()) => {
                let mut probe = self.clone();
                probe.accel = Detection {
                    accel: Accel::Kvm,
                    reason: "probe".into(),
                };
                let spec = VmSpec {
                    rootfs: "minimal".into(),
                    vcpus: 1,
                    mem_mib: 256,
                    disk_mib: 256,
                    egress: false,
                    boot_timeout: KVM_PROBE_TIMEOUT,
                };
                match probe.boot(&spec).await {
                    Ok(vm) => {
                        vm.kill().await;
                        Detection {
                            accel: Accel::Kvm,
                            reason: "a guest booted under KVM".into(),
                        }
                    }
                    Err(e) => Detection {
                        accel: Accel::Tcg,
                        reason: format!(
                            "/dev/kvm opens but a guest did not boot under it ({e}); using TCG"
                        ),
                    },
                }
            }
        };
        accel::store_cached(&cache_file, &key, &detection);
        detection
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &Detection {
        &self.accel
    }

    /// The image set VMs boot from.
    pub fn images(&self) -> &ImageSet {
        &self.images
    }

    /// Whether QEMU runs under `-sandbox on`.
    pub fn seccomp(&self) -> bool {
        self.seccomp
    }

    fn kernel_cmdline(&self) -> String {
        format!(
            "console=ttyS0 root=/dev/vda rw pci=off quiet loglevel=4 panic=-1 {}",
            tsc::kernel_params(self.tsc_khz)
        )
    }

    fn qemu_args(&self, spec: &VmSpec, dir: &VmDir) -> Vec<String> {
        let path = |name: &str| dir.file(name).display().to_string();
        let accel = self.accel.accel;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!(
                "nullspace-{}",
                dir.path().file_name().unwrap_or_default().to_string_lossy()
            ),
            "-M".into(),
            format!("microvm,accel={accel},pic=off,pit=off,rtc=off,isa-serial=on"),
            "-cpu".into(),
            match accel {
                Accel::Kvm => "host".into(),
                Accel::Tcg => "max".into(),
            },
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.mem_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.images.kernel().display().to_string(),
            "-initrd".into(),
            self.images.initrd().display().to_string(),
            "-append".into(),
            self.kernel_cmdline(),
            "-chardev".into(),
            format!("file,id=console,path={}", path("console.log")),
            "-serial".into(),
            "chardev:console".into(),
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                path("disk.qcow2")
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-netdev".into(),
            if spec.egress {
                "user,id=net0".into()
            } else {
                "user,id=net0,restrict=on".into()
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
        ];
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

    async fn boot_in(&self, spec: &VmSpec, id: &str) -> Result<QemuVm, VmmError> {
        let started = Instant::now();
        let rootfs = self.validate(spec)?;
        let dir = VmDir::create(&self.config.run_dir, id)
            .map_err(|e| VmmError::Host(format!("creating the VM directory: {e}")))?;
        create_overlay(&rootfs, &dir.file("disk.qcow2"), spec.disk_mib).await?;
        if let Some(run_as) = &self.run_as {
            for p in [dir.path().to_path_buf(), dir.file("disk.qcow2")] {
                std::os::unix::fs::chown(&p, Some(run_as.uid), Some(run_as.gid))
                    .map_err(|e| VmmError::Host(format!("chown {}: {e}", p.display())))?;
            }
        }
        let log = std::fs::File::create(dir.file("qemu.log"))
            .map_err(|e| VmmError::Host(format!("creating qemu.log: {e}")))?;
        let mut cmd = std::process::Command::new(&self.config.qemu_binary);
        cmd.args(self.qemu_args(spec, &dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| VmmError::Host(e.to_string()))?)
            .stderr(log);
        let run_as = self.run_as.clone();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(r) = &run_as {
                    if libc::setgroups(r.groups.len(), r.groups.as_ptr()) != 0
                        || libc::setgid(r.gid) != 0
                        || libc::setuid(r.uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // QEMU dies with the thread that started it: no VM outlives a crashed
                // owner. Set after the uid change, which would clear it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
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
        let _ = dir.record_qemu(child.id());
        let mut vm = QemuVm {
            id: id.to_string(),
            child: Some(child),
            qmp: None,
            agent: None,
            accel: self.accel.accel,
            dir,
        };
        let deadline = started + spec.boot_timeout;
        match vm.connect(deadline).await {
            Ok(()) => {
                info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "VM booted"
                );
                Ok(vm)
            }
            Err(e) => {
                let console = vm.console_tail(2048);
                let qemu_log = std::fs::read_to_string(vm.dir.file("qemu.log")).unwrap_or_default();
                vm.kill().await;
                Err(VmmError::Boot {
                    reason: e.to_string(),
                    console,
                    qemu_log,
                })
            }
        }
    }
}

impl Vmm for QemuVmm {
    type Vm = QemuVm;

    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmmError> {
        let id = format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let span =
            tracing::info_span!("vm", id = %id, rootfs = %spec.rootfs, accel = %self.accel.accel);
        self.boot_in(spec, &id).instrument(span).await
    }
}

async fn create_overlay(base: &Path, overlay: &Path, size_mib: u64) -> Result<(), VmmError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay)
        .arg(format!("{size_mib}M"))
        .output()
        .await
        .map_err(|e| VmmError::Host(format!("running qemu-img: {e}; install qemu-utils")))?;
    if !out.status.success() {
        return Err(VmmError::Host(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
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
    Some(RunAs { uid, gid, groups })
}

fn seccomp_available(qemu: &Path) -> bool {
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

/// A running QEMU microVM. Dropping it kills QEMU and removes its directory.
pub struct QemuVm {
    id: String,
    child: Option<Child>,
    qmp: Option<Qmp>,
    agent: Option<AgentClient>,
    accel: Accel,
    // Last: removed after QEMU is dead.
    dir: VmDir,
}

impl QemuVm {
    async fn connect(&mut self, deadline: Instant) -> Result<(), VmmError> {
        let qmp_sock = self.dir.file("qmp.sock");
        let agent_sock = self.dir.file("agent.sock");
        while !(qmp_sock.exists() && agent_sock.exists()) {
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(VmmError::Timeout("QEMU's sockets to appear".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let qmp = UnixStream::connect(&qmp_sock)
            .await
            .map_err(|e| VmmError::Host(format!("connecting QMP: {e}")))?;
        self.qmp = Some(Qmp::connect(qmp).await?);
        let agent = UnixStream::connect(&agent_sock)
            .await
            .map_err(|e| VmmError::Host(format!("connecting the agent socket: {e}")))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Watch QEMU while waiting: a guest that panics ends QEMU (-no-reboot).
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
        self.qmp.as_ref().expect("a booted VM has a QMP connection")
    }

    /// The QEMU process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The accelerator this VM runs under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The last `max` bytes of the guest's serial console.
    pub fn console_tail(&self, max: usize) -> String {
        let bytes = std::fs::read(self.dir.file("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max)..]).into_owned()
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
