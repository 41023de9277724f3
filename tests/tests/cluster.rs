//! Two hosts on one PostgreSQL catalog (loopback, no namespaces yet): both register and
//! heartbeat, creates sent to one are placed on both, and a sandbox one host owns is
//! used through the other (control calls and the data plane are forwarded).

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::postgres::{pool_manager, server, FreshDatabase};
use nullspace_tests::Daemon;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn tiny() -> Value {
    json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 })
}

#[tokio::test]
async fn two_hosts_place_creates_on_both_and_forward_requests_to_the_owner() {
    let server = match server() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let db = FreshDatabase::create(&server, "cluster").await;
    let url = db.url.clone();
    pool_manager(&["migrate", "--catalog", &url]).unwrap();
    let catalog = ["--catalog", url.as_str()];
    let a = Daemon::start_with(
        "cluster-a",
        &[&catalog[..], &["--host-id", "host-a"]].concat(),
        &[],
    );
    let b = Daemon::start_with(
        "cluster-b",
        &[&catalog[..], &["--host-id", "host-b"]].concat(),
        &[],
    );

    // Both registered and ready, with their addresses and capacity.
    let listed = a.admin(&["host", "list", "--catalog", &url]);
    let hosts: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hosts.len(), 2, "{listed}");
    for (h, d) in hosts.iter().zip([&a, &b]) {
        assert_eq!(h["state"], "ready", "{h}");
        assert_eq!(h["controlUrl"], json!(d.control), "{h}");
        assert!(h["memMiB"].as_u64().unwrap() > 0, "{h}");
    }

    // One team, one key, for the whole cluster.
    a.admin(&["team", "create", "acme", "--catalog", &url]);
    let key = a.admin(&["key", "create", "--team", "acme", "--catalog", &url]);
    let via_a = Api::new(&a, key.clone());
    let via_b = Api::new(&b, key.clone());

    // Creates sent to A land on both hosts (the runtime URL is the owner's edge).
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..6 {
        let sbx = via_a
            .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
            .await;
        let base = sbx["runtime"]["target"]["baseUrl"].as_str().unwrap();
        let owner = if base.starts_with(&a.edge) {
            "host-a"
        } else {
            "host-b"
        };
        assert!(
            base.starts_with(&a.edge) || base.starts_with(&b.edge),
            "{sbx}"
        );
        owners
            .entry(owner.into())
            .or_default()
            .push(sbx["sandboxID"].as_str().unwrap().to_string());
    }
    assert_eq!(
        owners.len(),
        2,
        "creates spread over both hosts: {owners:?}"
    );
    let listed: Vec<Value> = a
        .admin(&["host", "list", "--catalog", &url])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for h in &listed {
        let id = h["hostID"].as_str().unwrap();
        assert_eq!(
            h["allocated"]["memMiB"].as_u64().unwrap(),
            256 * owners[id].len() as u64,
            "{id}'s allocation is its sandboxes: {h}"
        );
    }

    // B's sandbox, used through A only.
    let id = owners["host-b"][0].clone();
    let detail = via_a.get(&id).await;
    assert_eq!(detail["state"], "running", "{detail}");
    let (status, connected) = via_a
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    let through_a = Runtime {
        http: reqwest::Client::new(),
        base: format!("{}/v1/sandboxes/{id}", a.edge),
        token: connected["runtime"]["token"].as_str().unwrap().to_string(),
    };
    through_a
        .put_file("/workspace/note.txt", b"from host a")
        .await;
    let (out, _, code) = through_a.run("cat /workspace/note.txt; hostname").await;
    assert_eq!(code, 0);
    assert!(out.starts_with("from host a"), "{out}");
    assert_eq!(
        through_a.read_file("/workspace/note.txt").await.as_deref(),
        Some(&b"from host a"[..])
    );
    // Pause and resume through A: B does them, the file stays.
    let (status, v) = via_a
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{v}"
    );
    let (status, v) = via_a
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let rt = Runtime::of(&v);
    assert!(rt.base.starts_with(&b.edge), "resumed on its owner: {v}");
    assert_eq!(
        rt.read_file("/workspace/note.txt").await.as_deref(),
        Some(&b"from host a"[..])
    );
    // The team's listing is the cluster's, whichever host answers.
    let (_, from_a) = via_a.fetch("/v1/sandboxes").await;
    let (_, from_b) = via_b.fetch("/v1/sandboxes").await;
    assert_eq!(from_a["sandboxes"].as_array().unwrap().len(), 6);
    assert_eq!(from_a, from_b);
    // Deletes through either host end each sandbox on its owner.
    for (owner, ids) in &owners {
        for id in ids {
            assert_eq!(
                via_b.delete(id).await,
                StatusCode::NO_CONTENT,
                "{owner}'s {id}"
            );
        }
    }
    for d in [&a, &b] {
        assert_eq!(nullspace_tests::qemus_in(d.run_dir()).len(), 0);
    }
    drop((a, b));
}
