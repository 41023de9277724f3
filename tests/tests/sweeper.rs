//! The timeout sweeper end to end: one sandbox's stalled timeout action holds up no
//! other sandbox's timeout. The stall is the pool manager's debug-build test hook
//! `NULLSPACE_TEST_STALL_PAUSE_MS` (every pause waits that long, its sandbox locked and
//! its VM running, before it snapshots).

use nullspace_tests::http::{small, Api};
use nullspace_tests::Daemon;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long each pause of this test's daemon stalls.
const STALL: Duration = Duration::from_secs(20);

/// The types of a sandbox's events, oldest first.
async fn event_types(api: &Api, id: &str) -> Vec<String> {
    let (_, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    events["events"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|e| e["type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn id_of(sandbox: &Value) -> String {
    sandbox["sandboxID"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_stalled_timeout_pause_does_not_hold_up_another_sandboxs_timeout() {
    let stall_ms = STALL.as_millis().to_string();
    let daemon = Daemon::start_with(
        "sweeper",
        &[],
        &[("NULLSPACE_TEST_STALL_PAUSE_MS", stall_ms.as_str())],
    );
    let api = Api::new(&daemon, daemon.team_key("acme"));

    // A: due at once, paused on timeout; its pause stalls.
    let a = id_of(
        &api.create(json!({
            "templateID": "minimal", "resources": small(), "timeout": 1,
            "lifecycle": { "onTimeout": "pause" }
        }))
        .await,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !event_types(&api, &a)
        .await
        .iter()
        .any(|t| t == "sandbox.timeout")
    {
        assert!(
            Instant::now() < deadline,
            "sandbox A's timeout never fired: {:?}",
            event_types(&api, &a).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its pause is under way (stalled) from here on, for at most STALL.
    let stalled_since = Instant::now();

    // B: due 3 s from its create, killed on timeout.
    let b = id_of(
        &api.create(json!({ "templateID": "minimal", "resources": small(), "timeout": 3 }))
            .await,
    );
    let b_created = Instant::now();
    loop {
        let view = api.get(&b).await;
        if view["state"] == "deleted" {
            break;
        }
        assert!(
            b_created.elapsed() < Duration::from_secs(15),
            "sandbox B's timeout (3 s) did not end it while A's pause stalled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b_ended_after = b_created.elapsed();

    // A's pause is still stalled: B's timeout did not wait for it.
    let a_view = api.get(&a).await;
    assert_eq!(
        a_view["state"], "running",
        "A's pause finished before B's timeout ended B: {a_view}"
    );
    assert!(
        stalled_since.elapsed() < STALL,
        "B ended only {:?} into A's {STALL:?} stall",
        stalled_since.elapsed()
    );
    // With slack for a slow host: the sweeper looks every 500 ms.
    assert!(
        b_ended_after < Duration::from_secs(3 + 5),
        "B ended {b_ended_after:?} after its create, its timeout being 3 s"
    );

    // A's pause lands once the stall is over, and ran once: the sweeper did not start
    // another action for A while the first one stalled.
    api.wait_state(&a, "paused", STALL + Duration::from_secs(60))
        .await;
    let types = event_types(&api, &a).await;
    assert_eq!(
        types.iter().filter(|t| *t == "sandbox.timeout").count(),
        1,
        "{types:?}"
    );
    assert_eq!(api.delete(&a).await, reqwest::StatusCode::NO_CONTENT);
}
