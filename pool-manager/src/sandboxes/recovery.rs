//! Operations a crash cut short.
//!
//! Each multi-step operation holds an [`OpIntent`] from before its first step to its
//! end: a row in the catalog (`catalog::intents`) that names the operation, the last
//! step it finished and what recovery needs (a directory, the stored snapshot, the new
//! sandboxes). Every step is also a failpoint (`failpoint::hit`) of the same name,
//! where the kill -9 tests stop the daemon. The row goes when the operation ends in
//! this process; one still there at start was cut short, and
//! [`Manager::reconcile_after_start`] finishes or rolls it back here: before the
//! catalog's states are reconciled ([`Manager::recover_before_states`]: what needs the
//! VM before it is adopted as a plain running sandbox) and after
//! ([`Manager::recover_after_states`]: what needs the sandboxes settled).

use super::{remove_tree, Manager};
use crate::catalog::{Catalog, Durability, Intent};
use crate::error::ApiError;
use crate::model::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{info, warn};
use vmm::{Snapshot, Vm};

/// Operations that record an intent (the `op` of its row).
pub(super) mod op {
    pub const CREATE: &str = "create";
    pub const RESTORE: &str = "restore";
    pub const PAUSE: &str = "pause";
    pub const HIBERNATE: &str = "hibernate";
    pub const SNAPSHOT: &str = "snapshot";
    pub const FORK: &str = "fork";
    pub const DELETE: &str = "delete";
    pub const VOLUME_SAVE: &str = "volume_save";
}

/// A multi-step operation under way: its intent row, removed when this is dropped
/// (the operation ended, done or undone by its own error handling). Only a crash leaves
/// the row behind.
pub(super) struct OpIntent {
    catalog: Arc<Catalog>,
    id: Option<i64>,
    sandbox: String,
    /// How durable its row's writes are: those of one intent all alike, so a power
    /// loss keeps a prefix of them.
    durability: Durability,
}

impl OpIntent {
    /// Records that step `name` (`op.step`, also the failpoint's name) is done, with
    /// `data` merged into what the intent knows, then passes the failpoint. Best effort:
    /// a row that missed a step is recovered from the step before, which never loses
    /// more than the step itself did.
    pub(super) fn step(&self, name: &'static str, data: serde_json::Value) {
        if let Some(id) = self.id {
            if let Err(e) = self.catalog.intent_step(id, name, &data, self.durability) {
                warn!(sandbox = %self.sandbox, step = name, error = %e, "recording an operation's step failed");
            }
        }
        failpoint::hit(name);
    }
}

impl OpIntent {
    /// [`OpIntent::step`] for a step recovery must know about: an error if it could
    /// not be recorded (the caller undoes the step instead of going on).
    pub(super) fn step_or_fail(
        &self,
        name: &'static str,
        data: serde_json::Value,
    ) -> Result<(), ApiError> {
        if let Some(id) = self.id {
            self.catalog.intent_step(id, name, &data, self.durability)?;
        }
        failpoint::hit(name);
        Ok(())
    }
}

impl Drop for OpIntent {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            if let Err(e) = self.catalog.end_intent(id, self.durability) {
                warn!(sandbox = %self.sandbox, error = %e, "ending an operation's intent failed; the next start re-checks it");
            }
        }
    }
}

impl Manager {
    /// Records that `op` on `sandbox` begins (with what recovery needs to know) and
    /// passes the failpoint `<op>.begun`.
    pub(super) fn begin_op(
        &self,
        sandbox: &str,
        op: &'static str,
        data: serde_json::Value,
    ) -> Result<OpIntent, ApiError> {
        self.begin_op_with(sandbox, op, data, Durability::Synced)
    }

    /// [`Manager::begin_op`] with the intent's writes as durable as `durability` says:
    /// [`Durability::UntilPowerLoss`] only for an operation whose every effect a power
    /// loss undoes anyway (see [`Catalog::begin_intent`]).
    pub(super) fn begin_op_with(
        &self,
        sandbox: &str,
        op: &'static str,
        data: serde_json::Value,
        durability: Durability,
    ) -> Result<OpIntent, ApiError> {
        let id = self.catalog.begin_intent(sandbox, op, &data, durability)?;
        let intent = OpIntent {
            catalog: self.catalog.clone(),
            id: Some(id),
            sandbox: sandbox.to_string(),
            durability,
        };
        failpoint::hit(match op {
            op::CREATE => "create.begun",
            op::RESTORE => "restore.begun",
            op::PAUSE => "pause.begun",
            op::HIBERNATE => "hibernate.begun",
            op::SNAPSHOT => "snapshot.begun",
            op::FORK => "fork.begun",
            op::DELETE => "delete.begun",
            _ => "volume_save.begun",
        });
        Ok(intent)
    }

    /// The first half of recovery, before the catalog's states are reconciled: a
    /// hibernate cut short is finished (its snapshot was stored) or rolled back (its
    /// VM continues, its volumes thaw). Returns the sandboxes settled here, and pushes
    /// the VM directories adopted onto `adopted`.
    pub(super) async fn recover_before_states(
        &self,
        intents: &[Intent],
        adopted: &mut Vec<PathBuf>,
    ) -> Result<std::collections::HashSet<String>, ApiError> {
        let mut settled = std::collections::HashSet::new();
        for i in newest_per_sandbox(intents) {
            warn!(sandbox = %i.sandbox_id, op = %i.op, step = %i.step, "recovering an operation a restart cut short");
            if self.catalog.sandbox(&i.sandbox_id)?.is_some() {
                self.catalog.append_event(
                    &i.sandbox_id,
                    "operation.interrupted",
                    &json!({ "op": i.op, "step": i.step, "reason": "the pool manager stopped during it" }),
                )?;
            }
            let done = match i.op.as_str() {
                op::HIBERNATE => self.recover_hibernate(i, adopted).await?,
                op::CREATE => self.fail_unmounted_checkout(i).await?,
                _ => false,
            };
            if done {
                settled.insert(i.sandbox_id.clone());
            }
        }
        Ok(settled)
    }

    /// The second half: with every sandbox settled (adopted, paused or failed), what is
    /// left of each operation is finished or undone, and its intent ends.
    pub(super) async fn recover_after_states(&self, intents: Vec<Intent>) -> Result<(), ApiError> {
        let mut collect = false;
        let newest: std::collections::HashSet<i64> =
            newest_per_sandbox(&intents).map(|i| i.id).collect();
        for i in intents {
            if !newest.contains(&i.id) {
                // An older operation on the same sandbox (a delete around the volume save
                // it was in): the newest one says where the sandbox got to.
                self.catalog.end_intent(i.id, Durability::Synced)?;
                continue;
            }
            let record = self.catalog.sandbox(&i.sandbox_id)?;
            let live = record.as_ref().is_some_and(|r| {
                !matches!(r.state, InternalState::Failed | InternalState::Deleted)
            });
            match i.op.as_str() {
                op::CREATE | op::RESTORE if !live => {
                    // Holds taken before the record was written (or released on the way
                    // to `error` by a step the crash cut), and files of a sandbox that
                    // never ran. Both are safe to repeat.
                    match &record {
                        None => self.release_intent_holds(&i).await,
                        Some(r) => self.release_volumes(r).await,
                    }
                    self.drop_volume_images(&i.sandbox_id);
                    remove_tree(self.pauses_dir(&i.sandbox_id)).await;
                }
                op::FORK => {
                    // The parent's read-write volumes were frozen around the snapshot.
                    if let Some(r) = record.as_ref().filter(|r| r.state == InternalState::Active) {
                        let slot = self.slot(&r.id);
                        let vm = slot.lock().await;
                        if let Some(vm) = vm.as_ref() {
                            self.thaw_volumes(r, vm).await;
                        }
                    }
                    for child in i.data["children"].as_array().into_iter().flatten() {
                        let Some(child) = child.as_str() else {
                            continue;
                        };
                        if let Some(r) = self.catalog.sandbox(child)? {
                            if r.state == InternalState::Failed {
                                self.release_volumes(&r).await;
                                self.drop_volume_images(child);
                            }
                        }
                    }
                }
                op::SNAPSHOT => {
                    // Stored before the restart: the snapshot stands.
                    if record.is_some() && i.step != "snapshot.published" {
                        self.catalog.append_event(
                            &i.sandbox_id,
                            "sandbox.snapshot_failed",
                            &json!({ "kind": i.data["kind"], "error": "the pool manager stopped while taking it; take it again" }),
                        )?;
                    }
                    collect = true;
                }
                op::HIBERNATE => collect = true,
                // Asked for and cut short: the sandbox goes, as the caller wanted.
                op::DELETE
                    if record
                        .as_ref()
                        .is_some_and(|r| r.state != InternalState::Deleted) =>
                {
                    self.destroy(
                        &i.sandbox_id,
                        "deleted by request (finished after a pool manager restart)",
                    )
                    .await?;
                }
                op::VOLUME_SAVE if !live => {
                    if let Some(r) = &record {
                        self.release_volumes(r).await;
                    }
                }
                _ => {}
            }
            self.catalog.end_intent(i.id, Durability::Synced)?;
            info!(sandbox = %i.sandbox_id, op = %i.op, step = %i.step, "operation recovered");
        }
        if collect {
            // Chunks a cut-short upload left: garbage once past the collector's grace.
            self.gc_wanted.notify_one();
        }
        Ok(())
    }

    /// The volume holds a create took before its sandbox's record existed.
    async fn release_intent_holds(&self, i: &Intent) {
        for volume in i.data["volumes"].as_array().into_iter().flatten() {
            let Some(volume) = volume.as_str() else {
                continue;
            };
            if let Err(e) = storage::volumes::release(self.store(), volume, &i.sandbox_id).await {
                warn!(sandbox = %i.sandbox_id, volume, error = %e, "releasing a hold of a create cut short failed; it expires with its lease");
            }
        }
    }

    /// A hibernate cut short. Once its snapshot is stored (step `hibernate.published`)
    /// it is finished: the VM (if still there) ends, the volumes' clean copies are
    /// saved, the sandbox is hibernated. Before that it is undone: the VM continues
    /// (adoption continues a stopped VM), its frozen volumes thaw, and a pause snapshot
    /// of it the store may hold (stored before the step was recorded) goes. Returns
    /// whether the sandbox was settled here.
    async fn recover_hibernate(
        &self,
        i: &Intent,
        adopted: &mut Vec<PathBuf>,
    ) -> Result<bool, ApiError> {
        let Some(mut r) = self.catalog.sandbox(&i.sandbox_id)? else {
            return Ok(false);
        };
        // Ran again since (a resume after the row should have ended): stale.
        if r.state != InternalState::Active || super::last_running_ms(&r) > i.started_at_ms {
            return Ok(false);
        }
        let vm = match &r.vm_dir {
            Some(dir) => self.vmm.adopt(std::path::Path::new(dir)).await.ok(),
            None => None,
        };
        // The snapshot the row names, if it is in the store; without the VM, one stored
        // since the hibernate began (its step may not have been recorded).
        let mut published = match i.data["snapshot"].as_str() {
            Some(id) => storage::snapshots::get(self.store(), id).await.ok(),
            None => None,
        };
        if published.is_none() && vm.is_none() {
            published = self.stored_pauses_since(&r, i.started_at_ms).await.pop();
        }
        if let Some(snapshot) = published.as_ref().map(|s| s.id.as_str()) {
            if let Some(vm) = vm {
                vm.kill().await;
            }
            if self.save_volumes(&r, true).await {
                self.drop_volume_images(&r.id);
            }
            remove_tree(self.pauses_dir(&r.id)).await;
            if let Some(old) = r.pause_snapshot.take() {
                if let Ok(s) = Snapshot::open(&old) {
                    self.catalog.forget_snapshot(&s.manifest().id)?;
                }
            }
            r.hibernated = Some(snapshot.to_string());
            r.vm_dir = None;
            self.transition(
                &mut r,
                InternalState::Stopped,
                "hibernated (finished after a pool manager restart)",
            )?;
            self.catalog.append_event(
                &r.id,
                "sandbox.recovered",
                &json!({ "state": "paused", "snapshotID": snapshot, "reason": "the pool manager stopped after the hibernate snapshot was stored" }),
            )?;
            return Ok(true);
        }
        let Some(vm) = vm else {
            return Ok(false);
        };
        self.thaw_volumes(&r, &vm).await;
        self.delete_stale_pauses(&r, i.started_at_ms).await;
        adopted.push(vm.dir().to_path_buf());
        let slot = self.slot(&r.id);
        self.install(&mut r, vm, &mut *slot.lock().await);
        r.step(
            "running",
            Some(
                "re-adopted after a pool manager restart (the hibernate it cut short was undone)"
                    .into(),
            ),
        );
        self.catalog.put_sandbox(&r)?;
        self.catalog.append_event(
            &r.id,
            "sandbox.readopted",
            &json!({ "state": "running", "undone": "hibernate" }),
        )?;
        Ok(true)
    }

    /// Stored pause snapshots of sandbox `r` made since `since_ms` (when a hibernate
    /// began), oldest first.
    async fn stored_pauses_since(
        &self,
        r: &SandboxRecord,
        since_ms: i64,
    ) -> Vec<storage::snapshots::StoredSnapshot> {
        let mut found: Vec<_> = storage::snapshots::list(self.store(), &r.id)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|s| {
                s.kind == storage::snapshots::Kind::Pause && s.created_unix_ms as i64 >= since_ms
            })
            .collect();
        found.sort_by_key(|s| s.created_unix_ms);
        found
    }

    /// The pause snapshots a hibernate a restart undid had stored (before it recorded
    /// so): the sandbox runs on and resumes from none of them.
    async fn delete_stale_pauses(&self, r: &SandboxRecord, since_ms: i64) {
        for s in self.stored_pauses_since(r, since_ms).await {
            info!(sandbox = %r.id, snapshot = %s.id, "deleting the snapshot of a hibernate a restart undid");
            let _ = self.delete_stored(&s).await;
        }
    }

    /// A warm checkout cut short before its volumes were mounted: its record already
    /// says `running` (written with the checkout), but the VM lacks what the caller
    /// asked for. It fails (the VM ended, its holds released) instead of being
    /// re-adopted. Returns whether the sandbox was settled here.
    async fn fail_unmounted_checkout(&self, i: &Intent) -> Result<bool, ApiError> {
        let Some(mut r) = self.catalog.sandbox(&i.sandbox_id)? else {
            return Ok(false);
        };
        if r.state != InternalState::Active || i.step == "create.started" {
            return Ok(false);
        }
        if let Some(dir) = r.vm_dir.take() {
            if let Ok(vm) = self.vmm.adopt(std::path::Path::new(&dir)).await {
                vm.kill().await;
            }
        }
        self.fail_interrupted_create(
            &mut r,
            "the pool manager restarted while this sandbox's warm VM was being readied (its volumes mounted)",
        )
        .await?;
        self.drop_volume_images(&r.id);
        Ok(true)
    }
}

/// The newest intent of each sandbox. Operations on one sandbox are serialized by its
/// slot, so an older row is either nested in the newest (a delete's volume save) or
/// stale (its end was not recorded): the newest says where the sandbox got to.
fn newest_per_sandbox(intents: &[Intent]) -> impl Iterator<Item = &Intent> {
    let mut newest: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for i in intents {
        let id = newest.entry(i.sandbox_id.as_str()).or_insert(i.id);
        *id = (*id).max(i.id);
    }
    intents
        .iter()
        .filter(move |i| newest.get(i.sandbox_id.as_str()) == Some(&i.id))
}
