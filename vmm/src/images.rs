//! Locating a built guest image set (see `deploy/guest-image/build.sh`).

use crate::VmmError;
use std::path::{Path, PathBuf};

/// A kernel, its initramfs and the root filesystems built with them.
#[derive(Debug, Clone)]
pub struct ImageSet {
    dir: PathBuf,
}

impl ImageSet {
    /// The set in `dir`, which must hold a `manifest.json`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, VmmError> {
        let dir = dir.into();
        if !dir.join("manifest.json").is_file() {
            return Err(VmmError::Image(format!(
                "{} is not a guest image set (no manifest.json); build one with deploy/guest-image/build.sh",
                dir.display()
            )));
        }
        let dir = dir
            .canonicalize()
            .map_err(|e| VmmError::Image(format!("{}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    /// `$NULLSPACE_IMAGES`, else `$NULLSPACE_CACHE/images/current` (default cache
    /// `/var/cache/nullspace`).
    pub fn from_env() -> Result<Self, VmmError> {
        if let Ok(dir) = std::env::var("NULLSPACE_IMAGES") {
            return Self::open(dir);
        }
        Self::open(crate::cache_dir().join("images/current"))
    }

    /// The set's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The content key the set was built under (its directory's hash).
    pub fn key(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().trim_start_matches("set-").to_string())
            .unwrap_or_default()
    }

    /// The key of the kernel layer (kernel package and initramfs): a snapshot's RAM
    /// holds a running kernel, so it restores only under the same one.
    pub fn kernel_key(&self) -> Result<String, VmmError> {
        let text = std::fs::read_to_string(self.dir.join("manifest.json"))
            .map_err(|e| VmmError::Image(format!("{}/manifest.json: {e}", self.dir.display())))?;
        let manifest: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| VmmError::Image(format!("{}/manifest.json: {e}", self.dir.display())))?;
        manifest["kernel_key"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                VmmError::Image(format!(
                    "{}/manifest.json has no kernel_key",
                    self.dir.display()
                ))
            })
    }

    /// The guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }

    /// The read-only root filesystem image called `name` (`minimal`, `base`).
    pub fn rootfs(&self, name: &str) -> Result<PathBuf, VmmError> {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let path = self.dir.join(format!("{name}.ext4"));
        if valid && path.is_file() {
            return Ok(path);
        }
        Err(VmmError::InvalidSpec(format!(
            "no root filesystem '{name}' in {}; send one of: {}",
            self.dir.display(),
            self.rootfs_names().join(", ")
        )))
    }

    /// Names of the root filesystems in the set.
    pub fn rootfs_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".ext4"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }
}
