//! Live migration between two hosts on one PostgreSQL catalog (loopback): a running
//! sandbox moves while its processes run on, through the operator's API and through a
//! live drain; what the API refuses, it refuses with what to send instead.

use futures::SinkExt;
use nullspace_tests::http::{
    create_on, owner_of, read_ws_until, try_websocket_answered, websocket_when_ready, Api, Runtime,
    Ws,
};
use nullspace_tests::postgres::{pool_manager, server, FreshDatabase};
use nullspace_tests::Daemon;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The preview domain the hosts share (a wildcard DNS name over every host).
const PREVIEW_DOMAIN: &str = "preview.nullspace.test";

/// A WebSocket server for `busybox nc -ll -e`, one connection per run: the handshake,
/// then a text frame `tick N` every 200 ms until the client goes.
const WS_SERVER: &str = r#"key=
while IFS= read -r line; do
    line=$(printf '%s' "$line" | tr -d '\r')
    [ -z "$line" ] && break
    case "$line" in
        [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=$(printf '%s' "${line#*:}" | tr -d ' ') ;;
    esac
done
acc=$(printf '%s' "${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11" | sha1sum | cut -c1-40 | xxd -r -p | base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$acc"
i=0
while :; do
    i=$((i+1))
    m="tick $i"
    printf "\\x81\\x$(printf %02x ${#m})%s" "$m"
    sleep 0.2
done
"#;

/// Whether `m` is terminal output containing `text`.
fn said(m: &Message, text: &str) -> bool {
    matches!(m, Message::Binary(b) if String::from_utf8_lossy(b).contains(text))
}

/// Whether `m` is one of [`WS_SERVER`]'s ticks.
fn is_tick(m: Message) -> bool {
    matches!(m, Message::Text(t) if t.starts_with("tick "))
}

/// Waits (up to 60 s) until the server side ends `ws`: a close, an error or its end.
async fn ws_ends(ws: &mut Ws) {
    use futures::StreamExt;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the WebSocket to the moved sandbox's old VM hung"
    );
}

fn tiny() -> Value {
    json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 })
}

/// The counter's lines `n` as numbers, checked to be 1, 2, 3... with none lost or
/// repeated.
fn counted(text: &str) -> u64 {
    let mut last = 0;
    for line in text.lines() {
        let n: u64 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{line:?} in {text}"));
        assert_eq!(n, last + 1, "the count skipped or restarted: {text}");
        last = n;
    }
    last
}

/// Waits until the counter's file counts past `n` (within 30 s); returns its count.
async fn count_past(rt: &Runtime, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = match rt.read_file("/workspace/count").await {
            Some(text) => counted(&String::from_utf8(text).unwrap()),
            None => 0,
        };
        if now > n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the count stopped at {now}, not past {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a process counting every 10 ms into `/workspace/count` (its own session, so
/// that it outlives the command); returns its PID.
async fn start_counter(rt: &Runtime) -> String {
    let (pid, err, code) = rt
        .run("setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /workspace/count; sleep 0.01; done' </dev/null >/dev/null 2>&1 & echo $!")
        .await;
    assert_eq!(code, 0, "{err}");
    pid.trim().to_string()
}

/// Runs `cmd` as root in the sandbox (dropping the page cache needs it); (stdout,
/// stderr, exit code).
async fn as_root(rt: &Runtime, cmd: &str) -> (String, String, i64) {
    let resp = rt
        .post("/commands", json!({ "cmd": cmd, "user": "root" }))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (mut out, mut err, mut code) = (String::new(), String::new(), -1);
    for line in resp.text().await.unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        match v["event"].as_str() {
            Some("stdout") => out.push_str(v["data"].as_str().unwrap()),
            Some("stderr") => err.push_str(v["data"].as_str().unwrap()),
            Some("exit") => code = v["exitCode"].as_i64().unwrap_or(-1),
            _ => {}
        }
    }
    (out, err, code)
}

/// `POST /v1/sandboxes/{id}/connect` through `api`, sent again (for up to 10 s) while
/// the answer is 503 `owner_moved`, as clients are told to: a host that still believed
/// itself on the way to the old owner. (status, body).
async fn connect(api: &Api, id: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
            .await;
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The event types of sandbox `id`, oldest first.
async fn event_types(api: &Api, id: &str) -> Vec<(String, Value)> {
    let (_, log) = api
        .fetch(&format!("/v1/sandboxes/{id}/events?limit=1000"))
        .await;
    log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_string(), e["data"].clone()))
        .collect()
}

/// Two pool managers on a fresh catalog and one snapshot store (A's local one, which
/// B is given: one directory on one machine), each offering 4 vCPUs (the drain test
/// puts three 1-vCPU sandboxes on B), a team key and an operator key (both
/// through host `a`); `None` (the test skipped) without PostgreSQL.
struct TwoHosts {
    /// Dropped last: the database goes with the test.
    _db: FreshDatabase,
    url: String,
    /// The hosts' shared `--store-dir` (in A's state: it goes with A).
    store: String,
    a: Daemon,
    b: Daemon,
    via_a: Api,
    operator: Api,
}

async fn two_hosts(name: &str, a_id: &str, b_id: &str) -> Option<TwoHosts> {
    let server = match server() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    let db = FreshDatabase::create(&server, name).await;
    let url = db.url.clone();
    pool_manager(&["migrate", "--catalog", &url]).unwrap();
    let a = Daemon::start_with(
        &format!("{name}-a"),
        &[
            "--catalog",
            &url,
            "--host-id",
            a_id,
            "--preview-domain",
            PREVIEW_DOMAIN,
            "--capacity-vcpus",
            "4",
        ],
        &[],
    );
    let store = a.state_dir().join("objects").display().to_string();
    let b = Daemon::start_with(
        &format!("{name}-b"),
        &[
            "--catalog",
            &url,
            "--host-id",
            b_id,
            "--preview-domain",
            PREVIEW_DOMAIN,
            "--store-dir",
            &store,
            "--capacity-vcpus",
            "4",
        ],
        &[],
    );
    a.admin(&["team", "create", "acme", "--catalog", &url]);
    let key = a.admin(&["key", "create", "--team", "acme", "--catalog", &url]);
    let via_a = Api::new(&a, key);
    let operator = Api::new(
        &a,
        a.admin(&["key", "create", "--operator", "--catalog", &url]),
    );
    Some(TwoHosts {
        _db: db,
        url,
        store,
        a,
        b,
        via_a,
        operator,
    })
}

#[tokio::test]
async fn a_running_sandbox_migrates_live_with_its_processes_and_a_live_drain_moves_the_rest() {
    let Some(TwoHosts {
        _db,
        url,
        store,
        a,
        b,
        via_a,
        operator,
    }) = two_hosts("migrate", "host-a", "host-b").await
    else {
        return;
    };
    let mut hosts = vec![("host-a", a.edge.clone()), ("host-b", b.edge.clone())];

    // A sandbox on host A, with a volume mounted read-write and one read-only.
    let mut volumes = Vec::new();
    for name in ["work", "ref"] {
        let (status, v) = via_a
            .post("/v1/volumes", json!({ "name": name, "sizeMiB": 16 }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        volumes.push(v["volumeID"].as_str().unwrap().to_string());
    }
    let mounts = json!({
        "/mnt/work": { "id": volumes[0], "type": "rw" },
        "/mnt/ref": { "id": volumes[1], "type": "ro" },
    });
    let sbx = create_on(
        &via_a,
        "host-a",
        &hosts,
        json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600, "mounts": mounts }),
    )
    .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let migrate = format!("/v1/sandboxes/{id}/migrate");

    // What is refused: a team key, a bad host, the host it is on, an unknown host.
    let (status, v) = via_a.post(&migrate, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap().contains("operator"), "{v}");
    let (status, v) = operator.post(&migrate, json!({ "host": "a b" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = operator.post(&migrate, json!({ "hosts": "host-b" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = operator.post(&migrate, json!({ "host": "host-a" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("another host"),
        "{v}"
    );
    let (status, v) = operator.post(&migrate, json!({ "host": "host-z" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // A file, 16 MiB of random data on the disk (not in the page cache: the disk must
    // move, not only RAM), a process counting every 10 ms, and a background command
    // with output still to come.
    let rt = Runtime::of(&sbx);
    rt.put_file("/workspace/kept.txt", b"written on A").await;
    let (sum, err, code) = as_root(
        &rt,"head -c 16777216 /dev/urandom > /workspace/big && sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum /workspace/big")
        .await;
    assert_eq!(code, 0, "{err}");
    let counter = start_counter(&rt).await;
    let started = rt
        .post(
            "/commands",
            json!({ "cmd": "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line$i; sleep 1; done", "background": true }),
        )
        .await;
    assert_eq!(started.status(), StatusCode::CREATED);
    let command = started.json::<Value>().await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    let before = count_past(&rt, 0).await;
    // 8 MiB of random data on the read-write volume.
    let (_, err, code) =
        as_root(&rt, "head -c 8388608 /dev/urandom > /mnt/work/blob && sync").await;
    assert_eq!(code, 0, "{err}");
    let on_volumes = volume_sums(&rt).await;
    // A terminal through A's edge: a loop answering each line it reads.
    let auth = format!("Bearer {}", rt.token);
    let (mut pty, answer) = tokio::time::timeout(
        Duration::from_secs(30),
        try_websocket_answered(
            &format!(
                "{}/v1/sandboxes/{id}/pty?cmd=while%20read%20l%3B%20do%20echo%20got-%24l%3B%20done",
                a.edge
            ),
            &[("authorization", &auth)],
        ),
    )
    .await
    .expect("the terminal opens within 30 s")
    .expect("the terminal opens");
    let pty_pid = answer["x-nullspace-pty-pid"].to_str().unwrap().to_string();
    pty.send(Message::Binary(b"one\n".to_vec().into()))
        .await
        .unwrap();
    read_ws_until(&mut pty, |m| said(&m, "got-one")).await;

    // Migrate to B, asked through A (which owns it).
    let (status, report) = operator.post(&migrate, json!({ "host": "host-b" })).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (
            report["sandboxId"].as_str(),
            report["from"].as_str(),
            report["to"].as_str()
        ),
        (Some(id.as_str()), Some("host-a"), Some("host-b")),
        "{report}"
    );
    // The guest's used RAM went (its page cache, the processes; zero pages go as
    // flags), and the 16 MiB file written to the overlay.
    assert!(report["ramBytes"].as_u64().unwrap() > 16 << 20, "{report}");
    // Pre-copy converged well before the default switch to post-copy.
    assert_eq!(report["postcopy"], false, "{report}");
    // The overlay's 16 MiB and the volume's 8.
    assert!(
        report["diskBytes"].as_u64().unwrap() >= 24 << 20,
        "{report}"
    );
    eprintln!("migration: {report}");

    // It runs on B now: same ID, its file, its processes, still counting.
    let (status, moved) = connect(&via_a, &id).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(owner_of(&moved, &hosts), "host-b", "{moved}");
    assert_eq!(moved["state"], "running", "{moved}");
    let rt = Runtime::of(&moved);
    assert_eq!(
        rt.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"written on A"[..])
    );
    let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
    assert_eq!(alive, 0, "the counter started on A runs on B");
    count_past(&rt, before + 10).await;
    // The big file, read from B's disk (its page cache dropped first).
    let (moved_sum, err, code) = as_root(
        &rt,
        "echo 3 > /proc/sys/vm/drop_caches && sha256sum /workspace/big",
    )
    .await;
    assert_eq!((code, moved_sum.as_str()), (0, sum.as_str()), "{err}");
    // Both volumes came whole, still mounted; the read-write one takes writes on B.
    assert_eq!(volume_sums(&rt).await, on_volumes);
    let (_, err, code) = as_root(&rt, "echo written-on-b > /mnt/work/after && sync").await;
    assert_eq!(code, 0, "{err}");
    // The terminal's socket ended with A's VM; the same terminal attaches again (its
    // loop still reading) through A's edge, which forwards to B.
    ws_ends(&mut pty).await;
    // (The connect above handed out a new runtime token, ending the one before.)
    let auth = format!("Bearer {}", rt.token);
    let mut pty = websocket_when_ready(
        &format!("{}/v1/sandboxes/{id}/pty?pid={pty_pid}", a.edge),
        &[("authorization", &auth)],
    )
    .await;
    pty.send(Message::Binary(b"two\n".to_vec().into()))
        .await
        .unwrap();
    read_ws_until(&mut pty, |m| said(&m, "got-two")).await;
    // Not with a command of its own; not a terminal that is not there.
    for (query, code) in [
        (format!("pid={pty_pid}&cmd=sh"), "400"),
        ("pid=999999".to_string(), "404"),
    ] {
        let refused = try_websocket_answered(
            &format!("{}/v1/sandboxes/{id}/pty?{query}", a.edge),
            &[("authorization", &auth)],
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("?{query} opened a terminal"));
        assert!(refused.contains(code), "?{query}: {refused}");
    }
    drop(pty);
    // The command started on A delivers all its output, attached again on B.
    let attached = rt.get(&format!("/commands/{command}")).await;
    assert_eq!(attached.status(), StatusCode::OK);
    let text = attached.text().await.unwrap();
    let (mut out, mut exit) = (String::new(), None);
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        match e["event"].as_str() {
            Some("stdout") => out.push_str(e["data"].as_str().unwrap()),
            Some("exit") => exit = e["exitCode"].as_i64(),
            _ => {}
        }
    }
    let want: String = (1..=12).map(|i| format!("line{i}\n")).collect();
    assert_eq!(out, want, "{text}");
    assert_eq!(exit, Some(0), "{text}");
    // A has no VM left for it; B runs exactly one.
    assert!(
        nullspace_tests::qemus_in(a.run_dir()).is_empty(),
        "a QEMU stayed on A"
    );
    assert_eq!(nullspace_tests::qemus_in(b.run_dir()).len(), 1);
    // The events say it moved, with the downtime.
    let events = event_types(&via_a, &id).await;
    let migrating = events.iter().position(|(t, _)| t == "sandbox.migrating");
    let migrated = events.iter().position(|(t, _)| t == "sandbox.migrated");
    assert!(
        matches!((migrating, migrated), (Some(x), Some(y)) if x < y),
        "{events:?}"
    );
    let (_, data) = &events[migrated.unwrap()];
    assert_eq!(
        (data["from"].as_str(), data["to"].as_str()),
        (Some("host-a"), Some("host-b")),
        "{data}"
    );
    assert!(data["downtimeMs"].is_u64(), "{data}");

    // A live drain of B with three sandboxes moves every one to A or to a third host,
    // C, without stopping them. (Placement puts a create on the emptier host, A: each
    // moves to B the way the first did.)
    let mut on_b = Vec::new();
    for _ in 0..2 {
        let sbx = via_a
            .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
            .await;
        let sid = sbx["sandboxID"].as_str().unwrap().to_string();
        if owner_of(&sbx, &hosts) == "host-a" {
            let (status, v) = operator
                .post(
                    &format!("/v1/sandboxes/{sid}/migrate"),
                    json!({ "host": "host-b" }),
                )
                .await;
            assert_eq!(
                (status, v["to"].as_str()),
                (StatusCode::OK, Some("host-b")),
                "{v}"
            );
        }
        let (_, sbx) = connect(&via_a, &sid).await;
        assert_eq!(owner_of(&sbx, &hosts), "host-b", "{sbx}");
        on_b.push((sid, Runtime::of(&sbx)));
    }
    let (second_id, rt2) = &on_b[0];
    let (third_id, rt3) = &on_b[1];
    let (pid2, _, _) = rt2
        .run("setsid sleep 3000 </dev/null >/dev/null 2>&1 & echo $!")
        .await;
    // A WebSocket server in the third (busybox only: a handshake, then "tick N" every
    // 200 ms), followed live through A's preview listener, which forwards to B.
    rt3.put_file("/workspace/ws.sh", WS_SERVER.as_bytes()).await;
    let (pid3, err, code) = rt3
        .run("setsid nc -ll -p 8000 -e sh /workspace/ws.sh </dev/null >/dev/null 2>&1 & echo $!")
        .await;
    assert_eq!(code, 0, "{err}");
    let (status, pv) = via_a
        .post(
            &format!("/v1/sandboxes/{third_id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pv}");
    let preview_host = format!("8000-{third_id}.{PREVIEW_DOMAIN}");
    let proxy_token = pv["proxyTarget"]["token"].as_str().unwrap().to_string();
    let ws_url = format!("{}/ws", a.preview_listener);
    let ws_headers = [
        ("host", preview_host.as_str()),
        ("x-nullspace-preview-proxy-token", proxy_token.as_str()),
    ];
    let mut live = websocket_when_ready(&ws_url, &ws_headers).await;
    read_ws_until(&mut live, is_tick).await;

    let c = joined(&a, &url, &store, "migrate-c", "host-c", &[]);
    hosts.push(("host-c", c.edge.clone()));
    let listed = a.admin(&[
        "host",
        "drain",
        "host-b",
        "--live",
        "--wait-s",
        "180",
        "--catalog",
        &url,
    ]);
    assert!(listed.contains(r#""state":"drained""#), "{listed}");
    let mut landed = Vec::new();
    for (sid, pid) in [
        (&id, counter.as_str()),
        (second_id, pid2.trim()),
        (third_id, pid3.trim()),
    ] {
        let (status, v) = connect(&via_a, sid).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if sid == &id {
            // Its volumes moved again, with what was written on B.
            let rt = Runtime::of(&v);
            assert_eq!(volume_sums(&rt).await, on_volumes);
            assert_eq!(
                rt.read_file("/mnt/work/after").await.as_deref(),
                Some(&b"written-on-b\n"[..])
            );
        }
        let owner = owner_of(&v, &hosts);
        assert!(owner == "host-a" || owner == "host-c", "{v}");
        landed.push(owner);
        let (_, _, alive) = Runtime::of(&v).run(&format!("kill -0 {pid}")).await;
        assert_eq!(alive, 0, "{sid}'s process survived the live drain");
        let events = event_types(&via_a, sid).await;
        assert!(
            !events.iter().any(|(t, _)| t == "sandbox.paused"),
            "a live drain paused {sid}: {events:?}"
        );
        // The drain's own move: from B to where it runs now, live.
        assert!(
            events
                .iter()
                .any(|(t, d)| t == "sandbox.migrated" && d["from"] == "host-b" && d["to"] == owner),
            "{events:?}"
        );
    }
    eprintln!("the live drain of host-b moved its sandboxes to {landed:?}");
    assert!(
        nullspace_tests::qemus_in(b.run_dir()).is_empty(),
        "a QEMU stayed on B"
    );
    // The preview's WebSocket ended with the VM it was tunnelled to (not left hanging);
    // the client connects again through the same URL and the new owner serves it.
    ws_ends(&mut live).await;
    let mut again = websocket_when_ready(&ws_url, &ws_headers).await;
    read_ws_until(&mut again, is_tick).await;
    drop(again);
    a.admin(&["host", "undrain", "host-b", "--catalog", &url]);

    // A destination killed (kill -9) once it has loaded the state, before the
    // switch-over: the sandbox runs on where it was, untouched, and says why.
    let (_, v) = connect(&via_a, &id).await;
    let was_on = owner_of(&v, &hosts);
    let d = joined(
        &a,
        &url,
        &store,
        "migrate-d",
        "host-d",
        &[("NULLSPACE_TEST_FAILPOINT", "migrate.loaded")],
    );
    let (status, v) = operator.post(&migrate, json!({ "host": "host-d" })).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{v}");
    assert!(
        // The destination died answering that it had loaded the state: the step
        // before the switch-over.
        v["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached")
            && v["message"].as_str().unwrap().contains("runs on here"),
        "{v}"
    );
    let (status, v) = connect(&via_a, &id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (owner_of(&v, &hosts), v["state"].as_str()),
        (was_on, Some("running")),
        "{v}"
    );
    let rt = Runtime::of(&v);
    let now = count_past(&rt, 0).await;
    count_past(&rt, now + 10).await;
    let types: Vec<String> = event_types(&via_a, &id)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let last_move = types.iter().rev().find(|t| t.starts_with("sandbox.migrat"));
    assert_eq!(
        last_move.map(String::as_str),
        Some("sandbox.migration_failed"),
        "{types:?}"
    );
    drop(d);

    // A sandbox that is not running does not migrate.
    let (status, v) = via_a
        .post(&format!("/v1/sandboxes/{second_id}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = operator
        .post(&format!("/v1/sandboxes/{second_id}/migrate"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("only a running sandbox"),
        "{v}"
    );

    for sid in [&id, second_id, third_id] {
        via_a.delete(sid).await;
    }
    for host in [&a, &c] {
        assert!(nullspace_tests::qemus_in(host.run_dir()).is_empty());
    }
    // The host it ended on saved the read-write volume (its write lock had moved with
    // it): a new sandbox reads what was written on A and on B.
    let reader = via_a
        .create(json!({
            "templateID": "minimal",
            "resources": tiny(),
            "mounts": { "/mnt/work": { "id": volumes[0], "type": "ro" } },
        }))
        .await;
    let rt = Runtime::of(&reader);
    let (sums, err, code) = as_root(&rt, "sha256sum /mnt/work/blob | cut -c1-64").await;
    assert_eq!(code, 0, "{err}");
    assert!(on_volumes.starts_with(&sums), "{sums} vs {on_volumes}");
    assert_eq!(
        rt.read_file("/mnt/work/after").await.as_deref(),
        Some(&b"written-on-b\n"[..])
    );
    via_a.delete(reader["sandboxID"].as_str().unwrap()).await;
}

/// The sha256 of the read-write volume's blob and of the whole read-only volume's
/// device, read from disk (the page cache dropped first).
async fn volume_sums(rt: &Runtime) -> String {
    let (sums, err, code) = as_root(
        rt,
        "echo 3 > /proc/sys/vm/drop_caches && sha256sum /mnt/work/blob | cut -c1-64 && sha256sum $(awk '$2==\"/mnt/ref\"{print $1}' /proc/mounts) | cut -c1-64",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(sums.lines().count(), 2, "{sums}");
    sums
}

/// Waits (up to `secs`) until sandbox `id`, read through `api`, passes `check`.
async fn until(
    api: &Api,
    id: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}")).await;
        if status == StatusCode::OK && check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {secs} s: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Another pool manager, `host`, on `url`'s catalog and `store` with `env` (a failpoint: it kills
/// itself, SIGKILL, there); returned once registered and ready (its heartbeat task
/// registers it after the daemon says it is up), as seen through `by`.
fn joined(
    by: &Daemon,
    url: &str,
    store: &str,
    name: &str,
    host: &str,
    env: &[(&str, &str)],
) -> Daemon {
    joined_with(by, url, store, name, host, &[], env)
}

/// [`joined`], with `extra` flags.
fn joined_with(
    by: &Daemon,
    url: &str,
    store: &str,
    name: &str,
    host: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let flags = [
        &[
            "--catalog",
            url,
            "--host-id",
            host,
            "--preview-domain",
            PREVIEW_DOMAIN,
            "--store-dir",
            store,
        ],
        extra,
    ]
    .concat();
    let c = Daemon::start_with(name, &flags, env);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = by.admin(&["host", "list", "--catalog", url]);
        if listed.lines().any(|l| {
            l.contains(&format!(r#""hostID":"{host}""#)) && l.contains(r#""state":"ready""#)
        }) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never registered: {listed}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_runs_the_guest_on_the_destination_and_a_source_lost_in_it_puts_the_sandbox_in_error(
) {
    let Some(TwoHosts {
        _db,
        url,
        store,
        a,
        b,
        via_a,
        operator,
    }) = two_hosts("postcopy", "pc-a", "pc-b").await
    else {
        return;
    };
    let mut hosts = vec![("pc-a", a.edge.clone()), ("pc-b", b.edge.clone())];
    let sbx = create_on(
        &via_a,
        "pc-a",
        &hosts,
        json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }),
    )
    .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let migrate = format!("/v1/sandboxes/{id}/migrate");

    // What is refused: a switch time with post-copy off, one past the copy's deadline.
    let (status, v) = operator
        .post(
            &migrate,
            json!({ "postcopy": false, "postcopyAfterMs": 10 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["details"]["field"], "postcopyAfterMs", "{v}");
    let (status, v) = operator
        .post(&migrate, json!({ "postcopyAfterMs": 999_999 }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("150000"), "{v}");

    // 32 MiB of random data in guest RAM only (a tmpfs), and a process counting every
    // 10 ms (it dirties memory all along).
    let rt = Runtime::of(&sbx);
    let (sum, err, code) = as_root(
        &rt,
        "mkdir -p /mnt/ram && mount -t tmpfs -o size=48m tmpfs /mnt/ram && head -c 33554432 /dev/urandom > /mnt/ram/blob && sha256sum /mnt/ram/blob",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let counter = start_counter(&rt).await;
    let before = count_past(&rt, 0).await;

    // Post-copy at once: the guest runs on B before its RAM has arrived.
    let (status, report) = operator
        .post(&migrate, json!({ "host": "pc-b", "postcopyAfterMs": 0 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["postcopy"], true, "{report}");
    assert_eq!(report["to"], "pc-b", "{report}");
    assert!(report["ramBytes"].as_u64().unwrap() > 32 << 20, "{report}");
    eprintln!("post-copy migration: {report}");
    let (status, moved) = connect(&via_a, &id).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(
        (moved["hostID"].as_str(), moved["state"].as_str()),
        (Some("pc-b"), Some("running")),
        "{moved}"
    );
    let rt = Runtime::of(&moved);
    let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
    assert_eq!(alive, 0, "the counter started on A runs on B");
    count_past(&rt, before + 10).await;
    let (moved_sum, err, code) = as_root(&rt, "sha256sum /mnt/ram/blob").await;
    assert_eq!((code, moved_sum.as_str()), (0, sum.as_str()), "{err}");
    let events = event_types(&via_a, &id).await;
    assert!(
        events
            .iter()
            .any(|(t, d)| t == "sandbox.migrated" && d["postcopy"] == true),
        "{events:?}"
    );
    assert!(
        nullspace_tests::qemus_in(a.run_dir()).is_empty(),
        "a QEMU stayed on A"
    );

    // A source killed (kill -9) in post-copy, after handing the sandbox over: the
    // guest's memory is split between the hosts, so the destination cannot run it on.
    // It says so: error, migration_failed; its VM ends. A is drained (it has no
    // sandbox left) so that the create lands on C, the emptier of the ready hosts.
    a.admin(&["host", "drain", "pc-a", "--catalog", &url]);
    let c = joined(
        &a,
        &url,
        &store,
        "postcopy-c",
        "pc-c",
        &[("NULLSPACE_TEST_FAILPOINT", "migrate.postcopy_handed")],
    );
    hosts.push(("pc-c", c.edge.clone()));
    let lost = create_on(
        &via_a,
        "pc-c",
        &hosts,
        json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }),
    )
    .await;
    let lost_id = lost["sandboxID"].as_str().unwrap().to_string();
    let (status, v) = operator
        .post(
            &format!("/v1/sandboxes/{lost_id}/migrate"),
            json!({ "host": "pc-b", "postcopyAfterMs": 0 }),
        )
        .await;
    assert!(!status.is_success(), "{status} {v}");
    let failed = until(&via_a, &lost_id, 60, "the lost post-copy in error", |v| {
        v["state"] == "error"
    })
    .await;
    assert_eq!(failed["diagnostic"]["code"], "migration_failed", "{failed}");
    assert!(
        failed["diagnostic"]["message"]
            .as_str()
            .unwrap()
            .contains("post-copy"),
        "{failed}"
    );
    // B keeps only the first sandbox's VM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nullspace_tests::qemus_in(b.run_dir()).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the lost guest's QEMU stayed on B"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(c);

    via_a.delete(&id).await;
    via_a.delete(&lost_id).await;
    assert!(nullspace_tests::qemus_in(b.run_dir()).is_empty());
}

/// Every host-to-host call of a migration, refused, reset or cut part way through a
/// fault proxy between the hosts (the destination advertises the proxy as its control
/// URL): each leaves the sandbox running where it was, untouched, its destination VM
/// ended; a `finish` lost after the switch-over is sent again and the move completes.
#[tokio::test]
async fn a_fault_on_any_call_between_the_hosts_leaves_the_sandbox_running_where_it_was() {
    use nullspace_tests::faults::{Fault, FaultProxy, PathFault};
    let Some(TwoHosts {
        _db,
        url,
        store,
        a,
        b,
        via_a,
        operator,
    }) = two_hosts("migfaults", "mf-a", "mf-b").await
    else {
        return;
    };
    // The proxy first: D is told its address, then the proxy is pointed at D.
    let proxy = FaultProxy::start("127.0.0.1:9");
    let d = joined_with(
        &a,
        &url,
        &store,
        "migfaults-d",
        "mf-d",
        &[
            "--advertise-control-url",
            &proxy.url(),
            "--capacity-vcpus",
            "1",
        ],
        &[],
    );
    proxy.set_upstream(&d.control);
    let hosts = vec![
        ("mf-a", a.edge.clone()),
        ("mf-b", b.edge.clone()),
        ("mf-d", d.edge.clone()),
    ];
    let (status, v) = via_a
        .post("/v1/volumes", json!({ "name": "faults", "sizeMiB": 16 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let volume = v["volumeID"].as_str().unwrap().to_string();
    // Wherever placement puts it, it is moved to A first (through the proxy if on D).
    let sbx = via_a
        .create(
            json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600,
                "mounts": { "/mnt/work": { "id": volume, "type": "rw" } } }),
        )
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let sbx = if owner_of(&sbx, &hosts) == "mf-a" {
        sbx
    } else {
        let (status, v) = operator
            .post(
                &format!("/v1/sandboxes/{id}/migrate"),
                json!({ "host": "mf-a" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let (_, sbx) = connect(&via_a, &id).await;
        sbx
    };
    assert_eq!(owner_of(&sbx, &hosts), "mf-a", "{sbx}");
    let rt = Runtime::of(&sbx);
    let (_, err, code) = as_root(
        &rt,
        "head -c 4194304 /dev/urandom > /mnt/work/blob && head -c 8388608 /dev/urandom > /workspace/big && sync",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let counter = start_counter(&rt).await;
    let migrate = format!("/v1/sandboxes/{id}/migrate");
    let path = |suffix: &str| -> &'static str {
        Box::leak(format!("/v1/internal/migrations/{id}{suffix}").into_boxed_str())
    };
    let cases = [
        ("the destination's VM refused", path(" "), PathFault::Refuse),
        (
            "the disk's stream cut",
            path("/disk "),
            PathFault::CutAfter(1 << 20),
        ),
        (
            "the volume's stream cut",
            path("/vol0 "),
            PathFault::CutAfter(256 << 10),
        ),
        (
            "the RAM stream cut",
            path("/ram "),
            PathFault::CutAfter(4 << 20),
        ),
        (
            "the loaded state's check reset",
            path("/received "),
            PathFault::Reset,
        ),
    ];
    for (what, path, fault) in cases {
        proxy.set(Fault::OnPath {
            path,
            times: 1,
            fault,
        });
        let picked = proxy.injected();
        let (status, v) = operator
            .post(&migrate, json!({ "host": "mf-d", "postcopy": false }))
            .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{what}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("runs on here"),
            "{what}: {v}"
        );
        assert_eq!(proxy.injected(), picked + 1, "{what}: the fault never hit");
        // Where it was, running, its counter counting; the last move event a failure.
        let (status, v) = connect(&via_a, &id).await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
        assert_eq!(
            (owner_of(&v, &hosts), v["state"].as_str()),
            ("mf-a", Some("running")),
            "{what}: {v}"
        );
        let rt = Runtime::of(&v);
        let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
        assert_eq!(alive, 0, "{what}: the counter died");
        let now = count_past(&rt, 0).await;
        count_past(&rt, now + 5).await;
        let types: Vec<String> = event_types(&via_a, &id)
            .await
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            types.iter().rev().find(|t| t.starts_with("sandbox.migrat")),
            Some(&"sandbox.migration_failed".to_string()),
            "{what}: {types:?}"
        );
        // The destination's VM and its volume images went (its abandon passed).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nullspace_tests::qemus_in(d.run_dir()).is_empty() {
            assert!(Instant::now() < deadline, "{what}: a QEMU stayed on D");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            !d.state_dir().join("volumes").join(&id).exists(),
            "{what}: D kept the volume images"
        );
    }

    // A move held up for seconds (the loaded-state check delayed 8 s): D asks A
    // meanwhile whether it still moves the sandbox, hears yes, keeps its VM, and the
    // move completes.
    proxy.set(Fault::OnPath {
        path: path("/received "),
        times: 1,
        fault: PathFault::Delay(Duration::from_secs(8)),
    });
    let picked = proxy.injected();
    let (status, report) = operator
        .post(&migrate, json!({ "host": "mf-d", "postcopy": false }))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(proxy.injected(), picked + 1, "the delay never hit");
    assert!(
        report["totalMs"].as_u64().unwrap() >= 8000,
        "the move was not held up: {report}"
    );
    let (status, report) = operator
        .post(&migrate, json!({ "host": "mf-a", "postcopy": false }))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    // The answer to the switch-over's last call lost once (D ran the sandbox): the
    // call is sent again, D says it runs, and the move completes.
    proxy.set(Fault::OnPath {
        path: path("/finish "),
        times: 1,
        fault: PathFault::LoseAnswer,
    });
    let picked = proxy.injected();
    let (status, report) = operator
        .post(&migrate, json!({ "host": "mf-d", "postcopy": false }))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        proxy.injected(),
        picked + 1,
        "the lost answer never happened"
    );
    let (_, v) = connect(&via_a, &id).await;
    assert_eq!(
        (owner_of(&v, &hosts), v["state"].as_str()),
        ("mf-d", Some("running")),
        "{v}"
    );
    let rt = Runtime::of(&v);
    let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
    assert_eq!(alive, 0, "the counter runs on D");
    let now = count_past(&rt, 0).await;
    count_past(&rt, now + 5).await;
    assert!(nullspace_tests::qemus_in(a.run_dir()).is_empty());
    assert!(
        !a.state_dir().join("volumes").join(&id).exists(),
        "A kept the moved sandbox's volume images"
    );
    // D offers one vCPU, which the sandbox has now: another is refused there, before
    // anything starts.
    let other = via_a
        .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
        .await;
    let other_id = other["sandboxID"].as_str().unwrap().to_string();
    assert_ne!(owner_of(&other, &hosts), "mf-d", "{other}");
    let (status, v) = operator
        .post(
            &format!("/v1/sandboxes/{other_id}/migrate"),
            json!({ "host": "mf-d" }),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("has no room"),
        "{v}"
    );
    // A fork child moves without the fork snapshot it ran from, which its old host
    // drops once no sandbox there runs from it (its parent is gone).
    let (status, forked) = via_a
        .post(
            &format!("/v1/sandboxes/{other_id}/fork"),
            json!({ "count": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let child = &forked["sandboxes"][0];
    let child_id = child["sandboxID"].as_str().unwrap().to_string();
    via_a.delete(&other_id).await;
    let (from, to) = match owner_of(child, &hosts) {
        "mf-a" => (&a, "mf-b"),
        _ => (&b, "mf-a"),
    };
    let forks = || {
        std::fs::read_dir(from.state_dir().join("forks"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(forks(), 1, "the fork snapshot on its host");
    let (status, v) = operator
        .post(
            &format!("/v1/sandboxes/{child_id}/migrate"),
            json!({ "host": to }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while forks() != 0 {
        assert!(
            Instant::now() < deadline,
            "the fork snapshot stayed on its old host"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = connect(&via_a, &child_id).await;
    let (_, _, code) = Runtime::of(&v).run("true").await;
    assert_eq!(code, 0, "the moved fork child runs");
    via_a.delete(&child_id).await;
    via_a.delete(&id).await;
    assert!(nullspace_tests::qemus_in(d.run_dir()).is_empty());
}

/// A source killed (kill -9) in the middle of a move, its disk mirrored and its RAM not
/// yet: restarted, it adopts the VM, which runs on as before with its processes; the
/// destination's VM ends; the next move (past the mirror job the dead host left in
/// QEMU) completes.
#[tokio::test]
async fn a_source_killed_mid_copy_runs_the_sandbox_on_after_its_restart_and_moves_it_later() {
    let Some(TwoHosts {
        _db,
        url,
        store,
        a,
        b,
        via_a,
        operator,
    }) = two_hosts("migkill", "mk-a", "mk-b").await
    else {
        return;
    };
    let mut e = joined(
        &a,
        &url,
        &store,
        "migkill-e",
        "mk-e",
        &[("NULLSPACE_TEST_FAILPOINT", "migrate.mirrored")],
    );
    let hosts = vec![
        ("mk-a", a.edge.clone()),
        ("mk-b", b.edge.clone()),
        ("mk-e", e.edge.clone()),
    ];
    let sbx = via_a
        .create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let migrate = format!("/v1/sandboxes/{id}/migrate");
    if owner_of(&sbx, &hosts) != "mk-e" {
        let (status, v) = operator.post(&migrate, json!({ "host": "mk-e" })).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let (_, sbx) = connect(&via_a, &id).await;
    assert_eq!(owner_of(&sbx, &hosts), "mk-e", "{sbx}");
    let rt = Runtime::of(&sbx);
    rt.put_file("/workspace/kept.txt", b"before the kill").await;
    let counter = start_counter(&rt).await;

    // E dies with its disk mirrored to A.
    let (status, v) = operator
        .post(&migrate, json!({ "host": "mk-a", "postcopy": false }))
        .await;
    assert!(!status.is_success(), "{status} {v}");
    assert_eq!(
        e.wait_for_exit(Duration::from_secs(60)),
        Some(libc::SIGKILL),
        "E did not die at migrate.mirrored"
    );
    let state = e.stop_with(libc::SIGKILL);
    std::mem::forget(e); // its state directory is the restarted daemon's
    let e = Daemon::start_in_with(
        state,
        &[
            "--catalog",
            &url,
            "--host-id",
            "mk-e",
            "--preview-domain",
            PREVIEW_DOMAIN,
            "--store-dir",
            &store,
        ],
    );
    let sbx = until(&via_a, &id, 60, "the sandbox running on E again", |v| {
        v["state"] == "running" && v["hostID"] == "mk-e"
    })
    .await;
    let (status, v) = connect(&via_a, &id).await;
    assert_eq!(status, StatusCode::OK, "{v} (was {sbx})");
    let rt = Runtime::of(&v);
    let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
    assert_eq!(alive, 0, "the counter survived its host's kill -9");
    let now = count_past(&rt, 0).await;
    count_past(&rt, now + 10).await;
    assert_eq!(
        rt.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"before the kill"[..])
    );
    // A's incoming VM ended (its streams broke with E).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nullspace_tests::qemus_in(a.run_dir()).is_empty() {
        assert!(Instant::now() < deadline, "the incoming QEMU stayed on A");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The next move goes through.
    let (status, report) = operator
        .post(&migrate, json!({ "host": "mk-a", "postcopy": false }))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, v) = connect(&via_a, &id).await;
    assert_eq!(owner_of(&v, &hosts), "mk-a", "{v}");
    let rt = Runtime::of(&v);
    let (_, _, alive) = rt.run(&format!("kill -0 {counter}")).await;
    assert_eq!(alive, 0, "the counter runs on A");
    assert!(nullspace_tests::qemus_in(e.run_dir()).is_empty());
    via_a.delete(&id).await;
}
