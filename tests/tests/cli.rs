//! The `nullspace` CLI against the live stack.

use nullspace_tests::{workspace_binary, ScratchDir, Stack};
use std::process::Output;

struct Cli {
    url: String,
    key: String,
    home: ScratchDir,
}

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
            "--metadata",
            "suite=cli",
            "--env",
            "WHO=cli",
        ])
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
