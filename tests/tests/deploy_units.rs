//! The systemd units' own command lines reach a working API: `deploy/install-systemd.sh
//! --render` writes the units as it would install them (pointing at this build's
//! binaries, a state directory of the test's own), and the test runs each unit's
//! `ExecStart` as systemd would (a clean environment of the unit's `Environment=`
//! lines, `${NAME}` expanded), overriding only what the units' settings files would:
//! the listen addresses (port 0: free loopback ports) and the run directory. Then the
//! public API answers its health check and a team's list through the pool manager, the
//! pool manager's `ExecStop` runs (no drain by default; with `NULLSPACE_DRAIN_ON_STOP=yes`
//! the host is drained), and both stop in the units' order: the API first.
//!
//! The Nomad pool-manager task's wrapper script runs the same way (`/bin/sh -c`, its
//! `env` block, stand-ins for Nomad's run-time values): SIGTERM drains the host, then
//! stops the daemon; the next start makes the host ready again.
//!
//! No systemd or Nomad runs here (systemd is not PID 1 on these machines, Nomad is not
//! installable): what they add (sandboxing, restarts, ordering, scheduling) is checked
//! by `systemd-analyze verify` and deploy/check-manifests.py, not exercised.

use nullspace_tests::http::Api;
use nullspace_tests::{
    api_component, s3_endpoint, spawn_until, stop_child, workspace_binary, S3_ENV,
};
use reqwest::StatusCode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// What systemd gives a service before its own `Environment=` lines.
const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A rendered unit's `Environment=` defaults and its `Exec…=` lines.
struct Unit {
    env: BTreeMap<String, String>,
    exec: BTreeMap<String, String>,
}

fn read_unit(path: &Path) -> Unit {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut unit = Unit {
        env: BTreeMap::new(),
        exec: BTreeMap::new(),
    };
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key.trim() {
            "Environment" => {
                let (k, v) = value
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: {line}", path.display()));
                unit.env.insert(k.to_string(), v.to_string());
            }
            k if k.starts_with("Exec") => {
                assert!(
                    unit.exec.insert(k.to_string(), value.to_string()).is_none(),
                    "{}: one {k} line",
                    path.display()
                );
            }
            _ => {}
        }
    }
    unit
}

/// An `Exec…=` line as systemd runs it, for what the units use: words split on
/// whitespace outside single or double quotes (which go), `${NAME}` replaced in place
/// from `env`, `$$` a literal `$`. A leading `-`, `@`, `+` or `!` is refused: the units
/// use none.
fn systemd_argv(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    assert!(
        !line.starts_with(['-', '@', '+', '!', ':']),
        "prefix not handled: {line}"
    );
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (_, '$') if chars.peek() == Some(&'$') => {
                chars.next();
                word.push('$');
                in_word = true;
            }
            (_, '$') if chars.peek() == Some(&'{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                word.push_str(env.get(&name).map(String::as_str).unwrap_or(""));
                in_word = true;
            }
            (_, '$') => panic!("unbraced $ in {line}: not handled"),
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {line}");
    if in_word {
        words.push(word);
    }
    words
}

/// The command systemd would run for `argv` with `env`: nothing inherited.
fn systemd_command(argv: &[String], env: &BTreeMap<String, String>) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", SYSTEMD_PATH)
        .envs(env);
    cmd
}

/// Everything the test started and made, ended and removed on drop (also on a panic):
/// the API first, as the units order it.
struct Started {
    children: Vec<(Child, &'static str)>,
    dirs: Vec<PathBuf>,
    run_dir: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        while let Some((mut child, what)) = self.children.pop() {
            if child.try_wait().ok().flatten().is_none() {
                stop_child(&mut child, libc::SIGTERM, what);
            }
        }
        // The unit keeps VMs on stop (NULLSPACE_ON_EXIT=keep); none may outlive the test.
        vmm::vm_dir::reap_orphans(&self.run_dir, None, &[]);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_command_lines_serve_the_api() {
    let pid = std::process::id();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let units = std::env::temp_dir().join(format!("nullspace-test-units-{pid}"));
    let state = std::env::temp_dir().join(format!("nullspace-test-deploy-units-{pid}"));
    let run_dir = PathBuf::from(format!("/dev/shm/nullspace-test-deploy-units-{pid}"));
    let mut started = Started {
        children: Vec::new(),
        dirs: vec![units.clone(), state.clone()],
        run_dir: run_dir.clone(),
    };
    std::fs::create_dir_all(&state).unwrap();
    // QEMU runs as nullspace-vm and opens pause snapshots under the state directory.
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();

    let pool_manager = workspace_binary("nullspace-pool-manager");
    let bin_dir = pool_manager.parent().unwrap().canonicalize().unwrap();
    let out = Command::new(root.join("deploy/install-systemd.sh"))
        .arg("--render")
        .arg(&units)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--component")
        .arg(api_component().canonicalize().unwrap())
        .arg("--state-dir")
        .arg(&state)
        .arg("--cache-dir")
        .arg(vmm::cache_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-systemd.sh --render: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The pool manager: its ExecStart with the unit's environment, listening on free
    // loopback ports (what /etc/nullspace/pool-manager.env would set).
    let pm_unit = read_unit(&units.join("nullspace-pool-manager.service"));
    let mut pm_env = pm_unit.env.clone();
    for var in [
        "NULLSPACE_LISTEN",
        "NULLSPACE_EDGE_LISTEN",
        "NULLSPACE_PREVIEW_LISTEN",
    ] {
        assert!(pm_env.contains_key(var), "the unit sets {var}");
        pm_env.insert(var.into(), "127.0.0.1:0".into());
    }
    assert_eq!(
        pm_env.get("NULLSPACE_ON_EXIT").map(String::as_str),
        Some("keep"),
        "the documented default"
    );
    pm_env.insert("NULLSPACE_RUN_DIR".into(), run_dir.display().to_string());
    pm_env.insert("RUST_LOG".into(), "warn".into());
    let start = systemd_argv(&pm_unit.exec["ExecStart"], &pm_env);
    assert_eq!(
        start[0],
        bin_dir.join("nullspace-pool-manager").display().to_string()
    );
    assert_eq!(
        &start[1..4],
        ["serve", "--state-dir", &state.display().to_string()]
    );
    let (child, lines) = spawn_until(
        systemd_command(&start, &pm_env),
        "unit pool-manager",
        &["control API", "template snapshots ready"],
        Duration::from_secs(300),
    );
    started.children.push((child, "the pool manager"));
    let control = url_in(&lines[0], "the control API");

    // The API: its ExecStart, pointed at that pool manager (what api.env would set).
    let api_unit = read_unit(&units.join("nullspace-api.service"));
    assert_eq!(
        api_unit.env.get("NULLSPACE_POOL_MANAGER"),
        Some(&format!("http://{}", pm_unit.env["NULLSPACE_LISTEN"])),
        "by default the API's upstream is where the pool manager listens"
    );
    let mut api_env = api_unit.env.clone();
    api_env.insert("NULLSPACE_LISTEN".into(), "127.0.0.1:0".into());
    api_env.insert("NULLSPACE_POOL_MANAGER".into(), control.clone());
    api_env.insert("RUST_LOG".into(), "warn".into());
    let api_start = systemd_argv(&api_unit.exec["ExecStart"], &api_env);
    let (child, lines) = spawn_until(
        systemd_command(&api_start, &api_env),
        "unit api",
        &["public API http://"],
        Duration::from_secs(120),
    );
    started.children.push((child, "the API"));
    let api = url_in(&lines[0], "the public API");

    // Health needs no key; a team's list goes through to the pool manager.
    let health = reqwest::get(format!("{api}/api/v1/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    let admin = |args: &[&str]| nullspace_tests::admin_in(&state, args);
    admin(&["team", "create", "acme"]);
    let key = admin(&["key", "create", "--team", "acme"]);
    let public = Api::at(&format!("{api}/api"), key);
    let (status, list) = public.fetch("/v1/sandboxes").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["sandboxes"], serde_json::json!([]), "{list}");

    // Stop as systemd would: the API first (After=), then the pool manager's ExecStop
    // (NULLSPACE_DRAIN_ON_STOP=no: nothing to do), then SIGTERM to the daemon.
    let (mut api_child, what) = started.children.pop().unwrap();
    stop_child(&mut api_child, libc::SIGTERM, what);
    assert!(api_child.wait().unwrap().success(), "the API stops cleanly");
    let stop = systemd_argv(&pm_unit.exec["ExecStop"], &pm_env);
    assert_eq!(&stop[..2], ["/bin/sh", "-c"]);
    let status = systemd_command(&stop, &pm_env).status().unwrap();
    assert!(status.success(), "ExecStop without a drain: {status}");
    let host_state = || -> String {
        let hosts = admin(&["host", "list"]);
        let host: serde_json::Value = serde_json::from_str(hosts.lines().next().unwrap()).unwrap();
        host["state"].as_str().unwrap().to_string()
    };
    assert_eq!(
        host_state(),
        "ready",
        "no drain unless NULLSPACE_DRAIN_ON_STOP"
    );
    // With NULLSPACE_DRAIN_ON_STOP=yes (pool-manager.env) the same line drains the host
    // the state directory's host-id names, and waits until it is drained.
    let mut drain_env = pm_env.clone();
    drain_env.insert("NULLSPACE_DRAIN_ON_STOP".into(), "yes".into());
    drain_env.insert("NULLSPACE_DRAIN_WAIT_S".into(), "60".into());
    // systemd names the running daemon to ExecStop (none after a crash: no drain).
    let mut crashed_env = drain_env.clone();
    crashed_env.insert("MAINPID".into(), String::new());
    let stop = systemd_argv(&pm_unit.exec["ExecStop"], &crashed_env);
    let status = systemd_command(&stop, &crashed_env).status().unwrap();
    assert!(status.success(), "ExecStop after a crash: {status}");
    assert_eq!(
        host_state(),
        "ready",
        "a crashed daemon's host is not drained"
    );
    let main_pid = started.children.last().unwrap().0.id();
    drain_env.insert("MAINPID".into(), main_pid.to_string());
    let stop = systemd_argv(&pm_unit.exec["ExecStop"], &drain_env);
    let status = systemd_command(&stop, &drain_env).status().unwrap();
    assert!(status.success(), "ExecStop with a drain: {status}");
    assert_eq!(host_state(), "drained");
    let (mut pm_child, what) = started.children.pop().unwrap();
    assert!(
        pm_child.try_wait().unwrap().is_none(),
        "ExecStop leaves the daemon to systemd's SIGTERM"
    );
    stop_child(&mut pm_child, libc::SIGTERM, what);
    assert!(
        pm_child.wait().unwrap().success(),
        "the pool manager stops cleanly"
    );
}

/// The pool manager's Nomad task as `raw_exec` would start it, without Nomad: the
/// wrapper script of deploy/nomad/pool-manager.nomad.hcl (its `${var.…}` filled in from
/// the file's defaults) run by `/bin/sh -c`, with its `env` block and stand-ins for what
/// Nomad supplies at run time (node name, address, the template's catalog and S3).
struct NomadTask {
    script: String,
    env: BTreeMap<String, String>,
}

fn nomad_pool_manager_task(root: &Path, bin_dir: &Path) -> NomadTask {
    let hcl = std::fs::read_to_string(root.join("deploy/nomad/pool-manager.nomad.hcl")).unwrap();
    // `variable "NAME" { ... default = VALUE }`.
    let mut vars = BTreeMap::new();
    let mut current = None;
    for line in hcl.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("variable \"") {
            current = rest.split('"').next().map(str::to_string);
        } else if let (Some(name), Some(v)) = (&current, line.strip_prefix("default")) {
            let v = v
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            vars.insert(name.clone(), v.to_string());
        }
    }
    vars.insert("bin_dir".into(), bin_dir.display().to_string());
    // The heredoc: the lines between `<<-SCRIPT` and `SCRIPT`, their common indent gone.
    let lines: Vec<&str> = hcl.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.ends_with("<<-SCRIPT"))
        .expect("the wrapper script")
        + 1;
    let end = start
        + lines[start..]
            .iter()
            .position(|l| l.trim() == "SCRIPT")
            .unwrap();
    let body = &lines[start..end];
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap();
    let mut script: String = body
        .iter()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect();
    for (name, value) in &vars {
        script = script.replace(&format!("${{var.{name}}}"), value);
    }
    assert!(
        !script.contains("${"),
        "an interpolation is left in the script:\n{script}"
    );
    // The task's `env { ... }` block.
    let env_start = lines
        .iter()
        .position(|l| l.trim() == "env {")
        .expect("the env block")
        + 1;
    let mut env = BTreeMap::new();
    for line in lines[env_start..]
        .iter()
        .map(|l| l.trim())
        .take_while(|l| *l != "}")
    {
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("env line {line}"));
        let v = v.trim();
        let value = match v.strip_prefix("var.") {
            Some(name) => vars[name].clone(),
            None => v.trim_matches('"').to_string(),
        };
        env.insert(k.trim().to_string(), value);
    }
    NomadTask { script, env }
}

/// The Nomad task's own wrapper: a first start (the host is not registered yet: the
/// undrain fails and is said so), the stop Nomad sends (SIGTERM to the task's process:
/// the host is drained, then the daemon stops), a second start (the host is made ready
/// again) and its stop.
#[test]
fn the_nomad_pool_manager_task_drains_on_stop_and_is_ready_after_a_start() {
    let pid = std::process::id();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pool_manager = workspace_binary("nullspace-pool-manager");
    let bin_dir = pool_manager.parent().unwrap().canonicalize().unwrap();
    let state = std::env::temp_dir().join(format!("nullspace-test-nomad-task-{pid}"));
    let run_dir = PathBuf::from(format!("/dev/shm/nullspace-test-nomad-task-{pid}"));
    let mut started = Started {
        children: Vec::new(),
        dirs: vec![state.clone()],
        run_dir: run_dir.clone(),
    };
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let task = nomad_pool_manager_task(&root, &bin_dir);
    let mut env = task.env.clone();
    assert_eq!(env["HOST_ID"], "${node.unique.name}");
    assert_eq!(env["HOST_IP"], "${attr.unique.network.ip-address}");
    let host = format!("nomad-test-{pid}");
    // Nomad's run-time values; a loopback address of its own for the fixed ports.
    env.insert("HOST_ID".into(), host.clone());
    env.insert("HOST_IP".into(), "127.77.0.1".into());
    env.insert("STATE_DIR".into(), state.display().to_string());
    env.insert("NULLSPACE_RUN_DIR".into(), run_dir.display().to_string());
    env.insert(
        "NULLSPACE_CACHE".into(),
        vmm::cache_dir().display().to_string(),
    );
    // What the template renders: the catalog (one host's SQLite here) and S3.
    env.insert(
        "NULLSPACE_CATALOG".into(),
        format!("sqlite:{}", state.join("catalog.db").display()),
    );
    env.insert("S3_ENDPOINT".into(), s3_endpoint());
    env.insert("S3_BUCKET".into(), format!("nullspace-test-nomad-{pid}"));
    env.insert("DRAIN_WAIT_S".into(), "60".into());
    env.extend(S3_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.insert("RUST_LOG".into(), "warn".into());
    let admin = |args: &[&str]| -> String {
        let out = Command::new(&pool_manager)
            .arg("admin")
            .args(args)
            .arg("--catalog")
            .arg(&env["NULLSPACE_CATALOG"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let host_state = || -> String {
        let hosts = admin(&["host", "list"]);
        let line = hosts
            .lines()
            .find(|l| l.contains(&host))
            .expect("the host is listed");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["state"].as_str().unwrap().to_string()
    };
    for (round, first) in [(1, true), (2, false)] {
        let argv = vec!["/bin/sh".to_string(), "-c".into(), task.script.clone()];
        let mut markers = vec!["control API", "template snapshots ready"];
        if first {
            markers.push("is not registered yet");
        }
        let (child, _) = spawn_until(
            systemd_command(&argv, &env),
            "nomad pool-manager",
            &markers,
            Duration::from_secs(300),
        );
        started.children.push((child, "the Nomad task"));
        assert_eq!(
            host_state(),
            "ready",
            "round {round}: the host is ready after a start"
        );
        // Nomad's kill_signal to the task's process; the trap drains, then stops.
        let (mut child, what) = started.children.pop().unwrap();
        stop_child(&mut child, libc::SIGTERM, what);
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "round {round}: the task ends cleanly: {status}"
        );
        assert_eq!(
            host_state(),
            "drained",
            "round {round}: a stop drains the host first"
        );
    }
}

#[test]
fn systemd_exec_lines_expand_as_systemd_does() {
    let env: BTreeMap<String, String> = [("A", "x y"), ("B", "7")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        systemd_argv("/bin/t --a ${A} --b=${B}:${C}", &env),
        ["/bin/t", "--a", "x y", "--b=7:"]
    );
    assert_eq!(
        systemd_argv(r#"/bin/sh -c 'echo "$${A:-$$(cat f)}"' ${B}"#, &env),
        ["/bin/sh", "-c", r#"echo "${A:-$(cat f)}""#, "7"]
    );
}

/// The first `http://` URL in a startup line of `what`.
fn url_in(line: &str, what: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("{what}'s URL in {line:?}"))
        .to_string()
}
