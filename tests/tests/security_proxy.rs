//! The security proxy end to end through the public API: a real VM whose TLS
//! connections the egress proxy intercepts, reaching real HTTPS origins (Python's
//! `http.server` with certificates of this test's own CA) in a network namespace the
//! test makes, names served by a real DNS server. What the origin received is read
//! from its log, so a redaction or a secret is checked where it lands, not where the
//! proxy says it sent it.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::origin::Origin;
use nullspace_tests::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;

/// The real value of the masked secret: never in the guest.
const SECRET: &str = "sk-live-9f8e7d6c5b4a39281706";

/// Runs `cmd` in the guest; its stdout, trimmed.
async fn sh(rt: &Runtime, cmd: &str) -> String {
    let (out, err, _) = rt.run(cmd).await;
    format!(
        "{}{}",
        out.trim(),
        if err.trim().is_empty() {
            String::new()
        } else {
            format!(" [stderr: {}]", err.trim())
        }
    )
}

/// Whether any file under `dir` holds `needle`.
fn any_file_holds(dir: &Path, needle: &str) -> bool {
    std::process::Command::new("grep")
        .args(["-r", "-q", "-F", "-a", needle])
        .arg(dir)
        .status()
        .unwrap()
        .success()
}

async fn audit(api: &Api, id: &str) -> Vec<Value> {
    let (status, page) = api
        .fetch(&format!("/v1/sandboxes/{id}/audit?limit=1000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["records"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_security_proxy_intercepts_redacts_flags_masks_secrets_and_audits() {
    let origin = Origin::start();
    let dns = format!("{}:53", origin.net.addr(53));
    let ca = origin.dir.join("ca.pem").display().to_string();
    let stack = Stack::start_with(
        "security",
        &[
            "--network",
            "isolated",
            "--egress-dns",
            &dns,
            "--egress-extra-ca",
            &ca,
        ],
        &[],
    );
    let api = stack.public(stack.daemon.team_key("acme"));

    // Refusals say what to send.
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "base", "resources": small(), "securityPolicy": { "pii": { "detectors": { "card": "shred" } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("securityPolicy"),
        "{v}"
    );
    let masked = json!({ "secrets": [{ "name": "API_KEY", "hosts": ["origin.test"] }] });
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "base", "resources": small(), "securityPolicy": { "envMasking": masked } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("envVars"), "{v}");
    // The value under another name would reach the guest; the CA variables are the
    // proxy's.
    for (env, names) in [
        (
            json!({ "API_KEY": SECRET, "URL": format!("https://u:{SECRET}@x") }),
            "envVars.URL",
        ),
        (
            json!({ "API_KEY": SECRET, "SSL_CERT_FILE": "/mine.pem" }),
            "envVars.SSL_CERT_FILE",
        ),
    ] {
        let (status, v) = api
            .post(
                "/v1/sandboxes",
                json!({ "templateID": "base", "resources": small(), "envVars": env, "securityPolicy": { "envMasking": masked } }),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["message"].as_str().unwrap().starts_with(names), "{v}");
        assert!(!v.to_string().contains(SECRET), "{v}");
    }

    let sbx = api
        .create(json!({
            "templateID": "base",
            "resources": small(),
            "envVars": { "API_KEY": SECRET },
            "securityPolicy": {
                "pii": { "detectors": { "card": "redact" } },
                "injectionDefense": { "action": "flag" },
                "envMasking": masked,
            },
        }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let placeholder = sbx["securityPolicy"]["envMasking"]["secrets"][0]["placeholder"]
        .as_str()
        .unwrap_or_else(|| panic!("no placeholder in {sbx}"))
        .to_string();
    assert!(
        !sbx.to_string().contains(SECRET),
        "the view shows the secret: {sbx}"
    );
    let rt = Runtime::of(&sbx);

    // The guest sees only the placeholder.
    assert_eq!(sh(&rt, "printenv API_KEY").await, placeholder);

    // curl and Python requests trust the proxy without -k.
    let got = sh(&rt, "curl -sS -m 20 https://origin.test:8443/hello").await;
    assert_eq!(got, "hello from the origin", "curl through the proxy");
    let got = sh(
        &rt,
        "python3 -c \"import requests; r = requests.get('https://origin.test:8443/py', timeout=20); print(r.status_code, r.text)\"",
    )
    .await;
    assert_eq!(got, "200 hello from the origin", "Python requests");

    // The secret's real value reaches the host it is for, the placeholder any other.
    sh(
        &rt,
        "curl -sS -m 20 -H \"Authorization: Bearer $API_KEY\" https://origin.test:8443/key",
    )
    .await;
    assert_eq!(
        origin.received("/key")["auth"],
        json!(format!("Bearer {SECRET}"))
    );
    sh(
        &rt,
        "curl -sS -m 20 -H \"Authorization: Bearer $API_KEY\" https://other.test:8443/key2",
    )
    .await;
    assert_eq!(
        origin.received("/key2")["auth"],
        json!(format!("Bearer {placeholder}"))
    );

    // A card number is redacted on its way out.
    sh(
        &rt,
        "curl -sS -m 20 -H 'content-type: application/json' -d '{\"card\": \"4111 1111 1111 1111\"}' https://origin.test:8443/pay",
    )
    .await;
    let body = origin.received("/pay")["body"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        body.contains("[REDACTED:card]") && !body.contains("4111"),
        "{body}"
    );

    // Cleartext HTTP is inspected too, and never carries the real secret, even to a
    // host the secret is for.
    sh(
        &rt,
        "curl -sS -m 20 -H \"Authorization: Bearer $API_KEY\" -H 'content-type: application/json' -d '{\"card\": \"4111 1111 1111 1111\"}' http://origin.test:8080/plain",
    )
    .await;
    let plain = origin.received("/plain");
    assert_eq!(
        plain["auth"],
        json!(format!("Bearer {placeholder}")),
        "{plain}"
    );
    assert!(
        plain["body"].as_str().unwrap().contains("[REDACTED:card]"),
        "{plain}"
    );

    // Only what the proxy reads goes out: another protocol to the same server is reset.
    let raw = sh(
        &rt,
        "python3 -c \"import socket; s = socket.create_connection(('origin.test', 8080), 10); s.sendall(b'\\x00raw bytes\\n'); print(s.recv(64))\" 2>/dev/null || echo REFUSED",
    )
    .await;
    assert_eq!(raw, "REFUSED", "{raw}");

    // A page aimed at a model is flagged.
    let head = sh(
        &rt,
        "curl -sS -m 20 -D - -o /dev/null https://origin.test:8443/inject",
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-nullspace-injection: ignore-previous"),
        "{head}"
    );

    // A server the public and extra roots do not vouch for is refused, saying why.
    let bad = sh(
        &rt,
        "curl -sS -m 20 -w ' %{http_code}' https://bad.test:9443/",
    )
    .await;
    assert!(
        bad.ends_with(" 502") && bad.contains("certificate"),
        "{bad}"
    );
    assert!(origin
        .requests()
        .iter()
        .all(|r| r["host"] != "bad.test:9443"));

    // A live change: cards are now blocked.
    let mut policy = sbx["securityPolicy"].clone();
    policy["pii"]["detectors"]["card"] = json!("block");
    let (status, v) = api
        .call(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/security-policy"),
            Some(policy),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let blocked = sh(
        &rt,
        "curl -sS -m 20 -w ' %{http_code}' -H 'content-type: application/json' -d '{\"card\": \"4111 1111 1111 1111\"}' https://origin.test:8443/pay2",
    )
    .await;
    assert!(
        blocked.ends_with(" 403") && blocked.contains("card"),
        "{blocked}"
    );
    assert!(origin.requests().iter().all(|r| r["path"] != "/pay2"));
    // A secret not given at create cannot be added live.
    let (status, v) = api
        .call(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/security-policy"),
            Some(json!({ "envMasking": { "secrets": [{ "name": "OTHER", "hosts": ["origin.test"] }] } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // The audit has each request, what was found and what was done; the event stream
    // the notable ones. Written in batches: wait for the last.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let records = loop {
        let records = audit(&api, &id).await;
        if records.iter().any(|r| r["path"] == "/pay2") {
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit of /pay2: {records:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let find = |path: &str| {
        records
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no audit record of {path}: {records:?}"))
            .clone()
    };
    let pay = find("/pay");
    assert_eq!(
        (
            pay["host"].as_str(),
            pay["method"].as_str(),
            pay["status"].as_u64()
        ),
        (Some("origin.test"), Some("POST"), Some(200)),
        "{pay}"
    );
    assert!(
        pay["detections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["kind"] == "card" && d["action"] == "redact"),
        "{pay}"
    );
    assert_eq!(find("/pay2")["action"], "blocked");
    assert!(find("/inject")["detections"]
        .to_string()
        .contains("injection:ignore-previous"));
    assert!(find("/key")["detections"].to_string().contains("inserted"));
    assert!(
        records
            .iter()
            .any(|r| r["host"] == "bad.test" && r["action"] == "error"),
        "{records:?}"
    );
    assert!(!serde_json::to_string(&records).unwrap().contains(SECRET));
    let ids: Vec<u64> = records.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let (_, page) = api
        .fetch(&format!(
            "/v1/sandboxes/{id}/audit?after={}&limit=1",
            ids[0]
        ))
        .await;
    assert_eq!(page["records"][0]["id"], json!(ids[1]), "{page}");
    assert_eq!(page["more"], json!(true), "{page}");
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{id}/audit?limit=0"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (_, log) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    let kinds: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        kinds.contains(&"sandbox.audit") && kinds.contains(&"sandbox.security_policy_updated"),
        "{kinds:?}"
    );
    let other = stack.public(stack.daemon.team_key("other"));
    let (status, _) = other.fetch(&format!("/v1/sandboxes/{id}/audit")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A fork's guest has the placeholder and the CA; its proxy the value.
    let (status, forked) = api
        .post(&format!("/v1/sandboxes/{id}/fork"), json!({ "count": 1 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let child = Runtime::of(&forked["sandboxes"][0]);
    sh(
        &child,
        "curl -sS -m 20 -H \"Authorization: Bearer $API_KEY\" https://origin.test:8443/child",
    )
    .await;
    assert_eq!(
        origin.received("/child")["auth"],
        json!(format!("Bearer {SECRET}"))
    );

    // The real value is in no snapshot file: pause writes the guest's memory and disk.
    // The placeholder, written to a file just before, is (in the page cache at least):
    // the check could fail.
    sh(&rt, "printenv API_KEY > /workspace/key && sync").await;
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let pauses = stack.daemon.state_dir().join("pauses").join(&id);
    assert!(pauses.exists(), "no pause snapshot at {}", pauses.display());
    assert!(
        any_file_holds(&pauses, &placeholder),
        "the placeholder the guest wrote is not in its snapshot: the check below proves nothing"
    );
    assert!(
        !any_file_holds(&pauses, SECRET),
        "the secret is in the pause snapshot"
    );
    let (status, resumed) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let got = sh(
        &Runtime::of(&resumed),
        "curl -sS -m 20 https://origin.test:8443/after-resume",
    )
    .await;
    assert_eq!(got, "hello from the origin", "after a resume");

    for sbx in [
        id.as_str(),
        forked["sandboxes"][0]["sandboxID"].as_str().unwrap(),
    ] {
        assert_eq!(api.delete(sbx).await, StatusCode::NO_CONTENT);
    }
}
