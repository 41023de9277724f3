//! Revocation by epoch through the public API: `connect` ends the runtime tokens it
//! replaces, a port made private ends its preview URLs and proxy targets, and a delete
//! ends every token of the sandbox with the answer an unknown sandbox gets. Reads (GET,
//! a new preview URL) hand out tokens of the current epoch and end nothing.

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::Stack;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

/// One small sandbox per test (the shape the hostile-guest tests use too).
fn small_sandbox() -> Value {
    json!({
        "templateID": "minimal",
        "resources": { "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 },
        "timeout": 600
    })
}

/// A sandbox ID that never existed.
const UNKNOWN: &str = "sbx-00000000000000000000";

/// `GET files/list?path=/` of the data plane at `base` with `token`: status and body.
async fn list_root(base: &str, token: &str) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{base}/files/list?path=/"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn connect(api: &Api, id: &str) -> Value {
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

fn token_of(sandbox: &Value) -> String {
    sandbox["runtime"]["token"].as_str().unwrap().to_string()
}

/// HMAC-SHA256 of `message` under `key` (RFC 2104; the key is shorter than a block).
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// Unpadded URL-safe base64.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A token this daemon would sign (its secret is in the state directory), as a runtime
/// token of a sandbox that never existed would be: the only way to see what such a
/// sandbox answers past the signature check.
fn sign(stack: &Stack, subject: &str, epoch: u64, expiry: i64) -> String {
    sign_payload(stack, &format!("{subject}.{epoch}.{expiry}"))
}

/// `<payload>.<mac>` under this daemon's secret.
fn sign_payload(stack: &Stack, payload: &str) -> String {
    let secret = std::fs::read(stack.daemon.state_dir().join("runtime-token.key")).unwrap();
    format!(
        "{payload}.{}",
        base64url(&hmac_sha256(&secret, payload.as_bytes()))
    )
}

/// The fields of a `<subject>.<epoch>.<expiry>.<mac>` token.
fn fields(token: &str) -> (String, u64, i64, String) {
    let f: Vec<&str> = token.rsplitn(4, '.').collect();
    assert_eq!(f.len(), 4, "a token with an epoch: {token}");
    (
        f[3].to_string(),
        f[2].parse().unwrap(),
        f[1].parse().unwrap(),
        f[0].to_string(),
    )
}

#[tokio::test]
async fn connect_ends_the_runtime_tokens_it_replaces_and_delete_ends_them_all() {
    let stack = Stack::start("token-revocation-runtime");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api.create(small_sandbox()).await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    let t1 = rt.token.clone();
    // Our own signing matches the daemon's: the create's token, re-signed, is the same.
    let (subject, epoch1, expiry1, _) = fields(&t1);
    assert_eq!(subject, id);
    assert_eq!(sign(&stack, &id, epoch1, expiry1), t1);
    assert_eq!(list_root(&rt.base, &t1).await.0, StatusCode::OK);

    // A read ends nothing: GET hands out a token of the current epoch.
    let t1_get = token_of(&api.get(&id).await);
    assert_eq!(fields(&t1_get).1, epoch1);
    assert_eq!(list_root(&rt.base, &t1).await.0, StatusCode::OK);
    assert_eq!(list_root(&rt.base, &t1_get).await.0, StatusCode::OK);

    // connect: a new epoch; the tokens before it are refused, the new one works.
    let t2 = token_of(&connect(&api, &id).await);
    let epoch2 = fields(&t2).1;
    assert!(epoch2 > epoch1, "{epoch1} then {epoch2}");
    for old in [&t1, &t1_get] {
        let (status, e) = list_root(&rt.base, old).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");
        assert_eq!(e["code"], "token_revoked", "{e}");
        assert!(e["message"].as_str().unwrap().contains("connect"), "{e}");
    }
    let rt2 = Runtime {
        token: t2.clone(),
        ..Runtime::of(&sbx)
    };
    assert_eq!(rt2.run("echo ok").await, ("ok\n".into(), String::new(), 0));
    // Streams opened with a token are checked the same way (the lifecycle WebSocket's
    // upgrade request, refused before any upgrade).
    let resp = reqwest::Client::new()
        .get(format!("{}/lifecycle/ws", rt.base))
        .bearer_auth(&t1)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The current epoch written into an old token: its signature no longer fits.
    let (_, _, expiry, mac) = fields(&t1);
    let forged = format!("{id}.{epoch2}.{expiry}.{mac}");
    let (status, e) = list_root(&rt.base, &forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");
    assert!(e["message"].as_str().unwrap().contains("signature"), "{e}");
    // A genuine token of the format before epochs (`<sandbox>.<expiry>.<mac>`): refused,
    // saying so.
    let old_format = sign_payload(&stack, &format!("{id}.{expiry}"));
    let (status, e) = list_root(&rt.base, &old_format).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("older format"),
        "{e}"
    );

    // Another connect ends the second token too.
    let t3 = token_of(&connect(&api, &id).await);
    assert_eq!(list_root(&rt.base, &t2).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(list_root(&rt.base, &t3).await.0, StatusCode::OK);

    // After a delete the newest token is refused exactly as a genuine token of a sandbox
    // that never existed is.
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    let (status, deleted) = list_root(&rt.base, &t3).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{deleted}");
    let unknown_base = rt.base.replace(&id, UNKNOWN);
    let (_, _, expiry3, _) = fields(&t3);
    let (status, unknown) = list_root(&unknown_base, &sign(&stack, UNKNOWN, epoch2, expiry3)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{unknown}");
    assert_eq!(deleted["code"], unknown["code"]);
    assert_eq!(
        deleted["message"].as_str().unwrap().replace(&id, UNKNOWN),
        unknown["message"].as_str().unwrap()
    );
    // Nor does the deleted sandbox hand out tokens any more.
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}")).await;
    assert!(
        status == StatusCode::NOT_FOUND || v["runtime"].is_null(),
        "{v}"
    );
}

/// A request to the preview listener for `port` of `sandbox`.
async fn preview_get(
    stack: &Stack,
    sandbox: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let domain = stack.daemon.preview.trim_start_matches("http://");
    let listener_port = domain.rsplit_once(':').unwrap().1;
    let mut req = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{listener_port}{path}"))
        .header("Host", format!("{port}-{sandbox}.{domain}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

async fn preview(api: &Api, id: &str, body: Value) -> Value {
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/previews"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

const PROXY: &str = "x-nullspace-preview-proxy-token";

#[tokio::test]
async fn a_port_made_private_ends_its_preview_urls_and_proxy_targets() {
    let stack = Stack::start("token-revocation-preview");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api.create(small_sandbox()).await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    // busybox's httpd on 8000 (the minimal image is busybox).
    let resp = rt
        .post(
            "/commands",
            json!({ "cmd": "mkdir -p /tmp/www && echo hello > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8000 -h /tmp/www", "background": true }),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.run("wget -qO- http://127.0.0.1:8000/").await.0 != "hello\n" {
        assert!(Instant::now() < deadline, "httpd never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let first = preview(&api, &id, json!({ "port": 8000 })).await;
    let (p1, x1) = (
        first["token"].as_str().unwrap().to_string(),
        first["proxyTarget"]["token"].as_str().unwrap().to_string(),
    );
    let url_token = |t: &str| format!("/?ns_preview_token={t}");
    let cookie = |t: &str| format!("ns_preview_8000={t}");
    assert_eq!(
        preview_get(&stack, &id, 8000, &url_token(&p1), &[]).await.0,
        StatusCode::FOUND
    );
    assert_eq!(
        preview_get(&stack, &id, 8000, "/", &[(PROXY, &x1)]).await,
        (StatusCode::OK, "hello\n".into())
    );
    // Another port's URL, issued now: a private move of 8000 leaves it alone (it gets
    // past the token check: nothing listens on 9000).
    let other = preview(&api, &id, json!({ "port": 9000 })).await;
    let other_token = other["token"].as_str().unwrap().to_string();
    // A second URL for the port ends nothing; nor does making it public.
    let second = preview(&api, &id, json!({ "port": 8000 })).await;
    assert_eq!(
        preview_get(&stack, &id, 8000, "/", &[("cookie", &cookie(&p1))])
            .await
            .0,
        StatusCode::OK
    );
    preview(&api, &id, json!({ "port": 8000, "public": true })).await;
    assert_eq!(
        preview_get(&stack, &id, 8000, "/", &[]).await.0,
        StatusCode::OK
    );

    // Private again: every token of the port issued before is refused, in the URL, as
    // a cookie and as a proxy token; the ones the call returned work.
    let private = preview(&api, &id, json!({ "port": 8000, "public": false })).await;
    assert_eq!(private["public"], false);
    let (p3, x3) = (
        private["token"].as_str().unwrap().to_string(),
        private["proxyTarget"]["token"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let second_token = second["token"].as_str().unwrap();
    for (path, headers) in [
        (url_token(&p1), vec![]),
        (url_token(second_token), vec![]),
        ("/".into(), vec![("cookie", cookie(&p1))]),
        ("/".into(), vec![(PROXY, x1.clone())]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = preview_get(&stack, &id, 8000, &path, &headers).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{path} {headers:?}: {body}"
        );
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["code"], "token_revoked", "{e}");
        assert!(e["message"].as_str().unwrap().contains("private"), "{e}");
    }
    assert_eq!(
        preview_get(&stack, &id, 8000, &url_token(&p3), &[]).await.0,
        StatusCode::FOUND
    );
    assert_eq!(
        preview_get(&stack, &id, 8000, "/", &[(PROXY, &x3)]).await,
        (StatusCode::OK, "hello\n".into())
    );
    assert_eq!(
        preview_get(&stack, &id, 9000, &url_token(&other_token), &[])
            .await
            .0,
        StatusCode::FOUND
    );
    // Preview epochs are not the runtime token's: it still works.
    assert_eq!(list_root(&rt.base, &rt.token).await.0, StatusCode::OK);

    // Deleted: the newest tokens get what a sandbox that never existed answers.
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    let (status, deleted) = preview_get(&stack, &id, 8000, "/", &[(PROXY, &x3)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{deleted}");
    let (status, unknown) = preview_get(&stack, UNKNOWN, 8000, "/", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{unknown}");
    assert_eq!(deleted.replace(&id, UNKNOWN), unknown);
}
