//! The `nullspace` CLI against the live stack.

use nullspace_tests::{workspace_binary, ScratchDir, Stack};
use std::process::Output;

struct Cli {
    url: String,
    key: String,
    home: ScratchDir,
}

/// `sandbox create` of a small `minimal` sandbox; the test adds its flags.
const CREATE_SMALL: &[&str] = &[
    "sandbox",
    "create",
    "-t",
    "minimal",
    "--vcpus",
    "1",
    "--memory-mib",
    "512",
    "--disk-mib",
    "1024",
];

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(workspace_binary("nullspace"))
            .args(args)
            .env("NULLSPACE_API_URL", &self.url)
            .env("NULLSPACE_API_KEY", &self.key)
            // No dev.env of the machine's own stack leaks in.
            .env("HOME", self.home.path())
            .env_remove("XDG_STATE_HOME")
            .output()
            .unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nullspace {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

#[tokio::test]
async fn the_cli_creates_runs_copies_and_kills() {
    let stack = Stack::start("cli");
    let cli = Cli {
        url: stack.api.url.clone(),
        key: stack.daemon.team_key("acme"),
        home: ScratchDir::new("cli-home"),
    };
    let id = cli
        .ok(&[
            CREATE_SMALL,
            &["--metadata", "suite=cli", "--env", "WHO=cli"],
        ]
        .concat())
        .trim()
        .to_string();
    assert!(id.starts_with("sbx-"), "{id}");

    // exec streams output and exits with the command's code.
    let out = cli.run(&["exec", &id, "--", "echo hi $WHO; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi cli\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // cp both ways.
    let local = cli.home.path().join("in.txt");
    std::fs::write(&local, "copied through the CLI").unwrap();
    cli.ok(&[
        "cp",
        local.to_str().unwrap(),
        &format!("{id}:/workspace/in.txt"),
    ]);
    let back = cli.home.path().join("back.txt");
    cli.ok(&[
        "cp",
        &format!("{id}:/workspace/in.txt"),
        back.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "copied through the CLI"
    );

    // list / info / timeout / pause / resume, as JSON.
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "list", "--metadata", "suite=cli", "--json"]))
            .unwrap();
    assert_eq!(list["sandboxes"][0]["sandboxID"], id.as_str());
    assert!(
        cli.ok(&["sandbox", "list"]).contains(&id),
        "human list names it"
    );
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "timeout", &id, "100", "--json"])).unwrap();
    assert_eq!(info["timeout"], 100);
    let refreshed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "refresh", &id, "--duration", "3600", "--json"]))
            .unwrap();
    assert!(refreshed["expiresAt"].as_str() > info["expiresAt"].as_str());
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "pause", &id, "--json"])).unwrap();
    assert_eq!(info["state"], "paused");
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "resume", &id, "--json"])).unwrap();
    assert_eq!(info["state"], "running");
    let out = cli.run(&["exec", &id, "cat", "/workspace/in.txt"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "copied through the CLI"
    );

    // Snapshots: take one, list it, restore it, fork, hibernate.
    let snap = cli.ok(&["sandbox", "snapshot", &id]).trim().to_string();
    assert!(snap.starts_with("snap-"), "{snap}");
    let listed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "snapshots", &id, "--json"])).unwrap();
    assert_eq!(listed["snapshots"][0]["snapshotID"], snap.as_str());
    assert_eq!(listed["snapshots"][0]["kind"], "manual");
    let restored = cli
        .ok(&["sandbox", "restore", &id, "--snapshot", &snap])
        .trim()
        .to_string();
    let out = cli.run(&["exec", &restored, "cat", "/workspace/in.txt"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "copied through the CLI"
    );
    let child = cli
        .ok(&["sandbox", "fork", &restored, "--count", "1"])
        .trim()
        .to_string();
    assert!(child.starts_with("sbx-"), "{child}");
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "hibernate", &restored, "--json"])).unwrap();
    assert_eq!(info["state"], "paused");
    for other in [&restored, &child] {
        assert!(cli.ok(&["sandbox", "kill", other]).contains("killed"));
    }
    assert!(cli
        .ok(&["sandbox", "delete-snapshot", &id, &snap])
        .contains("deleted"));

    // kill, twice.
    assert!(cli.ok(&["sandbox", "kill", &id]).contains("killed"));
    assert!(cli.ok(&["sandbox", "kill", &id]).contains("already gone"));

    // Errors: the API's code on stderr, exit 1; no key says where to get one.
    let out = cli.run(&["sandbox", "info", "sbx-0123456789abcdef0123"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
    let out = std::process::Command::new(workspace_binary("nullspace"))
        .args(["sandbox", "list"])
        .env_remove("NULLSPACE_API_KEY")
        .env_remove("XDG_STATE_HOME")
        .env("HOME", cli.home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NULLSPACE_API_KEY"));

    // Admin verbs go to the pool manager's state.
    let state = stack.daemon.state_dir().to_str().unwrap().to_string();
    cli.ok(&["admin", "--state-dir", &state, "team", "create", "beta"]);
    let key = cli.ok(&[
        "admin",
        "--state-dir",
        &state,
        "key",
        "create",
        "--team",
        "beta",
    ]);
    assert!(key.trim().starts_with("ns_"), "{key}");
}

#[tokio::test]
async fn the_cli_builds_templates_streams_the_log_and_says_why_a_build_failed() {
    let stack = Stack::start("cli-templates");
    let cli = Cli {
        url: stack.api.url.clone(),
        key: stack.daemon.team_key("acme"),
        home: ScratchDir::new("cli-templates-home"),
    };
    let local = cli.home.path().join("motd");
    std::fs::write(&local, "copied in\n").unwrap();
    let shape = ["--vcpus", "1", "--memory-mib", "512", "--disk-mib", "2048"];
    let copy = format!("copy:{}:/etc/motd-test", local.display());
    let mut args = vec!["template", "build", "--name", "cli-tpl", "--from", "base"];
    args.extend(shape);
    args.extend([
        "--step",
        "env:WHO=cli",
        "--step",
        &copy,
        "--step",
        "run:echo built by $WHO | tee /built",
        "--start",
        "sleep 1000",
        "--ready",
        "test -f /built",
    ]);
    let out = cli.ok(&args);
    assert!(out.contains("[step 2] built by cli"), "{out}");
    assert!(out.contains("ready"), "{out}");
    let list = cli.ok(&["template", "list"]);
    assert!(list.contains("cli-tpl") && list.contains("base"), "{list}");
    let t: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "template", "get", "cli-tpl"])).unwrap();
    assert_eq!(t["status"], "ready", "{t}");
    assert_eq!(t["envVars"]["WHO"], "cli", "{t}");
    let logs = cli.ok(&["template", "logs", "cli-tpl"]);
    assert!(logs.contains("built by cli"), "{logs}");

    // A failing step: exit 1, the step, its code and its output.
    let mut args = vec!["template", "build"];
    args.extend(shape);
    args.extend(["--step", "run:echo oops >&2; exit 4"]);
    let out = cli.run(&args);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("failed (step): step 0 (run) exited with code 4"),
        "{stdout}"
    );
    assert!(stdout.contains("oops"), "{stdout}");
    let out = cli.run(&["template", "build", "--step", "nope:x"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a bad --step");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown step kind"));

    cli.ok(&["template", "delete", "cli-tpl"]);
    let out = cli.run(&["template", "get", "cli-tpl"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn the_cli_opens_a_shell_proxies_ssh_and_shows_previews_logs_and_metrics() {
    let stack = Stack::start("cli-live");
    let cli = Cli {
        url: stack.api.url.clone(),
        key: stack.daemon.team_key("acme"),
        home: ScratchDir::new("cli-live-home"),
    };
    let id = cli
        .ok(&[
            "sandbox",
            "create",
            "-t",
            "base",
            "--vcpus",
            "1",
            "--memory-mib",
            "512",
            "--disk-mib",
            "2048",
        ])
        .trim()
        .to_string();

    // A shell fed from a pipe: its output, and its exit code as ours.
    let out = std::process::Command::new(workspace_binary("nullspace"))
        .args(["sandbox", "shell", &id])
        .env("NULLSPACE_API_URL", &cli.url)
        .env("NULLSPACE_API_KEY", &cli.key)
        .env("HOME", cli.home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"echo shell-$((6*7)) $(id -un)\nexit 5\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("shell-42 user"), "{stdout}");
    assert_eq!(out.status.code(), Some(5), "{stdout}");

    // A real OpenSSH client through `sandbox proxy` to the template's sshd.
    let key = cli.home.path().join("id_ed25519");
    let gen = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(gen.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let setup = format!(
        "mkdir -p /home/user/.ssh && echo '{}' > /home/user/.ssh/authorized_keys && chown -R user /home/user/.ssh && chmod 700 /home/user/.ssh && mkdir -p /run/sshd && /usr/sbin/sshd && for i in $(seq 100); do awk '$2 ~ /:0016$/ && $4 == \"0A\" {{ up = 1 }} END {{ exit !up }}' /proc/net/tcp && exit 0; sleep 0.1; done; echo sshd never listened >&2; exit 1",
        public.trim()
    );
    // sshd forks into the background: the proxy must not connect before it listens.
    cli.ok(&["exec", &id, "--user", "root", "--", &setup]);
    let proxy = format!(
        "{} sandbox proxy %h 22",
        workspace_binary("nullspace").display()
    );
    let out = std::process::Command::new("ssh")
        .args(["-o", &format!("ProxyCommand={proxy}")])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=60",
        ])
        .arg("-i")
        .arg(&key)
        .arg(format!("user@{id}"))
        .arg("echo ssh-$((6*7)) $(whoami)")
        .env("NULLSPACE_API_URL", &cli.url)
        .env("NULLSPACE_API_KEY", &cli.key)
        .env("HOME", cli.home.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ssh-42 user"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Preview URLs, logs and metrics.
    let url = cli.ok(&["sandbox", "preview", &id, "8080"]);
    assert!(
        url.contains(&format!("8080-{id}.")) && url.contains("ns_preview_token="),
        "{url}"
    );
    let url = cli.ok(&["sandbox", "preview", &id, "8080", "--public"]);
    assert!(!url.contains("ns_preview_token="), "{url}");
    let logs = cli.ok(&["sandbox", "logs", &id]);
    assert!(
        logs.contains("[lifecycle] sandbox.created")
            && logs.contains("[lifecycle] sandbox.preview_port"),
        "{logs}"
    );
    let metrics = cli.ok(&["--json", "sandbox", "metrics", &id]);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(first["memTotalMiB"].as_u64().unwrap() > 0, "{metrics}");
    cli.ok(&["sandbox", "kill", &id]);
}

#[tokio::test]
async fn the_cli_manages_volumes_and_egress() {
    let stack = Stack::start("cli-volumes");
    let cli = Cli {
        url: stack.api.url.clone(),
        key: stack.daemon.team_key("acme"),
        home: ScratchDir::new("cli-volumes-home"),
    };
    let vol = cli.ok(&["volume", "create", "--name", "clivol", "--size-mib", "32"]);
    let vol = vol.trim();
    let out = cli.run(&[
        "sandbox",
        "create",
        "-t",
        "minimal",
        "--mount",
        "relative=clivol",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("absolute"),
        "{out:?}"
    );
    // The seeds' forms: conflicting flags are clap's errors (exit 2) or the SDK's
    // (exit 1, before any request); a policy the proxy would not know is the API's 400.
    for conflict in [
        &["--warm-pool", "require", "--warm-pool-mode", "prefer"][..],
        &["--allow-out", "10.0.0.0/8", "--allow", "10.0.0.0/8"],
        &["--deny-out", "0.0.0.0/0", "--no-internet"],
        &["--on-timeout", "pause", "--hibernate-on-timeout"],
        &["--on-timeout", "nap"],
        &["--allow-internet-access", "maybe"],
    ] {
        let out = cli.run(&[CREATE_SMALL, conflict].concat());
        assert_eq!(out.status.code(), Some(2), "{conflict:?}: {out:?}");
    }
    let out = cli.run(
        &[
            CREATE_SMALL,
            &["--allow-out", "10.1.2.3", "--deny-out", "10.0.0.0/8"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid_request")
            && stderr.contains("remove \"10.0.0.0/8\" from deny_out"),
        "{stderr}"
    );
    let out = cli.run(
        &[
            CREATE_SMALL,
            &["--allow-internet-access", "false", "--deny", "10.0.0.0/8"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let policy =
        std::env::temp_dir().join(format!("nullspace-cli-policy-{}.json", std::process::id()));
    std::fs::write(&policy, r#"{"pii": {"detectors": {"card": "shred"}}}"#).unwrap();
    let out = cli.run(
        &[
            CREATE_SMALL,
            &["--security-policy", policy.to_str().unwrap()],
        ]
        .concat(),
    );
    let _ = std::fs::remove_file(&policy);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid_request") && stderr.contains("securityPolicy"),
        "{stderr}"
    );
    // A create with the seeds' names (--cpu/--memory-mb/--disk-mb, network lists,
    // on_timeout + auto_resume), answered while starting and waited on.
    let id = cli.ok(&[
        "sandbox",
        "create",
        "-t",
        "minimal",
        "--cpu",
        "1",
        "--memory-mb",
        "512",
        "--disk-mb",
        "1024",
        "--mount",
        "/mnt/cli=clivol",
        "--allow-out",
        "10.0.0.0/8",
        "--deny-out",
        "0.0.0.0/0",
        "--on-timeout",
        "pause",
        "--auto-resume",
        "--no-wait-ready",
        "--recording",
    ]);
    let id = id.trim();
    assert!(cli
        .ok(&["sandbox", "wait-ready", id, "--timeout", "180"])
        .contains("running"));
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "sandbox", "info", id])).unwrap();
    assert_eq!(info["egress"]["allow"][0], "10.0.0.0/8", "{info}");
    assert_eq!(info["egress"]["internet"], false, "{info}");
    assert_eq!(info["mounts"][0]["volumeID"], vol, "{info}");
    assert_eq!(info["resources"]["vcpus"], 1, "{info}");
    let compact: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "info", id, "--fields", "id,status,lifecycle"]))
            .unwrap();
    let keys: std::collections::BTreeSet<&str> = compact
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["id", "lifecycle", "status"].into(), "{compact}");
    assert_eq!(
        (&compact["id"], &compact["status"]),
        (&serde_json::json!(id), &serde_json::json!("running"))
    );
    assert_eq!(
        (
            &compact["lifecycle"]["onTimeout"],
            &compact["lifecycle"]["autoResume"]
        ),
        (&serde_json::json!("pause"), &serde_json::json!(true)),
        "{compact}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["sandbox", "list", "--fields", "id,status"])).unwrap();
    assert_eq!(
        listed["sandboxes"],
        serde_json::json!([{ "id": id, "status": "running" }])
    );
    let host = cli.ok(&["sandbox", "host", id, "8080"]);
    assert!(host.trim().starts_with(&format!("8080-{id}.")), "{host}");
    let out = cli.ok(&["exec", id, "--", "echo cli > /mnt/cli/f && cat /mnt/cli/f"]);
    assert_eq!(out, "cli\n");
    let shown = cli.ok(&["sandbox", "egress", id, "--deny", "*.example"]);
    assert!(
        shown.contains("egress: internet on, deny *.example"),
        "{shown}"
    );
    let out = cli.run(&["volume", "delete", "clivol"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(id), "{out:?}");
    assert!(cli
        .ok(&["volume", "get", vol])
        .contains(&format!("held by {id} at /mnt/cli (rw)")));
    // Metrics from an RFC 3339 time to Unix seconds.
    let out = cli.ok(&[
        "--json",
        "sandbox",
        "metrics",
        id,
        "--start",
        "2020-01-01T00:00:00Z",
        "--end",
        "4102444800",
    ]);
    for line in out.lines() {
        let sample: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            sample["timestamp"].as_i64().unwrap() > 1_577_836_800,
            "{line}"
        );
    }
    // Issue 24: presigned URLs, paged logs with background output, named snapshots.
    cli.ok(&["exec", id, "--", "echo shared > /workspace/shared.txt"]);
    let url = cli.ok(&[
        "sandbox",
        "presign",
        id,
        "/workspace/shared.txt",
        "--expires",
        "60",
    ]);
    let got = reqwest::get(url.trim()).await.unwrap();
    assert_eq!(got.text().await.unwrap(), "shared\n");
    let page = cli.ok(&["sandbox", "logs", id, "--limit", "2"]);
    assert_eq!(page.lines().count(), 2, "{page}");
    let snap: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "--json",
        "sandbox",
        "snapshot",
        id,
        "--name",
        "cli-named",
    ]))
    .unwrap();
    assert_eq!(snap["name"], "cli-named", "{snap}");
    let out = cli.run(&[
        "sandbox",
        "create",
        "--snapshot-name",
        "cli-named",
        "-t",
        "base",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses two start sources: {out:?}"
    );
    let out = cli.run(&["sandbox", "create", "-t", "minimal", "--idle-timeout", "2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("idleTimeout"),
        "{out:?}"
    );
    cli.ok(&["sandbox", "kill", id]);
    // Recorded: its commands come back as a transcript.
    let recordings = cli.ok(&["sandbox", "recordings", id]);
    assert!(recordings.contains("commands.jsonl"), "{recordings}");
    let played = cli.ok(&["sandbox", "play", id, "commands.jsonl", "--speed", "0"]);
    assert!(played.contains("$ echo cli > /mnt/cli/f"), "{played}");
    assert!(played.contains("[exit 0]"), "{played}");
    let listed = cli.ok(&["volume", "list"]);
    assert!(listed.contains("(clivol)  32 MiB  version 1"), "{listed}");
    cli.ok(&["volume", "delete", vol]);
    assert!(!cli.run(&["volume", "get", vol]).status.success());
}
