//! Observability: resource samples of running sandboxes over time, their logs, a team's
//! summary, and the daemon's Prometheus metrics.
//!
//! A sampler asks every running sandbox's agent for its counters every
//! [`SAMPLE_EVERY`] and keeps the last [`SAMPLES_KEPT`] per sandbox in memory (an hour):
//! CPU from tick deltas, memory, disk, network, tasks, and the CPU its QEMU process used
//! on the host.

use super::Manager;
use crate::error::ApiError;
use crate::model::*;
use agent_protocol::GuestMetrics;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// How often running sandboxes are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept per sandbox.
const SAMPLES_KEPT: usize = 720;
/// Console output a log read returns at most.
const CONSOLE_TAIL: usize = 64 * 1024;
/// Most bytes of console log a VM keeps (plus half as much rotated out): a guest that
/// floods its serial console costs the host no more (the run dir is memory).
pub const CONSOLE_MAX: u64 = 1024 * 1024;
/// How often console logs are checked against [`CONSOLE_MAX`].
const CONSOLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// One resource sample.
pub type Sample = api_model::MetricSample;

/// Samples per sandbox, with the counters of the last one (for deltas).
#[derive(Default)]
pub(super) struct Samples {
    by_sandbox: std::sync::Mutex<HashMap<String, History>>,
}

#[derive(Default)]
struct History {
    samples: VecDeque<Sample>,
    last: Option<(GuestMetrics, u64, std::time::Instant)>,
}

/// CPU time (user + system) of a host process, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

impl Samples {
    fn record(&self, id: &str, m: GuestMetrics, qemu_ticks: u64) -> Sample {
        let now = std::time::Instant::now();
        let mut all = self.by_sandbox.lock().unwrap();
        let h = all.entry(id.to_string()).or_default();
        let (cpu_used_pct, host_cpu_pct) = match &h.last {
            Some((prev, prev_qemu, at)) => {
                let total = m.cpu_total_ticks.saturating_sub(prev.cpu_total_ticks);
                let idle = m.cpu_idle_ticks.saturating_sub(prev.cpu_idle_ticks);
                let guest = if total > 0 {
                    100.0 * total.saturating_sub(idle) as f64 / total as f64
                } else {
                    0.0
                };
                let secs = now.duration_since(*at).as_secs_f64().max(0.001);
                let host = 100.0 * qemu_ticks.saturating_sub(*prev_qemu) as f64
                    / ticks_per_second()
                    / secs;
                (guest, host)
            }
            None => (0.0, 0.0),
        };
        let sample = Sample {
            timestamp: chrono::Utc::now().timestamp(),
            cpu_used_pct: (cpu_used_pct * 10.0).round() / 10.0,
            cpu_count: m.cpus,
            mem_used_mib: m.mem_total_kib.saturating_sub(m.mem_available_kib) / 1024,
            mem_total_mib: m.mem_total_kib / 1024,
            disk_used_bytes: m.disk_used_bytes,
            disk_total_bytes: m.disk_total_bytes,
            net_rx_bytes: m.net_rx_bytes,
            net_tx_bytes: m.net_tx_bytes,
            tasks: m.tasks,
            host_cpu_pct: (host_cpu_pct * 100.0).round() / 100.0,
        };
        h.last = Some((m, qemu_ticks, now));
        if h.samples.len() == SAMPLES_KEPT {
            h.samples.pop_front();
        }
        h.samples.push_back(sample.clone());
        sample
    }

    fn between(&self, id: &str, start: i64, end: i64) -> Vec<Sample> {
        self.by_sandbox
            .lock()
            .unwrap()
            .get(id)
            .map(|h| {
                h.samples
                    .iter()
                    .filter(|s| s.timestamp >= start && s.timestamp <= end)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn forget_except(&self, live: &[String]) {
        self.by_sandbox
            .lock()
            .unwrap()
            .retain(|id, _| live.contains(id));
    }
}

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// ISO 8601, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `console` (the VM's boot console), `lifecycle` (its events), `diagnostic`.
    pub source: String,
    pub text: String,
}

impl Manager {
    /// Takes one sample of a running sandbox, if it runs.
    async fn sample(&self, id: &str) -> Option<Sample> {
        let (agent, pid) = {
            let slot = self.slot(id);
            // A sandbox in the middle of a lifecycle operation (a pause, a snapshot) is
            // skipped this round rather than holding up every other sample.
            let vm = slot.try_lock().ok()?;
            let vm = vm.as_ref()?;
            (vm.agent().clone(), vm.pid())
        };
        let m = tokio::time::timeout(Duration::from_secs(2), agent.metrics())
            .await
            .ok()?
            .ok()?;
        let qemu = pid.and_then(process_ticks).unwrap_or(0);
        Some(self.samples.record(id, m, qemu))
    }

    /// Keeps every sandbox's console log under [`CONSOLE_MAX`], checking each second.
    /// A VM busy in a lifecycle operation is checked next time. Runs until the process
    /// ends.
    pub async fn cap_consoles(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CONSOLE_CHECK_EVERY).await;
            for (id, slot) in self.all_slots() {
                let Ok(vm) = slot.try_lock() else { continue };
                if let Some(vm) = vm.as_ref() {
                    match vm.cap_console(CONSOLE_MAX) {
                        Ok(true) => tracing::debug!(sandbox = %id, "console log rotated"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(sandbox = %id, error = %e, "capping the console log")
                        }
                    }
                }
            }
        }
    }

    /// Samples every running sandbox every [`SAMPLE_EVERY`]. Runs until the process ends.
    pub async fn sample_metrics(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let running: Vec<String> = match self.catalog.sandboxes_in(&["active"]) {
                Ok(all) => all.into_iter().map(|r| r.id).collect(),
                Err(_) => continue,
            };
            for id in &running {
                self.sample(id).await;
            }
            self.samples.forget_except(&running);
        }
    }

    /// A sandbox's samples between `start` and `end` (unix seconds; default the last
    /// hour). A running sandbox with none yet is sampled now.
    pub async fn metrics(
        &self,
        team: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<Sample>, ApiError> {
        let r = self.owned(team, id)?;
        let now = chrono::Utc::now().timestamp();
        let (start, end) = (start.unwrap_or(now - 3600), end.unwrap_or(now));
        if start > end {
            return Err(ApiError::bad_request(format!(
                "start {start} is after end {end}; send start <= end (unix seconds)"
            )));
        }
        let mut samples = self.samples.between(id, start, end);
        if samples.is_empty() && r.state == InternalState::Active && end >= now - 1 {
            samples.extend(self.sample(id).await);
        }
        Ok(samples)
    }

    /// A sandbox's logs: its boot console (while a VM runs), its lifecycle events, and
    /// the diagnostic of a failure.
    pub async fn logs(&self, team: &str, id: &str) -> Result<Vec<LogLine>, ApiError> {
        let r = self.owned(team, id)?;
        let mut lines = Vec::new();
        for e in self.catalog.events(id, 0, 10_000)? {
            lines.push(LogLine {
                time: Some(e.at.clone()),
                source: "lifecycle".into(),
                text: format!("{} {}", e.kind, e.data),
            });
        }
        if let Some(d) = &r.diagnostic {
            lines.push(LogLine {
                time: None,
                source: "diagnostic".into(),
                text: format!("{}: {} (what to do: {})", d.code, d.message, d.action),
            });
        }
        let console = {
            let slot = self.slot(id);
            // Bounded: a long operation (a snapshot to S3) must not hold up a log read.
            let tail = match tokio::time::timeout(Duration::from_secs(2), slot.lock()).await {
                Ok(vm) => vm.as_ref().map(|vm| vm.console_tail(CONSOLE_TAIL)),
                Err(_) => None,
            };
            tail
        };
        for line in console.unwrap_or_default().lines() {
            lines.push(LogLine {
                time: None,
                source: "console".into(),
                text: line.to_string(),
            });
        }
        Ok(lines)
    }

    /// What a team has, what limits it, whether the endpoints answer, and what to do.
    pub async fn summary(&self, team: &str) -> Result<serde_json::Value, ApiError> {
        // Counted in SQL over the state index: a team's history is not parsed.
        let states = self.catalog.state_counts(Some(team))?;
        let count = |public: &str| {
            states
                .iter()
                .filter(|(s, _)| {
                    serde_json::from_value::<InternalState>(serde_json::json!(s))
                        .is_ok_and(|s| s.public() == public)
                })
                .map(|(_, n)| *n as usize)
                .sum::<usize>()
        };
        let limits = self.limits(team)?;
        let usage = self.usage(team)?;
        let live = usage.sandboxes as usize;
        let store_ok = match storage::ObjectStore::exists(self.store(), "health-check").await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        let templates = self.catalog.templates(Some(team))?;
        let failed_builds = templates
            .iter()
            .filter(|t| t.status == api_model::TemplateStatus::Failed)
            .count();
        let mut suggestions = Vec::new();
        let checks = usage.checks(&limits);
        for (name, used, limit) in checks {
            if used.saturating_mul(10) >= limit.saturating_mul(8) {
                suggestions.push(format!(
                    "{name}: {used} of {limit} used: free some (delete idle sandboxes, old snapshots, volumes or templates), or ask the operator to raise it (`admin team quota TEAM --set {name}=N`)"
                ));
            }
        }
        if count("error") > 0 {
            suggestions.push(format!(
                "{} sandboxes failed: read their diagnostic (GET /sandboxes/ID) and delete them",
                count("error")
            ));
        }
        if count("paused") > 0 {
            suggestions.push(format!(
                "{} sandboxes are paused: resume, hibernate (frees this worker's disk) or delete them",
                count("paused")
            ));
        }
        if failed_builds > 0 {
            suggestions.push(format!(
                "{failed_builds} template builds failed: see their error (GET /templates/ID) and build again"
            ));
        }
        let network_warning = self.network.settings.warning();
        if let Some(w) = &network_warning {
            suggestions.push(w.clone());
        }
        for (template, _) in self.catalog.warm_pools::<super::warm::PoolConfig>()? {
            let failing = self
                .warm_status_any(&template)
                .filter(|s| s.target > 0)
                .and_then(|s| s.last_error);
            if let Some(e) = failing {
                suggestions.push(format!(
                    "the {template} warm pool cannot refill ({}): GET /templates/{template}/warm-pool shows its last error",
                    e.message
                ));
            }
        }
        if let Err(e) = &store_ok {
            suggestions.push(format!("the snapshot store does not answer ({e}): snapshots, hibernate and templates will fail until it does"));
        }
        Ok(serde_json::json!({
            "teamID": team,
            "usage": {
                "live": live,
                "running": count("running"),
                "paused": count("paused"),
                "starting": count("starting"),
                "error": count("error"),
                "templates": templates.len(),
                "quota": usage,
            },
            "quotaChecks": checks
                .iter()
                .map(|(name, used, limit)| serde_json::json!({
                    "name": name, "used": used, "limit": limit, "ok": used < limit,
                }))
                .chain(std::iter::once(serde_json::json!({
                    "name": "createsPerMinute",
                    "limit": limits.creates_per_minute,
                    "burst": limits.create_burst,
                    "ok": limits.creates_per_minute > 0,
                })))
                .collect::<Vec<_>>(),
            "limits": limits,
            "endpoints": [
                { "name": "control API", "status": "ok" },
                { "name": "data plane", "url": self.edge_url, "status": "ok" },
                { "name": "previews", "url": format!("http://{}", self.preview_domain), "status": "ok" },
                { "name": "snapshot store", "status": if store_ok.is_ok() { "ok" } else { "unavailable" },
                  "detail": store_ok.err() },
            ],
            "network": {
                "mode": if network_warning.is_some() { "user" } else { "isolated" },
                "warning": network_warning,
            },
            "suggestedActions": suggestions,
        }))
    }

    /// The daemon's gauges in Prometheus' text format.
    pub fn prometheus(&self) -> Result<String, ApiError> {
        use std::fmt::Write;
        let mut out = String::new();
        let counts = self.catalog.state_counts(None)?;
        let _ = writeln!(out, "# HELP nullspace_sandboxes Sandboxes on this host by public state.\n# TYPE nullspace_sandboxes gauge");
        for state in ["starting", "running", "paused", "error", "deleted"] {
            let n: u64 = counts
                .iter()
                .filter(|(s, _)| {
                    serde_json::from_value::<InternalState>(serde_json::json!(s))
                        .is_ok_and(|s| s.public() == state)
                })
                .map(|(_, n)| n)
                .sum();
            let _ = writeln!(out, "nullspace_sandboxes{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP nullspace_timeout_sweep_scan_seconds The timeout sweeper's last read of the catalog.\n# TYPE nullspace_timeout_sweep_scan_seconds gauge\nnullspace_timeout_sweep_scan_seconds {:.6}",
            self.sweep_scan_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "# HELP nullspace_warm_pool_ready Ready instances per template warm pool.\n# TYPE nullspace_warm_pool_ready gauge");
        let _ = writeln!(out, "# HELP nullspace_warm_pool_checkouts_total Creates that got a warm instance.\n# TYPE nullspace_warm_pool_checkouts_total counter");
        for (template, _) in self.catalog.warm_pools::<super::warm::PoolConfig>()? {
            if let Some(s) = self.warm_status_any(&template) {
                let _ = writeln!(
                    out,
                    "nullspace_warm_pool_ready{{template=\"{template}\"}} {}",
                    s.ready
                );
                let _ = writeln!(
                    out,
                    "nullspace_warm_pool_checkouts_total{{template=\"{template}\"}} {}",
                    s.checkouts
                );
            }
        }
        let building = self
            .catalog
            .templates(None)?
            .iter()
            .filter(|t| t.status == api_model::TemplateStatus::Building)
            .count();
        let _ = writeln!(out, "# HELP nullspace_template_builds Template builds running or queued.\n# TYPE nullspace_template_builds gauge\nnullspace_template_builds {building}");
        let samples = self.samples.by_sandbox.lock().unwrap();
        let _ = writeln!(out, "# HELP nullspace_sandbox_host_cpu_percent CPU of a sandbox's VM process on the host, percent of one core (last sample).\n# TYPE nullspace_sandbox_host_cpu_percent gauge");
        for (id, h) in samples.iter() {
            if let Some(s) = h.samples.back() {
                let _ = writeln!(
                    out,
                    "nullspace_sandbox_host_cpu_percent{{sandbox=\"{id}\"}} {}",
                    s.host_cpu_pct
                );
            }
        }
        Ok(out)
    }
}
