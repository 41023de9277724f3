//! The catalog: teams, API keys, sandbox records, their event logs and template
//! snapshots, in an embedded SQLite database (WAL, synchronous=FULL) in the state dir.
//!
//! Sandbox records are stored as JSON documents: the record shape grows with every issue,
//! and per-host volumes (hundreds of sandboxes) filter comfortably in memory.

use crate::model::{iso8601, Event, SandboxRecord, TemplateRecord};
use crate::quotas::LimitsPatch;
use api_model::BuildLogLine;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Mutex;

mod builds;
mod intents;
pub use intents::Intent;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("catalog record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Conflict(String),
}

/// A team.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Team {
    pub id: String,
    pub name: String,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Acts for its team on the team's own sandboxes, snapshots, volumes and templates.
    Team,
    /// Runs the platform: teams, quotas, keys and the built-in templates' warm pools.
    Operator,
}

impl Role {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Team => "team",
            Role::Operator => "operator",
        }
    }
}

/// The reserved team operator keys belong to (never a tenant).
pub const OPERATOR_TEAM_ID: &str = "team-operator";
/// Its name.
pub use api_model::OPERATOR_TEAM;

/// Who a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub team_id: String,
    pub role: Role,
    /// Rotated, in its grace: it still works, but makes, rotates and revokes no keys
    /// (a leaked key must not outlive its rotation through a key it minted).
    pub rotating_out: bool,
}

/// Keys in force a team (or the operator) may hold.
const MAX_KEYS_PER_TEAM: i64 = 20;

/// An API key as listed: never the key, only its ID (16 hex digits of its hash) and
/// its first characters.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub role: String,
    pub prefix: String,
    pub created_at: String,
    /// When a rotated key stops working.
    pub expires_at: Option<String>,
}

/// A snapshot the catalog knows of.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    pub id: String,
    pub sandbox_id: Option<String>,
    pub dir: String,
}

/// How durable a write must be before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk (the default for everything).
    Synced,
    /// In the OS's cache: survives this process crashing, not the host.
    UntilPowerLoss,
}

/// The durable store.
pub struct Catalog {
    db: Mutex<Connection>,
    /// The sandbox ID of every event appended, for live followers of event logs.
    appended: tokio::sync::broadcast::Sender<String>,
}

/// Hex SHA-256 of an API key: keys are never stored, only their hashes.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let db = Connection::open(path)?;
        // Every team's records (environment variables included): the daemon's alone, not
        // readable by a guest that escaped into its QEMU. SQLite gives its WAL and shared
        // memory files the database's mode.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;
             CREATE TABLE IF NOT EXISTS teams (
                 id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS api_keys (
                 key_hash TEXT PRIMARY KEY,
                 team_id TEXT NOT NULL REFERENCES teams(id),
                 prefix TEXT NOT NULL,
                 created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS sandboxes (
                 id TEXT PRIMARY KEY,
                 team_id TEXT NOT NULL REFERENCES teams(id),
                 seq INTEGER NOT NULL UNIQUE,
                 record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS snapshots (
                 id TEXT PRIMARY KEY,
                 kind TEXT NOT NULL,
                 sandbox_id TEXT,
                 template TEXT,
                 dir TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 manifest TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS events (
                 sandbox_id TEXT NOT NULL,
                 event_id INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 kind TEXT NOT NULL,
                 data TEXT NOT NULL,
                 PRIMARY KEY (sandbox_id, event_id));
             CREATE TABLE IF NOT EXISTS warm_pools (
                 template TEXT PRIMARY KEY, config TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS templates (
                 id TEXT PRIMARY KEY,
                 team_id TEXT NOT NULL,
                 name TEXT,
                 created_at INTEGER NOT NULL,
                 record TEXT NOT NULL,
                 UNIQUE (team_id, name));
             CREATE TABLE IF NOT EXISTS build_logs (
                 template_id TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 step INTEGER,
                 stream TEXT NOT NULL,
                 text TEXT NOT NULL,
                 PRIMARY KEY (template_id, seq));
             CREATE TABLE IF NOT EXISTS team_quotas (
                 team_id TEXT PRIMARY KEY REFERENCES teams(id),
                 max_sandboxes INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS stored_items (
                 kind TEXT NOT NULL,
                 id TEXT NOT NULL,
                 team_id TEXT NOT NULL,
                 mib INTEGER NOT NULL,
                 created_at INTEGER NOT NULL,
                 PRIMARY KEY (kind, id));
             CREATE INDEX IF NOT EXISTS stored_items_team ON stored_items (team_id, kind);",
        )?;
        // Columns added after the first release: a catalog made by an older build gets
        // them on open (SQLite has no ADD COLUMN IF NOT EXISTS).
        for (table, column, ddl) in [
            (
                "team_quotas",
                "limits",
                "ALTER TABLE team_quotas ADD COLUMN limits TEXT",
            ),
            (
                "api_keys",
                "role",
                "ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'team'",
            ),
            (
                "api_keys",
                "expires_at",
                "ALTER TABLE api_keys ADD COLUMN expires_at INTEGER",
            ),
            // The state as a column the sweeper, the sampler and the listings filter on
            // with an index, instead of parsing every record ever kept.
            (
                "sandboxes",
                "state",
                "ALTER TABLE sandboxes ADD COLUMN state TEXT
                 GENERATED ALWAYS AS (json_extract(record, '$.state')) VIRTUAL",
            ),
        ] {
            let has: bool = db.query_row(
                &format!("SELECT COUNT(*) > 0 FROM pragma_table_xinfo('{table}') WHERE name = ?1"),
                params![column],
                |r| r.get(0),
            )?;
            if !has {
                db.execute_batch(ddl)?;
            }
        }
        db.execute(
            "DELETE FROM stored_items WHERE id LIKE ?1 || '%'",
            params![Self::PENDING_PREFIX],
        )?;
        db.execute_batch(intents::SCHEMA)?;
        db.execute_batch(
            "CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes (state);
             CREATE INDEX IF NOT EXISTS sandboxes_team_state ON sandboxes (team_id, state);",
        )?;
        Ok(Self {
            db: Mutex::new(db),
            appended: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Records a template's warm-pool settings.
    pub fn put_warm_pool<T: serde::Serialize>(
        &self,
        template: &str,
        config: &T,
    ) -> Result<(), CatalogError> {
        self.db.lock().unwrap().execute(
            "INSERT INTO warm_pools (template, config) VALUES (?1, ?2)
             ON CONFLICT(template) DO UPDATE SET config = excluded.config",
            params![template, serde_json::to_string(config)?],
        )?;
        Ok(())
    }

    /// Stores a template record. A new record whose name its team already uses is a
    /// [`CatalogError::Conflict`].
    pub fn put_template(&self, t: &TemplateRecord) -> Result<(), CatalogError> {
        let json = serde_json::to_string(t)?;
        let result = self.db.lock().unwrap().execute(
            "INSERT INTO templates (id, team_id, name, created_at, record) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![t.id, t.team_id, t.name, t.created_at_ms, json],
        );
        match result {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(CatalogError::Conflict(format!(
                    "the team already has a template named {:?}",
                    t.name.as_deref().unwrap_or_default()
                )))
            }
            other => other.map(drop).map_err(Into::into),
        }
    }

    /// The template `id_or_name` of `team_id` (by ID or the name the team gave it);
    /// with no team, any team's template by ID.
    pub fn template(
        &self,
        team_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<TemplateRecord>, CatalogError> {
        let db = self.db.lock().unwrap();
        let json: Option<String> = db
            .query_row(
                "SELECT record FROM templates WHERE (?1 IS NULL AND id = ?2)
                 OR (team_id = ?1 AND (id = ?2 OR name = ?2))",
                params![team_id, id_or_name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// Every template record (of one team, if given), oldest first.
    pub fn templates(&self, team_id: Option<&str>) -> Result<Vec<TemplateRecord>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT record FROM templates WHERE ?1 IS NULL OR team_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map(params![team_id], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    /// Forgets a template and its build log.
    pub fn delete_template(&self, id: &str) -> Result<(), CatalogError> {
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM templates WHERE id = ?1", params![id])?;
        tx.execute("DELETE FROM build_logs WHERE template_id = ?1", params![id])?;
        tx.execute("DELETE FROM warm_pools WHERE template = ?1", params![id])?;
        tx.commit()?;
        Ok(())
    }

    /// Appends lines `(step, stream, text)` to a template's build log. Not synced: a
    /// log is for reading along, and a build a crash interrupts fails anyway.
    pub fn append_build_log(
        &self,
        template_id: &str,
        lines: &[(Option<u32>, &str, String)],
    ) -> Result<(), CatalogError> {
        let mut db = self.db.lock().unwrap();
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let result = (|| {
            let tx = db.transaction()?;
            let first: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM build_logs WHERE template_id = ?1",
                params![template_id],
                |r| r.get(0),
            )?;
            for (seq, (step, stream, text)) in (first..).zip(lines) {
                tx.execute(
                    "INSERT INTO build_logs (template_id, seq, at_ms, step, stream, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![template_id, seq, now_ms(), step, stream, text],
                )?;
            }
            tx.commit()
        })();
        db.pragma_update(None, "synchronous", "FULL")?;
        Ok(result?)
    }

    /// Up to `limit` build log lines of a template after `after`, in order.
    pub fn build_log(
        &self,
        template_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BuildLogLine>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT seq, at_ms, step, stream, text FROM build_logs
             WHERE template_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![template_id, after as i64, limit as i64], |r| {
            Ok(BuildLogLine {
                seq: r.get::<_, i64>(0)? as u64,
                time: iso8601(r.get(1)?),
                step: r.get::<_, Option<u32>>(2)?,
                stream: r.get(3)?,
                text: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every template's warm-pool settings.
    pub fn warm_pools<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, T)>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare("SELECT template, config FROM warm_pools ORDER BY template")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (template, config) = row?;
            out.push((template, serde_json::from_str(&config)?));
        }
        Ok(out)
    }

    /// Creates a team, with a new ID or, to mirror a team of another worker that shares
    /// the snapshot store, the given one.
    pub fn create_team(&self, name: &str, id: Option<&str>) -> Result<Team, CatalogError> {
        let team = Team {
            id: id.map(str::to_string).unwrap_or_else(|| {
                format!("team-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
            }),
            name: name.to_string(),
        };
        let db = self.db.lock().unwrap();
        match db.execute(
            "INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![team.id, team.name, now_ms()],
        ) {
            Ok(_) => Ok(team),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(CatalogError::Conflict(format!(
                    "a team named '{name}' or with ID {} exists; pick another",
                    team.id
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Merges `patch` into the team's own limits; returns them all.
    pub fn set_limits(
        &self,
        team_id: &str,
        patch: &LimitsPatch,
    ) -> Result<LimitsPatch, CatalogError> {
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        let merged = Self::limits_in(&tx, team_id)?.merged(patch);
        tx.execute(
            "INSERT INTO team_quotas (team_id, max_sandboxes, limits) VALUES (?1, ?2, ?3)
             ON CONFLICT(team_id) DO UPDATE SET max_sandboxes = excluded.max_sandboxes,
             limits = excluded.limits",
            params![
                team_id,
                merged.sandboxes.map(|n| n as i64).unwrap_or(-1),
                serde_json::to_string(&merged)?
            ],
        )?;
        tx.commit()?;
        Ok(merged)
    }

    /// The team's own limits (what the host's defaults do not decide).
    pub fn limits(&self, team_id: &str) -> Result<LimitsPatch, CatalogError> {
        Self::limits_in(&self.db.lock().unwrap(), team_id)
    }

    fn limits_in(db: &Connection, team_id: &str) -> Result<LimitsPatch, CatalogError> {
        let row: Option<(i64, Option<String>)> = db
            .query_row(
                "SELECT max_sandboxes, limits FROM team_quotas WHERE team_id = ?1",
                params![team_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => LimitsPatch::default(),
            Some((_, Some(json))) => serde_json::from_str(&json)?,
            // A catalog from before per-resource limits: only the sandbox count.
            Some((max, None)) => LimitsPatch {
                sandboxes: u64::try_from(max).ok(),
                ..LimitsPatch::default()
            },
        })
    }

    /// Every team, by name.
    pub fn teams(&self) -> Result<Vec<Team>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare("SELECT id, name FROM teams ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(Team {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What the team's live sandboxes hold: `(count, vcpus, memory MiB, disk MiB)`,
    /// summed in SQL over the state index.
    pub fn live_resources(&self, team_id: &str) -> Result<(u64, u64, u64, u64), CatalogError> {
        let db = self.db.lock().unwrap();
        let row: (i64, i64, i64, i64) = db.query_row(
            "SELECT COUNT(*),
                    COALESCE(SUM(json_extract(record, '$.resources.vcpus')), 0),
                    COALESCE(SUM(json_extract(record, '$.resources.memMiB')), 0),
                    COALESCE(SUM(json_extract(record, '$.resources.diskSizeMiB')), 0)
             FROM sandboxes WHERE team_id = ?1 AND state NOT IN ('deleted', 'failed')",
            params![team_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let u = |v: i64| v.max(0) as u64;
        Ok((u(row.0), u(row.1), u(row.2), u(row.3)))
    }

    /// Records something a team keeps in the store (`snapshot`, `volume`) and its size,
    /// for its quotas; recording it again updates the size.
    pub fn record_item(
        &self,
        kind: &str,
        id: &str,
        team_id: &str,
        mib: u64,
    ) -> Result<(), CatalogError> {
        self.db.lock().unwrap().execute(
            "INSERT INTO stored_items (kind, id, team_id, mib, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(kind, id) DO UPDATE SET mib = excluded.mib",
            params![kind, id, team_id, mib as i64, now_ms()],
        )?;
        Ok(())
    }

    /// Forgets a stored item (deleted); forgetting an unknown one is a no-op.
    pub fn forget_item(&self, kind: &str, id: &str) -> Result<(), CatalogError> {
        self.db.lock().unwrap().execute(
            "DELETE FROM stored_items WHERE kind = ?1 AND id = ?2",
            params![kind, id],
        )?;
        Ok(())
    }

    /// How many items of `kind` the team keeps, and their MiB.
    pub fn items_of(&self, kind: &str, team_id: &str) -> Result<(u64, u64), CatalogError> {
        let db = self.db.lock().unwrap();
        let (n, mib): (i64, i64) = db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(mib), 0) FROM stored_items WHERE kind = ?1 AND team_id = ?2",
            params![kind, team_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, mib.max(0) as u64))
    }

    /// Looks a team up by ID or name.
    pub fn team(&self, id_or_name: &str) -> Result<Option<Team>, CatalogError> {
        let db = self.db.lock().unwrap();
        Ok(db
            .query_row(
                "SELECT id, name FROM teams WHERE id = ?1 OR name = ?1",
                params![id_or_name],
                |r| {
                    Ok(Team {
                        id: r.get(0)?,
                        name: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Issues a new API key for `team_id` (or records `given`, a key of the same team on
    /// another worker); returns the key (shown once, stored hashed).
    pub fn create_key(&self, team_id: &str, given: Option<&str>) -> Result<String, CatalogError> {
        self.create_key_with_role(team_id, given, Role::Team)
    }

    /// Issues a key with `role`: an operator key belongs to the reserved operator team
    /// (made on first use).
    pub fn create_key_with_role(
        &self,
        team_id: &str,
        given: Option<&str>,
        role: Role,
    ) -> Result<String, CatalogError> {
        let key = given
            .map(str::to_string)
            .unwrap_or_else(|| format!("ns_{}", uuid::Uuid::new_v4().simple()));
        let db = self.db.lock().unwrap();
        if role == Role::Operator {
            db.execute(
                "INSERT OR IGNORE INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![OPERATOR_TEAM_ID, OPERATOR_TEAM, now_ms()],
            )?;
        }
        let team_id = if role == Role::Operator {
            OPERATOR_TEAM_ID
        } else {
            team_id
        };
        let in_force: i64 = db.query_row(
            "SELECT COUNT(*) FROM api_keys WHERE team_id = ?1
             AND (expires_at IS NULL OR expires_at > ?2)",
            params![team_id, now_ms()],
            |r| r.get(0),
        )?;
        if in_force >= MAX_KEYS_PER_TEAM {
            return Err(CatalogError::Conflict(format!(
                "the team has {in_force} keys in force, the most it may have; revoke one first (DELETE /keys/ID, or `admin key revoke ID`)"
            )));
        }
        db.execute(
            "INSERT INTO api_keys (key_hash, team_id, prefix, created_at, role) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash_key(&key), team_id, &key[..key.len().min(7)], now_ms(), role.as_str()],
        )?;
        Ok(key)
    }

    /// Who an API key is, if it is in force (known, not past its rotation deadline).
    pub fn key_owner(&self, key: &str) -> Result<Option<KeyOwner>, CatalogError> {
        let db = self.db.lock().unwrap();
        let row: Option<(String, String, Option<i64>)> = db
            .query_row(
                "SELECT team_id, role, expires_at FROM api_keys WHERE key_hash = ?1
                 AND (expires_at IS NULL OR expires_at > ?2)",
                params![hash_key(key), now_ms()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(row.map(|(team_id, role, expires_at)| KeyOwner {
            team_id,
            role: if role == "operator" {
                Role::Operator
            } else {
                Role::Team
            },
            rotating_out: expires_at.is_some(),
        }))
    }

    /// The keys of a team (every team's when `None`), oldest first; never the keys
    /// themselves.
    pub fn keys(&self, team_id: Option<&str>) -> Result<Vec<KeyInfo>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT substr(key_hash, 1, 16), team_id, role, prefix, created_at, expires_at
             FROM api_keys WHERE (?1 IS NULL OR team_id = ?1)
             AND (expires_at IS NULL OR expires_at > ?2) ORDER BY created_at, key_hash",
        )?;
        let rows = stmt.query_map(params![team_id, now_ms()], |r| {
            Ok(KeyInfo {
                id: r.get(0)?,
                team_id: r.get(1)?,
                role: r.get(2)?,
                prefix: r.get(3)?,
                created_at: iso8601(r.get(4)?),
                expires_at: r.get::<_, Option<i64>>(5)?.map(iso8601),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A key in force by its ID (the first 16 hex digits of its hash).
    pub fn key(&self, id: &str) -> Result<Option<KeyInfo>, CatalogError> {
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let db = self.db.lock().unwrap();
        Ok(db
            .query_row(
                "SELECT substr(key_hash, 1, 16), team_id, role, prefix, created_at, expires_at
                 FROM api_keys WHERE substr(key_hash, 1, 16) = ?1
                 AND (expires_at IS NULL OR expires_at > ?2)",
                params![id, now_ms()],
                |r| {
                    Ok(KeyInfo {
                        id: r.get(0)?,
                        team_id: r.get(1)?,
                        role: r.get(2)?,
                        prefix: r.get(3)?,
                        created_at: iso8601(r.get(4)?),
                        expires_at: r.get::<_, Option<i64>>(5)?.map(iso8601),
                    })
                },
            )
            .optional()?)
    }

    /// Ends a key at `at_ms` (now: revoked; later: the grace of a rotation). Returns
    /// whether a key in force had that ID.
    pub fn expire_key(&self, id: &str, at_ms: i64) -> Result<bool, CatalogError> {
        let db = self.db.lock().unwrap();
        let n = db.execute(
            "UPDATE api_keys SET expires_at = ?2 WHERE substr(key_hash, 1, 16) = ?1
             AND (expires_at IS NULL OR expires_at > ?2)",
            params![id, at_ms],
        )?;
        // Keys past their end are kept no longer than needed to say so.
        db.execute(
            "DELETE FROM api_keys WHERE expires_at IS NOT NULL AND expires_at < ?1",
            params![now_ms() - 30 * 24 * 3600 * 1000],
        )?;
        Ok(n > 0)
    }

    /// Inserts or replaces a sandbox record.
    pub fn put_sandbox(&self, record: &SandboxRecord) -> Result<(), CatalogError> {
        self.put_sandbox_with_events(record, &[], Durability::Synced)
    }

    /// Sets a sandbox's timeout and expiry in place (a JSON patch of those two fields, not
    /// a rewrite of a record read earlier: a concurrent `connect` or pause that rewrote
    /// the record meanwhile keeps what it wrote); returns the record after.
    pub fn set_expiry(
        &self,
        id: &str,
        timeout_s: u64,
        expires_at_ms: i64,
    ) -> Result<Option<SandboxRecord>, CatalogError> {
        let db = self.db.lock().unwrap();
        db.execute(
            "UPDATE sandboxes SET record = json_set(record, '$.timeout_s', ?2, '$.expires_at_ms', ?3)
             WHERE id = ?1",
            params![id, timeout_s as i64, expires_at_ms],
        )?;
        let json: Option<String> = db
            .query_row(
                "SELECT record FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// A sandbox record by ID.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, CatalogError> {
        let db = self.db.lock().unwrap();
        let json: Option<String> = db
            .query_row(
                "SELECT record FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// Up to `limit` (all: `None`) of a team's sandboxes in one of `states` (internal
    /// names) after position `after_seq`, oldest first, with their positions. The state filter runs in SQL over
    /// the index: a listing never parses the team's deleted history.
    pub fn sandboxes_of(
        &self,
        team_id: &str,
        after_seq: i64,
        states: &[&str],
        limit: Option<usize>,
    ) -> Result<Vec<(i64, SandboxRecord)>, CatalogError> {
        let db = self.db.lock().unwrap();
        let states = serde_json::to_string(states)?;
        let limit = limit.map_or(-1, |l| l as i64);
        let mut stmt = db.prepare(
            "SELECT seq, record FROM sandboxes WHERE team_id = ?1 AND seq > ?2
             AND state IN (SELECT value FROM json_each(?3)) ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![team_id, after_seq, states, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, json) = row?;
            out.push((seq, serde_json::from_str(&json)?));
        }
        Ok(out)
    }

    /// Removes the sandboxes deleted before `before_ms` (the time of their last step)
    /// with their events, in one transaction; returns how many. Records of deleted
    /// sandboxes are kept only for a retention period: the catalog must not grow with
    /// every sandbox ever made.
    pub fn prune_deleted(&self, before_ms: i64) -> Result<usize, CatalogError> {
        let mut db = self.db.lock().unwrap();
        let old: Vec<String> = {
            let mut stmt = db.prepare(
                "SELECT id, json_extract(record, '$.timeline[#-1].at') FROM sandboxes
                 WHERE state = 'deleted'",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })?;
            let mut old = Vec::new();
            for row in rows {
                let (id, at) = row?;
                let ended = at
                    .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
                    .map(|t| t.timestamp_millis());
                if ended.is_some_and(|t| t < before_ms) {
                    old.push(id);
                }
            }
            old
        };
        let tx = db.transaction()?;
        for id in &old {
            tx.execute("DELETE FROM events WHERE sandbox_id = ?1", params![id])?;
            tx.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(old.len())
    }

    /// The ID prefix of a quota hold in `stored_items` (see `StoreHold`): holds left by
    /// a crash are dropped when the catalog opens.
    pub const PENDING_PREFIX: &'static str = "pending-";

    /// Every state but `deleted`: what start-up reconciliation looks at.
    pub const NOT_DELETED: &'static [&'static str] = &[
        "new",
        "creating",
        "active",
        "stopped",
        "destroying",
        "failed",
    ];
    /// The states of sandboxes that hold resources.
    pub const LIVE: &'static [&'static str] =
        &["new", "creating", "active", "stopped", "destroying"];

    /// The records in one of `states` (internal names: `active`, `stopped`, ...), oldest
    /// first, found through the state index: the periodic loops never parse the
    /// records of deleted sandboxes.
    pub fn sandboxes_in(&self, states: &[&str]) -> Result<Vec<SandboxRecord>, CatalogError> {
        let db = self.db.lock().unwrap();
        let marks = vec!["?"; states.len()].join(", ");
        let mut stmt = db.prepare(&format!(
            "SELECT record FROM sandboxes WHERE state IN ({marks}) ORDER BY seq"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(states), |r| {
            r.get::<_, String>(0)
        })?;
        let mut out = Vec::new();
        for json in rows {
            out.push(serde_json::from_str(&json?)?);
        }
        Ok(out)
    }

    /// How many of every team's sandboxes are in each internal state.
    pub fn state_counts(&self, team_id: Option<&str>) -> Result<Vec<(String, u64)>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT state, COUNT(*) FROM sandboxes WHERE (?1 IS NULL OR team_id = ?1) GROUP BY state",
        )?;
        let rows = stmt.query_map(params![team_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a snapshot this host keeps (`template` or `pause`); recording one twice
    /// is a no-op.
    pub fn record_snapshot(
        &self,
        kind: &str,
        sandbox_id: Option<&str>,
        template: Option<&str>,
        snapshot: &vmm::Snapshot,
    ) -> Result<(), CatalogError> {
        let db = self.db.lock().unwrap();
        db.execute(
            "INSERT OR IGNORE INTO snapshots (id, kind, sandbox_id, template, dir, created_at, manifest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                snapshot.manifest().id,
                kind,
                sandbox_id,
                template,
                snapshot.dir().display().to_string(),
                now_ms(),
                serde_json::to_string(snapshot.manifest())?
            ],
        )?;
        Ok(())
    }

    /// Forgets a snapshot (it was deleted).
    pub fn forget_snapshot(&self, id: &str) -> Result<(), CatalogError> {
        let db = self.db.lock().unwrap();
        db.execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Snapshots of one kind, oldest first.
    pub fn snapshots(&self, kind: &str) -> Result<Vec<SnapshotRow>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT id, sandbox_id, dir FROM snapshots WHERE kind = ?1 ORDER BY created_at",
        )?;
        let rows = stmt.query_map(params![kind], |r| {
            Ok(SnapshotRow {
                id: r.get(0)?,
                sandbox_id: r.get(1)?,
                dir: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a record and appends events to its log in one transaction: one sync to
    /// disk instead of one per write. With `durability` [`Durability::UntilPowerLoss`]
    /// the commit is not synced at all (it survives a crash of this process, not of
    /// the host; the next synced commit carries it to disk) — for records of running
    /// VMs, which a power loss ends anyway.
    pub fn put_sandbox_with_events(
        &self,
        record: &SandboxRecord,
        events: &[(&str, serde_json::Value)],
        durability: Durability,
    ) -> Result<(), CatalogError> {
        let json = serde_json::to_string(record)?;
        let mut db = self.db.lock().unwrap();
        if durability == Durability::UntilPowerLoss {
            db.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let result = Self::write_record_and_events(&mut db, record, &json, events);
        if durability == Durability::UntilPowerLoss {
            db.pragma_update(None, "synchronous", "FULL")?;
        }
        drop(db);
        if result.is_ok() && !events.is_empty() {
            self.announce(&record.id);
        }
        result
    }

    fn write_record_and_events(
        db: &mut Connection,
        record: &SandboxRecord,
        json: &str,
        events: &[(&str, serde_json::Value)],
    ) -> Result<(), CatalogError> {
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO sandboxes (id, team_id, seq, record)
             VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM sandboxes), ?3)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![record.id, record.team_id, json],
        )?;
        if !events.is_empty() {
            let first: i64 = tx.query_row(
                "SELECT COALESCE(MAX(event_id), 0) + 1 FROM events WHERE sandbox_id = ?1",
                params![record.id],
                |r| r.get(0),
            )?;
            for (id, (kind, data)) in (first..).zip(events) {
                tx.execute(
                    "INSERT INTO events (sandbox_id, event_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![record.id, id, now_ms(), kind, data.to_string()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Tells followers that `sandbox_id`'s log grew (nothing to do when none follows:
    /// the create path appends events too).
    fn announce(&self, sandbox_id: &str) {
        if self.appended.receiver_count() > 0 {
            let _ = self.appended.send(sandbox_id.to_string());
        }
    }

    /// Sandbox IDs as events are appended to their logs (a lagging receiver re-reads
    /// the log: the notification carries no event).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.appended.subscribe()
    }

    /// The ID of a sandbox's newest event (0 if none).
    pub fn last_event_id(&self, sandbox_id: &str) -> Result<u64, CatalogError> {
        let db = self.db.lock().unwrap();
        let id: i64 = db.query_row(
            "SELECT COALESCE(MAX(event_id), 0) FROM events WHERE sandbox_id = ?1",
            params![sandbox_id],
            |r| r.get(0),
        )?;
        Ok(id as u64)
    }

    /// Appends an event to a sandbox's log; returns its ID (1, 2, 3, ... per sandbox).
    pub fn append_event(
        &self,
        sandbox_id: &str,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<u64, CatalogError> {
        let db = self.db.lock().unwrap();
        let next: i64 = db.query_row(
            "SELECT COALESCE(MAX(event_id), 0) + 1 FROM events WHERE sandbox_id = ?1",
            params![sandbox_id],
            |r| r.get(0),
        )?;
        db.execute(
            "INSERT INTO events (sandbox_id, event_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![sandbox_id, next, now_ms(), kind, data.to_string()],
        )?;
        drop(db);
        self.announce(sandbox_id);
        Ok(next as u64)
    }

    /// A sandbox's events with IDs above `after`, in order.
    pub fn events(
        &self,
        sandbox_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, CatalogError> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT event_id, at_ms, kind, data FROM events
             WHERE sandbox_id = ?1 AND event_id > ?2 ORDER BY event_id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![sandbox_id, after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at_ms, kind, data) = row?;
            out.push(Event {
                id: id as u64,
                at: crate::model::iso8601(at_ms),
                kind,
                data: serde_json::from_str(&data)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> (Catalog, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "catalog-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (Catalog::open(&dir.join("catalog.db")).unwrap(), dir)
    }

    #[test]
    fn deleted_sandboxes_past_their_retention_go_with_their_events() {
        use crate::model::{InternalState, SandboxRecord};
        let (c, dir) = catalog();
        let team = c.create_team("acme", None).unwrap();
        let fresh = || SandboxRecord::fresh(&team.id, "base".into(), Default::default(), 300, 0);
        let mut old = fresh();
        old.state = InternalState::Deleted;
        old.step("deleted", None);
        old.timeline.last_mut().unwrap().at = "2020-01-01T00:00:00.000Z".into();
        let mut recent = fresh();
        recent.state = InternalState::Deleted;
        recent.step("deleted", None);
        let live = fresh();
        for r in [&old, &recent, &live] {
            c.put_sandbox(r).unwrap();
            c.append_event(&r.id, "sandbox.created", &serde_json::json!({}))
                .unwrap();
        }
        let an_hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
        assert_eq!(c.prune_deleted(an_hour_ago).unwrap(), 1);
        assert!(c.sandbox(&old.id).unwrap().is_none());
        assert_eq!(c.last_event_id(&old.id).unwrap(), 0, "its events went too");
        assert!(c.sandbox(&recent.id).unwrap().is_some());
        assert!(c.sandbox(&live.id).unwrap().is_some());
        assert_eq!(c.last_event_id(&live.id).unwrap(), 1);
        assert_eq!(c.prune_deleted(an_hour_ago).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_rotate_with_a_grace_and_revoke_at_once() {
        let (c, dir) = catalog();
        let team = c.create_team("acme", None).unwrap();
        let a = c.create_key(&team.id, None).unwrap();
        let b = c.create_key(&team.id, None).unwrap();
        let op = c.create_key_with_role("", None, Role::Operator).unwrap();
        assert_eq!(c.key_owner(&op).unwrap().unwrap().role, Role::Operator);
        assert_eq!(c.keys(Some(&team.id)).unwrap().len(), 2);
        let id = |k: &str| hash_key(k)[..16].to_string();
        // Revoked: gone now, and not listed.
        assert!(c.expire_key(&id(&a), now_ms()).unwrap());
        assert_eq!(c.key_owner(&a).unwrap(), None);
        assert!(!c.expire_key(&id(&a), now_ms()).unwrap(), "already ended");
        // Rotated: works until its end, which a later rotation never extends.
        assert!(c.expire_key(&id(&b), now_ms() + 60_000).unwrap());
        assert!(c.key_owner(&b).unwrap().is_some());
        assert!(!c.expire_key(&id(&b), now_ms() + 120_000).unwrap());
        assert!(c.key(&id(&b)).unwrap().unwrap().expires_at.is_some());
        assert_eq!(c.key("not-an-id").unwrap().map(|k| k.id), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn limits_merge_and_live_resources_sum_over_the_state_index() {
        let (c, dir) = catalog();
        let team = c.create_team("acme", None).unwrap();
        let one = |f: &str, v: u64| -> LimitsPatch {
            serde_json::from_value(serde_json::json!({ f: v })).unwrap()
        };
        c.set_limits(&team.id, &one("vcpus", 4)).unwrap();
        let both = c.set_limits(&team.id, &one("sandboxes", 3)).unwrap();
        assert_eq!((both.vcpus, both.sandboxes), (Some(4), Some(3)));
        assert_eq!(c.limits(&team.id).unwrap(), both);
        for (i, state) in ["active", "stopped", "deleted", "failed"]
            .iter()
            .enumerate()
        {
            let mut r = SandboxRecord::fresh(
                &team.id,
                "base".into(),
                crate::model::Resources {
                    vcpus: 2,
                    mem_mib: 512,
                    disk_mib: 1024,
                },
                60,
                0,
            );
            r.id = format!("sbx-{i}");
            r.state = serde_json::from_value(serde_json::json!(state)).unwrap();
            c.put_sandbox(&r).unwrap();
        }
        assert_eq!(c.live_resources(&team.id).unwrap(), (2, 4, 1024, 2048));
        let active = c.sandboxes_in(&["active"]).unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(c.sandboxes_in(Catalog::NOT_DELETED).unwrap().len(), 3);
        c.record_item("snapshot", "snap-1", &team.id, 10).unwrap();
        c.record_item("snapshot", "snap-2", &team.id, 5).unwrap();
        c.forget_item("snapshot", "snap-1").unwrap();
        assert_eq!(c.items_of("snapshot", &team.id).unwrap(), (1, 5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_are_stored_hashed_and_resolve_to_their_team() {
        let (c, dir) = catalog();
        let team = c.create_team("acme", None).unwrap();
        let key = c.create_key(&team.id, None).unwrap();
        let owner = c.key_owner(&key).unwrap().unwrap();
        assert_eq!(
            (owner.team_id.as_str(), owner.role),
            (team.id.as_str(), Role::Team)
        );
        assert_eq!(c.key_owner("ns_wrong").unwrap(), None);
        let stored: String =
            c.db.lock()
                .unwrap()
                .query_row("SELECT key_hash FROM api_keys", [], |r| r.get(0))
                .unwrap();
        assert_ne!(stored, key);
        assert!(c.create_team("acme", None).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn snapshots_are_recorded_once_and_forgotten() {
        let (c, dir) = catalog();
        let snap_dir = dir.join("snap");
        std::fs::create_dir_all(&snap_dir).unwrap();
        let manifest = serde_json::json!({
            "format_version": 1, "id": "snap-1", "source_vm": "vm", "created_unix_ms": 0,
            "qemu_version": "q", "accel": "tcg", "kernel_key": "k", "rootfs": "minimal",
            "rootfs_image": "/x", "machine_args": [], "vcpus": 1, "mem_mib": 256,
            "disk_mib": 256, "egress": true, "memory": "file"
        });
        std::fs::write(snap_dir.join("manifest.json"), manifest.to_string()).unwrap();
        let snap = vmm::Snapshot::open(&snap_dir).unwrap();
        c.record_snapshot("pause", Some("sbx-1"), None, &snap)
            .unwrap();
        c.record_snapshot("pause", Some("sbx-1"), None, &snap)
            .unwrap();
        assert_eq!(c.snapshots("pause").unwrap().len(), 1);
        c.forget_snapshot("snap-1").unwrap();
        assert!(c.snapshots("pause").unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn event_ids_increase_per_sandbox_and_survive_reopening() {
        let (c, dir) = catalog();
        assert_eq!(c.append_event("a", "x", &serde_json::json!({})).unwrap(), 1);
        assert_eq!(c.append_event("a", "y", &serde_json::json!({})).unwrap(), 2);
        assert_eq!(c.append_event("b", "x", &serde_json::json!({})).unwrap(), 1);
        drop(c);
        let c = Catalog::open(&dir.join("catalog.db")).unwrap();
        let after_one: Vec<u64> = c
            .events("a", 1, 100)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(after_one, vec![2]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
