//! The interception of one guest connection: TLS terminated with the team CA's leaf,
//! each HTTP/1.1 request checked and rewritten by the policy, sent on over a verified
//! TLS connection to the real server, and the response checked on its way back.
//!
//! Per request, in order:
//! 1. The `Host` header must name the TLS server the guest asked for (SNI); otherwise
//!    421: a guest cannot reach one host through a connection the egress policy let
//!    out for another.
//! 2. PII on the URL (percent-decoded), the header values and a text body's first
//!    [`MAX_INSPECT_BYTES`] (JSON, form, text, HTML): `block` → 403, `redact` →
//!    `[REDACTED:kind]`, `log` → audit only. PII runs before secrets are inserted, so a
//!    real secret the proxy puts in is never mistaken for the guest's.
//! 3. Secret placeholders become real values if the host is one of the secret's
//!    (everywhere in the body, streaming), else stay.
//! 4. The host's transform: request header edits, and `upstreamHost`.
//! 5. Upstream: one TLS connection per guest connection (made on the first request,
//!    again if the server closes it), verified against the public and extra roots; a
//!    refused certificate is a 502 saying why.
//! 6. The response: real secret values masked back to placeholders (headers and the
//!    whole body, streaming), the transform's response edits, and injection defense
//!    on a text body's first [`MAX_INSPECT_BYTES`].
//! 7. One audit record when the response body ends (or the guest goes).
//!
//! A `101 Switching Protocols` answer to an upgrade request (WebSockets) ends the HTTP
//! relay: both sides are spliced raw until either closes.
//!
//! Bounds: a body is buffered only up to [`MAX_INSPECT_BYTES`] (larger text bodies are
//! inspected up to there and the rest streams uninspected, though still rewritten for
//! secrets); request heads are limited to [`MAX_HEAD_BYTES`] by hyper's read buffer;
//! the TLS handshakes, the upstream connect and the wait for a request head have
//! deadlines. To keep responses inspectable the proxy asks for uncompressed ones
//! (`accept-encoding: identity`) when injection defense or secrets are on; a server
//! compressing anyway gets its body passed uninspected (and the audit says so).

use crate::audit::{AuditRecord, AuditSink, Detection, MAX_DETECTIONS};
use crate::body::{read_prefix, BoxError, Counters, Inner, ProxyBody, MAX_INSPECT_BYTES};
use crate::ca::TeamCa;
use crate::injection::{self, TextKind};
use crate::pii::{self, Detector, Finding};
use crate::policy::{CompiledPolicy, CompiledTransform, InjectionAction, PiiAction};
use crate::secrets::{Counts, Replacer, StreamReplacer};
use crate::tls::{self, TlsError, UpstreamError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Deadline for each TLS handshake (guest and upstream).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the upstream TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request's head once its first byte came (slow-loris guests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's read buffer per side: the largest request or response head accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The response header carrying the injection rules that matched (`flag`).
pub const INJECTION_HEADER: &str = "x-nullspace-injection";

/// A byte stream both ways (the guest's connection, an upstream connection).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Where an upstream connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The guest's original destination.
    Addr(SocketAddr),
    /// A host a transform's `upstreamHost` names, and the port.
    Host(String, u16),
}

/// Makes upstream TCP connections. Injectable: tests point it at local servers, and the
/// egress proxy applies its own checks (reserved addresses, the egress policy) to a
/// [`Target::Host`] before connecting.
pub trait Connect: Send + Sync {
    /// Connects to `target`.
    fn connect(&self, target: Target) -> Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>>;
}

/// Plain TCP, names resolved by the host's resolver.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl Connect for TcpConnector {
    fn connect(&self, target: Target) -> Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>> {
        Box::pin(async move {
            let s = match target {
                Target::Addr(a) => tokio::net::TcpStream::connect(a).await?,
                Target::Host(h, p) => tokio::net::TcpStream::connect((h.as_str(), p)).await?,
            };
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as BoxIo)
        })
    }
}

/// What one sandbox's interception shares across its connections: the team CA, the
/// upstream TLS configuration, the policy (changeable live), the connector, the audit.
pub struct Session {
    ca: Arc<TeamCa>,
    upstream_tls: Arc<ClientConfig>,
    policy: RwLock<Arc<CompiledPolicy>>,
    connector: Arc<dyn Connect>,
    audit: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// A session connecting with [`TcpConnector`].
    pub fn new(
        ca: Arc<TeamCa>,
        upstream_tls: Arc<ClientConfig>,
        policy: CompiledPolicy,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            ca,
            upstream_tls,
            policy: RwLock::new(Arc::new(policy)),
            connector: Arc::new(TcpConnector),
            audit,
        }
    }

    /// The same session connecting with `connector`.
    pub fn with_connector(mut self, connector: Arc<dyn Connect>) -> Self {
        self.connector = connector;
        self
    }

    /// Replaces the policy; requests from now on use the new one.
    pub fn set_policy(&self, policy: CompiledPolicy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The team CA.
    pub fn ca(&self) -> &Arc<TeamCa> {
        &self.ca
    }
}

/// What one intercepted connection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Requests the guest made.
    pub requests: u64,
    /// Bytes received from upstream and sent to the guest (bodies, and both directions'
    /// raw bytes after an upgrade: upstream → guest here).
    pub bytes_in: u64,
    /// Bytes the guest sent upstream (bodies; guest → upstream after an upgrade).
    pub bytes_out: u64,
    /// Whether the connection was upgraded (WebSocket) and spliced.
    pub upgraded: bool,
}

/// Why an interception ended in failure (after the guest's TLS, HTTP failures are
/// answered to the guest, not returned).
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The guest-side TLS configuration could not be built.
    #[error(transparent)]
    Config(#[from] TlsError),
    /// The guest's TLS handshake failed (it does not trust the team CA, or is not TLS).
    #[error("the guest's TLS handshake failed: {0}")]
    GuestTls(io::Error),
    /// The guest's TLS handshake did not finish in time.
    #[error("the guest's TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")]
    GuestTlsTimeout,
    /// HTTP with the guest failed (malformed request, closed mid-message).
    #[error("HTTP with the guest failed: {0}")]
    GuestHttp(hyper::Error),
}

#[derive(Debug, Default)]
struct ConnStats {
    requests: AtomicU64,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    upgraded: AtomicBool,
}

/// Intercepts one guest connection to `dest` (its original destination), whose TLS
/// server name the egress proxy sniffed as `sni` (the ClientHello's own is used when
/// they differ). `guest` must start at the guest's first byte: the egress proxy replays
/// the bytes it sniffed in front of the socket.
pub async fn intercept<S>(
    guest: S,
    dest: SocketAddr,
    sni: Option<String>,
    ctx: Arc<Session>,
) -> Result<Stats, InterceptError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = tls::guest_server_config(ctx.ca.clone(), dest.ip())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(guest))
        .await
        .map_err(|_| InterceptError::GuestTlsTimeout)?
        .map_err(InterceptError::GuestTls)?;
    let sni = tls
        .get_ref()
        .1
        .server_name()
        .map(|s| s.to_ascii_lowercase())
        .or(sni.map(|s| s.to_ascii_lowercase()));
    let host = sni.clone().unwrap_or_else(|| dest.ip().to_string());
    let conn = Arc::new(Conn {
        ctx,
        dest,
        sni,
        host,
        upstream: tokio::sync::Mutex::new(None),
        stats: ConnStats::default(),
        splice: Mutex::new(None),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| conn.clone().handle(req))
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Both: the buffer bound alone lets a head through when one read brings it
        // whole.
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await;
    let splice = conn.splice.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(splice) = splice {
        let _ = splice.await;
    }
    let s = &conn.stats;
    let stats = Stats {
        requests: s.requests.load(Ordering::Relaxed),
        bytes_in: s.bytes_in.load(Ordering::Relaxed),
        bytes_out: s.bytes_out.load(Ordering::Relaxed),
        upgraded: s.upgraded.load(Ordering::Relaxed),
    };
    match served {
        Ok(()) => Ok(stats),
        // A guest closing between requests, or mid-body, is how connections end.
        Err(e) if e.is_incomplete_message() || e.is_canceled() => Ok(stats),
        Err(e) => Err(InterceptError::GuestHttp(e)),
    }
}

/// A response the proxy makes itself instead of the upstream's (boxed: it is the
/// error side of results that are mostly `Ok`).
type Refusal = Box<Response<ProxyBody>>;

/// One guest connection's state.
struct Conn {
    ctx: Arc<Session>,
    dest: SocketAddr,
    sni: Option<String>,
    /// The SNI, else the destination's IP: what policies and audit records name.
    host: String,
    /// The upstream connection, with the target and name it was made for.
    upstream: tokio::sync::Mutex<Option<(Target, String, SendRequest<ProxyBody>)>>,
    stats: ConnStats,
    splice: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What became of a request (the audit's `action`), worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Allowed,
    Modified,
    Blocked,
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Modified => "modified",
            Outcome::Blocked => "blocked",
            Outcome::Error => "error",
        }
    }
}

/// One request's record in the making.
struct Exchange {
    time: String,
    started: Instant,
    method: String,
    host: String,
    path: String,
    status: u16,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    detections: Vec<Detection>,
    outcome: Outcome,
}

type ExchangeRef = Arc<Mutex<Exchange>>;

fn lock(ex: &ExchangeRef) -> std::sync::MutexGuard<'_, Exchange> {
    ex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Exchange {
    fn detect(&mut self, kind: String, location: String, action: &str) {
        // Bounded: a body full of e-mail addresses is one detection per kind and place.
        if self
            .detections
            .iter()
            .any(|d| d.kind == kind && d.location == location && d.action == action)
        {
            return;
        }
        if self.detections.len() < MAX_DETECTIONS {
            self.detections.push(Detection {
                kind,
                location,
                action: action.to_string(),
            });
        }
    }

    fn outcome(&mut self, o: Outcome) {
        self.outcome = self.outcome.max(o);
    }

    fn secrets(&mut self, counts: Counts, location: &str) {
        for (name, hit, _) in counts {
            self.detect(format!("secret:{name}"), location.to_string(), hit.action());
            if hit != crate::secrets::Hit::Kept {
                self.outcome(Outcome::Modified);
            }
        }
    }
}

/// Sends the exchange's record when dropped (with the response body: the exchange is
/// over).
struct AuditGuard {
    ex: ExchangeRef,
    sink: Option<Arc<dyn AuditSink>>,
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        let ex = lock(&self.ex);
        sink.record(AuditRecord {
            time: ex.time.clone(),
            method: ex.method.clone(),
            host: ex.host.clone(),
            path: ex.path.clone(),
            status: ex.status,
            bytes_in: ex.bytes_in.load(Ordering::Relaxed),
            bytes_out: ex.bytes_out.load(Ordering::Relaxed),
            duration_ms: ex.started.elapsed().as_millis() as u64,
            detections: ex.detections.clone(),
            action: ex.outcome.name().to_string(),
        });
    }
}

/// Longest path kept in an audit record.
const MAX_AUDIT_PATH: usize = 2048;

impl Conn {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let policy = self.ctx.policy();
        let ex: ExchangeRef = Arc::new(Mutex::new(Exchange {
            time: crate::audit::now_rfc3339(),
            started: Instant::now(),
            method: req.method().to_string(),
            host: self.host.clone(),
            path: String::new(),
            status: 0,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            detections: Vec::new(),
            outcome: Outcome::Allowed,
        }));
        let resp = match self.exchange(&policy, req, &ex).await {
            Ok(r) => r,
            Err(r) => *r,
        };
        lock(&ex).status = resp.status().as_u16();
        let guard = AuditGuard {
            ex,
            sink: policy.audit.then(|| self.ctx.audit.clone()),
        };
        Ok(resp.map(|b| b.guarded(Box::new(guard))))
    }

    /// The response to `req`; `Err` for one the proxy made itself (refusals, errors).
    async fn exchange(
        &self,
        policy: &CompiledPolicy,
        mut req: Request<Incoming>,
        ex: &ExchangeRef,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let refuse = |ex: &ExchangeRef, status: StatusCode, body: serde_json::Value, o: Outcome| {
            lock(ex).outcome(o);
            Box::new(json_response(status, &body))
        };
        if let (Some(sni), Some(h)) = (&self.sni, req.headers().get(header::HOST)) {
            let named = host_name_of(h.as_bytes());
            if !named.eq_ignore_ascii_case(sni.as_bytes()) {
                lock(ex).path = audit_path(req.uri().path().as_bytes());
                return Err(refuse(
                    ex,
                    StatusCode::MISDIRECTED_REQUEST,
                    serde_json::json!({
                        "error": "misdirected_request",
                        "message": format!("this connection is to {sni}; send requests for {} on a connection to it", String::from_utf8_lossy(named)),
                    }),
                    Outcome::Blocked,
                ));
            }
        }
        let host = self.host.as_str();
        let transform = policy.transform_for(host);
        let detectors: Vec<Detector> = policy.pii.iter().map(|(d, _)| *d).collect();
        let req_secrets = policy.secrets.for_request(host);
        let resp_secrets = policy.secrets.for_response();
        let upgrade = wants_upgrade(req.headers());
        let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let (mut parts, body) = req.into_parts();

        // The URL.
        let mut url = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes()
            .to_vec();
        if !detectors.is_empty() {
            let found = pii::scan_percent_encoded(&url, &detectors);
            url = self.apply_pii(policy, &url, found, "url", ex, pii::marker_encoded)?;
        }
        lock(ex).path = audit_path(&url);
        if let Some(r) = &req_secrets {
            let mut c = r.zero_counts();
            url = r.replace_all(&url, &mut c);
            lock(ex).secrets(r.named(&c), "url");
        }
        parts.uri = Uri::from_maybe_shared(Bytes::from(url)).map_err(|_| {
            refuse(ex, StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_request", "message": "the request's URL is not valid after the policy's rewrites"}), Outcome::Error)
        })?;

        // The headers.
        strip_hop_by_hop(&mut parts.headers, upgrade);
        for (name, value) in parts.headers.iter_mut() {
            if name == header::HOST {
                continue;
            }
            let location = format!("requestHeader:{name}");
            let mut bytes = value.as_bytes().to_vec();
            if !detectors.is_empty() {
                let found = pii::scan(&bytes, detectors.iter().copied());
                bytes = self.apply_pii(policy, &bytes, found, &location, ex, pii::marker)?;
            }
            if let Some(r) = &req_secrets {
                let mut c = r.zero_counts();
                bytes = r.replace_all(&bytes, &mut c);
                lock(ex).secrets(r.named(&c), &location);
            }
            if bytes != value.as_bytes() {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    *value = v;
                }
            }
        }
        if policy.injection.is_some() || resp_secrets.is_some() {
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

        // The body.
        let body: Inner = body.map_err(BoxError::from).boxed_unsync();
        let kind = body_kind(&parts.headers);
        let encoded = is_encoded(&parts.headers);
        let inspect = !detectors.is_empty() && kind.is_some() && !encoded;
        if !detectors.is_empty() && kind.is_some() && encoded {
            lock(ex).detect("uninspected".into(), "requestBody".into(), "log");
        }
        let small = fits_prefix(&parts.headers, &body);
        let out = if inspect || (req_secrets.is_some() && small) {
            let mut body = body;
            let prefix = read_prefix(&mut body, MAX_INSPECT_BYTES).await.map_err(|e| {
                refuse(ex, StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_request", "message": format!("reading the request body failed: {e}")}), Outcome::Error)
            })?;
            let mut data = prefix.data;
            if inspect {
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
                data = self.apply_pii(policy, &data, found, "requestBody", ex, marker)?;
            }
            let rewriter = req_secrets.as_ref().map(Replacer::stream);
            finish_body(
                data,
                prefix.overflow,
                prefix.ended,
                body,
                rewriter,
                &mut parts.headers,
                (ex, "requestBody"),
            )
        } else if let Some(r) = &req_secrets {
            // Large or of unknown length: rewritten as it streams, never buffered.
            parts.headers.remove(header::CONTENT_LENGTH);
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
        let req = Request::from_parts(parts, out.counted(counters));

        // Upstream.
        let mut resp = match self.send(req, transform).await {
            Ok(r) => r,
            Err(e) => {
                let (kind, error) = match &e {
                    UpstreamError::CertificateRefused { .. } => {
                        ("upstreamCertificate", "upstream_certificate_refused")
                    }
                    UpstreamError::Tls { .. } => ("upstreamTls", "upstream_tls_failed"),
                    _ => ("upstream", "upstream_unreachable"),
                };
                lock(ex).detect(kind.into(), "tls".into(), "block");
                debug!(host, error = %e, "intercept: upstream failed");
                return Err(refuse(
                    ex,
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({"error": error, "host": host, "message": e.to_string()}),
                    Outcome::Error,
                ));
            }
        };

        // An upgrade: splice both sides once the 101 is sent.
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(guest_upgrade) = guest_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let (into_guest, out_of_guest) =
                    (self.stats.bytes_in.clone(), self.stats.bytes_out.clone());
                self.stats.upgraded.store(true, Ordering::Relaxed);
                let splice = tokio::spawn(async move {
                    let (Ok(g), Ok(u)) = tokio::join!(guest_upgrade, upstream_upgrade) else {
                        return;
                    };
                    // Counted as read, not from copy's result: a side closing without
                    // TLS close_notify ends the copy with an error, bytes and all.
                    let mut g = Counted {
                        io: TokioIo::new(g),
                        read: out_of_guest,
                    };
                    let mut u = Counted {
                        io: TokioIo::new(u),
                        read: into_guest,
                    };
                    let _ = tokio::io::copy_bidirectional(&mut g, &mut u).await;
                });
                *self.splice.lock().unwrap_or_else(|p| p.into_inner()) = Some(splice);
            }
            return Ok(resp.map(|b| ProxyBody::pass(b.map_err(BoxError::from).boxed_unsync())));
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        // Only the proxy says what it found: an upstream's own header of that name would
        // read as a verdict.
        parts.headers.remove(INJECTION_HEADER);
        if let Some(r) = &resp_secrets {
            for (name, value) in parts.headers.iter_mut() {
                let mut c = r.zero_counts();
                let bytes = r.replace_all(value.as_bytes(), &mut c);
                if bytes != value.as_bytes() {
                    if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                        *value = v;
                    }
                    lock(ex).secrets(r.named(&c), &format!("responseHeader:{name}"));
                }
            }
        }
        if let Some(t) = transform {
            t.response.apply(&mut parts.headers);
        }
        let body: Inner = body.map_err(BoxError::from).boxed_unsync();
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
        let text = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(TextKind::of);
        let encoded = is_encoded(&parts.headers);
        if encoded && ((policy.injection.is_some() && text.is_some()) || resp_secrets.is_some()) {
            lock(ex).detect("uninspected".into(), "responseBody".into(), "log");
        }
        let inspect = policy.injection.zip(text).filter(|_| !encoded);
        let small = fits_prefix(&parts.headers, &body);
        let rewrite = resp_secrets.as_ref().filter(|_| !encoded);
        let out = if inspect.is_some() || (rewrite.is_some() && small) {
            let mut body = body;
            let prefix = read_prefix(&mut body, MAX_INSPECT_BYTES).await.map_err(|e| {
                refuse(ex, StatusCode::BAD_GATEWAY, serde_json::json!({"error": "upstream_failed", "message": format!("reading the upstream's response failed: {e}")}), Outcome::Error)
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
        Ok(Response::from_parts(parts, out.counted(counters)))
    }

    /// Records `found` and applies the policy's actions: `Err` (a 403) if any blocks,
    /// else `data` with the redacted ones replaced by `marker`.
    fn apply_pii(
        &self,
        policy: &CompiledPolicy,
        data: &[u8],
        found: Vec<Finding>,
        location: &str,
        ex: &ExchangeRef,
        marker: fn(Detector) -> String,
    ) -> Result<Vec<u8>, Refusal> {
        if found.is_empty() {
            return Ok(data.to_vec());
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
            return Ok(data.to_vec());
        }
        e.outcome(Outcome::Modified);
        Ok(pii::redact_with(data, &redact, marker))
    }

    /// Sends `req` on the upstream connection, making it first if there is none (or the
    /// server closed it).
    async fn send(
        &self,
        req: Request<ProxyBody>,
        transform: Option<&CompiledTransform>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (target, name) = self.target(transform);
        let mut slot = self.upstream.lock().await;
        if let Some((t, n, s)) = slot.as_mut() {
            // A policy change may have sent this host elsewhere (`upstreamHost`).
            if *t != target || *n != name || s.is_closed() || s.ready().await.is_err() {
                *slot = None;
            }
        }
        if slot.is_none() {
            let sender = self.connect(target.clone(), name.clone()).await?;
            *slot = Some((target, name, sender));
        }
        let sender = &mut slot.as_mut().expect("just made").2;
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Connect {
                target: self.host.clone(),
                reason: format!("the request failed: {e}"),
            })
    }

    /// Where this host's requests go, and the name the upstream certificate must have.
    fn target(&self, transform: Option<&CompiledTransform>) -> (Target, String) {
        match transform.and_then(|t| t.upstream.clone()) {
            Some((h, port)) => (Target::Host(h.clone(), port.unwrap_or(self.dest.port())), h),
            None => (Target::Addr(self.dest), self.host.clone()),
        }
    }

    async fn connect(
        &self,
        target: Target,
        name: String,
    ) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| UpstreamError::BadName(name.clone()))?;
        let shown = match &target {
            Target::Addr(a) => a.to_string(),
            Target::Host(h, p) => format!("{h}:{p}"),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.ctx.connector.connect(target))
            .await
            .map_err(|_| UpstreamError::Connect {
                target: shown.clone(),
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })?
            .map_err(|e| UpstreamError::Connect {
                target: shown.clone(),
                reason: e.to_string(),
            })?;
        let connector = tokio_rustls::TlsConnector::from(self.ctx.upstream_tls.clone());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
            .await
            .map_err(|_| UpstreamError::Tls {
                host: name.clone(),
                reason: format!("the handshake did not finish within {HANDSHAKE_TIMEOUT:?}"),
            })?
            .map_err(|e| tls::classify_handshake_error(&name, &e))?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| UpstreamError::Connect {
                target: shown,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "intercept: upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Whether a body is known to fit in the inspected prefix (its `content-length`, or
/// already ended): read whole, it keeps an exact length.
fn fits_prefix(headers: &HeaderMap, body: &Inner) -> bool {
    use http_body::Body;
    body.is_end_stream()
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_INSPECT_BYTES)
}

/// `body`, reporting its secret rewrites into the exchange when it ends.
fn report_at_end(body: ProxyBody, ex: &ExchangeRef, location: &'static str) -> ProxyBody {
    let ex = ex.clone();
    body.on_end(Box::new(move |r: &StreamReplacer| {
        lock(&ex).secrets(r.counts(), location)
    }))
}

/// A stream counting the bytes read from it.
struct Counted<T> {
    io: T,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
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

fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// The body to send on: `head` (plus `overflow`), then `rest` unless the body `ended`,
/// through `rewriter`. A body wholly read gets its exact length (and the rewriter's
/// counts go to the exchange now); a streamed one loses `content-length` (hyper then
/// frames it chunked) since rewriting may change it, and reports its counts at its end.
/// `report` is the exchange and where in it the body is (`requestBody`, ...).
fn finish_body(
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

/// Whether a request asks to upgrade the connection (WebSockets).
fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (each side's framing is the proxy's own), keeping
/// `connection` and `upgrade` on an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "expect",
    ] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// The name part of a Host header (`[::1]:8443` → `::1`, `a.com:443` → `a.com`).
fn host_name_of(v: &[u8]) -> &[u8] {
    if let Some(rest) = v.strip_prefix(b"[") {
        return rest.split(|b| *b == b']').next().unwrap_or(rest);
    }
    let name = match v.iter().rposition(|b| *b == b':') {
        Some(i) if v[i + 1..].iter().all(u8::is_ascii_digit) => &v[..i],
        _ => v,
    };
    name.strip_suffix(b".").unwrap_or(name)
}

fn audit_path(url: &[u8]) -> String {
    let s = String::from_utf8_lossy(url);
    s.chars().take(MAX_AUDIT_PATH).collect()
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(ProxyBody::full(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_and_hop_by_hop() {
        assert_eq!(host_name_of(b"a.com:443"), b"a.com");
        assert_eq!(host_name_of(b"a.com."), b"a.com");
        assert_eq!(host_name_of(b"[::1]:80"), b"::1");
        assert_eq!(host_name_of(b"a.com"), b"a.com");
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut up = HeaderMap::new();
        up.insert("connection", HeaderValue::from_static("Upgrade"));
        up.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&up));
        strip_hop_by_hop(&mut up, true);
        assert!(wants_upgrade(&up));
    }
}
