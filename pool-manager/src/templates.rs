//! Template snapshots: a template booted once per resource shape and snapshotted, so
//! every sandbox is a restore. Memory and vCPUs are fixed by a snapshot, hence one per
//! shape; the disk grows at restore. Cached in the state dir under a key of everything
//! the snapshot depends on, so they survive restarts while their inputs are unchanged.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Mutex;
use vmm::{QemuVmm, Snapshot, Vm, VmSpec, Vmm, VmmError};

/// The built-in templates and the root filesystems they boot.
pub const BUILTIN: &[&str] = api_model::BUILTIN_TEMPLATES;

/// Template snapshots by shape, made on first use.
pub struct Templates {
    dir: PathBuf,
    vmm: QemuVmm,
    /// One lock per key so concurrent first uses build a snapshot once.
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Templates {
    /// Templates kept under `dir`.
    pub fn new(dir: PathBuf, vmm: QemuVmm) -> Self {
        Self {
            dir,
            vmm,
            building: Mutex::default(),
        }
    }

    fn key(&self, template: &str, vcpus: u32, mem_mib: u32) -> String {
        let inputs = format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.vmm.images().key(),
            if self.vmm.isolated_network() {
                "isolated"
            } else {
                "user"
            },
            self.vmm.qemu_version(),
            self.vmm.accel().accel,
            template,
            vcpus,
            mem_mib
        );
        let hash = hex::encode(&Sha256::digest(inputs.as_bytes())[..8]);
        format!("{template}-{vcpus}x{mem_mib}-{hash}")
    }

    /// The snapshot of `template` with this shape, booting and snapshotting it first if
    /// there is none yet.
    pub async fn snapshot(
        &self,
        template: &str,
        vcpus: u32,
        mem_mib: u32,
    ) -> Result<Snapshot, VmmError> {
        let key = self.key(template, vcpus, mem_mib);
        let dir = self.dir.join(&key);
        if let Ok(s) = Snapshot::open(&dir) {
            return Ok(s);
        }
        let lock = self
            .building
            .lock()
            .await
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Ok(s) = Snapshot::open(&dir) {
            return Ok(s);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| VmmError::Host(format!("creating {}: {e}", self.dir.display())))?;
        let started = std::time::Instant::now();
        let spec = VmSpec {
            rootfs: template.to_string(),
            vcpus,
            mem_mib,
            disk_mib: self.vmm.rootfs_mib(template)?,
            egress: true,
            boot_timeout: std::time::Duration::from_secs(120),
        };
        // Built aside and renamed into place: another daemon sharing the directory may
        // build the same key at the same time, and a crash must not leave a half snapshot.
        let tmp = self.dir.join(format!(
            ".{key}.tmp-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut vm = self.vmm.boot(&spec).await?;
        let built = vm.snapshot(&tmp, false).await;
        vm.kill().await;
        built?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Someone else finished first: theirs is as good as ours.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let snapshot = Snapshot::open(&dir)?;
        tracing::info!(
            template,
            vcpus,
            mem_mib,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "template snapshot made"
        );
        Ok(snapshot)
    }
}
