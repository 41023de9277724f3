//! A small portable SQL layer over the catalog's two backends (SQLite, PostgreSQL):
//! values, rows, one interface for statements and transactions, and the few places
//! where the two dialects write the same thing differently.
//!
//! Statements are written once, with `?1`-style placeholders; the Postgres backend
//! sends them as `$1`. Integers are `BIGINT` on Postgres (SQLite's `INTEGER`), and a
//! sum is cast back to one (Postgres sums `BIGINT`s into `NUMERIC`), so every number
//! read is an `i64` on both.

use super::{CatalogError, Durability};
use std::borrow::Cow;

/// A value sent to or read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer (`INTEGER` on SQLite, `BIGINT` on Postgres).
    Int(i64),
    /// Text.
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of a statement: `args![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::catalog::sql::Value::from($v)),*] as &[$crate::catalog::sql::Value]
    };
}
pub(crate) use args;

/// One row of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Row(pub(crate) Vec<Value>);

impl Row {
    /// Column `i` as a `T`; a missing column or one of another type is an error (a
    /// catalog written by something else), never a panic.
    pub(crate) fn get<T: FromValue>(&self, i: usize) -> Result<T, CatalogError> {
        let v = self.0.get(i).ok_or_else(|| {
            CatalogError::Decode(format!("no column {i} in a row of {}", self.0.len()))
        })?;
        T::from_value(v).map_err(|expected| {
            CatalogError::Decode(format!("column {i}: expected {expected}, found {v:?}"))
        })
    }
}

/// A Rust type a column converts to.
pub(crate) trait FromValue: Sized {
    /// The value as this type, or what was expected.
    fn from_value(v: &Value) -> Result<Self, &'static str>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Int(n) => Ok(*n),
            _ => Err("an integer"),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err("text"),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl FromValue for u32 {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Int(n) => u32::try_from(*n).map_err(|_| "an integer from 0 to 2^32-1"),
            _ => Err("an integer"),
        }
    }
}

/// The SQL dialect of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL (a catalog shared by a cluster).
    Postgres,
}

impl Dialect {
    /// `sql` with its `?N` placeholders as this dialect writes them: as they are for
    /// SQLite, `$N` for Postgres. Quoted literals and identifiers are left alone.
    pub(crate) fn placeholders(self, sql: &str) -> Cow<'_, str> {
        if self == Dialect::Sqlite || !sql.contains('?') {
            return Cow::Borrowed(sql);
        }
        let mut out = String::with_capacity(sql.len());
        let mut quote: Option<char> = None;
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                    out.push(c);
                }
                None if c == '\'' || c == '"' => {
                    quote = Some(c);
                    out.push(c);
                }
                None if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) => {
                    out.push('$');
                }
                None => out.push(c),
            }
        }
        Cow::Owned(out)
    }

    /// The text at `path` in the JSON document in `column` (object keys; `-1` is an
    /// array's last element); `NULL` where there is none.
    pub(crate) fn json_text(self, column: &str, path: &[&str]) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({column}, '{}')", sqlite_path(path)),
            Dialect::Postgres => {
                let mut expr = format!("(CAST({column} AS jsonb))");
                for (i, seg) in path.iter().enumerate() {
                    let arrow = if i + 1 == path.len() { "->>" } else { "->" };
                    if *seg == "-1" {
                        // Spaced: Postgres would read `->-1` as one operator.
                        expr.push_str(&format!("{arrow} -1"));
                    } else {
                        expr.push_str(&format!("{arrow}'{seg}'"));
                    }
                }
                expr
            }
        }
    }

    /// The database's own clock in milliseconds since the epoch: hosts that share a
    /// catalog compare heartbeats and expiries on one clock, never each their own.
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The integer at `path` in the JSON document in `column`.
    pub(crate) fn json_int(self, column: &str, path: &[&str]) -> String {
        match self {
            Dialect::Sqlite => self.json_text(column, path),
            Dialect::Postgres => format!("CAST({} AS BIGINT)", self.json_text(column, path)),
        }
    }

    /// The JSON document in `column` with each top-level `(key, N)` of `fields` set to
    /// the integer parameter `?N`.
    pub(crate) fn json_set_ints(self, column: &str, fields: &[(&str, usize)]) -> String {
        match self {
            Dialect::Sqlite => {
                let mut expr = format!("json_set({column}");
                for (key, n) in fields {
                    expr.push_str(&format!(", '$.{key}', ?{n}"));
                }
                expr.push(')');
                expr
            }
            Dialect::Postgres => {
                let mut expr = format!("CAST({column} AS jsonb)");
                for (key, n) in fields {
                    expr =
                        format!("jsonb_set({expr}, '{{{key}}}', to_jsonb(CAST(?{n} AS BIGINT)))");
                }
                format!("CAST({expr} AS TEXT)")
            }
        }
    }

    /// The JSON object in `column` with the keys of the object in parameter `?N`
    /// merged in (a key of the parameter replaces the same key of the column).
    pub(crate) fn json_merge(self, column: &str, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("json_patch({column}, ?{n})"),
            // `||` merges the top level, which is what intents record (steps add keys);
            // json_patch would also merge nested objects and drop keys set to null.
            Dialect::Postgres => {
                format!("CAST(CAST({column} AS jsonb) || CAST(?{n} AS jsonb) AS TEXT)")
            }
        }
    }

    /// The position a new sandbox row gets (`seq`): one more than the highest on
    /// SQLite, whose writes one connection serializes; a sequence on Postgres, where
    /// hosts and pooled connections insert at once.
    pub(crate) fn next_sandbox_seq(self) -> &'static str {
        match self {
            Dialect::Sqlite => "(SELECT COALESCE(MAX(seq), 0) + 1 FROM sandboxes)",
            Dialect::Postgres => "nextval('sandboxes_seq')",
        }
    }
}

/// A JSON path in SQLite's syntax (`$.a.b[#-1]`).
fn sqlite_path(path: &[&str]) -> String {
    let mut p = String::from("$");
    for seg in path {
        if *seg == "-1" {
            p.push_str("[#-1]");
        } else {
            p.push('.');
            p.push_str(seg);
        }
    }
    p
}

/// Statements on one connection: a transaction's, or one statement's own.
pub(crate) trait Tx {
    /// The dialect the statements are in.
    fn dialect(&self) -> Dialect;

    /// Runs a statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, CatalogError>;

    /// Runs a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError>;

    /// Runs statements without parameters (schema changes), separated by `;`.
    fn batch(&mut self, sql: &str) -> Result<(), CatalogError>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, CatalogError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a query that always has one (an aggregate).
    fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, CatalogError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| CatalogError::Decode(format!("no row from {}", excerpt(sql))))
    }

    /// Holds back every other transaction that locks `key` in `scope` until this one
    /// ends: what makes "read the highest number, write the next" safe where several
    /// connections write at once (Postgres: an advisory lock). On SQLite one connection
    /// already serializes every write: nothing to do.
    fn lock(&mut self, scope: &str, key: &str) -> Result<(), CatalogError> {
        match self.dialect() {
            Dialect::Sqlite => Ok(()),
            Dialect::Postgres => self
                .execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(?1, 0))",
                    args![format!("{scope}:{key}")],
                )
                .map(drop),
        }
    }
}

/// The start of a statement, for error messages.
pub(crate) fn excerpt(sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(80) {
        Some((at, _)) => format!("`{}…`", &one_line[..at]),
        None => format!("`{one_line}`"),
    }
}

/// The catalog's database: SQLite or PostgreSQL.
pub(crate) enum Db {
    /// An embedded SQLite file.
    Sqlite(super::sqlite::SqliteDb),
    /// A PostgreSQL database, through a pool.
    Postgres(super::postgres::PgDb),
}

impl Db {
    /// The dialect its statements are written in.
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs one statement on its own; returns how many rows it changed.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, CatalogError> {
        match self {
            Db::Sqlite(db) => db.execute(sql, params),
            Db::Postgres(db) => db.execute(sql, params),
        }
    }

    /// Runs one query on its own; returns its rows.
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError> {
        match self {
            Db::Sqlite(db) => db.query(sql, params),
            Db::Postgres(db) => db.query(sql, params),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn query_opt(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Row>, CatalogError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a query that always has one (an aggregate).
    pub(crate) fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, CatalogError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| CatalogError::Decode(format!("no row from {}", excerpt(sql))))
    }

    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back if not.
    /// With [`Durability::UntilPowerLoss`] the commit is not synced to disk.
    pub(crate) fn transaction<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        match self {
            Db::Sqlite(db) => db.transaction(durability, f),
            Db::Postgres(db) => db.transaction(durability, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes_on_postgres_only() {
        let sql = "SELECT '?1', \"a?2\" FROM t WHERE a = ?1 AND b = ?12 AND c ? 'x'";
        assert_eq!(Dialect::Sqlite.placeholders(sql), sql);
        assert_eq!(
            Dialect::Postgres.placeholders(sql),
            "SELECT '?1', \"a?2\" FROM t WHERE a = $1 AND b = $12 AND c ? 'x'"
        );
    }

    #[test]
    fn json_paths_in_both_dialects() {
        assert_eq!(
            Dialect::Sqlite.json_text("record", &["timeline", "-1", "at"]),
            "json_extract(record, '$.timeline[#-1].at')"
        );
        assert_eq!(
            Dialect::Postgres.json_text("record", &["timeline", "-1", "at"]),
            "(CAST(record AS jsonb))->'timeline'-> -1->>'at'"
        );
        assert_eq!(
            Dialect::Postgres.json_set_ints("record", &[("a", 2)]),
            "CAST(jsonb_set(CAST(record AS jsonb), '{a}', to_jsonb(CAST(?2 AS BIGINT))) AS TEXT)"
        );
    }

    #[test]
    fn rows_convert_or_say_what_they_found() {
        let row = Row(vec![Value::Int(5), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.get::<i64>(0).unwrap(), 5);
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        assert!(row.get::<String>(0).is_err());
        assert!(row.get::<i64>(3).is_err());
        let big = Row(vec![Value::Int(-1)]);
        assert!(big.get::<u32>(0).is_err());
    }
}
