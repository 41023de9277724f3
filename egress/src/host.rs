//! The host's own IPv4 addresses: the proxy connects from the host, so a guest asking
//! for one of them would reach the host's services (the daemon's API, SSH, databases
//! bound to a private address). Read with `getifaddrs`, kept for a few seconds.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// How long a reading of the interfaces' addresses is used: addresses change rarely
/// (DHCP, a new bridge), and a reading costs a netlink dump.
const FRESH_FOR: Duration = Duration::from_secs(5);

/// The last reading, shared by every sandbox's proxy.
static CACHE: Mutex<Option<(Instant, Arc<[Ipv4Addr]>)>> = Mutex::new(None);

/// The host's addresses, read again when the last reading is older than [`FRESH_FOR`]
/// (or `now` is asked for). A failed reading keeps the previous one, logged.
pub(crate) fn addresses(now: bool) -> Arc<[Ipv4Addr]> {
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, addrs)) = &*cache {
        if !now && at.elapsed() < FRESH_FOR {
            return addrs.clone();
        }
    }
    match read() {
        Ok(addrs) => {
            let addrs: Arc<[Ipv4Addr]> = addrs.into();
            *cache = Some((Instant::now(), addrs.clone()));
            addrs
        }
        Err(e) => {
            warn!(error = %e, "egress: could not read the host's addresses; keeping the last reading");
            let kept = cache
                .as_ref()
                .map(|(_, a)| a.clone())
                .unwrap_or_else(|| Arc::from([]));
            // Not retried on every connection: the next try is after FRESH_FOR.
            *cache = Some((Instant::now(), kept.clone()));
            kept
        }
    }
}

/// Every IPv4 address on the host's interfaces, up or not.
fn read() -> std::io::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` receives a list that is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not freed yet.
        let node = unsafe { &*at };
        if !node.ifa_addr.is_null() {
            // SAFETY: a non-null address of the node; its family says its type.
            let family = unsafe { (*node.ifa_addr).sa_family };
            if family as libc::c_int == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(node.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        at = node.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once; no node is used after this.
    unsafe { libc::freeifaddrs(list) };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_its_loopback_address() {
        let addrs = addresses(true);
        assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
        assert_eq!(&*addresses(false), &*addrs);
    }
}
