//! Admission: whether a team may have one more sandbox (its create rate, its live
//! sandboxes, vCPUs, memory and disk), and the record written in the same critical
//! section as the check, so a burst cannot overshoot. A create that asks for a warm VM
//! is checked before the VM is taken: a refused create never spends one.
//! Also the other per-team holdings (snapshots, volumes, templates, builds) and the
//! warm pools' share of the team's and the host's capacity.

use super::warm::PoolConfig;
use super::Manager;
use crate::catalog::{Catalog, Durability};
use crate::error::ApiError;
use crate::model::{Resources, SandboxRecord};
use crate::quotas::{self, Limits, Usage};
use crate::templates::BUILTIN;
use vmm::{QemuVm, Vm};

/// Who acts on a warm pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor<'a> {
    /// A team, on pools of its own templates.
    Team(&'a str),
    /// The operator, on any pool (the built-in templates' are theirs alone).
    Operator,
}

/// A place held in a team's snapshot or volume quota while the item is made; gone when
/// dropped (the item is stored and counted by then, or it failed).
pub(super) struct StoreHold<'a> {
    catalog: &'a Catalog,
    kind: &'static str,
    id: String,
}

impl Drop for StoreHold<'_> {
    fn drop(&mut self) {
        let _ = self.catalog.forget_item(self.kind, &self.id);
    }
}

impl Manager {
    /// The limits in force for `team`: its own over the host's defaults.
    pub fn limits(&self, team: &str) -> Result<Limits, ApiError> {
        Ok(Limits::defaults(self.default_quota).with(&self.catalog.limits(team)?))
    }

    /// What `team` holds now.
    pub fn usage(&self, team: &str) -> Result<Usage, ApiError> {
        let (sandboxes, vcpus, memory_mib, disk_mib) = self.catalog.live_resources(team)?;
        let (warm_vcpus, warm_mib) = self.team_warm_share(team, None)?;
        let (snapshots, snapshot_mib) = self.catalog.items_of("snapshot", team)?;
        let (volumes, volume_mib) = self.catalog.items_of("volume", team)?;
        let templates = self.catalog.templates(Some(team))?;
        let builds = templates
            .iter()
            .filter(|t| t.status == api_model::TemplateStatus::Building)
            .count() as u64;
        Ok(Usage {
            sandboxes,
            vcpus: vcpus + warm_vcpus,
            memory_mib: memory_mib + warm_mib,
            disk_mib,
            snapshots,
            snapshot_mib,
            volumes,
            volume_mib,
            templates: templates.len() as u64,
            builds,
        })
    }

    /// vCPUs and MiB the warm pools of `team`'s own templates hold at their targets
    /// (leaving out `except`'s pool).
    fn team_warm_share(&self, team: &str, except: Option<&str>) -> Result<(u64, u64), ApiError> {
        let (mut vcpus, mut mib) = (0, 0);
        for (template, config) in self.catalog.warm_pools::<PoolConfig>()? {
            if BUILTIN.contains(&template.as_str()) || Some(template.as_str()) == except {
                continue;
            }
            if self.catalog.template(Some(team), &template)?.is_some() {
                vcpus += config.target as u64 * config.resources.vcpus as u64;
                mib += config.target as u64 * config.resources.mem_mib as u64;
            }
        }
        Ok((vcpus, mib))
    }

    /// Takes one create from `team`'s rate, before any lock or count: a flood of
    /// creates is turned away at the cost of a map lookup. Returns the limits in force.
    fn charge_rate(&self, team: &str) -> Result<Limits, ApiError> {
        let limits = self.limits(team)?;
        self.create_rate
            .take(team, 1, limits.creates_per_minute, limits.create_burst)?;
        Ok(limits)
    }

    /// On a catalog hosts share, takes one create from the team's bucket there too,
    /// in the admission's transaction: each host's own bucket turns a flood away
    /// cheaply, this one holds the team to its rate however many hosts its creates are
    /// spread over. (A refusal later in the transaction takes nothing.)
    fn charge_cluster_rate(
        &self,
        a: &mut crate::catalog::Admission<'_>,
        limits: &Limits,
    ) -> Result<(), ApiError> {
        if !self.catalog.is_shared() {
            return Ok(());
        }
        let burst = limits.create_burst;
        let (tokens, elapsed_ms) = a.create_bucket()?.unwrap_or((burst as f64, 0));
        let (left, taken) = quotas::take_from_bucket(
            tokens,
            elapsed_ms as f64 / 1000.0,
            1,
            limits.creates_per_minute,
            burst,
        );
        taken?;
        a.set_create_bucket(left)?;
        Ok(())
    }

    /// Refuses one more sandbox of this shape for `team` past any of its quotas, given
    /// what it holds (`live`, read in the admission's transaction) and what its warm
    /// pools hold (`warm`, read before: pool settings, not counts that race).
    fn check_quotas(
        r: Resources,
        limits: &Limits,
        live: crate::catalog::LiveResources,
        warm: (u64, u64),
    ) -> Result<(), ApiError> {
        let (sandboxes, vcpus, memory_mib, disk_mib) = live;
        let (warm_vcpus, warm_mib) = warm;
        quotas::check("sandboxes", sandboxes, 1, limits.sandboxes)?;
        quotas::check("vcpus", vcpus + warm_vcpus, r.vcpus as u64, limits.vcpus)?;
        quotas::check(
            "memoryMiB",
            memory_mib + warm_mib,
            r.mem_mib as u64,
            limits.memory_mib,
        )?;
        quotas::check("diskMiB", disk_mib, r.disk_mib, limits.disk_mib)
    }

    /// Records `record` if its team may have it.
    pub(super) fn admit(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        self.admit_with_events(record, &[], Durability::Synced)
    }

    /// Records `record` and its first events at once, if its team may have it: the
    /// rate first, then the quotas and the record in one transaction under the team's
    /// lock, which every host of a shared catalog takes (a refusal gives the rate back).
    pub(super) fn admit_with_events(
        &self,
        record: &SandboxRecord,
        events: &[(&str, serde_json::Value)],
        durability: Durability,
    ) -> Result<(), ApiError> {
        let team = &record.team_id;
        let limits = self.charge_rate(team)?;
        let admitted = self.team_warm_share(team, None).and_then(|warm| {
            // On SQLite this host's lock is the team's; on a shared catalog the team's lock
            // is in the database (`Catalog::admit`), and one team waiting on another host
            // must not hold up this host's other teams.
            let _one_at_a_time =
                (!self.catalog.is_shared()).then(|| self.admission.lock().unwrap());
            self.catalog.admit(team, durability, |a| {
                Self::check_quotas(record.resources, &limits, a.live_resources()?, warm)?;
                self.charge_cluster_rate(a, &limits)?;
                Ok(a.put_sandbox_with_events(record, events)?)
            })
        });
        if admitted.is_err() {
            self.create_rate.refund(team, 1, limits.create_burst);
        }
        admitted
    }

    /// For a create that asks for a warm VM: charges the team's rate and checks its
    /// quotas first, then takes a ready VM of the record's template and shape and
    /// records the sandbox as running on it (`ready` prepares the record for the VM),
    /// all in one critical section. `None` if the pool has none ready: nothing spent
    /// (the rate is given back; the fallback create charges it again).
    pub(super) fn admit_checkout(
        &self,
        record: &mut SandboxRecord,
        ready: impl FnOnce(&mut SandboxRecord, &QemuVm) -> Vec<(&'static str, serde_json::Value)>,
    ) -> Result<Option<QemuVm>, ApiError> {
        let team = record.team_id.clone();
        let limits = self.charge_rate(&team)?;
        let result = (|| {
            let warm = self.team_warm_share(&team, None)?;
            // On SQLite this host's lock is the team's; on a shared catalog the team's lock
            // is in the database (`Catalog::admit`), and one team waiting on another host
            // must not hold up this host's other teams.
            let _one_at_a_time =
                (!self.catalog.is_shared()).then(|| self.admission.lock().unwrap());
            let mut taken = None;
            // Not synced: the record of a running VM needs to survive what the VM
            // survives (a crash of this daemon), and a sync is most of a checkout's cost.
            let admitted = self.catalog.admit(&team, Durability::UntilPowerLoss, |a| {
                Self::check_quotas(record.resources, &limits, a.live_resources()?, warm)?;
                let Some(vm) = self.check_out(&record.template_id, record.resources) else {
                    return Ok::<_, ApiError>(false);
                };
                let events = ready(record, &vm);
                taken = Some(vm);
                self.charge_cluster_rate(a, &limits)?;
                a.put_sandbox_with_events(record, &events)?;
                Ok(true)
            });
            match (admitted, taken) {
                (Ok(true), Some(vm)) => Ok(Some(vm)),
                (Ok(_), None) => Ok(None),
                (outcome, vm) => {
                    match vm {
                        // The catalog did not answer: the record may have been stored
                        // all the same (a commit whose reply was lost), so the VM may
                        // be that sandbox's. It never goes to another: it ends.
                        Some(vm) if matches!(&outcome, Err(e) if e.status == 503) => {
                            tokio::spawn(async move { vm.kill().await });
                        }
                        // Not recorded: the VM goes back, unseen.
                        Some(vm) => self.return_to_pool(&record.template_id, record.resources, vm),
                        None => {}
                    }
                    outcome.map(|_| None)
                }
            }
        })();
        if !matches!(result, Ok(Some(_))) {
            self.create_rate.refund(&team, 1, limits.create_burst);
        }
        result
    }

    /// Holds a place for one more stored item of `kind` (`snapshot`, `volume`) of about
    /// `mib` MiB in `team`'s quota while it is made, or refuses it: the check and the
    /// hold are one step under the admission lock, so concurrent requests cannot all
    /// pass. The item's own ledger row replaces the hold once it is stored.
    pub(super) fn hold_store_quota(
        &self,
        team: &str,
        kind: &'static str,
        mib: u64,
    ) -> Result<StoreHold<'_>, ApiError> {
        let _one_at_a_time = self.admission.lock().unwrap();
        self.check_store_quota(team, kind, mib)?;
        let id = format!(
            "{}{}",
            Catalog::PENDING_PREFIX,
            uuid::Uuid::new_v4().simple()
        );
        self.catalog.record_item(kind, &id, team, mib)?;
        Ok(StoreHold {
            catalog: &self.catalog,
            kind,
            id,
        })
    }

    /// Refuses one more stored item of `kind` (`snapshot`, `volume`) of `mib` MiB.
    pub(super) fn check_store_quota(
        &self,
        team: &str,
        kind: &str,
        mib: u64,
    ) -> Result<(), ApiError> {
        let limits = self.limits(team)?;
        let (n, used_mib) = self.catalog.items_of(kind, team)?;
        match kind {
            "snapshot" => {
                quotas::check("snapshots", n, 1, limits.snapshots)?;
                quotas::check("snapshotMiB", used_mib, mib, limits.snapshot_mib)
            }
            _ => {
                quotas::check("volumes", n, 1, limits.volumes)?;
                quotas::check("volumeMiB", used_mib, mib, limits.volume_mib)
            }
        }
    }

    /// Refuses a new template build for `team` past its templates or builds quota.
    pub(super) fn check_build_quota(&self, team: &str) -> Result<(), ApiError> {
        let limits = self.limits(team)?;
        let used = self.usage(team)?;
        quotas::check("templates", used.templates, 1, limits.templates)?;
        quotas::check("builds", used.builds, 1, limits.builds)
    }

    /// Checks a pool's new settings: a team's pool must fit in the team's vCPU and
    /// memory quotas with everything else it holds; every pool's VMs together must fit
    /// in the memory this host gives warm pools (half of it).
    pub(super) fn check_pool(
        &self,
        actor: Actor<'_>,
        owner: Option<&str>,
        template: &str,
        config: &PoolConfig,
    ) -> Result<(), ApiError> {
        let want_vcpus = config.target as u64 * config.resources.vcpus as u64;
        let want_mib = config.target as u64 * config.resources.mem_mib as u64;
        if let (Actor::Team(_), Some(team)) = (actor, owner) {
            let limits = self.limits(team)?;
            let (_, vcpus, mib, _) = self.catalog.live_resources(team)?;
            let (warm_vcpus, warm_mib) = self.team_warm_share(team, Some(template))?;
            quotas::check("vcpus", vcpus + warm_vcpus, want_vcpus, limits.vcpus)?;
            quotas::check("memoryMiB", mib + warm_mib, want_mib, limits.memory_mib)?;
        }
        let others: u64 = self
            .catalog
            .warm_pools::<PoolConfig>()?
            .into_iter()
            .filter(|(t, _)| t != template)
            .map(|(_, c)| c.target as u64 * c.resources.mem_mib as u64)
            .sum();
        let budget = self.max_mem_mib as u64;
        if others + want_mib > budget {
            return Err(ApiError::bad_request(format!(
                "warm pools would hold {} MiB of this host's memory and it gives them at most {budget} MiB ({others} MiB in other pools); send a smaller size",
                others + want_mib
            ))
            .with_details(serde_json::json!({ "field": "size", "hostBudgetMiB": budget, "otherPoolsMiB": others })));
        }
        Ok(())
    }
}
