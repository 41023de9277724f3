//! The SQLite backend: one file in the state dir (WAL, synchronous=FULL), one
//! connection behind a mutex, which serializes every statement of this process.

use super::sql::{Dialect, Row, Tx, Value};
use super::{CatalogError, Durability};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// An open SQLite catalog file.
pub(crate) struct SqliteDb {
    conn: Mutex<Connection>,
}

impl SqliteDb {
    /// Opens (creating if needed) the database at `path`, synced on every commit.
    pub(crate) fn open(path: &Path) -> Result<Self, CatalogError> {
        let conn = Connection::open(path)?;
        // Every team's records (environment variables included): the daemon's alone, not
        // readable by a guest that escaped into its QEMU. SQLite gives its WAL and shared
        // memory files the database's mode.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;",
        )?;
        // Every statement the catalog runs is prepared once per connection.
        conn.set_prepared_statement_cache_capacity(128);
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The connection. A panic elsewhere while it was held leaves nothing half done
    /// (an open transaction rolls back when dropped): poisoning is not a reason to stop.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one statement.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, CatalogError> {
        Conn(&self.conn()).execute(sql, params)
    }

    /// Runs one query.
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError> {
        Conn(&self.conn()).query(sql, params)
    }

    /// Runs `f` in one transaction, begun IMMEDIATE: it holds the write lock from its
    /// first statement, so another process on the same file (an admin command) waits
    /// for it instead of failing when a read-then-write transaction upgrades.
    pub(crate) fn transaction<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut conn = self.conn();
        let relaxed = durability == Durability::UntilPowerLoss;
        if relaxed {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let result = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&mut Conn(&tx))?;
            tx.commit()?;
            Ok(out)
        })();
        if relaxed {
            conn.pragma_update(None, "synchronous", "FULL")?;
        }
        result
    }
}

/// Statements on a connection (or a transaction on it).
struct Conn<'a>(&'a Connection);

impl Tx for Conn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, CatalogError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(columns);
            for i in 0..columns {
                row.push(value_of(r.get_ref(i)?)?);
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<(), CatalogError> {
        Ok(self.0.execute_batch(sql)?)
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ToSqlOutput;
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// A column as a [`Value`]. The catalog stores no floating-point numbers or blobs; a
/// real is what SQLite makes of a JSON number with a fraction, kept when it is whole.
fn value_of(v: ValueRef<'_>) -> Result<Value, CatalogError> {
    match v {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(n) => Ok(Value::Int(n)),
        ValueRef::Real(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Ok(Value::Int(f as i64)),
        ValueRef::Text(t) => Ok(Value::Text(
            std::str::from_utf8(t)
                .map_err(|e| CatalogError::Decode(format!("text that is not UTF-8: {e}")))?
                .to_string(),
        )),
        other => Err(CatalogError::Decode(format!(
            "a {:?} value where the catalog keeps integers and text",
            other.data_type()
        ))),
    }
}
