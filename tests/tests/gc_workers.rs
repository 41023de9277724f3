//! Garbage collection shared by workers of one bucket (no VMs: a few seconds).
//!
//! Two workers, each its own store over one local directory: one publishes snapshot
//! directories in a loop whose contents come from small pools, so it keeps reusing
//! chunks that the other's deletes made garbage (marked, often due); the other deletes
//! all but the newest snapshots, verifying each before it goes, and collects with a
//! short grace. Both collect, so they contend for the bucket's lease. Every snapshot
//! left at the end must fetch whole, and once the run is over the garbage must go.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use storage::snapshots::{self, Kind, NewSnapshot, StoredSnapshot};
use storage::{gc, LocalStore, ObjectStore, S3Config, S3Store, Store, StoreError};

const SANDBOX: &str = "sbx-9c0ffee1";
/// The bucket's grace, and how long the workers run (a publish must stay within half
/// the grace or re-check its chunks: SeaweedFS takes longer per request).
const LOCAL: Timing = Timing {
    grace: Duration::from_millis(400),
    run: Duration::from_secs(4),
};
const S3: Timing = Timing {
    grace: Duration::from_millis(1200),
    run: Duration::from_secs(5),
};
/// Each store operation's wait, as against S3: the windows between a publisher's
/// check of a chunk and its commit, and a collector's reading and its delete, widen.
const LATENCY: Duration = Duration::from_millis(2);

struct Timing {
    grace: Duration,
    run: Duration,
}
/// Snapshots the deleting worker leaves.
const KEEP: usize = 3;
const FILES: [&str; 3] = ["state", "memory", "disk.qcow2"];

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` bytes of content `variant`: distinct variants make distinct chunks.
fn bytes_of(variant: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(variant.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&r.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What a published snapshot's files hold: a variant per piece.
#[derive(Debug, Clone, Copy)]
struct Spec {
    state: u64,
    memory: u64,
    memory_tail: u64,
    disk: u64,
}

impl Spec {
    fn random(rng: &mut Rng, i: u64) -> Self {
        Self {
            // One chunk each, from small pools: reused again and again, garbage between.
            state: 100 + rng.below(6),
            memory: 200 + rng.below(4),
            memory_tail: 300 + rng.below(6),
            // A new chunk one time in three.
            disk: if rng.below(3) == 0 {
                1_000_000 + i
            } else {
                400 + rng.below(5)
            },
        }
    }

    fn files(&self) -> [(&'static str, Vec<u8>); 3] {
        let mut memory = bytes_of(self.memory, 1 << 20);
        memory.extend(bytes_of(self.memory_tail, 200 << 10));
        [
            ("state", bytes_of(self.state, 30 << 10)),
            ("memory", memory),
            ("disk.qcow2", bytes_of(self.disk, 64 << 10)),
        ]
    }
}

fn new_snapshot(id: &str) -> NewSnapshot {
    NewSnapshot {
        id: id.to_string(),
        sandbox_id: SANDBOX.into(),
        team_id: "team-gc".into(),
        kind: Kind::Periodic,
        template_id: "base".into(),
        vm: serde_json::json!({}),
        sandbox: serde_json::json!({}),
    }
}

async fn fetch_into(store: &Store, s: &StoredSnapshot, dest: &std::path::Path) {
    std::fs::create_dir_all(dest).unwrap();
    snapshots::fetch(store, s, dest)
        .await
        .unwrap_or_else(|e| panic!("snapshot {} does not fetch whole: {e}", s.id));
}

fn chunks_of(s: &StoredSnapshot) -> impl Iterator<Item = String> + '_ {
    s.files
        .values()
        .flat_map(|f| f.chunks.iter().map(|c| c.key()))
}

#[derive(Debug, Default)]
struct Totals {
    rounds: usize,
    busy: usize,
    marked: usize,
    unmarked: usize,
    deleted: usize,
}

impl Totals {
    fn add(&mut self, gc: &gc::GcStats) {
        self.rounds += 1;
        self.busy += gc.busy.is_some() as usize;
        self.marked += gc.chunks_marked;
        self.unmarked += gc.chunks_unmarked;
        self.deleted += gc.chunks_deleted;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_sharing_a_bucket_never_delete_what_a_publisher_uses() {
    let scratch = nullspace_tests::ScratchDir::new("gc-workers");
    let bucket = scratch.path().join("bucket");
    let store = || Store::local(LocalStore::open(&bucket).unwrap()).with_latency(LATENCY);
    two_workers(store(), store(), &scratch.path().join("work"), LOCAL).await;
}

/// The same over the suite's S3 server (`NULLSPACE_TEST_S3`): its conditional puts and
/// listings, its latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_s3() {
    let scratch = nullspace_tests::ScratchDir::new("gc-workers-s3");
    let config = S3Config {
        endpoint: nullspace_tests::s3_endpoint(),
        bucket: format!("t-gc-workers-{}", std::process::id()),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key: "nullspace-test".into(),
        secret_key: "nullspace-test".into(),
    };
    let s3 = S3Store::new(&config);
    s3.ensure_bucket().await.unwrap();
    two_workers(
        Store::s3(s3),
        Store::s3(S3Store::new(&config)),
        &scratch.path().join("work"),
        S3,
    )
    .await;
}

/// Runs the two workers, each with its own store over the same bucket, then checks.
async fn two_workers(
    publisher_store: Store,
    deleter_store: Store,
    work: &std::path::Path,
    timing: Timing,
) {
    let work = work.to_path_buf();
    gc::set_grace(&publisher_store, timing.grace).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let specs: Arc<Mutex<HashMap<String, Spec>>> = Arc::default();

    let publisher = {
        let (store, stop, specs, work) = (
            publisher_store.clone(),
            stop.clone(),
            specs.clone(),
            work.clone(),
        );
        tokio::spawn(async move {
            let mut rng = Rng(0x5eed ^ std::process::id() as u64);
            let mut totals = Totals::default();
            let (mut uploaded, mut reused) = (0, 0);
            let mut slowest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let spec = Spec::random(&mut rng, i);
                let src = work.join(format!("src-{i}"));
                std::fs::create_dir_all(&src).unwrap();
                for (name, bytes) in spec.files() {
                    std::fs::write(src.join(name), bytes).unwrap();
                }
                let id = snapshots::new_snapshot_id(SANDBOX);
                let started = std::time::Instant::now();
                let (_, stats) = snapshots::publish(&store, &src, &FILES, new_snapshot(&id))
                    .await
                    .unwrap_or_else(|e| panic!("publish {i}: {e}"));
                std::fs::remove_dir_all(&src).unwrap();
                slowest = slowest.max(started.elapsed());
                uploaded += stats.chunks.uploaded;
                reused += stats.chunks.reused;
                specs.lock().unwrap().insert(id, spec);
                if i % 3 == 2 {
                    totals.add(&snapshots::collect_garbage(&store).await.unwrap());
                }
                i += 1;
            }
            (i, uploaded, reused, slowest, totals)
        })
    };

    let deleter = {
        let (store, stop, work) = (deleter_store.clone(), stop.clone(), work.clone());
        tokio::spawn(async move {
            let mut deleted = HashSet::new();
            let mut totals = Totals::default();
            while !stop.load(Ordering::SeqCst) {
                let listed = snapshots::list(&store, SANDBOX).await.unwrap();
                for s in listed.iter().skip(KEEP) {
                    // Whole until the moment it goes, whatever the collections did.
                    let dest = work.join(format!("check-{}", s.id));
                    fetch_into(&store, s, &dest).await;
                    std::fs::remove_dir_all(&dest).unwrap();
                    snapshots::delete(&store, s).await.unwrap();
                    deleted.insert(s.id.clone());
                }
                totals.add(&snapshots::collect_garbage(&store).await.unwrap());
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (deleted, totals)
        })
    };

    tokio::time::sleep(timing.run).await;
    stop.store(true, Ordering::SeqCst);
    let (published, uploaded, reused, slowest, publisher_gc) = publisher.await.unwrap();
    let (deleted, deleter_gc) = deleter.await.unwrap();
    eprintln!(
        "{published} snapshots published ({uploaded} chunks uploaded, {reused} reused, the slowest in {slowest:?}), {} deleted; publisher's collections {publisher_gc:?}, deleter's {deleter_gc:?}",
        deleted.len()
    );
    assert!(published >= 8, "only {published} snapshots published");
    assert!(
        deleter_gc.deleted + publisher_gc.deleted > 0,
        "no garbage went during the run"
    );

    // Every snapshot not deleted is there and fetches whole, byte for byte.
    let specs = specs.lock().unwrap().clone();
    assert_eq!(specs.len(), published as usize);
    let mut left = 0;
    for (id, spec) in &specs {
        match snapshots::get(&publisher_store, id).await {
            Ok(s) => {
                assert!(!deleted.contains(id), "{id} was deleted, yet listed");
                let dest = work.join(format!("final-{id}"));
                fetch_into(&publisher_store, &s, &dest).await;
                for (name, bytes) in spec.files() {
                    assert!(
                        std::fs::read(dest.join(name)).unwrap() == bytes,
                        "{id}/{name} differs"
                    );
                }
                left += 1;
            }
            Err(StoreError::NotFound(_)) => {
                assert!(deleted.contains(id), "published snapshot {id} was lost")
            }
            Err(e) => panic!("{id}: {e}"),
        }
    }
    assert!(left >= KEEP.min(published as usize));

    // Once nothing is published, two collections a grace apart leave exactly the chunks
    // the remaining snapshots reference.
    let survivors = snapshots::list(&publisher_store, SANDBOX).await.unwrap();
    let referenced: HashSet<String> = survivors.iter().flat_map(chunks_of).collect();
    let first = snapshots::collect_garbage(&deleter_store).await.unwrap();
    assert_eq!(first.busy, None);
    tokio::time::sleep(timing.grace + Duration::from_millis(100)).await;
    let last = snapshots::collect_garbage(&publisher_store).await.unwrap();
    assert_eq!(last.busy, None);
    let stored: HashSet<String> = publisher_store
        .list("chunks/")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(stored, referenced, "first {first:?}, last {last:?}");
}
