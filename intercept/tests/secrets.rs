//! Env masking against a hostile guest and a server that echoes: real values go into
//! request header values only, to hosts (and upstream hosts) that are the secret's, and
//! whatever could carry one back unmasked is masked or refused.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use intercept::Target;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_secret_goes_into_header_values_only_never_the_url_or_body() {
    let (origin, h) = setup(&secret_policy(&["origin.test"], "")).await;
    // A chat prompt asking the model to repeat the key, as an event stream would: the
    // placeholder must reach the server as it is, or the answer could carry the value
    // back split across events.
    let prompt = format!(r#"{{"prompt":"repeat after me: {PLACEHOLDER}"}}"#);
    let a = guest(
        &h,
        vec![
            with_auth(post("/echo", "text/event-stream", prompt.clone())),
            with_auth(get(&format!("/echo?key={PLACEHOLDER}"))),
        ],
    )
    .await;
    let seen = origin.seen();
    // The header got the value, the body and the URL kept the placeholder.
    for s in &seen {
        assert_eq!(
            s.headers["authorization"],
            format!("Bearer {SECRET}").as_str()
        );
    }
    assert_eq!(seen[0].body, prompt.as_bytes());
    assert_eq!(seen[1].path, format!("/echo?key={PLACEHOLDER}"));
    assert_eq!(a[0].body, prompt);
    let r = h.audit(2).await;
    let d = detections(&r[0]);
    assert!(d.contains(&det(
        "secret:OPENAI_KEY",
        "requestHeader:authorization",
        "inserted"
    )));
    assert!(
        d.contains(&det("secret:OPENAI_KEY", "requestBody", "kept")),
        "{d:?}"
    );
    assert!(!d.contains(&det("secret:OPENAI_KEY", "requestBody", "inserted")));
    let d = detections(&r[1]);
    assert!(
        d.contains(&det("secret:OPENAI_KEY", "url", "kept")),
        "{d:?}"
    );
    assert!(!d.contains(&det("secret:OPENAI_KEY", "url", "inserted")));
    assert!(!serde_json::to_string(&r).unwrap().contains(SECRET));
}

#[tokio::test]
async fn a_request_a_secret_went_into_loses_its_range() {
    let (origin, h) = setup(&secret_policy(&["origin.test"], "")).await;
    let ranged = |mut r: Request<Full<Bytes>>| {
        r.headers_mut()
            .insert("range", "bytes=3-4".parse().unwrap());
        r.headers_mut()
            .insert("if-range", "\"etag\"".parse().unwrap());
        r
    };
    guest(
        &h,
        vec![ranged(with_auth(get("/whoami"))), ranged(get("/hello"))],
    )
    .await;
    let seen = origin.seen();
    // With the value in it: no range (one could cut an echoed value into pieces).
    assert!(!seen[0].headers.contains_key("range"));
    assert!(!seen[0].headers.contains_key("if-range"));
    // Without: untouched.
    assert_eq!(seen[1].headers["range"], "bytes=3-4");
    assert_eq!(seen[1].headers["if-range"], "\"etag\"");
}

#[tokio::test]
async fn a_compressed_answer_to_a_request_a_secret_went_into_is_refused() {
    let (_origin, h) = setup(&secret_policy(&["origin.test"], "")).await;
    let a = guest(&h, vec![with_auth(get("/gzip")), get("/gzip")]).await;
    // Masking cannot see into it: refused, saying why.
    assert_eq!(a[0].status, StatusCode::BAD_GATEWAY);
    assert_eq!(a[0].json()["error"], "secret_in_encoded_response");
    assert!(!a[0].body.contains(SECRET));
    // No value went into the second request: passed (uninspected, and said so).
    assert_eq!(a[1].status, StatusCode::OK);
    assert_eq!(a[1].headers["content-encoding"], "gzip");
    let r = h.audit(2).await;
    assert_eq!((r[0].status, r[0].action.as_str()), (502, "blocked"));
    assert!(detections(&r[0]).contains(&det("uninspected", "responseBody", "block")));
    assert!(detections(&r[1]).contains(&det("uninspected", "responseBody", "log")));
}

/// A response echoing the value where hyper's own servers never would: the reason
/// phrase, a header's name (in upper case: HTTP lowercases names), a trailer's name
/// and value.
fn leaky_response() -> Vec<u8> {
    let upper = SECRET.to_ascii_uppercase();
    format!(
        "HTTP/1.1 200 Key {SECRET}\r\n\
         content-type: text/plain\r\n\
         x-{upper}: name\r\n\
         x-value: {SECRET}\r\n\
         transfer-encoding: chunked\r\n\
         trailer: x-t, x-{SECRET}-t\r\n\
         \r\n\
         5\r\nhello\r\n\
         0\r\n\
         x-t: t={SECRET}\r\n\
         x-{SECRET}-t: 2\r\n\
         \r\n"
    )
    .into_bytes()
}

async fn leaky_setup() -> (Origin, Harness) {
    let origin_ca = test_ca("Test Origin CA");
    let (chain, key) = leaf(&origin_ca, &["origin.test"]);
    let origin = canned_origin(chain, key, leaky_response()).await;
    let h = harness(&origin, &origin_ca, &secret_policy(&["origin.test"], "")).await;
    (origin, h)
}

#[tokio::test]
async fn echoed_values_are_masked_in_reason_phrases_and_header_names() {
    let (_origin, h) = leaky_setup().await;
    let a = guest(&h, vec![get("/")]).await.remove(0);
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "hello");
    assert_eq!(
        a.reason.as_deref(),
        Some(format!("Key {PLACEHOLDER}").as_str())
    );
    let lower = PLACEHOLDER.to_ascii_lowercase();
    assert_eq!(a.headers[format!("x-{lower}").as_str()], "name");
    assert_eq!(a.headers["x-value"], PLACEHOLDER);
    let shown = format!("{:?}", a.headers).to_ascii_lowercase();
    assert!(!shown.contains(&SECRET.to_ascii_lowercase()), "{shown}");
    let r = h.audit(1).await;
    let d = detections(&r[0]);
    for location in [
        "responseReason".to_string(),
        "responseHeader:x-value".to_string(),
        format!("responseHeader:x-{lower}"),
    ] {
        assert!(
            d.contains(&det("secret:OPENAI_KEY", &location, "masked")),
            "{location}: {d:?}"
        );
    }
}

#[tokio::test]
async fn echoed_values_are_masked_in_trailers() {
    // HTTP/2 carries trailers to the guest (HTTP/1.1 only when asked for).
    let (_origin, h) = leaky_setup().await;
    let tls = guest_tls(&h, "origin.test", H2).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://origin.test/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = Answer::read(send.send_request(req).await.unwrap()).await;
    assert_eq!(a.body, "hello");
    let t = a.trailers.expect("the trailers are passed");
    assert_eq!(t["x-t"], format!("t={PLACEHOLDER}").as_str());
    let lower = PLACEHOLDER.to_ascii_lowercase();
    assert_eq!(t[format!("x-{lower}-t").as_str()], "2");
    assert!(!format!("{t:?}").contains(SECRET));
    let r = h.audit(1).await;
    let d = detections(&r[0]);
    assert!(
        d.contains(&det("secret:OPENAI_KEY", "responseTrailer:x-t", "masked")),
        "{d:?}"
    );
}

#[tokio::test]
async fn an_upgrade_a_secret_went_into_is_refused() {
    let (_origin, h) = setup(&secret_policy(&["origin.test"], "")).await;
    let tls = guest_tls(&h, "origin.test", H1).await;
    let mut req = "wss://origin.test/ws".into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    // The frames of a switched protocol pass unmasked: the switch is refused.
    let e = tokio_tungstenite::client_async(req, tls).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(resp) = e else {
        panic!("{e:?}");
    };
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value =
        serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
    assert_eq!(body["error"], "secret_in_upgrade");
    assert!(!format!("{:?}", resp.headers()).contains(SECRET));
    let r = h.audit(1).await;
    assert_eq!((r[0].status, r[0].action.as_str()), (502, "blocked"));
    assert!(detections(&r[0]).contains(&det("upgrade", "response", "block")));
}

#[tokio::test]
async fn a_switching_protocols_head_is_masked_and_transformed() {
    let (_origin, h) = setup(&secret_policy(
        &["origin.test"],
        r#","transforms":[{"host":"origin.test","responseHeaders":{"set":{"x-proxied":"1"}}}]"#,
    ))
    .await;
    let tls = guest_tls(&h, "origin.test", H1).await;
    // No value in the request: the switch goes through, its head masked and edited.
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://origin.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["x-leak"], PLACEHOLDER);
    assert_eq!(resp.headers()["x-proxied"], "1");
    ws.send(Message::text("hi")).await.unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), "echo:hi");
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let r = h.audit(1).await;
    assert_eq!(r[0].status, 101);
    assert!(detections(&r[0]).contains(&det(
        "secret:OPENAI_KEY",
        "responseHeader:x-leak",
        "masked"
    )));
}

#[tokio::test]
async fn a_secret_goes_to_a_transforms_upstream_host_only_if_it_is_the_secrets_too() {
    let to_eu = r#","transforms":[{"host":"origin.test","upstreamHost":"eu.origin.test"}]"#;
    // origin.test is the secret's, but its requests go to eu.origin.test, which is not.
    let (origin, h) = setup(&secret_policy(&["origin.test"], to_eu)).await;
    guest(&h, vec![with_auth(get("/whoami"))]).await;
    assert_eq!(h.targets(), [Target::Host("eu.origin.test".into(), 443)]);
    assert_eq!(
        origin.seen()[0].headers["authorization"],
        format!("Bearer {PLACEHOLDER}").as_str()
    );
    let r = h.audit(1).await;
    assert!(detections(&r[0]).contains(&det(
        "secret:OPENAI_KEY",
        "requestHeader:authorization",
        "kept"
    )));
    // Both the secret's: the value goes in.
    h.session.set_policy(compile(&secret_policy(
        &["origin.test", "eu.origin.test"],
        to_eu,
    )));
    guest(&h, vec![with_auth(get("/whoami"))]).await;
    assert_eq!(
        origin.seen()[1].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    // Only the upstream host the secret's: not either (the guest asked for another).
    h.session
        .set_policy(compile(&secret_policy(&["eu.origin.test"], to_eu)));
    guest(&h, vec![with_auth(get("/whoami"))]).await;
    assert_eq!(
        origin.seen()[2].headers["authorization"],
        format!("Bearer {PLACEHOLDER}").as_str()
    );
}
