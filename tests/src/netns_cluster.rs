//! A cluster as `deploy/cluster.sh` makes it: PostgreSQL and SeaweedFS of its own, N
//! pool managers each in a network namespace of its own (an address each on a bridge),
//! and the public API in front of host 1. Each test process gets its own directory,
//! interface names and /24; `cluster.sh down` runs on drop, and the script's owner
//! watch runs it when the test process is killed (a timeout runs no `Drop`).

use crate::http::Api;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One host of a [`NetCluster`].
#[derive(Debug, Clone)]
pub struct ClusterHost {
    /// `host-<i>`.
    pub id: String,
    /// Its address on the cluster's bridge.
    pub addr: String,
    /// `http://ADDR:7070`: its control API.
    pub control: String,
    /// `http://ADDR:7071`: its data-plane edge.
    pub edge: String,
    /// Its network namespace.
    pub netns: String,
    /// The bridge's end of its veth pair (down: the host is cut off).
    pub link: String,
    /// Its state directory (its log is `pool-manager.log` there).
    pub state_dir: PathBuf,
    /// Where its VMs' directories are.
    pub run_dir: PathBuf,
}

/// A running cluster; `deploy/cluster.sh down` on drop.
pub struct NetCluster {
    dir: PathBuf,
    /// `http://ADDR:PORT` of the public API (host 1 behind it).
    pub api_url: String,
    /// The development team's API key.
    pub key: String,
    /// The catalog's URL (PostgreSQL, reachable from this namespace).
    pub catalog: String,
    /// The hosts, host 1 first.
    pub hosts: Vec<ClusterHost>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster.sh")
}

fn dir_of(pid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/nullspace-test-cluster-{pid}"))
}

/// Takes down the clusters of test processes that no longer run (their owner watch
/// should have; this is for one that could not).
fn reap_dead() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("nullspace-test-cluster-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new(script())
                .arg("down")
                .env("NULLSPACE_CLUSTER_DIR", dir_of(pid))
                .status();
        }
    }
}

/// A /24 (its first three numbers) of 10.78.0.0/16 that no interface here is on,
/// starting from one derived from this process.
fn free_subnet() -> String {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip");
    let taken = String::from_utf8_lossy(&out.stdout).to_string();
    let pid = std::process::id();
    (0..254)
        .map(|k| format!("10.78.{}", (pid + k) % 254 + 1))
        .find(|s| !taken.contains(&format!(" {s}.")))
        .expect("a free /24 in 10.78.0.0/16")
}

/// A base port for SeaweedFS whose ports (BASE..BASE+5, BASE+10000..BASE+10004; it
/// binds some on 127.0.0.1 too) are free here, from 20000..22000 (their +10000 stays
/// below the ephemeral range), starting from one derived from this process.
fn free_s3_base() -> u16 {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let pid = std::process::id();
    (0..100)
        .map(|k| 20000 + ((pid + k) % 100) as u16 * 20)
        .find(|&base| (0..6).all(|d| free(base + d) && free(base + 10000 + d)))
        .expect("free ports for SeaweedFS in 20000..32000")
}

impl NetCluster {
    /// `deploy/cluster.sh up --hosts N` with this process's own directory, names and
    /// subnet, the binaries this test was built with and the suite's template snapshots.
    pub fn up(hosts: usize) -> Self {
        reap_dead();
        let pid = std::process::id();
        let dir = dir_of(pid);
        let bin_dir = crate::workspace_binary("nullspace-pool-manager")
            .canonicalize()
            .expect("the pool manager binary")
            .parent()
            .unwrap()
            .to_path_buf();
        let status = Command::new(script())
            .args(["up", "--hosts", &hosts.to_string()])
            .env("NULLSPACE_CLUSTER_DIR", &dir)
            .env("NULLSPACE_CLUSTER_NAME", format!("nst{pid}"))
            .env("NULLSPACE_CLUSTER_SUBNET", free_subnet())
            .env("NULLSPACE_CLUSTER_S3_PORT", free_s3_base().to_string())
            .env("NULLSPACE_CLUSTER_OWNER_PID", pid.to_string())
            .env("NULLSPACE_BIN_DIR", &bin_dir)
            .env("NULLSPACE_API_COMPONENT", crate::api_component())
            .env(
                "NULLSPACE_CLUSTER_TEMPLATES_DIR",
                crate::shared_templates_dir(),
            )
            .status()
            .expect("running deploy/cluster.sh");
        assert!(status.success(), "deploy/cluster.sh up failed: {status}");
        let text = std::fs::read_to_string(dir.join("dev.env")).expect("the cluster's dev.env");
        let env: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("dev.env has no {k}:\n{text}"))
                .clone()
        };
        let hosts = (1..=hosts)
            .map(|i| {
                let var = |what: &str| get(&format!("NULLSPACE_HOST_{i}_{what}"));
                ClusterHost {
                    id: var("ID"),
                    addr: var("ADDR"),
                    control: var("CONTROL_URL"),
                    edge: var("EDGE_URL"),
                    netns: var("NETNS"),
                    link: var("LINK"),
                    state_dir: var("STATE_DIR").into(),
                    run_dir: var("RUN_DIR").into(),
                }
            })
            .collect();
        Self {
            api_url: get("NULLSPACE_API_URL"),
            key: get("NULLSPACE_API_KEY"),
            catalog: get("NULLSPACE_CATALOG"),
            dir,
            hosts,
        }
    }

    /// Host `i` (1-based, as its ID).
    pub fn host(&self, i: usize) -> &ClusterHost {
        &self.hosts[i - 1]
    }

    /// A caller of the public API with the team's key.
    pub fn public(&self) -> Api {
        Api::at(&format!("{}/api", self.api_url), self.key.clone())
    }

    /// A caller of host `i`'s control API with the team's key.
    pub fn control(&self, i: usize) -> Api {
        Api::at(&self.host(i).control, self.key.clone())
    }

    /// The host (1-based) whose edge a sandbox view's runtime URL is on.
    pub fn owner_of(&self, view: &serde_json::Value) -> usize {
        let base = view["runtime"]["target"]["baseUrl"]
            .as_str()
            .unwrap_or_default();
        self.hosts
            .iter()
            .position(|h| base.starts_with(&format!("{}/", h.edge)))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("no host's edge serves {view}"))
    }

    /// The hosts as the catalog lists them (`admin host list`), by ID.
    pub fn listed_hosts(&self) -> BTreeMap<String, serde_json::Value> {
        let out = crate::postgres::pool_manager(&[
            "admin",
            "host",
            "list",
            "--catalog",
            &self.catalog,
            "--state-dir",
            &self.host(1).state_dir.to_string_lossy(),
        ])
        .unwrap_or_else(|e| panic!("admin host list: {e}"));
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|h| (h["hostID"].as_str().unwrap_or_default().to_string(), h))
            .collect()
    }

    /// Host `i`'s state as the catalog reads it now (`ready`, `dead`, `lost`, ...).
    pub fn host_state(&self, i: usize) -> String {
        self.listed_hosts()
            .get(&self.host(i).id)
            .and_then(|h| h["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Cuts host `i` off: the bridge's end of its link goes down.
    pub fn partition(&self, i: usize) {
        link(&self.host(i).link, "down");
    }

    /// Joins host `i` again.
    pub fn heal(&self, i: usize) {
        link(&self.host(i).link, "up");
    }

    /// A command run in host `i`'s network namespace (only its network: it sees this
    /// host's files and processes).
    pub fn in_netns(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host(i).netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The last lines of every log, for a failure's report.
    fn print_logs(&self) {
        let mut logs: Vec<(String, PathBuf)> = self
            .hosts
            .iter()
            .map(|h| (h.id.clone(), h.state_dir.join("pool-manager.log")))
            .collect();
        logs.push(("public API".into(), self.dir.join("api.log")));
        for (name, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {name}: {} (last 40 lines) ---", path.display());
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn link(name: &str, state: &str) {
    let out = Command::new("ip")
        .args(["link", "set", name, state])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip link set {name} {state}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let status = Command::new(script())
            .arg("down")
            .env("NULLSPACE_CLUSTER_DIR", &self.dir)
            .status();
        if !matches!(status, Ok(s) if s.success()) && !std::thread::panicking() {
            panic!("deploy/cluster.sh down failed: {status:?}");
        }
    }
}

/// Polls `check` every 500 ms until it holds, for up to `secs` seconds; panics with its
/// last answer after that.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => {
                panic!("{what} did not happen within {secs} s: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
