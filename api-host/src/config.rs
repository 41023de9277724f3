//! What the host is told on its command line, with the stated defaults.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Usage text.
pub const USAGE: &str = "usage: nullspace-api --component FILE.wasm [--listen 127.0.0.1:7080]
    [--pool-manager http://127.0.0.1:7070] [--max-body-bytes 1048576]
    [--request-timeout-s 60] [--ready-timeout-s 300] [--max-concurrent 256] [--threads 1]";

/// The host's settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The API component (`deploy/build-component.sh` prints its path).
    pub component: PathBuf,
    /// Where to listen; loopback by default.
    pub listen: SocketAddr,
    /// The pool manager's internal API: every outbound request of the component goes
    /// there, whatever address the component named.
    pub pool_manager: http::uri::Authority,
    /// Largest request body (default 1 MiB).
    pub max_body_bytes: usize,
    /// Longest a request may take (default 60 s) ...
    pub request_timeout: Duration,
    /// ... except those that wait on a VM: create, connect, resume, pause, hibernate,
    /// snapshot, fork and restore (default 300 s).
    pub ready_timeout: Duration,
    /// Requests served at once; more get 503 with `Retry-After` (default 256). Also the
    /// size of the instance pool.
    pub max_concurrent: u32,
    /// Threads serving requests (default 1: on a 2-core host the pool manager and the
    /// VMs want the other core, and one thread avoids cross-CPU wake-ups per request).
    pub threads: usize,
}

impl HostConfig {
    /// Parses `--name value` flags.
    pub fn from_args(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut c = HostConfig {
            component: PathBuf::new(),
            listen: "127.0.0.1:7080".parse().unwrap(),
            pool_manager: http::uri::Authority::from_static("127.0.0.1:7070"),
            max_body_bytes: api_model::MAX_BODY_BYTES,
            request_timeout: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(300),
            max_concurrent: 256,
            threads: 1,
        };
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                bail!("{USAGE}");
            }
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            let bad = |what: &str| format!("{flag} {value:?} is not {what}\n{USAGE}");
            match flag.as_str() {
                "--component" => c.component = PathBuf::from(&value),
                "--listen" => c.listen = value.parse().with_context(|| bad("an address"))?,
                "--pool-manager" => {
                    let uri: http::Uri = value.parse().with_context(|| bad("a URL"))?;
                    if uri.scheme_str() != Some("http") {
                        bail!("{}", bad("an http:// URL"));
                    }
                    c.pool_manager = uri.authority().cloned().with_context(|| bad("a URL"))?;
                }
                "--max-body-bytes" => {
                    c.max_body_bytes = value.parse().with_context(|| bad("a byte count"))?
                }
                "--request-timeout-s" => {
                    c.request_timeout =
                        Duration::from_secs(value.parse().with_context(|| bad("seconds"))?)
                }
                "--ready-timeout-s" => {
                    c.ready_timeout =
                        Duration::from_secs(value.parse().with_context(|| bad("seconds"))?)
                }
                "--threads" => {
                    c.threads = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .with_context(|| bad("a number from 1 to 256"))?
                }
                "--max-concurrent" => {
                    c.max_concurrent = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .with_context(|| bad("a number from 1 to 10000"))?
                }
                _ => bail!("unknown flag {flag}\n{USAGE}"),
            }
        }
        if c.component.as_os_str().is_empty() {
            bail!("--component is required\n{USAGE}");
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<HostConfig> {
        HostConfig::from_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn defaults_are_loopback_and_stated_limits() {
        let c = parse(&["--component", "api.wasm"]).unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.pool_manager.as_str(), "127.0.0.1:7070");
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn bad_flags_say_what_to_send() {
        let msg = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(msg(&[]).contains("--component is required"));
        assert!(msg(&["--component", "a", "--pool-manager", "https://x"]).contains("http://"));
        assert!(msg(&["--component", "a", "--threads", "0"]).contains("1 to 256"));
        assert!(msg(&["--component", "a", "--bogus", "1"]).contains("unknown flag --bogus"));
        assert!(msg(&["--component"]).contains("needs a value"));
    }

    #[test]
    fn the_pool_manager_url_becomes_an_authority() {
        let c = parse(&["--component", "a", "--pool-manager", "http://10.0.0.5:9000"]).unwrap();
        assert_eq!(c.pool_manager.as_str(), "10.0.0.5:9000");
    }
}
