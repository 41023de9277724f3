//! Intent records: a multi-step lifecycle operation (pause, hibernate, fork, snapshot,
//! restore, create, delete, volume save) writes what it set out to do before its first
//! step, and how far it got after each step that outlives the process. The row goes
//! when the operation ends, however it ends in-process; a row still there at start is
//! an operation a crash cut short, which the daemon finishes or rolls back
//! (`sandboxes::recovery`).

use super::sql::args;
use super::{now_ms, Catalog, CatalogError, Durability};

/// One operation a crash may have cut short.
#[derive(Debug, Clone)]
pub struct Intent {
    /// The row's ID.
    pub id: i64,
    /// The sandbox it acts on (for a fork, the parent; for a restore or a create, the
    /// new sandbox).
    pub sandbox_id: String,
    /// What it does (`pause`, `hibernate`, …).
    pub op: String,
    /// The last step it finished (`begun` until the first).
    pub step: String,
    /// What recovery needs to know: paths, IDs, the new sandboxes.
    pub data: serde_json::Value,
    /// When it began, in ms since the epoch.
    pub started_at_ms: i64,
}

// The table is made by the catalog's migrations (version 1).

impl Catalog {
    /// Records that `op` on `sandbox_id` begins, with what recovery needs; returns the
    /// intent's ID, committed before the first step runs: synced, or with
    /// [`Durability::UntilPowerLoss`] for an operation whose every effect a power loss
    /// undoes anyway (a create that holds no volume: its VM). A crash of this process
    /// keeps an unsynced commit, and the commits that do survive a power loss are
    /// always a prefix of those made. (On PostgreSQL a crash of the database server
    /// also loses unsynced commits while the VM lives on: the record a checkout writes
    /// unsynced is lost with its intent, as it already was alone, and the VM is an
    /// orphan until this daemon's next start reaps it.)
    pub fn begin_intent(
        &self,
        sandbox_id: &str,
        op: &str,
        data: &serde_json::Value,
        durability: Durability,
    ) -> Result<i64, CatalogError> {
        let sql = "INSERT INTO intents (sandbox_id, op, step, data, started_at_ms, host_id)
                   VALUES (?1, ?2, 'begun', ?3, ?4, ?5) RETURNING id";
        let args = args![sandbox_id, op, data.to_string(), now_ms(), self.host.get()];
        match durability {
            // One statement on its own: on PostgreSQL a transaction around it would be
            // three more round trips.
            Durability::Synced => self.db.query_one(sql, args)?.get(0),
            Durability::UntilPowerLoss => self
                .db
                .transaction(durability, |tx| tx.query_one(sql, args)?.get(0)),
        }
    }

    /// Records that intent `id` finished `step`; the keys of `data` (an object) are
    /// merged into what it recorded before. As durable as the intent's begin was.
    pub fn intent_step(
        &self,
        id: i64,
        step: &str,
        data: &serde_json::Value,
        durability: Durability,
    ) -> Result<(), CatalogError> {
        let merged = self.db.dialect().json_merge("data", 3);
        let sql = format!("UPDATE intents SET step = ?2, data = {merged} WHERE id = ?1");
        self.execute_as(durability, &sql, args![id, step, data.to_string()])
    }

    /// The operation of intent `id` ended (done, or undone by its own error handling).
    /// As durable as the intent's begin was.
    pub fn end_intent(&self, id: i64, durability: Durability) -> Result<(), CatalogError> {
        self.execute_as(durability, "DELETE FROM intents WHERE id = ?1", args![id])
    }

    /// One statement, synced on its own or committed unsynced in a transaction.
    fn execute_as(
        &self,
        durability: Durability,
        sql: &str,
        args: &[super::sql::Value],
    ) -> Result<(), CatalogError> {
        match durability {
            Durability::Synced => self.db.execute(sql, args)?,
            Durability::UntilPowerLoss => self
                .db
                .transaction(durability, |tx| tx.execute(sql, args))?,
        };
        Ok(())
    }

    /// Every intent not ended, oldest first.
    pub fn intents(&self) -> Result<Vec<Intent>, CatalogError> {
        let mut params = Vec::new();
        let mine = self.host_filter("host_id", &mut params);
        self.db
            .query(
                &format!(
                    "SELECT id, sandbox_id, op, step, data, started_at_ms FROM intents
                     WHERE 1 = 1{mine} ORDER BY id"
                ),
                &params,
            )?
            .iter()
            .map(|r| {
                Ok(Intent {
                    id: r.get(0)?,
                    sandbox_id: r.get(1)?,
                    op: r.get(2)?,
                    step: r.get(3)?,
                    data: serde_json::from_str(&r.get::<String>(4)?)
                        .unwrap_or(serde_json::Value::Null),
                    started_at_ms: r.get(5)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::Durability::{Synced, UntilPowerLoss as Relaxed};
    use serde_json::json;

    #[test]
    fn steps_merge_data_and_ended_intents_are_gone() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            let a = c
                .begin_intent("sbx-a", "pause", &json!({ "dir": "/p/1" }), Synced)
                .unwrap();
            let b = c
                .begin_intent("sbx-b", "delete", &json!({}), Synced)
                .unwrap();
            assert!(b > a, "{}: IDs increase", t.name());
            c.intent_step(a, "snapshotted", &json!({ "snapshot": "s1" }), Synced)
                .unwrap();
            c.end_intent(b, Synced).unwrap();
            // Unsynced intents are committed all the same: a restart of the process
            // sees where they got to, and one ended is gone.
            let d = c
                .begin_intent("sbx-d", "create", &json!({ "volumes": [] }), Relaxed)
                .unwrap();
            c.intent_step(d, "create.admitted", &json!({}), Relaxed)
                .unwrap();
            let e = c
                .begin_intent("sbx-e", "create", &json!({}), Relaxed)
                .unwrap();
            c.end_intent(e, Relaxed).unwrap();
            // What a restart sees: a's last step and everything it recorded.
            let reopened = t.reopen();
            let left = reopened.intents().unwrap();
            assert_eq!(left.len(), 2, "{}", t.name());
            assert_eq!(
                (left[1].sandbox_id.as_str(), left[1].step.as_str()),
                ("sbx-d", "create.admitted"),
                "{}",
                t.name()
            );
            assert_eq!(
                (
                    left[0].sandbox_id.as_str(),
                    left[0].op.as_str(),
                    left[0].step.as_str()
                ),
                ("sbx-a", "pause", "snapshotted")
            );
            assert_eq!(left[0].data, json!({ "dir": "/p/1", "snapshot": "s1" }));
        }
    }
}
