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
//! - `volume-names/<team>/<name>` — a name's claim (conditional put), holding the ID.

use crate::chunks::{restore_file, Batch, FileManifest};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the stored volume layout.
pub const FORMAT: u32 = 1;
/// Saved contents kept per volume.
const VERSIONS_KEPT: usize = 2;

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
/// ([`VolumeError::WriterExists`] names the one there).
pub async fn hold(store: &impl ObjectStore, id: &str, holder: &Holder) -> Result<(), VolumeError> {
    if holder.mode == "rw" {
        match store.put_if_absent(&writer_key(id), json(holder)).await {
            Err(StoreError::AlreadyExists(_)) => {
                let there: Option<Holder> = read(store, &writer_key(id)).await?;
                match there {
                    Some(h) if h.sandbox_id == holder.sandbox_id => {}
                    Some(h) => {
                        return Err(VolumeError::WriterExists {
                            volume: id.to_string(),
                            holder: h,
                        })
                    }
                    // Released meanwhile: try once more.
                    None => store.put_if_absent(&writer_key(id), json(holder)).await?,
                }
            }
            other => other?,
        }
    }
    store
        .put(
            &format!("{}{}.json", holders_prefix(id), holder.sandbox_id),
            json(holder),
        )
        .await?;
    Ok(())
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
    store
        .delete(&format!("{}{sandbox_id}.json", holders_prefix(id)))
        .await
}

/// Deletes the volume's record, contents and name (its chunks become garbage).
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
            out.extend(v.image.chunks.iter().map(|c| c.key()));
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

        hold(&store, &vol.id, &holder("sbx-a", "rw")).await.unwrap();
        hold(&store, &vol.id, &holder("sbx-a", "rw")).await.unwrap();
        match hold(&store, &vol.id, &holder("sbx-b", "rw")).await {
            Err(VolumeError::WriterExists { holder, .. }) => assert_eq!(holder.sandbox_id, "sbx-a"),
            other => panic!("{other:?}"),
        }
        hold(&store, &vol.id, &holder("sbx-c", "ro")).await.unwrap();
        assert_eq!(holders(&store, &vol.id).await.unwrap().len(), 2);
        release(&store, &vol.id, "sbx-a").await.unwrap();
        hold(&store, &vol.id, &holder("sbx-b", "rw")).await.unwrap();

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
}
