//! Files as content-addressed chunks.
//!
//! A file is cut into chunks one of two ways ([`Layout`]):
//!
//! - **Positional**: at fixed, page-aligned offsets ([`CHUNK_SIZE`]), for files whose
//!   bytes stay where they are between versions (a memory image, a raw volume). Given a
//!   [`Base`] (the memory the VM started from, or its previous upload), a chunk that
//!   differs from the base's chunk at its offset in a few pages is stored as a patch of
//!   those pages ([`crate::pages`]): a snapshot stores what changed, not every chunk a
//!   changed page touches.
//! - **Content-defined** (FastCDC): for files whose bytes shift (a migration stream, a
//!   qcow2 overlay that places clusters in write order): cut points follow the content,
//!   so an insertion changes the chunks around it, not every later one.
//!
//! Pieces in holes and pieces of only zeros are not stored; the rest go to
//! `chunks/<sha256>` once — a chunk already in the store (another snapshot of the same
//! family, or an interrupted upload of this one) is not sent again. The
//! [`FileManifest`] lists offsets, lengths and hashes; reading back verifies every chunk
//! (a patched one after the patch is applied).
//!
//! A chunk that is reused (or uploaded) is first claimed from the garbage collector
//! ([`crate::gc`]): the manifest that references it must be committed within half the
//! bucket's grace of the claims, or its chunks are checked again ([`Batch::ready`]).

use crate::gc::{Claims, RECHECKS};
use crate::pages::{self, Anchor, PageHash, PageIndex};
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Chunks read, hashed and sent (or fetched) at once.
const UPLOAD_CONCURRENCY: usize = 16;

/// Runs `work` on each item with at most [`UPLOAD_CONCURRENCY`] in flight: a window,
/// not batches, so one slow request holds up no others. Every one started runs to its
/// end, failed or not (what landed stays: a retry sends only the rest); then the
/// results, in the order they finished, or the first error.
async fn windowed<I, F, T>(
    items: I,
    mut work: impl FnMut(I::Item) -> F,
) -> Result<Vec<T>, StoreError>
where
    I: IntoIterator,
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    use futures::StreamExt;
    let mut items = items.into_iter();
    let mut running = futures::stream::FuturesUnordered::new();
    let (mut done, mut failed) = (Vec::new(), None);
    loop {
        while failed.is_none() && running.len() < UPLOAD_CONCURRENCY {
            match items.next() {
                Some(item) => running.push(work(item)),
                None => break,
            }
        }
        match running.next().await {
            None => break,
            Some(Ok(t)) => done.push(t),
            Some(Err(e)) => {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Size of a positional chunk: a multiple of the page size, so memory pages never
/// straddle two.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// Content-defined chunks: smallest, average and largest (bytes). A qcow2 cluster is
/// 64 KiB: chunks of a few clusters keep the object count near the positional one's.
const CDC_MIN: usize = 64 << 10;
const CDC_AVG: usize = 256 << 10;
const CDC_MAX: usize = 1 << 20;

/// How a file was cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cut {
    /// At fixed offsets of `chunk_size`.
    #[default]
    Fixed,
    /// Where its content says (FastCDC, `chunk_size` the average).
    ContentDefined,
}

/// A stored file: its size and its non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Size in bytes (holes and zero chunks included).
    pub size: u64,
    /// Chunk size it was cut with (the average, content-defined).
    pub chunk_size: u64,
    /// How it was cut (older manifests: fixed).
    #[serde(default)]
    pub cut: Cut,
    /// The stored chunks, by offset.
    pub chunks: Vec<ChunkRef>,
}

/// The longest patch a chunk can have: every page of a [`CHUNK_SIZE`] chunk.
const MAX_PATCH: u64 = 12 + (CHUNK_SIZE / pages::PAGE as u64) * (4 + pages::PAGE as u64);

impl FileManifest {
    /// Whether it is one this build could have written: chunks in order, inside the
    /// file, none longer than a chunk, hashes that are SHA-256 hex, patches no longer
    /// than a chunk's pages. (A manifest read from the store is checked before it sizes
    /// a buffer or a file.)
    pub fn check(&self) -> Result<(), String> {
        let is_sha = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let mut end = 0u64;
        for c in &self.chunks {
            if c.offset < end || c.len == 0 || c.len > CHUNK_SIZE.max(CDC_MAX as u64) {
                return Err(format!("a chunk at {} of {} bytes", c.offset, c.len));
            }
            end = c
                .offset
                .checked_add(c.len)
                .filter(|e| *e <= self.size)
                .ok_or_else(|| {
                    format!(
                        "a chunk at {} past the file's {} bytes",
                        c.offset, self.size
                    )
                })?;
            if !is_sha(&c.sha256) {
                return Err(format!("a chunk hash {:?}", c.sha256));
            }
            if let Some(p) = &c.patch {
                if !is_sha(&p.sha256)
                    || p.base.as_deref().is_some_and(|b| !is_sha(b))
                    || p.len > MAX_PATCH
                {
                    return Err(format!("a patch {:?} of {} bytes", p.sha256, p.len));
                }
            }
        }
        Ok(())
    }

    /// The store keys of every object a restore of this file reads.
    pub fn object_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.chunks.iter().flat_map(ChunkRef::object_keys)
    }
}

/// One stored chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length (the last chunk may be short).
    pub len: u64,
    /// Its content's hash: its content address, or (patched) what applying the patch
    /// must give.
    pub sha256: String,
    /// Stored as a patch of another chunk, not whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchRef>,
}

/// A chunk stored as the pages that differ from another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRef {
    /// The stored chunk it applies to (`None`: a chunk of zeros).
    pub base: Option<String>,
    /// The patch object's hash ([`crate::pages::encode_patch`]).
    pub sha256: String,
    /// The patch object's length.
    pub len: u64,
}

impl ChunkRef {
    /// The store key of the whole chunk (of an unpatched one: what is stored).
    pub fn key(&self) -> String {
        chunk_key(&self.sha256)
    }

    /// The hashes of the objects a restore of this chunk reads.
    pub fn object_shas(&self) -> Vec<&str> {
        match &self.patch {
            None => vec![&self.sha256],
            Some(p) => std::iter::once(p.sha256.as_str())
                .chain(p.base.as_deref())
                .collect(),
        }
    }

    /// The store keys of the objects a restore of this chunk reads.
    pub fn object_keys(&self) -> Vec<String> {
        self.object_shas().into_iter().map(chunk_key).collect()
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
    /// Objects sent to the store (chunks, patches, and bases a patch needed).
    pub uploaded: usize,
    /// Chunks the store already had.
    pub reused: usize,
    /// Chunk-sized pieces skipped as holes or zeros.
    pub skipped: usize,
    /// Chunks stored as patches of a base chunk.
    pub patched: usize,
    /// Bytes sent.
    pub bytes_uploaded: u64,
}

impl UploadStats {
    /// Counts one object stored: `sent` (its `len` bytes), or found in the store.
    fn count(&mut self, sent: bool, len: u64) {
        if sent {
            self.uploaded += 1;
            self.bytes_uploaded += len;
        } else {
            self.reused += 1;
        }
    }

    /// Adds another upload's counts.
    pub fn add(&mut self, o: &UploadStats) {
        self.chunks += o.chunks;
        self.uploaded += o.uploaded;
        self.reused += o.reused;
        self.skipped += o.skipped;
        self.patched += o.patched;
        self.bytes_uploaded += o.bytes_uploaded;
    }
}

/// What a positional upload's chunks are stored against.
#[derive(Debug, Clone)]
pub struct Base {
    /// Per offset, the chunk a chunk there is patched against.
    pub index: PageIndex,
    /// The file the index describes, if it is on this host: an anchor the store lacks
    /// is stored from it. (An index of an earlier upload has none: its anchors are in
    /// the store, and one collected since is simply not patched against.)
    pub file: Option<PathBuf>,
}

/// How to cut a file.
#[derive(Debug, Clone, Copy)]
pub enum Layout<'a> {
    /// At fixed offsets; with a base, chunks close to it stored as patches; with
    /// `index`, the upload returns the [`PageIndex`] a later upload of the same memory
    /// is patched against.
    Positional { base: Option<&'a Base>, index: bool },
    /// At content-defined cut points.
    ContentDefined,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        key: path.display().to_string(),
        source,
    }
}

/// Offsets of the `chunk`-sized pieces that touch data (not holes), per
/// SEEK_DATA/SEEK_HOLE.
pub(crate) fn data_chunk_offsets(
    file: &std::fs::File,
    size: u64,
    chunk: u64,
) -> std::io::Result<Vec<u64>> {
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
        let mut at = (data as u64 / chunk) * chunk;
        while at < hole as u64 {
            if offsets.last() != Some(&at) {
                offsets.push(at);
            }
            at += chunk;
        }
        pos = hole;
    }
    Ok(offsets)
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A chunk read and hashed (on a blocking thread), to be stored.
struct Prepared {
    offset: u64,
    data: Vec<u8>,
    what: Plan,
}

enum Plan {
    /// All zeros: not stored.
    Zero,
    /// Stored whole; `pages` when an index is wanted.
    Whole {
        sha: String,
        pages: Option<Vec<PageHash>>,
    },
    /// The same pages as its anchor: the anchor's chunk.
    Anchor(Anchor),
    /// A patch of the pages that differ from its anchor (`None`: zeros).
    Patch {
        sha: String,
        pages: Vec<PageHash>,
        anchor: Option<Anchor>,
        patch: Vec<u8>,
    },
}

/// Reads and hashes the positional chunk at `offset`, and decides how it is stored:
/// `base` is whether the upload has one, `anchor` its anchor at this offset.
fn prepare_positional(
    file: &std::fs::File,
    size: u64,
    offset: u64,
    base: bool,
    anchor: Option<&Anchor>,
    index: bool,
) -> std::io::Result<Prepared> {
    let len = CHUNK_SIZE.min(size - offset);
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset)?;
    if data.iter().all(|b| *b == 0) {
        return Ok(Prepared {
            offset,
            data,
            what: Plan::Zero,
        });
    }
    let paged = len.is_multiple_of(pages::PAGE as u64);
    let pages = (paged && (index || base)).then(|| pages::page_hashes(&data));
    let what = match (base, pages) {
        (true, Some(pages)) => {
            match anchor {
                // The same pages: the anchor's chunk, if its hash says so too (an index
                // is a hint, never trusted to name what these bytes are).
                Some(a) if a.pages == pages && sha_hex(&data) == a.sha256 => {
                    Plan::Anchor(a.clone())
                }
                _ => match pages::changed_pages(&pages, anchor) {
                    Some(changed) => Plan::Patch {
                        sha: sha_hex(&data),
                        patch: pages::encode_patch(&data, &changed),
                        pages,
                        anchor: anchor.cloned(),
                    },
                    None => Plan::Whole {
                        sha: sha_hex(&data),
                        pages: Some(pages),
                    },
                },
            }
        }
        (_, pages) => Plan::Whole {
            sha: sha_hex(&data),
            pages,
        },
    };
    Ok(Prepared { offset, data, what })
}

/// What storing one chunk gave: its reference and the anchor a later upload patches
/// against.
struct Stored {
    chunk: Option<ChunkRef>,
    anchor: Option<Anchor>,
    stats: UploadStats,
}

/// Claims the object `sha` and stores `bytes` under it unless the store has it;
/// returns whether it was sent.
async fn put_claimed(
    store: &impl ObjectStore,
    claims: &Claims,
    sha: &str,
    bytes: impl FnOnce() -> Vec<u8>,
) -> Result<bool, StoreError> {
    let key = chunk_key(sha);
    // Claimed before the check: a collector that has not deleted it by then won't.
    claims.claim(store, sha).await?;
    if store.exists(&key).await? {
        return Ok(false);
    }
    store.put(&key, bytes().into()).await?;
    Ok(true)
}

/// Whether the store has the anchor `a` (claimed), storing it from the base file if
/// not (its bytes checked against the anchor's hash first).
async fn ensure_anchor(
    store: &impl ObjectStore,
    claims: &Claims,
    a: &Anchor,
    offset: u64,
    len: u64,
    base: Option<&Base>,
    stats: &mut UploadStats,
) -> Result<bool, StoreError> {
    claims.claim(store, &a.sha256).await?;
    if store.exists(&chunk_key(&a.sha256)).await? {
        return Ok(true);
    }
    let Some(file) = base.and_then(|b| b.file.clone()) else {
        return Ok(false);
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(&file)?.read_exact_at(&mut buf, offset)?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .expect("read task");
    match read {
        Ok(buf) if sha_hex(&buf) == a.sha256 => {
            stats.count(true, len);
            store.put(&chunk_key(&a.sha256), buf.into()).await?;
            Ok(true)
        }
        // The base changed or went: patch against nothing.
        _ => Ok(false),
    }
}

async fn store_prepared(
    store: &impl ObjectStore,
    claims: &Claims,
    p: Prepared,
    base: Option<&Base>,
) -> Result<Stored, StoreError> {
    let len = p.data.len() as u64;
    let mut stats = UploadStats::default();
    let whole = |sha: String, patch: Option<PatchRef>| ChunkRef {
        offset: p.offset,
        len,
        sha256: sha,
        patch,
    };
    let (sha, pages) = match p.what {
        Plan::Zero => {
            stats.skipped += 1;
            return Ok(Stored {
                chunk: None,
                anchor: None,
                stats,
            });
        }
        Plan::Anchor(a) => {
            // The anchor's bytes are these: stored from here if it went.
            (a.sha256, Some(a.pages))
        }
        Plan::Whole { sha, pages } => (sha, pages),
        Plan::Patch {
            sha,
            pages,
            anchor,
            patch,
        } => {
            let usable = match &anchor {
                None => true,
                Some(a) => ensure_anchor(store, claims, a, p.offset, len, base, &mut stats).await?,
            };
            if usable {
                let patch_sha = sha_hex(&patch);
                let patch_len = patch.len() as u64;
                let sent = put_claimed(store, claims, &patch_sha, || patch).await?;
                stats.count(sent, patch_len);
                stats.patched += 1;
                stats.chunks += 1;
                return Ok(Stored {
                    chunk: Some(whole(
                        sha,
                        Some(PatchRef {
                            base: anchor.as_ref().map(|a| a.sha256.clone()),
                            sha256: patch_sha,
                            len: patch_len,
                        }),
                    )),
                    anchor,
                    stats,
                });
            }
            (sha, Some(pages))
        }
    };
    let data = p.data;
    let sent = put_claimed(store, claims, &sha, || data).await?;
    stats.count(sent, len);
    stats.chunks += 1;
    Ok(Stored {
        anchor: pages.map(|pages| Anchor {
            sha256: sha.clone(),
            pages,
        }),
        chunk: Some(whole(sha, None)),
        stats,
    })
}

/// Stores `path` as positional chunks; returns its manifest (not stored: it goes into
/// the caller's snapshot manifest, which is written last, within half the bucket's
/// garbage-collection grace of this call; the crate's own publishes use a [`Batch`],
/// which re-checks).
pub async fn upload_file(
    store: &impl ObjectStore,
    path: &Path,
) -> Result<(FileManifest, UploadStats), StoreError> {
    let claims = Claims::begin(store).await?;
    let (manifest, stats, _) = upload_claimed(
        store,
        path,
        &claims,
        Layout::Positional {
            base: None,
            index: false,
        },
    )
    .await?;
    Ok((manifest, stats))
}

/// What one file's upload gave.
pub struct Uploaded {
    pub manifest: FileManifest,
    pub stats: UploadStats,
    /// With [`Layout::Positional`] `index`: what a later upload patches against.
    pub index: Option<PageIndex>,
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

    /// Stores `path` as positional chunks (see [`upload_file`]).
    pub(crate) async fn upload(
        &mut self,
        store: &impl ObjectStore,
        path: &Path,
    ) -> Result<(FileManifest, UploadStats), StoreError> {
        let up = self
            .upload_as(
                store,
                path,
                Layout::Positional {
                    base: None,
                    index: false,
                },
            )
            .await?;
        Ok((up.manifest, up.stats))
    }

    /// Stores `path` cut as `layout` says.
    pub(crate) async fn upload_as(
        &mut self,
        store: &impl ObjectStore,
        path: &Path,
        layout: Layout<'_>,
    ) -> Result<Uploaded, StoreError> {
        let (manifest, stats, index) = upload_claimed(store, path, &self.claims, layout).await?;
        self.files.push((path.to_path_buf(), manifest.clone()));
        Ok(Uploaded {
            manifest,
            stats,
            index,
        })
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

/// Claims and checks every object of an uploaded file again; a chunk with one missing
/// is read from `path` again (unchanged: it is verified) and stored.
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
    let mut missing = false;
    for sha in chunk.object_shas() {
        claims.claim(store, sha).await?;
        missing |= !store.exists(&chunk_key(sha)).await?;
    }
    if !missing {
        return Ok(());
    }
    let (offset, len) = (chunk.offset, chunk.len);
    let (buf, found) = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        let sha = sha_hex(&buf);
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
    let Some(patch) = &chunk.patch else {
        return store.put(&chunk.key(), buf.into()).await;
    };
    // A patch or its base was collected: the patch is made again from the base, which
    // must still be there (the manifest names it).
    let mut base = match &patch.base {
        None => vec![0u8; len as usize],
        Some(sha) => get_verified(store, sha, len).await.map_err(|e| match e {
            StoreError::NotFound(key) => StoreError::Backend {
                op: "recheck",
                key,
                message: "the chunk a patch of this snapshot applies to was collected during the upload; take the snapshot again".into(),
            },
            e => e,
        })?,
    };
    let changed: Vec<u32> = (0..buf.len() / pages::PAGE)
        .filter(|&i| {
            buf[i * pages::PAGE..][..pages::PAGE] != base[i * pages::PAGE..][..pages::PAGE]
        })
        .map(|i| i as u32)
        .collect();
    let bytes = pages::encode_patch(&buf, &changed);
    pages::apply_patch(&mut base, &bytes).map_err(|e| StoreError::Backend {
        op: "recheck",
        key: chunk.key(),
        message: e,
    })?;
    let found = sha_hex(&bytes);
    if found != patch.sha256 || base != buf {
        return Err(StoreError::Corrupt {
            key: format!("{} (a patch made again)", path.display()),
            expected: patch.sha256.clone(),
            found,
        });
    }
    store.put(&chunk_key(&patch.sha256), bytes.into()).await
}

/// Reads the chunk `sha` and checks its hash and length.
async fn get_verified(
    store: &impl ObjectStore,
    sha: &str,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    let key = chunk_key(sha);
    let data = store.get(&key).await?;
    let found = sha_hex(&data);
    if found != sha || data.len() as u64 != len {
        return Err(StoreError::Corrupt {
            key,
            expected: sha.to_string(),
            found,
        });
    }
    Ok(data.to_vec())
}

async fn upload_claimed(
    store: &impl ObjectStore,
    path: &Path,
    claims: &Claims,
    layout: Layout<'_>,
) -> Result<(FileManifest, UploadStats, Option<PageIndex>), StoreError> {
    let file = std::sync::Arc::new(std::fs::File::open(path).map_err(io("open", path))?);
    let size = file.metadata().map_err(io("stat", path))?.len();
    let mut stats = UploadStats::default();
    let mut chunks = Vec::new();
    let mut index = PageIndex {
        chunk_size: CHUNK_SIZE,
        ..PageIndex::default()
    };
    let (base, want_index) = match layout {
        Layout::Positional { base, index } => (base, index),
        Layout::ContentDefined => (None, false),
    };
    // Chunks come prepared (read and hashed on blocking threads) and are stored
    // several at a time: against S3 each is a round trip or two.
    let mut take = |stored: Stored, stats: &mut UploadStats| {
        stats.add(&stored.stats);
        if let Some(c) = stored.chunk {
            if let Some(a) = stored.anchor {
                index.anchors.insert(c.offset, a);
            }
            chunks.push(c);
        }
    };
    match layout {
        Layout::Positional { .. } => {
            let offsets = {
                let file = file.clone();
                tokio::task::spawn_blocking(move || data_chunk_offsets(&file, size, CHUNK_SIZE))
                    .await
                    .expect("seek task")
                    .map_err(io("seek", path))?
            };
            stats.skipped = size.div_ceil(CHUNK_SIZE) as usize - offsets.len();
            let stored = windowed(offsets, |offset| {
                let file = file.clone();
                let anchor = base.and_then(|b| b.index.anchors.get(&offset)).cloned();
                let has_base = base.is_some();
                async move {
                    let p = tokio::task::spawn_blocking(move || {
                        prepare_positional(
                            &file,
                            size,
                            offset,
                            has_base,
                            anchor.as_ref(),
                            want_index,
                        )
                    })
                    .await
                    .expect("read task")
                    .map_err(io("read", path))?;
                    store_prepared(store, claims, p, base).await
                }
            })
            .await?;
            for st in stored {
                take(st, &mut stats);
            }
        }
        Layout::ContentDefined => {
            let (tx, mut rx) =
                tokio::sync::mpsc::channel::<std::io::Result<Prepared>>(UPLOAD_CONCURRENCY * 2);
            let reader = std::fs::File::open(path).map_err(io("open", path))?;
            let cutter = tokio::task::spawn_blocking(move || {
                for c in fastcdc::v2020::StreamCDC::new(reader, CDC_MIN, CDC_AVG, CDC_MAX) {
                    let prepared = c.map_err(std::io::Error::other).map(|c| Prepared {
                        offset: c.offset,
                        what: match c.data.iter().all(|b| *b == 0) {
                            true => Plan::Zero,
                            false => Plan::Whole {
                                sha: sha_hex(&c.data),
                                pages: None,
                            },
                        },
                        data: c.data,
                    });
                    let failed = prepared.is_err();
                    if tx.blocking_send(prepared).is_err() || failed {
                        break;
                    }
                }
            });
            let mut batch = Vec::with_capacity(UPLOAD_CONCURRENCY);
            let mut failed = None;
            loop {
                let next = rx.recv().await;
                let done = next.is_none();
                match next {
                    Some(Ok(p)) => batch.push(p),
                    Some(Err(e)) => failed = Some(e),
                    None => {}
                }
                if failed.is_some()
                    || batch.len() == UPLOAD_CONCURRENCY
                    || (done && !batch.is_empty())
                {
                    let puts: Vec<_> = batch
                        .drain(..)
                        .map(|p| store_prepared(store, claims, p, None))
                        .collect();
                    for r in futures::future::join_all(puts).await {
                        take(r?, &mut stats);
                    }
                }
                if let Some(e) = failed {
                    drop(rx);
                    let _ = cutter.await;
                    return Err(io("read", path)(e));
                }
                if done {
                    break;
                }
            }
            cutter.await.expect("chunking task");
        }
    }
    // They finished in any order: the manifest lists them by offset.
    chunks.sort_unstable_by_key(|c| c.offset);
    let cut = match layout {
        Layout::Positional { .. } => Cut::Fixed,
        Layout::ContentDefined => Cut::ContentDefined,
    };
    Ok((
        FileManifest {
            size,
            chunk_size: match cut {
                Cut::Fixed => CHUNK_SIZE,
                Cut::ContentDefined => CDC_AVG as u64,
            },
            cut,
            chunks,
        },
        stats,
        want_index.then_some(index),
    ))
}

/// Reads one chunk (a patched one: its base and patch, applied), verifies it, and
/// writes it at its offset. With `index`, returns the chunk's anchor for a later
/// upload: the stored chunk it is, or the one its patch applies to.
async fn restore_chunk(
    store: &impl ObjectStore,
    chunk: &ChunkRef,
    file: &std::fs::File,
    tmp: &Path,
    index: bool,
) -> Result<Option<Anchor>, StoreError> {
    let paged = index && chunk.len.is_multiple_of(pages::PAGE as u64);
    let (data, anchor) = match &chunk.patch {
        None => {
            let data = get_verified(store, &chunk.sha256, chunk.len).await?;
            let anchor = paged.then(|| Anchor {
                sha256: chunk.sha256.clone(),
                pages: pages::page_hashes(&data),
            });
            (data, anchor)
        }
        Some(p) => {
            let patch = get_verified(store, &p.sha256, p.len).await?;
            let mut data = match &p.base {
                None => vec![0u8; chunk.len as usize],
                Some(base) => get_verified(store, base, chunk.len).await?,
            };
            let anchor = p.base.as_ref().filter(|_| paged).map(|base| Anchor {
                sha256: base.clone(),
                pages: pages::page_hashes(&data),
            });
            pages::apply_patch(&mut data, &patch).map_err(|_| StoreError::Corrupt {
                key: chunk_key(&p.sha256),
                expected: chunk.sha256.clone(),
                found: "a patch that does not apply".into(),
            })?;
            let found = sha_hex(&data);
            if found != chunk.sha256 {
                return Err(StoreError::Corrupt {
                    key: chunk_key(&p.sha256),
                    expected: chunk.sha256.clone(),
                    found,
                });
            }
            (data, anchor)
        }
    };
    file.write_all_at(&data, chunk.offset)
        .map_err(io("write", tmp))?;
    Ok(anchor)
}

/// Rebuilds a file from its manifest at `dest` (sparse where nothing was stored),
/// verifying every chunk; the file takes its name only once complete.
pub async fn restore_file(
    store: &impl ObjectStore,
    manifest: &FileManifest,
    dest: &Path,
) -> Result<(), StoreError> {
    restore(store, manifest, dest, false).await.map(drop)
}

/// [`restore_file`], also giving the file's page index (positional files): the stored
/// chunks its chunks are or are patched from, so its next upload patches against them.
pub async fn restore_file_indexed(
    store: &impl ObjectStore,
    manifest: &FileManifest,
    dest: &Path,
) -> Result<PageIndex, StoreError> {
    restore(store, manifest, dest, manifest.cut == Cut::Fixed).await
}

async fn restore(
    store: &impl ObjectStore,
    manifest: &FileManifest,
    dest: &Path,
    index: bool,
) -> Result<PageIndex, StoreError> {
    // From the bucket: checked before anything is allocated or written by it.
    manifest.check().map_err(|why| StoreError::Backend {
        op: "restore",
        key: dest.display().to_string(),
        message: format!("the stored manifest was tampered with: {why}"),
    })?;
    let tmp = dest.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.set_len(manifest.size).map_err(io("size", &tmp))?;
    let mut anchors = PageIndex {
        chunk_size: manifest.chunk_size,
        ..PageIndex::default()
    };
    let result = async {
        let file = &file;
        let tmp = &tmp;
        let got = windowed(&manifest.chunks, |chunk| async move {
            let anchor = restore_chunk(store, chunk, file, tmp, index).await?;
            Ok((chunk.offset, anchor))
        })
        .await?;
        for (offset, anchor) in got {
            if let Some(a) = anchor {
                anchors.anchors.insert(offset, a);
            }
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
                .map_err(io("sync", dir))?;
            Ok(anchors)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
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

    /// 16 MiB of pseudo-random bytes.
    fn noise(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..(16 << 20) / 8)
            .flat_map(|_| {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    async fn upload_as(
        store: &LocalStore,
        path: &Path,
        layout: Layout<'_>,
    ) -> (FileManifest, UploadStats, Option<PageIndex>) {
        let claims = Claims::begin(store).await.unwrap();
        upload_claimed(store, path, &claims, layout).await.unwrap()
    }

    async fn restores_to(store: &LocalStore, manifest: &FileManifest, want: &[u8], dir: &Dir) {
        let dest = dir.0.join("restored");
        restore_file(store, manifest, &dest).await.unwrap();
        assert!(
            std::fs::read(&dest).unwrap() == want,
            "restored bytes differ"
        );
        std::fs::remove_file(&dest).unwrap();
    }

    #[tokio::test]
    async fn a_memory_image_with_scattered_changes_is_stored_as_patches_of_its_base() {
        let dir = Dir::new("patches");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let base_path = dir.0.join("base");
        let base_bytes = noise(1);
        std::fs::write(&base_path, &base_bytes).unwrap();
        // One page changed in every chunk, one chunk rewritten whole.
        let mut now = base_bytes.clone();
        for c in 0..16 {
            now[(c << 20) + 7 * 4096 + 3] ^= 0xff;
        }
        now[5 << 20..6 << 20].copy_from_slice(&noise(9)[..1 << 20]);
        let now_path = dir.0.join("now");
        std::fs::write(&now_path, &now).unwrap();
        let base = Base {
            index: PageIndex::of_file(&base_path, CHUNK_SIZE).unwrap(),
            file: Some(base_path.clone()),
        };
        let positional = |base| Layout::Positional { base, index: true };
        let (first, stats, index) = upload_as(&store, &now_path, positional(Some(&base))).await;
        // 15 patches of one page, their 15 anchors stored from the base file (the
        // store had none), one whole chunk.
        assert_eq!((stats.chunks, stats.patched), (16, 15), "{stats:?}");
        assert_eq!(stats.uploaded, 15 + 15 + 1, "{stats:?}");
        let patch_bytes = 12 + 4 + 4096;
        assert_eq!(
            stats.bytes_uploaded,
            15 * (1 << 20) + 15 * patch_bytes + (1 << 20)
        );
        restores_to(&store, &first, &now, &dir).await;

        // The next snapshot of the same memory, against the index the first left: one
        // page more changed in one chunk sends one patch of two pages, nothing else.
        let mut later = now.clone();
        later[(3 << 20) + 100 * 4096] ^= 0x01;
        std::fs::write(&now_path, &later).unwrap();
        let next = Base {
            index: index.unwrap(),
            file: None,
        };
        let (second, stats, _) = upload_as(&store, &now_path, positional(Some(&next))).await;
        assert_eq!((stats.uploaded, stats.reused), (1, 15), "{stats:?}");
        assert_eq!(stats.bytes_uploaded, 12 + 2 * (4 + 4096));
        restores_to(&store, &second, &later, &dir).await;
        // Both need their bases and patches: what the collector must keep.
        let keys: std::collections::HashSet<String> = second.object_keys().collect();
        assert_eq!(keys.len(), 15 + 15 + 1, "anchors, patches, one whole chunk");

        // A tampered patch: the restore stops at it, nothing half-written remains.
        let victim = second.chunks[3].patch.as_ref().unwrap();
        let key = chunk_key(&victim.sha256);
        let mut bytes = store.get(&key).await.unwrap().to_vec();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        store.put(&key, bytes.into()).await.unwrap();
        let dest = dir.0.join("tampered");
        let err = restore_file(&store, &second, &dest).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!dest.exists() && !dest.with_extension("partial").exists());
    }

    #[tokio::test]
    async fn a_stream_with_bytes_inserted_keeps_its_other_content_defined_chunks() {
        let dir = Dir::new("cdc");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let path = dir.0.join("state");
        let first = noise(3);
        std::fs::write(&path, &first).unwrap();
        let (m, stats, _) = upload_as(&store, &path, Layout::ContentDefined).await;
        assert_eq!(m.cut, Cut::ContentDefined);
        assert!(stats.chunks > 16, "{stats:?}");
        // 100 bytes inserted near the start: every fixed chunk would be new.
        let mut shifted = first[..1000].to_vec();
        shifted.extend_from_slice(&[7u8; 100]);
        shifted.extend_from_slice(&first[1000..]);
        std::fs::write(&path, &shifted).unwrap();
        let (m2, again, _) = upload_as(&store, &path, Layout::ContentDefined).await;
        assert!(
            again.bytes_uploaded < 2 * CDC_MAX as u64,
            "{} bytes sent for 100 inserted",
            again.bytes_uploaded
        );
        restores_to(&store, &m2, &shifted, &dir).await;
        restores_to(&store, &m, &first, &dir).await;
    }

    #[tokio::test]
    async fn a_manifest_naming_impossible_chunks_is_refused_before_anything_is_allocated() {
        let dir = Dir::new("bounds");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        let sha = |c: char| c.to_string().repeat(64);
        let chunk = |offset: u64, len: u64, patch_len: u64| ChunkRef {
            offset,
            len,
            sha256: sha('a'),
            patch: Some(PatchRef {
                base: None,
                sha256: sha('b'),
                len: patch_len,
            }),
        };
        for chunks in [
            vec![chunk(0, u64::MAX / 2, 12)],
            vec![chunk(u64::MAX - 1, 2, 12)],
            vec![chunk(0, 4096, u64::MAX)],
            vec![chunk(8192, 4096, 12), chunk(0, 4096, 12)],
        ] {
            let m = FileManifest {
                size: 1 << 20,
                chunk_size: CHUNK_SIZE,
                cut: Cut::Fixed,
                chunks,
            };
            let err = restore_file(&store, &m, &dir.0.join("out"))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("tampered"), "{err}");
            assert!(!dir.0.join("out.partial").exists());
        }
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
