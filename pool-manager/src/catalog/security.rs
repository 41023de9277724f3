//! What the security proxy keeps in the catalog: each team's interception CA (one per
//! team for every host of a cluster, so a sandbox that moves keeps trusting its
//! proxy), and each sandbox's audit of the requests its guest made through it.
//!
//! The audit is bounded per sandbox: past [`AUDIT_KEPT`] records the oldest go, so a
//! guest making requests in a loop costs the catalog a fixed amount; the rows go with
//! the sandbox's record when deleted sandboxes are pruned.

use super::sql::args;
use super::{now_ms, Catalog, CatalogError, Durability};

/// Most audit records kept per sandbox (the newest).
pub const AUDIT_KEPT: u64 = 10_000;

/// A page of a sandbox's audit.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    /// `(id, record)`, oldest first.
    pub records: Vec<(u64, serde_json::Value)>,
    /// Whether records past the last one exist.
    pub more: bool,
}

// The tables are made by the catalog's migrations (version 5).

impl Catalog {
    /// The team's interception CA as `(certificate PEM, key PEM)`: the stored one, or
    /// else the one `make` makes (the first host to ask stores it; a host racing it
    /// gets the stored one).
    pub fn team_ca(
        &self,
        team: &str,
        make: impl FnOnce() -> Result<(String, String), String>,
    ) -> Result<(String, String), CatalogError> {
        if let Some(found) = self.stored_team_ca(team)? {
            return Ok(found);
        }
        let (cert, key) = make().map_err(CatalogError::Conflict)?;
        self.db.execute(
            "INSERT INTO team_cas (team_id, cert_pem, key_pem) VALUES (?1, ?2, ?3) ON CONFLICT(team_id) DO NOTHING",
            args![team, cert, key],
        )?;
        self.stored_team_ca(team)?
            .ok_or_else(|| CatalogError::Conflict(format!("the CA of team {team} was not stored")))
    }

    fn stored_team_ca(&self, team: &str) -> Result<Option<(String, String)>, CatalogError> {
        let rows = self.db.query(
            "SELECT cert_pem, key_pem FROM team_cas WHERE team_id = ?1",
            args![team],
        )?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some((row.get(0)?, row.get(1)?))),
            None => Ok(None),
        }
    }

    /// Appends records to a sandbox's audit, and `events` to its event log, in one
    /// transaction (kept until power loss: an audit batch lost with the host is the
    /// host's last second of requests); drops what is past [`AUDIT_KEPT`].
    pub fn append_audit(
        &self,
        sandbox_id: &str,
        records: &[serde_json::Value],
        events: &[(&str, serde_json::Value)],
    ) -> Result<(), CatalogError> {
        if records.is_empty() && events.is_empty() {
            return Ok(());
        }
        self.db.transaction(Durability::UntilPowerLoss, |tx| {
            tx.lock("audit", sandbox_id)?;
            let first: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM audit_records WHERE sandbox_id = ?1",
                    args![sandbox_id],
                )?
                .get(0)?;
            let at = now_ms();
            for (seq, record) in (first..).zip(records) {
                tx.execute(
                    "INSERT INTO audit_records (sandbox_id, seq, at_ms, record) VALUES (?1, ?2, ?3, ?4)",
                    args![sandbox_id, seq, at, record.to_string()],
                )?;
            }
            let last = first + records.len() as i64 - 1;
            if last > AUDIT_KEPT as i64 {
                tx.execute(
                    "DELETE FROM audit_records WHERE sandbox_id = ?1 AND seq <= ?2",
                    args![sandbox_id, last - AUDIT_KEPT as i64],
                )?;
            }
            if !events.is_empty() {
                Self::append_events(tx, sandbox_id, events)?;
            }
            Ok(())
        })?;
        if !events.is_empty() {
            self.announce(sandbox_id);
        }
        Ok(())
    }

    /// Up to `limit` of a sandbox's audit records with IDs above `after`, oldest first.
    pub fn audit(
        &self,
        sandbox_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<AuditPage, CatalogError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = self.db.query(
            "SELECT seq, record FROM audit_records WHERE sandbox_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            args![sandbox_id, after, limit as i64 + 1],
        )?;
        let mut records = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let seq: i64 = row.get(0)?;
            let text: String = row.get(1)?;
            records.push((seq.max(0) as u64, serde_json::from_str(&text)?));
        }
        Ok(AuditPage {
            more: rows.len() > limit,
            records,
        })
    }
}
