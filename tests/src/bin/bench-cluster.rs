//! Cluster benchmark (a command, not a test):
//!
//!     cargo build --release -p pool-manager -p nullspace-tests --bins
//!     $CARGO_TARGET_DIR/release/bench-cluster [--n 10] [--round-trips 300]
//!
//! What a second host in front of a sandbox's owner costs, measured in one run on two
//! pool managers (host-a, host-b) sharing one PostgreSQL catalog (`NULLSPACE_TEST_POSTGRES`,
//! or one this command starts with deploy/postgres.sh on port 19546 and stops), as
//! ratios non-owner / owner:
//!
//! - create (1 vCPU / 256 MiB, `minimal`): host-b is drained, so every create is made
//!   by host-a; creates alternate between host-a (which makes it itself) and host-b
//!   (placement: the catalog's hosts read, capacity reserved on host-a, the create
//!   forwarded there). Each is deleted before the next.
//! - GETs about one sandbox of host-a, interleaved through host-a and host-b: a file
//!   read on the data-plane edge and `GET /v1/sandboxes/{id}/metrics` on the control API
//!   (both forwarded by host-b), and the sandbox's details (answered by any host from
//!   the shared catalog: the not-forwarded reference).
//! - placement through a host at 2, 100 and 1,000 host rows (the extra ones simulated:
//!   rows only, no daemons): a create with `warmPool: require` sent to the drained
//!   host-b reads every host row and chooses among them, finds none with a warm VM and
//!   is refused (503) without a VM; its p50 against the two-host one. The choice alone
//!   (host rows already in memory) is a unit test of the pool manager, which is no
//!   library a bench can call:
//!   `cargo test --release -p pool-manager a_decision_over -- --nocapture`.

use nullspace_tests::bench::{flag, percentile};
use nullspace_tests::postgres::{admin, pool_manager, FreshDatabase, OwnPostgres};
use nullspace_tests::Daemon;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = flag(&args, "--n", 10) as usize;
    let round_trips = flag(&args, "--round-trips", 300) as usize;
    // The suite's PostgreSQL if one is named, else one of our own (the suite's is
    // 19543).
    let (own, server) = OwnPostgres::or_suites("19546")?;
    let result = run(&server, n, round_trips).await;
    drop(own);
    result
}

/// One host's two front doors.
struct Host {
    control: String,
    edge: String,
}

/// p50 and p99 of `samples`.
fn p50_p99(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    (percentile(samples, 0.5), percentile(samples, 0.99))
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// `a - b`, signed, in milliseconds.
fn difference(a: Duration, b: Duration) -> String {
    format!("{:+.3} ms", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
}

/// GET `url` with `auth`; fails unless 2xx. The body is read to its end.
async fn get_ok(http: &reqwest::Client, url: &str, auth: (&str, &str)) -> anyhow::Result<()> {
    let resp = http.get(url).header(auth.0, auth.1).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Times `rounds` GETs of `path_of(host)` through each host on a keep-alive connection
/// of its own, interleaved (the order alternating), after a warm-up.
async fn timed_gets(
    hosts: &[Host; 2],
    rounds: usize,
    url_of: impl Fn(&Host) -> String,
    auth: (&str, &str),
) -> anyhow::Result<[Vec<Duration>; 2]> {
    let clients = [
        reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?,
        reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()?,
    ];
    let urls = [url_of(&hosts[0]), url_of(&hosts[1])];
    for _ in 0..20 {
        for i in 0..2 {
            get_ok(&clients[i], &urls[i], auth).await?;
        }
    }
    let mut samples = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let t = Instant::now();
            get_ok(&clients[i], &urls[i], auth).await?;
            samples[i].push(t.elapsed());
        }
    }
    Ok(samples)
}

async fn run(server: &str, n: usize, round_trips: usize) -> anyhow::Result<()> {
    let db = FreshDatabase::create(server, "bench_cluster").await;
    let url = db.url.clone();
    pool_manager(&["migrate", "--catalog", &url]).map_err(anyhow::Error::msg)?;
    let a = Daemon::start_with(
        "bench-cluster-a",
        &["--catalog", &url, "--host-id", "host-a"],
        &[],
    );
    let b = Daemon::start_with(
        "bench-cluster-b",
        &["--catalog", &url, "--host-id", "host-b"],
        &[],
    );
    a.admin(&["team", "create", "bench", "--catalog", &url]);
    let key = a.admin(&["key", "create", "--team", "bench", "--catalog", &url]);
    // Placement decides the owner: with host-b drained, host-a makes every sandbox,
    // whichever host a create is sent to.
    b.admin(&["host", "drain", "host-b", "--catalog", &url]);
    let hosts = [
        Host {
            control: a.control.clone(),
            edge: a.edge.clone(),
        },
        Host {
            control: b.control.clone(),
            edge: b.edge.clone(),
        },
    ];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let shape = json!({ "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 });
    let create = |host: &Host, body: Value| {
        let (http, url, key) = (
            http.clone(),
            format!("{}/v1/sandboxes", host.control),
            key.clone(),
        );
        async move {
            let t = Instant::now();
            let resp = http
                .post(url)
                .header("X-API-Key", &key)
                .json(&body)
                .send()
                .await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            anyhow::Ok((status, v, t.elapsed()))
        }
    };
    let made_on_a = |status: reqwest::StatusCode, v: &Value| {
        anyhow::ensure!(
            status == reqwest::StatusCode::CREATED && v["state"] == "running",
            "create failed: {status} {v}"
        );
        let base = v["runtime"]["target"]["baseUrl"]
            .as_str()
            .unwrap_or_default();
        anyhow::ensure!(
            base.starts_with(&a.edge),
            "host-a is not the owner ({base}): {v}"
        );
        anyhow::Ok(v["sandboxID"].as_str().unwrap_or_default().to_string())
    };
    let delete = |id: String| {
        let (http, url, key) = (
            http.clone(),
            format!("{}/v1/sandboxes/{id}", a.control),
            key.clone(),
        );
        async move {
            let status = http
                .delete(url)
                .header("X-API-Key", key)
                .send()
                .await?
                .status();
            anyhow::ensure!(status.is_success(), "delete {id}: {status}");
            anyhow::Ok(())
        }
    };
    let body = json!({ "templateID": "minimal", "resources": shape, "timeout": 600 });

    // Creates. A warm-up through each (the template snapshot of this shape, connections).
    for h in &hosts {
        let (status, v, _) = create(h, body.clone()).await?;
        delete(made_on_a(status, &v)?).await?;
    }
    let mut creates = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for r in 0..n {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (status, v, took) = create(&hosts[i], body.clone()).await?;
            delete(made_on_a(status, &v)?).await?;
            creates[i].push(took);
        }
    }

    // GETs about one sandbox of host-a.
    let (status, v, _) = create(&hosts[0], body.clone()).await?;
    let id = made_on_a(status, &v)?;
    let token = v["runtime"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let bearer = format!("Bearer {token}");
    let file = "/workspace/bench.txt";
    let content = vec![b'x'; 1024];
    let resp = http
        .put(format!("{}/v1/sandboxes/{id}/files?path={file}", a.edge))
        .header("Authorization", &bearer)
        .body(content)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "writing {file}: {}",
        resp.status()
    );
    let file_reads = timed_gets(
        &hosts,
        round_trips,
        |h| format!("{}/v1/sandboxes/{id}/files?path={file}", h.edge),
        ("Authorization", &bearer),
    )
    .await?;
    let metrics = timed_gets(
        &hosts,
        round_trips,
        |h| format!("{}/v1/sandboxes/{id}/metrics", h.control),
        ("X-API-Key", &key),
    )
    .await?;
    let details = timed_gets(
        &hosts,
        round_trips,
        |h| format!("{}/v1/sandboxes/{id}", h.control),
        ("X-API-Key", &key),
    )
    .await?;
    delete(id).await?;

    // Placement at 2, 100 and 1,000 host rows: a create that placement refuses.
    let refused = json!({ "templateID": "minimal", "resources": shape, "warmPool": "require" });
    let mut placement = Vec::new();
    for total in [2u64, 100, 1000] {
        let now: u64 = admin_count(&url, "SELECT COUNT(*) FROM hosts").await?;
        if total > now {
            // Ready, compatible rows (host-a's QEMU, accelerator and images) whose
            // heartbeat stays fresh for the run, with no warm VM: read and considered
            // by every decision, never chosen for a `require` create.
            admin(
                &url,
                &format!(
                    "INSERT INTO hosts (id, control_url, edge_url, preview_url, vcpus, mem_mib,
                         disk_mib, qemu, accel, image_set, state, warm, heartbeat_ms, registered_ms)
                     SELECT 'sim-' || g, 'http://127.0.0.1:9', 'http://127.0.0.1:9',
                         '127.0.0.1:9', vcpus, mem_mib, disk_mib, qemu, accel, image_set,
                         'ready', '{{}}', heartbeat_ms + 3600000, registered_ms
                     FROM hosts, generate_series({}, {}) g WHERE id = 'host-a'",
                    now + 1,
                    total
                ),
            )
            .await;
        }
        let mut samples = Vec::with_capacity(round_trips);
        for r in 0..round_trips + 20 {
            let (status, v, took) = create(&hosts[1], refused.clone()).await?;
            anyhow::ensure!(
                status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                    && v["code"] == "no_host_available",
                "expected placement's refusal: {status} {v}"
            );
            if r >= 20 {
                samples.push(took);
            }
        }
        placement.push((total, samples));
    }
    admin(&url, "DELETE FROM hosts WHERE id LIKE 'sim-%'").await;

    // The table.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "two pool managers on one PostgreSQL catalog, {cores} cores; host-b drained, so host-a owns every sandbox"
    );
    println!(
        "{:<58} {:>21} {:>21} {:>14}",
        "", "via host-a (owner)", "via host-b (forwards)", "ratio b / a"
    );
    let mut creates_p50 = [Duration::ZERO; 2];
    for (i, s) in creates.iter_mut().enumerate() {
        creates_p50[i] = p50_p99(s).0;
    }
    println!(
        "{:<58} {:>21} {:>21} {:>13.3}x",
        format!("create 1 vCPU / 256 MiB minimal, n={n}, p50"),
        format!("{:.1?}", creates_p50[0]),
        format!("{:.1?}", creates_p50[1]),
        ratio(creates_p50[1], creates_p50[0])
    );
    let mut rows = Vec::new();
    for (what, mut s) in [
        ("file read (1 KiB, edge; forwarded)", file_reads),
        (
            "GET /v1/sandboxes/:id/metrics (control; forwarded)",
            metrics,
        ),
        ("GET /v1/sandboxes/:id (catalog; not forwarded)", details),
    ] {
        let a = p50_p99(&mut s[0]);
        let b = p50_p99(&mut s[1]);
        for (q, x, y) in [("p50", a.0, b.0), ("p99", a.1, b.1)] {
            println!(
                "{:<58} {:>21} {:>21} {:>13.2}x",
                format!("{what}, n={round_trips}, {q}"),
                format!("{x:.2?}"),
                format!("{y:.2?}"),
                ratio(y, x)
            );
        }
        rows.push((what, a, b));
    }
    println!(
        "placement through host-b (create refused after the decision, no VM), n={round_trips}:"
    );
    let mut placement_p50 = Vec::new();
    for (total, s) in &mut placement {
        let (p50, p99) = p50_p99(s);
        println!("  {total:>5} host rows   p50 {p50:>9.2?}   p99 {p99:>9.2?}");
        placement_p50.push((*total, p50));
    }

    // One line per ratio.
    println!(
        "ratio create via non-owner / owner p50: {:.3}x ({}; goal: within 1.05x)",
        ratio(creates_p50[1], creates_p50[0]),
        difference(creates_p50[1], creates_p50[0])
    );
    for (what, a, b) in &rows {
        println!(
            "ratio {what} via non-owner / owner: p50 {:.2}x ({}), p99 {:.2}x",
            ratio(b.0, a.0),
            difference(b.0, a.0),
            ratio(b.1, a.1)
        );
    }
    let base = placement_p50[0].1;
    for (total, p50) in &placement_p50[1..] {
        println!(
            "ratio placement at {total} / 2 host rows p50: {:.2}x ({} per decision)",
            ratio(*p50, base),
            difference(*p50, base)
        );
    }
    println!(
        "placement's choice alone (rows in memory, 100 and 1000 hosts): cargo test --release -p pool-manager a_decision_over -- --nocapture"
    );
    drop((a, b));
    drop(db);
    Ok(())
}

/// The one integer `sql` selects, on the database at `url`.
async fn admin_count(url: &str, sql: &str) -> anyhow::Result<u64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let n: i64 = client.query_one(sql, &[]).await?.get(0);
    drop(client);
    let _ = driver.await;
    Ok(n as u64)
}
