//! Seed 001's `Snapshot`: a checkpoint [`crate::Sandbox::snapshot`] took, which can be
//! restored into a new sandbox or deleted.

use crate::models::{RestoreOptions, SnapshotInfo};
use crate::sandbox::call;
use crate::{ConnectionConfig, Error, Result, Sandbox};
use std::time::SystemTime;

/// A stored snapshot of a sandbox (memory, processes and disk at one instant) with the
/// calls on it. Manual snapshots survive [`Sandbox::kill`]; the ID also works as a
/// template in [`crate::CreateOptions::new`].
///
/// ```no_run
/// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
/// use nullspace::RestoreOptions;
/// let snap = sbx.snapshot().await?;
/// println!("{} ({} bytes, {})", snap.id(), snap.size, snap.kind);
/// let copy = snap.restore(&RestoreOptions::default()).await?;
/// snap.delete().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Snapshot {
    /// Its ID (`snap-…`).
    pub snapshot_id: String,
    /// `pause`, `periodic` or `manual`.
    pub kind: String,
    /// When it was taken.
    pub created: SystemTime,
    /// Bytes a restore materializes.
    pub size: u64,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// The API's full description.
    pub info: SnapshotInfo,
    config: ConnectionConfig,
    http: reqwest::Client,
}

// By hand: the connection's API key stays out of logs and assertion messages.
impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("snapshot_id", &self.snapshot_id)
            .field("kind", &self.kind)
            .field("created", &self.created)
            .field("size", &self.size)
            .field("sandbox_id", &self.sandbox_id)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    pub(crate) fn new(
        config: ConnectionConfig,
        http: reqwest::Client,
        info: SnapshotInfo,
    ) -> Result<Self> {
        let created = crate::time::parse_rfc3339(&info.created_at).ok_or_else(|| {
            Error::Protocol(format!(
                "snapshot {} has createdAt {:?}, not RFC 3339",
                info.snapshot_id, info.created_at
            ))
        })?;
        Ok(Self {
            snapshot_id: info.snapshot_id.clone(),
            kind: info.kind.clone(),
            created,
            size: info.size_bytes,
            sandbox_id: info.sandbox_id.clone(),
            info,
            config,
            http,
        })
    }

    /// Its ID (the same as `snapshot_id`).
    pub fn id(&self) -> &str {
        &self.snapshot_id
    }

    /// Starts a new sandbox from this snapshot (on any worker sharing the store) and
    /// returns it connected; `options.snapshot_id` is ignored (this snapshot is the one).
    pub async fn restore(&self, options: &RestoreOptions) -> Result<Sandbox> {
        let options = RestoreOptions {
            snapshot_id: Some(self.snapshot_id.clone()),
            ..options.clone()
        };
        Sandbox::restore(&self.config, &self.sandbox_id, &options).await
    }

    /// Deletes it from the store.
    pub async fn delete(&self) -> Result<()> {
        call(
            &self.http,
            &self.config,
            reqwest::Method::DELETE,
            &format!(
                "/sandboxes/{}/snapshots/{}",
                self.sandbox_id, self.snapshot_id
            ),
            None,
        )
        .await
        .map(drop)
    }
}
