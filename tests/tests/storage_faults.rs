//! Object storage that fails: a pool manager whose S3 endpoint is a fault-injecting
//! proxy in front of the suite's SeaweedFS (`NULLSPACE_TEST_S3`). Under 503 storms,
//! stalls and connections reset mid-body a snapshot fails with a clear error in bounded
//! time (after retries), stores nothing, and the sandbox runs on; under occasional 503s
//! the retries carry it through; once the faults stop, snapshots store and restore.

use nullspace_tests::faults::{Fault, FaultProxy};
use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::{s3_endpoint, Daemon, S3_ENV};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One try of an S3 operation in this test's daemon (`NULLSPACE_TEST_S3_ATTEMPT_TIMEOUT_MS`):
/// the store's every bound scales from it (an operation: at most 10 of these).
const ATTEMPT_MS: u64 = 1000;
/// Tries of one operation (`storage/src/s3.rs`).
const MAX_ATTEMPTS: u64 = 5;
/// How long a failing snapshot call may take: the store's bound on one operation and
/// the snapshot itself, with room; well under the client's own timeout.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

fn id_of(v: &Value) -> String {
    v["sandboxID"].as_str().unwrap().to_string()
}

async fn listed(api: &Api, id: &str) -> Vec<String> {
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/snapshots")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshotID"].as_str().unwrap().to_string())
        .collect()
}

async fn still_runs(rt: &Runtime, what: &str) {
    let (out, err, code) = rt.run("cat /workspace/kept.txt").await;
    assert_eq!(
        (code, out.as_str()),
        (0, "kept\n"),
        "{what}: the sandbox stopped serving commands: {err}"
    );
}

#[tokio::test]
async fn storage_faults_fail_snapshots_cleanly_and_later_snapshots_restore() {
    let proxy = FaultProxy::start(&s3_endpoint());
    let endpoint = proxy.url();
    let bucket = format!("t-faults-{}", std::process::id());
    let flags = [
        "--snapshot-store",
        "s3",
        "--s3-endpoint",
        &endpoint,
        "--s3-bucket",
        &bucket,
    ];
    let attempt = ATTEMPT_MS.to_string();
    let mut env = S3_ENV.to_vec();
    env.push(("NULLSPACE_TEST_S3_ATTEMPT_TIMEOUT_MS", &attempt));
    let daemon = Daemon::start_with("storage-faults", &flags, &env);
    let api = Api::new(&daemon, daemon.team_key("acme"));
    // A caller that gives up long before the test's limit: a hang is a failure.
    let bounded = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        ..api.clone()
    };

    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": { "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 },
            "timeout": 300,
        }))
        .await;
    let id = id_of(&sbx);
    let rt = Runtime::of(&sbx);
    let (_, err, code) = rt.run("echo kept > /workspace/kept.txt; sync").await;
    assert_eq!(code, 0, "{err}");
    assert!(listed(&api, &id).await.is_empty());

    let snapshots = format!("/v1/sandboxes/{id}/snapshots");
    for (fault, what, min_injected) in [
        (
            Fault::SlowDown { percent: 100 },
            "a 503 storm",
            // Every try of the first operation meets it: the retries are there.
            MAX_ATTEMPTS,
        ),
        (Fault::Stall(Duration::from_secs(10)), "10 s stalls", 2),
        (Fault::ResetMidBody, "resets mid-body", 1),
    ] {
        proxy.set(fault);
        let injected = proxy.injected();
        let started = Instant::now();
        let (status, v) = bounded.post(&snapshots, json!({})).await;
        let took = started.elapsed();
        let hit = proxy.injected() - injected;
        eprintln!("{what}: answered {status} in {took:?} after {hit} faulted requests: {v}");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {v}");
        assert_eq!(v["code"], "storage_unavailable", "{what}: {v}");
        assert!(took < ANSWER_WITHIN, "{what}: the answer took {took:?}");
        assert!(
            hit >= min_injected,
            "{what}: {hit} requests met the fault, expected at least {min_injected}"
        );
        still_runs(&rt, what).await;
        proxy.set(Fault::PassThrough);
        assert!(
            listed(&api, &id).await.is_empty(),
            "{what}: a failed snapshot is listed"
        );
    }

    // Occasional 503s (one request in ten): the retries absorb them.
    proxy.set(Fault::SlowDown { percent: 10 });
    let injected = proxy.injected();
    let (status, v) = bounded.post(&snapshots, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "under 10 % 503s: {v}");
    assert!(proxy.injected() > injected, "no request met the 503s");
    let under_faults = v["snapshotID"].as_str().unwrap().to_string();

    // Faults off: a snapshot stores, and it and the one before restore.
    proxy.set(Fault::PassThrough);
    let (_, err, code) = rt.run("echo after > /workspace/after.txt; sync").await;
    assert_eq!(code, 0, "{err}");
    let (status, v) = bounded.post(&snapshots, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let after = v["snapshotID"].as_str().unwrap().to_string();
    let mut ids = listed(&api, &id).await;
    ids.sort();
    let mut want = vec![under_faults.clone(), after.clone()];
    want.sort();
    assert_eq!(ids, want);

    for (snap, expect) in [(&after, "kept\nafter\n"), (&under_faults, "kept\n")] {
        let (status, copy) = bounded
            .post(
                "/v1/sandboxes/restore",
                json!({ "sandboxID": id, "snapshotID": snap, "timeout": 120 }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "restoring {snap}: {copy}");
        let (out, err, code) = Runtime::of(&copy)
            .run("cat /workspace/kept.txt /workspace/after.txt 2>/dev/null; true")
            .await;
        assert_eq!((code, out.as_str()), (0, expect), "restored {snap}: {err}");
        assert_eq!(api.delete(&id_of(&copy)).await, StatusCode::NO_CONTENT);
    }
    still_runs(&rt, "after the restores").await;
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}
