//! The catalog: teams, API keys, sandbox records, their event logs and template
//! snapshots. Two backends behind one interface (`sql`): an embedded SQLite database
//! (WAL, synchronous=FULL) in the state dir, the default, or a PostgreSQL database a
//! cluster of hosts shares (`--catalog postgres://…`).
//!
//! Sandbox records are stored as JSON documents: the record shape grows with every issue,
//! and per-host volumes (hundreds of sandboxes) filter comfortably in memory.

use crate::model::{iso8601, Event, SandboxRecord, TemplateRecord};
use crate::quotas::LimitsPatch;
use api_model::BuildLogLine;
use sha2::{Digest, Sha256};
use sql::{args, Db, Tx, Value};
use std::path::{Path, PathBuf};

mod builds;
mod hosts;
mod intents;
pub use hosts::{Allocation, HostInfo, HostRecord, HEARTBEAT_EXPIRY_MS};
mod migrations;
mod postgres;
mod security;
mod sql;
mod sqlite;
pub use intents::Intent;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The SQLite backend failed.
    #[error("catalog database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The PostgreSQL backend failed.
    #[error("catalog database (PostgreSQL at {catalog}): {context}: {}", postgres::describe(.error))]
    Postgres {
        /// The catalog's URL, without its password.
        catalog: String,
        /// What the catalog was doing.
        context: String,
        /// The driver's error (in the message with what it wraps: the driver's own
        /// message is only "db error").
        error: tokio_postgres::Error,
    },
    /// The PostgreSQL backend could not be reached, or did not answer in time.
    #[error("catalog {catalog} unavailable: {message}")]
    Unavailable {
        /// The catalog's URL, without its password.
        catalog: String,
        /// Why.
        message: String,
    },
    /// The catalog's schema is not the one this binary uses (says what to run).
    #[error("{0}")]
    Schema(String),
    /// `--catalog` names no catalog this binary can use.
    #[error("{0}")]
    Location(String),
    /// A row that is not what the catalog wrote.
    #[error("catalog row: {0}")]
    Decode(String),
    /// A record that is not the JSON it should be.
    #[error("catalog record: {0}")]
    Json(#[from] serde_json::Error),
    /// The write conflicts with what is there (a name in use, a limit reached): the
    /// caller's to fix, said in words.
    #[error("{0}")]
    Conflict(String),
}

impl CatalogError {
    /// Whether a write broke an integrity constraint (a unique key above all): what the
    /// catalog answers as a [`CatalogError::Conflict`], on either backend.
    fn is_constraint_violation(&self) -> bool {
        match self {
            CatalogError::Db(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            CatalogError::Postgres { error, .. } => postgres::is_constraint_violation(error),
            _ => false,
        }
    }
}

/// Where a catalog is: what `--catalog` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (`sqlite:PATH`, or a bare path).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://…` or `postgresql://…`).
    Postgres(String),
}

impl Location {
    /// Parses `sqlite:PATH`, a bare path, or a `postgres://` / `postgresql://` URL.
    pub fn parse(s: &str) -> Result<Self, CatalogError> {
        let what = "send sqlite:PATH (or a path) for a SQLite file, or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Location::Postgres(s.to_string()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            // sqlite:///abs/path as well as sqlite:/abs/path and sqlite:relative.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(CatalogError::Location(format!(
                    "{s:?} names no file: {what}"
                )));
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        // Anything else that looks like SCHEME:… is a URL this binary does not speak,
        // not a file to make by that name.
        let scheme = s
            .split_once(':')
            .map(|(scheme, _)| scheme)
            .filter(|scheme| {
                !scheme.is_empty()
                    && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
        if let Some(scheme) = scheme {
            return Err(CatalogError::Location(format!(
                "{}: the catalog does not speak {scheme:?}; {what}",
                postgres::redact(s)
            )));
        }
        if s.is_empty() {
            return Err(CatalogError::Location(format!(
                "an empty catalog location: {what}"
            )));
        }
        Ok(Location::Sqlite(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Location {
    /// As given, without a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Location::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

/// What [`Catalog::migrate`] did: the schema version before, and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version the catalog was at (0: a new catalog).
    pub from: i64,
    /// The version it is at now (this binary's).
    pub to: i64,
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
    db: Db,
    /// This host's ID once set ([`Catalog::set_host`]): on a catalog hosts share, the
    /// background loops, recovery and local snapshots see only this host's rows.
    host: std::sync::OnceLock<String>,
    /// The sandbox ID of every event appended, for live followers of event logs.
    appended: tokio::sync::broadcast::Sender<String>,
}

/// A team's live sandboxes: how many, and their vCPUs, memory and disk (MiB).
pub type LiveResources = (u64, u64, u64, u64);

/// The query of a team's [`LiveResources`] (parameter 1: the team).
fn live_resources_sql(d: sql::Dialect) -> String {
    let sum = |field: &str| {
        format!(
            "CAST(COALESCE(SUM({}), 0) AS BIGINT)",
            d.json_int("record", &["resources", field])
        )
    };
    format!(
        "SELECT COUNT(*), {}, {}, {}
         FROM sandboxes WHERE team_id = ?1 AND state IN ({})",
        sum("vcpus"),
        sum("memMiB"),
        sum("diskSizeMiB"),
        live_states_sql()
    )
}

/// [`Catalog::LIVE`] as an SQL list (`'new', 'creating', ...`), made once: the
/// admission's quota read is on every create's path.
fn live_states_sql() -> &'static str {
    static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        Catalog::LIVE
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    &LIST
}

fn live_resources_of(row: &sql::Row) -> Result<LiveResources, CatalogError> {
    let u = |i: usize| row.get::<i64>(i).map(|v| v.max(0) as u64);
    Ok((u(0)?, u(1)?, u(2)?, u(3)?))
}

/// One team's admission in progress (see [`Catalog::admit`]): its reads and writes
/// are one transaction, under the team's lock.
pub struct Admission<'a> {
    tx: &'a mut dyn Tx,
    team: String,
    /// Sandboxes whose logs grew, told to followers once committed.
    announced: &'a mut Vec<String>,
}

impl Admission<'_> {
    /// What the team holds, as of this transaction.
    pub fn live_resources(&mut self) -> Result<LiveResources, CatalogError> {
        let row = self
            .tx
            .query_one(&live_resources_sql(self.tx.dialect()), args![&self.team])?;
        live_resources_of(&row)
    }

    /// The team's cluster-wide create bucket: the creates it held and how many
    /// milliseconds ago (by the database's clock) they were counted; `None` if the team
    /// never created through it.
    pub fn create_bucket(&mut self) -> Result<Option<(f64, i64)>, CatalogError> {
        let now = self.tx.dialect().now_ms();
        self.tx
            .query_opt(
                &format!(
                    "SELECT millitokens, {now} - at_ms FROM create_buckets WHERE team_id = ?1"
                ),
                args![&self.team],
            )?
            .map(|r| Ok((r.get::<i64>(0)? as f64 / 1000.0, r.get::<i64>(1)?)))
            .transpose()
    }

    /// Sets the team's cluster-wide create bucket to `tokens` as of now.
    pub fn set_create_bucket(&mut self, tokens: f64) -> Result<(), CatalogError> {
        let now = self.tx.dialect().now_ms();
        self.tx.execute(
            &format!(
                "INSERT INTO create_buckets (team_id, millitokens, at_ms) VALUES (?1, ?2, {now})
                 ON CONFLICT(team_id) DO UPDATE SET millitokens = excluded.millitokens, at_ms = excluded.at_ms"
            ),
            args![&self.team, (tokens * 1000.0).round() as i64],
        )?;
        Ok(())
    }

    /// Stores the team's new sandbox record and its first events.
    pub fn put_sandbox_with_events(
        &mut self,
        record: &SandboxRecord,
        events: &[(&str, serde_json::Value)],
    ) -> Result<(), CatalogError> {
        if record.team_id != self.team {
            return Err(CatalogError::Conflict(format!(
                "admitting a sandbox of team {} under team {}'s lock",
                record.team_id, self.team
            )));
        }
        let json = serde_json::to_string(record)?;
        Catalog::write_record_and_events(self.tx, record, &json, events)?;
        if !events.is_empty() {
            self.announced.push(record.id.clone());
        }
        Ok(())
    }
}

/// The PostgreSQL notification channel appends are announced on (payload: the
/// sandbox ID).
const EVENTS_CHANNEL: &str = "nullspace_events";

/// What [`Catalog::subscribe_events`] sends when any log may have grown unseen (the
/// notification connection was lost for a while): every follower re-reads.
pub const ANY_SANDBOX: &str = "*";

/// Hex SHA-256 of an API key: keys are never stored, only their hashes.
pub fn hash_key(key: &str) -> String {
    // Every request hashes its key: one string, not one per byte.
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A key's listing from `SELECT substr(key_hash, 1, 16), team_id, role, prefix,
/// created_at, expires_at`.
fn key_info(r: &sql::Row) -> Result<KeyInfo, CatalogError> {
    Ok(KeyInfo {
        id: r.get(0)?,
        team_id: r.get(1)?,
        role: r.get(2)?,
        prefix: r.get(3)?,
        created_at: iso8601(r.get(4)?),
        expires_at: r.get::<Option<i64>>(5)?.map(iso8601),
    })
}

/// The record of `SELECT record …`'s first column, if there is a row.
fn record_of<T: serde::de::DeserializeOwned>(
    row: Option<sql::Row>,
) -> Result<Option<T>, CatalogError> {
    row.map(|r| -> Result<T, CatalogError> { Ok(serde_json::from_str(&r.get::<String>(0)?)?) })
        .transpose()
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let db = Db::Sqlite(sqlite::SqliteDb::open(path)?);
        // One daemon owns a SQLite file: it brings the schema up to date itself.
        migrations::migrate(&db, &Location::Sqlite(path.to_path_buf()).to_string())?;
        Self::ready(db)
    }

    /// Connects to the PostgreSQL catalog at `url`, which must be at this binary's
    /// schema version: hosts that share it upgrade one by one, so only
    /// `nullspace-pool-manager migrate` changes its schema.
    pub fn connect(url: &str) -> Result<Self, CatalogError> {
        let db = Db::Postgres(postgres::PgDb::connect(url)?);
        if let Db::Postgres(pg) = &db {
            migrations::check(&db, pg.name())?;
        }
        Self::ready(db)
    }

    /// Opens the catalog at `location` for the host commands only (list, drain,
    /// undrain): a shared catalog at any schema version with the hosts table is
    /// accepted, a newer one too (see `migrations::check_hosts`).
    pub fn open_for_hosts(location: &Location) -> Result<Self, CatalogError> {
        match location {
            Location::Sqlite(path) => Self::open(path),
            Location::Postgres(url) => {
                let db = Db::Postgres(postgres::PgDb::connect(url)?);
                if let Db::Postgres(pg) = &db {
                    migrations::check_hosts(&db, pg.name())?;
                }
                Self::ready(db)
            }
        }
    }

    /// Opens the catalog at `location` ([`Catalog::open`], [`Catalog::connect`]).
    pub fn open_location(location: &Location) -> Result<Self, CatalogError> {
        match location {
            Location::Sqlite(path) => Self::open(path),
            Location::Postgres(url) => Self::connect(url),
        }
    }

    /// Brings the catalog at `location` to this binary's schema version (creating it
    /// if needed); running it again changes nothing.
    pub fn migrate(location: &Location) -> Result<Migrated, CatalogError> {
        let db = match location {
            Location::Sqlite(path) => Db::Sqlite(sqlite::SqliteDb::open(path)?),
            Location::Postgres(url) => Db::Postgres(postgres::PgDb::connect(url)?),
        };
        let from = migrations::migrate(&db, &location.to_string())?;
        Ok(Migrated {
            from,
            to: migrations::version(&db)?,
        })
    }

    /// The schema version the catalog is at.
    #[cfg(test)]
    pub fn schema_version(&self) -> Result<i64, CatalogError> {
        migrations::version(&self.db)
    }

    fn ready(db: Db) -> Result<Self, CatalogError> {
        // Quota holds a crash left behind. A SQLite catalog is this host's alone: every
        // hold in it is one of this process's predecessor. Hosts that share a Postgres
        // catalog hold while they store, which never takes a day: older holds are the
        // leftovers of hosts that crashed.
        let left_before = match db.dialect() {
            sql::Dialect::Sqlite => i64::MAX,
            sql::Dialect::Postgres => now_ms() - 24 * 3600 * 1000,
        };
        db.execute(
            "DELETE FROM stored_items WHERE id LIKE ?1 AND created_at < ?2",
            args![format!("{}%", Self::PENDING_PREFIX), left_before],
        )?;
        let appended = tokio::sync::broadcast::channel(1024).0;
        if let Db::Postgres(pg) = &db {
            // Appends made on other hosts reach this host's followers too.
            let to_followers = appended.clone();
            pg.listen(EVENTS_CHANNEL, move |sandbox| {
                let _ = to_followers.send(sandbox.unwrap_or_else(|| ANY_SANDBOX.to_string()));
            });
        }
        Ok(Self {
            db,
            host: std::sync::OnceLock::new(),
            appended,
        })
    }

    /// Whether hosts share this catalog (PostgreSQL), rather than one host keeping it
    /// (SQLite).
    pub fn is_shared(&self) -> bool {
        self.db.dialect() == sql::Dialect::Postgres
    }

    /// Says which host this daemon is: from then on the background loops' reads
    /// (sandboxes by state, intents, local snapshots) return this host's rows and the
    /// rows of no host (a catalog from before there were hosts). Set once; a second
    /// call with another ID is an error.
    pub fn set_host(&self, id: &str) -> Result<(), CatalogError> {
        let set = self.host.get_or_init(|| id.to_string());
        if set != id {
            return Err(CatalogError::Conflict(format!(
                "this catalog handle is host {set}'s, not {id}'s"
            )));
        }
        Ok(())
    }

    /// ` AND column = ?N` with this host as parameter N (pushed onto `params`) on a
    /// shared Postgres catalog, where rows of no host (made before there were hosts)
    /// are nobody's: no host acts on what it cannot know to be its own. Nothing on
    /// SQLite: the file is one host's, whatever ID it went by (a host ID changed
    /// between starts must not orphan its sandboxes).
    fn host_filter(&self, column: &str, params: &mut Vec<Value>) -> String {
        match (self.host.get(), self.db.dialect()) {
            (Some(host), sql::Dialect::Postgres) => {
                params.push(Value::from(host.as_str()));
                format!(" AND {column} = ?{}", params.len())
            }
            _ => String::new(),
        }
    }

    /// Records a template's warm-pool settings.
    pub fn put_warm_pool<T: serde::Serialize>(
        &self,
        template: &str,
        config: &T,
    ) -> Result<(), CatalogError> {
        self.db.execute(
            "INSERT INTO warm_pools (template, config) VALUES (?1, ?2)
             ON CONFLICT(template) DO UPDATE SET config = excluded.config",
            args![template, serde_json::to_string(config)?],
        )?;
        Ok(())
    }

    /// Stores a template record. A new record whose name its team already uses is a
    /// [`CatalogError::Conflict`].
    pub fn put_template(&self, t: &TemplateRecord) -> Result<(), CatalogError> {
        let json = serde_json::to_string(t)?;
        let result = self.db.execute(
            "INSERT INTO templates (id, team_id, name, created_at, record) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            args![&t.id, &t.team_id, t.name.as_deref(), t.created_at_ms, json],
        );
        match result {
            Err(e) if e.is_constraint_violation() => Err(CatalogError::Conflict(format!(
                "the team already has a template named {:?}",
                t.name.as_deref().unwrap_or_default()
            ))),
            other => other.map(drop),
        }
    }

    /// The template `id_or_name` of `team_id` (by ID or the name the team gave it);
    /// with no team, any team's template by ID.
    pub fn template(
        &self,
        team_id: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<TemplateRecord>, CatalogError> {
        record_of(self.db.query_opt(
            "SELECT record FROM templates WHERE (CAST(?1 AS TEXT) IS NULL AND id = ?2)
             OR (team_id = ?1 AND (id = ?2 OR name = ?2))",
            args![team_id, id_or_name],
        )?)
    }

    /// Gives snapshot `snapshot_id` (of `sandbox_id`) the team-unique `name`; a name in
    /// use is a conflict.
    pub fn name_snapshot(
        &self,
        team_id: &str,
        name: &str,
        snapshot_id: &str,
        sandbox_id: &str,
    ) -> Result<(), CatalogError> {
        match self.db.execute(
            "INSERT INTO snapshot_names (team_id, name, snapshot_id, sandbox_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            args![team_id, name, snapshot_id, sandbox_id, now_ms()],
        ) {
            Err(e) if e.is_constraint_violation() => Err(CatalogError::Conflict(format!(
                "the team already has a snapshot named {name:?}; pick another name, or delete that snapshot"
            ))),
            other => other.map(drop),
        }
    }

    /// The ID of the snapshot `team_id` named `name`.
    pub fn snapshot_named(
        &self,
        team_id: &str,
        name: &str,
    ) -> Result<Option<String>, CatalogError> {
        self.db
            .query_opt(
                "SELECT snapshot_id FROM snapshot_names WHERE team_id = ?1 AND name = ?2",
                args![team_id, name],
            )?
            .map(|r| r.get(0))
            .transpose()
    }

    /// The name of snapshot `snapshot_id`, if it has one.
    pub fn snapshot_name(&self, snapshot_id: &str) -> Result<Option<String>, CatalogError> {
        self.db
            .query_opt(
                "SELECT name FROM snapshot_names WHERE snapshot_id = ?1",
                args![snapshot_id],
            )?
            .map(|r| r.get(0))
            .transpose()
    }

    /// Forgets the name of a deleted snapshot.
    pub fn forget_snapshot_name(&self, snapshot_id: &str) -> Result<(), CatalogError> {
        self.db.execute(
            "DELETE FROM snapshot_names WHERE snapshot_id = ?1",
            args![snapshot_id],
        )?;
        Ok(())
    }

    /// Every template record (of one team, if given), oldest first.
    pub fn templates(&self, team_id: Option<&str>) -> Result<Vec<TemplateRecord>, CatalogError> {
        let rows = self.db.query(
            "SELECT record FROM templates WHERE CAST(?1 AS TEXT) IS NULL OR team_id = ?1
             ORDER BY created_at, id",
            args![team_id],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row.get::<String>(0)?)?);
        }
        Ok(out)
    }

    /// Forgets a template and its build log.
    pub fn delete_template(&self, id: &str) -> Result<(), CatalogError> {
        self.db.transaction(Durability::Synced, |tx| {
            tx.execute("DELETE FROM templates WHERE id = ?1", args![id])?;
            tx.execute("DELETE FROM build_logs WHERE template_id = ?1", args![id])?;
            tx.execute("DELETE FROM warm_pools WHERE template = ?1", args![id])?;
            Ok(())
        })
    }

    /// Appends lines `(step, stream, text)` to a template's build log. Not synced: a
    /// log is for reading along, and a build a crash interrupts fails anyway.
    pub fn append_build_log(
        &self,
        template_id: &str,
        lines: &[(Option<u32>, &str, String)],
    ) -> Result<(), CatalogError> {
        self.db.transaction(Durability::UntilPowerLoss, |tx| {
            tx.lock("build_logs", template_id)?;
            let first: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM build_logs WHERE template_id = ?1",
                    args![template_id],
                )?
                .get(0)?;
            for (seq, (step, stream, text)) in (first..).zip(lines) {
                tx.execute(
                    "INSERT INTO build_logs (template_id, seq, at_ms, step, stream, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    args![template_id, seq, now_ms(), *step, *stream, text],
                )?;
            }
            Ok(())
        })
    }

    /// Up to `limit` build log lines of a template after `after`, in order.
    pub fn build_log(
        &self,
        template_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BuildLogLine>, CatalogError> {
        let rows = self.db.query(
            "SELECT seq, at_ms, step, stream, text FROM build_logs
             WHERE template_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            args![template_id, clamp(after), clamp(limit as u64)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(BuildLogLine {
                    seq: r.get::<i64>(0)?.max(0) as u64,
                    time: iso8601(r.get(1)?),
                    step: r.get::<Option<u32>>(2)?,
                    stream: r.get(3)?,
                    text: r.get(4)?,
                })
            })
            .collect()
    }

    /// Every template's warm-pool settings.
    pub fn warm_pools<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, T)>, CatalogError> {
        let rows = self.db.query(
            "SELECT template, config FROM warm_pools ORDER BY template",
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push((row.get(0)?, serde_json::from_str(&row.get::<String>(1)?)?));
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
        match self.db.execute(
            "INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)",
            args![&team.id, &team.name, now_ms()],
        ) {
            Ok(_) => Ok(team),
            Err(e) if e.is_constraint_violation() => Err(CatalogError::Conflict(format!(
                "a team named '{name}' or with ID {} exists; pick another",
                team.id
            ))),
            Err(e) => Err(e),
        }
    }

    /// Merges `patch` into the team's own limits; returns them all.
    pub fn set_limits(
        &self,
        team_id: &str,
        patch: &LimitsPatch,
    ) -> Result<LimitsPatch, CatalogError> {
        self.db.transaction(Durability::Synced, |tx| {
            // Two merges at once must not lose one's fields.
            tx.lock("team_quotas", team_id)?;
            let merged = Self::limits_in(tx, team_id)?.merged(patch);
            tx.execute(
                "INSERT INTO team_quotas (team_id, max_sandboxes, limits) VALUES (?1, ?2, ?3)
                 ON CONFLICT(team_id) DO UPDATE SET max_sandboxes = excluded.max_sandboxes,
                 limits = excluded.limits",
                args![
                    team_id,
                    merged.sandboxes.map_or(-1, clamp),
                    serde_json::to_string(&merged)?
                ],
            )?;
            Ok(merged)
        })
    }

    /// The team's own limits (what the host's defaults do not decide).
    pub fn limits(&self, team_id: &str) -> Result<LimitsPatch, CatalogError> {
        let row = self.db.query_opt(
            "SELECT max_sandboxes, limits FROM team_quotas WHERE team_id = ?1",
            args![team_id],
        )?;
        Self::limits_of(row)
    }

    fn limits_in(tx: &mut dyn Tx, team_id: &str) -> Result<LimitsPatch, CatalogError> {
        let row = tx.query_opt(
            "SELECT max_sandboxes, limits FROM team_quotas WHERE team_id = ?1",
            args![team_id],
        )?;
        Self::limits_of(row)
    }

    fn limits_of(row: Option<sql::Row>) -> Result<LimitsPatch, CatalogError> {
        let Some(row) = row else {
            return Ok(LimitsPatch::default());
        };
        Ok(match row.get::<Option<String>>(1)? {
            Some(json) => serde_json::from_str(&json)?,
            // A catalog from before per-resource limits: only the sandbox count.
            None => LimitsPatch {
                sandboxes: u64::try_from(row.get::<i64>(0)?).ok(),
                ..LimitsPatch::default()
            },
        })
    }

    /// Every team, by name.
    pub fn teams(&self) -> Result<Vec<Team>, CatalogError> {
        self.db
            .query("SELECT id, name FROM teams ORDER BY name", &[])?
            .iter()
            .map(|r| {
                Ok(Team {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            })
            .collect()
    }

    /// What the team's live sandboxes hold: `(count, vcpus, memory MiB, disk MiB)`,
    /// summed in SQL over the state index.
    pub fn live_resources(&self, team_id: &str) -> Result<LiveResources, CatalogError> {
        let row = self
            .db
            .query_one(&live_resources_sql(self.db.dialect()), args![team_id])?;
        live_resources_of(&row)
    }

    /// Runs `admit` in one transaction under a lock on `team`: what it reads
    /// ([`Admission::live_resources`]) and what it writes
    /// ([`Admission::put_sandbox_with_events`]) are one step, so hosts admitting
    /// creates of one team at once take turns and together never overshoot its
    /// quotas. An error from `admit` writes nothing.
    pub fn admit<T, E: From<CatalogError>>(
        &self,
        team: &str,
        durability: Durability,
        admit: impl FnOnce(&mut Admission<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut refused = None;
        let mut announced = Vec::new();
        let result = self.db.transaction(durability, |tx| {
            if tx.dialect() == sql::Dialect::Postgres {
                // A team's creates on other hosts hold its lock briefly; one held longer
                // is a host in trouble: give up (503) rather than queue behind it.
                tx.batch("SET LOCAL lock_timeout = '10s'")?;
            }
            tx.lock("admission", team)?;
            let mut a = Admission {
                tx,
                team: team.to_string(),
                announced: &mut announced,
            };
            admit(&mut a).map_err(|e| {
                refused = Some(e);
                CatalogError::Conflict("refused by admission".into())
            })
        });
        match (result, refused) {
            (Ok(out), _) => {
                for id in &announced {
                    self.announce(id);
                }
                Ok(out)
            }
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
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
        self.db.execute(
            "INSERT INTO stored_items (kind, id, team_id, mib, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(kind, id) DO UPDATE SET mib = excluded.mib",
            args![kind, id, team_id, clamp(mib), now_ms()],
        )?;
        Ok(())
    }

    /// Forgets a stored item (deleted); forgetting an unknown one is a no-op.
    pub fn forget_item(&self, kind: &str, id: &str) -> Result<(), CatalogError> {
        self.db.execute(
            "DELETE FROM stored_items WHERE kind = ?1 AND id = ?2",
            args![kind, id],
        )?;
        Ok(())
    }

    /// How many items of `kind` the team keeps, and their MiB.
    pub fn items_of(&self, kind: &str, team_id: &str) -> Result<(u64, u64), CatalogError> {
        let row = self.db.query_one(
            "SELECT COUNT(*), CAST(COALESCE(SUM(mib), 0) AS BIGINT) FROM stored_items
             WHERE kind = ?1 AND team_id = ?2",
            args![kind, team_id],
        )?;
        Ok((
            row.get::<i64>(0)?.max(0) as u64,
            row.get::<i64>(1)?.max(0) as u64,
        ))
    }

    /// Looks a team up by ID or name.
    pub fn team(&self, id_or_name: &str) -> Result<Option<Team>, CatalogError> {
        self.db
            .query_opt(
                "SELECT id, name FROM teams WHERE id = ?1 OR name = ?1",
                args![id_or_name],
            )?
            .map(|r| {
                Ok(Team {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            })
            .transpose()
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
        let team_id = if role == Role::Operator {
            OPERATOR_TEAM_ID
        } else {
            team_id
        };
        self.db.transaction(Durability::Synced, |tx| {
            if role == Role::Operator {
                tx.execute(
                    "INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                    args![OPERATOR_TEAM_ID, OPERATOR_TEAM, now_ms()],
                )?;
            }
            // The count and the insert as one step: concurrent creates cannot all pass.
            tx.lock("api_keys", team_id)?;
            let in_force: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM api_keys WHERE team_id = ?1
                     AND (expires_at IS NULL OR expires_at > ?2)",
                    args![team_id, now_ms()],
                )?
                .get(0)?;
            if in_force >= MAX_KEYS_PER_TEAM {
                return Err(CatalogError::Conflict(format!(
                    "the team has {in_force} keys in force, the most it may have; revoke one first (DELETE /keys/ID, or `admin key revoke ID`)"
                )));
            }
            tx.execute(
                "INSERT INTO api_keys (key_hash, team_id, prefix, created_at, role) VALUES (?1, ?2, ?3, ?4, ?5)",
                args![hash_key(&key), team_id, &key[..key.len().min(7)], now_ms(), role.as_str()],
            )?;
            Ok(())
        })?;
        Ok(key)
    }

    /// Who an API key is, if it is in force (known, not past its rotation deadline).
    pub fn key_owner(&self, key: &str) -> Result<Option<KeyOwner>, CatalogError> {
        let Some(r) = self.db.query_opt(
            "SELECT team_id, role, expires_at FROM api_keys WHERE key_hash = ?1
             AND (expires_at IS NULL OR expires_at > ?2)",
            args![hash_key(key), now_ms()],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(KeyOwner {
            team_id: r.get(0)?,
            role: if r.get::<String>(1)? == "operator" {
                Role::Operator
            } else {
                Role::Team
            },
            rotating_out: r.get::<Option<i64>>(2)?.is_some(),
        }))
    }

    /// The keys of a team (every team's when `None`), oldest first; never the keys
    /// themselves.
    pub fn keys(&self, team_id: Option<&str>) -> Result<Vec<KeyInfo>, CatalogError> {
        self.db
            .query(
                "SELECT substr(key_hash, 1, 16), team_id, role, prefix, created_at, expires_at
                 FROM api_keys WHERE (CAST(?1 AS TEXT) IS NULL OR team_id = ?1)
                 AND (expires_at IS NULL OR expires_at > ?2) ORDER BY created_at, key_hash",
                args![team_id, now_ms()],
            )?
            .iter()
            .map(key_info)
            .collect()
    }

    /// A key in force by its ID (the first 16 hex digits of its hash).
    pub fn key(&self, id: &str) -> Result<Option<KeyInfo>, CatalogError> {
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        self.db
            .query_opt(
                "SELECT substr(key_hash, 1, 16), team_id, role, prefix, created_at, expires_at
                 FROM api_keys WHERE substr(key_hash, 1, 16) = ?1
                 AND (expires_at IS NULL OR expires_at > ?2)",
                args![id, now_ms()],
            )?
            .as_ref()
            .map(key_info)
            .transpose()
    }

    /// Ends a key at `at_ms` (now: revoked; later: the grace of a rotation). Returns
    /// whether a key in force had that ID.
    pub fn expire_key(&self, id: &str, at_ms: i64) -> Result<bool, CatalogError> {
        let n = self.db.execute(
            "UPDATE api_keys SET expires_at = ?2 WHERE substr(key_hash, 1, 16) = ?1
             AND (expires_at IS NULL OR expires_at > ?2)",
            args![id, at_ms],
        )?;
        // Keys past their end are kept no longer than needed to say so.
        self.db.execute(
            "DELETE FROM api_keys WHERE expires_at IS NOT NULL AND expires_at < ?1",
            args![now_ms() - 30 * 24 * 3600 * 1000],
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
        let patched = self
            .db
            .dialect()
            .json_set_ints("record", &[("timeout_s", 2), ("expires_at_ms", 3)]);
        self.db.execute(
            &format!("UPDATE sandboxes SET record = {patched} WHERE id = ?1"),
            args![id, clamp(timeout_s), expires_at_ms],
        )?;
        self.sandbox(id)
    }

    /// A sandbox record by ID.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, CatalogError> {
        record_of(
            self.db
                .query_opt("SELECT record FROM sandboxes WHERE id = ?1", args![id])?,
        )
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
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let limit = limit.map_or(i64::MAX, |l| clamp(l as u64));
        let marks = (4..4 + states.len())
            .map(|n| format!("?{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut params: Vec<Value> = args![team_id, after_seq, limit].to_vec();
        params.extend(states.iter().map(|s| Value::from(*s)));
        let rows = self.db.query(
            &format!(
                "SELECT seq, record FROM sandboxes WHERE team_id = ?1 AND seq > ?2
                 AND state IN ({marks}) ORDER BY seq LIMIT ?3"
            ),
            &params,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push((row.get(0)?, serde_json::from_str(&row.get::<String>(1)?)?));
        }
        Ok(out)
    }

    /// Removes the sandboxes deleted before `before_ms` (the time of their last step)
    /// with their events, in one transaction; returns how many. Records of deleted
    /// sandboxes are kept only for a retention period: the catalog must not grow with
    /// every sandbox ever made.
    pub fn prune_deleted(&self, before_ms: i64) -> Result<usize, CatalogError> {
        let last_step_at = self
            .db
            .dialect()
            .json_text("record", &["timeline", "-1", "at"]);
        let rows = self.db.query(
            &format!("SELECT id, {last_step_at} FROM sandboxes WHERE state = 'deleted'"),
            &[],
        )?;
        let mut old = Vec::new();
        for row in rows {
            let id: String = row.get(0)?;
            let ended = row
                .get::<Option<String>>(1)?
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
                .map(|t| t.timestamp_millis());
            if ended.is_some_and(|t| t < before_ms) {
                old.push(id);
            }
        }
        if old.is_empty() {
            return Ok(0);
        }
        self.db.transaction(Durability::Synced, |tx| {
            for id in &old {
                tx.execute("DELETE FROM events WHERE sandbox_id = ?1", args![id])?;
                tx.execute("DELETE FROM audit_records WHERE sandbox_id = ?1", args![id])?;
                tx.execute("DELETE FROM sandboxes WHERE id = ?1", args![id])?;
            }
            Ok(())
        })?;
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
    /// The states of sandboxes that hold resources: every state but `deleted` and
    /// `failed`. Queries name these (`state IN (...)`, `live_states_sql`) rather
    /// than exclude the two: an index on `(team_id, state)` then reads only live rows,
    /// not every sandbox the team ever ended (which a retention period keeps, and a
    /// serverless team makes by the hundred thousand).
    pub const LIVE: &'static [&'static str] =
        &["new", "creating", "active", "stopped", "destroying"];

    /// The records in one of `states` (internal names: `active`, `stopped`, ...), oldest
    /// first, found through the state index: the periodic loops never parse the
    /// records of deleted sandboxes.
    pub fn sandboxes_in(&self, states: &[&str]) -> Result<Vec<SandboxRecord>, CatalogError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let marks = (1..=states.len())
            .map(|n| format!("?{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut params: Vec<Value> = states.iter().map(|s| Value::from(*s)).collect();
        let mine = self.host_filter("host_id", &mut params);
        let rows = self.db.query(
            &format!("SELECT record FROM sandboxes WHERE state IN ({marks}){mine} ORDER BY seq"),
            &params,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row.get::<String>(0)?)?);
        }
        Ok(out)
    }

    /// How many of every team's sandboxes are in each internal state.
    pub fn state_counts(&self, team_id: Option<&str>) -> Result<Vec<(String, u64)>, CatalogError> {
        self.db
            .query(
                "SELECT state, COUNT(*) FROM sandboxes
                 WHERE (CAST(?1 AS TEXT) IS NULL OR team_id = ?1) GROUP BY state",
                args![team_id],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get::<i64>(1)?.max(0) as u64)))
            .collect()
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
        self.db.execute(
            "INSERT INTO snapshots (id, kind, sandbox_id, template, dir, created_at, manifest, host_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            args![
                &snapshot.manifest().id,
                kind,
                sandbox_id,
                template,
                snapshot.dir().display().to_string(),
                now_ms(),
                serde_json::to_string(snapshot.manifest())?,
                self.host.get()
            ],
        )?;
        Ok(())
    }

    /// Forgets a snapshot (it was deleted).
    pub fn forget_snapshot(&self, id: &str) -> Result<(), CatalogError> {
        self.db
            .execute("DELETE FROM snapshots WHERE id = ?1", args![id])?;
        Ok(())
    }

    /// Snapshots of one kind, oldest first.
    pub fn snapshots(&self, kind: &str) -> Result<Vec<SnapshotRow>, CatalogError> {
        let mut params = args![kind].to_vec();
        let mine = self.host_filter("host_id", &mut params);
        self.db
            .query(
                &format!(
                    "SELECT id, sandbox_id, dir FROM snapshots WHERE kind = ?1{mine} ORDER BY created_at"
                ),
                &params,
            )?
            .iter()
            .map(|r| {
                Ok(SnapshotRow {
                    id: r.get(0)?,
                    sandbox_id: r.get(1)?,
                    dir: r.get(2)?,
                })
            })
            .collect()
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
        self.db.transaction(durability, |tx| {
            Self::write_record_and_events(tx, record, &json, events)
        })?;
        if !events.is_empty() {
            self.announce(&record.id);
        }
        Ok(())
    }

    fn write_record_and_events(
        tx: &mut dyn Tx,
        record: &SandboxRecord,
        json: &str,
        events: &[(&str, serde_json::Value)],
    ) -> Result<(), CatalogError> {
        let seq = tx.dialect().next_sandbox_seq();
        // Fenced: a record another host owns now (or owned again since, a later epoch)
        // is not written over by one that lost it.
        // (On SQLite, one host's own file, there is nobody to fence.)
        let fence = match tx.dialect() {
            sql::Dialect::Sqlite => String::new(),
            sql::Dialect::Postgres => format!(
                "WHERE sandboxes.host_id IS NULL
                    OR (sandboxes.host_id = ?4 AND COALESCE({}, 0) <= ?5)",
                tx.dialect().json_int("sandboxes.record", &["ownerEpoch"])
            ),
        };
        let written = tx.execute(
            &format!(
                "INSERT INTO sandboxes (id, team_id, seq, record)
                 VALUES (?1, ?2, {seq}, ?3)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record {fence}"
            ),
            &args![
                &record.id,
                &record.team_id,
                json,
                record.host_id.as_deref(),
                record.owner_epoch.min(i64::MAX as u64) as i64
            ][..if fence.is_empty() { 3 } else { 5 }],
        )?;
        if written == 0 {
            return Err(CatalogError::Conflict(format!(
                "sandbox {} moved to another host (failover or drain); this host no longer writes it",
                record.id
            )));
        }
        if !events.is_empty() {
            Self::append_events(tx, &record.id, events)?;
        }
        Ok(())
    }

    /// Appends `(kind, data)` events to a sandbox's log; returns the first one's ID.
    fn append_events(
        tx: &mut dyn Tx,
        sandbox_id: &str,
        events: &[(&str, serde_json::Value)],
    ) -> Result<i64, CatalogError> {
        // IDs are the log's own sequence: writers of the same log take turns.
        tx.lock("events", sandbox_id)?;
        let first: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(event_id), 0) + 1 FROM events WHERE sandbox_id = ?1",
                args![sandbox_id],
            )?
            .get(0)?;
        for (id, (kind, data)) in (first..).zip(events) {
            tx.execute(
                "INSERT INTO events (sandbox_id, event_id, at_ms, kind, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                args![sandbox_id, id, now_ms(), *kind, data.to_string()],
            )?;
        }
        if tx.dialect() == sql::Dialect::Postgres {
            // Delivered to every host's listener when (and only if) this commits.
            tx.execute(
                &format!("SELECT pg_notify('{EVENTS_CHANNEL}', ?1)"),
                args![sandbox_id],
            )?;
        }
        Ok(first)
    }

    /// Tells followers that `sandbox_id`'s log grew (nothing to do when none follows:
    /// the create path appends events too).
    fn announce(&self, sandbox_id: &str) {
        if self.appended.receiver_count() > 0 {
            let _ = self.appended.send(sandbox_id.to_string());
        }
    }

    /// Sandbox IDs as events are appended to their logs, on this host or (on a shared
    /// catalog) any other; [`ANY_SANDBOX`] when appends may have been missed. A lagging
    /// receiver, like one told [`ANY_SANDBOX`], re-reads the log: the notification
    /// carries no event.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.appended.subscribe()
    }

    /// The secret every host of this catalog shares under `name`: the one stored, or
    /// else `made` (the first host to ask stores it; a host racing it gets the stored
    /// one). Only a shared catalog needs this; a SQLite one keeps it too.
    pub fn shared_secret(&self, name: &str, made: &[u8]) -> Result<Vec<u8>, CatalogError> {
        let hex = hex::encode(made);
        self.db.execute(
            "INSERT INTO shared_secrets (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            args![name, hex],
        )?;
        let stored: String = self
            .db
            .query_one(
                "SELECT value FROM shared_secrets WHERE name = ?1",
                args![name],
            )?
            .get(0)?;
        (0..stored.len())
            .step_by(2)
            .map(|i| stored.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() >= 32)
            .ok_or_else(|| {
                CatalogError::Conflict(format!(
                    "the shared secret {name} in the catalog is not 32 or more hex bytes; delete its row (shared_secrets) to have a new one made"
                ))
            })
    }

    /// The ID of a sandbox's newest event (0 if none).
    pub fn last_event_id(&self, sandbox_id: &str) -> Result<u64, CatalogError> {
        let id: i64 = self
            .db
            .query_one(
                "SELECT COALESCE(MAX(event_id), 0) FROM events WHERE sandbox_id = ?1",
                args![sandbox_id],
            )?
            .get(0)?;
        Ok(id.max(0) as u64)
    }

    /// Appends an event to a sandbox's log; returns its ID (1, 2, 3, ... per sandbox).
    pub fn append_event(
        &self,
        sandbox_id: &str,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<u64, CatalogError> {
        let id = self.db.transaction(Durability::Synced, |tx| {
            Self::append_events(tx, sandbox_id, &[(kind, data.clone())])
        })?;
        self.announce(sandbox_id);
        Ok(id.max(0) as u64)
    }

    /// A sandbox's events with IDs above `after`, in order.
    pub fn events(
        &self,
        sandbox_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, CatalogError> {
        let rows = self.db.query(
            "SELECT event_id, at_ms, kind, data FROM events
             WHERE sandbox_id = ?1 AND event_id > ?2 ORDER BY event_id LIMIT ?3",
            args![sandbox_id, clamp(after), clamp(limit as u64)],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Event {
                id: row.get::<i64>(0)?.max(0) as u64,
                at: crate::model::iso8601(row.get(1)?),
                kind: row.get(2)?,
                data: serde_json::from_str(&row.get::<String>(3)?)?,
            });
        }
        Ok(out)
    }
}

/// A count or size as the database's integer (a value past its range is the largest it
/// holds, not a negative number).
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    use super::migrations::LATEST as SCHEMA_VERSION;
    use super::testing::{self, backends, PgDatabase};
    use super::*;

    #[test]
    fn deleted_sandboxes_past_their_retention_go_with_their_events() {
        use crate::model::{InternalState, SandboxRecord};
        for t in backends() {
            let c = t.catalog();
            let team = c.create_team("acme", None).unwrap();
            let fresh =
                || SandboxRecord::fresh(&team.id, "base".into(), Default::default(), 300, 0);
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
            assert_eq!(c.prune_deleted(an_hour_ago).unwrap(), 1, "{}", t.name());
            assert!(c.sandbox(&old.id).unwrap().is_none());
            assert_eq!(c.last_event_id(&old.id).unwrap(), 0, "its events went too");
            assert!(c.sandbox(&recent.id).unwrap().is_some());
            assert!(c.sandbox(&live.id).unwrap().is_some());
            assert_eq!(c.last_event_id(&live.id).unwrap(), 1);
            assert_eq!(c.prune_deleted(an_hour_ago).unwrap(), 0);
        }
    }

    #[test]
    fn keys_rotate_with_a_grace_and_revoke_at_once() {
        for t in backends() {
            let c = t.catalog();
            let team = c.create_team("acme", None).unwrap();
            let a = c.create_key(&team.id, None).unwrap();
            let b = c.create_key(&team.id, None).unwrap();
            let op = c.create_key_with_role("", None, Role::Operator).unwrap();
            assert_eq!(c.key_owner(&op).unwrap().unwrap().role, Role::Operator);
            assert_eq!(c.keys(Some(&team.id)).unwrap().len(), 2, "{}", t.name());
            assert_eq!(c.keys(None).unwrap().len(), 3);
            let id = |k: &str| hash_key(k)[..16].to_string();
            // Revoked: gone now, and not listed.
            assert!(c.expire_key(&id(&a), now_ms()).unwrap());
            assert_eq!(c.key_owner(&a).unwrap(), None);
            assert!(!c.expire_key(&id(&a), now_ms()).unwrap(), "already ended");
            // Rotated: works until its end, which a later rotation never extends.
            assert!(c.expire_key(&id(&b), now_ms() + 60_000).unwrap());
            assert!(c.key_owner(&b).unwrap().unwrap().rotating_out);
            assert!(!c.expire_key(&id(&b), now_ms() + 120_000).unwrap());
            assert!(c.key(&id(&b)).unwrap().unwrap().expires_at.is_some());
            assert_eq!(c.key("not-an-id").unwrap().map(|k| k.id), None);
        }
    }

    #[test]
    fn limits_merge_and_live_resources_sum_over_the_state_index() {
        for t in backends() {
            let c = t.catalog();
            let team = c.create_team("acme", None).unwrap();
            let one = |f: &str, v: u64| -> LimitsPatch {
                serde_json::from_value(serde_json::json!({ f: v })).unwrap()
            };
            c.set_limits(&team.id, &one("vcpus", 4)).unwrap();
            let both = c.set_limits(&team.id, &one("sandboxes", 3)).unwrap();
            assert_eq!((both.vcpus, both.sandboxes), (Some(4), Some(3)));
            assert_eq!(c.limits(&team.id).unwrap(), both);
            assert_eq!(c.limits("team-none").unwrap(), LimitsPatch::default());
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
            assert_eq!(
                c.live_resources(&team.id).unwrap(),
                (2, 4, 1024, 2048),
                "{}",
                t.name()
            );
            if t.name() == "sqlite" {
                // The index reads only live rows, never the team's ended sandboxes.
                let plan =
                    c.db.query(
                        &format!(
                            "EXPLAIN QUERY PLAN {}",
                            live_resources_sql(sql::Dialect::Sqlite)
                        ),
                        args![&team.id],
                    )
                    .unwrap();
                let detail: Vec<String> = plan.iter().map(|r| r.get(3).unwrap()).collect();
                assert!(
                    detail.iter().any(|d| d.contains("team_id=? AND state=?")),
                    "{detail:?}"
                );
            }
            let active = c.sandboxes_in(&["active"]).unwrap();
            assert_eq!(active.len(), 1);
            assert_eq!(c.sandboxes_in(Catalog::NOT_DELETED).unwrap().len(), 3);
            assert!(c.sandboxes_in(&[]).unwrap().is_empty());
            // Listed in order of creation, paged by position.
            let page = c
                .sandboxes_of(&team.id, 0, Catalog::NOT_DELETED, Some(2))
                .unwrap();
            let ids: Vec<&str> = page.iter().map(|(_, r)| r.id.as_str()).collect();
            assert_eq!(ids, ["sbx-0", "sbx-1"]);
            let rest = c
                .sandboxes_of(&team.id, page[1].0, Catalog::NOT_DELETED, None)
                .unwrap();
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].1.id, "sbx-3");
            let mut counts = c.state_counts(Some(&team.id)).unwrap();
            counts.sort();
            assert_eq!(counts.len(), 4);
            assert_eq!(c.state_counts(None).unwrap().len(), 4);
            // A patch of the expiry keeps the rest of the record, and its state.
            let patched = c.set_expiry("sbx-0", 90, 123_456).unwrap().unwrap();
            assert_eq!((patched.timeout_s, patched.expires_at_ms), (90, 123_456));
            assert_eq!(c.sandboxes_in(&["active"]).unwrap().len(), 1);
            assert!(c.set_expiry("sbx-none", 1, 1).unwrap().is_none());
            c.record_item("snapshot", "snap-1", &team.id, 10).unwrap();
            c.record_item("snapshot", "snap-2", &team.id, 5).unwrap();
            c.forget_item("snapshot", "snap-1").unwrap();
            assert_eq!(c.items_of("snapshot", &team.id).unwrap(), (1, 5));
        }
    }

    #[test]
    fn keys_are_stored_hashed_and_resolve_to_their_team() {
        for t in backends() {
            let c = t.catalog();
            let team = c.create_team("acme", None).unwrap();
            let key = c.create_key(&team.id, None).unwrap();
            let owner = c.key_owner(&key).unwrap().unwrap();
            assert_eq!(
                (owner.team_id.as_str(), owner.role),
                (team.id.as_str(), Role::Team)
            );
            assert_eq!(c.key_owner("ns_wrong").unwrap(), None);
            let stored: String =
                c.db.query_one("SELECT key_hash FROM api_keys", &[])
                    .unwrap()
                    .get(0)
                    .unwrap();
            assert_ne!(stored, key);
            assert_eq!(stored, hash_key(&key));
        }
    }

    #[test]
    fn unique_violations_are_conflicts_on_both_backends() {
        for t in backends() {
            let c = t.catalog();
            let team = c.create_team("acme", None).unwrap();
            assert!(
                matches!(c.create_team("acme", None), Err(CatalogError::Conflict(_))),
                "{}: the same name",
                t.name()
            );
            assert!(
                matches!(
                    c.create_team("other", Some(&team.id)),
                    Err(CatalogError::Conflict(_))
                ),
                "{}: the same ID",
                t.name()
            );
            let template = |id: &str| TemplateRecord {
                id: id.into(),
                team_id: team.id.clone(),
                name: Some("web".into()),
                request: serde_json::from_value(serde_json::json!({})).unwrap(),
                base: "base".into(),
                status: api_model::TemplateStatus::Building,
                resources: crate::model::Resources {
                    vcpus: 1,
                    mem_mib: 256,
                    disk_mib: 256,
                },
                env_vars: Default::default(),
                steps: Vec::new(),
                error: None,
                snapshot_id: None,
                created_at_ms: now_ms(),
                ready_at_ms: None,
                build_ms: None,
                built_on: None,
            };
            c.put_template(&template("tpl-1")).unwrap();
            // The same record again is an update, not a conflict.
            c.put_template(&template("tpl-1")).unwrap();
            match c.put_template(&template("tpl-2")) {
                Err(CatalogError::Conflict(m)) => assert!(m.contains("web"), "{m}"),
                other => panic!("{}: a second template named web: {other:?}", t.name()),
            }
            assert_eq!(
                c.template(Some(&team.id), "web").unwrap().unwrap().id,
                "tpl-1"
            );
            assert_eq!(c.template(None, "tpl-1").unwrap().unwrap().id, "tpl-1");
            assert!(c.template(None, "web").unwrap().is_none(), "by ID only");
            assert_eq!(c.templates(None).unwrap().len(), 1);
            c.put_warm_pool("tpl-1", &serde_json::json!({ "size": 2 }))
                .unwrap();
            assert_eq!(c.warm_pools::<serde_json::Value>().unwrap().len(), 1);
            c.delete_template("tpl-1").unwrap();
            assert!(c.templates(Some(&team.id)).unwrap().is_empty());
            assert!(c.warm_pools::<serde_json::Value>().unwrap().is_empty());
            // A failed transaction leaves nothing: the 21st key is refused whole.
            for _ in 0..MAX_KEYS_PER_TEAM {
                c.create_key(&team.id, None).unwrap();
            }
            assert!(matches!(
                c.create_key(&team.id, None),
                Err(CatalogError::Conflict(_))
            ));
            assert_eq!(
                c.keys(Some(&team.id)).unwrap().len(),
                MAX_KEYS_PER_TEAM as usize
            );
        }
    }

    #[test]
    fn snapshots_are_recorded_once_and_forgotten() {
        for t in backends() {
            let c = t.catalog();
            let snap_dir = t.dir().join("snap");
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
            let rows = c.snapshots("pause").unwrap();
            assert_eq!(rows.len(), 1, "{}", t.name());
            assert_eq!(rows[0].sandbox_id.as_deref(), Some("sbx-1"));
            c.forget_snapshot("snap-1").unwrap();
            assert!(c.snapshots("pause").unwrap().is_empty());
        }
    }

    #[test]
    fn hosts_admitting_one_teams_creates_at_once_never_overshoot_its_quota() {
        for t in backends() {
            // Two hosts (handles), four creates each at once, a quota of three.
            let team = t.catalog().create_team("q", None).unwrap().id;
            let team = team.as_str();
            let hosts = [t.reopen(), t.reopen()];
            let admitted = std::sync::atomic::AtomicU64::new(0);
            std::thread::scope(|scope| {
                for (h, c) in hosts.iter().enumerate() {
                    for i in 0..4 {
                        let admitted = &admitted;
                        scope.spawn(move || {
                            let mut r = SandboxRecord::fresh(
                                team,
                                "base".into(),
                                Default::default(),
                                60,
                                0,
                            );
                            r.id = format!("sbx-{h}-{i}");
                            let outcome = c.admit(team, Durability::Synced, |a| {
                                let (live, ..) = a.live_resources()?;
                                // The window a lock must close: read, think, write.
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                if live >= 3 {
                                    return Err(CatalogError::Conflict("over quota".into()));
                                }
                                a.put_sandbox_with_events(
                                    &r,
                                    &[("sandbox.created", serde_json::json!({}))],
                                )
                            });
                            if outcome.is_ok() {
                                admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        });
                    }
                }
            });
            assert_eq!(admitted.into_inner(), 3, "{}", t.name());
            assert_eq!(
                t.catalog().live_resources(team).unwrap().0,
                3,
                "{}",
                t.name()
            );
        }
    }

    #[test]
    fn a_host_stopping_drains_through_a_catalog_its_successor_migrated() {
        let Some(t) = testing::postgres() else {
            return;
        };
        let Location::Postgres(url) = t.location().clone() else {
            unreachable!()
        };
        // The catalog one version ahead of this binary (its successor migrated it).
        t.catalog()
            .db
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                args![SCHEMA_VERSION + 1],
            )
            .unwrap();
        let refused = Catalog::connect(&url)
            .err()
            .expect("a newer schema is refused");
        assert!(refused.to_string().contains("newer"), "{refused}");
        let hosts = Catalog::open_for_hosts(t.location()).unwrap();
        assert!(hosts.hosts().unwrap().is_empty());
    }

    #[test]
    fn a_shared_secret_is_the_first_hosts_for_every_host() {
        for t in backends() {
            let first = t.catalog().shared_secret("k", &[7; 32]).unwrap();
            assert_eq!(first, vec![7; 32], "{}", t.name());
            let other = t.reopen();
            assert_eq!(other.shared_secret("k", &[9; 32]).unwrap(), vec![7; 32]);
        }
    }

    #[test]
    fn appends_on_one_host_reach_the_followers_on_another() {
        let Some(t) = testing::postgres() else {
            return;
        };
        // Two handles on one database: two hosts. (A listener still connecting tells
        // its followers to re-read: no proof here; the sandbox's own notice is.)
        let other = t.reopen();
        let mut followed = other.subscribe_events();
        heard_across(t.catalog(), &mut followed, "sbx-far");
        // The log is the shared one.
        assert!(!other.events("sbx-far", 0, 10).unwrap().is_empty());
    }

    /// Appends on `from` until a follower of `to` hears `sandbox` (up to 20 s); what
    /// else it heard meanwhile.
    fn heard_across(
        from: &Catalog,
        to_followers: &mut tokio::sync::broadcast::Receiver<String>,
        sandbox: &str,
    ) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline {
            from.append_event(sandbox, "x", &serde_json::json!({}))
                .unwrap();
            let round = std::time::Instant::now() + std::time::Duration::from_millis(500);
            while std::time::Instant::now() < round {
                match to_followers.try_recv() {
                    Ok(id) if id == sandbox => return seen,
                    Ok(id) => seen.push(id),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
        panic!("no notification of {sandbox} within 20 s; heard {seen:?}");
    }

    #[test]
    fn a_listener_whose_connection_is_cut_listens_again_and_says_to_re_read() {
        let Some(t) = testing::postgres() else {
            return;
        };
        let other = t.reopen();
        let mut followed = other.subscribe_events();
        heard_across(t.catalog(), &mut followed, "sbx-before");
        // The server ends the listening connections (a restart, a failover, a cut).
        let cut = t
            .catalog()
            .db
            .query(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = ?1) AS cut",
                args![postgres::LISTENER_APPLICATION],
            )
            .unwrap()[0]
            .get::<i64>(0)
            .unwrap();
        assert!(cut >= 1, "no listening connection to cut");
        let heard = heard_across(t.catalog(), &mut followed, "sbx-after");
        assert!(
            heard.iter().any(|h| h == ANY_SANDBOX),
            "followers are told to re-read after a reconnect: {heard:?}"
        );
    }

    #[test]
    fn event_ids_increase_per_sandbox_and_survive_reopening() {
        for t in backends() {
            let c = t.catalog();
            assert_eq!(c.append_event("a", "x", &serde_json::json!({})).unwrap(), 1);
            assert_eq!(c.append_event("a", "y", &serde_json::json!({})).unwrap(), 2);
            assert_eq!(c.append_event("b", "x", &serde_json::json!({})).unwrap(), 1);
            let c = t.reopen();
            let after_one: Vec<u64> = c
                .events("a", 1, 100)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(after_one, vec![2], "{}", t.name());
            assert_eq!(c.events("a", 0, 100).unwrap()[1].kind, "y");
        }
    }

    #[test]
    fn concurrent_appends_to_one_log_number_their_events_in_turn() {
        use std::sync::Arc;
        for t in backends() {
            let c = Arc::new(t.reopen());
            let writers: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        (0..10)
                            .map(|_| c.append_event("a", "x", &serde_json::json!({})).unwrap())
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            let mut ids: Vec<u64> = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            ids.sort();
            assert_eq!(ids, (1..=40).collect::<Vec<u64>>(), "{}", t.name());
        }
    }

    #[test]
    fn migrations_are_idempotent() {
        for t in backends() {
            // The test catalog was migrated when made: again changes nothing.
            for _ in 0..2 {
                assert_eq!(
                    Catalog::migrate(t.location()).unwrap(),
                    Migrated {
                        from: SCHEMA_VERSION,
                        to: SCHEMA_VERSION
                    },
                    "{}",
                    t.name()
                );
            }
            assert_eq!(t.catalog().schema_version().unwrap(), SCHEMA_VERSION);
            let rows: i64 = t
                .catalog()
                .db
                .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
                .unwrap()
                .get(0)
                .unwrap();
            assert_eq!(rows, SCHEMA_VERSION);
        }
        // A new one goes from 0 to the latest.
        let dir = std::env::temp_dir().join(format!(
            "catalog-new-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let location = Location::Sqlite(dir.join("catalog.db"));
        assert_eq!(
            Catalog::migrate(&location).unwrap(),
            Migrated {
                from: 0,
                to: SCHEMA_VERSION
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
        if let Some(db) = PgDatabase::create() {
            let location = Location::Postgres(db.url.clone());
            assert_eq!(
                Catalog::migrate(&location).unwrap(),
                Migrated {
                    from: 0,
                    to: SCHEMA_VERSION
                }
            );
        }
    }

    /// The schema of the catalogs made before migrations, at their oldest: no intents,
    /// no `limits`, keys without roles or ends, sandboxes without the state column.
    const PRE_MIGRATION_SCHEMA: &str = "
        CREATE TABLE teams (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
        CREATE TABLE api_keys (
            key_hash TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            prefix TEXT NOT NULL,
            created_at INTEGER NOT NULL);
        CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            seq INTEGER NOT NULL UNIQUE,
            record TEXT NOT NULL);
        CREATE TABLE snapshots (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, sandbox_id TEXT, template TEXT,
            dir TEXT NOT NULL, created_at INTEGER NOT NULL, manifest TEXT NOT NULL);
        CREATE TABLE events (
            sandbox_id TEXT NOT NULL, event_id INTEGER NOT NULL, at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (sandbox_id, event_id));
        CREATE TABLE warm_pools (template TEXT PRIMARY KEY, config TEXT NOT NULL);
        CREATE TABLE team_quotas (
            team_id TEXT PRIMARY KEY REFERENCES teams(id), max_sandboxes INTEGER NOT NULL);";

    #[test]
    fn a_catalog_from_before_migrations_opens_and_migrates_to_the_latest() {
        let dir = std::env::temp_dir().join(format!(
            "catalog-old-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("catalog.db");
        let record = SandboxRecord::fresh("team-old", "base".into(), Default::default(), 60, 0);
        {
            let old = rusqlite::Connection::open(&path).unwrap();
            old.execute_batch(PRE_MIGRATION_SCHEMA).unwrap();
            old.execute(
                "INSERT INTO teams (id, name, created_at) VALUES ('team-old', 'old', 0)",
                [],
            )
            .unwrap();
            old.execute(
                "INSERT INTO api_keys (key_hash, team_id, prefix, created_at) VALUES (?1, 'team-old', 'ns_old', 0)",
                [hash_key("ns_old")],
            )
            .unwrap();
            old.execute(
                "INSERT INTO sandboxes (id, team_id, seq, record) VALUES (?1, 'team-old', 1, ?2)",
                [record.id.clone(), serde_json::to_string(&record).unwrap()],
            )
            .unwrap();
            old.execute(
                "INSERT INTO team_quotas (team_id, max_sandboxes) VALUES ('team-old', 5)",
                [],
            )
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema_version().unwrap(), SCHEMA_VERSION);
        // What it held reads as before, through the columns added on the way.
        let owner = c.key_owner("ns_old").unwrap().unwrap();
        assert_eq!(
            (owner.team_id.as_str(), owner.role),
            ("team-old", Role::Team)
        );
        assert_eq!(c.limits("team-old").unwrap().sandboxes, Some(5));
        let state = serde_json::to_value(record.state).unwrap();
        assert_eq!(
            c.sandboxes_in(&[state.as_str().unwrap()]).unwrap()[0].id,
            record.id
        );
        // And what came later works on it.
        c.begin_intent(
            &record.id,
            "pause",
            &serde_json::json!({}),
            Durability::Synced,
        )
        .unwrap();
        c.append_build_log("tpl-1", &[(None, "build", "x".into())])
            .unwrap();
        c.record_item("volume", "vol-1", "team-old", 1).unwrap();
        drop(c);
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(c.intents().unwrap().len(), 1);
        drop(c);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_catalog_newer_than_the_binary_is_refused() {
        for t in backends() {
            t.catalog()
                .db
                .execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                    args![SCHEMA_VERSION + 1],
                )
                .unwrap();
            let why = match Catalog::open_location(t.location()) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{}: a newer schema opened", t.name()),
            };
            assert!(why.contains("upgrade nullspace-pool-manager"), "{why}");
            assert!(Catalog::migrate(t.location()).is_err());
        }
    }

    #[test]
    fn connect_refuses_an_unmigrated_postgres_catalog_with_the_fix() {
        let Some(db) = PgDatabase::create() else {
            return;
        };
        let why = match Catalog::connect(&db.url) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("an empty database opened as a catalog"),
        };
        assert!(
            why.contains(&format!(
                "nullspace-pool-manager migrate --catalog {}",
                db.url
            )),
            "{why}"
        );
        let location = Location::Postgres(db.url.clone());
        Catalog::migrate(&location).unwrap();
        let c = Catalog::connect(&db.url).unwrap();
        assert_eq!(c.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn postgres_calls_work_from_any_runtime_and_never_hang() {
        let Some(t) = testing::postgres() else {
            return;
        };
        let url = match t.location() {
            Location::Postgres(url) => url.clone(),
            Location::Sqlite(_) => unreachable!(),
        };
        for multi_thread in [true, false] {
            let runtime = if multi_thread {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            }
            .unwrap();
            let url = url.clone();
            let teams = runtime.block_on(async move {
                let task = tokio::spawn(async move {
                    // Made, used and dropped inside the runtime.
                    let c = Catalog::connect(&url).unwrap();
                    c.create_team(&format!("t-{multi_thread}"), None).unwrap();
                    c.teams().unwrap().len()
                });
                task.await.unwrap()
            });
            assert!(teams >= 1);
        }
        // A server that does not answer is an error within the deadline, not a hang.
        let dead = Catalog::connect("postgres://postgres@127.0.0.1:1/none");
        assert!(dead.is_err());
    }

    #[test]
    fn catalog_locations_parse_or_say_what_to_send() {
        assert_eq!(
            Location::parse("sqlite:/var/lib/nullspace/catalog.db").unwrap(),
            Location::Sqlite("/var/lib/nullspace/catalog.db".into())
        );
        assert_eq!(
            Location::parse("sqlite:///abs/c.db").unwrap(),
            Location::Sqlite("/abs/c.db".into())
        );
        assert_eq!(
            Location::parse("./c.db").unwrap(),
            Location::Sqlite("./c.db".into())
        );
        for url in ["postgres://u@h:5432/db", "postgresql://u:p@h/db"] {
            assert_eq!(
                Location::parse(url).unwrap(),
                Location::Postgres(url.into())
            );
        }
        assert_eq!(
            Location::parse("postgresql://u:secret@h/db")
                .unwrap()
                .to_string(),
            "postgresql://u:***@h/db"
        );
        for bad in ["mysql://u:secret@h/db", "redis:x", "sqlite:", ""] {
            let why = Location::parse(bad).unwrap_err().to_string();
            assert!(why.contains("postgres://"), "{bad}: {why}");
            assert!(!why.contains("secret"), "{why}");
        }
    }
}
