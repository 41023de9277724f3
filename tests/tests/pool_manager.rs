//! The pool manager end to end: a real daemon process, its HTTP APIs, real VMs.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::{process_alive, qemus_in, Daemon};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn create_exec_files_delete_with_events() {
    let daemon = Daemon::start("lifecycle");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": small(),
            "envVars": { "GREETING": "hello" },
            "metadata": { "purpose": "test" },
            "timeout": 120
        }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(sbx["state"], "running");
    assert!(sbx["runtime"]["tokenExpiresAt"].is_string());
    let rt = Runtime::of(&sbx);

    let (out, err, code) = rt.run("echo $GREETING; echo oops >&2; exit 3").await;
    assert_eq!((out.as_str(), err.as_str(), code), ("hello\n", "oops\n", 3));

    // File round trip through the data plane.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let resp = rt
        .http
        .put(format!("{}/files?path=/workspace/data.bin", rt.base))
        .bearer_auth(&rt.token)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let back = rt
        .get("/files?path=/workspace/data.bin")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(back.as_ref(), data.as_slice());
    let listing: Value = rt
        .get("/files/list?path=/workspace")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["entries"][0]["name"], "data.bin");
    let missing = rt.get("/files?path=/nope").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // get never shows internal states; fields= projects.
    let (_, projected) = api
        .fetch(&format!("/v1/sandboxes/{id}?fields=state,metadata"))
        .await;
    assert_eq!(
        projected,
        json!({ "sandboxID": id, "state": "running", "metadata": { "purpose": "test" } })
    );

    let status = api.delete(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(api.get(&id).await["state"], "deleted");
    // A deleted sandbox's token opens nothing, with the answer an unknown one gets.
    let resp = rt.post("/commands", json!({ "cmd": "true" })).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let (_, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["sandbox.created", "sandbox.running", "sandbox.deleted"]
    );
    let ids: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    let (_, after) = api
        .fetch(&format!("/v1/sandboxes/{id}/events?after_event_id=1"))
        .await;
    assert_eq!(after["events"].as_array().unwrap().len(), 2);
    // Nothing of the VM is left.
    assert_eq!(qemus_of(&daemon), 0);
}

#[tokio::test]
async fn data_plane_stdin_signals_and_reattach() {
    use futures::StreamExt;
    let daemon = Daemon::start("dataplane");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let rt = Runtime::of(&sbx);
    // stdin from a second request while the first streams the output.
    let resp = rt
        .post("/commands", json!({ "cmd": "tr a-z A-Z", "stdin": true }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let first: Value = serde_json::from_slice(&body.next().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "start");
    let pid = first["pid"].as_u64().unwrap();
    let resp = rt
        .http
        .post(format!("{}/commands/{pid}/stdin?eof=true", rt.base))
        .bearer_auth(&rt.token)
        .body("hello stdin\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(text.contains(r#""data":"HELLO STDIN\n""#), "{text}");
    assert!(text.contains(r#""exitCode":0"#), "{text}");

    // A background command, signalled, then waited for by attaching.
    let started: Value = rt
        .post(
            "/commands",
            json!({ "cmd": "echo begun; touch /tmp/begun; sleep 300", "background": true }),
        )
        .await
        .json()
        .await
        .unwrap();
    let pid = started["pid"].as_u64().unwrap();
    // Signal only once it has written its output (it runs detached meanwhile).
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.run("test -e /tmp/begun").await.2 != 0 {
        assert!(
            Instant::now() < deadline,
            "the background command never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = rt
        .post(&format!("/commands/{pid}/signal"), json!({ "signal": 15 }))
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let waited = rt
        .get(&format!("/commands/{pid}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(waited.contains(r#""data":"begun\n""#), "{waited}");
    assert!(waited.contains(r#""signal":15"#), "{waited}");
    let resp = rt
        .http
        .post(format!("{}/commands/{pid}/stdin", rt.base))
        .bearer_auth(&rt.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    // A missing parameter gets the JSON error body too.
    let resp = rt.get("/files").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("path"), "{v}");
    // An expired token is refused with what to do.
    let expired = format!("{}.1.x", sbx["sandboxID"].as_str().unwrap());
    let resp = rt
        .http
        .get(format!("{}/commands", rt.base))
        .bearer_auth(expired)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_requests_are_refused_with_what_to_send() {
    let daemon = Daemon::start("badreq");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let cases = [
        (
            json!({ "templateID": "base", "timeoutMs": 1000 }),
            StatusCode::BAD_REQUEST,
            "`timeout`",
        ),
        (
            json!({ "templateID": "base", "volumeMounts": {} }),
            StatusCode::BAD_REQUEST,
            "`mounts`",
        ),
        (
            json!({ "templateID": "base", "bogus": 1 }),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            json!({ "templateID": "nope" }),
            StatusCode::NOT_FOUND,
            "template 'nope'",
        ),
        (
            json!({ "templateID": "base", "timeout": 0 }),
            StatusCode::BAD_REQUEST,
            "send seconds from 1",
        ),
        (
            json!({ "templateID": "base", "resources": { "vcpus": 99, "memMiB": 512, "diskSizeMiB": 2048 } }),
            StatusCode::BAD_REQUEST,
            "send 1 to 16",
        ),
        (
            json!({ "templateID": "base", "egress": { "deny": ["10.0.0.0/8", "-x"] } }),
            StatusCode::BAD_REQUEST,
            "egress.deny[1]",
        ),
        (
            json!({ "templateID": "base", "snapshotInterval": 3 }),
            StatusCode::BAD_REQUEST,
            "snapshotInterval",
        ),
        (
            json!({ "templateID": "snap-0123456789abcdef0123-0123456789ab" }),
            StatusCode::NOT_FOUND,
            "snap-0123456789abcdef0123-0123456789ab",
        ),
        (
            json!({ "templateID": "base", "lifecycle": { "autoResume": true } }),
            StatusCode::BAD_REQUEST,
            "onTimeout \"pause\" or \"hibernate\"",
        ),
        (
            json!({ "templateID": "base", "warmPool": "require" }),
            StatusCode::CONFLICT,
            "warm pool",
        ),
    ];
    for (body, status, hint) in cases {
        let (got, v) = api.post("/v1/sandboxes", body.clone()).await;
        assert_eq!(got, status, "{body} -> {v}");
        assert!(
            v["message"].as_str().unwrap().contains(hint),
            "{body} -> {v}"
        );
        assert!(v["code"].is_string());
    }
    let (status, v) = Api {
        key: "ns_wrong".into(),
        ..Api::new(&daemon, String::new())
    }
    .call(reqwest::Method::GET, "/v1/sandboxes", None)
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, v) = api.fetch("/v1/sandboxes?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = api.fetch("/v1/sandboxes?nextToken=garbage").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn list_pages_through_a_metadata_filter() {
    let daemon = Daemon::start("list");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let mut blue = Vec::new();
    for i in 0..7 {
        let color = if i % 3 == 2 { "red" } else { "blue" };
        let s = api
            .create(json!({ "templateID": "minimal", "resources": small(), "metadata": { "color": color, "i": i.to_string() } }))
            .await;
        if color == "blue" {
            blue.push(s["sandboxID"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(blue.len(), 5);
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/sandboxes?metadata=color%3Dblue&limit=2&fields=state".to_string();
        if let Some(t) = &token {
            path.push_str(&format!("&nextToken={t}"));
        }
        let (status, page) = api.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for s in page["sandboxes"].as_array().unwrap() {
            assert_eq!(s.as_object().unwrap().len(), 2, "projected: {s}");
            seen.push(s["sandboxID"].as_str().unwrap().to_string());
        }
        match page["nextToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, blue);
    let (_, running) = api.fetch("/v1/sandboxes?state=paused").await;
    assert!(running["sandboxes"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn timeouts_kill_or_pause_and_connect_resumes_with_memory() {
    let daemon = Daemon::start("timeouts");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let killed = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 2 }))
        .await;
    let paused = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 3, "lifecycle": { "onTimeout": "pause" } }))
        .await;
    let rt = Runtime::of(&paused);
    // A value only in memory (tmpfs), and a background process.
    let (out, _, _) = rt
        .run("cat /proc/sys/kernel/random/uuid > /tmp/value; cat /tmp/value")
        .await;
    let value = out.trim().to_string();
    let started: Value = rt
        .post(
            "/commands",
            json!({ "cmd": "sleep 1000", "background": true }),
        )
        .await
        .json()
        .await
        .unwrap();
    let pid = started["pid"].as_u64().expect("a pid");

    api.wait_state(
        killed["sandboxID"].as_str().unwrap(),
        "deleted",
        Duration::from_secs(30),
    )
    .await;
    let id = paused["sandboxID"].as_str().unwrap();
    api.wait_state(id, "paused", Duration::from_secs(30)).await;
    // A paused sandbox's data plane refuses, and get does not wake it.
    let resp = rt.post("/commands", json!({ "cmd": "true" })).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(api.get(id).await["state"], "paused");

    let (status, connected) = api
        .post(
            &format!("/v1/sandboxes/{id}/connect"),
            json!({ "timeout": 60 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    assert_eq!(connected["state"], "running");
    let rt = Runtime::of(&connected);
    let (out, _, _) = rt.run("cat /tmp/value").await;
    assert_eq!(out, format!("{value}\n"));
    let listed: Value = rt.get("/commands").await.json().await.unwrap();
    let sleeper = listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| panic!("the background process survived the pause: {listed}"));
    assert!(sleeper.get("exit").is_none(), "{sleeper}");
    let status = api.delete(id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_non_default_shape_gets_its_cpus_memory_and_disk() {
    let daemon = Daemon::start("shape");
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": { "vcpus": 3, "memMiB": 768, "diskSizeMiB": 3072 } }))
        .await;
    assert_eq!(
        sbx["resources"],
        json!({ "vcpus": 3, "memMiB": 768, "diskSizeMiB": 3072 })
    );
    let (out, _, _) = Runtime::of(&sbx)
        .run("nproc; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo; df -m / | tail -1 | awk '{print $2}'")
        .await;
    let nums: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(nums[0], 3);
    assert!((600..=768).contains(&nums[1]), "MemTotal {} MiB", nums[1]);
    assert!((2800..=3072).contains(&nums[2]), "root fs {} MiB", nums[2]);
}

#[tokio::test]
async fn teams_cannot_see_or_reach_each_others_sandboxes() {
    let daemon = Daemon::start("teams");
    let a = Api::new(&daemon, daemon.team_key("red"));
    let b = Api::new(&daemon, daemon.team_key("blue"));
    let sa = a
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let sb = b
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let ida = sa["sandboxID"].as_str().unwrap();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/sandboxes/{ida}")),
        (reqwest::Method::POST, format!("/v1/sandboxes/{ida}/pause")),
        (
            reqwest::Method::POST,
            format!("/v1/sandboxes/{ida}/connect"),
        ),
        (reqwest::Method::DELETE, format!("/v1/sandboxes/{ida}")),
    ] {
        let (status, v) = b.call(method, &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
    }
    let (_, listed) = b.fetch("/v1/sandboxes").await;
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [sb["sandboxID"].as_str().unwrap()]);
    // B's runtime token does not open A's sandbox.
    let rt_b = Runtime::of(&sb);
    let resp = rt_b
        .http
        .post(format!("{}/v1/sandboxes/{ida}/commands", daemon.edge))
        .bearer_auth(&rt_b.token)
        .json(&json!({ "cmd": "cat /etc/hostname" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = rt_b
        .http
        .post(format!("{}/v1/sandboxes/{ida}/commands", daemon.edge))
        .json(&json!({ "cmd": "true" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(a.get(ida).await["state"], "running");
}

#[tokio::test]
async fn a_killed_daemon_restarts_and_re_adopts_running_sandboxes() {
    let mut daemon = Daemon::start("restart");
    let key = daemon.team_key("acme");
    let api = Api::new(&daemon, key.clone());
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let short = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 8 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    rt.run("echo kept > /tmp/memory-only").await;
    let started: Value = rt
        .post(
            "/commands",
            json!({ "cmd": "while true; do sleep 0.5; done", "background": true }),
        )
        .await
        .json()
        .await
        .unwrap();
    let pid = started["pid"].as_u64().unwrap();
    let qemus = qemu_pids_of(&daemon);
    assert_eq!(qemus.len(), 2);

    // SIGKILL: no clean-up runs. The VMs must outlive it.
    let state = daemon.stop_with(libc::SIGKILL);
    assert!(
        qemus.iter().all(|p| process_alive(*p)),
        "VMs died with the daemon"
    );
    std::mem::forget(daemon); // keep its state directory for the restart
    let daemon = Daemon::start_in(state);
    let api = Api::new(&daemon, key);
    let after = api.get(&id).await;
    assert_eq!(after["state"], "running", "{after}");
    let (status, connected) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    let rt = Runtime::of(&connected);
    let (out, _, _) = rt.run("cat /tmp/memory-only").await;
    assert_eq!(out, "kept\n");
    let listed: Value = rt.get("/commands").await.json().await.unwrap();
    assert!(
        listed["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"].as_u64() == Some(pid) && p.get("exit").is_none()),
        "the process started before the kill still runs: {listed}"
    );
    // Timeouts still fire for adopted sandboxes.
    api.wait_state(
        short["sandboxID"].as_str().unwrap(),
        "deleted",
        Duration::from_secs(30),
    )
    .await;
    let status = api.delete(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Nothing orphaned: both adopted QEMUs are gone.
    assert!(
        qemus.iter().all(|p| !process_alive(*p)),
        "an adopted VM outlived its sandbox"
    );
}

#[tokio::test]
async fn sigterm_ends_vms_by_default_or_keeps_them_when_configured() {
    let state = {
        let mut d = Daemon::start("sigterm");
        let dir = d.stop_with(libc::SIGTERM);
        std::mem::forget(d); // keep the state directory
        dir
    };
    // --on-exit keep: SIGTERM leaves the VM running, the next start adopts it.
    let mut daemon = Daemon::start_in_with(state.clone(), &["--on-exit", "keep"]);
    let key = daemon.team_key("acme");
    let api = Api::new(&daemon, key.clone());
    let kept = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let kept_id = kept["sandboxID"].as_str().unwrap().to_string();
    Runtime::of(&kept).run("echo still > /tmp/here").await;
    let qemus = qemu_pids_of(&daemon);
    daemon.stop_with(libc::SIGTERM);
    std::mem::forget(daemon);
    assert!(qemus.iter().all(|p| process_alive(*p)), "keep ended the VM");

    // Default (end): the adopted VM ends with the daemon and the sandbox says why.
    let mut daemon = Daemon::start_in(state.clone());
    let api = Api::new(&daemon, key.clone());
    let connected = api
        .post(&format!("/v1/sandboxes/{kept_id}/connect"), json!({}))
        .await
        .1;
    assert_eq!(connected["state"], "running", "{connected}");
    let (out, _, _) = Runtime::of(&connected).run("cat /tmp/here").await;
    assert_eq!(out, "still\n");
    daemon.stop_with(libc::SIGTERM);
    std::mem::forget(daemon);
    assert!(
        qemus.iter().all(|p| !process_alive(*p)),
        "SIGTERM left the VM running"
    );
    let daemon = Daemon::start_in(state);
    let api = Api::new(&daemon, key);
    let ended = api.get(&kept_id).await;
    assert_eq!(ended["state"], "error", "{ended}");
    assert_eq!(ended["diagnostic"]["code"], "host_stopped", "{ended}");
}

#[tokio::test]
async fn twenty_concurrent_creates_and_deletes_leave_nothing() {
    let daemon = Daemon::start("burst");
    let api = std::sync::Arc::new(Api::new(&daemon, daemon.team_key("acme")));
    // Warm the shape's template first, so the burst measures restores.
    let first = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let (status, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{}", first["sandboxID"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let s = api
                    .create(json!({ "templateID": "minimal", "resources": small() }))
                    .await;
                let id = s["sandboxID"].as_str().unwrap().to_string();
                let (out, _, _) = Runtime::of(&s).run("echo up").await;
                assert_eq!(out, "up\n");
                let (status, v) = api
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/v1/sandboxes/{id}"),
                        None,
                    )
                    .await;
                assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
                id
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (_, listed) = api.fetch("/v1/sandboxes").await;
    assert!(
        listed["sandboxes"].as_array().unwrap().is_empty(),
        "{listed}"
    );
    assert_eq!(qemus_of(&daemon), 0, "QEMU processes leaked");
}

/// Running QEMU processes started by `daemon`.
fn qemus_of(daemon: &Daemon) -> usize {
    qemu_pids_of(daemon).len()
}

/// PIDs of the running QEMU processes started by `daemon`.
fn qemu_pids_of(daemon: &Daemon) -> Vec<u32> {
    let parent = daemon.pid().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            process_alive(*pid)
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                        s.contains("(qemu-system-x86")
                            && after.split_whitespace().nth(1) == Some(&parent)
                    })
                    .unwrap_or(false)
        })
        .collect()
}

#[tokio::test]
async fn deleted_sandboxes_are_pruned_after_their_retention() {
    // No retention: a deleted sandbox's record and events go at the next prune (every
    // 10 s), so the catalog does not grow with every sandbox ever made.
    let daemon = Daemon::start_with("prune", &["--deleted-retention-s", "0"], &[]);
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let kept = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (status, _) = api.fetch(&format!("/v1/sandboxes/{id}")).await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "still {status} after 40 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, _) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "its events went with it");
    // A live sandbox is never pruned.
    let kept_id = kept["sandboxID"].as_str().unwrap();
    assert_eq!(api.get(kept_id).await["state"], "running");
    assert_eq!(api.delete(kept_id).await, StatusCode::NO_CONTENT);
}

/// The smallest shape a sandbox runs in (the restart tests make several).
fn tiny() -> Value {
    json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 })
}

#[tokio::test]
async fn a_daemon_killed_during_pauses_loses_no_file() {
    let mut daemon = Daemon::start("pause-kill");
    let key = daemon.team_key("acme");
    let api = Api::new(&daemon, key.clone());
    let pause = |id: &str| {
        let api = api.clone();
        let id = id.to_string();
        async move {
            let (status, v) = api
                .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
                .await;
            assert_eq!(
                (status, v["state"].as_str()),
                (StatusCode::OK, Some("paused")),
                "{v}"
            );
        }
    };
    // Each sandbox paused and resumed once: the pause the kill interrupts is a second
    // one, whose VM's disk is layered on the first one's snapshot (it must survive).
    let mut sandboxes = Vec::new();
    let mut pause_took = Duration::ZERO;
    for i in 0..5u32 {
        let sbx = api
            .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
            .await;
        let id = sbx["sandboxID"].as_str().unwrap().to_string();
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|n| (n.wrapping_mul(13) + i * 7) as u8)
            .collect();
        Runtime::of(&sbx)
            .put_file("/workspace/kept.bin", &data)
            .await;
        let t = Instant::now();
        pause(&id).await;
        pause_took = pause_took.max(t.elapsed());
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        sandboxes.push((id, data));
    }
    // How long before the SIGKILL each sandbox's pause is sent: from the `stop` through
    // the state stream and the disk copy to the end of the VM.
    let sent_before_kill_ms = [pause_took.as_millis() as u64, 400, 150, 50, 15];
    let old_qemus = qemus_in(daemon.run_dir());
    assert_eq!(old_qemus.len(), sandboxes.len());

    // The pauses are in flight, nobody waits for them, and the daemon dies.
    let kill_at = Duration::from_millis(sent_before_kill_ms.into_iter().max().unwrap());
    let start = Instant::now();
    let mut pauses = Vec::new();
    for ((id, _), before) in sandboxes.iter().zip(sent_before_kill_ms) {
        let send_at = kill_at - Duration::from_millis(before);
        tokio::time::sleep(send_at.saturating_sub(start.elapsed())).await;
        let request = api
            .http
            .post(format!("{}/v1/sandboxes/{id}/pause", api.base))
            .header("X-API-Key", &api.key)
            .send();
        pauses.push(tokio::spawn(request));
    }
    tokio::time::sleep(kill_at.saturating_sub(start.elapsed())).await;
    let state = daemon.stop_with(libc::SIGKILL);
    std::mem::forget(daemon); // keep its state directory for the restart
    for p in pauses {
        let _ = p.await; // answered, or cut off by the kill
    }

    let daemon = Daemon::start_in(state);
    let api = Api::new(&daemon, key);
    let pause = |id: &str| {
        let api = api.clone();
        let id = id.to_string();
        async move {
            let (status, v) = api
                .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
                .await;
            assert_eq!(
                (status, v["state"].as_str()),
                (StatusCode::OK, Some("paused")),
                "{v}"
            );
        }
    };
    for ((id, data), before) in sandboxes.iter().zip(sent_before_kill_ms) {
        let after = api.get(id).await;
        eprintln!(
            "pause sent {before} ms before the kill: {} after the restart",
            after["state"]
        );
        assert!(
            after["state"] == "running" || after["state"] == "paused",
            "pause sent {before} ms before the kill: {after}"
        );
        // Twice: connect after the restart, then after one more pause (which needs the
        // snapshot the VM's disk is layered on).
        for round in ["after the restart", "after one more pause"] {
            let (status, connected) = api
                .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
                .await;
            assert_eq!(status, StatusCode::OK, "{connected}");
            assert_eq!(connected["state"], "running", "{connected}");
            let back = Runtime::of(&connected)
                .get("/files?path=/workspace/kept.bin")
                .await
                .bytes()
                .await
                .unwrap();
            assert!(
                back.as_ref() == data.as_slice(),
                "pause sent {before} ms before the kill, {round}: the file came back as {} bytes, not the {} written",
                back.len(),
                data.len()
            );
            if round == "after the restart" {
                pause(id).await;
            }
        }
    }
    // One QEMU per sandbox, each the new daemon's: the old daemon left none behind.
    assert_eq!(
        qemus_in(daemon.run_dir()).len(),
        sandboxes.len(),
        "QEMU processes besides the sandboxes' VMs"
    );
    for (id, _) in &sandboxes {
        assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
    }
    assert!(
        qemus_in(daemon.run_dir()).is_empty(),
        "QEMU processes leaked"
    );
    assert!(
        old_qemus.iter().all(|p| !process_alive(*p)),
        "a VM of the killed daemon outlived its sandbox"
    );
}

#[tokio::test]
async fn a_restart_finishes_a_pause_and_a_delete_the_records_missed() {
    let mut daemon = Daemon::start("pause-recover");
    let key = daemon.team_key("acme");
    let api = Api::new(&daemon, key.clone());
    let paused = api
        .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
        .await;
    let deleting = api
        .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
        .await;
    let (a, b) = (
        paused["sandboxID"].as_str().unwrap().to_string(),
        deleting["sandboxID"].as_str().unwrap().to_string(),
    );
    let data: Vec<u8> = (0..1_000_000u32).map(|n| (n % 241) as u8).collect();
    Runtime::of(&paused)
        .put_file("/workspace/kept.bin", &data)
        .await;
    for id in [&a, &b] {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await;
        assert_eq!(
            (status, v["state"].as_str()),
            (StatusCode::OK, Some("paused"))
        );
    }
    let state = daemon.stop_with(libc::SIGKILL);
    std::mem::forget(daemon);
    // As the catalog is when the daemon dies after `a`'s pause snapshot was complete and
    // its VM ended, before the snapshot and the record were written; and during `b`'s
    // delete.
    let db = rusqlite::Connection::open(state.join("catalog.db")).unwrap();
    db.execute(
        "UPDATE sandboxes SET record = json_set(record, '$.state', 'active',
             '$.pause_snapshot', NULL, '$.vm_dir', '/nonexistent/vm') WHERE id = ?1",
        [&a],
    )
    .unwrap();
    db.execute("DELETE FROM snapshots WHERE sandbox_id = ?1", [&a])
        .unwrap();
    db.execute(
        "UPDATE sandboxes SET record = json_set(record, '$.state', 'destroying') WHERE id = ?1",
        [&b],
    )
    .unwrap();
    drop(db);
    // And a pause of `a` that never finished its snapshot.
    let unfinished = state.join("pauses").join(&a).join("unfinished");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("state"), b"partial").unwrap();
    // A fork the crash interrupted: its snapshot serves no child.
    let orphan_fork = state.join("forks").join("0123456789abcdef");
    std::fs::create_dir_all(&orphan_fork).unwrap();
    std::fs::write(orphan_fork.join("memory"), b"partial").unwrap();

    let daemon = Daemon::start_in(state.clone());
    let api = Api::new(&daemon, key);
    let recovered = api.get(&a).await;
    assert_eq!(recovered["state"], "paused", "{recovered}");
    let (_, events) = api.fetch(&format!("/v1/sandboxes/{a}/events")).await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"sandbox.recovered"), "{events}");
    assert!(!unfinished.exists(), "the unfinished pause is still there");
    let (status, connected) = api
        .post(&format!("/v1/sandboxes/{a}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    let back = Runtime::of(&connected)
        .get("/files?path=/workspace/kept.bin")
        .await
        .bytes()
        .await
        .unwrap();
    assert!(back.as_ref() == data.as_slice(), "the file changed");

    assert_eq!(api.get(&b).await["state"], "deleted");
    assert!(
        !state.join("pauses").join(&b).exists(),
        "the deleted sandbox's pause snapshot is still there"
    );
    assert!(
        !orphan_fork.exists(),
        "an unused fork snapshot outlived the restart"
    );
    assert_eq!(api.delete(&a).await, StatusCode::NO_CONTENT);
    assert!(
        qemus_in(daemon.run_dir()).is_empty(),
        "QEMU processes leaked"
    );
}
