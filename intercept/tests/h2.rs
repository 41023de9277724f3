//! HTTP/2 from the guest, in process: a guest client negotiating `h2` with the
//! interceptor, whose requests reach an HTTPS origin speaking only HTTP/1.1.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use intercept::{Stats, Target, MAX_UPSTREAM_CONNECTIONS};
use std::time::Duration;

/// An HTTP/2 connection through the proxy to `origin.test` (the sender clones, one per
/// concurrent stream).
async fn h2_guest(h: &Harness) -> SendRequest<Full<Bytes>> {
    let tls = guest_tls(h, "origin.test", H2).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

async fn send(s: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Answer {
    s.ready().await.unwrap();
    Answer::read(s.send_request(req).await.unwrap()).await
}

/// A request with an absolute URI: its authority becomes `:authority`.
fn h2_req(method: &str, uri: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The connection's stats, once the guest has closed it.
async fn stats(h: &mut Harness) -> Stats {
    tokio::time::timeout(Duration::from_secs(10), h.stats.recv())
        .await
        .expect("the interception ends when the guest closes")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn h2_get_and_post_reach_an_http1_origin_and_are_audited() {
    let (origin, mut h) = setup(r#"{"pii":{"detectors":{"card":"redact"}}}"#).await;
    let mut s = h2_guest(&h).await;

    let mut req = h2_req("GET", "https://origin.test/hello?x=1", "");
    // HTTP/2 clients may split cookies into fields; HTTP/1.1 has them in one.
    req.headers_mut().append("cookie", "a=1".parse().unwrap());
    req.headers_mut().append("cookie", "b=2".parse().unwrap());
    let a = send(&mut s, req).await;
    assert_eq!((a.status, a.version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(a.body, "hello from origin");
    assert_eq!(a.headers["x-origin"], "yes");

    let body = r#"{"card":"4111 1111 1111 1111","note":"hi"}"#;
    let mut req = h2_req("POST", "https://origin.test/echo", body);
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let a = send(&mut s, req).await;
    assert_eq!(a.status, StatusCode::OK);
    let redacted = r#"{"card":"[REDACTED:card]","note":"hi"}"#;
    assert_eq!(a.body, redacted);

    // A chunked HTTP/1.1 answer with connection-specific headers: made valid HTTP/2
    // (the client would refuse the stream otherwise).
    let a = send(&mut s, h2_req("GET", "https://origin.test/chunked", "")).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "one two three")
    );
    for gone in [
        "connection",
        "keep-alive",
        "x-private",
        "proxy-connection",
        "transfer-encoding",
    ] {
        assert!(!a.headers.contains_key(gone), "{gone}");
    }

    // The origin got HTTP/1.1 requests in origin form, with Host from :authority.
    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    for x in &seen {
        assert_eq!(x.version, Version::HTTP_11);
        assert_eq!(x.headers["host"], "origin.test");
    }
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(seen[0].headers["cookie"], "a=1; b=2");
    assert_eq!(seen[0].headers.get_all("cookie").iter().count(), 1);
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("POST", "/echo")
    );
    assert_eq!(seen[1].body, redacted.as_bytes());
    assert_eq!(
        seen[1].headers["content-length"],
        redacted.len().to_string().as_str()
    );
    // One after another: one upstream connection, to the guest's destination.
    assert_eq!(h.targets(), [Target::Addr(DEST.parse().unwrap())]);

    let r = h.audit(3).await;
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.host == "origin.test" && r.status == 200));
    assert_eq!(
        (r[0].path.as_str(), r[0].action.as_str()),
        ("/hello?x=1", "allowed")
    );
    assert_eq!(r[0].bytes_in, "hello from origin".len() as u64);
    assert_eq!(
        (r[1].method.as_str(), r[1].action.as_str()),
        ("POST", "modified")
    );
    let d: Vec<_> = r[1]
        .detections
        .iter()
        .map(|d| (d.kind.as_str(), d.location.as_str(), d.action.as_str()))
        .collect();
    assert_eq!(d, [("card", "requestBody", "redact")]);
    assert_eq!(r[1].bytes_out, redacted.len() as u64);
    assert_eq!(r[2].bytes_in, "one two three".len() as u64);

    drop(s);
    let st = stats(&mut h).await;
    assert_eq!(st.requests, 3);
    assert!(!st.upgraded);
    assert_eq!(st.bytes_out, redacted.len() as u64);
    assert_eq!(
        st.bytes_in,
        ("hello from origin".len() + redacted.len() + "one two three".len()) as u64
    );
}

#[tokio::test]
async fn h2_a_request_for_another_host_is_misdirected() {
    let (origin, h) = setup("{}").await;
    let mut s = h2_guest(&h).await;
    // :authority names another host than the connection's (SNI origin.test).
    let a = send(&mut s, h2_req("GET", "https://elsewhere.test/x", "")).await;
    assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(a.json()["error"], "misdirected_request");
    // :authority right, a Host header naming another: refused too.
    let mut req = h2_req("GET", "https://origin.test/y", "");
    req.headers_mut()
        .insert("host", "elsewhere.test".parse().unwrap());
    let a = send(&mut s, req).await;
    assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    // The connection goes on.
    let a = send(&mut s, h2_req("GET", "https://origin.test:443/z", "")).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "hello from origin")
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["host"], "origin.test:443");
    let r = h.audit(3).await;
    assert_eq!(
        r.iter()
            .map(|r| (r.path.as_str(), r.status, r.action.as_str()))
            .collect::<Vec<_>>(),
        [
            ("/x", 421, "blocked"),
            ("/y", 421, "blocked"),
            ("/z", 200, "allowed")
        ]
    );
}

#[tokio::test]
async fn h2_connect_is_refused() {
    let (origin, h) = setup("{}").await;
    let mut s = h2_guest(&h).await;
    let req = Request::connect("origin.test:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&mut s, req).await;
    assert_eq!(a.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(a.json()["error"], "not_supported");
    assert!(origin.seen().is_empty());
    assert!(h.targets().is_empty());
    let r = h.audit(1).await;
    assert_eq!(
        (r[0].method.as_str(), r[0].status, r[0].action.as_str()),
        ("CONNECT", 501, "blocked")
    );
}

#[tokio::test]
async fn h2_concurrent_streams_share_a_bounded_pool_of_upstream_connections() {
    // Twice the pool's worth of requests at once on one connection, each held at the
    // origin until a pool's worth are there together: they run in parallel, never more
    // than the pool at once, on no more upstream connections than that.
    let n = MAX_UPSTREAM_CONNECTIONS;
    let (origin, mut h) = setup("{}").await;
    let s = h2_guest(&h).await;
    let tasks: Vec<_> = (0..2 * n)
        .map(|i| {
            let mut s = s.clone();
            tokio::spawn(async move {
                let uri = format!("https://origin.test/gate?n={n}&i={i}");
                (i, send(&mut s, h2_req("GET", &uri, "")).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, a) = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        // Each stream got its own answer.
        assert_eq!(a.body, format!("/gate?n={n}&i={i}"));
    }
    assert_eq!(origin.max_inflight(), n);
    assert!(origin.connections() <= n, "{}", origin.connections());
    assert!(h.targets().len() <= n && h.targets().len() > 1);
    let r = h.audit(2 * n).await;
    assert_eq!(r.len(), 2 * n);
    assert!(r.iter().all(|r| r.status == 200 && r.action == "allowed"));
    drop(s);
    assert_eq!(stats(&mut h).await.requests, 2 * n as u64);
}

#[tokio::test]
async fn h2_secrets_are_inserted_and_masked_as_over_http1() {
    let policy = format!(
        r#"{{"envMasking":{{"secrets":[{{"name":"OPENAI_KEY","placeholder":"{PLACEHOLDER}","hosts":["origin.test"]}}]}}}}"#
    );
    let (origin, h) = setup(&policy).await;
    let mut s = h2_guest(&h).await;
    let mut req = h2_req("GET", "https://origin.test/whoami", "");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    let a = send(&mut s, req).await;
    assert_eq!(
        origin.seen()[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert_eq!(a.body, format!("{{\"youSent\":\"Bearer {PLACEHOLDER}\"}}"));
    let r = h.audit(1).await;
    assert!(r[0]
        .detections
        .iter()
        .any(|d| d.kind == "secret:OPENAI_KEY" && d.action == "inserted"));
}

#[tokio::test]
async fn h2_a_stream_the_guest_resets_is_still_audited() {
    let (origin, h) = setup("{}").await;
    let s = h2_guest(&h).await;
    // Held at the origin (it waits for 100 at once): the guest gives up first.
    let mut s2 = s.clone();
    let t = tokio::spawn(async move {
        let _ = send(&mut s2, h2_req("GET", "https://origin.test/gate?n=100", "")).await;
    });
    for _ in 0..200 {
        if !origin.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dropping the response future resets the stream.
    t.abort();
    let r = h.audit(1).await;
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].path.as_str(), r[0].status),
        ("/gate?n=100", 0),
        "recorded with no status: the guest went before the answer"
    );
    // The connection goes on.
    let mut s = s;
    let a = send(&mut s, h2_req("GET", "https://origin.test/after", "")).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn h2_an_oversized_header_list_is_refused_before_the_origin() {
    let (origin, h) = setup("{}").await;
    let mut s = h2_guest(&h).await;
    let mut req = h2_req("GET", "https://origin.test/", "");
    req.headers_mut()
        .insert("x-big", "a".repeat(100 * 1024).parse().unwrap());
    s.ready().await.unwrap();
    // Refused by the client (it knows the proxy's limit), or answered 431, or reset:
    // nothing reaches the origin.
    if let Ok(r) = s.send_request(req).await {
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    assert!(origin.seen().is_empty());
}
