//! Cleartext HTTP interception, in process: a guest's `http://` requests, their first
//! bytes sniffed for the Host and replayed as the egress proxy does, through
//! `intercept_plain` to a cleartext origin.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use intercept::Target;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The interceptor serving cleartext, to a cleartext origin.
async fn plain_setup(policy: &str) -> (Origin, Harness) {
    let origin = plain_origin().await;
    let h = harness_in(Mode::Plain, &origin, None, policy).await;
    (origin, h)
}

/// Sends requests on one cleartext guest connection.
async fn plain_guest(h: &Harness, reqs: Vec<Request<Full<Bytes>>>) -> Vec<Answer> {
    guest_h1(TcpStream::connect(h.proxy).await.unwrap(), reqs).await
}

#[tokio::test]
async fn cleartext_requests_are_inspected_redacted_and_audited() {
    let (origin, mut h) = plain_setup(
        r#"{"pii":{"detectors":{"card":"redact"}},"injectionDefense":{"action":"flag"}}"#,
    )
    .await;
    let body = r#"{"card":"4111 1111 1111 1111"}"#;
    let a = plain_guest(
        &h,
        vec![
            get("/hello?x=1"),
            post("/echo", "application/json", body),
            get("/page"),
        ],
    )
    .await;
    assert_eq!(
        (a[0].status, a[0].body.as_str()),
        (StatusCode::OK, "hello from origin")
    );
    // The origin saw the card redacted.
    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].path, "/hello?x=1");
    assert_eq!(seen[0].headers["host"], "origin.test");
    assert_eq!(seen[1].body, br#"{"card":"[REDACTED:card]"}"#);
    // Injection defense applies in cleartext too.
    assert!(a[2].headers["x-nullspace-injection"]
        .to_str()
        .unwrap()
        .contains("hidden-html"));
    // Cleartext upstream, to the guest's destination (one connection for all three).
    assert_eq!(h.targets(), [Target::Addr(PLAIN_DEST.parse().unwrap())]);
    let r = h.audit(3).await;
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.host == "origin.test" && r.status == 200));
    assert_eq!(
        (r[0].path.as_str(), r[0].action.as_str()),
        ("/hello?x=1", "allowed")
    );
    assert_eq!(r[1].action, "modified");
    assert_eq!(
        (
            r[1].detections[0].kind.as_str(),
            r[1].detections[0].location.as_str(),
            r[1].detections[0].action.as_str()
        ),
        ("card", "requestBody", "redact")
    );
    assert_eq!(r[1].bytes_out, r#"{"card":"[REDACTED:card]"}"#.len() as u64);
    let st = tokio::time::timeout(Duration::from_secs(10), h.stats.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(st.requests, 3);
}

#[tokio::test]
async fn cleartext_never_carries_a_real_secret() {
    // The origin's host IS one of the secret's: over TLS the value would go in.
    let policy = format!(
        r#"{{"envMasking":{{"secrets":[{{"name":"OPENAI_KEY","placeholder":"{PLACEHOLDER}","hosts":["origin.test"]}}]}}}}"#
    );
    let (origin, h) = plain_setup(&policy).await;
    let mut req = get("/whoami");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    let a = plain_guest(
        &h,
        vec![
            req,
            post("/echo", "text/plain", format!("key={PLACEHOLDER}")),
            get("/leak"),
        ],
    )
    .await;
    let seen = origin.seen();
    // The placeholder arrived as it was, in the header and the body.
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {PLACEHOLDER}").as_str()
    );
    assert_eq!(seen[1].body, format!("key={PLACEHOLDER}").as_bytes());
    for s in &seen {
        assert!(!format!("{:?}{}", s.headers, String::from_utf8_lossy(&s.body)).contains(SECRET));
    }
    assert_eq!(a[1].body, format!("key={PLACEHOLDER}"));
    // A real value the origin sends is still masked on the way back.
    assert_eq!(a[2].body, format!("your key is {PLACEHOLDER}"));
    assert_eq!(a[2].headers["x-leak"], PLACEHOLDER);

    let r = h.audit(3).await;
    let d = |i: usize| -> Vec<(String, String, String)> {
        r[i].detections
            .iter()
            .map(|d| (d.kind.clone(), d.location.clone(), d.action.clone()))
            .collect()
    };
    let t = |k: &str, l: &str, a: &str| (k.to_string(), l.to_string(), a.to_string());
    assert_eq!(
        d(0),
        [
            t("secret:OPENAI_KEY", "requestHeader:authorization", "kept"),
            t("cleartext", "requestHeader:authorization", "kept"),
        ]
    );
    assert_eq!(r[0].action, "allowed");
    assert_eq!(
        d(1),
        [
            t("secret:OPENAI_KEY", "requestBody", "kept"),
            t("cleartext", "requestBody", "kept"),
        ]
    );
    assert!(d(2).contains(&t("secret:OPENAI_KEY", "responseBody", "masked")));
    assert!(d(2).contains(&t("secret:OPENAI_KEY", "responseHeader:x-leak", "masked")));
    assert_eq!(r[2].action, "modified");
    assert!(!serde_json::to_string(&r).unwrap().contains(SECRET));
}

#[tokio::test]
async fn cleartext_a_host_other_than_the_sniffed_one_is_misdirected() {
    let (origin, h) = plain_setup("{}").await;
    // The egress proxy sniffed origin.test from the first request; a later one on the
    // same connection names another host.
    let other = Request::get("/x")
        .header("host", "elsewhere.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let absolute = Request::get("http://elsewhere.test/y")
        .header("host", "origin.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = plain_guest(&h, vec![get("/first"), other, absolute, get("/last")]).await;
    assert_eq!(
        a.iter().map(|a| a.status.as_u16()).collect::<Vec<_>>(),
        [200, 421, 421, 200]
    );
    assert_eq!(a[1].json()["error"], "misdirected_request");
    assert_eq!(
        origin
            .seen()
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        ["/first", "/last"]
    );
    let r = h.audit(4).await;
    assert_eq!((r[1].status, r[1].action.as_str()), (421, "blocked"));
}

#[tokio::test]
async fn cleartext_transforms_rewrite_the_upstream_in_cleartext() {
    let (origin, h) = plain_setup(
        r#"{"transforms":[{"host":"origin.test","requestHeaders":{"set":{"x-team":"t1"}},"upstreamHost":"eu.origin.test"}]}"#,
    )
    .await;
    let a = plain_guest(&h, vec![get("/hello")]).await;
    assert_eq!(a[0].status, StatusCode::OK);
    let seen = origin.seen();
    assert_eq!(seen[0].headers["x-team"], "t1");
    assert_eq!(seen[0].headers["host"], "eu.origin.test");
    // The destination's port (80), in cleartext: the origin here speaks no TLS.
    assert_eq!(h.targets(), [Target::Host("eu.origin.test".into(), 80)]);
}

#[tokio::test]
async fn cleartext_http2_is_not_served() {
    let (origin, mut h) = plain_setup("{}").await;
    // Prior knowledge: the HTTP/2 preface. The connection is closed, the interception
    // says why, and nothing reaches the origin.
    let mut c = TcpStream::connect(h.proxy).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest)).await;
    let e = tokio::time::timeout(Duration::from_secs(10), h.stats.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.contains("HTTP2 preface"), "{e}");
    // An upgrade to h2c: not relayed (spliced, HTTP/2 would escape the policy); the
    // request is served as HTTP/1.1.
    let mut req = get("/hello");
    for (k, v) in [
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQAAP__"),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let a = plain_guest(&h, vec![req]).await;
    assert_eq!(
        (a[0].status, a[0].body.as_str()),
        (StatusCode::OK, "hello from origin")
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    for gone in ["upgrade", "http2-settings"] {
        assert!(!seen[0].headers.contains_key(gone), "{gone}");
    }
}
