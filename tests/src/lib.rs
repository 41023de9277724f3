//! Shared helpers for the end-to-end tests and benchmarks: a driver configured from the
//! environment, small VM shapes, and request builders.

use agent_protocol::{Command, ExecRequest};
use std::time::Duration;
use vmm::{ImageSet, QemuConfig, QemuVmm, VmSpec};

/// A driver for the built image set, configured from the environment
/// (`NULLSPACE_ACCEL`, `NULLSPACE_IMAGES`, `NULLSPACE_RUN_DIR`).
pub async fn driver() -> QemuVmm {
    init_logging();
    let config = QemuConfig::from_env().expect("driver configuration");
    let images = ImageSet::from_env().expect("a built image set (run deploy/build.sh)");
    QemuVmm::new(config, images).await.expect("driver")
}

/// Logs to the test's captured output, filtered by `RUST_LOG`.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The small `minimal` shape tests boot: 1 vCPU, 256 MiB, 256 MiB disk.
pub fn minimal() -> VmSpec {
    VmSpec {
        rootfs: "minimal".into(),
        vcpus: 1,
        mem_mib: 256,
        disk_mib: 256,
        egress: true,
        boot_timeout: Duration::from_secs(90),
    }
}

/// A shell command line as the default user in the default directory.
pub fn sh(line: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(line.into()),
        env: Default::default(),
        cwd: None,
        user: None,
        background: false,
        stdin: false,
    }
}

/// A program and its arguments.
pub fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(args.iter().map(|s| s.to_string()).collect()),
        ..sh("")
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a process with this PID exists (zombies count as gone).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            state != Some(Some('Z'))
        })
        .unwrap_or(false)
}

/// A directory for a test's snapshots on tmpfs (where the memory files must be),
/// removed with everything in it when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// A fresh `/dev/shm/nullspace-test-<name>-<pid>`.
    pub fn new(name: &str) -> Self {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/nullspace-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
