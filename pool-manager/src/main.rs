//! `nullspace-pool-manager`: the per-host daemon, and its admin commands.
//!
//! ```text
//! nullspace-pool-manager serve [--listen ADDR] [--edge-listen ADDR] [--preview-listen ADDR] [--preview-domain HOST[:PORT]] [--state-dir DIR] [--catalog URL] [--templates-dir DIR] [--on-exit end|keep] [--max-sandboxes-per-team 20]
//!     [--snapshot-store local|s3] [--store-dir DIR] [--s3-endpoint URL --s3-bucket NAME [--s3-prefix P] [--s3-region R]]
//!     [--periodic-snapshot-interval-s 0] [--min-free-disk-mib 1024] [--warm-pool TEMPLATE=SIZE ...]
//!     [--network auto|isolated|user] [--egress-dns IP:PORT]
//! nullspace-pool-manager check [--state-dir DIR] [--network auto|isolated|user] [--min-free-disk-mib 1024]
//! nullspace-pool-manager migrate [--catalog URL] [--state-dir DIR]
//! nullspace-pool-manager admin team create NAME [--id TEAM_ID] [--max-sandboxes N] [--set LIMIT=N ...] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin team quota TEAM [--max-sandboxes N] [--set LIMIT=N ...] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin team list [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin host list [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin host drain|undrain HOST_ID [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key create (--team TEAM [--key KEY] | --operator) [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key list [--team TEAM] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key revoke KEY_ID [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key rotate KEY_ID [--grace-s 3600] [--state-dir DIR] [--catalog URL]
//! ```
//!
//! The catalog (`--catalog`) is SQLite at `STATE/catalog.db` unless given: `sqlite:PATH`
//! (or a path), or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a catalog hosts
//! share, whose schema `migrate` brings up to date (once per upgrade, before `serve`).
//!
//! S3 credentials come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. Workers that
//! share a bucket restore each other's snapshots; a team and its keys are mirrored onto
//! another worker with `--id` and `--key`.
//!
//! ```text
//! ```

mod api;
mod backoff;
mod catalog;
mod cluster;
mod edge;
mod error;
mod host_check;
mod model;
mod operator_api;
mod preview;
mod quotas;
mod sandboxes;
mod templates;
mod tokens;

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::sync::Arc;

const USAGE: &str = "usage:
  nullspace-pool-manager serve [--listen 127.0.0.1:7070] [--edge-listen 127.0.0.1:7071] [--preview-listen 127.0.0.1:7072] [--preview-domain localhost:PORT] [--state-dir /var/lib/nullspace] [--catalog URL] [--templates-dir DIR] [--on-exit end|keep] [--max-sandboxes-per-team 20]
      [--snapshot-store local|s3] [--store-dir STATE/objects] [--s3-endpoint URL --s3-bucket NAME [--s3-prefix P] [--s3-region us-east-1]]
      [--periodic-snapshot-interval-s 0] [--deleted-retention-s 604800] [--min-free-disk-mib 1024] [--warm-pool TEMPLATE=SIZE ...]
      [--network auto|isolated|user] [--egress-dns IP:PORT] [--insecure-unconfined-qemu]
      [--host-id ID (kept in STATE/host-id)] [--advertise-host ADDR (what other hosts reach this one at)]
  nullspace-pool-manager check [--state-dir /var/lib/nullspace] [--network auto] [--min-free-disk-mib 1024]
  nullspace-pool-manager migrate [--catalog URL] [--state-dir DIR]
  nullspace-pool-manager admin team create NAME [--id TEAM_ID] [--max-sandboxes N] [--set LIMIT=N ...] [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin team quota TEAM [--max-sandboxes N] [--set LIMIT=N ...] [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin team list [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin host list [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin host drain|undrain HOST_ID [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin key create (--team TEAM [--key KEY] | --operator) [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin key list [--team TEAM] [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin key revoke KEY_ID [--state-dir DIR] [--catalog URL]
  nullspace-pool-manager admin key rotate KEY_ID [--grace-s 3600] [--state-dir DIR] [--catalog URL]
Catalog (--catalog): sqlite:PATH or a path (default: STATE/catalog.db), or
  postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (run `migrate --catalog URL` first, and after each upgrade).
Limits (--set): sandboxes vcpus memoryMiB diskMiB snapshots snapshotMiB volumes volumeMiB
  templates builds createsPerMinute createBurst.
S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.";

/// `--network`: `isolated` (each VM in its own namespace behind the egress proxy),
/// `auto` (the same; an error where the host cannot: never a silent fall back), or
/// `user` (QEMU's user-mode network, restricted: every guest offline; only by name).
fn network_mode(args: &Args) -> anyhow::Result<host_check::NetworkMode> {
    args.flag("network", "auto")
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
}

/// The driver's settings: the environment's (`QemuConfig::from_env`), with what the
/// flags and the state directory decide. One value for the host check and for `serve`.
fn qemu_config(args: &Args, state: &std::path::Path) -> anyhow::Result<vmm::QemuConfig> {
    let env = vmm::QemuConfig::from_env()?;
    Ok(vmm::QemuConfig {
        // VMs outlive the daemon process: a crash or SIGKILL loses no sandbox, and the
        // next start adopts them.
        detach_vms: true,
        isolated_network: network_mode(args)? != host_check::NetworkMode::User,
        allow_unconfined: env.allow_unconfined || args.switch("insecure-unconfined-qemu"),
        // On the state disk, not the tmpfs run dir.
        disk_dir: state.join("disks"),
        min_free_mib: number(args, "min-free-disk-mib", 1024)?,
        ..env
    })
}

fn network_settings(args: &Args) -> anyhow::Result<sandboxes::NetworkSettings> {
    let isolated = match network_mode(args)? {
        host_check::NetworkMode::Auto | host_check::NetworkMode::Isolated => {
            vmm::net::GuestNet::check_host().map_err(|why| {
                anyhow::anyhow!(
                    "--network {}: this host cannot isolate VMs ({why}); fix the host (deploy/install-deps.sh, as root), or pass --network user to run every guest offline",
                    args.flag("network", "auto")
                )
            })?;
            eprintln!("nullspace-pool-manager: network: each VM isolated behind the egress proxy");
            Ok(())
        }
        host_check::NetworkMode::User => {
            tracing::warn!(
                "network: user-mode (--network user): every guest is offline and egress policies cannot be enforced"
            );
            Err(sandboxes::USER_MODE_NETWORK.to_string())
        }
    };
    let upstream = match args.flags.iter().rev().find(|(n, _)| n == "egress-dns") {
        Some((_, v)) => egress::Upstream {
            dns: v
                .parse()
                .with_context(|| format!("--egress-dns {v}: send IP:PORT, e.g. 10.0.0.53:53"))?,
        },
        None => egress::Upstream::from_host(),
    };
    Ok(sandboxes::NetworkSettings { isolated, upstream })
}

/// Runs the host check on what `config` will run, printing each line; an error names
/// every fatal one.
fn check_host(
    args: &Args,
    state: &std::path::Path,
    config: &vmm::QemuConfig,
) -> anyhow::Result<()> {
    let check = host_check::run(&host_check::HostCheckInput {
        qemu_binary: config.qemu_binary.clone(),
        accel: config.accel,
        network: network_mode(args)?,
        state_dir: state.to_path_buf(),
        run_dir: config.run_dir.clone(),
        min_free_disk_mib: number(args, "min-free-disk-mib", 1024)?,
        allow_unconfined: config.allow_unconfined,
    });
    eprint!("{}", check.report());
    let fatal: Vec<String> = check.fatal().map(|l| l.name.to_string()).collect();
    if !fatal.is_empty() {
        bail!(
            "this host cannot run VMs ({}): apply the fixes above, then `nullspace-pool-manager check`",
            fatal.join(", ")
        );
    }
    Ok(())
}

/// Flags that take no value.
const SWITCHES: &[&str] = &["insecure-unconfined-qemu", "operator"];

/// Command-line flags: `--name value` pairs after the positional words.
struct Args {
    words: Vec<String>,
    flags: Vec<(String, String)>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut words = Vec::new();
        let mut flags = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if SWITCHES.contains(&name) {
                    flags.push((name.to_string(), String::new()));
                    continue;
                }
                let value = it
                    .next()
                    .with_context(|| format!("--{name} needs a value\n{USAGE}"))?;
                flags.push((name.to_string(), value));
            } else {
                words.push(a);
            }
        }
        Ok(Self { words, flags })
    }

    /// Whether a switch (a flag without a value) was given.
    fn switch(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    fn flag(&self, name: &str, default: &str) -> String {
        // The last one wins, as in most command lines.
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| default.to_string())
    }

    /// Every value of a repeatable flag, in order.
    fn all(&self, name: &str) -> Vec<String> {
        self.flags
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn check_flags(&self, allowed: &[&str]) -> anyhow::Result<()> {
        if let Some((n, _)) = self
            .flags
            .iter()
            .find(|(n, _)| !allowed.contains(&n.as_str()))
        {
            bail!("unknown flag --{n}\n{USAGE}");
        }
        Ok(())
    }
}

fn state_dir(args: &Args) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(args.flag(
        "state-dir",
        &std::env::var("NULLSPACE_STATE_DIR").unwrap_or_else(|_| "/var/lib/nullspace".into()),
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The catalog `--catalog` names; SQLite in the state dir by default.
fn catalog_location(args: &Args) -> anyhow::Result<catalog::Location> {
    match args.flag("catalog", "").as_str() {
        "" => Ok(catalog::Location::Sqlite(
            state_dir(args)?.join("catalog.db"),
        )),
        url => catalog::Location::parse(url).map_err(|e| anyhow::anyhow!("--catalog: {e}")),
    }
}

fn open_catalog(args: &Args) -> anyhow::Result<catalog::Catalog> {
    let location = catalog_location(args)?;
    catalog::Catalog::open_location(&location)
        .with_context(|| format!("opening the catalog {location}"))
}

/// The per-host secret runtime tokens are signed with, made on first start.
fn token_secret(dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("runtime-token.key");
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() >= 32 {
            return Ok(bytes);
        }
    }
    let secret: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, &secret)?;
    Ok(secret)
}

/// A tenant team by ID or name (never the operator's reserved one).
fn tenant(catalog: &catalog::Catalog, team_ref: &str) -> anyhow::Result<catalog::Team> {
    if team_ref.is_empty() {
        bail!("send --team TEAM (a team's name or ID); `admin team list` shows them");
    }
    catalog
        .team(team_ref)?
        .filter(|t| t.id != catalog::OPERATOR_TEAM_ID)
        .with_context(|| format!("no team '{team_ref}'; create it with `admin team create NAME`"))
}

/// The limits `--max-sandboxes N` and `--set NAME=VALUE` (repeatable) ask for.
fn limits_patch(args: &Args) -> anyhow::Result<quotas::LimitsPatch> {
    let mut patch = quotas::LimitsPatch::default();
    if let Some(max) = max_sandboxes(args)? {
        patch.sandboxes = Some(max as u64);
    }
    for assignment in args.all("set") {
        patch
            .set(&assignment)
            .map_err(|e| anyhow::anyhow!("--set {assignment}: {e}"))?;
    }
    Ok(patch)
}

/// `--max-sandboxes N`, if given.
fn max_sandboxes(args: &Args) -> anyhow::Result<Option<u32>> {
    let v = args.flag("max-sandboxes", "");
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("--max-sandboxes {v:?} is not a number; send e.g. 10"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse()?;
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["serve"] => serve(&args).await,
        ["check"] => {
            args.check_flags(&[
                "state-dir",
                "network",
                "min-free-disk-mib",
                "insecure-unconfined-qemu",
            ])?;
            let state = state_dir(&args)?;
            check_host(&args, &state, &qemu_config(&args, &state)?)
        }
        ["migrate"] => {
            args.check_flags(&["catalog", "state-dir"])?;
            let location = catalog_location(&args)?;
            let done = catalog::Catalog::migrate(&location)
                .with_context(|| format!("migrating the catalog {location}"))?;
            if done.from == done.to {
                eprintln!("catalog {location}: up to date");
            } else {
                eprintln!(
                    "catalog {location}: migrated from schema version {} to {}",
                    done.from, done.to
                );
            }
            println!("schema version {}", done.to);
            Ok(())
        }
        ["admin", "team", "create", name] => {
            args.check_flags(&["state-dir", "catalog", "max-sandboxes", "id", "set"])?;
            let catalog = open_catalog(&args)?;
            let id = args.flag("id", "");
            let well_formed = |id: &str| {
                id.strip_prefix("team-").is_some_and(|rest| {
                    rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
                })
            };
            if !id.is_empty() && !well_formed(&id) {
                bail!("--id {id:?}: send a team ID as another worker printed it (team-…)");
            }
            if *name == catalog::OPERATOR_TEAM || id == catalog::OPERATOR_TEAM_ID {
                bail!("{name:?} is the operator's reserved team; pick another name (operator keys: `admin key create --operator`)");
            }
            if !api_model::is_team_ref(name) || name.starts_with("team-") {
                bail!("{name:?}: a team name is 1-64 letters, digits, '-', '_' or '.', and does not start with team- (the form of team IDs)");
            }
            let patch = limits_patch(&args)?;
            if patch != quotas::LimitsPatch::default() {
                patch.validate().map_err(|e| anyhow::anyhow!(e.message))?;
            }
            let team = catalog.create_team(name, (!id.is_empty()).then_some(id.as_str()))?;
            if patch != quotas::LimitsPatch::default() {
                catalog.set_limits(&team.id, &patch)?;
            }
            println!("{}", serde_json::to_string(&team)?);
            Ok(())
        }
        ["admin", "team", "quota", team_ref] => {
            args.check_flags(&[
                "state-dir",
                "catalog",
                "max-sandboxes",
                "set",
                "default-max-sandboxes",
            ])?;
            let catalog = open_catalog(&args)?;
            let team = tenant(&catalog, team_ref)?;
            let patch = limits_patch(&args)?;
            let own = if patch == quotas::LimitsPatch::default() {
                // No change asked: show what is in force.
                catalog.limits(&team.id)?
            } else {
                patch.validate().map_err(|e| anyhow::anyhow!(e.message))?;
                catalog.set_limits(&team.id, &patch)?
            };
            let default_max: u32 = number(&args, "default-max-sandboxes", 20)? as u32;
            let limits = quotas::Limits::defaults(default_max).with(&own);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "team": team, "limits": limits, "ownLimits": own,
                    "note": "limits not in ownLimits are the serving daemon's defaults (sandboxes: its --max-sandboxes-per-team)"
                }))?
            );
            Ok(())
        }
        ["admin", "team", "list"] => {
            args.check_flags(&["state-dir", "catalog"])?;
            let catalog = open_catalog(&args)?;
            for t in catalog.teams()? {
                if t.id != catalog::OPERATOR_TEAM_ID {
                    println!(
                        "{}",
                        serde_json::json!({ "id": t.id, "name": t.name, "ownLimits": catalog.limits(&t.id)? })
                    );
                }
            }
            Ok(())
        }
        ["admin", "host", "list"] => {
            args.check_flags(&["state-dir", "catalog"])?;
            let catalog = open_catalog(&args)?;
            for h in catalog.hosts()? {
                println!("{}", serde_json::to_string(&h)?);
            }
            Ok(())
        }
        ["admin", "host", state @ ("drain" | "undrain"), id] => {
            args.check_flags(&["state-dir", "catalog"])?;
            let catalog = open_catalog(&args)?;
            let to = if *state == "drain" {
                "draining"
            } else {
                "ready"
            };
            if !catalog.set_host_state(id, to)? {
                bail!("no host {id:?}; `admin host list` shows them");
            }
            println!("{}", serde_json::json!({ "hostID": id, "state": to }));
            Ok(())
        }
        ["admin", "key", "create"] => {
            args.check_flags(&["state-dir", "catalog", "team", "key", "operator"])?;
            let catalog = open_catalog(&args)?;
            let key = args.flag("key", "");
            if !key.is_empty() && !api_model::key_is_well_formed(&key) {
                bail!("--key: send a key as another worker issued it (ns_ and 32 hex digits)");
            }
            let given = (!key.is_empty()).then_some(key.as_str());
            if args.switch("operator") {
                if args.switch("team") {
                    bail!("an operator key belongs to no team: send --operator or --team TEAM, not both");
                }
                println!(
                    "{}",
                    catalog.create_key_with_role("", given, catalog::Role::Operator)?
                );
                return Ok(());
            }
            let team = tenant(&catalog, &args.flag("team", ""))?;
            println!("{}", catalog.create_key(&team.id, given)?);
            Ok(())
        }
        ["admin", "key", "list"] => {
            args.check_flags(&["state-dir", "catalog", "team"])?;
            let catalog = open_catalog(&args)?;
            let team = match args.flag("team", "").as_str() {
                "" => None,
                t => Some(tenant(&catalog, t)?.id),
            };
            for k in catalog.keys(team.as_deref())? {
                println!("{}", serde_json::to_string(&k)?);
            }
            Ok(())
        }
        ["admin", "key", "revoke", id] => {
            args.check_flags(&["state-dir", "catalog"])?;
            let catalog = open_catalog(&args)?;
            if !catalog.expire_key(id, chrono::Utc::now().timestamp_millis())? {
                bail!("no key in force with ID {id:?}; `admin key list` shows the IDs (16 hex digits)");
            }
            println!("key {id} revoked: it no longer opens anything");
            Ok(())
        }
        ["admin", "key", "rotate", id] => {
            args.check_flags(&["state-dir", "catalog", "grace-s"])?;
            let catalog = open_catalog(&args)?;
            let grace = number(&args, "grace-s", api_model::DEFAULT_ROTATION_GRACE_S)?;
            if grace > api_model::MAX_ROTATION_GRACE_S {
                bail!(
                    "--grace-s {grace}: a rotation overlaps at most {} s (7 days); 0 ends the old key now",
                    api_model::MAX_ROTATION_GRACE_S
                );
            }
            let old = catalog.key(id)?.with_context(|| {
                format!("no key in force with ID {id:?}; `admin key list` shows the IDs (16 hex digits)")
            })?;
            let role = if old.role == "operator" {
                catalog::Role::Operator
            } else {
                catalog::Role::Team
            };
            let key = catalog.create_key_with_role(&old.team_id, None, role)?;
            catalog.expire_key(
                id,
                chrono::Utc::now().timestamp_millis() + grace as i64 * 1000,
            )?;
            eprintln!("key {id} keeps working for {grace} s; the new key follows");
            println!("{key}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

/// A numeric flag.
fn number(args: &Args, name: &str, default: u64) -> anyhow::Result<u64> {
    let v = args.flag(name, &default.to_string());
    v.parse()
        .with_context(|| format!("--{name} {v:?} is not a number; send e.g. {default}"))
}

/// The snapshot store and its limits, from the flags.
async fn snapshot_settings(
    args: &Args,
    state: &std::path::Path,
) -> anyhow::Result<sandboxes::SnapshotSettings> {
    let store = match args.flag("snapshot-store", "local").as_str() {
        "local" => {
            let dir = args.flag("store-dir", &state.join("objects").display().to_string());
            storage::Store::local(
                storage::LocalStore::open(&dir)
                    .with_context(|| format!("opening the snapshot store {dir}"))?,
            )
        }
        "s3" => {
            let need = |name: &str| {
                let v = args.flag(name, "");
                if v.is_empty() {
                    bail!("--snapshot-store s3 needs --{name}\n{USAGE}");
                }
                Ok(v)
            };
            let env = |name: &str| {
                std::env::var(name).with_context(|| {
                    format!("--snapshot-store s3 needs {name} in the environment (any value for a server without authentication)")
                })
            };
            let config = storage::S3Config {
                endpoint: need("s3-endpoint")?,
                bucket: need("s3-bucket")?,
                prefix: args.flag("s3-prefix", ""),
                region: args.flag("s3-region", "us-east-1"),
                access_key: env("AWS_ACCESS_KEY_ID")?,
                secret_key: env("AWS_SECRET_ACCESS_KEY")?,
            };
            let s3 = storage::S3Store::new(&config);
            s3.ensure_bucket().await.with_context(|| {
                format!(
                    "reaching bucket {} at {}; check --s3-endpoint and the credentials",
                    config.bucket, config.endpoint
                )
            })?;
            storage::Store::s3(s3)
        }
        other => bail!("--snapshot-store {other}: send local or s3"),
    };
    // Test hook: a fault after N puts, to prove a failed upload leaves no snapshot.
    let store = match std::env::var("NULLSPACE_TEST_FAIL_PUT_AFTER") {
        Ok(n) => store.with_fault_after_puts(
            n.parse()
                .context("NULLSPACE_TEST_FAIL_PUT_AFTER needs a number")?,
        ),
        Err(_) => store,
    };
    let periodic_default_s = number(args, "periodic-snapshot-interval-s", 0)?;
    api_model::validate_snapshot_interval(periodic_default_s)
        .map_err(|e| anyhow::anyhow!("--periodic-snapshot-interval-s: {}", e.message))?;
    Ok(sandboxes::SnapshotSettings {
        store,
        periodic_default_s,
        min_free_mib: number(args, "min-free-disk-mib", 1024)?,
    })
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    args.check_flags(&[
        "listen",
        "edge-listen",
        "preview-listen",
        "preview-domain",
        "state-dir",
        "catalog",
        "templates-dir",
        "on-exit",
        "max-sandboxes-per-team",
        "snapshot-store",
        "store-dir",
        "s3-endpoint",
        "s3-bucket",
        "s3-prefix",
        "s3-region",
        "periodic-snapshot-interval-s",
        "deleted-retention-s",
        "min-free-disk-mib",
        "warm-pool",
        "network",
        "egress-dns",
        "insecure-unconfined-qemu",
        "host-id",
        "advertise-host",
    ])?;
    // Every VM and every proxied connection holds descriptors; the soft limit is too few.
    match egress::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let dir = state_dir(args)?;
    // First: a host that cannot run a VM stops here, not at the first create.
    let config = qemu_config(args, &dir)?;
    check_host(args, &dir, &config)?;
    let listen = args.flag("listen", "127.0.0.1:7070");
    let edge_listen = args.flag("edge-listen", "127.0.0.1:7071");
    let catalog = open_catalog(args)?;
    // Which host this is: its records and background work are its own on a catalog
    // hosts share.
    let given_host = args.flag("host-id", "");
    let host = cluster::hosts::host_id(&dir, Some(given_host.as_str()).filter(|h| !h.is_empty()))?;
    cluster::set_this_host(&host);
    catalog
        .set_host(&host)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let shared_catalog = catalog.is_shared();
    let tokens = tokens::TokenSigner::new(match catalog.is_shared() {
        // Every host signs and checks with one key: a token stays good on whichever
        // host its sandbox moves to (drain, failover).
        true => catalog
            .shared_secret("runtime-token-key", &token_secret(&dir)?)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        false => token_secret(&dir)?,
    });
    let keep_vms = match args.flag("on-exit", "end").as_str() {
        "end" => false,
        "keep" => true,
        other => bail!(
            "--on-exit {other}: send end (VMs end with the daemon) or keep (a restart adopts them)"
        ),
    };
    let network = network_settings(args)?;
    let vmm = vmm::QemuVmm::new(config, vmm::ImageSet::from_env()?)
        .await
        .context("starting the VMM driver")?;

    let control = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let data = tokio::net::TcpListener::bind(&edge_listen)
        .await
        .with_context(|| format!("binding {edge_listen}"))?;
    let edge_url = format!("http://{}", data.local_addr()?);
    let preview_listen = args.flag("preview-listen", "127.0.0.1:7072");
    let preview_listener = tokio::net::TcpListener::bind(&preview_listen)
        .await
        .with_context(|| format!("binding {preview_listen}"))?;
    // Browsers resolve every *.localhost name to loopback: no DNS needed locally.
    let preview_domain = args.flag(
        "preview-domain",
        &format!("localhost:{}", preview_listener.local_addr()?.port()),
    );
    let templates_dir = PathBuf::from(args.flag(
        "templates-dir",
        &dir.join("templates").display().to_string(),
    ));
    std::fs::create_dir_all(&templates_dir)
        .with_context(|| format!("creating {}", templates_dir.display()))?;
    for d in [&dir, &templates_dir] {
        vmm::qemu::check_vm_user_can_reach(d).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // What other hosts and clients reach this one at (its listeners' ports on the
    // address it advertises; the bound address by default).
    let advertised = args.flag("advertise-host", "");
    let advertise = |addr: std::net::SocketAddr| match advertised.as_str() {
        "" => format!("http://{addr}"),
        h => format!("http://{h}:{}", addr.port()),
    };
    if shared_catalog && advertised.is_empty() && control.local_addr()?.ip().is_loopback() {
        // Other hosts forward to what this one registers: loopback works only when
        // every host runs on this machine (tests, deploy/cluster.sh gives each its own).
        tracing::warn!(
            "this host shares its catalog but registers loopback addresses (http://{}): other machines cannot reach it; pass --advertise-host ADDR and listen on it",
            control.local_addr()?
        );
    }
    let (vcpus, mem_mib, disk_mib) = cluster::hosts::capacity(&dir);
    let host_info = catalog::HostInfo {
        id: host.clone(),
        control_url: advertise(control.local_addr()?),
        edge_url: advertise(data.local_addr()?),
        preview_url: advertise(preview_listener.local_addr()?),
        vcpus,
        mem_mib,
        disk_mib,
        qemu: vmm.qemu_version().to_string(),
        accel: format!("{:?}", vmm.accel().accel).to_lowercase(),
        image_set: vmm.images().key(),
    };
    let snapshots = snapshot_settings(args, &dir).await?;
    eprintln!(
        "nullspace-pool-manager: snapshots in {}",
        snapshots.store.describe()
    );
    let manager = Arc::new(sandboxes::Manager::new(
        catalog,
        vmm,
        tokens.clone(),
        sandboxes::ManagerConfig {
            edge_url: edge_url.clone(),
            state_dir: dir.clone(),
            templates_dir,
            default_quota: args
                .flag("max-sandboxes-per-team", "20")
                .parse()
                .context("--max-sandboxes-per-team needs a number")?,
            deleted_retention_s: number(args, "deleted-retention-s", 7 * 24 * 3600)?,
            snapshots,
            preview_domain: preview_domain.clone(),
            network,
        },
    ));
    manager
        .reconcile_after_start()
        .await
        .map_err(|e| anyhow::anyhow!("reconciling the catalog: {}", e.message))?;
    // A built-in template that cannot be made means no create can succeed: the daemon
    // stops (non-zero) instead of answering every create with a 500.
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel::<String>();
    let warm = manager.clone();
    tokio::spawn(async move {
        // Its own task: a panic while making them is a failure too, not a silent wait.
        let made = tokio::spawn(async move { warm.warm_templates().await }).await;
        let why = match made {
            Ok(Ok(())) => {
                eprintln!("nullspace-pool-manager: template snapshots ready");
                return;
            }
            Ok(Err(e)) => e.message,
            Err(e) => format!("the task making them ended: {e}"),
        };
        tracing::error!(error = %why, "template snapshots failed");
        let _ = fatal_tx.send(format!("template snapshots failed: {why}"));
    });
    tokio::spawn(cluster::hosts::heartbeat(
        manager.clone(),
        host_info,
        dir.clone(),
    ));
    tokio::spawn(manager.clone().watch_cluster());
    tokio::spawn(manager.clone().sweep_timeouts());
    tokio::spawn(manager.clone().sweep_periodic());
    tokio::spawn(manager.clone().collect_garbage_when_asked());
    tokio::spawn(manager.clone().sample_metrics());
    tokio::spawn(manager.clone().cap_consoles());
    tokio::spawn(manager.clone().keep_volume_leases());
    manager
        .load_warm_pools()
        .map_err(|e| anyhow::anyhow!("loading warm pools: {}", e.message))?;
    // `--warm-pool TEMPLATE=SIZE` (repeatable) sets pools of the default shape at start.
    for spec in args.all("warm-pool") {
        let (template, size) = spec
            .split_once('=')
            .and_then(|(t, n)| Some((t, n.parse::<u32>().ok()?)))
            .with_context(|| format!("--warm-pool {spec:?}: send TEMPLATE=SIZE, e.g. base=2"))?;
        let body = api_model::WarmPoolBody {
            size,
            resources: None,
            refill: None,
        };
        // The host's own command line speaks for the operator.
        manager
            .set_warm_pool(sandboxes::Actor::Operator, template, body)
            .await
            .map_err(|e| anyhow::anyhow!("--warm-pool {spec}: {}", e.message))?;
    }
    tokio::spawn(manager.clone().refill_warm_pools());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let control_addr = control.local_addr()?;
    let control_server = axum::serve(control, api::router(manager.clone()))
        .with_graceful_shutdown(wait_stop(stop_rx.clone()));
    let edge_server = axum::serve(data, edge::router(manager.clone(), tokens.clone()))
        .with_graceful_shutdown(wait_stop(stop_rx.clone()));
    let previews = std::sync::Arc::new(preview::Previews {
        manager: manager.clone(),
        tokens,
        domain: preview_domain.clone(),
    });
    let preview_addr = preview_listener.local_addr()?;
    let preview_server = axum::serve(preview_listener, preview::router(previews))
        .with_graceful_shutdown(wait_stop(stop_rx));
    eprintln!(
        "nullspace-pool-manager: control API http://{} , data plane {edge_url} , previews http://{preview_domain} , preview listener http://{preview_addr} , state {}",
        control_addr,
        dir.display()
    );
    let servers =
        tokio::spawn(async move { tokio::try_join!(control_server, edge_server, preview_server) });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let fatal = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        // Dropped unsent (the templates were made): this branch just never fires.
        Ok(why) = &mut fatal_rx => Some(why),
    };
    tracing::info!(keep_vms, "shutting down");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(
        std::time::Duration::from_secs(20),
        manager.shutdown(keep_vms),
    )
    .await
    .is_err()
    {
        tracing::error!(
            "shutdown took over 20 s; exiting anyway (the next start reaps or adopts what is left)"
        );
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), servers).await;
    match fatal {
        Some(why) => bail!("{why}; run `nullspace-pool-manager check`"),
        None => Ok(()),
    }
}
