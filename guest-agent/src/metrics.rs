//! The guest's resource counters, read from /proc and statvfs.

use agent_protocol::GuestMetrics;

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Counters now. Missing sources read as zero: metrics never fail a sandbox.
pub fn read() -> GuestMetrics {
    let mut m = GuestMetrics::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) {
            let ticks: Vec<u64> = cpu
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is in user).
            m.cpu_total_ticks = ticks.iter().take(8).sum();
            m.cpu_idle_ticks =
                ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        }
        m.cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count() as u32;
    }
    if let Ok(mem) = std::fs::read_to_string("/proc/meminfo") {
        m.mem_total_kib = field(&mem, "MemTotal:");
        m.mem_available_kib = field(&mem, "MemAvailable:");
    }
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c"/".as_ptr(), &mut s) == 0 {
            let frsize = s.f_frsize as u64;
            m.disk_total_bytes = s.f_blocks as u64 * frsize;
            m.disk_used_bytes = (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * frsize;
        }
    }
    if let Ok(dev) = std::fs::read_to_string("/proc/net/dev") {
        for line in dev.lines().skip(2) {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() == "lo" {
                continue;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            m.net_rx_bytes += v.first().copied().unwrap_or(0);
            m.net_tx_bytes += v.get(8).copied().unwrap_or(0);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        m.tasks = dir
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .count() as u32;
    }
    m
}
