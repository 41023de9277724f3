//! Catalog soak benchmark (a command, not a test):
//!
//!     cargo build -p pool-manager -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/debug/bench-catalog [--deleted 100000] [--gets 300]
//!
//! Whether a host's history slows it down: on one daemon with one live sandbox, GET of
//! that sandbox, a list of the team's sandboxes, a warm-pool checkout (its admission
//! sums the team's live sandboxes) and the timeout sweeper's read of the catalog
//! (`nullspace_timeout_sweep_scan_seconds` on `/metrics`) are measured, then
//! `--deleted` records of deleted sandboxes (of the same team, two events each) are
//! written into the catalog beside the daemon, and everything is measured again. The
//! figures are ratios (after / before): flat is ≈ 1.

use nullspace_tests::bench::{flag, percentile, settle_pool};
use nullspace_tests::Daemon;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

struct Figures {
    get_p50: Duration,
    list_p50: Duration,
    checkout_p50: Duration,
    sweep_scan: Duration,
}

const SHAPE: fn() -> Value = || json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 });

/// The JSON answer to `request`.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// A settled host: the warm pool of `minimal` holds its one VM, nothing restores.
async fn settle(http: &reqwest::Client, d: &Daemon, operator: &str) {
    let pool = format!("{}/v1/templates/minimal/warm-pool", d.control);
    settle_pool(http, &pool, operator, 1).await.unwrap();
}

/// Warm-pool checkouts of `minimal` (a pool of one, each on a settled host: the pool
/// full, nothing restoring, then a second), each deleted after; their median.
async fn checkouts(
    http: &reqwest::Client,
    d: &Daemon,
    key: &str,
    operator: &str,
    n: u64,
) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..n {
        settle(http, d, operator).await;
        let t = Instant::now();
        let v = json_of(
            http.post(format!("{}/v1/sandboxes", d.control))
                .header("X-API-Key", key)
                .json(&json!({ "templateID": "minimal", "resources": SHAPE(), "warmPool": "require" })),
        )
        .await;
        samples.push(t.elapsed());
        let id = v["sandboxID"]
            .as_str()
            .unwrap_or_else(|| panic!("checkout: {v}"));
        http.delete(format!("{}/v1/sandboxes/{id}", d.control))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
    }
    samples.sort();
    percentile(&samples, 0.5)
}

async fn timed_gets(http: &reqwest::Client, url: &str, key: &str, n: u64) -> Duration {
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        let resp = http.get(url).header("X-API-Key", key).send().await.unwrap();
        assert!(resp.status().is_success(), "{url}: {}", resp.status());
        resp.bytes().await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    percentile(&samples, 0.5)
}

/// The median of the sweeper's last scan time over `seconds` (it sweeps every 500 ms).
async fn sweep_scan(http: &reqwest::Client, control: &str, seconds: u64) -> Duration {
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let text = http
            .get(format!("{control}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let v: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("nullspace_timeout_sweep_scan_seconds "))
            .expect("the daemon reports its sweep")
            .parse()
            .unwrap();
        samples.push(Duration::from_secs_f64(v));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    samples.sort();
    percentile(&samples, 0.5)
}

async fn measure(
    http: &reqwest::Client,
    d: &Daemon,
    (key, operator): (&str, &str),
    id: &str,
    gets: u64,
) -> Figures {
    let get = format!("{}/v1/sandboxes/{id}", d.control);
    let list = format!("{}/v1/sandboxes?limit=100", d.control);
    settle(http, d, operator).await;
    // Warm the connection and the page cache.
    timed_gets(http, &get, key, 10).await;
    Figures {
        get_p50: timed_gets(http, &get, key, gets).await,
        list_p50: timed_gets(http, &list, key, gets / 3).await,
        checkout_p50: checkouts(http, d, key, operator, 5).await,
        sweep_scan: sweep_scan(http, &d.control, 5).await,
    }
}

/// Writes `n` records of deleted sandboxes of `team` (each with two events) into the
/// catalog, in one transaction, as the daemon would have left them.
fn write_history(catalog: &std::path::Path, team: &str, template: &Value, n: u64) {
    let mut db = rusqlite::Connection::open(catalog).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    let tx = db.transaction().unwrap();
    let first: i64 = tx
        .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM sandboxes", [], |r| {
            r.get(0)
        })
        .unwrap();
    let now = chrono_now();
    for i in 0..n {
        let id = format!("sbx-{:032x}", 0xdead_0000_0000u64 + i);
        let mut record = template.clone();
        record["id"] = json!(id);
        record["state"] = json!("deleted");
        record["vm_dir"] = Value::Null;
        record["timeline"] = json!([{ "step": "deleted", "at": now, "detail": "bench history" }]);
        tx.execute(
            "INSERT INTO sandboxes (id, team_id, seq, record) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![id, team, first + i as i64, record.to_string()],
        )
        .unwrap();
        for (event_id, kind) in [(1, "sandbox.created"), (2, "sandbox.deleted")] {
            tx.execute(
                "INSERT INTO events (sandbox_id, event_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4, '{}')",
                rusqlite::params![id, event_id, 0i64, kind],
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn chrono_now() -> String {
    // RFC 3339 in UTC without a date crate: what `date -u` prints.
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let deleted = flag(&args, "--deleted", 100_000);
    let gets = flag(&args, "--gets", 300);
    let daemon = Daemon::start("bench-catalog");
    let key = daemon.team_key("bench");
    let operator = daemon.operator_key();
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/v1/sandboxes", daemon.control))
        .header("X-API-Key", &key)
        .json(&json!({ "templateID": "minimal", "resources": SHAPE(), "timeout": 3600 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["sandboxID"].as_str().expect("created").to_string();
    let pool = format!("{}/v1/templates/minimal/warm-pool", daemon.control);
    http.put(&pool)
        .header("X-API-Key", &operator)
        .json(&json!({ "size": 1, "resources": SHAPE() }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let before = measure(&http, &daemon, (&key, &operator), &id, gets).await;
    let catalog = daemon.state_dir().join("catalog.db");
    let (team, record): (String, String) = rusqlite::Connection::open(&catalog)
        .unwrap()
        .query_row(
            "SELECT team_id, record FROM sandboxes WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let t = Instant::now();
    write_history(
        &catalog,
        &team,
        &serde_json::from_str(&record).unwrap(),
        deleted,
    );
    eprintln!("wrote {deleted} deleted records in {:?}", t.elapsed());
    let after = measure(&http, &daemon, (&key, &operator), &id, gets).await;

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-6);
    println!(
        "catalog with 1 live sandbox, then + {deleted} deleted records (same team, 2 events each):"
    );
    println!(
        "  GET /v1/sandboxes/:id p50   {:>9.3?} -> {:>9.3?}  ({:.2}x)",
        before.get_p50,
        after.get_p50,
        ratio(after.get_p50, before.get_p50)
    );
    println!(
        "  GET /v1/sandboxes p50       {:>9.3?} -> {:>9.3?}  ({:.2}x)",
        before.list_p50,
        after.list_p50,
        ratio(after.list_p50, before.list_p50)
    );
    println!(
        "  warm-pool checkout p50      {:>9.3?} -> {:>9.3?}  ({:.2}x)",
        before.checkout_p50,
        after.checkout_p50,
        ratio(after.checkout_p50, before.checkout_p50)
    );
    println!(
        "  timeout sweep scan (median) {:>9.3?} -> {:>9.3?}  ({:.2}x)",
        before.sweep_scan,
        after.sweep_scan,
        ratio(after.sweep_scan, before.sweep_scan)
    );
    let _ = http
        .put(&pool)
        .header("X-API-Key", &operator)
        .json(&json!({ "size": 0, "resources": SHAPE() }))
        .send()
        .await;
    let _ = http
        .delete(format!("{}/v1/sandboxes/{id}", daemon.control))
        .header("X-API-Key", &key)
        .send()
        .await;
}
