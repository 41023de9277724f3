//! Header plumbing between HTTP/2 or HTTP/1.1 guests and HTTP/1.1 upstreams: Host
//! names, hop-by-hop headers, upgrades, cookies, content codings; and the byte count of
//! a spliced stream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// A stream counting the bytes read from it.
pub(crate) struct Counted<T> {
    pub(crate) io: T,
    pub(crate) read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether a message's body is coded in a way masking and inspection cannot read: a
/// `content-encoding` other than `identity`, or a `transfer-encoding` other than
/// `chunked` (checked before hop-by-hop headers are removed).
pub(crate) fn is_encoded(headers: &HeaderMap) -> bool {
    let other = |name: header::HeaderName, ok: &[&[u8]]| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|c| c.trim_ascii())
            .any(|c| !c.is_empty() && !ok.iter().any(|o| c.eq_ignore_ascii_case(o)))
    };
    other(header::CONTENT_ENCODING, &[b"identity"])
        || other(header::TRANSFER_ENCODING, &[b"chunked", b"identity"])
}

/// Whether a request asks to upgrade the connection to WebSocket, the one upgrade
/// relayed: its frames are not HTTP, so they are spliced uninspected. Any other (`h2c`)
/// is not: spliced, HTTP/2 would escape the policy; such a request has its upgrade
/// headers dropped and is served as plain HTTP/1.1.
pub(crate) fn wants_upgrade(h: &HeaderMap) -> bool {
    let mut protocols = h
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|p| {
            let p = p.trim_ascii();
            // `name/version`.
            p.split(|b| *b == b'/').next().unwrap_or(p)
        })
        .peekable();
    protocols.peek().is_some()
        && protocols.all(|p| p.eq_ignore_ascii_case(b"websocket"))
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (each side's framing is the proxy's own), keeping
/// `connection` and `upgrade` on an upgrade.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "expect",
    ] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// The name part of a Host header (`[::1]:8443` → `::1`, `a.com:443` → `a.com`).
pub(crate) fn host_name_of(v: &[u8]) -> &[u8] {
    if let Some(rest) = v.strip_prefix(b"[") {
        return rest.split(|b| *b == b']').next().unwrap_or(rest);
    }
    let name = match v.iter().rposition(|b| *b == b':') {
        Some(i) if v[i + 1..].iter().all(u8::is_ascii_digit) => &v[..i],
        _ => v,
    };
    name.strip_suffix(b".").unwrap_or(name)
}

/// An authority as a Host header has it: without userinfo (`user@`).
pub(crate) fn host_of(a: &Authority) -> &str {
    a.as_str().rsplit('@').next().unwrap_or_default()
}

/// The host name an authority names (no userinfo, port or brackets).
pub(crate) fn authority_name(a: &Authority) -> &[u8] {
    host_name_of(host_of(a).as_bytes())
}

/// Joins a request's `cookie` fields into one, as HTTP/1.1 has it (HTTP/2 may split
/// them: RFC 9113, 8.2.3).
pub(crate) fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_and_hop_by_hop() {
        assert_eq!(host_name_of(b"a.com:443"), b"a.com");
        assert_eq!(host_name_of(b"a.com."), b"a.com");
        assert_eq!(host_name_of(b"[::1]:80"), b"::1");
        assert_eq!(host_name_of(b"a.com"), b"a.com");
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut up = HeaderMap::new();
        up.insert("connection", HeaderValue::from_static("Upgrade"));
        up.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&up));
        strip_hop_by_hop(&mut up, true);
        assert!(wants_upgrade(&up));
        // Only WebSocket: h2c (alone or offered with it) is not relayed.
        for other in ["h2c", "websocket, h2c", "", "TLS/1.0"] {
            up.insert("upgrade", HeaderValue::from_static(other));
            assert!(!wants_upgrade(&up), "{other}");
        }
        up.insert("upgrade", HeaderValue::from_static("WebSocket/13"));
        assert!(wants_upgrade(&up));
    }

    #[test]
    fn codings_masking_cannot_read() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(!is_encoded(&h(&[])));
        assert!(!is_encoded(&h(&[("content-encoding", "identity")])));
        assert!(!is_encoded(&h(&[("transfer-encoding", "chunked")])));
        assert!(is_encoded(&h(&[("content-encoding", "gzip")])));
        assert!(is_encoded(&h(&[
            ("content-encoding", "identity"),
            ("content-encoding", "br")
        ])));
        assert!(is_encoded(&h(&[("content-encoding", "identity, gzip")])));
        assert!(is_encoded(&h(&[("transfer-encoding", "gzip, chunked")])));
    }

    #[test]
    fn authorities_and_cookies_for_http1() {
        let a = |s: &str| s.parse::<Authority>().unwrap();
        assert_eq!(authority_name(&a("user:pw@A.com:443")), b"A.com");
        assert_eq!(host_of(&a("user@a.com:8443")), "a.com:8443");
        assert_eq!(authority_name(&a("[::1]:8443")), b"::1");
        assert_eq!(authority_name(&a("a.com.")), b"a.com");
        // Odd authorities a guest may send parse or not, but never panic here.
        for odd in ["@", "a@", "@:1", "[::1", ":", "a:b@"] {
            if let Ok(x) = odd.parse::<Authority>() {
                let _ = (authority_name(&x), host_of(&x));
            }
        }
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
    }
}
