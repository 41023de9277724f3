//! A sandbox's network egress policy: its wire shape, its validation, and the matching
//! rules every enforcement point shares (so the component, the pool manager and the
//! egress proxy agree on what a rule means).

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most entries in each of `allow` and `deny`.
pub const MAX_EGRESS_RULES: usize = 256;

/// What a sandbox may reach. `internet: false` denies everything not allowed; `deny`
/// wins over `allow`. Entries are IPs (`203.0.113.7`), CIDRs (`10.0.0.0/8`), domains
/// (`example.com`: that name only) or wildcard domains (`*.example.com`: names under it).
///
/// Whatever the policy, the host's own addresses, private networks (RFC 1918,
/// `100.64.0.0/10`), link-local addresses (cloud metadata) and reserved blocks are
/// reachable only through an IP or CIDR allow rule that names them
/// ([`CompiledEgress::names_reserved`]); `internet: true` does not open them. Under
/// domain rules, a connection that names no host (no TLS SNI, no HTTP Host) is admitted
/// only by `internet: true` or an IP or CIDR allow rule, never by a domain allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressPolicy {
    /// Whether destinations no rule names are reachable (default true).
    #[serde(default = "default_internet")]
    pub internet: bool,
    /// Destinations reachable even with `internet: false`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destinations never reachable.
    #[serde(default)]
    pub deny: Vec<String>,
}

fn default_internet() -> bool {
    true
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            internet: true,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// One parsed entry of an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRule {
    /// An address block (a single IP is a /32 or /128).
    Net { addr: IpAddr, prefix: u8 },
    /// A domain name, lower case; `wildcard` matches the names under it, not itself.
    Domain { name: String, wildcard: bool },
}

impl EgressRule {
    /// Parses one entry, or says what to send instead.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if let Some((addr, prefix)) = entry.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{entry:?} is not a CIDR; send e.g. \"10.0.0.0/8\""))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{entry:?} has a prefix length outside 0..={max}"))?;
            return Ok(Self::Net {
                addr: mask(addr, prefix),
                prefix,
            });
        }
        if let Ok(addr) = entry.parse::<IpAddr>() {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Self::Net { addr, prefix });
        }
        let (wildcard, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!(
                "{entry:?} is not an IP, a CIDR or a domain; send e.g. \"203.0.113.7\", \"10.0.0.0/8\", \"example.com\" or \"*.example.com\""
            ));
        }
        Ok(Self::Domain { name, wildcard })
    }

    /// Whether this rule covers address `ip`.
    pub fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            Self::Net { addr, prefix } => {
                // An IPv4-mapped IPv6 address is the IPv4 address.
                let ip = match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                    v4 => v4,
                };
                addr.is_ipv4() == ip.is_ipv4() && mask(ip, *prefix) == *addr
            }
            Self::Domain { .. } => false,
        }
    }

    /// Whether this rule covers host name `host` (any case, trailing dot or not).
    pub fn matches_name(&self, host: &str) -> bool {
        match self {
            Self::Domain { name, wildcard } => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                if *wildcard {
                    host.len() > name.len()
                        && host.ends_with(name.as_str())
                        && host.as_bytes()[host.len() - name.len() - 1] == b'.'
                } else {
                    host == *name
                }
            }
            Self::Net { .. } => false,
        }
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// A validated policy, its lists parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledEgress {
    /// Whether unnamed destinations are reachable.
    pub internet: bool,
    /// Parsed `allow`.
    pub allow: Vec<EgressRule>,
    /// Parsed `deny`.
    pub deny: Vec<EgressRule>,
}

impl EgressPolicy {
    /// Checks every entry; the error names the field and index (`egress.allow[2]`).
    pub fn compile(&self) -> Result<CompiledEgress, ApiError> {
        let list = |field: &str, entries: &[String]| {
            if entries.len() > MAX_EGRESS_RULES {
                return Err(ApiError::bad_request(format!(
                    "egress.{field} has {} entries; send at most {MAX_EGRESS_RULES}",
                    entries.len()
                ))
                .with_details(json!({ "field": format!("egress.{field}") })));
            }
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    EgressRule::parse(e).map_err(|why| {
                        ApiError::bad_request(format!("egress.{field}[{i}]: {why}"))
                            .with_details(json!({ "field": format!("egress.{field}[{i}]") }))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CompiledEgress {
            internet: self.internet,
            allow: list("allow", &self.allow)?,
            deny: list("deny", &self.deny)?,
        })
    }

    /// Whether this is the policy of a sandbox nobody restricted.
    pub fn is_open(&self) -> bool {
        self.internet && self.allow.is_empty() && self.deny.is_empty()
    }
}

impl CompiledEgress {
    /// Whether any rule names a domain (so connections are worth inspecting for one).
    pub fn has_domain_rules(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|r| matches!(r, EgressRule::Domain { .. }))
    }

    /// Whether a DNS query for `name` is answered (`false`: refused). A name is looked up
    /// when it is not denied and either the internet is on or an allow rule names it.
    pub fn allows_lookup(&self, name: &str) -> bool {
        if self.deny.iter().any(|r| r.matches_name(name)) {
            return false;
        }
        self.internet || self.allow.iter().any(|r| r.matches_name(name))
    }

    /// Whether a connection to `ip` may go out. `host` is the name the client asked for
    /// in its first bytes (TLS SNI, HTTP Host), when it sent one; `resolved` are the
    /// names this sandbox looked up that answered with `ip`.
    ///
    /// In order: a deny rule covering the address, the asked name, or (when no name was
    /// asked) every name the address was resolved from refuses; an IP or CIDR allow rule
    /// covering the address admits; `internet: true` admits. What is left is a domain
    /// allow rule, which admits only a connection that asked for an allowed name, to an
    /// address the sandbox resolved an allowed name to (so a forged SNI cannot reach an
    /// arbitrary address). A connection whose name cannot be read — no SNI, no Host, or
    /// a client that did not speak first — is never admitted by a domain rule: an
    /// address shared by many names (a CDN) would otherwise let the client reach any of
    /// them.
    ///
    /// This is the policy's word only: addresses of the host and private networks are
    /// refused before it is asked unless [`CompiledEgress::names_reserved`] says an allow
    /// rule names them.
    pub fn allows_connection(&self, ip: IpAddr, host: Option<&str>, resolved: &[String]) -> bool {
        if self.deny.iter().any(|r| r.matches_ip(ip)) {
            return false;
        }
        let denied_name = |n: &str| self.deny.iter().any(|r| r.matches_name(n));
        match host {
            Some(h) if denied_name(h) => return false,
            None if !resolved.is_empty() && resolved.iter().all(|n| denied_name(n)) => {
                return false
            }
            _ => {}
        }
        if self.internet || self.allow.iter().any(|r| r.matches_ip(ip)) {
            return true;
        }
        let allowed_name = |n: &str| self.allow.iter().any(|r| r.matches_name(n));
        host.is_some_and(allowed_name) && resolved.iter().any(|n| allowed_name(n))
    }

    /// The shortest IPv4 prefix of an allow rule that opens a reserved address (see
    /// [`CompiledEgress::names_reserved`]): `10.0.0.0/8`, the widest private network,
    /// names it; `0.0.0.0/0` or `0.0.0.0/1` ("everything") name nothing in particular.
    pub const MIN_NAMING_PREFIX: u8 = 8;

    /// Whether an allow rule names `ip`, for addresses no policy reaches unless a rule
    /// names them (the host's own, private networks, link-local): an IP or CIDR allow
    /// rule covering `ip` that is at least [`Self::MIN_NAMING_PREFIX`] bits long.
    /// `internet: true`, domain rules and near-everything blocks (`0.0.0.0/0`) do not
    /// count: none of them says the operator meant this network.
    pub fn names_reserved(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|r| match r {
            EgressRule::Net { prefix, .. } => {
                *prefix >= Self::MIN_NAMING_PREFIX && r.matches_ip(ip)
            }
            EgressRule::Domain { .. } => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> CompiledEgress {
        EgressPolicy {
            internet,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
        .compile()
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_parse_or_say_what_to_send() {
        assert_eq!(
            EgressRule::parse("10.1.2.3/8").unwrap(),
            EgressRule::Net {
                addr: ip("10.0.0.0"),
                prefix: 8
            }
        );
        assert!(EgressRule::parse("10.0.0.0/33").is_err());
        assert!(EgressRule::parse("not a host")
            .unwrap_err()
            .contains("send e.g."));
        assert!(EgressRule::parse("-bad.example").is_err());
        assert_eq!(
            EgressRule::parse("*.Example.COM.").unwrap(),
            EgressRule::Domain {
                name: "example.com".into(),
                wildcard: true
            }
        );
        let e = EgressPolicy {
            allow: vec!["ok.example".into(), "bad name".into()],
            ..EgressPolicy::default()
        }
        .compile()
        .unwrap_err();
        assert!(e.message.starts_with("egress.allow[1]"), "{}", e.message);
    }

    #[test]
    fn names_match_exactly_or_under_a_wildcard() {
        let exact = EgressRule::parse("example.com").unwrap();
        let wild = EgressRule::parse("*.example.com").unwrap();
        assert!(exact.matches_name("EXAMPLE.com."));
        assert!(!exact.matches_name("api.example.com"));
        assert!(wild.matches_name("api.example.com"));
        assert!(!wild.matches_name("example.com"));
        assert!(!wild.matches_name("badexample.com"));
    }

    #[test]
    fn deny_wins_and_internet_off_needs_an_allow() {
        let p = policy(true, &[], &["10.0.0.0/8", "bad.test"]);
        assert!(p.allows_connection(ip("192.0.2.1"), None, &[]));
        assert!(!p.allows_connection(ip("10.9.9.9"), None, &[]));
        assert!(!p.allows_connection(ip("192.0.2.1"), Some("bad.test"), &[]));
        assert!(!p.allows_lookup("bad.test"));
        assert!(p.allows_lookup("good.test"));

        let p = policy(false, &["192.0.2.0/24", "good.test"], &["192.0.2.9"]);
        assert!(p.allows_connection(ip("192.0.2.1"), None, &[]));
        assert!(!p.allows_connection(ip("192.0.2.9"), None, &[]));
        assert!(!p.allows_connection(ip("198.51.100.1"), None, &[]));
        assert!(!p.allows_lookup("other.test"));
        // A domain allow needs the address to come from that name's lookup...
        let good = ["good.test".to_string()];
        assert!(p.allows_connection(ip("198.51.100.1"), Some("good.test"), &good));
        // ...and a client that then asks for another name is refused...
        assert!(!p.allows_connection(ip("198.51.100.1"), Some("other.test"), &good));
        assert!(!p.allows_connection(ip("198.51.100.1"), Some("good.test"), &[]));
        // ...and so is one that names nothing (no SNI, no Host, silent): its address
        // alone is not the allowed name (a CDN serves many).
        assert!(!p.allows_connection(ip("198.51.100.1"), None, &good));
    }

    #[test]
    fn a_nameless_connection_needs_an_ip_rule_or_the_internet() {
        let good = ["good.test".to_string()];
        // An IP or CIDR allow rule admits it whatever the domain rules.
        let p = policy(false, &["good.test", "198.51.100.0/24"], &[]);
        assert!(p.allows_connection(ip("198.51.100.1"), None, &good));
        assert!(p.allows_connection(ip("198.51.100.1"), None, &[]));
        assert!(!p.allows_connection(ip("203.0.113.1"), None, &good));
        // With the internet on, it goes unless every name of its address is denied.
        let p = policy(true, &[], &["bad.test"]);
        assert!(p.allows_connection(ip("203.0.113.1"), None, &[]));
        assert!(p.allows_connection(ip("203.0.113.1"), None, &good));
        let bad = ["bad.test".to_string()];
        assert!(!p.allows_connection(ip("203.0.113.1"), None, &bad));
    }

    #[test]
    fn only_an_ip_rule_of_a_network_names_a_reserved_address() {
        let p = policy(
            true,
            &["192.168.1.5", "10.0.0.0/8", "*.example.com", "0.0.0.0/0"],
            &[],
        );
        assert!(p.names_reserved(ip("192.168.1.5")));
        assert!(!p.names_reserved(ip("192.168.1.6")));
        assert!(p.names_reserved(ip("10.200.0.1")));
        // `0.0.0.0/0` covers everything and names nothing; `internet: true` neither.
        assert!(!p.names_reserved(ip("172.16.0.1")));
        assert!(!p.names_reserved(ip("169.254.169.254")));
        assert!(!policy(true, &[], &[]).names_reserved(ip("100.64.0.1")));
        assert!(!policy(false, &["0.0.0.0/7"], &[]).names_reserved(ip("1.2.3.4")));
    }
}
