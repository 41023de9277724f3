//! Security proxy benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-security [--n 200] [--big-mib 16] [--held 200]
//!
//! One stack, an HTTPS origin of its own in a test namespace (Python's `http.server`),
//! two sandboxes: one without a security policy (its TLS passes the egress proxy as
//! bytes) and one with `{pii: card redact, injectionDefense: flag}` (every connection
//! intercepted, every request inspected). From inside each guest, Python `requests`:
//! `n` GETs on one kept-alive connection and `n/4` with a new connection each (latency
//! p50/p99), and one `big-mib` MiB download (throughput). The ratios are secure ÷
//! plain. Then the pool manager's RSS growth while the guest holds `held` open,
//! intercepted keep-alive connections (each after one request): memory per connection.

use nullspace_tests::bench::flag;
use nullspace_tests::http::Runtime;
use nullspace_tests::origin::Origin;
use nullspace_tests::Stack;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Latency and throughput in the guest; one JSON line. `verify`: `system` (the trust
/// stores the sandbox has) or a CA file.
const IN_GUEST: &str = r#"
import json, sys, time, requests
base, n, big, verify = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
verify = True if verify == 'system' else verify
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000
s = requests.Session()
for _ in range(10): s.get(base + '/bench', verify=verify).content
kept = []
for _ in range(n):
    t = time.perf_counter(); s.get(base + '/bench', verify=verify).content; kept.append(time.perf_counter() - t)
fresh = []
for _ in range(max(1, n // 4)):
    t = time.perf_counter(); requests.get(base + '/bench', verify=verify).content; fresh.append(time.perf_counter() - t)
t = time.perf_counter(); body = s.get(base + '/big/' + str(big), verify=verify).content; took = time.perf_counter() - t
assert len(body) == big, len(body)
print(json.dumps({"kept_p50": pct(kept, 0.5), "kept_p99": pct(kept, 0.99), "new_p50": pct(fresh, 0.5),
                  "new_p99": pct(fresh, 0.99), "mib_s": big / took / 1048576}))
"#;

/// Opens `held` connections, one request on each, holds them until /tmp/release.
const HOLD: &str = r#"
import http.client, os, ssl, sys, time
held = int(sys.argv[1])
ctx = ssl.create_default_context()
conns = []
for _ in range(held):
    c = http.client.HTTPSConnection('origin.test', 8443, context=ctx, timeout=30)
    c.request('GET', '/bench'); c.getresponse().read(); conns.append(c)
open('/tmp/held', 'w').write(str(len(conns)))
deadline = time.time() + 120
while not os.path.exists('/tmp/release') and time.time() < deadline:
    time.sleep(0.1)
"#;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn measure(rt: &Runtime, n: u64, big: u64, verify: &str) -> anyhow::Result<Value> {
    let (out, err, code) = rt
        .run(&format!(
            "python3 /workspace/bench.py https://origin.test:8443 {n} {big} {verify}"
        ))
        .await;
    anyhow::ensure!(code == 0, "in-guest bench: {out} {err}");
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 200);
    let big = flag(&args, "--big-mib", 16) << 20;
    let held = flag(&args, "--held", 200);
    let origin = Origin::start();
    let dns = format!("{}:53", origin.net.addr(53));
    let ca = origin.dir.join("ca.pem");
    let stack = Stack::start_with(
        "bench-security",
        &[
            "--network",
            "isolated",
            "--egress-dns",
            &dns,
            "--egress-extra-ca",
            &ca.display().to_string(),
        ],
        &[],
    );
    let api = stack.public(stack.daemon.team_key("bench"));
    let shape = json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048 });
    let policy = json!({ "pii": { "detectors": { "card": "redact" } }, "injectionDefense": { "action": "flag" } });
    let plain = api
        .create(json!({ "templateID": "base", "resources": shape, "timeout": 3600 }))
        .await;
    let secure = api
        .create(json!({ "templateID": "base", "resources": shape, "timeout": 3600, "securityPolicy": policy }))
        .await;
    let (plain_rt, secure_rt) = (Runtime::of(&plain), Runtime::of(&secure));
    for rt in [&plain_rt, &secure_rt] {
        rt.put_file("/workspace/bench.py", IN_GUEST.as_bytes())
            .await;
        rt.put_file("/workspace/hold.py", HOLD.as_bytes()).await;
    }
    // The plain guest verifies the origin against the system bundle plus the origin's
    // CA, as the secure one does against the system bundle plus its team's: a new
    // connection's cost includes loading the bundle, which must not differ.
    plain_rt
        .put_file("/workspace/origin-ca.pem", &std::fs::read(&ca)?)
        .await;
    plain_rt
        .run("cat /etc/ssl/certs/ca-certificates.crt /workspace/origin-ca.pem > /workspace/bundle.pem")
        .await;

    // Interleaved, twice each, the better of each kept: one slow run is not the proxy.
    let mut runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        runs[0].push(measure(&plain_rt, n, big, "/workspace/bundle.pem").await?);
        runs[1].push(measure(&secure_rt, n, big, "system").await?);
    }
    let best = |rs: &[Value], k: &str, lower: bool| {
        let xs = rs.iter().map(|r| r[k].as_f64().unwrap());
        if lower {
            xs.fold(f64::MAX, f64::min)
        } else {
            xs.fold(0.0, f64::max)
        }
    };
    println!(
        "HTTPS from the guest (Python requests, {n} GETs of a short body; origin: Python http.server)"
    );
    println!("                         plain      secure     ratio");
    for (k, label, lower) in [
        ("kept_p50", "kept-alive p50 ms", true),
        ("kept_p99", "kept-alive p99 ms", true),
        ("new_p50", "new conn p50 ms", true),
        ("new_p99", "new conn p99 ms", true),
        ("mib_s", "download MiB/s", false),
    ] {
        let (p, s) = (best(&runs[0], k, lower), best(&runs[1], k, lower));
        println!("  {label:<20} {p:>9.2}  {s:>9.2}  {:>7.2}x", s / p);
    }

    // Memory per open intercepted connection.
    let pid = stack.daemon.pid();
    for (name, rt) in [("plain", &plain_rt), ("secure", &secure_rt)] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid);
        let holder = {
            let rt = Runtime::of(if name == "plain" { &plain } else { &secure });
            let verify_env = if name == "plain" {
                "SSL_CERT_FILE=/workspace/bundle.pem "
            } else {
                ""
            };
            let cmd = format!("{verify_env}python3 /workspace/hold.py {held}");
            tokio::spawn(async move { rt.run(&cmd).await })
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (out, _, _) = rt.run("cat /tmp/held 2>/dev/null").await;
            if out.trim() == held.to_string() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the guest never held {held} connections"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = rss_kib(pid);
        rt.run("touch /tmp/release").await;
        let (_, err, code) = holder.await?;
        anyhow::ensure!(code == 0, "holding connections: {err}");
        println!(
            "  {name}: {held} open connections: pool manager RSS {before} → {after} KiB, {:.1} KiB per connection",
            (after as f64 - before as f64) / held as f64
        );
    }
    for id in [&plain, &secure] {
        api.delete(id["sandboxID"].as_str().unwrap()).await;
    }
    Ok(())
}
