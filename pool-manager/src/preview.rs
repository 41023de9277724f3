//! Preview URLs: HTTP and WebSocket traffic to `<port>-<sandboxID>.<domain>` reaches that
//! port inside the sandbox through the guest agent's port tunnel (no guest networking).
//!
//! Access needs a signed preview token — in the URL (`?ns_preview_token=`, traded for a
//! cookie scoped to the host and a redirect that drops it from the address bar), in that
//! cookie, or as a proxy token in `x-nullspace-preview-proxy-token` (for application
//! proxies) — unless the sandbox made the port public. A token is good for the port's
//! current preview epoch only (see `tokens`): making the port private ends the tokens
//! issued before. A paused sandbox with `autoResume` is woken within a bounded window;
//! otherwise the answer is 503 with `Retry-After: 5`.

use crate::cluster::routing::{Face, Routed};
use crate::error::ApiError;
use crate::model::{InternalState, SandboxRecord};
use crate::sandboxes::{Manager, Wake, WAKE_WINDOW};
use crate::tokens::{preview_epoch, TokenError, TokenSigner};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// The query parameter that carries a preview token.
pub const TOKEN_PARAM: &str = "ns_preview_token";
/// The header application proxies send a proxy token in.
pub const PROXY_HEADER: &str = "x-nullspace-preview-proxy-token";
/// What previews need: the manager, the signer, and the domain URLs are made on.
pub struct Previews {
    pub manager: Arc<Manager>,
    pub tokens: TokenSigner,
    /// `HOST[:PORT]` under which `<port>-<sandbox>.` names resolve (e.g. `localhost:7072`).
    pub domain: String,
}

/// Token subjects: a preview token opens one port of one sandbox in a browser; a proxy
/// token the same port from an application proxy. Neither opens the other, nor the data
/// plane.
pub fn subject(sandbox: &str, port: u16, proxy: bool) -> String {
    format!(
        "{sandbox}:{port}:{}",
        if proxy { "proxy" } else { "preview" }
    )
}

/// The router: every request is a preview request.
pub fn router(previews: Arc<Previews>) -> Router {
    Router::new().fallback(handle).with_state(previews)
}

/// `(port, sandbox)` of a preview host name, if it is one under `domain`.
fn parse_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let bare = |h: &str| {
        h.rsplit_once(':')
            .map_or(h, |(n, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    n
                } else {
                    h
                }
            })
            .to_ascii_lowercase()
    };
    let (name, domain) = (bare(host), bare(domain));
    let label = name.strip_suffix(&format!(".{domain}"))?;
    let (port, sandbox) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    api_model::is_sandbox_id(sandbox).then(|| (port, sandbox.to_string()))
}

fn cookie_name(port: u16) -> String {
    format!("ns_preview_{port}")
}

fn unavailable(message: String) -> Response {
    let mut resp = ApiError::new(503, "sandbox_unavailable", message).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

fn token_refused(e: TokenError, what: &str) -> ApiError {
    match e {
        TokenError::Revoked => ApiError::new(
            401,
            "token_revoked",
            format!(
                "{what} was revoked: the port was made private after it was issued; get a new preview URL (get_preview_url) or proxy target"
            ),
        ),
        TokenError::OtherSandbox => ApiError::forbidden(format!(
            "{what} is for another sandbox or port; get one for this port"
        )),
        e => ApiError::unauthorized(format!(
            "{what}: {e}; get a new preview URL (get_preview_url) or proxy target"
        )),
    }
}

/// Checks a preview or proxy token for `subject` against the port's current epoch. A
/// sandbox that is gone (`current` is `None`) has none: a genuine token of it passes
/// here, to get the same answer as a private port of an unknown sandbox after.
fn check_token(
    tokens: &TokenSigner,
    token: &str,
    subject: &str,
    current: Option<u64>,
    now: i64,
) -> Result<(), TokenError> {
    match current {
        Some(current) => tokens.check(token, subject, current, now),
        None => tokens.verify(token, subject, now).map(drop),
    }
}

/// Whether `r` is of a sandbox that is gone: it answers as one that never existed.
fn gone(r: &SandboxRecord) -> bool {
    matches!(r.state, InternalState::Deleted | InternalState::Destroying)
}

/// The request's query without the token parameter; and the token, if it had one.
fn split_token(uri: &Uri) -> (Option<String>, Option<String>) {
    let Some(q) = uri.query() else {
        return (None, None);
    };
    let mut token = None;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| match pair.strip_prefix(&format!("{TOKEN_PARAM}=")) {
            Some(t) => {
                // Decoded as a query value: a client that rebuilt the URL may have
                // percent-encoded the token's `:`s (noVNC's viewer URL does).
                token = Some(
                    form_urlencoded::parse(format!("t={t}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default(),
                );
                false
            }
            None => true,
        })
        .collect();
    (token, (!kept.is_empty()).then(|| kept.join("&")))
}

fn cookie(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

async fn handle(State(p): State<Arc<Previews>>, req: Request) -> Response {
    // Another host's sandbox is served by that host, the request as it came.
    let sandbox = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| parse_host(h, &p.domain))
        .map(|(_, sandbox)| sandbox);
    let req = match sandbox {
        Some(id) => match crate::cluster::routing::route(&p.manager, &id, Face::Preview, req).await
        {
            Routed::Here(req) => req,
            Routed::There(resp) => return resp,
        },
        None => req,
    };
    // The loop guard is between hosts: the sandbox's app never sees it.
    let mut req = req;
    req.headers_mut()
        .remove(crate::cluster::forward::FORWARDED_BY);
    match serve(&p, req).await {
        Ok(r) => r,
        Err(r) => r,
    }
}

async fn serve(p: &Previews, mut req: Request) -> Result<Response, Response> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (port, sandbox) = parse_host(&host, &p.domain).ok_or_else(|| {
        ApiError::not_found("preview host", &host)
            .with_details(serde_json::json!({ "hint": format!("preview URLs look like http://PORT-SANDBOXID.{}", p.domain) }))
            .into_response()
    })?;
    // A sandbox that does not exist answers exactly as one whose port is private: the
    // preview domain is shared, and whether an ID exists is no one else's business.
    // A deleted one likewise: its tokens and public ports end with it.
    let record = p
        .manager
        .catalog
        .sandbox(&sandbox)
        .ok()
        .flatten()
        .filter(|r| !gone(r));
    let current = record.as_ref().map(|r| preview_epoch(r, port));
    let now = chrono::Utc::now().timestamp();
    let (url_token, rest_query) = split_token(req.uri());
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let public = record
        .as_ref()
        .is_some_and(|r| r.public_ports.contains(&port));
    if !public {
        if let Some(t) = req
            .headers()
            .get(PROXY_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            check_token(&p.tokens, t, &subject(&sandbox, port, true), current, now)
                .map_err(|e| token_refused(e, "the proxy token").into_response())?;
        } else if let Some(t) = &url_token {
            check_token(&p.tokens, t, &subject(&sandbox, port, false), current, now)
                .map_err(|e| token_refused(e, "the preview token").into_response())?;
            if !upgrade && req.method() == axum::http::Method::GET {
                // Traded for a cookie, so the token leaves the address bar and links
                // within the page keep working.
                let path = req.uri().path();
                let location = match &rest_query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                let cookie = format!(
                    "{}={t}; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400",
                    cookie_name(port)
                );
                return Ok(Response::builder()
                    .status(StatusCode::FOUND)
                    .header(header::LOCATION, location)
                    .header(header::SET_COOKIE, cookie)
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(Body::empty())
                    .expect("a valid response"));
            }
        } else if let Some(t) = cookie(&req, &cookie_name(port)) {
            check_token(&p.tokens, &t, &subject(&sandbox, port, false), current, now)
                .map_err(|e| token_refused(e, "the preview cookie").into_response())?;
        } else {
            return Err(private(port, &sandbox));
        }
    }
    // Only a valid token (issued for a sandbox since deleted) gets this far without one,
    // and meets the answer an unknown sandbox gets.
    let record = record.ok_or_else(|| private(port, &sandbox))?;
    let agent = match p.manager.wake_agent(&record, WAKE_WINDOW, "preview").await {
        Ok(agent) => agent,
        Err(Wake::Unavailable(why)) => return Err(unavailable(why)),
        Err(Wake::Gone(e)) => return Err(e.into_response()),
    };
    let tunnel = agent.connect_port(port).await.map_err(|e| {
        ApiError::new(
            502,
            "port_unreachable",
            format!("nothing answers on port {port} in {sandbox}: {e}"),
        )
        .into_response()
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .map_err(|e| {
            ApiError::new(
                502,
                "port_unreachable",
                format!("talking to port {port}: {e}"),
            )
            .into_response()
        })?;
    // Preview traffic keeps the sandbox from idling while its connection lasts.
    let busy = p.manager.activity.busy(&record.id);
    tokio::spawn(async move {
        let _busy = busy;
        let _ = conn.with_upgrades().await;
    });
    // What the application sees: no credentials of ours.
    req.headers_mut().remove(PROXY_HEADER);
    strip_our_cookies(req.headers_mut());
    if url_token.is_some() {
        let path = req.uri().path().to_string();
        let pq = match &rest_query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        *req.uri_mut() = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    } else if req.uri().scheme().is_some() {
        // An absolute-form request line: the origin form is what servers expect.
        let pq = req
            .uri()
            .path_and_query()
            .map(|x| x.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut resp = sender.send_request(req).await.map_err(|e| {
        ApiError::new(
            502,
            "port_unreachable",
            format!("port {port} answered badly: {e}"),
        )
        .into_response()
    })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = client_upgrade {
            let app_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(client), Ok(app)) = (client_side.await, app_side.await) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(app),
                    )
                    .await;
                }
            });
        }
    }
    host_only_cookies(resp.headers_mut());
    Ok(resp.map(Body::new))
}

/// The answer for a port without access: the same whether the sandbox exists or not.
fn private(port: u16, sandbox: &str) -> Response {
    ApiError::unauthorized(format!(
        "port {port} of {sandbox} is private or does not exist: open its preview URL with the token (get_preview_url), send a proxy token in {PROXY_HEADER}, or make the port public"
    ))
    .into_response()
}

/// Removes our preview cookies from what the application receives: a token of ours is
/// no business of the application's (and a logging one would leak it).
fn strip_our_cookies(headers: &mut axum::http::HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && !kv.starts_with("ns_preview_"))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Drops the `Domain` attribute of every cookie the application sets: its cookies stay
/// on its own preview host, never on the shared parent domain where they would reach
/// every other sandbox's previews.
fn host_only_cookies(headers: &mut axum::http::HeaderMap) {
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| {
            let Ok(text) = v.to_str() else {
                return v.clone();
            };
            let kept: Vec<&str> = text
                .split(';')
                .filter(|attr| {
                    !attr
                        .trim()
                        .get(..7)
                        .is_some_and(|a| a.eq_ignore_ascii_case("domain="))
                })
                .collect();
            HeaderValue::from_str(&kept.join(";")).unwrap_or_else(|_| v.clone())
        })
        .collect();
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hosts_name_a_port_and_a_sandbox_under_the_domain() {
        let id = "sbx-0123456789abcdef0123";
        assert_eq!(
            parse_host(&format!("8000-{id}.localhost:7072"), "localhost:7072"),
            Some((8000, id.to_string()))
        );
        assert_eq!(
            parse_host(
                &format!("8000-{id}.preview.example.com"),
                "preview.example.com"
            ),
            Some((8000, id.to_string()))
        );
        assert_eq!(
            parse_host(&format!("8000-{id}.evil.com"), "localhost"),
            None
        );
        assert_eq!(parse_host(&format!("0-{id}.localhost"), "localhost"), None);
        assert_eq!(parse_host("8000-sbx-nope.localhost", "localhost"), None);
        assert_eq!(parse_host("localhost:7072", "localhost:7072"), None);
    }

    #[test]
    fn preview_and_proxy_tokens_open_one_port_until_they_expire() {
        let signer = TokenSigner::new(b"secret".to_vec());
        let id = "sbx-0123456789abcdef0123";
        let now = 1_000_000;
        let check =
            |token: &str, subject: &str, at: i64| check_token(&signer, token, subject, Some(5), at);
        let token = signer.issue(&subject(id, 8000, false), 5, now + 60);
        assert_eq!(check(&token, &subject(id, 8000, false), now), Ok(()));
        // Expired, another port, the proxy kind, a runtime token's subject: refused.
        assert!(matches!(
            check(&token, &subject(id, 8000, false), now + 61),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(
            check(&token, &subject(id, 8001, false), now),
            Err(TokenError::OtherSandbox)
        );
        assert_eq!(
            check(&token, &subject(id, 8000, true), now),
            Err(TokenError::OtherSandbox)
        );
        let runtime = signer.issue(id, 5, now + 60);
        assert_eq!(
            check(&runtime, &subject(id, 8000, false), now),
            Err(TokenError::OtherSandbox)
        );
    }

    #[test]
    fn a_port_made_private_refuses_its_older_tokens_and_a_gone_sandbox_defers() {
        let signer = TokenSigner::new(b"secret".to_vec());
        let id = "sbx-0123456789abcdef0123";
        let (now, preview) = (1_000_000, subject(id, 8000, false));
        let old = signer.issue(&preview, 5, now + 60);
        let new = signer.issue(&preview, 6, now + 60);
        assert_eq!(
            check_token(&signer, &old, &preview, Some(6), now),
            Err(TokenError::Revoked)
        );
        assert_eq!(check_token(&signer, &new, &preview, Some(6), now), Ok(()));
        let refused = token_refused(TokenError::Revoked, "the preview token");
        assert_eq!((refused.status, refused.code), (401, "token_revoked"));
        // No record (unknown or deleted): a genuine token passes here, so it meets the
        // answer of a private port of an unknown sandbox; a forged one still does not.
        assert_eq!(check_token(&signer, &old, &preview, None, now), Ok(()));
        assert!(matches!(
            check_token(&signer, &format!("{old}x"), &preview, None, now),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn our_cookies_stay_ours_and_the_apps_stay_on_its_host() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("ns_preview_8000=tok; app=1"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("ns_preview_9000=x"),
        );
        strip_our_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "app=1");
        let mut h = axum::http::HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("ns_preview_8000=tok"),
        );
        strip_our_cookies(&mut h);
        assert!(h.get(header::COOKIE).is_none());

        let mut h = axum::http::HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=.preview.test; Path=/; HttpOnly"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2;domain=x"));
        host_only_cookies(&mut h);
        let set: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(set, ["a=1; Path=/; HttpOnly", "b=2"]);
    }

    #[test]
    fn the_token_parameter_is_split_from_the_query() {
        let uri: Uri = "/a?x=1&ns_preview_token=abc&y=2".parse().unwrap();
        assert_eq!(
            split_token(&uri),
            (Some("abc".into()), Some("x=1&y=2".into()))
        );
        let uri: Uri = "/a?ns_preview_token=abc".parse().unwrap();
        assert_eq!(split_token(&uri), (Some("abc".into()), None));
        let uri: Uri = "/a?ns_preview_token=sbx-1%3A6080%3Apreview.1.2.x_y-z&b=1"
            .parse()
            .unwrap();
        assert_eq!(
            split_token(&uri),
            (
                Some("sbx-1:6080:preview.1.2.x_y-z".into()),
                Some("b=1".into())
            )
        );
    }
}
