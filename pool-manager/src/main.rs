//! `nullspace-pool-manager`: the per-host daemon, and its admin commands.
//!
//! ```text
//! nullspace-pool-manager serve [--listen 127.0.0.1:7070] [--edge-listen 127.0.0.1:7071] [--preview-listen 127.0.0.1:7072]
//!     [--preview-domain HOST[:PORT]] [--state-dir /var/lib/nullspace] [--catalog URL] [--templates-dir DIR]
//!     [--on-exit end|keep] [--max-sandboxes-per-team 20]
//!     [--snapshot-store local|s3] [--store-dir DIR] [--s3-endpoint URL --s3-bucket NAME [--s3-prefix P] [--s3-region us-east-1]]
//!     [--periodic-snapshot-interval-s 0] [--deleted-retention-s 604800] [--min-free-disk-mib 1024] [--warm-pool TEMPLATE=SIZE ...]
//!     [--network auto|isolated|user] [--egress-dns IP:PORT] [--insecure-unconfined-qemu]
//!     [--host-id ID] [--advertise-host ADDR]
//! nullspace-pool-manager check [--state-dir DIR] [--network auto|isolated|user] [--min-free-disk-mib 1024] [--insecure-unconfined-qemu]
//! nullspace-pool-manager migrate [--catalog URL] [--state-dir DIR]
//! nullspace-pool-manager admin team create NAME [--id TEAM_ID] [--max-sandboxes N] [--set LIMIT=N ...] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin team quota TEAM [--max-sandboxes N] [--set LIMIT=N ...] [--default-max-sandboxes 20] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin team list [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin host list [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin host drain HOST_ID [--wait-s 0] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin host undrain HOST_ID [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key create (--team TEAM [--key KEY] | --operator) [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key list [--team TEAM] [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key revoke KEY_ID [--state-dir DIR] [--catalog URL]
//! nullspace-pool-manager admin key rotate KEY_ID [--grace-s 3600] [--state-dir DIR] [--catalog URL]
//! ```
//!
//! `--help` describes every subcommand and flag (`cli.rs`). Every flag is also read from
//! `NULLSPACE_` and its name in upper snake case (`--state-dir`: `NULLSPACE_STATE_DIR`)
//! and from the TOML file `--config FILE` (`NULLSPACE_CONFIG`) names, keyed by the flags'
//! names; the command line wins over the environment, which wins over the file
//! (`layered.rs`).
//!
//! The catalog (`--catalog`) is SQLite at `STATE/catalog.db` unless given: `sqlite:PATH`
//! (or a path), or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a catalog hosts
//! share, whose schema `migrate` brings up to date (once per upgrade, before `serve`).
//!
//! S3 credentials come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. Workers that
//! share a bucket restore each other's snapshots; a team and its keys are mirrored onto
//! another worker with `--id` and `--key`.

mod api;
mod backoff;
mod catalog;
mod cli;
mod cluster;
mod control_socket;
mod edge;
mod error;
mod host_check;
mod layered;
mod migration_api;
mod model;
mod operator_api;
mod preview;
mod public_api;
mod quotas;
mod sandboxes;
mod templates;
mod tokens;

/// mimalloc: glibc's malloc was a tenth of the time per public-API request (bench-api).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use cli::{Admin, CatalogArgs, HostArgs, HostCommand, KeyCommand, TeamCommand};
use std::path::PathBuf;
use std::sync::Arc;

/// `--network`'s value as given.
fn network_name(mode: host_check::NetworkMode) -> &'static str {
    match mode {
        host_check::NetworkMode::Auto => "auto",
        host_check::NetworkMode::Isolated => "isolated",
        host_check::NetworkMode::User => "user",
    }
}

/// The driver's settings: the environment's (`QemuConfig::from_env`), with what the
/// flags and the state directory decide. One value for the host check and for `serve`.
fn qemu_config(host: &HostArgs, state: &std::path::Path) -> anyhow::Result<vmm::QemuConfig> {
    let env = vmm::QemuConfig::from_env()?;
    Ok(vmm::QemuConfig {
        // VMs outlive the daemon process: a crash or SIGKILL loses no sandbox, and the
        // next start adopts them.
        detach_vms: true,
        isolated_network: host.network != host_check::NetworkMode::User,
        // `--insecure-unconfined-qemu`, which NULLSPACE_INSECURE_UNCONFINED_QEMU (the
        // driver's own variable) also sets.
        allow_unconfined: host.insecure_unconfined_qemu,
        // On the state disk, not the tmpfs run dir.
        disk_dir: state.join("disks"),
        min_free_mib: host.min_free_disk_mib,
        ..env
    })
}

/// `--network`: `isolated` (each VM in its own namespace behind the egress proxy),
/// `auto` (the same; an error where the host cannot: never a silent fall back), or
/// `user` (QEMU's user-mode network, restricted: every guest offline; only by name).
fn network_settings(
    host: &HostArgs,
    egress_dns: Option<std::net::SocketAddr>,
    extra_ca: &[std::path::PathBuf],
) -> anyhow::Result<sandboxes::NetworkSettings> {
    let isolated = match host.network {
        host_check::NetworkMode::Auto | host_check::NetworkMode::Isolated => {
            vmm::net::GuestNet::check_host().map_err(|why| {
                anyhow::anyhow!(
                    "--network {}: this host cannot isolate VMs ({why}); fix the host (deploy/install-deps.sh, as root), or pass --network user to run every guest offline",
                    network_name(host.network)
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
    let upstream = match egress_dns {
        Some(dns) => egress::Upstream { dns },
        None => egress::Upstream::from_host(),
    };
    let mut roots = Vec::new();
    for file in extra_ca {
        roots.push(std::fs::read_to_string(file).with_context(|| {
            format!(
                "--egress-extra-ca {}: reading it; send a PEM file of CA certificates",
                file.display()
            )
        })?);
    }
    let upstream_tls =
        intercept::upstream_client_config(&roots.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| anyhow::anyhow!("--egress-extra-ca: {e}"))?;
    Ok(sandboxes::NetworkSettings {
        isolated,
        upstream,
        upstream_tls,
    })
}

/// Runs the host check on what `config` will run, printing each line; an error names
/// every fatal one.
fn check_host(
    host: &HostArgs,
    state: &std::path::Path,
    config: &vmm::QemuConfig,
) -> anyhow::Result<()> {
    let check = host_check::run(&host_check::HostCheckInput {
        qemu_binary: config.qemu_binary.clone(),
        accel: config.accel,
        network: host.network,
        state_dir: state.to_path_buf(),
        run_dir: config.run_dir.clone(),
        min_free_disk_mib: host.min_free_disk_mib,
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

/// The state directory, made if missing.
fn state_dir(state: &cli::StateDir) -> anyhow::Result<PathBuf> {
    let dir = state.state_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A flag's value; empty counts as not given.
fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|v| !v.is_empty())
}

/// The catalog `--catalog` names; SQLite in the state dir by default.
fn catalog_location(args: &CatalogArgs) -> anyhow::Result<catalog::Location> {
    match given(&args.catalog) {
        None => Ok(catalog::Location::Sqlite(
            state_dir(&args.state)?.join("catalog.db"),
        )),
        Some(url) => catalog::Location::parse(url).map_err(|e| anyhow::anyhow!("--catalog: {e}")),
    }
}

/// Closes to every guest what `--egress-never` names and the addresses of the catalog
/// and the S3 endpoint (as resolved now): a team's policy may name private networks,
/// and these live on them.
fn close_to_guests(args: &cli::Serve) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let mut blocks = args.egress_never.clone();
    let urls = [given(&args.catalog.catalog), given(&args.s3_endpoint)];
    for url in urls.into_iter().flatten() {
        // scheme://[user[:password]@]host[:port][/…]
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse().unwrap_or(0)),
            _ => (host_port, 0),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || !url.contains("://") {
            continue;
        }
        for addr in (host, port).to_socket_addrs().into_iter().flatten() {
            if let std::net::IpAddr::V4(ip) = addr.ip() {
                // Loopback is closed to guests already.
                if !ip.is_loopback() {
                    blocks.push((ip, 32));
                }
            }
        }
    }
    if !blocks.is_empty() {
        tracing::info!(?blocks, "egress: closed to every guest");
    }
    egress::close_to_every_guest(blocks).map_err(|e| anyhow::anyhow!(e))
}

/// The catalog for `admin host` commands: one a newer binary migrated is fine (see
/// [`catalog::Catalog::open_for_hosts`]).
fn open_catalog_for_hosts(args: &CatalogArgs) -> anyhow::Result<catalog::Catalog> {
    let location = catalog_location(args)?;
    catalog::Catalog::open_for_hosts(&location)
        .with_context(|| format!("opening the catalog {location}"))
}

fn open_catalog(args: &CatalogArgs) -> anyhow::Result<catalog::Catalog> {
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
fn limits_patch(args: &cli::LimitsArgs) -> anyhow::Result<quotas::LimitsPatch> {
    let mut patch = quotas::LimitsPatch::default();
    if let Some(max) = args.max_sandboxes {
        patch.sandboxes = Some(max as u64);
    }
    for assignment in &args.set {
        patch
            .set(assignment)
            .map_err(|e| anyhow::anyhow!("--set {assignment}: {e}"))?;
    }
    Ok(patch)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Before the log: `--help` and a mistake in the flags print clap's text and exit.
    let cli = match cli::Cli::parse_with(std::env::args_os(), |name| std::env::var_os(name)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        cli::Command::Serve(args) => serve(&args).await,
        cli::Command::Check(args) => {
            let state = state_dir(&args.state)?;
            check_host(&args.host, &state, &qemu_config(&args.host, &state)?)
        }
        cli::Command::Migrate(args) => {
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
        cli::Command::Admin(admin) => run_admin(admin).await,
    }
}

async fn run_admin(admin: Admin) -> anyhow::Result<()> {
    match admin {
        Admin::Team(TeamCommand::Create {
            name,
            id,
            limits,
            catalog,
        }) => {
            let catalog = open_catalog(&catalog)?;
            let id = given(&id).unwrap_or_default();
            let well_formed = |id: &str| {
                id.strip_prefix("team-").is_some_and(|rest| {
                    rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
                })
            };
            if !id.is_empty() && !well_formed(id) {
                bail!("--id {id:?}: send a team ID as another worker printed it (team-…)");
            }
            if name == catalog::OPERATOR_TEAM || id == catalog::OPERATOR_TEAM_ID {
                bail!("{name:?} is the operator's reserved team; pick another name (operator keys: `admin key create --operator`)");
            }
            if !api_model::is_team_ref(&name) || name.starts_with("team-") {
                bail!("{name:?}: a team name is 1-64 letters, digits, '-', '_' or '.', and does not start with team- (the form of team IDs)");
            }
            let patch = limits_patch(&limits)?;
            if patch != quotas::LimitsPatch::default() {
                patch.validate().map_err(|e| anyhow::anyhow!(e.message))?;
            }
            let team = catalog.create_team(&name, (!id.is_empty()).then_some(id))?;
            if patch != quotas::LimitsPatch::default() {
                catalog.set_limits(&team.id, &patch)?;
            }
            println!("{}", serde_json::to_string(&team)?);
            Ok(())
        }
        Admin::Team(TeamCommand::Quota {
            team,
            limits,
            default_max_sandboxes,
            catalog,
        }) => {
            let catalog = open_catalog(&catalog)?;
            let team = tenant(&catalog, &team)?;
            let patch = limits_patch(&limits)?;
            let own = if patch == quotas::LimitsPatch::default() {
                // No change asked: show what is in force.
                catalog.limits(&team.id)?
            } else {
                patch.validate().map_err(|e| anyhow::anyhow!(e.message))?;
                catalog.set_limits(&team.id, &patch)?
            };
            let limits = quotas::Limits::defaults(default_max_sandboxes).with(&own);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "team": team, "limits": limits, "ownLimits": own,
                    "note": "limits not in ownLimits are the serving daemon's defaults (sandboxes: its --max-sandboxes-per-team)"
                }))?
            );
            Ok(())
        }
        Admin::Team(TeamCommand::List { catalog }) => {
            let catalog = open_catalog(&catalog)?;
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
        Admin::Host(HostCommand::List { catalog }) => {
            let catalog = open_catalog_for_hosts(&catalog)?;
            for h in catalog.hosts()? {
                println!("{}", serde_json::to_string(&h)?);
            }
            Ok(())
        }
        Admin::Host(HostCommand::Drain {
            host,
            wait_s,
            live,
            catalog,
        }) => {
            let catalog = open_catalog_for_hosts(&catalog)?;
            set_host_state(
                &catalog,
                &host,
                if live { "draining-live" } else { "draining" },
            )?;
            if wait_s > 0 {
                wait_drained(&catalog, &host, wait_s).await?;
                println!(
                    "{}",
                    serde_json::json!({ "hostID": host, "state": "drained" })
                );
            }
            Ok(())
        }
        Admin::Host(HostCommand::Undrain { host, catalog }) => {
            let catalog = open_catalog_for_hosts(&catalog)?;
            set_host_state(&catalog, &host, "ready")
        }
        Admin::Key(KeyCommand::Create {
            team,
            key,
            operator,
            catalog,
        }) => {
            let catalog = open_catalog(&catalog)?;
            let key = given(&key);
            if key.is_some_and(|k| !api_model::key_is_well_formed(k)) {
                bail!("--key: send a key as another worker issued it (ns_ and 32 hex digits)");
            }
            if operator {
                if team.is_some() {
                    bail!("an operator key belongs to no team: send --operator or --team TEAM, not both");
                }
                println!(
                    "{}",
                    catalog.create_key_with_role("", key, catalog::Role::Operator)?
                );
                return Ok(());
            }
            let team = tenant(&catalog, team.as_deref().unwrap_or_default())?;
            println!("{}", catalog.create_key(&team.id, key)?);
            Ok(())
        }
        Admin::Key(KeyCommand::List { team, catalog }) => {
            let catalog = open_catalog(&catalog)?;
            let team = match given(&team) {
                None => None,
                Some(t) => Some(tenant(&catalog, t)?.id),
            };
            for k in catalog.keys(team.as_deref())? {
                println!("{}", serde_json::to_string(&k)?);
            }
            Ok(())
        }
        Admin::Key(KeyCommand::Revoke { id, catalog }) => {
            let catalog = open_catalog(&catalog)?;
            if !catalog.expire_key(&id, chrono::Utc::now().timestamp_millis())? {
                bail!("no key in force with ID {id:?}; `admin key list` shows the IDs (16 hex digits)");
            }
            println!("key {id} revoked: it no longer opens anything");
            Ok(())
        }
        Admin::Key(KeyCommand::Rotate {
            id,
            grace_s: grace,
            catalog,
        }) => {
            let catalog = open_catalog(&catalog)?;
            if grace > api_model::MAX_ROTATION_GRACE_S {
                bail!(
                    "--grace-s {grace}: a rotation overlaps at most {} s (7 days); 0 ends the old key now",
                    api_model::MAX_ROTATION_GRACE_S
                );
            }
            let old = catalog.key(&id)?.with_context(|| {
                format!("no key in force with ID {id:?}; `admin key list` shows the IDs (16 hex digits)")
            })?;
            let role = if old.role == "operator" {
                catalog::Role::Operator
            } else {
                catalog::Role::Team
            };
            let key = catalog.create_key_with_role(&old.team_id, None, role)?;
            catalog.expire_key(
                &id,
                chrono::Utc::now().timestamp_millis() + grace as i64 * 1000,
            )?;
            eprintln!("key {id} keeps working for {grace} s; the new key follows");
            println!("{key}");
            Ok(())
        }
    }
}

/// `admin host drain|undrain`: sets the state; prints it.
fn set_host_state(catalog: &catalog::Catalog, id: &str, to: &str) -> anyhow::Result<()> {
    if !catalog.set_host_state(id, to)? {
        bail!("no host {id:?}; `admin host list` shows them");
    }
    println!("{}", serde_json::json!({ "hostID": id, "state": to }));
    Ok(())
}

/// `admin host drain --wait-s N`: polls the catalog until the host is `drained`; an
/// error after `wait_s`, or as soon as the host can no longer drain (undrained, dead or
/// lost, gone).
async fn wait_drained(catalog: &catalog::Catalog, id: &str, wait_s: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_s);
    eprintln!("waiting up to {wait_s} s for host {id} to drain");
    loop {
        let Some(host) = catalog.host(id)? else {
            bail!("host {id:?} left the catalog while draining; `admin host list` shows the hosts");
        };
        match host.state.as_str() {
            "drained" => {
                eprintln!("host {id} drained: no sandbox left on it");
                return Ok(());
            }
            "draining" | "draining-live" => {}
            "ready" => bail!(
                "host {id} was undrained (`admin host undrain`) before it drained; drain it again"
            ),
            other => bail!(
                "host {id} is {other} (no heartbeat): it cannot finish draining; the other hosts take its sandboxes over"
            ),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let left = catalog
                .sandboxes_of_host(id)
                .map(|s| format!("{} sandbox(es) still on it", s.len()))
                .unwrap_or_else(|e| format!("counting its sandboxes failed: {e}"));
            bail!(
                "host {id} is still draining after {wait_s} s ({left}); wait longer (--wait-s), or check `admin host list` and the host's log"
            );
        }
        tokio::time::sleep((deadline - now).min(std::time::Duration::from_secs(1))).await;
    }
}

/// The snapshot store and its limits, from the flags.
async fn snapshot_settings(
    args: &cli::Serve,
    state: &std::path::Path,
) -> anyhow::Result<sandboxes::SnapshotSettings> {
    let store = match args.snapshot_store {
        cli::SnapshotStore::Local => {
            let dir = args
                .store_dir
                .clone()
                .unwrap_or_else(|| state.join("objects"));
            let dir = dir.display().to_string();
            storage::Store::local(
                storage::LocalStore::open(&dir)
                    .with_context(|| format!("opening the snapshot store {dir}"))?,
            )
        }
        cli::SnapshotStore::S3 => {
            let need = |name: &str, v: &Option<String>| match given(v) {
                Some(v) => Ok(v.to_string()),
                None => bail!(
                    "--snapshot-store s3 needs --{name} (or {})",
                    layered::env_name(name)
                ),
            };
            let env = |name: &str| {
                std::env::var(name).with_context(|| {
                    format!("--snapshot-store s3 needs {name} in the environment (any value for a server without authentication)")
                })
            };
            let config = storage::S3Config {
                endpoint: need("s3-endpoint", &args.s3_endpoint)?,
                bucket: need("s3-bucket", &args.s3_bucket)?,
                prefix: args.s3_prefix.clone().unwrap_or_default(),
                region: args.s3_region.clone(),
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
    };
    // Test hook: a fault after N puts, to prove a failed upload leaves no snapshot.
    let store = match std::env::var("NULLSPACE_TEST_FAIL_PUT_AFTER") {
        Ok(n) => store.with_fault_after_puts(
            n.parse()
                .context("NULLSPACE_TEST_FAIL_PUT_AFTER needs a number")?,
        ),
        Err(_) => store,
    };
    let periodic_default_s = args.periodic_snapshot_interval_s;
    api_model::validate_snapshot_interval(periodic_default_s)
        .map_err(|e| anyhow::anyhow!("--periodic-snapshot-interval-s: {}", e.message))?;
    Ok(sandboxes::SnapshotSettings {
        store,
        periodic_default_s,
        min_free_mib: args.host.min_free_disk_mib,
    })
}

async fn serve(args: &cli::Serve) -> anyhow::Result<()> {
    // Every VM and every proxied connection holds descriptors; the soft limit is too few.
    match egress::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let dir = state_dir(&args.catalog.state)?;
    // First: a host that cannot run a VM stops here, not at the first create.
    let config = qemu_config(&args.host, &dir)?;
    check_host(&args.host, &dir, &config)?;
    let listen = &args.listen;
    let edge_listen = &args.edge_listen;
    let catalog = open_catalog(&args.catalog)?;
    // Which host this is: its records and background work are its own on a catalog
    // hosts share.
    let host = cluster::hosts::host_id(&dir, given(&args.host_id))?;
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
    let keep_vms = args.on_exit == cli::OnExit::Keep;
    let network = network_settings(&args.host, args.egress_dns, &args.egress_extra_ca)?;
    close_to_guests(args)?;
    let vmm = vmm::QemuVmm::new(config, vmm::ImageSet::from_env()?)
        .await
        .context("starting the VMM driver")?;

    let control = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // A wrong --public-component fails the start here, before any VM is made.
    if let Some(component) = &args.public_component {
        if !component.is_file() {
            bail!(
                "--public-component {}: no such file; deploy/build-component.sh builds the component and prints its path",
                component.display()
            );
        }
    }
    let mut control_socket = match &args.control_socket {
        Some(path) => Some(control_socket::ControlSocket::bind(path)?),
        None => None,
    };
    let data = tokio::net::TcpListener::bind(edge_listen)
        .await
        .with_context(|| format!("binding {edge_listen}"))?;
    let preview_listen = &args.preview_listen;
    let preview_listener = tokio::net::TcpListener::bind(preview_listen)
        .await
        .with_context(|| format!("binding {preview_listen}"))?;
    // Browsers resolve every *.localhost name to loopback: no DNS needed locally.
    let preview_domain = match given(&args.preview_domain) {
        Some(domain) => domain.to_string(),
        None => format!("localhost:{}", preview_listener.local_addr()?.port()),
    };
    let templates_dir = args
        .templates_dir
        .clone()
        .unwrap_or_else(|| dir.join("templates"));
    std::fs::create_dir_all(&templates_dir)
        .with_context(|| format!("creating {}", templates_dir.display()))?;
    // A directory of our own under the one given: the cache's pruning removes what it
    // does not know, which must never be an operator's files (a mount point, say).
    let build_cache_dir = match &args.build_cache_dir {
        Some(d) => {
            let d = d.join("nullspace-build-cache");
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let d = d
                .canonicalize()
                .with_context(|| format!("resolving {}", d.display()))?;
            anyhow::ensure!(
                !dir.starts_with(&d),
                "--build-cache-dir {} holds the state directory {}: give a directory of its own",
                d.display(),
                dir.display()
            );
            vmm::qemu::check_vm_user_can_reach(&d).map_err(|e| anyhow::anyhow!("{e}"))?;
            d
        }
        None => dir.join("build-cache"),
    };
    for d in [&dir, &templates_dir] {
        vmm::qemu::check_vm_user_can_reach(d).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // What other hosts and clients reach this one at (its listeners' ports on the
    // address it advertises; the bound address by default).
    let advertised = given(&args.advertise_host);
    let advertise = |addr: std::net::SocketAddr| match advertised {
        None => format!("http://{addr}"),
        Some(h) => format!("http://{h}:{}", addr.port()),
    };
    if advertised.is_none() {
        if let Some(any) = [
            control.local_addr()?,
            data.local_addr()?,
            preview_listener.local_addr()?,
        ]
        .into_iter()
        .find(|a| a.ip().is_unspecified())
        {
            // What a host registers and hands clients must be somewhere to connect to.
            if shared_catalog {
                bail!(
                    "this host listens on {any} and shares its catalog: other hosts and clients cannot reach {}; pass --advertise-host ADDR (this host's address on their network)",
                    any.ip()
                );
            }
            tracing::warn!(
                "listening on {any} without --advertise-host: runtime URLs name {}, which clients cannot reach; pass --advertise-host ADDR",
                any.ip()
            );
        }
    }
    if shared_catalog && advertised.is_none() && control.local_addr()?.ip().is_loopback() {
        // Other hosts forward to what this one registers: loopback works only when
        // every host runs on this machine (tests, deploy/cluster.sh gives each its own).
        tracing::warn!(
            "this host shares its catalog but registers loopback addresses (http://{}): other machines cannot reach it; pass --advertise-host ADDR and listen on it",
            control.local_addr()?
        );
    }
    // The data plane clients are sent to (a sandbox's runtime URL): where other hosts
    // reach this one is where clients do too.
    let edge_url = advertise(data.local_addr()?);
    let (cpus, mem_mib, disk_mib) = cluster::hosts::capacity(&dir);
    let vcpus = args.capacity_vcpus.unwrap_or(cpus);
    let snapshots = snapshot_settings(args, &dir).await?;
    let host_info = catalog::HostInfo {
        id: host.clone(),
        control_url: match &args.advertise_control_url {
            Some(url) => url.clone(),
            None => advertise(control.local_addr()?),
        },
        edge_url: advertise(data.local_addr()?),
        preview_url: advertise(preview_listener.local_addr()?),
        vcpus,
        mem_mib,
        disk_mib,
        qemu: vmm.qemu_version().to_string(),
        accel: format!("{:?}", vmm.accel().accel).to_lowercase(),
        image_set: vmm.images().key(),
        region: given(&args.region).map(str::to_string),
        store: Some(snapshots.store.identity()),
    };
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
            default_quota: args.max_sandboxes_per_team,
            deleted_retention_s: args.deleted_retention_s,
            snapshots,
            preview_domain: preview_domain.clone(),
            network,
            region: given(&args.region).map(str::to_string),
            workspace_templates: args.workspace_templates.clone(),
            build_cache_dir,
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
    for pool in &args.warm_pool {
        let body = api_model::WarmPoolBody {
            size: pool.size,
            resources: None,
            refill: None,
        };
        if args.workspace_templates.0.contains(&pool.template.as_str()) {
            // Set once the template is built (in the background).
            manager.defer_workspace_pool(&pool.template, body);
            continue;
        }
        // The host's own command line speaks for the operator.
        manager
            .set_warm_pool(sandboxes::Actor::Operator, &pool.template, body)
            .await
            .map_err(|e| anyhow::anyhow!("--warm-pool {}: {}", pool.spec, e.message))?;
    }
    tokio::spawn(manager.clone().refill_warm_pools());
    // After the reconcile (which failed the builds a stop cut short) and never in
    // the way of serving: base and minimal serve at once.
    tokio::spawn(manager.clone().build_workspace_templates());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Replies go out as they are written, not held for Nagle's algorithm: a streamed
    // answer (a file, a forwarded reply) otherwise waits out the peer's delayed ACK,
    // ~40 ms.
    use axum::serve::ListenerExt;
    let no_delay = |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    };
    let control_addr = control.local_addr()?;
    let control_server = axum::serve(control.tap_io(no_delay), api::router(manager.clone()))
        .with_graceful_shutdown(wait_stop(stop_rx.clone()));
    let edge_server = axum::serve(
        data.tap_io(no_delay),
        edge::router(manager.clone(), tokens.clone()),
    )
    .with_graceful_shutdown(wait_stop(stop_rx.clone()));
    let socket_listener = control_socket
        .as_mut()
        .and_then(control_socket::ControlSocket::take_listener);
    let socket_router = api::router(manager.clone());
    let socket_stop = wait_stop(stop_rx.clone());
    let socket_server = async move {
        match socket_listener {
            Some(listener) => {
                axum::serve(listener, socket_router)
                    .with_graceful_shutdown(socket_stop)
                    .await
            }
            None => Ok(()),
        }
    };
    let public_api = match (&args.public_listen, &args.public_component) {
        (Some(listen), Some(component)) => Some(public_api::PublicApi::bind(
            manager.clone(),
            listen,
            component,
            args.public_threads as usize,
        )?),
        // clap refuses one without the other.
        _ => None,
    };
    let public_note = match &public_api {
        Some(api) => format!(" , public API http://{}", api.local_addr()?),
        None => String::new(),
    };
    // Dashboard links and the data plane's CORS name the public API's origin: the
    // operator's, else the one this process serves, else a separate API host's default.
    match (&args.public_url, &public_api) {
        (Some(url), _) => manager.set_public_url(url),
        (None, Some(api)) => {
            let addr = api.local_addr()?;
            if addr.ip().is_unspecified() && advertised.is_none() {
                // A browser cannot open 0.0.0.0: name where it reaches this host.
                tracing::warn!(
                    "the public API listens on {addr} without --public-url or --advertise-host: dashboard links name 127.0.0.1; pass --public-url URL (the address browsers use)"
                );
                manager.set_public_url(&format!("http://127.0.0.1:{}", addr.port()));
            } else {
                manager.set_public_url(&advertise(addr));
            }
        }
        (None, None) => {}
    }
    let public_stop = stop_rx.clone();
    let public_server = async move {
        match public_api {
            Some(api) => api.serve(public_stop).await.map_err(std::io::Error::other),
            None => Ok(()),
        }
    };
    let previews = std::sync::Arc::new(preview::Previews {
        manager: manager.clone(),
        tokens,
        domain: preview_domain.clone(),
    });
    let preview_addr = preview_listener.local_addr()?;
    let preview_server = axum::serve(preview_listener.tap_io(no_delay), preview::router(previews))
        .with_graceful_shutdown(wait_stop(stop_rx));
    // Listened for before the line that says the daemon is up: a SIGTERM sent as soon
    // as a supervisor (or a test) reads it would otherwise land between tokio taking
    // the signal and a stream hearing it, and be lost.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let socket_note = match &control_socket {
        Some(socket) => format!(" , control socket unix:{}", socket.path().display()),
        None => String::new(),
    };
    eprintln!(
        "nullspace-pool-manager: control API http://{} , data plane {edge_url} , previews http://{preview_domain} , preview listener http://{preview_addr}{socket_note}{public_note} , state {}",
        control_addr,
        dir.display()
    );
    let mut servers = tokio::spawn(async move {
        tokio::try_join!(
            control_server,
            edge_server,
            preview_server,
            socket_server,
            public_server
        )
    });

    let fatal = tokio::select! {
        _ = term.recv() => None,
        _ = interrupt.recv() => None,
        // Dropped unsent (the templates were made): this branch just never fires.
        Ok(why) = &mut fatal_rx => Some(why),
        // A listener that stops on its own takes the others with it (try_join): the
        // daemon must not stay up serving nothing.
        ended = &mut servers => Some(match ended {
            Ok(Ok(_)) => "the listeners stopped on their own".to_string(),
            Ok(Err(e)) => format!("a listener failed: {e}"),
            Err(e) => format!("a listener ended abnormally: {e}"),
        }),
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
    if !servers.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), servers).await;
    }
    match fatal {
        Some(why) => bail!("{why}; run `nullspace-pool-manager check`"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_info(id: &str) -> catalog::HostInfo {
        catalog::HostInfo {
            id: id.to_string(),
            control_url: "http://127.0.0.1:1".into(),
            edge_url: "http://127.0.0.1:2".into(),
            preview_url: "http://127.0.0.1:3".into(),
            vcpus: 2,
            mem_mib: 1024,
            disk_mib: 1024,
            qemu: "test".into(),
            accel: "tcg".into(),
            image_set: "test".into(),
            region: None,
            store: None,
        }
    }

    #[tokio::test]
    async fn drain_wait_returns_once_drained_and_says_why_it_gave_up() {
        let dir = std::env::temp_dir().join(format!(
            "nullspace-drain-wait-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("catalog.db");
        let catalog = catalog::Catalog::open(&path).unwrap();
        catalog.register_host(&host_info("host-a")).unwrap();
        set_host_state(&catalog, "host-a", "draining").unwrap();
        // The host's drain finishing a moment later.
        let other = catalog::Catalog::open(&path).unwrap();
        let finish = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            other.set_host_state("host-a", "drained").unwrap();
        });
        wait_drained(&catalog, "host-a", 30).await.unwrap();
        finish.await.unwrap();

        set_host_state(&catalog, "host-a", "draining").unwrap();
        let e = wait_drained(&catalog, "host-a", 1).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("still draining after 1 s (0 sandbox(es) still on it)"),
            "{e}"
        );
        set_host_state(&catalog, "host-a", "ready").unwrap();
        let e = wait_drained(&catalog, "host-a", 5).await.unwrap_err();
        assert!(e.to_string().contains("was undrained"), "{e}");
        assert!(set_host_state(&catalog, "host-b", "draining").is_err());
        drop(catalog);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
