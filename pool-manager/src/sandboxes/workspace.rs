//! Workspace templates: `code-interpreter`, `desktop` and `agent`, defined as template
//! specs in the repository (`templates/<name>.json`, the same JSON a user sends to
//! `POST /templates`, steps over `base`) and carried by the binary.
//!
//! Each host builds them with the template builder users have, as the operator's
//! templates, in the background after start (`serve` does not wait for them: `base` and
//! `minimal` serve at once). A build is recorded under the operator team as
//! `<name>-<key>`, the key covering the spec's bytes and everything the base snapshot
//! depends on (image set, network kind, QEMU, accelerator): a start finds the ready
//! template of its key and builds nothing, and a changed spec or image set builds anew
//! (steps that did not change come from the step cache) and drops the old one.
//!
//! Every team starts from them by name, like `base`; a create before the build is done
//! is a 503 `template_building` with the build's progress, never a wait. Their warm
//! pools are the operator's (`--warm-pool code-interpreter=N` sets one once the
//! template is ready).

use super::{Actor, Manager};
use crate::catalog::OPERATOR_TEAM_ID;
use crate::error::ApiError;
use crate::model::*;
use api_model::{StepStatus, TemplateBuildRequest, TemplateStatus, TemplateView};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The specs the binary carries, by name.
pub const SPECS: &[(&str, &str)] = &[
    (
        "code-interpreter",
        include_str!("../../../templates/code-interpreter.json"),
    ),
    ("desktop", include_str!("../../../templates/desktop.json")),
    ("agent", include_str!("../../../templates/agent.json")),
];

/// Tries a failed build gets per start (the step cache keeps what finished).
const BUILD_TRIES: u32 = 3;
/// How often the builder task looks at a build it waits for.
const POLL: Duration = Duration::from_secs(2);

/// Which workspace templates this host builds (`--workspace-templates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceMode(pub Vec<&'static str>);

impl WorkspaceMode {
    /// All of them (the default).
    pub fn all() -> Self {
        Self(api_model::WORKSPACE_TEMPLATES.to_vec())
    }

    /// `all`, `off`, or names separated by commas.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "all" | "build" => return Ok(Self::all()),
            "off" | "none" => return Ok(Self(Vec::new())),
            _ => {}
        }
        let mut names = Vec::new();
        for n in s.split(',').map(str::trim) {
            let known = api_model::WORKSPACE_TEMPLATES
                .iter()
                .find(|w| **w == n)
                .ok_or_else(|| {
                    format!(
                        "{n:?} is not a workspace template; send all, off, or names of {}",
                        api_model::WORKSPACE_TEMPLATES.join(", ")
                    )
                })?;
            if !names.contains(known) {
                names.push(*known);
            }
        }
        Ok(Self(names))
    }
}

/// A workspace template's spec.
pub fn spec(name: &str) -> Option<TemplateBuildRequest> {
    let (_, text) = SPECS.iter().find(|(n, _)| *n == name)?;
    Some(serde_json::from_str(text).expect("the repository's template specs parse"))
}

/// The operator template's name for `name` built from `spec_text` with a base of
/// `base_inputs`: `<name>-<12 hex digits>`.
pub fn record_name(name: &str, spec_text: &str, base_inputs: &str) -> String {
    let hash = Sha256::digest(format!("{spec_text}\u{0}{base_inputs}").as_bytes());
    let hex = hex::encode(&hash[..6]);
    format!("{name}-{hex}")
}

/// Host state of the workspace templates.
pub(super) struct Workspace {
    /// The operator template name of each workspace template's current build.
    names: Vec<(&'static str, String)>,
    /// Warm pools to set once their template is ready (`--warm-pool`).
    pending_pools: std::sync::Mutex<Vec<(String, api_model::WarmPoolBody)>>,
}

impl Workspace {
    pub(super) fn new(mode: WorkspaceMode, base_inputs: &str) -> Self {
        Self {
            names: SPECS
                .iter()
                .filter(|(n, _)| mode.0.contains(n))
                .map(|(n, text)| (*n, record_name(n, text, base_inputs)))
                .collect(),
            pending_pools: std::sync::Mutex::default(),
        }
    }

    /// The operator template name of workspace template `name` on this host.
    fn current(&self, name: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.as_str())
    }
}

/// "step 3 of 7 (packages)" for a template being built.
fn progress(t: &TemplateRecord) -> String {
    let total = t.steps.len();
    let done = t
        .steps
        .iter()
        .filter(|s| matches!(s.status, StepStatus::Done | StepStatus::Cached))
        .count();
    match t.steps.iter().find(|s| s.status == StepStatus::Running) {
        Some(s) => format!("step {} of {total} ({}) running", s.index + 1, s.kind),
        None if done == total => "steps done; starting and snapshotting it".into(),
        None => format!("{done} of {total} steps done"),
    }
}

impl Manager {
    /// Whether `id` names a workspace template this host knows.
    pub(super) fn is_workspace(&self, id: &str) -> bool {
        self.workspace.current(id).is_some()
    }

    /// The operator's record behind workspace template `name` (any status), if its
    /// build has been recorded.
    fn workspace_record(&self, name: &str) -> Result<Option<TemplateRecord>, ApiError> {
        let Some(current) = self.workspace.current(name) else {
            return Ok(None);
        };
        Ok(self.catalog.template(Some(OPERATOR_TEAM_ID), current)?)
    }

    /// A template every team may start from: a workspace template by name (ready, or
    /// a 503 saying how far its build is), or an operator template by ID.
    pub(super) fn shared_template(&self, id: &str) -> Result<Option<TemplateRecord>, ApiError> {
        if api_model::WORKSPACE_TEMPLATES.contains(&id) {
            if !self.is_workspace(id) {
                return Err(ApiError::not_found("template", id).with_details(serde_json::json!({
                    "hint": format!("this host does not build the {id} template (the operator's --workspace-templates leaves it out)")
                })));
            }
            return match self.workspace_record(id)? {
                Some(t) if t.status == TemplateStatus::Ready => Ok(Some(t)),
                Some(t) if t.status == TemplateStatus::Building => Err(ApiError::new(
                    503,
                    "template_building",
                    format!(
                        "template {id} is being built on this host ({}); retry in a minute (GET /templates/{id} shows its steps)",
                        progress(&t)
                    ),
                )
                .with_details(serde_json::json!({
                    "templateID": id, "status": "building", "progress": progress(&t),
                    "steps": t.steps, "retryAfterS": 30
                }))),
                Some(t) => Err(ApiError::new(
                    503,
                    "template_unavailable",
                    format!(
                        "template {id} failed to build on this host: {}; the pool manager retries it at its next start",
                        t.error.as_ref().map_or("no reason recorded", |e| e.message.as_str())
                    ),
                )
                .with_details(serde_json::json!({ "templateID": id, "status": "failed", "error": t.error }))),
                None => Err(ApiError::new(
                    503,
                    "template_building",
                    format!("template {id} is queued to be built on this host; retry in a minute"),
                )
                .with_details(serde_json::json!({ "templateID": id, "status": "building", "progress": "queued", "retryAfterS": 30 }))),
            };
        }
        if !api_model::is_template_id(id) {
            return Ok(None);
        }
        // Sandboxes made from a workspace template record the operator template's ID.
        Ok(self
            .catalog
            .template(Some(OPERATOR_TEAM_ID), id)?
            .filter(|t| t.status == TemplateStatus::Ready))
    }

    /// The view of workspace template `name`: its build's steps and status, under its
    /// own name.
    pub(super) fn workspace_view(&self, name: &str) -> Result<TemplateView, ApiError> {
        let spec = spec(name).expect("a workspace template");
        let mut view = match self.workspace_record(name)? {
            Some(t) => t.view(),
            None => TemplateView {
                template_id: String::new(),
                name: None,
                builtin: true,
                from: spec.from.clone(),
                status: TemplateStatus::Building,
                resources: spec.resources.unwrap_or_default(),
                env_vars: Default::default(),
                start_cmd: spec.start_cmd.clone(),
                ready_cmd: spec.ready_cmd.clone(),
                steps: Vec::new(),
                error: None,
                created_at: iso8601(0),
                ready_at: None,
                build_ms: None,
            },
        };
        view.template_id = name.to_string();
        view.name = Some(name.to_string());
        view.builtin = true;
        Ok(view)
    }

    /// The workspace templates' views (none when this host does not build them).
    pub(super) fn workspace_views(&self) -> Result<Vec<TemplateView>, ApiError> {
        self.workspace
            .names
            .iter()
            .map(|(n, _)| self.workspace_view(n))
            .collect()
    }

    /// The pool key of `template`: a workspace template's is its current operator
    /// template (ready, else the 503 a create gets).
    pub(super) fn pool_template(&self, template: &str) -> Result<String, ApiError> {
        if !self.is_workspace(template) {
            return Ok(template.to_string());
        }
        Ok(self
            .shared_template(template)?
            .map(|t| t.id)
            .unwrap_or_else(|| template.to_string()))
    }

    /// `--warm-pool NAME=N` for a workspace template: set once it is ready.
    pub fn defer_workspace_pool(&self, template: &str, body: api_model::WarmPoolBody) {
        self.workspace
            .pending_pools
            .lock()
            .unwrap()
            .push((template.to_string(), body));
    }

    /// Builds the workspace templates this host lacks, one after another, and drops the
    /// operator's builds of older specs or image sets. Runs in the background after
    /// start; a build that fails is tried again (with the step cache) a few times.
    pub async fn build_workspace_templates(self: Arc<Self>) {
        self.drop_stale_workspace_builds().await;
        for (name, current) in self.workspace.names.clone() {
            for attempt in 1..=BUILD_TRIES {
                match self.build_workspace(name, &current).await {
                    Ok(()) => break,
                    Err(why) => {
                        warn!(template = name, attempt, error = %why, "building a workspace template failed");
                        if attempt < BUILD_TRIES {
                            tokio::time::sleep(Duration::from_secs(30 * attempt as u64)).await;
                        }
                    }
                }
            }
            self.set_deferred_pools(name).await;
        }
    }

    /// Builds (or finds ready) one workspace template; waits for its build.
    async fn build_workspace(self: &Arc<Self>, name: &str, current: &str) -> Result<(), String> {
        let existing = self
            .catalog
            .template(Some(OPERATOR_TEAM_ID), current)
            .map_err(|e| e.to_string())?;
        let id = match existing {
            Some(t) if t.status == TemplateStatus::Ready => {
                info!(template = name, id = %t.id, "workspace template ready (built before)");
                return Ok(());
            }
            Some(t) if t.status == TemplateStatus::Building => t.id,
            Some(t) => {
                // A failed build of this key (or one a restart cut short): again.
                self.delete_template(OPERATOR_TEAM_ID, &t.id)
                    .await
                    .map_err(|e| e.message)?;
                self.start_workspace_build(name, current).await?
            }
            None => self.start_workspace_build(name, current).await?,
        };
        loop {
            tokio::time::sleep(POLL).await;
            let t = self
                .catalog
                .template(Some(OPERATOR_TEAM_ID), &id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{id} was deleted during its build"))?;
            match t.status {
                TemplateStatus::Building => continue,
                TemplateStatus::Ready => {
                    info!(template = name, id = %t.id, build_ms = t.build_ms, "workspace template built");
                    return Ok(());
                }
                TemplateStatus::Failed => {
                    return Err(t.error.map_or("no reason recorded".into(), |e| {
                        format!("{} ({}): {}", e.message, e.action, e.output_tail)
                    }))
                }
            }
        }
    }

    async fn start_workspace_build(
        self: &Arc<Self>,
        name: &str,
        current: &str,
    ) -> Result<String, String> {
        let mut request = spec(name).ok_or("no spec")?;
        request.name = Some(current.to_string());
        info!(
            template = name,
            record = current,
            "building a workspace template"
        );
        self.build_template(OPERATOR_TEAM_ID, request)
            .await
            .map(|v| v.template_id)
            .map_err(|e| e.message)
    }

    /// Deletes the operator's builds of workspace templates that are not this host's
    /// current ones (an older spec or image set).
    async fn drop_stale_workspace_builds(&self) {
        let Ok(all) = self.catalog.templates(Some(OPERATOR_TEAM_ID)) else {
            return;
        };
        for t in all {
            let Some(name) = t.name.as_deref() else {
                continue;
            };
            let stale = self.workspace.names.iter().any(|(n, current)| {
                name != current
                    && name
                        .strip_prefix(n)
                        .and_then(|r| r.strip_prefix('-'))
                        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            });
            if stale && t.status != TemplateStatus::Building {
                match self.delete_template(OPERATOR_TEAM_ID, &t.id).await {
                    Ok(()) => {
                        info!(template = name, id = %t.id, "dropped a workspace template of an older spec or image set")
                    }
                    Err(e) => {
                        warn!(template = name, error = %e.message, "dropping an old workspace template")
                    }
                }
            }
        }
    }

    async fn set_deferred_pools(&self, name: &str) {
        let pools: Vec<_> = {
            let mut pending = self.workspace.pending_pools.lock().unwrap();
            let (mine, rest): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(t, _)| t == name);
            *pending = rest;
            mine
        };
        for (template, body) in pools {
            if let Err(e) = self.set_warm_pool(Actor::Operator, &template, body).await {
                warn!(template, error = %e.message, "--warm-pool for a workspace template");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_is_a_valid_build_over_base() {
        for (name, _) in SPECS {
            let spec = spec(name).unwrap();
            assert_eq!(spec.from, "base", "{name}");
            assert!(spec.name.is_none(), "{name}: the daemon names it");
            spec.validate()
                .unwrap_or_else(|e| panic!("{name}: {}", e.message));
        }
        assert_eq!(
            SPECS.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            api_model::WORKSPACE_TEMPLATES
        );
    }

    #[test]
    fn the_code_interpreter_spec_carries_the_helper_as_it_is_in_the_repository() {
        let spec = spec("code-interpreter").unwrap();
        let helper = include_str!("../../../templates/code-interpreter/nullspace-code.py");
        let carried = spec
            .steps
            .iter()
            .flat_map(|s| s.files.iter().flatten())
            .find(|f| f.path == "/usr/local/bin/nullspace-code")
            .expect("the helper is installed");
        assert_eq!(
            carried.content, helper,
            "run templates/gen.py after editing the helper"
        );
        let desktop = spec_file("desktop", "/usr/local/bin/nullspace-desktop");
        assert_eq!(
            desktop,
            include_str!("../../../templates/desktop/nullspace-desktop.sh"),
            "run templates/gen.py after editing the desktop script"
        );
    }

    fn spec_file(name: &str, path: &str) -> String {
        spec(name)
            .unwrap()
            .steps
            .iter()
            .flat_map(|s| s.files.iter().flatten())
            .find(|f| f.path == path)
            .map(|f| f.content.clone())
            .unwrap_or_default()
    }

    #[test]
    fn the_mode_names_all_none_or_some() {
        assert_eq!(WorkspaceMode::parse("all").unwrap(), WorkspaceMode::all());
        assert!(WorkspaceMode::parse("off").unwrap().0.is_empty());
        assert_eq!(
            WorkspaceMode::parse("agent,code-interpreter,agent")
                .unwrap()
                .0,
            ["agent", "code-interpreter"]
        );
        let e = WorkspaceMode::parse("agent,base").unwrap_err();
        assert!(e.contains("\"base\" is not a workspace template"), "{e}");
    }

    #[test]
    fn a_record_name_changes_with_the_spec_and_the_base() {
        let a = record_name("agent", "{}", "images-1");
        assert!(
            a.starts_with("agent-") && a.len() == "agent-".len() + 12,
            "{a}"
        );
        assert!(api_model::is_template_name(&a));
        assert!(!api_model::is_reserved_template_name(&a));
        assert_eq!(a, record_name("agent", "{}", "images-1"));
        assert_ne!(a, record_name("agent", "{ }", "images-1"));
        assert_ne!(a, record_name("agent", "{}", "images-2"));
    }
}
