//! An upstream's response on its way to the guest: secret values masked (head, body,
//! trailers), the transform's edits, injection defense (see the pipeline in
//! [`crate::proxy`]).

use crate::body::{
    read_prefix_idle, BodyIdle, BoxError, Counters, Inner, ProxyBody, MAX_INSPECT_BYTES,
};
use crate::exchange::{lock, report_at_end, ExchangeRef, Outcome};
use crate::headers::is_encoded;
use crate::injection::{self, TextKind};
use crate::policy::{CompiledPolicy, CompiledTransform, InjectionAction};
use crate::proxy::{
    clean_response_head, fits_prefix, prefix_need, refuse, Conn, Refusal, INJECTION_HEADER,
};
use crate::request::finish_body;
use crate::secrets::{HeadMasker, Replacer};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::response::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;

impl Conn {
    /// The upstream's response `resp` to a `method` request, checked and rewritten by
    /// the policy on its way to the guest. `inserted`: a secret's value went into the
    /// request.
    pub(crate) async fn respond(
        &self,
        policy: &CompiledPolicy,
        resp: Response<Incoming>,
        method: &Method,
        transform: Option<&CompiledTransform>,
        ex: &ExchangeRef,
        inserted: bool,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let host = self.host.as_str();
        let resp_secrets = policy.secrets.for_response();
        // Before the hop-by-hop headers go: a transfer coding is one.
        let encoded = is_encoded(resp.headers());
        let (mut parts, body) = resp.into_parts();
        self.respond_head(policy, &mut parts, transform, ex, false);
        let mut body: Inner = body.map_err(BoxError::from).boxed_unsync();
        let no_body = method == Method::HEAD
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let counters = Counters(vec![lock(ex).bytes_in.clone(), self.stats.bytes_in.clone()]);
        if no_body {
            return Ok(Response::from_parts(
                parts,
                ProxyBody::pass(body).counted(counters),
            ));
        }
        if encoded && inserted {
            // The value went to this host, and what it sends back cannot be masked.
            lock(ex).detect("uninspected".into(), "responseBody".into(), "block");
            return Err(refuse(
                ex,
                StatusCode::BAD_GATEWAY,
                serde_json::json!({
                    "error": "secret_in_encoded_response",
                    "host": host,
                    "message": format!("{host} answered a request a secret's value went into with a compressed body ({}), which the proxy cannot mask; it was refused. The proxy asks for uncompressed answers: this server ignored that", parts.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("a transfer coding")),
                }),
                Outcome::Blocked,
            ));
        }
        let text = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(TextKind::of);
        if encoded && ((policy.injection.is_some() && text.is_some()) || resp_secrets.is_some()) {
            lock(ex).detect("uninspected".into(), "responseBody".into(), "log");
        }
        let mut inspect = policy.injection.zip(text).filter(|_| !encoded);
        let rewrite = resp_secrets.as_ref().filter(|_| !encoded);
        let mut buffer =
            inspect.is_some() || (rewrite.is_some() && fits_prefix(&parts.headers, &body));
        let mut permit = None;
        if buffer {
            match self.ctx.reserve(prefix_need(&parts.headers, &body)).await {
                Ok(p) => permit = p,
                Err(_) => {
                    // The request went already: refusing would lose its answer. Passed
                    // (still masked), the audit saying it was not looked at.
                    if inspect.is_some() {
                        lock(ex).detect("uninspected".into(), "responseBody".into(), "log");
                    }
                    (inspect, buffer) = (None, false);
                }
            }
        }
        let out = if buffer {
            let limit = self.ctx.limits().response_idle;
            let prefix = read_prefix_idle(&mut body, MAX_INSPECT_BYTES, limit)
                .await
                .map_err(|e| {
                    if e.is::<BodyIdle>() {
                        lock(ex).detect("timeout".into(), "responseBody".into(), "block");
                        refuse(ex, StatusCode::GATEWAY_TIMEOUT, serde_json::json!({"error": "upstream_timeout", "host": host, "message": format!("{host}'s response stalled: nothing came for {limit:?}")}), Outcome::Error)
                    } else {
                        refuse(ex, StatusCode::BAD_GATEWAY, serde_json::json!({"error": "upstream_failed", "message": format!("reading the upstream's response failed: {e}")}), Outcome::Error)
                    }
                })?;
            let mut data = prefix.data;
            if let Some((action, kind)) = inspect {
                let report = injection::scan(&data, kind);
                if !report.is_clean() {
                    let action_name = match action {
                        InjectionAction::Flag => "flag",
                        InjectionAction::Strip => "strip",
                        InjectionAction::Block => "block",
                    };
                    {
                        let mut e = lock(ex);
                        for rule in &report.rules {
                            e.detect(
                                format!("injection:{rule}"),
                                "responseBody".into(),
                                action_name,
                            );
                        }
                    }
                    match action {
                        InjectionAction::Flag => {
                            if let Ok(v) = HeaderValue::from_str(&report.rule_list()) {
                                parts
                                    .headers
                                    .insert(HeaderName::from_static(INJECTION_HEADER), v);
                            }
                        }
                        InjectionAction::Strip => {
                            data = injection::strip(&data, &report);
                            lock(ex).outcome(Outcome::Modified);
                        }
                        InjectionAction::Block => {
                            return Err(refuse(
                                ex,
                                StatusCode::BAD_GATEWAY,
                                serde_json::json!({
                                    "error": "injection_blocked",
                                    "rules": report.rules,
                                    "message": format!("the response from {host} was blocked by the sandbox's security policy: it looks like a prompt injection ({})", report.rule_list()),
                                }),
                                Outcome::Blocked,
                            ));
                        }
                    }
                }
            }
            let rewriter = rewrite.map(Replacer::stream);
            finish_body(
                data,
                prefix.overflow,
                prefix.ended,
                body,
                rewriter,
                &mut parts.headers,
                (ex, "responseBody"),
            )
            .holding(permit)
        } else if let Some(r) = rewrite {
            // Large or of unknown length (a download, a stream of events): rewritten as
            // it streams, so its first bytes are not held back.
            parts.headers.remove(header::CONTENT_LENGTH);
            report_at_end(
                ProxyBody::streamed(Bytes::new(), Some(body), Some(r.stream())),
                ex,
                "responseBody",
            )
        } else {
            ProxyBody::pass(body)
        };
        let out = match policy.secrets.head_masker() {
            Some(m) => {
                let ex = ex.clone();
                out.on_trailers(Box::new(move |t: &mut HeaderMap| {
                    for (name, counts) in m.mask_headers(t) {
                        lock(&ex).secrets(counts, &format!("responseTrailer:{name}"));
                    }
                }))
            }
            None => out,
        };
        Ok(Response::from_parts(parts, out.counted(counters)))
    }

    /// A response head made fit for the guest: hop-by-hop headers removed (but an
    /// `upgrade`'s), secret values masked in header names and values and the reason
    /// phrase, then the transform's response edits.
    pub(crate) fn respond_head(
        &self,
        policy: &CompiledPolicy,
        parts: &mut Parts,
        transform: Option<&CompiledTransform>,
        ex: &ExchangeRef,
        upgrade: bool,
    ) {
        clean_response_head(&mut parts.headers, upgrade);
        if let Some(m) = policy.secrets.head_masker() {
            mask_head(&m, parts, ex);
        }
        if let Some(t) = transform {
            t.response.apply(&mut parts.headers);
        }
    }
}

/// Masks real values in a response head: header names and values, and the reason
/// phrase an HTTP/1.1 upstream sent (passed on to an HTTP/1.1 guest).
fn mask_head(m: &HeadMasker, parts: &mut Parts, ex: &ExchangeRef) {
    for (name, counts) in m.mask_headers(&mut parts.headers) {
        lock(ex).secrets(counts, &format!("responseHeader:{name}"));
    }
    let masked = parts
        .extensions
        .get::<ReasonPhrase>()
        .and_then(|r| m.mask(r.as_bytes()));
    if let Some((bytes, counts)) = masked {
        match ReasonPhrase::try_from(bytes) {
            Ok(r) => {
                parts.extensions.insert(r);
            }
            // Never the value: the status's own phrase instead.
            Err(_) => {
                parts.extensions.remove::<ReasonPhrase>();
            }
        }
        lock(ex).secrets(counts, "responseReason");
    }
}
