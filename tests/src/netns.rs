//! Test hosts on a network of the test's own: a network namespace joined to this host by
//! a veth pair, with servers in it. Never an outside address.

use std::process::{Child, Command, Stdio};

/// A namespace `ns` with addresses `198.18.N.2..` on its end of a veth whose host end
/// is `198.18.N.1/24`. Dropping it ends its servers and removes it (and the veth).
pub struct TestNet {
    name: String,
    subnet: u8,
    children: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNet {
    /// Makes the namespace with hosts `.2` to `.2+hosts-1` (and `.53`).
    pub fn new(hosts: u8) -> Self {
        // A subnet per test process; the namespaces of killed runs go first (their veths
        // with them).
        let subnet = 20 + (std::process::id() % 200) as u8;
        let name = format!("nstest-{}-{subnet}", std::process::id());
        reap_dead();
        let host_end = format!("vt{subnet}h");
        ip(&["netns", "add", &name]);
        let peer = format!("vt{subnet}n");
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&[
            "addr",
            "add",
            &format!("198.18.{subnet}.1/24"),
            "dev",
            &host_end,
        ]);
        ip(&["link", "set", &host_end, "up"]);
        let net = Self {
            name,
            subnet,
            children: Vec::new(),
        };
        net.exec(&["ip", "link", "set", "lo", "up"]);
        net.exec(&["ip", "link", "set", &peer, "up"]);
        for h in (2..2 + hosts).chain([53]) {
            net.exec(&[
                "ip",
                "addr",
                "add",
                &format!("198.18.{subnet}.{h}/24"),
                "dev",
                &peer,
            ]);
        }
        net
    }

    /// Address of host `h` (`.h`).
    pub fn addr(&self, h: u8) -> String {
        format!("198.18.{}.{h}", self.subnet)
    }

    fn exec(&self, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args);
    }

    /// Starts `cmd` in the namespace; it ends with this value.
    pub fn spawn(&mut self, cmd: &[&str]) {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. A test killed by its timeout runs no Drop:
        // its servers die with it instead.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn in the test namespace");
        self.children.push(child);
    }

    /// An HTTP server on every address at `port` that answers `who:<address>`.
    pub fn http_server(&mut self, port: u16) {
        let script = format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       body = ('who:' + self.connection.getsockname()[0] + ' host:' + str(self.headers['Host'])).encode()\n\
             \x20       self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n\
             \x20   def log_message(self, *a): pass\n\
             http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
        );
        self.spawn(&["python3", "-c", &script]);
    }

    /// A DNS server at `.53` answering `name → address` for each pair (dnsmasq).
    pub fn dns_server(&mut self, records: &[(&str, String)]) {
        let mut args: Vec<String> = [
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={}", self.addr(53)));
        args.push(format!("--pid-file=/tmp/{}-dnsmasq.pid", self.name));
        for (name, addr) in records {
            args.push(format!("--address=/{name}/{addr}"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&refs);
    }

    /// Waits until `addr:port` accepts from the host (servers started).
    pub fn wait_tcp(&self, addr: &str, port: u16) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect((addr, port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr}:{port} never answered"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Removes the namespaces of test processes that no longer run (killed by a timeout).
fn reap_dead() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("nstest-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
