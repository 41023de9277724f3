//! Per-team limits: what a team may hold at once (sandboxes, vCPUs, memory, disk,
//! snapshots, volumes, templates, builds) and how fast it may create sandboxes (a token
//! bucket). A team's own limits are a patch over the host's defaults, set by an operator
//! (`admin team quota`, `PUT /v1/teams/{team}/quota`).
//!
//! Every check is made before anything is spent: a refused create takes no warm VM and
//! starts no restore.

use api_model::ApiError;
pub use api_model::LimitsPatch;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Everything a team may hold or do, in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Live sandboxes (every state but deleted and error).
    pub sandboxes: u64,
    /// vCPUs of live sandboxes and of the team's own warm pools' VMs.
    pub vcpus: u64,
    /// Memory (MiB) of live sandboxes and of the team's warm VMs.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Disk (MiB, as provisioned) of live sandboxes.
    #[serde(rename = "diskMiB")]
    pub disk_mib: u64,
    /// Stored snapshots (manual, periodic, hibernate).
    pub snapshots: u64,
    /// Their total size (MiB).
    #[serde(rename = "snapshotMiB")]
    pub snapshot_mib: u64,
    /// Volumes.
    pub volumes: u64,
    /// Their total provisioned size (MiB).
    #[serde(rename = "volumeMiB")]
    pub volume_mib: u64,
    /// Custom templates (built, building or failed).
    pub templates: u64,
    /// Template builds running or queued at once.
    pub builds: u64,
    /// Sandboxes created per minute, sustained (the bucket's refill).
    pub creates_per_minute: u64,
    /// Sandboxes created in a burst (the bucket's size).
    pub create_burst: u64,
}

impl Limits {
    /// The host's defaults: every resource limited, generously; `sandboxes` is the
    /// daemon's `--max-sandboxes-per-team`.
    pub fn defaults(sandboxes: u32) -> Self {
        Self {
            sandboxes: sandboxes as u64,
            vcpus: 64,
            memory_mib: 128 << 10,
            disk_mib: 1 << 20,
            snapshots: 200,
            snapshot_mib: 200 << 10,
            volumes: 50,
            volume_mib: 512 << 10,
            templates: 50,
            builds: 2,
            creates_per_minute: 120,
            create_burst: 60,
        }
    }

    /// These limits with `patch`'s fields in place of theirs.
    pub fn with(self, patch: &LimitsPatch) -> Self {
        patch.overlay(&self)
    }
}

/// What a team holds now, counted against its [`Limits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub sandboxes: u64,
    pub vcpus: u64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    #[serde(rename = "diskMiB")]
    pub disk_mib: u64,
    pub snapshots: u64,
    #[serde(rename = "snapshotMiB")]
    pub snapshot_mib: u64,
    pub volumes: u64,
    #[serde(rename = "volumeMiB")]
    pub volume_mib: u64,
    pub templates: u64,
    pub builds: u64,
}

impl Usage {
    /// `(name, used, limit)` per limit that counts holdings (not the create rate).
    pub fn checks(&self, l: &Limits) -> [(&'static str, u64, u64); 10] {
        [
            ("sandboxes", self.sandboxes, l.sandboxes),
            ("vcpus", self.vcpus, l.vcpus),
            ("memoryMiB", self.memory_mib, l.memory_mib),
            ("diskMiB", self.disk_mib, l.disk_mib),
            ("snapshots", self.snapshots, l.snapshots),
            ("snapshotMiB", self.snapshot_mib, l.snapshot_mib),
            ("volumes", self.volumes, l.volumes),
            ("volumeMiB", self.volume_mib, l.volume_mib),
            ("templates", self.templates, l.templates),
            ("builds", self.builds, l.builds),
        ]
    }
}

/// Refuses `want` more of `name` when `used + want` would pass `limit`: a 429 that says
/// what is held, what the limit is and what to do.
pub fn check(name: &str, used: u64, want: u64, limit: u64) -> Result<(), ApiError> {
    if used.saturating_add(want) <= limit {
        return Ok(());
    }
    let what = match name {
        "sandboxes" => "live sandboxes",
        "vcpus" => "vCPUs (live sandboxes and the team's warm VMs)",
        "memoryMiB" => "MiB of memory (live sandboxes and the team's warm VMs)",
        "diskMiB" => "MiB of sandbox disk",
        "snapshots" => "stored snapshots",
        "snapshotMiB" => "MiB of stored snapshots",
        "volumes" => "volumes",
        "volumeMiB" => "MiB of volumes",
        "templates" => "templates",
        "builds" => "builds running or queued",
        _ => name,
    };
    Err(ApiError::quota(format!(
        "the team holds {used} {what} and its quota is {limit}; this needs {want} more: free some (delete sandboxes, snapshots, volumes or templates), or ask the operator to raise {name} (`admin team quota TEAM --set {name}=N`)"
    ))
    .with_details(serde_json::json!({ "quota": name, "used": used, "limit": limit, "requested": want })))
}

/// Per-team token buckets for creates.
#[derive(Default)]
pub struct CreateRate {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl CreateRate {
    /// Takes `n` creates from `team`'s bucket (`per_minute` refill, `burst` size), or
    /// says how long until they are there: a 429 with `retryAfterS` (the HTTP faces send
    /// it as `Retry-After`).
    pub fn take(&self, team: &str, n: u64, per_minute: u64, burst: u64) -> Result<(), ApiError> {
        self.take_at(team, n, per_minute, burst, Instant::now())
    }

    fn take_at(
        &self,
        team: &str,
        n: u64,
        per_minute: u64,
        burst: u64,
        now: Instant,
    ) -> Result<(), ApiError> {
        let mut buckets = self.buckets.lock().unwrap();
        let b = buckets.entry(team.to_string()).or_insert(Bucket {
            tokens: burst as f64,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        let (tokens, taken) = take_from_bucket(b.tokens, elapsed, n, per_minute, burst);
        b.tokens = tokens;
        b.at = now;
        taken
    }
}

/// Takes `n` creates from a bucket that held `tokens` `elapsed_s` seconds ago (refilled
/// at `per_minute`, holding at most `burst`): the tokens it holds now, and whether they
/// were taken or the 429 that says when to retry.
pub fn take_from_bucket(
    tokens: f64,
    elapsed_s: f64,
    n: u64,
    per_minute: u64,
    burst: u64,
) -> (f64, Result<(), ApiError>) {
    if per_minute == 0 || burst == 0 || n > burst {
        return (tokens, Err(ApiError::quota(format!(
            "the team may create {per_minute} sandboxes a minute, {burst} at once; this asks for {n}: ask the operator to raise createsPerMinute/createBurst"
        ))
        .with_details(serde_json::json!({ "quota": "createsPerMinute", "limit": per_minute, "burst": burst, "requested": n }))));
    }
    let rate = per_minute as f64 / 60.0;
    let tokens = (tokens + elapsed_s.max(0.0) * rate).min(burst as f64);
    if tokens >= n as f64 {
        return (tokens - n as f64, Ok(()));
    }
    let wait = Duration::from_secs_f64((n as f64 - tokens) / rate);
    let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    (tokens, Err(ApiError::new(
        429,
        "rate_limited",
        format!(
            "the team creates sandboxes faster than its rate ({per_minute} a minute, bursts of {burst}); retry in {retry_after} s (Retry-After), or ask the operator to raise createsPerMinute"
        ),
    )
    .with_details(serde_json::json!({ "quota": "createsPerMinute", "limit": per_minute, "burst": burst, "retryAfterS": retry_after }))))
}

impl CreateRate {
    /// Gives back `n` creates taken for a request that was then refused for another
    /// reason (a quota, an empty pool): only what is spent counts against the rate.
    pub fn refund(&self, team: &str, n: u64, burst: u64) {
        if let Some(b) = self.buckets.lock().unwrap().get_mut(team) {
            b.tokens = (b.tokens + n as f64).min(burst as f64);
        }
    }
}

/// The `Retry-After` seconds a rate-limited error carries, if any.
#[cfg(test)]
fn retry_after(e: &ApiError) -> Option<u64> {
    (e.code == "rate_limited")
        .then(|| e.details.get("retryAfterS")?.as_u64())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_replaces_only_the_limits_it_sets() {
        let mut p = LimitsPatch::default();
        p.set("vcpus=4").unwrap();
        p.set("memoryMiB=1024").unwrap();
        let l = Limits::defaults(20).with(&p);
        assert_eq!((l.vcpus, l.memory_mib, l.sandboxes), (4, 1024, 20));
        assert!(p.set("cpus=4").unwrap_err().contains("vcpus"));
        assert!(p.set("vcpus=-1").unwrap_err().contains("whole number"));
        assert!(LimitsPatch::default().validate().is_err());
        let huge = LimitsPatch {
            disk_mib: Some(u64::MAX),
            ..Default::default()
        };
        assert!(huge.validate().is_err());
    }

    #[test]
    fn over_the_limit_is_a_429_that_names_it() {
        assert!(check("vcpus", 6, 2, 8).is_ok());
        let e = check("vcpus", 7, 2, 8).unwrap_err();
        assert_eq!((e.status, e.code), (429, "quota_exceeded"));
        assert!(e.message.contains("vcpus=N"), "{}", e.message);
        assert_eq!(e.details["used"], 7);
    }

    #[test]
    fn the_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let rate = CreateRate::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            rate.take_at("a", 1, 60, 3, t0).unwrap();
        }
        let e = rate.take_at("a", 1, 60, 3, t0).unwrap_err();
        assert_eq!((e.status, e.code), (429, "rate_limited"));
        assert_eq!(retry_after(&e), Some(1));
        // Another team has its own bucket.
        rate.take_at("b", 1, 60, 3, t0).unwrap();
        // A refund gives back what a refused request took, never past the burst.
        rate.refund("b", 5, 3);
        for _ in 0..3 {
            rate.take_at("b", 1, 60, 3, t0).unwrap();
        }
        assert!(rate.take_at("b", 1, 60, 3, t0).is_err());
        // One a second comes back.
        rate.take_at("a", 1, 60, 3, t0 + Duration::from_millis(1001))
            .unwrap();
        assert!(rate
            .take_at("a", 1, 60, 3, t0 + Duration::from_millis(1001))
            .is_err());
        // Zero stops creates with a quota error, not a retry.
        assert_eq!(
            rate.take_at("c", 1, 0, 3, t0).unwrap_err().code,
            "quota_exceeded"
        );
    }
}
