//! Sandbox egress: each VM's proxy serves under its sandbox's policy (one [`Gate`]
//! per sandbox, kept while the sandbox exists, so a policy set while it is paused holds
//! when it runs again), and policy changes on running sandboxes.

use super::Manager;
use crate::error::ApiError;
use crate::model::*;
use api_model::EgressPolicy;
use egress::{Gate, Upstream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::warn;
use vmm::{QemuVm, Vm};

/// How this host networks its VMs.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// `Ok`: every VM has its own namespace and an egress proxy; `Err(why)`: user-mode
    /// networking, and no policy but the open one can be enforced.
    pub isolated: Result<(), String>,
    /// Where the proxies send DNS lookups.
    pub upstream: Upstream,
    /// How the security proxy verifies upstream servers (public roots, plus
    /// `--egress-extra-ca`).
    pub upstream_tls: Arc<rustls::ClientConfig>,
}

/// Why egress rules cannot be enforced under `--network user`.
pub const USER_MODE_NETWORK: &str =
    "the pool manager runs with --network user: every guest is offline (QEMU user-mode networking, restricted)";

impl NetworkSettings {
    /// A warning for people reading the summary and the log, under user-mode networking.
    pub fn warning(&self) -> Option<String> {
        self.isolated.as_ref().err().map(|why| {
            format!("{why}; egress policies cannot be enforced: restart it with --network auto on a host that can isolate VMs (nullspace-pool-manager check)")
        })
    }
}

/// The gates of this host's sandboxes.
pub(super) struct Network {
    pub settings: NetworkSettings,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl Network {
    pub fn new(settings: NetworkSettings) -> Self {
        Self {
            settings,
            gates: Mutex::default(),
        }
    }

    fn gate(&self, sandbox: &str, policy: &EgressPolicy) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap()
            .entry(sandbox.to_string())
            .or_insert_with(|| Gate::new(policy.compile().unwrap_or_else(|_| closed())))
            .clone()
    }

    /// The sandbox's gate, if it has one (its VM was served since this daemon started).
    pub fn existing_gate(&self, sandbox: &str) -> Option<Arc<Gate>> {
        self.gates.lock().unwrap().get(sandbox).cloned()
    }

    /// Forgets a sandbox's gate (it is gone).
    pub fn forget(&self, sandbox: &str) {
        self.gates.lock().unwrap().remove(sandbox);
    }

    /// Refuses a security policy where there is no egress proxy to intercept with.
    pub fn check_security(&self) -> Result<(), ApiError> {
        match &self.settings.isolated {
            Err(why) => Err(ApiError::not_implemented(
                "securityPolicy",
                format!(
                    "this host cannot intercept a sandbox's connections ({why}); omit securityPolicy, or run the pool manager with --network auto on a host that can isolate VMs"
                ),
            )),
            Ok(()) => Ok(()),
        }
    }

    /// Refuses a policy this host cannot enforce.
    pub fn check(&self, policy: &EgressPolicy) -> Result<(), ApiError> {
        match &self.settings.isolated {
            Err(why) if !policy.is_open() => Err(ApiError::not_implemented(
                "egress",
                format!(
                    "this host cannot enforce egress rules ({why}); omit egress, or run the pool manager with --network auto on a host that can isolate VMs"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What a stored policy that no longer parses becomes: nothing out (never more open
/// than what was asked).
fn closed() -> api_model::CompiledEgress {
    api_model::CompiledEgress {
        internet: false,
        allow: Vec::new(),
        deny: Vec::new(),
    }
}

impl Manager {
    /// Makes `vm` the sandbox's: it goes into the sandbox's `slot` (whose lock the
    /// caller holds), the record notes its directory (a restart adopts it from there),
    /// and its egress is served under the sandbox's policy. Every way a VM becomes a
    /// sandbox's (create, checkout, resume, restore, fork, adoption) goes through here.
    pub(super) fn install(
        &self,
        record: &mut SandboxRecord,
        mut vm: QemuVm,
        slot: &mut Option<QemuVm>,
    ) {
        record.vm_dir = Some(vm.dir().display().to_string());
        self.seat(record, &mut vm);
        *slot = Some(vm);
    }

    /// Starts serving `vm`'s egress under `record`'s policy. A VM already served (a
    /// warm one) keeps its proxy: its gate takes the policy and becomes the sandbox's,
    /// so a checkout registers no sockets. Nothing to do under user-mode networking.
    fn seat(&self, record: &SandboxRecord, vm: &mut QemuVm) {
        if let Some(serving) = vm.held::<egress::Serving>() {
            let gate = serving.gate().clone();
            // Interception first: a connection let out by the new policy before its
            // session were set would never be inspected.
            self.secure_gate(record, &gate);
            gate.set(record.egress.compile().unwrap_or_else(|_| closed()));
            self.network
                .gates
                .lock()
                .unwrap()
                .insert(record.id.clone(), gate);
            return;
        }
        let gate = self.network.gate(&record.id, &record.egress);
        self.secure_gate(record, &gate);
        serve(vm, gate, self.network.settings.upstream, &record.id);
    }

    /// Serves a warm VM's egress before anyone owns it, with nothing allowed until a
    /// checkout [`Manager::seat`]s it.
    pub(super) fn prepare_egress(&self, vm: &mut QemuVm) {
        let label = vm.id().to_string();
        serve(
            vm,
            Gate::new(closed()),
            self.network.settings.upstream,
            &label,
        );
    }

    /// Serves the egress of a VM that belongs to no sandbox (a template build) with the
    /// open policy.
    pub(super) fn seat_open(&self, vm: &mut QemuVm, label: &str) {
        let gate = Gate::new(EgressPolicy::default().compile().expect("open policy"));
        serve(vm, gate, self.network.settings.upstream, label);
    }

    /// Replaces a sandbox's policy. A running sandbox's new connections and lookups
    /// follow it at once, and its open connections the policy no longer allows are cut.
    pub async fn set_egress(
        &self,
        team: &str,
        id: &str,
        policy: EgressPolicy,
    ) -> Result<SandboxView, ApiError> {
        let compiled = policy.compile()?;
        self.network.check(&policy)?;
        let (_guard, mut r) = self.lock_owned(team, id).await?;
        if matches!(r.state, InternalState::Deleted | InternalState::Destroying) {
            return Err(ApiError::conflict(format!("sandbox {id} is deleted")));
        }
        r.egress = policy;
        self.catalog.put_sandbox(&r)?;
        self.catalog.append_event(
            id,
            "sandbox.egress_updated",
            &serde_json::json!({ "egress": r.egress }),
        )?;
        if let Some(gate) = self.network.gates.lock().unwrap().get(id) {
            gate.set(compiled);
        }
        Ok(self.view(&r, true))
    }
}

/// Starts `vm`'s proxy under `gate` (a VM on user-mode networking, or one already
/// served, has no sockets left to serve).
fn serve(vm: &mut QemuVm, gate: Arc<Gate>, upstream: Upstream, label: &str) {
    let Some(sockets) = vm.take_egress() else {
        return;
    };
    let span = tracing::info_span!("egress", sandbox = %label);
    let _in_span = span.enter();
    match egress::serve(sockets.tcp, sockets.dns, gate, upstream) {
        Ok(serving) => vm.hold(serving),
        Err(e) => warn!(error = %e, "the VM's egress proxy did not start: it has no network"),
    }
}
