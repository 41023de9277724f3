//! Versioned schema migrations, for both dialects. `schema_migrations` holds one row
//! per migration applied (its version, and when, in ms since the epoch); a catalog is
//! at the highest version there.
//!
//! A SQLite catalog migrates when it opens (one daemon owns the file). A Postgres
//! catalog is shared by hosts that upgrade one by one, so it migrates only when asked
//! (`nullspace-pool-manager migrate --catalog URL`), in one transaction under an
//! advisory lock: two hosts that start at once do not race, and a migration that fails
//! leaves the schema as it was. A binary refuses a Postgres catalog at another version.

use super::sql::{args, Db, Dialect, Tx};
use super::{now_ms, CatalogError, Durability};

/// The schema version this binary reads and writes.
pub const LATEST: i64 = 6;

/// The key of the advisory lock Postgres migrations hold (any constant the catalog
/// uses for nothing else: "nullspace" in ASCII).
const MIGRATION_LOCK: i64 = 0x6e75_6c6c_7370_6163;

/// One step of the schema.
struct Migration {
    version: i64,
    apply: fn(&mut dyn Tx) -> Result<(), CatalogError>,
}

/// Every migration, oldest first; versions 1, 2, 3, … without gaps.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        apply: v1,
    },
    Migration {
        version: 2,
        apply: v2,
    },
    Migration {
        version: 3,
        apply: v3,
    },
    Migration {
        version: 4,
        apply: v4,
    },
    Migration {
        version: 5,
        apply: v5,
    },
    Migration {
        version: 6,
        apply: v6,
    },
];

/// Brings the catalog to [`LATEST`]; returns the version it was at before. Running it
/// again changes nothing. A catalog newer than this binary is an error.
pub(super) fn migrate(db: &Db, catalog: &str) -> Result<i64, CatalogError> {
    db.transaction(Durability::Synced, |tx| {
        if tx.dialect() == Dialect::Postgres {
            // Not a notice in the log for every table that is there already.
            tx.batch("SET LOCAL client_min_messages = warning")?;
            tx.execute("SELECT pg_advisory_xact_lock(?1)", args![MIGRATION_LOCK])?;
        }
        tx.batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )?;
        let before = version_in(tx)?;
        if before > LATEST {
            return Err(newer(catalog, before));
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > before) {
            (m.apply)(tx)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                args![m.version, now_ms()],
            )?;
        }
        Ok(before)
    })
}

/// The version the catalog is at (0: never migrated).
pub(super) fn version(db: &Db) -> Result<i64, CatalogError> {
    let exists = match db.dialect() {
        Dialect::Sqlite => db.query_opt(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            &[],
        )?,
        Dialect::Postgres => db
            .query_opt("SELECT CAST(to_regclass('schema_migrations') AS TEXT)", &[])?
            .filter(|r| r.get::<Option<String>>(0).ok().flatten().is_some()),
    };
    if exists.is_none() {
        return Ok(0);
    }
    Ok(db
        .query_one(
            "SELECT CAST(MAX(version) AS BIGINT) FROM schema_migrations",
            &[],
        )?
        .get::<Option<i64>>(0)?
        .unwrap_or(0))
}

fn version_in(tx: &mut dyn Tx) -> Result<i64, CatalogError> {
    Ok(tx
        .query_one(
            "SELECT CAST(MAX(version) AS BIGINT) FROM schema_migrations",
            &[],
        )?
        .get::<Option<i64>>(0)?
        .unwrap_or(0))
}

/// Refuses a Postgres catalog this binary cannot use as it is.
pub(super) fn check(db: &Db, catalog: &str) -> Result<(), CatalogError> {
    let at = version(db)?;
    if at > LATEST {
        return Err(newer(catalog, at));
    }
    if at < LATEST {
        return Err(CatalogError::Schema(format!(
            "the catalog {catalog} is at schema version {at}, this binary needs {LATEST}: run `nullspace-pool-manager migrate --catalog {catalog}` first (once, from any host)"
        )));
    }
    Ok(())
}

/// The first version with the hosts table.
pub(super) const HOSTS_SINCE: i64 = 2;

/// For the host commands (`admin host list|drain|undrain`) only: any version with the
/// hosts table, newer ones too. A host's stop (a preStop hook, a unit's ExecStop) runs
/// the binary it is being replaced from, after the catalog was migrated for its
/// successor; its drain must still work.
pub(super) fn check_hosts(db: &Db, catalog: &str) -> Result<(), CatalogError> {
    let at = version(db)?;
    if at < HOSTS_SINCE {
        return Err(CatalogError::Schema(format!(
            "the catalog {catalog} is at schema version {at}, before hosts (version {HOSTS_SINCE}): run `nullspace-pool-manager migrate --catalog {catalog}` first"
        )));
    }
    Ok(())
}

fn newer(catalog: &str, at: i64) -> CatalogError {
    CatalogError::Schema(format!(
        "the catalog {catalog} is at schema version {at}, newer than this binary's {LATEST}: upgrade nullspace-pool-manager"
    ))
}

/// Version 1: the schema as the first release with migrations found it.
fn v1(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    match tx.dialect() {
        Dialect::Sqlite => {
            // IF NOT EXISTS: a catalog made before migrations has (some of) the tables,
            // perhaps without the columns added since; those come next.
            tx.batch(V1_SQLITE_TABLES)?;
            add_missing_sqlite_columns(tx)?;
            tx.batch(V1_SQLITE_INDEXES)
        }
        Dialect::Postgres => tx.batch(V1_POSTGRES),
    }
}

/// Version 2: the hosts of a cluster (registered, heartbeating), capacity reserved on
/// them for creates on their way, and which host owns each sandbox (a column the
/// record's `hostID` generates, indexed with the state) and each intent.
fn v2(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    let (int, owner) = match tx.dialect() {
        Dialect::Sqlite => (
            "INTEGER",
            "ALTER TABLE sandboxes ADD COLUMN host_id TEXT
             GENERATED ALWAYS AS (json_extract(record, '$.hostID')) VIRTUAL;",
        ),
        Dialect::Postgres => (
            "BIGINT",
            "ALTER TABLE sandboxes ADD COLUMN host_id TEXT
             GENERATED ALWAYS AS ((record::jsonb)->>'hostID') STORED;",
        ),
    };
    tx.batch(&format!(
        "CREATE TABLE hosts (
             id TEXT PRIMARY KEY,
             control_url TEXT NOT NULL,
             edge_url TEXT NOT NULL,
             preview_url TEXT NOT NULL,
             vcpus {int} NOT NULL,
             mem_mib {int} NOT NULL,
             disk_mib {int} NOT NULL,
             qemu TEXT NOT NULL,
             accel TEXT NOT NULL,
             image_set TEXT NOT NULL,
             state TEXT NOT NULL,
             warm TEXT NOT NULL,
             heartbeat_ms {int} NOT NULL,
             registered_ms {int} NOT NULL);
         CREATE TABLE reservations (
             id TEXT PRIMARY KEY,
             host_id TEXT NOT NULL,
             vcpus {int} NOT NULL,
             mem_mib {int} NOT NULL,
             disk_mib {int} NOT NULL,
             expires_ms {int} NOT NULL);
         CREATE INDEX reservations_host ON reservations (host_id, expires_ms);
         {owner}
         CREATE INDEX sandboxes_host_state ON sandboxes (host_id, state);
         ALTER TABLE intents ADD COLUMN host_id TEXT;
         ALTER TABLE snapshots ADD COLUMN host_id TEXT;"
    ))
}

/// Version 3: secrets every host of a cluster shares (the key runtime, preview and
/// proxy tokens are signed with: a token stays good when its sandbox moves host), and
/// each team's create-rate bucket, which hosts of a cluster take from together.
fn v3(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    tx.batch(
        "CREATE TABLE shared_secrets (
             name TEXT PRIMARY KEY,
             value TEXT NOT NULL);
         CREATE TABLE create_buckets (
             team_id TEXT PRIMARY KEY,
             millitokens BIGINT NOT NULL,
             at_ms BIGINT NOT NULL)",
    )
}

/// Version 4: names teams give snapshots (seed 002's `snapshotName` start source), one
/// snapshot per name and team; and each host's region, which placement honours.
fn v4(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    tx.batch(
        "CREATE TABLE snapshot_names (
             team_id TEXT NOT NULL,
             name TEXT NOT NULL,
             snapshot_id TEXT NOT NULL UNIQUE,
             sandbox_id TEXT NOT NULL,
             created_at BIGINT NOT NULL,
             PRIMARY KEY (team_id, name));
         ALTER TABLE hosts ADD COLUMN region TEXT",
    )
}

/// Version 5: each team's interception CA (the security proxy mints its leaves; every
/// host of a cluster uses the one stored), and each sandbox's audit of the requests its
/// guest made through the proxy (bounded per sandbox, pruned with the sandbox).
fn v5(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    tx.batch(
        "CREATE TABLE team_cas (
             team_id TEXT PRIMARY KEY,
             cert_pem TEXT NOT NULL,
             key_pem TEXT NOT NULL);
         CREATE TABLE audit_records (
             sandbox_id TEXT NOT NULL,
             seq BIGINT NOT NULL,
             at_ms BIGINT NOT NULL,
             record TEXT NOT NULL,
             PRIMARY KEY (sandbox_id, seq))",
    )
}

/// Version 6: which snapshot store each host uses, so that a drain moves a hibernated
/// sandbox only to a host that can read its snapshot.
fn v6(tx: &mut dyn Tx) -> Result<(), CatalogError> {
    tx.batch("ALTER TABLE hosts ADD COLUMN store TEXT")
}

/// Columns added after the first release, before there were migrations: a catalog
/// made by an older build gets them (SQLite has no ADD COLUMN IF NOT EXISTS).
fn add_missing_sqlite_columns(tx: &mut dyn Tx) -> Result<(), CatalogError> {
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
        let has = tx
            .query_one(
                &format!("SELECT COUNT(*) FROM pragma_table_xinfo('{table}') WHERE name = ?1"),
                args![column],
            )?
            .get::<i64>(0)?
            > 0;
        if !has {
            tx.batch(ddl)?;
        }
    }
    Ok(())
}

const V1_SQLITE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    role TEXT NOT NULL DEFAULT 'team',
    expires_at INTEGER);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    seq INTEGER NOT NULL UNIQUE,
    record TEXT NOT NULL,
    state TEXT GENERATED ALWAYS AS (json_extract(record, '$.state')) VIRTUAL);
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
    max_sandboxes INTEGER NOT NULL,
    limits TEXT);
CREATE TABLE IF NOT EXISTS stored_items (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    mib INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL,
    op TEXT NOT NULL,
    step TEXT NOT NULL,
    data TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL);";

const V1_SQLITE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS stored_items_team ON stored_items (team_id, kind);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes (state);
CREATE INDEX IF NOT EXISTS sandboxes_team_state ON sandboxes (team_id, state);";

/// Integers are BIGINT (what SQLite's INTEGER holds); records stay TEXT (the JSON as
/// serde wrote it), read as jsonb where a field is needed.
const V1_POSTGRES: &str = "
CREATE TABLE teams (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at BIGINT NOT NULL);
CREATE TABLE api_keys (
    key_hash TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    role TEXT NOT NULL DEFAULT 'team',
    expires_at BIGINT);
CREATE SEQUENCE sandboxes_seq;
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    seq BIGINT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    state TEXT GENERATED ALWAYS AS ((record::jsonb)->>'state') STORED);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    sandbox_id TEXT,
    template TEXT,
    dir TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    manifest TEXT NOT NULL);
CREATE TABLE events (
    sandbox_id TEXT NOT NULL,
    event_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, event_id));
CREATE TABLE warm_pools (
    template TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT,
    created_at BIGINT NOT NULL,
    record TEXT NOT NULL,
    UNIQUE (team_id, name));
CREATE TABLE build_logs (
    template_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    step BIGINT,
    stream TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (template_id, seq));
CREATE TABLE team_quotas (
    team_id TEXT PRIMARY KEY REFERENCES teams(id),
    max_sandboxes BIGINT NOT NULL,
    limits TEXT);
CREATE TABLE stored_items (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    mib BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, id));
CREATE TABLE intents (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    op TEXT NOT NULL,
    step TEXT NOT NULL,
    data TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL);
CREATE INDEX stored_items_team ON stored_items (team_id, kind);
CREATE INDEX sandboxes_state ON sandboxes (state);
CREATE INDEX sandboxes_team_state ON sandboxes (team_id, state);";
