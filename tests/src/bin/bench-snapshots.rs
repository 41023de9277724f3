//! Snapshot benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-snapshots [--n 3]
//!
//! For the local-directory store and for S3 (SeaweedFS on loopback: `NULLSPACE_TEST_S3`,
//! or one this command starts), measured in one run: manual snapshot time and sizes (the
//! first of a sandbox, then later ones that reuse its chunks), restore time into a new
//! sandbox, hibernate and resume times. Then the dedup ratio of a fork family: a parent
//! and its children each snapshotted, bytes the store grew by ÷ the bytes their
//! snapshots reference.

use nullspace_tests::http::{small, Api};
use nullspace_tests::{s3_flags, Daemon, S3_ENV};
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

/// Bytes of the files under `dir` (apparent sizes).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Takes a manual snapshot; returns how long it took and what the API said of it.
async fn snapshot(api: &Api, id: &str) -> anyhow::Result<(Duration, Value)> {
    let t = Instant::now();
    let v = post(
        api,
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({}),
        StatusCode::CREATED,
    )
    .await?;
    Ok((t.elapsed(), v))
}

struct Results {
    first: (Duration, u64, u64),
    later: Vec<(Duration, u64)>,
    restore: Vec<Duration>,
    hibernate: Duration,
    resume: Duration,
}

async fn measure(api: &Api, n: usize) -> anyhow::Result<Results> {
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    // Some state worth keeping: 32 MiB in memory, 32 MiB on disk.
    let rt = nullspace_tests::http::Runtime::of(&sbx);
    rt.run("head -c 33554432 /dev/urandom > /tmp/mem.bin; head -c 33554432 /dev/urandom > /workspace/disk.bin; sync")
        .await;
    let (t, v) = snapshot(api, &id).await?;
    let first = (
        t,
        v["sizeBytes"].as_u64().unwrap_or(0),
        v["storedBytes"].as_u64().unwrap_or(0),
    );
    let mut later = Vec::new();
    for _ in 1..n.max(2) {
        let (t, v) = snapshot(api, &id).await?;
        later.push((t, v["storedBytes"].as_u64().unwrap_or(0)));
    }
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
        later,
        restore,
        hibernate,
        resume,
    })
}

fn report(name: &str, r: &Results) {
    println!("{name}:");
    println!(
        "  first snapshot   {:>8.0} ms   size {:>7.1} MiB   data {:>7.1} MiB",
        ms(r.first.0),
        mib(r.first.1),
        mib(r.first.2)
    );
    println!(
        "  later snapshots  {:>8.0} ms (median of {})",
        ms(median(r.later.iter().map(|l| l.0).collect())),
        r.later.len()
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
    let local_results = measure(&local_api, n).await?;

    let bucket = format!("bench-{}", std::process::id());
    let flags = s3_flags(&bucket);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s3 = Daemon::start_with("bench-snap-s3", &flags, S3_ENV);
    let s3_api = Api::new(&s3, s3.team_key("bench"));
    let s3_results = measure(&s3_api, n).await?;

    println!("snapshots of a 1 vCPU / 512 MiB sandbox holding 32 MiB of random data in memory and 32 MiB on disk ({n} rounds):");
    report("local directory", &local_results);
    report("S3 (SeaweedFS, loopback)", &s3_results);

    // A fork family in the local store: a parent restored with its own memory (memory
    // file snapshots), forked; every member snapshotted.
    let api = &local_api;
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let origin = sbx["sandboxID"].as_str().unwrap().to_string();
    nullspace_tests::http::Runtime::of(&sbx)
        .run("head -c 33554432 /dev/urandom > /tmp/mem.bin; sync")
        .await;
    post(
        api,
        &format!("/v1/sandboxes/{origin}/snapshots"),
        json!({}),
        StatusCode::CREATED,
    )
    .await?;
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
    let chunks = local.state_dir().join("objects").join("chunks");
    let before = dir_bytes(&chunks);
    let (mut referenced, mut sizes) = (0u64, 0u64);
    for member in &family {
        let v = post(
            api,
            &format!("/v1/sandboxes/{member}/snapshots"),
            json!({}),
            StatusCode::CREATED,
        )
        .await?;
        referenced += v["storedBytes"].as_u64().unwrap_or(0);
        sizes += v["sizeBytes"].as_u64().unwrap_or(0);
    }
    let grew = dir_bytes(&chunks) - before;
    println!("fork family (parent + 3 children, each snapshotted once):");
    println!(
        "  data referenced {:>7.1} MiB, store grew {:>7.1} MiB: dedup ratio {:.2} (stored ÷ referenced; sizes with holes {:.1} MiB)",
        mib(referenced),
        mib(grew),
        grew as f64 / referenced.max(1) as f64,
        mib(sizes)
    );
    for id in family.iter().chain([&origin]) {
        api.delete(id).await;
    }
    Ok(())
}
