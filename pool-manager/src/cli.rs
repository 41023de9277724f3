//! The command line of `nullspace-pool-manager`: its subcommands and flags (clap), each
//! flag also read from `NULLSPACE_<FLAG>` and from the file `--config FILE` names
//! ([`crate::layered`]).

use crate::host_check::NetworkMode;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Every flag is also read from the environment, NULLSPACE_ and its name in upper snake case
(--state-dir: NULLSPACE_STATE_DIR; repeatable flags comma-separated, switches true or false),
and from the TOML file --config FILE (NULLSPACE_CONFIG) names, keyed by the flags' names
(state-dir = \"/var/lib/nullspace\", warm-pool = [\"base=2\"], insecure-unconfined-qemu = true).
The command line wins over the environment, which wins over the file.

Catalog (--catalog): sqlite:PATH or a path (default: STATE/catalog.db), or
  postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (run `migrate --catalog URL` first, and after each upgrade).
Limits (--set): sandboxes vcpus memoryMiB diskMiB snapshots snapshotMiB volumes volumeMiB
  templates builds createsPerMinute createBurst.
S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.";

/// Nullspace's per-host daemon (sandboxes, catalog, control API, data-plane edge), and its
/// admin commands.
#[derive(Debug, Parser)]
#[command(name = "nullspace-pool-manager", after_help = AFTER_HELP)]
pub struct Cli {
    /// A TOML file of flag values, keyed by the flags' names (default: none)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `argv` (the program's name first) over the environment `env` and the
    /// config file.
    pub fn parse_with(
        argv: impl IntoIterator<Item = impl Into<std::ffi::OsString>>,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Cli, clap::Error> {
        crate::layered::parse(argv, env)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the host check first, then the control API, the data-plane edge
    /// and the preview listener.
    Serve(Box<Serve>),
    /// Check whether this host can run VMs (the check `serve` runs first).
    Check(Check),
    /// Bring a catalog's schema up to date (once per upgrade, before `serve`).
    Migrate(CatalogArgs),
    /// Teams, hosts and keys.
    #[command(subcommand)]
    Admin(Admin),
}

/// The state directory.
#[derive(Debug, Clone, Args)]
pub struct StateDir {
    /// The state directory: catalog, token secret, templates, snapshots
    #[arg(long, value_name = "DIR", default_value = "/var/lib/nullspace")]
    pub state_dir: PathBuf,
}

/// The catalog and the state directory it defaults into.
#[derive(Debug, Clone, Args)]
pub struct CatalogArgs {
    /// The catalog: sqlite:PATH, a path, or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (default: STATE/catalog.db)
    #[arg(long, value_name = "URL")]
    pub catalog: Option<String>,
    #[command(flatten)]
    pub state: StateDir,
}

/// What the host check and the VM driver are told.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// How VMs are networked: auto (isolated, or an error where the host cannot), isolated, or user (every guest offline)
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = network_mode)]
    pub network: NetworkMode,
    /// MiB that must stay free on the state and run directories' disks
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = mib)]
    pub min_free_disk_mib: u64,
    /// Let QEMU run as root or without seccomp, with a warning (default: off, refused)
    #[arg(long)]
    pub insecure_unconfined_qemu: bool,
}

/// `serve`.
#[derive(Debug, Args)]
pub struct Serve {
    /// Where the control API listens
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Also serve the control API on this Unix socket (mode 0660; a stale one is
    /// replaced), for an API host on this machine: nullspace-api --pool-manager
    /// unix:PATH, which skips the TCP/IP stack per request (default: none)
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Also serve the public API (/api/v1) here, the --public-component running in this
    /// process with its calls going straight to the control routes: on one host, cheaper
    /// per request than a separate nullspace-api (default: none)
    #[arg(long, value_name = "ADDR", requires = "public_component")]
    pub public_listen: Option<String>,
    /// Threads serving --public-listen, 1 to 64, each with its share of the requests
    /// served at once (256 in all)
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub public_threads: u16,
    /// The API component for --public-listen, FILE.wasm (deploy/build-component.sh
    /// prints its path)
    #[arg(long, value_name = "FILE.wasm", requires = "public_listen")]
    pub public_component: Option<PathBuf>,
    /// The public API's origin as browsers reach it, http(s)://HOST[:PORT]: dashboard
    /// links (`dashboardUrl`) point there, and the data plane allows cross-origin calls
    /// from there only (default: http://ADDR of --public-listen, else
    /// http://127.0.0.1:7080, where a separate nullspace-api listens by default)
    #[arg(long, value_name = "URL", value_parser = public_url)]
    pub public_url: Option<String>,
    /// Where the data-plane edge listens
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7071")]
    pub edge_listen: String,
    /// Where the preview listener listens
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7072")]
    pub preview_listen: String,
    /// The domain of preview URLs, <port>-<sandbox>.DOMAIN (default: localhost:PORT, the preview listener's port)
    #[arg(long, value_name = "HOST[:PORT]")]
    pub preview_domain: Option<String>,
    /// The region this host is in: a create naming a region is placed on that region's
    /// hosts only, and one naming a region no host is in is refused (default: none)
    #[arg(long, value_name = "NAME")]
    pub region: Option<String>,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Where built templates are kept (default: STATE/templates)
    #[arg(long, value_name = "DIR")]
    pub templates_dir: Option<PathBuf>,
    /// What the VMs do when the daemon stops: end, or keep (the next start adopts them)
    #[arg(long, value_name = "end|keep", default_value = "end", value_parser = on_exit)]
    pub on_exit: OnExit,
    /// The most sandboxes a team without its own limit may have
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = count)]
    pub max_sandboxes_per_team: u32,
    /// Where snapshots are stored: local (--store-dir) or s3 (--s3-endpoint, --s3-bucket)
    #[arg(long, value_name = "local|s3", default_value = "local", value_parser = snapshot_store)]
    pub snapshot_store: SnapshotStore,
    /// The local snapshot store's directory (default: STATE/objects)
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
    /// The S3 endpoint of --snapshot-store s3 (default: none)
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// The S3 bucket of --snapshot-store s3 (default: none)
    #[arg(long, value_name = "NAME")]
    pub s3_bucket: Option<String>,
    /// A prefix for every object's key in the bucket (default: none)
    #[arg(long, value_name = "P")]
    pub s3_prefix: Option<String>,
    /// The S3 region
    #[arg(long, value_name = "R", default_value = "us-east-1")]
    pub s3_region: String,
    /// Default seconds between periodic snapshots of a sandbox; 0: none
    #[arg(long, value_name = "S", default_value_t = 0, value_parser = seconds)]
    pub periodic_snapshot_interval_s: u64,
    /// Seconds a deleted sandbox's record and events are kept (7 days)
    #[arg(long, value_name = "S", default_value_t = 7 * 24 * 3600, value_parser = seconds)]
    pub deleted_retention_s: u64,
    /// A warm pool of the default shape set at start, TEMPLATE=SIZE (repeatable; default: none)
    #[arg(long, value_name = "TEMPLATE=SIZE", value_parser = warm_pool)]
    pub warm_pool: Vec<WarmPool>,
    /// Which workspace templates (code-interpreter, desktop, agent) this host builds in
    /// the background after start: all, off (their names are unknown here), or names
    /// separated by commas
    #[arg(long, value_name = "all|off|NAME,...", default_value = "all", value_parser = workspace_mode)]
    pub workspace_templates: crate::sandboxes::WorkspaceMode,
    /// Where the template builder keeps its step cache (VM snapshots of finished build
    /// steps), in a directory nullspace-build-cache it makes there (default:
    /// build-cache under the state directory): e.g. on a larger disk
    #[arg(long, value_name = "DIR")]
    pub build_cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub host: HostArgs,
    /// An address or IPv4 block no guest reaches, whatever its egress policy names
    /// (repeatable; the catalog's and the S3 endpoint's addresses are always closed):
    /// e.g. a cluster's pod and service networks
    #[arg(long, value_name = "CIDR", value_parser = egress::parse_block)]
    pub egress_never: Vec<(std::net::Ipv4Addr, u8)>,
    /// The DNS server the egress proxy resolves with, IP:PORT (default: the host's)
    #[arg(long, value_name = "IP:PORT", value_parser = egress_dns)]
    pub egress_dns: Option<SocketAddr>,
    /// A PEM file of CA certificates the security proxy trusts for upstream servers
    /// besides the public (webpki) roots: an internal CA whose servers sandboxes reach
    /// (repeatable)
    #[arg(long, value_name = "FILE")]
    pub egress_extra_ca: Vec<std::path::PathBuf>,
    /// This host's ID on a shared catalog (default: the one kept in STATE/host-id, made on first start)
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// The address other hosts and clients reach this one at (default: the bound address)
    #[arg(long, value_name = "ADDR")]
    pub advertise_host: Option<String>,
    /// The vCPUs sandboxes may have on this host in all, for cluster placement and live
    /// migration (default: its CPUs; more overcommits them, 1 to 4096)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub capacity_vcpus: Option<u64>,
    /// The URL other hosts reach this one's control API at, when something stands in
    /// between (a proxy, a load balancer, a NAT's forwarded port): http://HOST:PORT
    /// (default: the control listener's port on --advertise-host)
    #[arg(long, value_name = "URL", value_parser = control_url)]
    pub advertise_control_url: Option<String>,
}

/// `--advertise-control-url`: `http://HOST:PORT`, nothing after it.
fn control_url(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        format!("{s:?}: send http://HOST:PORT (the control API is plain HTTP between hosts)")
    })?;
    let rest = rest.trim_end_matches('/');
    let port_ok = rest
        .rsplit_once(':')
        .and_then(|(host, port)| (!host.is_empty()).then_some(port))
        .and_then(|p| p.parse::<u16>().ok())
        .is_some_and(|p| p > 0);
    if !port_ok || rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(format!(
            "{s:?}: send http://HOST:PORT, with a port and no path"
        ));
    }
    Ok(format!("http://{rest}"))
}

/// `check`.
#[derive(Debug, Args)]
pub struct Check {
    #[command(flatten)]
    pub state: StateDir,
    #[command(flatten)]
    pub host: HostArgs,
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Tenant teams and their limits.
    #[command(subcommand)]
    Team(TeamCommand),
    /// The hosts sharing the catalog.
    #[command(subcommand)]
    Host(HostCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

/// Limits to set.
#[derive(Debug, Clone, Args)]
pub struct LimitsArgs {
    /// The team's most sandboxes (default: unchanged)
    #[arg(long, value_name = "N", value_parser = count)]
    pub max_sandboxes: Option<u32>,
    /// A limit, LIMIT=N (repeatable; the limits are listed below; default: none)
    #[arg(long, value_name = "LIMIT=N")]
    pub set: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum TeamCommand {
    /// Create a team; prints it.
    Create {
        /// The team's name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The team's ID, as another worker printed it, to mirror a team (default: a new one)
        #[arg(long, value_name = "TEAM_ID")]
        id: Option<String>,
        #[command(flatten)]
        limits: LimitsArgs,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Show or set a team's limits.
    Quota {
        /// The team's name or ID.
        #[arg(value_name = "TEAM")]
        team: String,
        #[command(flatten)]
        limits: LimitsArgs,
        /// The serving daemon's --max-sandboxes-per-team, for the limits shown
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = count)]
        default_max_sandboxes: u32,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// List the teams.
    List {
        #[command(flatten)]
        catalog: CatalogArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List the hosts: ready, draining, drained, dead or lost.
    List {
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Drain a host: its sandboxes move to the others (hibernated and resumed, or migrated live with --live), and it takes no new ones.
    Drain {
        /// The host's ID (`admin host list`).
        #[arg(value_name = "HOST_ID")]
        host: String,
        /// Seconds to wait until the host is drained, exiting non-zero if it is not by then; 0: do not wait
        #[arg(long, value_name = "S", default_value_t = 0, value_parser = seconds)]
        wait_s: u64,
        /// Migrate running sandboxes live (a pause of a fraction of a second) instead of hibernating them; those that cannot (no compatible host, a failed move) still hibernate
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Make a draining or drained host ready again.
    Undrain {
        /// The host's ID (`admin host list`).
        #[arg(value_name = "HOST_ID")]
        host: String,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key for a team (--team) or an operator key (--operator); prints it.
    Create {
        /// The team the key opens, by name or ID (default: none; send it or --operator)
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        /// The key itself, as another worker issued it, to mirror a key (default: a new one)
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// An operator key (teams, quotas, keys, built-in warm pools) instead of a team's (default: off)
        #[arg(long)]
        operator: bool,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// List the keys in force (never the keys themselves).
    List {
        /// Only this team's keys, by name or ID (default: every team's)
        #[arg(long, value_name = "TEAM")]
        team: Option<String>,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Revoke a key at once.
    Revoke {
        /// The key's ID (`admin key list`).
        #[arg(value_name = "KEY_ID")]
        id: String,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Issue a new key for the same team and expire the old one after a grace period.
    Rotate {
        /// The key's ID (`admin key list`).
        #[arg(value_name = "KEY_ID")]
        id: String,
        /// Seconds the old key keeps working; 0 ends it now; at most 604800 (7 days)
        #[arg(long, value_name = "S", default_value_t = api_model::DEFAULT_ROTATION_GRACE_S, value_parser = seconds)]
        grace_s: u64,
        #[command(flatten)]
        catalog: CatalogArgs,
    },
}

/// `--on-exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// The VMs end with the daemon.
    End,
    /// They keep running; the next start adopts them.
    Keep,
}

/// `--snapshot-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStore {
    Local,
    S3,
}

/// `--warm-pool TEMPLATE=SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    pub template: String,
    pub size: u32,
    /// As given, for messages.
    pub spec: String,
}

/// `--public-url`: an origin, `http(s)://HOST[:PORT]`, with nothing after it.
fn public_url(s: &str) -> Result<String, String> {
    let url = s.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            format!(
                "{s:?} is not an http:// or https:// URL; send e.g. https://sandboxes.example.com"
            )
        })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{s:?} is not an origin (scheme, host and port only); send e.g. https://sandboxes.example.com or http://10.0.0.5:7080"
        ));
    }
    Ok(url.to_string())
}

fn network_mode(s: &str) -> Result<NetworkMode, String> {
    s.parse()
        .map_err(|_| "send auto, isolated or user".to_string())
}

fn on_exit(s: &str) -> Result<OnExit, String> {
    match s {
        "end" => Ok(OnExit::End),
        "keep" => Ok(OnExit::Keep),
        _ => Err("send end (VMs end with the daemon) or keep (a restart adopts them)".into()),
    }
}

fn snapshot_store(s: &str) -> Result<SnapshotStore, String> {
    match s {
        "local" => Ok(SnapshotStore::Local),
        "s3" => Ok(SnapshotStore::S3),
        _ => Err("send local or s3".into()),
    }
}

fn workspace_mode(s: &str) -> Result<crate::sandboxes::WorkspaceMode, String> {
    crate::sandboxes::WorkspaceMode::parse(s)
}

fn warm_pool(s: &str) -> Result<WarmPool, String> {
    s.split_once('=')
        .and_then(|(t, n)| {
            Some(WarmPool {
                template: t.to_string(),
                size: n.parse().ok()?,
                spec: s.to_string(),
            })
        })
        .filter(|p| !p.template.is_empty())
        .ok_or_else(|| "send TEMPLATE=SIZE, e.g. base=2".into())
}

fn egress_dns(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "send IP:PORT, e.g. 10.0.0.53:53".into())
}

fn seconds(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "is not a number; send whole seconds, e.g. 3600".into())
}

fn mib(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "is not a number; send whole MiB, e.g. 1024".into())
}

fn count(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| "is not a number; send e.g. 10".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::OsString;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Cli, String> {
        let env: BTreeMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Cli::parse_with(
            std::iter::once("nullspace-pool-manager").chain(args.iter().copied()),
            |k| env.get(k).cloned(),
        )
        .map_err(|e| e.to_string())
    }

    fn serve(args: &[&str], env: &[(&str, &str)]) -> Serve {
        match parse(&[&["serve"], args].concat(), env).unwrap().command {
            Command::Serve(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    use crate::layered::TempFile as ConfigFile;

    #[test]
    fn the_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        crate::layered::command::<Cli>().debug_assert();
    }

    #[test]
    fn the_public_url_is_an_origin() {
        assert_eq!(
            public_url("https://sandboxes.example.com/").unwrap(),
            "https://sandboxes.example.com"
        );
        assert_eq!(
            public_url("http://10.0.0.5:7080").unwrap(),
            "http://10.0.0.5:7080"
        );
        for bad in [
            "10.0.0.5:7080",
            "ftp://x",
            "http://",
            "http://x/dashboard",
            "http://u@x",
        ] {
            let e = public_url(bad).unwrap_err();
            assert!(e.contains("send e.g."), "{bad}: {e}");
        }
        let s = serve(&[], &[("NULLSPACE_PUBLIC_URL", "https://api.example.com")]);
        assert_eq!(s.public_url.as_deref(), Some("https://api.example.com"));
    }

    #[test]
    fn the_public_api_flags_do_not_read_the_api_hosts_variables() {
        // NULLSPACE_API_COMPONENT names the component for nullspace-api, the tests and
        // deploy/cluster.sh; the pool manager's own flag is --public-component, so a
        // shell that exports it for one does not switch the other's on.
        let s = serve(&[], &[("NULLSPACE_API_COMPONENT", "/x/api.wasm")]);
        assert_eq!((s.public_listen, s.public_component), (None, None));
        let s = serve(
            &[],
            &[
                ("NULLSPACE_PUBLIC_LISTEN", "127.0.0.1:7080"),
                ("NULLSPACE_PUBLIC_COMPONENT", "/x/api.wasm"),
            ],
        );
        assert_eq!(s.public_listen.as_deref(), Some("127.0.0.1:7080"));
        assert_eq!(s.public_component, Some(PathBuf::from("/x/api.wasm")));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = serve(&[], &[]);
        assert_eq!(s.listen, "127.0.0.1:7070");
        assert_eq!(s.edge_listen, "127.0.0.1:7071");
        assert_eq!(s.preview_listen, "127.0.0.1:7072");
        assert_eq!(
            s.catalog.state.state_dir,
            PathBuf::from("/var/lib/nullspace")
        );
        assert_eq!(s.catalog.catalog, None);
        assert_eq!(s.on_exit, OnExit::End);
        assert_eq!(s.max_sandboxes_per_team, 20);
        assert_eq!(s.snapshot_store, SnapshotStore::Local);
        assert_eq!(s.s3_region, "us-east-1");
        assert_eq!(s.periodic_snapshot_interval_s, 0);
        assert_eq!(s.deleted_retention_s, 604800);
        assert_eq!(s.host.min_free_disk_mib, 1024);
        assert_eq!(s.host.network, NetworkMode::Auto);
        assert!(!s.host.insecure_unconfined_qemu);
        assert!(s.warm_pool.is_empty());
    }

    #[test]
    fn precedence_is_command_line_environment_file_default() {
        let file = ConfigFile::new(
            "state-dir = \"/from/file\"\nmin-free-disk-mib = 10\nwarm-pool = [\"base=2\", \"python=1\"]\ninsecure-unconfined-qemu = true\nnetwork = \"user\"\n",
        );
        let cfg = file.path();
        let s = serve(&["--config", cfg], &[]);
        assert_eq!(s.catalog.state.state_dir, PathBuf::from("/from/file"));
        assert_eq!(s.host.min_free_disk_mib, 10);
        assert_eq!(
            s.warm_pool
                .iter()
                .map(|p| (p.template.as_str(), p.size))
                .collect::<Vec<_>>(),
            [("base", 2), ("python", 1)]
        );
        assert!(s.host.insecure_unconfined_qemu);
        assert_eq!(s.host.network, NetworkMode::User);
        let env = [
            ("NULLSPACE_CONFIG", cfg),
            ("NULLSPACE_STATE_DIR", "/from/env"),
            ("NULLSPACE_WARM_POOL", "minimal=3"),
            ("NULLSPACE_INSECURE_UNCONFINED_QEMU", "false"),
            ("NULLSPACE_NETWORK", "isolated"),
        ];
        let s = serve(&[], &env);
        assert_eq!(s.catalog.state.state_dir, PathBuf::from("/from/env"));
        assert_eq!(s.host.min_free_disk_mib, 10, "still the file's");
        assert_eq!(s.warm_pool.len(), 1);
        assert!(!s.host.insecure_unconfined_qemu);
        assert_eq!(s.host.network, NetworkMode::Isolated);
        let s = serve(
            &[
                "--state-dir",
                "/from/cli",
                "--warm-pool",
                "a=1",
                "--network",
                "auto",
            ],
            &env,
        );
        assert_eq!(s.catalog.state.state_dir, PathBuf::from("/from/cli"));
        assert_eq!(s.warm_pool[0].template, "a");
        assert_eq!(s.host.network, NetworkMode::Auto);
        // The same file serves the admin commands: serve's keys are ignored there.
        let cli = parse(
            &["admin", "host", "drain", "host-a", "--wait-s", "30"],
            &env,
        )
        .unwrap();
        let Command::Admin(Admin::Host(HostCommand::Drain {
            host,
            wait_s,
            live,
            catalog,
        })) = cli.command
        else {
            panic!()
        };
        assert_eq!((host.as_str(), wait_s, live), ("host-a", 30, false));
        assert_eq!(catalog.state.state_dir, PathBuf::from("/from/env"));
    }

    #[test]
    fn an_unknown_key_names_the_valid_ones() {
        let file = ConfigFile::new("state_dir = \"/x\"\n");
        let err = parse(&["check", "--config", file.path()], &[]).unwrap_err();
        assert!(err.contains("unknown key \"state_dir\""), "{err}");
        assert!(err.contains("state-dir"), "{err}");
        assert!(
            err.contains("warm-pool") && err.contains("grace-s"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_say_what_to_send() {
        let msg = |args: &[&str], env: &[(&str, &str)]| parse(args, env).unwrap_err();
        let e = msg(&["serve", "--warm-pool", "base"], &[]);
        assert!(e.contains("send TEMPLATE=SIZE, e.g. base=2"), "{e}");
        let e = msg(&["serve"], &[("NULLSPACE_WARM_POOL", "base=2,python")]);
        assert!(
            e.contains(
                "NULLSPACE_WARM_POOL=base=2,python (--warm-pool): \"python\": send TEMPLATE=SIZE"
            ),
            "{e}"
        );
        let e = msg(&["serve", "--on-exit", "stay"], &[]);
        assert!(e.contains("send end"), "{e}");
        let e = msg(&["check", "--network", "bridge"], &[]);
        assert!(e.contains("send auto, isolated or user"), "{e}");
        let e = msg(&["admin", "key", "rotate", "k", "--grace-s", "soon"], &[]);
        assert!(e.contains("is not a number"), "{e}");
        let file = ConfigFile::new("grace-s = \"soon\"\n");
        let e = msg(
            &["admin", "key", "rotate", "k", "--config", file.path()],
            &[],
        );
        assert!(e.contains(": grace-s: \"soon\": is not a number"), "{e}");
        let file = ConfigFile::new("operator = \"yes\"\n");
        let e = msg(&["admin", "key", "create", "--config", file.path()], &[]);
        assert!(e.contains("operator = \"yes\": send true or false"), "{e}");
        let e = msg(&["serve", "--bogus", "1"], &[]);
        assert!(e.contains("--bogus"), "{e}");
        let e = msg(&["serve", "--listen"], &[]);
        assert!(e.contains("--listen"), "{e}");
        let e = msg(&["serve", "--public-listen", "127.0.0.1:7080"], &[]);
        assert!(e.contains("--public-component"), "{e}");
        let e = msg(&["serve", "--public-component", "/x/api.wasm"], &[]);
        assert!(e.contains("--public-listen"), "{e}");
        let e = msg(&["serve", "--public-threads", "0"], &[]);
        assert!(e.contains("1..=64"), "{e}");
        let e = msg(&["admin", "host", "undrain", "h", "--wait-s", "3"], &[]);
        assert!(e.contains("--wait-s"), "{e}");
        let e = msg(&["serve", "--capacity-vcpus", "0"], &[]);
        assert!(e.contains("1..=4096"), "{e}");
        for bad in [
            "10.0.0.1:7070",
            "https://h:7070",
            "http://h",
            "http://h:0",
            "http://h:7070/api",
            "http://:7070",
        ] {
            let e = msg(&["serve", "--advertise-control-url", bad], &[]);
            assert!(e.contains("send http://HOST:PORT"), "{bad}: {e}");
        }
        let ok = serve(&["--advertise-control-url", "http://10.0.0.1:7070/"], &[]);
        assert_eq!(
            ok.advertise_control_url.as_deref(),
            Some("http://10.0.0.1:7070")
        );
    }

    #[test]
    fn every_subcommand_has_help_naming_each_flags_variable() {
        use clap::error::ErrorKind;
        fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            if cmd.get_subcommands().next().is_none() {
                out.push(path);
                return;
            }
            for sub in cmd.get_subcommands() {
                let mut p = path.clone();
                p.push(sub.get_name().to_string());
                leaves(sub, p, out);
            }
        }
        let cmd = crate::layered::command::<Cli>();
        let mut paths = Vec::new();
        leaves(&cmd, Vec::new(), &mut paths);
        let names: Vec<String> = paths.iter().map(|p| p.join(" ")).collect();
        assert_eq!(
            names,
            [
                "serve",
                "check",
                "migrate",
                "admin team create",
                "admin team quota",
                "admin team list",
                "admin host list",
                "admin host drain",
                "admin host undrain",
                "admin key create",
                "admin key list",
                "admin key revoke",
                "admin key rotate",
            ]
        );
        for path in paths {
            let leaf = path
                .iter()
                .fold(&cmd, |c, name| c.find_subcommand(name).unwrap());
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let err = Cli::parse_with(
                std::iter::once("nullspace-pool-manager").chain(args),
                |_| None,
            )
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::DisplayHelp, "{path:?}");
            let help = err.to_string();
            for arg in leaf.get_arguments().filter(|a| !a.is_positional()) {
                let long = arg.get_long().unwrap();
                let var = crate::layered::env_name(long);
                assert!(help.contains(&format!("--{long}")), "{path:?}: {help}");
                assert!(help.contains(&format!("[env: {var}]")), "{path:?}: {help}");
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().starts_with("[env:")),
                    "{path:?} --{long} has no doc"
                );
            }
            assert!(help.contains("[env: NULLSPACE_CONFIG]"), "{path:?}: {help}");
        }
    }
}
