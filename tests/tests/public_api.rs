//! The public API end to end: the real wasm component in the real api-host, in front of a
//! real pool manager booting real VMs.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::{process_alive, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// A raw call to the public API: method, path under `/api/v1`, headers, body.
async fn raw(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}/api/v1{path}", stack.api.url));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.timeout(Duration::from_secs(60)).send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts an error response: status, code, and that the message mentions `needle`.
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, needle: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["code"], code, "{}", got.1);
    let message = got.1["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn create_command_files_delete_through_the_public_api() {
    let stack = Stack::start("public-e2e");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": small(),
            "envVars": { "GREETING": "hi from the component" },
            "metadata": { "suite": "public" },
            "timeout": 120
        }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(sbx["state"], "running", "{sbx}");

    // Commands and files go to the data plane the create answered with.
    let rt = Runtime::of(&sbx);
    let (out, _, code) = rt
        .run("echo $GREETING; cat /proc/cpuinfo | grep -c processor")
        .await;
    assert_eq!(code, 0);
    assert_eq!(out, "hi from the component\n1\n");
    let put = rt
        .http
        .put(format!("{}/files?path=/workspace/notes.txt", rt.base))
        .bearer_auth(&rt.token)
        .body("written through the public API")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let (out, _, _) = rt.run("cat /workspace/notes.txt").await;
    assert_eq!(out, "written through the public API");

    // Detail with a projection, list with a metadata filter: through the component.
    let (status, v) = api
        .fetch(&format!("/v1/sandboxes/{id}?fields=state,metadata"))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({ "sandboxID": id, "state": "running", "metadata": { "suite": "public" } })
    );
    let (status, v) = api.fetch("/v1/sandboxes?metadata=suite%3Dpublic").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["sandboxes"].as_array().unwrap().len(), 1);
    // The seeds' names for the ID and the state, answered under those names.
    let (status, v) = api
        .fetch("/v1/sandboxes?metadata=suite%3Dpublic&fields=id,status")
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["sandboxes"],
        json!([{ "sandboxID": id, "id": id, "status": "running" }])
    );
    // A security policy that is not one is refused, naming the field: its shape by the
    // component, its rules by the pool manager behind it.
    for (policy, says) in [
        (json!("yes"), "must be an object"),
        (
            json!({ "pii": { "detectors": { "card": "shred" } } }),
            "unknown variant",
        ),
        (
            json!({ "audit": { "enabled": true }, "firewall": {} }),
            "unknown field",
        ),
    ] {
        let (status, v) = api
            .post(
                "/v1/sandboxes",
                json!({ "templateID": "minimal", "securityPolicy": policy }),
            )
            .await;
        assert_eq!(
            (status, v["details"]["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("securityPolicy")),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains(says), "{v}");
    }

    // Lifecycle through the component: timeout, pause, resume.
    let (status, v) = api
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({ "timeout": 90 }),
        )
        .await;
    assert_eq!(
        (status, v["timeout"].as_u64()),
        (StatusCode::OK, Some(90)),
        "{v}"
    );
    // Twice: a resumed VM's disk sits on its pause snapshot, which the second pause
    // must neither overwrite nor need.
    for round in 1..=2 {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
            .await;
        assert_eq!(
            (status, v["state"].as_str()),
            (StatusCode::OK, Some("paused")),
            "{v}"
        );
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
            .await;
        assert_eq!(
            (status, v["state"].as_str()),
            (StatusCode::OK, Some("running")),
            "{v}"
        );
        let rt = Runtime::of(&v);
        let (out, _, _) = rt
            .run(&format!(
                "cat /workspace/notes.txt; echo {round} >> /workspace/rounds"
            ))
            .await;
        assert_eq!(out, "written through the public API");
    }
    let (_, v) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    let (out, _, _) = Runtime::of(&v).run("cat /workspace/rounds").await;
    assert_eq!(out, "1\n2\n");

    // Delete ends the VM.
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    assert_eq!(
        api.delete(&id).await,
        StatusCode::NOT_FOUND,
        "a second delete says it found nothing to end"
    );
    let pauses = stack.daemon.state_dir().join("pauses").join(&id);
    assert!(!pauses.exists(), "{} outlived the delete", pauses.display());
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}")).await;
    assert!(
        status == StatusCode::NOT_FOUND || v["state"] == "deleted",
        "{status} {v}"
    );
    let (_, v) = api.fetch("/v1/sandboxes").await;
    assert_eq!(
        v["sandboxes"],
        json!([]),
        "deleted sandboxes leave the default list"
    );
    assert!(
        !std::process::Command::new("pgrep")
            .args(["-f", &id])
            .status()
            .unwrap()
            .success(),
        "no process of {id} outlives its delete"
    );
}

#[tokio::test]
async fn keys_are_required_and_teams_see_only_their_own() {
    let stack = Stack::start("public-auth");
    let acme = stack.public(stack.daemon.team_key("acme"));
    let other = stack.public(stack.daemon.team_key("other"));
    let sbx = acme
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let get = reqwest::Method::GET;

    // No key, a malformed key, a well-formed key nobody issued.
    let none = raw(&stack, get.clone(), &format!("/sandboxes/{id}"), &[], None).await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized", "X-API-Key");
    let malformed = raw(
        &stack,
        get.clone(),
        "/sandboxes",
        &[("X-API-Key", "hunter2")],
        None,
    )
    .await;
    assert_error(
        &malformed,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "malformed",
    );
    let unknown = raw(
        &stack,
        get.clone(),
        "/sandboxes",
        &[(
            "Authorization",
            "Bearer ns_0123456789abcdef0123456789abcdef",
        )],
        None,
    )
    .await;
    assert_error(
        &unknown,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "unknown API key",
    );

    // Both header forms work for the owner.
    let bearer = format!("Bearer {}", acme.key);
    let (status, v) = raw(
        &stack,
        get.clone(),
        &format!("/sandboxes/{id}"),
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(
        (status, v["sandboxID"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );

    // Another team: 404 on everything, and an empty list.
    let (status, v) = other.fetch(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    let (status, _) = other
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(other.delete(&id).await, StatusCode::NOT_FOUND);
    let (_, v) = other.fetch("/v1/sandboxes").await;
    assert_eq!(v["sandboxes"], json!([]));
    // Still running for its owner.
    assert_eq!(acme.get(&id).await["state"], "running");
    assert_eq!(acme.delete(&id).await, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn bad_requests_are_refused_by_the_component_with_what_to_send() {
    let stack = Stack::start("public-validation");
    let key = stack.daemon.team_key("acme");
    let auth = [("X-API-Key", key.as_str())];
    let post = reqwest::Method::POST;
    let create = |body: &str| {
        raw(
            &stack,
            post.clone(),
            "/sandboxes",
            &auth,
            Some(body.as_bytes().to_vec()),
        )
    };

    // Stale fields name their replacement; unknown fields are named.
    for (body, field, instead) in [
        (
            r#"{"templateID":"base","timeoutMs":1000}"#,
            "timeoutMs",
            "`timeout`",
        ),
        (
            r#"{"templateID":"base","autoResume":true}"#,
            "autoResume",
            "lifecycle.autoResume",
        ),
        (r#"{"templateID":"base","secure":true}"#, "secure", "token"),
        (
            r#"{"templateID":"base","allow_internet_access":false}"#,
            "allow_internet_access",
            "egress",
        ),
        (
            r#"{"templateID":"base","volumeMounts":{}}"#,
            "volumeMounts",
            "mounts",
        ),
    ] {
        let got = create(body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", instead);
        assert_eq!(got.1["details"]["field"], field, "{}", got.1);
    }
    let got = create(r#"{"templateID":"base","colour":"blue"}"#).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", "colour");
    assert_eq!(got.1["details"]["field"], "colour");
    let got = create(r#"{"templateID":"base","lifecycle":{"onTimeout":"pause","extra":1}}"#).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", "extra");

    // Bad JSON, a non-object, wrong types, out-of-range values.
    let got = create(r#"{"templateID":"#).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "not valid JSON",
    );
    let got = create("[1,2]").await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "JSON object",
    );
    let got = create(r#"{"templateID":"base","timeout":"soon"}"#).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "invalid type",
    );
    let got = create(r#"{"templateID":"base","timeout":0}"#).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "send seconds from 1",
    );
    // Egress and mount checks run in the component: nothing reaches a pool manager.
    let got = create(r#"{"templateID":"base","egress":{"allow":["not a host"]}}"#).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "egress.allow[0]",
    );
    let got = create(r#"{"templateID":"base","mounts":{"/proc":{"id":"v"}}}"#).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "system directory",
    );
    let got = create(r#"{"templateID":"no-such-template"}"#).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found", "no-such-template");
    // Seed 002's start sources: exactly one, each pin with its name; one shape.
    for (body, needle) in [
        (r#"{"timeout":60}"#, "got none"),
        (
            r#"{"templateID":"base","snapshotName":"s"}"#,
            "templateID and snapshotName",
        ),
        (
            r#"{"templateID":"base","imageId":"tpl-0123456789abcdef"}"#,
            "together with imageName",
        ),
        (
            r#"{"templateID":"base","vcpus":1,"resources":{"vcpus":1,"memMiB":512,"diskSizeMiB":1024}}"#,
            "not both",
        ),
        (r#"{"templateID":"base","region":"eu"}"#, "no regions"),
    ] {
        let got = create(body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", needle);
    }
    let got = create(r#"{"imageName":"no-such-image"}"#).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found", "no-such-image");

    // Oversized bodies, declared and chunked.
    let big = vec![b' '; 2 << 20];
    let got = create(std::str::from_utf8(&big).unwrap()).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "too_large", "1048576");
    let chunks =
        futures::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/sandboxes", stack.api.url))
        .header("X-API-Key", &key)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Routes, methods, query parameters, IDs.
    let get = reqwest::Method::GET;
    let got = raw(&stack, get.clone(), "/nothing-here", &auth, None).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found", "openapi.json");
    let got = raw(&stack, reqwest::Method::PUT, "/sandboxes", &auth, None).await;
    assert_error(
        &got,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "POST or GET",
    );
    assert_eq!(got.1["details"]["allowed"], json!(["POST", "GET"]));
    let got = raw(&stack, get.clone(), "/sandboxes?limit=0", &auth, None).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "send 1 to 100",
    );
    let got = raw(&stack, get.clone(), "/sandboxes?colour=blue", &auth, None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", "colour");
    let got = raw(&stack, get.clone(), "/sandboxes?state=active", &auth, None).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request", "running");
    let got = raw(&stack, get.clone(), "/sandboxes?fields=secret", &auth, None).await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "sandboxID",
    );
    let got = raw(&stack, get.clone(), "/sandboxes/not-an-id", &auth, None).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found", "not-an-id");
    let got = raw(
        &stack,
        post.clone(),
        "/sandboxes/sbx-0123456789abcdef0123/timeout",
        &auth,
        Some(b"{}".to_vec()),
    )
    .await;
    assert_error(
        &got,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "timeout is required",
    );

    // The contract is served, and names every route the component answers.
    let (status, doc) = raw(&stack, get, "/openapi.json", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/sandboxes",
        "/api/v1/sandboxes/{id}",
        "/api/v1/sandboxes/{id}/connect",
        "/api/v1/sandboxes/{id}/pause",
        "/api/v1/sandboxes/{id}/resume",
        "/api/v1/sandboxes/{id}/refreshes",
        "/api/v1/sandboxes/{id}/timeout",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi.json lacks {path}");
    }
}

#[tokio::test]
async fn a_team_quota_caps_live_sandboxes() {
    let stack = Stack::start("public-quota");
    stack
        .daemon
        .admin(&["team", "create", "tiny", "--max-sandboxes", "1"]);
    let api = stack.public(stack.daemon.admin(&["key", "create", "--team", "tiny"]));
    let first = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "resources": small() }),
        )
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("quota_exceeded")),
        "{v}"
    );
    assert_eq!(v["details"]["quota"], "sandboxes", "{v}");
    assert_eq!(v["details"]["limit"], 1, "{v}");
    // Deleting frees the slot.
    assert_eq!(
        api.delete(first["sandboxID"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );
    let second = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    assert_eq!(second["state"], "running");
}

#[tokio::test]
async fn the_api_host_stops_on_sigterm_and_a_new_one_takes_over() {
    let mut stack = Stack::start("public-shutdown");
    let api: Api = stack.public(stack.daemon.team_key("acme"));
    let (status, _) = api.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK);
    let daemon_pid = stack.daemon.pid();
    // Replacing the host drops the old one: SIGTERM, and it must exit within 30 s.
    stack.api = nullspace_tests::ApiHost::start(&stack.daemon.control, &["--max-concurrent", "4"]);
    assert!(process_alive(daemon_pid));
    let api = stack.public(api.key.clone());
    let (status, _) = api.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn seed_002_start_sources_top_level_shapes_and_named_snapshots() {
    let stack = Stack::start("public-sources");
    let api = stack.public(stack.daemon.team_key("acme"));
    // A built-in image by name with the top-level shape; `failed` names the error state.
    let sbx = api
        .create(json!({ "imageName": "minimal", "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 }))
        .await;
    assert_eq!(sbx["resources"], small(), "{sbx}");
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let (status, v) = api.fetch("/v1/sandboxes?state=failed").await;
    assert_eq!(
        (status, &v["sandboxes"]),
        (StatusCode::OK, &json!([])),
        "{v}"
    );
    let (out, _, _) = Runtime::of(&sbx)
        .run("echo two > /workspace/seed && cat /workspace/seed")
        .await;
    assert_eq!(out, "two\n");

    // A named snapshot: names are the team's, checked, and listed.
    let snaps = format!("/v1/sandboxes/{id}/snapshots");
    let (status, snap) = api.post(&snaps, json!({ "name": "seed-two" })).await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    assert_eq!(snap["name"], "seed-two", "{snap}");
    let snap_id = snap["snapshotID"].as_str().unwrap().to_string();
    let (status, v) = api.post(&snaps, json!({ "name": "seed-two" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = api.post(&snaps, json!({ "name": "snap-1" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (_, listed) = api.fetch(&snaps).await;
    assert_eq!(listed["snapshots"][0]["name"], "seed-two", "{listed}");

    // Started from it by name, pinned to its ID: the state it had.
    let child = api
        .create(json!({ "snapshotName": "seed-two", "snapshotId": snap_id, "resources": small() }))
        .await;
    assert_eq!(child["templateID"], json!(snap_id), "{child}");
    let (out, _, _) = Runtime::of(&child).run("cat /workspace/seed").await;
    assert_eq!(out, "two\n");
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "snapshotName": "seed-two", "snapshotId": "snap-00000000000000000000" }),
        )
        .await;
    assert_eq!(
        (status, v["details"]["current"].as_str()),
        (StatusCode::CONFLICT, Some(snap_id.as_str())),
        "{v}"
    );
    api.delete(child["sandboxID"].as_str().unwrap()).await;

    // Deleted, its name is free and finds nothing.
    let (status, v) = api
        .call(reqwest::Method::DELETE, &format!("{snaps}/{snap_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = api
        .post("/v1/sandboxes", json!({ "snapshotName": "seed-two" }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    api.delete(&id).await;
}

/// `POST files/presign` on the data plane: its status and body.
async fn presign(rt: &Runtime, body: Value) -> (StatusCode, Value) {
    let resp = rt.post("/files/presign", body).await;
    let status = resp.status();
    (status, resp.json::<Value>().await.unwrap())
}

#[tokio::test]
async fn presigned_urls_read_and_write_one_path_without_the_token() {
    let stack = Stack::start("public-presign");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let rt = Runtime::of(&sbx);
    rt.put_file("/workspace/report.csv", b"a,b\n1,2\n").await;
    let anon = reqwest::Client::new();

    // GET: the file, with no credential but the URL.
    let (status, get) = presign(
        &rt,
        json!({ "path": "/workspace/report.csv", "expires": 60 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{get}");
    assert_eq!(get["method"], "GET", "{get}");
    let url = get["url"].as_str().unwrap().to_string();
    let resp = anon.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"a,b\n1,2\n");
    // Bound to its method and path: a PUT with it, or another path, is refused.
    let resp = anon.put(&url).body("overwritten").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let other = url.replacen("report.csv", "secret.txt", 1);
    assert_eq!(
        anon.get(&other).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let forged = format!("{}x", &url[..url.len() - 1]);
    assert_eq!(
        anon.get(&forged).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // PUT: the body becomes the file.
    let (status, put) = presign(
        &rt,
        json!({ "path": "/workspace/upload.bin", "method": "PUT" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{put}");
    let resp = anon
        .put(put["url"].as_str().unwrap())
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        rt.read_file("/workspace/upload.bin").await.unwrap(),
        vec![7u8; 100_000]
    );

    // Bad requests say what to send; an expired URL is refused.
    for (body, needle) in [
        (json!({ "path": "/a", "method": "DELETE" }), "GET"),
        (json!({ "path": "/a", "expires": 0 }), "1 to 86400"),
        (json!({ "path": "" }), "path"),
    ] {
        let (status, v) = presign(&rt, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    // A connect (which revokes runtime tokens) revokes what they presigned.
    let (_, before) = presign(&rt, json!({ "path": "/workspace/report.csv" })).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    let (status, connected) = api
        .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    assert_eq!(
        anon.get(before["url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let rt = Runtime::of(&connected);
    let (_, short) = presign(
        &rt,
        json!({ "path": "/workspace/report.csv", "expires": 1 }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = anon
        .get(short["url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Its sandbox gone, its URLs are.
    let (_, last) = presign(&rt, json!({ "path": "/workspace/report.csv" })).await;
    api.delete(id).await;
    assert_eq!(
        anon.get(last["url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

/// The public API served in the pool manager's own process (`--public-listen`, as
/// `deploy/up.sh` runs it): the same component and host, its calls dispatched to the
/// control routes without a socket. Reads run on the listener's threads, changes on the
/// daemon's runtime; both must behave as through `nullspace-api`.
#[tokio::test]
async fn the_pool_manager_serves_the_public_api_in_process() {
    let stack = Stack::start_in_process("public-in-process");
    let public = stack.daemon.public.clone().expect("a public API address");
    let key = stack.daemon.team_key("acme");
    let api = Api::at(&format!("{public}/api"), key.clone());
    let http = reqwest::Client::new();

    // Made by the component alone: no key, an unknown route, a stale field.
    let resp = http
        .get(format!("{public}/api/v1/sandboxes"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (status, v) = api.fetch("/v1/nowhere").await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "cpuCount": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // Answered by the pool manager: a key it does not know.
    let stranger = Api::at(
        &format!("{public}/api"),
        "ns_0123456789abcdef0123456789abcdef".into(),
    );
    let (status, v) = stranger.fetch("/v1/sandboxes").await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized")),
        "{v}"
    );

    // A whole lifecycle: create (the daemon's runtime), read, list, delete.
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(api.get(&id).await["state"], "running");
    let (status, page) = api.fetch("/v1/sandboxes?fields=sandboxID,state").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        page["sandboxes"],
        json!([{ "sandboxID": id, "state": "running" }])
    );
    // The same sandbox through nullspace-api (the control socket) and straight to the daemon.
    assert_eq!(stack.public(key.clone()).get(&id).await["sandboxID"], id);
    assert_eq!(Api::new(&stack.daemon, key).get(&id).await["sandboxID"], id);
    // Routes that never read their body (pause, resume): the component's body still
    // reaches them whole.
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert!(status.is_success(), "{status} {v}");
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
        .await;
    assert!(status.is_success(), "{status} {v}");
    assert_eq!(api.get(&id).await["state"], "running");
    // The command a create returns works, and the events name the create.
    let (status, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    assert!(events.to_string().contains("running"), "{events}");
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("deleted")),
        "{v}"
    );
    // Its metrics say it served all of that, and nothing failed in the host.
    let metrics = http
        .get(format!("{public}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("nullspace_api_responses_total{class=\"5xx\"} 0"),
        "{metrics}"
    );
    // One key's requests, one after another: its instance is kept between them.
    let kept = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nullspace_api_instances_total{instance=\"kept\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(kept >= 5, "{metrics}");
}

/// The dashboard's server side (issue 30): its pages and assets from the public API's
/// origin with their security headers, `dashboardUrl` in every sandbox response, data-
/// plane access that neither resumes nor revokes, CORS for the dashboard's origin only,
/// and the WebSocket credential a browser can send. The pages themselves are tested in
/// Chromium (deploy/test-dashboard.sh).
#[tokio::test]
async fn the_dashboard_is_served_and_every_sandbox_links_to_its_page() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stack = Stack::start_in_process("public-dashboard");
    let public = stack.daemon.public.clone().expect("a public API address");
    let key = stack.daemon.team_key("acme");
    let api = Api::at(&format!("{public}/api"), key.clone());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // The page, for any path under /dashboard/ (the app routes itself), with no key.
    let resp = http
        .get(format!("{public}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.headers()["location"], "/dashboard/");
    let mut index = String::new();
    for path in [
        "/dashboard/",
        "/dashboard/sandboxes/sbx-anything",
        "/dashboard/pools",
    ] {
        let resp = http.get(format!("{public}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with("text/html"),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for rule in [
            "script-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(csp.contains(rule), "{path}: {csp} lacks {rule}");
        }
        assert!(!csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(
            h.get("access-control-allow-origin").is_none(),
            "the public API's origin grants no other origin"
        );
        index = resp.text().await.unwrap();
    }
    // Every asset the page names is served, with its type; nothing inline.
    let assets: Vec<&str> = index
        .split('"')
        .filter(|s| s.starts_with("/dashboard/assets/"))
        .collect();
    assert!(
        assets.len() >= 2,
        "the page names its script and styles: {index}"
    );
    assert!(
        !index.contains("<script>") && !index.contains("style="),
        "{index}"
    );
    for asset in assets {
        let resp = http.get(format!("{public}{asset}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{asset}");
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        let want = if asset.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        };
        assert!(kind.starts_with(want), "{asset}: {kind}");
        assert!(!resp.bytes().await.unwrap().is_empty(), "{asset}");
    }
    let resp = http
        .get(format!(
            "{public}/dashboard/assets/..%2F..%2Fapi%2Fv1%2Fhealth"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "only embedded assets are served"
    );
    let resp = http
        .get(format!("{public}/dashboard/assets/nothing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = http
        .post(format!("{public}/dashboard/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET");

    // dashboardUrl in create, detail and list (with fields=).
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 300 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let page = format!("{public}/dashboard/sandboxes/{id}");
    assert_eq!(sbx["dashboardUrl"], page.as_str(), "{sbx}");
    assert_eq!(api.get(&id).await["dashboardUrl"], page.as_str());
    let (status, v) = api
        .fetch("/v1/sandboxes?fields=sandboxID,dashboardUrl")
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["sandboxes"],
        json!([{ "sandboxID": id, "dashboardUrl": page }])
    );

    // Access for the dashboard: a working token, and the create's token still works.
    let (status, access) = api
        .post(&format!("/v1/sandboxes/{id}/access"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{access}");
    let dashboard_rt = Runtime::of(&access);
    let (out, _, _) = dashboard_rt.run("echo from-the-dashboard").await;
    assert_eq!(out, "from-the-dashboard\n");
    let (out, _, _) = Runtime::of(&sbx).run("echo still-mine").await;
    assert_eq!(out, "still-mine\n", "access ends no other client's token");
    let (status, v) = api
        .post(
            &format!("/v1/sandboxes/{id}/access"),
            json!({ "timeout": 5 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // CORS on the data plane: the dashboard's origin only.
    let edge = dashboard_rt.base.clone();
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{edge}/files/list?path=/"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
    };
    let origin: &'static str = Box::leak(public.clone().into_boxed_str());
    let resp = preflight(origin).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    let allowed = resp.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let resp = preflight("http://evil.example").await.unwrap();
    assert!(
        resp.headers().get("access-control-allow-origin").is_none(),
        "another origin is not allowed: {:?}",
        resp.headers()
    );
    let resp = http
        .get(format!("{edge}/files/list?path=/workspace"))
        .bearer_auth(&dashboard_rt.token)
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], origin);

    // A browser's WebSocket carries its credential as a subprotocol: the terminal with
    // the runtime token, the event stream with the API key; a wrong one is refused.
    let ws = |path: String, credential: String| {
        let url = format!("{edge}{path}").replacen("http://", "ws://", 1);
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert(
                "sec-websocket-protocol",
                format!("nullspace.v1, nullspace.auth.{credential}")
                    .parse()
                    .unwrap(),
            );
            tokio::time::timeout(
                Duration::from_secs(30),
                tokio_tungstenite::connect_async(req),
            )
            .await
            .expect("the handshake ends within 30 s")
        }
    };
    let (mut term, resp) = ws("/pty?cols=80&rows=24".into(), dashboard_rt.token.clone())
        .await
        .expect("the terminal opens with the token as a subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "nullspace.v1");
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    term.send(Message::Binary(b"echo dash-$((6*7))\n".to_vec().into()))
        .await
        .unwrap();
    let mut screen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !screen.contains("dash-42") {
        let msg = tokio::time::timeout_at(deadline, term.next())
            .await
            .expect("the terminal answers within 60 s")
            .expect("the terminal stays open")
            .unwrap();
        if let Message::Binary(b) = msg {
            screen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    drop(term);
    let (mut events, _) = ws("/lifecycle/ws".into(), key.clone())
        .await
        .expect("the event stream opens with the API key as a subprotocol");
    let first = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("the log is replayed")
        .unwrap()
        .unwrap();
    assert!(first.to_text().unwrap().contains("\"type\""), "{first}");
    drop(events);
    match ws("/pty".into(), "sbx-x.1.9999999999.forged".into()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!(
            "a forged credential opened a terminal: {:?}",
            other.map(|_| ())
        ),
    }

    // A paused sandbox gets no access (looking does not wake it), and stays paused.
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
        .await;
    assert!(status.is_success(), "{status} {v}");
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{id}/access"), json!({}))
        .await;
    assert_eq!(
        (status, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_state")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("resume"), "{v}");
    assert_eq!(api.get(&id).await["state"], "paused");
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}
