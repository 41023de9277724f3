//! What the host is told, with the stated defaults: its flags (clap), each also read
//! from `NULLSPACE_<FLAG>` and from the TOML file `--config FILE` names (the rules are
//! the pool manager's: `pool-manager/src/layered.rs`).

use crate::layered;
use clap::error::ErrorKind;
use clap::Parser;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
Every flag is also read from the environment, NULLSPACE_ and its name in upper snake case
(--pool-manager: NULLSPACE_POOL_MANAGER), and from the TOML file --config FILE
(NULLSPACE_CONFIG) names, keyed by the flags' names (pool-manager = \"http://10.0.0.5:7070\").
The command line wins over the environment, which wins over the file.";

/// Nullspace's public API: serves the API component over HTTP, in front of a pool
/// manager.
#[derive(Debug, Parser)]
#[command(name = "nullspace-api", after_help = AFTER_HELP)]
struct Flags {
    /// A TOML file of flag values, keyed by the flags' names (default: none)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The API component, FILE.wasm, which deploy/build-component.sh prints the path of (required)
    #[arg(long, value_name = "FILE.wasm")]
    component: Option<PathBuf>,
    /// Where to listen
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7080", value_parser = address)]
    listen: SocketAddr,
    /// The pool manager's internal API, http://HOST:PORT or, on the same host, unix:/PATH of its --control-socket (cheaper per request): every outbound request of the component goes there
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7070", value_parser = pool_manager)]
    pool_manager: PoolManagerAddr,
    /// Largest request body, in bytes (1 MiB)
    #[arg(long, value_name = "BYTES", default_value_t = api_model::MAX_BODY_BYTES, value_parser = byte_count)]
    max_body_bytes: usize,
    /// Longest a request may take, in seconds, but those --ready-timeout-s covers
    #[arg(long, value_name = "S", default_value_t = 60, value_parser = seconds)]
    request_timeout_s: u64,
    /// Longest a request that waits on a VM (create, connect, resume, pause, hibernate, snapshot, fork, restore) may take, in seconds
    #[arg(long, value_name = "S", default_value_t = 300, value_parser = seconds)]
    ready_timeout_s: u64,
    /// Requests served at once, 1 to 10000 (more get 503 with Retry-After); also the instance pool's size
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = max_concurrent)]
    max_concurrent: u32,
    /// Threads serving requests, 1 to 256
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = threads)]
    threads: usize,
}

/// The host's settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The API component (`deploy/build-component.sh` prints its path).
    pub component: PathBuf,
    /// Where to listen; loopback by default.
    pub listen: SocketAddr,
    /// The pool manager's internal API: every outbound request of the component goes
    /// there, whatever address the component named.
    pub pool_manager: PoolManagerAddr,
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
    /// Parses `argv` (the program's name first) over the environment `env` and the
    /// config file. Errors, `--help` included, are clap's: `exit()` prints them.
    pub fn load(
        argv: impl IntoIterator<Item = impl Into<OsString>>,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, clap::Error> {
        let flags: Flags = layered::parse(argv, env)?;
        let Some(component) = flags.component.filter(|c| !c.as_os_str().is_empty()) else {
            return Err(layered::command::<Flags>().error(
                ErrorKind::MissingRequiredArgument,
                "--component is required (or NULLSPACE_COMPONENT, or component in the --config file): the API component deploy/build-component.sh builds",
            ));
        };
        Ok(HostConfig {
            component,
            listen: flags.listen,
            pool_manager: flags.pool_manager,
            max_body_bytes: flags.max_body_bytes,
            request_timeout: Duration::from_secs(flags.request_timeout_s),
            ready_timeout: Duration::from_secs(flags.ready_timeout_s),
            max_concurrent: flags.max_concurrent,
            threads: flags.threads,
        })
    }
}

fn address(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "is not an address; send IP:PORT, e.g. 127.0.0.1:7080".into())
}

/// Where the pool manager's internal API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolManagerAddr {
    /// `http://HOST:PORT`.
    Tcp(http::uri::Authority),
    /// `unix:/PATH`: the pool manager's `--control-socket` on this host. A Unix socket
    /// skips the TCP/IP stack on both sides of every request.
    Unix(PathBuf),
}

impl std::fmt::Display for PoolManagerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(authority) => write!(f, "http://{authority}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path`, less its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn pool_manager(s: &str) -> Result<PoolManagerAddr, String> {
    let bad = || {
        "is not an http:// or unix: address; send e.g. http://127.0.0.1:7070 or unix:/var/lib/nullspace/control.sock"
            .to_string()
    };
    if let Some(path) = s.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err("names a relative socket path; send an absolute one, e.g. unix:/var/lib/nullspace/control.sock".into());
        }
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "names a socket path longer than {MAX_SOCKET_PATH} bytes, more than a Unix socket address holds; put the pool manager's --control-socket on a shorter path"
            ));
        }
        return Ok(PoolManagerAddr::Unix(path));
    }
    let uri: http::Uri = s.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    uri.authority()
        .cloned()
        .map(PoolManagerAddr::Tcp)
        .ok_or_else(bad)
}

fn byte_count(s: &str) -> Result<usize, String> {
    s.parse()
        .map_err(|_| "is not a byte count; send e.g. 1048576".into())
}

fn seconds(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "is not seconds; send a whole number, e.g. 60".into())
}

fn max_concurrent(s: &str) -> Result<u32, String> {
    s.parse()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| "is not a number from 1 to 10000".into())
}

fn threads(s: &str) -> Result<usize, String> {
    s.parse()
        .ok()
        .filter(|n| (1..=256).contains(n))
        .ok_or_else(|| "is not a number from 1 to 256".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<HostConfig, String> {
        let env: BTreeMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        HostConfig::load(
            std::iter::once("nullspace-api").chain(args.iter().copied()),
            |k| env.get(k).cloned(),
        )
        .map_err(|e| e.to_string())
    }

    fn parse(args: &[&str]) -> Result<HostConfig, String> {
        load(args, &[])
    }

    use crate::layered::TempFile as ConfigFile;

    #[test]
    fn the_command_is_well_formed() {
        use clap::CommandFactory;
        Flags::command().debug_assert();
        layered::command::<Flags>().debug_assert();
    }

    #[test]
    fn defaults_are_loopback_and_stated_limits() {
        let c = parse(&["--component", "api.wasm"]).unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.port(), 7080);
        assert_eq!(c.pool_manager.to_string(), "http://127.0.0.1:7070");
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.ready_timeout, Duration::from_secs(300));
        assert_eq!(c.max_concurrent, 256);
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn bad_flags_say_what_to_send() {
        let msg = |args: &[&str]| parse(args).unwrap_err();
        assert!(msg(&[]).contains("--component is required"));
        assert!(msg(&["--component", "a", "--pool-manager", "https://x"]).contains("http://"));
        assert!(msg(&["--component", "a", "--threads", "0"]).contains("1 to 256"));
        assert!(msg(&["--component", "a", "--max-concurrent", "0"]).contains("1 to 10000"));
        assert!(msg(&["--component", "a", "--listen", "here"]).contains("is not an address"));
        assert!(msg(&["--component", "a", "--bogus", "1"]).contains("'--bogus'"));
        assert!(msg(&["--component"]).contains("a value is required for '--component"));
        let e = load(&["--component", "a"], &[("NULLSPACE_THREADS", "many")]).unwrap_err();
        assert!(
            e.contains(
                "NULLSPACE_THREADS=many (--threads): \"many\": is not a number from 1 to 256"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_pool_manager_url_becomes_an_authority() {
        let c = parse(&["--component", "a", "--pool-manager", "http://10.0.0.5:9000"]).unwrap();
        assert_eq!(c.pool_manager.to_string(), "http://10.0.0.5:9000");
        let c = parse(&[
            "--component",
            "a",
            "--pool-manager",
            "unix:/run/ns/control.sock",
        ])
        .unwrap();
        assert_eq!(
            c.pool_manager,
            PoolManagerAddr::Unix(PathBuf::from("/run/ns/control.sock"))
        );
        let msg = |url: &str| parse(&["--component", "a", "--pool-manager", url]).unwrap_err();
        assert!(
            msg("unix:control.sock").contains("absolute"),
            "{}",
            msg("unix:x")
        );
        let long = format!("unix:/{}", "x".repeat(120));
        assert!(
            msg(&long).contains("longer than 107 bytes"),
            "{}",
            msg(&long)
        );
        assert!(msg("ftp://x").contains("unix:"), "{}", msg("ftp://x"));
    }

    #[test]
    fn precedence_is_command_line_environment_file_default() {
        let file = ConfigFile::new(
            "component = \"/file/api.wasm\"\nthreads = 2\npool-manager = \"http://10.0.0.1:7070\"\nready-timeout-s = 600\n",
        );
        let cfg = file.path();
        let c = load(&["--config", cfg], &[]).unwrap();
        assert_eq!(c.component, PathBuf::from("/file/api.wasm"));
        assert_eq!(c.threads, 2);
        assert_eq!(c.pool_manager.to_string(), "http://10.0.0.1:7070");
        assert_eq!(c.ready_timeout, Duration::from_secs(600));
        assert_eq!(c.request_timeout, Duration::from_secs(60), "the default");
        let env = [
            ("NULLSPACE_CONFIG", cfg),
            ("NULLSPACE_THREADS", "4"),
            ("NULLSPACE_POOL_MANAGER", "http://10.0.0.2:7070"),
        ];
        let c = load(&[], &env).unwrap();
        assert_eq!(c.component, PathBuf::from("/file/api.wasm"));
        assert_eq!(
            (c.threads, c.pool_manager.to_string()),
            (4, "http://10.0.0.2:7070".into())
        );
        let c = load(&["--threads", "8", "--component", "cli.wasm"], &env).unwrap();
        assert_eq!(c.threads, 8);
        assert_eq!(c.component, PathBuf::from("cli.wasm"));
        assert_eq!(c.pool_manager.to_string(), "http://10.0.0.2:7070");
    }

    #[test]
    fn a_bad_file_names_the_key_and_what_to_send() {
        let file = ConfigFile::new("component = \"a\"\npool_manager = \"http://x\"\n");
        let e = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(e.contains("unknown key \"pool_manager\""), "{e}");
        assert!(
            e.contains("component, listen, max-body-bytes, max-concurrent, pool-manager, ready-timeout-s, request-timeout-s, threads"),
            "{e}"
        );
        let file = ConfigFile::new("component = \"a\"\nthreads = [2]\n");
        let e = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(
            e.contains("threads = [2]: send a string or a number"),
            "{e}"
        );
        let file = ConfigFile::new("component = \"a\"\nthreads = 1000\n");
        let e = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(
            e.contains(": threads: \"1000\": is not a number from 1 to 256"),
            "{e}"
        );
    }

    #[test]
    fn help_describes_every_flag_and_its_variable() {
        let e = HostConfig::load(["nullspace-api", "--help"], |_| None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        let help = e.to_string();
        for (flag, var) in [
            ("--config", "NULLSPACE_CONFIG"),
            ("--component", "NULLSPACE_COMPONENT"),
            ("--listen", "NULLSPACE_LISTEN"),
            ("--pool-manager", "NULLSPACE_POOL_MANAGER"),
            ("--max-body-bytes", "NULLSPACE_MAX_BODY_BYTES"),
            ("--request-timeout-s", "NULLSPACE_REQUEST_TIMEOUT_S"),
            ("--ready-timeout-s", "NULLSPACE_READY_TIMEOUT_S"),
            ("--max-concurrent", "NULLSPACE_MAX_CONCURRENT"),
            ("--threads", "NULLSPACE_THREADS"),
        ] {
            assert!(help.contains(flag), "{flag}: {help}");
            assert!(help.contains(&format!("[env: {var}]")), "{var}: {help}");
        }
    }
}
