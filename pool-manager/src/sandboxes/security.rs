//! Sandbox security policies: the TLS-intercepting proxy (`intercept`) on a sandbox's
//! egress, and what it needs around it.
//!
//! - At create the policy is checked and each masked secret gets its placeholder; the
//!   secret's real value, sent in `envVars`, leaves the environment the guest gets
//!   (which holds the placeholder) for the record's `secret_values`, which only the
//!   proxy reads. Snapshots, forks and templates are made of the VM, so never hold it.
//! - Every VM that becomes the sandbox's gets the team's CA in its trust stores before
//!   anyone runs anything in it ([`Manager::secure_guest`]): the system bundle, and
//!   `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS` in its environment.
//! - Its egress gate intercepts with a [`Session`] of the team CA, the policy and an
//!   audit sink whose records a writer task batches into the catalog (bounded per
//!   sandbox, `GET /sandboxes/{id}/audit`); requests with a detection or an action
//!   other than `allowed` are also `sandbox.audit` events.
//! - The policy changes live ([`Manager::set_security_policy`]); secrets keep their
//!   placeholders (the guest's environment holds them), and a secret the create did
//!   not give a value for cannot be added.

use super::Manager;
use crate::error::ApiError;
use crate::model::*;
use egress::Gate;
use intercept::{AuditRecord, SecurityPolicy, Session, TeamCa};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{warn, Instrument};

/// Where the team CA goes in the guest (also `NODE_EXTRA_CA_CERTS`).
pub const GUEST_CA_FILE: &str = "/usr/local/share/ca-certificates/nullspace-team-ca.crt";
/// The system bundle the team CA is appended to (also `SSL_CERT_FILE` and
/// `REQUESTS_CA_BUNDLE`).
pub const GUEST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Most audit records queued between the proxy and the catalog per sandbox; past it
/// records are dropped (and counted) rather than held.
const AUDIT_QUEUE: usize = 1024;
/// Most records written in one catalog transaction.
const AUDIT_BATCH: usize = 512;
/// How long the writer gathers records before a write.
const AUDIT_LINGER: Duration = Duration::from_millis(200);
/// Most records one `sandbox.audit` event carries.
const AUDIT_EVENT_RECORDS: usize = 20;
/// Least time between two `sandbox.audit` events of one sandbox: a guest causing
/// detections in a loop must not fill the event log (the audit has every record).
const AUDIT_EVENT_EVERY: Duration = Duration::from_secs(5);
/// Largest audit page.
pub const MAX_AUDIT_PAGE: usize = 1000;

/// Each team's CA, loaded from the catalog once per daemon.
#[derive(Default)]
pub(super) struct TeamCas(Mutex<HashMap<String, Arc<TeamCa>>>);

/// A create's policy, ready for its record.
pub(super) struct Planned {
    pub policy: Option<SecurityPolicy>,
    pub secret_values: SecretValues,
}

/// Checks a create's `securityPolicy`, fills its placeholders, and moves its secrets'
/// values out of `env` (which gets the placeholders and the CA variables instead).
pub(super) fn plan(
    body: Option<&serde_json::Value>,
    env: &mut BTreeMap<String, String>,
) -> Result<Planned, ApiError> {
    let Some(body) = body else {
        return Ok(Planned {
            policy: None,
            secret_values: SecretValues::default(),
        });
    };
    let mut policy = parse(body)?;
    policy.fill_placeholders();
    let mut values = BTreeMap::new();
    for s in &policy.env_masking.secrets {
        let value = env.remove(&s.name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "securityPolicy.envMasking: the secret {:?} has no value; send its real value in envVars under the same name (the guest only ever sees a placeholder)",
                s.name
            ))
            .with_details(serde_json::json!({ "field": "envVars", "name": s.name }))
        })?;
        values.insert(s.name.clone(), value);
    }
    let values = SecretValues(values);
    compile(&policy, &values)?;
    // The value under another name (a copy, a URL embedding it) would reach the guest.
    for (name, value) in env.iter() {
        if let Some(secret) = values.iter().find(|(_, v)| value.contains(v.as_str())) {
            return Err(ApiError::bad_request(format!(
                "envVars.{name} contains the value of the masked secret {:?}; the guest must only see its placeholder: leave the value out of {name} (the proxy inserts it into requests' headers)",
                secret.0
            ))
            .with_details(serde_json::json!({ "field": "envVars", "name": name })));
        }
    }
    for var in CA_ENV.map(|(k, _)| k) {
        if env.contains_key(var) {
            return Err(ApiError::bad_request(format!(
                "envVars.{var} is the security proxy's to set (the guest's trust store with the team CA); omit it, or put your CA in the image's system store"
            ))
            .with_details(serde_json::json!({ "field": "envVars", "name": var })));
        }
    }
    for s in &policy.env_masking.secrets {
        env.insert(s.name.clone(), s.placeholder.clone().expect("filled"));
    }
    add_ca_env(env);
    Ok(Planned {
        policy: Some(policy),
        secret_values: values,
    })
}

/// The trust-store variables for runtimes that ignore the system store.
const CA_ENV: [(&str, &str); 3] = [
    ("SSL_CERT_FILE", GUEST_BUNDLE),
    ("REQUESTS_CA_BUNDLE", GUEST_BUNDLE),
    ("NODE_EXTRA_CA_CERTS", GUEST_CA_FILE),
];

/// Sets [`CA_ENV`] (a create refuses them from the caller; a live change overrides).
fn add_ca_env(env: &mut BTreeMap<String, String>) {
    for (k, v) in CA_ENV {
        env.insert(k.to_string(), v.to_string());
    }
}

/// A policy from its JSON, refused with the reason when it is not one.
fn parse(body: &serde_json::Value) -> Result<SecurityPolicy, ApiError> {
    let policy: SecurityPolicy = serde_json::from_value(body.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "securityPolicy: {e}; send an object of pii, injectionDefense, transforms, audit and envMasking (docs/SECURITY.md)"
        ))
        .with_details(serde_json::json!({ "field": "securityPolicy" }))
    })?;
    policy.validate().map_err(policy_error)?;
    Ok(policy)
}

fn policy_error(e: intercept::PolicyError) -> ApiError {
    ApiError::bad_request(format!("securityPolicy: {e}"))
        .with_details(serde_json::json!({ "field": "securityPolicy" }))
}

/// The compiled policy with the values there are: a secret without a value (a restore
/// of a sandbox this catalog does not hold) keeps its placeholder everywhere.
fn compile(
    policy: &SecurityPolicy,
    values: &SecretValues,
) -> Result<intercept::CompiledPolicy, ApiError> {
    let mut usable = policy.clone();
    usable
        .env_masking
        .secrets
        .retain(|s| values.contains_key(&s.name));
    let values: HashMap<String, String> = values.0.clone().into_iter().collect();
    usable.compile(&values).map_err(policy_error)
}

impl Manager {
    /// The team's CA: the catalog's, or a new one stored there.
    fn team_ca(&self, team: &str) -> Result<Arc<TeamCa>, ApiError> {
        if let Some(ca) = self.team_cas.0.lock().unwrap().get(team) {
            return Ok(ca.clone());
        }
        let (cert, key) = self.catalog.team_ca(team, || {
            let ca = TeamCa::generate(team).map_err(|e| e.to_string())?;
            Ok((ca.cert_pem().to_string(), ca.key_pem().to_string()))
        })?;
        let ca = Arc::new(
            TeamCa::from_pem(&cert, &key)
                .map_err(|e| ApiError::internal(format!("the CA of team {team}: {e}")))?,
        );
        self.team_cas
            .0
            .lock()
            .unwrap()
            .insert(team.to_string(), ca.clone());
        Ok(ca)
    }

    /// Puts `record`'s policy on its egress `gate`: the session it has takes the policy,
    /// or a new one starts (with its audit writer). A record without a policy leaves
    /// the gate at the connection level.
    pub(super) fn secure_gate(&self, record: &SandboxRecord, gate: &Arc<Gate>) {
        let Some(policy) = &record.security_policy else {
            gate.set_security(None);
            return;
        };
        let compiled = match compile(policy, &record.secret_values) {
            Ok(c) => c,
            Err(e) => {
                // Stored policies were checked when sent: this is a catalog from a newer
                // build, or tampered with. Nothing goes out rather than unchecked.
                warn!(sandbox = %record.id, error = %e.message, "the stored security policy does not compile; the sandbox's egress is closed");
                gate.set(api_model::CompiledEgress {
                    internet: false,
                    allow: Vec::new(),
                    deny: Vec::new(),
                });
                return;
            }
        };
        if let Some(session) = gate.security() {
            session.set_policy(compiled);
            return;
        }
        let ca = match self.team_ca(&record.team_id) {
            Ok(ca) => ca,
            Err(e) => {
                warn!(sandbox = %record.id, error = %e.message, "no team CA; the sandbox's egress is closed");
                gate.set(api_model::CompiledEgress {
                    internet: false,
                    allow: Vec::new(),
                    deny: Vec::new(),
                });
                return;
            }
        };
        let (sink, records) = intercept::ChannelSink::new(AUDIT_QUEUE);
        let session = Session::new(
            ca,
            self.network.settings.upstream_tls.clone(),
            compiled,
            Arc::new(sink),
        )
        .with_connector(Arc::new(egress::GateConnector::new(gate)))
        .with_host_check({
            // Weak: the gate holds the session.
            let gate = Arc::downgrade(gate);
            Arc::new(move |host: &str| gate.upgrade().is_some_and(|g| g.name_allowed(host)))
        });
        gate.set_security(Some(Arc::new(session)));
        let span = tracing::info_span!("audit", sandbox = %record.id);
        tokio::spawn(
            write_audit(self.catalog.clone(), record.id.clone(), records).instrument(span),
        );
    }

    /// Installs the team CA in `vm`'s trust stores when `record` has a policy: before
    /// the VM is the sandbox's, so nothing runs in it without. A restore of another
    /// sandbox's snapshot gets this team's CA, replacing whatever the bundle had of
    /// ours.
    pub(super) async fn secure_guest(
        &self,
        record: &SandboxRecord,
        vm: &vmm::QemuVm,
    ) -> Result<(), ApiError> {
        if record.security_policy.is_none() {
            return Ok(());
        }
        let ca = self.team_ca(&record.team_id)?;
        let pem = ca.cert_pem().trim();
        let script = format!(
            r#"set -e
mkdir -p "$(dirname {GUEST_CA_FILE})" "$(dirname {GUEST_BUNDLE})"
cat >{GUEST_CA_FILE}.tmp <<'NULLSPACE_CA'
{pem}
NULLSPACE_CA
mv -f {GUEST_CA_FILE}.tmp {GUEST_CA_FILE}
touch {GUEST_BUNDLE}
{{ sed '/^# nullspace team CA begin$/,/^# nullspace team CA end$/d' {GUEST_BUNDLE}
  echo '# nullspace team CA begin'; cat {GUEST_CA_FILE}; echo '# nullspace team CA end'
}} >{GUEST_BUNDLE}.tmp
mv -f {GUEST_BUNDLE}.tmp {GUEST_BUNDLE}"#
        );
        // A failure here is the guest's doing (it is root in its VM): said as such.
        super::volumes::guest_root(vm, &script).await.map_err(|e| {
            ApiError::conflict(format!(
                "installing the team CA in the guest failed ({}); its TLS through the security proxy would fail: check {GUEST_BUNDLE} and {GUEST_CA_FILE} in the guest (regular files, writable by root)",
                e.message
            ))
        })
    }

    /// Replaces a sandbox's security policy. Its secrets must be the ones it was
    /// created with (or fewer); each keeps its placeholder. A sandbox that had none
    /// gets the CA in its guest now (running) or when it next runs.
    pub async fn set_security_policy(
        &self,
        team: &str,
        id: &str,
        body: serde_json::Value,
    ) -> Result<SandboxView, ApiError> {
        let mut policy = parse(&body)?;
        self.network.check_security()?;
        let (guard, mut r) = self.lock_owned(team, id).await?;
        if matches!(r.state, InternalState::Deleted | InternalState::Destroying) {
            return Err(ApiError::conflict(format!("sandbox {id} is deleted")));
        }
        let old: BTreeMap<String, String> = r
            .security_policy
            .iter()
            .flat_map(|p| &p.env_masking.secrets)
            .filter_map(|s| Some((s.name.clone(), s.placeholder.clone()?)))
            .collect();
        for s in &mut policy.env_masking.secrets {
            let Some(kept) = old.get(&s.name) else {
                return Err(ApiError::bad_request(format!(
                    "securityPolicy.envMasking: {:?} was not a masked secret of this sandbox; secrets are given (with their values in envVars) at create only: create a new sandbox with it, or leave it out",
                    s.name
                ))
                .with_details(serde_json::json!({ "field": "securityPolicy" })));
            };
            match &s.placeholder {
                Some(p) if p != kept => {
                    return Err(ApiError::bad_request(format!(
                        "securityPolicy.envMasking: the placeholder of {:?} is {kept:?} (the guest's environment holds it); omit placeholder or send that one",
                        s.name
                    ))
                    .with_details(serde_json::json!({ "field": "securityPolicy" })))
                }
                _ => s.placeholder = Some(kept.clone()),
            }
        }
        compile(&policy, &r.secret_values)?;
        let newly = r.security_policy.is_none();
        if newly {
            if let Some(vm) = guard.as_ref() {
                let probe = SandboxRecord {
                    security_policy: Some(policy.clone()),
                    ..r.clone()
                };
                self.secure_guest(&probe, vm).await?;
            }
            add_ca_env(&mut r.env_vars);
        }
        // Secrets left out are gone: their values with them.
        r.secret_values
            .retain(|name, _| policy.env_masking.secrets.iter().any(|s| &s.name == name));
        r.security_policy = Some(policy);
        self.catalog.put_sandbox(&r)?;
        self.catalog.append_event(
            id,
            "sandbox.security_policy_updated",
            &serde_json::json!({ "securityPolicy": r.security_policy }),
        )?;
        if let Some(gate) = self.network.existing_gate(id) {
            self.secure_gate(&r, &gate);
        }
        drop(guard);
        Ok(self.view(&r, true))
    }

    /// A page of the sandbox's audit: records with IDs above `after`, oldest first.
    pub fn audit(
        &self,
        team: &str,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<serde_json::Value, ApiError> {
        self.owned(team, id)?;
        if limit == 0 || limit > MAX_AUDIT_PAGE {
            return Err(ApiError::bad_request(format!(
                "limit must be 1 to {MAX_AUDIT_PAGE}; omit it for 100"
            ))
            .with_details(serde_json::json!({ "field": "limit" })));
        }
        let page = self.catalog.audit(id, after, limit)?;
        let next = page.records.last().map_or(after, |(seq, _)| *seq);
        let records: Vec<serde_json::Value> = page
            .records
            .into_iter()
            .map(|(seq, mut r)| {
                if let Some(o) = r.as_object_mut() {
                    o.insert("id".into(), seq.into());
                }
                r
            })
            .collect();
        Ok(serde_json::json!({ "records": records, "next": next, "more": page.more }))
    }
}

/// Writes a sandbox's audit records to the catalog in batches until its session ends
/// (every sender dropped with it).
async fn write_audit(
    catalog: Arc<crate::catalog::Catalog>,
    sandbox: String,
    mut records: tokio::sync::mpsc::Receiver<AuditRecord>,
) {
    let mut batch: Vec<AuditRecord> = Vec::new();
    let mut last_event: Option<tokio::time::Instant> = None;
    let mut unreported = 0usize;
    while let Some(first) = records.recv().await {
        batch.push(first);
        let until = tokio::time::Instant::now() + AUDIT_LINGER;
        while batch.len() < AUDIT_BATCH {
            match tokio::time::timeout_at(until, records.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let notable: Vec<&AuditRecord> = batch
            .iter()
            .filter(|r| !r.detections.is_empty() || r.action != "allowed")
            .collect();
        unreported += notable.len();
        let mut events = Vec::new();
        let due = last_event.is_none_or(|at| at.elapsed() >= AUDIT_EVENT_EVERY);
        if !notable.is_empty() && due {
            // `total`: the notable records since the last event (these and any batched
            // between); GET /audit has them all.
            events.push((
                "sandbox.audit",
                serde_json::json!({
                    "records": notable.iter().take(AUDIT_EVENT_RECORDS).collect::<Vec<_>>(),
                    "total": unreported,
                }),
            ));
            last_event = Some(tokio::time::Instant::now());
            unreported = 0;
        }
        let values: Vec<serde_json::Value> = batch
            .drain(..)
            .map(|r| serde_json::to_value(r).expect("json"))
            .collect();
        let (catalog, id) = (catalog.clone(), sandbox.clone());
        let written = tokio::task::spawn_blocking(move || {
            let events: Vec<(&str, serde_json::Value)> = events;
            catalog.append_audit(&id, &values, &events)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "writing audit records failed; they are lost"),
            Err(e) => warn!(error = %e, "the audit writer failed"),
        }
    }
}
