//! What the bench commands share: flags, percentiles, a settled warm pool.

use std::time::Duration;

/// The value of `--name N` in `args`, or `default`.
pub fn flag(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0 to 1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// How long a settled pool's VMs are left before a measurement: their guests' first
/// moments (under TCG, translated afresh) are over.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Waits until the warm pool at `pool` (its `/warm-pool` URL, read with the
/// operator's key) holds at least `size` ready VMs with none restoring (under TCG a
/// restore takes a core), then [`SETTLE`]: a measurement on a settled host.
pub async fn settle_pool(
    http: &reqwest::Client,
    pool: &str,
    operator: &str,
    size: u64,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let v: serde_json::Value = http
            .get(pool)
            .header("X-API-Key", operator)
            .send()
            .await?
            .json()
            .await?;
        if v["ready"].as_u64().unwrap_or(0) >= size && v["warming"].as_u64().unwrap_or(0) == 0 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the warm pool never filled: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(())
}
