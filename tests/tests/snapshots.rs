//! Pause/resume, snapshot/restore and fork with real microVMs.

use agent_client::ProcessEvent;
use nullspace_tests::{driver, minimal, process_alive, sh, ScratchDir};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vmm::{MemoryFormat, RestoreMemory, RestoreOptions, Snapshot, Vm, VmSpec, Vmm, VmmError};

fn spec_512() -> VmSpec {
    VmSpec {
        mem_mib: 512,
        ..minimal()
    }
}

async fn guest_unix_time(vm: &vmm::QemuVm) -> i64 {
    let out = vm.agent().run(sh("date +%s")).await.unwrap();
    out.stdout_str().trim().parse().unwrap()
}

fn host_unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_process_started_before_pause_runs_on_after_resume() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut p = vm
        .agent()
        .exec(sh(
            "i=0; while [ $i -lt 20 ]; do echo $i; i=$((i+1)); sleep 0.1; done",
        ))
        .await
        .unwrap();
    assert_eq!(
        p.next_event().await.unwrap(),
        Some(ProcessEvent::Stdout(b"0\n".to_vec()))
    );
    vm.pause().await.unwrap();
    let status = vm.qmp().execute("query-status", None).await.unwrap();
    assert_eq!(status["status"], "paused");
    // A line the guest wrote just before it stopped may still be on its way (in the
    // host's buffers); at most two such, then nothing runs while paused.
    let mut out = String::new();
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_millis(300), p.next_event()).await {
            Ok(Ok(Some(ProcessEvent::Stdout(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => break,
            other => panic!("{other:?} while paused"),
        }
    }
    let quiet = tokio::time::timeout(Duration::from_secs(1), p.next_event()).await;
    assert!(
        quiet.is_err(),
        "output while paused (after {out:?}): {quiet:?}"
    );
    vm.resume().await.unwrap();
    while let Some(e) = p.next_event().await.unwrap() {
        match e {
            ProcessEvent::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            ProcessEvent::Exited(s) => assert!(s.success()),
            other => panic!("{other:?}"),
        }
    }
    let want: String = (1..20).map(|i| format!("{i}\n")).collect();
    assert_eq!(out, want);
}

#[tokio::test]
async fn the_guest_clock_is_right_after_a_30_second_pause() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    vm.pause().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    vm.resume().await.unwrap();
    let skew = (guest_unix_time(&vm).await - host_unix_time()).abs();
    assert!(skew <= 2, "guest clock is {skew} s off after the pause");
}

#[tokio::test]
async fn snapshot_and_restore_keep_a_running_process_memory_and_disk() {
    let d = driver().await;
    let mut vm = d.boot(&spec_512()).await.unwrap();
    // A process holding a value only in its memory, waiting for input.
    let mut req =
        sh("v=$(cat /proc/sys/kernel/random/uuid); echo before $v; read line; echo after $v $line");
    req.background = true;
    req.stdin = true;
    let mut p = vm.agent().exec(req).await.unwrap();
    let pid = p.pid();
    let before = match p.next_event().await.unwrap() {
        Some(ProcessEvent::Stdout(b)) => String::from_utf8(b).unwrap(),
        other => panic!("{other:?}"),
    };
    let value = before.trim().strip_prefix("before ").unwrap().to_string();
    p.detach().await.unwrap();
    vm.agent()
        .write_file("/workspace/on-disk.txt", &b"disk survives"[..], None, None)
        .await
        .unwrap();
    vm.agent()
        .run(sh("echo in-tmpfs > /tmp/mem.txt"))
        .await
        .unwrap();

    let scratch = ScratchDir::new("snapshot");
    let snapshot = vm.snapshot(&scratch.path().join("s1"), true).await.unwrap();
    assert_eq!(snapshot.manifest().memory, MemoryFormat::File);
    assert_eq!(snapshot.manifest().mem_mib, 512);
    // The source keeps running and serving.
    assert_eq!(
        vm.agent().run(sh("echo alive")).await.unwrap().stdout_str(),
        "alive\n"
    );

    // Restore after a delay: the restored clock is set from the host's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for memory in [RestoreMemory::Copy, RestoreMemory::CopyOnWrite] {
        let restored = d
            .restore(
                &Snapshot::open(snapshot.dir()).unwrap(),
                &RestoreOptions {
                    memory,
                    ..RestoreOptions::default()
                },
            )
            .await
            .unwrap();
        let a = restored.agent();
        let listed = a.processes().await.unwrap();
        assert!(listed.iter().any(|i| i.pid == pid), "{listed:?}");
        let attached = a.attach(pid).await.unwrap();
        attached.write_stdin(b"hello\n").await.unwrap();
        let out = attached.wait().await.unwrap();
        assert_eq!(
            out.stdout_str(),
            format!("after {value} hello\n"),
            "{memory:?}"
        );
        assert_eq!(
            a.read_file("/workspace/on-disk.txt").await.unwrap(),
            b"disk survives"
        );
        assert_eq!(a.read_file("/tmp/mem.txt").await.unwrap(), b"in-tmpfs\n");
        let skew = (guest_unix_time(&restored).await - host_unix_time()).abs();
        assert!(skew <= 2, "restored clock is {skew} s off");
        let (qemu, dir) = (restored.pid().unwrap(), restored.dir().to_path_buf());
        restored.kill().await;
        assert!(
            !process_alive(qemu) && !dir.exists(),
            "restored VM left traces"
        );
    }
    // The source's own process was not disturbed by its restored copies.
    let listed = vm.agent().processes().await.unwrap();
    assert!(listed.iter().any(|i| i.pid == pid && i.exit.is_none()));
    snapshot.delete().unwrap();
}

#[tokio::test]
async fn fork_children_diverge_and_share_memory_copy_on_write() {
    let d = driver().await;
    let mut parent = d.boot(&spec_512()).await.unwrap();
    // Touch memory in the parent so the snapshot holds something worth sharing.
    parent
        .agent()
        .run(sh(
            "head -c 50000000 /dev/zero > /tmp/ballast && echo parent > /workspace/who",
        ))
        .await
        .unwrap();
    let scratch = ScratchDir::new("fork");
    let (snapshot, children) = d
        .fork(&mut parent, 3, &scratch.path().join("fork"), |_, _| {
            Ok(Default::default())
        })
        .await
        .unwrap();
    assert_eq!(children.len(), 3);

    for (i, child) in children.iter().enumerate() {
        let a = child.agent();
        a.write_file(
            "/workspace/who",
            format!("child {i}").as_bytes(),
            None,
            None,
        )
        .await
        .unwrap();
        let mut req = sh(&format!("echo started-{i}; sleep 300"));
        req.background = true;
        a.exec(req).await.unwrap().detach().await.unwrap();
    }
    for (i, child) in children.iter().enumerate() {
        let a = child.agent();
        assert_eq!(
            a.read_file("/workspace/who").await.unwrap(),
            format!("child {i}").as_bytes()
        );
        let procs = a.processes().await.unwrap();
        assert_eq!(
            procs.len(),
            1,
            "each child has only its own process: {procs:?}"
        );
        assert_eq!(a.read_file("/tmp/ballast").await.unwrap().len(), 50_000_000);
    }
    assert_eq!(
        parent.agent().read_file("/workspace/who").await.unwrap(),
        b"parent\n"
    );
    assert!(parent.agent().processes().await.unwrap().is_empty());

    // Memory: each child's own pages are far below its configured 512 MiB, because the
    // snapshot's pages (the 50 MB ballast included) are shared until written.
    let snapshot_bytes = snapshot.disk_usage();
    for child in &children {
        let rollup =
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.pid().unwrap()))
                .unwrap();
        let kib = |key: &str| -> u64 {
            rollup
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let private_mib = (kib("Private_Dirty:") + kib("Private_Clean:")) / 1024;
        eprintln!(
            "child {}: private {private_mib} MiB, Pss {} MiB (snapshot {} MiB)",
            child.pid().unwrap(),
            kib("Pss:") / 1024,
            snapshot_bytes >> 20
        );
        assert!(
            private_mib < 512 / 4,
            "child uses {private_mib} MiB of its own for 512 MiB configured"
        );
    }

    // A child (copy-on-write RAM) can itself be snapshotted and restored: its RAM,
    // which QEMU sends inside the migration stream, is split out into a positional
    // memory image that shares the fork snapshot's unchanged pages chunk for chunk.
    let mut child = children.into_iter().next().unwrap();
    let ram_sum = child
        .agent()
        .run(sh(
            "head -c 8388608 /dev/urandom > /tmp/rand && sha256sum /tmp/rand",
        ))
        .await
        .unwrap()
        .stdout_str();
    let nested = child
        .snapshot(&scratch.path().join("nested"), false)
        .await
        .unwrap();
    assert_eq!(nested.manifest().memory, MemoryFormat::File);
    let chunks = |path: std::path::PathBuf| -> std::collections::HashSet<Vec<u8>> {
        std::fs::read(path)
            .unwrap()
            .chunks(1 << 20)
            .filter(|c| c.iter().any(|b| *b != 0))
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (forked, child_ram) = (
        chunks(snapshot.dir().join("memory")),
        chunks(nested.dir().join("memory")),
    );
    let shared = child_ram.intersection(&forked).count();
    eprintln!(
        "memory chunks: fork snapshot {}, child {}, shared {shared}",
        forked.len(),
        child_ram.len()
    );
    assert!(
        shared * 2 > forked.len(),
        "the child's memory image shares {shared} of the fork snapshot's {} chunks",
        forked.len()
    );
    // The nested snapshot stands alone: the fork snapshot its disk grew from can go.
    snapshot.delete().unwrap();
    let grandchild = d
        .restore(&nested, &RestoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        grandchild
            .agent()
            .read_file("/workspace/who")
            .await
            .unwrap(),
        b"child 0"
    );
    // Its RAM bit for bit: the random file in tmpfs the child wrote before the snapshot.
    assert_eq!(
        grandchild
            .agent()
            .run(sh("sha256sum /tmp/rand"))
            .await
            .unwrap()
            .stdout_str(),
        ram_sum
    );
}

#[tokio::test]
async fn restoring_with_another_qemu_or_kernel_is_refused() {
    let d = driver().await;
    let mut vm = d.boot(&minimal()).await.unwrap();
    let scratch = ScratchDir::new("mismatch");
    let snapshot = vm.snapshot(&scratch.path().join("s"), false).await.unwrap();
    vm.kill().await;
    let manifest_path = snapshot.dir().join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    // Another QEMU or kernel; and machine arguments or a root filesystem that are not
    // this host's (a manifest from a bucket is never trusted).
    type Tamper = fn(&mut serde_json::Value);
    let cases: [(Tamper, &[&str]); 4] = [
        (
            |m| m["qemu_version"] = "QEMU emulator version 99.0.0".into(),
            &["QEMU", "99.0.0"],
        ),
        (
            |m| m["kernel_key"] = "0000000000000000".into(),
            &["guest kernel", "0000000000000000"],
        ),
        (
            |m| {
                m["machine_args"]
                    .as_array_mut()
                    .unwrap()
                    .push("-no-shutdown".into())
            },
            &["machine arguments"],
        ),
        (
            |m| m["rootfs_image"] = "/etc/shadow".into(),
            &["root filesystem"],
        ),
    ];
    for (tamper, says) in cases {
        let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
        tamper(&mut m);
        std::fs::write(&manifest_path, m.to_string()).unwrap();
        let err = d
            .restore(
                &Snapshot::open(snapshot.dir()).unwrap(),
                &RestoreOptions::default(),
            )
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, VmmError::SnapshotMismatch(_)), "{err}");
        let msg = err.to_string();
        assert!(says.iter().all(|w| msg.contains(w)), "{msg}");
        assert!(msg.contains("take a new snapshot"), "{msg}");
    }
    // The untouched manifest restores.
    std::fs::write(&manifest_path, &original).unwrap();
    let vm = d
        .restore(
            &Snapshot::open(snapshot.dir()).unwrap(),
            &RestoreOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        vm.agent().run(sh("echo ok")).await.unwrap().stdout_str(),
        "ok\n"
    );
    // A half-written snapshot (no manifest) is not a snapshot.
    std::fs::remove_file(&manifest_path).unwrap();
    assert!(Snapshot::open(snapshot.dir()).is_err());
}

#[tokio::test]
async fn a_copy_on_write_vm_whose_stream_cannot_be_split_is_saved_whole_and_restores() {
    // What a stream of another QEMU's layout gets: the snapshot is saved again with
    // its RAM in the stream (`x-ignore-shared` off), and restores as such.
    std::env::set_var("NULLSPACE_TEST_REFUSE_RAM_SPLIT", "1");
    let d = driver().await;
    let mut vm = d.boot(&minimal()).await.unwrap();
    let scratch = ScratchDir::new("unsplit");
    let base = vm
        .snapshot(&scratch.path().join("base"), false)
        .await
        .unwrap();
    vm.kill().await;
    let options = RestoreOptions {
        memory: RestoreMemory::CopyOnWrite,
        ..RestoreOptions::default()
    };
    let mut child = d.restore(&base, &options).await.unwrap();
    let sum = child
        .agent()
        .run(sh(
            "head -c 1048576 /dev/urandom > /tmp/r && sha256sum /tmp/r",
        ))
        .await
        .unwrap()
        .stdout_str();
    assert!(sum.contains("/tmp/r"), "{sum:?}");
    let whole = child
        .snapshot(&scratch.path().join("whole"), false)
        .await
        .unwrap();
    assert_eq!(whole.manifest().memory, MemoryFormat::Stream);
    assert!(!whole.dir().join("memory").exists());
    child.kill().await;
    let again = d.restore(&whole, &RestoreOptions::default()).await.unwrap();
    assert_eq!(
        again
            .agent()
            .run(sh("sha256sum /tmp/r"))
            .await
            .unwrap()
            .stdout_str(),
        sum
    );
}
