//! Any host answers any request: one about a sandbox another host owns goes to that
//! host (its control API or its data plane), found through the catalog (with a short
//! cache) and sent with a loop guard.

use super::forward::{forward, HostHeader, FORWARDED_BY};
use crate::error::ApiError;
use crate::sandboxes::Manager;
use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which of a host's listeners a request came to (and goes to on the owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// The control API.
    Control,
    /// The data-plane edge.
    Edge,
    /// The preview listener (`<port>-<sandbox>.<domain>`: the `Host` names the sandbox
    /// and goes to the owner as it came).
    Preview,
}

/// Where a request about a sandbox is served.
pub enum Routed {
    /// Here: this host owns it, no host does, or this is not a cluster.
    Here(Request<Body>),
    /// On another host: its answer (or why it could not be had).
    There(Response),
}

/// How long an owner looked up is believed: ownership moves only on failover and
/// drain, and a stale answer costs one refused hop (the loop guard), not a wrong host.
const OWNER_TTL: Duration = Duration::from_secs(2);

/// A sandbox's owner as looked up (a host ID, or none), and when.
type Looked = (Option<String>, Instant);

/// Owners looked up lately, by sandbox ID.
static OWNERS: Mutex<Option<HashMap<String, Looked>>> = Mutex::new(None);

/// The host that owns sandbox `id`, if the catalog names one.
fn owner_of(m: &Manager, id: &str) -> Result<Option<String>, ApiError> {
    {
        let cache = OWNERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((owner, at)) = cache.as_ref().and_then(|c| c.get(id)) {
            if at.elapsed() < OWNER_TTL {
                return Ok(owner.clone());
            }
        }
    }
    let owner = m.catalog.sandbox(id)?.and_then(|r| r.host_id);
    let mut cache = OWNERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = cache.get_or_insert_with(HashMap::new);
    if map.len() > 10_000 {
        map.clear();
    }
    map.insert(id.to_string(), (owner.clone(), Instant::now()));
    Ok(owner)
}

/// Forgets sandbox `id`'s owner as looked up: it just moved (a live migration), and a
/// request must not be served by its old host meanwhile.
pub fn forget_owner(id: &str) {
    let mut cache = OWNERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(map) = cache.as_mut() {
        map.remove(id);
    }
}

/// The sandbox ID a path is about (`/v1/sandboxes/{id}` and below), if any, decoded
/// as the router's `Path` decodes it: a percent-encoded ID must not slip past routing
/// to be served by a host that does not own it.
fn sandbox_in_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let id = percent_decoded(rest.split('/').next()?)?;
    api_model::is_sandbox_id(&id).then_some(id)
}

/// `segment` with its `%XX` escapes decoded; `None` if one is malformed or the result
/// is not UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Middleware: serves requests about this host's sandboxes (and every other request)
/// here; forwards those about another host's to it.
pub async fn to_owner(
    State((m, face)): State<(Arc<Manager>, Face)>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let Some(id) = sandbox_in_path(req.uri().path()) else {
        return next.run(req).await;
    };
    // A sandbox's details are the shared catalog's: any host answers them, even while
    // the owner is down (its callers learn that from the state).
    if face == Face::Control
        && req.method() == axum::http::Method::GET
        && req.uri().path().trim_end_matches('/') == format!("/v1/sandboxes/{id}")
    {
        return next.run(req).await;
    }
    match route(&m, &id, face, req).await {
        Routed::Here(req) => next.run(req).await,
        Routed::There(resp) => resp,
    }
}

/// Serves a request about sandbox `id` here if this host owns it (or no host does, or
/// there is no cluster), else forwards it to the owner's listener for `face`.
pub async fn route(m: &Manager, id: &str, face: Face, req: Request<Body>) -> Routed {
    let Some(this) = super::this_host() else {
        return Routed::Here(req);
    };
    let owner = match owner_of(m, id) {
        Ok(Some(owner)) if owner != this => owner,
        Ok(_) => return Routed::Here(req),
        // The preview listener serves it, and says only what it says of any sandbox
        // it cannot serve.
        Err(_) if face == Face::Preview => return Routed::Here(req),
        Err(e) => return Routed::There(e.into_response()),
    };
    // A move changes the owner: what this host looked up is stale after one it
    // forwarded, or once the host it believed the owner says it moved on.
    let moves = req.method() == axum::http::Method::POST
        && req.uri().path().trim_end_matches('/').ends_with("/migrate");
    Routed::There(match to_host(m, id, &owner, this, face, req).await {
        Ok(answer) => {
            if answer.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE
                || (moves && answer.status().is_success())
            {
                forget_owner(id);
            }
            answer
        }
        // The preview listener is anyone's to ask: its own refusals say nothing of
        // hosts, addresses or whether the sandbox exists.
        Err(refused) if face == Face::Preview => {
            tracing::debug!(sandbox = %id, owner = %owner, status = %refused.status(), "preview not forwarded");
            ApiError::new(
                503,
                "unavailable",
                "this preview is not available right now; retry shortly",
            )
            .into_response()
        }
        Err(refused) => refused,
    })
}

/// The answer of `owner`, sandbox `id`'s host, to `req`, or this host's refusal.
async fn to_host(
    m: &Manager,
    id: &str,
    owner: &str,
    this: &str,
    face: Face,
    req: Request<Body>,
) -> Result<Response, Response> {
    if req.headers().contains_key(FORWARDED_BY) {
        // Sent here by a host that believed this one the owner: ownership moved since.
        return Err(ApiError::new(
            503,
            "owner_moved",
            format!(
                "sandbox {id} moved to host {owner} while this request was on its way; retry it"
            ),
        )
        .into_response());
    }
    let host = match m.catalog.host(owner) {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Err(ApiError::new(
                503,
                "host_unavailable",
                format!("sandbox {id}'s host {owner} is not registered; ask the operator (`admin host list`)"),
            )
            .into_response())
        }
        Err(e) => return Err(ApiError::from(e).into_response()),
    };
    if host.state == "dead" {
        return Err(ApiError::new(
            503,
            "host_unavailable",
            format!(
                "sandbox {id}'s host {owner} stopped heartbeating; a hibernated or paused sandbox resumes elsewhere once it is declared lost, a running one is lost with it"
            ),
        )
        .into_response());
    }
    let (base, host_header) = match face {
        Face::Control => (&host.info.control_url, HostHeader::Target),
        Face::Edge => (&host.info.edge_url, HostHeader::Target),
        Face::Preview => (&host.info.preview_url, HostHeader::Kept),
    };
    tracing::debug!(sandbox = %id, owner = %owner, ?face, "forwarding to the owner");
    match forward(base, this, req, host_header).await {
        Ok(resp) => Ok(resp),
        Err(e) => Err(ApiError::new(
            502,
            "host_unreachable",
            format!("sandbox {id}'s host {owner} could not be reached: {e}; retry"),
        )
        .into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sandbox_paths_are_routed() {
        let id = "sbx-0123456789abcdef0123";
        assert!(api_model::is_sandbox_id(id));
        assert_eq!(
            sandbox_in_path(&format!("/v1/sandboxes/{id}")).as_deref(),
            Some(id)
        );
        assert_eq!(
            sandbox_in_path(&format!("/v1/sandboxes/{id}/commands")).as_deref(),
            Some(id)
        );
        // Escaped as a client may send it: still that sandbox.
        assert_eq!(
            sandbox_in_path("/v1/sandboxes/%73bx-0123456789abcdef0123/pause").as_deref(),
            Some(id)
        );
        assert_eq!(sandbox_in_path("/v1/sandboxes/%zz"), None);
        assert_eq!(sandbox_in_path("/v1/sandboxes/restore"), None);
        assert_eq!(sandbox_in_path("/v1/sandboxes"), None);
        assert_eq!(sandbox_in_path("/v1/templates/x"), None);
    }
}
