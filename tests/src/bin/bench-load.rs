//! Load benchmark (a command, not a test):
//!
//!     cargo build -p pool-manager -p api-host -p nullspace-tests --bins
//!     deploy/build-component.sh
//!     $CARGO_TARGET_DIR/debug/bench-load [--workers 100] [--cycles 1] [--mem-mib 256]
//!
//! `--workers` clients at once, each running `--cycles` create → command → delete
//! cycles through the public API (the wasm component in front of one pool manager, all
//! on loopback), then the books: p50/p99 per step, errors by HTTP status and code, and
//! what outlived the load — QEMU processes, VM directories, catalog records not deleted,
//! sandboxes created but unknown to the catalog (lost records). The targets: no 5xx, no
//! leak, no lost record.

use nullspace_tests::bench::{flag, percentile};
use nullspace_tests::Stack;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the workers saw.
#[derive(Default)]
struct Books {
    create: Vec<Duration>,
    command: Vec<Duration>,
    delete: Vec<Duration>,
    cycle: Vec<Duration>,
    /// `"<status> <code>"` → how many.
    errors: BTreeMap<String, u64>,
    /// Every sandbox a create answered with.
    created: Vec<String>,
}

impl Books {
    fn error(&mut self, status: u16, body: &Value) {
        let code = body["code"].as_str().unwrap_or("-");
        *self.errors.entry(format!("{status} {code}")).or_default() += 1;
    }
}

/// One create → command → delete cycle; what it measured goes into `books`.
async fn cycle(http: &reqwest::Client, api: &str, key: &str, mem: u64, books: &Mutex<Books>) {
    let started = Instant::now();
    let t = Instant::now();
    let resp = http
        .post(format!("{api}/api/v1/sandboxes"))
        .header("X-API-Key", key)
        .json(&json!({
            "templateID": "minimal",
            "resources": { "vcpus": 1, "memMiB": mem, "diskSizeMiB": 1024 },
            "timeout": 600,
        }))
        .send()
        .await;
    let (status, body) = match resp {
        Ok(r) => (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        ),
        Err(e) => {
            books
                .lock()
                .unwrap()
                .error(0, &json!({ "code": e.to_string() }));
            return;
        }
    };
    if status != 201 {
        books.lock().unwrap().error(status, &body);
        return;
    }
    let id = body["sandboxID"].as_str().unwrap_or_default().to_string();
    {
        let mut b = books.lock().unwrap();
        b.create.push(t.elapsed());
        b.created.push(id.clone());
    }
    let t = Instant::now();
    let base = body["runtime"]["target"]["baseUrl"]
        .as_str()
        .unwrap_or_default();
    let token = body["runtime"]["token"].as_str().unwrap_or_default();
    match http
        .post(format!("{base}/commands"))
        .bearer_auth(token)
        .json(&json!({ "cmd": "echo load" }))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            let text = r.text().await.unwrap_or_default();
            if text.contains("load") {
                books.lock().unwrap().command.push(t.elapsed());
            } else {
                books
                    .lock()
                    .unwrap()
                    .error(200, &json!({ "code": "command output missing" }));
            }
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.json::<Value>().await.unwrap_or(Value::Null);
            books.lock().unwrap().error(status, &body);
        }
        Err(e) => books
            .lock()
            .unwrap()
            .error(0, &json!({ "code": e.to_string() })),
    }
    let t = Instant::now();
    match http
        .delete(format!("{api}/api/v1/sandboxes/{id}"))
        .header("X-API-Key", key)
        .send()
        .await
    {
        Ok(r) if r.status().as_u16() == 204 => {
            let mut b = books.lock().unwrap();
            b.delete.push(t.elapsed());
            b.cycle.push(started.elapsed());
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.json::<Value>().await.unwrap_or(Value::Null);
            books.lock().unwrap().error(status, &body);
        }
        Err(e) => books
            .lock()
            .unwrap()
            .error(0, &json!({ "code": e.to_string() })),
    }
}

fn quantiles(name: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        println!("  {name:<8} no samples");
        return;
    }
    samples.sort();
    println!(
        "  {name:<8} n={:<4} p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples[samples.len() - 1]
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let workers = flag(&args, "--workers", 100);
    let cycles = flag(&args, "--cycles", 1);
    let mem = flag(&args, "--mem-mib", 256);
    let stack = Stack::start("bench-load");
    let n = (workers * 2).to_string();
    stack.daemon.admin(&[
        "team",
        "create",
        "load",
        "--set",
        &format!("sandboxes={n}"),
        "--set",
        &format!("vcpus={n}"),
        "--set",
        &format!("memoryMiB={}", workers * 2 * mem),
        "--set",
        "createsPerMinute=100000",
        "--set",
        &format!("createBurst={n}"),
    ]);
    let key = stack.daemon.admin(&["key", "create", "--team", "load"]);
    let api = stack.api.url.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(workers as usize)
        .build()
        .unwrap();
    let books = Arc::new(Mutex::new(Books::default()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (http, api, key, books) = (http.clone(), api.clone(), key.clone(), books.clone());
            tokio::spawn(async move {
                for _ in 0..cycles {
                    cycle(&http, &api, &key, mem, &books).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed();

    // The books after the load: give deletes' last steps a moment, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let run_dir = stack.daemon.run_dir().to_path_buf();
    let qemu = std::process::Command::new("pgrep")
        .args(["-fc", &run_dir.display().to_string()])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let vm_dirs = std::fs::read_dir(&run_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
                .count()
        })
        .unwrap_or(0);
    let db = rusqlite::Connection::open(stack.daemon.state_dir().join("catalog.db")).unwrap();
    let not_deleted: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE json_extract(record, '$.state') != 'deleted'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut b = books.lock().unwrap();
    let lost = b
        .created
        .iter()
        .filter(|id| {
            db.query_row("SELECT COUNT(*) FROM sandboxes WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_or(0)
                == 0
        })
        .count();
    let five_xx: u64 = b
        .errors
        .iter()
        .filter(|(k, _)| k.starts_with('5') || k.starts_with("0 "))
        .map(|(_, n)| n)
        .sum();

    println!(
        "{workers} workers x {cycles} create -> command -> delete cycles ({} MiB sandboxes) in {wall:.1?}:",
        mem
    );
    quantiles("create", &mut b.create);
    quantiles("command", &mut b.command);
    quantiles("delete", &mut b.delete);
    quantiles("cycle", &mut b.cycle);
    if b.errors.is_empty() {
        println!("  errors   none");
    }
    for (k, n) in &b.errors {
        println!("  error    {k}: {n}");
    }
    println!(
        "  books    5xx or no answer {five_xx}; leaks: {qemu} QEMU processes, {vm_dirs} VM directories, {not_deleted} catalog records not deleted; lost records {lost}"
    );
}
