//! Custom template builds: a base template plus steps (packages, files, env, commands),
//! a start command and a ready check, run in a VM and ended as a stored snapshot of the
//! ready VM, addressable as `tpl-…` (or the template's name).
//!
//! **The queue.** A build VM is as heavy as any sandbox, so a host runs
//! [`BUILD_SLOTS`] build at a time; a team may have as many running or queued as its
//! `builds` quota says (2 by default), and as many templates as its `templates` quota. Waiting builds get the slot round-robin by team ([`BuildQueue`]): the free
//! slot goes to the waiting team served longest ago, and within a team in arrival
//! order, so one team's queued builds never make another team's build wait behind all
//! of them. A queued build is `building` with its steps `pending`; its log's first line
//! gives its place in the queue. Deleting a build (queued or running) takes it out of
//! the queue and hands its slot on.
//!
//! **The deadline.** Once it has the slot (time in the queue does not count), a build
//! must have its VM ready within [`BUILD_DEADLINE`], whatever its steps' own timeouts
//! add up to (64 steps of up to an hour each could otherwise hold the slot for days): a
//! step's timeout is cut to the time left, and past the deadline the build VM is killed
//! and the template fails saying so (the phase it was in, its output tail where there
//! is one, and what to do). Snapshotting and storing the ready VM is host work and is
//! not cut short: a half-stored template would leak.
//!
//! **The step cache.** Each step's result is cached on this host as a snapshot of the
//! build VM in `build-cache/<team>/<key>`, the key covering the team, the base snapshot
//! and every step up to it: a build whose first steps match an earlier build of the
//! same team restores the newest matching snapshot and runs only the rest (one team's
//! cache hit never reveals another team's steps). The cache keeps [`CACHE_ENTRIES`]
//! entries over all teams, oldest used going first; it is pruned before every step
//! snapshot is written and after every build, never removing an entry a running build
//! stands on (restored from) or is writing. Entries from before caches were per team
//! are pruned. A step is not cached when the disk lacks room for its snapshot and the
//! template's own after it (the build log says so): the cache never takes the room the
//! build it serves needs; the build goes on.
//!
//! **The log.** The build log goes to the catalog line by line as output arrives;
//! callers read it in pages that wait for new lines (`GET /templates/{id}/logs?after=&
//! wait=`), which the SDKs turn into a stream. A build's command output stored there is
//! capped at [`MAX_LOG_BYTES`] ([`LogBudget`]): past it one line says the log was
//! truncated and no more output is stored (the build's own status lines still are, so
//! the log says how the build ended, and a failure's `outputTail` keeps the last lines).

use super::{now_ms, Manager};
use crate::error::ApiError;
use crate::model::*;
use crate::templates::BUILTIN;
use agent_client::{AgentClient, Process, ProcessEvent};
use agent_protocol::{Command, ExecRequest, DEFAULT_CWD, DEFAULT_USER};
use api_model::{
    BuildFailure, BuildLogPage, StepAction, StepStatus, StepView, TemplateBuildRequest,
    TemplateStatus, TemplateView, ValidStep, MAX_LOG_PAGE, MAX_LOG_WAIT_S,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use storage::snapshots::{self as stored, Kind, NewSnapshot};
use tokio::sync::oneshot;
use tracing::{info, warn, Instrument};
use vmm::{QemuVm, RestoreOptions, Snapshot};

/// Step snapshots kept in the build cache, all teams together (oldest used go first).
const CACHE_ENTRIES: usize = 16;
/// Builds that run at once on this host (a build VM is as heavy as any sandbox).
const BUILD_SLOTS: usize = 1;
/// The longest a build may take from getting its slot to a ready VM: past it the build
/// VM is killed and the template fails.
const BUILD_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// How long past [`BUILD_DEADLINE`] the whole-build net waits: a step the deadline
/// cuts short ends on its own clock first and reports its output tail.
const DEADLINE_SLACK: Duration = Duration::from_secs(2);
/// Bytes of command output one build's log stores in the catalog.
const MAX_LOG_BYTES: u64 = 4 << 20;
/// Output lines a failure reports.
const TAIL_LINES: usize = 30;
/// How often a running command's output is written to the log.
const LOG_FLUSH: Duration = Duration::from_millis(200);
/// Pause between ready checks.
const READY_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two ready checks.
const READY_RETRY_CAP: Duration = Duration::from_secs(4);
/// Longest one ready check may run.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Output of a ready check kept for the failure message, per channel: the end is what
/// says why, and a check that prints without end must not grow the host's memory.
const READY_OUTPUT_TAIL: usize = 32 * 1024;

/// Locks `m`, also after a panic elsewhere held it: every state kept under these locks
/// stays consistent between statements, and the queue's hand-off must not stop.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds in progress and what waits on their logs.
pub(super) struct Builds {
    /// The host's build slots and the builds waiting for one.
    queue: Mutex<BuildQueue<oneshot::Sender<()>>>,
    /// Running (or queued) builds, to cancel on delete or shutdown.
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Each unfinished build's log budget, by template.
    logs: Mutex<HashMap<String, LogBudget>>,
    /// Step-cache directories each unfinished build stands on or is writing, by
    /// template: never pruned. Pruning holds this lock, so a claim and a prune never
    /// interleave.
    cache_claims: Mutex<HashMap<String, Vec<PathBuf>>>,
    /// Woken on every log flush and status change.
    activity: tokio::sync::Notify,
}

impl Default for Builds {
    fn default() -> Self {
        Self {
            queue: Mutex::new(BuildQueue::new(BUILD_SLOTS)),
            running: Mutex::default(),
            logs: Mutex::default(),
            cache_claims: Mutex::default(),
            activity: tokio::sync::Notify::new(),
        }
    }
}

/// Where a build stands once it joined the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joined {
    /// It holds a slot and may start now.
    Started,
    /// It waits; position 1 starts next.
    Queued { position: usize },
}

/// A build waiting for a slot.
struct Waiter<T> {
    template: String,
    /// Order of arrival over all teams (ties between teams go to the earliest).
    arrival: u64,
    /// What tells it that it holds a slot now.
    wake: T,
}

/// The host's build slots and the builds waiting for one, served round-robin by team: a
/// free slot goes to the waiting team that was given one longest ago (a team never
/// served, or not since it last had nothing queued or running, first; ties to the
/// earliest arrival), and within a team to its oldest build. `T` wakes a waiter (a
/// oneshot sender in the daemon); the queue itself is plain data.
struct BuildQueue<T> {
    slots: usize,
    /// Builds holding a slot: template → team.
    running: HashMap<String, String>,
    /// Waiting builds by team, oldest first; a team with none has no entry.
    waiting: HashMap<String, VecDeque<Waiter<T>>>,
    arrivals: u64,
    /// The turn at which each team waiting or running was last given a slot.
    served: HashMap<String, u64>,
    turns: u64,
}

impl<T> BuildQueue<T> {
    fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            running: HashMap::new(),
            waiting: HashMap::new(),
            arrivals: 0,
            served: HashMap::new(),
            turns: 0,
        }
    }

    /// Adds a build of `team`: it starts now if a slot is free, else waits and is woken
    /// through `wake` (dropped unused when it starts at once).
    fn join(&mut self, team: &str, template: &str, wake: T) -> Joined {
        self.arrivals += 1;
        self.waiting
            .entry(team.to_string())
            .or_default()
            .push_back(Waiter {
                template: template.to_string(),
                arrival: self.arrivals,
                wake,
            });
        // Slots are only free while nobody waits: this build is the one that starts.
        let started = self.fill();
        if started.iter().any(|(t, _)| t == template) {
            return Joined::Started;
        }
        Joined::Queued {
            position: self.position(template).unwrap_or(1),
        }
    }

    /// Takes a build out, running or waiting (its end, or a cancel). Returns the builds
    /// that hold a slot now, with their wakers.
    fn finish(&mut self, template: &str) -> Vec<(String, T)> {
        if self.running.remove(template).is_none() {
            for queue in self.waiting.values_mut() {
                queue.retain(|w| w.template != template);
            }
            self.waiting.retain(|_, q| !q.is_empty());
        }
        let started = self.fill();
        // A team neither waiting nor running starts afresh when it comes back.
        let (waiting, running) = (&self.waiting, &self.running);
        self.served
            .retain(|team, _| waiting.contains_key(team) || running.values().any(|t| t == team));
        started
    }

    /// Whose turn it is among teams with `served` turns and queues from `heads` on:
    /// the team served longest ago, ties to the earliest arrival.
    fn pick<'a>(
        &'a self,
        served: &HashMap<&str, u64>,
        heads: &HashMap<&str, usize>,
    ) -> Option<&'a str> {
        self.waiting
            .iter()
            .filter_map(|(team, queue)| {
                let head = queue.get(heads.get(team.as_str()).copied().unwrap_or(0))?;
                let last = served.get(team.as_str()).copied().unwrap_or(0);
                Some(((last, head.arrival), team.as_str()))
            })
            .min()
            .map(|(_, team)| team)
    }

    /// Gives free slots to waiting builds, in turn.
    fn fill(&mut self) -> Vec<(String, T)> {
        let mut started = Vec::new();
        while self.running.len() < self.slots {
            let served: HashMap<&str, u64> =
                self.served.iter().map(|(t, n)| (t.as_str(), *n)).collect();
            let Some(team) = self.pick(&served, &HashMap::new()).map(str::to_string) else {
                break;
            };
            let Some(queue) = self.waiting.get_mut(&team) else {
                break;
            };
            let Some(next) = queue.pop_front() else {
                break;
            };
            if queue.is_empty() {
                self.waiting.remove(&team);
            }
            self.turns += 1;
            self.served.insert(team.clone(), self.turns);
            self.running.insert(next.template.clone(), team);
            started.push((next.template, next.wake));
        }
        started
    }

    /// A waiting build's place in the queue (1 starts next) if nobody else joins.
    fn position(&self, template: &str) -> Option<usize> {
        let mut served: HashMap<&str, u64> =
            self.served.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        let mut heads: HashMap<&str, usize> = HashMap::new();
        let mut turn = self.turns;
        for position in 1.. {
            let team = self.pick(&served, &heads)?;
            let head = heads.entry(team).or_insert(0);
            // `pick` only names a team with a build at its head.
            let waiter = self.waiting.get(team)?.get(*head)?;
            if waiter.template == template {
                return Some(position);
            }
            *head += 1;
            turn += 1;
            served.insert(team, turn);
        }
        None
    }
}

/// One build log line: the step (none for the build's own lines), the stream
/// (`stdout`, `stderr` or `build`) and the text.
type LogLine = (Option<u32>, &'static str, String);

/// A build log's cap on stored command output: lines past it are dropped, and one line
/// says so. The build's own lines (`build`: few, each short or bounded) always pass,
/// so the log still says how the build ended.
struct LogBudget {
    cap: u64,
    /// Output bytes stored so far.
    used: u64,
    truncated: bool,
}

impl LogBudget {
    fn new(cap: u64, used: u64) -> Self {
        Self {
            cap,
            used,
            truncated: used > cap,
        }
    }

    /// The lines of `lines` to store.
    fn admit(&mut self, lines: Vec<LogLine>) -> Vec<LogLine> {
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            if line.1 == "build" {
                out.push(line);
                continue;
            }
            if self.truncated {
                continue;
            }
            let n = line.2.len() as u64;
            if self.used + n > self.cap {
                self.truncated = true;
                out.push((
                    line.0,
                    "build",
                    format!(
                        "... log truncated after {} bytes of output (a build's log keeps at most {} MiB); later output is not stored, and a failure's outputTail has the last lines",
                        self.used,
                        self.cap >> 20
                    ),
                ));
                continue;
            }
            self.used += n;
            out.push(line);
        }
        out
    }
}

/// What a build is doing, for the message of a build its deadline stops.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// A [`BuildFailure`] phase: `base`, `step`, `start` or `ready`.
    phase: &'static str,
    step: Option<u32>,
}

/// Ends a build's stay in the queue however its task ends (done, failed, cancelled by
/// a delete or shutdown, even before it first ran): hands its slot (or place) on, and
/// drops its log budget and cache claims.
struct BuildTicket {
    manager: Arc<Manager>,
    template: String,
}

impl Drop for BuildTicket {
    fn drop(&mut self) {
        let builds = &self.manager.builds;
        let started = lock(&builds.queue).finish(&self.template);
        for (template, wake) in started {
            // A waiter that is gone had its ticket take it out of the queue, unless its
            // task is being dropped right now: then its ticket, dropped next, hands
            // this slot on again.
            let _ = wake.send(());
            info!(template, "a queued build has the build slot");
        }
        lock(&builds.logs).remove(&self.template);
        lock(&builds.cache_claims).remove(&self.template);
    }
}

/// A new template ID.
fn new_template_id() -> String {
    format!("tpl-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// A step's one-line description.
fn summary(step: &ValidStep) -> String {
    let s = match &step.action {
        StepAction::Run(cmd) => cmd.lines().next().unwrap_or_default().to_string(),
        StepAction::Packages(p) => p.join(" "),
        StepAction::Files(f) => f
            .iter()
            .map(|(p, _, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        StepAction::Env(e) => e.keys().cloned().collect::<Vec<_>>().join(" "),
    };
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// The cache keys of a build's steps: each covers the team, the base and every step up
/// to it, so no team's build can hit another team's entry.
fn step_keys(team: &str, base_key: &str, request: &TemplateBuildRequest) -> Vec<String> {
    let mut key = hex::encode(Sha256::digest(format!("{team}|{base_key}").as_bytes()));
    request
        .steps
        .iter()
        .map(|step| {
            let step = serde_json::to_string(step).expect("json");
            key = hex::encode(Sha256::digest(format!("{key}|{step}").as_bytes()))[..32].to_string();
            key.clone()
        })
        .collect()
}

/// The directory of a team's step cache under `build-cache`: `t-<team ID>` where the ID
/// is a plain name, else `t=` and a hash of it (never a path a team ID could steer).
/// Anything else there is from before caches were per team.
fn team_cache_name(team: &str) -> String {
    let plain = !team.is_empty()
        && team.len() <= 64
        && team
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("t-{team}")
    } else {
        format!("t={}", &hex::encode(Sha256::digest(team.as_bytes()))[..32])
    }
}

/// Whether a directory under `build-cache` is a team's cache (not a left-over entry
/// from before caches were per team).
fn is_team_cache_name(name: &str) -> bool {
    name.starts_with("t-") || name.starts_with("t=")
}

/// The failure of a build its deadline stopped, at `progress`.
fn deadline_failure(progress: Progress, step_kind: Option<&str>) -> Failed {
    let at = match (progress.phase, progress.step) {
        ("step", Some(i)) => format!("during step {i} ({})", step_kind.unwrap_or("step")),
        ("start", _) => "while starting the start command".into(),
        ("ready", _) => "while waiting for the ready check to pass".into(),
        _ => "while starting the build VM".into(),
    };
    Failed::new(
        progress.phase,
        progress.step,
        format!(
            "the build did not have its VM ready within its deadline of {} min (counted from when it left the queue) and was stopped {at}; the build VM was killed",
            BUILD_DEADLINE.as_secs() / 60
        ),
        "make the build finish sooner (fewer or quicker steps; the steps that finished come from the cache when you build it again), or split it: build a template with the first steps, then another one from it",
    )
}

/// The failure of a build whose ready VM could not be stored as the template: a disk
/// too full for the snapshot (507) says what to free.
fn snapshot_failure(e: ApiError) -> Failed {
    if e.status == 507 {
        return Failed::new(
            "snapshot",
            None,
            format!("no room for the template's snapshot: {}", e.message),
            "free disk space on this worker (delete snapshots, templates or sandboxes), then build again: the finished steps come from the cache",
        );
    }
    Failed::new(
        "snapshot",
        None,
        format!("storing the template's snapshot: {}", e.message),
        "check the snapshot store and free disk space, then build again",
    )
}

/// Why a build stopped.
struct Failed(BuildFailure);

impl Failed {
    fn new(phase: &str, step: Option<u32>, message: String, action: &str) -> Self {
        Self(BuildFailure {
            phase: phase.into(),
            step,
            message,
            exit_code: None,
            output_tail: String::new(),
            action: action.into(),
        })
    }
}

/// Collects a command's output into whole lines, for the log and a failure's tail.
struct LineLog<'a> {
    manager: &'a Manager,
    template: &'a str,
    step: Option<u32>,
    partial: [Vec<u8>; 2],
    pending: Vec<LogLine>,
    tail: VecDeque<String>,
    flushed: Instant,
}

impl<'a> LineLog<'a> {
    fn new(manager: &'a Manager, template: &'a str, step: Option<u32>) -> Self {
        Self {
            manager,
            template,
            step,
            partial: [Vec::new(), Vec::new()],
            pending: Vec::new(),
            tail: VecDeque::new(),
            flushed: Instant::now(),
        }
    }

    fn push(&mut self, stderr: bool, bytes: &[u8]) {
        let i = stderr as usize;
        self.partial[i].extend_from_slice(bytes);
        while let Some(n) = self.partial[i].iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial[i].drain(..=n).collect();
            self.line(stderr, &line[..n]);
        }
        // A line without an end should not grow without bound.
        if self.partial[i].len() > 16 * 1024 {
            let line = std::mem::take(&mut self.partial[i]);
            self.line(stderr, &line);
        }
        if self.flushed.elapsed() > LOG_FLUSH {
            self.flush();
        }
    }

    fn line(&mut self, stderr: bool, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes)
            .trim_end_matches('\r')
            .to_string();
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text.clone());
        self.pending
            .push((self.step, if stderr { "stderr" } else { "stdout" }, text));
    }

    fn flush(&mut self) {
        for i in 0..2 {
            if !self.partial[i].is_empty() {
                let line = std::mem::take(&mut self.partial[i]);
                self.line(i == 1, &line);
            }
        }
        if !self.pending.is_empty() {
            self.manager
                .write_log(self.template, std::mem::take(&mut self.pending));
        }
        self.flushed = Instant::now();
    }

    fn tail(&mut self) -> String {
        self.flush();
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Manager {
    /// Appends build-level and output lines to a template's log, within its build's
    /// [`LogBudget`], and wakes readers.
    fn write_log(&self, template: &str, lines: Vec<LogLine>) {
        let lines = {
            let mut logs = lock(&self.builds.logs);
            let budget = logs.entry(template.to_string()).or_insert_with(|| {
                // Counted once per build (the log of a new template starts empty, but
                // the catalog is what the cap is about).
                let used = self
                    .catalog
                    .build_log_output_bytes(template)
                    .unwrap_or_default();
                LogBudget::new(MAX_LOG_BYTES, used)
            });
            budget.admit(lines)
        };
        if lines.is_empty() {
            return;
        }
        if let Err(e) = self.catalog.append_build_log(template, &lines) {
            warn!(template, error = %e, "writing the build log");
        }
        self.builds.activity.notify_waiters();
    }

    fn log_line(&self, template: &str, step: Option<u32>, text: String) {
        info!(template, step, "{text}");
        self.write_log(template, vec![(step, "build", text)]);
    }

    fn save_template(&self, t: &TemplateRecord) -> Result<(), ApiError> {
        self.catalog.put_template(t)?;
        self.builds.activity.notify_waiters();
        Ok(())
    }

    /// A ready template of `team` by ID or name, or any team's by ID when `team` is
    /// `None` (warm-pool refills, which act for whoever set the pool).
    pub(super) fn ready_template(
        &self,
        team: Option<&str>,
        id: &str,
    ) -> Result<Option<TemplateRecord>, ApiError> {
        let found = match self.catalog.template(team, id)? {
            Some(t) => Some(t),
            // The workspace templates (by name) and the operator's templates behind
            // them (by ID) are every team's.
            None if team.is_some() => return self.shared_template(id),
            None => None,
        };
        match found {
            Some(t) if t.status == TemplateStatus::Ready => Ok(Some(t)),
            Some(t) => Err(ApiError::conflict(format!(
                "template {} is {}, not ready: {}",
                t.id,
                serde_json::to_value(t.status)
                    .expect("json")
                    .as_str()
                    .unwrap_or_default(),
                match t.status {
                    TemplateStatus::Building => "wait for its build to end (GET /templates/{id})",
                    _ => "see its error (GET /templates/{id}) and build it again",
                }
            ))
            .with_details(serde_json::json!({ "templateID": t.id }))),
            None => Ok(None),
        }
    }

    /// Starts building a template; the build goes on in the background.
    pub async fn build_template(
        self: &Arc<Self>,
        team: &str,
        request: TemplateBuildRequest,
    ) -> Result<TemplateView, ApiError> {
        let valid = request.validate()?;
        let (base, resources, base_env) = if BUILTIN.contains(&request.from.as_str()) {
            let resources = request.resources.unwrap_or_default();
            self.check_shape(&request.from, resources)?;
            (request.from.clone(), resources, BTreeMap::new())
        } else {
            let base = self.ready_template(Some(team), &request.from)?.ok_or_else(|| {
                ApiError::not_found("template", &request.from).with_details(serde_json::json!({
                    "field": "from", "available": BUILTIN, "workspace": api_model::WORKSPACE_TEMPLATES, "hint": "or a ready template of your team (GET /templates)"
                }))
            })?;
            let resources =
                super::snapshots::fixed_shape(base.resources, request.resources, &base.id)?;
            (base.id, resources, base.env_vars)
        };
        let now = now_ms();
        let record = TemplateRecord {
            id: new_template_id(),
            team_id: team.to_string(),
            name: request.name.clone(),
            base,
            status: TemplateStatus::Building,
            resources,
            env_vars: base_env,
            steps: valid
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepView {
                    index: i as u32,
                    kind: s.action.kind().into(),
                    summary: summary(s),
                    status: StepStatus::Pending,
                    duration_ms: None,
                })
                .collect(),
            error: None,
            snapshot_id: None,
            created_at_ms: now,
            ready_at_ms: None,
            build_ms: None,
            built_on: crate::cluster::this_host().map(str::to_string),
            request,
        };
        {
            // Counted and recorded under one lock, so a burst cannot overshoot.
            let _one_at_a_time = self.admission.lock().unwrap();
            // The team's templates and builds quotas (builds: running or queued); the
            // operator's builds are the workspace templates, one per spec.
            if team != crate::catalog::OPERATOR_TEAM_ID {
                self.check_build_quota(team)?;
            }
            self.catalog.put_template(&record)
        }
        .map_err(|e| match e {
            crate::catalog::CatalogError::Conflict(m) => ApiError::conflict(format!(
                "{m}; delete it first (DELETE /templates/{{id}}) or send another name"
            ))
            .with_details(serde_json::json!({ "field": "name" })),
            other => other.into(),
        })?;
        let view = record.view();
        let this = self.clone();
        let id = record.id.clone();
        // Joined here, not in the task, so the queue's order is the order builds were
        // accepted in. The ticket leaves the queue however the task ends.
        let (wake, woken) = oneshot::channel();
        let joined = lock(&self.builds.queue).join(team, &id, wake);
        let ticket = BuildTicket {
            manager: self.clone(),
            template: id.clone(),
        };
        let wait = match joined {
            Joined::Started => None,
            Joined::Queued { position } => {
                self.log_line(
                    &id,
                    None,
                    format!(
                        "queued at position {position} for this host's build slot (builds of different teams take turns); it starts when the slot is free"
                    ),
                );
                Some(woken)
            }
        };
        let span = tracing::info_span!("template_build", template = %id);
        let task = tokio::spawn(
            async move {
                let _ticket = ticket;
                this.run_build(record, valid.steps, valid.ready_timeout_s, wait)
                    .await;
            }
            .instrument(span),
        );
        let mut running = self.builds.running.lock().unwrap();
        if !task.is_finished() {
            running.insert(id, task.abort_handle());
        }
        Ok(view)
    }

    /// Runs a build to its end (once the queue gives it the slot, if `wait`) and records
    /// the outcome. The caller's [`BuildTicket`] hands the slot on afterwards.
    async fn run_build(
        &self,
        mut t: TemplateRecord,
        steps: Vec<ValidStep>,
        ready_timeout_s: u64,
        wait: Option<oneshot::Receiver<()>>,
    ) {
        let queued = Instant::now();
        if let Some(woken) = wait {
            // The sender goes only with the queue entry, which only this build's
            // ticket takes out: an error cannot happen while this task runs.
            let _ = woken.await;
        }
        let started = Instant::now();
        let waited = started - queued;
        self.log_line(
            &t.id,
            None,
            if waited >= Duration::from_secs(1) {
                format!(
                    "building {} from {} (after {:.0} s in the queue)",
                    t.id,
                    t.base,
                    waited.as_secs_f64()
                )
            } else {
                format!("building {} from {}", t.id, t.base)
            },
        );
        let deadline = started + BUILD_DEADLINE;
        let progress = Mutex::new(Progress {
            phase: "base",
            step: None,
        });
        // The net under the deadline: whatever the build VM is doing past it (a step
        // cut short to the deadline ends first, with its output), it is dropped here,
        // and with it the VM.
        let ready = tokio::time::timeout_at(
            (deadline + DEADLINE_SLACK).into(),
            self.ready_vm(&mut t, &steps, ready_timeout_s, deadline, &progress),
        )
        .await;
        let result = match ready {
            Ok(Ok(mut vm)) => {
                self.log_line(&t.id, None, "snapshotting the ready VM".into());
                self.store_template(&t, &mut vm)
                    .await
                    .map_err(snapshot_failure)
            }
            Ok(Err(failed)) => Err(failed),
            Err(_) => {
                let at = *lock(&progress);
                let kind = at
                    .step
                    .and_then(|i| steps.get(i as usize))
                    .map(|s| s.action.kind());
                Err(deadline_failure(at, kind))
            }
        };
        match result {
            Ok(snapshot_id) => {
                t.status = TemplateStatus::Ready;
                t.snapshot_id = Some(snapshot_id);
                t.ready_at_ms = Some(now_ms());
                t.build_ms = Some(started.elapsed().as_millis() as u64);
                self.log_line(
                    &t.id,
                    None,
                    format!("ready in {:.1} s", started.elapsed().as_secs_f64()),
                );
            }
            Err(Failed(failure)) => {
                t.build_ms = Some(started.elapsed().as_millis() as u64);
                self.log_line(
                    &t.id,
                    failure.step,
                    format!("build failed: {}", failure.message),
                );
                t.fail(failure);
            }
        }
        let deleted = !matches!(self.catalog.template(Some(&t.team_id), &t.id), Ok(Some(_)));
        if deleted {
            // Deleted while its snapshot was being stored: nothing of it may stay.
            if let Some(id) = &t.snapshot_id {
                if let Ok(s) = stored::get(self.store(), id).await {
                    let _ = stored::delete(self.store(), &s).await;
                }
            }
            let _ = std::fs::remove_dir_all(self.template_cache_dir(&t.id));
        } else if let Err(e) = self.save_template(&t) {
            warn!(template = %t.id, error = %e.message, "recording the build's end");
        }
        self.builds.running.lock().unwrap().remove(&t.id);
        // The VM is gone: its cache entries are free to prune.
        lock(&self.builds.cache_claims).remove(&t.id);
        self.prune_build_cache(CACHE_ENTRIES);
    }

    fn build_cache(&self) -> PathBuf {
        self.build_cache_dir.clone()
    }

    /// Copies of a template's snapshot on this host's disks while it is stored: the
    /// snapshot, and a local store's copy of it.
    fn template_snapshot_copies(&self) -> u64 {
        if self.snapshots.store.is_local() {
            2
        } else {
            1
        }
    }

    /// Whether the step cache is on the state directory's file system (where template
    /// snapshots are written): only then does dropping entries make room for one.
    fn build_cache_shares_state_disk(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        let cache = self.build_cache();
        let cache_dev = dev(&cache).or_else(|| cache.parent().and_then(dev));
        cache_dev.is_none() || cache_dev == dev(&self.state_dir)
    }

    /// A team's step cache.
    fn team_cache(&self, team: &str) -> PathBuf {
        self.build_cache().join(team_cache_name(team))
    }

    /// Claims the cache entry `dir` for `template`'s build (so no prune removes it)
    /// and marks it recently used, if it is there.
    fn claim_cache_entry(&self, template: &str, dir: &Path) -> bool {
        let mut claims = lock(&self.builds.cache_claims);
        if !dir.is_dir() {
            return false;
        }
        // Marks it recently used, for pruning.
        let _ = std::fs::File::open(dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        claims
            .entry(template.to_string())
            .or_default()
            .push(dir.to_path_buf());
        true
    }

    /// Gives up `template`'s claim on `dir`.
    fn release_cache_entry(&self, template: &str, dir: &Path) {
        if let Some(dirs) = lock(&self.builds.cache_claims).get_mut(template) {
            dirs.retain(|d| d != dir);
        }
    }

    /// The VM the build starts from: the newest cached step snapshot that matches, or
    /// the base. Returns the VM and how many steps it already has done.
    async fn build_vm(
        &self,
        t: &TemplateRecord,
        keys: &[String],
    ) -> Result<(QemuVm, usize), Failed> {
        let base_failed = |e: ApiError| {
            Failed::new(
                "base",
                None,
                format!("starting from {}: {}", t.base, e.message),
                "retry the build; if it fails again, check the pool manager's log",
            )
        };
        let options = RestoreOptions::default();
        let cache = self.team_cache(&t.team_id);
        for (i, key) in keys.iter().enumerate().rev() {
            let dir = cache.join(key);
            // Claimed before it is read: the restored VM's disk stands on it.
            if !self.claim_cache_entry(&t.id, &dir) {
                continue;
            }
            let restored = match Snapshot::open(&dir) {
                Ok(snapshot) => self
                    .vmm
                    .restore(&snapshot, &options)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match restored {
                Ok(mut vm) => {
                    self.seat_open(&mut vm, &t.id);
                    return Ok((vm, i + 1));
                }
                Err(e) => {
                    warn!(template = %t.id, error = %e, "a cached step would not restore; dropping it");
                    self.release_cache_entry(&t.id, &dir);
                    self.drop_cache_entry(&dir);
                }
            }
        }
        let snapshot = if BUILTIN.contains(&t.base.as_str()) {
            self.templates
                .snapshot(&t.base, t.resources.vcpus, t.resources.mem_mib)
                .await
                .map_err(|e| base_failed(ApiError::internal(e.to_string())))?
        } else {
            self.template_snapshot(Some(&t.team_id), &t.base)
                .await
                .map_err(base_failed)?
        };
        let vm = self
            .vmm
            .restore(
                &snapshot,
                &RestoreOptions {
                    disk_mib: Some(t.resources.disk_mib),
                    ..RestoreOptions::default()
                },
            )
            .await
            .map_err(|e| base_failed(ApiError::internal(e.to_string())))?;
        let mut vm = vm;
        self.seat_open(&mut vm, &t.id);
        Ok((vm, 0))
    }

    /// The cache key of the base the build starts from.
    async fn base_key(&self, t: &TemplateRecord) -> Result<String, Failed> {
        let base = if BUILTIN.contains(&t.base.as_str()) {
            self.templates
                .snapshot(&t.base, t.resources.vcpus, t.resources.mem_mib)
                .await
                .map(|s| s.manifest().id.clone())
                .map_err(|e| e.to_string())
        } else {
            self.ready_template(Some(&t.team_id), &t.base)
                .map_err(|e| e.message)
                .and_then(|b| b.and_then(|b| b.snapshot_id).ok_or_else(|| "gone".into()))
        };
        let base = base.map_err(|e| {
            Failed::new(
                "base",
                None,
                format!("starting from {}: {e}", t.base),
                "check that the base template exists and is ready, then build again",
            )
        })?;
        Ok(format!("{base}|{}", t.resources.disk_mib))
    }

    /// Runs the build up to a ready VM: the base (or the newest cached step), the
    /// steps, the start command and the ready check, each within `deadline`.
    /// `progress` says where it is, for a build the deadline stops.
    async fn ready_vm(
        &self,
        t: &mut TemplateRecord,
        steps: &[ValidStep],
        ready_timeout_s: u64,
        deadline: Instant,
        progress: &Mutex<Progress>,
    ) -> Result<QemuVm, Failed> {
        let at = |phase: &'static str, step: Option<u32>| {
            *lock(progress) = Progress { phase, step };
        };
        at("base", None);
        let keys = step_keys(&t.team_id, &self.base_key(t).await?, &t.request);
        let (mut vm, done) = self.build_vm(t, &keys).await?;
        let mut env = t.env_vars.clone();
        for (i, step) in steps.iter().enumerate() {
            if let StepAction::Env(vars) = &step.action {
                env.extend(vars.clone());
            }
            if i < done {
                t.steps[i].status = StepStatus::Cached;
                self.log_line(
                    &t.id,
                    Some(i as u32),
                    format!("step {i} ({}): cached", step.action.kind()),
                );
                continue;
            }
            at("step", Some(i as u32));
            t.steps[i].status = StepStatus::Running;
            let _ = self.save_template(t);
            self.log_line(
                &t.id,
                Some(i as u32),
                format!("step {i} ({}): {}", step.action.kind(), t.steps[i].summary),
            );
            let started = Instant::now();
            self.run_step(&t.id, i as u32, vm.agent(), step, &env, deadline)
                .await?;
            t.steps[i].status = StepStatus::Done;
            t.steps[i].duration_ms = Some(started.elapsed().as_millis() as u64);
            if !matches!(step.action, StepAction::Env(_)) {
                // Every step's entry stays: each one's disk is an overlay on the one
                // before it, so dropping one would break the entries after it.
                self.cache_step(t, &mut vm, &keys[i], i as u32).await;
            }
        }
        t.env_vars = env.clone();
        let _ = self.save_template(t);
        at("start", None);
        let start = match &t.request.start_cmd {
            Some(cmd) => Some(self.start_command(&t.id, vm.agent(), cmd, &env).await?),
            None => None,
        };
        at("ready", None);
        self.wait_ready(t, vm.agent(), &env, start, ready_timeout_s, deadline)
            .await?;
        Ok(vm)
    }

    /// Runs one step in the build VM.
    async fn run_step(
        &self,
        template: &str,
        index: u32,
        agent: &AgentClient,
        step: &ValidStep,
        env: &BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<(), Failed> {
        let command = match &step.action {
            StepAction::Env(_) => return Ok(()),
            StepAction::Files(files) => {
                for (path, content, mode) in files {
                    agent
                        .write_file(path, content.as_bytes(), Some(*mode), Some(&step.user))
                        .await
                        .map_err(|e| {
                            Failed::new(
                                "step",
                                Some(index),
                                format!("step {index} (files): writing {path}: {e}"),
                                "check the path and the user, then build again",
                            )
                        })?;
                }
                return Ok(());
            }
            StepAction::Run(cmd) => cmd.clone(),
            // Names are checked to be Debian package names: safe as shell words. dpkg's
            // fsync per unpacked file buys nothing in a build VM (a crash fails the
            // build; the result is a snapshot) and costs minutes for large sets.
            StepAction::Packages(p) => format!(
                "apt-get update -q && apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-unsafe-io {}",
                p.join(" ")
            ),
        };
        let mut env = env.clone();
        env.insert("DEBIAN_FRONTEND".into(), "noninteractive".into());
        let what = format!("step {index} ({})", step.action.kind());
        let request = ExecRequest {
            command: Command::Shell(command),
            env,
            cwd: Some(step.cwd.clone()),
            user: Some(step.user.clone()),
            background: false,
            stdin: false,
            attach: true,
        };
        let mut log = LineLog::new(self, template, Some(index));
        // The step's own timeout, or the build's deadline if that comes first.
        let own = Duration::from_secs(step.timeout_s);
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = run_logged(agent, request, &mut log, own.min(left)).await;
        let tail = log.tail();
        let fail = |message: String, exit_code: Option<i32>, action: &str| {
            let mut f = Failed::new("step", Some(index), message, action);
            f.0.exit_code = exit_code;
            f.0.output_tail = tail.clone();
            f
        };
        match outcome {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(match status.code {
                Some(code) => fail(
                    format!("{what} exited with code {code}"),
                    Some(code),
                    "fix the step (its output is in outputTail and the build log), then build again: the steps before it come from the cache",
                ),
                None => fail(
                    format!("{what} was killed by signal {}", status.signal.unwrap_or_default()),
                    None,
                    "the step may have run out of memory: build with more resources.memMiB, or fix the step",
                ),
            }),
            Err(RunError::Timeout) if left < own => {
                let mut f = deadline_failure(
                    Progress {
                        phase: "step",
                        step: Some(index),
                    },
                    Some(step.action.kind()),
                );
                f.0.output_tail = tail.clone();
                Err(f)
            }
            Err(RunError::Timeout) => Err(fail(
                format!("{what} did not finish within {} s and was stopped", step.timeout_s),
                None,
                "raise the step's timeout, or make it finish sooner",
            )),
            Err(RunError::Agent(e)) => Err(fail(
                format!("{what}: {e}"),
                None,
                "check the step's user and cwd, then build again",
            )),
        }
    }

    /// Snapshots the build VM (it keeps running) into the team's step cache under
    /// `key`, after pruning the cache to make room. Skipped (the build log says why)
    /// when the disk is short of space: a missing entry costs a later build time, a
    /// full disk costs every sandbox here.
    /// The entry must leave room for the template's own snapshot after it (two
    /// snapshots' worth): the cache never costs the build it serves. Returns whether
    /// the entry was written (kept for callers that care; the build goes on anyway).
    async fn cache_step(&self, t: &TemplateRecord, vm: &mut QemuVm, key: &str, index: u32) -> bool {
        self.prune_build_cache(CACHE_ENTRIES.saturating_sub(1));
        // The template's snapshot needs its own room (and a local store's copy).
        let template = self.template_snapshot_copies();
        let room = if self.build_cache_shares_state_disk() {
            self.check_disk_space_for(vm, t.resources.mem_mib, 1 + template)
        } else {
            let _ = std::fs::create_dir_all(self.build_cache());
            self.check_disk_space_at(&self.build_cache(), vm, t.resources.mem_mib, 1)
                .and_then(|()| self.check_disk_space_for(vm, t.resources.mem_mib, template))
        };
        if let Err(e) = room {
            self.log_line(
                &t.id,
                Some(index),
                format!(
                    "step {index}: not cached, the disk is short of space: {}",
                    e.message
                ),
            );
            return false;
        }
        let cache = self.team_cache(&t.team_id);
        let dir = cache.join(key);
        let tmp = cache.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        // Claimed before it exists, so a prune meanwhile leaves it (and the team's
        // directory) alone.
        lock(&self.builds.cache_claims)
            .entry(t.id.clone())
            .or_default()
            .push(tmp.clone());
        let _ = std::fs::create_dir_all(&cache);
        let written = match vm.snapshot(&tmp, true).await {
            Ok(_) => {
                let claims = lock(&self.builds.cache_claims);
                let in_use = claims.values().flatten().any(|d| *d == dir);
                // An entry another build stands on stays; this copy is the same state.
                if in_use {
                    let _ = std::fs::remove_dir_all(&tmp);
                    true
                } else {
                    let _ = std::fs::remove_dir_all(&dir);
                    let renamed = std::fs::rename(&tmp, &dir).is_ok();
                    if !renamed {
                        let _ = std::fs::remove_dir_all(&tmp);
                    }
                    renamed
                }
            }
            // The build goes on: a missing cache entry costs time, not correctness.
            Err(e) => {
                warn!(key, error = %e, "caching a build step failed");
                false
            }
        };
        self.release_cache_entry(&t.id, &tmp);
        written
    }

    /// Removes a cache entry unless a build has claimed it.
    fn drop_cache_entry(&self, dir: &Path) {
        let claims = lock(&self.builds.cache_claims);
        if !claims.values().flatten().any(|d| d == dir) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Keeps the newest `keep` step snapshots over all teams' caches (more only where
    /// builds stand on them); drops half-written ones no build is writing and entries
    /// from before caches were per team. Entries a build claimed are never removed.
    fn prune_build_cache(&self, keep: usize) {
        let root = self.build_cache();
        let Ok(teams) = std::fs::read_dir(&root) else {
            return;
        };
        // Held throughout: no claim slips in between a decision and a removal.
        let claims = lock(&self.builds.cache_claims);
        let claimed: HashSet<&Path> = claims.values().flatten().map(PathBuf::as_path).collect();
        let mut kept = Vec::new();
        let mut in_use = 0;
        for team in teams.flatten() {
            let path = team.path();
            if !is_team_cache_name(&team.file_name().to_string_lossy()) {
                // From before caches were per team: no build reads it any more.
                if !claimed.contains(path.as_path()) {
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            for e in entries.flatten() {
                let entry = e.path();
                if claimed.contains(entry.as_path()) {
                    in_use += 1;
                    continue;
                }
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    // No build is writing it: a leftover.
                    let _ = std::fs::remove_dir_all(&entry);
                    continue;
                }
                let used = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                kept.push((used, entry));
            }
        }
        kept.sort();
        let surplus = (kept.len() + in_use).saturating_sub(keep).min(kept.len());
        for (_, path) in kept.into_iter().take(surplus) {
            let _ = std::fs::remove_dir_all(path);
        }
        // Team directories left empty go (remove_dir leaves any that is not; a claim
        // on a path not yet made keeps its team's).
        if let Ok(teams) = std::fs::read_dir(&root) {
            for team in teams.flatten() {
                let path = team.path();
                if !claimed.iter().any(|c| c.starts_with(&path)) {
                    let _ = std::fs::remove_dir(&path);
                }
            }
        }
    }

    /// Starts the start command in the background; [`Manager::wait_ready`] forwards
    /// its output to the log.
    async fn start_command(
        &self,
        template: &str,
        agent: &AgentClient,
        cmd: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Process, Failed> {
        self.log_line(template, None, format!("start: {cmd}"));
        agent
            .exec(ExecRequest {
                command: Command::Shell(cmd.to_string()),
                env: env.clone(),
                cwd: Some(DEFAULT_CWD.into()),
                user: Some(DEFAULT_USER.into()),
                background: true,
                stdin: false,
                attach: true,
            })
            .await
            .map_err(|e| {
                Failed::new(
                    "start",
                    None,
                    format!("the start command could not start: {e}"),
                    "fix startCmd, then build again",
                )
            })
    }

    /// Runs the ready check until it passes (or, with none, gives the start command a
    /// second to fail), logging the start command's output meanwhile. The start
    /// command is detached (it keeps running) once the template is ready.
    async fn wait_ready(
        &self,
        t: &TemplateRecord,
        agent: &AgentClient,
        env: &BTreeMap<String, String>,
        mut start: Option<Process>,
        ready_timeout_s: u64,
        build_deadline: Instant,
    ) -> Result<(), Failed> {
        let started = Instant::now();
        let own_deadline = started + Duration::from_secs(ready_timeout_s);
        let deadline = own_deadline.min(build_deadline);
        let mut log = LineLog::new(self, &t.id, None);
        let mut last_check = String::new();
        if let Some(cmd) = &t.request.ready_cmd {
            self.log_line(&t.id, None, format!("ready check: {cmd}"));
        }
        let mut ready_retry = READY_RETRY;
        loop {
            match &t.request.ready_cmd {
                Some(cmd) => {
                    let request = ExecRequest {
                        command: Command::Shell(cmd.clone()),
                        env: env.clone(),
                        cwd: Some(DEFAULT_CWD.into()),
                        user: Some(DEFAULT_USER.into()),
                        background: false,
                        stdin: false,
                        attach: true,
                    };
                    let check = agent.run_tail(request, READY_OUTPUT_TAIL);
                    match tokio::time::timeout(READY_CHECK_TIMEOUT, check).await {
                        Ok(Ok(out)) if out.status.success() => break,
                        Ok(Ok(out)) => {
                            last_check = format!(
                                "exit code {}: {}{}",
                                out.status.code.map_or("none".into(), |c| c.to_string()),
                                out.stdout_str(),
                                out.stderr_str()
                            )
                        }
                        Ok(Err(e)) => last_check = e.to_string(),
                        Err(_) => {
                            last_check =
                                format!("it ran longer than {} s", READY_CHECK_TIMEOUT.as_secs())
                        }
                    }
                }
                None if started.elapsed() >= Duration::from_secs(1) => break,
                None => {}
            }
            if Instant::now() >= deadline && deadline < own_deadline {
                let mut f = deadline_failure(
                    Progress {
                        phase: "ready",
                        step: None,
                    },
                    None,
                );
                f.0.output_tail = log.tail();
                return Err(f);
            }
            if Instant::now() >= deadline {
                let mut f = Failed::new(
                    "ready",
                    None,
                    format!(
                        "the ready check did not pass within {ready_timeout_s} s; its last attempt: {}",
                        last_check.trim()
                    ),
                    "check that startCmd starts what readyCmd waits for (the start command's output is in outputTail), or raise readyTimeout",
                );
                f.0.output_tail = log.tail();
                return Err(f);
            }
            let pause = tokio::time::sleep(ready_retry);
            // A check that keeps failing is run less often, up to every few seconds.
            ready_retry = (ready_retry * 2).min(READY_RETRY_CAP);
            tokio::pin!(pause);
            loop {
                let event = async {
                    match start.as_mut() {
                        Some(p) => p.next_event().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = &mut pause => break,
                    event = event => match event {
                        Ok(Some(ProcessEvent::Stdout(b))) => log.push(false, &b),
                        Ok(Some(ProcessEvent::Stderr(b))) => log.push(true, &b),
                        other => {
                            let code = match other {
                                Ok(Some(ProcessEvent::Exited(s))) => s.code,
                                _ => None,
                            };
                            let mut f = Failed::new(
                                "start",
                                None,
                                format!(
                                    "the start command ended (exit code {}) before the template was ready",
                                    code.map_or("none".into(), |c| c.to_string())
                                ),
                                "fix startCmd (its output is in outputTail): it must keep running",
                            );
                            f.0.exit_code = code;
                            f.0.output_tail = log.tail();
                            return Err(f);
                        }
                    }
                }
            }
        }
        log.flush();
        if let Some(p) = start {
            let _ = p.detach().await;
        }
        self.log_line(
            &t.id,
            None,
            format!("ready after {:.1} s", started.elapsed().as_secs_f64()),
        );
        Ok(())
    }

    /// Snapshots the ready build VM (ending it), stores the snapshot as the template's,
    /// and keeps the local copy as this host's cache of it, so creates here need no
    /// fetch. Returns the stored snapshot's ID.
    async fn store_template(
        &self,
        t: &TemplateRecord,
        vm: &mut QemuVm,
    ) -> Result<String, ApiError> {
        let builder = format!("sbx-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
        let dir = self.scratch_dir();
        let _ = std::fs::create_dir_all(dir.parent().expect("scratch has a parent"));
        // Room for the snapshot and for the store's copy of it (a local store's is on
        // this host's disks). The step cache is not pruned for room here: the build
        // VM's disk stands on this build's entries, which the snapshot's rebase reads.
        self.check_disk_space_for(vm, t.resources.mem_mib, self.template_snapshot_copies())?;
        let snapshot = vm
            .snapshot(&dir, false)
            .await
            .map_err(|e| ApiError::internal(format!("taking the snapshot: {e}")))?;
        let result = async {
            let _uploading = self.uploads.read().await;
            let new = NewSnapshot {
                id: stored::new_snapshot_id(&builder),
                sandbox_id: builder.clone(),
                team_id: t.team_id.clone(),
                kind: Kind::Template,
                template_id: t.id.clone(),
                vm: serde_json::to_value(snapshot.manifest()).expect("json"),
                sandbox: serde_json::json!({ "envVars": t.env_vars, "template": t.id }),
            };
            stored::publish(self.store(), &dir, super::snapshots::SNAPSHOT_FILES, new)
                .await
                .map_err(|e| super::snapshots::store_error("storing the template", e))
        }
        .await;
        match result {
            Ok((s, _)) => {
                let cache = self.template_cache_dir(&t.id);
                let _ = std::fs::remove_dir_all(&cache);
                let _ = std::fs::create_dir_all(cache.parent().expect("cache has a parent"));
                if std::fs::rename(&dir, &cache).is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Ok(s.id)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// A template's view: a built-in one, or one of the team's.
    pub fn template_view(&self, team: &str, id: &str) -> Result<TemplateView, ApiError> {
        if BUILTIN.contains(&id) {
            return Ok(builtin_view(id));
        }
        if self.is_workspace(id) {
            return self.workspace_view(id);
        }
        self.catalog
            .template(Some(team), id)?
            .map(|t| t.view())
            .ok_or_else(|| ApiError::not_found("template", id))
    }

    /// The built-in templates, the workspace templates (with their build's status) and
    /// the team's own, oldest first.
    pub fn list_templates(&self, team: &str) -> Result<Vec<TemplateView>, ApiError> {
        let mut out: Vec<TemplateView> = BUILTIN.iter().map(|b| builtin_view(b)).collect();
        out.extend(self.workspace_views()?);
        out.extend(self.catalog.templates(Some(team))?.iter().map(|t| t.view()));
        Ok(out)
    }

    /// A page of a template's build log after `after`, waiting up to `wait` for lines
    /// while the build runs.
    pub async fn build_log(
        &self,
        team: &str,
        id: &str,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<BuildLogPage, ApiError> {
        let limit = limit.clamp(1, MAX_LOG_PAGE);
        let deadline = Instant::now() + wait.min(Duration::from_secs(MAX_LOG_WAIT_S));
        loop {
            // Registered before reading, so a write between the read and the wait wakes it.
            let woken = self.builds.activity.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let t = self
                .catalog
                .template(Some(team), id)?
                .ok_or_else(|| ApiError::not_found("template", id))?;
            let lines = self.catalog.build_log(&t.id, after, limit)?;
            if !lines.is_empty()
                || t.status != TemplateStatus::Building
                || Instant::now() >= deadline
            {
                let next = lines.last().map_or(after, |l| l.seq);
                return Ok(BuildLogPage {
                    template_id: t.id,
                    status: t.status,
                    lines,
                    next,
                });
            }
            let _ = tokio::time::timeout_at(deadline.into(), woken).await;
        }
    }

    /// Deletes a template: a running build is cancelled (its VM ended), its stored
    /// snapshot and warm pool go; sandboxes made from it keep running.
    pub async fn delete_template(&self, team: &str, id: &str) -> Result<(), ApiError> {
        if BUILTIN.contains(&id) || api_model::WORKSPACE_TEMPLATES.contains(&id) {
            return Err(ApiError::conflict(format!(
                "{id} is a built-in template and cannot be deleted"
            )));
        }
        let t = self
            .catalog
            .template(Some(team), id)?
            .ok_or_else(|| ApiError::not_found("template", id))?;
        if let Some(build) = self.builds.running.lock().unwrap().remove(&t.id) {
            build.abort();
            info!(template = %t.id, "build cancelled by a delete");
        }
        self.drop_warm_pool(&t.id).await;
        if let Some(snapshot_id) = &t.snapshot_id {
            match stored::get(self.store(), snapshot_id).await {
                Ok(s) => stored::delete(self.store(), &s).await.map_err(|e| {
                    super::snapshots::store_error("deleting the template's snapshot", e)
                })?,
                Err(storage::StoreError::NotFound(_)) => {}
                Err(e) => {
                    return Err(super::snapshots::store_error(
                        "reading the template's snapshot",
                        e,
                    ))
                }
            }
            self.gc_wanted.notify_one();
        }
        if !self.any_live(|r| r.template_id == t.id)? {
            let _ = std::fs::remove_dir_all(self.template_cache_dir(&t.id));
        }
        self.catalog.delete_template(&t.id)?;
        self.builds.activity.notify_waiters();
        info!(template = %t.id, "template deleted");
        Ok(())
    }

    /// Cancels every build and waits (a bounded time) for the running one to end: its
    /// VM ends as its task is dropped.
    pub(super) async fn cancel_builds(&self) {
        let builds: Vec<_> = self.builds.running.lock().unwrap().drain().collect();
        for (_, build) in &builds {
            build.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while builds.iter().any(|(_, b)| !b.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// After a start: builds the previous daemon did not finish have failed.
    pub(super) fn fail_interrupted_builds(&self) -> Result<(), ApiError> {
        for mut t in self.catalog.templates(None)? {
            // Another host's build (on a catalog hosts share) runs on.
            let mine = t.built_on.is_none() || t.built_on.as_deref() == crate::cluster::this_host();
            if t.status != TemplateStatus::Building || !mine {
                continue;
            }
            t.fail(BuildFailure {
                phase: "base".into(),
                step: None,
                message: "the pool manager stopped while this template was being built".into(),
                exit_code: None,
                output_tail: String::new(),
                action: "build it again: finished steps come from the cache".into(),
            });
            self.catalog.put_template(&t)?;
        }
        Ok(())
    }
}

/// A built-in template's view.
fn builtin_view(id: &str) -> TemplateView {
    TemplateView {
        template_id: id.to_string(),
        name: Some(id.to_string()),
        builtin: true,
        from: id.to_string(),
        status: TemplateStatus::Ready,
        resources: Resources::default(),
        env_vars: BTreeMap::new(),
        start_cmd: None,
        ready_cmd: None,
        steps: Vec::new(),
        error: None,
        created_at: iso8601(0),
        ready_at: None,
        build_ms: None,
    }
}

/// Why a logged command did not run to an exit.
enum RunError {
    Timeout,
    Agent(agent_client::ClientError),
}

/// Runs a command to its end, its output going to `log`, within `limit`.
async fn run_logged(
    agent: &AgentClient,
    request: ExecRequest,
    log: &mut LineLog<'_>,
    limit: Duration,
) -> Result<agent_protocol::ExitStatus, RunError> {
    let mut process = agent.exec(request).await.map_err(RunError::Agent)?;
    let run = async {
        loop {
            match process.next_event().await.map_err(RunError::Agent)? {
                Some(ProcessEvent::Stdout(b)) => log.push(false, &b),
                Some(ProcessEvent::Stderr(b)) => log.push(true, &b),
                Some(ProcessEvent::Exited(status)) => return Ok(status),
                Some(ProcessEvent::Detached) | None => {
                    return Err(RunError::Agent(agent_client::ClientError::Protocol(
                        "the command's stream ended before it exited".into(),
                    )))
                }
            }
        }
    };
    // On a timeout the process handle drops with this function: a foreground
    // process whose handle goes is killed in the guest.
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or(Err(RunError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(steps: serde_json::Value) -> TemplateBuildRequest {
        serde_json::from_value(serde_json::json!({ "steps": steps })).unwrap()
    }

    /// Joins builds `(team, template)` in order; returns how each joined.
    fn join_all(q: &mut BuildQueue<()>, builds: &[(&str, &str)]) -> Vec<Joined> {
        builds.iter().map(|(team, t)| q.join(team, t, ())).collect()
    }

    /// Ends running builds one after another; returns the order builds started in.
    fn drain(q: &mut BuildQueue<()>, first: &str) -> Vec<String> {
        let mut order = vec![first.to_string()];
        let mut current = first.to_string();
        loop {
            let started = q.finish(&current);
            match started.as_slice() {
                [] => break,
                [(next, ())] => {
                    order.push(next.clone());
                    current = next.clone();
                }
                more => panic!("one slot, {} started", more.len()),
            }
        }
        order
    }

    #[test]
    fn the_queue_serves_teams_in_turn_not_in_arrival_order() {
        let mut q = BuildQueue::new(1);
        let joined = join_all(
            &mut q,
            &[
                ("a", "a1"),
                ("a", "a2"),
                ("a", "a3"),
                ("a", "a4"),
                ("b", "b1"),
                ("c", "c1"),
                ("b", "b2"),
            ],
        );
        assert_eq!(joined[0], Joined::Started);
        // b1 arrived after a2..a4, but team b has not had the slot yet: it goes next.
        assert_eq!(joined[4], Joined::Queued { position: 1 });
        assert_eq!(q.position("c1"), Some(2));
        assert_eq!(q.position("a2"), Some(3));
        assert_eq!(q.position("b2"), Some(4));
        assert_eq!(
            q.position("a1"),
            None,
            "a running build has no place in the queue"
        );
        assert_eq!(
            drain(&mut q, "a1"),
            ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
        );
        assert!(q.running.is_empty() && q.waiting.is_empty() && q.served.is_empty());
    }

    #[test]
    fn a_team_alone_keeps_its_order_and_a_newcomer_goes_next() {
        let mut q = BuildQueue::new(1);
        join_all(&mut q, &[("a", "a1"), ("a", "a2"), ("a", "a3")]);
        let started = q.finish("a1");
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].0, "a2");
        // b joins while a2 runs and a3 waits: b is next, a3 after it.
        assert_eq!(q.join("b", "b1", ()), Joined::Queued { position: 1 });
        assert_eq!(q.position("a3"), Some(2));
        assert_eq!(drain(&mut q, "a2"), ["a2", "b1", "a3"]);
    }

    #[test]
    fn a_cancelled_build_leaves_the_queue_and_a_cancelled_runner_hands_the_slot_on() {
        let mut q = BuildQueue::new(1);
        join_all(
            &mut q,
            &[("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")],
        );
        // Waiting: taken out, nothing starts, the others move up.
        assert!(q.finish("b1").is_empty());
        assert_eq!(q.position("b2"), Some(1));
        assert_eq!(q.position("a2"), Some(2));
        assert_eq!(q.position("b1"), None);
        // Running: its slot goes to the next in turn.
        let started = q.finish("a1");
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].0, "b2");
        assert!(
            q.finish("nothing-such").is_empty(),
            "an unknown build is no change"
        );
        assert_eq!(drain(&mut q, "b2"), ["b2", "a2"]);
        // Empty again: the next build starts at once.
        assert_eq!(q.join("c", "c1", ()), Joined::Started);
    }

    #[test]
    fn more_slots_start_more_builds_and_still_take_turns() {
        let mut q = BuildQueue::new(2);
        let joined = join_all(
            &mut q,
            &[("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")],
        );
        assert_eq!(joined[..2], [Joined::Started, Joined::Started]);
        assert_eq!(joined[3], Joined::Queued { position: 1 });
        let started = q.finish("a1");
        assert_eq!(
            started.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["b1"]
        );
    }

    fn out(text: &str) -> LogLine {
        (Some(0), "stdout", text.to_string())
    }

    #[test]
    fn the_log_stores_output_up_to_its_cap_then_one_line_saying_so() {
        let mut budget = LogBudget::new(10, 0);
        let stored = budget.admit(vec![out("12345"), out("1234"), out("123"), out("1")]);
        // 5 + 4 fit; 3 more would pass 10: the truncation line, then nothing.
        assert_eq!(stored.len(), 3, "{stored:?}");
        assert_eq!(stored[..2], [out("12345"), out("1234")]);
        assert_eq!(stored[2].1, "build");
        assert!(
            stored[2].2.starts_with("... log truncated after 9 bytes"),
            "{}",
            stored[2].2
        );
        assert!(stored[2].2.contains("outputTail"), "{}", stored[2].2);
        // Later output is dropped without another notice; the build's own lines pass.
        let later = budget.admit(vec![
            out("x"),
            (None, "build", "build failed: step 0".into()),
            (Some(0), "stderr", "y".into()),
        ]);
        assert_eq!(later, [(None, "build", "build failed: step 0".to_string())]);
        assert_eq!(budget.used, 9);
    }

    #[test]
    fn a_log_budget_counts_bytes_and_what_the_log_already_holds() {
        let mut budget = LogBudget::new(8, 6);
        // "é" is 2 bytes: 6 + 2 fits exactly, one more byte does not.
        assert_eq!(budget.admit(vec![out("é")]), [out("é")]);
        let stored = budget.admit(vec![out("z")]);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].1, "build");
        assert!(LogBudget::new(8, 9).admit(vec![out("a")]).is_empty());
    }

    #[test]
    fn team_cache_directories_are_plain_names_or_hashes() {
        assert_eq!(team_cache_name("team-0123abcd"), "t-team-0123abcd");
        for odd in ["../x", "", "a/b", ".hidden", &"x".repeat(65)] {
            let name = team_cache_name(odd);
            assert!(
                name.starts_with("t=") && name.len() == 34,
                "{odd:?}: {name}"
            );
            assert!(!name.contains('/') && !name.contains(".."), "{name}");
        }
        assert_ne!(team_cache_name("a/b"), team_cache_name("a/c"));
        assert!(is_team_cache_name(&team_cache_name("a/b")));
        // Entries from before caches were per team: 32 hex digits, or half-written.
        assert!(!is_team_cache_name("0123456789abcdef0123456789abcdef"));
        assert!(!is_team_cache_name(".tmp-0123"));
    }

    #[test]
    fn a_deadline_failure_says_where_the_build_was_and_what_to_do() {
        let Failed(f) = deadline_failure(
            Progress {
                phase: "step",
                step: Some(3),
            },
            Some("run"),
        );
        assert_eq!((f.phase.as_str(), f.step), ("step", Some(3)));
        assert!(f.message.contains("deadline of 30 min"), "{}", f.message);
        assert!(f.message.contains("during step 3 (run)"), "{}", f.message);
        assert!(f.action.contains("split it"), "{}", f.action);
        let Failed(f) = deadline_failure(
            Progress {
                phase: "ready",
                step: None,
            },
            None,
        );
        assert!(f.message.contains("ready check"), "{}", f.message);
    }

    #[test]
    fn a_step_key_covers_the_base_and_every_step_before_it() {
        let a = step_keys(
            "team-a",
            "base-1",
            &request(serde_json::json!([{"run": "a"}, {"run": "b"}])),
        );
        let b = step_keys(
            "team-a",
            "base-1",
            &request(serde_json::json!([{"run": "a"}, {"run": "c"}])),
        );
        let c = step_keys(
            "team-a",
            "base-2",
            &request(serde_json::json!([{"run": "a"}])),
        );
        let other_team = step_keys(
            "team-b",
            "base-1",
            &request(serde_json::json!([{"run": "a"}, {"run": "b"}])),
        );
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[0], c[0]);
        assert_ne!(
            a[0], other_team[0],
            "a team never hits another team's entry"
        );
        assert_ne!(a[1], other_team[1]);
        assert_eq!(a[0].len(), 32);
    }
}
