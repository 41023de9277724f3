//! The local-directory backend: one file per object, written aside (fsynced) and renamed
//! (or, for a conditional put, linked) in, then its directory fsynced: an object whose
//! put returned survives a crash, name and all, so a snapshot's chunks are durable
//! before its manifest is written.

use crate::store::{check_key, ObjectStore, StoreError};
use std::path::{Path, PathBuf};

/// Objects as files under a root directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io<'a>(op: &'static str, key: &'a str) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        key: key.to_string(),
        source,
    }
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(root.join(".tmp")).map_err(io("create", ""))?;
        // Only this process reads the store: every team's snapshots are in it, and a
        // guest that escaped into its QEMU (another user) must not reach them.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", ""))?;
        Ok(Self { root })
    }

    /// `file://<machine ID>/<canonical root>`: equal for two stores exactly when they
    /// are one directory on one machine (the machine ID from `/etc/machine-id`, or the
    /// host name where there is none).
    pub fn identity(&self) -> String {
        let machine = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_default();
        let root = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        format!("file://{machine}{}", root.display())
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// A fresh temp file name beside the root.
    fn temp(&self) -> PathBuf {
        self.root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Writes `data` aside (fsynced), then `commit`s it to `path`: the object and its
    /// name are durable when this returns (the directory is fsynced after the commit,
    /// and any directory it made, in its parent).
    async fn write(
        &self,
        key: &str,
        data: bytes::Bytes,
        commit: fn(&Path, &Path) -> std::io::Result<()>,
    ) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let tmp = self.temp();
        let root = self.root.clone();
        let result =
            tokio::task::spawn_blocking(move || -> Result<(), (&'static str, std::io::Error)> {
                if let Err(e) = write_synced(&tmp, &data) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(("write", e));
                }
                let parent = path.parent().expect("a key's path has a parent");
                let committed = create_dirs(&root, parent)
                    .map_err(|e| ("create", e))
                    .and_then(|()| commit(&tmp, &path).map_err(|e| ("commit", e)));
                // Gone after a rename; a link leaves it (and a failure either way).
                let _ = std::fs::remove_file(&tmp);
                committed?;
                sync_dir(parent).map_err(|e| ("sync", e))
            })
            .await
            // A blocking task cancelled (the runtime shutting down) is an error, not a panic.
            .unwrap_or_else(|e| Err(("write", std::io::Error::other(e))));
        result.map_err(|(op, e)| {
            if e.kind() == std::io::ErrorKind::AlreadyExists && op == "commit" {
                StoreError::AlreadyExists(key.to_string())
            } else {
                io(op, key)(e)
            }
        })
    }
}

/// Writes a new file and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Fsyncs a directory: the names created or removed in it survive a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents up to `root`, each new one made durable in its
/// parent.
fn create_dirs(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir == root || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(root);
    create_dirs(root, parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Made by another writer just now, who may not have synced its parent yet.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    sync_dir(parent)
}

impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        self.write(key, data, |tmp, path| std::fs::rename(tmp, path))
            .await
    }

    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        // link(2) fails if the name exists: the commit is atomic and exclusive (the temp
        // name is removed after).
        self.write(key, data, |tmp, path| std::fs::hard_link(tmp, path))
            .await
    }

    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(b) => Ok(b.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(key.to_string()))
            }
            Err(e) => Err(io("read", key)(e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        tokio::fs::try_exists(self.path(key)?)
            .await
            .map_err(io("stat", key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        // Only the directory the prefix names is walked (listing one sandbox's
        // snapshots must not read the name of every chunk in the store).
        let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        if !dir_part.is_empty() {
            check_key(dir_part)?;
        }
        let listed = prefix.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let mut stack = vec![root.join(dir_part)];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("list", &prefix)(e)),
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let rel = path
                        .strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .to_string();
                    if rel == ".tmp" {
                        continue;
                    }
                    if path.is_dir() {
                        if rel.starts_with(&prefix) || prefix.starts_with(&format!("{rel}/")) {
                            stack.push(path);
                        }
                    } else if rel.starts_with(&prefix) {
                        out.push(rel);
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .unwrap_or_else(|e| Err(io("list", &listed)(std::io::Error::other(e))))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            // Durable too: a delete undone by a crash could bring back a garbage
            // collector's mark of long ago.
            Ok(()) => sync_dir(path.parent().expect("a key's path has a parent")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(io("delete", key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_walk_only_what_the_prefix_names() {
        let root = std::env::temp_dir().join(format!("local-list-{}", std::process::id()));
        let store = LocalStore::open(&root).unwrap();
        for key in [
            "snapshots/a/1.json",
            "snapshots/ab/2.json",
            "snapshots/b/3.json",
            "chunks/x",
        ] {
            store.put(key, b"v".to_vec().into()).await.unwrap();
        }
        assert_eq!(
            store.list("snapshots/a/").await.unwrap(),
            ["snapshots/a/1.json"]
        );
        assert_eq!(
            store.list("snapshots/a").await.unwrap(),
            ["snapshots/a/1.json", "snapshots/ab/2.json"]
        );
        assert_eq!(store.list("").await.unwrap().len(), 4);
        assert!(store.list("missing/").await.unwrap().is_empty());
        assert!(store.list("../etc/").await.is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}
