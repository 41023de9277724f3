//! kill -9 at every step of every multi-step operation.
//!
//! For each operation (pause, hibernate, snapshot, fork, restore, delete, create with a
//! volume, a volume's save) the test first runs it once with the failpoint log on
//! (`NULLSPACE_TEST_FAILPOINT_LOG`) to learn the points it passes, in order. Then, for
//! each point: a fresh daemon armed to SIGKILL itself there
//! (`NULLSPACE_TEST_FAILPOINT`), the sandbox prepared (a file written), the operation
//! sent, the daemon dead by SIGKILL, a new daemon on the same state, and the promise
//! checked: every sandbox is running or paused with the file intact, or `error` with a
//! reason; no intent row, QEMU, pause or fork directory, scratch space or volume hold
//! is left behind.

use nullspace_tests::http::{Api, Runtime};
use nullspace_tests::{qemus_in, Daemon};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// The operations under test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Pause,
    Hibernate,
    Snapshot,
    Fork,
    Restore,
    Delete,
    CreateWithVolume,
    VolumeSave,
}

/// The smallest shape a sandbox runs in.
fn tiny() -> Value {
    json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 })
}

const FILE: &str = "/workspace/kept.bin";
const VOLUME_FILE: &str = "/mnt/work/kept.txt";

fn data() -> Vec<u8> {
    (0..300_000u32)
        .map(|n| (n.wrapping_mul(31) >> 3) as u8)
        .collect()
}

/// What a test prepared before the operation.
struct Prepared {
    /// The sandbox the operation acts on (none for a create).
    sandbox: Option<String>,
    /// The volume mounted (create and save cases).
    volume: Option<String>,
    /// A stored snapshot of the sandbox (the restore case).
    snapshot: Option<String>,
}

async fn create_volume(api: &Api) -> String {
    let (status, v) = api.post("/v1/volumes", json!({ "sizeMiB": 64 })).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["volumeID"].as_str().unwrap().to_string()
}

fn with_volume(volume: &str, mode: &str) -> Value {
    json!({
        "templateID": "minimal",
        "resources": tiny(),
        "timeout": 600,
        "mounts": { "/mnt/work": { "id": volume, "type": mode } },
    })
}

/// Readies what `op` acts on.
async fn prepare(op: Op, api: &Api) -> Prepared {
    let mut prepared = Prepared {
        sandbox: None,
        volume: None,
        snapshot: None,
    };
    match op {
        Op::CreateWithVolume => {
            prepared.volume = Some(create_volume(api).await);
            return prepared;
        }
        Op::VolumeSave => {
            let volume = create_volume(api).await;
            let sbx = api.create(with_volume(&volume, "rw")).await;
            let (_, _, code) = Runtime::of(&sbx)
                .run(&format!("echo kept > {VOLUME_FILE} && sync"))
                .await;
            assert_eq!(code, 0);
            prepared.sandbox = Some(sbx["sandboxID"].as_str().unwrap().to_string());
            prepared.volume = Some(volume);
            return prepared;
        }
        _ => {}
    }
    // A hibernate freezes its volumes: one is mounted to check they thaw.
    let sbx = if op == Op::Hibernate {
        let volume = create_volume(api).await;
        let sbx = api.create(with_volume(&volume, "rw")).await;
        prepared.volume = Some(volume);
        sbx
    } else {
        api.create(json!({ "templateID": "minimal", "resources": tiny(), "timeout": 600 }))
            .await
    };
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    Runtime::of(&sbx).put_file(FILE, &data()).await;
    if op == Op::Hibernate {
        let (_, _, code) = Runtime::of(&sbx)
            .run(&format!("echo kept > {VOLUME_FILE}"))
            .await;
        assert_eq!(code, 0);
    }
    if op == Op::Restore {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{id}/snapshots"), json!({}))
            .await;
        assert!(status.is_success(), "{v}");
        prepared.snapshot = Some(v["snapshotID"].as_str().unwrap().to_string());
    }
    prepared.sandbox = Some(id);
    prepared
}

/// Sends `op`; the answer (if the daemon lives to give one) is not needed.
async fn send(op: Op, api: &Api, p: &Prepared) {
    let id = p.sandbox.as_deref().unwrap_or_default();
    let (method, path, body) = match op {
        Op::Pause => (Method::POST, format!("/v1/sandboxes/{id}/pause"), json!({})),
        Op::Hibernate => (
            Method::POST,
            format!("/v1/sandboxes/{id}/hibernate"),
            json!({}),
        ),
        Op::Snapshot => (
            Method::POST,
            format!("/v1/sandboxes/{id}/snapshots"),
            json!({}),
        ),
        Op::Fork => (
            Method::POST,
            format!("/v1/sandboxes/{id}/fork"),
            json!({ "count": 1 }),
        ),
        Op::Restore => (
            Method::POST,
            "/v1/sandboxes/restore".to_string(),
            json!({ "sandboxID": id, "snapshotID": p.snapshot }),
        ),
        Op::Delete | Op::VolumeSave => (Method::DELETE, format!("/v1/sandboxes/{id}"), json!({})),
        Op::CreateWithVolume => (
            Method::POST,
            "/v1/sandboxes".to_string(),
            with_volume(p.volume.as_deref().unwrap(), "rw"),
        ),
    };
    let mut req = api
        .http
        .request(method.clone(), format!("{}{path}", api.base))
        .header("X-API-Key", &api.key)
        .timeout(Duration::from_secs(120));
    if method == Method::POST {
        req = req.json(&body);
    }
    let _ = req.send().await;
}

/// The failpoints `op` passes, in order, from one run with the log on.
async fn points_of(op: Op) -> Vec<String> {
    let log = std::env::temp_dir().join(format!(
        "nullspace-failpoints-{op:?}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&log);
    let daemon = Daemon::start_with(
        &format!("points-{op:?}").to_lowercase(),
        &[],
        &[("NULLSPACE_TEST_FAILPOINT_LOG", log.to_str().unwrap())],
    );
    let api = Api::new(&daemon, daemon.team_key("acme"));
    let prepared = prepare(op, &api).await;
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    send(op, &api, &prepared).await;
    // Read before the daemon stops: its shutdown passes points of its own.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    drop(daemon);
    let _ = std::fs::remove_file(&log);
    let mut points: Vec<String> = Vec::new();
    for line in text.lines().skip(before) {
        // A volume's save is what its case is about; the delete around it has its own.
        if op == Op::VolumeSave && !line.starts_with("volume_save.") {
            continue;
        }
        if !points.iter().any(|p| p == line) {
            points.push(line.to_string());
        }
    }
    assert!(
        points.len() >= 2,
        "{op:?} passed too few failpoints to test: {points:?}"
    );
    eprintln!("{op:?} passes {points:?}");
    points
}

/// Every sandbox of the caller's team the list shows (starting, running, paused, error).
async fn listed(api: &Api) -> Vec<Value> {
    let (status, v) = api.fetch("/v1/sandboxes?limit=100").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["sandboxes"].as_array().cloned().unwrap_or_default()
}

/// Kills the daemon at `point` during `op`, restarts it, and checks what it promises.
async fn kill_at(op: Op, point: &str) {
    // Unique per case: tests of one process share its PID in the state dir's name.
    let name = format!("crash-{op:?}-{}", point.replace(['.', '_'], "-")).to_lowercase();
    let daemon = Daemon::start_with(&name, &[], &[("NULLSPACE_TEST_FAILPOINT", point)]);
    let key = daemon.team_key("acme");
    let api = Api::new(&daemon, key.clone());
    let p = prepare(op, &api).await;
    send(op, &api, &p).await;
    let daemon = daemon.restart_after_failpoint(&format!("{point} ({op:?})"));
    let api = Api::new(&daemon, key);
    let at = format!("{op:?} killed at {point}");

    // The sandbox acted on, and any it made: running or paused with the data, or
    // `error` with a reason.
    let mut running = 0;
    for sbx in listed(&api).await {
        let id = sbx["sandboxID"].as_str().unwrap().to_string();
        match sbx["state"].as_str().unwrap() {
            "error" => {
                assert!(
                    sbx["diagnostic"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{at}: {id} is error without a reason: {sbx}"
                );
                // The sandbox acted on keeps its data: it never ends in error.
                assert_ne!(
                    Some(&id),
                    p.sandbox
                        .as_ref()
                        .filter(|_| op != Op::Delete && op != Op::VolumeSave),
                    "{at}: the sandbox acted on ended in error: {sbx}"
                );
                continue;
            }
            "running" | "paused" => {}
            other => panic!("{at}: {id} is {other}: {sbx}"),
        }
        if op == Op::Hibernate && Some(&id) == p.sandbox.as_ref() {
            // Hibernated: its one stored pause snapshot; running on: none left over.
            let (_, listed) = api.fetch(&format!("/v1/sandboxes/{id}/snapshots")).await;
            let pauses = listed["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["kind"] == "pause")
                .count();
            let expected = usize::from(sbx["state"] == "paused");
            assert_eq!(
                pauses, expected,
                "{at}: stored pause snapshots of a {} sandbox: {listed}",
                sbx["state"]
            );
        }
        let (status, connected) = api
            .post(&format!("/v1/sandboxes/{id}/connect"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{at}: connecting {id}: {connected}");
        running += 1;
        let rt = Runtime::of(&connected);
        if op == Op::CreateWithVolume || op == Op::VolumeSave {
            continue;
        }
        if op == Op::Hibernate {
            // What it wrote before, and thawed: a write to a frozen file system would
            // block.
            let (out, err, code) = rt
                .run(&format!(
                    "cat {VOLUME_FILE} && timeout 10 sh -c 'echo after > {VOLUME_FILE} && sync'"
                ))
                .await;
            assert_eq!(
                (out.trim(), code),
                ("kept", 0),
                "{at}: {id}'s volume: {err}"
            );
        }
        let back = rt.read_file(FILE).await;
        assert!(
            back.as_deref() == Some(data().as_slice()),
            "{at}: {id}'s file came back as {:?} bytes",
            back.map(|b| b.len())
        );
    }
    if op == Op::Delete || op == Op::VolumeSave {
        let gone = api.get(p.sandbox.as_deref().unwrap()).await;
        assert_eq!(
            gone["state"], "deleted",
            "{at}: a delete cut short is finished: {gone}"
        );
    }
    assert_eq!(
        qemus_in(daemon.run_dir()).len(),
        running,
        "{at}: one QEMU per running sandbox"
    );
    assert_eq!(daemon.open_intents(), 0, "{at}: every intent was recovered");
    if let Some(volume) = &p.volume {
        check_volume(&api, volume, op, &at).await;
    }

    // Everything deleted through the API: nothing of theirs stays on the host.
    for sbx in listed(&api).await {
        let id = sbx["sandboxID"].as_str().unwrap();
        assert_eq!(
            api.delete(id).await,
            StatusCode::NO_CONTENT,
            "{at}: deleting {id}"
        );
    }
    assert_eq!(
        qemus_in(daemon.run_dir()).len(),
        0,
        "{at}: a QEMU outlived its sandbox"
    );
    // Large trees go on blocking threads after the delete answers: a few seconds.
    for dir in ["pauses", "forks", "uploads", "volumes"] {
        let dir = daemon.state_dir().join(dir);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !entries(&dir).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = entries(&dir);
        assert!(left.is_empty(), "{at}: left in {}: {left:?}", dir.display());
    }
}

/// The volume holds no writer once its sandboxes are gone (it can be mounted
/// read-write again), and a save cut short lost nothing written before the delete.
async fn check_volume(api: &Api, volume: &str, op: Op, at: &str) {
    // Its writer (if it still runs) ends first: then a new one may take it.
    for sbx in listed(api).await {
        let id = sbx["sandboxID"].as_str().unwrap();
        assert_eq!(
            api.delete(id).await,
            StatusCode::NO_CONTENT,
            "{at}: deleting {id}"
        );
    }
    let (status, v) = api
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(with_volume(volume, "rw")),
        )
        .await;
    assert!(status.is_success(), "{at}: the volume is still held: {v}");
    let expected = match op {
        Op::VolumeSave => Some("kept".to_string()),
        // What the hibernated (or running on) sandbox wrote after the restart.
        Op::Hibernate => Some("after".to_string()),
        _ => None,
    };
    if let Some(expected) = expected {
        let (out, _, code) = Runtime::of(&v).run(&format!("cat {VOLUME_FILE}")).await;
        assert_eq!(code, 0, "{at}: the volume lost its file");
        if !expected.is_empty() {
            assert_eq!(out.trim(), expected, "{at}: the volume lost its file");
        }
    }
    let id = v["sandboxID"].as_str().unwrap();
    assert_eq!(api.delete(id).await, StatusCode::NO_CONTENT);
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

/// Every failpoint of `op`, one daemon killed at each.
async fn every_point_of(op: Op) {
    for point in points_of(op).await {
        eprintln!("=== {op:?}: SIGKILL at {point}");
        kill_at(op, &point).await;
    }
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_pause() {
    every_point_of(Op::Pause).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_hibernate() {
    every_point_of(Op::Hibernate).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_snapshot() {
    every_point_of(Op::Snapshot).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_fork() {
    every_point_of(Op::Fork).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_restore() {
    every_point_of(Op::Restore).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_delete() {
    every_point_of(Op::Delete).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_create_with_a_volume() {
    every_point_of(Op::CreateWithVolume).await;
}

#[tokio::test]
async fn kill_9_at_every_step_of_a_volume_save() {
    every_point_of(Op::VolumeSave).await;
}
