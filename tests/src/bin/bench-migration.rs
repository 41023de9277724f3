//! Live migration benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-migration [--n 5] [--hibernates 3]
//!
//! Two pool managers (host-a, host-b) on one PostgreSQL catalog (`NULLSPACE_TEST_POSTGRES`,
//! or one this command starts with deploy/postgres.sh on port 19547 and stops). For
//! guests of 256, 512 and 1024 MiB (1 vCPU, `minimal`), idle and busy (a guest process
//! rewriting 32 MiB of tmpfs in a loop: its dirty rate is what TCG lets it write), one
//! sandbox each is moved `--n` times between the hosts (`POST /migrate`, placement
//! choosing the other host), and the API's report read: downtime (from the source
//! stopping the guest for the last pass to the destination running it) and total time,
//! p50 and p99. The same sandbox is then hibernated and resumed `--hibernates` times
//! (the move a drain without --live makes: the guest is stopped for both calls), and
//! the ratio of that pause to the live migration's downtime printed. Idle and busy
//! move by pre-copy only (`"postcopy": false`); "busy-pc" is the busy guest moved by
//! post-copy at once (`"postcopyAfterMs": 0`: its downtime is the device state and
//! the first pages the guest touches, its total the rest of RAM behind it).

use nullspace_tests::bench::{flag, percentile};
use nullspace_tests::postgres::{pool_manager, FreshDatabase, OwnPostgres};
use nullspace_tests::Daemon;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 5) as usize;
    let hibernates = flag(&args, "--hibernates", 3) as usize;
    let (own, server) = OwnPostgres::or_suites("19547")?;
    let result = run(&server, n, hibernates).await;
    drop(own);
    result
}

/// p50 and p99 of `samples`, in ms.
fn p50_p99(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(percentile(samples, 0.5)), ms(percentile(samples, 0.99)))
}

/// POSTs `body` to `path` on `base` with `key`; the answer if 2xx.
async fn post(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = http
        .post(format!("{base}{path}"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "{path}: {status} {v}");
    Ok(v)
}

async fn run(server: &str, n: usize, hibernates: usize) -> anyhow::Result<()> {
    let db = FreshDatabase::create(server, "bench_migration").await;
    let url = db.url.clone();
    pool_manager(&["migrate", "--catalog", &url]).map_err(anyhow::Error::msg)?;
    let a = Daemon::start_with(
        "bench-migration-a",
        &["--catalog", &url, "--host-id", "host-a"],
        &[],
    );
    let _b = Daemon::start_with(
        "bench-migration-b",
        &["--catalog", &url, "--host-id", "host-b"],
        &[],
    );
    a.admin(&["team", "create", "bench", "--catalog", &url]);
    let key = a.admin(&["key", "create", "--team", "bench", "--catalog", &url]);
    let operator = a.admin(&["key", "create", "--operator", "--catalog", &url]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let base = a.control.clone();
    println!(
        "{:>8} {:>7} | {:>14} {:>14} | {:>14} {:>14} | {:>9} {:>9} | {:>16} {:>7}",
        "RAM MiB",
        "guest",
        "downtime p50",
        "downtime p99",
        "total p50",
        "total p99",
        "RAM MiB",
        "passes",
        "hibernate+resume",
        "ratio"
    );
    for mem in [256u32, 512, 1024] {
        for (mode, busy, ask) in [
            ("idle", false, json!({ "postcopy": false })),
            ("busy", true, json!({ "postcopy": false })),
            ("busy-pc", true, json!({ "postcopyAfterMs": 0 })),
        ] {
            let sbx = post(
                &http,
                &base,
                &key,
                "/v1/sandboxes",
                json!({ "templateID": "minimal", "timeout": 3600,
                        "resources": { "vcpus": 1, "memMiB": mem, "diskSizeMiB": 1024 } }),
            )
            .await?;
            let id = sbx["sandboxID"].as_str().unwrap_or_default().to_string();
            if busy {
                let rt = nullspace_tests::http::Runtime::of(&sbx);
                let (_, err, code) = rt
                    .run("setsid sh -c 'while :; do yes dirty | head -c 33554432 > /dev/shm/dirty; done' </dev/null >/dev/null 2>&1 &")
                    .await;
                anyhow::ensure!(code == 0, "starting the dirtier: {err}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let (mut downtime, mut total) = (Vec::new(), Vec::new());
            let (mut ram, mut passes) = (0u64, 0u64);
            for _ in 0..n {
                let r = post(
                    &http,
                    &base,
                    &operator,
                    &format!("/v1/sandboxes/{id}/migrate"),
                    ask.clone(),
                )
                .await?;
                downtime.push(Duration::from_millis(r["downtimeMs"].as_u64().unwrap_or(0)));
                total.push(Duration::from_millis(r["totalMs"].as_u64().unwrap_or(0)));
                ram = ram.max(r["ramBytes"].as_u64().unwrap_or(0));
                passes = passes.max(r["passes"].as_u64().unwrap_or(0));
            }
            let mut paused = Vec::new();
            for _ in 0..hibernates {
                let t = Instant::now();
                post(
                    &http,
                    &base,
                    &key,
                    &format!("/v1/sandboxes/{id}/hibernate"),
                    json!({}),
                )
                .await?;
                post(
                    &http,
                    &base,
                    &key,
                    &format!("/v1/sandboxes/{id}/resume"),
                    json!({}),
                )
                .await?;
                paused.push(t.elapsed());
            }
            let (d50, d99) = p50_p99(&mut downtime);
            let (t50, t99) = p50_p99(&mut total);
            let (h50, _) = p50_p99(&mut paused);
            println!(
                "{mem:>8} {mode:>7} | {d50:>11.0} ms {d99:>11.0} ms | {t50:>11.0} ms {t99:>11.0} ms | {:>9} {passes:>9} | {h50:>13.0} ms {:>6.1}x",
                ram >> 20,
                h50 / d50.max(1.0)
            );
            let resp = http
                .delete(format!("{base}/v1/sandboxes/{id}"))
                .header("x-api-key", &key)
                .send()
                .await?;
            anyhow::ensure!(
                resp.status().is_success(),
                "deleting {id}: {}",
                resp.status()
            );
        }
    }
    Ok(())
}
