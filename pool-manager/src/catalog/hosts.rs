//! The hosts of a cluster sharing this catalog: each pool manager registers itself
//! (ID, addresses, capacity, what its VMs need: QEMU version, accelerator, image set)
//! and heartbeats; placement reads them and reserves capacity on one atomically.
//!
//! A host is `ready`, `draining` (no new placements; an operator's drain; `draining-live`
//! when its running sandboxes migrate live instead of hibernating), `drained`
//! (its sandboxes moved), `lost` (declared dead by another host, which took its
//! sandboxes over), or `dead`: not stored, but read as such when its heartbeat is older
//! than [`HEARTBEAT_EXPIRY_MS`] (until a host declares it lost).

use super::sql::{args, Row};
use super::{Catalog, CatalogError, Durability};
use crate::model::SandboxRecord;
use serde::Serialize;

/// A heartbeat older than this and the host is dead: placement skips it, failover
/// takes over its stored sandboxes.
pub const HEARTBEAT_EXPIRY_MS: i64 = 15_000;

/// How long a reservation holds capacity for a create forwarded to a host before
/// that host's record of the sandbox counts instead.
pub const RESERVATION_TTL_MS: i64 = 120_000;

/// What one host is and has, as it registers itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostInfo {
    /// Its stable ID.
    #[serde(rename = "hostID")]
    pub id: String,
    /// Base URL of its control API (what other hosts forward to).
    pub control_url: String,
    /// Base URL of its data-plane edge.
    pub edge_url: String,
    /// Base URL of its preview listener (previews of its sandboxes are forwarded
    /// there with their `Host` kept).
    pub preview_url: String,
    /// vCPUs, memory and disk sandboxes may have there.
    pub vcpus: u64,
    /// Memory in MiB.
    #[serde(rename = "memMiB")]
    pub mem_mib: u64,
    /// Disk in MiB.
    #[serde(rename = "diskMiB")]
    pub disk_mib: u64,
    /// The QEMU version its VMs run under (snapshots restore only on the same).
    pub qemu: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The key of its guest image set (snapshots restore only on the same).
    pub image_set: String,
    /// The region the operator put it in (`--region`); creates that name a region are
    /// placed on its hosts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Which snapshot store it uses ([`storage::Store::identity`]): hosts with the same
    /// one read each other's snapshots, so a hibernated sandbox may move between them.
    /// `None` for a host registered by an older build (it shares with none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

impl HostInfo {
    /// Whether `other` reads the snapshots this host writes (the same store).
    pub fn shares_store_with(&self, other: &HostInfo) -> bool {
        self.store.is_some() && self.store == other.store
    }
}

/// A host as the catalog knows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// What it registered.
    #[serde(flatten)]
    pub info: HostInfo,
    /// `ready`, `draining`, `drained` or `dead`.
    pub state: String,
    /// Ready warm VMs per template (`template/vcpus/memMiB/diskMiB` → count).
    pub warm: serde_json::Value,
    /// What its live sandboxes hold, and capacity reserved for creates on their way.
    pub allocated: Allocation,
    /// Its last heartbeat, in ms since the epoch.
    pub heartbeat_ms: i64,
    /// The database's time when this was read (what `state` was judged against).
    #[serde(skip)]
    pub now_ms: i64,
}

/// vCPUs, memory and disk taken on a host.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    #[serde(rename = "memMiB")]
    pub mem_mib: u64,
    /// Disk in MiB.
    #[serde(rename = "diskMiB")]
    pub disk_mib: u64,
}

impl HostRecord {
    /// Whether placement may choose it (registered ready and heartbeating).
    pub fn is_ready(&self) -> bool {
        self.state == "ready"
    }

    /// What is left of its capacity.
    pub fn free(&self) -> Allocation {
        Allocation {
            vcpus: self.info.vcpus.saturating_sub(self.allocated.vcpus),
            mem_mib: self.info.mem_mib.saturating_sub(self.allocated.mem_mib),
            disk_mib: self.info.disk_mib.saturating_sub(self.allocated.disk_mib),
        }
    }
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The columns [`host_of`] reads, with each host's allocation: its live sandboxes and
/// its reservations not yet expired. Each is summed once per host (grouped, not a
/// sub-query per host: placement reads every host for every create).
fn select_hosts(dialect: super::sql::Dialect) -> String {
    let now = dialect.now_ms();
    let vcpus = dialect.json_int("record", &["resources", "vcpus"]);
    let mem = dialect.json_int("record", &["resources", "memMiB"]);
    let disk = dialect.json_int("record", &["resources", "diskSizeMiB"]);
    // A stopped sandbox holds its disk, not its CPUs or memory.
    let running = "state <> 'stopped'";
    let live = super::live_states_sql();
    format!(
        "SELECT h.id, h.control_url, h.edge_url, h.preview_url, h.vcpus, h.mem_mib, h.disk_mib,
                h.qemu, h.accel, h.image_set, h.state, h.warm, h.heartbeat_ms, n.now,
                CAST(COALESCE(s.vcpus, 0) + COALESCE(r.vcpus, 0) AS BIGINT),
                CAST(COALESCE(s.mem, 0) + COALESCE(r.mem, 0) AS BIGINT),
                CAST(COALESCE(s.disk, 0) + COALESCE(r.disk, 0) AS BIGINT), h.region, h.store
         FROM hosts h
         CROSS JOIN (SELECT {now} AS now) n
         LEFT JOIN (SELECT host_id,
                           SUM(CASE WHEN {running} THEN {vcpus} ELSE 0 END) AS vcpus,
                           SUM(CASE WHEN {running} THEN {mem} ELSE 0 END) AS mem,
                           SUM({disk}) AS disk
                    FROM sandboxes
                    WHERE host_id IS NOT NULL AND state IN ({live})
                    GROUP BY host_id) s ON s.host_id = h.id
         LEFT JOIN (SELECT host_id, SUM(vcpus) AS vcpus, SUM(mem_mib) AS mem,
                           SUM(disk_mib) AS disk
                    FROM reservations WHERE expires_ms > {now}
                    GROUP BY host_id) r ON r.host_id = h.id"
    )
}

/// A host from a row of [`select_hosts`], its state judged by the database's clock.
fn host_of(row: &Row) -> Result<HostRecord, CatalogError> {
    let heartbeat_ms: i64 = row.get(12)?;
    let now: i64 = row.get(13)?;
    let stored: String = row.get(10)?;
    let state =
        if now - heartbeat_ms > HEARTBEAT_EXPIRY_MS && stored != "drained" && stored != "lost" {
            "dead".to_string()
        } else {
            stored
        };
    Ok(HostRecord {
        info: HostInfo {
            id: row.get(0)?,
            control_url: row.get(1)?,
            edge_url: row.get(2)?,
            preview_url: row.get(3)?,
            vcpus: u(row.get(4)?),
            mem_mib: u(row.get(5)?),
            disk_mib: u(row.get(6)?),
            qemu: row.get(7)?,
            accel: row.get(8)?,
            image_set: row.get(9)?,
            region: row.get(17)?,
            store: row.get(18)?,
        },
        state,
        warm: serde_json::from_str(&row.get::<String>(11)?).unwrap_or_default(),
        heartbeat_ms,
        now_ms: now,
        allocated: Allocation {
            vcpus: u(row.get(14)?),
            mem_mib: u(row.get(15)?),
            disk_mib: u(row.get(16)?),
        },
    })
}

impl Catalog {
    /// Registers this host (or updates what it registered, keeping a `draining` or
    /// `drained` state an operator set), with a first heartbeat.
    pub fn register_host(&self, info: &HostInfo) -> Result<(), CatalogError> {
        let now = self.db.dialect().now_ms();
        self.db.execute(
            &format!("INSERT INTO hosts (id, control_url, edge_url, preview_url, vcpus, mem_mib, disk_mib,
                                qemu, accel, image_set, state, warm, heartbeat_ms, registered_ms, region, store)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'ready', '{{}}', {now}, {now}, ?11, ?12)
             ON CONFLICT(id) DO UPDATE SET control_url = excluded.control_url,
                 edge_url = excluded.edge_url, preview_url = excluded.preview_url,
                 vcpus = excluded.vcpus, mem_mib = excluded.mem_mib,
                 disk_mib = excluded.disk_mib, qemu = excluded.qemu, accel = excluded.accel,
                 image_set = excluded.image_set, heartbeat_ms = excluded.heartbeat_ms,
                 region = excluded.region, store = excluded.store"),
            args![
                &info.id,
                &info.control_url,
                &info.edge_url,
                &info.preview_url,
                i(info.vcpus),
                i(info.mem_mib),
                i(info.disk_mib),
                &info.qemu,
                &info.accel,
                &info.image_set,
                info.region.as_deref(),
                info.store.as_deref()
            ],
        )?;
        Ok(())
    }

    /// This host is alive, with these warm VMs and this much disk for sandboxes now;
    /// returns its state as stored (an operator may have set it draining). Not synced:
    /// a heartbeat lost in a crash is the next one's.
    pub fn heartbeat(
        &self,
        host: &str,
        warm: &serde_json::Value,
        disk_mib: u64,
    ) -> Result<String, CatalogError> {
        let now = self.db.dialect().now_ms();
        let row = self.db.transaction(Durability::UntilPowerLoss, |tx| {
            tx.execute(
                &format!(
                    "UPDATE hosts SET heartbeat_ms = {now}, warm = ?2, disk_mib = ?3 WHERE id = ?1"
                ),
                args![host, warm.to_string(), i(disk_mib)],
            )?;
            tx.query_opt("SELECT state FROM hosts WHERE id = ?1", args![host])
        })?;
        match row {
            Some(r) => r.get(0),
            None => Err(CatalogError::Conflict(format!(
                "host {host} is not registered (was it removed?)"
            ))),
        }
    }

    /// Every host, by ID, with its allocation and its state as of now.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, CatalogError> {
        let sql = format!("{} ORDER BY h.id", select_hosts(self.db.dialect()));
        self.db.query(&sql, &[])?.iter().map(host_of).collect()
    }

    /// A host's recorded state (`ready`, `draining`, `drained`, `lost`), without its
    /// load: one row, no scan of the sandboxes.
    pub fn host_state(&self, id: &str) -> Result<Option<String>, CatalogError> {
        self.db
            .query_opt("SELECT state FROM hosts WHERE id = ?1", args![id])?
            .map(|r| r.get(0))
            .transpose()
    }

    /// One host.
    pub fn host(&self, id: &str) -> Result<Option<HostRecord>, CatalogError> {
        let sql = format!("{} WHERE h.id = ?1", select_hosts(self.db.dialect()));
        self.db
            .query_opt(&sql, args![id])?
            .map(|r| host_of(&r))
            .transpose()
    }

    /// Sets a host's state (`ready`, `draining`, `drained`); false if there is no
    /// such host.
    pub fn set_host_state(&self, id: &str, state: &str) -> Result<bool, CatalogError> {
        Ok(self.db.execute(
            "UPDATE hosts SET state = ?2 WHERE id = ?1",
            args![id, state],
        )? > 0)
    }

    /// Declares `host` lost if it still is what this host saw (`heartbeat_ms`, and not
    /// lost, drained or beating again since): true for the one host that wins the claim
    /// and takes its sandboxes over.
    pub fn declare_lost(&self, host: &str, heartbeat_ms: i64) -> Result<bool, CatalogError> {
        Ok(self.db.execute(
            "UPDATE hosts SET state = 'lost'
             WHERE id = ?1 AND heartbeat_ms = ?2 AND state IN ('ready', 'draining', 'draining-live')",
            args![host, heartbeat_ms],
        )? > 0)
    }

    /// The sandboxes host `host` owns that are not deleted, oldest first.
    pub fn sandboxes_of_host(&self, host: &str) -> Result<Vec<SandboxRecord>, CatalogError> {
        self.db
            .query(
                "SELECT record FROM sandboxes WHERE host_id = ?1 AND state != 'deleted' ORDER BY seq",
                args![host],
            )?
            .iter()
            .map(|r| Ok(serde_json::from_str(&r.get::<String>(0)?)?))
            .collect()
    }

    /// Moves sandbox `id` from host `from` to host `to` (the next ownership epoch),
    /// with `change` applied to its record, in one transaction; `None` if `from` does
    /// not own it (any more). The old owner's later writes of it are refused.
    pub fn reassign(
        &self,
        id: &str,
        from: &str,
        to: &str,
        change: impl FnOnce(&mut SandboxRecord),
    ) -> Result<Option<SandboxRecord>, CatalogError> {
        let mut change = Some(change);
        self.db.transaction(Durability::Synced, |tx| {
            tx.lock("sandbox", id)?;
            let Some(row) = tx.query_opt(
                "SELECT record FROM sandboxes WHERE id = ?1 AND host_id = ?2",
                args![id, from],
            )?
            else {
                return Ok(None);
            };
            let mut r: SandboxRecord = serde_json::from_str(&row.get::<String>(0)?)?;
            if let Some(change) = change.take() {
                change(&mut r);
            }
            r.host_id = Some(to.to_string());
            r.owner_epoch += 1;
            let moved = tx.execute(
                "UPDATE sandboxes SET record = ?3 WHERE id = ?1 AND host_id = ?2",
                args![id, from, serde_json::to_string(&r)?],
            )?;
            Ok((moved > 0).then_some(r))
        })
    }

    /// Reserves `need` on host `host` for a create on its way there, if the host is
    /// ready and has that much free; returns the reservation's ID. Checked and written
    /// in one transaction under a lock on the host, so two hosts placing at once never
    /// both take the last of its capacity.
    pub fn reserve(&self, host: &str, need: Allocation) -> Result<Option<String>, CatalogError> {
        self.reserve_for(host, need, RESERVATION_TTL_MS)
    }

    /// [`Catalog::reserve`] for `ttl_ms` (a live migration's room lasts its deadlines).
    pub fn reserve_for(
        &self,
        host: &str,
        need: Allocation,
        ttl_ms: i64,
    ) -> Result<Option<String>, CatalogError> {
        let id = format!("rsv-{}", uuid::Uuid::new_v4().simple());
        let sql = format!("{} WHERE h.id = ?1", select_hosts(self.db.dialect()));
        self.db.transaction(Durability::Synced, |tx| {
            tx.lock("host", host)?;
            let Some(row) = tx.query_opt(&sql, args![host])? else {
                return Ok(None);
            };
            let now: i64 = row.get(13)?;
            let h = host_of(&row)?;
            let free = h.free();
            if !h.is_ready()
                || free.vcpus < need.vcpus
                || free.mem_mib < need.mem_mib
                || free.disk_mib < need.disk_mib
            {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO reservations (id, host_id, vcpus, mem_mib, disk_mib, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                args![
                    &id,
                    host,
                    i(need.vcpus),
                    i(need.mem_mib),
                    i(need.disk_mib),
                    now + ttl_ms
                ],
            )?;
            Ok(Some(id.clone()))
        })
    }

    /// Ends a reservation (its create landed, and its record counts now; or it failed).
    /// Expired ones are pruned on the way.
    pub fn release_reservation(&self, id: &str) -> Result<(), CatalogError> {
        self.db.execute(
            &format!(
                "DELETE FROM reservations WHERE id = ?1 OR expires_ms <= {}",
                self.db.dialect().now_ms()
            ),
            args![id],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> HostInfo {
        HostInfo {
            id: id.into(),
            control_url: format!("http://{id}:7070"),
            edge_url: format!("http://{id}:7071"),
            preview_url: format!("{id}:7072"),
            vcpus: 4,
            mem_mib: 4096,
            disk_mib: 10_000,
            qemu: "QEMU emulator version 7.2.0".into(),
            accel: "kvm".into(),
            image_set: "img-1".into(),
            region: None,
            store: None,
        }
    }

    #[test]
    fn hosts_register_heartbeat_and_reserve_only_what_is_free() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            c.register_host(&info("host-a")).unwrap();
            c.register_host(&info("host-b")).unwrap();
            let warm = serde_json::json!({ "base/1/256/1024": 2 });
            assert_eq!(c.heartbeat("host-a", &warm, 1000).unwrap(), "ready");
            let hosts = c.hosts().unwrap();
            assert_eq!(hosts.len(), 2, "{}", t.name());
            assert_eq!(hosts[0].warm, warm, "{}", t.name());
            assert_eq!(hosts[0].allocated, Allocation::default());
            // Reservations add up, and refuse what is not free.
            let need = Allocation {
                vcpus: 3,
                mem_mib: 1024,
                disk_mib: 1000,
            };
            let first = c.reserve("host-a", need).unwrap();
            assert!(first.is_some(), "{}", t.name());
            assert_eq!(c.host("host-a").unwrap().unwrap().allocated, need);
            assert!(
                c.reserve("host-a", need).unwrap().is_none(),
                "{}: 6 of 4 vCPUs",
                t.name()
            );
            c.release_reservation(&first.unwrap()).unwrap();
            assert!(c.reserve("host-a", need).unwrap().is_some(), "{}", t.name());
            // A draining host takes no placements; re-registering keeps the drain.
            assert!(c.set_host_state("host-b", "draining").unwrap());
            c.register_host(&info("host-b")).unwrap();
            assert_eq!(c.host("host-b").unwrap().unwrap().state, "draining");
            // The one-row read a create on one host makes agrees with the full one.
            assert_eq!(c.host_state("host-b").unwrap().as_deref(), Some("draining"));
            assert_eq!(c.host_state("host-a").unwrap().as_deref(), Some("ready"));
            assert_eq!(c.host_state("host-z").unwrap(), None, "{}", t.name());
            assert!(c.reserve("host-b", need).unwrap().is_none(), "{}", t.name());
            assert!(!c.set_host_state("host-z", "draining").unwrap());
            assert!(c.heartbeat("host-z", &warm, 1000).is_err(), "{}", t.name());
        }
    }

    #[test]
    fn hosts_share_snapshots_only_through_one_named_store() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            let s3 = Some("http://s3:8333/snaps/".to_string());
            for (id, store) in [("a", s3.clone()), ("b", s3.clone()), ("c", None)] {
                c.register_host(&HostInfo { store, ..info(id) }).unwrap();
            }
            let a = c.host("a").unwrap().unwrap().info;
            assert_eq!(a.store, s3, "{}", t.name());
            assert!(a.shares_store_with(&c.host("b").unwrap().unwrap().info));
            // A host that never said (an older build) shares with none, itself included.
            let old = c.host("c").unwrap().unwrap().info;
            assert!(!a.shares_store_with(&old) && !old.shares_store_with(&old));
            // Re-registering with another store is what the catalog keeps.
            c.register_host(&HostInfo {
                store: Some("file://m/x".into()),
                ..info("b")
            })
            .unwrap();
            assert!(!a.shares_store_with(&c.host("b").unwrap().unwrap().info));
        }
    }

    #[test]
    fn on_postgres_a_host_sees_its_own_rows_only() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            c.create_team("acme", Some("team-acme")).unwrap();
            let mut mine = crate::model::SandboxRecord::fresh(
                "team-acme",
                "base".into(),
                crate::model::Resources::default(),
                60,
                0,
            );
            mine.state = crate::model::InternalState::Active;
            mine.host_id = Some("host-a".into());
            let mut theirs = mine.clone();
            theirs.id = "sbx-theirs".into();
            theirs.host_id = Some("host-b".into());
            let mut legacy = mine.clone();
            legacy.id = "sbx-legacy".into();
            legacy.host_id = None;
            for r in [&mine, &theirs, &legacy] {
                c.put_sandbox(r).unwrap();
            }
            c.begin_intent("sbx-x", "pause", &serde_json::json!({}), Durability::Synced)
                .unwrap();
            c.set_host("host-a").unwrap();
            c.begin_intent("sbx-y", "pause", &serde_json::json!({}), Durability::Synced)
                .unwrap();
            let mut seen: Vec<String> = c
                .sandboxes_in(&["active"])
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            seen.sort();
            // On SQLite (one host's file) every row is this host's; on Postgres only
            // its own, and rows of no host are nobody's.
            let sqlite = t.name() == "sqlite";
            let mut want = vec![mine.id.clone()];
            if sqlite {
                want.push(legacy.id.clone());
                want.push(theirs.id.clone());
            }
            want.sort();
            assert_eq!(seen, want, "{}", t.name());
            assert!(c.set_host("host-b").is_err());
            // Another host's handle sees its own intents (and none of host-a's).
            let other = t.reopen();
            other.set_host("host-b").unwrap();
            let theirs_intents: Vec<String> = other
                .intents()
                .unwrap()
                .into_iter()
                .map(|i| i.sandbox_id)
                .collect();
            let expected: Vec<String> = if sqlite {
                vec!["sbx-x".into(), "sbx-y".into()]
            } else {
                vec![]
            };
            assert_eq!(theirs_intents, expected, "{}", t.name());
            assert_eq!(
                c.intents().unwrap().len(),
                if sqlite { 2 } else { 1 },
                "{}",
                t.name()
            );
        }
    }

    #[test]
    fn a_moved_sandbox_cannot_be_written_back_by_its_old_host() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            c.create_team("acme", Some("team-acme")).unwrap();
            let mut r = crate::model::SandboxRecord::fresh(
                "team-acme",
                "base".into(),
                crate::model::Resources::default(),
                60,
                0,
            );
            r.host_id = Some("host-a".into());
            c.put_sandbox(&r).unwrap();
            // Only its owner may hand it over; the move is a new epoch.
            assert!(c
                .reassign(&r.id, "host-x", "host-b", |_| {})
                .unwrap()
                .is_none());
            let moved = c
                .reassign(&r.id, "host-a", "host-b", |_| {})
                .unwrap()
                .unwrap();
            assert_eq!(
                (moved.host_id.as_deref(), moved.owner_epoch),
                (Some("host-b"), 1)
            );
            // The old owner's copy (host-a, epoch 0) is refused on a shared catalog.
            let stale = c.put_sandbox(&r);
            if t.name() == "sqlite" {
                assert!(stale.is_ok());
            } else {
                assert!(matches!(stale, Err(CatalogError::Conflict(_))), "{stale:?}");
                assert_eq!(
                    c.sandbox(&r.id).unwrap().unwrap().host_id.as_deref(),
                    Some("host-b")
                );
                // The new owner writes it.
                c.put_sandbox(&moved).unwrap();
            }
        }
    }
}
