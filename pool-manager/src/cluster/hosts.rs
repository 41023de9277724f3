//! This host in the shared catalog: its identity (an ID kept in the state directory),
//! its registration (addresses, capacity, what its VMs need) and its heartbeat.

use crate::catalog::{Catalog, HostInfo};
use crate::sandboxes::Manager;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often a host heartbeats (a third of the expiry: two may be lost).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// This host's ID: `given` (`--host-id`), else the one kept in `STATE/host-id`, else a
/// new one kept there. An ID is letters, digits and `-` (at most 63): it names the
/// host in URLs and logs.
pub fn host_id(state_dir: &Path, given: Option<&str>) -> anyhow::Result<String> {
    let file = state_dir.join("host-id");
    let id = match given {
        Some(id) => id.to_string(),
        None => match std::fs::read_to_string(&file) {
            Ok(kept) => kept.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                format!("host-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
            }
            Err(e) => anyhow::bail!("reading {}: {e}", file.display()),
        },
    };
    let valid = !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    anyhow::ensure!(
        valid,
        "host ID {id:?}: send 1 to 63 letters, digits or '-' (--host-id), e.g. host-a"
    );
    // Kept: a restart is the same host (its sandboxes' owner).
    let tmp = state_dir.join("host-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| anyhow::anyhow!("keeping the host ID in {}: {e}", file.display()))?;
    Ok(id)
}

/// What this host offers: its CPUs, half its memory (what one host gives sandboxes
/// at most, as one sandbox's limit is), and the free disk of its state directory.
pub fn capacity(state_dir: &Path) -> (u64, u64, u64) {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mem_mib = crate::sandboxes::meminfo_kib("MemTotal").unwrap_or(0) / 1024 / 2;
    let disk_mib = crate::sandboxes::free_bytes(state_dir).unwrap_or(0) >> 20;
    (vcpus, mem_mib, disk_mib)
}

/// The disk this host offers sandboxes as of now: what is free in the state directory
/// plus what its sandboxes (and creates on their way) were given, since placement
/// subtracts those from the offer. So the free disk placement sees follows the disk
/// (snapshots, templates and other files take from it), not the figure at start.
fn disk_offer_mib(catalog: &Catalog, state_dir: &Path, host: &str) -> Option<u64> {
    let free = crate::sandboxes::free_bytes(state_dir).ok()? >> 20;
    let given = catalog.host(host).ok()??.allocated.disk_mib;
    Some(free.saturating_add(given))
}

/// Registers this host and heartbeats until the process ends, with its disk offer
/// measured again each time. A host an operator set draining stays so (its heartbeat
/// says it).
pub async fn heartbeat(manager: Arc<Manager>, info: HostInfo, state_dir: std::path::PathBuf) {
    let catalog: &Catalog = &manager.catalog;
    let mut state = String::new();
    let mut disk_mib = info.disk_mib;
    loop {
        let warm = manager.warm_counts();
        let beat = if state.is_empty() {
            catalog
                .register_host(&info)
                .and_then(|()| catalog.heartbeat(&info.id, &warm, disk_mib))
        } else {
            catalog.heartbeat(&info.id, &warm, disk_mib)
        };
        match beat {
            Ok(now) => {
                if now != state {
                    info!(host = %info.id, state = %now, "host state");
                    state = now;
                }
                if catalog.is_shared() {
                    // Pools set through other hosts, and this host's part of each as
                    // hosts come and go.
                    if let Err(e) = tokio::task::block_in_place(|| manager.sync_warm_pools()) {
                        warn!(host = %info.id, error = %e.message, "syncing the warm pools");
                    }
                }
            }
            Err(e) => {
                warn!(host = %info.id, error = %e, "heartbeat failed");
                // Registered again next time: an operator may have removed the row.
                state.clear();
            }
        }
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        if let Some(now) =
            tokio::task::block_in_place(|| disk_offer_mib(catalog, &state_dir, &info.id))
        {
            disk_mib = now;
        }
    }
}
