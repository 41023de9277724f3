//! The security policy (the REST `securityPolicy`), its validation, and its compiled
//! form the proxy applies.
//!
//! The JSON shape, every part optional:
//!
//! ```json
//! {
//!   "pii": {"detectors": {"card": "block", "email": "redact", "ipv4": "log"}},
//!   "injectionDefense": {"action": "flag"},
//!   "transforms": [{"host": "api.example.com",
//!                   "requestHeaders": {"set": {"x-team": "a"}, "remove": ["cookie"]},
//!                   "responseHeaders": {"remove": ["set-cookie"]},
//!                   "upstreamHost": "api-eu.example.com"}],
//!   "audit": {"enabled": true},
//!   "envMasking": {"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"]}]}
//! }
//! ```
//!
//! Unknown fields are refused (a misspelt rule must not silently do nothing), and each
//! validation error says what to send instead.

use crate::pii::Detector;
use crate::secrets::{Secret, SecretSet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Most transforms in one policy.
pub const MAX_TRANSFORMS: usize = 256;
/// Most headers one transform sets or removes (each side).
pub const MAX_HEADER_EDITS: usize = 64;
/// Most masked secrets in one policy.
pub const MAX_SECRETS: usize = 64;
/// Most hosts one secret may be sent to.
pub const MAX_SECRET_HOSTS: usize = 32;
/// Shortest secret value: responses are masked wherever the value occurs, so a short
/// one would mangle them.
pub const MIN_SECRET_VALUE: usize = 8;
/// Longest secret value (a value is matched in every response: it must stay small).
pub const MAX_SECRET_VALUE: usize = 4096;

/// A team's or sandbox's security policy, as sent over REST.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityPolicy {
    /// Personal-data detection on what the guest sends.
    #[serde(default)]
    pub pii: PiiPolicy,
    /// Prompt-injection heuristics on what the guest receives; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injection_defense: Option<InjectionPolicy>,
    /// Per-host header edits and upstream rewrites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<Transform>,
    /// Whether each request is recorded.
    #[serde(default)]
    pub audit: AuditPolicy,
    /// Secrets the guest only ever sees as placeholders.
    #[serde(default)]
    pub env_masking: EnvMasking,
}

/// PII detection: the action for each detector turned on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PiiPolicy {
    /// Detector → action; detectors absent are off.
    #[serde(default)]
    pub detectors: BTreeMap<Detector, PiiAction>,
}

/// What is done with a detected value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PiiAction {
    /// Let it through; record the detection in the audit.
    Log,
    /// Replace it by `[REDACTED:kind]`.
    Redact,
    /// Refuse the request: 403 to the guest naming the detector.
    Block,
}

/// Injection defense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectionPolicy {
    /// What is done with a response the rules match.
    pub action: InjectionAction,
}

/// What is done with a response the injection rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InjectionAction {
    /// Pass it, with `x-nullspace-injection: <rules>` and an audit detection.
    Flag,
    /// Remove the matched spans.
    Strip,
    /// Refuse it: 502 to the guest with the rules.
    Block,
}

/// Header edits and an upstream rewrite for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transform {
    /// The host it applies to: `api.example.com`, or `*.example.com` for its subdomains.
    pub host: String,
    /// Edits to requests.
    #[serde(default)]
    pub request_headers: HeaderEdits,
    /// Edits to responses.
    #[serde(default)]
    pub response_headers: HeaderEdits,
    /// Sends this host's requests to another host (name or `name:port`) instead; the
    /// upstream certificate is verified for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
}

/// Headers to set (added or replaced) and to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderEdits {
    /// Name → value, replacing any value the message had.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Audit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditPolicy {
    /// Whether each request is recorded (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Env masking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvMasking {
    /// The masked secrets.
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
}

/// One masked secret: the env var the guest sees as a placeholder, and where its real
/// value may go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    /// The environment variable's name.
    pub name: String,
    /// What the guest sees; generated (`nsk_<name>_<random>`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
    /// The hosts the real value may be sent to (`*.example.com` for subdomains).
    pub hosts: Vec<String>,
}

/// Why a policy was refused; each message says what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A host (transform, secret, upstream) is not a host name.
    #[error("{field}: {value:?} is not a host; send a DNS name like \"api.example.com\" or \"*.example.com\"")]
    BadHost {
        /// Where in the policy.
        field: String,
        /// What was sent.
        value: String,
    },
    /// A header name or value is not valid HTTP.
    #[error("{field}: {value:?} is not a valid HTTP header {what}; send visible ASCII (names: letters, digits, '-')")]
    BadHeader {
        /// Where in the policy.
        field: String,
        /// What was sent.
        value: String,
        /// "name" or "value".
        what: &'static str,
    },
    /// A header the proxy owns (framing, hop-by-hop, Host) was named.
    #[error("{field}: the {name:?} header is the proxy's to manage; use upstreamHost to send a host's requests elsewhere, and leave framing headers out")]
    ReservedHeader {
        /// Where in the policy.
        field: String,
        /// The header.
        name: String,
    },
    /// Too many entries.
    #[error(
        "{field}: at most {max} entries; send fewer (merge rules for one host into one transform)"
    )]
    TooMany {
        /// Where in the policy.
        field: String,
        /// The limit.
        max: usize,
    },
    /// A secret's name is not an environment variable name.
    #[error("envMasking.secrets[{index}].name: {name:?} is not an environment variable name; send letters, digits and '_', not starting with a digit, e.g. \"OPENAI_API_KEY\"")]
    BadSecretName {
        /// Which secret.
        index: usize,
        /// What was sent.
        name: String,
    },
    /// Two secrets share a name or placeholder.
    #[error(
        "envMasking.secrets: {0:?} appears twice; send each secret once, with its own placeholder"
    )]
    DuplicateSecret(String),
    /// A secret lists no hosts.
    #[error("envMasking.secrets[{index}].hosts: a secret with no hosts is sent nowhere; list the hosts it may go to, e.g. [\"api.openai.com\"]")]
    NoHosts {
        /// Which secret.
        index: usize,
    },
    /// A placeholder is short or has characters that could occur by chance.
    #[error("envMasking.secrets[{index}].placeholder: send at least 16 characters of letters, digits, '_' and '-' (or omit it and one is generated)")]
    BadPlaceholder {
        /// Which secret.
        index: usize,
    },
    /// No real value was given for a secret.
    #[error("envMasking: no value was given for the secret {0:?}; send it with the sandbox's secret env vars")]
    MissingValue(String),
    /// A real value is empty, too long, or contains its own placeholder.
    #[error("envMasking: the value of {0:?} must be 8 to 4096 bytes (a shorter one would be masked wherever its bytes occur by chance) and must not contain its placeholder")]
    BadValue(String),
}

/// A host rule: an exact name, or `*.suffix` matching the suffix's subdomains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    suffix: bool,
    name: String,
}

impl HostPattern {
    /// Parses `api.example.com` or `*.example.com`.
    pub fn parse(s: &str, field: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadHost {
            field: field.to_string(),
            value: s.chars().take(80).collect(),
        };
        let (suffix, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !valid_host(&name) {
            return Err(bad());
        }
        Ok(Self { suffix, name })
    }

    /// Whether `host` (a name from SNI or Host; case and a trailing dot ignored) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if self.suffix {
            host.len() > self.name.len() + 1
                && host[host.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host.eq_ignore_ascii_case(&self.name)
        }
    }
}

/// Whether `name` is a DNS name or IP address.
fn valid_host(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
        })
}

/// Headers transforms may not touch: HTTP framing and hop-by-hop headers (the proxy
/// frames each side itself) and Host (rewritten with `upstreamHost`).
const RESERVED_HEADERS: [&str; 10] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "x-nullspace-injection",
];

/// Compiled header edits.
#[derive(Debug, Clone, Default)]
pub struct CompiledEdits {
    /// Headers set (name, value).
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Headers removed.
    pub remove: Vec<http::HeaderName>,
}

impl CompiledEdits {
    fn compile(e: &HeaderEdits, field: &str) -> Result<Self, PolicyError> {
        if e.set.len() > MAX_HEADER_EDITS || e.remove.len() > MAX_HEADER_EDITS {
            return Err(PolicyError::TooMany {
                field: field.to_string(),
                max: MAX_HEADER_EDITS,
            });
        }
        let name = |n: &str, f: String| {
            let h =
                http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| PolicyError::BadHeader {
                    field: f.clone(),
                    value: n.chars().take(80).collect(),
                    what: "name",
                })?;
            if RESERVED_HEADERS.contains(&h.as_str()) {
                return Err(PolicyError::ReservedHeader {
                    field: f,
                    name: h.as_str().to_string(),
                });
            }
            Ok(h)
        };
        let mut out = Self::default();
        for (n, v) in &e.set {
            let f = format!("{field}.set");
            let h = name(n, f.clone())?;
            let v = http::HeaderValue::from_str(v).map_err(|_| PolicyError::BadHeader {
                field: f,
                value: v.chars().take(80).collect(),
                what: "value",
            })?;
            out.set.push((h, v));
        }
        for n in &e.remove {
            out.remove.push(name(n, format!("{field}.remove"))?);
        }
        Ok(out)
    }

    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
    }
}

/// A compiled transform.
#[derive(Debug, Clone)]
pub struct CompiledTransform {
    /// The hosts it applies to.
    pub host: HostPattern,
    /// Request edits.
    pub request: CompiledEdits,
    /// Response edits.
    pub response: CompiledEdits,
    /// Where this host's requests go instead: (host, port if given).
    pub upstream: Option<(String, Option<u16>)>,
}

/// A policy checked and ready to apply (cheap to share: the proxy holds it in an
/// `Arc` and a policy change swaps it).
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    /// Detectors on, with their actions.
    pub pii: Vec<(Detector, PiiAction)>,
    /// Injection defense, if on.
    pub injection: Option<InjectionAction>,
    /// Transforms, first match per host wins.
    pub transforms: Vec<CompiledTransform>,
    /// Whether requests are audited.
    pub audit: bool,
    /// Masked secrets with their real values.
    pub secrets: SecretSet,
}

impl SecurityPolicy {
    /// Gives each secret without a placeholder a generated one, returning the names it
    /// gave. The pool manager calls this once at create and keeps the result: the guest's
    /// environment holds the placeholders, so they must survive restarts and restores.
    pub fn fill_placeholders(&mut self) -> Vec<String> {
        let mut filled = Vec::new();
        for s in &mut self.env_masking.secrets {
            if s.placeholder.is_none() {
                s.placeholder = Some(crate::secrets::new_placeholder(&s.name));
                filled.push(s.name.clone());
            }
        }
        filled
    }

    /// Checks the policy without secret values (what the API does on receipt).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut p = self.clone();
        p.fill_placeholders();
        let values: HashMap<String, String> = p
            .env_masking
            .secrets
            .iter()
            .map(|s| (s.name.clone(), "v".repeat(MIN_SECRET_VALUE)))
            .collect();
        p.compile(&values).map(|_| ())
    }

    /// Checks the policy and compiles it; `values` are the secrets' real values by name
    /// (each secret needs one). Secrets without a placeholder get a generated one here
    /// (see [`SecurityPolicy::fill_placeholders`] to keep them stable).
    pub fn compile(&self, values: &HashMap<String, String>) -> Result<CompiledPolicy, PolicyError> {
        if self.transforms.len() > MAX_TRANSFORMS {
            return Err(PolicyError::TooMany {
                field: "transforms".into(),
                max: MAX_TRANSFORMS,
            });
        }
        let mut transforms = Vec::with_capacity(self.transforms.len());
        for (i, t) in self.transforms.iter().enumerate() {
            let field = format!("transforms[{i}]");
            let upstream = match &t.upstream_host {
                None => None,
                Some(u) => {
                    let f = format!("{field}.upstreamHost");
                    let (h, port) = match u.rsplit_once(':') {
                        Some((h, p)) if !h.contains(':') => (
                            h,
                            Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                                PolicyError::BadHost {
                                    field: f.clone(),
                                    value: u.clone(),
                                }
                            })?),
                        ),
                        _ => (u.as_str(), None),
                    };
                    if h.starts_with("*.") || !valid_host(h) {
                        return Err(PolicyError::BadHost {
                            field: f,
                            value: u.clone(),
                        });
                    }
                    Some((h.to_ascii_lowercase(), port))
                }
            };
            transforms.push(CompiledTransform {
                host: HostPattern::parse(&t.host, &format!("{field}.host"))?,
                request: CompiledEdits::compile(
                    &t.request_headers,
                    &format!("{field}.requestHeaders"),
                )?,
                response: CompiledEdits::compile(
                    &t.response_headers,
                    &format!("{field}.responseHeaders"),
                )?,
                upstream,
            });
        }
        let specs = &self.env_masking.secrets;
        if specs.len() > MAX_SECRETS {
            return Err(PolicyError::TooMany {
                field: "envMasking.secrets".into(),
                max: MAX_SECRETS,
            });
        }
        let mut secrets = Vec::with_capacity(specs.len());
        let mut seen = std::collections::HashSet::new();
        for (index, s) in specs.iter().enumerate() {
            let name_ok = !s.name.is_empty()
                && s.name.len() <= 128
                && !s.name.as_bytes()[0].is_ascii_digit()
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(PolicyError::BadSecretName {
                    index,
                    name: s.name.chars().take(80).collect(),
                });
            }
            if s.hosts.is_empty() {
                return Err(PolicyError::NoHosts { index });
            }
            if s.hosts.len() > MAX_SECRET_HOSTS {
                return Err(PolicyError::TooMany {
                    field: format!("envMasking.secrets[{index}].hosts"),
                    max: MAX_SECRET_HOSTS,
                });
            }
            let placeholder = match &s.placeholder {
                Some(p) => {
                    let ok = p.len() >= 16
                        && p.len() <= 256
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if !ok {
                        return Err(PolicyError::BadPlaceholder { index });
                    }
                    p.clone()
                }
                None => crate::secrets::new_placeholder(&s.name),
            };
            for key in [&s.name, &placeholder] {
                if !seen.insert(key.clone()) {
                    return Err(PolicyError::DuplicateSecret(key.clone()));
                }
            }
            let hosts = s
                .hosts
                .iter()
                .enumerate()
                .map(|(j, h)| {
                    HostPattern::parse(h, &format!("envMasking.secrets[{index}].hosts[{j}]"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let value = values
                .get(&s.name)
                .ok_or_else(|| PolicyError::MissingValue(s.name.clone()))?;
            if value.len() < MIN_SECRET_VALUE
                || value.len() > MAX_SECRET_VALUE
                || value.contains(&placeholder)
            {
                return Err(PolicyError::BadValue(s.name.clone()));
            }
            secrets.push(Secret {
                name: s.name.clone(),
                placeholder,
                value: value.clone(),
                hosts,
            });
        }
        Ok(CompiledPolicy {
            pii: self.pii.detectors.iter().map(|(d, a)| (*d, *a)).collect(),
            injection: self.injection_defense.map(|i| i.action),
            transforms,
            audit: self.audit.enabled,
            secrets: SecretSet::new(secrets),
        })
    }
}

impl CompiledPolicy {
    /// The first transform for `host`.
    pub fn transform_for(&self, host: &str) -> Option<&CompiledTransform> {
        self.transforms.iter().find(|t| t.host.matches(host))
    }

    /// The action for `d`, if it is on.
    pub fn pii_action(&self, d: Detector) -> Option<PiiAction> {
        self.pii.iter().find(|(x, _)| *x == d).map(|(_, a)| *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<SecurityPolicy, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn the_documented_shape_parses_and_compiles() {
        let p = parse(
            r#"{"pii":{"detectors":{"card":"block","email":"redact","privateKey":"log"}},
                "injectionDefense":{"action":"strip"},
                "transforms":[{"host":"*.example.com","requestHeaders":{"set":{"x-a":"1"},"remove":["cookie"]},
                               "responseHeaders":{"remove":["set-cookie"]},"upstreamHost":"eu.example.com:8443"}],
                "audit":{"enabled":false},
                "envMasking":{"secrets":[{"name":"OPENAI_API_KEY","hosts":["api.openai.com"]}]}}"#,
        )
        .unwrap();
        let values = HashMap::from([("OPENAI_API_KEY".to_string(), "sk-real-value".to_string())]);
        let c = p.compile(&values).unwrap();
        assert_eq!(c.pii_action(Detector::Card), Some(PiiAction::Block));
        assert_eq!(c.pii_action(Detector::Phone), None);
        assert_eq!(c.injection, Some(InjectionAction::Strip));
        assert!(!c.audit);
        let t = c.transform_for("API.example.com").unwrap();
        assert_eq!(t.upstream, Some(("eu.example.com".into(), Some(8443))));
        assert!(c.transform_for("example.com").is_none());
        assert!(c
            .secrets
            .get("OPENAI_API_KEY")
            .unwrap()
            .placeholder
            .starts_with("nsk_openai_api_key_"));
        // An empty policy is valid and does nothing but audit.
        let empty = parse("{}").unwrap().compile(&HashMap::new()).unwrap();
        assert!(empty.audit && empty.pii.is_empty());
    }

    #[test]
    fn mistakes_are_refused_with_what_to_send() {
        for (json, says) in [
            (
                r#"{"pii":{"detectors":{"ssn":"block"}}}"#,
                "unknown variant",
            ),
            (
                r#"{"pii":{"detectors":{"card":"drop"}}}"#,
                "unknown variant",
            ),
            (r#"{"injection":{"action":"flag"}}"#, "unknown field"),
            (
                r#"{"transforms":[{"host":"a.com","requestHeader":{}}]}"#,
                "unknown field",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
        for (json, says) in [
            (r#"{"transforms":[{"host":"a b"}]}"#, "send a DNS name"),
            (
                r#"{"transforms":[{"host":"a.com","requestHeaders":{"set":{"host":"b"}}}]}"#,
                "use upstreamHost",
            ),
            (
                r#"{"transforms":[{"host":"a.com","requestHeaders":{"set":{"x":"a\nb"}}}]}"#,
                "visible ASCII",
            ),
            (
                r#"{"transforms":[{"host":"a.com","upstreamHost":"b.com:0"}]}"#,
                "not a host",
            ),
            (
                r#"{"envMasking":{"secrets":[{"name":"1X","hosts":["a.com"]}]}}"#,
                "environment variable name",
            ),
            (
                r#"{"envMasking":{"secrets":[{"name":"X","hosts":[]}]}}"#,
                "list the hosts",
            ),
            (
                r#"{"envMasking":{"secrets":[{"name":"X","placeholder":"short","hosts":["a.com"]}]}}"#,
                "at least 16",
            ),
            (
                r#"{"envMasking":{"secrets":[{"name":"X","hosts":["a.com"]},{"name":"X","hosts":["a.com"]}]}}"#,
                "twice",
            ),
        ] {
            let e = parse(json).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
        let p = parse(r#"{"envMasking":{"secrets":[{"name":"X","hosts":["a.com"]}]}}"#).unwrap();
        assert_eq!(
            p.compile(&HashMap::new()).unwrap_err(),
            PolicyError::MissingValue("X".into())
        );
    }

    #[test]
    fn placeholders_are_filled_once() {
        let mut p =
            parse(r#"{"envMasking":{"secrets":[{"name":"K","hosts":["a.com"]}]}}"#).unwrap();
        assert_eq!(p.fill_placeholders(), ["K"]);
        let first = p.env_masking.secrets[0].placeholder.clone();
        assert!(p.fill_placeholders().is_empty());
        assert_eq!(p.env_masking.secrets[0].placeholder, first);
        // It round-trips through JSON (the pool manager stores it).
        let back: SecurityPolicy =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn host_patterns() {
        let exact = HostPattern::parse("API.example.com", "f").unwrap();
        assert!(exact.matches("api.example.com.") && !exact.matches("x.api.example.com"));
        let sub = HostPattern::parse("*.example.com", "f").unwrap();
        assert!(sub.matches("a.example.com") && sub.matches("a.b.EXAMPLE.com"));
        assert!(!sub.matches("example.com") && !sub.matches("badexample.com"));
    }
}
