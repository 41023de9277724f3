//! Forwarding a request to another host of the cluster: the request as it came (method,
//! path, query, headers, a streamed body; a WebSocket or other upgrade carried through),
//! marked with [`FORWARDED_BY`] so the receiving host never forwards it again.

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;

/// The loop guard: set on every forwarded request to the forwarding host's ID. A host
/// that receives it serves the request itself (or says it cannot), never forwards.
pub const FORWARDED_BY: &str = "x-nullspace-forwarded-by";

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The host's URL is not `http://HOST:PORT`.
    #[error("host URL {0:?} is not http://HOST:PORT")]
    BadUrl(String),
    /// Nothing answered there.
    #[error("connecting to {url}: {why}")]
    Connect {
        /// The host's base URL.
        url: String,
        /// What failed.
        why: String,
    },
    /// The connection broke before an answer.
    #[error("{url} did not answer: {why}")]
    Exchange {
        /// The host's base URL.
        url: String,
        /// What failed.
        why: String,
    },
}

/// What `Host` a forwarded request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHeader {
    /// The target host's address (the control API and the edge route by path).
    Target,
    /// The one it came with (a preview listener routes by it).
    Kept,
}

/// Sends `req` to the host at `base_url` (`http://HOST:PORT`) as `from` forwarding it,
/// and returns its answer, streamed. An upgrade both sides agree to is bridged.
pub async fn forward(
    base_url: &str,
    from: &str,
    mut req: Request<Body>,
    host_header: HostHeader,
) -> Result<Response<Body>, ForwardError> {
    let (mut sender, authority) = super::tunnel::connect(base_url).await?;
    // Origin form, and the target as Host.
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if host_header == HostHeader::Target || !headers.contains_key(axum::http::header::HOST) {
        if let Ok(host) = HeaderValue::from_str(&authority) {
            headers.insert(axum::http::header::HOST, host);
        }
    }
    if let Ok(v) = HeaderValue::from_str(from) {
        headers.insert(FORWARDED_BY, v);
    }
    let upgrading = req.headers().contains_key(axum::http::header::UPGRADE);
    let client_side = upgrading.then(|| hyper::upgrade::on(&mut req));
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| ForwardError::Exchange {
            url: base_url.into(),
            why: e.to_string(),
        })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_side {
            let owner_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(client), Ok(owner)) = (client_side.await, owner_side.await) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(owner),
                    )
                    .await;
                }
            });
        }
    }
    strip_hop_by_hop(resp.headers_mut());
    Ok(resp.map(Body::new))
}

/// Removes the headers that describe one connection, not the message (RFC 9110 7.6.1):
/// those `Connection` names and the fixed ones. An upgrade keeps `Connection: upgrade`
/// and `Upgrade`, which the next hop needs to agree to it.
fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    use axum::http::header;
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "upgrade")
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
    ] {
        headers.remove(name);
    }
    let upgrading = headers.contains_key(header::UPGRADE);
    if !upgrading {
        headers.remove(header::CONNECTION);
    }
}
