//! Env masking: secrets the guest only ever sees as placeholders.
//!
//! The guest's environment holds a placeholder (`nsk_<name>_<random>`); the real value
//! lives only in the proxy. The proxy puts the real value where the placeholder is in
//! a request's **header values** only (an `Authorization`, an `x-api-key`), and only
//! when the request is for one of the secret's hosts and goes there: a transform's
//! `upstreamHost` must be one of them too. Everywhere else the placeholder is left as
//! it is, and the attempt recorded (`kept`): in the URL and the body of any request
//! (a server readily echoes those back: a chat prompt a model repeats, split across
//! events, base64'd, escaped, none of which masking could match), to any other host,
//! and in cleartext.
//!
//! In every response the real value, should the server echo it, becomes the
//! placeholder again: header values and names, the reason phrase, the body (as it
//! streams) and trailers. An exchange the value went into is held to more: its
//! `Range`/`If-Range` are dropped (a range could cut the value into pieces masking
//! would not match), a compressed answer to it is refused (masking cannot see into
//! it), and so is a protocol switch (WebSocket frames are spliced unmasked).
//!
//! Masking is a safety net, not a boundary: a host you allow receives the real value,
//! and can always misuse it or send it back in a form masking cannot recognise. Only
//! list hosts you trust with the key. What masking does guarantee is that the value
//! is never in the VM by the proxy's own doing: not in its memory, its snapshots, its
//! forks.
//!
//! Bodies are rewritten as they stream ([`StreamReplacer`]): whatever their size, only
//! the longest pattern's length is held back between chunks.

use crate::policy::HostPattern;
use aho_corasick::{AhoCorasick, MatchKind};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::distributions::{Alphanumeric, DistString};
use std::sync::Arc;

/// One masked secret.
#[derive(Clone)]
pub struct Secret {
    /// The env var's name.
    pub name: String,
    /// What the guest sees.
    pub placeholder: String,
    /// The real value.
    pub value: String,
    /// Where the real value may go.
    pub hosts: Vec<HostPattern>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value: policies end up in logs.
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// Whether the real value may be sent to `host`.
    pub fn allowed_for(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.matches(host))
    }

    /// Whether the real value may go in a request for `host` that is sent to
    /// `upstream` (a transform's `upstreamHost`; `None`: to `host` itself): both must
    /// be the secret's.
    pub fn allowed_via(&self, host: &str, upstream: Option<&str>) -> bool {
        self.allowed_for(host) && upstream.is_none_or(|u| self.allowed_for(u))
    }
}

/// A new placeholder for the secret `name`: `nsk_<name, lowercased>_<24 random
/// alphanumerics>` (long and random enough never to occur by chance).
pub fn new_placeholder(name: &str) -> String {
    let name: String = name
        .chars()
        .take(40)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let random = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
    format!("nsk_{name}_{random}")
}

/// The secrets of a policy.
#[derive(Debug, Clone, Default)]
pub struct SecretSet {
    secrets: Vec<Secret>,
}

/// What a replacement pattern stands for, for the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// A placeholder became the real value.
    Inserted,
    /// A placeholder was left, the host not being one of the secret's.
    Kept,
    /// A real value became the placeholder.
    Masked,
    /// A placeholder was left although the host is one of the secret's: the request
    /// went in cleartext, where anyone on the path could read the value.
    Withheld,
}

impl Hit {
    /// The audit action's name.
    pub fn action(self) -> &'static str {
        match self {
            Hit::Inserted => "inserted",
            Hit::Kept | Hit::Withheld => "kept",
            Hit::Masked => "masked",
        }
    }
}

impl SecretSet {
    /// A set of `secrets`.
    pub fn new(secrets: Vec<Secret>) -> Self {
        Self { secrets }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The secret named `name`.
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// Every secret.
    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.secrets.iter()
    }

    /// The env vars the guest gets: name → placeholder.
    pub fn guest_env(&self) -> Vec<(String, String)> {
        self.secrets
            .iter()
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect()
    }

    /// The rewrite for a request's header values, the request being for `host` and
    /// sent to `upstream` (a transform's `upstreamHost`; `None`: to `host`):
    /// placeholders of secrets allowed at both become their values ([`Hit::Inserted`]);
    /// others stay ([`Hit::Kept`]).
    pub fn for_request(&self, host: &str, upstream: Option<&str>) -> Option<Replacer> {
        self.rewrite(|s| match s.allowed_via(host, upstream) {
            true => (&s.placeholder, &s.value, Hit::Inserted),
            false => (&s.placeholder, &s.placeholder, Hit::Kept),
        })
    }

    /// The rewrite for a request's URL and body, whatever its host: every placeholder
    /// stays ([`Hit::Kept`]), counted. A real value never goes there: a server may send
    /// either back in a form masking cannot match.
    pub fn for_request_body(&self) -> Option<Replacer> {
        self.rewrite(|s| (&s.placeholder, &s.placeholder, Hit::Kept))
    }

    /// The rewrite for a cleartext request for `host` (sent to `upstream`, as in
    /// [`SecretSet::for_request`]): every placeholder stays, never a real value over a
    /// connection anyone on the path can read; those of secrets that would have gone in
    /// over TLS are counted as [`Hit::Withheld`], the others as [`Hit::Kept`].
    pub fn for_cleartext_request(&self, host: &str, upstream: Option<&str>) -> Option<Replacer> {
        self.rewrite(|s| match s.allowed_via(host, upstream) {
            true => (&s.placeholder, &s.placeholder, Hit::Withheld),
            false => (&s.placeholder, &s.placeholder, Hit::Kept),
        })
    }

    /// The rewrite for responses: real values become placeholders.
    pub fn for_response(&self) -> Option<Replacer> {
        self.rewrite(|s| (&s.value, &s.placeholder, Hit::Masked))
    }

    /// A case-sensitive replacer of one `(from, to, hit)` rule per secret.
    fn rewrite<'a>(
        &'a self,
        rule: impl Fn(&'a Secret) -> (&'a String, &'a String, Hit),
    ) -> Option<Replacer> {
        Replacer::new(
            self.secrets
                .iter()
                .map(|s| {
                    let (from, to, hit) = rule(s);
                    (from.clone(), to.clone(), s.name.clone(), hit)
                })
                .collect(),
            false,
        )
    }

    /// What masks a response head (header names and values, the reason phrase) and
    /// trailers.
    pub fn head_masker(&self) -> Option<HeadMasker> {
        let values = self.for_response()?;
        // Header names arrive lowercased: a value echoed in one is matched whatever its
        // case, and becomes the placeholder lowercased.
        let names = Replacer::new(
            self.secrets
                .iter()
                .map(|s| {
                    (
                        s.value.clone(),
                        s.placeholder.to_ascii_lowercase(),
                        s.name.clone(),
                        Hit::Masked,
                    )
                })
                .collect(),
            true,
        )?;
        Some(HeadMasker { values, names })
    }
}

/// Masks real values in a response's head and trailers: header values (exactly),
/// header names (whatever the case: HTTP lowercases them) and the reason phrase.
#[derive(Debug, Clone)]
pub struct HeadMasker {
    values: Replacer,
    names: Replacer,
}

impl HeadMasker {
    /// `data` with real values masked, and what was masked; `None` when it holds none.
    pub fn mask(&self, data: &[u8]) -> Option<(Vec<u8>, Counts)> {
        if !self.values.is_match(data) {
            return None;
        }
        let mut c = self.values.zero_counts();
        let out = self.values.replace_all(data, &mut c);
        Some((out, self.values.named(&c)))
    }

    /// Masks `headers` in place: each name and value holding a real value gets the
    /// placeholder instead (a header whose masked name is not valid is dropped). Returns,
    /// per header masked, its name (as it is now) and what was masked.
    pub fn mask_headers(&self, headers: &mut HeaderMap) -> Vec<(String, Counts)> {
        let mut found = Vec::new();
        if headers
            .keys()
            .any(|n| self.names.is_match(n.as_str().as_bytes()))
        {
            let old = std::mem::take(headers);
            let mut current: Option<HeaderName> = None;
            for (name, value) in old {
                if let Some(name) = name {
                    current = if self.names.is_match(name.as_str().as_bytes()) {
                        let mut c = self.names.zero_counts();
                        let masked = self.names.replace_all(name.as_str().as_bytes(), &mut c);
                        let renamed = HeaderName::from_bytes(&masked).ok();
                        let shown = renamed
                            .as_ref()
                            .map_or_else(|| "(dropped)".to_string(), |n| n.to_string());
                        found.push((shown, self.names.named(&c)));
                        renamed
                    } else {
                        Some(name)
                    };
                }
                if let Some(n) = &current {
                    headers.append(n.clone(), value);
                }
            }
        }
        for (name, value) in headers.iter_mut() {
            if let Some((bytes, counts)) = self.mask(value.as_bytes()) {
                match HeaderValue::from_bytes(&bytes) {
                    Ok(v) => *value = v,
                    // Cannot happen (a placeholder is visible ASCII), but never the value.
                    Err(_) => *value = HeaderValue::from_static(""),
                }
                found.push((name.to_string(), counts));
            }
        }
        found
    }
}

struct Patterns {
    ac: AhoCorasick,
    to: Vec<Vec<u8>>,
    names: Vec<String>,
    hits: Vec<Hit>,
    max_len: usize,
    /// Whether every pattern is replaced by itself: the rewrite only counts.
    identity: bool,
}

/// A set of byte-string replacements (shared; cheap to clone).
#[derive(Clone)]
pub struct Replacer(Arc<Patterns>);

impl std::fmt::Debug for Replacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacer")
            .field("names", &self.0.names)
            .finish_non_exhaustive()
    }
}

/// Which pattern matched how often: (secret name, kind of hit, count).
pub type Counts = Vec<(String, Hit, u32)>;

impl Replacer {
    /// `None` when `rules` (from, to, secret name, kind) is empty; `nocase`: patterns
    /// match whatever their ASCII case.
    fn new(rules: Vec<(String, String, String, Hit)>, nocase: bool) -> Option<Self> {
        if rules.is_empty() {
            return None;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(nocase)
            .build(rules.iter().map(|r| r.0.as_bytes()))
            .expect("a few short patterns");
        let max_len = rules.iter().map(|r| r.0.len()).max().unwrap_or(1);
        Some(Self(Arc::new(Patterns {
            ac,
            to: rules.iter().map(|r| r.1.as_bytes().to_vec()).collect(),
            names: rules.iter().map(|r| r.2.clone()).collect(),
            hits: rules.iter().map(|r| r.3).collect(),
            max_len,
            identity: rules.iter().all(|r| r.0 == r.1) && !nocase,
        })))
    }

    /// Whether the rewrite changes nothing (every pattern stays): it only counts, and a
    /// body through it keeps its length.
    pub fn is_identity(&self) -> bool {
        self.0.identity
    }

    /// `data` rewritten, with how often each pattern matched (in pattern order).
    pub fn replace_all(&self, data: &[u8], counts: &mut [u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut pos = 0;
        for m in self.0.ac.find_iter(data) {
            out.extend_from_slice(&data[pos..m.start()]);
            out.extend_from_slice(&self.0.to[m.pattern().as_usize()]);
            counts[m.pattern().as_usize()] += 1;
            pos = m.end();
        }
        out.extend_from_slice(&data[pos..]);
        out
    }

    /// Whether `data` holds any pattern.
    pub fn is_match(&self, data: &[u8]) -> bool {
        self.0.ac.is_match(data)
    }

    /// A zeroed count per pattern.
    pub fn zero_counts(&self) -> Vec<u32> {
        vec![0; self.0.to.len()]
    }

    /// The nonzero `counts`, named.
    pub fn named(&self, counts: &[u32]) -> Counts {
        counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (self.0.names[i].clone(), self.0.hits[i], *n))
            .collect()
    }

    /// A streaming rewriter over this set.
    pub fn stream(&self) -> StreamReplacer {
        StreamReplacer {
            counts: self.zero_counts(),
            r: self.clone(),
            carry: Vec::new(),
        }
    }
}

/// Rewrites a body chunk by chunk. Between chunks it holds back at most the longest
/// pattern's length less one byte: a pattern split across chunks is still found, and
/// memory stays bounded whatever the body's size.
#[derive(Debug)]
pub struct StreamReplacer {
    r: Replacer,
    carry: Vec<u8>,
    counts: Vec<u32>,
}

impl StreamReplacer {
    /// Feeds `chunk`; returns what can be sent now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        // A match starting before `safe` lies wholly in `buf` (patterns are at most
        // `max_len` long); one starting at or after it may continue in the next chunk.
        let safe = buf.len().saturating_sub(self.r.0.max_len - 1);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        for m in self.r.0.ac.find_iter(&buf) {
            if m.start() >= safe {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(&self.r.0.to[m.pattern().as_usize()]);
            self.counts[m.pattern().as_usize()] += 1;
            pos = m.end();
        }
        let keep_from = pos.max(safe);
        out.extend_from_slice(&buf[pos..keep_from]);
        self.carry = buf[keep_from..].to_vec();
        out
    }

    /// Ends the stream; returns what was held back, rewritten.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        self.r.replace_all(&carry, &mut self.counts)
    }

    /// Bytes held back now (at most the longest pattern's length less one).
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// What matched so far.
    pub fn counts(&self) -> Counts {
        self.r.named(&self.counts)
    }

    /// Whether the rewrite changes nothing (see [`Replacer::is_identity`]).
    pub fn is_identity(&self) -> bool {
        self.r.is_identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> SecretSet {
        SecretSet::new(vec![Secret {
            name: "KEY".into(),
            placeholder: "nsk_key_AAAAAAAAAAAAAAAAAAAAAAAA".into(),
            value: "sk-the-real-value-123".into(),
            hosts: vec![HostPattern::parse("api.example.com", "t").unwrap()],
        }])
    }

    #[test]
    fn placeholders_become_values_only_at_allowed_hosts() {
        let s = set();
        let body = b"auth=nsk_key_AAAAAAAAAAAAAAAAAAAAAAAA;";
        let r = s.for_request("api.example.com", None).unwrap();
        assert!(!r.is_identity());
        let mut c = r.zero_counts();
        assert_eq!(r.replace_all(body, &mut c), b"auth=sk-the-real-value-123;");
        assert_eq!(r.named(&c), [("KEY".to_string(), Hit::Inserted, 1)]);
        // Not for another host, nor for the secret's host sent elsewhere (a transform's
        // upstreamHost), nor ever in a URL or body.
        for r in [
            s.for_request("evil.example.net", None).unwrap(),
            s.for_request("api.example.com", Some("evil.example.net"))
                .unwrap(),
            s.for_request_body().unwrap(),
        ] {
            let mut c = r.zero_counts();
            assert_eq!(r.replace_all(body, &mut c), body);
            assert_eq!(r.named(&c), [("KEY".to_string(), Hit::Kept, 1)]);
        }
        assert!(s.for_request_body().unwrap().is_identity());
        let r = s
            .for_request("api.example.com", Some("api.example.com"))
            .unwrap();
        assert_eq!(
            r.replace_all(body, &mut r.zero_counts()),
            b"auth=sk-the-real-value-123;"
        );
        assert!(format!("{:?}", s).contains("KEY") && !format!("{:?}", s).contains("real-value"));
    }

    #[test]
    fn cleartext_requests_keep_every_placeholder() {
        let s = set();
        let body = b"auth=nsk_key_AAAAAAAAAAAAAAAAAAAAAAAA;";
        for (host, hit) in [
            ("api.example.com", Hit::Withheld),
            ("evil.example.net", Hit::Kept),
        ] {
            let r = s.for_cleartext_request(host, None).unwrap();
            let mut c = r.zero_counts();
            assert_eq!(r.replace_all(body, &mut c), body);
            assert_eq!(r.named(&c), [("KEY".to_string(), hit, 1)]);
            assert_eq!(hit.action(), "kept");
        }
    }

    #[test]
    fn streaming_finds_values_split_across_chunks_and_holds_little() {
        let r = set().for_response().unwrap();
        let text = b"a sk-the-real-value-123 b sk-the-real-value-123 c".repeat(50);
        let expected = r.replace_all(&text, &mut r.zero_counts());
        for chunk in [1, 2, 3, 7, 20, 21, 22, 64, 1000] {
            let mut s = r.stream();
            let mut out = Vec::new();
            for c in text.chunks(chunk) {
                out.extend(s.push(c));
                assert!(s.held() < "sk-the-real-value-123".len());
            }
            out.extend(s.finish());
            assert_eq!(out, expected, "chunk {chunk}");
            assert_eq!(s.counts(), [("KEY".to_string(), Hit::Masked, 100)]);
        }
    }

    #[test]
    fn heads_are_masked_in_names_values_and_any_case_of_names() {
        let m = set().head_masker().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("k=sk-the-real-value-123"));
        h.append("x-sk-the-real-value-123", HeaderValue::from_static("one"));
        h.append("x-sk-the-real-value-123", HeaderValue::from_static("two"));
        h.insert("x-b", HeaderValue::from_static("fine"));
        let found = m.mask_headers(&mut h);
        assert_eq!(h["x-a"], "k=nsk_key_AAAAAAAAAAAAAAAAAAAAAAAA");
        let renamed = "x-nsk_key_aaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(
            h.get_all(renamed).iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(h["x-b"], "fine");
        assert_eq!(h.len(), 4);
        assert!(found.iter().any(|(n, _)| n == renamed));
        assert!(found.iter().any(|(n, _)| n == "x-a"));
        assert!(!format!("{h:?}").contains("real-value"));
        // Upper case in the value, lowercased in a name: still found there.
        let mut s = set();
        s.secrets[0].value = "SK-The-Real-Value-123".into();
        let m = s.head_masker().unwrap();
        let mut h = HeaderMap::new();
        h.insert("sk-the-real-value-123", HeaderValue::from_static("1"));
        m.mask_headers(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["nsk_key_aaaaaaaaaaaaaaaaaaaaaaaa"]
        );
        assert!(m.mask(b"sk-the-real-value-123").is_none());
        assert_eq!(
            m.mask(b"a SK-The-Real-Value-123").unwrap().0,
            b"a nsk_key_AAAAAAAAAAAAAAAAAAAAAAAA"
        );
    }

    #[test]
    fn placeholders_look_right() {
        let p = new_placeholder("OPENAI_API_KEY");
        assert!(
            p.starts_with("nsk_openai_api_key_") && p.len() == "nsk_openai_api_key_".len() + 24
        );
        assert_ne!(p, new_placeholder("OPENAI_API_KEY"));
    }
}
