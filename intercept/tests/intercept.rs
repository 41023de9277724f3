//! The interceptor end to end, in process: an HTTP/1.1 guest client trusting the team
//! CA, the interceptor, and an HTTPS origin with a CA of the test's own (trusted by the
//! interceptor as an extra root). No VMs, no network namespaces.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use intercept::{Target, TeamCa};
use rustls_pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn get_and_post_go_through_and_are_audited() {
    let (origin, mut h) = setup("{}").await;
    let a = guest(
        &h,
        vec![get("/hello?x=1"), post("/echo", "text/plain", "ping")],
    )
    .await;
    assert_eq!(a[0].status, 200);
    assert_eq!(a[0].body, "hello from origin");
    assert_eq!(a[0].headers["x-origin"], "yes");
    assert_eq!(a[1].body, "ping");
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(seen[0].headers["host"], "origin.test");
    assert_eq!(
        (seen[1].method.as_str(), &seen[1].body[..]),
        ("POST", &b"ping"[..])
    );
    // One upstream connection for the guest's one connection, to its destination.
    assert_eq!(
        *h.targets.lock().unwrap(),
        [Target::Addr(DEST.parse().unwrap())]
    );
    let records = h.audit(2).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].host, "origin.test");
    assert_eq!(records[0].path, "/hello?x=1");
    assert_eq!(
        (records[0].status, records[0].action.as_str()),
        (200, "allowed")
    );
    assert_eq!(records[1].bytes_out, 4);
    assert_eq!(records[1].bytes_in, 4);
    let stats = h.stats.recv().await.unwrap().unwrap();
    assert_eq!(stats.requests, 2);
    assert!(!stats.upgraded);
}

#[tokio::test]
async fn a_card_number_is_redacted_or_blocked_as_configured() {
    let (origin, h) = setup(r#"{"pii":{"detectors":{"card":"redact","email":"log"}}}"#).await;
    let body =
        r#"{"card":"4111 1111 1111 1111","note":"ann@example.com","order":"4111111111111112"}"#;
    let a = guest(
        &h,
        vec![
            post("/echo", "application/json", body),
            get("/q?card=4111-1111-1111-1111"),
        ],
    )
    .await;
    assert_eq!(a[0].status, 200);
    let seen = origin.seen();
    let got = String::from_utf8(seen[0].body.clone()).unwrap();
    assert_eq!(
        got,
        r#"{"card":"[REDACTED:card]","note":"ann@example.com","order":"4111111111111112"}"#
    );
    assert_eq!(
        seen[0].headers["content-length"],
        got.len().to_string().as_str()
    );
    assert_eq!(seen[1].path, "/q?card=%5BREDACTED%3Acard%5D");
    let r = h.audit(2).await;
    assert_eq!(r[0].action, "modified");
    let kinds: Vec<_> = r[0]
        .detections
        .iter()
        .map(|d| (d.kind.as_str(), d.location.as_str(), d.action.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("card", "requestBody", "redact"),
            ("email", "requestBody", "log")
        ]
    );

    // The same request under `block`: the guest gets 403 naming the detector; the
    // origin sees nothing.
    h.session
        .set_policy(compile(r#"{"pii":{"detectors":{"card":"block"}}}"#));
    let a = guest(&h, vec![post("/echo", "application/json", body)]).await;
    assert_eq!(a[0].status, StatusCode::FORBIDDEN);
    let j = a[0].json();
    assert_eq!(
        (j["error"].as_str(), j["detector"].as_str()),
        (Some("blocked_by_policy"), Some("card"))
    );
    assert_eq!(origin.seen().len(), 2);
    let r = h.audit(3).await;
    assert_eq!((r[2].status, r[2].action.as_str()), (403, "blocked"));
}

#[tokio::test]
async fn form_bodies_and_headers_are_inspected() {
    let (origin, h) = setup(r#"{"pii":{"detectors":{"email":"redact","apiKey":"redact"}}}"#).await;
    let mut req = post(
        "/echo",
        "application/x-www-form-urlencoded",
        "to=ann%40example.com&x=1",
    );
    req.headers_mut()
        .insert("x-token", "AKIAIOSFODNN7EXAMPLE".parse().unwrap());
    guest(&h, vec![req]).await;
    let seen = origin.seen();
    assert_eq!(seen[0].body, b"to=%5BREDACTED%3Aemail%5D&x=1");
    assert_eq!(seen[0].headers["x-token"], "[REDACTED:apiKey]");
}

#[tokio::test]
async fn a_secret_reaches_only_its_hosts_and_is_masked_on_the_way_back() {
    let policy = format!(
        r#"{{"envMasking":{{"secrets":[{{"name":"OPENAI_KEY","placeholder":"{PLACEHOLDER}","hosts":["origin.test"]}}]}}}}"#
    );
    let (origin, h) = setup(&policy).await;
    let mut req = get("/whoami");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    let body = format!("key={PLACEHOLDER}&again={PLACEHOLDER}");
    let a = guest(&h, vec![req, post("/echo", "text/plain", body.clone())]).await;
    let seen = origin.seen();
    // The origin, an allowed host, got the real value in the header; in the body the
    // placeholder stays (a server could echo a body back in a form masking misses).
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert_eq!(seen[1].body, body.as_bytes());
    // Echoed back, it is masked again: the guest never sees it.
    assert_eq!(
        a[0].body,
        format!("{{\"youSent\":\"Bearer {PLACEHOLDER}\"}}")
    );
    assert_eq!(
        a[0].headers["x-echo-auth"],
        format!("Bearer {PLACEHOLDER}").as_str()
    );
    assert_eq!(a[1].body, format!("key={PLACEHOLDER}&again={PLACEHOLDER}"));
    for x in &a {
        assert!(!x.body.contains(SECRET));
    }
    let r = h.audit(2).await;
    assert!(r[0]
        .detections
        .iter()
        .any(|d| d.kind == "secret:OPENAI_KEY" && d.action == "inserted"));
    assert!(r[0]
        .detections
        .iter()
        .any(|d| d.kind == "secret:OPENAI_KEY" && d.action == "masked"));
    assert!(detections(&r[1]).contains(&det("secret:OPENAI_KEY", "requestBody", "kept")));
    assert!(!serde_json::to_string(&r).unwrap().contains(SECRET));

    // To a host the secret is not for, the placeholder stays.
    h.session.set_policy(compile(
        &policy.replace("[\"origin.test\"]", "[\"api.openai.com\"]"),
    ));
    let mut req = get("/whoami");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    guest(&h, vec![req]).await;
    assert_eq!(
        origin.seen()[2].headers["authorization"],
        format!("Bearer {PLACEHOLDER}").as_str()
    );
    let r = h.audit(3).await;
    assert!(r[2]
        .detections
        .iter()
        .any(|d| d.kind == "secret:OPENAI_KEY" && d.action == "kept"));
}

#[tokio::test]
async fn an_injected_page_is_flagged_stripped_or_blocked() {
    let (_origin, h) = setup(r#"{"injectionDefense":{"action":"flag"}}"#).await;
    let a = guest(&h, vec![get("/page"), get("/hello")]).await;
    assert_eq!(a[0].body, INJECTED_PAGE);
    let flagged = a[0].headers["x-nullspace-injection"].to_str().unwrap();
    assert!(
        flagged.contains("hidden-html") && flagged.contains("ignore-previous"),
        "{flagged}"
    );
    assert!(!a[1].headers.contains_key("x-nullspace-injection"));
    let r = h.audit(2).await;
    assert!(r[0]
        .detections
        .iter()
        .any(|d| d.kind == "injection:hidden-html" && d.action == "flag"));

    h.session
        .set_policy(compile(r#"{"injectionDefense":{"action":"strip"}}"#));
    let a = guest(&h, vec![get("/page")]).await;
    assert_eq!(a[0].body, "<html><body><p>Weather: sunny</p></body></html>");
    assert_eq!(
        a[0].headers["content-length"],
        a[0].body.len().to_string().as_str()
    );

    h.session
        .set_policy(compile(r#"{"injectionDefense":{"action":"block"}}"#));
    let a = guest(&h, vec![get("/page"), get("/hello")]).await;
    assert_eq!(a[0].status, StatusCode::BAD_GATEWAY);
    assert_eq!(a[0].json()["error"], "injection_blocked");
    // The connection goes on (the upstream one is made again).
    assert_eq!(a[1].body, "hello from origin");
}

#[tokio::test]
async fn transforms_edit_headers_and_rewrite_the_upstream() {
    let (origin, h) = setup(
        r#"{"transforms":[{"host":"origin.test","requestHeaders":{"set":{"x-team":"t1"},"remove":["x-drop"]},
             "responseHeaders":{"remove":["set-cookie"],"set":{"x-proxied":"1"}},"upstreamHost":"eu.origin.test"}]}"#,
    )
    .await;
    let mut req = get("/hello");
    req.headers_mut().insert("x-drop", "1".parse().unwrap());
    let a = guest(&h, vec![req]).await;
    assert_eq!(a[0].status, 200);
    assert!(!a[0].headers.contains_key("set-cookie"));
    assert_eq!(a[0].headers["x-proxied"], "1");
    let seen = origin.seen();
    assert_eq!(seen[0].headers["x-team"], "t1");
    assert!(!seen[0].headers.contains_key("x-drop"));
    assert_eq!(seen[0].headers["host"], "eu.origin.test");
    assert_eq!(
        *h.targets.lock().unwrap(),
        [Target::Host("eu.origin.test".into(), 443)]
    );

    // The transform removed live: on a new connection, requests go to the original
    // destination again, unedited.
    h.session.set_policy(compile("{}"));
    guest(&h, vec![get("/hello")]).await;
    assert_eq!(origin.seen()[1].headers["host"], "origin.test");
    assert!(!origin.seen()[1].headers.contains_key("x-team"));
    assert_eq!(
        h.targets.lock().unwrap().last(),
        Some(&Target::Addr(DEST.parse().unwrap()))
    );
}

#[tokio::test]
async fn a_host_header_for_another_server_is_misdirected() {
    let (origin, h) = setup("{}").await;
    let req = Request::get("/")
        .header("host", "elsewhere.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // An absolute-form URI names the host too.
    let absolute = Request::get("https://elsewhere.test/")
        .header("host", "origin.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = guest(&h, vec![req, absolute]).await;
    assert_eq!(a[0].status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(a[1].status, StatusCode::MISDIRECTED_REQUEST);
    assert!(origin.seen().is_empty());
}

async fn refused_upstream(names: &[&str], signed_by_trusted: bool) -> Answer {
    let trusted = test_ca("Test Origin CA");
    let other = test_ca("Someone Else's CA");
    let (chain, key) = leaf(if signed_by_trusted { &trusted } else { &other }, names);
    let origin = origin(chain, key).await;
    let h = harness(&origin, &trusted, "{}").await;
    let a = guest(&h, vec![get("/")]).await.remove(0);
    assert!(origin.seen().is_empty());
    let r = h.audit(1).await;
    assert_eq!((r[0].status, r[0].action.as_str()), (502, "error"));
    a
}

#[tokio::test]
async fn an_upstream_certificate_for_another_name_is_a_502_saying_why() {
    let a = refused_upstream(&["other.test"], true).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    let j = a.json();
    assert_eq!(j["error"], "upstream_certificate_refused");
    let msg = j["message"].as_str().unwrap();
    assert!(
        msg.contains("origin.test") && msg.contains("not valid for the name"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_upstream_certificate_of_an_untrusted_ca_is_a_502_saying_why() {
    let a = refused_upstream(&["origin.test"], false).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    let j = a.json();
    assert_eq!(j["error"], "upstream_certificate_refused");
    assert!(
        j["message"]
            .as_str()
            .unwrap()
            .contains("not issued by a trusted certificate authority"),
        "{j}"
    );
}

#[tokio::test]
async fn a_websocket_upgrade_is_relayed() {
    let (_origin, mut h) = setup(r#"{"pii":{"detectors":{"card":"block"}}}"#).await;
    let tls = guest_tls(&h, "origin.test", H1).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://origin.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("echo:hi {i}"));
    }
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let stats = h.stats.recv().await.unwrap().unwrap();
    assert!(stats.upgraded);
    assert!(stats.bytes_out > 0 && stats.bytes_in > 0);
    assert_eq!(h.audit(1).await[0].status, 101);
}

#[tokio::test]
async fn a_body_past_the_inspected_prefix_streams_through() {
    // 6 MiB of text with a card in the first MiB and one after it: the first is
    // redacted, the second passes (documented: only the prefix is inspected), and the
    // origin gets every other byte.
    let (origin, h) = setup(r#"{"pii":{"detectors":{"card":"redact"}}}"#).await;
    let filler = "lorem ipsum ".repeat(6 * 1024 * 1024 / 12);
    let body = format!("A 4111111111111111 {filler} B 5500005555555559 end");
    let a = guest(&h, vec![post("/echo", "text/plain", body.clone())]).await;
    assert_eq!(a[0].status, 200);
    let got = String::from_utf8(origin.seen()[0].body.clone()).unwrap();
    assert!(got.starts_with("A [REDACTED:card] lorem"));
    assert!(got.ends_with("B 5500005555555559 end"));
    assert_eq!(
        got.len(),
        body.len() - "4111111111111111".len() + "[REDACTED:card]".len()
    );
    // Streamed, so framed chunked upstream.
    assert!(!origin.seen()[0].headers.contains_key("content-length"));
}

#[tokio::test]
async fn a_guest_without_sni_gets_a_leaf_for_the_destination_ip() {
    let (_origin, h) = setup("{}").await;
    // No SNI (an IP name): the leaf is for the original destination's address.
    let tls = guest_tls(&h, "203.0.113.10", H1).await;
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    assert_eq!(certs.len(), 2);
    drop(tls);
}

#[tokio::test]
async fn a_placeholder_far_into_a_large_body_stays_counted_and_framed_as_sent() {
    // 3 MiB, past the inspected prefix, to a host the secret is for: the placeholder at
    // the end stays (real values go in header values only), is counted as it streams,
    // and the body keeps its length (nothing in it changes).
    let (origin, h) = setup(&secret_policy(&["origin.test"], "")).await;
    let filler = "x".repeat(3 * 1024 * 1024);
    let body = format!("{filler}key={PLACEHOLDER}");
    let a = guest(
        &h,
        vec![post("/echo", "application/octet-stream", body.clone())],
    )
    .await;
    let seen = origin.seen();
    assert!(seen[0]
        .body
        .ends_with(format!("key={PLACEHOLDER}").as_bytes()));
    assert_eq!(
        seen[0].headers["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(a[0].body.len(), body.len());
    assert!(a[0].body.ends_with(&format!("key={PLACEHOLDER}")));
    let r = h.audit(1).await;
    assert!(
        detections(&r[0]).contains(&det("secret:OPENAI_KEY", "requestBody", "kept")),
        "{:?}",
        r[0].detections
    );
    assert!(!detections(&r[0]).iter().any(|d| d.2 == "inserted"));
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_before_the_origin() {
    let (origin, h) = setup("{}").await;
    let mut req = get("/");
    req.headers_mut()
        .insert("x-big", "a".repeat(100 * 1024).parse().unwrap());
    let tls = guest_tls(&h, "origin.test", H1).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    // hyper answers 431, or closes: either way nothing reaches the origin.
    if let Ok(r) = send.send_request(req).await {
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_guest_not_trusting_the_team_ca_fails_its_handshake() {
    let (_origin, mut h) = setup("{}").await;
    // The guest trusts another CA than the team's.
    h.ca_pem = TeamCa::generate("someone else")
        .unwrap()
        .cert_pem()
        .to_string();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(CertificateDer::from_pem_slice(h.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(h.proxy).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("origin.test").unwrap(), tcp)
        .await;
    assert!(r.is_err());
    let e = h.stats.recv().await.unwrap().unwrap_err();
    assert!(e.contains("TLS handshake failed"), "{e}");
}
