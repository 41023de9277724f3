//! Guest-runtime benchmark (a command, not a test):
//!
//!     cargo run --release -p nullspace-tests --bin bench -- [--boots N] [--round-trips N]
//!
//! Prints cold boot to agent-ready, agent round trip (stat) and a small exec, each with
//! percentiles, and their ratios.

use nullspace_tests::{driver, minimal, sh, ScratchDir};
use std::time::{Duration, Instant};
use vmm::{RestoreMemory, RestoreOptions, Vm, VmSpec, Vmm};

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
    let restores = arg("--restores", 5);
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
        let samples = cold_boots(&d, &spec, boots).await?;
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
    let mb = |bytes: usize, t: Instant| bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let out = agent.run(sh("head -c 33554432 /dev/zero")).await?;
    println!(
        "{:<28} {:.1} MB/s",
        "stdout throughput",
        mb(out.stdout.len(), t)
    );
    let data = vec![7u8; 32 << 20];
    let t = Instant::now();
    agent
        .write_file("/tmp/upload", &data[..], None, None)
        .await?;
    println!("{:<28} {:.1} MB/s", "upload throughput", mb(data.len(), t));
    let t = Instant::now();
    let back = agent.read_file("/tmp/upload").await?;
    println!(
        "{:<28} {:.1} MB/s",
        "download throughput",
        mb(back.len(), t)
    );
    println!(
        "ratio exec/round trip: {:.1}x",
        ex50.as_secs_f64() / rt50.as_secs_f64()
    );
    vm.kill().await;

    // Snapshot, restore and fork, each to agent-ready, against a cold boot of the
    // same shape measured in this run.
    let spec = VmSpec {
        mem_mib: 512,
        ..minimal()
    };
    let cold50 = report(
        "cold boot (minimal, 512 MiB)",
        cold_boots(&d, &spec, boots).await?,
    );
    let scratch = ScratchDir::new("bench");
    let mut parent = d.boot(&spec).await?;
    let mut snaps = Vec::new();
    let mut snapshot = None;
    for i in 0..restores {
        let t = Instant::now();
        let s = parent
            .snapshot(&scratch.path().join(format!("s{i}")), true)
            .await?;
        snaps.push(t.elapsed());
        if let Some(old) = snapshot.replace(s) {
            vmm::Snapshot::delete(old)?;
        }
    }
    let snapshot = snapshot.expect("at least one snapshot");
    report("snapshot (VM keeps running)", snaps);
    for (name, memory) in [
        ("restore (memory copied)", RestoreMemory::Copy),
        ("fork child (copy-on-write)", RestoreMemory::CopyOnWrite),
    ] {
        let options = RestoreOptions {
            memory,
            ..RestoreOptions::default()
        };
        let mut samples = Vec::new();
        let mut private = Vec::new();
        for _ in 0..restores {
            let t = Instant::now();
            let vm = d.restore(&snapshot, &options).await?;
            samples.push(t.elapsed());
            private.push(private_mib(vm.pid().unwrap_or(0)));
            vm.kill().await;
        }
        let p50 = report(name, samples);
        println!(
            "{:<28} cold boot / this = {:.1}x; private memory per VM {} MiB (of 512)",
            "",
            cold50.as_secs_f64() / p50.as_secs_f64(),
            private.iter().sum::<u64>() / private.len() as u64
        );
    }
    println!("snapshot size on disk: {} MiB", snapshot.disk_usage() >> 20);

    // An idle sandbox's CPU use: QEMU's CPU time over a quiet window after boot.
    let idle = d.boot(&minimal()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = idle.pid().unwrap_or(0);
    let (cpu0, t0) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = (cpu_ticks(pid) - cpu0) as f64 / 100.0;
    println!(
        "{:<28} {:.2}% of a core over {:.0?}",
        "idle VM CPU",
        100.0 * used / t0.elapsed().as_secs_f64(),
        t0.elapsed()
    );
    idle.kill().await;
    parent.kill().await;
    Ok(())
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the command name.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

/// Boots `n` VMs one after another, timing each to agent-ready.
async fn cold_boots(d: &vmm::QemuVmm, spec: &VmSpec, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let vm = d.boot(spec).await?;
        samples.push(t.elapsed());
        vm.kill().await;
    }
    Ok(samples)
}

/// Private (not shared with other mappers) memory of a process, MiB.
fn private_mib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .filter(|l| l.starts_with("Private_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        / 1024
}
