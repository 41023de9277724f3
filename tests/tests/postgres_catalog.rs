//! The daemon on a PostgreSQL catalog, end to end: `migrate`, then `serve --catalog`
//! and the admin commands on the same database, a sandbox's whole life through the
//! API, and a restart that reads it all back.
//!
//! Needs a PostgreSQL server whose URL is in `NULLSPACE_TEST_POSTGRES` (deploy/test.sh
//! starts one; by hand: `deploy/postgres.sh start DIR` and export the URL it prints).

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::postgres::{pool_manager, FreshDatabase};
use nullspace_tests::Daemon;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn a_daemon_on_a_postgres_catalog_keeps_everything_across_a_restart() {
    let Ok(server) = std::env::var("NULLSPACE_TEST_POSTGRES") else {
        eprintln!(
            "SKIPPED: NULLSPACE_TEST_POSTGRES is not set (deploy/test.sh sets it; by hand: deploy/postgres.sh start DIR, and export the URL it prints)"
        );
        return;
    };
    // Declared first, so dropped after the daemon that uses it.
    let db = FreshDatabase::create(&server, "catalog").await;
    let url = db.url.as_str();

    // An unmigrated catalog: serve and the admin commands refuse it, naming the fix.
    let refused = pool_manager(&["admin", "team", "list", "--catalog", url]).unwrap_err();
    assert!(
        refused.contains(&format!("nullspace-pool-manager migrate --catalog {url}")),
        "{refused}"
    );
    // migrate: idempotent, and says the version.
    for _ in 0..2 {
        assert_eq!(
            pool_manager(&["migrate", "--catalog", url]).unwrap(),
            "schema version 6"
        );
    }
    let unknown = pool_manager(&["migrate", "--catalog", "mysql://u@h/db"]).unwrap_err();
    assert!(unknown.contains("postgres://"), "{unknown}");

    let catalog = ["--catalog", url];
    let mut daemon = Daemon::start_with("pg-catalog", &catalog, &[]);
    let team: Value =
        serde_json::from_str(&daemon.admin(&["team", "create", "acme", "--catalog", url])).unwrap();
    let key = daemon.admin(&["key", "create", "--team", "acme", "--catalog", url]);
    let listed = daemon.admin(&["team", "list", "--catalog", url]);
    assert!(listed.contains(team["id"].as_str().unwrap()), "{listed}");
    let api = Api::new(&daemon, key.clone());

    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 300 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let (out, _, code) = Runtime::of(&sbx)
        .run("echo kept > /tmp/x; cat /tmp/x")
        .await;
    assert_eq!((out.as_str(), code), ("kept\n", 0));

    let (status, paused) = api
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(api.get(&id).await["state"], "paused");
    let (status, connected) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    assert_eq!(connected["state"], "running");
    let (out, _, _) = Runtime::of(&connected).run("cat /tmp/x").await;
    assert_eq!(out, "kept\n", "the pause kept the sandbox's memory");

    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    let (status, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let events = events["events"].as_array().unwrap().clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in ["sandbox.created", "sandbox.paused", "sandbox.deleted"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    // Concurrent writes from one daemon (pooled connections): creates and deletes at
    // once, each sandbox's log numbered in turn.
    let made = futures::future::join_all(
        (0..4).map(|_| api.create(json!({ "templateID": "minimal", "resources": small() }))),
    )
    .await;
    let burst: Vec<String> = made
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap().to_string())
        .collect();
    let deleted = futures::future::join_all(burst.iter().map(|id| api.delete(id))).await;
    assert!(
        deleted.iter().all(|s| *s == StatusCode::NO_CONTENT),
        "{deleted:?}"
    );
    for id in &burst {
        let (_, log) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
        let n = log["events"].as_array().unwrap().len() as u64;
        let ids: Vec<u64> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "{log}");
    }

    // The catalog is the database: nothing went to a SQLite file in the state dir.
    assert!(!daemon.state_dir().join("catalog.db").exists());

    // A restart on the same catalog reads it all back.
    daemon.restart_with(&catalog);
    let api = Api::new(&daemon, key);
    assert_eq!(api.get(&id).await["state"], "deleted");
    let (status, after) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["events"].as_array().unwrap().len(), events.len());
    let (status, listed) = api.fetch("/v1/sandboxes?state=deleted").await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    for id in burst.iter().chain([&id]) {
        assert!(
            listed.contains(&id.as_str()),
            "{id} is listed as deleted: {listed:?}"
        );
    }
}
