//! Snapshots in an object store.
//!
//! Layout:
//!
//! - `chunks/<sha256>` — file contents, shared by every snapshot that has the same bytes.
//! - `snapshots/<sandbox ID>/<snapshot ID>.json` — one [`StoredSnapshot`] per snapshot,
//!   written last with a conditional put: a snapshot whose upload failed part way has no
//!   manifest and does not exist (its chunks are garbage until a retry reuses them or
//!   [`collect_garbage`] removes them, a grace period after it first finds them
//!   unreferenced: see [`crate::gc`]).
//!
//! Snapshot IDs carry their sandbox's ID (`snap-<sandbox hex>-<random>`), so a snapshot
//! is found from its ID alone on any worker that shares the bucket.

use crate::chunks::{
    restore_file, restore_file_indexed, Base, Batch, Cut, FileManifest, Layout, UploadStats,
};
use crate::pages::PageIndex;
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Version of the stored manifest layout. 2: chunks may be content-defined or stored
/// as patches (a build that reads only 1 would restore them wrongly, so it refuses 2).
pub const FORMAT: u32 = 2;

/// The oldest layout this build still reads: 1 (fixed, whole chunks) is 2 without
/// patches.
pub const OLDEST_FORMAT: u32 = 1;

/// Why a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Taken when the sandbox was paused to object storage (hibernated).
    Pause,
    /// Taken on a timer.
    Periodic,
    /// Asked for; they accumulate and outlive the sandbox.
    Manual,
    /// The ready VM of a custom template's build; lives as long as the template.
    Template,
}

impl Kind {
    /// Restore preference when no snapshot is named: lower is preferred.
    pub fn preference(self) -> u8 {
        match self {
            Kind::Pause => 0,
            Kind::Periodic => 1,
            Kind::Manual => 2,
            Kind::Template => 3,
        }
    }

    /// Its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pause => "pause",
            Kind::Periodic => "periodic",
            Kind::Manual => "manual",
            Kind::Template => "template",
        }
    }
}

/// A snapshot's manifest in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub format: u32,
    pub id: String,
    pub sandbox_id: String,
    /// The team that owns it: no other team sees it.
    pub team_id: String,
    pub kind: Kind,
    pub created_unix_ms: u64,
    /// The template the sandbox was created from.
    pub template_id: String,
    /// The snapshot's files (`state`, `memory`, `disk.qcow2`) as chunk lists.
    pub files: BTreeMap<String, FileManifest>,
    /// The hypervisor's own manifest, written back beside the files on fetch.
    pub vm: serde_json::Value,
    /// What the pool manager records of the sandbox (labels, environment), so a restore
    /// on another worker recreates it.
    #[serde(default)]
    pub sandbox: serde_json::Value,
}

impl StoredSnapshot {
    /// Sum of the files' sizes (what a restore materializes, holes included).
    pub fn size_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Bytes of data in its chunks (holes and zero chunks excluded; shared chunks
    /// counted once per snapshot).
    pub fn data_bytes(&self) -> u64 {
        self.files
            .values()
            .flat_map(|f| &f.chunks)
            .map(|c| c.len)
            .sum()
    }
}

/// A new snapshot ID for a snapshot of `sandbox_id` (`sbx-<hex>`).
pub fn new_snapshot_id(sandbox_id: &str) -> String {
    let hex = sandbox_id.strip_prefix("sbx-").unwrap_or(sandbox_id);
    format!(
        "snap-{hex}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The sandbox a snapshot ID belongs to, or `None` if it is not a stored-snapshot ID.
pub fn sandbox_of(snapshot_id: &str) -> Option<String> {
    let rest = snapshot_id.strip_prefix("snap-")?;
    let (hex, random) = rest.rsplit_once('-')?;
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (plain(hex) && plain(random) && random.len() == 12).then(|| format!("sbx-{hex}"))
}

fn manifest_key(sandbox_id: &str, snapshot_id: &str) -> String {
    format!("snapshots/{sandbox_id}/{snapshot_id}.json")
}

/// What a publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishStats {
    pub files: usize,
    /// Chunk totals over all files.
    pub chunks: UploadStats,
}

/// Everything but the files of a snapshot to publish.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub id: String,
    pub sandbox_id: String,
    pub team_id: String,
    pub kind: Kind,
    pub template_id: String,
    pub vm: serde_json::Value,
    pub sandbox: serde_json::Value,
}

/// Uploads the files `names` of the snapshot directory `dir` (missing ones skipped),
/// then commits the manifest. Nothing is visible until the manifest lands. Every chunk
/// is durable in the store before the manifest is written (each put returns only then),
/// and claimed from the garbage collector until it is.
pub async fn publish(
    store: &impl ObjectStore,
    dir: &Path,
    names: &[&str],
    new: NewSnapshot,
) -> Result<(StoredSnapshot, PublishStats), StoreError> {
    let p = publish_with(store, dir, names, new, None).await?;
    Ok((p.snapshot, p.stats))
}

/// What [`publish_with`] did.
#[derive(Debug)]
pub struct Published {
    pub snapshot: StoredSnapshot,
    pub stats: PublishStats,
    /// The page index of the `memory` it stored: the base of the next snapshot of the
    /// same VM (see [`crate::pages`]).
    pub memory_index: Option<PageIndex>,
}

/// How each of a snapshot's files is cut: `memory` by position (patched against
/// `memory_base`), the migration stream and the qcow2 overlay by content (their bytes
/// shift between snapshots), volume images by position.
fn layout<'a>(name: &str, memory_base: Option<&'a Base>) -> Layout<'a> {
    match name {
        "memory" => Layout::Positional {
            base: memory_base,
            index: true,
        },
        "state" | "disk.qcow2" => Layout::ContentDefined,
        _ => Layout::Positional {
            base: None,
            index: false,
        },
    }
}

/// [`publish`], storing `memory` as changes to `memory_base` where it has few.
pub async fn publish_with(
    store: &impl ObjectStore,
    dir: &Path,
    names: &[&str],
    new: NewSnapshot,
    memory_base: Option<&Base>,
) -> Result<Published, StoreError> {
    let mut files = BTreeMap::new();
    let mut stats = PublishStats::default();
    let mut memory_index = None;
    let mut batch = Batch::begin(store).await?;
    for name in names {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let up = batch
            .upload_as(store, &path, layout(name, memory_base))
            .await?;
        stats.files += 1;
        stats.chunks.add(&up.stats);
        if *name == "memory" {
            memory_index = up.index;
        }
        files.insert(name.to_string(), up.manifest);
    }
    let stored = StoredSnapshot {
        format: FORMAT,
        id: new.id,
        sandbox_id: new.sandbox_id,
        team_id: new.team_id,
        kind: new.kind,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        template_id: new.template_id,
        files,
        vm: new.vm,
        sandbox: new.sandbox,
    };
    let body = serde_json::to_vec_pretty(&stored).expect("json");
    batch.ready(store).await?;
    store
        .put_if_absent(&manifest_key(&stored.sandbox_id, &stored.id), body.into())
        .await?;
    Ok(Published {
        snapshot: stored,
        stats,
        memory_index,
    })
}

/// Reads one snapshot's manifest.
pub async fn get(
    store: &impl ObjectStore,
    snapshot_id: &str,
) -> Result<StoredSnapshot, StoreError> {
    let sandbox =
        sandbox_of(snapshot_id).ok_or_else(|| StoreError::NotFound(snapshot_id.to_string()))?;
    let key = manifest_key(&sandbox, snapshot_id);
    let bytes = store.get(&key).await?;
    parse(&key, &bytes)
}

pub(crate) fn parse(key: &str, bytes: &[u8]) -> Result<StoredSnapshot, StoreError> {
    let s: StoredSnapshot = serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        op: "parse manifest",
        key: key.to_string(),
        message: e.to_string(),
    })?;
    if !(OLDEST_FORMAT..=FORMAT).contains(&s.format) {
        return Err(StoreError::Backend {
            op: "parse manifest",
            key: key.to_string(),
            message: format!(
                "snapshot format {}, this build reads {OLDEST_FORMAT} to {FORMAT}",
                s.format
            ),
        });
    }
    Ok(s)
}

/// A sandbox's snapshots, newest first.
pub async fn list(
    store: &impl ObjectStore,
    sandbox_id: &str,
) -> Result<Vec<StoredSnapshot>, StoreError> {
    let mut out = Vec::new();
    for key in store.list(&format!("snapshots/{sandbox_id}/")).await? {
        if !key.ends_with(".json") {
            continue;
        }
        match store.get(&key).await {
            Ok(bytes) => out.push(parse(&key, &bytes)?),
            // Deleted between the list and the read.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| {
        b.created_unix_ms
            .cmp(&a.created_unix_ms)
            .then(b.id.cmp(&a.id))
    });
    Ok(out)
}

/// The snapshot a restore uses when none is named: pause before periodic before
/// manual, the newest of the preferred kind.
pub fn preferred(snapshots: &[StoredSnapshot]) -> Option<&StoredSnapshot> {
    snapshots
        .iter()
        .min_by_key(|s| (s.kind.preference(), std::cmp::Reverse(s.created_unix_ms)))
}

/// Writes the snapshot's files into the new directory `dest`, verifying every chunk.
/// The hypervisor manifest is the caller's to write, last.
pub async fn fetch(
    store: &impl ObjectStore,
    snapshot: &StoredSnapshot,
    dest: &Path,
) -> Result<(), StoreError> {
    // The manifest came from the bucket: a name like `../x` or `/etc/x` would write
    // anywhere as root. Every name is checked before anything is written.
    if let Some(bad) = snapshot.files.keys().find(|n| !is_file_name(n)) {
        return Err(StoreError::Backend {
            op: "fetch",
            key: snapshot.id.clone(),
            message: format!(
                "the manifest names a file {bad:?}; a snapshot holds only state, memory, disk.qcow2 and volume-<0-255>.img: the stored manifest was tampered with"
            ),
        });
    }
    for (name, manifest) in &snapshot.files {
        let path = dest.join(name);
        if name == "memory" && manifest.cut == Cut::Fixed {
            // Beside the memory, what a snapshot of a VM restored from it is stored
            // against (the chunks this one is or builds on: see `crate::pages`).
            let index = restore_file_indexed(store, manifest, &path).await?;
            let cached = path.with_extension("index");
            if let Err(e) = index.save(&cached) {
                tracing::debug!(index = %cached.display(), error = %e, "page index not kept");
            }
        } else {
            restore_file(store, manifest, &path).await?;
        }
    }
    Ok(())
}

/// Whether `name` is one a snapshot's file may have: `state`, `memory`, `disk.qcow2` or
/// `volume-<lun>.img` (a LUN of 0 to 255, written without leading zeros).
pub fn is_file_name(name: &str) -> bool {
    matches!(name, "state" | "memory" | "disk.qcow2")
        || name
            .strip_prefix("volume-")
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u8>().ok().filter(|lun| lun.to_string() == n))
            .is_some()
}

/// Deletes a snapshot's manifest: from then on it does not exist. Its chunks go with
/// the next [`collect_garbage`].
pub async fn delete(store: &impl ObjectStore, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
    store
        .delete(&manifest_key(&snapshot.sandbox_id, &snapshot.id))
        .await
}

pub use crate::gc::GcStats;

/// Collects the chunks no snapshot manifest or volume version references, safely
/// against other workers sharing the bucket: one collector at a time (the bucket's
/// lease: a round finding another collector at work does nothing and says so in
/// [`GcStats::busy`]), and a chunk goes only once it has stayed unreferenced for the
/// bucket's grace period (10 minutes unless [`crate::gc::set_grace`] says otherwise) and
/// no publish in flight claimed it. Unreferenced chunks are marked by one round and
/// deleted by a later one at least a grace later: run it again after the grace for
/// garbage to go. See [`crate::gc`] for the protocol.
pub async fn collect_garbage(store: &impl ObjectStore) -> Result<GcStats, StoreError> {
    crate::gc::collect(store, &crate::gc::GcOptions::default()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "snapshots-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn new(id: &str, kind: Kind) -> NewSnapshot {
        NewSnapshot {
            id: id.into(),
            sandbox_id: "sbx-abc123".into(),
            team_id: "team-1".into(),
            kind,
            template_id: "base".into(),
            vm: serde_json::json!({ "vm": true }),
            sandbox: serde_json::json!({}),
        }
    }

    #[test]
    fn ids_carry_their_sandbox() {
        let id = new_snapshot_id("sbx-0123456789abcdef0123");
        assert_eq!(sandbox_of(&id).as_deref(), Some("sbx-0123456789abcdef0123"));
        for bad in [
            "snap-",
            "snap-xyz-123",
            "base",
            "snap-abc-12345678901z",
            "snap--0123456789ab",
        ] {
            assert_eq!(sandbox_of(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn publish_list_fetch_delete_and_collect() {
        let root = scratch("cycle");
        let store = LocalStore::open(root.join("store")).unwrap();
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("state"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(src.join("disk.qcow2"), b"disk").unwrap();

        let a = new_snapshot_id("sbx-abc123");
        let (first, stats) = publish(
            &store,
            &src,
            &["state", "memory", "disk.qcow2"],
            new(&a, Kind::Manual),
        )
        .await
        .unwrap();
        assert_eq!(stats.files, 2, "the missing memory file is skipped");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = new_snapshot_id("sbx-abc123");
        let (_, again) = publish(&store, &src, &["state", "disk.qcow2"], new(&b, Kind::Pause))
            .await
            .unwrap();
        assert_eq!(again.chunks.uploaded, 0, "same bytes: every chunk reused");

        let listed = list(&store, "sbx-abc123").await.unwrap();
        assert_eq!(
            listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            [b.as_str(), a.as_str()]
        );
        assert_eq!(preferred(&listed).unwrap().kind, Kind::Pause);
        assert_eq!(get(&store, &a).await.unwrap(), first);

        let dest = root.join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        fetch(&store, &first, &dest).await.unwrap();
        assert_eq!(
            std::fs::read(dest.join("state")).unwrap(),
            vec![7u8; 3 << 20]
        );
        assert_eq!(std::fs::read(dest.join("disk.qcow2")).unwrap(), b"disk");

        // A manifest from the bucket naming a file outside the snapshot is refused
        // before anything is written, wherever the name points.
        for bad in [
            "../escaped",
            "/tmp/escaped-abs",
            "sub/state",
            "volume-007.img",
            "",
        ] {
            let mut tampered = first.clone();
            let state = tampered.files["state"].clone();
            tampered.files.insert(bad.to_string(), state);
            let fresh = root.join(format!("tampered-{}", bad.len()));
            std::fs::create_dir_all(&fresh).unwrap();
            let e = fetch(&store, &tampered, &fresh).await.unwrap_err();
            assert!(e.to_string().contains("tampered"), "{bad}: {e}");
            assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0, "{bad}");
        }
        assert!(!root.join("escaped").exists());
        assert!(!std::path::Path::new("/tmp/escaped-abs").exists());
        assert!(is_file_name("volume-7.img") && is_file_name("volume-255.img"));
        assert!(!is_file_name("volume-256.img") && !is_file_name("manifest.json"));

        // Deleting one keeps the shared chunks; deleting both frees them, a grace after
        // a collection first finds them unreferenced.
        crate::gc::set_grace(&store, std::time::Duration::from_millis(100))
            .await
            .unwrap();
        delete(&store, &first).await.unwrap();
        let gc = collect_garbage(&store).await.unwrap();
        assert_eq!((gc.chunks_marked, gc.chunks_deleted), (0, 0), "{gc:?}");
        delete(&store, &listed[0]).await.unwrap();
        let gc = collect_garbage(&store).await.unwrap();
        assert_eq!((gc.manifests, gc.chunks_kept), (0, 0));
        assert!(gc.chunks_marked >= 2 && gc.chunks_deleted == 0, "{gc:?}");
        std::thread::sleep(std::time::Duration::from_millis(150));
        let gc = collect_garbage(&store).await.unwrap();
        assert!(gc.chunks_deleted >= 2, "{gc:?}");
        assert!(store.list("chunks/").await.unwrap().is_empty());
        assert!(matches!(
            get(&store, &a).await,
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_failed_upload_leaves_no_snapshot_and_a_retry_reuses_its_chunks() {
        let root = scratch("fault");
        let store = crate::Store::local(LocalStore::open(root.join("store")).unwrap())
            .with_fault_after_puts(2);
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(src.join("memory"), &data).unwrap();
        let id = new_snapshot_id("sbx-abc123");
        let err = publish(&store, &src, &["memory"], new(&id, Kind::Manual))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected fault"), "{err}");
        assert!(list(&store, "sbx-abc123").await.unwrap().is_empty());
        let (_, stats) = publish(&store, &src, &["memory"], new(&id, Kind::Manual))
            .await
            .unwrap();
        // Only the put that failed is sent again: the others of the upload landed.
        assert_eq!(
            (stats.chunks.uploaded, stats.chunks.reused),
            (1, 5),
            "{stats:?}"
        );
        assert_eq!(list(&store, "sbx-abc123").await.unwrap().len(), 1);
        std::fs::remove_dir_all(root).unwrap();
    }
}
