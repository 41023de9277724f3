//! A guest's output costs the host bounded memory, however much of it goes unread: many
//! stalled downloads of a file without end, and a command printing without end that
//! nobody reads, leave the daemon's resident memory under a fixed bound, and the
//! sandbox answers throughout.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::Daemon;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Stalled downloads started at once.
const DOWNLOADS: usize = 200;
/// How long they are held unread at least...
const HOLD: Duration = Duration::from_secs(20);
/// ...and until the daemon visibly holds this much of their output (so the guest pushed
/// past what sockets absorb; a slow TCG guest needs a while to get there)...
const BUFFERING_KIB: u64 = 192 * 1024;
/// ...and then this much longer, so buffering without a bound would show.
const HOLD_AFTER: Duration = Duration::from_secs(15);
/// The pass figure: the daemon's peak resident memory (VmHWM) stays under 1 GiB.
/// Measured on a 2-core TCG host: 410-520 MiB (27 MiB at rest): agent_client's bound
/// per VM (256 MiB of unread output) plus HTTP buffers (~0.5 MiB per stalled response)
/// and allocator slack. With that bound lifted (200 streams × 64 MiB could be 12.5 GiB)
/// the same run peaked at 2.5 GiB and failed here.
const RSS_BOUND_KIB: u64 = 1024 * 1024;

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Sends `request` on a connection with a tiny receive buffer (so what goes unread waits
/// in the daemon, not in the kernel) and reads only the response head: a stalled client.
/// `None` unless the answer is 200.
async fn stalled_get(addr: std::net::SocketAddr, request: &str) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.set_recv_buffer_size(4096).ok()?;
    let mut conn = socket.connect(addr).await.ok()?;
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    head.starts_with(b"HTTP/1.1 200").then_some(conn)
}

/// Samples the daemon's resident memory until `until`; returns the largest sample.
async fn watch_rss(pid: u32, until: Instant) -> u64 {
    let mut peak = 0;
    let mut samples = 0;
    while Instant::now() < until {
        let rss = status_kib(pid, "VmRSS:");
        peak = peak.max(rss);
        if samples % 20 == 0 {
            eprintln!("daemon RSS {} MiB", rss / 1024);
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    peak
}

#[tokio::test]
async fn unread_guest_output_costs_the_host_bounded_memory() {
    let daemon = Daemon::start("hostile-output");
    let pid = daemon.pid();
    let api = Api::new(&daemon, daemon.team_key("output"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    // A 100 GiB file that costs the guest no disk: reading it never ends in this test.
    let (_, err, code) = rt.run("truncate -s 100G /workspace/huge").await;
    assert_eq!(code, 0, "{err}");
    let before = status_kib(pid, "VmRSS:");

    // 200 downloads at once; each reads the response head, then nothing more.
    let started = Instant::now();
    let base = reqwest::Url::parse(&rt.base).unwrap();
    let addr = base.socket_addrs(|| None).unwrap()[0];
    let request = format!(
        "GET {}/files?path=/workspace/huge HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        base.path(),
        rt.token
    );
    let opened = futures::future::join_all((0..DOWNLOADS).map(|_| stalled_get(addr, &request)));
    let stalled: Vec<_> = tokio::time::timeout(Duration::from_secs(90), opened)
        .await
        .expect("200 downloads start within 90 s")
        .into_iter()
        .flatten()
        .collect();
    eprintln!(
        "{} of {DOWNLOADS} downloads started in {:.1} s",
        stalled.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        stalled.len() >= DOWNLOADS / 2,
        "only {} of {DOWNLOADS} downloads started",
        stalled.len()
    );
    let held = Instant::now();
    let deadline = held + Duration::from_secs(100);
    let mut peak = 0;
    loop {
        let rss = status_kib(pid, "VmRSS:");
        peak = peak.max(rss);
        if rss.saturating_sub(before) >= BUFFERING_KIB && held.elapsed() >= HOLD {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in 100 s the daemon never held {} MiB of the stalled output (RSS {} MiB): the guest pushed too little for this test to measure",
            BUFFERING_KIB / 1024,
            rss / 1024
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "the daemon holds stalled output after {:.1} s",
        held.elapsed().as_secs_f64()
    );
    let peak = peak.max(watch_rss(pid, Instant::now() + HOLD_AFTER).await);
    eprintln!(
        "stalled downloads: daemon RSS {} MiB before, {} MiB peak sampled",
        before / 1024,
        peak / 1024
    );
    // The sandbox answers while they are still held.
    let (out, err, code) = rt.run("echo alive").await;
    assert_eq!((out.trim(), code), ("alive", 0), "{err}");
    drop(stalled);

    // A command printing without end whose output nobody reads: cut off at the bound
    // per stream, which also ends it in the guest.
    let mut flood = rt
        .post("/commands", json!({ "cmd": "yes hostile-output-line" }))
        .await;
    assert_eq!(flood.status(), StatusCode::OK);
    let first = flood.chunk().await.unwrap().unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&first).contains("start"),
        "{first:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (out, _, _) = rt.run("ps | grep -c '[y]es hostile' || true").await;
        if out.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the unread command was never cut off"
        );
    }
    drop(flood);

    // The pass figure: the peak over the whole test, between samples included.
    let hwm = status_kib(pid, "VmHWM:");
    eprintln!("daemon peak RSS (VmHWM): {} MiB", hwm / 1024);
    assert!(
        hwm < RSS_BOUND_KIB,
        "the daemon's resident memory peaked at {} MiB (bound {} MiB)",
        hwm / 1024,
        RSS_BOUND_KIB / 1024
    );

    // With every stalled connection gone, the sandbox works as before: a command, and
    // a whole download that matches what the guest wrote.
    let (out, err, code) = rt
        .run("head -c 1048576 /dev/urandom > /workspace/check && sha256sum /workspace/check")
        .await;
    assert_eq!(code, 0, "{err}");
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        rt.get("/files?path=/workspace/check"),
    )
    .await
    .expect("a download within 60 s");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(60), resp.bytes())
        .await
        .expect("a 1 MiB body within 60 s")
        .unwrap();
    assert_eq!(body.len(), 1 << 20);
    assert_eq!(
        out.split_whitespace().next(),
        Some(nullspace_tests::sha256_hex(&body).as_str())
    );
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}
