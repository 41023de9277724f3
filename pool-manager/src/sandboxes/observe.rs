//! Observability: resource samples of running sandboxes over time, their logs, a team's
//! summary, and the daemon's Prometheus metrics.
//!
//! A sampler asks every running sandbox's agent for its counters every
//! [`SAMPLE_EVERY`]: CPU from tick deltas, memory, disk, network, tasks, and the CPU its
//! QEMU process used on the host. Samples are kept in memory for the sandbox's whole life
//! (while it runs or is paused on this host): the last hour as taken, older ones merged
//! into buckets whose width doubles whenever [`OLDER_KEPT`] of them are held, so a
//! sandbox's history costs a bounded amount of memory however long it lives.

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
/// Samples kept as taken per sandbox: the last hour.
const RECENT_KEPT: usize = 720;
/// Merged buckets of older samples kept per sandbox; at most this many, however long the
/// sandbox lives (their width doubles instead).
const OLDER_KEPT: usize = 720;
/// Width of an older bucket before any doubling, in seconds.
const OLDER_BUCKET_S: i64 = 60;
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
    /// The last [`RECENT_KEPT`] samples, as taken.
    recent: VecDeque<Sample>,
    /// Older samples merged into buckets, oldest first.
    older: Coarse,
    last: Option<(GuestMetrics, u64, std::time::Instant)>,
}

/// Older samples merged into buckets of `width_s` seconds: percentages are averaged,
/// gauges and counters take the bucket's last value, the timestamp is the bucket's start.
#[derive(Debug, Default)]
struct Coarse {
    buckets: Vec<(Sample, u32)>,
    width_s: i64,
}

impl Coarse {
    fn bucket_of(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.width_s)
    }

    /// Adds one sample that aged out of the recent window.
    fn push(&mut self, s: Sample) {
        if self.width_s == 0 {
            self.width_s = OLDER_BUCKET_S;
        }
        let start = self.bucket_of(s.timestamp);
        match self.buckets.last_mut() {
            Some((b, n)) if b.timestamp == start => merge_into(b, n, &s, 1),
            _ => {
                let mut b = s;
                b.timestamp = start;
                self.buckets.push((b, 1));
            }
        }
        if self.buckets.len() > OLDER_KEPT {
            self.coarsen();
        }
    }

    /// Doubles the bucket width, merging neighbours.
    fn coarsen(&mut self) {
        self.width_s *= 2;
        let mut merged: Vec<(Sample, u32)> = Vec::with_capacity(self.buckets.len() / 2 + 1);
        for (mut b, n) in std::mem::take(&mut self.buckets) {
            b.timestamp = self.bucket_of(b.timestamp);
            match merged.last_mut() {
                Some((m, k)) if m.timestamp == b.timestamp => merge_into(m, k, &b, n),
                _ => merged.push((b, n)),
            }
        }
        self.buckets = merged;
    }
}

/// Folds `s` (standing for `n` samples) into bucket `b` (standing for `k`).
fn merge_into(b: &mut Sample, k: &mut u32, s: &Sample, n: u32) {
    let (kf, nf) = (f64::from(*k), f64::from(n));
    let mean = |a: f64, x: f64| ((a * kf + x * nf) / (kf + nf) * 100.0).round() / 100.0;
    let start = b.timestamp;
    let cpu = mean(b.cpu_used_pct, s.cpu_used_pct);
    let host = mean(b.host_cpu_pct, s.host_cpu_pct);
    *b = s.clone();
    b.timestamp = start;
    b.cpu_used_pct = cpu;
    b.host_cpu_pct = host;
    *k += n;
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
        if h.recent.len() == RECENT_KEPT {
            if let Some(aged) = h.recent.pop_front() {
                h.older.push(aged);
            }
        }
        h.recent.push_back(sample.clone());
        sample
    }

    fn between(&self, id: &str, start: i64, end: i64) -> Vec<Sample> {
        self.by_sandbox
            .lock()
            .unwrap()
            .get(id)
            .map(|h| {
                h.older
                    .buckets
                    .iter()
                    .map(|(s, _)| s)
                    .chain(h.recent.iter())
                    .filter(|s| s.timestamp >= start && s.timestamp <= end)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sandbox's VM is gone (paused): the next sample after a resume starts its
    /// deltas afresh (a new QEMU process counts from zero).
    fn stopped(&self, id: &str) {
        if let Some(h) = self.by_sandbox.lock().unwrap().get_mut(id) {
            h.last = None;
        }
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
    /// `console` (the VM's boot console), `lifecycle` (its events), `diagnostic`,
    /// `start` (the template's start command), `process` (a background command).
    pub source: String,
    /// The process a `start` or `process` line came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `stdout` or `stderr`, for a `start` or `process` line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    pub text: String,
}

/// Most lines a log page has.
pub const MAX_LOG_LINES: usize = 1000;
/// Background processes whose output a log read gathers, newest first.
const PROCESSES_LOGGED: usize = 16;
/// Lines a log read keeps of each process's output (its last ones): a guest printing
/// newlines must not make one read cost the host more than a few MiB.
const LINES_PER_PROCESS: usize = 200;
/// The longest log line kept, in bytes (the rest is cut).
const MAX_LINE_BYTES: usize = 2048;

/// `text` cut to at most [`MAX_LINE_BYTES`], on a character boundary.
fn capped(mut text: String) -> String {
    if text.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Splits kept process output into lines (a piece may end mid-line: the rest comes in
/// the next piece of the same stream), keeping the last [`LINES_PER_PROCESS`], each cut
/// to [`MAX_LINE_BYTES`].
fn process_lines(
    pid: u32,
    source: &str,
    pieces: Vec<agent_protocol::OutputPiece>,
    out: &mut Vec<LogLine>,
) {
    let mut partial: HashMap<String, (String, u64)> = HashMap::new();
    let mut kept: VecDeque<LogLine> = VecDeque::new();
    let emit = |stream: &str, text: String, at_ms: u64, kept: &mut VecDeque<LogLine>| {
        if kept.len() == LINES_PER_PROCESS {
            kept.pop_front();
        }
        kept.push_back(LogLine {
            time: Some(iso8601(at_ms as i64)),
            source: source.to_string(),
            pid: Some(pid),
            stream: Some(stream.to_string()),
            text: capped(text),
        });
    };
    for p in pieces {
        let (buf, at) = partial
            .entry(p.stream.clone())
            .or_insert_with(|| (String::new(), p.at_ms));
        if buf.is_empty() {
            *at = p.at_ms;
        }
        buf.push_str(&p.text);
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            emit(
                &p.stream,
                line.trim_end_matches(['\n', '\r']).to_string(),
                *at,
                &mut kept,
            );
            *at = p.at_ms;
        }
        // A line with no end yet is bounded too.
        if buf.len() > MAX_LINE_BYTES {
            let line = std::mem::take(buf);
            emit(&p.stream, line, *at, &mut kept);
        }
    }
    for (stream, (rest, at)) in partial {
        if !rest.is_empty() {
            emit(&stream, rest, at, &mut kept);
        }
    }
    out.extend(kept);
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
            // Samples outlive a pause (the history is the sandbox's life, not its VM's)
            // and go with the sandbox.
            let kept: Vec<(String, InternalState)> = match self
                .catalog
                .sandboxes_in(&["new", "creating", "active", "stopped"])
            {
                Ok(all) => all.into_iter().map(|r| (r.id, r.state)).collect(),
                Err(_) => continue,
            };
            for (id, state) in &kept {
                if *state == InternalState::Active {
                    self.sample(id).await;
                } else {
                    self.samples.stopped(id);
                }
            }
            let ids: Vec<String> = kept.into_iter().map(|(id, _)| id).collect();
            self.samples.forget_except(&ids);
        }
    }

    /// A sandbox's samples between `start` and `end` (unix seconds; default from its
    /// creation to now). A running sandbox with none yet is sampled now.
    pub async fn metrics(
        &self,
        team: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<Sample>, ApiError> {
        let r = self.owned(team, id)?;
        let now = chrono::Utc::now().timestamp();
        let (start, end) = (
            start.unwrap_or(r.created_at_ms.div_euclid(1000)),
            end.unwrap_or(now),
        );
        if start > end {
            return Err(ApiError::bad_request(format!(
                "start {start} is after end {end}; send start <= end (unix seconds)"
            )));
        }
        let mut samples = self.samples.between(id, start, end);
        // Only a range that holds "now" can be answered with a sample taken now.
        if samples.is_empty() && r.state == InternalState::Active && start <= now && end >= now - 1
        {
            samples.extend(self.sample(id).await);
        }
        Ok(samples)
    }

    /// One page of a sandbox's logs from line `offset`: its lifecycle events, the
    /// diagnostic of a failure, and while a VM runs its boot console and the output of
    /// the template's start command and its background commands (the last 128 KiB of
    /// each, of the newest 16). Also the offset of the next page, if there is more.
    pub async fn logs(
        &self,
        team: &str,
        id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<LogLine>, Option<usize>), ApiError> {
        let mut all = self.all_logs(team, id).await?;
        let limit = limit.clamp(1, MAX_LOG_LINES);
        let next = (all.len() > offset.saturating_add(limit)).then(|| offset + limit);
        let page = all.drain(offset.min(all.len())..).take(limit).collect();
        Ok((page, next))
    }

    /// The output of the start command and background commands of a running sandbox.
    async fn application_logs(&self, r: &SandboxRecord) -> Vec<LogLine> {
        let agent = {
            let slot = self.slot(&r.id);
            let Ok(vm) = tokio::time::timeout(Duration::from_secs(2), slot.lock()).await else {
                return Vec::new();
            };
            match vm.as_ref() {
                Some(vm) => vm.agent().clone(),
                None => return Vec::new(),
            }
        };
        let start_cmd = self
            .catalog
            .template(Some(&r.team_id), &r.template_id)
            .ok()
            .flatten()
            .and_then(|t| t.request.start_cmd);
        let Ok(Ok(procs)) = tokio::time::timeout(Duration::from_secs(2), agent.processes()).await
        else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        let background = procs.into_iter().filter(|p| p.background);
        let newest: Vec<_> = background.rev().take(PROCESSES_LOGGED).collect();
        for p in newest.into_iter().rev() {
            let source = match (&p.command, &start_cmd) {
                (agent_protocol::Command::Shell(c), Some(s)) if c == s => "start",
                _ => "process",
            };
            // An agent that predates kept output has none to give.
            if let Ok(Ok(pieces)) =
                tokio::time::timeout(Duration::from_secs(2), agent.process_output(p.pid)).await
            {
                process_lines(p.pid, source, pieces, &mut lines);
            }
        }
        lines
    }

    async fn all_logs(&self, team: &str, id: &str) -> Result<Vec<LogLine>, ApiError> {
        let r = self.owned(team, id)?;
        let mut lines = Vec::new();
        for e in self.catalog.events(id, 0, 10_000)? {
            lines.push(LogLine {
                time: Some(e.at.clone()),
                source: "lifecycle".into(),
                pid: None,
                stream: None,
                text: format!("{} {}", e.kind, e.data),
            });
        }
        if let Some(d) = &r.diagnostic {
            lines.push(LogLine {
                time: None,
                source: "diagnostic".into(),
                pid: None,
                stream: None,
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
                pid: None,
                stream: None,
                text: line.to_string(),
            });
        }
        if r.state == InternalState::Active {
            lines.extend(self.application_logs(&r).await);
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
            // Only a sandbox whose VM runs now (a paused one keeps its history only).
            if let (Some(s), Some(_)) = (h.recent.back(), &h.last) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: i64, cpu: f64, tasks: u32) -> Sample {
        Sample {
            timestamp: t,
            cpu_used_pct: cpu,
            cpu_count: 1,
            mem_used_mib: 1,
            mem_total_mib: 2,
            disk_used_bytes: 3,
            disk_total_bytes: 4,
            net_rx_bytes: t as u64,
            net_tx_bytes: 0,
            tasks,
            host_cpu_pct: cpu / 10.0,
        }
    }

    #[test]
    fn a_flood_of_process_output_makes_a_bounded_number_of_short_lines() {
        let piece = |text: String| agent_protocol::OutputPiece {
            stream: "stdout".into(),
            text,
            at_ms: 1,
        };
        let mut out = Vec::new();
        let flood = vec![
            piece("\n".repeat(100_000)),
            piece("x".repeat(100_000)),
            piece("tail\n".into()),
        ];
        process_lines(7, "process", flood, &mut out);
        assert_eq!(out.len(), LINES_PER_PROCESS);
        assert!(out.iter().all(|l| l.text.len() <= MAX_LINE_BYTES + 3));
        assert_eq!(out.last().unwrap().text, "tail");
        let mut out = Vec::new();
        process_lines(
            7,
            "start",
            vec![piece("a\nb".into()), piece("c\n".into())],
            &mut out,
        );
        let texts: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["a", "bc"]);
    }

    #[test]
    fn older_samples_merge_into_buckets_that_keep_means_and_last_values() {
        let mut c = Coarse::default();
        // Two full minutes at 5 s: 0..60 at 10 %, 60..120 at 30 %.
        for i in 0..24 {
            let t = 600 + i * 5;
            c.push(sample(t, if t < 660 { 10.0 } else { 30.0 }, i as u32));
        }
        assert_eq!(c.buckets.len(), 2);
        let (first, n) = &c.buckets[0];
        assert_eq!((first.timestamp, *n, first.cpu_used_pct), (600, 12, 10.0));
        let (second, _) = &c.buckets[1];
        assert_eq!((second.timestamp, second.cpu_used_pct), (660, 30.0));
        assert_eq!(
            (second.tasks, second.net_rx_bytes),
            (23, 715),
            "last values"
        );
    }

    #[test]
    fn a_long_life_stays_bounded_and_covers_the_whole_range() {
        let mut c = Coarse::default();
        // 30 days at one sample each 5 s.
        let end = 30 * 24 * 3600;
        for t in (0..end).step_by(5) {
            c.push(sample(t, 50.0, 1));
        }
        assert!(c.buckets.len() <= OLDER_KEPT, "{}", c.buckets.len());
        assert!(c.buckets.len() > OLDER_KEPT / 2, "{}", c.buckets.len());
        assert_eq!(
            c.buckets[0].0.timestamp, 0,
            "the first sample's bucket is kept"
        );
        assert!(c.buckets.last().unwrap().0.timestamp > end - 2 * c.width_s);
        assert!(c.buckets.iter().all(|(s, _)| s.cpu_used_pct == 50.0));
        let total: u32 = c.buckets.iter().map(|(_, n)| n).sum();
        assert_eq!(total as i64, end / 5, "every sample counted once");
    }

    #[test]
    fn samples_past_the_recent_window_are_still_served() {
        let samples = Samples::default();
        {
            let mut all = samples.by_sandbox.lock().unwrap();
            let h = all.entry("s".into()).or_default();
            for t in (0..2 * 3600).step_by(5) {
                if h.recent.len() == RECENT_KEPT {
                    let aged = h.recent.pop_front().unwrap();
                    h.older.push(aged);
                }
                h.recent.push_back(sample(t, 1.0, 1));
            }
        }
        let all = samples.between("s", 0, 2 * 3600);
        assert_eq!(all[0].timestamp, 0);
        assert_eq!(
            all.len(),
            60 + RECENT_KEPT,
            "an hour of minutes, an hour as taken"
        );
        assert!(all.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
        assert_eq!(samples.between("s", 7000, 7100).len(), 21);
    }
}
