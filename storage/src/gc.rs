//! Garbage collection of chunks in a bucket that many workers share.
//!
//! Every worker publishes snapshots (and saves volumes) into the bucket and collects
//! after its deletes, so collection must be safe against other processes: a chunk is
//! deleted only when no manifest references it, it has stayed unreferenced for the
//! bucket's grace period, and no publish in flight has claimed it.
//!
//! Keys (all under `gc/`):
//!
//! - `gc/config.json` — the bucket's grace period (`{"graceMs": n}`;
//!   [`DEFAULT_GRACE`] when absent). Collectors and publishers read it, so they agree.
//! - `gc/lease/<generation>` — the collector lease ([`Lease`]): one collector at a time
//!   per bucket. Generations are taken with a conditional put and only grow.
//! - `gc/marks/<sha256>-<since unix ms>-<nonce>` — a chunk a collector found
//!   unreferenced, and since when (the collector's clock, taken right before the put).
//! - `gc/verdicts/<mark name>` — `keep` (a publisher reuses the chunk) or `delete` (a
//!   collector deletes it), written with a conditional put: exactly one side wins.
//!
//! **The collector** (holding the lease) notes the time `T`, then reads every reference
//! (snapshot manifests, volume versions), lists chunks, marks and verdicts. A mark whose
//! chunk is referenced again, or gone, or that has a verdict (a publisher's `keep`, or a
//! `delete` left by a collector that died) is dropped: the mark first, then its verdict
//! (a chunk still unreferenced is marked again, from now). A mark older than
//! `T - grace` is due: the collector puts the `delete` verdict; if it wins, it deletes
//! the chunk, then the mark, then the verdict. Unreferenced chunks without a mark get
//! one. Every destructive step is preceded by a check of the lease.
//!
//! **A publisher** lists the marks when it starts (`L`). Before it checks whether a
//! chunk exists (to reuse it) it claims every mark of that chunk seen at `L` with a
//! `keep` verdict; losing to `delete` it waits until the collector is done (the mark
//! gone, or no collector holding the lease) and then uploads the chunk if it is missing.
//! It commits its manifest within half the grace of `L`; a publish that took longer
//! lists the marks again and re-checks (claims, exists, re-uploads) every chunk first.
//!
//! Why nothing a publisher uses is deleted: a chunk it checked was either marked at `L`
//! (then its verdict decides: `keep` stops every delete under that mark; `delete` made
//! it wait for the delete and upload again), or it was not: then any mark that can lead
//! to a delete landed after `L`, so its time is `L` (less a put's latency and the clock
//! skew between workers), and the delete needs a reading of the references taken at
//! least a grace later, after the publisher's commit (at most half a grace after `L`):
//! that reading sees the manifest, and a referenced chunk is unmarked, never deleted.
//! The assumptions: clock skew plus a request's latency stay under half the grace, and
//! a lease holder's steps land within two thirds of its lease time (see [`Lease`]).

use crate::chunks::chunk_key;
use crate::store::{ObjectStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a chunk stays unreferenced before it is deleted, unless the bucket says
/// otherwise ([`set_grace`]).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// How long a collector's lease lasts unless renewed (it is renewed every third of it).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(300);
/// How long a publisher waits for a collector that won a chunk's `delete` verdict.
const WAIT_FOR_COLLECTOR: Duration = Duration::from_secs(900);
/// Re-checks a publish makes when it outlived its view of the marks, before failing.
pub(crate) const RECHECKS: usize = 3;

const CONFIG_KEY: &str = "gc/config.json";
const LEASE_PREFIX: &str = "gc/lease/";
const MARKS_PREFIX: &str = "gc/marks/";
const VERDICTS_PREFIX: &str = "gc/verdicts/";
const KEEP: &[u8] = b"keep";
const DELETE: &[u8] = b"delete";

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn json<T: Serialize>(v: &T) -> bytes::Bytes {
    serde_json::to_vec(v).expect("json").into()
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        op: "parse",
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    grace_ms: u64,
}

/// The bucket's grace period.
pub async fn grace(store: &impl ObjectStore) -> Result<Duration, StoreError> {
    match store.get(CONFIG_KEY).await {
        Ok(b) => Ok(Duration::from_millis(
            parse::<Config>(CONFIG_KEY, &b)?.grace_ms,
        )),
        Err(StoreError::NotFound(_)) => Ok(DEFAULT_GRACE),
        Err(e) => Err(e),
    }
}

/// Sets the bucket's grace period (tests shorten it). Every publish must commit within
/// half of it, so set it while nothing is being published, and not below what a
/// publish takes.
pub async fn set_grace(store: &impl ObjectStore, grace: Duration) -> Result<(), StoreError> {
    if grace.is_zero() {
        return Err(StoreError::Backend {
            op: "set grace",
            key: CONFIG_KEY.into(),
            message: "the grace period must be longer than zero".into(),
        });
    }
    let config = Config {
        grace_ms: grace.as_millis() as u64,
    };
    store.put(CONFIG_KEY, json(&config)).await
}

// ---------------------------------------------------------------------------------------
// The lease

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRecord {
    holder: String,
    generation: u64,
    acquired_unix_ms: u64,
    expires_unix_ms: u64,
    released: bool,
}

impl LeaseRecord {
    fn active(&self, now_ms: u64) -> bool {
        !self.released && now_ms < self.expires_unix_ms
    }
}

fn lease_key(generation: u64) -> String {
    format!("{LEASE_PREFIX}{generation:020}")
}

/// The lease generations in the store, ascending.
async fn lease_generations(store: &impl ObjectStore) -> Result<Vec<u64>, StoreError> {
    let mut gens: Vec<u64> = store
        .list(LEASE_PREFIX)
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(LEASE_PREFIX)?.parse().ok())
        .collect();
    gens.sort_unstable();
    Ok(gens)
}

/// The newest lease record (`None`: no collector ever ran).
async fn newest_lease(store: &impl ObjectStore) -> Result<Option<LeaseRecord>, StoreError> {
    for _ in 0..5 {
        let Some(&generation) = lease_generations(store).await?.last() else {
            return Ok(None);
        };
        let key = lease_key(generation);
        match store.get(&key).await {
            Ok(b) => return parse(&key, &b).map(Some),
            // Superseded and cleaned up between the list and the read: list again.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Backend {
        op: "read the collector lease",
        key: LEASE_PREFIX.into(),
        message: "the lease changed hands five times while being read".into(),
    })
}

/// The holder of the bucket's collector lease, if one holds it now.
pub async fn lease_holder(store: &impl ObjectStore) -> Result<Option<String>, StoreError> {
    Ok(newest_lease(store)
        .await?
        .filter(|r| r.active(unix_ms()))
        .map(|r| r.holder))
}

/// What [`Lease::acquire`] found.
#[derive(Debug)]
pub enum Acquire {
    /// This collector holds the lease.
    Held(Lease),
    /// Another collector does (or won the race for an expired one).
    Busy {
        /// Who.
        holder: String,
    },
}

/// One collector's hold on the bucket's collector lease.
///
/// The lease is a sequence of objects `gc/lease/<generation>`, each taken with a
/// conditional put of the next generation after reading the newest one and finding it
/// released or expired, so exactly one of the collectors that saw it free takes it.
/// The newest generation is never deleted (a holder deletes only older ones; release
/// rewrites its own as released), so generations only grow; a taker that filled the
/// name of a generation already cleaned up (a stale read) sees a newer one when it
/// lists right after its put, and backs off.
///
/// Others judge expiry by the wall-clock time in the record; the holder judges its own
/// time by a monotonic clock started before its put, renews (takes the next generation
/// itself) once a third of the lease has passed, and takes no step without a renewal
/// after that: two thirds of the lease are left for clock skew and a step's latency.
#[derive(Debug)]
pub struct Lease {
    holder: String,
    generation: u64,
    ttl: Duration,
    started: Instant,
    lost: bool,
}

impl Lease {
    /// Takes the lease for `holder` for `ttl`, unless another collector holds it.
    pub async fn acquire(
        store: &impl ObjectStore,
        holder: &str,
        ttl: Duration,
    ) -> Result<Acquire, StoreError> {
        let next = match newest_lease(store).await? {
            Some(r) if r.active(unix_ms()) => return Ok(Acquire::Busy { holder: r.holder }),
            Some(r) => r.generation + 1,
            None => 1,
        };
        match Self::take(store, holder, next, ttl).await? {
            Some(lease) => Ok(Acquire::Held(lease)),
            None => Ok(Acquire::Busy {
                holder: newest_lease(store)
                    .await?
                    .map(|r| r.holder)
                    .unwrap_or_default(),
            }),
        }
    }

    /// Puts generation `generation` if absent; `None` if another collector has it or a
    /// newer one.
    async fn take(
        store: &impl ObjectStore,
        holder: &str,
        generation: u64,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let started = Instant::now();
        let now = unix_ms();
        let record = LeaseRecord {
            holder: holder.to_string(),
            generation,
            acquired_unix_ms: now,
            expires_unix_ms: now + ttl.as_millis() as u64,
            released: false,
        };
        let key = lease_key(generation);
        match store.put_if_absent(&key, json(&record)).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
        let gens = lease_generations(store).await?;
        if gens.last().is_some_and(|&g| g > generation) {
            // This put filled the name of a generation cleaned up long ago: not ours.
            store.delete(&key).await?;
            return Ok(None);
        }
        for &old in gens.iter().filter(|&&g| g < generation) {
            // Best effort: a leftover is only clutter.
            let _ = store.delete(&lease_key(old)).await;
        }
        Ok(Some(Lease {
            holder: holder.to_string(),
            generation,
            ttl,
            started,
            lost: false,
        }))
    }

    /// The generation held.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Call before every destructive step: renews the lease once a third of it has
    /// passed; fails if another collector took it over.
    pub async fn check(&mut self, store: &impl ObjectStore) -> Result<(), StoreError> {
        if self.lost {
            return Err(self.lost_error());
        }
        if self.started.elapsed() < self.ttl / 3 {
            return Ok(());
        }
        match Self::take(store, &self.holder, self.generation + 1, self.ttl).await? {
            Some(renewed) => {
                *self = renewed;
                Ok(())
            }
            None => {
                self.lost = true;
                Err(self.lost_error())
            }
        }
    }

    fn lost_error(&self) -> StoreError {
        StoreError::Backend {
            op: "collect garbage",
            key: lease_key(self.generation),
            message: format!(
                "collector {} lost the lease to another collector (it expired)",
                self.holder
            ),
        }
    }

    /// Ends the hold: the generation is rewritten as released, so the next collector
    /// need not wait for it to expire.
    pub async fn release(self, store: &impl ObjectStore) -> Result<(), StoreError> {
        if self.lost {
            return Ok(());
        }
        let record = LeaseRecord {
            holder: self.holder.clone(),
            generation: self.generation,
            acquired_unix_ms: 0,
            expires_unix_ms: 0,
            released: true,
        };
        store.put(&lease_key(self.generation), json(&record)).await
    }
}

// ---------------------------------------------------------------------------------------
// Marks and claims

/// A chunk found unreferenced by a collector.
#[derive(Debug, Clone)]
struct Mark {
    /// `<sha256>-<since unix ms>-<nonce>`: the key under `gc/marks/` and `gc/verdicts/`.
    name: String,
    sha: String,
    since_ms: u64,
}

impl Mark {
    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split('-');
        let (sha, since, nonce) = (parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some() || !hex(sha) || !hex(nonce) {
            return None;
        }
        Some(Mark {
            name: name.to_string(),
            sha: sha.to_string(),
            since_ms: since.parse().ok()?,
        })
    }
}

fn mark_key(name: &str) -> String {
    format!("{MARKS_PREFIX}{name}")
}

fn verdict_key(name: &str) -> String {
    format!("{VERDICTS_PREFIX}{name}")
}

async fn list_marks(store: &impl ObjectStore) -> Result<Vec<Mark>, StoreError> {
    Ok(store
        .list(MARKS_PREFIX)
        .await?
        .iter()
        .filter_map(|k| Mark::parse(k.strip_prefix(MARKS_PREFIX)?))
        .collect())
}

/// A publish's view of the collector's marks, and how long a manifest may be committed
/// on it (half the grace from when the marks were listed).
#[derive(Debug)]
pub(crate) struct Claims {
    grace: Duration,
    listed_at: Instant,
    /// Chunk hash → names of its marks.
    marks: HashMap<String, Vec<String>>,
}

impl Claims {
    /// Reads the grace and lists the marks.
    pub(crate) async fn begin(store: &impl ObjectStore) -> Result<Self, StoreError> {
        let grace = grace(store).await?;
        let listed_at = Instant::now();
        let mut marks: HashMap<String, Vec<String>> = HashMap::new();
        for m in list_marks(store).await? {
            marks.entry(m.sha).or_default().push(m.name);
        }
        Ok(Self {
            grace,
            listed_at,
            marks,
        })
    }

    /// Whether a manifest of the chunks checked under this view may still be committed.
    pub(crate) fn fresh(&self) -> bool {
        self.listed_at.elapsed() < self.grace / 2
    }

    /// The error of a publish that kept outliving its view of the marks.
    pub(crate) fn too_slow(&self) -> StoreError {
        StoreError::Backend {
            op: "publish",
            key: MARKS_PREFIX.into(),
            message: format!(
                "re-checking the chunks took longer than half the garbage collection's grace ({} ms), {RECHECKS} times",
                self.grace.as_millis()
            ),
        }
    }

    /// Keeps the chunk `sha` from being deleted by a collector; call it before checking
    /// whether the chunk exists (and upload it if it does not, afterwards).
    pub(crate) async fn claim(
        &self,
        store: &impl ObjectStore,
        sha: &str,
    ) -> Result<(), StoreError> {
        let Some(names) = self.marks.get(sha) else {
            return Ok(());
        };
        for name in names {
            let verdict = verdict_key(name);
            match store.put_if_absent(&verdict, KEEP.into()).await {
                Ok(()) => continue,
                Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
            match store.get(&verdict).await {
                Ok(b) if &b[..] == DELETE => wait_for_delete(store, name).await?,
                // Kept by another publish, or cleaned up (the mark goes first) since.
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Waits until a collector that won the `delete` verdict of mark `name` is done: the
/// mark is gone (deleted after the chunk), or no collector holds the lease (it died:
/// the next one drops the mark without deleting anything).
async fn wait_for_delete(store: &impl ObjectStore, name: &str) -> Result<(), StoreError> {
    let mark = mark_key(name);
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if !store.exists(&mark).await? || lease_holder(store).await?.is_none() {
            return Ok(());
        }
        if started.elapsed() > WAIT_FOR_COLLECTOR {
            return Err(StoreError::Backend {
                op: "publish",
                key: mark,
                message: "a collector deleting this chunk has held the lease too long".into(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------------------------
// The collector

/// Who collects and for how long a lease.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Names this collector in the lease (for the others' logs).
    pub holder: String,
    pub lease_ttl: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        Self {
            holder: format!(
                "{host}/{}/{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Snapshot manifests read (volume versions count as references too).
    pub manifests: usize,
    /// Chunks referenced.
    pub chunks_kept: usize,
    /// Unreferenced chunks marked this round (deleted by a round a grace later).
    pub chunks_marked: usize,
    /// Marked chunks whose grace has not passed.
    pub chunks_pending: usize,
    /// Marks dropped: referenced again, reused by a publish in flight, or gone.
    pub chunks_unmarked: usize,
    pub chunks_deleted: usize,
    /// Another collector held the lease: this round did nothing.
    pub busy: Option<String>,
}

/// Every chunk a snapshot manifest or a volume version references, and how many
/// manifests there are. An unreadable one fails the whole reading: never delete what
/// might be needed.
async fn references(store: &impl ObjectStore) -> Result<(HashSet<String>, usize), StoreError> {
    let mut referenced = HashSet::new();
    let mut manifests = 0;
    for key in store.list("snapshots/").await? {
        if !key.ends_with(".json") {
            continue;
        }
        let bytes = match store.get(&key).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let snapshot = crate::snapshots::parse(&key, &bytes)?;
        manifests += 1;
        for f in snapshot.files.values() {
            referenced.extend(f.object_keys());
        }
    }
    referenced.extend(crate::volumes::referenced_chunks(store).await?);
    Ok((referenced, manifests))
}

/// One collection: takes the bucket's lease (or skips the round when another collector
/// holds it), marks unreferenced chunks, deletes those marked at least a grace ago and
/// still unreferenced and unclaimed, and releases the lease.
pub async fn collect(store: &impl ObjectStore, options: &GcOptions) -> Result<GcStats, StoreError> {
    let grace = grace(store).await?;
    let mut lease = match Lease::acquire(store, &options.holder, options.lease_ttl).await? {
        Acquire::Held(lease) => lease,
        Acquire::Busy { holder } => {
            return Ok(GcStats {
                busy: Some(holder),
                ..GcStats::default()
            })
        }
    };
    let result = round(store, grace, &mut lease).await;
    let released = lease.release(store).await;
    let stats = result?;
    released?;
    Ok(stats)
}

/// Drops a mark: the mark first, then its verdict (a verdict without its mark is
/// harmless; a mark without its verdict could be claimed again).
async fn forget(store: &impl ObjectStore, name: &str) -> Result<(), StoreError> {
    store.delete(&mark_key(name)).await?;
    store.delete(&verdict_key(name)).await
}

async fn round(
    store: &impl ObjectStore,
    grace: Duration,
    lease: &mut Lease,
) -> Result<GcStats, StoreError> {
    let mut stats = GcStats::default();
    // Before reading any reference: a manifest committed before this is seen.
    let started_ms = unix_ms();
    let (referenced, manifests) = references(store).await?;
    stats.manifests = manifests;
    let chunks: Vec<String> = store
        .list("chunks/")
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix("chunks/").map(str::to_string))
        .collect();
    let present: HashSet<&str> = chunks.iter().map(String::as_str).collect();
    let marks = list_marks(store).await?;
    let verdicts: HashSet<String> = store
        .list(VERDICTS_PREFIX)
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(VERDICTS_PREFIX).map(str::to_string))
        .collect();

    // Chunks not to mark (again) below: marked and waiting, or deleted.
    let mut marked: HashSet<&str> = HashSet::new();
    for mark in &marks {
        let is_referenced = referenced.contains(&chunk_key(&mark.sha));
        if is_referenced || !present.contains(mark.sha.as_str()) || verdicts.contains(&mark.name) {
            // Referenced again, deleted already, kept by a publish, or a `delete` left by
            // a collector that died (its chunk kept: a publisher may have re-uploaded it).
            // One still unreferenced is marked again below, from now: a publish that
            // claimed it listed the marks before this.
            lease.check(store).await?;
            forget(store, &mark.name).await?;
            stats.chunks_unmarked += 1;
            continue;
        }
        if mark.since_ms.saturating_add(grace.as_millis() as u64) > started_ms {
            stats.chunks_pending += 1;
            marked.insert(mark.sha.as_str());
            continue;
        }
        lease.check(store).await?;
        match store
            .put_if_absent(&verdict_key(&mark.name), DELETE.into())
            .await
        {
            Ok(()) => {
                store.delete(&chunk_key(&mark.sha)).await?;
                forget(store, &mark.name).await?;
                stats.chunks_deleted += 1;
                marked.insert(mark.sha.as_str());
            }
            Err(StoreError::AlreadyExists(_)) => {
                // A publish claimed it since the listing.
                lease.check(store).await?;
                forget(store, &mark.name).await?;
                stats.chunks_unmarked += 1;
            }
            Err(e) => return Err(e),
        }
    }

    for sha in &chunks {
        if referenced.contains(&chunk_key(sha)) {
            stats.chunks_kept += 1;
        } else if !marked.contains(sha.as_str()) {
            let name = format!(
                "{sha}-{}-{}",
                unix_ms(),
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            store.put(&mark_key(&name), bytes::Bytes::new()).await?;
            stats.chunks_marked += 1;
        }
    }

    // Verdicts whose mark was gone when the round began (a claim that came late).
    let names: HashSet<&str> = marks.iter().map(|m| m.name.as_str()).collect();
    for v in &verdicts {
        if !names.contains(v.as_str()) {
            lease.check(store).await?;
            store.delete(&verdict_key(v)).await?;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshots::{self, Kind, NewSnapshot};
    use crate::LocalStore;

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "nullspace-gc-{name}-{}",
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

    fn options(holder: &str) -> GcOptions {
        GcOptions {
            holder: holder.into(),
            lease_ttl: Duration::from_secs(60),
        }
    }

    /// A snapshot directory of two files, 1 MiB + a tail each: four chunks, none shared
    /// with another seed's (seeds below 16).
    fn snapshot_dir(dir: &std::path::Path, seed: u8) -> std::path::PathBuf {
        let src = dir.join(format!("src-{seed}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&src).unwrap();
        for (i, name) in ["state", "memory"].into_iter().enumerate() {
            let data: Vec<u8> = (0..(1u32 << 20) + 5000)
                .map(|j| ((j % 249) as u8 ^ (seed << 2) ^ ((i as u8) << 6)) | 1)
                .collect();
            std::fs::write(src.join(name), data).unwrap();
        }
        src
    }

    async fn publish(store: &LocalStore, src: &std::path::Path) -> snapshots::StoredSnapshot {
        let id = snapshots::new_snapshot_id("sbx-abc123");
        snapshots::publish(
            store,
            src,
            &["state", "memory"],
            NewSnapshot {
                id,
                sandbox_id: "sbx-abc123".into(),
                team_id: "team-1".into(),
                kind: Kind::Manual,
                template_id: "base".into(),
                vm: serde_json::json!({}),
                sandbox: serde_json::json!({}),
            },
        )
        .await
        .unwrap()
        .0
    }

    fn chunk_keys(s: &snapshots::StoredSnapshot) -> Vec<String> {
        s.files
            .values()
            .flat_map(crate::FileManifest::object_keys)
            .collect()
    }

    async fn all_exist(store: &LocalStore, keys: &[String]) -> bool {
        for k in keys {
            if !store.exists(k).await.unwrap() {
                return false;
            }
        }
        true
    }

    #[tokio::test]
    async fn one_collector_at_a_time_and_an_expired_lease_goes_to_exactly_one() {
        let dir = Dir::new("lease");
        let store = LocalStore::open(dir.0.join("store")).unwrap();

        let Acquire::Held(a) = Lease::acquire(&store, "a", Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("a free bucket's lease is taken")
        };
        // A second collector skips its round, naming the holder.
        let skipped = collect(&store, &options("b")).await.unwrap();
        assert_eq!(skipped.busy.as_deref(), Some("a"));
        assert_eq!(lease_holder(&store).await.unwrap().as_deref(), Some("a"));
        a.release(&store).await.unwrap();
        assert_eq!(lease_holder(&store).await.unwrap(), None);
        let done = collect(&store, &options("b")).await.unwrap();
        assert_eq!(done.busy, None);

        // An expired lease: of eight collectors racing for it, exactly one wins.
        let Acquire::Held(mut slow) = Lease::acquire(&store, "slow", Duration::from_millis(60))
            .await
            .unwrap()
        else {
            panic!("released lease not taken")
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let racers = (0..8).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                Lease::acquire(&store, &format!("racer-{i}"), Duration::from_secs(60)).await
            })
        });
        let mut winners = Vec::new();
        for r in futures::future::join_all(racers).await {
            if let Acquire::Held(l) = r.unwrap().unwrap() {
                winners.push(l);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let winner = winners.pop().unwrap();
        assert!(winner.generation() > slow.generation());
        // The slow holder finds out before its next step, and cannot renew.
        let lost = slow.check(&store).await.unwrap_err();
        assert!(lost.to_string().contains("lost the lease"), "{lost}");
        slow.release(&store).await.unwrap();
        assert_eq!(
            lease_holder(&store).await.unwrap().as_deref(),
            Some(winner.holder.as_str())
        );

        // A stale taker that fills the name of a generation cleaned up long ago sees the
        // newer one and backs off, leaving nothing behind.
        assert!(
            !store.exists(&lease_key(1)).await.unwrap(),
            "old generations are cleaned up"
        );
        let stale = Lease::take(&store, "stale", 1, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(stale.is_none());
        assert!(!store.exists(&lease_key(1)).await.unwrap());

        // A holder renews its own lease (the next generation) and keeps collecting.
        let mut winner = winner;
        winner.started -= Duration::from_secs(30);
        let before = winner.generation();
        winner.check(&store).await.unwrap();
        assert_eq!(winner.generation(), before + 1);
        assert_eq!(
            lease_generations(&store).await.unwrap(),
            [before + 1],
            "the renewal cleans up the older generation"
        );
        winner.release(&store).await.unwrap();
        assert_eq!(lease_holder(&store).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unreferenced_chunk_survives_the_grace_and_goes_after_it() {
        let dir = Dir::new("grace");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        set_grace(&store, Duration::from_millis(300)).await.unwrap();
        let kept = publish(&store, &snapshot_dir(&dir.0, 1)).await;
        let gone = publish(&store, &snapshot_dir(&dir.0, 2)).await;
        snapshots::delete(&store, &gone).await.unwrap();

        let first = collect(&store, &options("c")).await.unwrap();
        assert_eq!(
            (first.manifests, first.chunks_kept, first.chunks_marked),
            (1, 4, 4),
            "{first:?}"
        );
        assert_eq!(first.chunks_deleted, 0);
        assert!(all_exist(&store, &chunk_keys(&gone)).await);
        let again = collect(&store, &options("c")).await.unwrap();
        assert_eq!((again.chunks_pending, again.chunks_deleted), (4, 0));

        tokio::time::sleep(Duration::from_millis(350)).await;
        let late = collect(&store, &options("c")).await.unwrap();
        assert_eq!((late.chunks_deleted, late.chunks_kept), (4, 4), "{late:?}");
        for k in chunk_keys(&gone) {
            assert!(!store.exists(&k).await.unwrap(), "{k}");
        }
        assert!(all_exist(&store, &chunk_keys(&kept)).await);
        assert!(store.list(MARKS_PREFIX).await.unwrap().is_empty());
        assert!(store.list(VERDICTS_PREFIX).await.unwrap().is_empty());
        let dest = dir.0.join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        snapshots::fetch(&store, &kept, &dest).await.unwrap();
    }

    #[tokio::test]
    async fn a_chunk_referenced_again_or_claimed_by_a_publish_in_flight_survives() {
        let dir = Dir::new("reuse");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        set_grace(&store, Duration::from_millis(300)).await.unwrap();
        let src = snapshot_dir(&dir.0, 3);

        // Referenced again (a publish reused the chunks) within the grace: unmarked.
        let first = publish(&store, &src).await;
        snapshots::delete(&store, &first).await.unwrap();
        assert_eq!(
            collect(&store, &options("c")).await.unwrap().chunks_marked,
            4
        );
        let second = publish(&store, &src).await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let gc = collect(&store, &options("c")).await.unwrap();
        assert_eq!((gc.chunks_deleted, gc.chunks_unmarked), (0, 4), "{gc:?}");
        assert!(store.list(MARKS_PREFIX).await.unwrap().is_empty());

        // Due for deletion, but a publish in flight has checked them (its manifest not
        // yet committed): the collector loses every verdict and deletes nothing.
        snapshots::delete(&store, &second).await.unwrap();
        collect(&store, &options("c")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        let claims = Claims::begin(&store).await.unwrap();
        for sha in second
            .files
            .values()
            .flat_map(|f| f.chunks.iter().map(|c| &c.sha256))
        {
            claims.claim(&store, sha).await.unwrap();
        }
        let gc = collect(&store, &options("c")).await.unwrap();
        assert_eq!((gc.chunks_deleted, gc.chunks_unmarked), (0, 4), "{gc:?}");
        assert!(all_exist(&store, &chunk_keys(&second)).await);

        // Without the claim, the next rounds past the grace delete them.
        collect(&store, &options("c")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        let gc = collect(&store, &options("c")).await.unwrap();
        assert_eq!(gc.chunks_deleted, 4, "{gc:?}");
    }

    #[tokio::test]
    async fn a_dead_collectors_delete_verdict_neither_strands_a_publish_nor_deletes_its_chunk() {
        let dir = Dir::new("dead");
        let store = LocalStore::open(dir.0.join("store")).unwrap();
        set_grace(&store, Duration::from_millis(300)).await.unwrap();
        let src = snapshot_dir(&dir.0, 4);
        let first = publish(&store, &src).await;
        snapshots::delete(&store, &first).await.unwrap();
        collect(&store, &options("c")).await.unwrap();

        // A collector won one chunk's verdict, deleted the chunk and died there.
        let mark = list_marks(&store).await.unwrap().remove(0);
        store
            .put_if_absent(&verdict_key(&mark.name), DELETE.into())
            .await
            .unwrap();
        store.delete(&chunk_key(&mark.sha)).await.unwrap();

        // A publish of the same files: no collector holds the lease, so it does not wait
        // for one, and uploads the missing chunk again.
        let started = Instant::now();
        let src2 = dir.0.join("again");
        std::fs::create_dir_all(&src2).unwrap();
        for name in ["state", "memory"] {
            std::fs::copy(src.join(name), src2.join(name)).unwrap();
        }
        let id = snapshots::new_snapshot_id("sbx-abc123");
        let (second, stats) = snapshots::publish(
            &store,
            &src2,
            &["state", "memory"],
            NewSnapshot {
                id,
                sandbox_id: "sbx-abc123".into(),
                team_id: "team-1".into(),
                kind: Kind::Manual,
                template_id: "base".into(),
                vm: serde_json::json!({}),
                sandbox: serde_json::json!({}),
            },
        )
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            (stats.chunks.uploaded, stats.chunks.reused),
            (1, 3),
            "{stats:?}"
        );

        // The next collection drops the dead collector's mark and deletes nothing.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let gc = collect(&store, &options("c")).await.unwrap();
        assert_eq!(gc.chunks_deleted, 0, "{gc:?}");
        assert!(store.list(MARKS_PREFIX).await.unwrap().is_empty());
        assert!(store.list(VERDICTS_PREFIX).await.unwrap().is_empty());
        let dest = dir.0.join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        snapshots::fetch(&store, &second, &dest).await.unwrap();
    }

    #[test]
    fn mark_names_parse() {
        let sha = "ab".repeat(32);
        let m = Mark::parse(&format!("{sha}-1234-0f0f")).unwrap();
        assert_eq!((m.sha.as_str(), m.since_ms), (sha.as_str(), 1234));
        for bad in ["x-1-2", "ab-1", "ab-x-0f", "ab-1-0f-9", ""] {
            assert!(Mark::parse(bad).is_none(), "{bad}");
        }
    }
}
