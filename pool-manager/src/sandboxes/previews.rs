//! The sandbox side of preview URLs: issuing signed URLs and proxy targets, public
//! ports, and waking a paused sandbox with autoResume for preview traffic and data-plane
//! calls alike.

use super::Manager;
use crate::error::ApiError;
use crate::model::*;
use crate::preview::{subject, PROXY_HEADER, TOKEN_PARAM};
use crate::tokens::{bump_preview_epoch, preview_epoch};
use agent_client::AgentClient;
use api_model::PreviewBody;
use std::sync::Arc;
use std::time::Duration;

/// How long traffic to a paused sandbox with autoResume waits for it to wake.
pub const WAKE_WINDOW: Duration = Duration::from_secs(30);

/// Why traffic cannot reach a sandbox now.
pub enum Wake {
    /// Not now (paused without autoResume, still waking, starting): 503, retry.
    Unavailable(String),
    /// Not at all (unknown, deleted, failed).
    Gone(ApiError),
}

/// A preview URL and proxy target.
pub type PreviewView = api_model::Preview;
use api_model::ProxyTarget;

impl Manager {
    /// A signed preview URL and proxy target for `port` of a running or paused sandbox;
    /// `public` (if given) first makes the port reachable without a token, or private.
    /// Making it private (`public: false`, whatever it was) also ends every preview URL
    /// and proxy target issued for the port before: only the ones returned here open it.
    pub async fn create_preview(
        &self,
        team: &str,
        id: &str,
        body: PreviewBody,
    ) -> Result<PreviewView, ApiError> {
        let (port, expires_in) = body.validate()?;
        let (_guard, mut r) = self.lock_owned(team, id).await?;
        if matches!(
            r.state,
            InternalState::Deleted | InternalState::Failed | InternalState::Destroying
        ) {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}: it serves no previews",
                r.state.public()
            )));
        }
        if let Some(public) = body.public {
            r.public_ports.retain(|p| *p != port);
            if public {
                r.public_ports.push(port);
            } else {
                // Written (synced) before the new tokens leave, like every epoch move.
                bump_preview_epoch(&mut r, port, chrono::Utc::now().timestamp_millis());
            }
            self.catalog.put_sandbox(&r)?;
            self.catalog.append_event(
                id,
                "sandbox.preview_port",
                &serde_json::json!({ "port": port, "public": public }),
            )?;
        }
        let expires = chrono::Utc::now().timestamp() + expires_in as i64;
        let epoch = preview_epoch(&r, port);
        let token = self.tokens.issue(&subject(id, port, false), epoch, expires);
        let proxy_token = self.tokens.issue(&subject(id, port, true), epoch, expires);
        let host = format!("{port}-{id}.{}", self.preview_domain);
        let base = format!("http://{host}/");
        let public = r.public_ports.contains(&port);
        Ok(PreviewView {
            port,
            public,
            url: if public {
                base.clone()
            } else {
                format!("{base}?{TOKEN_PARAM}={token}")
            },
            host,
            token,
            expires_at: iso8601(expires * 1000),
            proxy_target: ProxyTarget {
                url: base,
                header: PROXY_HEADER.into(),
                token: proxy_token,
            },
        })
    }

    /// The agent of the sandbox `r` traffic is for, waking it (within `window`) if it is
    /// paused with autoResume. `by` names the traffic in the `sandbox.auto_resumed`
    /// event: `preview` or `data-plane`.
    pub async fn wake_agent(
        self: &Arc<Self>,
        r: &SandboxRecord,
        window: Duration,
        by: &'static str,
    ) -> Result<AgentClient, Wake> {
        let id = r.id.as_str();
        match r.state {
            InternalState::Active => {
                return self
                    .running_agent(r)
                    .await
                    .map_err(|e| Wake::Unavailable(e.message))
            }
            InternalState::Stopped if r.auto_resume => {
                let started = std::time::Instant::now();
                // The wake goes on even if this request stops waiting: cancelling a
                // restore half-way would help no one.
                let this = self.clone();
                let (team, sandbox) = (r.team_id.clone(), id.to_string());
                let wake = tokio::spawn(async move { this.resume(&team, &sandbox).await });
                match tokio::time::timeout(window, wake).await {
                    Ok(Ok(Ok(_))) => {
                        tracing::info!(sandbox = %id, by, elapsed_ms = started.elapsed().as_millis() as u64, "woken by traffic");
                        let _ = self.catalog.append_event(
                            id,
                            "sandbox.auto_resumed",
                            &serde_json::json!({ "by": by, "elapsedMs": started.elapsed().as_millis() as u64 }),
                        );
                    }
                    Ok(Ok(Err(e))) => {
                        return Err(Wake::Unavailable(format!(
                            "waking sandbox {id} failed: {}; retry",
                            e.message
                        )))
                    }
                    Ok(Err(_)) | Err(_) => {
                        return Err(Wake::Unavailable(format!(
                            "sandbox {id} is still waking up; retry in a few seconds"
                        )))
                    }
                }
            }
            InternalState::Stopped => {
                return Err(Wake::Unavailable(format!(
                    "sandbox {id} is paused and traffic does not wake it (lifecycle.autoResume is off); resume or connect it"
                )))
            }
            InternalState::New | InternalState::Creating => {
                return Err(Wake::Unavailable(format!(
                    "sandbox {id} is still starting; retry in a few seconds"
                )))
            }
            _ => {
                return Err(Wake::Gone(ApiError::new(
                    410,
                    "sandbox_gone",
                    format!("sandbox {id} is {}; its previews are gone", r.state.public()),
                )))
            }
        }
        // Woken just now: the record read before is stale.
        self.agent(id)
            .await
            .map(|(agent, _)| agent)
            .map_err(|e| Wake::Unavailable(e.message))
    }

    /// The agent of sandbox `r`, a record the caller has just read (the preview listener
    /// and the data-plane edge read it to check the request's token), if it runs: one
    /// catalog read per request instead of a second in [`Manager::agent`].
    pub async fn running_agent(&self, r: &SandboxRecord) -> Result<AgentClient, ApiError> {
        let slot = self.slot(&r.id);
        let vm = slot.lock().await;
        if vm.is_none() {
            // Moved away while this waited (a live migration holds the slot)?
            if let Some(now) = self.catalog.sandbox(&r.id)? {
                super::here(&now)?;
            }
        }
        match vm.as_ref() {
            Some(vm) if r.state == InternalState::Active => Ok(vm.agent().clone()),
            _ => Err(ApiError::conflict(format!(
                "sandbox {} is {}; connect to resume it",
                r.id,
                r.state.public()
            ))),
        }
    }
}
