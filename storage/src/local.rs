//! The local-directory backend: one file per object, written aside and renamed in.

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

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes `data` to a temp file beside the root, fsyncs it, and returns its path.
    async fn stage(&self, key: &str, data: &[u8]) -> Result<PathBuf, StoreError> {
        let tmp = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let data = data.to_vec();
        let t = tmp.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&t)?;
            f.write_all(&data)?;
            f.sync_all()
        })
        .await
        .expect("stage task")
        .map_err(io("write", key))?;
        Ok(tmp)
    }
}

async fn ensure_parent(path: &Path, key: &str) -> Result<(), StoreError> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io("create", key))?;
    }
    Ok(())
}

impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        ensure_parent(&path, key).await?;
        let tmp = self.stage(key, &data).await?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io("commit", key))
    }

    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        ensure_parent(&path, key).await?;
        let tmp = self.stage(key, &data).await?;
        // link(2) fails if the name exists: the commit is atomic and exclusive.
        let result = tokio::fs::hard_link(&tmp, &path).await;
        let _ = tokio::fs::remove_file(&tmp).await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StoreError::AlreadyExists(key.to_string()))
            }
            Err(e) => Err(io("commit", key)(e)),
        }
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
        .expect("list task")
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("delete", key)(e)),
        }
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
