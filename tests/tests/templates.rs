//! Custom template builds through the public API, with real VMs: steps, cached steps,
//! build logs, the start command and ready check, creates and a warm pool from a built
//! template, and what a failed build says.

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::Stack;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A shape every build here uses: base's root file system needs 1 GiB.
fn shape() -> Value {
    json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048 })
}

/// Starts a build; returns its template view.
async fn build(api: &Api, body: Value) -> Value {
    let (status, v) = api.post("/v1/templates", body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "building", "{v}");
    assert!(v["templateID"].as_str().unwrap().starts_with("tpl-"), "{v}");
    v
}

/// Follows a build's log to its end, the way the SDKs stream it: pages that wait for
/// new lines. Returns the lines and the template as it ended.
async fn follow(api: &Api, id: &str) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut after, mut lines) = (0u64, Vec::new());
    loop {
        let (status, page) = api
            .fetch(&format!("/v1/templates/{id}/logs?after={after}&wait=10"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let got = page["lines"].as_array().unwrap().clone();
        for l in &got {
            assert!(
                l["seq"].as_u64().unwrap() > after,
                "lines come in order, once: {l}"
            );
            after = l["seq"].as_u64().unwrap();
        }
        assert_eq!(page["next"], after);
        lines.extend(got.clone());
        if page["status"] != "building" && got.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the build of {id} never ended");
    }
    let (status, t) = api.fetch(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    (lines, t)
}

fn text(lines: &[Value]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "[{}] {}",
                l["stream"].as_str().unwrap(),
                l["text"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn step_statuses(t: &Value) -> Vec<String> {
    t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_string())
        .collect()
}

const STEPS: &str = r#"[
    {"env": {"GREETING": "hello", "PORT": "8000"}},
    {"files": [{"path": "/srv/www/index.html", "content": "template page", "mode": "0644"}]},
    {"run": "echo building $GREETING; echo to-stderr >&2; mkdir -p /opt/app && echo v1 > /opt/app/version"}
]"#;

#[tokio::test]
async fn a_template_builds_from_steps_caches_them_and_serves_creates_and_a_warm_pool() {
    let stack = Stack::start("templates");
    stack
        .daemon
        .admin(&["team", "create", "acme", "--max-sandboxes", "10"]);
    let key = stack.daemon.admin(&["key", "create", "--team", "acme"]);
    let api = stack.public(key);
    let other = stack.public(stack.daemon.team_key("other"));

    let mut steps: Vec<Value> = serde_json::from_str(STEPS).unwrap();
    steps.push(json!({ "run": "id -un > /tmp/who", "user": "user" }));
    let web = build(
        &api,
        json!({
            "name": "web", "from": "base", "resources": shape(), "steps": steps,
            "startCmd": "cd /srv/www && python3 -m http.server $PORT",
            "readyCmd": "curl -sf http://127.0.0.1:8000/index.html",
            "readyTimeout": 60
        }),
    )
    .await;
    let id = web["templateID"].as_str().unwrap().to_string();
    let (lines, t) = follow(&api, &id).await;
    let log = text(&lines);
    assert_eq!(t["status"], "ready", "{t}\n{log}");
    assert_eq!(step_statuses(&t), ["done", "done", "done", "done"], "{t}");
    assert!(log.contains("[stdout] building hello"), "{log}");
    assert!(log.contains("[stderr] to-stderr"), "{log}");
    assert!(log.contains("step 2 (run)"), "{log}");
    assert!(log.contains("ready in"), "{log}");
    assert_eq!(t["envVars"]["GREETING"], "hello", "{t}");
    eprintln!("first build: {} ms\n{log}", t["buildMs"]);
    assert_eq!(t["resources"], shape());

    // Listed with the built-ins; invisible to another team.
    let (_, list) = api.fetch("/v1/templates").await;
    let ids: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "minimal", id.as_str()], "{list}");
    let (status, _) = other.fetch(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = other
        .post("/v1/sandboxes", json!({ "templateID": id }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    // A sandbox of it (by name) starts ready: files, env, the started server, steps as
    // their users; a create's envVars win over the template's.
    let sbx = api
        .create(json!({ "templateID": "web", "envVars": { "PORT": "9000" } }))
        .await;
    assert_eq!(sbx["templateID"], id.as_str(), "{sbx}");
    let rt = Runtime::of(&sbx);
    let (page, _, code) = rt.run("curl -s http://127.0.0.1:8000/index.html").await;
    assert_eq!((page.as_str(), code), ("template page", 0));
    // The start command's output (the server's request log) is in the sandbox's logs,
    // and so is a background command's.
    let started = rt
        .post(
            "/commands",
            json!({ "cmd": "echo bg-out; echo bg-err >&2; sleep 60", "background": true }),
        )
        .await;
    assert_eq!(started.status(), StatusCode::CREATED);
    let sid = sbx["sandboxID"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let (status, v) = api.fetch(&format!("/v1/sandboxes/{sid}/logs")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let lines = v["logs"].as_array().unwrap().clone();
        let has = |source: &str, stream: &str, text: &str| {
            lines.iter().any(|l| {
                l["source"] == source
                    && l["stream"] == stream
                    && l["text"].as_str().unwrap_or("").contains(text)
            })
        };
        if has("start", "stderr", "GET /index.html")
            && has("process", "stdout", "bg-out")
            && has("process", "stderr", "bg-err")
        {
            break lines;
        }
        assert!(Instant::now() < deadline, "no application logs: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Paged: a page of one line says where the next starts.
    let (_, page) = api
        .fetch(&format!("/v1/sandboxes/{sid}/logs?limit=1&offset=1"))
        .await;
    assert_eq!(page["logs"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["logs"][0]["text"], logs[1]["text"], "{page}");
    assert_eq!(page["next"], 2, "{page}");
    // Seed 002's imageName finds it too; a stale imageId pin is a conflict.
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "imageName": "web", "imageId": "tpl-0000000000000000" }),
        )
        .await;
    assert_eq!(
        (status, v["details"]["current"].as_str()),
        (StatusCode::CONFLICT, Some(id.as_str())),
        "{v}"
    );
    let (out, _, _) = rt
        .run("cat /opt/app/version; echo $GREETING $PORT; cat /tmp/who")
        .await;
    assert_eq!(out, "v1\nhello 9000\nuser\n");
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": id, "resources": { "vcpus": 2, "memMiB": 512, "diskSizeMiB": 2048 } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // Same base and first steps: those come from the cache; only the changed one runs.
    let mut steps: Vec<Value> = serde_json::from_str(STEPS).unwrap();
    steps.push(json!({ "run": "echo changed > /tmp/changed" }));
    let second = build(
        &api,
        json!({ "name": "web-2", "from": "base", "resources": shape(), "steps": steps }),
    )
    .await;
    let second_id = second["templateID"].as_str().unwrap().to_string();
    let (lines, t2) = follow(&api, &second_id).await;
    let log = text(&lines);
    assert_eq!(t2["status"], "ready", "{t2}\n{log}");
    assert_eq!(
        step_statuses(&t2),
        ["cached", "cached", "cached", "done"],
        "{t2}"
    );
    assert!(log.contains("step 2 (run): cached"), "{log}");
    assert!(
        !log.contains("building hello"),
        "a cached step does not run again: {log}"
    );

    // A template built from a custom one inherits its disk and env.
    let third = build(
        &api,
        json!({ "from": "web-2", "steps": [{ "run": "cat /opt/app/version /tmp/changed > /tmp/inherited; echo $GREETING >> /tmp/inherited" }] }),
    )
    .await;
    let third_id = third["templateID"].as_str().unwrap().to_string();
    let (lines, t3) = follow(&api, &third_id).await;
    assert_eq!(t3["status"], "ready", "{t3}\n{}", text(&lines));
    assert_eq!(t3["from"], second_id.as_str());
    let sbx3 = api.create(json!({ "templateID": third_id })).await;
    let (out, _, _) = Runtime::of(&sbx3).run("cat /tmp/inherited").await;
    assert_eq!(out, "v1\nchanged\nhello\n");
    api.delete(sbx3["sandboxID"].as_str().unwrap()).await;

    // A warm pool of the custom template: a require checkout is its ready VM.
    let pool = format!("/v1/templates/{id}/warm-pool");
    let (status, v) = api
        .call(Method::PUT, &pool, Some(json!({ "size": 1 })))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["resources"], shape(), "{v}");
    let (status, _) = other
        .call(Method::PUT, &pool, Some(json!({ "size": 1 })))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = api.fetch(&pool).await;
        if v["ready"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool never filled: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, warm) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": id, "warmPool": "require", "envVars": { "PORT": "1" } }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{warm}");
    let wrt = Runtime::of(&warm);
    let (page, _, _) = wrt.run("curl -s http://127.0.0.1:8000/index.html").await;
    assert_eq!(page, "template page");
    let (out, _, _) = wrt.run("echo $GREETING $PORT").await;
    assert_eq!(out, "hello 1\n");

    // Deleting the template ends its pool; its sandboxes keep running.
    let (status, _) = api
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.fetch(&format!("/v1/templates/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .post("/v1/sandboxes", json!({ "templateID": "web" }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (out, _, code) = rt.run("cat /opt/app/version").await;
    assert_eq!((out.as_str(), code), ("v1\n", 0));
    let (out, _, _) = wrt.run("cat /opt/app/version").await;
    assert_eq!(out, "v1\n");
    for s in [&sbx, &warm] {
        api.delete(s["sandboxID"].as_str().unwrap()).await;
    }
    for t in [&second_id, &third_id] {
        let (status, _) = api
            .call(Method::DELETE, &format!("/v1/templates/{t}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn a_failed_build_says_which_step_failed_and_why() {
    let stack = Stack::start("template-failures");
    let api = stack.public(stack.daemon.team_key("acme"));

    // Refused before anything runs, with what to send instead.
    for (body, says) in [
        (
            json!({ "steps": [{ "run": "true", "env": { "A": "1" } }] }),
            "exactly one of",
        ),
        (
            json!({ "steps": [{ "packages": ["-o", "x"] }] }),
            "not a Debian package name",
        ),
        (
            json!({ "steps": [], "readyTimeout": 5 }),
            "needs a readyCmd",
        ),
        (json!({ "from": "nope" }), "template"),
        (json!({ "name": "base" }), "not usable"),
    ] {
        let (status, v) = api.post("/v1/templates", body.clone()).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{body}: {status} {v}"
        );
        assert!(v["message"].as_str().unwrap().contains(says), "{body}: {v}");
    }

    // A failing command: its step, exit code and output; later steps skipped.
    let failing = build(
        &api,
        json!({
            "name": "broken", "resources": shape(),
            "steps": [
                { "run": "echo fine" },
                { "run": "echo about to fail; echo 'no such thing' >&2; exit 3" },
                { "run": "echo never" }
            ]
        }),
    )
    .await;
    let id = failing["templateID"].as_str().unwrap().to_string();
    let (lines, t) = follow(&api, &id).await;
    let log = text(&lines);
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(step_statuses(&t), ["done", "failed", "skipped"], "{t}");
    let e = &t["error"];
    assert_eq!(e["phase"], "step", "{e}");
    assert_eq!(e["step"], 1, "{e}");
    assert_eq!(e["exitCode"], 3, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("step 1 (run) exited with code 3"),
        "{e}"
    );
    assert!(
        e["outputTail"].as_str().unwrap().contains("no such thing"),
        "{e}"
    );
    assert!(!e["action"].as_str().unwrap().is_empty(), "{e}");
    assert!(
        log.contains("[stdout] about to fail") && !log.contains("never"),
        "{log}"
    );
    assert!(
        log.contains("build failed: step 1 (run) exited with code 3"),
        "{log}"
    );
    // Not usable, and the name is taken until it is deleted.
    let (status, v) = api
        .post("/v1/sandboxes", json!({ "templateID": "broken" }))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("failed"), "{v}");
    let (status, v) = api
        .post(
            "/v1/templates",
            json!({ "name": "broken", "resources": shape() }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    // A step past its timeout; a start command that exits; a ready check that never
    // passes.
    for (body, phase, says, tail) in [
        (
            json!({ "resources": shape(), "steps": [{ "run": "echo waiting; sleep 60", "timeout": 2 }] }),
            "step",
            "did not finish within 2 s",
            "waiting",
        ),
        (
            json!({ "resources": shape(), "startCmd": "echo starting up; exit 7", "readyCmd": "false", "readyTimeout": 30 }),
            "start",
            "exit code 7",
            "starting up",
        ),
        (
            json!({ "resources": shape(), "startCmd": "echo serving; sleep 600", "readyCmd": "echo not yet; false", "readyTimeout": 3 }),
            "ready",
            "did not pass within 3 s; its last attempt: exit code 1: not yet",
            "serving",
        ),
    ] {
        let v = build(&api, body.clone()).await;
        let (_, t) = follow(&api, v["templateID"].as_str().unwrap()).await;
        assert_eq!(t["status"], "failed", "{body}: {t}");
        assert_eq!(t["error"]["phase"], phase, "{body}: {t}");
        assert!(
            t["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {t}"
        );
        assert!(
            t["error"]["outputTail"].as_str().unwrap().contains(tail),
            "{body}: {t}"
        );
    }

    // Two builds at a time per team; a delete cancels a running one.
    let slow = json!({ "resources": shape(), "steps": [{ "run": "sleep 600" }] });
    let a = build(&api, slow.clone()).await;
    let b = build(&api, slow.clone()).await;
    let (status, v) = api.post("/v1/templates", slow).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(
        (v["code"].as_str(), v["details"]["quota"].as_str()),
        (Some("quota_exceeded"), Some("builds")),
        "{v}"
    );
    for t in [&a, &b] {
        let path = format!("/v1/templates/{}", t["templateID"].as_str().unwrap());
        let (status, _) = api.call(Method::DELETE, &path, None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = api.fetch(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

/// The text of a template's log lines so far (one page, not waiting).
async fn log_now(api: &Api, id: &str) -> String {
    let (status, page) = api
        .fetch(&format!("/v1/templates/{id}/logs?after=0&wait=0"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    text(page["lines"].as_array().unwrap())
}

#[tokio::test]
async fn builds_take_turns_by_team_and_a_log_stops_at_its_cap() {
    let stack = Stack::start("template-queue");
    let a = stack.public(stack.daemon.team_key("red"));
    let b = stack.public(stack.daemon.team_key("blue"));
    let id = |v: &Value| v["templateID"].as_str().unwrap().to_string();

    // Team a takes the host's build slot and queues a second build; team b's build,
    // sent after it, goes first.
    let slow = json!({ "resources": shape(), "steps": [{ "run": "sleep 600" }] });
    let a1 = id(&build(&a, slow.clone()).await);
    let a2 = id(&build(&a, slow).await);
    // About 5 MB of output, past the 4 MiB a build's log keeps, then a failure.
    let loud = json!({
        "resources": shape(),
        "steps": [{ "run": "yes \"$(printf '%0999d' 0)\" | head -n 5000; echo end-of-$((40 + 2)); exit 1" }]
    });
    let b1 = id(&build(&b, loud).await);
    let log = log_now(&a, &a2).await;
    assert!(log.starts_with("[build] queued at position 1"), "{log}");
    let log = log_now(&b, &b1).await;
    assert!(log.starts_with("[build] queued at position 1"), "{log}");
    assert!(log_now(&a, &a1).await.contains("building"));

    // Deleting the running build hands the slot on: to team b, not to a2.
    let (status, _) = a
        .call(Method::DELETE, &format!("/v1/templates/{a1}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log_now(&b, &b1).await.contains("[build] building") {
        assert!(Instant::now() < deadline, "b1 never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = log_now(&a, &a2).await;
    assert!(
        !log.contains("[build] building"),
        "a2 waits its turn: {log}"
    );

    // The log keeps 4 MiB of output and one line saying the rest was cut; the
    // failure's output tail still has the last lines.
    let (lines, t) = follow(&b, &b1).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["phase"], "step", "{t}");
    let output: usize = lines
        .iter()
        .filter(|l| l["stream"] != "build")
        .map(|l| l["text"].as_str().unwrap().len())
        .sum();
    assert!(
        output > 4_000_000 && output <= 4 << 20,
        "{output} bytes of output"
    );
    let truncated: Vec<&Value> = lines
        .iter()
        .filter(|l| l["text"].as_str().unwrap().contains("log truncated after"))
        .collect();
    assert_eq!(truncated.len(), 1, "{truncated:?}");
    assert_eq!(truncated[0]["stream"], "build");
    let log = text(&lines);
    assert!(!log.contains("end-of-42"), "nothing past the cap is stored");
    assert!(log.contains("build failed: step 0 (run) exited with code 1"));
    assert!(
        t["error"]["outputTail"]
            .as_str()
            .unwrap()
            .ends_with("end-of-42"),
        "{t}"
    );

    // Then a2 has its turn; deleting it cancels it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log_now(&a, &a2).await.contains("[build] building") {
        assert!(Instant::now() < deadline, "a2 never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (api, t) in [(&a, &a2), (&b, &b1)] {
        let (status, _) = api
            .call(Method::DELETE, &format!("/v1/templates/{t}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}
