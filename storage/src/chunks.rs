//! Files as content-addressed chunks.
//!
//! A file is cut at fixed, page-aligned offsets into [`CHUNK_SIZE`] pieces. Pieces in
//! holes (sparse files: memory images mostly are) and pieces of only zeros are not
//! stored; the rest go to `chunks/<sha256>` once — a chunk already in the store (another
//! snapshot of the same family, or an interrupted upload of this one) is not sent again.
//! The [`FileManifest`] lists offsets and hashes; reading back verifies every chunk.
//!
//! A chunk that is reused (or uploaded) is first claimed from the garbage collector
//! ([`crate::gc`]): the manifest that references it must be committed within half the
//! bucket's grace of the claims, or its chunks are checked again ([`Batch::ready`]).

use crate::gc::{Claims, RECHECKS};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Chunks read, hashed and sent at once.
const UPLOAD_CONCURRENCY: usize = 8;

/// Size of a chunk: a multiple of the page size, so memory pages never straddle two.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// A stored file: its size and its non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Size in bytes (holes and zero chunks included).
    pub size: u64,
    /// Chunk size it was cut with.
    pub chunk_size: u64,
    /// The stored chunks, by offset.
    pub chunks: Vec<ChunkRef>,
}

/// One stored chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length (the last chunk may be short).
    pub len: u64,
    /// Its content address.
    pub sha256: String,
}

impl ChunkRef {
    /// The store key of the chunk.
    pub fn key(&self) -> String {
        chunk_key(&self.sha256)
    }
}

/// The store key of a chunk with this hash.
pub fn chunk_key(sha256: &str) -> String {
    format!("chunks/{sha256}")
}

/// What an upload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Chunks in the manifest.
    pub chunks: usize,
    /// Chunks sent to the store.
    pub uploaded: usize,
    /// Chunks the store already had.
    pub reused: usize,
    /// Chunk-sized pieces skipped as holes or zeros.
    pub skipped: usize,
    /// Bytes sent.
    pub bytes_uploaded: u64,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        key: path.display().to_string(),
        source,
    }
}

/// Offsets of the chunks that touch data (not holes), per SEEK_DATA/SEEK_HOLE.
fn data_chunk_offsets(file: &std::fs::File, size: u64) -> std::io::Result<Vec<u64>> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut offsets = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on an open descriptor has no memory-safety preconditions.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut chunk = (data as u64 / CHUNK_SIZE) * CHUNK_SIZE;
        while chunk < hole as u64 {
            if offsets.last() != Some(&chunk) {
                offsets.push(chunk);
            }
            chunk += CHUNK_SIZE;
        }
        pos = hole;
    }
    Ok(offsets)
}

/// Reads the chunk at `offset`; unless it is all zeros, claims it and stores it if the
/// store lacks it. Returns its reference and whether it was sent.
async fn upload_chunk(
    store: &impl ObjectStore,
    claims: &Claims,
    file: std::sync::Arc<std::fs::File>,
    size: u64,
    offset: u64,
    path: &Path,
) -> Result<Option<(ChunkRef, bool)>, StoreError> {
    let len = CHUNK_SIZE.min(size - offset);
    let (buf, sha) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        let sha = (!buf.iter().all(|b| *b == 0)).then(|| hex(&Sha256::digest(&buf)));
        Ok::<_, std::io::Error>((buf, sha))
    })
    .await
    .expect("read task")
    .map_err(io("read", path))?;
    let Some(sha) = sha else {
        return Ok(None);
    };
    let key = chunk_key(&sha);
    // Claimed before the check: a collector that has not deleted it by then won't.
    claims.claim(store, &sha).await?;
    let sent = !store.exists(&key).await?;
    if sent {
        store.put(&key, buf.into()).await?;
    }
    Ok(Some((
        ChunkRef {
            offset,
            len,
            sha256: sha,
        },
        sent,
    )))
}

/// Stores `path` as chunks; returns its manifest (not stored: it goes into the caller's
/// snapshot manifest, which is written last, within half the bucket's garbage-collection
/// grace of this call; the crate's own publishes use a [`Batch`], which re-checks).
pub async fn upload_file(
    store: &impl ObjectStore,
    path: &Path,
) -> Result<(FileManifest, UploadStats), StoreError> {
    let claims = Claims::begin(store).await?;
    upload_claimed(store, path, &claims).await
}

/// Files uploaded for one manifest (a snapshot's, a volume version's) and the claims
/// that keep their chunks from a collector until the manifest is committed.
pub(crate) struct Batch {
    claims: Claims,
    files: Vec<(PathBuf, FileManifest)>,
}

impl Batch {
    /// Lists the collector's marks: the claims' view.
    pub(crate) async fn begin(store: &impl ObjectStore) -> Result<Self, StoreError> {
        Ok(Self {
            claims: Claims::begin(store).await?,
            files: Vec::new(),
        })
    }

    /// Stores `path` as chunks (see [`upload_file`]).
    pub(crate) async fn upload(
        &mut self,
        store: &impl ObjectStore,
        path: &Path,
    ) -> Result<(FileManifest, UploadStats), StoreError> {
        let (manifest, stats) = upload_claimed(store, path, &self.claims).await?;
        self.files.push((path.to_path_buf(), manifest.clone()));
        Ok((manifest, stats))
    }

    /// Call right before committing the manifest: if the uploads outlived their view of
    /// the marks (half the grace), every chunk is claimed and checked again under a new
    /// one, and uploaded again if a collector deleted it meanwhile.
    pub(crate) async fn ready(&mut self, store: &impl ObjectStore) -> Result<(), StoreError> {
        for _ in 0..RECHECKS {
            if self.claims.fresh() {
                return Ok(());
            }
            self.claims = Claims::begin(store).await?;
            for (path, manifest) in &self.files {
                recheck_file(store, &self.claims, path, manifest).await?;
            }
        }
        if self.claims.fresh() {
            Ok(())
        } else {
            Err(self.claims.too_slow())
        }
    }
}

/// Claims and checks every chunk of an uploaded file again; one that is missing is read
/// from `path` again (unchanged: it is verified) and stored.
async fn recheck_file(
    store: &impl ObjectStore,
    claims: &Claims,
    path: &Path,
    manifest: &FileManifest,
) -> Result<(), StoreError> {
    let file = std::sync::Arc::new(std::fs::File::open(path).map_err(io("open", path))?);
    for batch in manifest.chunks.chunks(UPLOAD_CONCURRENCY) {
        let checks: Vec<_> = batch
            .iter()
            .map(|chunk| recheck_chunk(store, claims, file.clone(), chunk, path))
            .collect();
        futures::future::try_join_all(checks).await?;
    }
    Ok(())
}

async fn recheck_chunk(
    store: &impl ObjectStore,
    claims: &Claims,
    file: std::sync::Arc<std::fs::File>,
    chunk: &ChunkRef,
    path: &Path,
) -> Result<(), StoreError> {
    claims.claim(store, &chunk.sha256).await?;
    let key = chunk.key();
    if store.exists(&key).await? {
        return Ok(());
    }
    let (offset, len) = (chunk.offset, chunk.len);
    let (buf, found) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        let sha = hex(&Sha256::digest(&buf));
        Ok::<_, std::io::Error>((buf, sha))
    })
    .await
    .expect("read task")
    .map_err(io("read", path))?;
    if found != chunk.sha256 {
        return Err(StoreError::Corrupt {
            key: format!("{} (changed during its upload)", path.display()),
            expected: chunk.sha256.clone(),
            found,
        });
    }
    store.put(&key, buf.into()).await
}

async fn upload_claimed(
    store: &impl ObjectStore,
    path: &Path,
    claims: &Claims,
) -> Result<(FileManifest, UploadStats), StoreError> {
    let file = std::sync::Arc::new(std::fs::File::open(path).map_err(io("open", path))?);
    let size = file.metadata().map_err(io("stat", path))?.len();
    let offsets = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || data_chunk_offsets(&file, size))
            .await
            .expect("seek task")
            .map_err(io("seek", path))?
    };
    let mut stats = UploadStats {
        skipped: size.div_ceil(CHUNK_SIZE) as usize - offsets.len(),
        ..UploadStats::default()
    };
    // Several chunks in flight: against S3 each is a round trip or two.
    let mut results = Vec::with_capacity(offsets.len());
    for batch in offsets.chunks(UPLOAD_CONCURRENCY) {
        let puts: Vec<_> = batch
            .iter()
            .map(|&offset| upload_chunk(store, claims, file.clone(), size, offset, path))
            .collect();
        // Every put of the batch runs to its end, failed or not: what landed stays, so a
        // retry of an interrupted upload sends only the rest.
        for r in futures::future::join_all(puts).await {
            results.push(r?);
        }
    }
    let mut chunks = Vec::new();
    for r in results {
        match r {
            None => stats.skipped += 1,
            Some((chunk, sent)) => {
                if sent {
                    stats.uploaded += 1;
                    stats.bytes_uploaded += chunk.len;
                } else {
                    stats.reused += 1;
                }
                chunks.push(chunk);
            }
        }
    }
    stats.chunks = chunks.len();
    Ok((
        FileManifest {
            size,
            chunk_size: CHUNK_SIZE,
            chunks,
        },
        stats,
    ))
}

/// Reads one chunk, verifies it, and writes it at its offset.
async fn restore_chunk(
    store: &impl ObjectStore,
    chunk: &ChunkRef,
    file: &std::fs::File,
    tmp: &Path,
) -> Result<(), StoreError> {
    let key = chunk.key();
    let data = store.get(&key).await?;
    let found = hex(&Sha256::digest(&data));
    if found != chunk.sha256 || data.len() as u64 != chunk.len {
        return Err(StoreError::Corrupt {
            key,
            expected: chunk.sha256.clone(),
            found,
        });
    }
    file.write_all_at(&data, chunk.offset)
        .map_err(io("write", tmp))
}

/// Rebuilds a file from its manifest at `dest` (sparse where nothing was stored),
/// verifying every chunk; the file takes its name only once complete.
pub async fn restore_file(
    store: &impl ObjectStore,
    manifest: &FileManifest,
    dest: &Path,
) -> Result<(), StoreError> {
    let tmp = dest.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.set_len(manifest.size).map_err(io("size", &tmp))?;
    let result = async {
        let file = &file;
        let tmp = &tmp;
        // In batches, several gets in flight. (A stream over an iterator with a
        // closure would pipeline better, but its future is not provably `Send` to
        // rustc, and callers spawn this.)
        for batch in manifest.chunks.chunks(UPLOAD_CONCURRENCY) {
            let gets: Vec<_> = batch
                .iter()
                .map(|chunk| restore_chunk(store, chunk, file, tmp))
                .collect();
            futures::future::try_join_all(gets).await?;
        }
        file.sync_all().map_err(io("sync", tmp))
    }
    .await;
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, dest).map_err(io("commit", dest))?;
            // The name too survives a crash.
            let dir = dest
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", dir))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "nullspace-storage-{name}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A sparse 64 MiB file with data in a few places, like a memory image.
    fn sparse_image(path: &Path, seed: u8) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(64 << 20).unwrap();
        for (i, at) in [0u64, 5 << 20, 40 << 20].into_iter().enumerate() {
            let data: Vec<u8> = (0..300_000u32)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed + i as u8))
                .collect();
            f.write_all_at(&data, at).unwrap();
        }
        // A written-but-zero page range: not a hole, still not stored.
        f.write_all_at(&vec![0u8; 1 << 20], 20 << 20).unwrap();
    }

    #[tokio::test]
    async fn a_sparse_file_round_trips_and_stores_only_its_data() {
        let dir = Dir::new("roundtrip");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let src = dir.0.join("memory");
        sparse_image(&src, 1);
        let (manifest, stats) = upload_file(&store, &src).await.unwrap();
        assert_eq!(stats.chunks, 3, "{stats:?}");
        assert_eq!(stats.uploaded, 3);
        assert_eq!(stats.skipped, 64 - 3);
        let dest = dir.0.join("restored");
        restore_file(&store, &manifest, &dest).await.unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        // Restored sparse too: far fewer blocks than its size.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dest).unwrap().blocks() * 512 < 8 << 20);
    }

    #[tokio::test]
    async fn a_second_similar_file_reuses_chunks_and_an_interrupted_upload_resumes() {
        let dir = Dir::new("dedup");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let a = dir.0.join("a");
        sparse_image(&a, 1);
        upload_file(&store, &a).await.unwrap();
        // Same image with one chunk changed: only that chunk is new.
        let b = dir.0.join("b");
        std::fs::copy(&a, &b).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&b)
            .unwrap()
            .write_all_at(b"changed", 40 << 20)
            .unwrap();
        let (_, stats) = upload_file(&store, &b).await.unwrap();
        assert_eq!((stats.uploaded, stats.reused), (1, 2), "{stats:?}");
        // An upload that died after some chunks: the retry sends only the rest.
        let c = dir.0.join("c");
        sparse_image(&c, 9);
        let (m, _) = upload_file(&store, &c).await.unwrap();
        store.delete(&m.chunks[2].key()).await.unwrap();
        let (_, stats) = upload_file(&store, &c).await.unwrap();
        assert_eq!((stats.uploaded, stats.reused), (1, 2), "{stats:?}");
    }

    #[tokio::test]
    async fn a_corrupted_chunk_is_detected_and_nothing_half_written_remains() {
        let dir = Dir::new("corrupt");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let src = dir.0.join("memory");
        sparse_image(&src, 3);
        let (manifest, _) = upload_file(&store, &src).await.unwrap();
        let victim = manifest.chunks[1].key();
        let mut bytes = store.get(&victim).await.unwrap().to_vec();
        bytes[1000] ^= 0xff;
        store.put(&victim, bytes.into()).await.unwrap();
        let dest = dir.0.join("restored");
        let err = restore_file(&store, &manifest, &dest).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if *key == victim),
            "{err}"
        );
        assert!(!dest.exists() && !dest.with_extension("partial").exists());
    }

    #[tokio::test]
    async fn conditional_writes_commit_once_and_keys_are_checked() {
        let dir = Dir::new("cond");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        store
            .put_if_absent("snapshots/s1/manifest.json", "one".into())
            .await
            .unwrap();
        let again = store
            .put_if_absent("snapshots/s1/manifest.json", "two".into())
            .await
            .unwrap_err();
        assert!(matches!(again, StoreError::AlreadyExists(_)));
        assert_eq!(
            &store.get("snapshots/s1/manifest.json").await.unwrap()[..],
            b"one"
        );
        assert_eq!(
            store.list("snapshots/").await.unwrap(),
            ["snapshots/s1/manifest.json"]
        );
        for bad in ["../x", "/abs", "a//b", "a/./b", "sp ace"] {
            assert!(
                matches!(store.get(bad).await, Err(StoreError::InvalidKey(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            store.get("missing").await,
            Err(StoreError::NotFound(_))
        ));
        store.delete("missing").await.unwrap();
    }
}
