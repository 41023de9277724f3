//! The host check (`nullspace-pool-manager check`, run first by `serve`), a daemon
//! that stops loudly on a host that cannot run VMs, and the tap handed to QEMU as a
//! descriptor (QEMU, unprivileged, never opens `/dev/net/tun`).

use nullspace_tests::{minimal, sh, workspace_binary, ScratchDir};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::{ImageSet, QemuConfig, QemuVmm, Vm, Vmm};

/// Runs `cmd` to its end (killed after `within`); returns its exit code and its
/// stdout and stderr together.
fn run_within(mut cmd: Command, within: Duration, log: &Path) -> (Option<i32>, String) {
    let out = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        status.is_some(),
        "{cmd:?} still ran after {within:?}:\n{text}"
    );
    (status.unwrap().code(), text)
}

/// A `qemu-system-x86_64` in `dir`: a shell script with `body`, wrapping the real one.
fn fake_qemu(dir: &Path, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let qemu = dir.join("qemu-system-x86_64");
    std::fs::write(&qemu, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    qemu
}

/// `serve` on free loopback ports, with its state and run directory under `state`.
fn serve_in(state: &Path) -> Command {
    let mut cmd = Command::new(workspace_binary("nullspace-pool-manager"));
    cmd.arg("serve");
    for flag in ["--listen", "--edge-listen", "--preview-listen"] {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    cmd.arg("--state-dir")
        .arg(state)
        .env("NULLSPACE_RUN_DIR", state.join("run"));
    cmd
}

#[test]
fn the_check_passes_here_with_one_line_per_thing_it_needs() {
    let state = ScratchDir::new("host-check");
    let run = ScratchDir::new("host-check-run");
    let mut cmd = Command::new(workspace_binary("nullspace-pool-manager"));
    cmd.args(["check", "--state-dir"])
        .arg(state.path())
        .env("NULLSPACE_RUN_DIR", run.path());
    let (code, out) = run_within(
        cmd,
        Duration::from_secs(30),
        &state.path().join("check.log"),
    );
    assert_eq!(code, Some(0), "{out}");
    for name in [
        "QEMU",
        "qemu-img",
        "accelerator",
        "VM user",
        "tap",
        "nftables",
        "state dir",
        "run dir",
        "guest images",
        "memory",
        "disk",
        "mkfs.ext4",
    ] {
        let line = out
            .lines()
            .find(|l| l[l.find(' ').map_or(0, |i| i + 1)..].starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{out}"));
        assert!(line.starts_with('✓') || line.starts_with('✗'), "{line}");
    }
    // What this suite needs is all there (deploy/install-deps.sh made it so).
    for needed in [
        "QEMU",
        "qemu-img",
        "VM user",
        "tap",
        "nftables",
        "guest images",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("✓ {needed}:"))),
            "{needed} is not ✓:\n{out}"
        );
    }
}

#[test]
fn serve_stops_at_once_on_a_host_that_cannot_run_a_vm() {
    let state = ScratchDir::new("host-check-serve");
    let mut cmd = serve_in(state.path());
    cmd.env("NULLSPACE_QEMU", "/nonexistent/qemu-system-x86_64");
    let started = Instant::now();
    let (code, out) = run_within(
        cmd,
        Duration::from_secs(30),
        &state.path().join("serve.log"),
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("✗ QEMU:"), "{out}");
    assert!(out.contains("install-deps"), "the fix is named: {out}");
    assert!(out.contains("this host cannot run VMs"), "{out}");
    assert!(
        !out.contains("control API http://"),
        "it never listened: {out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn serve_exits_non_zero_when_a_builtin_template_cannot_be_made() {
    let state = ScratchDir::new("host-check-templates");
    // A QEMU that passes the host check (it reports the real version) but cannot start
    // a VM: every template boot fails at once.
    let qemu = fake_qemu(
        state.path(),
        "case \"$1\" in --version|-version|-help) exec qemu-system-x86_64 \"$@\";; esac\n\
         echo 'qemu: broken on purpose' >&2\nexit 1\n",
    );
    let mut cmd = serve_in(state.path());
    // Its own, empty: the templates must be made.
    cmd.arg("--templates-dir")
        .arg(state.path().join("templates"))
        .env("NULLSPACE_QEMU", &qemu);
    let (code, out) = run_within(
        cmd,
        Duration::from_secs(60),
        &state.path().join("serve.log"),
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("template snapshots failed"), "{out}");
    assert!(!out.contains("template snapshots ready"), "{out}");
    assert!(out.contains("nullspace-pool-manager check"), "{out}");
    let left: Vec<_> = std::fs::read_dir(state.path().join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM directories left: {left:?}");
}

#[tokio::test]
async fn an_isolated_vm_gets_its_tap_as_a_descriptor_with_tun_at_0600() {
    use std::os::unix::fs::PermissionsExt;
    // A new machine's tun device: root only. Only the daemon (root) opens it. Its mode
    // is put back afterwards, whatever happens.
    struct RestoreMode(u32);
    impl Drop for RestoreMode {
        fn drop(&mut self) {
            let _ =
                std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.0));
        }
    }
    let _restore = RestoreMode(
        std::fs::metadata("/dev/net/tun")
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
    );
    std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o600)).unwrap();
    nullspace_tests::init_logging();
    let config = QemuConfig {
        isolated_network: true,
        ..QemuConfig::from_env().unwrap()
    };
    let d = QemuVmm::new(config, ImageSet::from_env().unwrap())
        .await
        .unwrap();
    let mut vm = d.boot(&minimal()).await.unwrap();
    let pid = vm.pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("tap,id=net0,fd="), "{cmdline}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_ne!(uid, "0", "QEMU runs unprivileged");
    // The tap works end to end: a TCP connection from the guest arrives at the egress
    // socket the host opened in the VM's namespace, with what the guest sent.
    let egress = vm.take_egress().expect("egress sockets of an isolated VM");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        vm.agent().run(sh(
            "(echo hello-from-the-guest | nc -w 10 93.184.216.34 80 >/dev/null 2>&1 &); echo started",
        )),
    )
    .await
    .expect("the probe ends within its own timeout")
    .unwrap();
    assert_eq!(out.stdout_str().trim(), "started", "{}", out.stderr_str());
    let listener = tokio::net::TcpListener::from_std(egress.tcp).unwrap();
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("the guest's connection reaches the host's socket")
        .unwrap();
    let mut got = vec![0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut conn, &mut got),
    )
    .await
    .expect("the guest's bytes arrive")
    .unwrap();
    assert_eq!(&got[..n], b"hello-from-the-guest\n");
    vm.kill().await;
}

#[tokio::test]
async fn qemu_without_seccomp_is_refused_unless_the_operator_accepts_the_risk() {
    let state = ScratchDir::new("host-check-seccomp");
    // The real QEMU, but one whose help has no -sandbox (a build without seccomp).
    let qemu = fake_qemu(
        state.path(),
        "if [ \"$1\" = -help ]; then qemu-system-x86_64 -help | grep -v -- -sandbox; exit 0; fi\n\
         exec qemu-system-x86_64 \"$@\"\n",
    );
    let check = |insecure: bool| {
        let mut cmd = Command::new(workspace_binary("nullspace-pool-manager"));
        cmd.args(["check", "--state-dir"])
            .arg(state.path())
            .env("NULLSPACE_QEMU", &qemu)
            .env("NULLSPACE_RUN_DIR", state.path().join("run"));
        if insecure {
            cmd.arg("--insecure-unconfined-qemu");
        }
        run_within(
            cmd,
            Duration::from_secs(30),
            &state.path().join("check.log"),
        )
    };
    let (code, out) = check(false);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("✗ seccomp:"), "{out}");
    assert!(
        out.contains("--insecure-unconfined-qemu"),
        "the way out is named: {out}"
    );
    let (code, out) = check(true);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(not fatal)"), "{out}");

    // The driver itself refuses too, whoever calls it.
    let config = |allow_unconfined| QemuConfig {
        qemu_binary: qemu.clone(),
        run_dir: state.path().join("run"),
        allow_unconfined,
        ..QemuConfig::from_env().unwrap()
    };
    let images = ImageSet::from_env().unwrap();
    let refused = QemuVmm::new(config(false), images.clone())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("without seccomp"), "{refused}");
    let vmm = QemuVmm::new(config(true), images).await.unwrap();
    assert!(!vmm.seccomp());
}
