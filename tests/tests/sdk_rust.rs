//! The Rust SDK against the live stack: public API (component) + pool manager + real VMs.

use nullspace::{ConnectionConfig, CreateOptions, ListQuery, RunOptions, Sandbox};
use nullspace_tests::{sha256_hex, ScratchDir, Stack};
use std::sync::{Arc, Mutex};

fn small(template: &str) -> CreateOptions {
    CreateOptions::new(template).resources(1, 512, 1024)
}

#[tokio::test]
async fn the_async_sdk_drives_a_sandbox_end_to_end() {
    let stack = Stack::start("sdk-rust");
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));
    let mut sbx = Sandbox::create(
        &config,
        &small("minimal")
            .timeout(120)
            .metadata("suite", "sdk")
            .env("GREETING", "hello"),
    )
    .await
    .unwrap();
    assert!(sbx.is_running().await.unwrap());

    // Commands: streamed output through callbacks, exit codes, env and cwd.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let out = sbx
        .commands()
        .run_with(
            "echo $GREETING $EXTRA; pwd; echo oops >&2; exit 3",
            RunOptions {
                envs: [("EXTRA".to_string(), "world".to_string())].into(),
                on_stdout: Some(Box::new(move |s| sink.lock().unwrap().push(s.to_string()))),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "hello world\n/workspace\n");
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(seen.lock().unwrap().concat(), out.stdout);

    // A background command with stdin, waited on later.
    let handle = sbx
        .commands()
        .spawn(
            "tr a-z A-Z",
            RunOptions {
                stdin: true,
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(sbx
        .commands()
        .list()
        .await
        .unwrap()
        .iter()
        .any(|p| p.pid == handle.pid));
    // Its stdin flows while someone waits on it: wait in a task, send once attached.
    let waiter = tokio::spawn({
        let handle = handle.clone();
        async move { handle.wait().await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sbx
        .commands()
        .list()
        .await
        .unwrap()
        .iter()
        .any(|p| p.pid == handle.pid && p.attached)
    {
        assert!(std::time::Instant::now() < deadline, "never attached");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    handle.send_stdin("shout\n").await.unwrap();
    handle.close_stdin().await.unwrap();
    let done = waiter.await.unwrap().unwrap();
    assert_eq!((done.stdout.as_str(), done.exit_code), ("SHOUT\n", Some(0)));
    let sleeper = sbx
        .commands()
        .spawn("sleep 300", RunOptions::default())
        .await
        .unwrap();
    assert!(sbx.commands().kill(sleeper.pid).await.unwrap());
    assert_eq!(sleeper.wait().await.unwrap().signal, Some(9));

    // Files, small and streamed.
    let files = sbx.files();
    files.write("notes/a.txt", "alpha").await.unwrap();
    assert_eq!(files.read_to_string("notes/a.txt").await.unwrap(), "alpha");
    files.mkdir("notes/deep/er").await.unwrap();
    files.rename("notes/a.txt", "notes/b.txt").await.unwrap();
    let names: Vec<String> = files
        .list("notes")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["b.txt", "deep"]);
    assert_eq!(files.stat("notes/b.txt").await.unwrap().size, 5);
    assert!(!files.exists("notes/a.txt").await.unwrap());
    let dir = ScratchDir::new("sdk-files");
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("up.bin"), &blob).unwrap();
    assert_eq!(
        files
            .upload(&dir.path().join("up.bin"), "/workspace/up.bin")
            .await
            .unwrap(),
        blob.len() as u64
    );
    files
        .download("/workspace/up.bin", &dir.path().join("down.bin"))
        .await
        .unwrap();
    assert_eq!(
        sha256_hex(&std::fs::read(dir.path().join("down.bin")).unwrap()),
        sha256_hex(&blob)
    );
    files.remove("notes").await.unwrap();
    let err = files.read("notes/b.txt").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");

    // Control plane: list, info, timeout, pause/resume, kill.
    let page = Sandbox::list(
        &config,
        &ListQuery {
            metadata: [("suite".to_string(), "sdk".to_string())].into(),
            ..ListQuery::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(page.sandboxes.len(), 1);
    assert_eq!(page.sandboxes[0].sandbox_id, sbx.id());
    sbx.set_timeout(90).await.unwrap();
    assert_eq!(sbx.get_info().await.unwrap().timeout, 90);
    let before = sbx.get_info().await.unwrap().expires_at;
    sbx.refresh(Some(3600)).await.unwrap();
    assert!(
        sbx.get_info().await.unwrap().expires_at > before,
        "refresh extends the life"
    );
    sbx.pause().await.unwrap();
    let info = Sandbox::get_info_by_id(&config, sbx.id()).await.unwrap();
    assert_eq!(info.state, "paused");
    assert!(info.runtime.is_none(), "a read-only get never wakes it");
    assert!(
        info.dashboard_url
            .ends_with(&format!("/dashboard/sandboxes/{}", sbx.id())),
        "{}",
        info.dashboard_url
    );
    sbx.resume().await.unwrap();
    assert_eq!(
        sbx.files().read_to_string("up.bin").await.unwrap().len(),
        String::from_utf8_lossy(&blob).len()
    );
    assert!(sbx.kill().await.unwrap());
    assert!(!sbx.kill().await.unwrap(), "a second kill finds nothing");
}

#[tokio::test]
async fn errors_carry_the_api_code_and_blocking_calls_work() {
    let stack = Stack::start("sdk-rust-blocking");
    let key = stack.daemon.team_key("acme");
    let config = ConnectionConfig::new(&stack.api.url, key.clone());

    let err = Sandbox::get_info_by_id(&config, "sbx-0123456789abcdef0123")
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let bad = config
        .clone()
        .with_api_key("ns_0123456789abcdef0123456789abcdef");
    let err = Sandbox::list(&bad, &ListQuery::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("unauthorized"), "{err}");
    let err = Sandbox::create(&config, &CreateOptions::new("no-such-template"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    // A domain given as host:port works like a URL.
    let domain = stack.api.url.trim_start_matches("http://").to_string();
    let by_domain = config.clone().with_domain(&domain);
    assert!(Sandbox::list(&by_domain, &ListQuery::default())
        .await
        .is_ok());

    // The blocking API, from a plain thread.
    tokio::task::spawn_blocking(move || {
        use nullspace::blocking;
        let sbx = blocking::Sandbox::create(&config, &small("minimal")).unwrap();
        assert_eq!(sbx.run("echo $((6*7))").unwrap().stdout, "42\n");
        sbx.write("x.txt", "blocking").unwrap();
        assert_eq!(sbx.read("x.txt").unwrap(), b"blocking");
        let pid = sbx.spawn("echo later", RunOptions::default()).unwrap();
        assert_eq!(sbx.wait(pid).unwrap().stdout, "later\n");
        let again = blocking::Sandbox::connect(&config, sbx.id(), Some(60)).unwrap();
        assert_eq!(again.read("x.txt").unwrap(), b"blocking");
        assert!(sbx.kill().unwrap());
        assert!(!again.is_running().unwrap_or(false));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_sdk_snapshots_restores_forks_and_hibernates() {
    use nullspace::RestoreOptions;
    let stack = Stack::start("sdk-rust-snapshots");
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));
    let mut sbx = Sandbox::create(&config, &small("minimal").timeout(120))
        .await
        .unwrap();
    sbx.files()
        .write("/workspace/state.txt", "v1")
        .await
        .unwrap();
    let snap = sbx.create_snapshot().await.unwrap();
    assert_eq!(
        (snap.kind.as_str(), snap.storage.as_str()),
        ("manual", "object")
    );
    // What it sent: the whole of a first snapshot in a new store, nothing once listed.
    let sent = snap
        .uploaded_bytes
        .expect("a new snapshot says what it sent");
    assert!(sent > 0 && sent <= snap.size_bytes, "{snap:?}");
    let listed = sbx.list_snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].snapshot_id, snap.snapshot_id);
    assert_eq!(listed[0].uploaded_bytes, None);

    let children = sbx.fork(1).await.unwrap();
    assert_eq!(children.len(), 1);
    assert_eq!(
        children[0]
            .files()
            .read_to_string("/workspace/state.txt")
            .await
            .unwrap(),
        "v1"
    );

    sbx.hibernate().await.unwrap();
    let info = sbx.get_info().await.unwrap();
    assert!(info.hibernated && info.state == "paused", "{info:?}");
    sbx.resume().await.unwrap();
    sbx.files()
        .write("/workspace/state.txt", "v2")
        .await
        .unwrap();
    assert!(sbx.kill().await.unwrap());

    // After the kill, the manual snapshot restores the state it had then.
    let restored = Sandbox::restore(
        &config,
        sbx.id(),
        &RestoreOptions {
            snapshot_id: Some(snap.snapshot_id.clone()),
            ..RestoreOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        restored
            .files()
            .read_to_string("/workspace/state.txt")
            .await
            .unwrap(),
        "v1"
    );
    let from_template = Sandbox::create(&config, &CreateOptions::new(&snap.snapshot_id))
        .await
        .unwrap();
    assert!(from_template
        .files()
        .exists("/workspace/state.txt")
        .await
        .unwrap());
    for s in [&restored, &from_template, &children[0]] {
        assert!(s.kill().await.unwrap());
    }
    let gone = Sandbox::restore(
        &config,
        "sbx-0123456789abcdef0123",
        &RestoreOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
}

#[tokio::test]
async fn the_sdk_builds_templates_streams_logs_and_reports_failures() {
    use nullspace::{BuildStep, TemplateBuild, TemplateStatus, Templates};
    let stack = Stack::start("sdk-rust-templates");
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));
    let shape = nullspace::Resources {
        vcpus: 1,
        mem_mib: 512,
        disk_mib: 2048,
    };
    let request = TemplateBuild {
        name: Some("sdk-tpl".into()),
        steps: vec![
            BuildStep::env([("MODE", "sdk")]),
            BuildStep::file("/etc/sdk-note", "written by a step\n").as_user("user"),
            BuildStep::run("echo mode $MODE; stat -c %U /etc/sdk-note"),
        ],
        resources: Some(shape),
        ..TemplateBuild::default()
    };
    let mut lines = Vec::new();
    let t = Templates::build_and_wait(&config, &request, |l| lines.push(l.clone()))
        .await
        .unwrap();
    assert_eq!(t.status, TemplateStatus::Ready);
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert!(
        texts.contains(&"mode sdk") && texts.contains(&"user"),
        "{texts:?}"
    );
    let sbx = Sandbox::create(&config, &CreateOptions::new("sdk-tpl"))
        .await
        .unwrap();
    let out = sbx
        .commands()
        .run("cat /etc/sdk-note; echo $MODE")
        .await
        .unwrap();
    assert_eq!(out.stdout, "written by a step\nsdk\n");
    sbx.kill().await.unwrap();

    let failing = TemplateBuild {
        steps: vec![BuildStep::run("echo broken >&2; exit 5")],
        resources: Some(shape),
        ..TemplateBuild::default()
    };
    let err = Templates::build_and_wait(&config, &failing, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("build_failed"), "{err}");
    assert!(
        err.to_string().contains("step 0 (run) exited with code 5"),
        "{err}"
    );
    match &err {
        nullspace::Error::Api { details, .. } => {
            assert_eq!(details["exitCode"], 5);
            assert!(details["outputTail"].as_str().unwrap().contains("broken"));
        }
        other => panic!("{other}"),
    }

    // Blocking: list, get, delete.
    let config2 = config.clone();
    tokio::task::spawn_blocking(move || {
        use nullspace::blocking::Templates;
        let all = Templates::list(&config2).unwrap();
        assert!(all.iter().any(|t| t.name.as_deref() == Some("sdk-tpl")));
        let t = Templates::get(&config2, "sdk-tpl").unwrap();
        assert_eq!(t.env_vars["MODE"], "sdk");
        Templates::delete(&config2, "sdk-tpl").unwrap();
        assert!(Templates::get(&config2, "sdk-tpl")
            .unwrap_err()
            .is_not_found());
    })
    .await
    .unwrap();
}

/// Reads a terminal until its output contains `want`.
async fn pty_until(pty: &mut nullspace::Pty, out: &mut String, want: &str) {
    while !out.contains(want) {
        match tokio::time::timeout(std::time::Duration::from_secs(20), pty.next()).await {
            Ok(Some(Ok(nullspace::PtyEvent::Output(b)))) => {
                out.push_str(&String::from_utf8_lossy(&b))
            }
            other => panic!("waiting for {want:?} in {out:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn events_stream_without_gaps_across_a_daemon_restart_and_terminals_and_watches_work() {
    use nullspace::{EventStreamOptions, PtyEvent};
    use std::time::Duration;
    let mut stack = Stack::start_with("sdk-rust-live", &["--on-exit", "keep"], &[]);
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));
    let sbx = Sandbox::create(&config, &small("minimal").timeout(600))
        .await
        .unwrap();
    let mut events = sbx.stream_events(EventStreamOptions::default());
    let mut seen: Vec<nullspace::Event> = Vec::new();
    async fn until(
        events: &mut nullspace::EventStream,
        seen: &mut Vec<nullspace::Event>,
        kind: &str,
    ) {
        while !seen.iter().any(|e| e.kind == kind) {
            let e = tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .unwrap_or_else(|_| panic!("no {kind} in {seen:?}"))
                .unwrap()
                .unwrap();
            seen.push(e);
        }
    }
    until(&mut events, &mut seen, "sandbox.running").await;
    assert_eq!(
        seen[0].kind, "sandbox.created",
        "the replay starts at the start"
    );

    // A terminal with a resize, and a directory watch.
    let mut pty = sbx.pty(80, 24).await.unwrap();
    pty.send(b"stty size; echo pty-$((6*7))\n").await.unwrap();
    let mut out = String::new();
    pty_until(&mut pty, &mut out, "pty-42").await;
    pty_until(&mut pty, &mut out, "24 80").await;
    pty.resize(100, 30).await.unwrap();
    pty.send(b"stty size\n").await.unwrap();
    pty_until(&mut pty, &mut out, "30 100").await;
    pty.send(b"exit 3\n").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), pty.next())
            .await
            .unwrap()
        {
            Some(Ok(PtyEvent::Exit { exit_code, .. })) => {
                assert_eq!(exit_code, Some(3));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let mut watch = sbx.files().watch_dir("/workspace", true).await.unwrap();
    sbx.commands()
        .run("mkdir /workspace/w && sleep 0.5 && echo x > /workspace/w/f && mv /workspace/w/f /workspace/w/g")
        .await
        .unwrap();
    let mut changes = Vec::new();
    while !changes
        .iter()
        .any(|e: &nullspace::FsEvent| e.kind == "rename")
    {
        let e = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("changes so far: {changes:?}"))
            .unwrap()
            .unwrap();
        changes.push(e);
    }
    assert!(
        changes
            .iter()
            .any(|e| e.kind == "create" && e.path == "/workspace/w" && e.dir),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|e| e.kind == "write" && e.path == "/workspace/w/f"),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|e| e.kind == "rename"
            && e.path == "/workspace/w/g"
            && e.from.as_deref() == Some("/workspace/w/f")),
        "{changes:?}"
    );
    drop(watch);

    // Live events, then the pool manager restarts (its VMs kept) on the same addresses:
    // the stream reconnects and goes on after the last event it yielded.
    sbx.set_timeout(900).await.unwrap();
    sbx.pause().await.unwrap();
    until(&mut events, &mut seen, "sandbox.paused").await;
    let addr = |url: &str| url.trim_start_matches("http://").to_string();
    let (control, edge) = (addr(&stack.daemon.control), addr(&stack.daemon.edge));
    stack.daemon.restart_with(&[
        "--listen",
        &control,
        "--edge-listen",
        &edge,
        "--on-exit",
        "keep",
    ]);
    let mut sbx = Sandbox::connect(&config, sbx.id(), None).await.unwrap();
    while seen.iter().filter(|e| e.kind == "sandbox.running").count() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .unwrap_or_else(|_| panic!("no resume after the restart in {seen:?}"))
            .unwrap()
            .unwrap();
        seen.push(e);
    }
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no gap, no duplicate: {seen:?}"
    );
    // live_only skips the replay.
    let mut live = sbx.stream_events(EventStreamOptions {
        live_only: true,
        ..Default::default()
    });
    sbx.pause().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, "sandbox.paused");
    assert!(e.id > *ids.last().unwrap());
    sbx.resume().await.unwrap();
    assert!(sbx.kill().await.unwrap());
}

#[tokio::test]
async fn the_sdk_sets_egress_and_mounts_volumes() {
    use nullspace::{EgressPolicy, MountMode, Volumes};
    let stack = Stack::start("sdk-rust-volumes");
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));
    let vol = Volumes::create(&config, Some("sdk"), Some(32))
        .await
        .unwrap();
    assert_eq!((vol.size_mib, vol.version), (32, 0));
    let closed = EgressPolicy {
        internet: false,
        ..EgressPolicy::default()
    };
    let sbx = Sandbox::create(
        &config,
        &small("minimal")
            .egress(closed.clone())
            .mount("/mnt/sdk", "sdk", MountMode::Rw),
    )
    .await
    .unwrap();
    let info = sbx.get_info().await.unwrap();
    assert_eq!(info.egress, Some(closed));
    assert_eq!(info.mounts[0].volume, vol.volume_id);
    let out = sbx
        .commands()
        .run("echo kept > /mnt/sdk/f && cat /mnt/sdk/f")
        .await
        .unwrap();
    assert_eq!(out.stdout, "kept\n");
    let open = EgressPolicy {
        deny: vec!["*.example".into()],
        ..EgressPolicy::default()
    };
    assert_eq!(sbx.set_egress(&open).await.unwrap().egress, Some(open));
    let bad = EgressPolicy {
        allow: vec!["no such host".into()],
        ..EgressPolicy::default()
    };
    let err = sbx.set_egress(&bad).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    let err = Volumes::delete(&config, "sdk").await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_state"), "{err}");
    sbx.kill().await.unwrap();
    let saved = Volumes::get(&config, "sdk").await.unwrap();
    assert_eq!((saved.version, saved.attachments.len()), (1, 0));
    assert_eq!(Volumes::list(&config).await.unwrap().len(), 1);
    Volumes::delete(&config, &vol.volume_id).await.unwrap();
    assert!(Volumes::get(&config, "sdk")
        .await
        .unwrap_err()
        .is_not_found());
}

/// What `curl` in the guest gets from `url` (`who:<address> host:…`, or `FAIL`).
async fn curl(sbx: &Sandbox, url: &str) -> String {
    let out = sbx
        .commands()
        .run(&format!("curl -s -m 5 {url} || echo FAIL"))
        .await
        .unwrap();
    out.stdout.trim().to_string()
}

/// Seed 001's and seed 004's examples, transcribed: create parameters (proven from
/// inside the guests against hosts of the test's own network), `fields=`, `get_host`,
/// `get_metrics` with `SystemTime`, `wait_ready`, and `snapshot()` as a `Snapshot`.
#[tokio::test]
async fn the_seed_documents_examples_run_as_written() {
    use nullspace::{
        blocking, EgressPolicy, MetricTimestamp, MetricsTime, RestoreOptions, SandboxNetworkOpts,
    };
    use nullspace_tests::netns::TestNet;
    use serde_json::json;
    use std::time::{Duration, Instant, SystemTime};

    // Hosts .2 and .3, each answering `who:<its address>`.
    let mut net = TestNet::new(2);
    net.http_server(8080);
    let (two, three) = (net.addr(2), net.addr(3));
    net.wait_tcp(&two, 8080);
    let url = |addr: &str| format!("http://{addr}:8080/");
    let stack = Stack::start_with("sdk-rust-seeds", &["--network", "isolated"], &[]);
    let config = ConnectionConfig::new(&stack.api.url, stack.daemon.team_key("acme"));

    // Forms that would mean two things are refused before anything is sent; a security
    // policy the proxy would not know reaches the API, which says what is wrong.
    let err = Sandbox::create(
        &config,
        &small("base")
            .allow_internet_access(false)
            .egress(EgressPolicy::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    let bad = nullspace::SecurityPolicy::new().pii_detector("card", "shred");
    let err = Sandbox::create(&config, &small("base").security_policy(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    assert!(err.to_string().contains("securityPolicy"), "{err}");

    // Seed 001: Sandbox.create(allow_internet_access=False): nothing goes out.
    let started = SystemTime::now();
    let offline = Sandbox::create(
        &config,
        &small("base")
            .timeout(600)
            .metadata("suite", "seeds")
            .allow_internet_access(false),
    )
    .await
    .unwrap();
    assert_eq!(
        curl(&offline, &url(&two)).await,
        "FAIL",
        "no internet access"
    );

    // Seed 001: network=SandboxNetworkOpts(allow_out=[.2], deny_out=["0.0.0.0/0"]),
    // created with wait_ready=False and waited on.
    let mut fenced = Sandbox::create(
        &config,
        &small("base")
            .network(
                SandboxNetworkOpts::new()
                    .allow_out(&two)
                    .deny_out("0.0.0.0/0"),
            )
            .wait_ready(false),
    )
    .await
    .unwrap();
    // Seed 004: fields=["id", "status"] gives exactly those names.
    let compact = Sandbox::get_info_by_id_fields(&config, fenced.id(), &["id", "status"])
        .await
        .unwrap();
    assert_eq!(compact.keys().collect::<Vec<_>>(), ["id", "status"]);
    assert_eq!(compact["id"], json!(fenced.id()));
    assert!(
        matches!(compact["status"].as_str(), Some("starting" | "running")),
        "{compact:?}"
    );
    let err = fenced.wait_ready(Duration::ZERO).await.unwrap_err();
    assert_eq!(err.code(), Some("timeout"), "{err}");
    fenced.wait_ready(Duration::from_secs(180)).await.unwrap();
    assert!(
        fenced.runtime().is_some(),
        "wait_ready takes the runtime access"
    );
    let reached = curl(&fenced, &url(&two)).await;
    assert!(reached.starts_with(&format!("who:{two}")), "{reached}");
    assert_eq!(
        curl(&fenced, &url(&three)).await,
        "FAIL",
        "deny_out 0.0.0.0/0"
    );
    assert!(fenced.kill().await.unwrap());

    // Seed 001: network=SandboxNetworkOpts(deny_out=[.3]), through the blocking API.
    let blocking_config = config.clone();
    let (b_two, b_three) = (two.clone(), three.clone());
    tokio::task::spawn_blocking(move || {
        let sbx = blocking::Sandbox::create(
            &blocking_config,
            &small("base").network(SandboxNetworkOpts::new().deny_out(&b_three)),
        )
        .unwrap();
        let fetch = |addr: &str| {
            sbx.run(&format!("curl -s -m 5 http://{addr}:8080/ || echo FAIL"))
                .unwrap()
                .stdout
                .trim()
                .to_string()
        };
        let reached = fetch(&b_two);
        assert!(reached.starts_with(&format!("who:{b_two}")), "{reached}");
        assert_eq!(fetch(&b_three), "FAIL", "deny_out .3");
        assert!(sbx.kill().unwrap());
    })
    .await
    .unwrap();

    // fields on list: compact dictionaries, exactly the names asked for.
    let page = Sandbox::list_fields(
        &config,
        &ListQuery {
            metadata: [("suite".to_string(), "seeds".to_string())].into(),
            ..ListQuery::default()
        },
        &["id", "status"],
    )
    .await
    .unwrap();
    assert_eq!(
        page.sandboxes,
        [json!({ "id": offline.id(), "status": "running" })
            .as_object()
            .unwrap()
            .clone()]
    );
    let err = Sandbox::list_fields(&config, &ListQuery::default(), &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    // View names work too: the offline sandbox's egress is the closed policy.
    let egress = Sandbox::get_info_by_id_fields(&config, offline.id(), &["egress"])
        .await
        .unwrap();
    assert_eq!(
        egress["egress"],
        json!({ "internet": false, "allow": [], "deny": [] })
    );

    // Seed 004: getHost.
    let host = offline.get_host(8080).await.unwrap();
    assert!(
        host.starts_with(&format!("8080-{}.", offline.id())),
        "{host}"
    );

    // Seed 001: get_metrics(start, end) with datetimes, and its default range.
    let deadline = Instant::now() + Duration::from_secs(60);
    while offline.get_metrics(None, None).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no metrics sample in 60 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let now = SystemTime::now();
    let window = offline
        .get_metrics(Some(started.into()), Some(now.into()))
        .await
        .unwrap();
    assert!(!window.is_empty());
    let from = MetricsTime::from(started).to_system_time();
    for m in &window {
        assert!(m.time() >= from && m.time() <= now, "{m:?}");
    }
    let by_seconds = offline
        .get_metrics(Some(MetricsTime::from(started).unix_seconds().into()), None)
        .await
        .unwrap();
    assert!(by_seconds.len() >= window.len());

    // Seed 001: snapshot() → Snapshot; restore() and delete().
    offline
        .files()
        .write("/workspace/seed.txt", "v1")
        .await
        .unwrap();
    let snap = offline.snapshot().await.unwrap();
    assert_eq!(
        (snap.kind.as_str(), snap.sandbox_id.as_str(), snap.id()),
        ("manual", offline.id(), snap.info.snapshot_id.as_str())
    );
    assert!(snap.size > 0);
    assert!(
        snap.created >= from && snap.created <= SystemTime::now() + Duration::from_secs(1),
        "{snap:?}"
    );
    assert!(offline.kill().await.unwrap());
    let restored = snap.restore(&RestoreOptions::default()).await.unwrap();
    assert_eq!(
        restored
            .files()
            .read_to_string("/workspace/seed.txt")
            .await
            .unwrap(),
        "v1"
    );
    assert!(restored.kill().await.unwrap());
    snap.delete().await.unwrap();
    assert!(!Sandbox::list_snapshots_of(&config, &snap.sandbox_id)
        .await
        .unwrap()
        .iter()
        .any(|s| s.snapshot_id == snap.snapshot_id));
}
