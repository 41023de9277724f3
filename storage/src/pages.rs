//! Chunks stored as the pages that changed: page indexes and patches.
//!
//! A positional file (a memory image) changes a few scattered pages between snapshots
//! of one sandbox, or between a snapshot and the ones it was restored or forked from.
//! Each such page makes its whole chunk new. So a chunk close to the chunk at the same
//! offset of a *base* (its anchor) is stored as a patch: the pages that differ, applied
//! to the anchor on restore (see [`crate::chunks`]).
//!
//! A [`PageIndex`] says, per chunk offset, which stored chunk is the anchor and a hash
//! of each of its pages, so the pages that differ are found without the anchor's bytes.
//! It is host-local (built from a local file, or written by the previous upload), never
//! read from the store: a tampered bucket cannot steer what a patch is taken against,
//! and a restore checks every rebuilt chunk against its SHA-256 either way.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Pages are the guest's: 4 KiB.
pub const PAGE: usize = 4096;

/// A page's hash: 128 bits of its SHA-256 (what decides whether a page changed).
pub type PageHash = [u8; 16];

/// A chunk becomes a patch only if at most this share of its pages changed (÷ 4):
/// beyond that a patch saves little and costs a second object on restore.
const PATCH_MAX_QUARTERS: usize = 1;

/// The hash of each page of `data` (whose length is a multiple of [`PAGE`]).
pub fn page_hashes(data: &[u8]) -> Vec<PageHash> {
    data.chunks(PAGE)
        .map(|p| Sha256::digest(p)[..16].try_into().expect("16 bytes"))
        .collect()
}

/// The hash of a page of zeros.
pub fn zero_page_hash() -> PageHash {
    static ZERO: std::sync::LazyLock<PageHash> =
        std::sync::LazyLock::new(|| page_hashes(&[0u8; PAGE])[0]);
    *ZERO
}

/// A chunk's anchor: a chunk in the store and its pages' hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// SHA-256 of the stored chunk (hex).
    pub sha256: String,
    /// Its pages' hashes.
    pub pages: Vec<PageHash>,
}

/// Per chunk offset, the anchor a chunk there is patched against. An offset with no
/// anchor is a chunk of zeros: a patch against it needs no stored base.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageIndex {
    /// The chunk size it was cut with.
    pub chunk_size: u64,
    /// Anchors by chunk offset.
    pub anchors: BTreeMap<u64, Anchor>,
}

const INDEX_MAGIC: &[u8; 8] = b"NSPGIDX1";

/// The largest index read: that of 64 GiB of memory (4,148 bytes per MiB).
const MAX_INDEX_BYTES: u64 = 64 * 1024 * 4148 + 24;

impl PageIndex {
    /// The index of a file as it is: every chunk that is not all zeros is its own anchor.
    /// Reads the whole file (holes skipped).
    pub fn of_file(path: &Path, chunk_size: u64) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let mut anchors = BTreeMap::new();
        let mut buf = vec![0u8; chunk_size as usize];
        for offset in crate::chunks::data_chunk_offsets(&file, size, chunk_size)? {
            let len = chunk_size.min(size - offset) as usize;
            if !len.is_multiple_of(PAGE) {
                continue;
            }
            let data = &mut buf[..len];
            file.read_exact_at(data, offset)?;
            if data.iter().all(|b| *b == 0) {
                continue;
            }
            anchors.insert(
                offset,
                Anchor {
                    sha256: hex::encode(Sha256::digest(&*data)),
                    pages: page_hashes(data),
                },
            );
        }
        Ok(Self {
            chunk_size,
            anchors,
        })
    }

    /// The index of `file` cached beside it as `<file>.index`, made (and cached) if
    /// missing or older than the file. A cache that cannot be written is only slower.
    pub fn of_file_cached(file: &Path, chunk_size: u64) -> std::io::Result<Self> {
        let cache = file.with_extension("index");
        let fresh = |c: &Path| -> Option<bool> {
            let (c, f) = (std::fs::metadata(c).ok()?, std::fs::metadata(file).ok()?);
            Some(c.modified().ok()? >= f.modified().ok()?)
        };
        if fresh(&cache) == Some(true) {
            if let Ok(index) = Self::load(&cache) {
                if index.chunk_size == chunk_size {
                    return Ok(index);
                }
            }
        }
        let index = Self::of_file(file, chunk_size)?;
        if let Err(e) = index.save(&cache) {
            tracing::debug!(cache = %cache.display(), error = %e, "page index not cached");
        }
        Ok(index)
    }

    /// Writes it to `path` (a temporary name, then a rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(16 + self.anchors.len() * (48 + 256 * 16));
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.anchors.len() as u64).to_le_bytes());
        for (offset, a) in &self.anchors {
            out.extend_from_slice(&offset.to_le_bytes());
            let sha: [u8; 32] = hex::decode(&a.sha256)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| std::io::Error::other("an anchor's hash is not SHA-256 hex"))?;
            out.extend_from_slice(&sha);
            out.extend_from_slice(&(a.pages.len() as u32).to_le_bytes());
            for p in &a.pages {
                out.extend_from_slice(p);
            }
        }
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Only the daemon's: page hashes would let another confirm a guessed page.
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&out)?;
            std::fs::rename(&tmp, path)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Reads one [`PageIndex::save`] wrote; anything else is an error. Only a regular
    /// file of this process's user, not through a link, and of a bounded size: an index
    /// in a directory a VM's QEMU can write to might be a planted FIFO or a huge file.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
        let file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != me || meta.len() > MAX_INDEX_BYTES {
            return Err(bad("not a page index this daemon wrote"));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_INDEX_BYTES).read_to_end(&mut bytes)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a page index");
        let mut at = 0usize;
        let mut take = |n: usize| -> std::io::Result<&[u8]> {
            let s = bytes.get(at..at + n).ok_or_else(bad)?;
            at += n;
            Ok(s)
        };
        if take(8)? != INDEX_MAGIC {
            return Err(bad());
        }
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let chunk_size = u64_of(take(8)?);
        let count = u64_of(take(8)?);
        if chunk_size == 0 || chunk_size % PAGE as u64 != 0 {
            return Err(bad());
        }
        let max_pages = (chunk_size / PAGE as u64) as usize;
        let mut anchors = BTreeMap::new();
        for _ in 0..count {
            let offset = u64_of(take(8)?);
            let sha = hex::encode(take(32)?);
            let n = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            if n > max_pages {
                return Err(bad());
            }
            let pages = take(n * 16)?
                .chunks(16)
                .map(|p| p.try_into().expect("16 bytes"))
                .collect();
            anchors.insert(offset, Anchor { sha256: sha, pages });
        }
        Ok(Self {
            chunk_size,
            anchors,
        })
    }
}

/// The pages of a chunk (by their hashes) that differ from its anchor's (`None`: a
/// chunk of zeros); `None` if too many do for a patch to pay, or the shapes differ.
pub fn changed_pages(pages: &[PageHash], anchor: Option<&Anchor>) -> Option<Vec<u32>> {
    let zero = zero_page_hash();
    let changed: Vec<u32> = match anchor {
        Some(a) if a.pages.len() != pages.len() => return None,
        Some(a) => (0..pages.len())
            .filter(|&i| pages[i] != a.pages[i])
            .map(|i| i as u32)
            .collect(),
        None => (0..pages.len())
            .filter(|&i| pages[i] != zero)
            .map(|i| i as u32)
            .collect(),
    };
    (changed.len() * 4 <= pages.len() * PATCH_MAX_QUARTERS).then_some(changed)
}

const PATCH_MAGIC: &[u8; 8] = b"NSPATCH1";

/// A patch: `NSPATCH1`, the page count (u32 LE), the page numbers (u32 LE, strictly
/// increasing), then the pages.
pub fn encode_patch(data: &[u8], changed: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + changed.len() * (4 + PAGE));
    out.extend_from_slice(PATCH_MAGIC);
    out.extend_from_slice(&(changed.len() as u32).to_le_bytes());
    for i in changed {
        out.extend_from_slice(&i.to_le_bytes());
    }
    for &i in changed {
        out.extend_from_slice(&data[i as usize * PAGE..][..PAGE]);
    }
    out
}

/// Applies `patch` to `base` (the anchor's bytes, or zeros), in place. A patch that is
/// malformed or names a page outside the chunk is an error (the caller then reports
/// the chunk corrupt), never a panic.
pub fn apply_patch(base: &mut [u8], patch: &[u8]) -> Result<(), String> {
    let head = patch.get(..12).ok_or("shorter than its header")?;
    if &head[..8] != PATCH_MAGIC {
        return Err("not a patch".into());
    }
    let count = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    let pages = base.len() / PAGE;
    if count > pages || patch.len() != 12 + count * (4 + PAGE) {
        return Err(format!(
            "{count} pages in {} bytes for a {pages}-page chunk",
            patch.len()
        ));
    }
    let (numbers, data) = patch[12..].split_at(count * 4);
    let mut last = None;
    for (n, page) in numbers.chunks(4).zip(data.chunks(PAGE)) {
        let i = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
        if i >= pages || last.is_some_and(|l| i <= l) {
            return Err(format!("page {i} out of order or outside the chunk"));
        }
        last = Some(i);
        base[i * PAGE..][..PAGE].copy_from_slice(page);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8) -> Vec<u8> {
        (0..64 * PAGE)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    #[test]
    fn a_patch_of_the_changed_pages_rebuilds_the_chunk_and_bad_patches_are_refused() {
        let base = chunk(1);
        let mut now = base.clone();
        now[3 * PAGE + 9] ^= 0xff;
        now[40 * PAGE] ^= 0x01;
        let anchor = Anchor {
            sha256: String::new(),
            pages: page_hashes(&base),
        };
        let changed = changed_pages(&page_hashes(&now), Some(&anchor)).unwrap();
        assert_eq!(changed, [3, 40]);
        let patch = encode_patch(&now, &changed);
        let mut rebuilt = base.clone();
        apply_patch(&mut rebuilt, &patch).unwrap();
        assert_eq!(rebuilt, now);
        // Against zeros: only the pages that are not.
        let mut sparse = vec![0u8; 64 * PAGE];
        sparse[5 * PAGE..6 * PAGE].fill(9);
        assert_eq!(changed_pages(&page_hashes(&sparse), None).unwrap(), [5]);
        // Too many changed: no patch.
        assert!(changed_pages(&page_hashes(&chunk(2)), Some(&anchor)).is_none());
        // Malformed: refused, never a panic.
        for bad in [
            b"NSPATCH1".to_vec(),
            patch[..patch.len() - 1].to_vec(),
            {
                let mut p = patch.clone();
                p[12..16].copy_from_slice(&64u32.to_le_bytes()); // outside the chunk
                p
            },
            {
                let mut p = patch.clone();
                p[16..20].copy_from_slice(&3u32.to_le_bytes()); // out of order
                p
            },
        ] {
            assert!(apply_patch(&mut base.clone(), &bad).is_err());
        }
    }

    #[test]
    fn an_index_round_trips_through_its_file() {
        let dir =
            std::env::temp_dir().join(format!("nullspace-pages-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("memory");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&chunk(3), 2 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 4 << 20).unwrap();
        let index = PageIndex::of_file_cached(&file, 1 << 20).unwrap();
        assert_eq!(index.anchors.keys().copied().collect::<Vec<_>>(), [2 << 20]);
        assert!(dir.join("memory.index").exists());
        assert_eq!(PageIndex::load(&dir.join("memory.index")).unwrap(), index);
        assert_eq!(PageIndex::of_file_cached(&file, 1 << 20).unwrap(), index);
        std::fs::write(dir.join("junk"), b"NSPGIDX1 truncated").unwrap();
        assert!(PageIndex::load(&dir.join("junk")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
