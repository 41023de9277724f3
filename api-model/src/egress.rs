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
    /// A domain allow rule admits an address only if the sandbox resolved an allowed
    /// name to it (so a forged SNI cannot reach an arbitrary address), and only if the
    /// name the client then asks for is allowed too.
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
        resolved.iter().any(|n| allowed_name(n)) && host.is_none_or(allowed_name)
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
        assert!(p.allows_connection(ip("198.51.100.1"), None, &good));
        assert!(p.allows_connection(ip("198.51.100.1"), Some("good.test"), &good));
        // ...and a client that then asks for another name is refused.
        assert!(!p.allows_connection(ip("198.51.100.1"), Some("other.test"), &good));
        assert!(!p.allows_connection(ip("198.51.100.1"), Some("good.test"), &[]));
    }
}
