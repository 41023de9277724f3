//! The egress proxy of one sandbox: every TCP connection and DNS query its guest makes
//! arrives on two sockets in the VM's network namespace (see `vmm::net`), and goes out
//! from the host only if the sandbox's policy allows it.
//!
//! - DNS: a query for a name the policy refuses gets REFUSED; others are sent to the
//!   host's resolver, and the addresses in the answer are remembered as that name's.
//! - TCP: the destination is the connection's original one. The host's own addresses,
//!   private networks and other reserved blocks are refused unless an IP or CIDR allow
//!   rule names them ([`never_reachable`]). When the policy has domain rules, the
//!   client's first bytes are read for the name it asks for (TLS SNI, HTTP Host; a
//!   client that speaks first within [`SNIFF_WAIT`], in at most
//!   [`sniff::MAX_SNIFF_BYTES`]); the connection is let out if
//!   [`CompiledEgress::allows_connection`] says so, else reset.
//! - A policy change applies at once: open connections it no longer allows are reset.
//! - With a security policy ([`Gate::set_security`], the sandbox's `securityPolicy`),
//!   every connection's first bytes are read: a TLS ClientHello is intercepted
//!   ([`intercept::intercept`]: the guest's TLS terminated with the team CA, each HTTP
//!   request checked and rewritten, TLS re-originated to the verified server), and so
//!   is a cleartext HTTP/1 request ([`intercept::intercept_plain`]: the same policy;
//!   placeholders never become secrets in cleartext). Anything else — another
//!   protocol, a client that stays silent — is reset: with a security policy only what
//!   the proxy inspects and audits goes out. A TLS or HTTP start that stalls is waited
//!   for (up to the handshake deadline), so the name judged is the name served. The connection-level
//!   checks run first either way, and a transform's `upstreamHost` is held to them too
//!   ([`GateConnector`]).
//!
//! The guest is root in its VM and may be hostile, so what it can cost the host is
//! bounded: [`MAX_CONNECTIONS`] open connections per sandbox (the rest are reset at
//! once), [`MAX_DNS_IN_FLIGHT`] lookups, a bounded first-bytes buffer, logs of what it
//! causes at most once a second, and failed accepts (no descriptor left) back off
//! instead of spinning. The daemon raises its open-file limit at start
//! ([`raise_nofile_limit`]).
//!
//! Only TCP and DNS leave a sandbox: other UDP, ICMP and IPv6 are dropped by the
//! namespace's rules. The daemon's own lookups (to `--egress-dns`) are not the guest's
//! connections and go wherever the host routes them.

pub mod dns;
mod host;
mod limits;
pub mod sniff;

pub use limits::{raise_nofile_limit, MAX_CONNECTIONS};

use api_model::CompiledEgress;
use limits::{Backoff, Throttle};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn, Instrument};

/// How long a connection's first bytes are waited for when a domain rule needs a name.
pub const SNIFF_WAIT: Duration = Duration::from_millis(1500);
/// How long a name's addresses count as its after a lookup (longer than most TTLs:
/// programs keep addresses they resolved).
const RESOLVED_FOR: Duration = Duration::from_secs(30 * 60);
/// Most addresses remembered per sandbox.
const MAX_RESOLVED: usize = 4096;
/// Most names remembered per address (a CDN address serves many; a hostile guest can
/// resolve a wildcard domain's endless names to one).
const MAX_NAMES_PER_ADDRESS: usize = 16;
/// Most DNS queries answered at once per sandbox (each holds a socket to the resolver
/// for up to 5 s); more are dropped and the guest's resolver retries.
pub const MAX_DNS_IN_FLIGHT: usize = 64;

/// One sandbox's policy and what its lookups resolved.
#[derive(Debug)]
pub struct Gate {
    policy: watch::Sender<Arc<CompiledEgress>>,
    /// The interception of its TLS connections, when it has a security policy.
    security: Mutex<Option<Arc<intercept::Session>>>,
    resolved: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
    /// Refusals are logged at most once a second: a guest can cause thousands a second.
    refusals: Mutex<Throttle>,
}

impl Gate {
    /// A gate enforcing `policy`.
    pub fn new(policy: CompiledEgress) -> Arc<Self> {
        Arc::new(Self {
            policy: watch::Sender::new(Arc::new(policy)),
            security: Mutex::default(),
            resolved: Mutex::default(),
            refusals: Mutex::default(),
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

    /// Intercepts the connections opened from now on with `session` (`None`: the
    /// connection-level gate only). Open intercepted connections keep their session
    /// (a policy change reaches them through it); open connections that were not
    /// intercepted are cut when a session is set, as the policy would refuse them now.
    pub fn set_security(&self, session: Option<Arc<intercept::Session>>) {
        let began = session.is_some();
        *self.security.lock().unwrap_or_else(|p| p.into_inner()) = session;
        if began {
            // Wakes every connection's watch: the passthrough ones re-check and go.
            self.policy.send_modify(|_| {});
        }
    }

    /// Whether the interception may serve a request for `host` (a TLS server name, a
    /// cleartext Host): a name its lookups would be refused for is refused here too,
    /// whatever address the connection went to. Addresses were judged when the
    /// connection was let out.
    pub fn name_allowed(&self, host: &str) -> bool {
        host.parse::<IpAddr>().is_ok() || self.policy().allows_lookup(host)
    }

    /// The interception in force, if any.
    pub fn security(&self) -> Option<Arc<intercept::Session>> {
        self.security
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Some(n)` when a refusal should be logged now, `n` being the refusals since the
    /// last line.
    fn log_refusal(&self) -> Option<u64> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hit(Instant::now())
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
            // A guest can look up endless names of one address (a wildcard domain):
            // the oldest go, so memory per address stays bounded.
            if names.len() >= MAX_NAMES_PER_ADDRESS {
                names.remove(0);
            }
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

/// What one proxy has counted ([`Serving::refused_over_cap`]).
#[derive(Debug, Default)]
struct Stats {
    refused_over_cap: AtomicU64,
}

/// The running proxy of one VM; dropping it stops it and closes its sockets.
#[derive(Debug)]
pub struct Serving {
    gate: Arc<Gate>,
    open: Arc<Semaphore>,
    stats: Arc<Stats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// The gate it serves under.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Connections open now (accepted and not yet closed), at most [`MAX_CONNECTIONS`].
    pub fn open_connections(&self) -> usize {
        MAX_CONNECTIONS - self.open.available_permits()
    }

    /// Connections reset because [`MAX_CONNECTIONS`] were open.
    pub fn refused_over_cap(&self) -> u64 {
        self.stats.refused_over_cap.load(Ordering::Relaxed)
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
    let tcp = TcpListener::from_std(tcp)?;
    let dns = Arc::new(UdpSocket::from_std(dns)?);
    // A fresh reading for a new VM; connections refresh it every few seconds.
    host::addresses(true);
    let span = tracing::Span::current();
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stats = Arc::new(Stats::default());
    let connections = {
        let gate = gate.clone();
        tokio::spawn(
            accept_loop(tcp, open.clone(), stats.clone(), move |client| {
                connection(client, gate.clone()).in_current_span()
            })
            .instrument(span.clone()),
        )
    };
    let lookups = tokio::spawn(lookup_loop(dns, gate.clone(), upstream).instrument(span));
    Ok(Serving {
        gate,
        open,
        stats,
        tasks: vec![connections, lookups],
    })
}

/// Accepts connections and hands each to `handle` while fewer than the semaphore's
/// permits are open; resets the rest at once. Runs until aborted, and so do the
/// connections: a VM's end ends them.
async fn accept_loop<H, F>(tcp: TcpListener, open: Arc<Semaphore>, stats: Arc<Stats>, handle: H)
where
    H: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = Backoff::new();
    let (mut over_cap, mut failing) = (Throttle::default(), Throttle::default());
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((client, _)) => {
                    backoff.succeeded();
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        // Reset, not left in the backlog: the guest's program learns at
                        // once, and the connections it holds keep working.
                        reset(client);
                        let total = stats.refused_over_cap.fetch_add(1, Ordering::Relaxed) + 1;
                        if let Some(since) = over_cap.hit(Instant::now()) {
                            warn!(since, total, cap = MAX_CONNECTIONS, "egress: connections over the cap reset");
                        }
                        continue;
                    };
                    let task = handle(client);
                    tasks.spawn(async move {
                        task.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection waits in the backlog; try
                    // again once something may have been freed.
                    if let Some(since) = failing.hit(Instant::now()) {
                        warn!(error = %e, since, "egress: accept failed; backing off");
                    }
                    tokio::time::sleep(backoff.failed()).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Answers the guest's DNS queries, at most [`MAX_DNS_IN_FLIGHT`] at once.
async fn lookup_loop(dns: Arc<UdpSocket>, gate: Arc<Gate>, upstream: Upstream) {
    let limit = Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT));
    let mut buf = vec![0u8; 4096];
    let mut backoff = Backoff::new();
    let mut failing = Throttle::default();
    loop {
        let (n, from) = match dns.recv_from(&mut buf).await {
            Ok(got) => {
                backoff.succeeded();
                got
            }
            Err(e) => {
                if let Some(since) = failing.hit(Instant::now()) {
                    warn!(error = %e, since, "egress: DNS receive failed; backing off");
                }
                tokio::time::sleep(backoff.failed()).await;
                continue;
            }
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

async fn lookup(query: &[u8], gate: &Gate, upstream: Upstream) -> Option<Vec<u8>> {
    let name = dns::question_name(query)?;
    if !gate.policy().allows_lookup(&name) {
        if let Some(since) = gate.log_refusal() {
            info!(name = %name, since, "egress: lookup refused by policy");
        }
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

/// Blocks no policy opens: a guest reaching them would reach the host's loopback
/// services, its own network's gateway (the proxy's namespace), or nothing at all.
fn always_closed(ip: Ipv4Addr) -> bool {
    let own_net = ip.octets()[..3] == [10, 0, 2];
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || own_net
}

/// Blocks closed unless an allow rule names them ([`CompiledEgress::names_reserved`]):
/// the networks behind a host (private, carrier-grade NAT, link-local with the cloud
/// metadata service at 169.254.169.254) and blocks that are no one's on the internet.
const RESERVED: [(Ipv4Addr, u8); 8] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network"
    (Ipv4Addr::new(10, 0, 0, 0), 8),     // RFC 1918
    (Ipv4Addr::new(100, 64, 0, 0), 10),  // carrier-grade NAT (RFC 6598)
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata
    (Ipv4Addr::new(172, 16, 0, 0), 12),  // RFC 1918
    (Ipv4Addr::new(192, 0, 0, 0), 24),   // IETF protocol assignments
    (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
    (Ipv4Addr::new(240, 0, 0, 0), 4),    // reserved
];

fn in_block(ip: Ipv4Addr, (net, prefix): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net)
}

/// Blocks the operator closed to every guest whatever its policy names
/// ([`close_to_every_guest`]): the catalog's and the object store's addresses, a
/// cluster's pod and service networks.
static CLOSED_BY_OPERATOR: std::sync::OnceLock<Vec<(Ipv4Addr, u8)>> = std::sync::OnceLock::new();

/// Closes `blocks` to every guest of this process, whatever its policy names (a team
/// may name private networks; not these). Set once, at start; a second call is an
/// error.
pub fn close_to_every_guest(blocks: Vec<(Ipv4Addr, u8)>) -> Result<(), String> {
    CLOSED_BY_OPERATOR
        .set(blocks)
        .map_err(|_| "the blocks closed to every guest are set once, at start".to_string())
}

/// An IPv4 address or CIDR block (`10.96.0.0/12`, `10.0.0.5`) as `(network, prefix)`.
pub fn parse_block(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)),
        None => (s, Some(32)),
    };
    let (Ok(addr), Some(prefix)) = (addr.parse::<Ipv4Addr>(), prefix) else {
        return Err(format!(
            "{s:?}: send an IPv4 address or block, e.g. 10.96.0.0/12 or 10.0.0.5"
        ));
    };
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// Whether a guest's connection to `ip` is refused before the policy is asked: the
/// guest's own network, loopback, unspecified, multicast and broadcast always; the
/// host's own addresses (`host`: every address on its interfaces) and [`RESERVED`]
/// blocks unless an IP or CIDR allow rule names them — `internet: true` and domain
/// rules never do, so neither a permissive policy nor a name resolving to a private
/// address (DNS rebinding) reaches the host's networks.
pub fn never_reachable(ip: Ipv4Addr, policy: &CompiledEgress, host: &[Ipv4Addr]) -> bool {
    let closed = CLOSED_BY_OPERATOR.get().map_or(&[][..], Vec::as_slice);
    never_reachable_with(ip, policy, host, closed)
}

/// [`never_reachable`] with the operator's closed blocks given.
fn never_reachable_with(
    ip: Ipv4Addr,
    policy: &CompiledEgress,
    host: &[Ipv4Addr],
    closed: &[(Ipv4Addr, u8)],
) -> bool {
    if always_closed(ip) || closed.iter().any(|b| in_block(ip, *b)) {
        return true;
    }
    let reserved = host.contains(&ip) || RESERVED.iter().any(|b| in_block(ip, *b));
    reserved && !policy.names_reserved(IpAddr::V4(ip))
}

/// Why a connection is reset before it is let out.
#[derive(Debug)]
enum Refused {
    /// The client's TLS or HTTP start would put its name past
    /// [`sniff::MAX_SNIFF_BYTES`].
    TooLong,
    /// The client closed or failed before a name was read.
    Gone,
}

/// Reads the client's first bytes for the name it asks for, within `wait` ([`SNIFF_WAIT`]) and
/// [`sniff::MAX_SNIFF_BYTES`]. `Ok(None)`: no name (not TLS/HTTP, no SNI or Host, or a
/// client that did not speak in time); the bytes read are in `first` either way.
async fn read_name(
    client: &mut TcpStream,
    first: &mut Vec<u8>,
    wait: Duration,
) -> Result<Option<String>, Refused> {
    let reading = async {
        const CHUNK: usize = 2048;
        let mut chunk = [0u8; CHUNK];
        loop {
            let room = sniff::MAX_SNIFF_BYTES - first.len();
            if room == 0 {
                return Err(Refused::TooLong);
            }
            let n = match client.read(&mut chunk[..room.min(CHUNK)]).await {
                Ok(0) | Err(_) => return Err(Refused::Gone),
                Ok(n) => n,
            };
            // Grown by doubling but never past the bound (a plain extend could double
            // to twice it).
            let need = first.len() + n;
            if need > first.capacity() {
                let target = (first.capacity() * 2)
                    .max(need)
                    .clamp(1024, sniff::MAX_SNIFF_BYTES);
                first.reserve_exact(target - first.len());
            }
            first.extend_from_slice(&chunk[..n]);
            match sniff::sniff(first) {
                sniff::Sniffed::Host(h) => return Ok(Some(h)),
                sniff::Sniffed::NeedMore => continue,
                sniff::Sniffed::Nothing => return Ok(None),
                sniff::Sniffed::TooLong => return Err(Refused::TooLong),
            }
        }
    };
    tokio::time::timeout(wait, reading)
        .await
        .unwrap_or(Ok(None))
}

async fn connection(mut client: TcpStream, gate: Arc<Gate>) {
    let Some(dst) = original_destination(&client) else {
        return reset(client);
    };
    let ip = IpAddr::V4(*dst.ip());
    // Subscribed before the first decision: a change made meanwhile is not missed.
    let mut changes = gate.policy.subscribe();
    let policy = changes.borrow_and_update().clone();
    if never_reachable(*dst.ip(), &policy, &host::addresses(false)) {
        if let Some(since) = gate.log_refusal() {
            info!(%dst, since, "egress: connection refused: the host's, a private or a reserved address no allow rule names");
        }
        return reset(client);
    }
    let mut first = Vec::new();
    let mut asked = None;
    let security = gate.security();
    if policy.has_domain_rules() || security.is_some() {
        match read_name(&mut client, &mut first, SNIFF_WAIT).await {
            Ok(name) => asked = name,
            Err(why) => {
                debug!(%dst, ?why, "egress: no name read");
                return reset(client);
            }
        }
        // Intercepted, a connection is judged by the name its handshake or request
        // carries: one that started TLS or HTTP and stalled is waited for (as the
        // interception's own handshake would be), never let out nameless.
        if security.is_some()
            && asked.is_none()
            && intercepts(&first)
            && sniff::sniff(&first) == sniff::Sniffed::NeedMore
        {
            match read_name(&mut client, &mut first, intercept::proxy::HANDSHAKE_TIMEOUT).await {
                Ok(name) => asked = name,
                Err(why) => {
                    debug!(%dst, ?why, "egress: no name read");
                    return reset(client);
                }
            }
        }
    }
    let allowed = |policy: &CompiledEgress| {
        policy.allows_connection(ip, asked.as_deref(), &gate.names_for(ip))
            && !never_reachable(*dst.ip(), policy, &host::addresses(false))
    };
    if !allowed(&policy) {
        if let Some(since) = gate.log_refusal() {
            info!(%dst, host = asked.as_deref().unwrap_or(""), since, "egress: connection refused by policy");
        }
        return reset(client);
    }
    if let Some(session) = security {
        // With a security policy only what the proxy inspects goes out: a protocol it
        // cannot read (or a client that stays silent) would carry data past the policy
        // and the audit.
        if !intercepts(&first) {
            if let Some(since) = gate.log_refusal() {
                info!(%dst, since, "egress: connection refused: a security policy lets out only TLS and HTTP");
            }
            return reset(client);
        }
        let _ = client.set_nodelay(true);
        let asked = asked.clone();
        return intercepted(client, first, dst, asked, session, changes, &allowed).await;
    }
    let mut upstream =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            _ => return reset(client),
        };
    if upstream.write_all(&first).await.is_err() {
        return reset(client);
    }
    drop(first);
    // A security policy set later cuts this connection too: it was not intercepted.
    let still = |policy: &CompiledEgress| allowed(policy) && gate.security().is_none();
    let cut = until_disallowed(&mut changes, still);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = cut => {
            info!(%dst, "egress: open connection cut by a policy change");
            reset(client);
        }
    }
}

/// Whether the security proxy serves a connection starting with `first`: a TLS record
/// (a ClientHello) or an HTTP/1 request — as the sniffer reads them (a first byte of
/// 0x16, or a capital letter), so a name the gate judged is the name served.
fn intercepts(first: &[u8]) -> bool {
    match first.first() {
        Some(0x16) => true,
        Some(b) if b.is_ascii_uppercase() => {
            sniff::is_http(first) || matches!(sniff::sniff(first), sniff::Sniffed::Host(_))
        }
        _ => false,
    }
}

/// Returns once a policy change no longer allows the connection (never if none does).
async fn until_disallowed(
    changes: &mut watch::Receiver<Arc<CompiledEgress>>,
    allowed: impl Fn(&CompiledEgress) -> bool,
) {
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let now = changes.borrow_and_update().clone();
        if !allowed(&now) {
            return;
        }
    }
}

/// Serves a TLS or cleartext HTTP connection the gate let out through the interception,
/// until it ends or a policy change no longer allows it.
async fn intercepted(
    client: TcpStream,
    first: Vec<u8>,
    dst: SocketAddrV4,
    asked: Option<String>,
    session: Arc<intercept::Session>,
    mut changes: watch::Receiver<Arc<CompiledEgress>>,
    allowed: &(impl Fn(&CompiledEgress) -> bool + Sync),
) {
    let cut = until_disallowed(&mut changes, allowed);
    let tls = sniff::is_tls(&first);
    let guest = intercept::Replay::new(first, client);
    let served = async {
        if tls {
            intercept::intercept(guest, SocketAddr::V4(dst), asked, session).await
        } else {
            intercept::intercept_plain(guest, SocketAddr::V4(dst), asked, session).await
        }
    };
    tokio::select! {
        ended = served => match ended {
            Ok(stats) => debug!(%dst, requests = stats.requests, "egress: intercepted connection ended"),
            Err(e) => debug!(%dst, error = %e, "egress: intercepted connection failed"),
        },
        _ = cut => info!(%dst, "egress: open connection cut by a policy change"),
    }
}

/// The interception's upstream connections, held to the gate: the guest's original
/// destination was checked when the connection was let out; a transform's
/// `upstreamHost` is resolved here, and each of its addresses must pass the same
/// checks ([`never_reachable`], the egress policy for that name) before it is used.
#[derive(Debug, Clone)]
pub struct GateConnector {
    gate: std::sync::Weak<Gate>,
}

impl GateConnector {
    /// A connector checking against `gate` (held weakly: the gate holds the session
    /// that holds this).
    pub fn new(gate: &Arc<Gate>) -> Self {
        Self {
            gate: Arc::downgrade(gate),
        }
    }
}

impl intercept::Connect for GateConnector {
    fn connect(
        &self,
        target: intercept::Target,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<intercept::BoxIo>> + Send>> {
        let gate = self.gate.upgrade();
        Box::pin(async move {
            let refused =
                |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
            let gate = gate.ok_or_else(|| refused("the sandbox's egress ended".into()))?;
            let addr = match target {
                intercept::Target::Addr(a) => a,
                intercept::Target::Host(name, port) => {
                    let policy = gate.policy();
                    let addrs = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::lookup_host((name.as_str(), port)),
                    )
                    .await
                    .map_err(|_| refused(format!("looking up {name} timed out")))??;
                    let host = host::addresses(false);
                    addrs
                        .filter_map(|a| match a {
                            SocketAddr::V4(v4) => Some(v4),
                            SocketAddr::V6(_) => None,
                        })
                        .find(|a| {
                            let ip = IpAddr::V4(*a.ip());
                            !never_reachable(*a.ip(), &policy, &host)
                                && policy.allows_connection(ip, Some(&name), &[])
                        })
                        .map(SocketAddr::V4)
                        .ok_or_else(|| {
                            refused(format!(
                                "{name}: no address of it is one the sandbox's egress policy lets out"
                            ))
                        })?
                }
            };
            let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {addr} timed out"),
                    )
                })??;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as intercept::BoxIo)
        })
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

    fn compiled(internet: bool, allow: &[&str]) -> CompiledEgress {
        api_model::EgressPolicy {
            internet,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: Vec::new(),
        }
        .compile()
        .unwrap()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_and_the_guest_network_are_never_reachable() {
        let host = [v4("127.0.0.1"), v4("198.51.100.20")];
        let open = compiled(true, &[]);
        for ip in [
            "127.0.0.1",
            "10.0.2.2",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.169.254",
            // Private networks, carrier-grade NAT, reserved blocks: closed to
            // `internet: true`.
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.5",
            "100.64.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "240.0.0.1",
            // The host's own (public) address.
            "198.51.100.20",
        ] {
            assert!(never_reachable(v4(ip), &open, &host), "{ip}");
        }
        for ip in ["192.0.2.1", "172.32.0.1", "100.128.0.1", "198.51.100.21"] {
            assert!(!never_reachable(v4(ip), &open, &host), "{ip}");
        }
        // A rule naming an address or a network opens it, and only it.
        let named = compiled(
            false,
            &[
                "169.254.169.254",
                "192.168.1.5",
                "198.51.100.20",
                "10.0.0.0/8",
            ],
        );
        for ip in [
            "169.254.169.254",
            "192.168.1.5",
            "198.51.100.20",
            "10.9.9.9",
        ] {
            assert!(!never_reachable(v4(ip), &named, &host), "{ip}");
        }
        for ip in ["192.168.1.6", "169.254.169.253", "172.16.0.1", "100.64.0.1"] {
            assert!(never_reachable(v4(ip), &named, &host), "{ip}");
        }
        // The guest's own network and loopback stay closed even to a rule naming them;
        // "everything" and domain rules name nothing.
        let everything = compiled(
            false,
            &["10.0.2.0/24", "127.0.0.0/8", "0.0.0.0/0", "*.internal"],
        );
        for ip in ["10.0.2.2", "127.0.0.1", "192.168.1.5", "198.51.100.20"] {
            assert!(never_reachable(v4(ip), &everything, &host), "{ip}");
        }
        assert!(!never_reachable(v4("192.0.2.1"), &everything, &host));
    }

    #[test]
    fn blocks_the_operator_closed_stay_closed_whatever_a_policy_names() {
        let host = [v4("10.78.0.11")];
        let named = compiled(false, &["10.0.0.0/8", "10.78.0.1"]);
        let closed = [
            parse_block("10.78.0.1").unwrap(),
            parse_block("10.96.0.0/12").unwrap(),
        ];
        for ip in ["10.78.0.1", "10.96.0.10", "10.111.255.254"] {
            assert!(never_reachable_with(v4(ip), &named, &host, &closed), "{ip}");
        }
        // The rest of what the policy names stays open.
        for ip in ["10.78.0.2", "10.112.0.1"] {
            assert!(
                !never_reachable_with(v4(ip), &named, &host, &closed),
                "{ip}"
            );
        }
        assert_eq!(parse_block("10.96.1.2/12").unwrap(), (v4("10.96.0.0"), 12));
        assert!(parse_block("10.96.0.0/33").is_err());
        assert!(parse_block("example.com")
            .unwrap_err()
            .contains("send an IPv4"));
    }

    #[test]
    fn the_host_addresses_are_read_from_its_interfaces() {
        let host = host::addresses(true);
        assert!(host.contains(&Ipv4Addr::LOCALHOST), "{host:?}");
        let open = compiled(true, &[]);
        for ip in host.iter() {
            assert!(never_reachable(*ip, &open, &host), "{ip}");
        }
    }

    /// A client connected to `listener`, and the server's end.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let (client, server) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn the_first_bytes_are_read_within_a_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A name in the first bytes.
        let (mut client, mut server) = pair(&listener).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut first = Vec::new();
        let name = read_name(&mut server, &mut first, SNIFF_WAIT)
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("a.test"));
        assert!(first.starts_with(b"GET /"));
        // A head that never ends: refused at the bound, having kept no more than it.
        let (mut client, mut server) = pair(&listener).await;
        let writer = tokio::spawn(async move {
            let _ = client.write_all(b"GET / HTTP/1.1\r\nX: ").await;
            let _ = client.write_all(&[b'a'; 64 * 1024]).await;
            client
        });
        let mut first = Vec::new();
        assert!(matches!(
            read_name(&mut server, &mut first, SNIFF_WAIT).await,
            Err(Refused::TooLong)
        ));
        assert_eq!(first.len(), sniff::MAX_SNIFF_BYTES);
        assert!(
            first.capacity() <= sniff::MAX_SNIFF_BYTES,
            "{}",
            first.capacity()
        );
        drop(server);
        drop(writer.await.unwrap());
        // A silent client: no name once SNIFF_WAIT is over.
        let (_client, mut server) = pair(&listener).await;
        let started = Instant::now();
        let mut first = Vec::new();
        assert_eq!(
            read_name(&mut server, &mut first, SNIFF_WAIT)
                .await
                .unwrap(),
            None
        );
        assert!(started.elapsed() >= SNIFF_WAIT);
    }

    #[test]
    fn the_proxy_intercepts_what_the_sniffer_names() {
        let hello = [0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0];
        assert!(intercepts(&hello));
        // Any record version: the sniffer reads a name from it, so it is served.
        assert!(intercepts(&[0x16, 9, 9]));
        assert!(intercepts(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"));
        // A method the sniffer takes a Host from, however odd its length.
        assert!(intercepts(b"X / HTTP/1.1\r\nHost: a.test\r\n\r\n"));
        assert!(!intercepts(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(!intercepts(b"\x00raw"));
        assert!(!intercepts(b""));
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_reset_at_once() {
        const CAP: usize = 8;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(Semaphore::new(CAP));
        let stats = Arc::new(Stats::default());
        // Each handled connection is held until the test lets go.
        let (release, released) = watch::channel(false);
        let looping = tokio::spawn(accept_loop(
            listener,
            open.clone(),
            stats.clone(),
            move |client| {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    drop(client);
                }
            },
        ));
        let mut clients = Vec::new();
        // The five over the cap are reset quickly (maybe before the connect returns), or
        // read an end; the rest are held.
        let mut reset = 0;
        let mut held = 0;
        for _ in 0..CAP + 5 {
            match TcpStream::connect(addr).await {
                Ok(c) => clients.push(c),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
                Err(e) => panic!("{e}"),
            }
        }
        for c in &mut clients {
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut b)).await {
                Err(_) => held += 1,
                Ok(Ok(0)) | Ok(Err(_)) => reset += 1,
                Ok(Ok(_)) => panic!("nothing is sent"),
            }
        }
        assert_eq!((held, reset), (CAP, 5));
        assert_eq!(stats.refused_over_cap.load(Ordering::Relaxed), 5);
        assert_eq!(open.available_permits(), 0);
        // Once they close, their slots are free again.
        release.send_replace(true);
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.available_permits() < CAP {
            assert!(Instant::now() < deadline, "slots never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release.send_replace(false);
        let mut again = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), again.read(&mut b))
                .await
                .is_err(),
            "a connection under the cap is held"
        );
        looping.abort();
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
        // Endless names of one address keep only the newest.
        for i in 0..1000 {
            gate.remember(&format!("n{i}.wild.test"), &[ip]);
        }
        let names = gate.names_for(ip);
        assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
        assert!(names.contains(&"n999.wild.test".to_string()));
    }
}
