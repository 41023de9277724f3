//! The object-store interface.

use std::future::Future;

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No object under this key.
    #[error("object {0} does not exist")]
    NotFound(String),
    /// A conditional write found an object already there.
    #[error("object {0} already exists")]
    AlreadyExists(String),
    /// An object's content does not match its content address.
    #[error("object {key} is corrupt: expected sha256 {expected}, found {found}")]
    Corrupt {
        /// The key read.
        key: String,
        /// The hash it should have.
        expected: String,
        /// The hash it has.
        found: String,
    },
    /// The backend failed.
    #[error("{op} {key}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which key.
        key: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A remote backend (S3) refused or failed a request.
    #[error("{op} {key}: {message}")]
    Backend {
        /// What was attempted.
        op: &'static str,
        /// On which key.
        key: String,
        /// What the backend said.
        message: String,
    },
    /// A key that is not a relative path of plain segments.
    #[error("invalid key {0:?}: use relative paths of [A-Za-z0-9._-] segments")]
    InvalidKey(String),
}

/// A flat key → bytes store with atomic object writes.
pub trait ObjectStore: Send + Sync {
    /// Writes an object (replacing any), atomically: readers see all or nothing.
    fn put(
        &self,
        key: &str,
        data: bytes::Bytes,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes an object only if none exists under `key` ([`StoreError::AlreadyExists`]
    /// otherwise): how a manifest commits a snapshot exactly once.
    fn put_if_absent(
        &self,
        key: &str,
        data: bytes::Bytes,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads an object.
    fn get(&self, key: &str) -> impl Future<Output = Result<bytes::Bytes, StoreError>> + Send;

    /// Whether an object exists.
    fn exists(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Keys under `prefix`, sorted.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Deletes an object (absent is fine).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Checks a key: relative, `/`-separated, plain segments (no `..`, no empty segment).
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidKey(key.to_string()))
    }
}

/// The configured backend, plus an optional injected fault or latency (tests).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    fault: Option<std::sync::Arc<FaultPlan>>,
    latency: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(crate::LocalStore),
    S3(crate::S3Store),
}

/// A one-shot fault: after `after` more successful puts, the next put fails.
#[derive(Debug)]
struct FaultPlan {
    remaining: std::sync::atomic::AtomicI64,
}

impl Store {
    /// A local-directory store.
    pub fn local(store: crate::LocalStore) -> Self {
        Self {
            backend: Backend::Local(store),
            fault: None,
            latency: None,
        }
    }

    /// Whether objects are kept in a local directory (on this host's disks).
    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// An S3 store.
    pub fn s3(store: crate::S3Store) -> Self {
        Self {
            backend: Backend::S3(store),
            fault: None,
            latency: None,
        }
    }

    /// Test hook: the put after the next `after` puts fails once (as if the server went
    /// away mid-upload); puts after it succeed again.
    pub fn with_fault_after_puts(mut self, after: u32) -> Self {
        self.fault = Some(std::sync::Arc::new(FaultPlan {
            remaining: std::sync::atomic::AtomicI64::new(after as i64),
        }));
        self
    }

    /// Test hook: every operation waits `latency` first, as one on a remote store would
    /// (races between workers sharing a local directory then play out as over S3).
    pub fn with_latency(mut self, latency: std::time::Duration) -> Self {
        self.latency = Some(latency);
        self
    }

    async fn delay(&self) {
        if let Some(d) = self.latency {
            tokio::time::sleep(d).await;
        }
    }

    /// What names the objects this store reads and writes, whatever host opened it:
    /// two hosts with the same identity share snapshots (S3: `<endpoint>/<bucket>/
    /// <prefix>`; a local directory: `file://<machine ID><path>`).
    pub fn identity(&self) -> String {
        match &self.backend {
            Backend::Local(s) => s.identity(),
            Backend::S3(s) => s.identity(),
        }
    }

    /// Which backend, for logs.
    pub fn describe(&self) -> &'static str {
        match self.backend {
            Backend::Local(_) => "local directory",
            Backend::S3(_) => "S3",
        }
    }

    fn check_fault(&self, key: &str) -> Result<(), StoreError> {
        if let Some(f) = &self.fault {
            // Counts down through zero once; the put that reaches -1 fails.
            if f.remaining
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                return Err(StoreError::Backend {
                    op: "put",
                    key: key.to_string(),
                    message: "injected fault (NULLSPACE_TEST_FAIL_PUT_AFTER)".into(),
                });
            }
        }
        Ok(())
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {{
        $self.delay().await;
        match &$self.backend {
            Backend::Local($s) => $e,
            Backend::S3($s) => $e,
        }
    }};
}

impl ObjectStore for Store {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        self.check_fault(key)?;
        dispatch!(self, s => s.put(key, data).await)
    }

    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        self.check_fault(key)?;
        dispatch!(self, s => s.put_if_absent(key, data).await)
    }

    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        dispatch!(self, s => s.get(key).await)
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.exists(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.list(prefix).await)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete(key).await)
    }
}
