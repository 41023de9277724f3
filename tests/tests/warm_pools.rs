//! Template warm pools through the public API, with real VMs.

use futures::future::join_all;
use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::{Daemon, Stack};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const POOL: &str = "/v1/templates/minimal/warm-pool";

async fn pool(api: &Api) -> Value {
    let (status, v) = api.fetch(POOL).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn set_pool(api: &Api, body: Value) -> Value {
    let (status, v) = api.call(Method::PUT, POOL, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// Waits until the pool holds `ready` instances.
async fn wait_ready(api: &Api, ready: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = pool(api).await;
        if v["ready"] == ready && v["warming"] == 0 {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never held {ready}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Fires `n` creates at once; returns their (status, body) in order.
async fn burst(api: &Api, n: usize, mode: &str) -> Vec<(StatusCode, Value)> {
    join_all((0..n).map(|i| {
        api.post(
            "/v1/sandboxes",
            json!({
                "templateID": "minimal", "resources": small(), "warmPool": mode,
                "envVars": { "N": i.to_string() }, "metadata": { "n": i.to_string() }, "timeout": 300
            }),
        )
    }))
    .await
}

#[tokio::test]
async fn require_gets_exactly_the_ready_instances_prefer_falls_back_and_pools_refill() {
    let mut stack = Stack::start("warm-pools");
    stack
        .daemon
        .admin(&["team", "create", "acme", "--max-sandboxes", "40"]);
    let key = stack.daemon.admin(&["key", "create", "--team", "acme"]);
    let api = stack.public(key.clone());
    // The built-in templates' pools are the operator's: a team may read, not size them.
    let (status, v) = api
        .call(Method::PUT, POOL, Some(json!({ "size": 1 })))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap().contains("operator"), "{v}");
    let api = stack.public(stack.daemon.operator_key());
    // And the operator's key acts for no team.
    let (status, v) = api.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let op = api.clone();
    let api = stack.public(key.clone());

    let (status, v) = op
        .call(Method::PUT, POOL, Some(json!({ "size": 17 })))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, _) = op
        .call(
            Method::PUT,
            "/v1/templates/nope/warm-pool",
            Some(json!({ "size": 1 })),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Five ready, then refill held off: a burst of 20 `require` gets exactly those five.
    set_pool(&op, json!({ "size": 5, "resources": small() })).await;
    wait_ready(&api, 5).await;
    let held = set_pool(
        &op,
        json!({ "size": 5, "resources": small(), "refill": false }),
    )
    .await;
    assert_eq!(
        (&held["ready"], &held["refill"]),
        (&json!(5), &json!(false)),
        "{held}"
    );
    let got = burst(&api, 20, "require").await;
    let ok: Vec<&Value> = got
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, v)| v)
        .collect();
    let refused = got
        .iter()
        .filter(|(s, v)| *s == StatusCode::CONFLICT && v["code"] == "warm_pool_unavailable")
        .count();
    assert_eq!((ok.len(), refused), (5, 15), "{got:?}");
    let status = pool(&api).await;
    assert_eq!(
        (&status["checkouts"], &status["misses"], &status["ready"]),
        (&json!(5), &json!(15), &json!(0)),
        "{status}"
    );

    // Each checked-out sandbox is its own: the create's env and labels, its own disk.
    for v in &ok {
        assert_eq!(v["state"], "running");
        let n = v["metadata"]["n"].as_str().unwrap().to_string();
        let rt = Runtime::of(v);
        let (out, _, _) = rt.run("echo $N; ls /workspace").await;
        assert_eq!(
            out,
            format!("{n}\n"),
            "a sandbox saw another's env or files"
        );
        rt.run(&format!("echo mine-{n} > /workspace/owner")).await;
    }
    // Emptying the pool leaves checked-out sandboxes alone.
    set_pool(&op, json!({ "size": 0, "resources": small() })).await;
    let (out, _, _) = Runtime::of(ok[0]).run("cat /workspace/owner").await;
    assert_eq!(
        out,
        format!("mine-{}\n", ok[0]["metadata"]["n"].as_str().unwrap())
    );
    let mut ids: Vec<String> = ok
        .iter()
        .map(|v| v["sandboxID"].as_str().unwrap().to_string())
        .collect();

    // With refill on, the pool comes back to its target; `prefer` never fails.
    set_pool(&op, json!({ "size": 5, "resources": small() })).await;
    wait_ready(&api, 5).await;
    let got = burst(&api, 20, "prefer").await;
    for (s, v) in &got {
        assert_eq!(*s, StatusCode::CREATED, "{v}");
        ids.push(v["sandboxID"].as_str().unwrap().to_string());
    }
    let checked_out = got
        .iter()
        .filter(|(_, v)| {
            v["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["detail"] == "checked out from the warm pool")
        })
        .count();
    assert_eq!(checked_out, 5, "prefer should take the 5 ready ones first");
    for id in &ids {
        assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
    }
    wait_ready(&api, 5).await;

    // Pools come back after a restart (their VMs are made again).
    let state = stack.daemon.stop_with(libc::SIGTERM);
    let daemon = Daemon::start_in(state);
    let api = Api::new(&daemon, key);
    let status = wait_ready(&api, 5).await;
    assert_eq!(status["target"], 5, "{status}");
}

/// A checkout that readies nothing in its guest writes no intent: its record, written
/// with the checkout, is all a restart needs. Killed between that record and the VM's
/// install (the one window it has), the daemon's next start adopts the VM: the sandbox
/// runs, answers, and nothing (intent, QEMU) is left over.
#[tokio::test]
async fn a_checkout_killed_before_its_install_is_adopted_by_the_next_start() {
    let daemon = Daemon::start_with(
        "warm-checkout-kill",
        &[],
        &[("NULLSPACE_TEST_FAILPOINT", "create.checked_out")],
    );
    let key = daemon.team_key("acme");
    let op = Api::new(&daemon, daemon.operator_key());
    let api = Api::new(&daemon, key.clone());
    set_pool(&op, json!({ "size": 1, "resources": small() })).await;
    wait_ready(&api, 1).await;
    // The daemon dies at the failpoint: no answer comes.
    let _ = api
        .http
        .post(format!("{}/v1/sandboxes", api.base))
        .header("X-API-Key", &key)
        .json(&json!({ "templateID": "minimal", "resources": small(), "warmPool": "require", "timeout": 600 }))
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    let daemon = daemon.restart_after_failpoint("create.checked_out");
    let api = Api::new(&daemon, key);
    let (status, v) = api.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let listed = v["sandboxes"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["state"], "running", "{v}");
    let id = listed[0]["sandboxID"].as_str().unwrap().to_string();
    let (status, connected) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    let (out, _, code) = Runtime::of(&connected).run("echo adopted").await;
    assert_eq!((out.as_str(), code), ("adopted\n", 0));
    assert_eq!(daemon.open_intents(), 0, "an intent outlived the restart");
    // The pool refills beside it: one QEMU for the sandbox, one for the pool.
    wait_ready(&api, 1).await;
    assert_eq!(
        nullspace_tests::qemus_in(daemon.run_dir()).len(),
        2,
        "one QEMU for the adopted sandbox and one ready in the pool"
    );
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_failing_refill_backs_off_says_why_and_recovers() {
    let daemon = Daemon::start("warm-backoff");
    let api = Api::new(&daemon, daemon.operator_key());
    // A real fault: the daemon's run directory becomes a file, so no VM directory can
    // be made and every refill fails.
    let run_dir = daemon.run_dir().to_path_buf();
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::write(&run_dir, b"not a directory").unwrap();
    let restore_dir = scopeguard(&run_dir);
    set_pool(&api, json!({ "size": 1, "resources": small() })).await;

    // Refills back off (1, 2, 4 s ...): in 8 s at most four attempts, not eight or
    // eighty, and the status says why the pool stays empty.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let v = pool(&api).await;
    assert_eq!(v["ready"], 0, "{v}");
    let failures = v["lastError"]["failures"].as_u64().unwrap_or(0);
    assert!((2..=4).contains(&failures), "{v}");
    let message = v["lastError"]["message"].as_str().unwrap_or("");
    assert!(message.contains("directory"), "{v}");
    assert!(
        v["lastError"]["at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    assert!(v["lastError"]["retryInS"].as_u64().unwrap() >= 2, "{v}");
    // Teams see the failing pool in their summary (the operator's key has none).
    let team = Api::new(&daemon, daemon.team_key("backoff"));
    let (status, summary) = team.fetch("/v1/observability/summary").await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert!(
        summary["suggestedActions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("warm pool cannot refill")),
        "{summary}"
    );
    assert_eq!(summary["network"]["mode"], "isolated", "{summary}");

    // The host is fixed: the next attempt (within the back-off) fills the pool and the
    // error is gone.
    drop(restore_dir);
    let v = wait_ready(&api, 1).await;
    assert!(v["lastError"].is_null(), "{v}");
    set_pool(&api, json!({ "size": 0, "resources": small() })).await;
}

/// Puts `run_dir` back as a directory when dropped (also when the test fails).
fn scopeguard(run_dir: &std::path::Path) -> impl Drop {
    struct Restore(std::path::PathBuf);
    impl Drop for Restore {
        fn drop(&mut self) {
            if self.0.is_file() {
                let _ = std::fs::remove_file(&self.0);
            }
            let _ = std::fs::create_dir_all(&self.0);
        }
    }
    Restore(run_dir.to_path_buf())
}
