//! A guest is root in its VM and may be hostile; so may another team. Each test here
//! states what the host must hold and measures it.

use nullspace_tests::http::{small, Api, Runtime};
use nullspace_tests::Daemon;
use serde_json::json;
use std::collections::HashSet;

#[tokio::test]
async fn sandboxes_restored_from_one_template_never_share_random_output() {
    let daemon = Daemon::start("hostile-rng");
    let api = Api::new(&daemon, daemon.team_key("rng"));
    // Ten sandboxes from one template snapshot: without fresh entropy from the host
    // they resume with one CRNG state and read the same bytes.
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..10 {
        let sbx = api
            .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 300 }))
            .await;
        let (out, err, code) = Runtime::of(&sbx)
            .run("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
            .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.len(), 64, "32 bytes as hex: {out:?}");
        assert!(seen.insert(out.clone()), "two sandboxes read {out}");
        ids.push(sbx["sandboxID"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 10);
    for id in &ids {
        assert_eq!(api.delete(id).await, reqwest::StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn a_guest_flooding_its_console_costs_the_host_a_bounded_log() {
    let daemon = Daemon::start("hostile-console");
    let api = Api::new(&daemon, daemon.team_key("console"));
    let sbx = api
        .create(json!({ "templateID": "minimal", "resources": small(), "timeout": 300 }))
        .await;
    let rt = Runtime::of(&sbx);
    // Root in the guest writes 8 MiB to the serial console, then a marker.
    let resp = rt
        .post(
            "/commands",
            json!({
                "cmd": "head -c 8388608 /dev/zero | tr '\\0' x > /dev/ttyS0; echo END-OF-FLOOD > /dev/ttyS0; echo done",
                "user": "root"
            }),
        )
        .await;
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.contains("done"), "{text}");
    // The daemon checks every second: give it one more pass, then measure.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (mut kept, mut rotated) = (0, false);
    for vm in std::fs::read_dir(daemon.run_dir()).unwrap().flatten() {
        for name in ["console.log", "console.log.1"] {
            kept += std::fs::metadata(vm.path().join(name)).map_or(0, |m| m.len());
        }
        rotated |= vm.path().join("console.log.1").exists();
    }
    assert!(rotated, "the log was rotated");
    // At most the cap (1 MiB) plus the half rotated out, plus what a second of writes
    // adds: far under the 8 MiB written.
    assert!(kept < 3 * 1024 * 1024, "{kept} bytes of console kept");
    // The log's tail is still read (by seeking) and ends with what the guest wrote last.
    let id = sbx["sandboxID"].as_str().unwrap();
    let (status, logs) = api.fetch(&format!("/v1/sandboxes/{id}/logs")).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{logs}");
    assert!(
        logs.to_string().contains("END-OF-FLOOD"),
        "the tail is served"
    );
    assert_eq!(api.delete(id).await, reqwest::StatusCode::NO_CONTENT);
}

/// Bytes allocated by the files under `dir`, recursively.
fn allocated_under(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_under(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test]
async fn what_a_guest_writes_to_its_disk_costs_host_disk_not_memory() {
    let daemon = Daemon::start("hostile-disk");
    let api = Api::new(&daemon, daemon.team_key("disk"));
    let sbx = api
        .create(json!({
            "templateID": "minimal",
            "resources": { "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 },
            "timeout": 300
        }))
        .await;
    let rt = Runtime::of(&sbx);
    let memory_before = allocated_under(daemon.run_dir());
    // More than the guest's RAM, synced to its disk; then past the disk's end, which
    // the guest sees as a full disk and nothing else notices.
    let resp = rt
        .post(
            "/commands",
            json!({
                "cmd": "dd if=/dev/zero of=/workspace/fill bs=1M count=400 conv=fsync 2>/dev/null && echo filled; \
                        dd if=/dev/zero of=/workspace/more bs=1M count=1024 conv=fsync 2>&1 | grep -o 'No space left' | head -1",
                "user": "root"
            }),
        )
        .await;
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.contains("filled"), "{text}");
    assert!(
        text.contains("No space left"),
        "the guest's disk fills: {text}"
    );
    let memory_grew = allocated_under(daemon.run_dir()).saturating_sub(memory_before);
    let on_disk = allocated_under(&daemon.state_dir().join("disks"));
    assert!(
        on_disk > 900 * 1024 * 1024,
        "the overlay holds what was written: {on_disk} bytes"
    );
    assert!(
        memory_grew < 64 * 1024 * 1024,
        "the run dir (memory) grew by {memory_grew} bytes"
    );
    // The daemon and the sandbox still answer.
    let (out, _, code) = rt
        .run("rm -f /workspace/fill /workspace/more; echo ok")
        .await;
    assert_eq!((out.trim(), code), ("ok", 0));
    let id = sbx["sandboxID"].as_str().unwrap();
    assert_eq!(api.delete(id).await, reqwest::StatusCode::NO_CONTENT);
}
