//! Snapshot benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-snapshots [--n 3]
//!
//! For the local-directory store and for S3 (SeaweedFS on loopback: `NULLSPACE_TEST_S3`,
//! or one this command starts), measured in one run, per case the time and the bytes
//! the snapshot references, the bytes it added to the store (local store: its chunks
//! directory's growth) and the bytes it sent:
//!
//! - the first snapshot of a sandbox holding 32 MiB of random data in memory and 32 MiB
//!   on disk; the same sandbox snapshotted again idle; then after 8 MiB changed;
//! - restore into a new sandbox, hibernate and resume;
//! - a fork family: a parent and its children each snapshotted once;
//! - S3 throughput: the store's chunked upload and download of 256 MiB against raw
//!   `aws-sdk-s3` multipart upload and ranged downloads of the same bytes.
//!
//! Goals: fork family stored ≤ 1.3× one snapshot; the idle second snapshot adds ≤ 5% of
//! the first and takes ≤ 25% of its time; S3 throughput ≥ 0.9× raw.

use nullspace_tests::http::{small, Api};
use nullspace_tests::{dir_bytes, s3_flags, Daemon, S3_ENV};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

async fn post(api: &Api, path: &str, body: Value, want: StatusCode) -> anyhow::Result<Value> {
    let (status, v) = api.post(path, body).await;
    anyhow::ensure!(status == want, "{path}: {status} {v}");
    Ok(v)
}

/// One snapshot: how long it took, and its bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Shot {
    time: Duration,
    /// Data it references (`storedBytes`).
    referenced: u64,
    /// What the store grew by (local store only).
    added: Option<u64>,
    /// What it sent (`uploadedBytes`).
    sent: u64,
}

/// Takes a manual snapshot of `id`; `chunks` is the local store's chunk directory.
async fn snapshot(api: &Api, id: &str, chunks: Option<&std::path::Path>) -> anyhow::Result<Shot> {
    let before = chunks.map(dir_bytes);
    let t = Instant::now();
    let v = post(
        api,
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({}),
        StatusCode::CREATED,
    )
    .await?;
    let time = t.elapsed();
    Ok(Shot {
        time,
        referenced: v["storedBytes"].as_u64().unwrap_or(0),
        added: chunks
            .zip(before)
            .map(|(c, b)| dir_bytes(c).saturating_sub(b)),
        sent: v["uploadedBytes"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no uploadedBytes in {v}"))?,
    })
}

struct Results {
    first: Shot,
    idle: Shot,
    changed: Shot,
    restore: Vec<Duration>,
    hibernate: Duration,
    resume: Duration,
}

async fn measure(api: &Api, n: usize, chunks: Option<&std::path::Path>) -> anyhow::Result<Results> {
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    // Some state worth keeping: 32 MiB in memory, 32 MiB on disk.
    let rt = nullspace_tests::http::Runtime::of(&sbx);
    rt.run("head -c 33554432 /dev/urandom > /tmp/mem.bin; head -c 33554432 /dev/urandom > /workspace/disk.bin; sync")
        .await;
    let first = snapshot(api, &id, chunks).await?;
    let idle = snapshot(api, &id, chunks).await?;
    rt.run("head -c 8388608 /dev/urandom > /tmp/change.bin")
        .await;
    let changed = snapshot(api, &id, chunks).await?;
    let mut restore = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let v = post(
            api,
            "/v1/sandboxes/restore",
            json!({ "sandboxID": id }),
            StatusCode::CREATED,
        )
        .await?;
        restore.push(t.elapsed());
        api.delete(v["sandboxID"].as_str().unwrap()).await;
    }
    let t = Instant::now();
    post(
        api,
        &format!("/v1/sandboxes/{id}/hibernate"),
        json!({}),
        StatusCode::OK,
    )
    .await?;
    let hibernate = t.elapsed();
    let t = Instant::now();
    post(
        api,
        &format!("/v1/sandboxes/{id}/resume"),
        json!({}),
        StatusCode::OK,
    )
    .await?;
    let resume = t.elapsed();
    api.delete(&id).await;
    Ok(Results {
        first,
        idle,
        changed,
        restore,
        hibernate,
        resume,
    })
}

fn shot_line(case: &str, s: &Shot) {
    println!(
        "  {case:<26} {:>7.0} ms   referenced {:>7.1} MiB   added {:>9}   sent {:>7.1} MiB",
        ms(s.time),
        mib(s.referenced),
        s.added
            .map(|a| format!("{:.1} MiB", mib(a)))
            .unwrap_or_else(|| "-".into()),
        mib(s.sent)
    );
}

fn report(name: &str, r: &Results) {
    println!("{name}:");
    shot_line("first snapshot", &r.first);
    shot_line("idle, snapshotted again", &r.idle);
    shot_line("after 8 MiB changed", &r.changed);
    let added = |s: &Shot| s.added.unwrap_or(s.sent) as f64;
    println!(
        "  idle second snapshot: adds {:.1}% of the first (goal: at most 5%), takes {:.0}% of its time (goal: at most 25%)",
        100.0 * added(&r.idle) / added(&r.first).max(1.0),
        100.0 * r.idle.time.as_secs_f64() / r.first.time.as_secs_f64()
    );
    println!(
        "  restore          {:>8.0} ms (median of {}, new sandbox running)",
        ms(median(r.restore.clone())),
        r.restore.len()
    );
    println!("  hibernate        {:>8.0} ms", ms(r.hibernate));
    println!(
        "  resume           {:>8.0} ms (from the store)",
        ms(r.resume)
    );
}

/// The store's chunked transfers of 256 MiB against raw multipart ones of the same
/// bytes; prints throughputs and ratios.
async fn s3_throughput() -> anyhow::Result<()> {
    use storage::{ObjectStore, S3Config, S3Store};
    const SIZE: usize = 256 << 20;
    const PART: usize = 8 << 20;
    const PARALLEL: usize = 8;
    let store = S3Store::new(&S3Config {
        endpoint: nullspace_tests::s3_endpoint(),
        bucket: format!("bench-throughput-{}", std::process::id()),
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key: "nullspace-test".into(),
        secret_key: "nullspace-test".into(),
    });
    store.ensure_bucket().await?;
    let dir = std::env::temp_dir().join(format!("bench-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("data");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&src, &bytes)?;
    let rate = |d: Duration| mib(SIZE as u64) / d.as_secs_f64();

    // The store: 1 MiB content-addressed chunks, checked and claimed, 8 at a time.
    let t = Instant::now();
    let (manifest, _) = storage::upload_file(&store, &src).await?;
    let ours_up = t.elapsed();
    let t = Instant::now();
    storage::restore_file(&store, &manifest, &dir.join("restored")).await?;
    let ours_down = t.elapsed();
    anyhow::ensure!(
        std::fs::read(dir.join("restored"))? == bytes,
        "restored bytes differ"
    );

    // Raw: one multipart object, 8 MiB parts, 8 in flight; ranged gets the same way,
    // written into a file and flushed (the store's restore verifies and flushes too).
    let client = store.client().clone();
    let bucket = store.bucket().to_string();
    let key = "raw/data";
    let t = Instant::now();
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .send()
        .await?;
    let upload_id = upload.upload_id().unwrap_or_default().to_string();
    let mut parts = Vec::new();
    for (batch_no, batch) in bytes.chunks(PART * PARALLEL).enumerate() {
        let sends: Vec<_> = batch
            .chunks(PART)
            .enumerate()
            .map(|(i, part)| {
                let n = (batch_no * PARALLEL + i + 1) as i32;
                let req = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(aws_sdk_s3::primitives::ByteStream::from(part.to_vec()));
                async move {
                    req.send()
                        .await
                        .map(|r| (n, r.e_tag().unwrap_or_default().to_string()))
                }
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            let (n, etag) = r?;
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(n)
                    .e_tag(etag)
                    .build(),
            );
        }
    }
    client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await?;
    let raw_up = t.elapsed();
    // Into a file flushed to disk, as a restore must leave it.
    let t = Instant::now();
    let out = std::fs::File::create(dir.join("raw"))?;
    for batch_no in 0..SIZE.div_ceil(PART * PARALLEL) {
        let gets: Vec<_> = (0..PARALLEL)
            .map(|i| (batch_no * PARALLEL + i) * PART)
            .filter(|start| *start < SIZE)
            .map(|start| {
                let end = (start + PART).min(SIZE);
                let req = client
                    .get_object()
                    .bucket(&bucket)
                    .key(key)
                    .range(format!("bytes={start}-{}", end - 1));
                let out = &out;
                async move {
                    let body = req.send().await?.body.collect().await?.into_bytes();
                    anyhow::ensure!(body.len() == end - start, "a short range");
                    std::os::unix::fs::FileExt::write_all_at(out, &body, start as u64)?;
                    Ok::<_, anyhow::Error>(())
                }
            })
            .collect();
        for r in futures::future::join_all(gets).await {
            r?;
        }
    }
    out.sync_all()?;
    let raw_down = t.elapsed();
    anyhow::ensure!(
        std::fs::read(dir.join("raw"))? == bytes,
        "raw download differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
    for c in &manifest.chunks {
        let _ = store.delete(&c.key()).await;
    }
    let _ = store.delete(key).await;

    println!("S3 throughput, 256 MiB of random bytes (SeaweedFS, loopback; downloads into a file flushed to disk):");
    println!(
        "  upload   store {:>6.0} MiB/s   raw multipart {:>6.0} MiB/s   ratio {:.2}x (goal: at least 0.9x)",
        rate(ours_up),
        rate(raw_up),
        raw_up.as_secs_f64() / ours_up.as_secs_f64()
    );
    println!(
        "  download store {:>6.0} MiB/s   raw ranged    {:>6.0} MiB/s   ratio {:.2}x (goal: at least 0.9x)",
        rate(ours_down),
        rate(raw_down),
        raw_down.as_secs_f64() / ours_down.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    // S3: the suite's SeaweedFS if one is named, else one of our own.
    let own_s3 = std::env::var("NULLSPACE_TEST_S3").is_err();
    let s3_dir = std::env::temp_dir().join(format!("bench-snapshots-s3-{}", std::process::id()));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/seaweedfs.sh");
    if own_s3 {
        let out = std::process::Command::new(&script)
            .arg("start")
            .arg(&s3_dir)
            .arg("19533")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::env::set_var("NULLSPACE_TEST_S3", String::from_utf8(out.stdout)?.trim());
    }
    let result = run(n).await;
    if own_s3 {
        let _ = std::process::Command::new(&script)
            .arg("stop")
            .arg(&s3_dir)
            .status();
        let _ = std::fs::remove_dir_all(&s3_dir);
    }
    result
}

async fn run(n: usize) -> anyhow::Result<()> {
    let local = Daemon::start_with("bench-snap-local", &[], &[]);
    let local_api = Api::new(&local, local.team_key("bench"));
    let chunks = local.state_dir().join("objects").join("chunks");
    let local_results = measure(&local_api, n, Some(&chunks)).await?;

    let bucket = format!("bench-{}", std::process::id());
    let flags = s3_flags(&bucket);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s3 = Daemon::start_with("bench-snap-s3", &flags, S3_ENV);
    let s3_api = Api::new(&s3, s3.team_key("bench"));
    let s3_results = measure(&s3_api, n, None).await?;
    drop(s3);

    println!("snapshots of a 1 vCPU / 512 MiB sandbox holding 32 MiB of random data in memory and 32 MiB on disk ({n} restores):");
    report("local directory", &local_results);
    report("S3 (SeaweedFS, loopback)", &s3_results);

    // A fork family in the local store: a parent restored from a snapshot (with its own
    // memory), forked; every member snapshotted.
    let api = &local_api;
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let origin = sbx["sandboxID"].as_str().unwrap().to_string();
    nullspace_tests::http::Runtime::of(&sbx)
        .run("head -c 33554432 /dev/urandom > /tmp/mem.bin; sync")
        .await;
    let one = snapshot(api, &origin, Some(&chunks)).await?;
    let parent = post(
        api,
        "/v1/sandboxes/restore",
        json!({ "sandboxID": origin }),
        StatusCode::CREATED,
    )
    .await?;
    let parent_id = parent["sandboxID"].as_str().unwrap().to_string();
    let children = post(
        api,
        &format!("/v1/sandboxes/{parent_id}/fork"),
        json!({ "count": 3 }),
        StatusCode::CREATED,
    )
    .await?;
    let mut family: Vec<String> = vec![parent_id.clone()];
    family.extend(
        children["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["sandboxID"].as_str().unwrap().to_string()),
    );
    let before = dir_bytes(&chunks);
    let mut total = Shot::default();
    for member in &family {
        let s = snapshot(api, member, None).await?;
        total.time += s.time;
        total.referenced += s.referenced;
        total.sent += s.sent;
    }
    total.added = Some(dir_bytes(&chunks) - before);
    println!("fork family (parent + 3 children, each snapshotted once), local directory:");
    shot_line("one snapshot (the origin)", &one);
    shot_line("the family, all four", &total);
    println!(
        "  stored by the family: {:.2}x one snapshot (goal: at most 1.3x); dedup ratio {:.2} (added ÷ referenced)",
        total.added.unwrap_or(0) as f64 / one.referenced.max(1) as f64,
        total.added.unwrap_or(0) as f64 / total.referenced.max(1) as f64
    );
    for id in family.iter().chain([&origin]) {
        api.delete(id).await;
    }
    drop(local);
    s3_throughput().await
}
