//! Booting and controlling Nullspace microVMs.
//!
//! [`Vmm`] is the small seam between the pool manager and a hypervisor; [`QemuVmm`]
//! implements it with QEMU's `microvm` machine, controlled over [`qmp`]. Each VM talks to
//! the host through its guest agent ([`agent_client::AgentClient`]) on a virtio-serial
//! port. Everything a VM owns lives in its [`vm_dir::VmDir`].

pub mod accel;
pub mod cgroup;
pub mod images;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod ram_stream;
pub mod snapshot;
pub mod space;
pub mod tsc;
pub mod vm_dir;
pub mod vm_user;

pub use accel::{Accel, AccelChoice, Detection};
pub use images::ImageSet;
pub use qemu::{
    IncomingSocket, IncomingSpec, IncomingVolume, LiveOptions, MigrationStats, QemuConfig, QemuVm,
    QemuVmm, RestoreMemory, RestoreOptions, Switchover, VolumeDrive,
};
pub use snapshot::{MemoryFormat, Snapshot, SnapshotManifest};

use agent_client::AgentClient;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Root filesystem of the image set (`minimal`, `base`).
    pub rootfs: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    /// Size of the VM's disk; the root filesystem grows to fill it.
    pub disk_mib: u64,
    /// Whether the guest may open connections out. Recorded with the VM and its
    /// snapshots; the egress proxy enforces it under isolated networking, and
    /// user-mode networking never lets anything out (`restrict=on`).
    pub egress: bool,
    /// How long to wait for the agent before declaring the boot failed.
    pub boot_timeout: Duration,
}

impl Default for VmSpec {
    /// The product's default shape: `base`, 2 vCPUs, 2048 MiB, 8192 MiB disk, egress on.
    fn default() -> Self {
        Self {
            rootfs: "base".into(),
            vcpus: 2,
            mem_mib: 2048,
            disk_mib: 8192,
            egress: true,
            boot_timeout: Duration::from_secs(120),
        }
    }
}

/// A hypervisor driver.
pub trait Vmm {
    /// Its VM handle.
    type Vm: Vm;

    /// Boots a VM and waits until its agent answers.
    fn boot(&self, spec: &VmSpec) -> impl Future<Output = Result<Self::Vm, VmmError>> + Send;
}

/// A running VM.
pub trait Vm {
    /// The VM's ID (also its directory's name).
    fn id(&self) -> &str;

    /// Its agent connection.
    fn agent(&self) -> &AgentClient;

    /// Ends the VM and removes everything it owned on the host.
    fn kill(self) -> impl Future<Output = ()> + Send;
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The request cannot be served as asked; the message says what to send instead.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// The image set is missing or broken.
    #[error("guest image: {0}")]
    Image(String),
    /// The host lacks something the driver needs.
    #[error("host: {0}")]
    Host(String),
    /// QEMU exited on its own.
    #[error("QEMU exited ({0})")]
    Exited(String),
    /// Waiting for something timed out.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The agent handshake failed.
    #[error("guest agent: {0}")]
    Agent(String),
    /// A file system the VM would write has too little room left; the message says
    /// which, how much is free and what to do.
    #[error("not enough space: {0}")]
    NoSpace(String),
    /// Taking, reading or restoring a snapshot failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The snapshot cannot be restored on this host; the message says why and what to do.
    #[error("snapshot cannot be restored here: {0}")]
    SnapshotMismatch(String),
    /// A live migration failed; the message says at which step and why.
    #[error("live migration: {0}")]
    Migration(String),
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    /// The VM did not come up; carries what QEMU and the guest printed.
    #[error("VM did not boot: {reason}\n--- guest console (tail) ---\n{console}\n--- qemu ---\n{qemu_log}")]
    Boot {
        reason: Box<VmmError>,
        console: String,
        qemu_log: String,
    },
}

/// The cache directory: `$NULLSPACE_CACHE`, default `/var/cache/nullspace`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NULLSPACE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/nullspace".into())
}
