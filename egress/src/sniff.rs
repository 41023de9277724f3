//! The name a client asks for in its first bytes: the server name of a TLS ClientHello
//! (SNI) or the `Host` header of an HTTP/1 request.

/// Most bytes read while looking for the name: a ClientHello (typically under 2 KiB,
/// a few KiB with large key shares) and an HTTP request head fit; a client that sends
/// more without a complete one is refused. Bounds what a guest's silent or dribbling
/// connections cost in host memory ([`crate::MAX_CONNECTIONS`] of them at most).
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// A name was found.
    Host(String),
    /// A TLS or HTTP start that is not complete yet: read more.
    NeedMore,
    /// Neither TLS with SNI nor HTTP with Host: there is no name to find.
    Nothing,
    /// A TLS or HTTP start whose name would come past [`MAX_SNIFF_BYTES`].
    TooLong,
}

/// Looks for the requested host name in `buf`, the client's first bytes.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Sniffed::Nothing,
    }
}

/// Whether `buf` starts a TLS handshake record (a ClientHello, when it comes first).
pub fn is_tls(buf: &[u8]) -> bool {
    matches!(buf, [0x16, 3, ..])
}

/// Whether `buf` starts an HTTP/1 request line (a method of capitals, then a space):
/// what the security proxy serves in cleartext, `Host` header or not.
pub fn is_http(buf: &[u8]) -> bool {
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=16).contains(&method) && buf.get(method) == Some(&b' ')
}

fn http_host(buf: &[u8]) -> Sniffed {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len < 16 {
            Sniffed::NeedMore
        } else {
            Sniffed::Nothing
        };
    }
    if buf[method_len] != b' ' {
        return Sniffed::Nothing;
    }
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() < MAX_SNIFF_BYTES {
            Sniffed::NeedMore
        } else {
            Sniffed::TooLong
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("host") {
                return Sniffed::Host(strip_port(value.trim()).to_ascii_lowercase());
            }
        }
    }
    Sniffed::Nothing
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A cursor over a ClientHello that fails (returns `None`) instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        Some(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(((b[0] as usize) << 8) | b[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
}

fn tls_sni(buf: &[u8]) -> Sniffed {
    // Record header: type 0x16, version, length; the ClientHello may span records, but
    // its first record holds the server name in practice (it is early and small).
    if buf.len() < 5 {
        return Sniffed::NeedMore;
    }
    let record_len = ((buf[3] as usize) << 8) | buf[4] as usize;
    if buf.len() < 5 + record_len {
        return if 5 + record_len <= MAX_SNIFF_BYTES {
            Sniffed::NeedMore
        } else {
            Sniffed::TooLong
        };
    }
    match client_hello_sni(&buf[5..5 + record_len]) {
        Some(Some(name)) => Sniffed::Host(name),
        _ => Sniffed::Nothing,
    }
}

/// `Some(None)`: a well-formed ClientHello without SNI; `None`: not parseable.
fn client_hello_sni(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader {
        buf: record,
        pos: 0,
    };
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let mut r = Reader {
        buf: r.take(len.min(record.len() - 4))?,
        pos: 0,
    };
    r.take(2 + 32)?; // version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let methods = r.u8()?;
    r.take(methods)?;
    if r.pos == r.buf.len() {
        return Some(None);
    }
    let ext_len = r.u16()?;
    let mut ext = Reader {
        buf: r.take(ext_len)?,
        pos: 0,
    };
    while ext.pos < ext.buf.len() {
        let kind = ext.u16()?;
        let len = ext.u16()?;
        let body = ext.take(len)?;
        if kind == 0 {
            let mut names = Reader { buf: body, pos: 0 };
            let list = names.u16()?;
            let mut list = Reader {
                buf: names.take(list)?,
                pos: 0,
            };
            while list.pos < list.buf.len() {
                let name_type = list.u8()?;
                let n = list.u16()?;
                let name = list.take(n)?;
                if name_type == 0 {
                    return Some(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
                }
            }
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello naming `host`.
    pub(crate) fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name);
        let mut sni_ext = (sni.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend(sni);
        let mut exts = vec![0, 0];
        exts.extend((sni_ext.len() as u16).to_be_bytes());
        exts.extend(sni_ext);
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0, 2, 0x13, 0x01]); // one suite
        hello.extend([1, 0]); // null compression
        hello.extend((exts.len() as u16).to_be_bytes());
        hello.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn finds_sni_and_host() {
        let hello = client_hello("Api.Example.com");
        assert_eq!(sniff(&hello), Sniffed::Host("api.example.com".into()));
        assert_eq!(sniff(&hello[..20]), Sniffed::NeedMore);
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: a.test:8080\r\n\r\n"),
            Sniffed::Host("a.test".into())
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a.t"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Nothing);
        // Heads that would not fit in MAX_SNIFF_BYTES are given up on, not waited for.
        assert_eq!(sniff(&[0x16, 3, 1, 0xff, 0xff, 1]), Sniffed::TooLong);
        assert!(is_tls(&[0x16, 3, 1]) && !is_tls(b"GET / HTTP/1.1\r\n"));
        assert!(is_http(b"GET / HTTP/1.1\r\n") && is_http(b"OPTIONS * HTTP/1.1"));
        assert!(!is_http(b"SSH-2.0-OpenSSH") && !is_http(b"GET") && !is_http(&[0x16, 3, 1]));
        assert_eq!(sniff(&[0x16, 3, 1, 0x40, 0x00, 1]), Sniffed::TooLong);
        assert_eq!(sniff(&[0x16, 3, 1, 0x3f, 0xfb, 1]), Sniffed::NeedMore);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_SNIFF_BYTES, b'a');
        assert_eq!(sniff(&long), Sniffed::TooLong);
        assert_eq!(sniff(&long[..MAX_SNIFF_BYTES - 1]), Sniffed::NeedMore);
        // Garbage never panics.
        for n in 0..hello.len() {
            let mut bad = hello.clone();
            bad[n] = bad[n].wrapping_add(0x55);
            let _ = sniff(&bad);
        }
    }
}
