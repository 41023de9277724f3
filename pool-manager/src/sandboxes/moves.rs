//! Sandboxes changing hosts: failover of a host that stopped heartbeating, the drain
//! an operator asks for, and the fence a host that lost its sandboxes puts up.
//!
//! Every host watches the cluster ([`Manager::watch_cluster`]). A dead host (no
//! heartbeat for `HEARTBEAT_EXPIRY_MS`) is declared lost by exactly one host (a
//! conditional update), which takes its sandboxes over: a hibernated one moves as it is
//! (its snapshot is in the shared store, and resumes on its new host under the same
//! ID), a deleting one is deleted, any other (running: its memory and disk were on the
//! lost host) becomes `error` with `host_lost`. Each move is a new ownership epoch: the
//! lost host, if it comes back, can write none of them again, and when it sees itself
//! declared lost it ends the VMs of sandboxes that are no longer its own before it
//! takes placements again.
//!
//! A draining host hibernates its sandboxes one by one, hands each to another ready
//! host (which resumes it: same ID, files and processes), and ends `drained`. That host
//! must share this one's snapshot store (the hosts' `store` identity) and restore its
//! snapshots (same QEMU, accelerator and image set); a sandbox no such host can take
//! keeps running here, and the drain waits. A host
//! drained live (`draining-live`) first migrates each running sandbox live
//! (`migrate.rs`); one that cannot (no compatible host, a failed migration)
//! hibernates and moves as above.

use super::Manager;
use crate::catalog::HostRecord;
use crate::model::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use vmm::Vm;

/// How often a host looks at the cluster.
const WATCH_EVERY: Duration = Duration::from_secs(2);

impl Manager {
    /// Runs for the daemon's life: failover of lost hosts, this host's drain and fence,
    /// and resumes of sandboxes a drain moved here.
    pub async fn watch_cluster(self: Arc<Self>) {
        let Some(me) = crate::cluster::this_host() else {
            return;
        };
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let hosts = match self.catalog.hosts() {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "the cluster watch could not read the hosts");
                    continue;
                }
            };
            let Some(mine) = hosts.iter().find(|h| h.info.id == me) else {
                continue;
            };
            match mine.state.as_str() {
                "lost" => self.fence(me).await,
                "draining" => self.drain_step(me, &hosts, false).await,
                "draining-live" => self.drain_step(me, &hosts, true).await,
                _ => {}
            }
            if mine.state == "ready" {
                for h in hosts.iter().filter(|h| h.state == "dead") {
                    self.take_over_lost(me, h).await;
                }
            }
            self.resume_moved_here().await;
        }
    }

    /// This host was declared lost (it stopped heartbeating long enough): the VMs of
    /// sandboxes that moved away end, then it takes placements again.
    async fn fence(&self, me: &str) {
        for (id, slot) in self.all_slots() {
            let owner = self
                .catalog
                .sandbox(&id)
                .ok()
                .flatten()
                .and_then(|r| r.host_id);
            if owner.as_deref().is_some_and(|o| o != me) {
                if let Some(vm) = slot.lock().await.take() {
                    warn!(sandbox = %id, owner = ?owner, "ending the VM of a sandbox that moved to another host while this one was lost");
                    vm.kill().await;
                }
                self.slots.lock().unwrap().remove(&id);
            }
        }
        if let Err(e) = self.catalog.set_host_state(me, "ready") {
            warn!(error = %e, "rejoining the cluster failed");
        } else {
            info!(host = %me, "rejoined the cluster after being declared lost");
        }
    }

    /// Takes over the sandboxes of `lost` (dead: its heartbeat expired) if this host
    /// wins the claim.
    async fn take_over_lost(&self, me: &str, lost: &HostRecord) {
        match self.catalog.declare_lost(&lost.info.id, lost.heartbeat_ms) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(host = %lost.info.id, error = %e, "declaring a dead host lost failed");
                return;
            }
        }
        warn!(host = %lost.info.id, by = %me, "host lost: taking its sandboxes over");
        let records = match self.catalog.sandboxes_of_host(&lost.info.id) {
            Ok(r) => r,
            Err(e) => {
                warn!(host = %lost.info.id, error = %e, "listing a lost host's sandboxes failed");
                return;
            }
        };
        for r in records {
            let from = lost.info.id.clone();
            let hibernated = r.state == InternalState::Stopped && r.hibernated.is_some();
            let moved = self.catalog.reassign(&r.id, &from, me, |r| {
                if hibernated {
                    r.step("paused", Some(format!("moved from lost host {from}")));
                } else if r.state == InternalState::Destroying {
                    r.state = InternalState::Deleted;
                    r.step("deleted", Some(format!("its host {from} was lost mid-delete")));
                } else {
                    r.state = InternalState::Failed;
                    r.vm_dir = None;
                    r.pause_snapshot = None;
                    r.diagnostic = Some(Diagnostic {
                        code: "host_lost".into(),
                        message: format!(
                            "its host {from} stopped heartbeating; the sandbox's memory and disk were on that host"
                        ),
                        action: "create a new sandbox, or restore one of its stored snapshots".into(),
                    });
                    r.step("error", Some(format!("host {from} lost")));
                }
            });
            let moved = match moved {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    warn!(sandbox = %r.id, error = %e, "taking a sandbox over failed");
                    continue;
                }
            };
            let event = if hibernated {
                (
                    "sandbox.moved",
                    json!({ "from": from, "to": me, "reason": "host_lost", "state": "paused" }),
                )
            } else {
                (
                    "sandbox.error",
                    json!({ "state": moved.state.public(), "from": r.state.public(), "reason": "host_lost", "host": from }),
                )
            };
            let _ = self.catalog.append_event(&moved.id, event.0, &event.1);
            if !hibernated {
                // Its volume holds are the lost host's to give back; the images were
                // on that host, so nothing is saved.
                self.release_volumes(&moved).await;
            }
            info!(sandbox = %moved.id, from = %from, to = %me, state = ?moved.state, "taken over from a lost host");
        }
    }

    /// One pass of this host's drain: running sandboxes migrate live (when `live`) or
    /// hibernate, locally paused ones resume and hibernate, hibernated ones move to
    /// another ready host (which resumes them); once none is left the host is
    /// `drained`.
    async fn drain_step(self: &Arc<Self>, me: &str, hosts: &[HostRecord], live: bool) {
        let Ok(mine) = self.catalog.sandboxes_in(&["active", "stopped"]) else {
            return;
        };
        if mine.is_empty() {
            if self.catalog.set_host_state(me, "drained").is_ok() {
                info!(host = %me, "drained: no sandbox left here");
            }
            return;
        }
        for r in mine {
            let team = r.team_id.clone();
            if live && r.state == InternalState::Active {
                match self
                    .migrate(
                        &r.id,
                        None,
                        Some(std::time::Duration::from_millis(
                            api_model::DEFAULT_POSTCOPY_AFTER_MS,
                        )),
                    )
                    .await
                {
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(sandbox = %r.id, error = %e.message, "drain: the live migration failed; hibernating it instead")
                    }
                }
            }
            // The host it goes to must read its hibernate snapshot (the same store) and
            // restore it (the same QEMU, accelerator and image set): chosen before it is
            // hibernated, so that one no host can take runs on here meanwhile.
            let need = crate::catalog::Allocation {
                vcpus: u64::from(r.resources.vcpus),
                mem_mib: u64::from(r.resources.mem_mib),
                disk_mib: r.resources.disk_mib,
            };
            let Some(me_record) = hosts.iter().find(|h| h.info.id == me) else {
                return;
            };
            let excluded: std::collections::HashSet<String> = [me.to_string()].into();
            let compatible = |h: &HostRecord| {
                h.info.qemu == me_record.info.qemu
                    && h.info.accel == me_record.info.accel
                    && h.info.image_set == me_record.info.image_set
                    && h.info.shares_store_with(&me_record.info)
            };
            let Some(target) =
                crate::cluster::placement::choose(hosts, need, "", false, compatible, &excluded)
            else {
                warn!(sandbox = %r.id, "drain: no other ready host with room, the same QEMU, accelerator and image set, and this host's snapshot store can take it; it stays here, retried on the next pass");
                continue;
            };
            if r.state == InternalState::Stopped && r.hibernated.is_none() {
                if let Err(e) = self.resume(&team, &r.id).await {
                    warn!(sandbox = %r.id, error = %e.message, "drain: resuming a paused sandbox to move it failed");
                    continue;
                }
            }
            if r.hibernated.is_none() {
                if let Err(e) = self.hibernate(&team, &r.id).await {
                    warn!(sandbox = %r.id, error = %e.message, "drain: hibernating failed; retried on the next pass");
                    continue;
                }
            }
            let to = target.info.id.clone();
            match self.catalog.reassign(&r.id, me, &to, |r| {
                r.resume_after_move = true;
                r.step(
                    "paused",
                    Some(format!("moved to host {to} by a drain of {me}")),
                );
            }) {
                Ok(Some(moved)) => {
                    self.slots.lock().unwrap().remove(&moved.id);
                    let _ = self.catalog.append_event(
                        &moved.id,
                        "sandbox.moved",
                        &json!({ "from": me, "to": to, "reason": "drain", "state": "paused" }),
                    );
                    info!(sandbox = %moved.id, to = %to, "drain: moved");
                }
                Ok(None) => {}
                Err(e) => warn!(sandbox = %r.id, error = %e, "drain: moving failed"),
            }
        }
    }

    /// Sandboxes a drain moved here: resumed (their processes and files came along in
    /// the hibernate snapshot). One that fails to resume stays paused for its owner to
    /// connect.
    async fn resume_moved_here(&self) {
        let Ok(stopped) = self.catalog.sandboxes_in(&["stopped"]) else {
            return;
        };
        for mut r in stopped.into_iter().filter(|r| r.resume_after_move) {
            r.resume_after_move = false;
            if self.catalog.put_sandbox(&r).is_err() {
                continue;
            }
            match self.resume(&r.team_id, &r.id).await {
                Ok(_) => info!(sandbox = %r.id, "resumed after a move"),
                Err(e) => {
                    warn!(sandbox = %r.id, error = %e.message, "resuming a moved sandbox failed; it stays paused")
                }
            }
        }
    }
}
