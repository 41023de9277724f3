//! `nullspace`: sandboxes from the command line, through the public API.
//!
//! Reads `NULLSPACE_API_URL` / `NULLSPACE_API_KEY`, or the dev stack's
//! `~/.local/state/nullspace/dev.env`; `--api-key` and `--domain` override. Human output
//! by default, `--json` for scripts.

mod playback;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use nullspace::{
    ConnectionConfig, CreateOptions, ListQuery, RestoreOptions, RunOptions, Sandbox, SandboxInfo,
    SnapshotInfo,
};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "nullspace",
    version,
    about = "Nullspace sandboxes from the command line"
)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// API key (default: NULLSPACE_API_KEY, then the dev stack's dev.env).
    #[arg(long, global = true)]
    api_key: Option<String>,
    /// API address, `host:port` or a URL (default: NULLSPACE_API_URL).
    #[arg(long, global = true)]
    domain: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, global = true)]
    request_timeout: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect and manage sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Templates and their warm pools.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Durable volumes (mount one with `sandbox create --mount PATH=VOLUME`).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Run a command in a sandbox; output streams, the exit code is the command's.
    Exec {
        /// Sandbox ID.
        id: String,
        /// Working directory in the sandbox.
        #[arg(long)]
        cwd: Option<String>,
        /// User in the sandbox.
        #[arg(long)]
        user: Option<String>,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = key_value)]
        envs: Vec<(String, String)>,
        /// The command (run by /bin/sh -c; quote it or put it after --).
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Copy files to or from a sandbox: `nullspace cp ./a ID:/workspace/a`, or back.
    Cp {
        /// Source: a local path or ID:path.
        from: String,
        /// Destination: a local path or ID:path.
        to: String,
    },
    /// Teams, keys and quotas (runs `nullspace-pool-manager admin` on this host's state).
    Admin {
        /// The pool manager's state directory.
        #[arg(long, default_value = "/var/lib/nullspace")]
        state_dir: String,
        /// `team create NAME [--set LIMIT=N ...]`, `team quota NAME [--set LIMIT=N ...]`,
        /// `team list`, `key create (--team NAME | --operator)`, `key list [--team NAME]`,
        /// `key rotate KEY_ID [--grace-s N]`, `key revoke KEY_ID`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and print its ID.
    Create(Box<CreateArgs>),
    /// List the team's sandboxes.
    List {
        /// Only these states (comma-separated: starting,running,paused,deleted,error).
        #[arg(long)]
        state: Option<String>,
        /// Only sandboxes with this label, KEY=VALUE (repeatable).
        #[arg(long = "metadata", value_parser = key_value)]
        metadata: Vec<(String, String)>,
        /// Page size, 1 to 100.
        #[arg(long)]
        limit: Option<u32>,
        /// Token of the next page (printed after a full page).
        #[arg(long)]
        next_token: Option<String>,
        /// Print compact JSON with only these fields (comma-separated): view names
        /// (sandboxID, state, metadata, expiresAt, ...) or the seeds' id and status.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
    },
    /// Describe a sandbox (never wakes a paused one).
    Info {
        id: String,
        /// Print compact JSON with only these fields (comma-separated), e.g. id,status.
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
    },
    /// Wait until a sandbox is running (one created with --no-wait-ready); exits 1 if it
    /// fails or the timeout passes.
    WaitReady {
        id: String,
        /// Seconds to wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// The host name a port is served under (<port>-<sandbox>.<preview domain>).
    Host { id: String, port: u16 },
    /// Connect: resume if paused, optionally set the timeout, print data-plane access.
    Connect {
        id: String,
        /// New timeout in seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Pause a sandbox (memory and disk kept).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// End a sandbox.
    Kill { id: String },
    /// Set a sandbox's timeout, seconds from now.
    Timeout { id: String, seconds: u64 },
    /// Extend a sandbox's life (default: by its timeout).
    Refresh {
        id: String,
        /// Seconds from now.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Pause into object storage: resumable (and restorable) on any worker.
    Hibernate { id: String },
    /// Move a running sandbox to another host without stopping it (operator key).
    Migrate {
        id: String,
        /// The destination host's ID (default: placement chooses).
        #[arg(long)]
        host: Option<String>,
        /// Never switch to post-copy (a copy that does not converge then fails, and
        /// the sandbox runs on where it was).
        #[arg(long, conflicts_with = "postcopy_after_ms")]
        precopy_only: bool,
        /// Switch to post-copy if pre-copy has not converged after this many ms
        /// (default 20000; 0: at once).
        #[arg(long)]
        postcopy_after_ms: Option<u64>,
    },
    /// Replace a sandbox's egress policy (applies at once; no flags: everything open).
    Egress {
        id: String,
        #[command(flatten)]
        egress: EgressArgs,
    },
    /// An interactive shell in the sandbox (a terminal; resizes follow this one). Exits
    /// with the shell's exit code.
    Shell { id: String },
    /// Connects stdin/stdout to a TCP port inside the sandbox, e.g. for SSH:
    /// `ssh -o ProxyCommand='nullspace sandbox proxy %h 22' user@SANDBOX_ID`.
    Proxy { id: String, port: u16 },
    /// A signed preview URL for a port (--public / --private first changes its access).
    Preview {
        id: String,
        port: u16,
        #[arg(long, conflicts_with = "private")]
        public: bool,
        #[arg(long)]
        private: bool,
    },
    /// The viewer of a desktop sandbox (template `desktop`): a signed preview URL of its
    /// noVNC page, interactive (or --view-only).
    Desktop {
        id: String,
        #[arg(long)]
        view_only: bool,
    },
    /// Its logs: boot console, lifecycle events, the diagnostic of a failure, and the
    /// output of the template's start command and background commands.
    Logs {
        id: String,
        /// The line to start at (a page's next).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// At most this many lines (1 to 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The audit of a sandbox with a security policy: one record per HTTP request its
    /// guest made (time method host path status action detections). One page, or every
    /// record and then new ones as they come with --follow (until Ctrl-C).
    Audit {
        id: String,
        /// Only records after this ID (a page's next).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many records (1 to 1000; default 100).
        #[arg(long, conflicts_with = "follow", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Keep printing new records, asking every second, until Ctrl-C (with --json: one
        /// record per line).
        #[arg(long, short)]
        follow: bool,
    },
    /// Show a sandbox's security policy, or replace it (applies at once) with --file: a
    /// JSON policy {pii, injectionDefense, transforms, audit, envMasking}.
    SecurityPolicy {
        id: String,
        /// The new policy, a JSON file (`-`: standard input).
        #[arg(long, short)]
        file: Option<std::path::PathBuf>,
    },
    /// The recordings of a sandbox created with --recording (also after it ended).
    Recordings { id: String },
    /// Play a recording back: a terminal session at its own pace (--speed), or the
    /// transcript of its commands.
    Play {
        id: String,
        recording: String,
        /// Playback speed (2: twice as fast; 0: no pauses).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// A URL that downloads (or with --put uploads) one file with no credential until it
    /// expires.
    Presign {
        id: String,
        path: String,
        /// An upload URL (PUT) instead of a download URL (GET).
        #[arg(long)]
        put: bool,
        /// Seconds it stays valid (1 to 86400).
        #[arg(long, default_value_t = 3600)]
        expires: u64,
    },
    /// Resource samples (CPU, memory, disk, network, tasks) since the sandbox was
    /// created, or from --start to --end.
    Metrics {
        id: String,
        /// From (RFC 3339 such as 2025-01-31T12:00:00Z, or Unix seconds; default: its
        /// creation).
        #[arg(long, value_parser = metrics_time)]
        start: Option<nullspace::MetricsTime>,
        /// Until (RFC 3339 or Unix seconds; default: now).
        #[arg(long, value_parser = metrics_time)]
        end: Option<nullspace::MetricsTime>,
    },
    /// Take a manual snapshot (kept after kill; its ID works as a --template).
    Snapshot {
        id: String,
        /// A name for it, unique in the team (then `create --snapshot-name NAME`).
        #[arg(long)]
        name: Option<String>,
    },
    /// List a sandbox's snapshots, newest first (also after it was killed).
    Snapshots { id: String },
    /// Delete one of a sandbox's snapshots.
    DeleteSnapshot { id: String, snapshot_id: String },
    /// Start a new sandbox from a snapshot of ID (default the newest: pause, then
    /// periodic, then manual) and print the new sandbox's ID.
    Restore {
        id: String,
        /// The snapshot to restore.
        #[arg(long)]
        snapshot: Option<String>,
        /// Lifetime of the new sandbox in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// What it does with the original's read-write volumes: readonly (the same
        /// volume, read-only) or copy (a new volume of its content)
        #[arg(long, value_name = "readonly|copy", value_parser = volumes_arg)]
        volumes: Option<nullspace::InheritVolumes>,
    },
    /// Branch a running sandbox into COUNT children; print their IDs.
    Fork {
        id: String,
        /// How many children.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// What the children do with its read-write volumes: readonly (the same volume,
        /// read-only: a write fails with EROFS) or copy (each a new volume of its content)
        #[arg(long, value_name = "readonly|copy", default_value = "readonly", value_parser = volumes_arg)]
        volumes: nullspace::InheritVolumes,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create an empty volume and print its ID.
    Create {
        /// A name, unique in the team (usable wherever the ID is).
        #[arg(long)]
        name: Option<String>,
        /// Capacity in MiB (16 to 1048576; default 1024).
        #[arg(long)]
        size_mib: Option<u64>,
    },
    /// List the team's volumes.
    List,
    /// Describe a volume: size, saved version, who holds it.
    Get { id: String },
    /// Delete a volume and its content (refused while a sandbox holds it).
    Delete { id: String },
}

/// `--no-internet`, `--allow`, `--deny`: an egress policy.
#[derive(Args, Clone)]
struct EgressArgs {
    /// Deny every destination no --allow names.
    #[arg(long)]
    no_internet: bool,
    /// A reachable destination: IP, CIDR, domain or *.domain (repeatable).
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// An unreachable destination: IP, CIDR, domain or *.domain (repeatable).
    #[arg(long = "deny")]
    deny: Vec<String>,
}

impl EgressArgs {
    fn given(&self) -> bool {
        self.no_internet || !self.allow.is_empty() || !self.deny.is_empty()
    }

    fn policy(&self) -> nullspace::EgressPolicy {
        nullspace::EgressPolicy {
            internet: !self.no_internet,
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }
}

/// `PATH=VOLUME[:ro|:rw]`.
fn volumes_arg(s: &str) -> Result<nullspace::InheritVolumes, String> {
    match s {
        "readonly" => Ok(nullspace::InheritVolumes::Readonly),
        "copy" => Ok(nullspace::InheritVolumes::Copy),
        _ => Err(format!(
            "{s:?}: send readonly (the same volume, read-only) or copy (a new volume of its content)"
        )),
    }
}

fn mount_arg(s: &str) -> Result<(String, String, nullspace::MountMode), String> {
    let (path, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: send PATH=VOLUME[:ro|:rw], e.g. /mnt/work=my-volume"))?;
    let (volume, mode) = match rest.rsplit_once(':') {
        Some((v, "ro")) => (v, nullspace::MountMode::Ro),
        Some((v, "rw")) => (v, nullspace::MountMode::Rw),
        _ => (rest, nullspace::MountMode::Rw),
    };
    Ok((path.to_string(), volume.to_string(), mode))
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build a template from a base and steps, streaming the build log; exits 1 if the
    /// build fails (saying which step and why).
    Build(BuildArgs),
    /// The built-in templates and the team's own.
    List,
    /// A template: status, steps, and for a failed build which step failed and why.
    Get {
        /// Template ID (tpl-…) or name.
        template: String,
    },
    /// Print a build's log (to its end with --follow).
    Logs {
        template: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Delete a template (cancels its build if it runs).
    Delete { template: String },
    /// Show a template's warm pool, or set it with --size.
    WarmPool {
        /// A built-in template (base, minimal) or a template ID (tpl-…).
        template: String,
        /// Ready instances to keep (0 to 16; 0 empties the pool).
        #[arg(long)]
        size: Option<u32>,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Do not refill in the background.
        #[arg(long)]
        no_refill: bool,
    },
}

/// A shape: vCPUs, memory and disk (the seeds' cpu, memory_mb and disk_mb).
#[derive(Args)]
struct ShapeArgs {
    /// vCPUs (with --memory-mib and --disk-mib; defaults 2, 2048, 8192).
    #[arg(long, visible_alias = "cpu")]
    vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long, visible_alias = "memory-mb")]
    memory_mib: Option<u32>,
    /// Disk in MiB.
    #[arg(long, visible_alias = "disk-mb")]
    disk_mib: Option<u64>,
}

impl ShapeArgs {
    /// The shape the flags give, if any was given (the others at their defaults).
    fn resources(&self) -> Option<nullspace::Resources> {
        shape(self.vcpus, self.memory_mib, self.disk_mib)
    }
}

#[derive(Args)]
struct BuildArgs {
    /// A JSON build request (the body of POST /api/v1/templates); flags add to it.
    #[arg(long, short)]
    file: Option<std::path::PathBuf>,
    /// Name, unique within the team, usable as a template ID.
    #[arg(long)]
    name: Option<String>,
    /// Base: base, minimal, or one of your templates.
    #[arg(long)]
    from: Option<String>,
    /// A step, in order (repeatable): run:COMMAND, packages:PKG[,PKG…], env:KEY=VALUE,
    /// copy:LOCAL_PATH:GUEST_PATH.
    #[arg(long = "step", value_parser = build_step)]
    steps: Vec<nullspace::BuildStep>,
    /// A long-running process its sandboxes start with.
    #[arg(long)]
    start: Option<String>,
    /// A command that exits 0 once the template is ready.
    #[arg(long)]
    ready: Option<String>,
    /// Seconds the ready check may take (default 60).
    #[arg(long)]
    ready_timeout: Option<u64>,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Start the build and print the template without following it.
    #[arg(long)]
    no_wait: bool,
}

/// A `--step` value as a build step.
fn build_step(s: &str) -> Result<nullspace::BuildStep, String> {
    let (kind, rest) = s.split_once(':').ok_or_else(|| {
        format!("{s:?}: send run:COMMAND, packages:PKG,…, env:KEY=VALUE or copy:LOCAL:GUEST")
    })?;
    match kind {
        "run" => Ok(nullspace::BuildStep::run(rest)),
        "packages" => Ok(nullspace::BuildStep::packages(
            rest.split(',').map(str::trim),
        )),
        "env" => key_value(rest).map(|kv| nullspace::BuildStep::env([kv])),
        "copy" => {
            let (local, guest) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: send copy:LOCAL_PATH:GUEST_PATH"))?;
            let content = std::fs::read_to_string(local)
                .map_err(|e| format!("reading {local}: {e} (copy takes UTF-8 text files)"))?;
            Ok(nullspace::BuildStep::file(guest, content))
        }
        other => Err(format!(
            "unknown step kind {other:?}; send run:, packages:, env: or copy:"
        )),
    }
}

/// The build request the flags describe.
fn build_request(a: &BuildArgs) -> anyhow::Result<nullspace::TemplateBuild> {
    let mut r: nullspace::TemplateBuild = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a template build request", path.display()))?
        }
        None => nullspace::TemplateBuild::default(),
    };
    r.steps.extend(a.steps.iter().cloned());
    let set = |field: &mut Option<String>, v: &Option<String>| {
        if v.is_some() {
            *field = v.clone();
        }
    };
    set(&mut r.name, &a.name);
    set(&mut r.start_cmd, &a.start);
    set(&mut r.ready_cmd, &a.ready);
    if let Some(from) = &a.from {
        r.from = from.clone();
    }
    if a.ready_timeout.is_some() {
        r.ready_timeout = a.ready_timeout;
    }
    if let Some(res) = a.shape.resources() {
        r.resources = Some(res);
    }
    Ok(r)
}

fn print_log_line(l: &nullspace::BuildLogLine) {
    let step = l
        .step
        .map(|s| format!("step {s}"))
        .unwrap_or_else(|| "build".into());
    match l.stream.as_str() {
        "stderr" => eprintln!("[{step}] {}", l.text),
        _ => println!("[{step}] {}", l.text),
    }
}

fn show_template(t: &nullspace::Template, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(t).unwrap());
        return;
    }
    let status = serde_json::to_value(t.status).unwrap();
    println!(
        "{}{}  {}  from {}",
        t.template_id,
        t.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        status.as_str().unwrap_or_default(),
        t.from
    );
    for s in &t.steps {
        let status = serde_json::to_value(s.status).unwrap();
        println!(
            "  {:>2} {:<8} {:<8} {}",
            s.index,
            s.kind,
            status.as_str().unwrap_or_default(),
            s.summary
        );
    }
    if let Some(e) = &t.error {
        println!("  failed ({}): {}", e.phase, e.message);
        if !e.output_tail.is_empty() {
            println!("  output:\n    {}", e.output_tail.replace('\n', "\n    "));
        }
        println!("  what to do: {}", e.action);
    }
}

#[derive(Args)]
struct CreateArgs {
    /// Template to boot (default: base).
    #[arg(long, short, conflicts_with_all = ["image_name", "snapshot_name"])]
    template: Option<String>,
    /// Start from a template by name (seed 002's imageName).
    #[arg(long, conflicts_with = "snapshot_name")]
    image_name: Option<String>,
    /// With --image-name: the template ID it must be (a rebuilt name is refused).
    #[arg(long, requires = "image_name")]
    image_id: Option<String>,
    /// Start from a snapshot by the name it was given (seed 002's snapshotName; name
    /// one with `sandbox snapshot ID --name NAME`).
    #[arg(long)]
    snapshot_name: Option<String>,
    /// With --snapshot-name: the snapshot ID it must be.
    #[arg(long, requires = "snapshot_name")]
    snapshot_id: Option<String>,
    /// A region the operator configured.
    #[arg(long)]
    region: Option<String>,
    /// Record every command and terminal session (list with `sandbox recordings ID`,
    /// play with `sandbox play ID RECORDING`).
    #[arg(long)]
    recording: bool,
    /// Apply the timeout action after N seconds without SDK calls, preview traffic or a
    /// running foreground command (5 to 604800).
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<u64>,
    /// Lifetime in seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Label, KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Environment of every command, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = key_value)]
    envs: Vec<(String, String)>,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Pause instead of killing when the timeout passes.
    #[arg(long, conflicts_with = "hibernate_on_timeout")]
    pause_on_timeout: bool,
    /// Hibernate (pause into object storage) when the timeout passes.
    #[arg(long)]
    hibernate_on_timeout: bool,
    /// What the timeout does: kill, pause or hibernate (seed 004's on_timeout).
    #[arg(long, value_parser = on_timeout, conflicts_with_all = ["pause_on_timeout", "hibernate_on_timeout"])]
    on_timeout: Option<nullspace::OnTimeout>,
    /// Preview traffic wakes the sandbox once paused (with --on-timeout pause or
    /// hibernate).
    #[arg(long)]
    auto_resume: bool,
    /// Take a periodic snapshot every N seconds (10 to 86400; 0: off).
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Check out a ready instance of the template's warm pool: require (fail when none
    /// is ready) or prefer (fall back to a normal create).
    #[arg(long, value_parser = ["require", "prefer"])]
    warm_pool: Option<String>,
    /// The seeds' name of --warm-pool.
    #[arg(long, value_parser = ["require", "prefer"], conflicts_with = "warm_pool")]
    warm_pool_mode: Option<String>,
    /// Answer while the sandbox is still starting (then `sandbox wait-ready ID`).
    #[arg(long)]
    no_wait_ready: bool,
    #[command(flatten)]
    egress: EgressArgs,
    /// false: no outbound traffic at all (seed 001's allow_internet_access).
    #[arg(long, value_name = "true|false")]
    allow_internet_access: Option<bool>,
    /// A destination reachable even when --deny-out blocks everything: IP, CIDR, domain
    /// or *.domain (repeatable; seed 001's network.allow_out).
    #[arg(long, conflicts_with_all = ["no_internet", "allow", "deny"])]
    allow_out: Vec<String>,
    /// An unreachable destination (repeatable); 0.0.0.0/0 blocks all traffic but
    /// --allow-out (seed 001's network.deny_out).
    #[arg(long, conflicts_with_all = ["no_internet", "allow", "deny"])]
    deny_out: Vec<String>,
    /// true: the TLS-intercepting security proxy, with the audit only (seed 001's
    /// secure); false: none.
    #[arg(long, value_name = "true|false")]
    secure: Option<bool>,
    /// The security proxy's policy, a JSON file (`-`: standard input): {pii,
    /// injectionDefense, transforms, audit, envMasking}. A masked secret's real value
    /// goes in --env under the same name; the guest only sees a placeholder.
    #[arg(long, value_name = "FILE")]
    security_policy: Option<std::path::PathBuf>,
    /// Mount a volume, PATH=VOLUME[:ro|:rw] (repeatable; default rw).
    #[arg(long = "mount", value_parser = mount_arg)]
    mounts: Vec<(String, String, nullspace::MountMode)>,
}

/// `--vcpus`/`--memory-mib`/`--disk-mib`: none given, the server's default; any
/// given, the rest from the default shape.
fn shape(
    vcpus: Option<u32>,
    mem_mib: Option<u32>,
    disk_mib: Option<u64>,
) -> Option<nullspace::Resources> {
    let default = nullspace::Resources::default();
    (vcpus.is_some() || mem_mib.is_some() || disk_mib.is_some()).then(|| nullspace::Resources {
        vcpus: vcpus.unwrap_or(default.vcpus),
        mem_mib: mem_mib.unwrap_or(default.mem_mib),
        disk_mib: disk_mib.unwrap_or(default.disk_mib),
    })
}

fn show_snapshots(list: &[SnapshotInfo], json: bool) {
    if json {
        let items: Vec<_> = list.iter().map(snapshot_json).collect();
        println!("{}", serde_json::json!({ "snapshots": items }));
        return;
    }
    println!(
        "{:<40} {:<9} {:<7} {:>10} {:<26}",
        "SNAPSHOT", "KIND", "STORAGE", "SIZE MiB", "CREATED"
    );
    for s in list {
        println!(
            "{:<40} {:<9} {:<7} {:>10.1} {:<26}",
            s.snapshot_id,
            s.kind,
            s.storage,
            s.size_bytes as f64 / 1048576.0,
            s.created_at
        );
    }
}

fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "snapshotID": s.snapshot_id, "sandboxID": s.sandbox_id, "templateID": s.template_id,
        "kind": s.kind, "createdAt": s.created_at, "sizeBytes": s.size_bytes,
        "storedBytes": s.stored_bytes, "storage": s.storage, "name": s.name,
    })
}

/// A security policy from a JSON file, or standard input for `-`.
fn read_policy(path: &Path) -> anyhow::Result<nullspace::SecurityPolicy> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the policy from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let body: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not JSON; send a security policy such as {{\"pii\": {{\"detectors\": {{\"email\": \"redact\"}}}}}}",
            path.display()
        )
    })?;
    Ok(nullspace::SecurityPolicy::from_body(body)?)
}

/// An audit record for people: time method host path status action detections.
fn audit_line(r: &nullspace::AuditRecord) -> String {
    let detections = if r.detections.is_empty() {
        "-".to_string()
    } else {
        r.detections
            .iter()
            .map(|d| format!("{}@{}:{}", d.kind, d.location, d.action))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{} {} {} {} {} {} {}",
        r.time, r.method, r.host, r.path, r.status, r.action, detections
    )
}

fn print_audit_record(r: &nullspace::AuditRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap());
    } else {
        println!("{}", audit_line(r));
    }
}

/// `--on-timeout` value.
fn on_timeout(s: &str) -> Result<nullspace::OnTimeout, String> {
    match s {
        "kill" => Ok(nullspace::OnTimeout::Kill),
        "pause" => Ok(nullspace::OnTimeout::Pause),
        "hibernate" => Ok(nullspace::OnTimeout::Hibernate),
        other => Err(format!("{other:?}: send kill, pause or hibernate")),
    }
}

/// `--start`/`--end` value: RFC 3339 or Unix seconds.
fn metrics_time(s: &str) -> Result<nullspace::MetricsTime, String> {
    s.parse().map_err(|e: nullspace::Error| e.to_string())
}

fn warm_pool_mode(s: &str) -> nullspace::WarmPoolMode {
    match s {
        "require" => nullspace::WarmPoolMode::Require,
        _ => nullspace::WarmPoolMode::Prefer,
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// The terminal's size (columns, rows), if stdout is one.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: a zeroed winsize is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Puts the local terminal in raw mode until dropped (keystrokes go straight to the
/// sandbox's terminal, which echoes).
struct RawMode(libc::termios);

impl RawMode {
    fn enable() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios calls on stdin with valid pointers.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
            Some(Self(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enable`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

/// An interactive shell; returns its exit code.
async fn shell(config: &ConnectionConfig, id: &str) -> anyhow::Result<i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sbx = Sandbox::attach(config, id).await?;
    let (cols, rows) = terminal_size().unwrap_or((80, 24));
    let mut pty = sbx.pty(cols, rows).await?;
    let raw = RawMode::enable();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    let code = loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n? {
                // Input ended (a pipe): the shell reads EOF as the end of its input.
                0 => {
                    stdin_open = false;
                    pty.send(&[4]).await?;
                }
                n => pty.send(&buf[..n]).await?,
            },
            event = pty.next() => match event {
                Some(Ok(nullspace::PtyEvent::Output(b))) => {
                    stdout.write_all(&b).await?;
                    stdout.flush().await?;
                }
                Some(Ok(nullspace::PtyEvent::Exit { exit_code, signal })) => {
                    break exit_code.unwrap_or(128 + signal.unwrap_or(0));
                }
                Some(Err(e)) => return Err(e.into()),
                None => break 1,
            },
            _ = winch.recv() => {
                if let Some((c, r)) = terminal_size() {
                    pty.resize(c, r).await?;
                }
            }
        }
    };
    drop(raw);
    Ok(code)
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("nullspace: {e:#}");
            std::process::exit(1);
        }
    }
}

fn config(cli: &Cli) -> anyhow::Result<ConnectionConfig> {
    let mut c = match (&cli.api_key, &cli.domain) {
        (Some(key), Some(domain)) => ConnectionConfig::new(domain.as_str(), key.as_str()),
        _ => {
            let mut c = ConnectionConfig::from_env().or_else(|e| {
                cli.api_key
                    .clone()
                    .map(|k| ConnectionConfig::new("http://127.0.0.1:7080", k))
                    .ok_or(e)
            })?;
            if let Some(k) = &cli.api_key {
                c = c.with_api_key(k.as_str());
            }
            if let Some(d) = &cli.domain {
                c = c.with_domain(d);
            }
            c
        }
    };
    if let Some(t) = cli.request_timeout {
        c = c.with_request_timeout(Duration::from_secs(t));
    }
    Ok(c)
}

/// Prints a sandbox: JSON, or a few lines for people.
fn show(info: &SandboxInfo, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(info)).unwrap());
        return;
    }
    println!(
        "{}  {}  template={}  expires={}",
        info.sandbox_id, info.state, info.template_id, info.expires_at
    );
    if let Some(r) = &info.resources {
        println!(
            "  resources: {} vCPU, {} MiB memory, {} MiB disk",
            r.vcpus, r.mem_mib, r.disk_mib
        );
    }
    if !info.metadata.is_empty() {
        let labels: Vec<String> = info
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  metadata: {}", labels.join(" "));
    }
    if let Some(e) = info.egress.as_ref().filter(|e| !e.is_open()) {
        println!(
            "  egress: internet {}{}{}",
            if e.internet { "on" } else { "off" },
            if e.allow.is_empty() {
                String::new()
            } else {
                format!(", allow {}", e.allow.join(" "))
            },
            if e.deny.is_empty() {
                String::new()
            } else {
                format!(", deny {}", e.deny.join(" "))
            },
        );
    }
    for m in &info.mounts {
        println!(
            "  mount: {} = volume {} ({})",
            m.path,
            m.volume,
            m.mode.as_str()
        );
    }
    if let Some(p) = &info.security_policy {
        println!("  security policy: {p}");
    }
    if let Some(d) = &info.diagnostic {
        println!("  diagnostic: {} — {} ({})", d.code, d.message, d.action);
    }
    if let Some(rt) = &info.runtime {
        println!(
            "  data plane: {} (token until {})",
            rt.target.base_url, rt.token_expires_at
        );
    }
}

fn show_volume(v: &nullspace::Volume) {
    println!(
        "{}{}  {} MiB  version {}{}",
        v.volume_id,
        v.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        v.size_mib,
        v.version,
        v.saved_at
            .as_ref()
            .map(|s| format!(" saved {s}"))
            .unwrap_or_default()
    );
    for a in &v.attachments {
        println!(
            "  held by {} at {} ({})",
            a.sandbox_id,
            a.path,
            a.mode.as_str()
        );
    }
}

async fn volume(config: &ConnectionConfig, cmd: &VolumeCommand, json: bool) -> anyhow::Result<()> {
    use nullspace::Volumes;
    let print = |v: &nullspace::Volume| {
        if json {
            println!("{}", serde_json::to_string_pretty(v).unwrap());
        } else {
            show_volume(v);
        }
    };
    match cmd {
        VolumeCommand::Create { name, size_mib } => {
            let v = Volumes::create(config, name.as_deref(), *size_mib).await?;
            if json {
                print(&v);
            } else {
                println!("{}", v.volume_id);
            }
        }
        VolumeCommand::List => {
            let all = Volumes::list(config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all).unwrap());
            } else {
                all.iter().for_each(show_volume);
            }
        }
        VolumeCommand::Get { id } => print(&Volumes::get(config, id).await?),
        VolumeCommand::Delete { id } => Volumes::delete(config, id).await?,
    }
    Ok(())
}

fn to_json(info: &SandboxInfo) -> serde_json::Value {
    serde_json::json!({
        "sandboxID": info.sandbox_id,
        "templateID": info.template_id,
        "state": info.state,
        "resources": info.resources.map(|r| serde_json::json!({"vcpus": r.vcpus, "memMiB": r.mem_mib, "diskSizeMiB": r.disk_mib})),
        "metadata": info.metadata,
        "timeout": info.timeout,
        "createdAt": info.created_at,
        "expiresAt": info.expires_at,
        "runtime": info.runtime.as_ref().map(|r| serde_json::json!({
            "baseUrl": r.target.base_url, "token": r.token, "tokenExpiresAt": r.token_expires_at
        })),
        "egress": info.egress,
        "mounts": info.mounts,
        "securityPolicy": info.security_policy,
    })
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match &cli.command {
        Command::Admin { state_dir, args } => admin(state_dir, args),
        Command::Sandbox(cmd) => {
            let config = config(&cli)?;
            sandbox(&config, cmd, json).await.map(|()| 0)
        }
        Command::Template(TemplateCommand::Build(args)) => {
            let config = config(&cli)?;
            let request = build_request(args)?;
            let t = nullspace::Templates::build(&config, &request).await?;
            if args.no_wait {
                show_template(&t, json);
                return Ok(0);
            }
            if !json {
                eprintln!("building {}", t.template_id);
            }
            let result = nullspace::Templates::wait_built(&config, &t.template_id, |l| {
                if !json {
                    print_log_line(l)
                }
            })
            .await;
            let t = nullspace::Templates::get(&config, &t.template_id).await?;
            show_template(&t, json);
            Ok(if result.is_ok() { 0 } else { 1 })
        }
        Command::Template(TemplateCommand::List) => {
            let config = config(&cli)?;
            let list = nullspace::Templates::list(&config).await?;
            if json {
                println!("{}", serde_json::json!({ "templates": list }));
            } else {
                for t in &list {
                    let status = serde_json::to_value(t.status).unwrap();
                    println!(
                        "{:<22} {:<10} {:<20} from {}",
                        t.template_id,
                        status.as_str().unwrap_or_default(),
                        t.name.clone().unwrap_or_default(),
                        t.from
                    );
                }
            }
            Ok(0)
        }
        Command::Template(TemplateCommand::Get { template }) => {
            let config = config(&cli)?;
            show_template(&nullspace::Templates::get(&config, template).await?, json);
            Ok(0)
        }
        Command::Template(TemplateCommand::Logs { template, follow }) => {
            let config = config(&cli)?;
            let mut after = 0;
            loop {
                let page = nullspace::Templates::logs(
                    &config,
                    template,
                    after,
                    if *follow { 20 } else { 0 },
                )
                .await?;
                for l in &page.lines {
                    if json {
                        println!("{}", serde_json::to_string(l).unwrap());
                    } else {
                        print_log_line(l);
                    }
                }
                after = page.next;
                let more = *follow && page.status == nullspace::TemplateStatus::Building;
                if page.lines.is_empty() && !more {
                    break;
                }
            }
            Ok(0)
        }
        Command::Volume(cmd) => {
            let config = config(&cli)?;
            volume(&config, cmd, json).await.map(|()| 0)
        }
        Command::Template(TemplateCommand::Delete { template }) => {
            let config = config(&cli)?;
            nullspace::Templates::delete(&config, template).await?;
            Ok(0)
        }
        Command::Template(TemplateCommand::WarmPool {
            template,
            size,
            shape,
            no_refill,
        }) => {
            let config = config(&cli)?;
            let pool = match size {
                None => nullspace::Templates::warm_pool(&config, template).await?,
                Some(size) => {
                    let resources = shape.resources();
                    let settings = nullspace::WarmPoolSettings {
                        size: *size,
                        resources,
                        refill: Some(!no_refill),
                    };
                    nullspace::Templates::set_warm_pool(&config, template, &settings).await?
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "templateID": pool.template_id, "target": pool.target, "ready": pool.ready,
                        "warming": pool.warming, "checkouts": pool.checkouts, "misses": pool.misses,
                        "refill": pool.refill, "lastError": pool.last_error,
                    })
                );
            } else {
                println!(
                    "{}: target {} ready {} warming {} checkouts {} misses {}{}",
                    pool.template_id,
                    pool.target,
                    pool.ready,
                    pool.warming,
                    pool.checkouts,
                    pool.misses,
                    if pool.refill { "" } else { " (refill off)" }
                );
                if let Some(e) = &pool.last_error {
                    println!(
                        "  last refill failed at {} ({} in a row, next try in {} s): {}",
                        e.at, e.failures, e.retry_in_s, e.message
                    );
                }
            }
            Ok(0)
        }
        Command::Exec {
            id,
            cwd,
            user,
            envs,
            command,
        } => {
            let config = config(&cli)?;
            let sbx = Sandbox::attach(&config, id).await?;
            let options = RunOptions {
                envs: envs.iter().cloned().collect(),
                cwd: cwd.clone(),
                user: user.clone(),
                on_stdout: Some(Box::new(|s| {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(s.as_bytes());
                    let _ = out.flush();
                })),
                on_stderr: Some(Box::new(|s| {
                    let _ = std::io::stderr().write_all(s.as_bytes());
                })),
                ..RunOptions::default()
            };
            let result = sbx.commands().run_with(&command.join(" "), options).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "exitCode": result.exit_code, "signal": result.signal })
                );
            }
            Ok(result
                .exit_code
                .unwrap_or_else(|| 128 + result.signal.unwrap_or(0)))
        }
        Command::Cp { from, to } => {
            let config = config(&cli)?;
            copy(&config, from, to, json).await.map(|()| 0)
        }
    }
}

async fn sandbox(
    config: &ConnectionConfig,
    cmd: &SandboxCommand,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        SandboxCommand::Create(a) => {
            let mut o = match (&a.image_name, &a.snapshot_name) {
                (Some(name), _) => CreateOptions::image(name, a.image_id.clone()),
                (None, Some(name)) => CreateOptions::snapshot_named(name, a.snapshot_id.clone()),
                (None, None) => CreateOptions::new(a.template.as_deref().unwrap_or("base")),
            };
            o.region = a.region.clone();
            if a.recording {
                o = o.recording(true);
            }
            o.idle_timeout = a.idle_timeout;
            o.timeout = a.timeout;
            o.metadata = a.metadata.iter().cloned().collect();
            o.envs = a.envs.iter().cloned().collect();
            o.resources = a.shape.resources();
            if a.pause_on_timeout {
                o = o.pause_on_timeout();
            }
            if a.hibernate_on_timeout {
                o = o.hibernate_on_timeout();
            }
            o.on_timeout = a.on_timeout.or(o.on_timeout);
            if a.auto_resume {
                o = o.auto_resume(true);
            }
            o.snapshot_interval = a.snapshot_every;
            o.warm_pool = a.warm_pool.as_deref().map(warm_pool_mode);
            o.warm_pool_mode = a.warm_pool_mode.as_deref().map(warm_pool_mode);
            if a.egress.given() {
                o = o.egress(a.egress.policy());
            }
            o.allow_internet_access = a.allow_internet_access;
            if !a.allow_out.is_empty() || !a.deny_out.is_empty() {
                o = o.network(nullspace::SandboxNetworkOpts {
                    allow_out: a.allow_out.clone(),
                    deny_out: a.deny_out.clone(),
                });
            }
            o.secure = a.secure;
            if let Some(path) = &a.security_policy {
                o = o.security_policy(read_policy(path)?);
            }
            if a.no_wait_ready {
                o = o.wait_ready(false);
            }
            for (path, volume, mode) in &a.mounts {
                o = o.mount(path, volume, *mode);
            }
            let progress = std::io::stderr().is_terminal() && !json;
            if progress {
                let from = a
                    .image_name
                    .as_deref()
                    .or(a.snapshot_name.as_deref())
                    .or(a.template.as_deref())
                    .unwrap_or("base");
                eprint!("creating a sandbox from {from} ... ");
            }
            let started = std::time::Instant::now();
            let sbx = Sandbox::create(config, &o).await?;
            if progress {
                let state = if a.no_wait_ready {
                    "started"
                } else {
                    "running"
                };
                eprintln!("{state} in {:.1?}", started.elapsed());
            }
            if json {
                show(&sbx.get_info().await?, true);
            } else {
                println!("{}", sbx.id());
            }
        }
        SandboxCommand::List {
            state,
            metadata,
            limit,
            next_token,
            fields,
        } => {
            let query = ListQuery {
                states: state
                    .iter()
                    .flat_map(|s| s.split(',').map(str::to_string))
                    .collect(),
                metadata: metadata.iter().cloned().collect(),
                limit: *limit,
                next_token: next_token.clone(),
            };
            if !fields.is_empty() {
                let names: Vec<&str> = fields.iter().map(String::as_str).collect();
                let page = Sandbox::list_fields(config, &query, &names).await?;
                println!(
                    "{}",
                    serde_json::json!({ "sandboxes": page.sandboxes, "nextToken": page.next_token })
                );
                return Ok(());
            }
            let page = Sandbox::list(config, &query).await?;
            if json {
                let items: Vec<_> = page.sandboxes.iter().map(to_json).collect();
                println!(
                    "{}",
                    serde_json::json!({ "sandboxes": items, "nextToken": page.next_token })
                );
            } else {
                println!(
                    "{:<26} {:<9} {:<10} {:<26} METADATA",
                    "ID", "STATE", "TEMPLATE", "EXPIRES"
                );
                for s in &page.sandboxes {
                    let labels: Vec<String> =
                        s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "{:<26} {:<9} {:<10} {:<26} {}",
                        s.sandbox_id,
                        s.state,
                        s.template_id,
                        s.expires_at,
                        labels.join(",")
                    );
                }
                if let Some(t) = page.next_token {
                    println!("more: --next-token {t}");
                }
            }
        }
        SandboxCommand::Info { id, fields } if !fields.is_empty() => {
            let names: Vec<&str> = fields.iter().map(String::as_str).collect();
            let view = Sandbox::get_info_by_id_fields(config, id, &names).await?;
            println!("{}", serde_json::Value::Object(view));
        }
        SandboxCommand::Info { id, .. } => show(&Sandbox::get_info_by_id(config, id).await?, json),
        SandboxCommand::WaitReady { id, timeout } => {
            let mut sbx = Sandbox::from_id(config, id)?;
            sbx.wait_ready(Duration::from_secs(*timeout)).await?;
            if json {
                show(&sbx.get_info().await?, true);
            } else {
                println!("{id} is running");
            }
        }
        SandboxCommand::Host { id, port } => {
            let host = Sandbox::from_id(config, id)?.get_host(*port).await?;
            if json {
                println!("{}", serde_json::json!({ "port": port, "host": host }));
            } else {
                println!("{host}");
            }
        }
        SandboxCommand::Connect { id, timeout } => {
            let sbx = Sandbox::connect(config, id, *timeout).await?;
            let mut info = sbx.get_info().await?;
            info.runtime = sbx.runtime().cloned();
            show(&info, json);
        }
        SandboxCommand::Pause { id } => {
            Sandbox::from_id(config, id)?.pause().await?;
            show(&Sandbox::get_info_by_id(config, id).await?, json);
        }
        SandboxCommand::Resume { id } => {
            // Connect resumes a paused sandbox.
            let sbx = Sandbox::connect(config, id, None).await?;
            show(&sbx.get_info().await?, json);
        }
        SandboxCommand::Kill { id } => {
            let killed = Sandbox::from_id(config, id)?.kill().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "sandboxID": id, "killed": killed })
                );
            } else if killed {
                println!("killed {id}");
            } else {
                println!("{id} was already gone");
            }
        }
        SandboxCommand::Refresh { id, duration } => {
            Sandbox::from_id(config, id)?.refresh(*duration).await?;
            show(&Sandbox::get_info_by_id(config, id).await?, json);
        }
        SandboxCommand::Timeout { id, seconds } => {
            Sandbox::from_id(config, id)?.set_timeout(*seconds).await?;
            show(&Sandbox::get_info_by_id(config, id).await?, json);
        }
        SandboxCommand::Shell { id } => {
            let code = shell(config, id).await?;
            std::process::exit(code);
        }
        SandboxCommand::Proxy { id, port } => {
            let sbx = Sandbox::attach(config, id).await?;
            let conn = sbx.connect_port(*port).await?;
            conn.pipe(tokio::io::stdin(), tokio::io::stdout()).await?;
        }
        SandboxCommand::Preview {
            id,
            port,
            public,
            private,
        } => {
            let sbx = Sandbox::from_id(config, id)?;
            let p = if *public || *private {
                sbx.set_port_public(*port, *public).await?
            } else {
                sbx.get_preview_url(*port).await?
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "port": p.port, "public": p.public, "url": p.url, "expiresAt": p.expires_at,
                        "proxyTarget": { "url": p.proxy_target.url, "header": p.proxy_target.header, "token": p.proxy_target.token } })
                );
            } else {
                println!("{}", p.url);
            }
        }
        SandboxCommand::Desktop { id, view_only } => {
            let url = Sandbox::from_id(config, id)?
                .desktop_viewer_url(*view_only)
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "url": url, "viewOnly": view_only })
                );
            } else {
                println!("{url}");
            }
        }
        SandboxCommand::Logs { id, offset, limit } => {
            let (lines, next) = Sandbox::from_id(config, id)?
                .logs_page(*offset, *limit)
                .await?;
            for l in lines {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "time": l.time, "source": l.source, "pid": l.pid, "stream": l.stream, "text": l.text })
                    );
                } else if let Some(pid) = l.pid {
                    println!("[{} {pid}] {}", l.source, l.text);
                } else {
                    println!("[{}] {}", l.source, l.text);
                }
            }
            if let (Some(next), false) = (next, json) {
                eprintln!("more: --offset {next}");
            }
        }
        SandboxCommand::Audit {
            id,
            after,
            limit,
            follow,
        } => {
            let sbx = Sandbox::from_id(config, id)?;
            if *follow {
                let mut records = sbx.follow_audit(*after, Duration::from_secs(1));
                let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
                loop {
                    tokio::select! {
                        r = records.next() => print_audit_record(&r?, json),
                        _ = &mut stop => break,
                    }
                }
                return Ok(());
            }
            let page = sbx.audit_page(*after, *limit).await?;
            if json {
                println!("{}", serde_json::to_string(&page).unwrap());
                return Ok(());
            }
            for r in &page.records {
                print_audit_record(r, false);
            }
            if page.more {
                eprintln!("more: --after {}", page.next);
            }
        }
        SandboxCommand::SecurityPolicy { id, file } => {
            let info = match file {
                Some(path) => {
                    let policy = read_policy(path)?;
                    Sandbox::from_id(config, id)?
                        .set_security_policy(&policy)
                        .await?
                }
                None => Sandbox::get_info_by_id(config, id).await?,
            };
            match (&info.security_policy, json) {
                (Some(p), _) => println!("{}", serde_json::to_string_pretty(p).unwrap()),
                (None, true) => println!("null"),
                (None, false) => println!("{id} has no security policy"),
            }
        }
        SandboxCommand::Recordings { id } => {
            let list = Sandbox::from_id(config, id)?.recordings().await?;
            for r in list {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "recordingID": r.recording_id, "kind": r.kind, "sizeBytes": r.size_bytes, "createdAt": r.created_at })
                    );
                } else {
                    println!(
                        "{:<28} {:<9} {:>10} {}",
                        r.recording_id, r.kind, r.size_bytes, r.created_at
                    );
                }
            }
        }
        SandboxCommand::Play {
            id,
            recording,
            speed,
        } => {
            let bytes = Sandbox::from_id(config, id)?.recording(recording).await?;
            playback::play(&bytes, *speed).await?;
        }
        SandboxCommand::Presign {
            id,
            path,
            put,
            expires,
        } => {
            let sbx = Sandbox::attach(config, id).await?;
            let method = if *put { "PUT" } else { "GET" };
            let link = sbx.files().presign(path, method, *expires).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "url": link.url, "method": link.method, "path": link.path, "expiresAt": link.expires_at })
                );
            } else {
                println!("{}", link.url);
            }
        }
        SandboxCommand::Metrics { id, start, end } => {
            let samples = Sandbox::from_id(config, id)?
                .get_metrics(*start, *end)
                .await?;
            if !json {
                println!(
                    "{:<12} {:>6} {:>14} {:>22} {:>6} {:>9}",
                    "time", "cpu%", "mem MiB", "disk MiB", "tasks", "host cpu%"
                );
            }
            for m in samples {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "timestamp": m.timestamp, "cpuUsedPct": m.cpu_used_pct, "memUsedMiB": m.mem_used_mib,
                            "memTotalMiB": m.mem_total_mib, "diskUsedBytes": m.disk_used_bytes, "tasks": m.tasks, "hostCpuPct": m.host_cpu_pct })
                    );
                } else {
                    println!(
                        "{:<12} {:>6.1} {:>6}/{:<7} {:>10}/{:<11} {:>6} {:>9.2}",
                        m.timestamp,
                        m.cpu_used_pct,
                        m.mem_used_mib,
                        m.mem_total_mib,
                        m.disk_used_bytes >> 20,
                        m.disk_total_bytes >> 20,
                        m.tasks,
                        m.host_cpu_pct
                    );
                }
            }
        }
        SandboxCommand::Egress { id, egress } => {
            let info = Sandbox::from_id(config, id)?
                .set_egress(&egress.policy())
                .await?;
            show(&info, json);
        }
        SandboxCommand::Hibernate { id } => {
            Sandbox::from_id(config, id)?.hibernate().await?;
            show(&Sandbox::get_info_by_id(config, id).await?, json);
        }
        SandboxCommand::Migrate {
            id,
            host,
            precopy_only,
            postcopy_after_ms,
        } => {
            let m = Sandbox::from_id(config, id)?
                .migrate_with(&nullspace::MigrateBody {
                    host: host.clone(),
                    postcopy: precopy_only.then_some(false),
                    postcopy_after_ms: *postcopy_after_ms,
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "{} moved {} -> {}: downtime {} ms, {} ms in all, {} MiB of RAM, {} MiB of disk{}",
                    m.sandbox_id,
                    m.from,
                    m.to,
                    m.downtime_ms,
                    m.total_ms,
                    m.ram_bytes >> 20,
                    m.disk_bytes >> 20,
                    if m.postcopy { " (post-copy)" } else { "" }
                );
            }
        }
        SandboxCommand::Snapshot { id, name } => {
            let sbx = Sandbox::from_id(config, id)?;
            let s = match name {
                Some(n) => sbx.snapshot_named(n).await?.info,
                None => sbx.create_snapshot().await?,
            };
            if json {
                println!("{}", snapshot_json(&s));
            } else {
                println!("{}", s.snapshot_id);
            }
        }
        SandboxCommand::Snapshots { id } => {
            show_snapshots(&Sandbox::list_snapshots_of(config, id).await?, json)
        }
        SandboxCommand::DeleteSnapshot { id, snapshot_id } => {
            Sandbox::from_id(config, id)?
                .delete_snapshot(snapshot_id)
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "snapshotID": snapshot_id, "deleted": true })
                );
            } else {
                println!("deleted {snapshot_id}");
            }
        }
        SandboxCommand::Restore {
            id,
            snapshot,
            timeout,
            volumes,
        } => {
            let options = RestoreOptions {
                snapshot_id: snapshot.clone(),
                timeout: *timeout,
                metadata: None,
                volumes: *volumes,
            };
            let sbx = Sandbox::restore(config, id, &options).await?;
            if json {
                show(&sbx.get_info().await?, true);
            } else {
                println!("{}", sbx.id());
            }
        }
        SandboxCommand::Fork { id, count, volumes } => {
            let children = Sandbox::attach(config, id)
                .await?
                .fork_with(*count, *volumes)
                .await?;
            if json {
                let ids: Vec<&str> = children.iter().map(|c| c.id()).collect();
                println!("{}", serde_json::json!({ "sandboxIDs": ids }));
            } else {
                for c in &children {
                    println!("{}", c.id());
                }
            }
        }
    }
    Ok(())
}

/// `ID:path` → (ID, path); local paths have no colon before a slash.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (id.starts_with("sbx-") && !id.contains('/')).then_some((id, path))
}

async fn copy(config: &ConnectionConfig, from: &str, to: &str, json: bool) -> anyhow::Result<()> {
    let bytes = match (remote(from), remote(to)) {
        (None, Some((id, path))) => {
            let sbx = Sandbox::attach(config, id).await?;
            sbx.files()
                .upload(Path::new(from), path)
                .await
                .with_context(|| format!("uploading {from}"))?
        }
        (Some((id, path)), None) => {
            let sbx = Sandbox::attach(config, id).await?;
            sbx.files()
                .download(path, Path::new(to))
                .await
                .with_context(|| format!("downloading {path}"))?
        }
        (Some(_), Some(_)) => {
            bail!("copy between two sandboxes through a local file: cp ID:a ./a, then cp ./a ID2:a")
        }
        (None, None) => {
            bail!("one side must be a sandbox path, ID:path (e.g. sbx-…:/workspace/file)")
        }
    };
    if json {
        println!("{}", serde_json::json!({ "bytes": bytes }));
    } else {
        println!("copied {bytes} bytes");
    }
    Ok(())
}

/// Runs `nullspace-pool-manager admin ...` (beside this binary, else on PATH).
fn admin(state_dir: &str, args: &[String]) -> anyhow::Result<i32> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nullspace-pool-manager")))
        .filter(|p| p.is_file());
    let pm = beside.unwrap_or_else(|| "nullspace-pool-manager".into());
    let status = std::process::Command::new(&pm)
        .arg("admin")
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .status()
        .with_context(|| {
            format!(
                "running {} (install the pool manager on this host)",
                pm.display()
            )
        })?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([&["nullspace"], args].concat())
    }

    fn sandbox_command(args: &[&str]) -> SandboxCommand {
        match parse(args).unwrap().command {
            Command::Sandbox(c) => c,
            _ => panic!("not a sandbox command: {args:?}"),
        }
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn audit_takes_after_limit_and_follow() {
        let SandboxCommand::Audit {
            id,
            after,
            limit,
            follow,
        } = sandbox_command(&["sandbox", "audit", "sbx-1", "--after", "17", "--limit", "5"])
        else {
            panic!("not audit")
        };
        assert_eq!(
            (id.as_str(), after, limit, follow),
            ("sbx-1", 17, Some(5), false)
        );
        let SandboxCommand::Audit {
            after,
            limit,
            follow,
            ..
        } = sandbox_command(&["sandbox", "audit", "sbx-1", "-f", "--json"])
        else {
            panic!("not audit")
        };
        assert_eq!((after, limit, follow), (0, None, true));
        assert!(
            parse(&["--json", "sandbox", "audit", "sbx-1"])
                .unwrap()
                .json
        );
        // A page size out of range, or a page size while following, is refused.
        for bad in [
            &["sandbox", "audit", "sbx-1", "--limit", "0"][..],
            &["sandbox", "audit", "sbx-1", "--limit", "1001"],
            &["sandbox", "audit", "sbx-1", "--limit", "5", "--follow"],
            &["sandbox", "audit", "sbx-1", "--after", "-1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn security_policy_shows_or_replaces_from_a_file_or_stdin() {
        let SandboxCommand::SecurityPolicy { id, file } =
            sandbox_command(&["sandbox", "security-policy", "sbx-1", "--file", "-"])
        else {
            panic!("not security-policy")
        };
        assert_eq!((id.as_str(), file), ("sbx-1", Some("-".into())));
        let SandboxCommand::SecurityPolicy { file, .. } =
            sandbox_command(&["sandbox", "security-policy", "sbx-1"])
        else {
            panic!("not security-policy")
        };
        assert_eq!(file, None);
        let SandboxCommand::Create(a) = sandbox_command(&[
            "sandbox",
            "create",
            "--secure",
            "true",
            "--security-policy",
            "policy.json",
            "--env",
            "OPENAI_API_KEY=sk-x",
        ]) else {
            panic!("not create")
        };
        assert_eq!(a.secure, Some(true));
        assert_eq!(a.security_policy, Some("policy.json".into()));
    }

    #[test]
    fn a_policy_file_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("nullspace-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"pii": {"detectors": {"card": "block"}}, "audit": {"enabled": true},
                "envMasking": {"secrets": [{"name": "K", "hosts": ["api.example.com"]}]}}"#,
        )
        .unwrap();
        let policy = read_policy(&good).unwrap();
        assert_eq!(
            policy,
            nullspace::SecurityPolicy::new()
                .pii_detector("card", "block")
                .audit(true)
                .mask_secret("K", ["api.example.com"])
        );
        let unknown = dir.join("unknown.json");
        std::fs::write(&unknown, r#"{"pii": {}, "firewall": true}"#).unwrap();
        let e = read_policy(&unknown).unwrap_err().to_string();
        assert!(e.contains("unknown keys") && e.contains("firewall"), "{e}");
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{pii").unwrap();
        let e = format!("{:#}", read_policy(&broken).unwrap_err());
        assert!(e.contains("is not JSON"), "{e}");
        assert!(read_policy(&dir.join("missing.json")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_audit_record_is_one_line_for_people() {
        let mut r: nullspace::AuditRecord = serde_json::from_value(serde_json::json!({
            "id": 17, "time": "2026-01-02T03:04:05Z", "method": "POST",
            "host": "api.example.com", "path": "/v1/x?y", "status": 403,
            "bytesIn": 0, "bytesOut": 40, "durationMs": 3, "action": "blocked",
            "detections": [
                { "kind": "card", "where": "requestBody", "action": "block" },
                { "kind": "email", "where": "url", "action": "redact" },
            ],
        }))
        .unwrap();
        assert_eq!(
            audit_line(&r),
            "2026-01-02T03:04:05Z POST api.example.com /v1/x?y 403 blocked card@requestBody:block,email@url:redact"
        );
        r.detections.clear();
        assert!(audit_line(&r).ends_with(" 403 blocked -"));
    }
}
