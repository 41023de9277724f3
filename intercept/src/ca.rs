//! A team's certificate authority: the root the guest trusts, and the leaf certificates
//! minted from it for each server name the guest connects to.
//!
//! The CA is ECDSA P-256 (small certificates, fast signatures: a leaf is minted on the
//! first connection to a name, in the connection's path). Its certificate and key are
//! PEM so the pool manager can keep them in its catalog; the certificate PEM is what is
//! installed in guests' trust stores. Leaves are valid for [`LEAF_VALIDITY`] and cached
//! per name in a bounded LRU ([`LEAF_CACHE_ENTRIES`]): a guest connecting to endless
//! names costs at most that many leaves of memory.

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long a minted leaf certificate is valid. Short: a leaf only ever serves live
/// connections of this process, and a leaked one is soon worthless.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf this close to its expiry is minted again.
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Leaves are backdated by this much, so a guest whose clock is a little behind the
/// host's still accepts them.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Most leaves cached per CA.
pub const LEAF_CACHE_ENTRIES: usize = 1024;
/// Longest server name a leaf is minted for (a DNS name's limit).
const MAX_NAME_LEN: usize = 253;

/// Why a CA could not be made or loaded, or a leaf minted.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The PEM given is not a certificate and key of this kind.
    #[error("the CA PEM is not usable: {0}; send the certificate and PKCS#8 key PEMs this crate generated")]
    Pem(String),
    /// The key does not belong to the certificate.
    #[error("the CA key does not match the CA certificate; send the pair generated together")]
    KeyMismatch,
    /// The name is not a DNS name or IP address a certificate can be minted for.
    #[error("{0:?} is not a DNS name or IP address a certificate can be made for")]
    BadName(String),
    /// rustls refused the minted key (should not happen for P-256).
    #[error("the minted key is not usable by rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server name a leaf is minted for: a DNS name (lowercased) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS name, lowercased, without a trailing dot.
    Dns(String),
    /// An IP address (a guest connecting without SNI).
    Ip(IpAddr),
}

impl LeafName {
    /// Parses a name from SNI or a Host header: IP addresses as such, else a DNS name
    /// of letters, digits, `-`, `_` and `.` (no wildcards: a leaf is minted for the exact
    /// name asked).
    pub fn parse(name: &str) -> Result<Self, CaError> {
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if let Ok(ip) = trimmed.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let lower = trimmed.to_ascii_lowercase();
        let ok = !lower.is_empty()
            && lower.len() <= MAX_NAME_LEN
            && lower.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if ok {
            Ok(Self::Dns(lower))
        } else {
            Err(CaError::BadName(name.chars().take(80).collect()))
        }
    }
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dns(n) => f.write_str(n),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

struct CachedLeaf {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

/// A team's certificate authority.
pub struct TeamCa {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    /// The CA as rcgen's issuer (its parameters re-signed with its key: only the subject,
    /// key identifier and key usages are used to sign leaves, so leaves chain to the
    /// stored certificate).
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// One key for every leaf of this CA: minting is then one signature, and the key
    /// never leaves this process's memory (it is not persisted).
    leaf_key: KeyPair,
    leaf_key_der: PrivatePkcs8KeyDer<'static>,
    cache: Mutex<LruCache<LeafName, CachedLeaf>>,
}

impl std::fmt::Debug for TeamCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamCa").finish_non_exhaustive()
    }
}

impl TeamCa {
    /// Generates a new CA named after `team` (its common name says so, for whoever finds
    /// it in a guest's trust store).
    pub fn generate(team: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let team: String = team
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(48)
            .collect();
        dn.push(
            DnType::CommonName,
            format!("Nullspace egress CA for team {team}"),
        );
        dn.push(DnType::OrganizationName, "Nullspace");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - LEAF_BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from the PEMs [`TeamCa::cert_pem`] and [`TeamCa::key_pem`] gave.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let issuer_key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Pem(e.to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| CaError::Pem(e.to_string()))?;
        let der = pem_der(cert_pem)?;
        // The key must be the certificate's: compare the public keys.
        if x509_public_key(&der)? != issuer_key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let issuer = params.self_signed(&issuer_key)?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf_key_der = PrivatePkcs8KeyDer::from(leaf_key.serialize_der());
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der: CertificateDer::from(der),
            issuer,
            issuer_key,
            leaf_key,
            leaf_key_der,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(LEAF_CACHE_ENTRIES).expect("nonzero"),
            )),
        })
    }

    /// The CA certificate, PEM: what guests trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PKCS#8 PEM: kept by the pool manager, never sent to a guest.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Leaves in the cache now (at most [`LEAF_CACHE_ENTRIES`]).
    pub fn cached_leaves(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The leaf for `name` (chain: leaf, CA), from the cache or minted now.
    pub fn leaf(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, CaError> {
        let now = SystemTime::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.get(name) {
                if hit.renew_at > now {
                    return Ok(hit.key.clone());
                }
            }
        }
        // Minted outside the lock: two connections racing for a new name both mint
        // (harmless) rather than every connection waiting on one signature.
        let key = Arc::new(self.mint(name, now)?);
        let renew_at = now + LEAF_VALIDITY - LEAF_RENEW_BEFORE;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(
            name.clone(),
            CachedLeaf {
                key: key.clone(),
                renew_at,
            },
        );
        Ok(key)
    }

    fn mint(&self, name: &LeafName, now: SystemTime) -> Result<CertifiedKey, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(n) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|_| CaError::BadName(n.clone()))?,
            ),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - LEAF_BACKDATE).into();
        params.not_after = (now + LEAF_VALIDITY).into();
        // A random serial: two processes (or restarts) minting for one name must not
        // produce certificates a client could confuse.
        let serial: [u8; 16] = rand::random();
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(serial.into());
        let cert = params.signed_by(&self.leaf_key, &self.issuer, &self.issuer_key)?;
        let key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            self.leaf_key_der.clone_key(),
        ))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            key,
        ))
    }
}

/// The DER of the first `CERTIFICATE` block of `pem`.
fn pem_der(pem: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| CaError::Pem(format!("{e:?}")))
}

/// The subject public key (raw bit string) of a DER certificate.
fn x509_public_key(der: &[u8]) -> Result<Vec<u8>, CaError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Pem(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_are_refused() {
        assert_eq!(
            LeafName::parse("Example.COM.").unwrap(),
            LeafName::Dns("example.com".into())
        );
        assert_eq!(
            LeafName::parse("10.1.2.3").unwrap(),
            LeafName::Ip("10.1.2.3".parse().unwrap())
        );
        for bad in [
            "",
            "a..b",
            "*.example.com",
            "a b",
            &"x".repeat(300),
            "é.com",
        ] {
            assert!(LeafName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_survives_its_pem_and_leaves_are_cached() {
        let ca = TeamCa::generate("t1").unwrap();
        let again = TeamCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        let name = LeafName::parse("api.example.com").unwrap();
        let a = again.leaf(&name).unwrap();
        let b = again.leaf(&name).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second lookup is a cache hit");
        assert_eq!(a.cert.len(), 2);
        assert_eq!(again.cached_leaves(), 1);
        // A key of another CA is refused.
        let other = TeamCa::generate("t2").unwrap();
        assert!(matches!(
            TeamCa::from_pem(ca.cert_pem(), other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        assert!(TeamCa::from_pem("nonsense", ca.key_pem()).is_err());
    }

    #[test]
    fn the_cache_is_bounded() {
        let ca = TeamCa::generate("t").unwrap();
        for i in 0..(LEAF_CACHE_ENTRIES + 10) {
            ca.leaf(&LeafName::parse(&format!("h{i}.example")).unwrap())
                .unwrap();
        }
        assert_eq!(ca.cached_leaves(), LEAF_CACHE_ENTRIES);
    }
}
