//! Idle cost and density benchmark (a command, not a test):
//!
//!     cargo run --release -p nullspace-tests --bin bench-density -- \
//!         [--idle N] [--seconds S] [--max N] [--step N]
//!
//! 1. The host cost of an idle sandbox (1 vCPU, 256 MiB, restored copy-on-write from a
//!    template snapshot as the daemon does): CPU % of one core and memory (RSS and PSS)
//!    per QEMU, over `--seconds`, for `--idle` VMs, first without the per-VM limits
//!    (no cgroups) and then with them.
//! 2. Density: VMs are added `--step` at a time, up to `--max`, while a command round
//!    trip (exec `true`, median of 5) in the newest and the oldest VM stays within 3×
//!    its value with one VM.
//!
//! Everything is measured in this one run, on this host, and printed as ratios too.

use nullspace_tests::bench::cpu_seconds;
use nullspace_tests::{init_logging, minimal, sh, ScratchDir};
use std::time::{Duration, Instant};
use vmm::{
    ImageSet, QemuConfig, QemuVm, QemuVmm, RestoreMemory, RestoreOptions, Snapshot, Vm, VmSpec, Vmm,
};

/// `--name N` from the command line (the benches' shared flag reader).
fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    nullspace_tests::bench::flag(&args, name, default as u64) as usize
}

async fn driver(cgroups: bool) -> anyhow::Result<QemuVmm> {
    let config = QemuConfig {
        cgroups,
        // Only for the "before the limits" figure: the bench's own VMs, ended by it.
        allow_unconfined: !cgroups,
        ..QemuConfig::from_env()?
    };
    Ok(QemuVmm::new(config, ImageSet::from_env()?).await?)
}

/// A `kB` field of a `/proc/<pid>/…` file, in MiB.
fn proc_mib(pid: u32, file: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The median of five exec round trips in `vm`.
async fn round_trip(vm: &QemuVm) -> anyhow::Result<Duration> {
    let mut t = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        vm.agent().run(sh("true")).await?;
        t.push(start.elapsed());
    }
    t.sort();
    Ok(t[2])
}

async fn restore(d: &QemuVmm, snapshot: &Snapshot) -> anyhow::Result<QemuVm> {
    let options = RestoreOptions {
        memory: RestoreMemory::CopyOnWrite,
        ..RestoreOptions::default()
    };
    Ok(d.restore(snapshot, &options).await?)
}

/// Idle CPU (% of a core) and memory (RSS, PSS in MiB) per VM, averaged over `n`.
async fn idle_cost(
    d: &QemuVmm,
    snapshot: &Snapshot,
    n: usize,
    seconds: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut vms = Vec::new();
    for _ in 0..n {
        vms.push(restore(d, snapshot).await?);
    }
    // Settle: a restored guest finishes its post-restore work (reseed, clock) first.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pids: Vec<u32> = vms.iter().filter_map(|v| v.pid()).collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = t.elapsed().as_secs_f64();
    let cpu: f64 = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| (cpu_seconds(*p) - b) / elapsed * 100.0)
        .sum::<f64>()
        / n as f64;
    let rss = pids
        .iter()
        .map(|p| proc_mib(*p, "status", "VmRSS:"))
        .sum::<f64>()
        / n as f64;
    let pss = pids
        .iter()
        .map(|p| proc_mib(*p, "smaps_rollup", "Pss:"))
        .sum::<f64>()
        / n as f64;
    for vm in vms {
        vm.kill().await;
    }
    Ok((cpu, rss, pss))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let idle = arg("--idle", 10);
    let seconds = arg("--seconds", 10) as u64;
    let max = arg("--max", 150);
    let step = arg("--step", 10).max(1);
    let spec = VmSpec {
        vcpus: 1,
        mem_mib: 256,
        ..minimal()
    };
    let scratch = ScratchDir::new("bench-density");

    let mut figures = Vec::new();
    for cgroups in [false, true] {
        let d = driver(cgroups).await?;
        let mut parent = d.boot(&spec).await?;
        let snapshot = parent
            .snapshot(&scratch.path().join(format!("template-{cgroups}")), false)
            .await?;
        parent.kill().await;
        let (cpu, rss, pss) = idle_cost(&d, &snapshot, idle, seconds).await?;
        println!(
            "idle sandbox, {} limits ({idle} VMs, {seconds} s, {}): {cpu:.2}% of a core, RSS {rss:.0} MiB, PSS {pss:.0} MiB",
            if cgroups { "with" } else { "without" },
            d.accel().accel
        );
        figures.push((cpu, rss, pss));
        if !cgroups {
            Snapshot::delete(snapshot)?;
            continue;
        }

        // Density, under the limits.
        let mut vms = vec![restore(&d, &snapshot).await?];
        round_trip(&vms[0]).await?;
        let one = round_trip(&vms[0]).await?;
        let available = mem_available_mib();
        println!("round trip with 1 VM: {one:.1?}; host memory available {available:.0} MiB");
        let mut held = 1;
        let mut why = format!("reached --max {max}");
        'grow: while vms.len() < max {
            let started = Instant::now();
            for _ in 0..step.min(max - vms.len()) {
                match restore(&d, &snapshot).await {
                    Ok(vm) => vms.push(vm),
                    Err(e) => {
                        why = format!("a restore failed: {e}");
                        break 'grow;
                    }
                }
            }
            let newest = round_trip(vms.last().unwrap()).await?;
            let oldest = round_trip(&vms[0]).await?;
            let worst = newest.max(oldest);
            println!(
                "{:>4} VMs: round trip {worst:.1?} ({:.2}x), added in {:.1?}, host memory available {:.0} MiB",
                vms.len(),
                worst.as_secs_f64() / one.as_secs_f64(),
                started.elapsed(),
                mem_available_mib()
            );
            if worst.as_secs_f64() > 3.0 * one.as_secs_f64() {
                why = format!("round trip {worst:.1?} > 3x {one:.1?}");
                break;
            }
            held = vms.len();
            if mem_available_mib() < 1024.0 {
                why = "host memory available under 1 GiB".into();
                break;
            }
        }
        let pids: Vec<u32> = vms.iter().filter_map(|v| v.pid()).collect();
        let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let total_cpu: f64 = pids
            .iter()
            .zip(&before)
            .map(|(p, b)| cpu_seconds(*p) - b)
            .sum::<f64>()
            / seconds as f64
            * 100.0;
        println!(
            "density: {held} idle 1 vCPU / 256 MiB sandboxes held within 3x the one-VM round trip (stopped: {why}); all {} idle together: {total_cpu:.1}% of a core ({:.2}% each)",
            vms.len(),
            total_cpu / vms.len() as f64
        );
        for vm in vms {
            vm.kill().await;
        }
        Snapshot::delete(snapshot)?;
    }
    let (before, after) = (figures[0], figures[1]);
    // Below 0.01% of a core the sample is too short to divide by.
    let ratio = |a: f64, b: f64| {
        if b < 0.01 {
            "n/a (run longer)".to_string()
        } else {
            format!("{:.2}x", a / b)
        }
    };
    println!(
        "idle cost with/without limits: CPU {}, RSS {}",
        ratio(after.0, before.0),
        ratio(after.1, before.1)
    );
    Ok(())
}
