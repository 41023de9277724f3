//! Template warm pools: VMs of one template and shape, already restored and running,
//! handed to creates that ask (`warmPool: require | prefer`) instead of a restore at
//! request time. A checked-out VM becomes that sandbox's and never returns to the pool;
//! the pool refills in the background. Pool settings are in the catalog, so pools come
//! back after a restart (their VMs are made again). Restore, resume, fork, hibernate and
//! pause never take from a pool.

use super::{Actor, Manager};
use crate::backoff::Backoff;
use crate::error::ApiError;
use crate::model::Resources;
use crate::templates::BUILTIN;
use api_model::{WarmPoolBody, MAX_WARM_POOL_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};
use vmm::{QemuVm, Vm};

/// VMs booting at once per pool: restores are CPU-bound, and creates share the cores.
const MAX_WARMING_PER_POOL: u32 = 2;
/// A failing refill's first retry; each next one waits twice as long, up to the cap.
const REFILL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
const REFILL_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(300);
/// How long a refill waits after a wake-up (a checkout, a resize, a refill ending)
/// before it starts: the reply of the checkout that woke it, and of the checkouts of a
/// burst right behind it (a millisecond or less each), go out before a VM restore
/// (QEMU's start, under TCG a core's worth of translation) competes with them for the
/// cores. Against a restore's hundreds of milliseconds the pool is back to target no
/// later to speak of.
const REFILL_DEFER: std::time::Duration = std::time::Duration::from_millis(25);

/// What a pool should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    pub target: u32,
    pub resources: Resources,
    pub refill: bool,
}

/// A pool as callers see it.
pub type PoolStatus = api_model::WarmPoolStatus;

struct Pool {
    config: PoolConfig,
    ready: VecDeque<QemuVm>,
    warming: u32,
    checkouts: u64,
    misses: u64,
    /// Refill failures in a row, and when the next refill may start.
    backoff: Backoff,
    last_error: Option<api_model::WarmPoolError>,
}

impl Pool {
    fn status(&self, template: &str) -> PoolStatus {
        PoolStatus {
            template_id: template.to_string(),
            target: self.config.target,
            ready: self.ready.len() as u32,
            warming: self.warming,
            checkouts: self.checkouts,
            misses: self.misses,
            resources: self.config.resources,
            refill: self.config.refill,
            last_error: self.last_error.clone(),
        }
    }
}

/// Every template's pool on this host.
#[derive(Default)]
pub struct WarmPools {
    pools: Mutex<HashMap<String, Pool>>,
    wake: tokio::sync::Notify,
}

impl WarmPools {
    /// A ready VM of `template` with exactly this shape, counted as a checkout; `None`
    /// (counted as a miss where the template has a pool) otherwise.
    fn take(&self, template: &str, resources: Resources) -> Option<QemuVm> {
        let mut pools = self.pools.lock().unwrap();
        let pool = pools.get_mut(template)?;
        let vm = if pool.config.resources == resources {
            pool.ready.pop_front()
        } else {
            None
        };
        match vm {
            Some(vm) => {
                pool.checkouts += 1;
                self.wake.notify_one();
                Some(vm)
            }
            None => {
                pool.misses += 1;
                None
            }
        }
    }

    /// Puts back a VM just taken (its create was refused): first in line again, the
    /// checkout not counted. Returns it if the pool no longer wants it.
    fn put_back(&self, template: &str, resources: Resources, vm: QemuVm) -> Option<QemuVm> {
        let mut pools = self.pools.lock().unwrap();
        match pools.get_mut(template) {
            Some(pool)
                if pool.config.resources == resources
                    && (pool.ready.len() as u32) < pool.config.target =>
            {
                pool.ready.push_front(vm);
                pool.checkouts = pool.checkouts.saturating_sub(1);
                None
            }
            _ => Some(vm),
        }
    }

    /// Sets a pool's config; returns the ready VMs it no longer wants.
    fn configure(&self, template: &str, config: PoolConfig) -> Vec<QemuVm> {
        let mut pools = self.pools.lock().unwrap();
        let pool = pools.entry(template.to_string()).or_insert_with(|| Pool {
            config,
            ready: VecDeque::new(),
            warming: 0,
            checkouts: 0,
            misses: 0,
            backoff: Backoff::new(REFILL_RETRY, REFILL_RETRY_CAP),
            last_error: None,
        });
        let mut surplus = Vec::new();
        if pool.config.resources != config.resources {
            surplus.extend(pool.ready.drain(..));
        }
        if pool.config != config {
            // New settings may well fix what failed: try again at once.
            pool.backoff.succeeded();
            pool.last_error = None;
        }
        pool.config = config;
        while pool.ready.len() > config.target as usize {
            surplus.extend(pool.ready.pop_back());
        }
        self.wake.notify_one();
        surplus
    }

    /// The templates that have a pool.
    fn templates(&self) -> Vec<String> {
        self.pools.lock().unwrap().keys().cloned().collect()
    }

    /// Forgets a pool; returns its ready VMs. Refills still warming end unwanted.
    fn remove(&self, template: &str) -> Vec<QemuVm> {
        self.pools
            .lock()
            .unwrap()
            .remove(template)
            .map(|p| p.ready.into_iter().collect())
            .unwrap_or_default()
    }

    /// Ready VMs per pool, keyed `template/vcpus/memMiB/diskMiB`.
    fn ready_counts(&self) -> serde_json::Map<String, serde_json::Value> {
        self.pools
            .lock()
            .unwrap()
            .iter()
            .map(|(template, p)| {
                (
                    crate::cluster::placement::warm_key(template, p.config.resources),
                    serde_json::Value::from(p.ready.len()),
                )
            })
            .collect()
    }

    fn status(&self, template: &str) -> Option<PoolStatus> {
        self.pools
            .lock()
            .unwrap()
            .get(template)
            .map(|p| p.status(template))
    }

    /// Pools short of their target (with refill on): claims a warming slot in each.
    fn claim_refills(&self) -> Vec<(String, Resources)> {
        let mut pools = self.pools.lock().unwrap();
        let mut out = Vec::new();
        let now = std::time::Instant::now();
        for (template, pool) in pools.iter_mut() {
            let have = pool.ready.len() as u32 + pool.warming;
            if pool.config.refill
                && have < pool.config.target
                && pool.warming < MAX_WARMING_PER_POOL
                && pool.backoff.ready(now)
            {
                pool.warming += 1;
                out.push((template.clone(), pool.config.resources));
            }
        }
        out
    }

    /// A refill's VM is up: the pool keeps it if it still wants it (and the refill is
    /// done), else it comes back to be ended before [`WarmPools::done_warming`].
    fn settle(&self, template: &str, resources: Resources, vm: QemuVm) -> Option<QemuVm> {
        let mut pools = self.pools.lock().unwrap();
        let Some(pool) = pools.get_mut(template) else {
            return Some(vm);
        };
        pool.backoff.succeeded();
        pool.last_error = None;
        if pool.config.resources == resources && (pool.ready.len() as u32) < pool.config.target {
            pool.ready.push_back(vm);
            pool.warming = pool.warming.saturating_sub(1);
            self.wake.notify_one();
            None
        } else {
            Some(vm)
        }
    }

    /// A refill failed: the pool waits (exponentially longer each time in a row)
    /// before the next, and says why in its status.
    fn failed(&self, template: &str, message: &str) -> std::time::Duration {
        let mut pools = self.pools.lock().unwrap();
        let Some(pool) = pools.get_mut(template) else {
            return std::time::Duration::ZERO;
        };
        let now = std::time::Instant::now();
        // Two refills that ran at once and failed together are one failure.
        let delay = if pool.backoff.ready(now) {
            pool.backoff.failed(now)
        } else {
            pool.backoff.not_before(now)
        };
        pool.last_error = Some(api_model::WarmPoolError {
            message: message.to_string(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            failures: pool.backoff.failures(),
            retry_in_s: delay.as_secs(),
        });
        delay
    }

    /// A refill ended without adding to its pool (its VM, if any, is gone).
    fn done_warming(&self, template: &str) {
        if let Some(pool) = self.pools.lock().unwrap().get_mut(template) {
            pool.warming = pool.warming.saturating_sub(1);
        }
        self.wake.notify_one();
    }

    /// Whether any refill is still making a VM.
    fn warming(&self) -> bool {
        self.pools.lock().unwrap().values().any(|p| p.warming > 0)
    }

    /// Stops refilling (until the next configure): every pool's target drops to zero
    /// in memory; the catalog keeps the real one for the next start.
    fn stop_refilling(&self) {
        for pool in self.pools.lock().unwrap().values_mut() {
            pool.config.target = 0;
        }
    }

    /// Every ready VM, for shutdown.
    fn drain(&self) -> Vec<QemuVm> {
        self.pools
            .lock()
            .unwrap()
            .values_mut()
            .flat_map(|p| p.ready.drain(..))
            .collect()
    }
}

impl Manager {
    /// The shape a pool of `template` has, given what the caller asked: any valid
    /// shape for a built-in template, the template's own (disk may grow) for a custom
    /// one of `team`.
    fn pool_shape(
        &self,
        team: Option<&str>,
        template: &str,
        asked: Option<Resources>,
    ) -> Result<Resources, ApiError> {
        if let Some(t) = self.ready_template(team, template)? {
            if t.id != template {
                return Err(ApiError::bad_request(format!(
                    "warm pools are set by template ID; send {} instead of its name {template}",
                    t.id
                )));
            }
            return super::snapshots::fixed_shape(t.resources, asked, template);
        }
        if !BUILTIN.contains(&template) {
            return Err(ApiError::not_found("template", template).with_details(
                serde_json::json!({ "available": BUILTIN, "hint": "or a ready template of your team (GET /templates)" }),
            ));
        }
        let resources = asked.unwrap_or_default();
        // The same checks a create makes: a pool of shapes no create could ask for
        // would only burn memory.
        self.check_shape(template, resources)?;
        Ok(resources)
    }

    /// Sets `template`'s warm pool; the pool fills (or empties) in the background.
    /// Ready warm VMs on this host per pool (`template/vcpus/memMiB/diskMiB` → count),
    /// what its heartbeat tells placement.
    pub fn warm_counts(&self) -> serde_json::Value {
        serde_json::Value::Object(self.warm.ready_counts())
    }

    pub async fn set_warm_pool(
        &self,
        actor: Actor<'_>,
        template: &str,
        body: WarmPoolBody,
    ) -> Result<PoolStatus, ApiError> {
        body.validate()?;
        let team = match actor {
            Actor::Team(team) => {
                if BUILTIN.contains(&template) || api_model::WORKSPACE_TEMPLATES.contains(&template)
                {
                    return Err(ApiError::forbidden(format!(
                        "the built-in templates' warm pools are the operator's: ask them to size the {template} pool, or build a template of your own (POST /templates) and pool that"
                    )));
                }
                Some(team)
            }
            Actor::Operator => None,
        };
        // A workspace template's pool is its current build's (by ID).
        let template = self.pool_template(template)?;
        let template = template.as_str();
        let resources = self.pool_shape(team, template, body.resources)?;
        let config = PoolConfig {
            target: body.size.min(MAX_WARM_POOL_SIZE),
            resources,
            refill: body.refill.unwrap_or(true),
        };
        let owner = if BUILTIN.contains(&template) {
            None
        } else {
            self.catalog.template(None, template)?.map(|t| t.team_id)
        };
        {
            // One pool change at a time: two could each fit alone and not together.
            let _one_at_a_time = self.admission.lock().unwrap();
            self.check_pool(actor, owner.as_deref(), template, &config)?;
            self.catalog.put_warm_pool(template, &config)?;
        }
        let ready = self.ready_hosts()?;
        let local = PoolConfig {
            target: self.local_target(template, config.target, ready.as_deref()),
            ..config
        };
        for vm in self.warm.configure(template, local) {
            vm.kill().await;
        }
        info!(
            template,
            target = config.target,
            here = local.target,
            refill = config.refill,
            "warm pool set"
        );
        let mut status = self.warm.status(template).expect("just configured");
        // The pool's size is the cluster's; what is ready or warming is this host's.
        status.target = config.target;
        Ok(status)
    }

    /// This host's part of a warm pool of `target` VMs of `template`: all of it on a
    /// catalog of one host; on one hosts share, the target spread over the ready hosts
    /// (`ready`, sorted by ID; [`Manager::ready_hosts`]), none on a host that is not
    /// ready. What does not divide goes to hosts chosen by the template's hash, so a
    /// host joining moves few VMs and pools do not pile their remainders on one host.
    /// When a host is lost or drained the others' parts grow: its warm VMs are made
    /// again elsewhere.
    fn local_target(&self, template: &str, target: u32, ready: Option<&[String]>) -> u32 {
        let (Some(ready), Some(this)) = (ready, crate::cluster::this_host()) else {
            return target;
        };
        let Some(index) = ready.iter().position(|h| h == this) else {
            return 0;
        };
        let n = ready.len() as u32;
        let first = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            template.hash(&mut h);
            (h.finish() % u64::from(n)) as u32
        };
        // Hosts first, first+1, … (wrapping) take one more each.
        let offset = (index as u32 + n - first) % n;
        target / n + u32::from(offset < target % n)
    }

    /// The ready hosts of a shared catalog, by ID (`None` on a catalog of one host). A
    /// host whose heartbeat is late but within twice the expiry still counts: one slow
    /// beat must not move every pool's VMs around.
    fn ready_hosts(&self) -> Result<Option<Vec<String>>, ApiError> {
        if !self.catalog.is_shared() {
            return Ok(None);
        }
        let grace = 2 * crate::catalog::HEARTBEAT_EXPIRY_MS;
        let mut ready: Vec<String> = self
            .catalog
            .hosts()?
            .into_iter()
            .filter(|h| h.is_ready() || (h.state == "dead" && h.now_ms - h.heartbeat_ms <= grace))
            .map(|h| h.info.id)
            .collect();
        ready.sort();
        Ok(Some(ready))
    }

    /// Brings this host's warm pools in line with the shared catalog: pools set or
    /// removed through other hosts, and this host's part of each as hosts come and go
    /// (see [`Manager::local_target`]). Run with every heartbeat.
    pub fn sync_warm_pools(&self) -> Result<(), ApiError> {
        let pools = self.catalog.warm_pools::<PoolConfig>()?;
        let ready = self.ready_hosts()?;
        for (template, config) in &pools {
            let local = PoolConfig {
                target: self.local_target(template, config.target, ready.as_deref()),
                ..*config
            };
            for vm in self.warm.configure(template, local) {
                tokio::spawn(async move { vm.kill().await });
            }
        }
        for template in self.warm.templates() {
            if !pools.iter().any(|(t, _)| *t == template) {
                for vm in self.warm.remove(&template) {
                    tokio::spawn(async move { vm.kill().await });
                }
            }
        }
        Ok(())
    }

    /// A template's warm pool.
    pub fn warm_pool_status(
        &self,
        actor: Actor<'_>,
        template: &str,
    ) -> Result<PoolStatus, ApiError> {
        let team = match actor {
            Actor::Team(team) => Some(team),
            Actor::Operator => None,
        };
        let template = self.pool_template(template)?;
        let template = template.as_str();
        let resources = self.pool_shape(team, template, None)?;
        Ok(self.warm.status(template).unwrap_or(PoolStatus {
            template_id: template.to_string(),
            target: 0,
            ready: 0,
            warming: 0,
            checkouts: 0,
            misses: 0,
            resources,
            refill: true,
            last_error: None,
        }))
    }

    /// A pool's status without a team check (the daemon's own metrics).
    pub(super) fn warm_status_any(&self, template: &str) -> Option<PoolStatus> {
        self.warm.status(template)
    }

    /// Removes a deleted template's pool and ends its VMs.
    pub(super) async fn drop_warm_pool(&self, template: &str) {
        for vm in self.warm.remove(template) {
            vm.kill().await;
        }
    }

    /// A ready VM for a create of `template` with this shape, if its pool has one.
    pub(super) fn check_out(&self, template: &str, resources: Resources) -> Option<QemuVm> {
        self.warm.take(template, resources)
    }

    /// Returns a VM taken for a create that was then refused (the pool keeps it, or it
    /// ends in the background).
    pub(super) fn return_to_pool(&self, template: &str, resources: Resources, vm: QemuVm) {
        if let Some(unwanted) = self.warm.put_back(template, resources, vm) {
            tokio::spawn(async move { unwanted.kill().await });
        }
    }

    /// Loads the pools the catalog records (after a start).
    pub fn load_warm_pools(&self) -> Result<(), ApiError> {
        let ready = self.ready_hosts()?;
        for (template, config) in self.catalog.warm_pools::<PoolConfig>()? {
            let local = PoolConfig {
                target: self.local_target(&template, config.target, ready.as_deref()),
                ..config
            };
            self.warm.configure(&template, local);
        }
        Ok(())
    }

    /// Keeps every pool at its target. Runs until the process ends.
    pub async fn refill_warm_pools(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.warm.wake.notified() => tokio::time::sleep(REFILL_DEFER).await,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            for (template, resources) in self.warm.claim_refills() {
                let this = self.clone();
                tokio::spawn(async move {
                    let made = if BUILTIN.contains(&template.as_str()) {
                        this.restore_template(&template, resources).await
                    } else {
                        this.restore_snapshot_template(None, &template, resources)
                            .await
                    };
                    match made {
                        Ok(mut vm) => {
                            this.prepare_egress(&mut vm);
                            match this.warm.settle(&template, resources, vm) {
                                None => return,
                                Some(unwanted) => unwanted.kill().await,
                            }
                        }
                        Err(e) => {
                            let retry = this.warm.failed(&template, &e.message);
                            warn!(
                                template,
                                error = %e.message,
                                retry_in_s = retry.as_secs(),
                                "warm pool refill failed"
                            );
                        }
                    }
                    this.warm.done_warming(&template);
                });
            }
        }
    }

    /// Ends every warm VM, waiting (a bounded time) for those still being made: no VM
    /// may outlive the daemon unowned.
    pub(super) async fn drain_warm_pools(&self) {
        self.warm.stop_refilling();
        // Inside the daemon's 20 s shutdown budget; a restore takes a second or two.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            for vm in self.warm.drain() {
                vm.kill().await;
            }
            if !self.warm.warming() || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
