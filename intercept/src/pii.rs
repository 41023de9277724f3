//! Detectors of personal data and credentials in what a guest sends.
//!
//! Each detector finds candidates with a regular expression (linear time: the `regex`
//! crate never backtracks, so a hostile body cannot make a scan slow), then checks
//! them where a check exists: payment cards by the Luhn sum, IBANs by mod-97, IP
//! addresses by parsing, JWTs by decoding their header. They work on bytes (bodies
//! need not be UTF-8). What they find is reported as byte ranges; [`redact`] replaces
//! those with `[REDACTED:kind]`.
//!
//! They are heuristics: an unusual phone format is missed, and a 16-digit order number
//! that happens to pass the Luhn check reads as a card.

use base64::Engine;
use regex::bytes::Regex;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::sync::LazyLock;

/// A kind of personal data or credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Detector {
    /// An e-mail address.
    Email,
    /// A phone number in international form (`+` and country code, 8–15 digits).
    Phone,
    /// A payment card number: 13–19 digits, spaces or dashes between, Luhn-valid.
    Card,
    /// An IBAN whose mod-97 check holds.
    Iban,
    /// An IPv4 address.
    Ipv4,
    /// An IPv6 address.
    Ipv6,
    /// A JSON Web Token (three base64url parts; the header decodes to JSON with `alg`).
    Jwt,
    /// A PEM private key block.
    PrivateKey,
    /// A provider API key: `sk-…` (OpenAI, Anthropic), `AKIA…` (AWS), `ghp_…` and
    /// GitHub's other token prefixes, `xox[bpas]-…` (Slack), `AIza…` (Google).
    ApiKey,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Detector; 9] = [
        Detector::Email,
        Detector::Phone,
        Detector::Card,
        Detector::Iban,
        Detector::Ipv4,
        Detector::Ipv6,
        Detector::Jwt,
        Detector::PrivateKey,
        Detector::ApiKey,
    ];

    /// The name used in policies, markers and audit records (`privateKey`).
    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::Ipv4 => "ipv4",
            Detector::Ipv6 => "ipv6",
            Detector::Jwt => "jwt",
            Detector::PrivateKey => "privateKey",
            Detector::ApiKey => "apiKey",
        }
    }

    /// The byte ranges of `text` this detector finds, in order, not overlapping.
    pub fn find(self, text: &[u8]) -> Vec<Range<usize>> {
        match self {
            Detector::Email => plain(&EMAIL, text),
            Detector::Phone => phones(text),
            Detector::Card => cards(text),
            Detector::Iban => ibans(text),
            Detector::Ipv4 => ipv4s(text),
            Detector::Ipv6 => ipv6s(text),
            Detector::Jwt => jwts(text),
            Detector::PrivateKey => private_keys(text),
            Detector::ApiKey => plain(&API_KEY, text),
        }
    }
}

/// One thing found: which detector, and where in the text scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was found.
    pub detector: Detector,
    /// Its byte range.
    pub range: Range<usize>,
}

/// What `detectors` find in `text`, ordered by position; where two overlap the earlier
/// (then the longer) is kept, so the result can be redacted in one pass.
pub fn scan(text: &[u8], detectors: impl IntoIterator<Item = Detector>) -> Vec<Finding> {
    let mut all: Vec<Finding> = detectors
        .into_iter()
        .flat_map(|d| {
            d.find(text)
                .into_iter()
                .map(move |range| Finding { detector: d, range })
        })
        .collect();
    all.sort_by(|a, b| {
        a.range
            .start
            .cmp(&b.range.start)
            .then(b.range.end.cmp(&a.range.end))
    });
    let mut kept: Vec<Finding> = Vec::with_capacity(all.len());
    for f in all {
        if kept.last().is_none_or(|k| f.range.start >= k.range.end) {
            kept.push(f);
        }
    }
    kept
}

/// The marker that replaces a redacted value.
pub fn marker(d: Detector) -> String {
    format!("[REDACTED:{}]", d.name())
}

/// `text` with each of `findings` (ordered, not overlapping, as [`scan`] gives them)
/// replaced by what `replacement` says.
pub fn redact_with(
    text: &[u8],
    findings: &[Finding],
    replacement: impl Fn(Detector) -> String,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut pos = 0;
    for f in findings {
        out.extend_from_slice(&text[pos..f.range.start]);
        out.extend_from_slice(replacement(f.detector).as_bytes());
        pos = f.range.end;
    }
    out.extend_from_slice(&text[pos..]);
    out
}

/// `text` with each of `findings` replaced by `[REDACTED:kind]`.
pub fn redact(text: &[u8], findings: &[Finding]) -> Vec<u8> {
    redact_with(text, findings, marker)
}

fn re(s: &str) -> Regex {
    Regex::new(s).expect("a valid built-in pattern")
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b[a-z0-9][a-z0-9._%+-]{0,63}@[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*\.[a-z]{2,24}\b",
    )
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| re(r"\+[1-9](?:[ .-]?\(?[0-9]{1,4}\)?){2,7}"));
static CARD: LazyLock<Regex> = LazyLock::new(|| re(r"\b[0-9](?:[ -]?[0-9]){12,18}\b"));
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{1,4}){3,9}\b"));
static IPV4: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b"));
static IPV6: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?")
});
static JWT: LazyLock<Regex> =
    LazyLock::new(|| re(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"));
static PEM_FULL: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?s)-----BEGIN [A-Z0-9 ]{0,24}PRIVATE KEY-----.*?-----END [A-Z0-9 ]{0,24}PRIVATE KEY-----")
});
static PEM_BEGIN: LazyLock<Regex> =
    LazyLock::new(|| re(r"-----BEGIN [A-Z0-9 ]{0,24}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s]|\\[nr])*"));
static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"\b(?:sk-(?:proj-|ant-[a-z0-9]{2,8}-|live_|test_)?[A-Za-z0-9_-]{20,}",
        r"|(?:AKIA|ASIA)[0-9A-Z]{16}",
        r"|gh[pousr]_[A-Za-z0-9]{36,}",
        r"|github_pat_[A-Za-z0-9_]{40,}",
        r"|xox[bpas]-[A-Za-z0-9-]{10,}",
        r"|AIza[0-9A-Za-z_-]{35})\b"
    ))
});

fn plain(re: &Regex, text: &[u8]) -> Vec<Range<usize>> {
    re.find_iter(text).map(|m| m.range()).collect()
}

fn digits(s: &[u8]) -> Vec<u8> {
    s.iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect()
}

/// Whether the Luhn sum of `digits` is a multiple of ten.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    // `%` rather than `is_multiple_of`: the workspace's minimum Rust is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    let whole = sum % 10 == 0;
    !digits.is_empty() && whole
}

fn cards(text: &[u8]) -> Vec<Range<usize>> {
    CARD.find_iter(text)
        .filter(|m| {
            let s = m.as_bytes();
            let d = digits(s);
            // One kind of separator, so "1234 5678-9012 3456 7" style noise and runs
            // of numbers in a list are less often read as cards.
            let mixed = s.contains(&b' ') && s.contains(&b'-');
            (13..=19).contains(&d.len()) && !mixed && luhn(&d) && d.iter().any(|&x| x != 0)
        })
        .map(|m| m.range())
        .collect()
}

fn phones(text: &[u8]) -> Vec<Range<usize>> {
    PHONE
        .find_iter(text)
        .filter_map(|m| {
            // Not in the middle of a word or a number ("a+12345678").
            if m.start() > 0 && text[m.start() - 1].is_ascii_alphanumeric() {
                return None;
            }
            let mut r = m.range();
            // A closing parenthesis at the end is punctuation, not part of the number.
            while r.end > r.start && !text[r.end - 1].is_ascii_digit() {
                r.end -= 1;
            }
            if text.get(r.end).is_some_and(|b| b.is_ascii_digit()) {
                return None;
            }
            let n = digits(&text[r.clone()]).len();
            (8..=15).contains(&n).then_some(r)
        })
        .collect()
}

/// Whether `iban` (no spaces, upper case) passes the mod-97 check.
pub fn iban_valid(iban: &[u8]) -> bool {
    if !(15..=34).contains(&iban.len()) || !iban[..2].iter().all(u8::is_ascii_uppercase) {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ibans(text: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for m in IBAN.find_iter(text) {
        // The pattern can swallow a following word ("… 00 TODAY"): try the longest
        // run of groups first, then shorter ones.
        let s = m.as_bytes();
        let mut ends: Vec<usize> = s
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b' ')
            .map(|(i, _)| i)
            .collect();
        ends.push(s.len());
        for &end in ends.iter().rev() {
            let compact: Vec<u8> = s[..end].iter().copied().filter(|b| *b != b' ').collect();
            if compact.len() < 15 {
                break;
            }
            if iban_valid(&compact) {
                out.push(m.start()..m.start() + end);
                break;
            }
        }
    }
    out
}

fn ipv4s(text: &[u8]) -> Vec<Range<usize>> {
    IPV4.find_iter(text)
        .filter(|m| {
            // Part of a longer dotted run (a version "1.2.3.4.5", an OID) is no address.
            let before = m.start().checked_sub(1).map(|i| text[i]);
            let after = text.get(m.end()).copied();
            let after2 = text.get(m.end() + 1).copied();
            if before == Some(b'.')
                || (after == Some(b'.') && after2.is_some_and(|b| b.is_ascii_digit()))
            {
                return false;
            }
            std::str::from_utf8(m.as_bytes())
                .ok()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .is_some()
        })
        .map(|m| m.range())
        .collect()
}

fn ipv6s(text: &[u8]) -> Vec<Range<usize>> {
    IPV6.find_iter(text)
        .filter(|m| {
            let s = m.as_bytes();
            let before = m.start().checked_sub(1).map(|i| text[i]);
            let after = text.get(m.end()).copied();
            // Not glued to a word ("std::vec", "a::b" paths, times like 12:30:45 fail
            // to parse anyway).
            let word = |b: Option<u8>| {
                b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b':' || b == b'_')
            };
            if word(before) || word(after) {
                return false;
            }
            // At least one hex digit, and more than a bare "::".
            s.iter().any(|b| b.is_ascii_hexdigit())
                && std::str::from_utf8(s)
                    .ok()
                    .and_then(|s| s.parse::<Ipv6Addr>().ok())
                    .is_some()
        })
        .map(|m| m.range())
        .collect()
}

fn jwts(text: &[u8]) -> Vec<Range<usize>> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    JWT.find_iter(text)
        .filter(|m| {
            let mut parts = m.as_bytes().split(|b| *b == b'.');
            let (Some(header), Some(payload)) = (parts.next(), parts.next()) else {
                return false;
            };
            let header_ok = b64
                .decode(header)
                .ok()
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
                .is_some_and(|v| v.get("alg").is_some_and(|a| a.is_string()));
            header_ok && b64.decode(payload).is_ok()
        })
        .map(|m| m.range())
        .collect()
}

fn private_keys(text: &[u8]) -> Vec<Range<usize>> {
    let full: Vec<Range<usize>> = plain(&PEM_FULL, text);
    // A block cut short (by the inspected prefix's end, or on purpose) is still a key:
    // its header and the base64 after it. Both lists are in order, so one pass pairs
    // them.
    let mut out = Vec::with_capacity(full.len());
    let mut f = full.into_iter().peekable();
    for m in PEM_BEGIN.find_iter(text) {
        while f.peek().is_some_and(|r| r.end <= m.start()) {
            out.push(f.next().expect("peeked"));
        }
        if !f.peek().is_some_and(|r| r.contains(&m.start())) {
            out.push(m.range());
        }
    }
    out.extend(f);
    out
}

/// Percent-decodes `raw` (a URL's path and query, or a form body; `+` is a space),
/// returning the decoded bytes and, for each, the range of `raw` it came from, so a
/// finding in the decoded text maps back to the bytes to replace.
pub fn percent_decode_mapped(raw: &[u8]) -> (Vec<u8>, Vec<Range<usize>>) {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut map = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    map.push(i..i + 3);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    map.push(i..i + 1);
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                map.push(i..i + 1);
                i += 1;
            }
            b => {
                out.push(b);
                map.push(i..i + 1);
                i += 1;
            }
        }
    }
    (out, map)
}

/// Findings in percent-encoded `raw`, as ranges of `raw` (see [`percent_decode_mapped`]).
pub fn scan_percent_encoded(raw: &[u8], detectors: &[Detector]) -> Vec<Finding> {
    let (decoded, map) = percent_decode_mapped(raw);
    scan(&decoded, detectors.iter().copied())
        .into_iter()
        .map(|f| Finding {
            detector: f.detector,
            range: map[f.range.start].start..map[f.range.end - 1].end,
        })
        .collect()
}

/// The marker, percent-encoded, for URLs and form bodies.
pub fn marker_encoded(d: Detector) -> String {
    format!("%5BREDACTED%3A{}%5D", d.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(d: Detector, s: &str) -> Vec<String> {
        d.find(s.as_bytes())
            .into_iter()
            .map(|r| s[r].to_string())
            .collect()
    }

    #[test]
    fn emails() {
        assert_eq!(
            found(Detector::Email, "mail ann.lee+x@mail.example.co.uk now"),
            ["ann.lee+x@mail.example.co.uk"]
        );
        assert!(found(Detector::Email, "user@localhost and @handle and a@b").is_empty());
    }

    #[test]
    fn phones() {
        assert_eq!(
            found(Detector::Phone, "call +1 415-555-0132."),
            ["+1 415-555-0132"]
        );
        assert_eq!(
            found(Detector::Phone, "tel:+442071838750"),
            ["+442071838750"]
        );
        assert_eq!(
            found(Detector::Phone, "(+33 (1) 42 68 53 00)"),
            ["+33 (1) 42 68 53 00"]
        );
        // Too short, and a plus glued to a word.
        assert!(found(Detector::Phone, "+12 34 and c+1234567890").is_empty());
    }

    #[test]
    fn cards() {
        assert_eq!(
            found(Detector::Card, "card 4111 1111 1111 1111 ok"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(Detector::Card, "4111-1111-1111-1111"),
            ["4111-1111-1111-1111"]
        );
        assert_eq!(
            found(Detector::Card, "{\"n\":\"5500005555555559\"}"),
            ["5500005555555559"]
        );
        assert_eq!(
            found(Detector::Card, "amex 378282246310005"),
            ["378282246310005"]
        );
        // Sixteen digits failing Luhn, too short, too long, all zeros.
        assert!(found(Detector::Card, "order 4111111111111112").is_empty());
        assert!(found(Detector::Card, "411111111111").is_empty());
        assert!(found(Detector::Card, "41111111111111111111111").is_empty());
        assert!(found(Detector::Card, "0000000000000000").is_empty());
        assert!(luhn(&digits(b"79927398713")));
        assert!(!luhn(&digits(b"79927398710")));
    }

    #[test]
    fn ibans() {
        assert_eq!(
            found(Detector::Iban, "IBAN DE89 3704 0044 0532 0130 00 TODAY"),
            ["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            found(Detector::Iban, "GB82WEST12345698765432"),
            ["GB82WEST12345698765432"]
        );
        // One digit off fails mod-97.
        assert!(found(Detector::Iban, "GB82WEST12345698765433").is_empty());
        assert!(found(Detector::Iban, "DE89 3704 0044 0532 0130 01").is_empty());
    }

    #[test]
    fn ip_addresses() {
        assert_eq!(
            found(Detector::Ipv4, "from 192.168.1.20, to 8.8.8.8"),
            ["192.168.1.20", "8.8.8.8"]
        );
        assert!(found(Detector::Ipv4, "v 1.2.3.4.5 and 999.1.1.1 and 01.2.3.4").is_empty());
        assert_eq!(
            found(Detector::Ipv6, "at 2001:db8::ff00:42:8329 and ::1 ok"),
            ["2001:db8::ff00:42:8329", "::1"]
        );
        assert_eq!(found(Detector::Ipv6, "[fe80::1]:80"), ["fe80::1"]);
        assert!(found(Detector::Ipv6, "std::vec::Vec at 12:30:45 and x::y").is_empty());
    }

    #[test]
    fn jwts() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwt = format!(
            "{}.{}.sig_nature-1",
            b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            b64.encode(r#"{"sub":"1"}"#)
        );
        assert_eq!(
            found(Detector::Jwt, &format!("Bearer {jwt}")),
            std::slice::from_ref(&jwt)
        );
        // The header is not JSON with alg.
        let fake = format!("{}.{}.x", b64.encode(r#"{"typ":"JWT"}"#), b64.encode("{}"));
        assert!(found(Detector::Jwt, &fake).is_empty());
        assert!(found(Detector::Jwt, "eyJhbGciOiJIUzI1NiJ9").is_empty());
    }

    #[test]
    fn private_keys() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\nAgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----";
        assert_eq!(found(Detector::PrivateKey, &format!("k={key}\nbye")), [key]);
        let rsa =
            r#"{"k":"-----BEGIN RSA PRIVATE KEY-----\nMIIEow==\n-----END RSA PRIVATE KEY-----"}"#;
        assert_eq!(found(Detector::PrivateKey, rsa).len(), 1);
        // Cut short: the header and the base64 after it.
        assert_eq!(
            found(
                Detector::PrivateKey,
                "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE"
            ),
            ["-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE"]
        );
        assert!(found(
            Detector::PrivateKey,
            "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----"
        )
        .is_empty());
    }

    #[test]
    fn api_keys() {
        for k in [
            "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "xoxb-123456789012-abcdefghij",
            "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234",
        ] {
            assert_eq!(found(Detector::ApiKey, &format!("key={k}&x")), [k], "{k}");
        }
        for near in [
            "sk-short",
            "task-abcdefghijklmnopqrstuvwxyz",
            "AKIA1234",
            "ghp_short",
            "nsk_openai_abcdefghijklmnopqrstuvwx",
        ] {
            assert!(found(Detector::ApiKey, near).is_empty(), "{near}");
        }
    }

    #[test]
    fn scan_orders_drops_overlaps_and_redacts() {
        let text = b"to ann@example.com card 4111111111111111";
        let f = scan(text, Detector::ALL);
        assert_eq!(
            f.iter().map(|f| f.detector).collect::<Vec<_>>(),
            [Detector::Email, Detector::Card]
        );
        assert_eq!(
            redact(text, &f),
            b"to [REDACTED:email] card [REDACTED:card]"
        );
    }

    #[test]
    fn percent_encoded_findings_map_back() {
        let raw = b"/u?mail=ann%40example.com&n=4111+1111+1111+1111&x=%zz";
        let f = scan_percent_encoded(raw, &Detector::ALL);
        assert_eq!(f.len(), 2);
        let out = redact_with(raw, &f, marker_encoded);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "/u?mail=%5BREDACTED%3Aemail%5D&n=%5BREDACTED%3Acard%5D&x=%zz"
        );
    }
}
