//! Snapshots in object storage, end to end through the public API: real VMs, the real
//! wasm component, and a real S3 server (SeaweedFS, `NULLSPACE_TEST_S3`).

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::{s3_flags, SmallFs, Stack, S3_ENV};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A bucket of its own per test run.
fn bucket(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

fn flags(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

/// What a sandbox holds in memory (a tmpfs file and a running process) and on disk.
struct Marks {
    value: String,
    pid: u64,
}

async fn mark(rt: &Runtime) -> Marks {
    let (out, _, code) = rt
        .run("cat /proc/sys/kernel/random/uuid > /tmp/value; echo disk-$(cat /tmp/value) > /workspace/disk.txt; sync; cat /tmp/value")
        .await;
    assert_eq!(code, 0);
    let started: Value = rt
        .post(
            "/commands",
            json!({ "cmd": "sleep 1000", "background": true }),
        )
        .await
        .json()
        .await
        .unwrap();
    Marks {
        value: out.trim().to_string(),
        pid: started["pid"].as_u64().expect("a pid"),
    }
}

/// Asserts the memory value, the disk file and the process all survived.
async fn check(rt: &Runtime, m: &Marks, what: &str) {
    let (out, _, _) = rt.run("cat /tmp/value; cat /workspace/disk.txt").await;
    assert_eq!(
        out,
        format!("{}\ndisk-{}\n", m.value, m.value),
        "{what}: memory or disk lost"
    );
    let listed: Value = rt.get("/commands").await.json().await.unwrap();
    let sleeper = listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(m.pid))
        .unwrap_or_else(|| panic!("{what}: the background process is gone: {listed}"));
    assert!(sleeper.get("exit").is_none(), "{what}: {sleeper}");
}

async fn snapshot(api: &Api, id: &str) -> (StatusCode, Value) {
    api.post(&format!("/v1/sandboxes/{id}/snapshots"), json!({}))
        .await
}

async fn list(api: &Api, id: &str) -> Vec<Value> {
    let (status, v) = api.fetch(&format!("/v1/sandboxes/{id}/snapshots")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["snapshots"].as_array().unwrap().clone()
}

fn kinds(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["kind"].as_str().unwrap(),
                s["storage"].as_str().unwrap()
            )
        })
        .collect()
}

async fn restore(api: &Api, body: Value) -> (StatusCode, Value) {
    api.post("/v1/sandboxes/restore", body).await
}

fn id_of(v: &Value) -> String {
    v["sandboxID"].as_str().unwrap().to_string()
}

/// A stack on the default local-directory store with one `minimal` sandbox and one
/// snapshot of it: the stack, a caller, the sandbox's ID and the snapshot's stored
/// manifest (a test may damage what the store holds in place).
async fn snapshot_in_local_store(name: &str) -> (Stack, Api, String, std::path::PathBuf) {
    let stack = Stack::start(name);
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = id_of(&sbx);
    let (status, snap) = snapshot(&api, &id).await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let manifest_path = stack
        .daemon
        .state_dir()
        .join("objects")
        .join("snapshots")
        .join(&id)
        .join(format!("{}.json", snap["snapshotID"].as_str().unwrap()));
    (stack, api, id, manifest_path)
}

#[tokio::test]
async fn hibernated_sandboxes_restore_and_resume_on_a_second_worker_sharing_the_bucket() {
    let bucket = bucket("hibernate");
    let s3 = s3_flags(&bucket);
    let a = Stack::start_with("snap-worker-a", &flags(&s3), S3_ENV);
    let b = Stack::start_with("snap-worker-b", &flags(&s3), S3_ENV);
    let key = a.daemon.mirrored_team_key(&b.daemon, "acme");
    let (on_a, on_b) = (a.public(key.clone()), b.public(key));

    let sbx = on_a
        .create(
            json!({ "templateID": "minimal", "resources": small(), "metadata": { "app": "hib" } }),
        )
        .await;
    let id = id_of(&sbx);
    let marks = mark(&Runtime::of(&sbx)).await;
    let (status, manual) = snapshot(&on_a, &id).await;
    assert_eq!(status, StatusCode::CREATED, "{manual}");
    assert_eq!(manual["kind"], "manual");
    assert_eq!(manual["storage"], "object");

    let (status, v) = on_a
        .post(&format!("/v1/sandboxes/{id}/hibernate"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["hibernated"].as_bool()),
        (Some("paused"), Some(true))
    );
    // Nothing of it is left on worker A's disk.
    let pauses = a.daemon.state_dir().join("pauses").join(&id);
    assert!(
        std::fs::read_dir(&pauses).map(|d| d.count()).unwrap_or(0) == 0,
        "hibernate left a local copy in {}",
        pauses.display()
    );
    assert_eq!(
        kinds(&list(&on_a, &id).await),
        ["pause/object", "manual/object"]
    );

    // Worker B never saw the sandbox: it finds the snapshots in the bucket by its ID.
    assert_eq!(
        kinds(&list(&on_b, &id).await),
        ["pause/object", "manual/object"]
    );
    let (status, copy) = restore(&on_b, json!({ "sandboxID": id })).await;
    assert_eq!(status, StatusCode::CREATED, "{copy}");
    assert_eq!(copy["state"], "running");
    assert_eq!(
        copy["metadata"]["app"], "hib",
        "labels travel with the snapshot"
    );
    check(&Runtime::of(&copy), &marks, "restore on worker B").await;
    let b_dir = b.daemon.state_dir().display().to_string();
    assert!(
        !copy
            .to_string()
            .contains(&a.daemon.state_dir().display().to_string()),
        "the restore on B refers to A's state dir ({b_dir})"
    );

    // The hibernated sandbox itself resumes on worker B, under its own ID; worker A can
    // no longer resume it, and the pause snapshot is consumed.
    let (status, resumed) = on_b
        .post(
            &format!("/v1/sandboxes/{id}/connect"),
            json!({ "timeout": 120 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(
        (
            resumed["sandboxID"].as_str(),
            resumed["hibernated"].as_bool()
        ),
        (Some(id.as_str()), Some(false))
    );
    check(&Runtime::of(&resumed), &marks, "resume on worker B").await;
    let (status, v) = on_a
        .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("another worker"),
        "{v}"
    );
    assert_eq!(kinds(&list(&on_b, &id).await), ["manual/object"]);

    for (api, id) in [(&on_b, &id), (&on_b, &id_of(&copy)), (&on_a, &id)] {
        assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
    }
    // Manual snapshots survive the kill.
    assert_eq!(kinds(&list(&on_b, &id).await), ["manual/object"]);
}

#[tokio::test]
async fn manual_snapshots_survive_kill_restore_serve_as_templates_and_fork() {
    let s3 = s3_flags(&bucket("manual"));
    let stack = Stack::start_with("snap-manual", &flags(&s3), S3_ENV);
    let api = stack.public(stack.daemon.team_key("acme"));
    let other = stack.public(stack.daemon.team_key("other"));

    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "envVars": { "WHO": "origin" } }))
        .await;
    let id = id_of(&sbx);
    let (_, _, code) = Runtime::of(&sbx)
        .run("echo kept > /workspace/kept.txt; sync")
        .await;
    assert_eq!(code, 0);
    let (status, snap) = snapshot(&api, &id).await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let snap_id = snap["snapshotID"].as_str().unwrap().to_string();
    assert!(snap["sizeBytes"].as_u64().unwrap() > 0, "{snap}");
    // Another team sees neither the snapshots nor the template.
    assert_eq!(
        other
            .fetch(&format!("/v1/sandboxes/{id}/snapshots"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (status, v) = other
        .post("/v1/sandboxes", json!({ "templateID": snap_id }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    assert_eq!(kinds(&list(&api, &id).await), ["manual/object"]);
    let (status, restored) = restore(&api, json!({ "sandboxID": id, "timeout": 120 })).await;
    assert_eq!(status, StatusCode::CREATED, "{restored}");
    let rt = Runtime::of(&restored);
    let (out, _, _) = rt.run("cat /workspace/kept.txt; echo $WHO").await;
    assert_eq!(out, "kept\norigin\n");

    // The snapshot as a template: its shape, or a bigger disk; not another memory size.
    let (status, v) = api
        .post("/v1/sandboxes", json!({ "templateID": snap_id, "resources": { "vcpus": 1, "memMiB": 1024, "diskSizeMiB": 1024 } }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("512 MiB"), "{v}");
    let from_template = api.create(json!({ "templateID": snap_id })).await;
    assert_eq!(from_template["templateID"], snap_id.as_str());
    assert_eq!(from_template["resources"], small());
    let (out, _, _) = Runtime::of(&from_template)
        .run("cat /workspace/kept.txt")
        .await;
    assert_eq!(out, "kept\n");

    // Fork the restored sandbox: children have its state, the parent keeps running, and
    // they no longer share writes.
    let (_, _, _) = rt.run("echo parent-only > /tmp/mem.txt").await;
    let (status, forked) = api
        .post(
            &format!("/v1/sandboxes/{}/fork", id_of(&restored)),
            json!({ "count": 2 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let children = forked["sandboxes"].as_array().unwrap().clone();
    assert_eq!(children.len(), 2);
    for (i, child) in children.iter().enumerate() {
        let crt = Runtime::of(child);
        let (out, _, _) = crt.run("cat /tmp/mem.txt /workspace/kept.txt").await;
        assert_eq!(out, "parent-only\nkept\n", "child {i}");
        crt.run(&format!("echo child-{i} > /workspace/kept.txt"))
            .await;
    }
    let (out, _, _) = rt.run("cat /workspace/kept.txt").await;
    assert_eq!(out, "kept\n", "a child's write reached the parent");
    let (status, _) = api
        .post(
            &format!("/v1/sandboxes/{}/fork", id_of(&restored)),
            json!({ "count": 17 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Deleting the snapshot: it is gone, and so are its unshared chunks.
    let (status, v) = api
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/snapshots/{snap_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = restore(&api, json!({ "sandboxID": id })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");

    for s in children.iter().chain([&restored, &from_template]) {
        assert_eq!(api.delete(&id_of(s)).await, StatusCode::NO_CONTENT);
    }
    let forks = stack.daemon.state_dir().join("forks");
    assert_eq!(
        std::fs::read_dir(&forks).map(|d| d.count()).unwrap_or(0),
        0,
        "fork snapshots outlived their children"
    );
}

#[tokio::test]
async fn a_failed_upload_stores_nothing_keeps_the_sandbox_running_and_a_retry_succeeds() {
    let s3 = s3_flags(&bucket("fault"));
    let mut env = S3_ENV.to_vec();
    env.push(("NULLSPACE_TEST_FAIL_PUT_AFTER", "3"));
    let stack = Stack::start_with("snap-fault", &flags(&s3), &env);
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = id_of(&sbx);
    let marks = mark(&Runtime::of(&sbx)).await;

    let (status, v) = snapshot(&api, &id).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "storage_unavailable");
    assert!(
        v["message"].as_str().unwrap().contains("injected fault"),
        "{v}"
    );
    assert!(
        list(&api, &id).await.is_empty(),
        "a partial snapshot is visible"
    );
    assert_eq!(api.get(&id).await["state"], "running");
    check(&Runtime::of(&sbx), &marks, "after the failed snapshot").await;

    // A hibernate that fails the same way leaves it running too.
    let (status, snap) = snapshot(&api, &id).await;
    assert_eq!(status, StatusCode::CREATED, "the retry: {snap}");
    assert_eq!(kinds(&list(&api, &id).await), ["manual/object"]);
    let (_, events) = api.fetch(&format!("/v1/sandboxes/{id}/events")).await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"sandbox.snapshot_failed") && types.contains(&"sandbox.snapshot"),
        "{types:?}"
    );
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn corrupted_chunks_are_detected_and_a_low_disk_refuses_snapshots() {
    // The default local-directory store, so the test can damage a chunk in place.
    let (stack, api, id, manifest_path) = snapshot_in_local_store("snap-corrupt").await;
    let objects = stack.daemon.state_dir().join("objects");
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let sha = manifest["files"]["state"]["chunks"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let chunk = objects.join("chunks").join(&sha);
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();

    let (status, v) = restore(&api, json!({ "sandboxID": id })).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["code"], "snapshot_corrupt", "{v}");
    assert!(v["message"].as_str().unwrap().contains(&sha), "{v}");
    let failed = v["details"]["sandboxID"].as_str().unwrap();
    assert_eq!(api.get(failed).await["state"], "error");
    assert_eq!(
        api.get(&id).await["state"],
        "running",
        "the source is untouched"
    );
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    drop(stack);

    // A worker whose disk would drop below its reserve refuses snapshots up front: its
    // state disk (1400 MiB) keeps the 1024 MiB reserve with a sandbox running, but not
    // with a snapshot of its 512 MiB of memory on top.
    let fs = SmallFs::mount("snap-disk", 1400);
    let stack = Stack::start_in_with(fs.path().to_path_buf(), &["--min-free-disk-mib", "1024"]);
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small() }))
        .await;
    let id = id_of(&sbx);
    for action in ["snapshots", "hibernate", "fork"] {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/{action}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{action}: {v}");
        assert_eq!(v["code"], "insufficient_storage");
        assert!(
            v["message"].as_str().unwrap().contains("free disk space"),
            "{v}"
        );
    }
    let (out, _, _) = Runtime::of(&sbx).run("echo still here").await;
    assert_eq!(out, "still here\n");
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
    drop(stack);
}

#[tokio::test]
async fn periodic_snapshots_and_hibernate_on_timeout_with_restore_preferring_pause() {
    let s3 = s3_flags(&bucket("periodic"));
    let stack = Stack::start_with("snap-periodic", &flags(&s3), S3_ENV);
    let api = stack.public(stack.daemon.team_key("acme"));
    let (status, v) = api
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "minimal", "snapshotInterval": 5 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["details"]["field"], "snapshotInterval");

    let sbx = api
        .create(json!({
            "templateID": "minimal", "resources": small(), "timeout": 25,
            "snapshotInterval": 10, "lifecycle": { "onTimeout": "hibernate" }
        }))
        .await;
    let id = id_of(&sbx);
    assert_eq!(sbx["snapshotInterval"], 10);
    let marks = mark(&Runtime::of(&sbx)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kinds(&list(&api, &id).await).contains(&"periodic/object".to_string()) {
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let paused = api.wait_state(&id, "paused", Duration::from_secs(90)).await;
    assert_eq!(paused["hibernated"], true, "{paused}");
    let listed = kinds(&list(&api, &id).await);
    assert_eq!(listed[0], "pause/object", "{listed:?}");
    assert!(
        listed.contains(&"periodic/object".to_string()),
        "{listed:?}"
    );

    // With none named, a restore takes the pause snapshot (the newest state).
    let (status, copy) = restore(&api, json!({ "sandboxID": id })).await;
    assert_eq!(status, StatusCode::CREATED, "{copy}");
    check(
        &Runtime::of(&copy),
        &marks,
        "restore of the hibernated sandbox",
    )
    .await;
    // And connect wakes the original.
    let (status, woke) = api
        .post(
            &format!("/v1/sandboxes/{id}/connect"),
            json!({ "timeout": 60 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{woke}");
    check(&Runtime::of(&woke), &marks, "connect after hibernate").await;
    for s in [&id, &id_of(&copy)] {
        assert_eq!(api.delete(s).await, StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn tampered_manifests_are_refused_and_write_nothing_outside() {
    // The default local-directory store, so the test can rewrite a manifest in place,
    // as anyone holding the bucket's credentials could.
    let (_stack, api, id, manifest_path) = snapshot_in_local_store("snap-tamper").await;
    let original: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let pid = std::process::id();
    let escaped = [
        std::path::PathBuf::from(format!("/tmp/nullspace-escaped-{pid}")),
        std::path::PathBuf::from(format!("/nullspace-escaped-{pid}")),
    ];
    type Tamper = fn(&mut Value, u32);
    let cases: [(&str, Tamper, &str); 4] = [
        (
            "an absolute file name",
            |m, pid| {
                let state = m["files"]["state"].clone();
                m["files"][format!("/tmp/nullspace-escaped-{pid}")] = state;
            },
            "tampered",
        ),
        (
            "a file name climbing out",
            |m, pid| {
                let state = m["files"]["state"].clone();
                m["files"][format!("../../../../../../../../nullspace-escaped-{pid}")] = state;
            },
            "tampered",
        ),
        (
            "an extra QEMU argument",
            |m, _| {
                let args = m["vm"]["machine_args"].as_array_mut().unwrap();
                args.push(json!("-monitor"));
                args.push(json!(
                    "unix:/tmp/nullspace-escaped-monitor,server=on,wait=off"
                ));
            },
            "machine arguments",
        ),
        (
            "a root filesystem of its own",
            |m, _| m["vm"]["rootfs_image"] = json!("/etc/shadow"),
            "root filesystem",
        ),
    ];
    for (what, tamper, says) in cases {
        let mut m = original.clone();
        tamper(&mut m, pid);
        std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
        let (status, v) = restore(&api, json!({ "sandboxID": id })).await;
        assert_ne!(status, StatusCode::CREATED, "{what}: restored anyway");
        assert!(
            v["message"].as_str().unwrap_or("").contains(says),
            "{what}: {v}"
        );
        for path in &escaped {
            assert!(!path.exists(), "{what}: {} was written", path.display());
        }
        assert!(!std::path::Path::new("/tmp/nullspace-escaped-monitor").exists());
    }
    // The manifest as it was restores.
    std::fs::write(&manifest_path, serde_json::to_vec(&original).unwrap()).unwrap();
    let (status, v) = restore(&api, json!({ "sandboxID": id })).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(api.delete(&id_of(&v)).await, StatusCode::NO_CONTENT);
    assert_eq!(api.delete(&id).await, StatusCode::NO_CONTENT);
}

/// What the local store's chunks take on disk.
fn chunk_bytes(stack: &Stack) -> u64 {
    nullspace_tests::dir_bytes(&stack.daemon.state_dir().join("objects").join("chunks"))
}

/// A snapshot through the API: its answer and what the store grew by.
async fn snapshot_growth(stack: &Stack, api: &Api, id: &str) -> (Value, u64) {
    let before = chunk_bytes(stack);
    let (status, snap) = snapshot(api, id).await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    (snap, chunk_bytes(stack) - before)
}

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn successive_snapshots_and_a_fork_family_store_only_what_changed() {
    let stack = Stack::start("snap-delta");
    let api = stack.public(stack.daemon.team_key("acme"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 600 }))
        .await;
    let id = id_of(&sbx);
    let rt = Runtime::of(&sbx);
    let (sums, err, code) = rt
        .run("head -c 16777216 /dev/urandom > /tmp/mem.bin; head -c 4194304 /dev/urandom > /workspace/disk.bin; sync; sha256sum /tmp/mem.bin /workspace/disk.bin")
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(sums.contains("/tmp/mem.bin"), "{sums}");

    let (first, grew) = snapshot_growth(&stack, &api, &id).await;
    let referenced = first["storedBytes"].as_u64().unwrap();
    assert!(referenced > 16 * MIB, "{first}");
    // What it sent is what the store grew by (a new store: nothing was there).
    assert_eq!(first["uploadedBytes"].as_u64().unwrap(), grew, "{first}");

    // Idle: the second snapshot adds next to nothing. Before, the RAM in the
    // migration stream shifted and every chunk after the first change was new.
    let (idle, grew) = snapshot_growth(&stack, &api, &id).await;
    eprintln!(
        "first: referenced {referenced}, sent {}; idle second: added {grew}, sent {}",
        first["uploadedBytes"], idle["uploadedBytes"]
    );
    assert!(
        grew * 20 <= referenced,
        "an idle second snapshot added {grew} bytes, over 5% of the first's {referenced}"
    );

    // 8 MiB changed: a few times that at most (a chunk changed again is stored as a
    // patch of all its pages that differ from the chunk it builds on, and the guest's
    // kernel moves pages too), not the whole memory again.
    let (_, _, code) = rt
        .run("head -c 8388608 /dev/urandom > /tmp/change.bin")
        .await;
    assert_eq!(code, 0);
    let (changed, grew) = snapshot_growth(&stack, &api, &id).await;
    eprintln!("after 8 MiB changed: added {grew}");
    assert!(
        grew <= 24 * MIB,
        "8 MiB changed, the snapshot added {grew} bytes"
    );

    // Stored as patches of other chunks, it restores bit for bit: memory and disk.
    let (status, restored) = restore(
        &api,
        json!({ "sandboxID": id, "snapshotID": changed["snapshotID"], "timeout": 120 }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{restored}");
    let (again, _, _) = Runtime::of(&restored)
        .run("sha256sum /tmp/mem.bin /workspace/disk.bin")
        .await;
    assert_eq!(again, sums);
    assert_eq!(api.delete(&id_of(&restored)).await, StatusCode::NO_CONTENT);

    // A fork family: the parent and three children, each snapshotted once, store
    // about one snapshot's worth, not four.
    let (status, forked) = api
        .post(&format!("/v1/sandboxes/{id}/fork"), json!({ "count": 3 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let children: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    let before = chunk_bytes(&stack);
    let mut family_referenced = 0;
    for member in std::iter::once(&id).chain(&children) {
        let (snap, _) = snapshot_growth(&stack, &api, member).await;
        family_referenced += snap["storedBytes"].as_u64().unwrap();
    }
    let family = chunk_bytes(&stack) - before;
    eprintln!("fork family: referenced {family_referenced}, added {family}");
    assert!(
        family * 10 <= referenced * 3,
        "the fork family added {family} bytes, over 0.3x one snapshot's {referenced}"
    );
    for member in std::iter::once(&id).chain(&children) {
        assert_eq!(api.delete(member).await, StatusCode::NO_CONTENT);
    }
}
