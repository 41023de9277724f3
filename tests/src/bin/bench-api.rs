//! Public-API benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p api-host -p nullspace-tests --bins
//!     deploy/build-component.sh && deploy/install-wasmtime-cli.sh
//!     $CARGO_TARGET_DIR/release/bench-api [--n 2000] [--seconds 5] [--connections 8]
//!         [--creates 20] [--list 50] [--checkouts 10] [--routes in-process,api-host,wasmtime]
//!
//! The cost of the wasm component in front of the pool manager, measured in one run on
//! one stack, four ways to the same control routes:
//! - `direct`: `/v1/...` straight to the pool manager (TCP), the baseline;
//! - `in-process`: the pool manager's own public listener (`--public-listen`), the
//!   component in its process, its calls dispatched to the routes directly;
//! - `api-host`: `nullspace-api`, a process of its own, to the pool manager's control
//!   socket (`unix:`), as a cluster's API tier runs (there over TCP);
//! - `wasmtime`: stock `wasmtime serve` on the same `.wasm`, to the same pool manager
//!   over TCP (the peer a user would pick).
//!
//! GET a sandbox: latency p50/p99 on one keep-alive connection each (interleaved, so all
//! see the same machine), then requests/s with several connections; a list of `--list`
//! sandboxes with `fields=`; creates (interleaved, each deleted before the next); a
//! warm-pool checkout through the component against a create through it (checkouts in
//! bursts, as a burst workload takes warm capacity), and what a lone request after an
//! idle second costs. Each as a ratio to `direct` (or to the create).

use nullspace_tests::bench::{flag, percentile, settle_pool, SETTLE};
use nullspace_tests::{stop_child, wasmtime_serve, Stack};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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

/// p50 and p99 of GET `path` on each route, `n` rounds interleaved over one keep-alive
/// connection per route; prints a line per route.
async fn latencies(
    what: &str,
    routes: &[Route],
    path: &str,
    key: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let clients: Vec<reqwest::Client> = routes
        .iter()
        .map(|_| reqwest::Client::builder().pool_max_idle_per_host(1).build())
        .collect::<Result<_, _>>()?;
    // Warm every path (connections, compiled code, caches).
    for (i, r) in routes.iter().enumerate() {
        for _ in 0..100 {
            get_ok(&clients[i], &format!("{}{path}", r.base), key).await?;
        }
    }
    let mut samples = vec![Vec::with_capacity(n); routes.len()];
    for _ in 0..n {
        for (i, r) in routes.iter().enumerate() {
            let t = Instant::now();
            get_ok(&clients[i], &format!("{}{path}", r.base), key).await?;
            samples[i].push(t.elapsed());
        }
    }
    let mut p50 = Vec::new();
    for (r, s) in routes.iter().zip(samples.iter_mut()) {
        s.sort();
        let (a, b) = (percentile(s, 0.5), percentile(s, 0.99));
        println!(
            "{what} via {:<10} n={n} p50={a:>9.1?} p99={b:>9.1?}",
            r.name
        );
        p50.push(a);
    }
    Ok(p50)
}

/// `x / base` for each route but the first, named.
fn ratios(routes: &[Route], values: &[f64], invert: bool) -> String {
    routes
        .iter()
        .zip(values)
        .skip(1)
        .map(|(r, v)| {
            let ratio = if invert { values[0] / v } else { v / values[0] };
            format!("{} {ratio:.2}x", r.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 2000) as usize;
    let seconds = flag(&args, "--seconds", 5);
    let connections = flag(&args, "--connections", 8);
    let creates = flag(&args, "--creates", 20) as usize;
    let listed = flag(&args, "--list", 50) as usize;
    let checkouts = flag(&args, "--checkouts", 10) as usize;

    let stack = Stack::start_in_process("bench-api");
    let key = stack.daemon.team_key("bench");
    let quota = format!("sandboxes={}", flag(&args, "--list", 50) + 10);
    stack
        .daemon
        .admin(&["team", "quota", "bench", "--set", &quota]);
    // The built-in templates' warm pools are the operator's to size.
    let operator = stack.daemon.operator_key();
    let (mut wasmtime, wasmtime_addr) = wasmtime_serve(&stack.daemon.control);
    let public = stack
        .daemon
        .public
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the daemon printed no public API address"))?;
    let routes = [
        Route {
            name: "direct",
            base: stack.daemon.control.clone(),
        },
        Route {
            name: "in-process",
            base: format!("{public}/api"),
        },
        Route {
            name: "api-host",
            base: format!("{}/api", stack.api.url),
        },
        Route {
            name: "wasmtime",
            base: format!("http://{wasmtime_addr}/api"),
        },
    ];
    // `--routes in-process,api-host`: fewer routes, the same order (direct first).
    let only = args
        .iter()
        .position(|a| a == "--routes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>());
    let routes: Vec<Route> = routes
        .into_iter()
        .filter(|r| {
            r.name == "direct" || only.as_ref().is_none_or(|o| o.iter().any(|n| n == r.name))
        })
        .collect();
    anyhow::ensure!(
        routes.len() >= 2 && routes[1].name == "in-process",
        "--routes must name in-process (the promises are about it), e.g. --routes in-process,wasmtime"
    );
    let result = run(
        &routes,
        &stack,
        &key,
        &operator,
        n,
        seconds,
        connections,
        creates,
        listed,
        checkouts,
    )
    .await;
    stop_child(&mut wasmtime, libc::SIGTERM, "wasmtime serve");
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    routes: &[Route],
    stack: &Stack,
    key: &str,
    operator: &str,
    n: usize,
    seconds: u64,
    connections: u64,
    creates: usize,
    listed: usize,
    checkouts: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let shape = json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 });
    let create = |base: &str, body: Value| {
        let (http, url, key) = (
            http.clone(),
            format!("{base}/v1/sandboxes"),
            key.to_string(),
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
            key.to_string(),
        );
        async move {
            http.delete(url)
                .header("X-API-Key", key)
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    let minimal = json!({ "templateID": "minimal", "resources": shape });
    let direct = &routes[0].base;

    // One sandbox, GET many times.
    let (id, _) = create(direct, minimal.clone()).await?;
    let p50 = latencies(
        "GET sandbox",
        routes,
        &format!("/v1/sandboxes/{id}"),
        key,
        n,
    )
    .await?;
    let secs: Vec<f64> = p50.iter().map(Duration::as_secs_f64).collect();
    println!(
        "ratio GET p50 to direct: {} (promise: in-process within 1.5x, ahead of wasmtime)",
        ratios(routes, &secs, false)
    );
    let mut rps = Vec::new();
    for r in routes {
        let v = throughput(
            &format!("{}/v1/sandboxes/{id}", r.base),
            key,
            connections,
            seconds,
        )
        .await?;
        println!(
            "GET sandbox via {:<10} {connections} connections: {v:>8.0} requests/s",
            r.name
        );
        rps.push(v);
    }
    println!(
        "ratio requests/s to direct: {} (promise: in-process at least 0.5x, ahead of wasmtime)",
        ratios(routes, &rps, false)
    );

    // A page of `listed` sandboxes, two fields each.
    let mut ids = vec![id];
    while ids.len() < listed {
        let batch = (listed - ids.len()).min(4);
        let made =
            futures::future::join_all((0..batch).map(|_| create(direct, minimal.clone()))).await;
        for m in made {
            ids.push(m?.0);
        }
    }
    let path = format!("/v1/sandboxes?limit={listed}&fields=sandboxID,state");
    let page: Value = http
        .get(format!("{direct}{path}"))
        .header("X-API-Key", key)
        .send()
        .await?
        .json()
        .await?;
    let rows = page["sandboxes"]
        .as_array()
        .or(page.as_array())
        .map(Vec::len)
        .unwrap_or(0);
    anyhow::ensure!(
        rows == listed,
        "the page held {rows} sandboxes, not {listed}: {page}"
    );
    let p50 = latencies(
        &format!("list {listed} fields="),
        routes,
        &path,
        key,
        (n / 4).max(50),
    )
    .await?;
    let secs: Vec<f64> = p50.iter().map(Duration::as_secs_f64).collect();
    println!(
        "ratio list p50 to direct: {} (promise: in-process within 1.3x)",
        ratios(routes, &secs, false)
    );
    futures::future::join_all(ids.into_iter().map(delete)).await;

    // Creates, interleaved; each deleted before the next.
    let creators = &routes[..routes.len().min(3)];
    let mut took = vec![Vec::new(); creators.len()];
    for _ in 0..creates {
        for (i, r) in creators.iter().enumerate() {
            let (id, t) = create(&r.base, minimal.clone()).await?;
            took[i].push(t);
            delete(id).await?;
        }
    }
    let mut create_p50 = Vec::new();
    for (r, t) in creators.iter().zip(took.iter_mut()) {
        t.sort();
        let a = percentile(t, 0.5);
        println!(
            "create via {:<10} n={creates} p50={a:>9.1?} p99={:>9.1?}",
            r.name,
            percentile(t, 0.99)
        );
        create_p50.push(a.as_secs_f64());
    }
    println!(
        "ratio create p50 to direct: {} (promise: within 1.01x)",
        ratios(creators, &create_p50, false)
    );

    // A warm-pool checkout through the component against a create through it, as a
    // burst workload checks out: a pool of `BURST`, a settled host, then `BURST`
    // checkouts back to back (the two routes taking turns, each round's first from the
    // other), the sandboxes deleted after the round. The pool refills once the burst
    // is out (a refill waits `REFILL_DEFER`, 25 ms, for the checkouts that woke it).
    let pool = format!("{direct}/v1/templates/minimal/warm-pool");
    const BURST: usize = 6;
    http.put(&pool)
        .header("X-API-Key", operator)
        .json(&json!({ "size": BURST, "resources": shape }))
        .send()
        .await?
        .error_for_status()?;
    let settled = || settle_pool(&http, &pool, operator, BURST as u64);
    let warm = json!({ "templateID": "minimal", "resources": shape, "warmPool": "require" });
    let mut checkout = [Vec::new(), Vec::new()];
    // Each burst's first checkout comes after the idle second: a lone checkout.
    let mut lone = [Vec::new(), Vec::new()];
    // Even, so each route leads as many bursts.
    let rounds = (2 * checkouts).div_ceil(BURST).next_multiple_of(2);
    for round in 0..rounds {
        settled().await?;
        let mut ids = Vec::with_capacity(BURST);
        for k in 0..BURST {
            let i = (k + round) % 2;
            let (id, t) = create(&routes[i].base, warm.clone()).await?;
            checkout[i].push(t);
            if k == 0 {
                lone[i].push(t);
            }
            ids.push(id);
        }
        for done in futures::future::join_all(ids.into_iter().map(delete)).await {
            done?;
        }
    }
    let mut checkout_p50 = Vec::new();
    for (r, c) in routes[..2].iter().zip(checkout.iter_mut()) {
        c.sort();
        let p = percentile(c, 0.5);
        println!(
            "warm-pool checkout via {:<10} n={} p50={p:>9.1?} p99={:>9.1?}",
            r.name,
            c.len(),
            percentile(c, 0.99)
        );
        checkout_p50.push(p.as_secs_f64());
    }
    println!(
        "ratio create / checkout through the component: {:.0}x faster (promise: at least 600x); straight to the pool manager {:.0}x",
        create_p50[1] / checkout_p50[1],
        create_p50[0] / checkout_p50[0]
    );
    // Per route: the label, n, p50, and how many times faster than its create.
    let against_create = |what: &str, samples: &mut [Vec<Duration>; 2], then: &str| {
        for (i, (r, s)) in routes[..2].iter().zip(samples.iter_mut()).enumerate() {
            s.sort();
            let p = percentile(s, 0.5);
            println!(
                "{what} via {:<10} n={} p50={p:>9.1?}: {then}{:.0}x faster than a create",
                r.name,
                s.len(),
                create_p50[i] / p.as_secs_f64()
            );
        }
    };
    against_create("lone checkout (a burst's first)", &mut lone, "");
    // What a burst's first request pays: the cheapest authenticated read (the warm
    // pool's status), on the same connections, after the same idle second on a
    // settled host. A lone checkout costs at least this; against the create it bounds
    // the ratio a checkout that is not part of a burst could reach on this machine.
    settled().await?;
    let mut idle_get = [Vec::new(), Vec::new()];
    for _ in 0..checkouts.min(10) {
        for (i, r) in routes[..2].iter().enumerate() {
            tokio::time::sleep(SETTLE).await;
            let url = format!("{}/v1/templates/minimal/warm-pool", r.base);
            let t = Instant::now();
            get_ok(&http, &url, operator).await?;
            idle_get[i].push(t.elapsed());
        }
    }
    against_create(
        &format!("GET after {SETTLE:?} idle"),
        &mut idle_get,
        "a lone checkout at most ",
    );
    http.put(&pool)
        .header("X-API-Key", operator)
        .json(&json!({ "size": 0, "resources": shape }))
        .send()
        .await?;
    Ok(())
}
