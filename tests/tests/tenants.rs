//! Tenants through the public API: operator and team keys, per-team quotas on every
//! resource, the create rate (429 with Retry-After), quotas checked before a warm
//! checkout, and API-key rotation and revocation.

use nullspace_tests::http::{small, Api};
use nullspace_tests::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The quota check named `name` in the team's summary.
async fn check(api: &Api, name: &str) -> Value {
    let (status, s) = api.fetch("/v1/observability/summary").await;
    assert_eq!(status, StatusCode::OK, "{s}");
    s["quotaChecks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no quota check {name}: {s}"))
}

fn refused(status: StatusCode, v: &Value, quota: &str) {
    assert_eq!(
        (status, v["code"].as_str(), v["details"]["quota"].as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            Some("quota_exceeded"),
            Some(quota)
        ),
        "{v}"
    );
}

#[tokio::test]
async fn operators_set_quotas_that_hold_on_every_resource_and_before_a_checkout() {
    let stack = Stack::start("tenants-quotas");
    let op = stack.public(stack.daemon.operator_key());

    // The operator makes a team with limits and issues its key.
    let (status, team) = op
        .post(
            "/v1/teams",
            json!({ "name": "blue", "limits": { "vcpus": 1, "volumes": 1, "volumeMiB": 100 } }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{team}");
    assert_eq!(team["limits"]["vcpus"], 1, "{team}");
    let (status, bad) = op.post("/v1/teams", json!({ "name": "operator" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, issued) = op.post("/v1/teams/blue/keys", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let blue = stack.public(issued["key"].as_str().unwrap().to_string());

    // Each key to its own routes.
    let (status, v) = blue.fetch("/v1/teams").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, v) = blue
        .call(
            Method::PUT,
            "/v1/teams/blue/quota",
            Some(json!({ "vcpus": 64 })),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, v) = op.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, v) = op
        .call(
            Method::PUT,
            "/v1/teams/blue/quota",
            Some(json!({ "cpus": 4 })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("cpus"), "{v}");

    // Volumes: count and bytes.
    let (status, v) = blue
        .post("/v1/volumes", json!({ "name": "v1", "sizeMiB": 64 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let v1 = v["volumeID"]
        .as_str()
        .or(v["id"].as_str())
        .unwrap()
        .to_string();
    let (status, v) = blue
        .post("/v1/volumes", json!({ "name": "v2", "sizeMiB": 16 }))
        .await;
    refused(status, &v, "volumes");
    let (status, _) = blue
        .call(Method::DELETE, &format!("/v1/volumes/{v1}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = blue
        .post("/v1/volumes", json!({ "name": "v3", "sizeMiB": 200 }))
        .await;
    refused(status, &v, "volumeMiB");

    // vCPUs: a 2-vCPU create is refused before anything starts.
    let mut two = small();
    two["vcpus"] = json!(2);
    let (status, v) = blue
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "resources": two }),
        )
        .await;
    refused(status, &v, "vcpus");
    let (_, list) = blue.fetch("/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    assert_eq!(check(&blue, "vcpus").await["limit"], 1);

    // Quota before checkout: the operator's pool holds one VM; a create the team's
    // quota refuses leaves it there.
    let pool = "/v1/templates/minimal/warm-pool";
    let (status, v) = op
        .call(
            Method::PUT,
            pool,
            Some(json!({ "size": 1, "resources": small() })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let deadline = Instant::now() + Duration::from_secs(180);
    while op.fetch(pool).await.1["ready"] != 1 {
        assert!(Instant::now() < deadline, "the pool never filled");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, v) = op
        .call(
            Method::PUT,
            "/v1/teams/blue/quota",
            Some(json!({ "sandboxes": 0 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["ownLimits"]["vcpus"], 1,
        "a patch keeps the other limits: {v}"
    );
    let (status, v) = blue
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "resources": small(), "warmPool": "require" }),
        )
        .await;
    refused(status, &v, "sandboxes");
    let (_, p) = op.fetch(pool).await;
    assert_eq!(
        (p["ready"].clone(), p["checkouts"].clone()),
        (json!(1), json!(0)),
        "{p}"
    );

    // The create rate: a burst of one, then 429 with Retry-After; the checkout spends
    // the token.
    let (status, v) = op
        .call(
            Method::PUT,
            "/v1/teams/blue/quota",
            Some(json!({ "sandboxes": 2, "vcpus": 2, "createBurst": 1, "createsPerMinute": 1, "snapshots": 0 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let warm = blue
        .create(json!({ "templateID": "minimal", "resources": small(), "warmPool": "require" }))
        .await;
    let response = blue
        .http
        .post(format!("{}/v1/sandboxes", blue.base))
        .header("X-API-Key", &blue.key)
        .json(&json!({ "templateID": "minimal", "resources": small() }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["code"], "rate_limited", "{v}");

    // Snapshots: a quota of none refuses a manual snapshot before it is taken.
    let id = warm["sandboxID"].as_str().unwrap();
    let (status, v) = blue
        .post(&format!("/v1/sandboxes/{id}/snapshots"), json!({}))
        .await;
    refused(status, &v, "snapshots");
    let c = check(&blue, "sandboxes").await;
    assert_eq!(
        (c["used"].clone(), c["limit"].clone()),
        (json!(1), json!(2)),
        "{c}"
    );
    let c = check(&blue, "createsPerMinute").await;
    assert_eq!(c["limit"], 1, "{c}");

    let (status, teams) = op.fetch("/v1/teams").await;
    assert_eq!(status, StatusCode::OK, "{teams}");
    assert_eq!(teams["teams"][0]["usage"]["sandboxes"], 1, "{teams}");
    assert_eq!(blue.delete(id).await, StatusCode::NO_CONTENT);
    let (status, _) = op
        .call(
            Method::PUT,
            pool,
            Some(json!({ "size": 0, "resources": small() })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn keys_rotate_and_revoke_and_never_cross_teams() {
    let stack = Stack::start("tenants-keys");
    let a = stack.public(stack.daemon.team_key("a"));
    let b = stack.public(stack.daemon.team_key("b"));

    let (status, keys) = a.fetch("/v1/keys").await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");
    let a_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    assert!(!keys.to_string().contains(&a.key), "never the key itself");
    let (_, b_keys) = b.fetch("/v1/keys").await;
    let b_id = b_keys["keys"][0]["id"].as_str().unwrap().to_string();

    // Another team's key is 404, like anything else of theirs.
    let (status, _) = a
        .call(Method::DELETE, &format!("/v1/keys/{b_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = a.post(&format!("/v1/keys/{b_id}/rotate"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = b.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK, "b's key still works");

    // Rotation with no grace: the old key ends at once, the new one works.
    let (status, v) = a
        .post(
            &format!("/v1/keys/{a_id}/rotate"),
            json!({ "graceSeconds": 0 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, gone) = a.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{gone}");
    let a2 = stack.public(v["key"].as_str().unwrap().to_string());
    let (status, _) = a2.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK);

    // Rotation with a grace: both work until it ends.
    let a2_id = v["id"].as_str().unwrap().to_string();
    let (status, v) = a2
        .post(
            &format!("/v1/keys/{a2_id}/rotate"),
            json!({ "graceSeconds": 600 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!(v["replaces"]["expiresAt"].is_string(), "{v}");
    let a3 = stack.public(v["key"].as_str().unwrap().to_string());
    assert_eq!(a2.fetch("/v1/sandboxes").await.0, StatusCode::OK);
    assert_eq!(a3.fetch("/v1/sandboxes").await.0, StatusCode::OK);
    // A key in its grace works, but mints no key that would outlive its rotation.
    let (status, v) = a2.post("/v1/keys", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, v) = a3
        .post(
            &format!("/v1/keys/{a2_id}/rotate"),
            json!({ "graceSeconds": 999999999 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // Revocation is immediate, including of the key that asks.
    let (status, _) = a3
        .call(Method::DELETE, &format!("/v1/keys/{a2_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(a2.fetch("/v1/sandboxes").await.0, StatusCode::UNAUTHORIZED);
    let (status, made) = a3.post("/v1/keys", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let a3_id = a3.fetch("/v1/keys").await.1["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = a3
        .call(Method::DELETE, &format!("/v1/keys/{a3_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(a3.fetch("/v1/sandboxes").await.0, StatusCode::UNAUTHORIZED);
    let a4 = stack.public(made["key"].as_str().unwrap().to_string());
    assert_eq!(a4.fetch("/v1/sandboxes").await.0, StatusCode::OK);

    // The admin command sees the same keys and revokes too.
    let listed = stack.daemon.admin(&["key", "list", "--team", "a"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let id: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    stack
        .daemon
        .admin(&["key", "revoke", id["id"].as_str().unwrap()]);
    assert_eq!(a4.fetch("/v1/sandboxes").await.0, StatusCode::UNAUTHORIZED);
    let quota = stack.daemon.admin(&[
        "team",
        "quota",
        "b",
        "--set",
        "vcpus=3",
        "--set",
        "createBurst=5",
    ]);
    let v: Value = serde_json::from_str(&quota).unwrap();
    assert_eq!(
        (
            v["limits"]["vcpus"].clone(),
            v["limits"]["createBurst"].clone()
        ),
        (json!(3), json!(5)),
        "{v}"
    );
}
