//! TLS on both sides of the interception.
//!
//! Guest side: a `ServerConfig` per connection whose resolver presents a leaf of the
//! team's CA for the name the guest's ClientHello asks (no SNI: the original
//! destination's IP), offering ALPN `h2` and `http/1.1`. Upstream side: a `ClientConfig` verifying the real server
//! against the public roots (webpki-roots) and any extra roots an operator or test
//! trusts. A refused upstream certificate is an [`UpstreamError::CertificateRefused`],
//! which the proxy answers with a 502 saying why: never a silent downgrade.

use crate::ca::{LeafName, TeamCa};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::IpAddr;
use std::sync::Arc;
use tracing::debug;

/// The ALPN protocols offered to the upstream: HTTP/1.1 only (requests go upstream as
/// HTTP/1.1, whatever the guest speaks).
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// The ALPN protocols offered to the guest, preferred first: HTTP/2, then HTTP/1.1 (a
/// guest offering neither, or no ALPN at all, is served HTTP/1.1).
pub const GUEST_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Why TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An extra root is not a PEM certificate rustls accepts.
    #[error("extra trusted root {index} is not usable: {reason}; send PEM certificates (-----BEGIN CERTIFICATE-----)")]
    BadRoot {
        /// Which root (0-based).
        index: usize,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why the upstream connection failed; each is answered to the guest with a 502.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection failed or timed out.
    #[error("could not connect to the upstream {target}: {reason}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        reason: String,
    },
    /// The upstream's certificate did not verify.
    #[error("the upstream certificate of {host} was refused: {reason}")]
    CertificateRefused {
        /// The name it was verified for.
        host: String,
        /// Why, in words.
        reason: String,
    },
    /// Another TLS failure (protocol, alert, no common version).
    #[error("TLS with the upstream {host} failed: {reason}")]
    Tls {
        /// The name.
        host: String,
        /// Why.
        reason: String,
    },
    /// The name to verify is not a DNS name or IP address.
    #[error("{0:?} is not a name an upstream certificate can be verified for")]
    BadName(String),
}

/// ring, as the rest of the workspace uses; built once (a guest-side config is built
/// per connection).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// Presents, for each ClientHello, the team CA's leaf for its SNI or the fallback IP.
#[derive(Debug)]
struct LeafResolver {
    ca: Arc<TeamCa>,
    fallback: IpAddr,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = match hello.server_name() {
            Some(sni) => LeafName::parse(sni).ok()?,
            None => LeafName::Ip(self.fallback),
        };
        // None aborts the handshake with an alert: nothing else could be presented.
        self.ca
            .leaf(&name)
            .map_err(|e| debug!(error = %e, "intercept: no leaf minted"))
            .ok()
    }
}

/// The guest side's TLS configuration for a connection to `dest_ip` (the name when the
/// guest sends no SNI).
pub fn guest_server_config(
    ca: Arc<TeamCa>,
    dest_ip: IpAddr,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(LeafResolver {
            ca,
            fallback: dest_ip,
        }));
    config.alpn_protocols = GUEST_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The upstream side's TLS configuration: the public roots and `extra_roots` (PEM, each
/// one or more certificates).
pub fn upstream_client_config(extra_roots: &[&str]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (index, pem) in extra_roots.iter().enumerate() {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::BadRoot {
                index,
                reason: format!("{e:?}"),
            })?;
        if certs.is_empty() {
            return Err(TlsError::BadRoot {
                index,
                reason: "no certificate in it".into(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|e| TlsError::BadRoot {
                index,
                reason: e.to_string(),
            })?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Classifies a failed upstream handshake (`tokio-rustls` wraps rustls errors in
/// `io::Error`).
pub fn classify_handshake_error(host: &str, e: &std::io::Error) -> UpstreamError {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(ce)) => UpstreamError::CertificateRefused {
            host: host.to_string(),
            reason: describe(ce, host),
        },
        Some(other) => UpstreamError::Tls {
            host: host.to_string(),
            reason: other.to_string(),
        },
        None => UpstreamError::Tls {
            host: host.to_string(),
            reason: e.to_string(),
        },
    }
}

fn describe(e: &CertificateError, host: &str) -> String {
    match e {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("it is not valid for the name {host}")
        }
        CertificateError::UnknownIssuer => {
            "it is not issued by a trusted certificate authority".to_string()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired".to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet".to_string()
        }
        CertificateError::Revoked => "it has been revoked".to_string(),
        CertificateError::BadSignature => "its signature does not verify".to_string(),
        CertificateError::BadEncoding => "it is malformed".to_string(),
        other => format!("{other:?}"),
    }
}
