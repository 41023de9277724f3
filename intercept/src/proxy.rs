//! The interception of one guest connection: TLS terminated with the team CA's leaf
//! (or a cleartext HTTP/1.1 connection taken as it is), each request checked and
//! rewritten by the policy, sent on to the real server, and the response checked on its
//! way back.
//!
//! Toward the guest, [`intercept`] offers ALPN `h2` and `http/1.1`: a guest choosing
//! `h2` is served HTTP/2 (many requests at once on one connection), any other HTTP/1.1
//! (one at a time, upgrades possible). [`intercept_plain`] serves a cleartext HTTP/1.1
//! connection (the guest's `http://` requests). Whatever the guest speaks, requests go
//! upstream as HTTP/1.1 (see [`crate::upstream`]): an HTTP/2 request becomes an
//! origin-form one (`/path?query`) with a `Host` header from its `:authority`, its
//! `cookie` fields joined into one; responses lose the HTTP/1.1 connection-specific
//! headers (`connection` and those it names, `keep-alive`, `transfer-encoding`,
//! `upgrade`, `proxy-connection`, ...), which HTTP/2 forbids and each side frames
//! anyway.
//!
//! Per request, in order:
//! 1. The host it names must be the one the connection is for, else 421: a guest cannot
//!    reach one host through a connection the egress policy let out for another. Over
//!    TLS, the `Host` header and the URI's authority (`:authority` in HTTP/2, an
//!    absolute-form URI in HTTP/1.1) must each name the SNI; in cleartext, the `Host`
//!    header must name the host the egress proxy sniffed (its gate decided on it). A
//!    request with no `Host` gets one: its authority's, else that name. `CONNECT` is
//!    refused (501): a tunnel would escape inspection.
//! 2. PII on the URL (percent-decoded), the header values and a text body's first
//!    [`MAX_INSPECT_BYTES`] (JSON, form, text, HTML): `block` → 403, `redact` →
//!    `[REDACTED:kind]`, `log` → audit only. PII runs before secrets are inserted, so a
//!    real secret the proxy puts in is never mistaken for the guest's.
//! 3. Secret placeholders become real values if the host is one of the secret's
//!    (everywhere in the body, streaming), else stay. Over cleartext they always stay:
//!    anyone on the path could read a real value there. The audit says `kept`, plus a
//!    `cleartext` detection where the value would have gone in over TLS.
//! 4. The host's transform: request header edits, and `upstreamHost`.
//! 5. Upstream: one of the guest connection's few upstream connections (made as needed,
//!    again if the server closes one), over TLS verified against the public and extra
//!    roots (a refused certificate is a 502 saying why), or in cleartext for a
//!    cleartext guest connection.
//! 6. The response: real secret values masked back to placeholders (headers and the
//!    whole body, streaming; over cleartext too), the transform's response edits, and
//!    injection defense on a text body's first [`MAX_INSPECT_BYTES`].
//! 7. One audit record when the response body ends (or the guest goes: an HTTP/2
//!    stream reset, a closed connection; status 0 if it went before the answer).
//!
//! A `101 Switching Protocols` answer to an HTTP/1.1 upgrade request (WebSockets) ends
//! the HTTP relay: both sides are spliced raw until either closes. HTTP/2 has no such
//! upgrade: the proxy does not enable extended CONNECT (RFC 8441), so an HTTP/2 client
//! opens its WebSockets on an HTTP/1.1 connection, and a `CONNECT` is refused.
//!
//! Bounds: a body is buffered only up to [`MAX_INSPECT_BYTES`] (larger text bodies are
//! inspected up to there and the rest streams uninspected, though still rewritten for
//! secrets); request heads are limited to [`MAX_HEAD_BYTES`] (hyper's read buffer in
//! HTTP/1.1, the header list in HTTP/2); the TLS handshakes, the upstream connect and
//! the wait for an HTTP/1.1 request head have deadlines. An HTTP/2 connection has at
//! most [`H2_MAX_CONCURRENT_STREAMS`] streams, flow-control windows of
//! [`H2_STREAM_WINDOW`] each and [`H2_CONNECTION_WINDOW`] in all, pings to find a
//! guest gone silent, and at most [`MAX_UPSTREAM_CONNECTIONS`] exchanges in progress
//! (others wait, up to [`crate::upstream::SLOT_WAIT_TIMEOUT`], then 503). To keep
//! responses inspectable the proxy asks for uncompressed ones (`accept-encoding:
//! identity`) when injection defense or secrets are on; a server compressing anyway
//! gets its body passed uninspected (and the audit says so).
//!
//! Not served: HTTP/2 in cleartext (h2c). A cleartext connection is HTTP/1.1: one
//! starting with the HTTP/2 preface is closed ([`InterceptError::GuestHttp`]), and an
//! `Upgrade: h2c` is dropped (the request is served as HTTP/1.1). Only WebSocket
//! upgrades are relayed: any other spliced protocol would escape the policy.

use crate::audit::AuditSink;
use crate::body::{read_prefix, BoxError, Counters, Inner, ProxyBody, MAX_INSPECT_BYTES};
use crate::ca::TeamCa;
use crate::exchange::{
    audit_path, lock, report_at_end, AuditGuard, Exchange, ExchangeRef, Outcome,
};
use crate::injection::{self, TextKind};
use crate::pii::{self, Detector, Finding};
use crate::policy::{CompiledPolicy, CompiledTransform, InjectionAction, PiiAction};
use crate::secrets::{Replacer, StreamReplacer};
use crate::tls::{self, TlsError, UpstreamError};
use crate::upstream::{Dialer, Pool, Slot, MAX_UPSTREAM_CONNECTIONS};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

pub use crate::upstream::{BoxIo, Connect, Io, Target, TcpConnector};

/// Deadline for each TLS handshake (guest and upstream).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the upstream TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for an HTTP/1.1 request's head once its first byte came (slow-loris
/// guests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's read buffer per side: the largest request or response head accepted (in
/// HTTP/2, the largest request header list).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The response header carrying the injection rules that matched (`flag`).
pub const INJECTION_HEADER: &str = "x-nullspace-injection";
/// Most streams an HTTP/2 guest may have open at once on one connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// An HTTP/2 stream's flow-control window: how much of a request body the guest may
/// send before the proxy reads it. Small, since the guest is a local VM (a short round
/// trip refills it fast).
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// An HTTP/2 connection's flow-control window: every stream's whole window, so streams
/// waiting for an upstream slot (their bodies unread) can never starve those being
/// served of window; and what hyper buffers of one connection's request bodies stays
/// at most this.
pub const H2_CONNECTION_WINDOW: u32 = H2_STREAM_WINDOW * H2_MAX_CONCURRENT_STREAMS;
/// How long an HTTP/2 connection may be silent before the proxy pings the guest.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long the guest has to answer that ping before the connection is closed.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Intercepts one guest TLS connection to `dest` (its original destination), whose TLS
/// server name the egress proxy sniffed as `sni` (the ClientHello's own is used when
/// they differ). `guest` must start at the guest's first byte: the egress proxy replays
/// the bytes it sniffed in front of the socket. The guest may choose HTTP/2 (ALPN
/// `h2`) or HTTP/1.1.
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
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let upstream_tls = Some(ctx.upstream_tls.clone());
    serve(Conn::new(ctx, dest, sni, upstream_tls), tls, h2).await
}

/// Intercepts one guest cleartext HTTP/1.1 connection to `dest` (its original
/// destination), whose `Host` the egress proxy sniffed as `host` (its gate decided on
/// it: every request must name it, else 421). `guest` must start at the guest's first
/// byte: the egress proxy replays the bytes it sniffed in front of the socket.
///
/// The upstream connection is cleartext too, to `dest` (or a transform's
/// `upstreamHost`, on its port or `dest`'s). The policy applies as over TLS, but for
/// secrets: a placeholder is never replaced by the real value in cleartext, whatever
/// the host (real values echoed back are still masked).
pub async fn intercept_plain<S>(
    guest: S,
    dest: SocketAddr,
    host: Option<String>,
    ctx: Arc<Session>,
) -> Result<Stats, InterceptError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A Host header's name: no port, no trailing dot, lowercase (as SNI is compared).
    let host = host
        .map(|h| String::from_utf8_lossy(host_name_of(h.trim().as_bytes())).to_ascii_lowercase())
        .filter(|h| !h.is_empty());
    serve(Conn::new(ctx, dest, host, None), guest, false).await
}

/// Serves HTTP (HTTP/2 when `h2`, else HTTP/1.1 with upgrades) on the guest's
/// connection `io` until it ends, then waits for a splice the connection became.
async fn serve<I: Io>(conn: Arc<Conn>, io: I, h2: bool) -> Result<Stats, InterceptError> {
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| conn.clone().handle(req))
    };
    let io = TokioIo::new(io);
    let served = if h2 {
        // Extended CONNECT stays off: WebSockets are HTTP/1.1's (see the module docs).
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            // Both: the buffer bound alone lets a head through when one read brings it
            // whole.
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
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
    /// The name every request must be for: the TLS server name, or the `Host` the
    /// egress proxy sniffed on a cleartext connection. `None`: unknown, not checked.
    expected: Option<String>,
    /// That name, else the destination's IP: what policies and audit records name.
    host: String,
    /// Whether the guest's connection is cleartext (and so the upstream one).
    cleartext: bool,
    dialer: Dialer,
    pool: Pool,
    stats: ConnStats,
    splice: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Conn {
    /// A connection to `dest` for `expected`, upstream over TLS with `upstream_tls`
    /// (`None`: cleartext).
    fn new(
        ctx: Arc<Session>,
        dest: SocketAddr,
        expected: Option<String>,
        upstream_tls: Option<Arc<ClientConfig>>,
    ) -> Arc<Self> {
        Arc::new(Conn {
            dialer: Dialer {
                connector: ctx.connector.clone(),
                tls: upstream_tls.clone(),
            },
            ctx,
            dest,
            host: expected.clone().unwrap_or_else(|| dest.ip().to_string()),
            expected,
            cleartext: upstream_tls.is_none(),
            pool: Pool::new(),
            stats: ConnStats::default(),
            splice: Mutex::new(None),
        })
    }
}

impl Conn {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let policy = self.ctx.policy();
        let ex = Exchange::start(req.method().to_string(), self.host.clone());
        // Made before the exchange: a request the guest abandons before its answer (an
        // HTTP/2 stream reset, a closed connection) drops it here, and is recorded too.
        let guard = AuditGuard::new(ex.clone(), policy.audit.then(|| self.ctx.audit.clone()));
        let mut slot = None;
        let resp = match self.exchange(&policy, req, &ex, &mut slot).await {
            Ok(r) => r,
            Err(r) => {
                // The proxy answers instead of the upstream: a response it began reading
                // is abandoned, and the connection it came on with it.
                if let Some(s) = slot.as_mut() {
                    s.discard();
                }
                *r
            }
        };
        lock(&ex).status = resp.status().as_u16();
        // The slot goes with the body: given back when it ends (then the record goes).
        Ok(resp.map(|b| b.guarded(Box::new((slot, guard)))))
    }

    /// The response to `req`; `Err` for one the proxy made itself (refusals, errors).
    /// `slot` gets the upstream slot the exchange holds.
    async fn exchange(
        &self,
        policy: &CompiledPolicy,
        req: Request<Incoming>,
        ex: &ExchangeRef,
        slot: &mut Option<Slot>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        if let Some(named) = self.misdirected(&req) {
            lock(ex).path = audit_path(req.uri().path().as_bytes());
            let this = self.expected.as_deref().unwrap_or_default();
            return Err(refuse(
                ex,
                StatusCode::MISDIRECTED_REQUEST,
                serde_json::json!({
                    "error": "misdirected_request",
                    "message": format!("this connection is to {this}; send requests for {named} on a connection to it"),
                }),
                Outcome::Blocked,
            ));
        }
        if req.method() == Method::CONNECT {
            lock(ex).path = audit_path(req.uri().to_string().as_bytes());
            return Err(refuse(
                ex,
                StatusCode::NOT_IMPLEMENTED,
                serde_json::json!({
                    "error": "not_supported",
                    "message": "CONNECT is not supported on an intercepted connection: a tunnel would escape the sandbox's security policy (WebSockets work over HTTP/1.1)",
                }),
                Outcome::Blocked,
            ));
        }
        // Taken before the body is read: the slots bound the exchanges in progress (and
        // so their inspection buffers), not only the upstream connections.
        let Some(taken) = self.pool.slot().await else {
            lock(ex).path = audit_path(req.uri().path().as_bytes());
            return Err(refuse(
                ex,
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({
                    "error": "upstream_busy",
                    "message": format!("{MAX_UPSTREAM_CONNECTIONS} requests on this connection were in progress and none ended within {:?}; retry, or open another connection", crate::upstream::SLOT_WAIT_TIMEOUT),
                }),
                Outcome::Error,
            ));
        };
        let slot = slot.insert(taken);
        let host = self.host.as_str();
        let method = req.method().clone();
        let transform = policy.transform_for(host);
        let (req, guest_upgrade) = self.prepare(policy, req, transform, ex).await?;

        let (target, name) = self.target(transform);
        let mut resp = match slot.send(&self.dialer, target, name, host, req).await {
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
            // The upstream connection is the splice's now, or of no further use.
            slot.discard();
            let Some(guest_upgrade) = guest_upgrade else {
                // Unasked (or asked over HTTP/2, where it cannot be relayed).
                return Err(refuse(
                    ex,
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({"error": "upstream_failed", "host": host, "message": "the upstream switched protocols though the request asked for no upgrade"}),
                    Outcome::Error,
                ));
            };
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
            return Ok(resp.map(|b| ProxyBody::pass(b.map_err(BoxError::from).boxed_unsync())));
        }
        self.respond(policy, resp, &method, transform, ex).await
    }

    /// The name `req` is for when it is not the connection's: its URI's authority
    /// (HTTP/2's `:authority`, an absolute-form URI) or a `Host` header naming another
    /// host. `None` when each is the connection's, or that is unknown.
    fn misdirected(&self, req: &Request<Incoming>) -> Option<String> {
        let expected = self.expected.as_deref()?;
        let authority = req.uri().authority().map(authority_name);
        let hosts = req
            .headers()
            .get_all(header::HOST)
            .iter()
            .map(|v| host_name_of(v.as_bytes()));
        authority
            .into_iter()
            .chain(hosts)
            .find(|n| !n.eq_ignore_ascii_case(expected.as_bytes()))
            .map(|n| String::from_utf8_lossy(n).into_owned())
    }

    /// The request to send upstream (HTTP/1.1, origin-form), rewritten by the policy,
    /// and the guest side of the upgrade it asks for, if it does.
    async fn prepare(
        &self,
        policy: &CompiledPolicy,
        mut req: Request<Incoming>,
        transform: Option<&CompiledTransform>,
        ex: &ExchangeRef,
    ) -> Result<(Request<ProxyBody>, Option<OnUpgrade>), Refusal> {
        let host = self.host.as_str();
        let detectors: Vec<Detector> = policy.pii.iter().map(|(d, _)| *d).collect();
        let req_secrets = if self.cleartext {
            policy.secrets.for_cleartext_request(host)
        } else {
            policy.secrets.for_request(host)
        };
        // Upgrades are HTTP/1.1's: an HTTP/2 request cannot carry their headers.
        let upgrade = req.version() <= Version::HTTP_11 && wants_upgrade(req.headers());
        let guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().cloned();

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
        Ok((
            Request::from_parts(parts, out.counted(counters)),
            guest_upgrade,
        ))
    }

    /// The upstream's response `resp` to a `method` request, checked and rewritten by
    /// the policy on its way to the guest.
    async fn respond(
        &self,
        policy: &CompiledPolicy,
        resp: Response<Incoming>,
        method: &Method,
        transform: Option<&CompiledTransform>,
        ex: &ExchangeRef,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let host = self.host.as_str();
        let resp_secrets = policy.secrets.for_response();
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

    /// Where this host's requests go, and the name the upstream certificate must have.
    fn target(&self, transform: Option<&CompiledTransform>) -> (Target, String) {
        match transform.and_then(|t| t.upstream.clone()) {
            Some((h, port)) => (Target::Host(h.clone(), port.unwrap_or(self.dest.port())), h),
            None => (Target::Addr(self.dest), self.host.clone()),
        }
    }
}

/// Records the outcome `o` in the exchange and makes the proxy's own answer.
fn refuse(ex: &ExchangeRef, status: StatusCode, body: serde_json::Value, o: Outcome) -> Refusal {
    lock(ex).outcome(o);
    Box::new(json_response(status, &body))
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

/// Whether a request asks to upgrade the connection to WebSocket, the one upgrade
/// relayed: its frames are not HTTP, so they are spliced uninspected. Any other (`h2c`)
/// is not: spliced, HTTP/2 would escape the policy; such a request has its upgrade
/// headers dropped and is served as plain HTTP/1.1.
fn wants_upgrade(h: &HeaderMap) -> bool {
    let mut protocols = h
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|p| {
            let p = p.trim_ascii();
            // `name/version`.
            p.split(|b| *b == b'/').next().unwrap_or(p)
        })
        .peekable();
    protocols.peek().is_some()
        && protocols.all(|p| p.eq_ignore_ascii_case(b"websocket"))
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

/// An authority as a Host header has it: without userinfo (`user@`).
fn host_of(a: &Authority) -> &str {
    a.as_str().rsplit('@').next().unwrap_or_default()
}

/// The host name an authority names (no userinfo, port or brackets).
fn authority_name(a: &Authority) -> &[u8] {
    host_name_of(host_of(a).as_bytes())
}

/// Joins a request's `cookie` fields into one, as HTTP/1.1 has it (HTTP/2 may split
/// them: RFC 9113, 8.2.3).
fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
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
        // Only WebSocket: h2c (alone or offered with it) is not relayed.
        for other in ["h2c", "websocket, h2c", "", "TLS/1.0"] {
            up.insert("upgrade", HeaderValue::from_static(other));
            assert!(!wants_upgrade(&up), "{other}");
        }
        up.insert("upgrade", HeaderValue::from_static("WebSocket/13"));
        assert!(wants_upgrade(&up));
    }

    #[test]
    fn authorities_and_cookies_for_http1() {
        let a = |s: &str| s.parse::<Authority>().unwrap();
        assert_eq!(authority_name(&a("user:pw@A.com:443")), b"A.com");
        assert_eq!(host_of(&a("user@a.com:8443")), "a.com:8443");
        assert_eq!(authority_name(&a("[::1]:8443")), b"::1");
        assert_eq!(authority_name(&a("a.com.")), b"a.com");
        // Odd authorities a guest may send parse or not, but never panic here.
        for odd in ["@", "a@", "@:1", "[::1", ":", "a:b@"] {
            if let Ok(x) = odd.parse::<Authority>() {
                let _ = (authority_name(&x), host_of(&x));
            }
        }
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
    }
}
