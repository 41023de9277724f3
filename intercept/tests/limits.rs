//! What a guest (or a server) can make a session hold, and for how long: the
//! inspection budget its connections share, the deadlines on each wait, the audit
//! record's size; and the egress gate's host check.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use intercept::{Limits, Session};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BUDGET: usize = 64 * 1024;

fn limits() -> Limits {
    Limits {
        inspect_budget: BUDGET,
        budget_wait: Duration::from_millis(200),
        ..Limits::default()
    }
}

/// An HTTPS origin and the TLS interceptor, its session made by `configure`.
async fn setup_with(policy: &str, configure: impl FnOnce(Session) -> Session) -> (Origin, Harness) {
    let origin_ca = test_ca("Test Origin CA");
    let (chain, key) = leaf(&origin_ca, &["origin.test"]);
    let origin = origin(chain, key).await;
    let h = harness_with(Mode::Tls, &origin, Some(&origin_ca), policy, configure).await;
    (origin, h)
}

/// A raw guest connection that has sent a POST's head and `sent` of its `len` bytes
/// of text body, and stays open.
async fn partial_post(
    h: &Harness,
    len: usize,
    sent: usize,
) -> impl AsyncReadExt + AsyncWriteExt + Unpin {
    let mut tls = guest_tls(h, "origin.test", H1).await;
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: origin.test\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b'a'; sent]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// Reads a response head off a raw connection: its status.
async fn read_status(io: &mut (impl AsyncReadExt + Unpin)) -> u16 {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut b))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before an answer");
        buf.extend_from_slice(&b[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened");
}

#[tokio::test]
async fn the_inspection_budget_is_shared_by_a_sessions_connections_and_given_back() {
    let (origin, h) = setup_with(r#"{"pii":{"detectors":{"card":"redact"}}}"#, |s| {
        s.with_limits(limits())
    })
    .await;
    assert_eq!(h.session.inspect_budget_free(), BUDGET);
    // One connection's body, half sent, holds its length of the budget while its
    // prefix is read.
    let len = 50_000;
    let mut first = partial_post(&h, len, 10_000).await;
    wait_until(|| h.session.inspect_budget_free() == BUDGET - len).await;

    // Another connection's body does not fit what is left: the policy redacts cards,
    // so it is refused rather than passed uninspected.
    let card = format!("card 4111 1111 1111 1111 {}", "b".repeat(30_000));
    let a = guest(&h, vec![post("/echo", "text/plain", card.clone())]).await;
    assert_eq!(a[0].status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a[0].json()["error"], "busy");
    assert_eq!(a[0].headers["retry-after"], "1");
    // A policy that only logs: passed, the audit saying it was not inspected.
    h.session
        .set_policy(compile(r#"{"pii":{"detectors":{"card":"log"}}}"#));
    let a = guest(&h, vec![post("/echo", "text/plain", card.clone())]).await;
    assert_eq!(a[0].status, StatusCode::OK);
    assert_eq!(a[0].body, card);

    // The first body ends: answered, and its share given back.
    first.write_all(&vec![b'a'; len - 10_000]).await.unwrap();
    assert_eq!(read_status(&mut first).await, 200);
    drop(first);
    wait_until(|| h.session.inspect_budget_free() == BUDGET).await;
    h.session
        .set_policy(compile(r#"{"pii":{"detectors":{"card":"redact"}}}"#));
    let a = guest(&h, vec![post("/echo", "text/plain", card)]).await;
    assert_eq!(a[0].status, StatusCode::OK);
    assert!(a[0].body.starts_with("card [REDACTED:card]"));
    assert_eq!(h.session.inspect_budget_free(), BUDGET);

    let r = h.audit(4).await;
    let by_status = |s: u16| r.iter().find(|r| r.status == s).unwrap();
    assert_eq!(by_status(503).action, "error");
    assert!(detections(by_status(503)).contains(&det("uninspected", "requestBody", "block")));
    assert!(r
        .iter()
        .any(|r| r.status == 200
            && detections(r).contains(&det("uninspected", "requestBody", "log"))));
    // The busy one never reached the origin.
    assert_eq!(origin.seen().len(), 3);
}

#[tokio::test]
async fn a_response_without_budget_passes_uninspected_and_says_so() {
    let (_origin, h) = setup_with(r#"{"injectionDefense":{"action":"block"}}"#, |s| {
        s.with_limits(Limits {
            inspect_budget: 0,
            ..limits()
        })
    })
    .await;
    // Its request went already: refusing would lose the answer.
    let a = guest(&h, vec![get("/page")]).await;
    assert_eq!(a[0].status, StatusCode::OK);
    assert_eq!(a[0].body, INJECTED_PAGE);
    let r = h.audit(1).await;
    assert!(detections(&r[0]).contains(&det("uninspected", "responseBody", "log")));
}

#[tokio::test]
async fn a_request_body_that_stalls_is_a_408() {
    let (origin, h) = setup_with(r#"{"pii":{"detectors":{"card":"redact"}}}"#, |s| {
        s.with_limits(Limits {
            body_idle: Duration::from_millis(300),
            ..limits()
        })
    })
    .await;
    let mut c = partial_post(&h, 1000, 10).await;
    assert_eq!(read_status(&mut c).await, 408);
    assert!(origin.seen().is_empty());
    let r = h.audit(1).await;
    assert_eq!((r[0].status, r[0].action.as_str()), (408, "error"));
    assert!(detections(&r[0]).contains(&det("timeout", "requestBody", "block")));
    wait_until(|| h.session.inspect_budget_free() == BUDGET).await;
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_is_a_504() {
    let (_origin, h) = setup_with(r#"{"injectionDefense":{"action":"flag"}}"#, |s| {
        s.with_limits(Limits {
            response_head: Duration::from_millis(300),
            response_idle: Duration::from_millis(300),
            // An unknown length needs a whole prefix's worth.
            ..Limits::default()
        })
    })
    .await;
    // No head in time; then a text body (inspected) that stalls mid-prefix.
    let a = guest(&h, vec![get("/slow"), get("/stall")]).await;
    assert_eq!(a[0].status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a[0].json()["error"], "upstream_timeout");
    assert_eq!(a[1].status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a[1].json()["error"], "upstream_timeout");
    let r = h.audit(2).await;
    assert!(detections(&r[0]).contains(&det("timeout", "response", "block")));
    assert!(detections(&r[1]).contains(&det("timeout", "responseBody", "block")));
}

#[tokio::test]
async fn a_slow_upload_is_not_cut_off_by_the_response_head_deadline() {
    // The head deadline counts from the request's last progress, not its start: a body
    // still flowing keeps it off.
    let (origin, h) = setup_with("{}", |s| {
        s.with_limits(Limits {
            response_head: Duration::from_millis(600),
            ..limits()
        })
    })
    .await;
    let mut c = partial_post(&h, 10, 1).await;
    // 1 s in all, a byte each 100 ms.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(b"a").await.unwrap();
        c.flush().await.unwrap();
    }
    assert_eq!(read_status(&mut c).await, 200);
    assert_eq!(origin.seen()[0].body, b"aaaaaaaaaa");
}

fn checked_by(
    allowed: Arc<AtomicBool>,
    asked: Arc<Mutex<Vec<String>>>,
) -> impl FnOnce(Session) -> Session {
    move |s| {
        s.with_host_check(Arc::new(move |host: &str| {
            asked.lock().unwrap().push(host.to_string());
            allowed.load(Ordering::SeqCst)
        }))
    }
}

#[tokio::test]
async fn a_server_name_the_gate_refuses_is_a_403_and_the_connection_closes() {
    let allowed = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (origin, mut h) = setup_with("{}", checked_by(allowed.clone(), asked.clone())).await;
    for alpn in [H1, H2] {
        let tls = guest_tls(&h, "origin.test", alpn).await;
        let req = Request::get("https://origin.test/x")
            .header("host", "origin.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = if alpn == H1 {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = req;
            *req.uri_mut() = "/x".parse().unwrap();
            Answer::read(send.send_request(req).await.unwrap()).await
        } else {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut req = req;
            req.headers_mut().remove("host");
            Answer::read(send.send_request(req).await.unwrap()).await
        };
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        let j = a.json();
        assert_eq!(
            (j["error"].as_str(), j["host"].as_str()),
            (Some("egress_refused"), Some("origin.test"))
        );
        // The connection is closed by the proxy.
        let ended = tokio::time::timeout(Duration::from_secs(10), h.stats.recv()).await;
        assert!(ended.is_ok(), "the connection stays open");
    }
    assert!(origin.seen().is_empty());
    assert!(h.targets().is_empty());
    assert_eq!(*asked.lock().unwrap(), ["origin.test", "origin.test"]);
    let r = h.audit(2).await;
    for r in &r {
        assert_eq!((r.status, r.action.as_str()), (403, "blocked"));
        assert!(detections(r).contains(&det("egress", "sni", "block")));
    }
    // Allowed: served as ever.
    allowed.store(true, Ordering::SeqCst);
    let a = guest(&h, vec![get("/hello")]).await;
    assert_eq!(a[0].body, "hello from origin");
}

#[tokio::test]
async fn a_guest_without_sni_is_not_asked_about() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (_origin, h) = setup_with(
        "{}",
        checked_by(Arc::new(AtomicBool::new(false)), asked.clone()),
    )
    .await;
    // An IP name: no SNI in the ClientHello (the gate judged the address).
    let tls = guest_tls(&h, "203.0.113.10", H1).await;
    drop(tls);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn cleartext_each_requests_host_is_checked() {
    let allowed = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let origin = plain_origin().await;
    let mut h = harness_with(
        Mode::Plain,
        &origin,
        None,
        "{}",
        checked_by(allowed.clone(), asked.clone()),
    )
    .await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(
        TcpStream::connect(h.proxy).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let a = Answer::read(send.send_request(get("/one")).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    // The gate changes its mind: the next request on the same connection is refused,
    // and the connection closed.
    allowed.store(false, Ordering::SeqCst);
    send.ready().await.unwrap();
    let a = Answer::read(send.send_request(get("/two")).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json()["error"], "egress_refused");
    assert_eq!(a.headers["connection"], "close");
    let ended = tokio::time::timeout(Duration::from_secs(10), h.stats.recv()).await;
    assert!(ended.is_ok(), "the connection stays open");
    assert_eq!(*asked.lock().unwrap(), ["origin.test", "origin.test"]);
    assert_eq!(origin.seen().len(), 1);
    let r = h.audit(2).await;
    assert_eq!((r[1].status, r[1].action.as_str()), (403, "blocked"));
    assert!(detections(&r[1]).contains(&det("egress", "host", "block")));
}

#[tokio::test]
async fn a_guest_cannot_inflate_its_audit_records() {
    // A long method, a long Host (the cleartext connection's name), a long header name
    // with an e-mail address in its value (a detection located by that name).
    let origin = plain_origin().await;
    let h = harness_in(
        Mode::Plain,
        &origin,
        None,
        r#"{"pii":{"detectors":{"email":"log"}}}"#,
    )
    .await;
    let host = format!("{}.test", "h".repeat(10_000));
    let name = format!("x-{}", "n".repeat(5_000));
    let req = Request::builder()
        .method(http::Method::from_bytes("M".repeat(1_000).as_bytes()).unwrap())
        .uri(format!("/{}", "p".repeat(4_000)))
        .header("host", host.as_str())
        .header(name.as_str(), "ann@example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    guest_h1(TcpStream::connect(h.proxy).await.unwrap(), vec![req]).await;
    let r = h.audit(1).await;
    let r = &r[0];
    assert!(
        r.method.len() <= 16 && r.method.ends_with("..."),
        "{}",
        r.method
    );
    assert!(r.host.len() <= 255 && r.host.starts_with("hhh"));
    assert!(r.path.len() <= 2048 && r.path.ends_with("..."));
    let d = &r.detections[0];
    assert_eq!(d.kind, "email");
    assert!(d.location.len() <= 128 && d.location.starts_with("requestHeader:x-nnn"));
    assert!(serde_json::to_vec(r).unwrap().len() < 4096);
}
