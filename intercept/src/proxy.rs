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
//! 2. The egress gate's host check ([`Session::with_host_check`]): over TLS on the
//!    ClientHello's server name, once per connection; in cleartext on each request's
//!    host. A host it refuses gets 403 (`egress_refused`) and the connection is closed.
//! 3. PII on the URL (percent-decoded), the header values and a text body's first
//!    [`MAX_INSPECT_BYTES`] (JSON, form, text, HTML): `block` → 403, `redact` →
//!    `[REDACTED:kind]`, `log` → audit only. PII runs before secrets are inserted, so a
//!    real secret the proxy puts in is never mistaken for the guest's.
//! 4. Secret placeholders become real values in the request's **header values** only,
//!    and only if the host is one of the secret's (and so is a transform's
//!    `upstreamHost`, when there is one). In the URL and the body they always stay (a
//!    server may echo either back in a form masking cannot match), as they do for other
//!    hosts, and over cleartext (anyone on the path could read a real value there). The
//!    audit says `kept`, plus a `cleartext` detection where the value would have gone in
//!    over TLS. A request a value went into loses its `Range` and `If-Range` (a range
//!    could cut an echoed value into pieces masking would not match).
//! 5. The host's transform: request header edits, and `upstreamHost`.
//! 6. Upstream: one of the guest connection's few upstream connections (made as needed,
//!    again if the server closes one), over TLS verified against the public and extra
//!    roots (a refused certificate is a 502 saying why), or in cleartext for a
//!    cleartext guest connection.
//! 7. The response: real secret values masked back to placeholders (header names and
//!    values, the reason phrase, the whole body as it streams, trailers; over cleartext
//!    too), the transform's response edits, and injection defense on a text body's first
//!    [`MAX_INSPECT_BYTES`]. A compressed response to a request a secret went into is
//!    refused (502 `secret_in_encoded_response`): masking cannot see into it.
//! 8. One audit record when the response body ends (or the guest goes: an HTTP/2
//!    stream reset, a closed connection; status 0 if it went before the answer).
//!
//! Masking is a safety net: a host a secret is allowed for receives the real value and
//! can always misuse it, or send it back in a form masking does not recognise. Only
//! allow hosts you trust with the key.
//!
//! A `101 Switching Protocols` answer to an HTTP/1.1 upgrade request (WebSockets) ends
//! the HTTP relay: its head is masked and edited by the transform like any response's,
//! then both sides are spliced raw until either closes. The frames are not inspected nor
//! masked, so an upgrade request a secret went into is refused (502
//! `secret_in_upgrade`) when the server switches. HTTP/2 has no such upgrade: the proxy
//! does not enable extended CONNECT (RFC 8441), so an HTTP/2 client opens its
//! WebSockets on an HTTP/1.1 connection, and a `CONNECT` is refused.
//!
//! Bounds: a body is buffered only up to [`MAX_INSPECT_BYTES`] (larger text bodies are
//! inspected up to there and the rest streams uninspected, though still masked), and
//! only under the session's inspection budget ([`SESSION_INSPECT_BUDGET`] bytes shared
//! by all of a sandbox's connections, waited for at most [`INSPECT_BUDGET_WAIT`]). When
//! none is free in time, a request body the PII policy would `block` or `redact` is
//! refused (503 `busy`: uninspected personal data never passes), one it would only
//! `log` passes uninspected, and a response passes uninspected (still masked; its
//! request already went, so refusing would lose the answer): the audit says
//! `uninspected` either way. Request heads are limited to [`MAX_HEAD_BYTES`] (hyper's
//! read buffer in HTTP/1.1, the header list in HTTP/2). Every wait has a deadline: the
//! TLS handshakes, the upstream connect, an HTTP/1.1 request head
//! ([`HEADER_READ_TIMEOUT`]), an upstream slot, the inspection budget, a request body's
//! inspected prefix ([`BODY_IDLE_TIMEOUT`] without progress → 408), the upstream's
//! response head ([`RESPONSE_HEAD_TIMEOUT`] after the request's last progress → 504)
//! and a response body's inspected prefix ([`RESPONSE_IDLE_TIMEOUT`] without progress
//! → 504). Bodies streamed past their prefix, and spliced upgrades, flow as long as
//! both ends keep their connections (an HTTP/2 guest gone silent is found by pings). An
//! HTTP/2 connection has at most [`H2_MAX_CONCURRENT_STREAMS`] streams, flow-control
//! windows of [`H2_STREAM_WINDOW`] each and [`H2_CONNECTION_WINDOW`] in all (hyper's
//! buffers, outside the inspection budget), and at most [`MAX_UPSTREAM_CONNECTIONS`]
//! exchanges in progress (others wait, up to [`crate::upstream::SLOT_WAIT_TIMEOUT`],
//! then 503). To keep responses inspectable the proxy asks for uncompressed ones
//! (`accept-encoding: identity`) when injection defense or secrets are on; a server
//! compressing anyway gets its body passed uninspected (and the audit says so), unless
//! a secret went into its request (above).
//!
//! Not served: HTTP/2 in cleartext (h2c). A cleartext connection is HTTP/1.1: one
//! starting with the HTTP/2 preface is closed ([`InterceptError::GuestHttp`]), and an
//! `Upgrade: h2c` is dropped (the request is served as HTTP/1.1). Only WebSocket
//! upgrades are relayed: any other spliced protocol would escape the policy.

use crate::audit::AuditSink;
use crate::body::{BoxError, Inner, ProxyBody, MAX_INSPECT_BYTES};
use crate::ca::TeamCa;
use crate::exchange::{audit_path, lock, AuditGuard, Exchange, ExchangeRef, Outcome};
use crate::headers::{authority_name, host_name_of, strip_hop_by_hop, Counted};
use crate::policy::{CompiledPolicy, CompiledTransform};
use crate::tls::{self, TlsError, UpstreamError};
use crate::upstream::{Dialer, Pool, Slot, MAX_UPSTREAM_CONNECTIONS};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
/// Bytes of inspection buffers (request and response prefixes) all of one session's
/// connections may hold at once. 64 MiB: 64 bodies inspected whole at once, however
/// many connections the guest opens.
pub const SESSION_INSPECT_BUDGET: usize = 64 << 20;
/// How long an exchange waits for its share of the inspection budget before it is
/// inspected less (see the module docs).
pub const INSPECT_BUDGET_WAIT: Duration = Duration::from_secs(2);
/// How long reading a request body's inspected prefix may go without a byte before
/// the guest gets a 408.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the upstream's response head is waited for after the request last made
/// progress (its body's last byte went) before the guest gets a 504. Five minutes: a
/// model's non-streamed answer can take minutes.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long reading a response body's inspected prefix may go without a byte before
/// the guest gets a 504.
pub const RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A session's inspection budget and deadlines; the defaults are the constants of the
/// same names ([`SESSION_INSPECT_BUDGET`], ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of inspection buffers the session's connections may hold at once.
    pub inspect_budget: usize,
    /// How long an exchange waits for its share of that budget.
    pub budget_wait: Duration,
    /// How long a request body's inspected prefix may go without progress (→ 408).
    pub body_idle: Duration,
    /// How long the response head is waited for after the request's last progress
    /// (→ 504).
    pub response_head: Duration,
    /// How long a response body's inspected prefix may go without progress (→ 504).
    pub response_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            inspect_budget: SESSION_INSPECT_BUDGET,
            budget_wait: INSPECT_BUDGET_WAIT,
            body_idle: BODY_IDLE_TIMEOUT,
            response_head: RESPONSE_HEAD_TIMEOUT,
            response_idle: RESPONSE_IDLE_TIMEOUT,
        }
    }
}

/// The egress gate's verdict on a host name: whether the sandbox may reach it now.
pub type HostCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What one sandbox's interception shares across its connections: the team CA, the
/// upstream TLS configuration, the policy (changeable live), the connector, the audit,
/// the inspection budget and the egress gate's host check.
pub struct Session {
    ca: Arc<TeamCa>,
    upstream_tls: Arc<ClientConfig>,
    policy: RwLock<Arc<CompiledPolicy>>,
    connector: Arc<dyn Connect>,
    audit: Arc<dyn AuditSink>,
    limits: Limits,
    /// Bytes of inspection buffers free (permits are bytes).
    budget: Arc<Semaphore>,
    host_check: Option<HostCheck>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// No inspection budget came free in time.
pub(crate) struct Busy;

impl Session {
    /// A session connecting with [`TcpConnector`], with the default [`Limits`] and no
    /// host check.
    pub fn new(
        ca: Arc<TeamCa>,
        upstream_tls: Arc<ClientConfig>,
        policy: CompiledPolicy,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        let limits = Limits::default();
        Self {
            ca,
            upstream_tls,
            policy: RwLock::new(Arc::new(policy)),
            connector: Arc::new(TcpConnector),
            audit,
            budget: budget(&limits),
            limits,
            host_check: None,
        }
    }

    /// The same session connecting with `connector`.
    pub fn with_connector(mut self, connector: Arc<dyn Connect>) -> Self {
        self.connector = connector;
        self
    }

    /// The same session with `limits` (a fresh inspection budget of their size).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.budget = budget(&limits);
        self.limits = limits;
        self
    }

    /// The same session asking `check` whether a host may be reached: [`intercept`]
    /// asks with the ClientHello's server name once the guest's handshake is done (a
    /// connection without one is not asked about), [`intercept_plain`] with each
    /// request's host (its authority's, else its `Host` header's name). A host it
    /// refuses gets 403 `{"error":"egress_refused","host":...}`, recorded as `blocked`,
    /// and the connection is closed. It runs on the proxy's tasks: it must not block.
    /// Without one, every host passes.
    pub fn with_host_check(mut self, check: Arc<dyn Fn(&str) -> bool + Send + Sync>) -> Self {
        self.host_check = Some(check);
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

    /// The session's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes of the inspection budget free now.
    pub fn inspect_budget_free(&self) -> usize {
        self.budget.available_permits()
    }

    /// Whether the host check lets `host` be reached.
    fn allows_host(&self, host: &str) -> bool {
        self.host_check.as_ref().is_none_or(|f| f(host))
    }

    /// `bytes` of the inspection budget (at most [`MAX_INSPECT_BYTES`]), waiting at most
    /// the budget wait: `Ok(None)` when nothing is needed.
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<Option<OwnedSemaphorePermit>, Busy> {
        let bytes = bytes.min(MAX_INSPECT_BYTES);
        if bytes == 0 {
            return Ok(None);
        }
        if bytes > self.limits.inspect_budget {
            return Err(Busy);
        }
        let n = u32::try_from(bytes).map_err(|_| Busy)?;
        match tokio::time::timeout(
            self.limits.budget_wait,
            self.budget.clone().acquire_many_owned(n),
        )
        .await
        {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(Busy),
        }
    }
}

fn budget(limits: &Limits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        limits.inspect_budget.min(Semaphore::MAX_PERMITS),
    ))
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
pub(crate) struct ConnStats {
    requests: AtomicU64,
    pub(crate) bytes_in: Arc<AtomicU64>,
    pub(crate) bytes_out: Arc<AtomicU64>,
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
    let hello = tls
        .get_ref()
        .1
        .server_name()
        .map(|s| s.to_ascii_lowercase());
    // The gate's check on the name the guest's TLS actually named.
    let refused = hello.clone().filter(|h| !ctx.allows_host(h));
    let sni = hello.or(sni.map(|s| s.to_ascii_lowercase()));
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let upstream_tls = Some(ctx.upstream_tls.clone());
    serve(Conn::new(ctx, dest, sni, upstream_tls, refused), tls, h2).await
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
    serve(Conn::new(ctx, dest, host, None, None), guest, false).await
}

/// Runs `conn` (a hyper connection) to its end; once `closing` is notified, it is shut
/// down gracefully (the requests in progress are answered, then it closes).
async fn until_closed<C, T>(conn: Pin<&mut C>, closing: &Notify, shutdown: fn(Pin<&mut C>)) -> T
where
    C: Future<Output = T>,
{
    let mut conn = conn;
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = closing.notified() => shutdown(conn.as_mut()),
    }
    conn.await
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
        let c = pin!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
                .max_header_list_size(MAX_HEAD_BYTES as u32)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
                .serve_connection(io, service)
        );
        until_closed(c, &conn.closing, |c| c.graceful_shutdown()).await
    } else {
        let c = pin!(hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            // Both: the buffer bound alone lets a head through when one read brings it
            // whole.
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .serve_connection(io, service)
            .with_upgrades());
        until_closed(c, &conn.closing, |c| c.graceful_shutdown()).await
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
pub(crate) type Refusal = Box<Response<ProxyBody>>;

/// One guest connection's state.
pub(crate) struct Conn {
    pub(crate) ctx: Arc<Session>,
    dest: SocketAddr,
    /// The name every request must be for: the TLS server name, or the `Host` the
    /// egress proxy sniffed on a cleartext connection. `None`: unknown, not checked.
    pub(crate) expected: Option<String>,
    /// That name, else the destination's IP: what policies and audit records name.
    pub(crate) host: String,
    /// Whether the guest's connection is cleartext (and so the upstream one).
    pub(crate) cleartext: bool,
    /// The TLS server name the host check refused: every request is, and the
    /// connection closes.
    refused: Option<String>,
    /// Notified to close the connection once the requests in progress are answered.
    closing: Notify,
    dialer: Dialer,
    pool: Pool,
    pub(crate) stats: ConnStats,
    splice: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Conn {
    /// A connection to `dest` for `expected`, upstream over TLS with `upstream_tls`
    /// (`None`: cleartext); `refused`: the server name the host check refused.
    fn new(
        ctx: Arc<Session>,
        dest: SocketAddr,
        expected: Option<String>,
        upstream_tls: Option<Arc<ClientConfig>>,
        refused: Option<String>,
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
            refused,
            closing: Notify::new(),
            pool: Pool::new(),
            stats: ConnStats::default(),
            splice: Mutex::new(None),
        })
    }

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
        if let Some((name, location)) = self.egress_refused(&req) {
            lock(ex).path = audit_path(req.uri().path().as_bytes());
            lock(ex).detect("egress".into(), location.into(), "block");
            // Answered, then the connection closes: the gate no longer lets it out.
            self.closing.notify_one();
            let mut r = refuse(
                ex,
                StatusCode::FORBIDDEN,
                serde_json::json!({
                    "error": "egress_refused",
                    "host": name,
                    "message": format!("the sandbox's egress policy does not allow {name}"),
                }),
                Outcome::Blocked,
            );
            if req.version() <= Version::HTTP_11 {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Err(r);
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
        // Taken before the body is read: the slots bound the exchanges in progress on
        // one connection (the session's inspection budget bounds their buffers).
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
        let prepared = self.prepare(policy, req, transform, ex).await?;
        let inserted = prepared.inserted;

        let mut resp = self.send(slot, transform, prepared.req, ex).await?;

        // An upgrade: splice both sides once the 101 is sent.
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The upstream connection is the splice's now, or of no further use.
            slot.discard();
            let Some(guest_upgrade) = prepared.upgrade else {
                // Unasked (or asked over HTTP/2, where it cannot be relayed).
                return Err(refuse(
                    ex,
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({"error": "upstream_failed", "host": host, "message": "the upstream switched protocols though the request asked for no upgrade"}),
                    Outcome::Error,
                ));
            };
            if inserted {
                // The new protocol's frames pass unmasked: the value could come back.
                lock(ex).detect("upgrade".into(), "response".into(), "block");
                return Err(refuse(
                    ex,
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({
                        "error": "secret_in_upgrade",
                        "host": host,
                        "message": format!("{host} switched protocols on a request a secret's value went into; the new protocol is not masked, so the switch is refused (send the secret on plain HTTP requests, not on an upgrade)"),
                    }),
                    Outcome::Blocked,
                ));
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (mut parts, body) = resp.into_parts();
            self.respond_head(policy, &mut parts, transform, ex, true);
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
            let body = ProxyBody::pass(body.map_err(BoxError::from).boxed_unsync());
            return Ok(Response::from_parts(parts, body));
        }
        self.respond(policy, resp, &method, transform, ex, inserted)
            .await
    }

    /// Sends `req` on `slot` to where `transform` says (else the destination), waiting
    /// for the response head until [`Limits::response_head`] has passed since the
    /// request last made progress.
    async fn send(
        &self,
        slot: &mut Slot,
        transform: Option<&CompiledTransform>,
        req: Request<ProxyBody>,
        ex: &ExchangeRef,
    ) -> Result<Response<Incoming>, Refusal> {
        let host = self.host.as_str();
        let (target, name) = self.target(transform);
        let limit = self.ctx.limits.response_head;
        let progress = lock(ex).bytes_out.clone();
        let result = {
            let mut send = pin!(slot.send(&self.dialer, target, name, host, req));
            let tick = limit.min(Duration::from_secs(1));
            let (mut seen, mut last) = (progress.load(Ordering::Relaxed), Instant::now());
            loop {
                tokio::select! {
                    r = send.as_mut() => break Some(r),
                    _ = tokio::time::sleep(tick) => {
                        let now = progress.load(Ordering::Relaxed);
                        if now != seen {
                            (seen, last) = (now, Instant::now());
                        } else if last.elapsed() >= limit {
                            break None;
                        }
                    }
                }
            }
        };
        let Some(result) = result else {
            lock(ex).detect("timeout".into(), "response".into(), "block");
            return Err(refuse(
                ex,
                StatusCode::GATEWAY_TIMEOUT,
                serde_json::json!({
                    "error": "upstream_timeout",
                    "host": host,
                    "message": format!("{host} sent no response within {limit:?} of the request"),
                }),
                Outcome::Error,
            ));
        };
        result.map_err(|e| {
            let (kind, error) = match &e {
                UpstreamError::CertificateRefused { .. } => {
                    ("upstreamCertificate", "upstream_certificate_refused")
                }
                UpstreamError::Tls { .. } => ("upstreamTls", "upstream_tls_failed"),
                _ => ("upstream", "upstream_unreachable"),
            };
            lock(ex).detect(kind.into(), "tls".into(), "block");
            debug!(host, error = %e, "intercept: upstream failed");
            refuse(
                ex,
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"error": error, "host": host, "message": e.to_string()}),
                Outcome::Error,
            )
        })
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

    /// The host the egress gate refuses for `req`, and where it was named (`sni`,
    /// `host`): over TLS the connection's server name (checked once, at the handshake);
    /// in cleartext the request's own host, checked now.
    fn egress_refused(&self, req: &Request<Incoming>) -> Option<(String, &'static str)> {
        if let Some(h) = &self.refused {
            return Some((h.clone(), "sni"));
        }
        if !self.cleartext {
            return None;
        }
        let named = req.uri().authority().map(authority_name).or_else(|| {
            req.headers()
                .get(header::HOST)
                .map(|v| host_name_of(v.as_bytes()))
        })?;
        let name = String::from_utf8_lossy(named).to_ascii_lowercase();
        (!name.is_empty() && !self.ctx.allows_host(&name)).then_some((name, "host"))
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
pub(crate) fn refuse(
    ex: &ExchangeRef,
    status: StatusCode,
    body: serde_json::Value,
    o: Outcome,
) -> Refusal {
    lock(ex).outcome(o);
    Box::new(json_response(status, &body))
}

pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
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

/// How many bytes of inspection budget a body's prefix needs: none if it has ended,
/// its length if known and within [`MAX_INSPECT_BYTES`], else that.
pub(crate) fn prefix_need(headers: &HeaderMap, body: &Inner) -> usize {
    use http_body::Body;
    if body.is_end_stream() {
        return 0;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(MAX_INSPECT_BYTES, |n| n.min(MAX_INSPECT_BYTES))
}

/// Whether a body is known to fit in the inspected prefix (its `content-length`, or
/// already ended): read whole, it keeps an exact length.
pub(crate) fn fits_prefix(headers: &HeaderMap, body: &Inner) -> bool {
    use http_body::Body;
    body.is_end_stream()
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_INSPECT_BYTES)
}

/// Removes what a response head must not carry on: hop-by-hop headers (keeping those
/// of an `upgrade`) and an upstream's own injection verdict header.
pub(crate) fn clean_response_head(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    // Only the proxy says what it found: an upstream's own header of that name would
    // read as a verdict.
    headers.remove(INJECTION_HEADER);
}
