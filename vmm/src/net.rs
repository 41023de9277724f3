//! A guest's own network namespace: where its traffic goes when the host enforces an
//! egress policy.
//!
//! Each VM gets an anonymous network namespace holding a tap device (`tap0`, carrying
//! the same addresses QEMU's user-mode network gives a guest: gateway 10.0.2.2, DNS
//! 10.0.2.3, so snapshots move between the two), and nftables rules that send every TCP
//! connection and every DNS query the guest makes to two sockets this process opened in
//! that namespace; everything else is dropped. What those sockets do (the egress proxy)
//! is the caller's: see [`GuestNet::take_sockets`].
//!
//! The namespace has no name and no route out: it lives as long as QEMU or a socket in
//! it, so nothing is left behind when a VM ends, whoever ends it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// Port of the TCP proxy socket inside the namespace.
pub const PROXY_PORT: u16 = 15001;
/// Port of the DNS socket inside the namespace.
pub const DNS_PORT: u16 = 15053;
/// The gateway's MAC address, the same in every namespace (and the one QEMU's
/// user-mode network uses): a restored guest's ARP cache stays right.
pub const GATEWAY_MAC: &str = "52:55:0a:00:02:02";

/// The sockets a VM's egress proxy serves, opened in its namespace.
#[derive(Debug)]
pub struct EgressSockets {
    /// Every TCP connection the guest opens arrives here (the destination it asked for
    /// is the socket's original destination, `SO_ORIGINAL_DST`).
    pub tcp: std::net::TcpListener,
    /// Every DNS query the guest sends arrives here.
    pub dns: std::net::UdpSocket,
}

/// A VM's network namespace.
#[derive(Debug)]
pub struct GuestNet {
    netns: OwnedFd,
    /// The tap device's queue, until QEMU has it ([`GuestNet::take_tap`]).
    tap: Option<OwnedFd>,
    sockets: Option<EgressSockets>,
}

impl GuestNet {
    /// Whether this host can give VMs their own namespaces: root, a tun device, `ip` and
    /// `nft`. The error says what is missing.
    pub fn check_host() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the pool manager is not root (network namespaces need it)".into());
        }
        // Only this process opens it (QEMU gets the tap's descriptor), so a tun device
        // at mode 0600 is fine; one that is missing or refuses root is not.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| {
                format!("/dev/net/tun cannot be opened ({e}); load the tun module (modprobe tun)")
            })?;
        for tool in ["ip", "nft"] {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Err(format!(
                    "`{tool}` is not installed (apt-get install iproute2 nftables)"
                ));
            }
        }
        Ok(())
    }

    /// Makes a namespace with its tap device, rules and sockets. This process opens the
    /// tap (as libvirt does): QEMU, unprivileged, gets the descriptor
    /// ([`GuestNet::take_tap`]) and never needs `/dev/net/tun`.
    pub fn create() -> io::Result<Self> {
        in_new_thread(move || {
            // SAFETY: unshare affects only this thread, which exists for this.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let netns = open_own_netns()?;
            let tap = open_tap("tap0")?;
            run_with_stdin(
                "ip",
                &["-batch", "-"],
                &format!(
                    "link set lo up\n\
                     link set tap0 address {GATEWAY_MAC}\n\
                     addr add 10.0.2.2/24 dev tap0\n\
                     addr add 10.0.2.3/32 dev tap0\n\
                     link set tap0 up\n"
                ),
            )?;
            run_with_stdin("nft", &["-f", "-"], &rules())?;
            let sockets = open_sockets()?;
            Ok(Self {
                netns,
                tap: Some(tap),
                sockets: Some(sockets),
            })
        })
    }

    /// The namespace of running process `pid` (a VM adopted after a restart), with
    /// fresh sockets: the old ones went with the process that opened them.
    pub fn of_process(pid: u32) -> io::Result<Self> {
        let path = format!("/proc/{pid}/ns/net");
        let file = std::fs::File::open(&path)?;
        let netns = OwnedFd::from(file);
        let raw = netns.as_raw_fd();
        let sockets = in_new_thread(move || {
            // SAFETY: setns on this thread only; `raw` stays open for the call.
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            open_sockets()
        })?;
        Ok(Self {
            netns,
            tap: None,
            sockets: Some(sockets),
        })
    }

    /// The tap device's descriptor, once: the caller hands it to QEMU
    /// (`-netdev tap,fd=N`) and closes its own copy after QEMU started, so the device
    /// lives exactly as long as QEMU.
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// The namespace, for QEMU to enter before it starts.
    pub fn netns_fd(&self) -> i32 {
        self.netns.as_raw_fd()
    }

    /// The proxy's sockets, once: whoever takes them serves this VM's egress.
    pub fn take_sockets(&mut self) -> Option<EgressSockets> {
        self.sockets.take()
    }
}

/// Creates tap device `name` in the calling thread's network namespace and returns its
/// queue: `IFF_NO_PI` (plain Ethernet frames) and `IFF_VNET_HDR` (QEMU then offloads
/// checksums and segmentation, as when it opens the tap itself). The device goes away
/// when the last descriptor closes.
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    /// `_IOW('T', 202, int)`.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    let path = std::ffi::CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening /dev/net/tun: {e}"),
        ));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // At 3 or above: QEMU inherits it by number, and 0 to 2 are replaced by its stdio.
    let fd = if fd.as_raw_fd() < 3 {
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor, owned below.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just made and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(dup) }
    } else {
        fd
    };
    // struct ifreq: the name (IFNAMSIZ bytes), then the flags; 40 bytes in all.
    let mut ifr = [0u8; 40];
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("tap name {name} is too long")));
    }
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is large enough for.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("creating tap {name}: {e}"),
        ));
    }
    Ok(fd)
}

/// The namespace's rules: TCP to the proxy, DNS to the resolver, nothing else in or
/// through. In the namespace, so the guest cannot touch them.
fn rules() -> String {
    format!(
        "table inet nullspace {{
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname \"tap0\" meta nfproto ipv4 meta l4proto tcp redirect to :{PROXY_PORT}
    iifname \"tap0\" meta nfproto ipv4 udp dport 53 redirect to :{DNS_PORT}
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname \"tap0\" ct state established,related accept
    iifname \"tap0\" meta nfproto ipv4 tcp dport {PROXY_PORT} ct status dnat accept
    iifname \"tap0\" meta nfproto ipv4 udp dport {DNS_PORT} ct status dnat accept
    iifname \"tap0\" drop
  }}
  chain forward {{ type filter hook forward priority filter; policy drop; }}
}}
"
    )
}

fn open_sockets() -> io::Result<EgressSockets> {
    let tcp = std::net::TcpListener::bind(("0.0.0.0", PROXY_PORT))?;
    tcp.set_nonblocking(true)?;
    let dns = std::net::UdpSocket::bind(("0.0.0.0", DNS_PORT))?;
    dns.set_nonblocking(true)?;
    Ok(EgressSockets { tcp, dns })
}

fn open_own_netns() -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new("/proc/thread-self/ns/net").expect("no NUL");
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` on a thread of its own: namespace changes stay on that thread and die with
/// it (a namespace switch on a runtime thread would leak into unrelated tasks).
fn in_new_thread<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(f)?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

fn run_with_stdin(program: &str, args: &[&str], input: &str) -> io::Result<()> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running {program}: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_redirects_tcp_to_its_proxy_socket() {
        if GuestNet::check_host().is_err() {
            eprintln!("skipped: no network namespaces here");
            return;
        }
        let mut net = GuestNet::create().expect("namespace");
        let _tap = net.take_tap().expect("a tap");
        assert!(net.take_tap().is_none(), "the tap is handed out once");
        let sockets = net.take_sockets().unwrap();
        assert!(
            net.take_sockets().is_none(),
            "the sockets are handed out once"
        );
        assert_eq!(sockets.tcp.local_addr().unwrap().port(), PROXY_PORT);
        let shown = Command::new("nsenter")
            .arg(format!(
                "--net=/proc/{}/fd/{}",
                std::process::id(),
                net.netns_fd()
            ))
            .args(["ip", "-brief", "addr", "show", "tap0"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(shown.contains("10.0.2.2/24"), "{shown}");
    }
}
