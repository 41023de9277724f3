//! Guest-runtime benchmark (a command, not a test):
//!
//!     cargo run --release -p nullspace-tests --bin bench -- [--boots N] [--round-trips N]
//!
//! Prints cold boot to agent-ready, agent round trip (stat) and a small exec, each with
//! percentiles, and their ratios.

use nullspace_tests::{driver, minimal, sh};
use std::time::{Duration, Instant};
use vmm::{Vm, VmSpec, Vmm};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{name:<28} n={:<5} p50={:>10.3?} p90={:>10.3?} max={:>10.3?}",
        samples.len(),
        p50,
        percentile(&samples, 0.9),
        samples.last().unwrap()
    );
    p50
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let boots = arg("--boots", 3);
    let round_trips = arg("--round-trips", 500);
    let d = driver().await;
    println!(
        "accelerator: {} ({}); seccomp sandbox: {}",
        d.accel().accel,
        d.accel().reason,
        d.seccomp()
    );

    for (name, spec) in [
        ("minimal", minimal()),
        (
            "base",
            VmSpec {
                rootfs: "base".into(),
                ..VmSpec::default()
            },
        ),
    ] {
        let mut samples = Vec::new();
        for _ in 0..boots {
            let t = Instant::now();
            let vm = d.boot(&spec).await?;
            samples.push(t.elapsed());
            vm.kill().await;
        }
        report(&format!("cold boot {name} ({} MiB)", spec.mem_mib), samples);
    }

    let vm = d.boot(&minimal()).await?;
    let agent = vm.agent();
    for _ in 0..20 {
        agent.stat("/").await?;
    }
    let mut rt = Vec::new();
    for _ in 0..round_trips {
        let t = Instant::now();
        agent.stat("/").await?;
        rt.push(t.elapsed());
    }
    let rt50 = report("agent round trip (stat)", rt);
    let mut ex = Vec::new();
    for _ in 0..(round_trips / 10).max(10) {
        let t = Instant::now();
        agent.run(sh("true")).await?;
        ex.push(t.elapsed());
    }
    let ex50 = report("exec `true` to exit", ex);
    let t = Instant::now();
    let out = agent.run(sh("head -c 33554432 /dev/zero")).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<28} {:.1} MB/s",
        "stdout throughput",
        out.stdout.len() as f64 / secs / 1e6
    );
    println!(
        "ratio exec/round trip: {:.1}x",
        ex50.as_secs_f64() / rt50.as_secs_f64()
    );
    vm.kill().await;
    Ok(())
}
