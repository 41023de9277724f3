//! Preview benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-preview [--n 200] [--seconds 5] [--connections 8] [--wakes 3]
//!
//! One stack, one sandbox serving a 1 KiB page with Python's http.server (a new
//! connection per request): the same GET made from inside the guest and through the
//! preview URL (host → preview listener → agent port tunnel → guest), latency p50/p99
//! and requests/s, as ratios; then the auto-resume wake of a paused sandbox (the first
//! preview request's time, pause → answered); then the idle sandbox's host CPU.

use nullspace_tests::http::Runtime;
use nullspace_tests::Stack;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use nullspace_tests::bench::{flag, percentile};

/// Measures inside the guest: `n` sequential GETs, then `connections` threads for
/// `seconds`. Prints one JSON line.
const IN_GUEST: &str = r#"
import json, sys, threading, time, urllib.request
n, seconds, conns = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
url = "http://127.0.0.1:8000/page.html"
lat = []
for _ in range(n):
    t = time.perf_counter(); urllib.request.urlopen(url).read(); lat.append(time.perf_counter() - t)
lat.sort()
count = [0] * conns
stop = time.perf_counter() + seconds
def worker(i):
    while time.perf_counter() < stop:
        urllib.request.urlopen(url).read(); count[i] += 1
ts = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"p50_ms": lat[len(lat)//2] * 1000, "p99_ms": lat[min(len(lat)-1, int(len(lat)*0.99))] * 1000, "rps": sum(count) / seconds}))
"#;

async fn start_server(rt: &Runtime) -> anyhow::Result<()> {
    for (path, body) in [
        ("/workspace/page.html", "x".repeat(1024)),
        ("/workspace/bench.py", IN_GUEST.to_string()),
    ] {
        let resp = rt
            .http
            .put(format!("{}/files?path={path}", rt.base))
            .bearer_auth(&rt.token)
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "upload {path}");
    }
    rt.post(
        "/commands",
        json!({ "cmd": "cd /workspace && python3 -m http.server 8000 --bind 127.0.0.1", "background": true }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt
        .run("curl -sf http://127.0.0.1:8000/page.html >/dev/null")
        .await
        .2
        != 0
    {
        anyhow::ensure!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

struct Target {
    listener: String,
    host: String,
    token: String,
}

impl Target {
    async fn get(&self, http: &reqwest::Client, path: &str) -> anyhow::Result<()> {
        let resp = http
            .get(format!("{}{path}", self.listener))
            .header("Host", &self.host)
            .header("x-nullspace-preview-proxy-token", &self.token)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "{}", resp.status());
        resp.bytes().await?;
        Ok(())
    }
}

async fn target(
    stack: &Stack,
    api: &nullspace_tests::http::Api,
    id: &str,
) -> anyhow::Result<Target> {
    let (status, v) = api
        .post(
            &format!("/v1/sandboxes/{id}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    anyhow::ensure!(status.is_success(), "{v}");
    let port = stack.daemon.preview.rsplit_once(':').unwrap().1.to_string();
    Ok(Target {
        listener: format!("http://127.0.0.1:{port}"),
        host: v["host"].as_str().unwrap().to_string(),
        token: v["proxyTarget"]["token"].as_str().unwrap().to_string(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 200);
    let seconds = flag(&args, "--seconds", 5);
    let connections = flag(&args, "--connections", 8);
    let wakes = flag(&args, "--wakes", 3);
    let stack = Stack::start("bench-preview");
    let api = stack.public(stack.daemon.team_key("bench"));
    let shape = json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 2048 });
    let sbx: Value = api
        .create(json!({ "templateID": "base", "resources": shape, "timeout": 3600 }))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_string();
    let rt = Runtime::of(&sbx);
    start_server(&rt).await?;

    // Inside the guest.
    let (out, err, code) = rt
        .run(&format!(
            "python3 /workspace/bench.py {n} {seconds} {connections}"
        ))
        .await;
    anyhow::ensure!(code == 0, "in-guest bench: {err}");
    let inside: Value = serde_json::from_str(out.trim())?;

    // Through the preview URL.
    let t = target(&stack, &api, &id).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    for _ in 0..10 {
        t.get(&http, "/page.html").await?;
    }
    let mut lat = Vec::new();
    for _ in 0..n {
        let s = Instant::now();
        t.get(&http, "/page.html").await?;
        lat.push(s.elapsed());
    }
    lat.sort();
    let t = std::sync::Arc::new(t);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()?;
                let mut k = 0u64;
                while Instant::now() < deadline {
                    t.get(&http, "/page.html").await?;
                    k += 1;
                }
                anyhow::Ok(k)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let rps = total as f64 / seconds as f64;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "GET of a 1 KiB page, {n} sequential, then {connections} connections for {seconds} s:"
    );
    println!(
        "  inside the guest  p50 {:>7.2} ms  p99 {:>7.2} ms  {:>7.1} req/s",
        inside["p50_ms"].as_f64().unwrap(),
        inside["p99_ms"].as_f64().unwrap(),
        inside["rps"].as_f64().unwrap()
    );
    println!(
        "  via preview URL   p50 {:>7.2} ms  p99 {:>7.2} ms  {:>7.1} req/s",
        ms(p50),
        ms(p99),
        rps
    );
    println!(
        "  ratio (preview / inside): p50 {:.2}x, throughput {:.2}x",
        ms(p50) / inside["p50_ms"].as_f64().unwrap(),
        rps / inside["rps"].as_f64().unwrap()
    );

    // Auto-resume: a paused sandbox woken by its first preview request.
    let sleeper: Value = api
        .create(
            json!({ "templateID": "base", "resources": shape, "timeout": 3600,
            "lifecycle": { "onTimeout": "pause", "autoResume": true } }),
        )
        .await;
    let sleeper_id = sleeper["sandboxID"].as_str().unwrap().to_string();
    start_server(&Runtime::of(&sleeper)).await?;
    let st = target(&stack, &api, &sleeper_id).await?;
    let mut woken = Vec::new();
    for _ in 0..wakes {
        let (status, v) = api
            .post(&format!("/v1/sandboxes/{sleeper_id}/pause"), json!({}))
            .await;
        anyhow::ensure!(status.is_success(), "{v}");
        let s = Instant::now();
        st.get(&http, "/page.html").await?;
        woken.push(s.elapsed());
    }
    woken.sort();
    let warm = Instant::now();
    st.get(&http, "/page.html").await?;
    println!(
        "auto-resume: first request to a paused sandbox answered in p50 {:.0} ms (of {wakes}: {}); the next one {:.1} ms",
        ms(percentile(&woken, 0.5)),
        woken.iter().map(|d| format!("{:.0}", ms(*d))).collect::<Vec<_>>().join(", "),
        ms(warm.elapsed())
    );
    // An idle sandbox's cost on the host: its QEMU process's CPU over the last samples
    // (the sampler runs every 5 s), after 20 s of nothing.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (_, m) = api.fetch(&format!("/v1/sandboxes/{id}/metrics")).await;
    let idle: Vec<f64> = m["metrics"]
        .as_array()
        .map(|a| {
            a.iter()
                .rev()
                .take(3)
                .filter_map(|s| s["hostCpuPct"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    println!(
        "idle sandbox (1 vCPU, a server waiting): host CPU of its VM over the last samples {:?} % of a core",
        idle
    );
    for sid in [&id, &sleeper_id] {
        api.delete(sid).await;
    }
    Ok(())
}
