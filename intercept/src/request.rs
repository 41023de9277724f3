//! A guest's request on its way upstream: made HTTP/1.1, checked for PII, secret
//! placeholders filled in its header values (and only there), edited by the transform
//! (see the pipeline in [`crate::proxy`]).

use crate::body::{
    read_prefix_idle, BodyIdle, BoxError, Counters, Inner, ProxyBody, MAX_INSPECT_BYTES,
};
use crate::exchange::{audit_path, lock, report_at_end, ExchangeRef, Outcome};
use crate::headers::{host_of, is_encoded, join_cookies, strip_hop_by_hop, wants_upgrade};
use crate::injection::TextKind;
use crate::pii::{self, Detector, Finding};
use crate::policy::{CompiledPolicy, CompiledTransform, PiiAction};
use crate::proxy::{json_response, prefix_need, refuse, Conn, Refusal};
use crate::secrets::{Hit, Replacer, StreamReplacer};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

/// A request ready to go upstream.
pub(crate) struct Prepared {
    /// The request, HTTP/1.1, rewritten by the policy.
    pub(crate) req: Request<ProxyBody>,
    /// The guest side of the upgrade it asks for, if it does.
    pub(crate) upgrade: Option<OnUpgrade>,
    /// Whether a secret's real value went into it.
    pub(crate) inserted: bool,
}

impl Conn {
    /// The request to send upstream (HTTP/1.1, origin-form), rewritten by the policy.
    pub(crate) async fn prepare(
        &self,
        policy: &CompiledPolicy,
        mut req: Request<Incoming>,
        transform: Option<&CompiledTransform>,
        ex: &ExchangeRef,
    ) -> Result<Prepared, Refusal> {
        let host = self.host.as_str();
        let detectors: Vec<Detector> = policy.pii.iter().map(|(d, _)| *d).collect();
        // A secret goes in only if the host and the host the request is sent to (a
        // transform's upstreamHost) are both the secret's; only over TLS; only in
        // header values.
        let upstream = transform
            .and_then(|t| t.upstream.as_ref())
            .map(|(h, _)| h.as_str());
        let (header_secrets, other_secrets) = if self.cleartext {
            let r = policy.secrets.for_cleartext_request(host, upstream);
            (r.clone(), r)
        } else {
            (
                policy.secrets.for_request(host, upstream),
                policy.secrets.for_request_body(),
            )
        };
        // Upgrades are HTTP/1.1's: an HTTP/2 request cannot carry their headers.
        let upgrade = req.version() <= Version::HTTP_11 && wants_upgrade(req.headers());
        let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().cloned();

        // The URL: placeholders stay (counted).
        let mut url = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes()
            .to_vec();
        if !detectors.is_empty() {
            let found = pii::scan_percent_encoded(&url, &detectors);
            url = apply_pii(policy, url, found, "url", ex, pii::marker_encoded)?;
        }
        lock(ex).path = audit_path(&url);
        if let Some(r) = &other_secrets {
            let mut c = r.zero_counts();
            url = r.replace_all(&url, &mut c);
            lock(ex).secrets(r.named(&c), "url");
        }
        parts.uri = Uri::from_maybe_shared(Bytes::from(url)).map_err(|_| {
            refuse(ex, StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_request", "message": "the request's URL is not valid after the policy's rewrites"}), Outcome::Error)
        })?;

        // The headers.
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if parts.version == Version::HTTP_2 {
            // Upstream is HTTP/1.1: the request line and Host say what the pseudo-headers
            // did, and cookies are one field (RFC 9113, 8.2.3).
            parts.version = Version::HTTP_11;
            join_cookies(&mut parts.headers);
        }
        if !parts.headers.contains_key(header::HOST) {
            let name = authority
                .as_ref()
                .map(|a| host_of(a).to_string())
                .or_else(|| self.expected.clone());
            if let Some(v) = name.and_then(|n| HeaderValue::from_str(&n).ok()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let mut inserted = false;
        for (name, value) in parts.headers.iter_mut() {
            if name == header::HOST {
                continue;
            }
            let location = format!("requestHeader:{name}");
            let mut bytes = value.as_bytes().to_vec();
            if !detectors.is_empty() {
                let found = pii::scan(&bytes, detectors.iter().copied());
                bytes = apply_pii(policy, bytes, found, &location, ex, pii::marker)?;
            }
            if let Some(r) = &header_secrets {
                let mut c = r.zero_counts();
                bytes = r.replace_all(&bytes, &mut c);
                let counts = r.named(&c);
                inserted |= counts.iter().any(|(_, hit, _)| *hit == Hit::Inserted);
                lock(ex).secrets(counts, &location);
            }
            if bytes != value.as_bytes() {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    *value = v;
                }
            }
        }
        if policy.injection.is_some() || !policy.secrets.is_empty() {
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Some(t) = transform {
            t.request.apply(&mut parts.headers);
            if let Some((h, port)) = &t.upstream {
                let v = match port {
                    Some(p) => format!("{h}:{p}"),
                    None => h.clone(),
                };
                if let Ok(v) = HeaderValue::from_str(&v) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        if inserted {
            // A range of a response echoing the value could cut it where masking would
            // not see it: the whole response, or none.
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
        }

        // The body: inspected for PII (under the session's budget); placeholders stay
        // (counted as it streams).
        let mut body: Inner = body.map_err(BoxError::from).boxed_unsync();
        let kind = body_kind(&parts.headers);
        let encoded = is_encoded(&parts.headers);
        let mut inspect = !detectors.is_empty() && kind.is_some() && !encoded;
        if !detectors.is_empty() && kind.is_some() && encoded {
            lock(ex).detect("uninspected".into(), "requestBody".into(), "log");
        }
        let mut permit = None;
        if inspect {
            match self.ctx.reserve(prefix_need(&parts.headers, &body)).await {
                Ok(p) => permit = p,
                Err(_) if policy.pii.iter().any(|(_, a)| *a != PiiAction::Log) => {
                    // Uninspected, personal data the policy blocks or redacts could pass.
                    lock(ex).detect("uninspected".into(), "requestBody".into(), "block");
                    let mut r = refuse(
                        ex,
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({
                            "error": "busy",
                            "message": "the sandbox's proxy has no inspection buffer free for this request's body (its other requests hold them all); retry shortly",
                        }),
                        Outcome::Error,
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(r);
                }
                Err(_) => {
                    // Only logged: passed, the audit saying it was not looked at.
                    lock(ex).detect("uninspected".into(), "requestBody".into(), "log");
                    inspect = false;
                }
            }
        }
        let out = if inspect {
            let limit = self.ctx.limits().body_idle;
            let prefix = read_prefix_idle(&mut body, MAX_INSPECT_BYTES, limit)
                .await
                .map_err(|e| {
                    if e.is::<BodyIdle>() {
                        lock(ex).detect("timeout".into(), "requestBody".into(), "block");
                        refuse(ex, StatusCode::REQUEST_TIMEOUT, serde_json::json!({"error": "request_timeout", "message": format!("the request body stalled: nothing came for {limit:?}")}), Outcome::Error)
                    } else {
                        refuse(ex, StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_request", "message": format!("reading the request body failed: {e}")}), Outcome::Error)
                    }
                })?;
            let mut data = prefix.data;
            let form = kind == Some(BodyKind::Form);
            let found = if form {
                pii::scan_percent_encoded(&data, &detectors)
            } else {
                pii::scan(&data, detectors.iter().copied())
            };
            let marker: fn(Detector) -> String = if form {
                pii::marker_encoded
            } else {
                pii::marker
            };
            data = apply_pii(policy, data, found, "requestBody", ex, marker)?;
            let rewriter = other_secrets.as_ref().map(Replacer::stream);
            finish_body(
                data,
                prefix.overflow,
                prefix.ended,
                body,
                rewriter,
                &mut parts.headers,
                (ex, "requestBody"),
            )
            .holding(permit)
        } else if let Some(r) = &other_secrets {
            // Counted as it streams, never buffered; unchanged, so its length stands.
            report_at_end(
                ProxyBody::streamed(Bytes::new(), Some(body), Some(r.stream())),
                ex,
                "requestBody",
            )
        } else {
            ProxyBody::pass(body)
        };
        let counters = Counters(vec![
            lock(ex).bytes_out.clone(),
            self.stats.bytes_out.clone(),
        ]);
        Ok(Prepared {
            req: Request::from_parts(parts, out.counted(counters)),
            upgrade: guest_upgrade,
            inserted,
        })
    }
}

/// Records `found` and applies the policy's actions: `Err` (a 403) if any blocks,
/// else `data` with the redacted ones replaced by `marker`.
fn apply_pii(
    policy: &CompiledPolicy,
    data: Vec<u8>,
    found: Vec<Finding>,
    location: &str,
    ex: &ExchangeRef,
    marker: fn(Detector) -> String,
) -> Result<Vec<u8>, Refusal> {
    if found.is_empty() {
        return Ok(data);
    }
    let mut e = lock(ex);
    let mut redact = Vec::new();
    for f in found {
        let action = policy.pii_action(f.detector).unwrap_or(PiiAction::Log);
        let name = match action {
            PiiAction::Log => "log",
            PiiAction::Redact => "redact",
            PiiAction::Block => "block",
        };
        e.detect(f.detector.name().to_string(), location.to_string(), name);
        match action {
            PiiAction::Block => {
                e.outcome(Outcome::Blocked);
                return Err(Box::new(json_response(
                    StatusCode::FORBIDDEN,
                    &serde_json::json!({
                        "error": "blocked_by_policy",
                        "detector": f.detector.name(),
                        "where": location,
                        "message": format!("the request was blocked by the sandbox's security policy: {} found in {location}", f.detector.name()),
                    }),
                )));
            }
            PiiAction::Redact => redact.push(f),
            PiiAction::Log => {}
        }
    }
    if redact.is_empty() {
        return Ok(data);
    }
    e.outcome(Outcome::Modified);
    Ok(pii::redact_with(&data, &redact, marker))
}

/// How a request body is inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Text,
    Form,
}

fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    if ct.split(';').next().is_some_and(|m| {
        m.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    }) {
        return Some(BodyKind::Form);
    }
    TextKind::of(ct).map(|_| BodyKind::Text)
}

/// The body to send on: `head` (plus `overflow`), then `rest` unless the body `ended`,
/// through `rewriter`. A body wholly read gets its exact length (and the rewriter's
/// counts go to the exchange now); a streamed one loses `content-length` (hyper then
/// frames it chunked) since rewriting may change it, and reports its counts at its end.
/// `report` is the exchange and where in it the body is (`requestBody`, ...).
pub(crate) fn finish_body(
    head: Vec<u8>,
    overflow: Bytes,
    ended: bool,
    rest: Inner,
    rewriter: Option<StreamReplacer>,
    headers: &mut HeaderMap,
    report: (&ExchangeRef, &'static str),
) -> ProxyBody {
    let (ex, location) = report;
    if ended {
        let mut rewriter = rewriter;
        let data = match &mut rewriter {
            Some(r) => {
                let mut d = r.push(&head);
                d.extend(r.finish());
                d
            }
            None => head,
        };
        if !data.is_empty() || headers.contains_key(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
        }
        let body = ProxyBody::full(data);
        return match rewriter {
            Some(r) => {
                lock(ex).secrets(r.counts(), location);
                body
            }
            None => report_at_end(body, ex, location),
        };
    }
    headers.remove(header::CONTENT_LENGTH);
    let mut head = head;
    head.extend_from_slice(&overflow);
    report_at_end(
        ProxyBody::streamed(Bytes::from(head), Some(rest), rewriter),
        ex,
        location,
    )
}
