//! Shared helpers for the end-to-end tests and benchmarks: a driver configured from the
//! environment, small VM shapes, and request builders.

pub mod bench;
pub mod faults;
pub mod http;
pub mod netns;
pub mod netns_cluster;
pub mod origin;
pub mod postgres;

use agent_protocol::{Command, ExecRequest};
use std::time::Duration;
use vmm::{ImageSet, QemuConfig, QemuVmm, VmSpec};

/// A driver for the built image set, configured from the environment
/// (`NULLSPACE_ACCEL`, `NULLSPACE_IMAGES`, `NULLSPACE_RUN_DIR`).
pub async fn driver() -> QemuVmm {
    init_logging();
    let config = QemuConfig::from_env().expect("driver configuration");
    let images = ImageSet::from_env().expect("a built image set (run deploy/build.sh)");
    QemuVmm::new(config, images).await.expect("driver")
}

/// Logs to the test's captured output, filtered by `RUST_LOG`.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The small `minimal` shape tests boot: 1 vCPU, 256 MiB, 256 MiB disk.
pub fn minimal() -> VmSpec {
    VmSpec {
        rootfs: "minimal".into(),
        vcpus: 1,
        mem_mib: 256,
        disk_mib: 256,
        egress: true,
        boot_timeout: Duration::from_secs(90),
    }
}

/// A shell command line as the default user in the default directory.
pub fn sh(line: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(line.into()),
        env: Default::default(),
        cwd: None,
        user: None,
        background: false,
        stdin: false,
        attach: true,
    }
}

/// A program and its arguments.
pub fn argv(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(args.iter().map(|s| s.to_string()).collect()),
        ..sh("")
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a process with this PID exists (zombies count as gone).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next());
            state != Some(Some('Z'))
        })
        .unwrap_or(false)
}

/// A directory for a test's snapshots on tmpfs (where the memory files must be),
/// removed with everything in it when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// A fresh `/dev/shm/nullspace-test-<name>-<pid>`.
    pub fn new(name: &str) -> Self {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/nullspace-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `nullspace-pool-manager` process with its own state directory, on free loopback
/// ports. SIGTERM on drop (the daemon ends its VMs), then the state is removed.
pub struct Daemon {
    child: Option<std::process::Child>,
    state: std::path::PathBuf,
    /// Where its VMs' directories are (`NULLSPACE_RUN_DIR`).
    run_dir: std::path::PathBuf,
    /// `http://127.0.0.1:PORT` of the internal control API.
    pub control: String,
    /// `http://127.0.0.1:PORT` of the data-plane edge.
    pub edge: String,
    /// `http://localhost:PORT`: the preview domain (`<port>-<sandbox>.localhost:PORT`).
    pub preview: String,
    /// `http://127.0.0.1:PORT`: the preview listener (where a preview domain other
    /// than the default points).
    pub preview_listener: String,
    /// `unix:PATH` of its control socket (`--control-socket`), if it has one.
    pub control_socket: Option<String>,
    /// `http://127.0.0.1:PORT` of the public API it serves itself (`--public-listen`).
    pub public: Option<String>,
}

/// Template snapshots shared by every test daemon (keyed by their inputs, built once).
pub fn shared_templates_dir() -> std::path::PathBuf {
    vmm::cache_dir().join("test-templates")
}

/// A binary of this workspace built with the same profile as the running one.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    // Test binaries live in target/<profile>/deps; the daemons in target/<profile>.
    // Beside this binary (a bench), or one level up (a test in deps/).
    let exe = std::env::current_exe().expect("own binary path");
    let dir = exe.parent().expect("target dir");
    [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("build {name} first (next to {})", exe.display()))
}

fn pool_manager_binary() -> std::path::PathBuf {
    workspace_binary("nullspace-pool-manager")
}

/// A file the set-up scripts leave in the cache: `$env` if set, else `relative` under
/// the cache directory; panics naming `made_by` when it is missing.
pub fn cached_artifact(env: &str, relative: &str, made_by: &str) -> std::path::PathBuf {
    let path = std::env::var_os(env)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| vmm::cache_dir().join(relative));
    assert!(path.is_file(), "no {} (run {made_by})", path.display());
    path
}

/// The public API component, as `deploy/build-component.sh` leaves it
/// (`NULLSPACE_API_COMPONENT` overrides).
pub fn api_component() -> std::path::PathBuf {
    cached_artifact(
        "NULLSPACE_API_COMPONENT",
        "components/nullspace-api.wasm",
        "deploy/build-component.sh",
    )
}

/// `wasmtime` as `deploy/install-wasmtime-cli.sh` installs it (`NULLSPACE_WASMTIME`
/// overrides).
pub fn wasmtime_cli() -> std::path::PathBuf {
    cached_artifact(
        "NULLSPACE_WASMTIME",
        "tools/wasmtime-48.0.8/bin/wasmtime",
        "deploy/install-wasmtime-cli.sh",
    )
}

/// Starts stock `wasmtime serve` on a free loopback port serving the API component, its
/// upstream set to `upstream` through `--env`; returns the child and its `IP:PORT`.
pub fn wasmtime_serve(upstream: &str) -> (std::process::Child, String) {
    let mut cmd = std::process::Command::new(wasmtime_cli());
    cmd.args(["serve", "-Scli", "--addr", "127.0.0.1:0"])
        .arg(format!("--env=NULLSPACE_UPSTREAM={upstream}"))
        .arg(api_component());
    let (serve, lines) = spawn_until(
        cmd,
        "wasmtime",
        &["Serving HTTP on"],
        Duration::from_secs(120),
    );
    let addr = lines[0]
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {:?}", lines[0]))
        .to_string();
    (serve, addr)
}

/// Spawns `cmd` with PDEATHSIG (so a test killed on timeout takes it along) and waits
/// until its stderr has shown a line containing each of `markers`, in any order; returns
/// the child and, per marker, the first such line. Every stderr line is echoed with `tag`.
pub fn spawn_until(
    mut cmd: std::process::Command,
    tag: &'static str,
    markers: &[&'static str],
    within: Duration,
) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted: Vec<&'static str> = markers.to_vec();
    std::thread::spawn(move || {
        let mut found: Vec<Option<String>> = vec![None; wanted.len()];
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            for (slot, marker) in found.iter_mut().zip(&wanted) {
                if slot.is_none() && line.contains(marker) {
                    *slot = Some(line.clone());
                }
            }
            if found.iter().all(Option::is_some) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(found.iter().flatten().cloned().collect::<Vec<_>>());
                }
            }
            eprintln!("[{tag}] {line}");
        }
    });
    match rx.recv_timeout(within) {
        Ok(lines) => (child, lines),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{tag} did not print {markers:?} within {within:?}");
        }
    }
}

/// Sends `signal` to `child` and waits up to 30 s for it to exit; kills it after that.
pub fn stop_child(child: &mut std::process::Child, signal: i32, what: &str) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not stop within 30 s of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The S3 endpoint of the suite's SeaweedFS, from `NULLSPACE_TEST_S3` (deploy/test.sh
/// starts one; by hand: `deploy/seaweedfs.sh start DIR` and export what it prints).
pub fn s3_endpoint() -> String {
    std::env::var("NULLSPACE_TEST_S3").unwrap_or_else(|_| {
        panic!("NULLSPACE_TEST_S3 is not set: run the suite with deploy/test.sh, or start SeaweedFS with deploy/seaweedfs.sh start DIR and export NULLSPACE_TEST_S3=<the endpoint it prints>")
    })
}

/// `serve` flags that keep snapshots in `bucket` (made if missing) of the suite's S3.
pub fn s3_flags(bucket: &str) -> Vec<String> {
    [
        "--snapshot-store",
        "s3",
        "--s3-endpoint",
        &s3_endpoint(),
        "--s3-bucket",
        bucket,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The environment a daemon needs for S3 (SeaweedFS here takes any credentials).
pub const S3_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "nullspace-test"),
    ("AWS_SECRET_ACCESS_KEY", "nullspace-test"),
];

/// A `nullspace-api` host serving the API component in front of a pool manager.
pub struct ApiHost {
    child: Option<std::process::Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl ApiHost {
    /// Starts a host on a free loopback port in front of the pool manager at `control`.
    pub fn start(control: &str, extra: &[&str]) -> Self {
        let mut cmd = std::process::Command::new(workspace_binary("nullspace-api"));
        cmd.arg("--component")
            .arg(api_component())
            .args(["--listen", "127.0.0.1:0", "--pool-manager", control])
            .args(extra)
            .env("RUST_LOG", "warn");
        let (child, lines) = spawn_until(
            cmd,
            "api",
            &["public API http://"],
            Duration::from_secs(120),
        );
        let url = lines[0]
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap()
            .to_string();
        Self {
            child: Some(child),
            url,
        }
    }
}

impl Drop for ApiHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGTERM, "the API host");
        }
    }
}

/// The whole local stack: a pool manager and the public API in front of it.
pub struct Stack {
    /// Dropped first: the API goes before the daemon behind it.
    pub api: ApiHost,
    /// The pool manager.
    pub daemon: Daemon,
}

impl Stack {
    /// Starts a daemon on a fresh state directory and an API host in front of it.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[], &[])
    }

    /// As [`Stack::start`], with extra `serve` flags and environment for the daemon.
    pub fn start_with(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let daemon = Daemon::start_with(name, extra, env);
        let api = ApiHost::start(daemon.api_upstream(), &[]);
        Self { api, daemon }
    }

    /// As [`Stack::start`], the daemon also serving the public API in its own process
    /// (`--public-listen`, as `deploy/up.sh` runs it): its URL is `daemon.public`.
    pub fn start_in_process(name: &str) -> Self {
        let component = api_component();
        let component = component.to_string_lossy();
        let flags = [
            "--public-listen",
            "127.0.0.1:0",
            "--public-component",
            &component,
        ];
        Self::start_with(name, &flags, &[])
    }

    /// Starts a stack whose daemon keeps its state in `state` (an existing directory).
    pub fn start_in_with(state: std::path::PathBuf, extra: &[&str]) -> Self {
        let daemon = Daemon::start_in_with(state, extra);
        let api = ApiHost::start(daemon.api_upstream(), &[]);
        Self { api, daemon }
    }

    /// A caller of the public API with `key` (paths `/v1/...` land on `/api/v1/...`).
    pub fn public(&self, key: String) -> http::Api {
        http::Api::at(&format!("{}/api", self.api.url), key)
    }
}

impl Daemon {
    /// Starts a daemon on a fresh state directory.
    pub fn start(name: &str) -> Self {
        let state =
            std::path::PathBuf::from(format!("/tmp/nullspace-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        Self::start_in(state)
    }

    /// Starts a daemon on an existing state directory (a restart).
    pub fn start_in(state: std::path::PathBuf) -> Self {
        Self::start_in_with(state, &[])
    }

    /// Starts a daemon on `state` with extra `serve` flags.
    pub fn start_in_with(state: std::path::PathBuf, extra: &[&str]) -> Self {
        Self::launch(state, extra, &[])
    }

    /// Starts a daemon on a fresh state directory with extra `serve` flags and
    /// environment.
    pub fn start_with(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let state =
            std::path::PathBuf::from(format!("/tmp/nullspace-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        Self::launch(state, extra, env)
    }

    fn launch(state: std::path::PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(pool_manager_binary());
        cmd.envs(env.iter().copied());
        reap_dead_test_runs();
        let run_dir = run_dir_of(&state);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--edge-listen",
            "127.0.0.1:0",
            "--preview-listen",
            "127.0.0.1:0",
        ])
        .args(extra);
        // The control API on a socket too, for the API host in front (the one route
        // the public API takes on one host), where the path fits a socket address.
        let socket = state.join("control.sock");
        let control_socket = (socket.as_os_str().len() <= 107
            && !extra.iter().any(|a| a.starts_with("--control-socket")))
        .then(|| {
            cmd.arg("--control-socket").arg(&socket);
            format!("unix:{}", socket.display())
        });
        // The workspace templates are built only by the tests that ask for them (one
        // build is minutes under TCG, and it would hold the host's build slot).
        if !extra.iter().any(|a| a.starts_with("--workspace-templates")) {
            cmd.args(["--workspace-templates", "off"]);
        }
        cmd.arg("--state-dir")
            .arg(&state)
            .arg("--templates-dir")
            .arg(shared_templates_dir())
            // Warnings only, unless `NULLSPACE_TEST_DAEMON_LOG` asks for more (a bench's
            // timings: `NULLSPACE_TEST_DAEMON_LOG=info`).
            .env(
                "RUST_LOG",
                std::env::var("NULLSPACE_TEST_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Its own run directory: a daemon reaps VM directories of dead owners, and
            // another test's daemon killed on purpose is one.
            .env("NULLSPACE_RUN_DIR", &run_dir);
        // Ready once the templates are too: tests then see only their own VMs. If the
        // test process dies (a timeout), PDEATHSIG tells the daemon to end its VMs.
        let (child, lines) = spawn_until(
            cmd,
            "daemon",
            &["control API", "template snapshots ready"],
            Duration::from_secs(120),
        );
        let urls: Vec<String> = lines[0]
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(str::to_string)
            .collect();
        Self {
            child: Some(child),
            state,
            run_dir,
            control: urls[0].clone(),
            edge: urls[1].clone(),
            preview: urls[2].clone(),
            preview_listener: urls[3].clone(),
            control_socket,
            public: lines[0]
                .split(" , ")
                .find_map(|part| part.strip_prefix("public API "))
                .map(str::to_string),
        }
    }

    /// Where an API host on this machine reaches the control API: its socket
    /// (`unix:PATH`) when it has one, else its TCP URL.
    pub fn api_upstream(&self) -> &str {
        self.control_socket.as_deref().unwrap_or(&self.control)
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Where its VMs' directories are (`NULLSPACE_RUN_DIR`).
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// The state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state
    }

    /// Runs an admin command against this daemon's state; returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        admin_in(&self.state, args)
    }

    /// Issues an operator key (teams, quotas, keys, the built-in warm pools).
    pub fn operator_key(&self) -> String {
        self.admin(&["key", "create", "--operator"])
    }

    /// Creates a team and returns an API key for it.
    pub fn team_key(&self, team: &str) -> String {
        self.admin(&["team", "create", team]);
        self.admin(&["key", "create", "--team", team])
    }

    /// Creates a team here and the same team (ID and key) on `other`, as workers that
    /// share a snapshot store; returns the key.
    pub fn mirrored_team_key(&self, other: &Daemon, team: &str) -> String {
        let made: serde_json::Value =
            serde_json::from_str(&self.admin(&["team", "create", team])).unwrap();
        let id = made["id"].as_str().unwrap();
        other.admin(&["team", "create", team, "--id", id]);
        let key = self.admin(&["key", "create", "--team", team]);
        other.admin(&["key", "create", "--team", team, "--key", &key]);
        key
    }

    /// Ends the daemon with `signal` and waits for it; the state stays.
    /// Restarts the daemon (SIGTERM, then a new one on the same state dir with `extra`
    /// flags), in place.
    pub fn restart_with(&mut self, extra: &[&str]) {
        let state = self.stop_with(libc::SIGTERM);
        let old = std::mem::replace(self, Self::launch(state, extra, &[]));
        // Its state dir is the new daemon's now: dropping it would remove that.
        std::mem::forget(old);
    }

    pub fn stop_with(&mut self, signal: i32) -> std::path::PathBuf {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, signal, "the pool manager");
        }
        self.state.clone()
    }
}

impl Daemon {
    /// Waits up to `within` for the daemon to end by itself (a failpoint's SIGKILL);
    /// returns the signal that ended it (`None`: it exited, or still runs and was
    /// killed here). Its state stays.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take()?;
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.signal();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Operations its catalog records as begun and not ended (the `intents` rows).
    pub fn open_intents(&self) -> i64 {
        rusqlite::Connection::open(self.state_dir().join("catalog.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM intents", [], |r| r.get(0))
            .unwrap()
    }

    /// Waits (up to a minute) for the daemon to die at its armed failpoint `point`,
    /// panicking if it does not, then starts a new daemon on the same state: what a
    /// restart after kill -9 finds.
    pub fn restart_after_failpoint(mut self, point: &str) -> Daemon {
        assert_eq!(
            self.wait_for_exit(Duration::from_secs(60)),
            Some(libc::SIGKILL),
            "the daemon did not die at failpoint {point}"
        );
        let state = self.stop_with(libc::SIGKILL);
        std::mem::forget(self); // its state directory is the next daemon's
        Daemon::start_in(state)
    }
}

/// Running QEMU processes of the VMs in `run_dir`, whoever started them (an adopted VM
/// is no child of the daemon that holds it).
pub fn qemus_in(run_dir: &std::path::Path) -> Vec<u32> {
    let dir = run_dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            process_alive(*pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("qemu-system") && c.contains(&dir)
                    })
                    .unwrap_or(false)
        })
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM);
        // A daemon started with `--on-exit keep` leaves its VMs running for the next
        // start to adopt; there is none after a test, failed or not.
        end_vms_of(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A daemon's run directory: its own, named after its state dir (a daemon reaps VM
/// directories of dead owners, and another test's daemon killed on purpose is one).
fn run_dir_of(state: &std::path::Path) -> std::path::PathBuf {
    let name = state.file_name().unwrap().to_string_lossy().to_string();
    std::path::PathBuf::from(format!(
        "/dev/shm/nullspace-{}",
        name.trim_start_matches("nullspace-")
    ))
}

/// Kills the QEMU of every VM in `run_dir` whose daemon is gone, and removes the
/// directories (the run dir goes with its last VM).
fn end_vms_of(run_dir: &std::path::Path) {
    vmm::vm_dir::reap_orphans(run_dir, None, &[]);
    let _ = std::fs::remove_dir(run_dir);
}

/// Ends what test processes that were killed (a timeout: no `Drop` ran) left: the run
/// dirs `/dev/shm/nullspace-test-NAME-PID` of PIDs that no longer run.
fn reap_dead_test_runs() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("nullspace-test-")
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            end_vms_of(&e.path());
        }
    }
}

/// A small tmpfs mounted for one test (a file system that can fill up without touching
/// the host's); unmounted and removed on drop. The tests run as root.
pub struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// Mounts `size_mib` of tmpfs on a fresh directory named after `name`.
    pub fn mount(name: &str, size_mib: u64) -> Self {
        let dir = std::path::PathBuf::from(format!(
            "/tmp/nullspace-test-fs-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a tmpfs on {} (the tests run as root)",
            dir.display()
        );
        Self(dir)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `nullspace-pool-manager admin ARGS --state-dir STATE` (panicking unless it
/// succeeds); returns its stdout, trimmed.
pub fn admin_in(state: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(pool_manager_binary())
        .arg("admin")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Bytes of the files directly in `dir` (apparent sizes; 0 if it is missing).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
