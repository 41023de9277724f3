//! Nullspace's TLS-intercepting HTTP layer (issue 25's core): what the egress proxy
//! runs on a guest's TLS connection when the sandbox has a security policy.
//!
//! - [`ca`]: a per-team certificate authority (ECDSA P-256, PEM for the catalog) and
//!   the leaves it mints per server name, cached in a bounded LRU.
//! - [`tls`]: the guest-side `ServerConfig` (a leaf for each ClientHello's SNI) and the
//!   upstream `ClientConfig` (webpki roots plus extra ones), and typed upstream errors.
//! - [`proxy`]: [`intercept`], one TLS connection: TLS both ways, HTTP/2 or HTTP/1.1
//!   from the guest (ALPN) relayed with hyper as HTTP/1.1 upstream, the policy applied
//!   to each request and response, upgrades spliced; [`intercept_plain`], one
//!   cleartext HTTP/1.1 connection, the same pipeline in cleartext both ways (secret
//!   placeholders never replaced there). A [`Session`] per sandbox holds what its
//!   connections share: the policy, the audit, an inspection budget and deadlines
//!   ([`Limits`]), and the egress gate's host check ([`Session::with_host_check`]).
//! - [`upstream`]: where requests go ([`Target`], [`Connect`]) and the few upstream
//!   connections one guest connection shares (bounded, for HTTP/2's many streams).
//! - [`policy`]: the REST `securityPolicy`, its validation and compiled form.
//! - [`pii`], [`injection`], [`secrets`]: the detectors, the injection heuristics, env
//!   masking (real values in request header values only, to the secret's hosts;
//!   masked in responses — but a host you allow can always misuse a key it receives:
//!   only allow hosts you trust with it).
//! - [`audit`]: one record per request, each field capped, to a sink that never blocks
//!   or grows unbounded (and says what it dropped).
//! - [`body`]: bounded prefix reads and streamed, rewritten, counted bodies.
//! - [`replay`]: the egress proxy's sniffed bytes put back in front of the socket.
//!
//! Nothing here starts VMs or touches the network namespace: the egress proxy hands
//! [`intercept`] an accepted stream (its sniffed bytes replayed in front), the original
//! destination and the SNI, and a [`Session`] per sandbox; or, for a cleartext HTTP
//! connection, [`intercept_plain`] the stream, the destination and the sniffed `Host`.
//!
//! # Using it
//!
//! ```no_run
//! # async fn example(
//! #     client: tokio::net::TcpStream,
//! #     first: Vec<u8>,
//! #     dest: std::net::SocketAddr,
//! #     sni: Option<String>,
//! #     (plain_client, plain_first, plain_dest, host): (tokio::net::TcpStream, Vec<u8>, std::net::SocketAddr, Option<String>),
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use intercept::{Replay, SecurityPolicy, Session, TeamCa};
//! use std::sync::Arc;
//! // Once per team, kept in the catalog (cert PEM → guests' trust stores).
//! let ca = TeamCa::generate("team-1")?;
//! let (cert_pem, key_pem) = (ca.cert_pem().to_string(), ca.key_pem().to_string());
//! // Once per sandbox: the policy (placeholders filled once, at create, and kept).
//! let mut policy: SecurityPolicy = serde_json::from_str(r#"{"pii":{"detectors":{"card":"redact"}}}"#)?;
//! policy.fill_placeholders();
//! let secret_values = std::collections::HashMap::new();
//! let session = Arc::new(Session::new(
//!     Arc::new(TeamCa::from_pem(&cert_pem, &key_pem)?),
//!     intercept::upstream_client_config(&[])?,
//!     policy.compile(&secret_values)?,
//!     Arc::new(intercept::MemorySink::new(1000)),
//! ));
//! // Per TLS connection the egress proxy lets out to port 443.
//! let stats = intercept::intercept(Replay::new(first, client), dest, sni, session.clone()).await?;
//! // Per cleartext HTTP connection it lets out (`host`: the Host header it sniffed).
//! let plain = intercept::intercept_plain(
//!     Replay::new(plain_first, plain_client),
//!     plain_dest,
//!     host,
//!     session,
//! )
//! .await?;
//! # let _ = (stats, plain);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod audit;
pub mod body;
pub mod ca;
mod exchange;
mod headers;
pub mod injection;
pub mod pii;
pub mod policy;
pub mod proxy;
pub mod replay;
mod request;
mod response;
pub mod secrets;
pub mod tls;
pub mod upstream;

pub use audit::{AuditRecord, AuditSink, ChannelSink, Detection, MemorySink, NullSink};
pub use ca::{CaError, LeafName, TeamCa};
pub use policy::{CompiledPolicy, PolicyError, SecurityPolicy};
pub use proxy::{
    intercept, intercept_plain, BoxIo, Connect, HostCheck, InterceptError, Limits, Session, Stats,
    Target, TcpConnector, SESSION_INSPECT_BUDGET,
};
pub use replay::Replay;
pub use tls::{guest_server_config, upstream_client_config, TlsError, UpstreamError};
pub use upstream::MAX_UPSTREAM_CONNECTIONS;
