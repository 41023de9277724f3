//! Templates: custom template builds (steps, start command, ready check, build logs)
//! and warm pools (ready capacity that creates check out).

use crate::models::Resources;
use crate::sandbox::{call, client};
use crate::{ConnectionConfig, Error, Result};
use serde::Serialize;

pub use api_model::{
    BuildFailure, BuildLogLine, BuildLogPage, BuildStep, FileSpec, StepStatus, StepView,
    TemplateBuildRequest as TemplateBuild, TemplateStatus, TemplateView as Template,
};

/// A template's warm pool: the API's own shape.
pub use api_model::WarmPoolStatus as WarmPool;

/// What to set a warm pool to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WarmPoolSettings {
    /// Ready instances to keep (0 to 16; 0 empties it).
    pub size: u32,
    /// Their shape (default 2 vCPUs, 2048 MiB, 8192 MiB disk); creates check out only
    /// with the same shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Refill in the background (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<bool>,
}

/// Calls on templates.
pub struct Templates;

fn template(v: serde_json::Value) -> Result<Template> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a template: {e}")))
}

impl Templates {
    /// Starts a build; answers at once with the template (`building`). Follow it with
    /// [`Templates::wait_built`] or [`Templates::logs`].
    pub async fn build(config: &ConnectionConfig, request: &TemplateBuild) -> Result<Template> {
        let http = client(config)?;
        let body = serde_json::to_value(request).map_err(|e| Error::Protocol(e.to_string()))?;
        template(
            call(
                &http,
                config,
                reqwest::Method::POST,
                "/templates",
                Some(body),
            )
            .await?,
        )
    }

    /// Builds a template and streams its log to `on_line` as it is written; returns the
    /// template once ready. A failed build is [`Error::Api`] with code `build_failed`,
    /// its message saying which step failed and why, and the failure in `details`.
    pub async fn build_and_wait(
        config: &ConnectionConfig,
        request: &TemplateBuild,
        on_line: impl FnMut(&BuildLogLine),
    ) -> Result<Template> {
        let t = Self::build(config, request).await?;
        Self::wait_built(config, &t.template_id, on_line).await
    }

    /// Follows a build's log from its start to its end (see [`Templates::build_and_wait`]).
    pub async fn wait_built(
        config: &ConnectionConfig,
        template_id: &str,
        mut on_line: impl FnMut(&BuildLogLine),
    ) -> Result<Template> {
        let mut after = 0;
        loop {
            let page = Self::logs(config, template_id, after, 20).await?;
            for line in &page.lines {
                on_line(line);
            }
            after = page.next;
            if page.status != TemplateStatus::Building && page.lines.is_empty() {
                break;
            }
        }
        let t = Self::get(config, template_id).await?;
        match (&t.status, &t.error) {
            (TemplateStatus::Ready, _) => Ok(t),
            (_, Some(failure)) => Err(Error::Api {
                status: 422,
                code: "build_failed".into(),
                message: format!(
                    "template {} failed to build: {}",
                    t.template_id, failure.message
                ),
                details: serde_json::to_value(failure).unwrap_or_default(),
            }),
            _ => Err(Error::Protocol(format!(
                "template {} ended neither ready nor failed",
                t.template_id
            ))),
        }
    }

    /// A page of a build's log: lines after `after`, waiting up to `wait_s` (at most
    /// 20) seconds for one while the build runs.
    pub async fn logs(
        config: &ConnectionConfig,
        template_id: &str,
        after: u64,
        wait_s: u64,
    ) -> Result<BuildLogPage> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!(
                "/templates/{template_id}/logs?after={after}&wait={}",
                wait_s.min(20)
            ),
            None,
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a build log page: {e}")))
    }

    /// A template (built-in or the team's, by ID or name).
    pub async fn get(config: &ConnectionConfig, template_id: &str) -> Result<Template> {
        let http = client(config)?;
        template(
            call(
                &http,
                config,
                reqwest::Method::GET,
                &format!("/templates/{template_id}"),
                None,
            )
            .await?,
        )
    }

    /// The built-in templates and the team's own.
    pub async fn list(config: &ConnectionConfig) -> Result<Vec<Template>> {
        let http = client(config)?;
        let v = call(&http, config, reqwest::Method::GET, "/templates", None).await?;
        serde_json::from_value(v["templates"].clone())
            .map_err(|e| Error::Protocol(format!("templates: {e}")))
    }

    /// Deletes a template (cancelling its build if it runs); its sandboxes keep running.
    pub async fn delete(config: &ConnectionConfig, template_id: &str) -> Result<()> {
        let http = client(config)?;
        call(
            &http,
            config,
            reqwest::Method::DELETE,
            &format!("/templates/{template_id}"),
            None,
        )
        .await
        .map(drop)
    }

    /// A template's warm pool.
    pub async fn warm_pool(config: &ConnectionConfig, template: &str) -> Result<WarmPool> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!("/templates/{template}/warm-pool"),
            None,
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a warm pool: {e}")))
    }

    /// Sets a template's warm pool; it fills in the background.
    pub async fn set_warm_pool(
        config: &ConnectionConfig,
        template: &str,
        settings: &WarmPoolSettings,
    ) -> Result<WarmPool> {
        let http = client(config)?;
        let body = serde_json::to_value(settings).map_err(|e| Error::Protocol(e.to_string()))?;
        let v = call(
            &http,
            config,
            reqwest::Method::PUT,
            &format!("/templates/{template}/warm-pool"),
            Some(body),
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a warm pool: {e}")))
    }
}
