//! Egress policies, end to end through the public API: real VMs behind their own
//! network namespaces and the egress proxy, reaching test servers in a namespace this
//! test makes (never an outside address), names served by a real DNS server (dnsmasq).

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::netns::TestNet;
use nullspace_tests::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// What `curl` in the guest gets from `url` ("who:<addr> host:<host>", or "FAIL").
async fn fetch(rt: &Runtime, url: &str, extra: &str) -> String {
    let (out, _, _) = rt
        .run(&format!("curl -s -m 6 {extra} {url} || echo FAIL"))
        .await;
    out.trim().to_string()
}

struct Net {
    net: TestNet,
}

impl Net {
    /// Hosts .2 (allowed by IP), .3 (denied), .4 (allowed.test), .5 (blocked.test).
    fn start() -> Self {
        let mut net = TestNet::new(4);
        net.http_server(8080);
        let records = [("allowed.test", net.addr(4)), ("blocked.test", net.addr(5))];
        net.dns_server(&records);
        net.wait_tcp(&net.addr(2), 8080);
        Self { net }
    }
    fn url(&self, h: u8) -> String {
        format!("http://{}:8080/", self.net.addr(h))
    }
}

async fn set_egress(api: &Api, id: &str, policy: Value) -> (StatusCode, Value) {
    api.call(
        Method::PUT,
        &format!("/v1/sandboxes/{id}/egress"),
        Some(policy),
    )
    .await
}

/// The policy `internet: false, allow [.2, allowed.test]` seen from inside a guest.
async fn check_closed_policy(rt: &Runtime, n: &Net, what: &str) {
    let allowed = fetch(rt, &n.url(2), "").await;
    assert!(
        allowed.starts_with(&format!("who:{}", n.net.addr(2))),
        "{what}: allowed IP: {allowed}"
    );
    assert_eq!(
        fetch(rt, &n.url(3), "").await,
        "FAIL",
        "{what}: an address no rule names"
    );
    let by_name = fetch(rt, "http://allowed.test:8080/", "").await;
    assert!(
        by_name.starts_with(&format!("who:{} host:allowed.test", n.net.addr(4))),
        "{what}: allowed domain: {by_name}"
    );
    assert_eq!(
        fetch(rt, "http://blocked.test:8080/", "").await,
        "FAIL",
        "{what}: a domain no rule names"
    );
    // The name a client asks for counts, not only the address it resolved.
    assert_eq!(
        fetch(rt, "http://allowed.test:8080/", "-H 'Host: blocked.test'").await,
        "FAIL",
        "{what}: an allowed address asked for another name"
    );
}

/// The policy `internet: true, deny [.2, *.test]`.
async fn open_but_denied(rt: &Runtime, n: &Net) {
    assert_eq!(fetch(rt, &n.url(2), "").await, "FAIL", "denied IP");
    let other = fetch(rt, &n.url(3), "").await;
    assert!(other.starts_with("who:"), "internet on: {other}");
    assert_eq!(
        fetch(rt, "http://allowed.test:8080/", "").await,
        "FAIL",
        "denied wildcard"
    );
}

#[tokio::test]
async fn policies_are_enforced_on_the_host_changed_live_and_kept_by_fork_restore_and_resume() {
    let n = Net::start();
    let dns = format!("{}:53", n.net.addr(53));
    let stack = Stack::start_with(
        "egress",
        &["--network", "isolated", "--egress-dns", &dns],
        &[],
    );
    let api = stack.public(stack.daemon.team_key("acme"));

    // Refusals say what to send.
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "base", "egress": { "allow": ["10.0.0.0/99"] } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("egress.allow[0]"),
        "{v}"
    );

    let policy = json!({ "internet": false, "allow": [n.net.addr(2), "allowed.test"] });
    let sbx = api
        .create(json!({ "templateID": "base", "resources": small(), "egress": policy }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(sbx["egress"]["internet"], json!(false), "{sbx}");
    let rt = Runtime::of(&sbx);
    check_closed_policy(&rt, &n, "at create").await;

    // The guest cannot lift it: root in the guest owns nothing on the host's side.
    let (out, _, _) = rt
        .run("ip route replace default via 10.0.2.2 2>&1; curl -s -m 5 http://10.213.0.1/ || echo FAIL")
        .await;
    assert!(out.trim_end().ends_with("FAIL"), "{out}");

    // Forks and restores of a snapshot keep it.
    let (status, forked) = api
        .post(&format!("/v1/sandboxes/{id}/fork"), json!({ "count": 1 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let child = &forked["sandboxes"][0];
    check_closed_policy(&Runtime::of(child), &n, "fork child").await;
    let (status, snap) = api
        .post(&format!("/v1/sandboxes/{id}/snapshots"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let (status, restored) = api
        .post(
            "/v1/sandboxes/restore",
            json!({ "sandboxID": id, "snapshotID": snap["snapshotID"] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{restored}");
    check_closed_policy(&Runtime::of(&restored), &n, "restored copy").await;

    // A change applies at once, and a pause and resume keep it.
    let (status, v) = set_egress(
        &api,
        &id,
        json!({ "internet": true, "deny": [n.net.addr(2), "*.test"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["egress"]["deny"][1], json!("*.test"), "{v}");
    open_but_denied(&rt, &n).await;
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, resumed) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    open_but_denied(&Runtime::of(&resumed), &n).await;
    // The fork child kept its own (the parent's old) policy.
    assert_eq!(fetch(&Runtime::of(child), &n.url(3), "").await, "FAIL");

    let (status, v) = set_egress(&api, &id, json!({ "internet": "yes" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let other = stack.public(stack.daemon.team_key("other"));
    let (status, _) = set_egress(&other, &id, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A warm-pool checkout: the ready VM's proxy serves with nothing allowed until the
    // checkout sets the create's policy.
    let pool = "/v1/templates/base/warm-pool";
    let op = stack.public(stack.daemon.operator_key());
    let (status, v) = op
        .call(
            Method::PUT,
            pool,
            Some(json!({ "size": 1, "resources": small() })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let (_, v) = api.fetch(pool).await;
        if v["ready"] == json!(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let warm = api
        .create(json!({ "templateID": "base", "resources": small(), "warmPool": "require", "egress": policy }))
        .await;
    check_closed_policy(&Runtime::of(&warm), &n, "warm checkout").await;
    let (status, v) = op.call(Method::PUT, pool, Some(json!({ "size": 0 }))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        api.delete(warm["sandboxID"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );

    for s in [
        &id,
        child["sandboxID"].as_str().unwrap(),
        restored["sandboxID"].as_str().unwrap(),
    ] {
        assert_eq!(api.delete(s).await, StatusCode::NO_CONTENT);
    }
}
