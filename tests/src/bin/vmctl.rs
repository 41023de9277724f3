//! Boots one VM, runs a shell command in it, prints its output and exits with its code.
//!
//!     vmctl [--rootfs base|minimal] [--no-egress] -- COMMAND...
//!
//! For poking at the guest runtime by hand; the VM is gone when it returns.

use nullspace_tests::{driver, sh};
use std::io::Write;
use vmm::{Vm, VmSpec, Vmm};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (flags, command) = args.split_at(split);
    let command = command
        .iter()
        .skip(1)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let mut spec = VmSpec::default();
    let mut it = flags.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--rootfs" => spec.rootfs = it.next().cloned().unwrap_or_default(),
            "--no-egress" => spec.egress = false,
            "--vcpus" | "--mem-mib" => {
                let n: u32 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("{flag} takes a number"))?;
                if flag == "--vcpus" {
                    spec.vcpus = n
                } else {
                    spec.mem_mib = n
                }
            }
            other => anyhow::bail!("unknown flag {other}; usage: vmctl [--rootfs base|minimal] [--vcpus N] [--mem-mib N] [--no-egress] -- COMMAND..."),
        }
    }
    let command = if command.is_empty() {
        "uname -a; cat /etc/os-release | head -1".to_string()
    } else {
        command
    };
    let d = driver().await;
    eprintln!("booting {} under {} ...", spec.rootfs, d.accel().accel);
    let t = std::time::Instant::now();
    let vm = d.boot(&spec).await?;
    eprintln!(
        "{} ready in {:.2?}; running: {command}",
        vm.id(),
        t.elapsed()
    );
    let status = vm
        .agent()
        .exec(sh(&command))
        .await?
        .wait_with(
            |b| {
                let _ = std::io::stdout().write_all(b);
            },
            |b| {
                let _ = std::io::stderr().write_all(b);
            },
        )
        .await?;
    vm.kill().await;
    std::process::exit(status.code.unwrap_or(128 + status.signal.unwrap_or(0)));
}
