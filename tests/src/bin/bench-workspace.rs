//! Workspace templates benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-workspace [--n 5] [--idle-s 60]
//!
//! One stack that builds `code-interpreter` and `desktop` (their build times are
//! printed), with a warm pool of two `code-interpreter` sandboxes. Then, through the
//! public API and the Rust SDK:
//! 1. create → first `run_code` result (`1 + 1`), `n` times from a cold create (the
//!    template snapshot restored) and `n` times from a warm-pool checkout: p50 of each,
//!    and the kernel's share (the `run_code` alone);
//! 2. a `desktop` sandbox's idle host CPU (its QEMU's user + system time over `idle-s`
//!    seconds after 30 s to settle, the viewer closed), % of one core; and the same
//!    with a viewer connected is left out (it needs a browser held open on the host).

use nullspace::{CodeOptions, ConnectionConfig, CreateOptions, Sandbox, WarmPoolMode};
use nullspace_tests::bench::{cpu_seconds, flag, percentile};
use nullspace_tests::{qemus_in, Stack};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Waits for workspace template `name` to be ready; returns its view.
async fn wait_built(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    name: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(45 * 60);
    loop {
        let t: Value = http
            .get(format!("{base}/api/v1/templates/{name}"))
            .header("X-API-Key", key)
            .send()
            .await?
            .json()
            .await?;
        match t["status"].as_str() {
            Some("ready") => return Ok(t),
            Some("failed") => anyhow::bail!("{name} failed to build: {t}"),
            _ => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} was not built in time: {t}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Create → first `run_code` result; returns (the whole, the `run_code` alone).
async fn first_result(
    config: &ConnectionConfig,
    warm: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let options = CreateOptions::new("code-interpreter");
    // Without `warmPool` a create restores the template's snapshot (never the pool).
    let options = if warm {
        options.warm_pool(WarmPoolMode::Require)
    } else {
        options
    };
    let started = Instant::now();
    let sbx = Sandbox::create(config, &options).await?;
    let ran = Instant::now();
    let x = sbx
        .run_code(
            "1 + 1",
            CodeOptions::default().timeout(Duration::from_secs(120)),
        )
        .await?;
    let (whole, code) = (started.elapsed(), ran.elapsed());
    anyhow::ensure!(x.text() == Some("2"), "run_code gave {x:?}");
    sbx.kill().await?;
    Ok((whole, code))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 5) as usize;
    let idle_s = flag(&args, "--idle-s", 60);
    let stack = Stack::start_with(
        "bench-workspace",
        &[
            "--workspace-templates",
            "code-interpreter,desktop",
            "--warm-pool",
            "code-interpreter=2",
        ],
        &[],
    );
    let key = stack.daemon.team_key("bench");
    let http = reqwest::Client::new();
    for name in ["code-interpreter", "desktop"] {
        let t = wait_built(&http, &stack.api.url, &key, name).await?;
        println!(
            "{name}: built in {:.1} s (steps: {})",
            t["buildMs"].as_f64().unwrap_or(0.0) / 1000.0,
            t["steps"]
                .as_array()
                .map(|s| s
                    .iter()
                    .map(|s| format!(
                        "{} {:.1} s",
                        s["kind"].as_str().unwrap_or("?"),
                        s["durationMs"].as_f64().unwrap_or(0.0) / 1000.0
                    ))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    let config = ConnectionConfig::new(&stack.api.url, key.clone());

    // 1. Create → first run_code result, cold and warm (the pool refills between).
    let pool = format!(
        "{}/api/v1/templates/code-interpreter/warm-pool",
        stack.api.url
    );
    let pool_ready = || async {
        let v: Value = http
            .get(&pool)
            .header("X-API-Key", &key)
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v["ready"].as_u64().unwrap_or(0))
    };
    let (mut cold, mut cold_code, mut warm, mut warm_code) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let (w, c) = first_result(&config, false).await?;
        cold.push(w);
        cold_code.push(c);
        let deadline = Instant::now() + Duration::from_secs(600);
        while pool_ready().await? < 1 {
            anyhow::ensure!(Instant::now() < deadline, "the warm pool never refilled");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (w, c) = first_result(&config, true).await?;
        warm.push(w);
        warm_code.push(c);
    }
    for v in [&mut cold, &mut cold_code, &mut warm, &mut warm_code] {
        v.sort();
    }
    let p50 = |v: &[Duration]| percentile(v, 0.5);
    println!(
        "code-interpreter create → first run_code result (n={n}): cold p50 {:.2?} (run_code {:.2?}), warm checkout p50 {:.2?} (run_code {:.2?}); cold ÷ warm {:.1}×",
        p50(&cold),
        p50(&cold_code),
        p50(&warm),
        p50(&warm_code),
        p50(&cold).as_secs_f64() / p50(&warm).as_secs_f64()
    );

    // 2. The desktop's idle host CPU, the viewer closed.
    let before: Vec<u32> = qemus_in(stack.daemon.run_dir());
    let desktop = Sandbox::create(&config, &CreateOptions::new("desktop")).await?;
    let pid = qemus_in(stack.daemon.run_dir())
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or_else(|| anyhow::anyhow!("the desktop's QEMU was not found"))?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(idle_s)).await;
    let cpu = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    println!(
        "desktop idle (Xvfb, openbox, 2 x11vnc, 2 websockify; viewer closed; {idle_s} s): {cpu:.2}% of a core (goal ≤ 2%)"
    );
    desktop.kill().await?;
    Ok(())
}
