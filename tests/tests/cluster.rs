//! Two hosts on one PostgreSQL catalog (loopback, no namespaces yet): both register and
//! heartbeat, creates sent to one are placed on both, and a sandbox one host owns is
//! used through the other (control calls and the data plane are forwarded).

use nullspace_tests::http::{create_on, owner_of, read_ws_until, websocket, Api, Runtime};
use nullspace_tests::postgres::{pool_manager, server, FreshDatabase};
use nullspace_tests::Daemon;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tokio_tungstenite::tungstenite::Message;

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
    // One preview domain for the cluster, as a wildcard DNS name over every host.
    let catalog = [
        "--catalog",
        url.as_str(),
        "--preview-domain",
        PREVIEW_DOMAIN,
    ];
    let a = Daemon::start_with(
        "cluster-a",
        &[&catalog[..], &["--host-id", "host-a", "--region", "eu"]].concat(),
        &[],
    );
    let b = Daemon::start_with(
        "cluster-b",
        &[&catalog[..], &["--host-id", "host-b", "--region", "us"]].concat(),
        &[],
    );

    // Both registered and ready, with their addresses and capacity.
    let listed = a.admin(&["host", "list", "--catalog", &url]);
    let hosts: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hosts.len(), 2, "{listed}");
    for ((h, d), region) in hosts.iter().zip([&a, &b]).zip(["eu", "us"]) {
        assert_eq!(h["state"], "ready", "{h}");
        assert_eq!(h["region"], region, "{h}");
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

    // A create that names a region is placed on that region's hosts only; a region no
    // host is in is refused with the ones there are.
    let in_us = via_a
        .create(json!({ "templateID": "minimal", "resources": tiny(), "region": "us" }))
        .await;
    let base = in_us["runtime"]["target"]["baseUrl"].as_str().unwrap();
    assert!(base.starts_with(&b.edge), "region us is host-b: {in_us}");
    let (status, e) = via_a
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "resources": tiny(), "region": "ap" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert!(e["message"].as_str().unwrap().contains("eu, us"), "{e}");
    via_a.delete(in_us["sandboxID"].as_str().unwrap()).await;

    // B's sandbox, used through A only.
    let id = owners["host-b"][0].clone();
    let detail = via_a.get(&id).await;
    assert_eq!(detail["state"], "running", "{detail}");
    assert_eq!(
        detail["hostID"], "host-b",
        "operators see the owner: {detail}"
    );
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
    // A terminal through A's edge: B's VM answers.
    let mut pty = websocket(
        &format!(
            "{}/v1/sandboxes/{id}/pty?cmd=echo%20pty-via-a%3B%20hostname",
            a.edge
        ),
        &[("authorization", &format!("Bearer {}", through_a.token))],
    )
    .await;
    let mut screen = String::new();
    let exit = read_ws_until(&mut pty, |m| match m {
        Message::Binary(b) => {
            screen.push_str(&String::from_utf8_lossy(&b));
            false
        }
        Message::Text(t) => t.contains("\"exit\""),
        _ => false,
    })
    .await;
    assert!(screen.contains("pty-via-a"), "{screen:?} then {exit:?}");
    // A preview of B's sandbox, through A's preview listener (the Host names it).
    let (out, err, code) = through_a
        .run("mkdir -p /workspace/www && echo preview-of-b > /workspace/www/index.html && busybox httpd -p 127.0.0.1:8000 -h /workspace/www")
        .await;
    assert_eq!(code, 0, "{out} {err}");
    let (status, pv) = via_a
        .post(
            &format!("/v1/sandboxes/{id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pv}");
    let preview_url = pv["url"].as_str().unwrap();
    let path = &preview_url[preview_url.find("/?").unwrap()..];
    // The token in the URL is traded for a cookie (a redirect), then the page.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let preview_host = format!("8000-{id}.{PREVIEW_DOMAIN}");
    let first = browser
        .get(format!("{}{path}", a.preview_listener))
        .header("Host", &preview_host)
        .send()
        .await
        .unwrap();
    assert!(first.status().is_redirection(), "{}", first.status());
    let cookie = first.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = browser
        .get(format!("{}/", a.preview_listener))
        .header("Host", &preview_host)
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = page.status();
    let body = page.text().await.unwrap();
    assert!(
        status.is_success() && body.contains("preview-of-b"),
        "{status}: {body}"
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

/// The preview domain the hosts of the first test share.
const PREVIEW_DOMAIN: &str = "preview.nullspace.test";

/// Polls `check` every 500 ms for up to `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if std::time::Instant::now() > deadline => {
                panic!("{what} did not happen within {secs} s: {why}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

/// Waits up to `secs` seconds for no QEMU to run in `run_dir`.
async fn no_qemus_within(secs: u64, what: &str, run_dir: &std::path::Path) {
    eventually(secs, what, || {
        let left = nullspace_tests::qemus_in(run_dir);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("QEMU {left:?} still runs"))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_drain_moves_sandboxes_live_and_a_lost_hosts_hibernated_sandbox_resumes_elsewhere() {
    let server = match server() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let db = FreshDatabase::create(&server, "failover").await;
    let url = db.url.clone();
    pool_manager(&["migrate", "--catalog", &url]).unwrap();
    // One bucket: hibernate snapshots are found from any host.
    let s3 = nullspace_tests::s3_flags(&format!("t-failover-{}", std::process::id()));
    let flags = |host: &'static str| -> Vec<String> {
        let mut f: Vec<String> = ["--catalog", url.as_str(), "--host-id", host]
            .iter()
            .map(|s| s.to_string())
            .collect();
        f.extend(s3.iter().cloned());
        f
    };
    let fa = flags("host-a");
    let fb = flags("host-b");
    let a = Daemon::start_with(
        "failover-a",
        &fa.iter().map(String::as_str).collect::<Vec<_>>(),
        nullspace_tests::S3_ENV,
    );
    let mut b = Daemon::start_with(
        "failover-b",
        &fb.iter().map(String::as_str).collect::<Vec<_>>(),
        nullspace_tests::S3_ENV,
    );
    a.admin(&["team", "create", "acme", "--catalog", &url]);
    let key = a.admin(&["key", "create", "--team", "acme", "--catalog", &url]);
    let via_a = Api::new(&a, key.clone());
    let hosts = [("host-a", a.edge.clone()), ("host-b", b.edge.clone())];

    // A sandbox on host A with a file and a process.
    let sbx = create_on(
        &via_a,
        "host-a",
        &hosts,
        json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }),
    )
    .await;
    // Its QEMU has none of the daemon's secrets (the S3 keys are in A's environment).
    for pid in nullspace_tests::qemus_in(a.run_dir()) {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains("AWS_SECRET_ACCESS_KEY") && !env.contains("NULLSPACE_"),
            "QEMU {pid} inherited the daemon's environment: {env}"
        );
    }
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    rt.put_file("/workspace/kept.txt", b"kept across hosts")
        .await;
    let (pid, _, code) = rt
        .run("setsid sleep 3000 </dev/null >/dev/null 2>&1 & echo $!")
        .await;
    assert_eq!(code, 0);
    let pid = pid.trim().to_string();

    // A follower of its events on A, from before the move: what B appends once it
    // owns the sandbox reaches it through the catalog's notifications.
    let mut follower = websocket(
        &format!("{}/v1/sandboxes/{id}/lifecycle/ws", a.edge),
        &[("x-api-key", &key)],
    )
    .await;

    // Drain A: the sandbox moves to B and runs there, its file and process with it.
    a.admin(&["host", "drain", "host-a", "--catalog", &url]);
    let b_edge = b.edge.clone();
    eventually(60, "the drain", || {
        let via_a = via_a.clone();
        let id = id.clone();
        let b_edge = b_edge.clone();
        async move {
            let v = via_a.get(&id).await;
            if v["state"] != "running" {
                return Err(format!("{v}"));
            }
            let (_, c) = via_a
                .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
                .await;
            match c["runtime"]["target"]["baseUrl"].as_str() {
                Some(base) if base.starts_with(&b_edge) => Ok(()),
                _ => Err(format!("{c}")),
            }
        }
    })
    .await;
    let (_, moved) = via_a
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(owner_of(&moved, &hosts), "host-b", "{moved}");
    let rt = Runtime::of(&moved);
    assert_eq!(
        rt.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"kept across hosts"[..])
    );
    let (_, _, alive) = rt.run(&format!("kill -0 {pid}")).await;
    assert_eq!(alive, 0, "the process started on A runs on B");
    // A says it is drained on its next pass, once it sees nothing left.
    eventually(10, "host-a drained", || {
        let listed = a.admin(&["host", "list", "--catalog", &url]);
        async move {
            if listed
                .lines()
                .any(|l| l.contains(r#""hostID":"host-a""#) && l.contains(r#""state":"drained""#))
            {
                Ok(())
            } else {
                Err(listed)
            }
        }
    })
    .await;
    a.admin(&["host", "undrain", "host-a", "--catalog", &url]);

    // On B: the moved sandbox hibernated, and a second one left running. B dies.
    let (status, v) = via_a
        .post(&format!("/v1/sandboxes/{id}/hibernate"), json!({}))
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{v}"
    );
    // B appended that; the follower on A hears every event of the log, up to it.
    let (_, log) = via_a.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    let last = log["events"].as_array().unwrap().last().unwrap()["id"].clone();
    let mut heard = Vec::new();
    read_ws_until(&mut follower, |m| match m {
        Message::Text(t) => {
            let e: Value = serde_json::from_str(&t).unwrap();
            heard.push(e["type"].clone());
            e["id"] == last
        }
        _ => false,
    })
    .await;
    drop(follower);
    // A draining host makes no sandbox: a create sent to A lands on B.
    a.admin(&["host", "drain", "host-a", "--catalog", &url]);
    let running = via_a
        .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
        .await;
    assert_eq!(owner_of(&running, &hosts), "host-b", "{running}");
    a.admin(&["host", "undrain", "host-a", "--catalog", &url]);
    let running_id = running["sandboxID"].as_str().unwrap().to_string();
    // A warm pool of two for the cluster: one VM on each ready host.
    let operator = Api::new(
        &a,
        a.admin(&["key", "create", "--operator", "--catalog", &url]),
    );
    let pool = |size: u32| json!({ "size": size, "resources": tiny() });
    let (status, v) = operator
        .call(
            reqwest::Method::PUT,
            "/v1/templates/minimal/warm-pool",
            Some(pool(2)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["target"], 2, "{v}");
    let warm_on = |host: &'static str, want: u64| {
        let url = url.clone();
        let a = &a;
        move || {
            let listed = a.admin(&["host", "list", "--catalog", &url]);
            let ready = listed
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .find(|h| h["hostID"] == host)
                .map(|h| h["warm"]["minimal/1/256/1024"].as_u64().unwrap_or(0));
            async move {
                match ready {
                    Some(n) if n == want => Ok(()),
                    other => Err(format!("{host} has {other:?} warm: {listed}")),
                }
            }
        }
    };
    eventually(60, "one warm VM on each host", warm_on("host-a", 1)).await;
    eventually(60, "one warm VM on each host", warm_on("host-b", 1)).await;
    let state = b.stop_with(libc::SIGKILL);
    // Its VMs outlive it by design (a restart adopts them); a host that is gone for
    // good takes them along: here, as B's machine going down would.
    let b_run = b.run_dir().to_path_buf();
    vmm::vm_dir::reap_orphans(&b_run, None, &[]);
    // SIGKILLed, they take a moment to be gone.
    no_qemus_within(10, "B's VMs ending", &b_run).await;
    let _ = std::fs::remove_dir_all(&b_run);
    std::mem::forget(b);
    let _ = std::fs::remove_dir_all(state);

    // A declares B lost: the hibernated sandbox is A's (and resumes there, file and
    // process intact); the running one is `error` with host_lost.
    eventually(45, "the failover", || {
        let via_a = via_a.clone();
        let running_id = running_id.clone();
        async move {
            let v = via_a.get(&running_id).await;
            match v["diagnostic"]["code"].as_str() {
                Some("host_lost") => Ok(()),
                _ => Err(format!("{v}")),
            }
        }
    })
    .await;
    let lost = via_a.get(&running_id).await;
    assert_eq!(lost["state"], "error", "{lost}");
    let (status, resumed) = via_a
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(owner_of(&resumed, &hosts), "host-a", "{resumed}");
    let rt = Runtime::of(&resumed);
    assert_eq!(
        rt.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"kept across hosts"[..])
    );
    let (_, _, alive) = rt.run(&format!("kill -0 {pid}")).await;
    assert_eq!(alive, 0, "the process came along");
    let hosts_now = a.admin(&["host", "list", "--catalog", &url]);
    assert!(hosts_now.contains(r#""state":"lost""#), "{hosts_now}");
    // B's warm VM is made again on A, the one ready host left.
    eventually(
        60,
        "the lost host's warm VM made again on A",
        warm_on("host-a", 2),
    )
    .await;
    let (status, v) = operator
        .call(
            reqwest::Method::PUT,
            "/v1/templates/minimal/warm-pool",
            Some(pool(0)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(via_a.delete(&id).await, StatusCode::NO_CONTENT);
    assert_eq!(via_a.delete(&running_id).await, StatusCode::NO_CONTENT);
    no_qemus_within(20, "A's VMs (the emptied pool's too) ending", a.run_dir()).await;
}
