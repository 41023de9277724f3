//! The upstream side of an interception: where a request goes ([`Target`]), how its
//! TCP connection is made ([`Connect`]), and the few HTTP/1.1 connections one guest
//! connection's requests share.
//!
//! Requests always go upstream as HTTP/1.1, one at a time per connection: over TLS
//! (ALPN `http/1.1`, the server verified) for an intercepted TLS connection, in
//! cleartext for a cleartext one. An HTTP/1.1 guest makes one request at a time, so its
//! requests take turns on one upstream connection. An HTTP/2 guest may have many
//! streams open at once: each exchange holds one of [`MAX_UPSTREAM_CONNECTIONS`] slots
//! from before its request body is read to the end of its response body, and the
//! upstream connections, made as needed and reused once free, are never more than the
//! slots. A request waits at most [`SLOT_WAIT_TIMEOUT`] for a slot (then the guest gets
//! a 503). So one guest connection can neither open unbounded upstream connections nor
//! have more than that many exchanges in progress; their inspection buffers come out
//! of the budget all of the session's connections share
//! ([`crate::proxy::SESSION_INSPECT_BUDGET`]).

use crate::body::ProxyBody;
use crate::proxy::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_HEAD_BYTES};
use crate::tls::{self, UpstreamError};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

/// Most upstream connections one guest connection may have, and so most of its
/// exchanges in progress at once (they matter only for an HTTP/2 guest). Eight: an
/// agent streaming a few model responses in parallel over one connection is served
/// without waiting, while what one connection can hold stays bounded.
pub const MAX_UPSTREAM_CONNECTIONS: usize = 8;

/// How long a request waits for a free upstream slot before the guest gets a 503.
pub const SLOT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a free upstream connection may take to be ready for the next request
/// (hyper's connection task notices a response's end a moment after the guest read it);
/// past it the connection is dropped and another made.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// How a guest connection's upstream connections are made.
pub(crate) struct Dialer {
    /// The TCP connections.
    pub(crate) connector: Arc<dyn Connect>,
    /// TLS over them, verified against these roots; `None`: cleartext (the guest's
    /// connection is: an upstream in cleartext is what its request was for).
    pub(crate) tls: Option<Arc<ClientConfig>>,
}

/// One upstream HTTP/1.1 connection, with the target and name it was made for.
struct Upstream {
    target: Target,
    name: String,
    sender: SendRequest<ProxyBody>,
}

/// Free upstream connections.
type Idle = Arc<Mutex<Vec<Upstream>>>;

fn idle(i: &Idle) -> std::sync::MutexGuard<'_, Vec<Upstream>> {
    i.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dialer {
    /// A new connection to `target`, its certificate verified for `name` over TLS.
    async fn connect(&self, target: Target, name: String) -> Result<Upstream, UpstreamError> {
        // Checked before connecting: a name no certificate can have fails every time.
        let server_name = match &self.tls {
            Some(_) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| UpstreamError::BadName(name.clone()))?,
            ),
            None => None,
        };
        let shown = match &target {
            Target::Addr(a) => a.to_string(),
            Target::Host(h, p) => format!("{h}:{p}"),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(target.clone()))
            .await
            .map_err(|_| UpstreamError::Connect {
                target: shown.clone(),
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })?
            .map_err(|e| UpstreamError::Connect {
                target: shown.clone(),
                reason: e.to_string(),
            })?;
        let io: BoxIo = match (&self.tls, server_name) {
            (Some(config), Some(server_name)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| UpstreamError::Tls {
                            host: name.clone(),
                            reason: format!(
                                "the handshake did not finish within {HANDSHAKE_TIMEOUT:?}"
                            ),
                        })?
                        .map_err(|e| tls::classify_handshake_error(&name, &e))?;
                Box::new(tls)
            }
            _ => tcp,
        };
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .handshake(TokioIo::new(io))
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
        Ok(Upstream {
            target,
            name,
            sender,
        })
    }
}

/// One guest connection's upstream connections and the slots bounding them.
pub(crate) struct Pool {
    slots: Arc<Semaphore>,
    idle: Idle,
}

impl Pool {
    /// An empty pool of [`MAX_UPSTREAM_CONNECTIONS`] slots.
    pub(crate) fn new() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_UPSTREAM_CONNECTIONS)),
            idle: Idle::default(),
        }
    }

    /// A slot for one exchange, waiting at most [`SLOT_WAIT_TIMEOUT`]; `None` when none
    /// came free in time.
    pub(crate) async fn slot(&self) -> Option<Slot> {
        let permit = tokio::time::timeout(SLOT_WAIT_TIMEOUT, self.slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(Slot {
            idle: self.idle.clone(),
            conn: None,
            _permit: permit,
        })
    }
}

/// An exchange's right to one upstream connection, held until its response body ends
/// (it travels with that body). Dropped, it gives its connection back for the next
/// request, then the slot.
///
/// Connections are only made by a slot holder finding no free one fit for its request,
/// and a connection is either a holder's or free: so there are never more connections
/// than slots.
pub(crate) struct Slot {
    idle: Idle,
    conn: Option<Upstream>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// Sends `req` to `target` (verified for `name`) on a free connection made for the
    /// same, else on a new one. `host` names the exchange in errors.
    pub(crate) async fn send(
        &mut self,
        dialer: &Dialer,
        target: Target,
        name: String,
        host: &str,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let failed = |e: hyper::Error| UpstreamError::Connect {
            target: host.to_string(),
            reason: format!("the request failed: {e}"),
        };
        let (mut up, reused) = match self.reuse(&target, &name).await {
            Some(up) => (up, true),
            None => (dialer.connect(target.clone(), name.clone()).await?, false),
        };
        let resp = match up.sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                // A free connection the server closed just as the request went (its
                // keep-alive ran out): the request was not sent, so it goes on a new
                // connection, once.
                Some(req) if reused => {
                    debug!(host, error = %e.error(), "intercept: a reused upstream connection was closed; sending on a new one");
                    up = dialer.connect(target, name).await?;
                    up.sender.send_request(req).await.map_err(failed)?
                }
                _ => return Err(failed(e.into_error())),
            },
        };
        self.conn = Some(up);
        Ok(resp)
    }

    /// Drops the connection instead of giving it back: its response was abandoned, or
    /// it was upgraded.
    pub(crate) fn discard(&mut self) {
        self.conn = None;
    }

    /// A free connection made for `target` and `name` and ready for a request. Free
    /// ones made for others (a policy change sent the host elsewhere) or closed are
    /// dropped.
    async fn reuse(&self, target: &Target, name: &str) -> Option<Upstream> {
        loop {
            let mut up = {
                let mut free = idle(&self.idle);
                free.retain(|u| u.target == *target && u.name == name && !u.sender.is_closed());
                free.pop()?
            };
            if let Ok(Ok(())) = tokio::time::timeout(READY_TIMEOUT, up.sender.ready()).await {
                return Some(up);
            }
        }
    }
}

impl Drop for Slot {
    /// Gives the connection back (before the slot itself goes, with the permit field:
    /// whoever gets the slot next finds the connection free).
    fn drop(&mut self) {
        if let Some(up) = self.conn.take() {
            if !up.sender.is_closed() {
                idle(&self.idle).push(up);
            }
        }
    }
}
