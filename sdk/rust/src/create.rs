//! The options of a create under the seed documents' names (seed 001's `Sandbox.create`,
//! seed 004's keyword forms), and their translation to the REST body.
//!
//! The REST API refuses the seeds' SDK names (`allow_internet_access`, `network`,
//! `secure`, ...; seed 003): [`CreateOptions::to_body`] translates them explicitly, and
//! refuses combinations that would mean two different things, before anything is sent.

use crate::{Error, Result};
use api_model::{EgressPolicy, EgressRule, MountRequest, Resources};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub use api_model::{OnTimeout, WarmPoolMode};

/// Seed 001's `SandboxNetworkOpts`: what a sandbox may reach, as allow and deny lists.
///
/// Entries are IPs (`203.0.113.7`), CIDRs (`10.0.0.0/8`), domains (`example.com`) or
/// wildcard domains (`*.example.com`). `"0.0.0.0/0"` or `"::/0"` in `deny_out` means
/// "all traffic": everything not in `allow_out` is unreachable. Given to
/// [`CreateOptions::network`], it overrides [`CreateOptions::allow_internet_access`].
///
/// ```no_run
/// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
/// use nullspace::{CreateOptions, Sandbox, SandboxNetworkOpts};
/// // Only one address, nothing else.
/// let only_api = SandboxNetworkOpts::new()
///     .allow_out("203.0.113.7")
///     .deny_out("0.0.0.0/0");
/// let sbx = Sandbox::create(config, &CreateOptions::new("base").network(only_api)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxNetworkOpts {
    /// Destinations reachable even when `deny_out` blocks all traffic.
    pub allow_out: Vec<String>,
    /// Destinations never reachable; `"0.0.0.0/0"` / `"::/0"` block all traffic.
    pub deny_out: Vec<String>,
}

impl SandboxNetworkOpts {
    /// Empty lists: everything reachable.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a destination to `allow_out`.
    pub fn allow_out(mut self, entry: impl Into<String>) -> Self {
        self.allow_out.push(entry.into());
        self
    }

    /// Adds a destination to `deny_out`.
    pub fn deny_out(mut self, entry: impl Into<String>) -> Self {
        self.deny_out.push(entry.into());
        self
    }

    /// The REST egress policy these lists mean: `internet` off when `deny_out` holds
    /// `0.0.0.0/0` or `::/0` (those entries dropped), `allow` = `allow_out`, `deny` = the
    /// rest of `deny_out`.
    ///
    /// The seed lets `allow_out` win over `deny_out`; this API lets `deny` win. An
    /// `allow_out` entry that a remaining `deny_out` entry covers (an address inside a
    /// denied CIDR, the same domain, a domain under a denied `*.domain`) would be
    /// reachable under the seed and unreachable here, so it is refused
    /// (`invalid_request`, naming both entries) instead of silently meaning something
    /// else.
    ///
    /// ```
    /// use nullspace::SandboxNetworkOpts;
    /// let p = SandboxNetworkOpts::new().allow_out("198.51.100.2").deny_out("0.0.0.0/0").to_egress()?;
    /// assert!(!p.internet);
    /// assert_eq!(p.allow, ["198.51.100.2"]);
    /// assert!(p.deny.is_empty());
    /// # Ok::<(), nullspace::Error>(())
    /// ```
    pub fn to_egress(&self) -> Result<EgressPolicy> {
        let parse = |list: &str, i: usize, entry: &str| {
            EgressRule::parse(entry)
                .map_err(|m| Error::invalid(format!("network.{list}[{i}]: {m}")))
        };
        let allow_rules = self
            .allow_out
            .iter()
            .enumerate()
            .map(|(i, e)| parse("allow_out", i, e))
            .collect::<Result<Vec<_>>>()?;
        let mut internet = true;
        let mut deny = Vec::new();
        let mut deny_rules = Vec::new();
        for (i, entry) in self.deny_out.iter().enumerate() {
            let rule = parse("deny_out", i, entry)?;
            // A /0 block is the seed's way of saying "no internet" (seed 001:
            // allow_internet_access=False adds deny_out ["0.0.0.0/0"]).
            if matches!(rule, EgressRule::Net { prefix: 0, .. }) {
                internet = false;
                continue;
            }
            deny.push(entry.clone());
            deny_rules.push((entry, rule));
        }
        for (allowed, allow_rule) in self.allow_out.iter().zip(&allow_rules) {
            if let Some((denied, _)) = deny_rules.iter().find(|(_, d)| covers(d, allow_rule)) {
                return Err(Error::invalid(format!(
                    "network: allow_out entry {allowed:?} lies inside deny_out entry {denied:?}; the seed lets allow_out win but this API lets deny win, so it would stay unreachable: remove {denied:?} from deny_out, or narrow it so it leaves {allowed:?} out"
                )));
            }
        }
        Ok(EgressPolicy {
            internet,
            allow: self.allow_out.clone(),
            deny,
        })
    }
}

/// Whether every destination `allow` names is also one `deny` names.
fn covers(deny: &EgressRule, allow: &EgressRule) -> bool {
    match (deny, allow) {
        (
            EgressRule::Net {
                prefix: deny_prefix,
                ..
            },
            EgressRule::Net { addr, prefix },
        ) => deny_prefix <= prefix && deny.matches_ip(*addr),
        (
            EgressRule::Domain { .. },
            EgressRule::Domain {
                name,
                wildcard: false,
            },
        ) => deny.matches_name(name),
        (
            EgressRule::Domain {
                name: denied,
                wildcard: true,
            },
            EgressRule::Domain {
                name,
                wildcard: true,
            },
        ) => name == denied || deny.matches_name(name),
        // An exact denied name never covers a wildcard (`*.x` is not `x`); domains and
        // addresses cannot be compared before resolution.
        _ => false,
    }
}

/// Seed 001's `SecurityPolicy`: the sandbox's TLS connections are intercepted (the
/// guest trusts its team's CA) and each HTTP request is checked, rewritten and audited.
/// Sent as `securityPolicy` at create ([`CreateOptions::security_policy`]) or live
/// ([`crate::Sandbox::set_security_policy`]), with camelCase keys and only the parts
/// that are set. Every part is the API's JSON:
///
/// - `pii`: `{"detectors": {detector: "log" | "redact" | "block"}}` on what the guest
///   sends; detectors `email`, `phone`, `card`, `iban`, `ipv4`, `ipv6`, `jwt`,
///   `privateKey`, `apiKey` (absent ones are off).
/// - `injectionDefense`: `{"action": "flag" | "strip" | "block"}` on what it receives.
/// - `transforms`: `[{"host": "api.example.com" | "*.example.com", "requestHeaders":
///   {"set": {name: value}, "remove": [name]}, "responseHeaders": {...},
///   "upstreamHost": "host[:port]"}]`.
/// - `audit`: `{"enabled": true}` (the default; `true`/`false` are sent as that): one
///   record per request, read with [`crate::Sandbox::audit_page`].
/// - `envMasking`: `{"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"],
///   "placeholder": "optional, 16+ characters"}]}`. The real value goes in the create's
///   [`CreateOptions::env`] under the same name; the guest only ever sees the
///   placeholder, which the proxy swaps for the value on requests to `hosts`. A secret
///   not given at create cannot be added live (400).
///
/// [`CreateOptions::secure`]`(true)` without a policy sends `{}`: interception with the
/// audit only. The SDK checks each part's JSON type (`invalid_request` naming what to
/// send); the API checks the rest. A sandbox's [`crate::SandboxInfo::security_policy`]
/// (placeholders filled in, never a real value) reads back with
/// [`SecurityPolicy::from_body`].
///
/// ```no_run
/// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
/// use nullspace::{CreateOptions, Sandbox, SecurityPolicy};
/// let policy = SecurityPolicy::new()
///     .pii_detector("email", "redact")
///     .pii_detector("card", "block")
///     .injection_defense("flag")
///     .transform(serde_json::json!({
///         "host": "api.example.com",
///         "requestHeaders": { "set": { "x-team": "data" }, "remove": ["cookie"] },
///     }))
///     .audit(true)
///     .mask_secret("OPENAI_API_KEY", ["api.openai.com"]);
/// let options = CreateOptions::new("base")
///     .env("OPENAI_API_KEY", "sk-the-real-key-stays-outside")
///     .security_policy(policy);
/// let sbx = Sandbox::create(config, &options).await?;
/// // The guest sees a placeholder, never the key.
/// let out = sbx.commands().run("printenv OPENAI_API_KEY").await?;
/// assert!(!out.stdout.contains("sk-the-real-key"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecurityPolicy {
    /// PII detection → `pii` (`{"detectors": {...}}`).
    pub pii: Option<Value>,
    /// Prompt-injection defense → `injectionDefense` (`{"action": ...}`).
    pub injection_defense: Option<Value>,
    /// Per-host header edits and upstream rewrites → `transforms` (an array).
    pub transforms: Option<Value>,
    /// The audit → `audit` (`{"enabled": bool}`, or a bool short for it).
    pub audit: Option<Value>,
    /// Secrets the guest only sees as placeholders → `envMasking` (`{"secrets": [...]}`).
    pub env_masking: Option<Value>,
}

/// The parts of a [`SecurityPolicy`]: field, REST key, JSON kind, an example.
const POLICY_PARTS: [(&str, &str, &str, &str); 5] = [
    (
        "pii",
        "pii",
        "object",
        r#"{"detectors": {"email": "redact", "card": "block"}}"#,
    ),
    (
        "injection_defense",
        "injectionDefense",
        "object",
        r#"{"action": "flag"}"#,
    ),
    (
        "transforms",
        "transforms",
        "array",
        r#"[{"host": "api.example.com", "requestHeaders": {"set": {"x-team": "a"}}}]"#,
    ),
    ("audit", "audit", "object", r#"{"enabled": true}"#),
    (
        "env_masking",
        "envMasking",
        "object",
        r#"{"secrets": [{"name": "OPENAI_API_KEY", "hosts": ["api.openai.com"]}]}"#,
    ),
];

impl SecurityPolicy {
    /// An empty policy (what [`CreateOptions::secure`]`(true)` sends): interception
    /// with the audit only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns PII `detector` (`email`, `card`, ...) on with `action` (`log`, `redact`
    /// or `block`), in `pii.detectors`.
    pub fn pii_detector(mut self, detector: &str, action: &str) -> Self {
        let pii = self.pii.get_or_insert_with(|| json!({}));
        if let Value::Object(p) = pii {
            let detectors = p.entry("detectors").or_insert_with(|| json!({}));
            if let Value::Object(d) = detectors {
                d.insert(detector.to_string(), json!(action));
            }
        }
        self
    }

    /// Sets the injection defense's `action`: `flag`, `strip` or `block`.
    pub fn injection_defense(mut self, action: &str) -> Self {
        self.injection_defense = Some(json!({ "action": action }));
        self
    }

    /// Adds a transform (`{"host", "requestHeaders", "responseHeaders",
    /// "upstreamHost"}`) to `transforms`.
    pub fn transform(mut self, transform: Value) -> Self {
        let list = self.transforms.get_or_insert_with(|| json!([]));
        if let Value::Array(l) = list {
            l.push(transform);
        }
        self
    }

    /// Turns the audit on or off (`audit.enabled`; on by default).
    pub fn audit(mut self, enabled: bool) -> Self {
        self.audit = Some(json!({ "enabled": enabled }));
        self
    }

    /// Masks env var `name`: the guest sees a generated placeholder, and its real value
    /// (given with [`CreateOptions::env`] at create) is only sent to `hosts`.
    pub fn mask_secret<I, S>(mut self, name: &str, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let hosts: Vec<String> = hosts.into_iter().map(Into::into).collect();
        let masking = self.env_masking.get_or_insert_with(|| json!({}));
        if let Value::Object(m) = masking {
            let secrets = m.entry("secrets").or_insert_with(|| json!([]));
            if let Value::Array(list) = secrets {
                list.push(json!({ "name": name, "hosts": hosts }));
            }
        }
        self
    }

    /// A policy from its REST JSON (`{"pii", "injectionDefense", "transforms", "audit",
    /// "envMasking"}`), such as a file or [`crate::SandboxInfo::security_policy`]; an
    /// unknown key or a part of the wrong JSON type is `invalid_request`.
    ///
    /// ```
    /// use nullspace::SecurityPolicy;
    /// let p = SecurityPolicy::from_body(serde_json::json!({"injectionDefense": {"action": "strip"}}))?;
    /// assert_eq!(p, SecurityPolicy::new().injection_defense("strip"));
    /// assert!(SecurityPolicy::from_body(serde_json::json!({"pii": ["email"]})).is_err());
    /// # Ok::<(), nullspace::Error>(())
    /// ```
    pub fn from_body(body: Value) -> Result<Self> {
        let Value::Object(mut map) = body else {
            return Err(Error::invalid(format!(
                "a security policy is a JSON object with pii, injectionDefense, transforms, audit and envMasking (each optional); got {body}"
            )));
        };
        let unknown: Vec<&String> = map
            .keys()
            .filter(|k| !POLICY_PARTS.iter().any(|(_, wire, _, _)| wire == k))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::invalid(format!(
                "the security policy has unknown keys {unknown:?}; send pii, injectionDefense, transforms, audit or envMasking"
            )));
        }
        let mut take = |key: &str| map.remove(key).filter(|v| !v.is_null());
        let policy = Self {
            pii: take("pii"),
            injection_defense: take("injectionDefense"),
            transforms: take("transforms"),
            audit: take("audit"),
            env_masking: take("envMasking"),
        };
        policy.checked_body()?;
        Ok(policy)
    }

    /// The `securityPolicy` object: camelCase keys, only the parts that are set, and
    /// `audit: true`/`false` as `{"enabled": ...}`. Not checked: see
    /// [`SecurityPolicy::checked_body`].
    pub fn to_body(&self) -> Value {
        let mut out = Map::new();
        for ((_, key, _, _), part) in POLICY_PARTS.iter().zip(self.parts()) {
            if let Some(v) = part {
                let v = match v {
                    Value::Bool(on) if *key == "audit" => json!({ "enabled": on }),
                    other => other.clone(),
                };
                out.insert((*key).into(), v);
            }
        }
        Value::Object(out)
    }

    /// [`SecurityPolicy::to_body`] after checking each part's JSON type (an object; an
    /// array for `transforms`): `invalid_request` naming the part and what to send.
    pub fn checked_body(&self) -> Result<Value> {
        for ((name, _, kind, example), part) in POLICY_PARTS.iter().zip(self.parts()) {
            let Some(v) = part else { continue };
            let ok = match *kind {
                "array" => v.is_array(),
                _ => v.is_object() || (*name == "audit" && v.is_boolean()),
            };
            if !ok {
                return Err(Error::invalid(format!(
                    "security_policy.{name} must be a JSON {kind}, e.g. {example}; got {v}"
                )));
            }
        }
        Ok(self.to_body())
    }

    fn parts(&self) -> [&Option<Value>; 5] {
        [
            &self.pii,
            &self.injection_defense,
            &self.transforms,
            &self.audit,
            &self.env_masking,
        ]
    }
}

/// Seed 001's `SandboxLifecycle`: what the timeout does, and whether preview traffic
/// wakes a paused sandbox (seed 004). Unset parts take the server's defaults (`kill`, no
/// auto-resume).
///
/// ```no_run
/// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
/// use nullspace::{CreateOptions, OnTimeout, Sandbox, SandboxLifecycle};
/// let lifecycle = SandboxLifecycle::new(OnTimeout::Pause).auto_resume(true);
/// let sbx = Sandbox::create(config, &CreateOptions::new("base").lifecycle(lifecycle)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxLifecycle {
    /// Kill (the default), pause, or hibernate when the timeout passes.
    pub on_timeout: Option<OnTimeout>,
    /// Wake on preview traffic and SDK calls once paused (needs `pause` or `hibernate`).
    pub auto_resume: Option<bool>,
    /// Seconds without SDK calls, preview traffic or a running foreground command after
    /// which `on_timeout` applies, beside the lifetime timeout (0: off).
    pub idle_timeout: Option<u64>,
}

/// The name this SDK used before seed 001's [`SandboxLifecycle`].
pub type Lifecycle = SandboxLifecycle;

impl SandboxLifecycle {
    /// A lifecycle that does `on_timeout` when the timeout passes.
    pub fn new(on_timeout: OnTimeout) -> Self {
        Self {
            on_timeout: Some(on_timeout),
            auto_resume: None,
            idle_timeout: None,
        }
    }

    /// Sets whether preview traffic and SDK calls wake the paused sandbox.
    pub fn auto_resume(mut self, on: bool) -> Self {
        self.auto_resume = Some(on);
        self
    }

    /// Applies `on_timeout` after `seconds` without traffic (5 to 604800; 0: off).
    pub fn idle_timeout(mut self, seconds: u64) -> Self {
        self.idle_timeout = Some(seconds);
        self
    }
}

/// The wire name of an [`OnTimeout`].
pub(crate) fn on_timeout_name(o: OnTimeout) -> &'static str {
    match o {
        OnTimeout::Kill => "kill",
        OnTimeout::Pause => "pause",
        OnTimeout::Hibernate => "hibernate",
    }
}

fn warm_pool_name(m: WarmPoolMode) -> &'static str {
    match m {
        WarmPoolMode::Require => "require",
        WarmPoolMode::Prefer => "prefer",
    }
}

/// Options of [`crate::Sandbox::create`]: `CreateOptions::new("base")` and set what you
/// need with the builder methods. Seed 001's and seed 004's names are all here; see the
/// crate documentation for the table of how each reaches the REST body, and
/// [`CreateOptions::to_body`] for the translation.
///
/// ```no_run
/// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
/// use nullspace::{CreateOptions, OnTimeout, Sandbox};
/// let options = CreateOptions::new("base")
///     .timeout(600)
///     .metadata("owner", "ci")
///     .env("MODE", "test")
///     .allow_internet_access(false)
///     .on_timeout(OnTimeout::Pause)
///     .auto_resume(true);
/// let sbx = Sandbox::create(config, &options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Template to boot (`base`, `minimal`, a template or snapshot ID) → `templateID`.
    pub template: String,
    /// Lifetime in seconds (server default 300) → `timeout`.
    pub timeout: Option<u64>,
    /// Labels, filterable in a list → `metadata`.
    pub metadata: BTreeMap<String, String>,
    /// Environment of every command → `envVars`.
    pub envs: BTreeMap<String, String>,
    /// Shape (server default 2 vCPUs, 2048 MiB, 8192 MiB disk) → `resources`.
    pub resources: Option<Resources>,
    /// Seed 001's `lifecycle` → `lifecycle`.
    pub lifecycle: Option<SandboxLifecycle>,
    /// Seed 004's keyword form of `lifecycle.on_timeout` (also set by
    /// [`CreateOptions::pause_on_timeout`] and [`CreateOptions::hibernate_on_timeout`]).
    pub on_timeout: Option<OnTimeout>,
    /// Seed 004's keyword form of `lifecycle.auto_resume`.
    pub auto_resume: Option<bool>,
    /// Seconds between periodic snapshots (0: off; server default otherwise) →
    /// `snapshotInterval`.
    pub snapshot_interval: Option<u64>,
    /// Check out a ready instance of the template's warm pool → `warmPool`.
    pub warm_pool: Option<WarmPoolMode>,
    /// Seed 004's name of [`CreateOptions::warm_pool`].
    pub warm_pool_mode: Option<WarmPoolMode>,
    /// What the sandbox may reach (server default: everything) → `egress`.
    pub egress: Option<EgressPolicy>,
    /// Seed 001's switch: `Some(false)` blocks all outbound traffic → `egress`.
    pub allow_internet_access: Option<bool>,
    /// Seed 001's allow/deny lists, overriding `allow_internet_access` → `egress`.
    pub network: Option<SandboxNetworkOpts>,
    /// Seed 001's security proxy switch: `Some(true)` sends `securityPolicy: {}`
    /// (interception with the audit only).
    pub secure: Option<bool>,
    /// Seed 001's security proxy policy → `securityPolicy`.
    pub security_policy: Option<SecurityPolicy>,
    /// `Some(false)`: answer while the sandbox is still `starting` (see
    /// [`crate::Sandbox::wait_ready`]) → `waitReady`.
    pub wait_ready: Option<bool>,
    /// Volumes to mount: guest path → volume → `mounts`.
    pub mounts: BTreeMap<String, MountRequest>,
    /// Seed 004's keyword form of `lifecycle.idle_timeout` → `lifecycle.idleTimeout`.
    pub idle_timeout: Option<u64>,
    /// Seed 002's start source: a template by name (and optionally its pinned ID), sent
    /// instead of `template` → `imageName`, `imageId`.
    pub image: Option<(String, Option<String>)>,
    /// Seed 002's start source: a snapshot by the name it was given (and optionally its
    /// pinned ID) → `snapshotName`, `snapshotId`.
    pub snapshot: Option<(String, Option<String>)>,
    /// A region the operator configured → `region`.
    pub region: Option<String>,
    /// Seed 002's sandbox recording: a transcript of every command and terminal
    /// session, kept in object storage → `recording`.
    pub recording: Option<bool>,
}

impl CreateOptions {
    /// Starts from a template by name (seed 002's `imageName`); `pin` (a `tpl-…` ID)
    /// makes the create fail (409) if the name now means another build.
    pub fn image(name: impl Into<String>, pin: Option<String>) -> Self {
        Self {
            image: Some((name.into(), pin)),
            ..Self::default()
        }
    }

    /// Starts from a snapshot the team named (seed 002's `snapshotName`, see
    /// [`crate::Sandbox::snapshot_named`]); `pin` (a `snap-…` ID) makes the create fail
    /// (409) if the name now means another snapshot.
    pub fn snapshot_named(name: impl Into<String>, pin: Option<String>) -> Self {
        Self {
            snapshot: Some((name.into(), pin)),
            ..Self::default()
        }
    }

    /// Records every command and terminal session (see [`crate::Sandbox::recordings`]).
    pub fn recording(mut self, on: bool) -> Self {
        self.recording = Some(on);
        self
    }

    /// Places the sandbox in a region the operator configured.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Applies the timeout action after `seconds` without traffic (seed 000's idle
    /// timeout; 0: off).
    pub fn idle_timeout(mut self, seconds: u64) -> Self {
        self.idle_timeout = Some(seconds);
        self
    }

    /// Options for `template`, everything else the server's default.
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
            ..Self::default()
        }
    }

    /// Sets the egress policy (the REST form; see also [`CreateOptions::network`]).
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.egress = Some(policy);
        self
    }

    /// Seed 001's `allow_internet_access`: `false` blocks all outbound traffic (as
    /// `network` with `deny_out: ["0.0.0.0/0"]` would); `true` is the default.
    ///
    /// ```no_run
    /// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// use nullspace::{CreateOptions, Sandbox};
    /// let offline = Sandbox::create(config, &CreateOptions::new("base").allow_internet_access(false)).await?;
    /// # Ok(()) }
    /// ```
    pub fn allow_internet_access(mut self, allow: bool) -> Self {
        self.allow_internet_access = Some(allow);
        self
    }

    /// Seed 001's `network` (see [`SandboxNetworkOpts`]); overrides
    /// [`CreateOptions::allow_internet_access`].
    pub fn network(mut self, network: SandboxNetworkOpts) -> Self {
        self.network = Some(network);
        self
    }

    /// Seed 001's `secure`: `true` turns the TLS-intercepting security proxy on
    /// (`securityPolicy: {}`: interception with the audit only, unless a
    /// [`CreateOptions::security_policy`] says more); `false` (and the default) keeps it
    /// off.
    pub fn secure(mut self, on: bool) -> Self {
        self.secure = Some(on);
        self
    }

    /// Seed 001's `security_policy` (see [`SecurityPolicy`]).
    pub fn security_policy(mut self, policy: SecurityPolicy) -> Self {
        self.security_policy = Some(policy);
        self
    }

    /// Mounts volume `volume` (ID or name) at guest path `path`.
    pub fn mount(
        mut self,
        path: impl Into<String>,
        volume: impl Into<String>,
        mode: api_model::MountMode,
    ) -> Self {
        self.mounts.insert(
            path.into(),
            MountRequest {
                id: volume.into(),
                mode,
                shared: None,
            },
        );
        self
    }

    /// Sets the timeout in seconds.
    pub fn timeout(mut self, seconds: u64) -> Self {
        self.timeout = Some(seconds);
        self
    }

    /// Adds a metadata label.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.insert(key.into(), value.into());
        self
    }

    /// Sets the shape: seed 001's `{"cpu", "memory_mb", "disk_mb"}` are `vcpus`,
    /// `mem_mib` and `disk_mib` here.
    pub fn resources(mut self, vcpus: u32, mem_mib: u32, disk_mib: u64) -> Self {
        self.resources = Some(Resources {
            vcpus,
            mem_mib,
            disk_mib,
        });
        self
    }

    /// Seed 001's `lifecycle` (see [`SandboxLifecycle`]).
    pub fn lifecycle(mut self, lifecycle: SandboxLifecycle) -> Self {
        self.lifecycle = Some(lifecycle);
        self
    }

    /// Seed 004's `on_timeout=`: what the timeout does. Giving `lifecycle.on_timeout`
    /// too is an error unless both say the same.
    pub fn on_timeout(mut self, on_timeout: OnTimeout) -> Self {
        self.on_timeout = Some(on_timeout);
        self
    }

    /// Seed 004's `auto_resume=`: preview traffic wakes the paused sandbox (needs
    /// `on_timeout` pause or hibernate).
    pub fn auto_resume(mut self, on: bool) -> Self {
        self.auto_resume = Some(on);
        self
    }

    /// Pauses instead of killing on timeout (`on_timeout(OnTimeout::Pause)`).
    pub fn pause_on_timeout(self) -> Self {
        self.on_timeout(OnTimeout::Pause)
    }

    /// Hibernates (pauses into object storage) instead of killing on timeout
    /// (`on_timeout(OnTimeout::Hibernate)`).
    pub fn hibernate_on_timeout(self) -> Self {
        self.on_timeout(OnTimeout::Hibernate)
    }

    /// Checks out a ready instance of the template's warm pool: `Require` fails with
    /// `warm_pool_unavailable` when none is ready, `Prefer` falls back to a restore.
    pub fn warm_pool(mut self, mode: WarmPoolMode) -> Self {
        self.warm_pool = Some(mode);
        self
    }

    /// Seed 004's `warm_pool_mode=`: the same as [`CreateOptions::warm_pool`].
    pub fn warm_pool_mode(mut self, mode: WarmPoolMode) -> Self {
        self.warm_pool_mode = Some(mode);
        self
    }

    /// Takes a periodic snapshot every `seconds` (10 to 86400; 0 turns them off).
    pub fn snapshot_every(mut self, seconds: u64) -> Self {
        self.snapshot_interval = Some(seconds);
        self
    }

    /// `false`: the create answers while the sandbox is still `starting`; wait with
    /// [`crate::Sandbox::wait_ready`] before running commands.
    ///
    /// ```no_run
    /// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// use nullspace::{CreateOptions, Sandbox};
    /// use std::time::Duration;
    /// let mut sbx = Sandbox::create(config, &CreateOptions::new("base").wait_ready(false)).await?;
    /// sbx.wait_ready(Duration::from_secs(60)).await?;
    /// # Ok(()) }
    /// ```
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = Some(wait);
        self
    }

    /// The REST body of the create these options describe, or `invalid_request` (an
    /// [`Error::Local`]) for options that conflict, naming them and what to send
    /// instead. Nothing is sent for a seed name left at its default.
    ///
    /// ```
    /// use nullspace::CreateOptions;
    /// let body = CreateOptions::new("base").allow_internet_access(false).to_body()?;
    /// assert_eq!(body["egress"], serde_json::json!({ "internet": false, "allow": [], "deny": [] }));
    /// # Ok::<(), nullspace::Error>(())
    /// ```
    pub fn to_body(&self) -> Result<Value> {
        let mut body = Map::new();
        match (&self.image, &self.snapshot) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "image and snapshot_named are each a start source; send one of them",
                ))
            }
            (Some((name, pin)), None) | (None, Some((name, pin))) => {
                let (n, p) = if self.image.is_some() {
                    ("imageName", "imageId")
                } else {
                    ("snapshotName", "snapshotId")
                };
                body.insert(n.into(), json!(name));
                if let Some(pin) = pin {
                    body.insert(p.into(), json!(pin));
                }
            }
            (None, None) => {
                let template = if self.template.is_empty() {
                    "base"
                } else {
                    &self.template
                };
                body.insert("templateID".into(), json!(template));
            }
        }
        if (self.image.is_some() || self.snapshot.is_some()) && !self.template.is_empty() {
            return Err(Error::invalid(format!(
                "template {:?} and image/snapshot_named are each a start source; send one of them",
                self.template
            )));
        }
        if let Some(r) = &self.region {
            body.insert("region".into(), json!(r));
        }
        if let Some(r) = self.recording {
            body.insert("recording".into(), json!(r));
        }
        if let Some(t) = self.timeout {
            body.insert("timeout".into(), json!(t));
        }
        if !self.metadata.is_empty() {
            body.insert("metadata".into(), json!(self.metadata));
        }
        if !self.envs.is_empty() {
            body.insert("envVars".into(), json!(self.envs));
        }
        if let Some(r) = &self.resources {
            body.insert("resources".into(), to_json(r)?);
        }
        if let Some(l) = self.lifecycle_body()? {
            body.insert("lifecycle".into(), l);
        }
        if let Some(s) = self.snapshot_interval {
            body.insert("snapshotInterval".into(), json!(s));
        }
        if let Some(m) = self.warm_pool_body()? {
            body.insert("warmPool".into(), json!(warm_pool_name(m)));
        }
        if let Some(e) = self.egress_body()? {
            body.insert("egress".into(), to_json(&e)?);
        }
        if let Some(p) = self.security_body()? {
            body.insert("securityPolicy".into(), p);
        }
        if self.wait_ready == Some(false) {
            body.insert("waitReady".into(), json!(false));
        }
        if !self.mounts.is_empty() {
            body.insert("mounts".into(), to_json(&self.mounts)?);
        }
        Ok(Value::Object(body))
    }

    /// `lifecycle` from seed 001's object and seed 004's keywords, which must agree.
    fn lifecycle_body(&self) -> Result<Option<Value>> {
        let from = self.lifecycle.unwrap_or_default();
        let on_timeout = agree("on_timeout", from.on_timeout, self.on_timeout, |o| {
            format!("{:?}", on_timeout_name(o))
        })?;
        let auto_resume = agree("auto_resume", from.auto_resume, self.auto_resume, |b| {
            b.to_string()
        })?;
        let idle_timeout = agree("idle_timeout", from.idle_timeout, self.idle_timeout, |s| {
            s.to_string()
        })?;
        if on_timeout.is_none() && auto_resume.is_none() && idle_timeout.is_none() {
            return Ok(None);
        }
        let mut l = Map::new();
        if let Some(o) = on_timeout {
            l.insert("onTimeout".into(), json!(on_timeout_name(o)));
        }
        if let Some(a) = auto_resume {
            l.insert("autoResume".into(), json!(a));
        }
        if let Some(s) = idle_timeout {
            l.insert("idleTimeout".into(), json!(s));
        }
        Ok(Some(Value::Object(l)))
    }

    fn warm_pool_body(&self) -> Result<Option<WarmPoolMode>> {
        match (self.warm_pool, self.warm_pool_mode) {
            (Some(a), Some(b)) if a != b => Err(Error::invalid(format!(
                "warm_pool {:?} and warm_pool_mode {:?} disagree; warm_pool_mode is seed 004's name of warm_pool: send one of them",
                warm_pool_name(a),
                warm_pool_name(b)
            ))),
            (a, b) => Ok(a.or(b)),
        }
    }

    fn egress_body(&self) -> Result<Option<EgressPolicy>> {
        if let Some(network) = &self.network {
            if self.egress.is_some() {
                return Err(Error::invalid(
                    "network (seed 001's SandboxNetworkOpts) and egress are two forms of the same policy; send one of them: network {allow_out, deny_out}, or egress {internet, allow, deny}",
                ));
            }
            // Seed 001: network overrides allow_internet_access, so no error for both.
            return network.to_egress().map(Some);
        }
        match (self.allow_internet_access, &self.egress) {
            (Some(false), Some(_)) => Err(Error::invalid(
                "allow_internet_access=false and egress both set the egress policy; send one of them: egress with internet false (and its allow list), or allow_internet_access=false alone",
            )),
            (Some(false), None) => Ok(Some(EgressPolicy {
                internet: false,
                allow: Vec::new(),
                deny: Vec::new(),
            })),
            (_, egress) => Ok(egress.clone()),
        }
    }

    fn security_body(&self) -> Result<Option<Value>> {
        match (self.secure, &self.security_policy) {
            (Some(false), Some(_)) => Err(Error::invalid(
                "secure=false turns the security proxy off and security_policy configures it; send one of them: security_policy (secure omitted or true), or secure=false alone",
            )),
            (_, Some(policy)) => policy.checked_body().map(Some),
            (Some(true), None) => Ok(Some(json!({}))),
            _ => Ok(None),
        }
    }
}

/// One setting given as `lifecycle.<name>` and as the keyword `<name>`: equal or error.
fn agree<T: Copy + PartialEq>(
    name: &str,
    in_lifecycle: Option<T>,
    keyword: Option<T>,
    show: impl Fn(T) -> String,
) -> Result<Option<T>> {
    match (in_lifecycle, keyword) {
        (Some(a), Some(b)) if a != b => Err(Error::invalid(format!(
            "lifecycle.{name} {} and {name} {} disagree; {name}= is seed 004's short form of lifecycle.{name}: send one of them",
            show(a),
            show(b)
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

fn to_json(v: &impl serde::Serialize) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(o: &CreateOptions) -> Value {
        o.to_body().unwrap()
    }

    fn refused(o: &CreateOptions) -> String {
        match o.to_body().unwrap_err() {
            Error::Local { code, message } => {
                assert_eq!(code, "invalid_request", "{message}");
                message
            }
            other => panic!("{other}"),
        }
    }

    fn net(allow: &[&str], deny: &[&str]) -> SandboxNetworkOpts {
        SandboxNetworkOpts {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn defaults_send_only_the_template_and_the_rest_keeps_its_rest_names() {
        assert_eq!(
            body(&CreateOptions::new("base")),
            json!({ "templateID": "base" })
        );
        let b = body(
            &CreateOptions::new("base")
                .timeout(60)
                .metadata("k", "v")
                .env("A", "1")
                .resources(1, 512, 1024)
                .snapshot_every(0)
                .warm_pool(WarmPoolMode::Prefer)
                .mount("/mnt/v", "vol", api_model::MountMode::Ro)
                .allow_internet_access(true)
                .secure(false)
                .wait_ready(true),
        );
        assert_eq!(
            b,
            json!({
                "templateID": "base", "timeout": 60, "metadata": { "k": "v" },
                "envVars": { "A": "1" },
                "resources": { "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 },
                "snapshotInterval": 0, "warmPool": "prefer",
                "mounts": { "/mnt/v": { "id": "vol", "type": "ro" } },
            })
        );
    }

    #[test]
    fn no_internet_access_is_a_closed_egress_and_conflicts_with_egress() {
        assert_eq!(
            body(&CreateOptions::new("base").allow_internet_access(false))["egress"],
            json!({ "internet": false, "allow": [], "deny": [] })
        );
        let m = refused(
            &CreateOptions::new("base")
                .allow_internet_access(false)
                .egress(EgressPolicy::default()),
        );
        assert!(
            m.contains("allow_internet_access") && m.contains("egress"),
            "{m}"
        );
        // True with egress is no conflict: the egress policy is what counts.
        let open = EgressPolicy {
            deny: vec!["10.0.0.0/8".into()],
            ..EgressPolicy::default()
        };
        assert_eq!(
            body(
                &CreateOptions::new("base")
                    .allow_internet_access(true)
                    .egress(open)
            )["egress"]["deny"],
            json!(["10.0.0.0/8"])
        );
    }

    #[test]
    fn network_translates_and_all_traffic_blocks_mean_no_internet() {
        let b = body(&CreateOptions::new("base").network(net(&["198.51.100.2"], &["0.0.0.0/0"])));
        assert_eq!(
            b["egress"],
            json!({ "internet": false, "allow": ["198.51.100.2"], "deny": [] })
        );
        let b = body(
            &CreateOptions::new("base").network(net(&[], &["::/0", "0.0.0.0/0", "203.0.113.0/24"])),
        );
        assert_eq!(
            b["egress"],
            json!({ "internet": false, "allow": [], "deny": ["203.0.113.0/24"] })
        );
        let b = body(&CreateOptions::new("base").network(net(&[], &["198.51.100.3"])));
        assert_eq!(
            b["egress"],
            json!({ "internet": true, "allow": [], "deny": ["198.51.100.3"] })
        );
        // network overrides allow_internet_access (seed 001), no error.
        let b = body(
            &CreateOptions::new("base")
                .allow_internet_access(false)
                .network(net(&[], &["198.51.100.3"])),
        );
        assert_eq!(b["egress"]["internet"], json!(true));
        let m = refused(
            &CreateOptions::new("base")
                .network(net(&[], &[]))
                .egress(EgressPolicy::default()),
        );
        assert!(m.contains("network") && m.contains("egress"), "{m}");
    }

    #[test]
    fn an_allow_out_entry_a_deny_out_entry_covers_is_refused_naming_both() {
        for (allow, deny) in [
            ("10.1.2.3", "10.0.0.0/8"),
            ("10.1.0.0/16", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3"),
            ("api.example.com", "api.example.com"),
            ("api.example.com", "*.example.com"),
            ("*.api.example.com", "*.example.com"),
            ("*.example.com", "*.example.com"),
        ] {
            let m = refused(&CreateOptions::new("base").network(net(&[allow], &[deny])));
            assert!(
                m.contains(&format!("{allow:?}"))
                    && m.contains(&format!("remove {deny:?} from deny_out")),
                "{m}"
            );
        }
        // Not covered: wider allows, other names, a wildcard and its bare domain.
        for (allow, deny) in [
            ("10.0.0.0/8", "10.1.0.0/16"),
            ("10.1.2.3", "10.1.2.4"),
            ("example.com", "*.example.com"),
            ("*.example.com", "example.com"),
            ("other.org", "*.example.com"),
        ] {
            assert!(
                CreateOptions::new("base")
                    .network(net(&[allow], &[deny]))
                    .to_body()
                    .is_ok(),
                "{allow} / {deny}"
            );
        }
        // The /0 blocks are dropped before the check: they mean "no internet".
        assert!(CreateOptions::new("base")
            .network(net(&["10.1.2.3"], &["0.0.0.0/0"]))
            .to_body()
            .is_ok());
        let m = refused(&CreateOptions::new("base").network(net(&["not a host"], &[])));
        assert!(m.starts_with("network.allow_out[0]:"), "{m}");
    }

    #[test]
    fn secure_and_the_security_policy() {
        assert_eq!(
            body(&CreateOptions::new("base").secure(true))["securityPolicy"],
            json!({})
        );
        assert!(body(&CreateOptions::new("base").secure(false))
            .get("securityPolicy")
            .is_none());
        let policy = SecurityPolicy::new()
            .injection_defense("flag")
            .mask_secret("TOKEN", ["api.example.com"]);
        let b = body(
            &CreateOptions::new("base")
                .env("TOKEN", "the-real-token-value")
                .secure(true)
                .security_policy(policy.clone()),
        );
        assert_eq!(
            b["securityPolicy"],
            json!({
                "injectionDefense": { "action": "flag" },
                "envMasking": { "secrets": [{ "name": "TOKEN", "hosts": ["api.example.com"] }] },
            })
        );
        // The real value travels in envVars under the secret's name.
        assert_eq!(b["envVars"], json!({ "TOKEN": "the-real-token-value" }));
        let m = refused(
            &CreateOptions::new("base")
                .secure(false)
                .security_policy(policy),
        );
        assert!(
            m.contains("secure=false") && m.contains("security_policy"),
            "{m}"
        );
    }

    #[test]
    fn the_policy_builders_and_its_rest_json() {
        let policy = SecurityPolicy::new()
            .pii_detector("email", "redact")
            .pii_detector("card", "block")
            .injection_defense("strip")
            .transform(json!({ "host": "*.example.com", "upstreamHost": "eu.example.com:8443" }))
            .transform(json!({ "host": "api.example.com", "responseHeaders": { "remove": ["set-cookie"] } }))
            .audit(false)
            .mask_secret("A_KEY", ["a.example.com", "*.b.example.com"])
            .mask_secret("B_KEY", vec!["b.example.com".to_string()]);
        let wire = json!({
            "pii": { "detectors": { "email": "redact", "card": "block" } },
            "injectionDefense": { "action": "strip" },
            "transforms": [
                { "host": "*.example.com", "upstreamHost": "eu.example.com:8443" },
                { "host": "api.example.com", "responseHeaders": { "remove": ["set-cookie"] } },
            ],
            "audit": { "enabled": false },
            "envMasking": { "secrets": [
                { "name": "A_KEY", "hosts": ["a.example.com", "*.b.example.com"] },
                { "name": "B_KEY", "hosts": ["b.example.com"] },
            ] },
        });
        assert_eq!(policy.checked_body().unwrap(), wire);
        // Its REST JSON (a file, a sandbox's description) reads back to the same policy.
        assert_eq!(SecurityPolicy::from_body(wire.clone()).unwrap(), policy);
        assert_eq!(SecurityPolicy::new().to_body(), json!({}));
        // audit: true is short for {"enabled": true}; nulls are parts left out.
        let short = SecurityPolicy::from_body(json!({ "audit": true, "pii": null })).unwrap();
        assert_eq!(short.to_body(), json!({ "audit": { "enabled": true } }));
    }

    #[test]
    fn a_policy_of_the_wrong_shape_is_refused_before_sending() {
        let invalid = |r: Result<Value>| match r.unwrap_err() {
            Error::Local { code, message } => {
                assert_eq!(code, "invalid_request", "{message}");
                message
            }
            other => panic!("{other}"),
        };
        let m = invalid(SecurityPolicy::from_body(json!({ "piii": {} })).map(|p| p.to_body()));
        assert!(m.contains("unknown keys [\"piii\"]"), "{m}");
        let m = invalid(SecurityPolicy::from_body(json!([])).map(|p| p.to_body()));
        assert!(m.contains("JSON object"), "{m}");
        let m = invalid(
            SecurityPolicy {
                transforms: Some(json!({ "host": "a.example.com" })),
                ..SecurityPolicy::default()
            }
            .checked_body(),
        );
        assert!(
            m.contains("security_policy.transforms must be a JSON array"),
            "{m}"
        );
        let m = refused(&CreateOptions::new("base").security_policy(SecurityPolicy {
            env_masking: Some(json!(true)),
            ..SecurityPolicy::default()
        }));
        assert!(
            m.contains("security_policy.env_masking must be a JSON object"),
            "{m}"
        );
    }

    #[test]
    fn lifecycle_and_its_keyword_forms_merge_or_disagree() {
        assert_eq!(
            body(
                &CreateOptions::new("base")
                    .on_timeout(OnTimeout::Pause)
                    .auto_resume(true)
            )["lifecycle"],
            json!({ "onTimeout": "pause", "autoResume": true })
        );
        assert_eq!(
            body(&CreateOptions::new("base").hibernate_on_timeout())["lifecycle"],
            json!({ "onTimeout": "hibernate" })
        );
        let both = CreateOptions::new("base")
            .lifecycle(SandboxLifecycle::new(OnTimeout::Pause))
            .on_timeout(OnTimeout::Pause)
            .auto_resume(true);
        assert_eq!(
            body(&both)["lifecycle"],
            json!({ "onTimeout": "pause", "autoResume": true })
        );
        let m = refused(
            &CreateOptions::new("base")
                .lifecycle(SandboxLifecycle::new(OnTimeout::Pause))
                .on_timeout(OnTimeout::Kill),
        );
        assert!(
            m.contains("lifecycle.on_timeout \"pause\"") && m.contains("on_timeout \"kill\""),
            "{m}"
        );
        let m = refused(
            &CreateOptions::new("base")
                .lifecycle(SandboxLifecycle::new(OnTimeout::Pause).auto_resume(true))
                .auto_resume(false),
        );
        assert!(m.contains("lifecycle.auto_resume true"), "{m}");
    }

    #[test]
    fn warm_pool_mode_is_warm_pool_and_wait_ready_false_is_sent() {
        let b = body(&CreateOptions::new("base").warm_pool_mode(WarmPoolMode::Require));
        assert_eq!(b["warmPool"], json!("require"));
        let b = body(
            &CreateOptions::new("base")
                .warm_pool(WarmPoolMode::Require)
                .warm_pool_mode(WarmPoolMode::Require),
        );
        assert_eq!(b["warmPool"], json!("require"));
        let m = refused(
            &CreateOptions::new("base")
                .warm_pool(WarmPoolMode::Require)
                .warm_pool_mode(WarmPoolMode::Prefer),
        );
        assert!(m.contains("warm_pool_mode"), "{m}");
        assert_eq!(
            body(&CreateOptions::new("base").wait_ready(false))["waitReady"],
            json!(false)
        );
    }

    #[test]
    fn seed_002_start_sources_region_and_the_idle_timeout() {
        let b = body(&CreateOptions::image("web", Some("tpl-1".into())).region("eu"));
        assert_eq!(
            b,
            json!({ "imageName": "web", "imageId": "tpl-1", "region": "eu" })
        );
        let b = body(&CreateOptions::snapshot_named("nightly", None));
        assert_eq!(b, json!({ "snapshotName": "nightly" }));
        assert_eq!(body(&CreateOptions::default())["templateID"], "base");
        let mut both = CreateOptions::image("web", None);
        both.template = "base".into();
        assert!(refused(&both).contains("start source"));
        let b = body(
            &CreateOptions::new("base")
                .lifecycle(SandboxLifecycle::new(OnTimeout::Pause).idle_timeout(30)),
        );
        assert_eq!(
            b["lifecycle"],
            json!({ "onTimeout": "pause", "idleTimeout": 30 })
        );
        let b = body(&CreateOptions::new("base").idle_timeout(60));
        assert_eq!(b["lifecycle"], json!({ "idleTimeout": 60 }));
        let clash = CreateOptions::new("base")
            .lifecycle(SandboxLifecycle::default().idle_timeout(30))
            .idle_timeout(60);
        assert!(refused(&clash).contains("idle_timeout"));
    }
}
