//! The guest runtime end to end: real QEMU microVMs (TCG on our machines) and the real
//! guest agent. Every test boots its own VM; dropping the VM kills QEMU and removes its
//! directory, also when an assertion fails.

use agent_client::{ClientError, ProcessEvent};
use agent_protocol::{ErrorCode, FileType};
use nullspace_tests::{argv, driver, minimal, process_alive, sh, sha256_hex};
use std::time::{Duration, Instant};
use vmm::{Accel, AccelChoice, QemuConfig, QemuVmm, Vm, VmSpec, Vmm};

fn agent_code(err: ClientError) -> ErrorCode {
    match err {
        ClientError::Agent(e) => e.code,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_runs_as_the_default_user_in_workspace() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let out = vm
        .agent()
        .run(sh("echo hello; id -u; pwd; echo oops >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "hello\n1000\n/workspace\n");
    assert_eq!(out.stderr_str(), "oops\n");
    assert_eq!(out.status.code, Some(3));

    let out = vm.agent().run(argv(&["echo", "a b", "c"])).await.unwrap();
    assert_eq!(out.stdout_str(), "a b c\n");
    assert!(out.status.success());
}

#[tokio::test]
async fn env_cwd_and_user_are_applied() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut req = sh("echo $GREETING; pwd; id -un");
    req.env.insert("GREETING".into(), "hi there".into());
    req.cwd = Some("/tmp".into());
    req.user = Some("root".into());
    let out = vm.agent().run(req).await.unwrap();
    assert_eq!(out.stdout_str(), "hi there\n/tmp\nroot\n");

    // The guest runs with the host's TSC frequency, so it never calibrates.
    let cmdline = vm.agent().read_file("/proc/cmdline").await.unwrap();
    let khz = vmm::tsc::host_tsc_khz().unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&format!("tsc_early_khz={khz}")),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
}

#[tokio::test]
async fn output_streams_while_the_process_runs() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut p = vm
        .agent()
        .exec(sh("echo first; sleep 2; echo second"))
        .await
        .unwrap();
    let started = Instant::now();
    let first = p.next_event().await.unwrap();
    let first_at = started.elapsed();
    assert_eq!(first, Some(ProcessEvent::Stdout(b"first\n".to_vec())));
    let mut rest = Vec::new();
    while let Some(e) = p.next_event().await.unwrap() {
        rest.push(e);
    }
    let done_at = started.elapsed();
    assert_eq!(
        rest,
        vec![
            ProcessEvent::Stdout(b"second\n".to_vec()),
            ProcessEvent::Exited(agent_protocol::ExitStatus {
                code: Some(0),
                signal: None
            })
        ]
    );
    assert!(
        done_at - first_at > Duration::from_millis(1500),
        "first output arrived {first_at:?}, exit at {done_at:?}: not streamed"
    );
}

#[tokio::test]
async fn ten_megabytes_of_stdout_arrive_complete_and_in_order() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    // 12 MB of numbered lines: order and completeness are both checkable.
    let p = vm
        .agent()
        .exec(sh("seq 1 1500000 | sed 's/$/ line/'"))
        .await
        .unwrap();
    let mut chunks = 0;
    let mut stdout = Vec::new();
    let status = p
        .wait_with(
            |b| {
                chunks += 1;
                stdout.extend_from_slice(b);
            },
            |_| {},
        )
        .await
        .unwrap();
    assert!(status.success());
    assert!(stdout.len() >= 10_000_000, "{} bytes", stdout.len());
    assert!(chunks > 10, "{chunks} chunks: not streamed");
    let text = String::from_utf8(stdout).unwrap();
    for (i, line) in text.lines().enumerate() {
        assert_eq!(line, format!("{} line", i + 1));
    }
    assert_eq!(text.lines().count(), 1_500_000);
}

#[tokio::test]
async fn output_nobody_reads_is_cut_off_instead_of_filling_the_host() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let limit = agent_client::MAX_UNREAD_BYTES;
    let mb = limit / (1 << 20) + 16;
    let mut p = vm
        .agent()
        .exec(sh(&format!(
            "dd if=/dev/zero bs=1M count={mb} 2>/dev/null; echo done"
        )))
        .await
        .unwrap();
    // Read nothing while the guest writes more than the limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kib = |s: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = rss_kib(&status);
    // The cut-off cancels the command in the guest: dd goes away.
    loop {
        assert!(Instant::now() < deadline, "the stream was never cut off");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let out = vm
            .agent()
            .run(sh("ps | grep -c '[d]d if=/dev/zero' || true"))
            .await
            .unwrap();
        if out.stdout_str().trim() == "0" {
            break;
        }
    }
    // What was buffered drains, then the stream ends with the cut-off, never "done".
    let err = loop {
        match p.next_event().await {
            Ok(Some(ProcessEvent::Stdout(_))) => {}
            Ok(other) => panic!("expected the cut-off, got {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("went unread"), "{err}");
    let grown =
        rss_kib(&std::fs::read_to_string("/proc/self/status").unwrap()).saturating_sub(before);
    assert!(
        grown < 2 * limit as u64 / 1024,
        "the host buffered {grown} KiB for a {} KiB limit",
        limit / 1024
    );
}

#[tokio::test]
async fn a_64_mib_file_uploads_and_downloads_intact() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    // Pseudo-random, so a dropped or repeated chunk changes the hash.
    let mut data = vec![0u8; 64 * 1024 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let want = sha256_hex(&data);
    let written = vm
        .agent()
        .write_file("/workspace/big.bin", &data[..], None, None)
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);
    let out = vm.agent().run(sh("sha256sum big.bin")).await.unwrap();
    assert_eq!(out.stdout_str().split_whitespace().next(), Some(&*want));
    let back = vm.agent().read_file("/workspace/big.bin").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256_hex(&back), want);
    let info = vm.agent().stat("big.bin").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!((info.uid, info.file_type), (1000, FileType::File));
}

#[tokio::test]
async fn commands_run_as_another_user_and_unknown_users_are_refused() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut req = sh("id -u; id -g; echo $HOME $USER");
    req.user = Some("root".into());
    let out = vm.agent().run(req).await.unwrap();
    assert_eq!(out.stdout_str(), "0\n0\n/root root\n");

    // The default user cannot write where root owns the files.
    let out = vm.agent().run(sh("touch /etc/x")).await.unwrap();
    assert!(!out.status.success());

    let mut req = sh("true");
    req.user = Some("nobody-here".into());
    let err = vm.agent().run(req).await.unwrap_err();
    assert!(err.to_string().contains("send one of: root, user"), "{err}");
    assert_eq!(agent_code(err), ErrorCode::UnknownUser);
}

#[tokio::test]
async fn stdin_reaches_the_process_and_signals_end_it() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut req = sh("tr a-z A-Z");
    req.stdin = true;
    let p = vm.agent().exec(req).await.unwrap();
    p.write_stdin(b"hello ").await.unwrap();
    p.write_stdin(b"stdin\n").await.unwrap();
    p.close_stdin().await.unwrap();
    let out = p.wait().await.unwrap();
    assert_eq!(out.stdout_str(), "HELLO STDIN\n");

    // A signal reaches the whole process group: the shell and its sleep.
    let p = vm
        .agent()
        .exec(sh("sleep 300; echo not reached"))
        .await
        .unwrap();
    vm.agent().signal(p.pid(), libc::SIGTERM).await.unwrap();
    let out = p.wait().await.unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGTERM));
    assert_eq!(out.stdout_str(), "");

    let err = vm.agent().signal(999_999, libc::SIGTERM).await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::NotFound);
}

#[tokio::test]
async fn background_processes_are_listed_and_reattached() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let mut req = sh("echo start; sleep 2; echo end");
    req.background = true;
    let mut p = vm.agent().exec(req).await.unwrap();
    let pid = p.pid();
    assert_eq!(
        p.next_event().await.unwrap(),
        Some(ProcessEvent::Stdout(b"start\n".to_vec()))
    );
    p.detach().await.unwrap();

    let listed = vm.agent().processes().await.unwrap();
    let entry = listed.iter().find(|i| i.pid == pid).expect("listed");
    assert!(entry.background && !entry.attached && entry.exit.is_none());

    // Re-attach: what it wrote while detached, then the rest, then the exit.
    let out = vm.agent().attach(pid).await.unwrap().wait().await.unwrap();
    assert_eq!(out.stdout_str(), "end\n");
    assert!(out.status.success());

    // A background process survives its handle being dropped, and its output waits.
    let mut req = sh("sleep 1; echo later");
    req.background = true;
    let pid = vm.agent().exec(req).await.unwrap().pid();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = vm.agent().attach(pid).await.unwrap().wait().await.unwrap();
    assert_eq!(out.stdout_str(), "later\n");
    // Collected: it is gone from the list.
    assert!(vm
        .agent()
        .processes()
        .await
        .unwrap()
        .iter()
        .all(|i| i.pid != pid));

    // A foreground process dies with its handle.
    let pid = vm.agent().exec(sh("sleep 300")).await.unwrap().pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = vm
        .agent()
        .run(sh(&format!(
            "test -d /proc/{pid} && echo alive || echo gone"
        )))
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "gone\n");
}

#[tokio::test]
async fn sixteen_concurrent_commands_share_one_channel() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let agent = vm.agent().clone();
    // A barrier in the guest: each command arrives, then waits for all 16. They can only
    // finish if all 16 run at once over the one channel.
    let runs = (0..16).map(|i| {
        let agent = agent.clone();
        tokio::spawn(async move {
            let out = agent
                .run(sh(&format!(
                    "touch /tmp/arrived-{i}; \
                     while [ $(ls /tmp/arrived-* | wc -l) -lt 16 ]; do sleep 0.1; done; \
                     for j in 1 2 3; do echo {i}-$j; done"
                )))
                .await
                .unwrap();
            (i, out)
        })
    });
    let all = futures::future::join_all(runs);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("all 16 commands ran at once");
    for r in results {
        let (i, out) = r.unwrap();
        assert_eq!(out.stdout_str(), format!("{i}-1\n{i}-2\n{i}-3\n"));
        assert!(out.status.success());
    }
}

#[tokio::test]
async fn file_operations() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let a = vm.agent();
    a.mkdir("/workspace/d/e", None).await.unwrap();
    a.write_file("d/e/f.txt", &b"content"[..], Some(0o600), None)
        .await
        .unwrap();
    let info = a.stat("/workspace/d/e/f.txt").await.unwrap();
    assert_eq!((info.size, info.mode, info.uid), (7, 0o600, 1000));
    let names: Vec<String> = a
        .list_dir("d/e")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["f.txt"]);
    a.rename("d/e/f.txt", "d/g.txt").await.unwrap();
    assert_eq!(a.read_file("d/g.txt").await.unwrap(), b"content");
    // Overwrite replaces the content.
    a.write_file("d/g.txt", &b"new"[..], None, None)
        .await
        .unwrap();
    assert_eq!(a.read_file("d/g.txt").await.unwrap(), b"new");
    a.remove("d").await.unwrap();
    let err = a.stat("d").await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::NotFound);
    // Root can write as root, and files belong to who asked.
    a.write_file("/etc/owned-by-root", &b"x"[..], None, Some("root"))
        .await
        .unwrap();
    assert_eq!(a.stat("/etc/owned-by-root").await.unwrap().uid, 0);
    // Nothing of the uploads' temporary files is left.
    let out = a
        .run(sh("ls -a /workspace /etc | grep -c nullspace-upload"))
        .await
        .unwrap();
    assert_eq!(out.stdout_str().trim(), "0");
}

#[tokio::test]
async fn bad_input_gives_clear_errors_and_the_agent_keeps_serving() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let a = vm.agent();

    let err = a.run(argv(&["/no/such/binary"])).await.unwrap_err();
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    assert_eq!(agent_code(err), ErrorCode::NotFound);

    let err = a.run(argv(&[])).await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::InvalidArgument);

    let mut req = sh("true");
    req.cwd = Some("/does/not/exist".into());
    let err = a.run(req).await.unwrap_err();
    assert!(err.to_string().contains("send another cwd"), "{err}");
    assert_eq!(agent_code(err), ErrorCode::NotFound);

    let err = a.read_file("/does/not/exist").await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::NotFound);
    let err = a.read_file("/workspace").await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::IsADirectory);
    let err = a.list_dir("/etc/passwd").await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::NotADirectory);
    let err = a.stat("").await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::InvalidArgument);
    let err = a
        .write_file("/proc/nope/x", &b"x"[..], None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Agent(_)), "{err:?}");

    // A frame over the limit: refused with a clear error, and the channel stays in sync.
    let mut stream = a.stream_for_test();
    let mut raw = Vec::new();
    let len = agent_protocol::MAX_FRAME_PAYLOAD as u32 + 1;
    agent_protocol::frame::encode_header(&mut raw, 2, 0, stream.id(), len);
    raw.resize(raw.len() + len as usize, 0x41);
    a.send_raw_for_test(raw).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an answer, not a hang")
        .unwrap();
    match reply {
        agent_client::StreamEvent::Reply(agent_protocol::Reply::Error(e)) => {
            assert_eq!(e.code, ErrorCode::FrameTooLarge);
            assert!(e.message.contains("chunks"), "{}", e.message);
        }
        other => panic!("expected frame_too_large, got {other:?}"),
    }
    // A request kind this agent does not know (a newer host's): unsupported, not fatal.
    let mut stream = a.stream_for_test();
    let frame = agent_protocol::Frame::Control {
        stream: stream.id(),
        json: br#"{"op":"teleport","to":"mars"}"#.to_vec(),
    };
    a.send_raw_for_test(frame.encode()).await.unwrap();
    match stream.next().await.unwrap() {
        agent_client::StreamEvent::Reply(agent_protocol::Reply::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unsupported, "{}", e.message);
        }
        other => panic!("expected unsupported, got {other:?}"),
    }
    // A control message too big for a frame never leaves the host.
    let err = a.run(sh(&"x".repeat(2 * 1024 * 1024))).await.unwrap_err();
    assert!(
        matches!(err, ClientError::RequestTooLarge { .. }),
        "{err:?}"
    );

    let out = a.run(sh("echo still here")).await.unwrap();
    assert_eq!(out.stdout_str(), "still here\n");
}

#[tokio::test]
async fn user_mode_networking_never_reaches_the_hosts_loopback() {
    // A host listener on loopback, which QEMU's user-mode gateway (10.0.2.2) would
    // reach without `restrict=on`: it counts connections and closes each at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The probe works: the same command reaches a listener inside the guest.
    let d = driver().await;
    assert!(
        !d.isolated_network(),
        "this test is about user-mode networking"
    );
    for egress in [true, false] {
        let vm = d
            .boot(&VmSpec {
                egress,
                ..minimal()
            })
            .await
            .unwrap();
        let probe = format!(
            "nc -l -p 8000 </dev/null >/dev/null & sleep 0.3; \
             if nc -w 2 127.0.0.1 8000 </dev/null; then echo local-ok; fi; \
             if nc -w 3 10.0.2.2 {port} </dev/null; then echo host-reached; else echo refused; fi"
        );
        let out = tokio::time::timeout(Duration::from_secs(30), vm.agent().run(sh(&probe)))
            .await
            .expect("the probe ends within its own timeout")
            .unwrap();
        let said = out.stdout_str();
        assert!(
            said.contains("local-ok"),
            "the probe itself works: {said} {}",
            out.stderr_str()
        );
        assert!(said.contains("refused"), "egress {egress}: {said}");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no guest reached the host's loopback"
    );
}

#[tokio::test]
async fn qemu_runs_unprivileged_under_seccomp() {
    let d = driver().await;
    let vm = d.boot(&minimal()).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid().unwrap())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap()
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let vm_user = std::process::Command::new("id")
        .args(["-u", vmm::qemu::VM_USER])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match (root, vm_user) {
        (true, Some(account)) => {
            // A user and group of its own, keeping the VM account's group (shared
            // snapshots): another VM's QEMU can neither signal nor read it.
            let uid: u32 = field("Uid:").parse().unwrap();
            assert!(
                vmm::vm_user::is_vm_uid(uid),
                "QEMU runs as VM uid, not {uid}"
            );
            assert_ne!(uid.to_string(), account);
            assert_eq!(field("Gid:"), uid.to_string(), "its own group");
            let shared_gid = std::process::Command::new("id")
                .args(["-g", vmm::qemu::VM_USER])
                .output()
                .unwrap();
            let shared_gid = String::from_utf8_lossy(&shared_gid.stdout)
                .trim()
                .to_string();
            let groups = status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .unwrap_or_default();
            assert!(
                groups.split_whitespace().any(|g| g == shared_gid),
                "{groups:?} holds {shared_gid}"
            );
            let second = d.boot(&minimal()).await.unwrap();
            let other =
                std::fs::read_to_string(format!("/proc/{}/status", second.pid().unwrap())).unwrap();
            assert!(
                !other.contains(&format!("Uid:\t{uid}\t")),
                "two VMs never share a uid"
            );
        }
        // SAFETY: geteuid has no preconditions.
        _ => assert_eq!(field("Uid:"), unsafe { libc::geteuid() }.to_string()),
    }
    assert!(d.seccomp(), "this host supports seccomp");
    assert_eq!(field("Seccomp:"), "2", "QEMU runs under a seccomp filter");
}

#[tokio::test]
async fn killing_a_vm_leaves_no_process_socket_or_file() {
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let pid = vm.pid().unwrap();
    let dir = vm.dir().to_path_buf();
    let disk = vm.disk_path().to_path_buf();
    assert!(process_alive(pid));
    assert!(dir.join("agent.sock").exists() && disk.exists());
    vm.kill().await;
    assert!(!process_alive(pid), "QEMU {pid} still runs");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!disk.exists(), "{} left behind", disk.display());

    // Dropping without kill (a panicking test) cleans up the same way.
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let (pid, dir) = (vm.pid().unwrap(), vm.dir().to_path_buf());
    let disk = vm.disk_path().to_path_buf();
    drop(vm);
    assert!(!process_alive(pid) && !dir.exists() && !disk.exists());

    // An agent call on a dead VM fails instead of hanging.
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let agent = vm.agent().clone();
    vm.kill().await;
    let err = tokio::time::timeout(Duration::from_secs(10), agent.run(sh("true")))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(matches!(err, ClientError::Disconnected), "{err:?}");
}

#[tokio::test]
async fn base_image_has_its_tools_and_the_disk_grows_to_the_asked_size() {
    let vm = driver()
        .await
        .boot(&VmSpec {
            rootfs: "base".into(),
            vcpus: 2,
            mem_mib: 1024,
            disk_mib: 4096,
            ..VmSpec::default()
        })
        .await
        .unwrap();
    let out = vm
        .agent()
        .run(sh(
            "python3 -c 'print(6*7)' && git --version >/dev/null && curl --version >/dev/null && bash -c 'echo bash' && test -d /workspace && cat /etc/debian_version",
        ))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    assert!(
        out.stdout_str().starts_with("42\nbash\n12."),
        "{}",
        out.stdout_str()
    );
    // The filesystem grows in the background after boot.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = vm.agent().run(sh("df -k / | tail -1")).await.unwrap();
        let kb: u64 = out
            .stdout_str()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if kb > 3_500_000 {
            break;
        }
        assert!(Instant::now() < deadline, "root is still {kb} KiB");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn invalid_specs_are_refused_before_anything_starts() {
    let d = driver().await;
    for (spec, hint) in [
        (
            VmSpec {
                rootfs: "nope".into(),
                ..minimal()
            },
            "send one of: base, minimal",
        ),
        (
            VmSpec {
                vcpus: 0,
                ..minimal()
            },
            "send 1 to 64",
        ),
        (
            VmSpec {
                mem_mib: 16,
                ..minimal()
            },
            "send 128 to",
        ),
        (
            VmSpec {
                disk_mib: 1,
                ..minimal()
            },
            "to 16777216 MiB",
        ),
    ] {
        let err = d.boot(&spec).await.err().expect("refused").to_string();
        assert!(err.contains(hint), "{err}");
    }
}

#[tokio::test]
async fn accelerator_override_and_auto_detection() {
    nullspace_tests::init_logging();
    let images = vmm::ImageSet::from_env().unwrap();
    // Override: TCG whatever the host offers; QEMU confirms KVM is off.
    let tcg = QemuVmm::new(
        QemuConfig {
            accel: AccelChoice::Fixed(Accel::Tcg),
            ..QemuConfig::from_env().unwrap()
        },
        images.clone(),
    )
    .await
    .unwrap();
    assert_eq!(tcg.accel().accel, Accel::Tcg);
    let vm = tcg.boot(&minimal()).await.unwrap();
    let kvm = vm.qmp().execute("query-kvm", None).await.unwrap();
    assert_eq!(kvm["enabled"], false);
    drop(vm);

    // Detection, uncached: KVM only if a guest really boots under it.
    let detection = tcg.detect_accel(false).await;
    let auto = QemuVmm::new(
        QemuConfig {
            accel: AccelChoice::Auto,
            ..QemuConfig::from_env().unwrap()
        },
        images,
    )
    .await
    .unwrap();
    assert_eq!(auto.accel(), &detection, "the cached result is the probe's");
    match detection.accel {
        Accel::Kvm => {
            let vm = auto.boot(&minimal()).await.unwrap();
            let kvm = vm.qmp().execute("query-kvm", None).await.unwrap();
            assert_eq!(kvm["enabled"], true);
        }
        Accel::Tcg => {
            // Either there is no usable /dev/kvm, or a guest did not boot under it.
            let usable = vmm::accel::kvm_device_usable().is_ok();
            assert!(
                !usable || detection.reason.contains("did not boot"),
                "{detection:?}"
            );
            if usable {
                let err = QemuVmm::new(
                    QemuConfig {
                        accel: AccelChoice::Fixed(Accel::Kvm),
                        ..QemuConfig::from_env().unwrap()
                    },
                    auto.images().clone(),
                )
                .await
                .unwrap()
                .boot(&VmSpec {
                    boot_timeout: Duration::from_secs(15),
                    ..minimal()
                })
                .await;
                assert!(err.is_err(), "a guest booted under KVM after all");
            }
        }
    }
}

/// Reads a terminal's output until it contains `want` (with a deadline).
async fn read_until(p: &mut agent_client::Process, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, p.next_event()).await {
            Ok(Ok(Some(ProcessEvent::Stdout(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("waiting for {want:?} in {seen:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn port_tunnels_terminals_directory_watches_and_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vm = driver().await.boot(&minimal()).await.unwrap();
    let agent = vm.agent();

    // A tunnel to a server on the guest's loopback; a closed port is a clear error.
    let out = agent
        .run(sh("mkdir -p /tmp/www && echo tunnel-ok > /tmp/www/index.html && busybox httpd -p 127.0.0.1:8080 -h /tmp/www"))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_str());
    let mut conn = agent.connect_port(8080).await.unwrap();
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains("tunnel-ok"),
        "{answer}"
    );
    let err = agent.connect_port(9).await.unwrap_err();
    assert_eq!(agent_code(err), ErrorCode::NotFound);

    // A terminal: a login shell that sees its size, and a resize.
    let mut p = agent
        .pty(agent_client::PtyOptions {
            cols: 80,
            rows: 24,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = String::new();
    p.write_stdin(b"stty size; echo pty-$((6*7))\n")
        .await
        .unwrap();
    read_until(&mut p, &mut seen, "pty-42").await;
    assert!(seen.contains("24 80"), "{seen:?}");
    p.resize(100, 30).await.unwrap();
    p.write_stdin(b"stty size\n").await.unwrap();
    read_until(&mut p, &mut seen, "30 100").await;
    p.write_stdin(b"exit 7\n").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline.into(), p.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            Some(ProcessEvent::Exited(s)) => {
                assert_eq!(s.code, Some(7));
                break;
            }
            Some(_) => {}
            None => panic!("the terminal ended without an exit status"),
        }
    }

    // A recursive directory watch sees creates, writes, renames and removes.
    let mut watch = agent.watch_dir("/workspace", true).await.unwrap();
    agent
        .run(sh("echo a > /workspace/f; mkdir /workspace/d; sleep 0.3; echo b > /workspace/d/g; mv /workspace/f /workspace/h; rm /workspace/h"))
        .await
        .unwrap();
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &agent_protocol::FsEvent| e.kind == "remove" && e.path == "/workspace/h")
    {
        let e = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .unwrap_or_else(|_| panic!("events so far: {events:?}"))
            .unwrap()
            .unwrap();
        events.push(e);
    }
    let has = |kind: &str, path: &str| events.iter().any(|e| e.kind == kind && e.path == path);
    assert!(
        has("create", "/workspace/f") && has("write", "/workspace/f"),
        "{events:?}"
    );
    assert!(
        has("create", "/workspace/d") && has("write", "/workspace/d/g"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.kind == "rename"
            && e.path == "/workspace/h"
            && e.from.as_deref() == Some("/workspace/f")),
        "{events:?}"
    );
    let err = agent.watch_dir("/nope", false).await.err().unwrap();
    assert_eq!(agent_code(err), ErrorCode::NotFound);

    let m = agent.metrics().await.unwrap();
    assert!(
        m.cpus >= 1 && m.mem_total_kib > 0 && m.tasks > 0 && m.disk_total_bytes > 0,
        "{m:?}"
    );
    assert!(
        m.cpu_total_ticks >= m.cpu_idle_ticks && m.cpu_total_ticks > 0,
        "{m:?}"
    );
}
