//! Public-API benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     deploy/build-component.sh
//!     $CARGO_TARGET_DIR/release/bench-api [--n 2000] [--seconds 5] [--connections 8] [--creates 20]
//!
//! The cost of the wasm component in front of the pool manager, measured in one run on
//! one stack: `GET /api/v1/sandboxes/:id` through api-host + component against
//! `GET /v1/sandboxes/:id` straight to the pool manager — latency p50/p99 on one
//! keep-alive connection (interleaved, so both see the same machine), requests/s with
//! several connections — then a create through each, as ratios.

use nullspace_tests::Stack;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use nullspace_tests::bench::{flag, percentile};

/// One way to reach the control API: a base URL its `/v1/...` paths hang off.
#[derive(Clone)]
struct Route {
    name: &'static str,
    base: String,
}

async fn get_ok(http: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<()> {
    let resp = http.get(url).header("X-API-Key", key).send().await?;
    anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    resp.bytes().await?;
    Ok(())
}

/// Requests/s of GET `url` from `connections` clients for `seconds`.
async fn throughput(url: &str, key: &str, connections: u64, seconds: u64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks = (0..connections).map(|_| {
        let (url, key) = (url.to_string(), key.to_string());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                get_ok(&http, &url, &key).await?;
                n += 1;
            }
            anyhow::Ok(n)
        })
    });
    let mut total = 0;
    for t in futures::future::join_all(tasks).await {
        total += t??;
    }
    Ok(total as f64 / seconds as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 2000) as usize;
    let seconds = flag(&args, "--seconds", 5);
    let connections = flag(&args, "--connections", 8);
    let creates = flag(&args, "--creates", 20) as usize;

    let stack = Stack::start("bench-api");
    let key = stack.daemon.team_key("bench");
    let routes = [
        Route {
            name: "component",
            base: format!("{}/api", stack.api.url),
        },
        Route {
            name: "direct",
            base: stack.daemon.control.clone(),
        },
    ];
    let http = reqwest::Client::new();
    let shape = json!({ "templateID": "minimal", "resources": { "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 } });
    let create = |route: &Route| {
        let (http, url, key, body) = (
            http.clone(),
            format!("{}/v1/sandboxes", route.base),
            key.clone(),
            shape.clone(),
        );
        async move {
            let t = Instant::now();
            let v: Value = http
                .post(url)
                .header("X-API-Key", &key)
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            let took = t.elapsed();
            anyhow::ensure!(v["state"] == "running", "create failed: {v}");
            anyhow::Ok((
                v["sandboxID"].as_str().unwrap_or_default().to_string(),
                took,
            ))
        }
    };
    let delete = |id: String| {
        let (http, url, key) = (
            http.clone(),
            format!("{}/v1/sandboxes/{id}", stack.daemon.control),
            key.clone(),
        );
        async move {
            http.delete(url).header("X-API-Key", key).send().await?;
            anyhow::Ok(())
        }
    };

    let (id, _) = create(&routes[1]).await?;
    // Warm both paths (connections, compiled code, page cache).
    for r in &routes {
        for _ in 0..200 {
            get_ok(&http, &format!("{}/v1/sandboxes/{id}", r.base), &key).await?;
        }
    }

    // Latency on one connection each, interleaved.
    let clients: Vec<reqwest::Client> = routes
        .iter()
        .map(|_| reqwest::Client::builder().pool_max_idle_per_host(1).build())
        .collect::<Result<_, _>>()?;
    let mut samples = vec![Vec::with_capacity(n); routes.len()];
    for _ in 0..n {
        for (i, r) in routes.iter().enumerate() {
            let t = Instant::now();
            get_ok(&clients[i], &format!("{}/v1/sandboxes/{id}", r.base), &key).await?;
            samples[i].push(t.elapsed());
        }
    }
    let mut p50 = Vec::new();
    for (r, s) in routes.iter().zip(samples.iter_mut()) {
        s.sort();
        let (a, b) = (percentile(s, 0.5), percentile(s, 0.99));
        println!(
            "GET sandbox via {:<9} n={n} p50={a:>9.1?} p99={b:>9.1?}",
            r.name
        );
        p50.push(a);
    }
    let mut rps = Vec::new();
    for r in &routes {
        let v = throughput(
            &format!("{}/v1/sandboxes/{id}", r.base),
            &key,
            connections,
            seconds,
        )
        .await?;
        println!(
            "GET sandbox via {:<9} {connections} connections: {v:>8.0} requests/s",
            r.name
        );
        rps.push(v);
    }
    println!(
        "ratio component / direct: p50 {:.2}x, throughput {:.2}x fewer requests/s (promise: within 1.5x)",
        p50[0].as_secs_f64() / p50[1].as_secs_f64(),
        rps[1] / rps[0]
    );
    delete(id).await?;

    // Creates, interleaved; each deleted before the next.
    let mut took = vec![Vec::new(); routes.len()];
    for _ in 0..creates {
        for (i, r) in routes.iter().enumerate() {
            let (id, t) = create(r).await?;
            took[i].push(t);
            delete(id).await?;
        }
    }
    let mut create_p50 = Vec::new();
    for (r, t) in routes.iter().zip(took.iter_mut()) {
        t.sort();
        let a = percentile(t, 0.5);
        println!(
            "create via {:<9} n={creates} p50={a:>9.1?} p99={:>9.1?}",
            r.name,
            percentile(t, 0.99)
        );
        create_p50.push(a);
    }
    println!(
        "ratio component / direct create p50: {:.4}x (promise: within 1.01x)",
        create_p50[0].as_secs_f64() / create_p50[1].as_secs_f64()
    );
    Ok(())
}
