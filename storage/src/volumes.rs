//! Volumes in an object store: their records, saved contents and who holds them.
//!
//! Layout (next to `snapshots/` and `chunks/`, so any worker sharing the bucket sees the
//! same volumes):
//!
//! - `volumes/<id>/volume.json` — the [`StoredVolume`] (team, name, size).
//! - `volumes/<id>/versions/<n>.json` — each saved content ([`VolumeVersion`]: the image
//!   as chunks), written with a conditional put; the newest two are kept.
//! - `volumes/<id>/writer.json` — the read-write holder, created with a conditional put:
//!   the one lock that keeps a second writer out, whatever worker asks.
//! - `volumes/<id>/holders/<sandbox>.json` — every holder, read-write or read-only.
//! - `volumes/<id>/takeovers/<sha256 of a writer.json>/<n>.json` — claims on an expired
//!   write lock (conditional put): exactly one of the writers that saw it expired
//!   replaces it.
//! - `volume-names/<team>/<name>` — a name's claim (conditional put), holding the ID.
//!
//! **Holds are leases.** A holder carries `expiresUnixMs`; its pool manager renews it
//! ([`renew`], every third of [`DEFAULT_LEASE`]) while the sandbox lives on that host.
//! A hold past its expiry (plus [`CLOCK_GRACE_MS`] for clock skew and a renewal's
//! latency) is gone: a delete of the volume ignores it and another writer takes the
//! write lock over. So a hold whose owner died (a crashed daemon, a create that never
//! recorded its sandbox, a save that kept failing) frees the volume after a lease.
//! Holds written before leases (no expiry) never expire. The assumption: a renewal's
//! read and put land within [`CLOCK_GRACE_MS`], and workers' clocks agree within it.

use crate::chunks::{restore_file, Batch, FileManifest};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Version of the stored volume layout.
pub const FORMAT: u32 = 1;
/// Saved contents kept per volume.
const VERSIONS_KEPT: usize = 2;
/// How long a hold lasts unless renewed.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// How long past its expiry a hold still counts (clock skew between workers, and the
/// latency of a renewal that read it just before its expiry).
pub const CLOCK_GRACE_MS: u64 = 30_000;
/// How old a takeover claim must be before another writer may claim the same lock
/// (its claimant died between the claim and its put).
const CLAIM_STALE_MS: u64 = 60_000;

/// A volume's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredVolume {
    pub format: u32,
    pub id: String,
    pub team_id: String,
    pub name: Option<String>,
    pub size_mib: u64,
    pub created_unix_ms: u64,
}

/// One saved content of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeVersion {
    pub version: u64,
    pub saved_unix_ms: u64,
    /// The sandbox whose writes it holds.
    pub sandbox_id: String,
    /// The raw image.
    pub image: FileManifest,
}

/// A sandbox holding a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub sandbox_id: String,
    /// Mount path in its guest.
    pub path: String,
    /// `rw` or `ro`.
    pub mode: String,
    pub since_unix_ms: u64,
    /// The lease's end, unless renewed (`None`: a hold from before leases, never
    /// expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

impl Holder {
    /// Whether the lease ran out (with [`CLOCK_GRACE_MS`]) at `now_unix_ms`: the hold
    /// is gone.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        self.expires_unix_ms
            .is_some_and(|e| now_unix_ms >= e.saturating_add(CLOCK_GRACE_MS))
    }
}

/// What [`renew`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The lease runs until the new expiry.
    Renewed,
    /// The sandbox holds the volume no more (released): nothing was written.
    Released,
    /// Another writer holds the write lock (this one's lease expired and was taken
    /// over), or nobody does: the sandbox writes without the lock.
    Lost(Option<Holder>),
}

/// What a volume operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No such volume.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// The team already has a volume of this name.
    #[error("the team already has a volume named {0}")]
    NameTaken(String),
    /// Another sandbox holds it read-write.
    #[error("volume {volume} is mounted read-write by sandbox {}", holder.sandbox_id)]
    WriterExists { volume: String, holder: Holder },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn meta_key(id: &str) -> String {
    format!("volumes/{id}/volume.json")
}
fn versions_prefix(id: &str) -> String {
    format!("volumes/{id}/versions/")
}
fn writer_key(id: &str) -> String {
    format!("volumes/{id}/writer.json")
}
fn holders_prefix(id: &str) -> String {
    format!("volumes/{id}/holders/")
}
fn holder_key(id: &str, sandbox_id: &str) -> String {
    format!("{}{sandbox_id}.json", holders_prefix(id))
}
fn takeovers_prefix(id: &str, seen: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let sha: String = Sha256::digest(seen)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("volumes/{id}/takeovers/{sha}/")
}
fn name_key(team: &str, name: &str) -> String {
    format!("volume-names/{team}/{name}")
}

fn json<T: Serialize>(v: &T) -> bytes::Bytes {
    serde_json::to_vec(v).expect("json").into()
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        op: "parse volume record",
        key: key.to_string(),
        message: e.to_string(),
    })
}

async fn read<T: for<'de> Deserialize<'de>>(
    store: &impl ObjectStore,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match store.get(key).await {
        Ok(b) => parse(key, &b).map(Some),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records a new volume (its name claimed first, so two creates cannot share one).
pub async fn create(store: &impl ObjectStore, volume: &StoredVolume) -> Result<(), VolumeError> {
    if let Some(name) = &volume.name {
        match store
            .put_if_absent(&name_key(&volume.team_id, name), volume.id.clone().into())
            .await
        {
            Err(StoreError::AlreadyExists(_)) => {
                // A claim whose volume is gone (a create that died between the two
                // writes) is stale: take it over.
                let owner = store.get(&name_key(&volume.team_id, name)).await?;
                let owner = String::from_utf8_lossy(&owner).to_string();
                if store.exists(&meta_key(&owner)).await? {
                    return Err(VolumeError::NameTaken(name.clone()));
                }
                store
                    .put(&name_key(&volume.team_id, name), volume.id.clone().into())
                    .await?;
            }
            other => other?,
        }
    }
    store
        .put_if_absent(&meta_key(&volume.id), json(volume))
        .await?;
    Ok(())
}

/// A volume by ID.
pub async fn get(store: &impl ObjectStore, id: &str) -> Result<StoredVolume, VolumeError> {
    read(store, &meta_key(id))
        .await?
        .ok_or_else(|| VolumeError::NotFound(id.to_string()))
}

/// The ID a team's volume name points at, if any.
pub async fn id_of_name(
    store: &impl ObjectStore,
    team: &str,
    name: &str,
) -> Result<Option<String>, StoreError> {
    match store.get(&name_key(team, name)).await {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).to_string())),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A team's volumes, oldest first.
pub async fn list(store: &impl ObjectStore, team: &str) -> Result<Vec<StoredVolume>, StoreError> {
    let mut out = Vec::new();
    for key in store.list("volumes/").await? {
        if !key.ends_with("/volume.json") {
            continue;
        }
        if let Some(v) = read::<StoredVolume>(store, &key).await? {
            if v.team_id == team {
                out.push(v);
            }
        }
    }
    out.sort_by_key(|v| v.created_unix_ms);
    Ok(out)
}

/// The newest saved content, if the volume was ever saved.
pub async fn latest(
    store: &impl ObjectStore,
    id: &str,
) -> Result<Option<VolumeVersion>, StoreError> {
    let keys = store.list(&versions_prefix(id)).await?;
    match keys.last() {
        Some(k) => read(store, k).await,
        None => Ok(None),
    }
}

/// Stores `image` as the volume's next content; older contents beyond the newest two go.
pub async fn save(
    store: &impl ObjectStore,
    id: &str,
    sandbox_id: &str,
    image: &Path,
    now_unix_ms: u64,
) -> Result<VolumeVersion, VolumeError> {
    let mut batch = Batch::begin(store).await?;
    let (manifest, _) = batch.upload(store, image).await?;
    let prefix = versions_prefix(id);
    let keys = store.list(&prefix).await?;
    let next = keys
        .last()
        .and_then(|k| {
            k.strip_prefix(&prefix)?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        + 1;
    let version = VolumeVersion {
        version: next,
        saved_unix_ms: now_unix_ms,
        sandbox_id: sandbox_id.to_string(),
        image: manifest,
    };
    // Its chunks claimed from the garbage collector until this lands.
    batch.ready(store).await?;
    store
        .put_if_absent(&format!("{prefix}{next:012}.json"), json(&version))
        .await?;
    let mut keys = keys;
    keys.push(format!("{prefix}{next:012}.json"));
    for old in keys.iter().rev().skip(VERSIONS_KEPT) {
        store.delete(old).await?;
    }
    Ok(version)
}

/// Writes a saved content to `dest` (sparse, verified).
pub async fn fetch(
    store: &impl ObjectStore,
    version: &VolumeVersion,
    dest: &Path,
) -> Result<(), StoreError> {
    restore_file(store, &version.image, dest).await
}

/// Who holds the volume.
pub async fn holders(store: &impl ObjectStore, id: &str) -> Result<Vec<Holder>, StoreError> {
    let mut out = Vec::new();
    for key in store.list(&holders_prefix(id)).await? {
        if let Some(h) = read::<Holder>(store, &key).await? {
            out.push(h);
        }
    }
    Ok(out)
}

/// Records `holder`; a read-write holder must be the only one
/// ([`VolumeError::WriterExists`] names the one there). A write lock whose lease expired
/// (at `now_unix_ms`) is taken over; the sandbox's own is refreshed.
pub async fn hold(
    store: &impl ObjectStore,
    id: &str,
    holder: &Holder,
    now_unix_ms: u64,
) -> Result<(), VolumeError> {
    if holder.mode == "rw" {
        take_writer(store, id, holder, now_unix_ms).await?;
    }
    store
        .put(&holder_key(id, &holder.sandbox_id), json(holder))
        .await?;
    Ok(())
}

/// Takes (or refreshes) the write lock for `holder`.
async fn take_writer(
    store: &impl ObjectStore,
    id: &str,
    holder: &Holder,
    now_unix_ms: u64,
) -> Result<(), VolumeError> {
    let key = writer_key(id);
    for _ in 0..3 {
        match store.put_if_absent(&key, json(holder)).await {
            Err(StoreError::AlreadyExists(_)) => {}
            other => return other.map_err(VolumeError::from),
        }
        let seen = match store.get(&key).await {
            Ok(b) => b,
            // Released meanwhile: try again.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let there: Holder = parse(&key, &seen)?;
        if there.sandbox_id == holder.sandbox_id {
            // Its own (a retried create, a resume elsewhere): refreshed, unless the
            // lease ran out and must be won like anyone's.
            if !there.expired(now_unix_ms) {
                store.put(&key, json(holder)).await?;
                return Ok(());
            }
        } else if !there.expired(now_unix_ms) {
            return Err(VolumeError::WriterExists {
                volume: id.to_string(),
                holder: there,
            });
        }
        if take_over(store, id, &seen, holder, now_unix_ms).await? {
            return Ok(());
        }
        // Another writer won it (or it changed): look again.
    }
    let there: Option<Holder> = read(store, &key).await?;
    match there {
        Some(h) if h.sandbox_id != holder.sandbox_id => Err(VolumeError::WriterExists {
            volume: id.to_string(),
            holder: h,
        }),
        _ => Err(VolumeError::Store(StoreError::Backend {
            op: "take the volume's write lock",
            key,
            message: "the lock changed hands three times while being taken".into(),
        })),
    }
}

/// Replaces the expired write lock `seen` (its exact bytes) with `holder`'s: claims it
/// with a conditional put first, so of the writers that saw it expired exactly one
/// replaces it. False: another writer claimed it first, or the lock changed.
async fn take_over(
    store: &impl ObjectStore,
    id: &str,
    seen: &[u8],
    holder: &Holder,
    now_unix_ms: u64,
) -> Result<bool, StoreError> {
    let prefix = takeovers_prefix(id, seen);
    let newest = store
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        })
        .max();
    if let Some(n) = newest {
        // A fresh claim: its claimant is replacing the lock now.
        let claimed: Option<u64> = read(store, &format!("{prefix}{n:06}.json")).await?;
        if claimed.is_some_and(|at| now_unix_ms < at.saturating_add(CLAIM_STALE_MS)) {
            return Ok(false);
        }
    }
    let claim = format!("{prefix}{:06}.json", newest.map_or(1, |n| n + 1));
    match store.put_if_absent(&claim, json(&now_unix_ms)).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists(_)) => return Ok(false),
        Err(e) => return Err(e),
    }
    let key = writer_key(id);
    let still = match store.get(&key).await {
        Ok(b) => b.as_ref() == seen,
        Err(StoreError::NotFound(_)) => false,
        Err(e) => return Err(e),
    };
    if still {
        store.put(&key, json(holder)).await?;
    }
    // The claims are clutter now (a late claimant finds the lock changed).
    for k in store.list(&prefix).await? {
        let _ = store.delete(&k).await;
    }
    Ok(still)
}

/// Extends `sandbox_id`'s hold on the volume to `expires_unix_ms` (its write lock too,
/// for a read-write hold). A released hold is not written again; a write lock whose
/// lease ran out is won back only if nobody took it over.
pub async fn renew(
    store: &impl ObjectStore,
    id: &str,
    sandbox_id: &str,
    expires_unix_ms: u64,
    now_unix_ms: u64,
) -> Result<Renewal, StoreError> {
    let Some(mut mine) = read::<Holder>(store, &holder_key(id, sandbox_id)).await? else {
        return Ok(Renewal::Released);
    };
    mine.expires_unix_ms = Some(expires_unix_ms);
    if mine.mode == "rw" {
        let key = writer_key(id);
        let seen = match store.get(&key).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(Renewal::Lost(None)),
            Err(e) => return Err(e),
        };
        let there: Holder = parse(&key, &seen)?;
        if there.sandbox_id != sandbox_id {
            return Ok(Renewal::Lost(Some(there)));
        }
        let renewed = Holder {
            expires_unix_ms: Some(expires_unix_ms),
            ..there.clone()
        };
        if !there.expired(now_unix_ms) {
            store.put(&key, json(&renewed)).await?;
        } else if !take_over(store, id, &seen, &renewed, now_unix_ms).await? {
            return Ok(Renewal::Lost(read(store, &key).await?));
        }
    }
    store.put(&holder_key(id, sandbox_id), json(&mine)).await?;
    Ok(Renewal::Renewed)
}

/// Drops `sandbox_id`'s hold (its write lock too).
pub async fn release(
    store: &impl ObjectStore,
    id: &str,
    sandbox_id: &str,
) -> Result<(), StoreError> {
    if let Some(w) = read::<Holder>(store, &writer_key(id)).await? {
        if w.sandbox_id == sandbox_id {
            store.delete(&writer_key(id)).await?;
        }
    }
    store.delete(&holder_key(id, sandbox_id)).await
}

/// Deletes the volume's record, contents and name (its chunks become garbage), then
/// what is left of its holds (the caller found them expired, or none).
pub async fn delete(store: &impl ObjectStore, volume: &StoredVolume) -> Result<(), StoreError> {
    for key in store.list(&versions_prefix(&volume.id)).await? {
        store.delete(&key).await?;
    }
    store.delete(&meta_key(&volume.id)).await?;
    if let Some(name) = &volume.name {
        if id_of_name(store, &volume.team_id, name).await?.as_deref() == Some(&volume.id) {
            store.delete(&name_key(&volume.team_id, name)).await?;
        }
    }
    for key in store.list(&format!("volumes/{}/", volume.id)).await? {
        store.delete(&key).await?;
    }
    Ok(())
}

/// Every chunk key a saved volume content references (for garbage collection).
pub async fn referenced_chunks(
    store: &impl ObjectStore,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut out = std::collections::HashSet::new();
    for key in store.list("volumes/").await? {
        if key.contains("/versions/") {
            // An unreadable record keeps everything: never delete what might be needed.
            let v: VolumeVersion = match store.get(&key).await {
                Ok(b) => parse(&key, &b)?,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            out.extend(v.image.object_keys());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "volumes-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn holder(sbx: &str, mode: &str) -> Holder {
        Holder {
            sandbox_id: sbx.into(),
            path: "/mnt/v".into(),
            mode: mode.into(),
            since_unix_ms: 0,
            expires_unix_ms: None,
        }
    }

    fn leased(sbx: &str, mode: &str, expires: u64) -> Holder {
        Holder {
            expires_unix_ms: Some(expires),
            ..holder(sbx, mode)
        }
    }

    #[tokio::test]
    async fn one_writer_names_versions_and_gc_references() {
        let dir = scratch();
        let store = LocalStore::open(dir.join("store")).unwrap();
        let vol = StoredVolume {
            format: FORMAT,
            id: "0f6b6a2e-3c1d-4c55-9a0b-2b8d5b1c9e10".into(),
            team_id: "team-1".into(),
            name: Some("work".into()),
            size_mib: 16,
            created_unix_ms: 1,
        };
        create(&store, &vol).await.unwrap();
        let again = StoredVolume {
            id: "1f6b6a2e-3c1d-4c55-9a0b-2b8d5b1c9e10".into(),
            ..vol.clone()
        };
        assert!(matches!(
            create(&store, &again).await,
            Err(VolumeError::NameTaken(_))
        ));
        assert_eq!(list(&store, "team-1").await.unwrap(), vec![vol.clone()]);
        assert!(list(&store, "team-2").await.unwrap().is_empty());

        hold(&store, &vol.id, &holder("sbx-a", "rw"), 0)
            .await
            .unwrap();
        hold(&store, &vol.id, &holder("sbx-a", "rw"), 0)
            .await
            .unwrap();
        match hold(&store, &vol.id, &holder("sbx-b", "rw"), 0).await {
            Err(VolumeError::WriterExists { holder, .. }) => assert_eq!(holder.sandbox_id, "sbx-a"),
            other => panic!("{other:?}"),
        }
        hold(&store, &vol.id, &holder("sbx-c", "ro"), 0)
            .await
            .unwrap();
        assert_eq!(holders(&store, &vol.id).await.unwrap().len(), 2);
        release(&store, &vol.id, "sbx-a").await.unwrap();
        hold(&store, &vol.id, &holder("sbx-b", "rw"), 0)
            .await
            .unwrap();

        let image = dir.join("img");
        for (i, byte) in [1u8, 2, 3].iter().enumerate() {
            std::fs::write(&image, vec![*byte; 4096]).unwrap();
            let v = save(&store, &vol.id, "sbx-b", &image, i as u64)
                .await
                .unwrap();
            assert_eq!(v.version, i as u64 + 1);
        }
        let newest = latest(&store, &vol.id).await.unwrap().unwrap();
        assert_eq!(newest.version, 3);
        assert_eq!(
            store.list(&versions_prefix(&vol.id)).await.unwrap().len(),
            2
        );
        fetch(&store, &newest, &dir.join("back")).await.unwrap();
        assert_eq!(std::fs::read(dir.join("back")).unwrap(), vec![3u8; 4096]);
        assert_eq!(referenced_chunks(&store).await.unwrap().len(), 2);

        delete(&store, &vol).await.unwrap();
        assert!(matches!(
            get(&store, &vol.id).await,
            Err(VolumeError::NotFound(_))
        ));
        assert_eq!(id_of_name(&store, "team-1", "work").await.unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn write_locks_are_leases_renewed_and_taken_over_after_expiry() {
        let dir = scratch();
        let store = LocalStore::open(dir.join("store")).unwrap();
        let vol = StoredVolume {
            format: FORMAT,
            id: "2f6b6a2e-3c1d-4c55-9a0b-2b8d5b1c9e10".into(),
            team_id: "team-1".into(),
            name: None,
            size_mib: 16,
            created_unix_ms: 1,
        };
        create(&store, &vol).await.unwrap();
        let lease = DEFAULT_LEASE.as_millis() as u64;
        let t0 = 1_000_000;
        hold(&store, &vol.id, &leased("sbx-a", "rw", t0 + lease), t0)
            .await
            .unwrap();

        // A live lease (even just past its expiry, within the grace) is not taken over.
        for now in [t0 + 1, t0 + lease + CLOCK_GRACE_MS - 1] {
            match hold(&store, &vol.id, &leased("sbx-b", "rw", now + lease), now).await {
                Err(VolumeError::WriterExists { holder, .. }) => {
                    assert_eq!(holder.sandbox_id, "sbx-a")
                }
                other => panic!("{other:?}"),
            }
        }
        // A renewal extends it: what would have expired is still held.
        let t1 = t0 + lease / 3;
        assert_eq!(
            renew(&store, &vol.id, "sbx-a", t1 + lease, t1)
                .await
                .unwrap(),
            Renewal::Renewed
        );
        let late = t0 + lease + CLOCK_GRACE_MS + 1;
        assert!(!holders(&store, &vol.id).await.unwrap()[0].expired(late));
        assert!(matches!(
            hold(&store, &vol.id, &leased("sbx-b", "rw", late + lease), late).await,
            Err(VolumeError::WriterExists { .. })
        ));

        // Past the renewed expiry it is taken over, by exactly one of two writers.
        let t2 = t1 + lease + CLOCK_GRACE_MS;
        assert!(holders(&store, &vol.id).await.unwrap()[0].expired(t2));
        hold(&store, &vol.id, &leased("sbx-b", "rw", t2 + lease), t2)
            .await
            .unwrap();
        match hold(&store, &vol.id, &leased("sbx-c", "rw", t2 + lease), t2).await {
            Err(VolumeError::WriterExists { holder, .. }) => assert_eq!(holder.sandbox_id, "sbx-b"),
            other => panic!("{other:?}"),
        }
        let writer: Holder = read(&store, &writer_key(&vol.id)).await.unwrap().unwrap();
        assert_eq!(writer.sandbox_id, "sbx-b");
        assert!(store
            .list(&format!("volumes/{}/takeovers/", vol.id))
            .await
            .unwrap()
            .is_empty());
        // The old writer's renewal finds the lock lost and writes nothing.
        match renew(&store, &vol.id, "sbx-a", t2 + lease, t2)
            .await
            .unwrap()
        {
            Renewal::Lost(Some(h)) => assert_eq!(h.sandbox_id, "sbx-b"),
            other => panic!("{other:?}"),
        }
        // A fresh takeover claim holds others off; a stale one (its claimant died
        // between the claim and its put) does not.
        let t3 = t2 + lease + CLOCK_GRACE_MS;
        let seen = store.get(&writer_key(&vol.id)).await.unwrap();
        store
            .put(
                &format!("{}000001.json", takeovers_prefix(&vol.id, &seen)),
                json(&t3),
            )
            .await
            .unwrap();
        match hold(&store, &vol.id, &leased("sbx-c", "rw", t3 + lease), t3).await {
            Err(VolumeError::WriterExists { holder, .. }) => assert_eq!(holder.sandbox_id, "sbx-b"),
            other => panic!("{other:?}"),
        }
        let t4 = t3 + CLAIM_STALE_MS;
        hold(&store, &vol.id, &leased("sbx-c", "rw", t4 + lease), t4)
            .await
            .unwrap();

        // A released hold is not renewed back.
        release(&store, &vol.id, "sbx-c").await.unwrap();
        assert_eq!(
            renew(&store, &vol.id, "sbx-c", t4 + 2 * lease, t4)
                .await
                .unwrap(),
            Renewal::Released
        );
        assert!(!store.exists(&writer_key(&vol.id)).await.unwrap());

        // Holds from before leases never expire.
        assert!(!holder("sbx-old", "rw").expired(u64::MAX));

        // Deleting the volume removes the expired holds left behind.
        delete(&store, &vol).await.unwrap();
        assert!(store
            .list(&format!("volumes/{}/", vol.id))
            .await
            .unwrap()
            .is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
