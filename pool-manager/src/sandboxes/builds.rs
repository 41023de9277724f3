//! Custom template builds: a base template plus steps (packages, files, env, commands),
//! a start command and a ready check, run in a VM and ended as a stored snapshot of the
//! ready VM, addressable as `tpl-…` (or the template's name).
//!
//! Each step's result is cached on this host as a snapshot of the build VM, keyed by the
//! base snapshot and every step up to it: a build whose first steps match an earlier one
//! restores the newest matching snapshot and runs only the rest. One build runs at a time
//! per host (a build VM is as heavy as any sandbox, and the step cache is pruned between
//! builds, when no build VM stands on one of its entries).
//!
//! The build log goes to the catalog line by line as output arrives; callers read it in
//! pages that wait for new lines (`GET /templates/{id}/logs?after=&wait=`), which the
//! SDKs turn into a stream.

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
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::snapshots::{self as stored, Kind, NewSnapshot};
use tracing::{info, warn, Instrument};
use vmm::{QemuVm, RestoreOptions, Snapshot};

/// Step snapshots kept in the build cache (oldest used go first).
const CACHE_ENTRIES: usize = 16;
/// Builds a team may have running or queued at once.
const MAX_BUILDS_PER_TEAM: usize = 2;
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

/// Builds in progress and what waits on their logs.
pub(super) struct Builds {
    /// One build at a time on this host.
    slot: tokio::sync::Semaphore,
    /// Running (or queued) builds, to cancel on delete or shutdown.
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Woken on every log flush and status change.
    activity: tokio::sync::Notify,
}

impl Default for Builds {
    fn default() -> Self {
        Self {
            slot: tokio::sync::Semaphore::new(1),
            running: Mutex::default(),
            activity: tokio::sync::Notify::new(),
        }
    }
}

/// A new template ID.
fn new_template_id() -> String {
    format!("tpl-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// The cache keys of a build's steps: each covers the base and every step up to it.
fn step_keys(base_key: &str, request: &TemplateBuildRequest) -> Vec<String> {
    let mut key = hex(&Sha256::digest(base_key.as_bytes()));
    request
        .steps
        .iter()
        .map(|step| {
            let step = serde_json::to_string(step).expect("json");
            key = hex(&Sha256::digest(format!("{key}|{step}").as_bytes()))[..32].to_string();
            key.clone()
        })
        .collect()
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
    pending: Vec<(Option<u32>, &'static str, String)>,
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
    /// Appends build-level and output lines to a template's log and wakes readers.
    fn write_log(&self, template: &str, lines: Vec<(Option<u32>, &'static str, String)>) {
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
        match self.catalog.template(team, id)? {
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
                    "field": "from", "available": BUILTIN, "hint": "or a ready template of your team (GET /templates)"
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
            request,
        };
        {
            // Counted and recorded under one lock, so a burst cannot overshoot.
            let _one_at_a_time = self.admission.lock().unwrap();
            let unfinished = self
                .catalog
                .templates(Some(team))?
                .iter()
                .filter(|t| t.status == TemplateStatus::Building)
                .count();
            if unfinished >= MAX_BUILDS_PER_TEAM {
                return Err(ApiError::new(
                    429,
                    "too_many_builds",
                    format!("the team has {unfinished} template builds running or queued, the most it may have; wait for one to end (GET /templates), or delete one"),
                ));
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
        let span = tracing::info_span!("template_build", template = %id);
        let task = tokio::spawn(
            async move {
                this.run_build(record, valid.steps, valid.ready_timeout_s)
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

    /// Runs a build to its end and records the outcome.
    async fn run_build(&self, mut t: TemplateRecord, steps: Vec<ValidStep>, ready_timeout_s: u64) {
        let _one_build = self.builds.slot.acquire().await.expect("never closed");
        let started = Instant::now();
        self.log_line(&t.id, None, format!("building {} from {}", t.id, t.base));
        let result = self.build_steps(&mut t, &steps, ready_timeout_s).await;
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
        self.prune_build_cache();
    }

    fn build_cache(&self) -> PathBuf {
        self.state_dir.join("build-cache")
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
        for (i, key) in keys.iter().enumerate().rev() {
            let Ok(snapshot) = Snapshot::open(self.build_cache().join(key)) else {
                continue;
            };
            // Marks it recently used, for pruning.
            let _ = std::fs::File::open(snapshot.dir())
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            match self.vmm.restore(&snapshot, &options).await {
                Ok(mut vm) => {
                    self.seat_open(&mut vm, &t.id);
                    return Ok((vm, i + 1));
                }
                Err(e) => {
                    warn!(template = %t.id, error = %e, "a cached step would not restore; dropping it");
                    let _ = std::fs::remove_dir_all(snapshot.dir());
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

    async fn build_steps(
        &self,
        t: &mut TemplateRecord,
        steps: &[ValidStep],
        ready_timeout_s: u64,
    ) -> Result<String, Failed> {
        let keys = step_keys(&self.base_key(t).await?, &t.request);
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
            t.steps[i].status = StepStatus::Running;
            let _ = self.save_template(t);
            self.log_line(
                &t.id,
                Some(i as u32),
                format!("step {i} ({}): {}", step.action.kind(), t.steps[i].summary),
            );
            let started = Instant::now();
            self.run_step(&t.id, i as u32, vm.agent(), step, &env)
                .await?;
            t.steps[i].status = StepStatus::Done;
            t.steps[i].duration_ms = Some(started.elapsed().as_millis() as u64);
            if !matches!(step.action, StepAction::Env(_)) {
                self.cache_step(&mut vm, &keys[i]).await;
            }
        }
        t.env_vars = env.clone();
        let _ = self.save_template(t);
        let start = match &t.request.start_cmd {
            Some(cmd) => Some(self.start_command(&t.id, vm.agent(), cmd, &env).await?),
            None => None,
        };
        self.wait_ready(t, vm.agent(), &env, start, ready_timeout_s)
            .await?;
        self.log_line(&t.id, None, "snapshotting the ready VM".into());
        self.store_template(t, &mut vm).await.map_err(|e| {
            Failed::new(
                "snapshot",
                None,
                format!("storing the template's snapshot: {}", e.message),
                "check the snapshot store and free disk space, then build again",
            )
        })
    }

    /// Runs one step in the build VM.
    async fn run_step(
        &self,
        template: &str,
        index: u32,
        agent: &AgentClient,
        step: &ValidStep,
        env: &BTreeMap<String, String>,
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
            // Names are checked to be Debian package names: safe as shell words.
            StepAction::Packages(p) => format!(
                "apt-get update -q && apt-get install -y -q --no-install-recommends {}",
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
        let outcome = run_logged(
            agent,
            request,
            &mut log,
            Duration::from_secs(step.timeout_s),
        )
        .await;
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

    /// Snapshots the build VM (it keeps running) into the step cache under `key`.
    async fn cache_step(&self, vm: &mut QemuVm, key: &str) {
        let dir = self.build_cache().join(key);
        let tmp = self
            .build_cache()
            .join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let _ = std::fs::create_dir_all(self.build_cache());
        match vm.snapshot(&tmp, true).await {
            Ok(_) => {
                let _ = std::fs::remove_dir_all(&dir);
                if std::fs::rename(&tmp, &dir).is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            // The build goes on: a missing cache entry costs time, not correctness.
            Err(e) => warn!(key, error = %e, "caching a build step failed"),
        }
    }

    /// Keeps the newest [`CACHE_ENTRIES`] step snapshots; drops half-written ones.
    fn prune_build_cache(&self) {
        let Ok(entries) = std::fs::read_dir(self.build_cache()) else {
            return;
        };
        let mut kept = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") {
                // No build runs now (this runs as the slot is given back): a leftover.
                if self.builds.slot.available_permits() > 0 {
                    let _ = std::fs::remove_dir_all(e.path());
                }
                continue;
            }
            let used = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            kept.push((used, e.path()));
        }
        kept.sort();
        let surplus = kept.len().saturating_sub(CACHE_ENTRIES);
        for (_, path) in kept.into_iter().take(surplus) {
            let _ = std::fs::remove_dir_all(path);
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
    ) -> Result<(), Failed> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(ready_timeout_s);
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
        self.check_disk_space(vm, t.resources.mem_mib)?;
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
        self.catalog
            .template(Some(team), id)?
            .map(|t| t.view())
            .ok_or_else(|| ApiError::not_found("template", id))
    }

    /// The built-in templates and the team's own, oldest first.
    pub fn list_templates(&self, team: &str) -> Result<Vec<TemplateView>, ApiError> {
        let mut out: Vec<TemplateView> = BUILTIN.iter().map(|b| builtin_view(b)).collect();
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
        if BUILTIN.contains(&id) {
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
            if t.status != TemplateStatus::Building {
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

    #[test]
    fn a_step_key_covers_the_base_and_every_step_before_it() {
        let a = step_keys(
            "base-1",
            &request(serde_json::json!([{"run": "a"}, {"run": "b"}])),
        );
        let b = step_keys(
            "base-1",
            &request(serde_json::json!([{"run": "a"}, {"run": "c"}])),
        );
        let c = step_keys("base-2", &request(serde_json::json!([{"run": "a"}])));
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[0], c[0]);
        assert_eq!(a[0].len(), 32);
    }
}
