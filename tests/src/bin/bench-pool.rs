//! Pool-manager benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-pool [--n 10] [--network auto|isolated|user]
//!
//! Create-to-first-command through the daemon's HTTP APIs against a raw restore of the
//! same template snapshot to its first command, measured in one run, with their ratio;
//! then sandboxes created per second by a concurrent burst; then a warm-pool checkout
//! against a restore-from-template create (p50/p99, ratio) and a burst of checkouts.

use nullspace_tests::{sh, shared_templates_dir, Daemon};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vmm::{RestoreMemory, RestoreOptions, Snapshot, Vm};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // `--network user|isolated|auto` (the daemon's default, auto): what network
    // isolation costs a create.
    let network = args
        .iter()
        .position(|a| a == "--network")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "auto".into());
    let isolated = match network.as_str() {
        "user" => false,
        "isolated" => true,
        _ => vmm::net::GuestNet::check_host().is_ok(),
    };
    println!(
        "network: {}",
        if isolated {
            "isolated (egress proxy)"
        } else {
            "user-mode"
        }
    );
    let daemon = Daemon::start_with("bench", &["--network", &network], &[]);
    let key = daemon.team_key("bench");
    let http = reqwest::Client::new();
    let shape = json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 });
    let create = |body: Value| {
        let http = http.clone();
        let url = format!("{}/v1/sandboxes", daemon.control);
        let key = key.clone();
        async move {
            let v: Value = http
                .post(url)
                .header("X-API-Key", key)
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(v)
        }
    };
    let delete = |id: String| {
        let http = http.clone();
        let url = format!("{}/v1/sandboxes/{id}", daemon.control);
        let key = key.clone();
        async move {
            http.delete(url).header("X-API-Key", key).send().await?;
            anyhow::Ok(())
        }
    };
    // Warm-up: makes the template snapshot of this shape.
    let warm = create(json!({ "templateID": "minimal", "resources": shape })).await?;
    delete(warm["sandboxID"].as_str().unwrap_or_default().to_string()).await?;

    let mut api = Vec::new();
    let mut create_only = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let s = create(json!({ "templateID": "minimal", "resources": shape })).await?;
        create_only.push(t.elapsed());
        let out = http
            .post(format!(
                "{}/commands",
                s["runtime"]["target"]["baseUrl"]
                    .as_str()
                    .unwrap_or_default()
            ))
            .bearer_auth(s["runtime"]["token"].as_str().unwrap_or_default())
            .json(&json!({ "cmd": "echo ready" }))
            .send()
            .await?
            .text()
            .await?;
        api.push(t.elapsed());
        anyhow::ensure!(out.contains("ready"), "unexpected output: {out}");
        delete(s["sandboxID"].as_str().unwrap_or_default().to_string()).await?;
    }

    // The same snapshot, restored directly through the VMM, to its first command.
    // The one of the current image set and of the daemon's network kind (`--network
    // auto`: isolated where the host can): older sets' snapshots stay in the directory.
    let rootfs = vmm::ImageSet::from_env()?.rootfs("minimal")?;
    let template = std::fs::read_dir(shared_templates_dir())?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("minimal-1x512-"))
                .unwrap_or(false)
                && Snapshot::open(p).is_ok_and(|s| {
                    s.manifest().rootfs_image == rootfs && s.manifest().isolated_network == isolated
                })
        })
        .ok_or_else(|| anyhow::anyhow!("no minimal 1x512 template snapshot of this image set"))?;
    let snapshot = Snapshot::open(&template)?;
    let d = vmm::QemuVmm::new(
        vmm::QemuConfig {
            isolated_network: isolated,
            ..vmm::QemuConfig::from_env()?
        },
        vmm::ImageSet::from_env()?,
    )
    .await?;
    let options = RestoreOptions {
        memory: RestoreMemory::CopyOnWrite,
        disk_mib: Some(1024),
        ..RestoreOptions::default()
    };
    let mut raw = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let vm = d.restore(&snapshot, &options).await?;
        vm.agent().run(sh("echo ready")).await?;
        raw.push(t.elapsed());
        vm.kill().await;
    }
    let (a, r) = (p50(api.clone()), p50(raw.clone()));
    println!(
        "create → first command via API   n={n} p50={a:>9.1?} p90={:>9.1?}",
        p90(api)
    );
    println!(
        "raw restore → first command      n={n} p50={r:>9.1?} p90={:>9.1?}",
        p90(raw)
    );
    println!(
        "ratio API / raw restore: {:.3}x (promise: within 1.1x)",
        a.as_secs_f64() / r.as_secs_f64()
    );

    // Burst: 20 concurrent creates.
    let burst = 20;
    let t = Instant::now();
    let results = futures::future::join_all(
        (0..burst).map(|_| create(json!({ "templateID": "minimal", "resources": shape }))),
    )
    .await;
    let wall = t.elapsed();
    let mut ids = Vec::new();
    for r in results {
        let v = r?;
        anyhow::ensure!(v["state"] == "running", "create failed: {v}");
        ids.push(v["sandboxID"].as_str().unwrap_or_default().to_string());
    }
    println!(
        "burst of {burst} concurrent creates: {wall:.2?} wall, {:.1} sandboxes/s on {} cores",
        burst as f64 / wall.as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    futures::future::join_all(ids.into_iter().map(delete)).await;

    // Warm pool: a checkout against a restore-from-template create, answer to answer.
    let pool_url = format!("{}/v1/templates/minimal/warm-pool", daemon.control);
    let set_pool = |size: u32| {
        let (http, url, key, shape) = (http.clone(), pool_url.clone(), key.clone(), shape.clone());
        async move {
            http.put(url)
                .header("X-API-Key", key)
                .json(&json!({ "size": size, "resources": shape }))
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    let ready = || {
        let (http, url, key) = (http.clone(), pool_url.clone(), key.clone());
        async move {
            let v: Value = http
                .get(url)
                .header("X-API-Key", key)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(v["ready"].as_u64().unwrap_or(0))
        }
    };
    let wait_ready = |want: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(300);
        while ready().await? < want {
            anyhow::ensure!(Instant::now() < deadline, "the pool never held {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    };
    set_pool(2).await?;
    let mut checkout = Vec::new();
    for _ in 0..n {
        wait_ready(1).await?;
        let t = Instant::now();
        let s =
            create(json!({ "templateID": "minimal", "resources": shape, "warmPool": "require" }))
                .await?;
        checkout.push(t.elapsed());
        anyhow::ensure!(s["state"] == "running", "checkout failed: {s}");
        delete(s["sandboxID"].as_str().unwrap_or_default().to_string()).await?;
    }
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let (c, w) = (p50(create_only.clone()), p50(checkout.clone()));
    println!(
        "create (restore from template)   n={n} p50={c:>9.1?} p99={:>9.1?}",
        p99(create_only)
    );
    println!(
        "create (warm-pool checkout)      n={n} p50={w:>9.1?} p99={:>9.1?}",
        p99(checkout)
    );
    println!(
        "ratio create / checkout: {:.0}x faster (promise: at least 300x)",
        c.as_secs_f64() / w.as_secs_f64()
    );

    let size = 16u32;
    set_pool(size).await?;
    wait_ready(size as u64).await?;
    let t = Instant::now();
    let results = futures::future::join_all((0..size).map(|_| {
        create(json!({ "templateID": "minimal", "resources": shape, "warmPool": "require" }))
    }))
    .await;
    let wall = t.elapsed();
    let mut ids = Vec::new();
    for r in results {
        let v = r?;
        anyhow::ensure!(v["state"] == "running", "checkout failed: {v}");
        ids.push(v["sandboxID"].as_str().unwrap_or_default().to_string());
    }
    println!(
        "burst of {size} concurrent warm checkouts: {wall:.2?} wall, {:.0} sandboxes/s",
        size as f64 / wall.as_secs_f64()
    );
    set_pool(0).await?;
    futures::future::join_all(ids.into_iter().map(delete)).await;
    Ok(())
}
