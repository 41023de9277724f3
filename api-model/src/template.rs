//! Custom templates: the build request (`POST /templates`), its stateless checks, and
//! the shapes callers read back (the template, its steps, a failure, build log pages).

use crate::{ApiError, Resources};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// The built-in templates: always there, never built or deleted.
pub const BUILTIN_TEMPLATES: &[&str] = &["base", "minimal"];

/// The workspace templates: specs in the repository (`templates/<name>.json`, steps
/// over `base`) that each host builds with the template builder, as the operator's, and
/// every team may start from by name once built (`GET /templates` says their status).
pub const WORKSPACE_TEMPLATES: &[&str] = &["code-interpreter", "desktop", "agent"];

/// Whether `name` is a template no team may name its own: a built-in or a workspace
/// template.
pub fn is_reserved_template_name(name: &str) -> bool {
    BUILTIN_TEMPLATES.contains(&name) || WORKSPACE_TEMPLATES.contains(&name)
}

/// Most build steps in one template.
pub const MAX_BUILD_STEPS: usize = 64;
/// Default time one `run` or `packages` step may take, in seconds.
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 600;
/// Longest time one step may be given, in seconds.
pub const MAX_STEP_TIMEOUT_S: u64 = 3600;
/// Default time the ready check may take to pass, in seconds.
pub const DEFAULT_READY_TIMEOUT_S: u64 = 60;
/// Longest ready-check window, in seconds.
pub const MAX_READY_TIMEOUT_S: u64 = 600;
/// Longest build log page.
pub const MAX_LOG_PAGE: usize = 1000;
/// Longest a log request may wait for new lines, in seconds.
pub const MAX_LOG_WAIT_S: u64 = 20;

/// Whether `id` has the shape of a custom template ID (`tpl-` + 16 hex digits).
pub fn is_template_id(id: &str) -> bool {
    id.strip_prefix("tpl-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Body of `POST /templates`: a base and the steps that make the template from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateBuildRequest {
    /// A name unique within the team, usable as `templateID` in creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the build starts from: `base`, `minimal`, or a ready template of the team.
    #[serde(default = "default_from")]
    pub from: String,
    /// Run in order; each one's result is cached by everything before it.
    #[serde(default)]
    pub steps: Vec<BuildStep>,
    /// A long-running process the template's sandboxes start with (run in the
    /// background as the default user, in /workspace, with the template's env).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// A command that exits 0 once the template is ready; retried until it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    /// Seconds the ready check may take (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<u64>,
    /// The shape the template is built (and its sandboxes run) with. Memory and vCPUs
    /// are fixed by the snapshot; a sandbox's disk may grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

fn default_from() -> String {
    "base".into()
}

/// One build step: exactly one of `run`, `packages`, `files`, `env`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuildStep {
    /// A shell command (`/bin/sh -c`); a non-zero exit fails the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Debian packages to install with apt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    /// Files to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileSpec>>,
    /// Environment for later steps, the start command and the template's sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// User a `run` step runs as, or `files` belong to (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Working directory of a `run` step (default /).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Seconds a `run` or `packages` step may take (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

impl BuildStep {
    /// A `run` step: a shell command, as root in /.
    pub fn run(command: impl Into<String>) -> Self {
        Self {
            run: Some(command.into()),
            ..Self::default()
        }
    }

    /// A `packages` step: Debian packages installed with apt.
    pub fn packages<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self {
            packages: Some(names.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    /// A `files` step writing one file (mode 0644, owned by root).
    pub fn file(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            files: Some(vec![FileSpec {
                path: path.into(),
                content: content.into(),
                mode: None,
            }]),
            ..Self::default()
        }
    }

    /// An `env` step.
    pub fn env<K: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            env: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            ..Self::default()
        }
    }

    /// The same step, run as (or its files owned by) `user`.
    pub fn as_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
}

impl Default for TemplateBuildRequest {
    fn default() -> Self {
        Self {
            name: None,
            from: default_from(),
            steps: Vec::new(),
            start_cmd: None,
            ready_cmd: None,
            ready_timeout: None,
            resources: None,
        }
    }
}

/// A file a `files` step writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path in the guest; parent directories are made.
    pub path: String,
    /// UTF-8 content.
    pub content: String,
    /// Octal permission bits as a string, e.g. "0755" (default "0644").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// What a validated step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepAction {
    Run(String),
    Packages(Vec<String>),
    Files(Vec<(String, String, u32)>),
    Env(BTreeMap<String, String>),
}

impl StepAction {
    /// The step's kind as the API names it.
    pub fn kind(&self) -> &'static str {
        match self {
            StepAction::Run(_) => "run",
            StepAction::Packages(_) => "packages",
            StepAction::Files(_) => "files",
            StepAction::Env(_) => "env",
        }
    }
}

/// A step that passed the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidStep {
    pub action: StepAction,
    pub user: String,
    pub cwd: String,
    pub timeout_s: u64,
}

fn step_error(index: usize, message: String) -> ApiError {
    ApiError::bad_request(format!("steps[{index}]: {message}"))
        .with_details(json!({ "field": format!("steps[{index}]") }))
}

fn field_error(field: &str, message: String) -> ApiError {
    ApiError::bad_request(message).with_details(json!({ "field": field }))
}

fn is_env_name(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

fn is_package_name(p: &str) -> bool {
    // Debian's package names (with an optional `=version`): never a shell word or an
    // apt option.
    let name = p.split_once('=').map_or(p, |(n, _)| n);
    name.len() >= 2
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && p.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.=:~".contains(&c))
}

fn is_user_name(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

impl BuildStep {
    fn validate(&self, index: usize) -> Result<ValidStep, ApiError> {
        let given: Vec<&str> = [
            ("run", self.run.is_some()),
            ("packages", self.packages.is_some()),
            ("files", self.files.is_some()),
            ("env", self.env.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        if given.len() != 1 {
            return Err(step_error(
                index,
                format!(
                    "a step has exactly one of run, packages, files, env; this one has {}",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(" and ")
                    }
                ),
            ));
        }
        let action = if let Some(cmd) = &self.run {
            if cmd.trim().is_empty() || cmd.len() > 65_536 {
                return Err(step_error(
                    index,
                    "run must be a non-empty shell command of at most 64 KiB".into(),
                ));
            }
            StepAction::Run(cmd.clone())
        } else if let Some(pkgs) = &self.packages {
            if pkgs.is_empty() || pkgs.len() > 200 {
                return Err(step_error(
                    index,
                    "packages must list 1 to 200 Debian package names".into(),
                ));
            }
            if let Some(bad) = pkgs.iter().find(|p| !is_package_name(p)) {
                return Err(step_error(
                    index,
                    format!("{bad:?} is not a Debian package name; send names like \"python3-numpy\" or \"jq=1.6-2.1\""),
                ));
            }
            StepAction::Packages(pkgs.clone())
        } else if let Some(files) = &self.files {
            if files.is_empty() || files.len() > 100 {
                return Err(step_error(index, "files must list 1 to 100 files".into()));
            }
            let mut out = Vec::new();
            for f in files {
                if !f.path.starts_with('/') || f.path.contains('\0') || f.path.len() > 4096 {
                    return Err(step_error(
                        index,
                        format!(
                            "file path {:?} must be absolute, e.g. \"/etc/app.conf\"",
                            f.path
                        ),
                    ));
                }
                let mode = match &f.mode {
                    None => 0o644,
                    Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| step_error(index, format!("mode {m:?} of {} is not octal permission bits; send e.g. \"0755\"", f.path)))?,
                };
                out.push((f.path.clone(), f.content.clone(), mode));
            }
            StepAction::Files(out)
        } else {
            let env = self.env.clone().unwrap_or_default();
            if env.is_empty() || env.len() > 100 {
                return Err(step_error(index, "env must set 1 to 100 variables".into()));
            }
            if let Some(k) = env.keys().find(|k| !is_env_name(k)) {
                return Err(step_error(index, format!("{k:?} is not a variable name; send letters, digits and _ (not starting with a digit)")));
            }
            StepAction::Env(env)
        };
        let runs = matches!(action, StepAction::Run(_) | StepAction::Packages(_));
        if self.timeout.is_some() && !runs {
            return Err(step_error(
                index,
                "timeout applies to run and packages steps only; omit it".into(),
            ));
        }
        if self.cwd.is_some() && !matches!(action, StepAction::Run(_)) {
            return Err(step_error(
                index,
                "cwd applies to run steps only; omit it".into(),
            ));
        }
        if self.user.is_some() && !matches!(action, StepAction::Run(_) | StepAction::Files(_)) {
            return Err(step_error(
                index,
                "user applies to run and files steps only; omit it".into(),
            ));
        }
        let timeout_s = self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT_S);
        if !(1..=MAX_STEP_TIMEOUT_S).contains(&timeout_s) {
            return Err(step_error(
                index,
                format!(
                    "timeout {timeout_s} is out of range; send 1 to {MAX_STEP_TIMEOUT_S} seconds"
                ),
            ));
        }
        let user = self.user.clone().unwrap_or_else(|| "root".into());
        if !is_user_name(&user) {
            return Err(step_error(
                index,
                format!("user {user:?} is not a user name; send e.g. \"root\" or \"user\""),
            ));
        }
        let cwd = self.cwd.clone().unwrap_or_else(|| "/".into());
        if !cwd.starts_with('/') {
            return Err(step_error(
                index,
                format!("cwd {cwd:?} must be an absolute path"),
            ));
        }
        Ok(ValidStep {
            action,
            user,
            cwd,
            timeout_s,
        })
    }
}

/// A build request that passed every check that needs no state.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidBuild {
    pub steps: Vec<ValidStep>,
    pub ready_timeout_s: u64,
}

/// Whether `name` may name a template: 1-64 of `a-z 0-9 - _ .`, starting with a letter
/// or digit, and not taken by built-in templates or ID shapes.
pub fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c))
        && !name.starts_with("tpl-")
        && !name.starts_with("snap-")
        && !name.starts_with("sbx-")
}

impl TemplateBuildRequest {
    /// Every check that needs no state.
    pub fn validate(&self) -> Result<ValidBuild, ApiError> {
        if let Some(name) = &self.name {
            if !is_template_name(name) || is_reserved_template_name(name) {
                return Err(field_error(
                    "name",
                    format!("name {name:?} is not usable; send 1 to 64 of a-z, 0-9, '-', '_', '.', starting with a letter or digit, not a built-in template's name or an ID prefix (tpl-, snap-, sbx-)"),
                ));
            }
        }
        if self.from.is_empty() || self.from.len() > 128 {
            return Err(field_error(
                "from",
                "from must name a template; send \"base\", \"minimal\" or one of your templates"
                    .into(),
            ));
        }
        if self.steps.len() > MAX_BUILD_STEPS {
            return Err(field_error(
                "steps",
                format!(
                    "{} steps is too many; send at most {MAX_BUILD_STEPS} (join commands with &&)",
                    self.steps.len()
                ),
            ));
        }
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| s.validate(i))
            .collect::<Result<Vec<_>, _>>()?;
        for (field, cmd) in [("startCmd", &self.start_cmd), ("readyCmd", &self.ready_cmd)] {
            if let Some(c) = cmd {
                if c.trim().is_empty() || c.len() > 65_536 {
                    return Err(field_error(field, format!("{field} must be a non-empty shell command of at most 64 KiB; omit it for none")));
                }
            }
        }
        let ready_timeout_s = self.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT_S);
        if self.ready_timeout.is_some() && self.ready_cmd.is_none() {
            return Err(field_error(
                "readyTimeout",
                "readyTimeout needs a readyCmd; send one, or omit readyTimeout".into(),
            ));
        }
        if !(1..=MAX_READY_TIMEOUT_S).contains(&ready_timeout_s) {
            return Err(field_error(
                "readyTimeout",
                format!("readyTimeout {ready_timeout_s} is out of range; send 1 to {MAX_READY_TIMEOUT_S} seconds"),
            ));
        }
        if let Some(r) = &self.resources {
            r.validate()?;
        }
        Ok(ValidBuild {
            steps,
            ready_timeout_s,
        })
    }
}

/// Where a template is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateStatus {
    /// Its build is running.
    Building,
    /// Sandboxes can be created from it.
    Ready,
    /// Its build failed; `error` says where and why.
    Failed,
}

/// Where one step of a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    /// Done in this build.
    Done,
    /// Its result came from an earlier build with the same base and steps so far.
    Cached,
    Failed,
    /// Not run: an earlier step failed.
    Skipped,
}

/// One step of a template, as built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    pub index: u32,
    /// `run`, `packages`, `files` or `env`.
    pub kind: String,
    /// A one-line description (the command, the packages, the paths, the names).
    pub summary: String,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Why a build failed: where, what happened, and the output that says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildFailure {
    /// `base` (starting from `from`), `step`, `start`, `ready` or `snapshot`.
    pub phase: String,
    /// The failed step's index, for phase `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The last lines the failing command wrote.
    #[serde(default)]
    pub output_tail: String,
    /// What to do about it.
    pub action: String,
}

/// A template as `GET /templates/{id}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Built-in templates (`base`, `minimal`) are always ready and have no steps; the
    /// workspace templates (`code-interpreter`, `desktop`, `agent`) are built-in too,
    /// built on each host from the repository's specs (their status and steps say how
    /// far).
    pub builtin: bool,
    pub from: String,
    pub status: TemplateStatus,
    pub resources: Resources,
    /// Environment its sandboxes start with (a create's envVars win).
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<BuildFailure>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
}

/// One line of a build log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildLogLine {
    /// Increasing from 1 within a template's log.
    pub seq: u64,
    /// ISO 8601.
    pub time: String,
    /// The step's index, or absent for the build's own lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// `stdout`, `stderr` or `build`.
    pub stream: String,
    pub text: String,
}

/// A page of a build log: `GET /templates/{id}/logs?after=SEQ&wait=S`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildLogPage {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The template's status when the page was read: once not `building`, no line
    /// follows the page's last.
    pub status: TemplateStatus,
    pub lines: Vec<BuildLogLine>,
    /// The `after` to send for the next page.
    pub next: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> Result<ValidBuild, ApiError> {
        let r: TemplateBuildRequest = crate::parse_body(v.to_string().as_bytes())?;
        r.validate()
    }

    #[test]
    fn a_step_has_exactly_one_action() {
        let e = req(json!({"steps": [{"run": "true", "env": {"A": "1"}}]})).unwrap_err();
        assert!(
            e.message.contains("steps[0]") && e.message.contains("run and env"),
            "{}",
            e.message
        );
        let e = req(json!({"steps": [{"user": "root"}]})).unwrap_err();
        assert!(e.message.contains("has none"), "{}", e.message);
        let e = req(json!({"steps": [{"shell": "x"}]})).unwrap_err();
        assert!(e.message.contains("shell"), "{}", e.message);
    }

    #[test]
    fn package_names_cannot_smuggle_options_or_shell() {
        for bad in ["-o", "a;rm", "Foo", "x", "a b"] {
            let e = req(json!({"steps": [{"packages": [bad]}]})).unwrap_err();
            assert!(
                e.message.contains("not a Debian package name"),
                "{bad}: {}",
                e.message
            );
        }
        assert!(
            req(json!({"steps": [{"packages": ["python3-numpy", "jq=1.6-2.1", "g++"]}]})).is_ok()
        );
    }

    #[test]
    fn options_that_do_not_apply_are_refused() {
        let e = req(json!({"steps": [{"env": {"A": "1"}, "timeout": 5}]})).unwrap_err();
        assert!(e.message.contains("timeout applies"), "{}", e.message);
        let e = req(json!({"readyTimeout": 5})).unwrap_err();
        assert!(e.message.contains("needs a readyCmd"), "{}", e.message);
        let e = req(json!({"steps": [{"files": [{"path": "rel", "content": ""}]}]})).unwrap_err();
        assert!(e.message.contains("absolute"), "{}", e.message);
        let e = req(json!({"steps": [{"files": [{"path": "/a", "content": "", "mode": "999"}]}]}))
            .unwrap_err();
        assert!(e.message.contains("octal"), "{}", e.message);
        for reserved in ["base", "code-interpreter", "desktop", "agent"] {
            let e = req(json!({ "name": reserved })).unwrap_err();
            assert!(
                e.message.contains("not usable"),
                "{reserved}: {}",
                e.message
            );
        }
    }

    #[test]
    fn a_full_request_passes_with_defaults() {
        let v = req(json!({
            "name": "web-1", "from": "base",
            "steps": [
                {"env": {"PORT": "8000"}},
                {"files": [{"path": "/srv/index.html", "content": "hi", "mode": "0600"}]},
                {"run": "echo hi", "user": "user", "cwd": "/tmp", "timeout": 30}
            ],
            "startCmd": "python3 -m http.server", "readyCmd": "true", "readyTimeout": 10
        }))
        .unwrap();
        assert_eq!(v.steps.len(), 3);
        assert_eq!(v.steps[0].user, "root");
        assert_eq!(v.steps[2].timeout_s, 30);
        assert_eq!(v.ready_timeout_s, 10);
        match &v.steps[1].action {
            StepAction::Files(f) => assert_eq!(f[0].2, 0o600),
            other => panic!("{other:?}"),
        }
        assert!(is_template_id("tpl-0123456789abcdef"));
        assert!(!is_template_id("tpl-xyz"));
    }
}
