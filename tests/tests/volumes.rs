//! Durable volumes, end to end through the public API: real VMs mounting real disk
//! images, two workers sharing a real S3 server (SeaweedFS, `NULLSPACE_TEST_S3`).

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::{s3_flags, Stack, S3_ENV};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn id_of(v: &Value) -> String {
    v["sandboxID"].as_str().unwrap().to_string()
}

async fn create(api: &Api, volume: &str, mode: &str) -> (StatusCode, Value) {
    api.post(
        "/v1/sandboxes",
        json!({
            "templateID": "base",
            "resources": small(),
            "mounts": { "/mnt/work": { "id": volume, "type": mode } },
        }),
    )
    .await
}

async fn run(rt: &Runtime, cmd: &str) -> (String, i64) {
    let (out, err, code) = rt.run(cmd).await;
    (format!("{out}{err}").trim().to_string(), code)
}

#[tokio::test]
async fn a_volume_outlives_its_sandboxes_and_workers_with_one_writer_at_a_time() {
    let s3 = s3_flags(&format!("t-volumes-{}", std::process::id()));
    let flags: Vec<&str> = s3.iter().map(String::as_str).collect();
    let a = Stack::start_with("volumes-a", &flags, S3_ENV);
    let b = Stack::start_with("volumes-b", &flags, S3_ENV);
    let key = a.daemon.mirrored_team_key(&b.daemon, "acme");
    let (on_a, on_b) = (a.public(key.clone()), b.public(key));
    let other = a.public(a.daemon.team_key("other"));

    // Refusals say what to send.
    let (status, v) = on_a.post("/v1/volumes", json!({ "sizeMiB": 1 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = create(&on_a, "no-such-volume", "rw").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, v) = on_a
        .post(
            "/v1/sandboxes",
            json!({ "templateID": "base", "mounts": { "/etc": { "id": "x" } } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let (status, vol) = on_a
        .post("/v1/volumes", json!({ "name": "work", "sizeMiB": 64 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{vol}");
    let vol_id = vol["volumeID"].as_str().unwrap().to_string();
    let (status, v) = on_a.post("/v1/volumes", json!({ "name": "work" })).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a second volume named work: {v}"
    );
    // Worker B sees it (the store is the registry); another team does not.
    let (status, listed) = on_b.fetch("/v1/volumes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed[0]["volumeID"], json!(vol_id), "{listed}");
    let (status, _) = other.fetch(&format!("/v1/volumes/{vol_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A writer on A (mounted by name).
    let (status, writer) = create(&on_a, "work", "rw").await;
    assert_eq!(status, StatusCode::CREATED, "{writer}");
    assert_eq!(writer["mounts"][0]["volumeID"], json!(vol_id), "{writer}");
    let w = Runtime::of(&writer);
    let (out, code) = run(
        &w,
        "echo hello > /mnt/work/note.txt && cat /mnt/work/note.txt && df -m /mnt/work | tail -1",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("hello"), "{out}");

    // A second writer, on either worker, is refused and told why; a reader is not.
    for api in [&on_a, &on_b] {
        let (status, v) = create(api, &vol_id, "rw").await;
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(&id_of(&writer)),
            "{v}"
        );
    }
    let (status, reader) = create(&on_b, &vol_id, "ro").await;
    assert_eq!(status, StatusCode::CREATED, "{reader}");
    let r = Runtime::of(&reader);
    let (out, code) = run(&r, "ls /mnt/work; touch /mnt/work/x").await;
    assert_ne!(code, 0, "a read-only mount took a write: {out}");
    assert!(
        !out.contains("note.txt"),
        "the reader sees only saved content: {out}"
    );

    // Deleting a mounted volume is refused; its holders are listed.
    let (status, v) = on_a
        .call(Method::DELETE, &format!("/v1/volumes/{vol_id}"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (_, shown) = on_a.fetch(&format!("/v1/volumes/{vol_id}")).await;
    assert_eq!(shown["attachments"].as_array().unwrap().len(), 2, "{shown}");

    // Pause and resume remount it; a fork child gets it read-only (volumes/inherit.rs).
    let wid = id_of(&writer);
    let (status, v) = on_a
        .post(&format!("/v1/sandboxes/{wid}/pause"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, resumed) = on_a
        .post(&format!("/v1/sandboxes/{wid}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let w = Runtime::of(&resumed);
    let (out, code) = run(
        &w,
        "cat /mnt/work/note.txt && echo again >> /mnt/work/note.txt",
    )
    .await;
    assert_eq!((out.as_str(), code), ("hello", 0));
    let (status, forked) = on_a
        .post(&format!("/v1/sandboxes/{wid}/fork"), json!({ "count": 1 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let child = &forked["sandboxes"][0];
    assert_eq!(child["mounts"][0]["type"], "ro", "{child}");
    assert_eq!(
        child["mounts"][0]["inherited"]["how"], "readonly",
        "{child}"
    );
    let (out, code) = run(
        &Runtime::of(child),
        "cat /mnt/work/note.txt && echo child > /mnt/work/child.txt",
    )
    .await;
    assert_ne!(code, 0, "a read-only child took a write: {out}");
    assert!(
        out.starts_with("hello\nagain") && out.contains("Read-only file system"),
        "{out}"
    );

    // A restored copy of a snapshot has the volume as it was, read-only too.
    let (status, snap) = on_a
        .post(&format!("/v1/sandboxes/{wid}/snapshots"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let (status, copy) = on_a
        .post(
            "/v1/sandboxes/restore",
            json!({ "sandboxID": wid, "snapshotID": snap["snapshotID"] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{copy}");
    assert_eq!(copy["mounts"][0]["type"], "ro", "{copy}");
    let (out, code) = run(
        &Runtime::of(&copy),
        "cat /mnt/work/note.txt && touch /mnt/work/copy.txt",
    )
    .await;
    assert_ne!(code, 0, "a read-only copy took a write: {out}");
    assert!(
        out.starts_with("hello\nagain") && out.contains("Read-only file system"),
        "{out}"
    );

    // Hibernated on A, resumed on B: the same writer, its volume remounted there.
    let (status, v) = on_a
        .post(&format!("/v1/sandboxes/{wid}/hibernate"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, shown) = on_b.fetch(&format!("/v1/volumes/{vol_id}")).await;
    assert_eq!(
        shown["version"],
        json!(1),
        "a hibernate saves the writes: {shown}"
    );
    let (status, moved) = on_b
        .post(&format!("/v1/sandboxes/{wid}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let (out, code) = run(
        &Runtime::of(&moved),
        "echo from-b >> /mnt/work/note.txt && cat /mnt/work/note.txt",
    )
    .await;
    assert_eq!((out.as_str(), code), ("hello\nagain\nfrom-b", 0));
    // Worker A's stale record of it releases nothing: B's VM keeps the write lock.
    let _ = on_a.delete(&wid).await;
    let (status, v) = create(&on_a, &vol_id, "rw").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    // The writer ends: its writes are saved. A later writer reads them, and not the
    // fork child's or the restored copy's.
    for (api, id) in [
        (&on_b, wid.as_str()),
        (&on_a, &id_of(child)),
        (&on_a, &id_of(&copy)),
        (&on_b, &id_of(&reader)),
    ] {
        assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
    }
    let (status, later) = create(&on_a, &vol_id, "rw").await;
    assert_eq!(status, StatusCode::CREATED, "{later}");
    let (out, code) = run(&Runtime::of(&later), "cat /mnt/work/note.txt; ls /mnt/work").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("hello\nagain\nfrom-b\n"), "{out}");
    assert!(
        !out.contains("child.txt") && !out.contains("copy.txt"),
        "{out}"
    );
    let (_, shown) = on_b.fetch(&format!("/v1/volumes/{vol_id}")).await;
    assert_eq!(shown["version"], json!(2), "{shown}");
    assert_eq!(on_a.delete(&id_of(&later)).await, StatusCode::NO_CONTENT);

    let (status, _) = on_b
        .call(Method::DELETE, &format!("/v1/volumes/{vol_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = on_a.fetch(&format!("/v1/volumes/{vol_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Writes a hold of `volume` by `sandbox` straight into the store, as a worker that died
/// would have left it: its write lock too for `rw`, its lease ending at `expires_unix_ms`.
async fn plant_hold(
    store: &storage::S3Store,
    volume: &str,
    sandbox: &str,
    mode: &str,
    expires_unix_ms: u64,
) {
    use storage::ObjectStore;
    let holder = storage::volumes::Holder {
        sandbox_id: sandbox.into(),
        path: "/mnt/work".into(),
        mode: mode.into(),
        since_unix_ms: 1,
        expires_unix_ms: Some(expires_unix_ms),
    };
    let bytes: bytes::Bytes = serde_json::to_vec(&holder).unwrap().into();
    if mode == "rw" {
        store
            .put(&format!("volumes/{volume}/writer.json"), bytes.clone())
            .await
            .unwrap();
    }
    store
        .put(&format!("volumes/{volume}/holders/{sandbox}.json"), bytes)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hold_whose_lease_expired_frees_the_volume_for_writers_and_deletes() {
    let bucket = format!("t-volume-leases-{}", std::process::id());
    let s3 = s3_flags(&bucket);
    let flags: Vec<&str> = s3.iter().map(String::as_str).collect();
    let stack = Stack::start_with("volume-leases", &flags, S3_ENV);
    let api = stack.public(stack.daemon.team_key("acme"));
    let store = storage::S3Store::new(&storage::S3Config {
        endpoint: nullspace_tests::s3_endpoint(),
        bucket,
        prefix: String::new(),
        region: "us-east-1".into(),
        access_key: "nullspace-test".into(),
        secret_key: "nullspace-test".into(),
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hour = 3_600_000;
    let mut ids = Vec::new();
    for name in ["live", "expired"] {
        let (status, vol) = api
            .post("/v1/volumes", json!({ "name": name, "sizeMiB": 64 }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{vol}");
        ids.push(vol["volumeID"].as_str().unwrap().to_string());
    }
    let (live, expired) = (&ids[0], &ids[1]);
    // A writer on a worker that still renews its lease, and one whose worker died an
    // hour ago (its lease long run out), with a reader from then.
    plant_hold(&store, live, "sbx-renewing", "rw", now + hour).await;
    plant_hold(&store, expired, "sbx-gone", "rw", now - hour).await;
    plant_hold(&store, expired, "sbx-gone-reader", "ro", now - hour).await;

    // The live lease keeps writers out and the volume undeleted.
    let (status, v) = create(&api, live, "rw").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("sbx-renewing"),
        "{v}"
    );
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/volumes/{live}"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");

    // The expired ones are gone: not shown, and a new writer takes the lock over.
    let (_, shown) = api.fetch(&format!("/v1/volumes/{expired}")).await;
    assert_eq!(shown["attachments"], json!([]), "{shown}");
    let (status, writer) = create(&api, expired, "rw").await;
    assert_eq!(status, StatusCode::CREATED, "{writer}");
    let (out, code) = run(
        &Runtime::of(&writer),
        "echo taken > /mnt/work/t && cat /mnt/work/t",
    )
    .await;
    assert_eq!((out.as_str(), code), ("taken", 0));
    let (_, shown) = api.fetch(&format!("/v1/volumes/{expired}")).await;
    assert_eq!(
        shown["attachments"][0]["sandboxID"],
        json!(id_of(&writer)),
        "{shown}"
    );
    assert_eq!(api.delete(&id_of(&writer)).await, StatusCode::NO_CONTENT);
    let (_, shown) = api.fetch(&format!("/v1/volumes/{expired}")).await;
    assert_eq!(shown["version"], json!(1), "the new writer's save: {shown}");

    // A volume whose only holds expired can be deleted, and its leftovers go with it.
    plant_hold(&store, expired, "sbx-gone-again", "rw", now - hour).await;
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/volumes/{expired}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    use storage::ObjectStore;
    assert_eq!(
        store.list(&format!("volumes/{expired}/")).await.unwrap(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_failed_save_keeps_the_hold_and_is_retried_until_it_lands() {
    let scratch = nullspace_tests::ScratchDir::new("volume-save-retry");
    let store_dir = scratch.path().join("objects");
    let dir_flag = store_dir.display().to_string();
    let stack = Stack::start_with("volume-save-retry", &["--store-dir", &dir_flag], &[]);
    let api = stack.public(stack.daemon.team_key("acme"));
    let (status, vol) = api
        .post("/v1/volumes", json!({ "name": "retried", "sizeMiB": 64 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{vol}");
    let vol_id = vol["volumeID"].as_str().unwrap().to_string();
    let (status, writer) = create(&api, &vol_id, "rw").await;
    assert_eq!(status, StatusCode::CREATED, "{writer}");
    let (out, code) = run(
        &Runtime::of(&writer),
        "echo kept > /mnt/work/k && cat /mnt/work/k",
    )
    .await;
    assert_eq!((out.as_str(), code), ("kept", 0));

    // The store cannot take the volume's versions (a file where their directory goes):
    // the save at the writer's end fails, and its hold stays.
    let versions = store_dir.join("volumes").join(&vol_id).join("versions");
    std::fs::write(&versions, b"in the way").unwrap();
    assert_eq!(api.delete(&id_of(&writer)).await, StatusCode::NO_CONTENT);
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/volumes/{vol_id}"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the unsaved writer still holds it: {v}"
    );

    // The store recovers: a retry (after its back-off) saves it and releases the hold.
    std::fs::remove_file(&versions).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let shown = loop {
        let (_, shown) = api.fetch(&format!("/v1/volumes/{vol_id}")).await;
        if shown["version"] == json!(1) && shown["attachments"] == json!([]) {
            break shown;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the save was not retried: {shown}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    assert!(shown["savedAt"].is_string(), "{shown}");
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/volumes/{vol_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
}

/// What a fork child does with its parent's read-write volume (issue 31): by default it
/// mounts the same volume read-only (a write fails with EROFS) while the parent's later
/// writes are saved; a file the parent holds open for writing refuses such a fork; with
/// `volumes: "copy"` each side writes a volume of its own, and both are kept.
#[tokio::test]
async fn fork_children_get_volumes_read_only_or_as_copies_and_no_write_is_lost() {
    let stack = Stack::start("volume-fork");
    let api = stack.public(stack.daemon.team_key("acme"));
    let (status, vol) = api
        .post(
            "/v1/volumes",
            json!({ "name": "shared-work", "sizeMiB": 64 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{vol}");
    let vol_id = vol["volumeID"].as_str().unwrap().to_string();
    let (status, parent) = create(&api, &vol_id, "rw").await;
    assert_eq!(status, StatusCode::CREATED, "{parent}");
    let pid = id_of(&parent);
    let p = Runtime::of(&parent);
    let (out, code) = run(&p, "echo before > /mnt/work/before.txt").await;
    assert_eq!(code, 0, "{out}");

    // A file open for writing: a read-only child could not be made; the fork says so.
    let (out, code) = run(
        &p,
        "nohup sh -c 'echo $$ > /tmp/held.pid; exec 3>>/mnt/work/held.log; exec sleep 600' >/dev/null 2>&1 & sleep 0.5",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (status, v) = api
        .post(&format!("/v1/sandboxes/{pid}/fork"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("/mnt/work/held.log") && message.contains("\"copy\""),
        "{v}"
    );
    let (out, code) = run(&p, "kill $(cat /tmp/held.pid); sleep 0.5; echo ok").await;
    assert_eq!((out.as_str(), code), ("ok", 0));

    // The default: the same volume, read-only; the parent keeps writing it.
    let (status, forked) = api
        .post(&format!("/v1/sandboxes/{pid}/fork"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let ro_child = forked["sandboxes"][0].clone();
    assert_eq!(
        ro_child["mounts"][0],
        json!({ "path": "/mnt/work", "volumeID": vol_id, "type": "ro",
                "inherited": { "fromSandboxID": pid, "fromVolumeID": vol_id, "how": "readonly" } }),
        "{ro_child}"
    );
    let (out, code) = run(
        &Runtime::of(&ro_child),
        "cat /mnt/work/before.txt; echo x > /mnt/work/child.txt",
    )
    .await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.starts_with("before") && out.contains("Read-only file system"),
        "{out}"
    );
    let (_, shown) = api.fetch(&format!("/v1/volumes/{vol_id}")).await;
    let holders: Vec<(&str, &str)> = shown["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["sandboxID"].as_str().unwrap(),
                a["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(holders.contains(&(pid.as_str(), "rw")), "{shown}");
    assert!(
        holders.contains(&(ro_child["sandboxID"].as_str().unwrap(), "ro")),
        "the child holds it read-only: {shown}"
    );
    let (out, code) = run(&p, "echo after > /mnt/work/after.txt").await;
    assert_eq!(code, 0, "the parent still writes: {out}");

    // With copies: each side writes its own volume.
    let (status, forked) = api
        .post(
            &format!("/v1/sandboxes/{pid}/fork"),
            json!({ "volumes": "copy" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let copy_child = forked["sandboxes"][0].clone();
    let mount = &copy_child["mounts"][0];
    let copy_id = mount["volumeID"].as_str().unwrap().to_string();
    assert_ne!(copy_id, vol_id, "{copy_child}");
    assert_eq!(
        (
            mount["type"].as_str(),
            mount["inherited"]["how"].as_str(),
            mount["inherited"]["fromVolumeID"].as_str()
        ),
        (Some("rw"), Some("copy"), Some(vol_id.as_str())),
        "{copy_child}"
    );
    let (out, code) = run(
        &Runtime::of(&copy_child),
        "cat /mnt/work/after.txt && echo mine > /mnt/work/child.txt",
    )
    .await;
    assert_eq!((out.as_str(), code), ("after", 0));
    let (out, code) = run(&p, "echo later > /mnt/work/later.txt").await;
    assert_eq!(code, 0, "{out}");
    let (status, copy_vol) = api.fetch(&format!("/v1/volumes/{copy_id}")).await;
    assert_eq!(status, StatusCode::OK, "{copy_vol}");
    assert!(
        copy_vol["name"]
            .as_str()
            .unwrap()
            .starts_with("shared-work-"),
        "{copy_vol}"
    );

    // A restore asked for copies: a third volume, of the snapshot's content.
    let (status, snap) = api
        .post(&format!("/v1/sandboxes/{pid}/snapshots"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let (status, restored) = api
        .post(
            "/v1/sandboxes/restore",
            json!({ "sandboxID": pid, "snapshotID": snap["snapshotID"], "volumes": "copy" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{restored}");
    let restored_id = restored["mounts"][0]["volumeID"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        restored_id != vol_id && restored_id != copy_id,
        "{restored}"
    );
    assert_eq!(restored["mounts"][0]["type"], "rw", "{restored}");
    let (out, code) = run(&Runtime::of(&restored), "echo r > /mnt/work/restored.txt").await;
    assert_eq!(code, 0, "{out}");
    let (status, v) = api
        .post(
            "/v1/sandboxes/restore",
            json!({ "sandboxID": pid, "volumes": "everything" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // Every sandbox ends: the writers' volumes are saved, the read-only child's nothing.
    for id in [
        &pid,
        &id_of(&ro_child),
        &id_of(&copy_child),
        &id_of(&restored),
    ] {
        assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
    }
    for (volume, want, not) in [
        (
            &vol_id,
            "after.txt before.txt held.log later.txt",
            "child.txt",
        ),
        (
            &copy_id,
            "after.txt before.txt child.txt held.log",
            "later.txt",
        ),
        (
            &restored_id,
            "after.txt before.txt held.log later.txt restored.txt",
            "child.txt",
        ),
    ] {
        let (status, reader) = create(&api, volume, "ro").await;
        assert_eq!(status, StatusCode::CREATED, "{reader}");
        let (out, code) = run(
            &Runtime::of(&reader),
            "ls /mnt/work | grep -v lost+found | tr '\\n' ' '",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, want, "volume {volume} holds {out}, not {not}");
        assert_eq!(api.delete(&id_of(&reader)).await, StatusCode::NO_CONTENT);
    }
    for volume in [&vol_id, &copy_id, &restored_id] {
        let (status, v) = api
            .call(Method::DELETE, &format!("/v1/volumes/{volume}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    }

    // Its volume deleted, a snapshot of the parent restores only as a copy.
    let restore = |volumes: &'static str| json!({ "sandboxID": pid, "snapshotID": snap["snapshotID"], "volumes": volumes });
    let (status, v) = api.post("/v1/sandboxes/restore", restore("readonly")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(&vol_id) && message.contains("\"copy\""),
        "{v}"
    );
    let (status, again) = api.post("/v1/sandboxes/restore", restore("copy")).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    let again_vol = again["mounts"][0]["volumeID"].as_str().unwrap().to_string();
    let (out, code) = run(&Runtime::of(&again), "cat /mnt/work/later.txt").await;
    assert_eq!((out.as_str(), code), ("later", 0));
    assert_eq!(api.delete(&id_of(&again)).await, StatusCode::NO_CONTENT);
    let (status, v) = api
        .call(Method::DELETE, &format!("/v1/volumes/{again_vol}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
}
