//! Live migration: a running sandbox moves to another host of the cluster while its
//! guest runs, paused only for the last pass of RAM.
//!
//! The source (the owner) drives it ([`Manager::migrate`]):
//! 1. The destination is asked to start a VM waiting for the migration
//!    ([`Manager::accept_migration`], `POST /v1/internal/migrations/{id}`).
//! 2. The disk is mirrored to the destination's NBD export, then RAM is copied by
//!    pre-copy with auto-converge (`vmm`'s `qemu/live.rs`); QEMU's streams go to
//!    sockets in the VM directory, which this host carries to the destination through
//!    HTTP upgrades (`GET /v1/internal/migrations/{id}/{disk|ram}`).
//! 3. Switch-over: the catalog hands the sandbox to the destination in the next
//!    ownership epoch (the source's later writes are refused), then the destination
//!    runs the VM and takes it ([`Manager::finish_migration`]).
//!
//! Anything that fails before the switch-over leaves the sandbox running on the source
//! as it was (the destination's VM ends). After it, the destination owns the sandbox:
//! if its VM then fails to run, the sandbox goes to `error` with the reason.
//!
//! Post-copy: a copy that has not converged by the asked time switches to post-copy
//! (where the destination allows it); the destination then runs the guest before all
//! its RAM has arrived, and the source serves the rest until QEMU says the copy
//! completed. Losing either host or the stream between them before then loses the
//! guest: the destination's watch ([`Manager::watch_postcopy`]) puts the sandbox in
//! `error` (`migration_failed`).
//!
//! Host-to-host calls carry a token signed with the cluster's shared key, bound to the
//! sandbox and the destination, valid for the migration's deadline.

use super::{now_ms, vm_error, Manager};
use crate::catalog::HostRecord;
use crate::cluster::{forward::ForwardError, routing, tunnel};
use crate::error::ApiError;
use crate::model::*;
use api_model::Migration;
use axum::http::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};
use vmm::{IncomingSocket, IncomingSpec, LiveOptions, QemuVm, Switchover, Vm};

/// The header a host-to-host migration call carries its token in.
pub const MIGRATION_TOKEN: &str = "x-nullspace-migration";
/// The longest the copy (disk and RAM, up to the switch-over) may take.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(180);
/// The source hands a sandbox over no later than this after it started (the copy,
/// then at most the destination's confirmation): never once the destination may have
/// given up ([`INCOMING_DEADLINE`]).
const HANDOVER_DEADLINE: Duration = Duration::from_secs(300);
/// The longest the guest may stand still for the last pass (QEMU's downtime limit).
const MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// How long an incoming VM waits for its source before it ends (or, if the catalog
/// names its host by then, runs: a source that died after handing it over).
const INCOMING_DEADLINE: Duration = Duration::from_secs(420);
/// How long the RAM left after a post-copy switch-over may take to arrive.
const POSTCOPY_DEADLINE: Duration = Duration::from_secs(120);
/// The waits before each try of the destination's `finish` (a call lost on the way
/// is sent again).
const FINISH_RETRIES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];
/// How often a destination asks its source whether it still moves the sandbox.
const SOURCE_CHECK: Duration = Duration::from_secs(3);
/// Source checks in a row without an answer after which the destination gives up.
const SOURCE_SILENT_CHECKS: u32 = 5;
/// How long a migration's host-to-host token is good for.
const TOKEN_LIFETIME: Duration = Duration::from_secs(480);

/// An incoming VM, waiting for its source; each behind a lock of its own (the map's
/// lock is held only to find one).
pub(super) type IncomingSlot = Arc<tokio::sync::Mutex<Incoming>>;

/// An incoming VM, waiting for its source.
pub(super) struct Incoming {
    /// The VM, until it is run or ended.
    vm: Option<QemuVm>,
    /// Which preparation this is (a stale deadline must not end a newer one).
    generation: u64,
    /// The streams carried in so far: each is taken once.
    taken: Vec<IncomingSocket>,
    /// Whether it has loaded the state (its source may hand it over any moment: it is
    /// then never ended for a silent source, only at its deadline).
    loaded: bool,
}

/// The token subject of sandbox `id`'s migration to host `to`.
fn subject(id: &str, to: &str) -> String {
    format!("migration:{id}:{to}")
}

fn unix_now() -> i64 {
    now_ms() / 1000
}

fn unreachable_host(to: &str, e: ForwardError) -> ApiError {
    ApiError::new(
        502,
        "host_unreachable",
        format!("the destination host {to} could not be reached: {e}; the sandbox runs on here"),
    )
}

impl Manager {
    /// Moves running sandbox `id` (this host's) to `host`, or to a host placement
    /// chooses, without stopping it. Operator only (the caller checks).
    /// `postcopy_after`: when to switch to post-copy if pre-copy has not converged
    /// (`None`: never).
    pub async fn migrate(
        self: &Arc<Self>,
        id: &str,
        host: Option<&str>,
        postcopy_after: Option<Duration>,
    ) -> Result<Migration, ApiError> {
        let started = Instant::now();
        let me = crate::cluster::this_host().ok_or_else(|| {
            ApiError::conflict(
                "live migration moves a sandbox between the hosts of a cluster, and this pool manager runs alone; run several on one PostgreSQL catalog (the README's \"Several hosts\")",
            )
        })?;
        let slot = self.slot(id);
        let mut guard = slot.lock_owned().await;
        let r = self
            .catalog
            .sandbox(id)?
            .filter(|r| r.state != InternalState::Deleted)
            .ok_or_else(|| ApiError::not_found("sandbox", id))?;
        if r.host_id.as_deref() != Some(me) {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is not on this host any more; retry, and the request goes to its owner"
            )));
        }
        let Some(vm) = guard.as_mut().filter(|_| r.state == InternalState::Active) else {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}: only a running sandbox migrates live (a paused one moves with its snapshot: drain its host)",
                r.state.public()
            )));
        };
        if r.volume_copies || vm.volume_luns().len() != r.mounts.len() {
            return Err(ApiError::conflict(format!(
                "sandbox {id} mounts private copies of its volumes (made by an older version), which live migration does not carry; drain its host without --live (hibernate and resume)"
            )));
        }
        let (target, _room) = self.migration_target(me, host, &r)?;
        let to = target.info.id.clone();
        let _moving = Outgoing::mark(self, id, &to);
        let span = tracing::info_span!("migration", sandbox = %id, from = %me, to = %to);
        let token = self.tokens.issue(
            &subject(id, &to),
            r.owner_epoch,
            unix_now() + TOKEN_LIFETIME.as_secs() as i64,
        );
        let _ =
            self.catalog
                .append_event(id, "sandbox.migrating", &json!({ "from": me, "to": to }));
        let deadline = Instant::now() + MIGRATION_DEADLINE;
        let moved = self
            .copy_to(vm, id, me, &target, &token, deadline, postcopy_after)
            .instrument(span.clone())
            .await;
        let (stats, stopped, ram) = match moved {
            Ok(moved) => moved,
            Err(e) => {
                let runs = vm.abort_outgoing().await;
                self.abandon(&target, id, &token).await;
                if !runs {
                    self.lost_at_switchover(id, &mut guard, &to, &e.message)
                        .await;
                    return Err(e);
                }
                let _ = self.catalog.append_event(
                    id,
                    "sandbox.migration_failed",
                    &json!({ "from": me, "to": to, "reason": e.message, "state": "running" }),
                );
                warn!(parent: &span, error = %e.message, "live migration failed; the sandbox runs on here");
                return Err(e);
            }
        };
        // Switch-over: the sandbox is the destination's from the next epoch on. Not past
        // the hand-over deadline: the destination may have given up by then.
        let handed = if started.elapsed() < HANDOVER_DEADLINE {
            self.catalog.reassign(id, me, &to, |r| {
                r.vm_dir = None;
                // Its memory and disk came whole: a fork snapshot here is not its base
                // there.
                r.fork_base = None;
                r.step("running", Some(format!("migrating live from {me} to {to}")));
            })
        } else {
            Ok(None)
        };
        let handed = match handed {
            Ok(Some(_)) => Ok(()),
            Ok(None) if started.elapsed() >= HANDOVER_DEADLINE => {
                Err("the copy outlasted the hand-over deadline".to_string())
            }
            Ok(None) => Err("it changed hands meanwhile".to_string()),
            // The commit may have landed with its answer lost: the catalog says.
            Err(e) => match self.catalog.sandbox(id) {
                Ok(Some(r)) if r.host_id.as_deref() == Some(to.as_str()) => Ok(()),
                _ => Err(format!("handing it over in the catalog failed: {e}")),
            },
        };
        if let Err(why) = handed {
            let runs = vm.abort_outgoing().await;
            self.abandon(&target, id, &token).await;
            if !runs {
                self.lost_at_switchover(id, &mut guard, &to, &why).await;
                return Err(ApiError::conflict(format!(
                    "sandbox {id} did not migrate ({why}), and its VM could not run again after the post-copy switch-over: it is in error"
                )));
            }
            let _ = self.catalog.append_event(
                id,
                "sandbox.migration_failed",
                &json!({ "from": me, "to": to, "reason": why, "state": "running" }),
            );
            return Err(ApiError::conflict(format!(
                "sandbox {id} did not migrate: {why}; it runs on here"
            )));
        }
        routing::forget_owner(id);
        if stats.postcopy {
            // The kill -9 test's point: the source gone with RAM left to send.
            failpoint::hit("migrate.postcopy_handed");
        }
        // The sandbox is the destination's now, and its guest stands still until this
        // call lands: one lost on the way is sent again (the destination's finish is
        // idempotent). An answer, even an error, is final.
        let mut tries = FINISH_RETRIES.iter().peekable();
        let finished = loop {
            tokio::time::sleep(*tries.next().expect("a first try")).await;
            let answer = tunnel::call(
                &target.info.control_url,
                Method::POST,
                &format!("/v1/internal/migrations/{id}/finish"),
                (MIGRATION_TOKEN, &token),
                &json!({ "from": me }),
                Duration::from_secs(90),
            )
            .await;
            match answer {
                Err(e) if tries.peek().is_some() => {
                    warn!(parent: &span, error = %e, "telling the destination to run the sandbox failed; sending it again")
                }
                answer => break answer,
            }
        };
        let downtime_ms = stats.qemu_downtime_ms + stopped.elapsed().as_millis() as u64;
        // In post-copy the source serves the pages left until the destination has them
        // all (the destination's watch fails the sandbox if they never come).
        let mut stats = stats;
        let finished_ok = finished.as_ref().is_ok_and(|(s, _)| s.is_success());
        let postcopy_failed = match (ram, guard.as_ref()) {
            (Some(ram), Some(vm)) if finished_ok => {
                let deadline = Instant::now() + POSTCOPY_DEADLINE;
                match vm.wait_outgoing(deadline).await {
                    // QEMU wrote the last page into the socket: the stream must also
                    // have been carried to its end.
                    Ok(bytes) => match ram.finished(deadline).await {
                        Ok(()) => {
                            stats.ram_bytes = bytes;
                            None
                        }
                        Err(why) => Some(why),
                    },
                    Err(e) => Some(e.to_string()),
                }
            }
            _ => None,
        };
        // The source's VM is done either way: the sandbox is the destination's, and so
        // are its volumes (their holds are the sandbox's: the destination renews them,
        // and saves its images when the sandbox ends there). These images go unsaved.
        if let Some(vm) = guard.take() {
            vm.kill().await;
        }
        if finished_ok && postcopy_failed.is_none() {
            self.drop_volume_images(id);
        } else if !r.mounts.is_empty() {
            // The destination did not say it runs: these are the volumes as the guest
            // stopped here, kept for an operator (the destination saves its own).
            warn!(parent: &span, "the move did not end well: this host keeps the sandbox's volume images");
        }
        if let Some(dir) = &r.fork_base {
            // The fork snapshot goes once no sandbox of this host runs from it.
            if let Err(e) = self.release_fork_base(dir) {
                warn!(parent: &span, error = %e.message, "releasing the fork snapshot the sandbox ran from failed");
            }
        }
        self.network.forget(id);
        self.slots.lock().unwrap().remove(id);
        drop(guard);
        if let Some(why) = postcopy_failed {
            return Err(ApiError::new(
                502,
                "migration_failed",
                format!("sandbox {id} was handed to {to}, and its post-copy did not complete ({why}): it is in error there"),
            ));
        }
        match finished {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => {
                return Err(ApiError::new(
                    502,
                    "migration_failed",
                    format!(
                        "sandbox {id} was handed to {to}, which could not run it ({status}: {}); it is in error there",
                        body["message"].as_str().unwrap_or("no reason given")
                    ),
                ))
            }
            Err(e) => {
                return Err(ApiError::new(
                    502,
                    "migration_failed",
                    format!("sandbox {id} was handed to {to}, which did not answer ({e}); see its state"),
                ))
            }
        }
        let report = Migration {
            sandbox_id: id.to_string(),
            from: me.to_string(),
            to: to.clone(),
            downtime_ms,
            total_ms: started.elapsed().as_millis() as u64,
            ram_bytes: stats.ram_bytes,
            disk_bytes: stats.disk_bytes,
            passes: stats.passes,
            postcopy: stats.postcopy,
        };
        let _ = self.catalog.append_event(
            id,
            "sandbox.migrated",
            &serde_json::to_value(&report).expect("json"),
        );
        info!(parent: &span, downtime_ms, total_ms = report.total_ms, ram_bytes = report.ram_bytes, disk_bytes = report.disk_bytes, postcopy = report.postcopy, "migrated live");
        Ok(report)
    }

    /// The host sandbox `r` goes to: `asked`, which must be able to take it, or the
    /// one placement chooses among the compatible ready hosts; with its room held for
    /// the move.
    fn migration_target(
        &self,
        me: &str,
        asked: Option<&str>,
        r: &SandboxRecord,
    ) -> Result<(HostRecord, Room), ApiError> {
        let hosts = self.catalog.hosts()?;
        let mine = hosts
            .iter()
            .find(|h| h.info.id == me)
            .ok_or_else(|| ApiError::internal("this host is not in the catalog's hosts"))?;
        // Volumes are the store's: their write locks and saves go on from the
        // destination only if it uses the same one.
        let volumes_move_to =
            |h: &HostRecord| r.mounts.is_empty() || h.info.shares_store_with(&mine.info);
        let compatible = |h: &HostRecord| {
            h.info.qemu == mine.info.qemu
                && h.info.image_set == mine.info.image_set
                && h.info.accel == mine.info.accel
                && volumes_move_to(h)
        };
        let need = crate::catalog::Allocation {
            vcpus: u64::from(r.resources.vcpus),
            mem_mib: u64::from(r.resources.mem_mib),
            disk_mib: r.resources.disk_mib,
        };
        if let Some(asked) = asked {
            let h = hosts
                .iter()
                .find(|h| h.info.id == asked)
                .ok_or_else(|| ApiError::not_found("host", asked))?;
            if h.info.id == me {
                return Err(ApiError::bad_request(format!(
                    "sandbox {} already runs on {asked}; name another host, or omit host to let placement choose",
                    r.id
                )));
            }
            if h.state != "ready" {
                return Err(ApiError::conflict(format!(
                    "host {asked} is {}, not ready; name a ready host, or omit host",
                    h.state
                )));
            }
            if !volumes_move_to(h) {
                return Err(ApiError::conflict(format!(
                    "sandbox {} has volumes mounted, and host {asked} uses another snapshot store than this host: a sandbox with volumes moves only between hosts sharing one; name such a host, or omit host",
                    r.id
                )));
            }
            if !compatible(h) {
                return Err(ApiError::conflict(format!(
                    "host {asked} runs another QEMU, accelerator or image set ({}, {}, {}; this host: {}, {}, {}): a VM migrates only to the same machine",
                    h.info.qemu, h.info.accel, h.info.image_set, mine.info.qemu, mine.info.accel, mine.info.image_set
                )));
            }
            let room = self.hold_room(asked, need)?.ok_or_else(|| {
                ApiError::new(
                    503,
                    "no_host",
                    format!(
                        "host {asked} has no room for sandbox {} ({} vCPUs, {} MiB of memory, {} MiB of disk); name another host, or omit host",
                        r.id, need.vcpus, need.mem_mib, need.disk_mib
                    ),
                )
            })?;
            return Ok((h.clone(), room));
        }
        // A host placement chose may fill meanwhile (its room is held in the catalog):
        // the next is tried.
        let mut excluded: std::collections::HashSet<String> = [me.to_string()].into();
        while let Some(h) =
            crate::cluster::placement::choose(&hosts, need, "", false, compatible, &excluded)
        {
            if let Some(room) = self.hold_room(&h.info.id, need)? {
                return Ok((h.clone(), room));
            }
            excluded.insert(h.info.id.clone());
        }
        Err(ApiError::new(
            503,
            "no_host",
            format!(
                "no other ready host with the same QEMU, accelerator and image set{} has room for sandbox {}; add one, or retry later",
                if r.mounts.is_empty() { "" } else { " (and this host's snapshot store, for its volumes)" },
                r.id
            ),
        ))
    }

    /// Holds `need` on `host` in the catalog (`None`: it has no room left).
    fn hold_room(
        &self,
        host: &str,
        need: crate::catalog::Allocation,
    ) -> Result<Option<Room>, ApiError> {
        let lasts = HANDOVER_DEADLINE + POSTCOPY_DEADLINE + Duration::from_secs(60);
        Ok(self
            .catalog
            .reserve_for(host, need, lasts.as_millis() as i64)?
            .map(|id| Room {
                catalog: self.catalog.clone(),
                id,
            }))
    }

    /// Everything before the switch-over: the destination's VM, the disk mirror and
    /// the RAM, until the source's VM is stopped with all of it sent, or, after a
    /// post-copy switch-over, with the device state sent and the RAM stream (returned)
    /// still carrying the rest.
    #[allow(clippy::too_many_arguments)]
    async fn copy_to(
        &self,
        vm: &mut QemuVm,
        id: &str,
        me: &str,
        target: &HostRecord,
        token: &str,
        deadline: Instant,
        postcopy_after: Option<Duration>,
    ) -> Result<(vmm::MigrationStats, Instant, Option<Carried>), ApiError> {
        let to = &target.info.id;
        let base = &target.info.control_url;
        let failed = |what: &str, e: vmm::VmmError| {
            ApiError::new(
                502,
                "migration_failed",
                format!("{what}: {e}; the sandbox runs on here"),
            )
        };
        let (status, body) = tunnel::call(
            base,
            Method::POST,
            &format!("/v1/internal/migrations/{id}"),
            (MIGRATION_TOKEN, token),
            &json!({ "from": me, "spec": IncomingSpec { postcopy: postcopy_after.is_some(), ..vm.incoming_spec() } }),
            Duration::from_secs(90),
        )
        .await
        .map_err(|e| unreachable_host(to, e))?;
        // Post-copy only where the destination took it (its QEMU can open userfaultfd).
        let postcopy_after = postcopy_after.filter(|_| body["postcopy"] == true);
        if !status.is_success() {
            return Err(ApiError::new(
                if status == StatusCode::INSUFFICIENT_STORAGE { 507 } else { 502 },
                "migration_failed",
                format!(
                    "host {to} could not start a VM for sandbox {id} ({status}: {}); the sandbox runs on here",
                    body["message"].as_str().unwrap_or("no reason given")
                ),
            ));
        }
        vm.flatten_disk(deadline)
            .await
            .map_err(|e| failed("flattening the disk for the move", e))?;
        let disk = carry(vm, "migrate-disk.sock", base, id, "disk", token, deadline)?;
        let mirrored = vm.mirror_disk(&disk.path, deadline).await;
        let mut disk_bytes = match mirrored {
            Ok(b) => b,
            Err(e) => return Err(failed("mirroring the disk", e)),
        };
        // Each volume whole, onto the image the destination made for it.
        let mut volumes = Vec::new();
        for lun in vm.volume_luns() {
            let carried = carry(
                vm,
                &format!("migrate-vol{lun}.sock"),
                base,
                id,
                &format!("vol{lun}"),
                token,
                deadline,
            )?;
            disk_bytes += vm
                .mirror_volume(lun, &carried.path, deadline)
                .await
                .map_err(|e| failed(&format!("mirroring volume {lun}"), e))?;
            volumes.push(carried);
        }
        // The kill -9 test's point: the source gone with the mirrors running.
        failpoint::hit("migrate.mirrored");
        // In post-copy the RAM stream outlives the switch-over.
        let ram = carry(
            vm,
            "migrate-ram.sock",
            base,
            id,
            "ram",
            token,
            deadline + POSTCOPY_DEADLINE,
        )?;
        let options = LiveOptions {
            max_downtime: MAX_DOWNTIME,
            deadline,
            postcopy_after,
        };
        let mode = vm
            .migrate_out(&ram.path, &options)
            .await
            .map_err(|e| failed("migrating RAM", e))?;
        // The guest is stopped before the switch-over, its disks still active: the
        // mirror copies its last writes and ends in step.
        let disk_bytes = disk_bytes.max(
            vm.end_mirror()
                .await
                .map_err(|e| failed("ending the disk mirror", e))?,
        );
        let mut stats = vm
            .switch_over(mode, deadline)
            .await
            .map_err(|e| failed("switching over", e))?;
        stats.disk_bytes = disk_bytes;
        // QEMU's downtime figure runs to here; the rest is counted from now.
        let stopped = Instant::now();
        drop((disk, volumes));
        // QEMU sent the whole stream (in post-copy, the device state); the destination
        // must have loaded it before the sandbox is handed over.
        let ram = match mode {
            Switchover::PreCopy => {
                ram.finished(deadline).await.map_err(|why| {
                    ApiError::new(
                        502,
                        "migration_failed",
                        format!("{why}; the sandbox runs on here"),
                    )
                })?;
                None
            }
            Switchover::PostCopy => Some(ram),
        };
        let (status, body) = tunnel::call(
            base,
            Method::POST,
            &format!("/v1/internal/migrations/{id}/received"),
            (MIGRATION_TOKEN, token),
            &json!({}),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| unreachable_host(to, e))?;
        if !status.is_success() {
            return Err(ApiError::new(
                502,
                "migration_failed",
                format!(
                    "host {to} did not load sandbox {id}'s state ({status}: {}); the sandbox runs on here",
                    body["message"].as_str().unwrap_or("no reason given")
                ),
            ));
        }
        Ok((stats, stopped, ram))
    }

    /// Source: the VM could not run again after a failed post-copy switch-over (its
    /// state went to a destination that did not take the sandbox): the sandbox is in
    /// `error`, its VM ended.
    async fn lost_at_switchover(
        &self,
        id: &str,
        guard: &mut tokio::sync::OwnedMutexGuard<Option<QemuVm>>,
        to: &str,
        why: &str,
    ) {
        if let Some(vm) = guard.take() {
            vm.kill().await;
        }
        match self.catalog.sandbox(id) {
            Ok(Some(mut r)) if r.state == InternalState::Active => {
                let failure = format!(
                    "the live migration to host {to} failed after its post-copy switch-over, and the VM could not run here again: {why}"
                );
                if let Err(e) = self.fail_migrated(&mut r, failure).await {
                    warn!(sandbox = %id, error = %e.message, "recording a migration that lost its guest");
                }
            }
            _ => {}
        }
    }

    /// Puts sandbox `r`, whose guest a migration lost, in `error` with `failure`, and
    /// lets its volumes go.
    async fn fail_migrated(&self, r: &mut SandboxRecord, failure: String) -> Result<(), ApiError> {
        r.diagnostic = Some(Diagnostic {
            code: "migration_failed".into(),
            message: failure,
            action: "restore one of its stored snapshots, or create a new sandbox".into(),
        });
        r.vm_dir = None;
        self.transition(r, InternalState::Failed, "live migration failed")?;
        self.release_volumes(r).await;
        Ok(())
    }

    /// Tells the destination to end the VM it started for sandbox `id` (best effort:
    /// one left over ends at its own deadline).
    async fn abandon(&self, target: &HostRecord, id: &str, token: &str) {
        if let Err(e) = tunnel::call(
            &target.info.control_url,
            Method::DELETE,
            &format!("/v1/internal/migrations/{id}"),
            (MIGRATION_TOKEN, token),
            &json!({}),
            Duration::from_secs(15),
        )
        .await
        {
            warn!(sandbox = %id, host = %target.info.id, error = %e, "the destination was not told to end its VM; it ends at its deadline");
        }
    }

    /// Checks a host-to-host migration token for sandbox `id` coming to this host;
    /// returns the ownership epoch it was issued in.
    pub fn check_migration_token(&self, id: &str, token: &str) -> Result<u64, ApiError> {
        let me = crate::cluster::this_host().ok_or_else(|| ApiError::not_found("migration", id))?;
        self.tokens
            .verify(token, &subject(id, me), unix_now())
            .map_err(|e| ApiError::unauthorized(format!("migration token refused: {e}")))
    }

    /// The incoming VM of sandbox `id`, if one waits here.
    async fn incoming_slot(&self, id: &str) -> Result<IncomingSlot, ApiError> {
        self.incoming
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("migration", id))
    }

    /// Destination: starts a VM for sandbox `id`'s migration from host `from` (a token
    /// of `epoch`), waiting for its disk and RAM. It ends on its own if the source
    /// neither finishes nor abandons it within [`INCOMING_DEADLINE`].
    pub async fn accept_migration(
        self: &Arc<Self>,
        id: &str,
        from: &str,
        epoch: u64,
        token: &str,
        spec: IncomingSpec,
    ) -> Result<bool, ApiError> {
        let r = self
            .catalog
            .sandbox(id)?
            .filter(|r| r.state == InternalState::Active && r.host_id.as_deref() == Some(from))
            .ok_or_else(|| {
                ApiError::conflict(format!("sandbox {id} is not running on host {from}"))
            })?;
        if r.owner_epoch != epoch {
            return Err(ApiError::conflict(format!(
                "sandbox {id} changed hands since this migration began (epoch {} now, {epoch} then)",
                r.owner_epoch
            )));
        }
        // The VM is the sandbox's shape, whatever the peer says.
        if spec.vcpus != r.resources.vcpus || spec.mem_mib != r.resources.mem_mib {
            return Err(ApiError::bad_request(format!(
                "the VM asked for ({} vCPUs, {} MiB) is not sandbox {id}'s ({} vCPUs, {} MiB)",
                spec.vcpus, spec.mem_mib, r.resources.vcpus, r.resources.mem_mib
            )));
        }
        if self.slot(id).lock().await.is_some() {
            return Err(ApiError::conflict(format!(
                "sandbox {id} already has a VM on this host"
            )));
        }
        let images = self.incoming_volume_images(&r, &spec.volumes).await?;
        let vm = match self.vmm.prepare_incoming(&spec, &images).await {
            Ok(vm) => vm,
            Err(e) => {
                self.drop_volume_images(id);
                return Err(vm_error("starting a VM for the incoming migration", e));
            }
        };
        let postcopy = vm.incoming_postcopy();
        let generation = self
            .incoming_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = Arc::new(tokio::sync::Mutex::new(Incoming {
            vm: Some(vm),
            generation,
            taken: Vec::new(),
            loaded: false,
        }));
        let previous = self.incoming.lock().await.insert(id.to_string(), slot);
        if let Some(previous) = previous {
            if let Some(vm) = previous.lock().await.vm.take() {
                vm.kill().await;
            }
        }
        info!(sandbox = %r.id, from = %from, postcopy, "waiting for a live migration");
        let this = self.clone();
        let (sid, source, token) = (id.to_string(), from.to_string(), token.to_string());
        tokio::spawn(async move {
            this.watch_source(&sid, &source, &token, generation).await;
        });
        let this = self.clone();
        let id = id.to_string();
        let from = from.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(INCOMING_DEADLINE).await;
            this.incoming_deadline(&id, &from, generation).await;
        });
        Ok(postcopy)
    }

    /// Destination: ends an incoming VM whose source no longer moves it (it restarted,
    /// or gave up without saying so), or that has not answered for
    /// [`SOURCE_SILENT_CHECKS`] checks before the VM loaded the state; asked every
    /// [`SOURCE_CHECK`]. Once the catalog names this host, the VM is finished here if
    /// its source does not do it in time (it died after the hand-over).
    async fn watch_source(&self, id: &str, from: &str, token: &str, generation: u64) {
        let me = crate::cluster::this_host().unwrap_or_default().to_string();
        let handed_here = || {
            self.catalog
                .sandbox(id)
                .ok()
                .flatten()
                .is_some_and(|r| r.host_id.as_deref() == Some(me.as_str()))
        };
        let mut silent = 0;
        loop {
            tokio::time::sleep(SOURCE_CHECK).await;
            let Ok(slot) = self.incoming_slot(id).await else {
                return;
            };
            let loaded = {
                let incoming = slot.lock().await;
                if incoming.generation != generation {
                    return;
                }
                incoming.loaded
            };
            if handed_here() {
                // The source finishes it at once; if it has not within two checks, it
                // is gone.
                tokio::time::sleep(SOURCE_CHECK * 2).await;
                let waiting = match self.incoming_slot(id).await {
                    Ok(s) => Arc::ptr_eq(&s, &slot),
                    Err(_) => false,
                };
                if waiting {
                    warn!(sandbox = %id, from = %from, "handed over here and never finished by its source: finishing it");
                    if let Err(e) = self.finish_migration(id, from).await {
                        warn!(sandbox = %id, error = %e.message, "finishing an abandoned migration failed");
                    }
                }
                return;
            }
            let Some(source) = self.catalog.host(from).ok().flatten() else {
                return;
            };
            let answer = tunnel::call(
                &source.info.control_url,
                Method::POST,
                &format!("/v1/internal/outgoing/{id}"),
                (MIGRATION_TOKEN, token),
                &json!({ "from": from, "to": me }),
                Duration::from_secs(10),
            )
            .await;
            let why = match answer {
                Ok((status, body)) if status.is_success() => {
                    silent = 0;
                    if body["moving"] == true {
                        continue;
                    }
                    format!("its source {from} no longer moves it here (it restarted, or gave up)")
                }
                // A source that predates the question: it ends at its deadline.
                Ok((status, _)) if status == StatusCode::NOT_FOUND => continue,
                // No answer, or not the source's (a proxy that reached another host).
                _ => {
                    silent += 1;
                    if silent < SOURCE_SILENT_CHECKS || loaded {
                        continue;
                    }
                    format!("its source {from} has not answered for {silent} checks")
                }
            };
            // The hand-over may have landed between the two reads.
            if handed_here() {
                continue;
            }
            self.end_incoming(id, &slot, &why).await;
            return;
        }
    }

    /// Ends incoming VM `slot` of sandbox `id` (if it is still the one waiting), and
    /// the images made for its volumes.
    async fn end_incoming(&self, id: &str, slot: &IncomingSlot, why: &str) {
        let stale = {
            let mut map = self.incoming.lock().await;
            match map.get(id) {
                Some(s) if Arc::ptr_eq(s, slot) => map.remove(id),
                _ => None,
            }
        };
        if let Some(stale) = stale {
            warn!(sandbox = %id, why, "an incoming migration ends: its VM goes");
            if let Some(vm) = stale.lock().await.vm.take() {
                vm.kill().await;
                self.drop_volume_images(id);
            }
        }
    }

    /// Source `from`: whether it is moving sandbox `id` to host `to` now (asked by that
    /// host, with the migration's token). Another host is asked in vain: 409.
    pub fn moving_out(
        &self,
        id: &str,
        from: &str,
        to: &str,
        token: &str,
    ) -> Result<bool, ApiError> {
        self.tokens
            .verify(token, &subject(id, to), unix_now())
            .map_err(|e| ApiError::unauthorized(format!("migration token refused: {e}")))?;
        let me = crate::cluster::this_host().unwrap_or_default();
        if me != from {
            return Err(ApiError::conflict(format!(
                "this is host {me}, not {from}: ask the host that moves the sandbox"
            )));
        }
        Ok(self.outgoing.lock().unwrap().get(id).map(String::as_str) == Some(to))
    }

    /// An incoming VM's deadline: one the catalog now names this host for runs (its
    /// source died after handing it over, before saying finish); any other ends.
    async fn incoming_deadline(&self, id: &str, from: &str, generation: u64) {
        let Ok(slot) = self.incoming_slot(id).await else {
            return;
        };
        if slot.lock().await.generation != generation {
            return;
        }
        let handed = self
            .catalog
            .sandbox(id)
            .ok()
            .flatten()
            .is_some_and(|r| r.host_id.as_deref() == crate::cluster::this_host());
        if handed {
            warn!(sandbox = %id, "a migration handed over here was never finished by its source: finishing it");
            if let Err(e) = self.finish_migration(id, from).await {
                warn!(sandbox = %id, error = %e.message, "finishing an abandoned migration failed");
            }
            return;
        }
        self.end_incoming(
            id,
            &slot,
            "it was neither finished nor abandoned by its deadline",
        )
        .await;
    }

    /// Destination: a connection to one of sandbox `id`'s incoming VM's sockets, once
    /// per stream.
    pub async fn incoming_stream(
        &self,
        id: &str,
        which: IncomingSocket,
    ) -> Result<tokio::net::UnixStream, ApiError> {
        let slot = self.incoming_slot(id).await?;
        let mut incoming = slot.lock().await;
        if incoming.taken.contains(&which) {
            return Err(ApiError::conflict(format!(
                "sandbox {id}'s {which:?} stream is already being carried"
            )));
        }
        let vm = incoming
            .vm
            .as_ref()
            .ok_or_else(|| ApiError::not_found("migration", id))?;
        let conn = vm
            .connect_incoming(which)
            .await
            .map_err(|e| ApiError::internal(format!("the incoming VM's {which:?} socket: {e}")))?;
        incoming.taken.push(which);
        Ok(conn)
    }

    /// Destination: waits until sandbox `id`'s incoming VM has loaded the whole
    /// migration stream (it stays stopped until the switch-over).
    pub async fn migration_received(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let slot = self.incoming_slot(id).await?;
        let mut incoming = slot.lock().await;
        let vm = incoming
            .vm
            .as_ref()
            .ok_or_else(|| ApiError::not_found("migration", id))?;
        vm.wait_incoming(Instant::now() + Duration::from_secs(30))
            .await
            .map_err(|e| {
                ApiError::internal(format!("the incoming VM did not load the state: {e}"))
            })?;
        let postcopy = vm.incoming_postcopy();
        let watched = postcopy.then(|| {
            (
                vm.incoming_completion(
                    Instant::now() + POSTCOPY_DEADLINE + Duration::from_secs(30),
                ),
                vm.id().to_string(),
            )
        });
        incoming.loaded = true;
        if let Some((done, vm_id)) = watched {
            // From here its RAM may be split between the hosts until the copy ends.
            let (this, id) = (self.clone(), id.to_string());
            tokio::spawn(async move {
                if let Err(e) = done.await {
                    this.watch_postcopy(&id, &vm_id, e.to_string()).await;
                }
            });
        }
        // The kill -9 test's point: the destination gone before the switch-over.
        failpoint::hit("migrate.loaded");
        Ok(())
    }

    /// Destination: incoming VM `vm_id` of sandbox `id` lost its post-copy (`why`):
    /// its guest cannot run on. It ends; if the sandbox is this host's by now, it goes
    /// to `error`.
    async fn watch_postcopy(&self, id: &str, vm_id: &str, why: String) {
        warn!(sandbox = %id, vm = %vm_id, error = %why, "a post-copy migration lost its guest");
        let waiting = {
            let map = self.incoming.lock().await;
            map.get(id).cloned()
        };
        if let Some(waiting) = waiting {
            let mut incoming = waiting.lock().await;
            if incoming.vm.as_ref().is_some_and(|vm| vm.id() == vm_id) {
                if let Some(vm) = incoming.vm.take() {
                    vm.kill().await;
                }
            }
        }
        // Only a sandbox handed to this host is this host's to fail (else the source
        // still has it: it runs on there, or says why not).
        let me = crate::cluster::this_host();
        match self.catalog.sandbox(id) {
            Ok(Some(r)) if r.state == InternalState::Active && r.host_id.as_deref() == me => {}
            _ => return,
        }
        let slot = self.slot(id);
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|vm| vm.id() == vm_id) {
            if let Some(vm) = guard.take() {
                vm.kill().await;
            }
        }
        if guard.is_some() {
            return;
        }
        // Read again under the slot's lock: a finish that failed meanwhile said why.
        if let Ok(Some(mut r)) = self.catalog.sandbox(id) {
            if r.state == InternalState::Active && r.host_id.as_deref() == me {
                let failure = format!(
                    "the live migration's post-copy failed before all of the guest's memory arrived: {why}"
                );
                if let Err(e) = self.fail_migrated(&mut r, failure).await {
                    warn!(sandbox = %id, error = %e.message, "recording a post-copy that lost its guest");
                }
            }
        }
    }

    /// Destination: ends sandbox `id`'s incoming VM (the source gave up).
    pub async fn abandon_migration(&self, id: &str) -> Result<(), ApiError> {
        let gone = self.incoming.lock().await.remove(id);
        let vm = match gone {
            Some(slot) => slot.lock().await.vm.take(),
            None => None,
        };
        match vm {
            Some(vm) => {
                vm.kill().await;
                self.drop_volume_images(id);
                info!(sandbox = %id, "incoming migration abandoned by its source");
                Ok(())
            }
            None => Err(ApiError::not_found("migration", id)),
        }
    }

    /// Destination, after the switch-over (the catalog names this host): runs the VM
    /// and makes it the sandbox's. Once the sandbox is this host's, anything that keeps
    /// it from running here (no VM, a VM that does not run) puts it in `error`.
    pub async fn finish_migration(&self, id: &str, from: &str) -> Result<(), ApiError> {
        let gone = self.incoming.lock().await.remove(id);
        let vm = match gone {
            Some(slot) => slot.lock().await.vm.take(),
            None => None,
        };
        let me = crate::cluster::this_host().unwrap_or_default();
        let slot = self.slot(id);
        let mut guard = slot.lock().await;
        let record = match self.catalog.sandbox(id) {
            Ok(r) => r,
            Err(e) => {
                if let Some(vm) = vm {
                    vm.kill().await;
                }
                return Err(e.into());
            }
        };
        let mut r = match record {
            Some(r) if r.host_id.as_deref() == Some(me) => r,
            _ => {
                if let Some(vm) = vm {
                    vm.kill().await;
                    self.drop_volume_images(id);
                }
                return Err(ApiError::conflict(format!(
                    "sandbox {id} was not handed to this host; its incoming VM ended"
                )));
            }
        };
        let failure = match vm {
            // Finished already (a second call).
            None if guard.is_some() => return Ok(()),
            None => "its VM on this host was gone at the switch-over (ended at its deadline, or this host restarted)".to_string(),
            Some(mut vm) => match vm.finish_incoming(Instant::now() + Duration::from_secs(60)).await {
                Ok(()) => {
                    self.install(&mut r, vm, &mut guard);
                    r.step("running", Some(format!("migrated live from {from}")));
                    self.catalog.put_sandbox(&r)?;
                    routing::forget_owner(id);
                    info!(sandbox = %id, from = %from, "runs here after a live migration");
                    return Ok(());
                }
                Err(e) => {
                    vm.kill().await;
                    e.to_string()
                }
            },
        };
        if r.state == InternalState::Active {
            self.fail_migrated(
                &mut r,
                format!(
                    "the live migration from host {from} failed after the switch-over: {failure}"
                ),
            )
            .await?;
        }
        Err(ApiError::internal(format!(
            "sandbox {id} did not run here after its migration: {failure}"
        )))
    }
}

/// Marks a sandbox as moving out of this host (to a host) for as long as it lives.
struct Outgoing<'a> {
    manager: &'a Manager,
    id: String,
}

impl<'a> Outgoing<'a> {
    fn mark(manager: &'a Manager, id: &str, to: &str) -> Self {
        manager
            .outgoing
            .lock()
            .unwrap()
            .insert(id.to_string(), to.to_string());
        Self {
            manager,
            id: id.to_string(),
        }
    }
}

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        self.manager.outgoing.lock().unwrap().remove(&self.id);
    }
}

/// The destination's room for a moving sandbox, held in the catalog (a reservation,
/// which expires on its own after `RESERVATION_TTL_MS` should this host die) until the
/// move ends: then the sandbox's record counts there, or nothing does.
struct Room {
    catalog: Arc<crate::catalog::Catalog>,
    id: String,
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Err(e) = self.catalog.release_reservation(&self.id) {
            warn!(reservation = %self.id, error = %e, "releasing a migration's reservation failed; it expires on its own");
        }
    }
}

/// A stream QEMU opens to a socket in its VM directory, carried to the destination.
struct Carried {
    path: std::path::PathBuf,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Carried {
    /// Waits until everything QEMU sent was carried (it closed its end, and so did the
    /// destination).
    async fn finished(mut self, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(format!("carrying the migration stream: {why}")),
            Ok(Err(e)) => Err(format!("carrying the migration stream: {e}")),
            Err(_) => {
                Err("carrying the migration stream: not done by the migration's deadline".into())
            }
        }
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `name` in `vm`'s directory for its QEMU, and carries the first
/// connection from it to the destination's `stream` of sandbox `id`.
fn carry(
    vm: &QemuVm,
    name: &str,
    base_url: &str,
    id: &str,
    stream: &str,
    token: &str,
    deadline: Instant,
) -> Result<Carried, ApiError> {
    let (path, listener) = vm
        .listen_for_qemu(name)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let qemu = vm.pid();
    let url = base_url.to_string();
    let remote = format!("/v1/internal/migrations/{id}/{stream}");
    let token = token.to_string();
    let id = id.to_string();
    let stream = stream.to_string();
    let task = tokio::spawn(async move {
        let work = async {
            let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let peer = conn
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .map(|p| p as u32);
            if peer != qemu {
                return Err(format!(
                    "a connection from process {peer:?}, not the VM's QEMU"
                ));
            }
            let mut far = tunnel::open(&url, &remote, (MIGRATION_TOKEN, &token))
                .await
                .map_err(|e| e.to_string())?;
            tokio::io::copy_bidirectional(&mut conn, &mut far)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let result = match tokio::time::timeout(left, work).await {
            Ok(r) => r,
            Err(_) => Err("it outlived the migration's deadline".to_string()),
        };
        if let Err(e) = &result {
            warn!(sandbox = %id, stream = %stream, error = %e, "carrying a migration stream failed");
        }
        result
    });
    Ok(Carried { path, task })
}

/// The stream names of `GET /v1/internal/migrations/{id}/{stream}`: `ram`, `disk`,
/// and `vol<LUN>` for each volume.
pub fn incoming_socket(stream: &str) -> Option<IncomingSocket> {
    match stream {
        "ram" => Some(IncomingSocket::Migration),
        "disk" => Some(IncomingSocket::Disk),
        _ => stream
            .strip_prefix("vol")
            .filter(|lun| lun.len() == 1)
            .and_then(|lun| lun.parse::<u8>().ok())
            .filter(|lun| *lun < 8)
            .map(IncomingSocket::Volume),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_ram_disk_and_one_per_volume_lun() {
        assert_eq!(incoming_socket("ram"), Some(IncomingSocket::Migration));
        assert_eq!(incoming_socket("disk"), Some(IncomingSocket::Disk));
        assert_eq!(incoming_socket("vol0"), Some(IncomingSocket::Volume(0)));
        assert_eq!(incoming_socket("vol7"), Some(IncomingSocket::Volume(7)));
        for bad in ["vol8", "vol", "vol01", "vol-1", "volx", "Vol1", "disk0", ""] {
            assert_eq!(incoming_socket(bad), None, "{bad}");
        }
    }
}
