//! The egress proxy of one sandbox: every TCP connection and DNS query its guest makes
//! arrives on two sockets in the VM's network namespace (see `vmm::net`), and goes out
//! from the host only if the sandbox's policy allows it.
//!
//! - DNS: a query for a name the policy refuses gets REFUSED; others are sent to the
//!   host's resolver, and the addresses in the answer are remembered as that name's.
//! - TCP: the destination is the connection's original one. When the policy has domain
//!   rules, the client's first bytes are read for the name it asks for (TLS SNI, HTTP
//!   Host; a client that speaks first within [`SNIFF_WAIT`]); the connection is let
//!   out if [`CompiledEgress::allows_connection`] says so, else reset.
//! - A policy change applies at once: open connections it no longer allows are reset.
//!
//! Only TCP and DNS leave a sandbox: other UDP, ICMP and IPv6 are dropped by the
//! namespace's rules.

pub mod dns;
pub mod sniff;

use api_model::{CompiledEgress, EgressRule};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tracing::{debug, info, Instrument};

/// How long a connection's first bytes are waited for when a domain rule needs a name.
pub const SNIFF_WAIT: Duration = Duration::from_millis(1500);
/// How long a name's addresses count as its after a lookup (longer than most TTLs:
/// programs keep addresses they resolved).
const RESOLVED_FOR: Duration = Duration::from_secs(30 * 60);
/// Most addresses remembered per sandbox.
const MAX_RESOLVED: usize = 4096;
/// Most DNS queries answered at once per sandbox.
const MAX_DNS_IN_FLIGHT: usize = 64;

/// One sandbox's policy and what its lookups resolved.
#[derive(Debug)]
pub struct Gate {
    policy: watch::Sender<Arc<CompiledEgress>>,
    resolved: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
}

impl Gate {
    /// A gate enforcing `policy`.
    pub fn new(policy: CompiledEgress) -> Arc<Self> {
        Arc::new(Self {
            policy: watch::Sender::new(Arc::new(policy)),
            resolved: Mutex::default(),
        })
    }

    /// Replaces the policy; open connections it no longer allows are reset.
    pub fn set(&self, policy: CompiledEgress) {
        self.policy.send_replace(Arc::new(policy));
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<CompiledEgress> {
        self.policy.borrow().clone()
    }

    fn names_for(&self, ip: IpAddr) -> Vec<String> {
        let now = Instant::now();
        self.resolved
            .lock()
            .unwrap()
            .get(&ip)
            .map(|names| {
                names
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remember(&self, name: &str, addrs: &[IpAddr]) {
        let now = Instant::now();
        let mut map = self.resolved.lock().unwrap();
        if map.len() + addrs.len() > MAX_RESOLVED {
            map.retain(|_, names| {
                names.retain(|(_, until)| *until > now);
                !names.is_empty()
            });
            if map.len() + addrs.len() > MAX_RESOLVED {
                map.clear();
            }
        }
        for ip in addrs {
            let names = map.entry(*ip).or_default();
            names.retain(|(n, until)| n != name && *until > now);
            names.push((name.to_string(), now + RESOLVED_FOR));
        }
    }
}

/// Where lookups go.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    /// The resolver the host uses.
    pub dns: SocketAddr,
}

impl Upstream {
    /// The first `nameserver` of `/etc/resolv.conf` (port 53), else 127.0.0.53.
    pub fn from_host() -> Self {
        let ip = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some("nameserver"))
                        .then(|| w.next()?.parse::<IpAddr>().ok())
                        .flatten()
                })
            })
            .unwrap_or(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)));
        Self {
            dns: SocketAddr::new(ip, 53),
        }
    }
}

/// The running proxy of one VM; dropping it stops it and closes its sockets.
#[derive(Debug)]
pub struct Serving {
    gate: Arc<Gate>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// The gate it serves under.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves one VM's sockets (the proxy's listener and its DNS socket, both opened in the
/// VM's namespace) under `gate`, in the caller's tracing span.
pub fn serve(
    tcp: std::net::TcpListener,
    dns: std::net::UdpSocket,
    gate: Arc<Gate>,
    upstream: Upstream,
) -> std::io::Result<Serving> {
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let dns = Arc::new(UdpSocket::from_std(dns)?);
    let span = tracing::Span::current();
    let serving_gate = gate.clone();
    let connections = {
        let gate = gate.clone();
        tokio::spawn(
            async move {
                // Connection tasks are aborted with the listener's task: a VM's end
                // ends its connections.
                let mut open = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = tcp.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let gate = gate.clone();
                            open.spawn(connection(client, gate).in_current_span());
                        }
                        Some(_) = open.join_next(), if !open.is_empty() => {}
                    }
                }
            }
            .instrument(span.clone()),
        )
    };
    let lookups = tokio::spawn(
        async move {
            let limit = Arc::new(tokio::sync::Semaphore::new(MAX_DNS_IN_FLIGHT));
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = dns.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    continue; // too many in flight: the guest retries
                };
                let query = buf[..n].to_vec();
                let (dns, gate) = (dns.clone(), gate.clone());
                tokio::spawn(
                    async move {
                        if let Some(answer) = lookup(&query, &gate, upstream).await {
                            let _ = dns.send_to(&answer, from).await;
                        }
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
        }
        .instrument(span),
    );
    Ok(Serving {
        gate: serving_gate,
        tasks: vec![connections, lookups],
    })
}

async fn lookup(query: &[u8], gate: &Gate, upstream: Upstream) -> Option<Vec<u8>> {
    let name = dns::question_name(query)?;
    if !gate.policy().allows_lookup(&name) {
        info!(name = %name, "egress: lookup refused by policy");
        return dns::refused(query);
    }
    let bind: SocketAddr = if upstream.dns.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect(upstream.dns).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    if buf.get(..2) != query.get(..2) {
        return None;
    }
    gate.remember(&name, &dns::answer_addresses(&buf));
    Some(buf)
}

/// Addresses no policy opens: the host itself, the guest's own network, multicast.
/// Link-local addresses (cloud metadata services) only open to an allow rule naming them.
fn never_reachable(ip: Ipv4Addr, policy: &CompiledEgress) -> bool {
    let own_net = ip.octets()[..3] == [10, 0, 2];
    if ip.is_link_local() {
        return !policy
            .allow
            .iter()
            .any(|r| matches!(r, EgressRule::Net { .. }) && r.matches_ip(IpAddr::V4(ip)));
    }
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || own_net
}

async fn connection(mut client: TcpStream, gate: Arc<Gate>) {
    let Some(dst) = original_destination(&client) else {
        return reset(client);
    };
    let ip = IpAddr::V4(*dst.ip());
    // Subscribed before the first decision: a change made meanwhile is not missed.
    let mut changes = gate.policy.subscribe();
    let policy = changes.borrow_and_update().clone();
    if never_reachable(*dst.ip(), &policy) {
        debug!(%dst, "egress: destination never reachable");
        return reset(client);
    }
    let mut first = Vec::with_capacity(2048);
    let mut host = None;
    if policy.has_domain_rules() {
        let waited = tokio::time::timeout(SNIFF_WAIT, async {
            loop {
                match client.read_buf(&mut first).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => match sniff::sniff(&first) {
                        sniff::Sniffed::Host(h) => return Some(h),
                        sniff::Sniffed::NeedMore => continue,
                        sniff::Sniffed::Nothing => return None,
                    },
                }
            }
        })
        .await;
        host = waited.ok().flatten();
    }
    let allowed = |policy: &CompiledEgress| {
        policy.allows_connection(ip, host.as_deref(), &gate.names_for(ip))
    };
    if !allowed(&policy) {
        info!(%dst, host = host.as_deref().unwrap_or(""), "egress: connection refused by policy");
        return reset(client);
    }
    let mut upstream =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            _ => return reset(client),
        };
    if upstream.write_all(&first).await.is_err() {
        return reset(client);
    }
    let cut = async {
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = changes.borrow_and_update().clone();
            if !allowed(&now) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = cut => {
            info!(%dst, "egress: open connection cut by a policy change");
            reset(client);
        }
    }
}

/// Closes with a reset, so the guest's program sees "connection reset", not a hang.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Where the guest meant to connect (the namespace's rules redirected it here).
fn original_destination(stream: &TcpStream) -> Option<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: zeroed sockaddr_in is valid; the kernel fills at most `len` bytes.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            &mut addr as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_the_guest_network_are_never_reachable() {
        let open = api_model::EgressPolicy::default().compile().unwrap();
        for ip in [
            "127.0.0.1",
            "10.0.2.2",
            "0.0.0.0",
            "224.0.0.1",
            "169.254.169.254",
        ] {
            assert!(never_reachable(ip.parse().unwrap(), &open), "{ip}");
        }
        assert!(!never_reachable("192.0.2.1".parse().unwrap(), &open));
        let metadata = api_model::EgressPolicy {
            allow: vec!["169.254.169.254".into()],
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert!(!never_reachable(
            "169.254.169.254".parse().unwrap(),
            &metadata
        ));
    }

    #[test]
    fn lookups_are_remembered_per_address() {
        let gate = Gate::new(api_model::EgressPolicy::default().compile().unwrap());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        gate.remember("a.test", &[ip]);
        gate.remember("b.test", &[ip]);
        gate.remember("a.test", &[ip]);
        let mut names = gate.names_for(ip);
        names.sort();
        assert_eq!(names, ["a.test", "b.test"]);
    }
}
