//! Admission: whether a team may have one more sandbox (its create rate, its live
//! sandboxes, vCPUs, memory and disk), and the record written in the same critical
//! section as the check, so a burst cannot overshoot. A create that asks for a warm VM
//! is checked before the VM is taken: a refused create never spends one.
//! Also the other per-team holdings (snapshots, volumes, templates, builds) and the
//! warm pools' share of the team's and the host's capacity.

use super::warm::PoolConfig;
use super::Manager;
use crate::catalog::Durability;
use crate::error::ApiError;
use crate::model::{Resources, SandboxRecord};
use crate::quotas::{self, Limits, Usage};
use crate::templates::BUILTIN;
use vmm::QemuVm;

/// Who acts on a warm pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor<'a> {
    /// A team, on pools of its own templates.
    Team(&'a str),
    /// The operator, on any pool (the built-in templates' are theirs alone).
    Operator,
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

    /// Refuses one more sandbox of this shape for `team` (the create rate is charged
    /// only if `charge_rate`).
    fn check_admission(&self, team: &str, r: Resources, charge_rate: bool) -> Result<(), ApiError> {
        let limits = self.limits(team)?;
        let used = self.usage(team)?;
        quotas::check("sandboxes", used.sandboxes, 1, limits.sandboxes)?;
        quotas::check("vcpus", used.vcpus, r.vcpus as u64, limits.vcpus)?;
        quotas::check(
            "memoryMiB",
            used.memory_mib,
            r.mem_mib as u64,
            limits.memory_mib,
        )?;
        quotas::check("diskMiB", used.disk_mib, r.disk_mib, limits.disk_mib)?;
        if charge_rate {
            self.create_rate
                .take(team, 1, limits.creates_per_minute, limits.create_burst)?;
        }
        Ok(())
    }

    /// Records `record` if its team may have it.
    pub(super) fn admit(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        self.admit_with_events(record, &[], Durability::Synced)
    }

    /// Records `record` and its first events at once, if its team may have it.
    pub(super) fn admit_with_events(
        &self,
        record: &SandboxRecord,
        events: &[(&str, serde_json::Value)],
        durability: Durability,
    ) -> Result<(), ApiError> {
        let _one_at_a_time = self.admission.lock().unwrap();
        self.check_admission(&record.team_id, record.resources, true)?;
        self.catalog
            .put_sandbox_with_events(record, events, durability)?;
        Ok(())
    }

    /// For a create that asks for a warm VM: checks the team's quotas and rate first,
    /// then takes a ready VM of the record's template and shape, and records the
    /// sandbox as running on it (`ready` prepares the record for the VM's directory),
    /// all in one critical section. `None` if the pool has none ready (nothing spent).
    pub(super) fn admit_checkout(
        &self,
        record: &mut SandboxRecord,
        ready: impl FnOnce(&mut SandboxRecord, &QemuVm) -> Vec<(&'static str, serde_json::Value)>,
    ) -> Result<Option<QemuVm>, ApiError> {
        let _one_at_a_time = self.admission.lock().unwrap();
        self.check_admission(&record.team_id, record.resources, false)?;
        let Some(vm) = self.check_out(&record.template_id, record.resources) else {
            return Ok(None);
        };
        let admitted = self
            .limits(&record.team_id)
            .and_then(|l| {
                self.create_rate
                    .take(&record.team_id, 1, l.creates_per_minute, l.create_burst)
            })
            .and_then(|()| {
                let events = ready(record, &vm);
                // Not synced: the record of a running VM needs to survive what the VM
                // survives (a crash of this daemon), and a sync is most of a checkout's
                // cost.
                Ok(self.catalog.put_sandbox_with_events(
                    record,
                    &events,
                    Durability::UntilPowerLoss,
                )?)
            });
        match admitted {
            Ok(()) => Ok(Some(vm)),
            Err(e) => {
                // Refused at the last step (the rate): the VM goes back, unseen.
                self.return_to_pool(&record.template_id, record.resources, vm);
                Err(e)
            }
        }
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
            let (live, vcpus, mib, _) = self.catalog.live_resources(team)?;
            let _ = live;
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
