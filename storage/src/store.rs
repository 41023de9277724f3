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
