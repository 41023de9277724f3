//! The PostgreSQL backend: a catalog that several hosts share, through a pool of
//! connections (tokio-postgres, deadpool-postgres).
//!
//! The catalog's API is synchronous (the daemon calls it everywhere, inside and outside
//! async code), the driver asynchronous. The bridge: the backend owns a small runtime
//! of its own (two worker threads) that runs the pool, its connections and every query;
//! a call spawns its query there and waits on a channel. A caller on a worker thread of
//! a multi-thread runtime waits inside `block_in_place` (its other tasks move to
//! another thread meanwhile); on a current-thread runtime that is not allowed, and the
//! wait blocks that runtime's one thread, which is still safe: the query runs on the
//! backend's own threads. Every wait has a deadline: a database that stops answering
//! is an error naming the catalog, never a hang.

use super::sql::{excerpt, Dialect, Row, Tx, Value};
use super::{CatalogError, Durability};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};

/// How long one call waits for the database (a statement, a pooled connection), unless
/// told otherwise.
const DEADLINE: Duration = Duration::from_secs(30);

/// Connections per host: the daemon's concurrent catalog calls, and no more than a
/// shared server should give one host.
const POOL_SIZE: usize = 16;

/// A PostgreSQL catalog.
pub(crate) struct PgDb {
    /// Runs the pool and every query; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// The URL without its password, for messages.
    name: String,
    /// How long one call waits.
    deadline: Duration,
    /// Where it connects and how (for the listener's connection of its own).
    config: Box<(tokio_postgres::Config, Tls)>,
}

impl PgDb {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`,
    /// or `postgresql://`), checking that it answers.
    pub(crate) fn connect(url: &str) -> Result<Self, CatalogError> {
        Self::connect_with_deadline(url, DEADLINE)
    }

    /// [`PgDb::connect`], each call waiting up to `deadline`.
    pub(crate) fn connect_with_deadline(
        url: &str,
        deadline: Duration,
    ) -> Result<Self, CatalogError> {
        let name = redact(url);
        let unavailable = |message: String| CatalogError::Unavailable {
            catalog: name.clone(),
            message,
        };
        let (url, root_cert) = split_root_cert(url);
        // libpq's verifying modes are what the driver calls `require` (it verifies
        // whatever the connector does: ours always verifies).
        let url = url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            unavailable(format!(
                "not a PostgreSQL URL ({e}); send postgres://USER@HOST:PORT/DATABASE[?sslmode=require[&sslrootcert=FILE]]"
            ))
        })?;
        let tls = Tls::for_url(&url, root_cert.as_deref()).map_err(unavailable)?;
        if matches!(tls, Tls::Verified(_)) {
            // Never the driver's default `prefer`, which goes on in the clear when the
            // server (or whoever is in the path) declines TLS.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(deadline.min(Duration::from_secs(10)));
        }
        if config.get_application_name().is_none() {
            config.application_name("nullspace-pool-manager");
        }
        // A server (or a link) that vanishes without a word is noticed by TCP
        // keepalives, not only when the next statement's deadline passes.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("catalog-postgres")
            .enable_all()
            .build()
            .map_err(|e| unavailable(format!("starting its runtime: {e}")))?;
        let manager_config = ManagerConfig {
            // A connection goes back to the pool only between transactions (see
            // `PgTx`): checking that it is open is enough.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Plain => {
                Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config)
            }
            Tls::Verified(connect) => {
                Manager::from_config(config.clone(), connect.clone(), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(deadline))
            .create_timeout(Some(deadline))
            .recycle_timeout(Some(deadline))
            .build()
            .map_err(|e| unavailable(format!("making its connection pool: {e}")))?;
        let db = Self {
            runtime: Some(runtime),
            pool,
            name,
            deadline,
            config: Box::new((config, tls)),
        };
        db.query("SELECT 1", &[])?;
        Ok(db)
    }

    /// Follows `NOTIFY channel` from every host on a connection of its own, for as long
    /// as the catalog is open: `on(Some(payload))` per notification, `on(None)` when
    /// notifications may have been missed (at first, and after each reconnect, since a
    /// broken connection loses what was sent meanwhile). A lost connection is made
    /// again with a growing delay; a silent one is found by a probe every
    /// [`LISTEN_PROBE_EVERY`].
    pub(crate) fn listen(
        &self,
        channel: &'static str,
        on: impl Fn(Option<String>) + Send + Sync + 'static,
    ) {
        let Some(runtime) = self.runtime.as_ref() else {
            return;
        };
        let (mut config, tls) = (*self.config).clone();
        // Told apart from the pool's connections in pg_stat_activity.
        config.application_name(LISTENER_APPLICATION);
        let name = self.name.clone();
        runtime.spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                // Followers are told to re-read only once listening again (in
                // `listen_once`): not on every failed try while the database is away.
                match listen_once(&config, &tls, channel, &on).await {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(catalog = %name, error = %e, "event notifications: reconnecting")
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// The URL without its password.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn error(&self, context: &str, error: tokio_postgres::Error) -> CatalogError {
        CatalogError::Postgres {
            catalog: self.name.clone(),
            context: context.to_string(),
            error,
        }
    }

    fn unavailable(&self, message: String) -> CatalogError {
        CatalogError::Unavailable {
            catalog: self.name.clone(),
            message,
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it, up to the deadline.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, CatalogError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| self.unavailable("the catalog is closing".into()))?;
        let (tx, rx) = mpsc::sync_channel(1);
        runtime.spawn(async move {
            // Nobody waits any more (the deadline passed): the result is dropped.
            let _ = tx.send(fut.await);
        });
        wait(|| rx.recv_timeout(self.deadline)).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                self.unavailable(format!("no answer within {:?} while {what}", self.deadline))
            }
            mpsc::RecvTimeoutError::Disconnected => {
                self.unavailable(format!("its runtime stopped while {what}"))
            }
        })
    }

    /// A connection from the pool.
    fn connection(&self) -> Result<Object, CatalogError> {
        let pool = self.pool.clone();
        let got = self.run("waiting for a connection", async move { pool.get().await })?;
        got.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, e: deadpool_postgres::PoolError) -> CatalogError {
        match e {
            deadpool_postgres::PoolError::Backend(source) => self.error("connecting", source),
            other => self.unavailable(format!("getting a connection: {other}")),
        }
    }

    /// Runs one statement on a pooled connection.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, CatalogError> {
        let (pool, sql_pg, params) = self.prepare(sql, params);
        let result = self.run("running a statement", async move {
            let client = pool.get().await.map_err(Failure::Pool)?;
            execute_on(&client, &sql_pg, &params)
                .await
                .map_err(Failure::Db)
        })?;
        result.map_err(|f| self.failure(f, sql))
    }

    /// Runs one query on a pooled connection.
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError> {
        let (pool, sql_pg, params) = self.prepare(sql, params);
        let result = self.run("running a query", async move {
            let client = pool.get().await.map_err(Failure::Pool)?;
            query_on(&client, &sql_pg, &params)
                .await
                .map_err(Failure::Db)
        })?;
        result.map_err(|f| self.failure(f, sql))
    }

    fn prepare(&self, sql: &str, params: &[Value]) -> (Pool, String, Vec<Value>) {
        (
            self.pool.clone(),
            Dialect::Postgres.placeholders(sql).into_owned(),
            params.to_vec(),
        )
    }

    fn failure(&self, f: Failure, sql: &str) -> CatalogError {
        match f {
            Failure::Pool(e) => self.pool_error(e),
            Failure::Db(e) => self.error(&format!("running {}", excerpt(sql)), e),
        }
    }

    /// Runs `f` in one transaction on one pooled connection.
    pub(crate) fn transaction<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut tx = PgTx {
            db: self,
            conn: Some(self.connection()?),
        };
        tx.batch("BEGIN")?;
        if durability == Durability::UntilPowerLoss {
            // Committed without waiting for the WAL to reach the disk: it survives this
            // process crashing, not the database server's host losing power.
            tx.batch("SET LOCAL synchronous_commit = off")?;
        }
        match f(&mut tx) {
            Ok(out) => {
                tx.batch("COMMIT")?;
                tx.release();
                Ok(out)
            }
            Err(e) => {
                if tx.batch("ROLLBACK").is_ok() {
                    tx.release();
                }
                Err(e)
            }
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime blocks until its threads end, which a thread of a
            // current-thread runtime may not do; it lets go of them there instead.
            match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread => {
                    runtime.shutdown_background()
                }
                _ => wait(|| runtime.shutdown_timeout(Duration::from_secs(5))),
            }
        }
    }
}

/// The `application_name` of a catalog's listening connection.
pub(crate) const LISTENER_APPLICATION: &str = "nullspace-pool-manager-listen";

/// How often an idle listening connection is checked with a statement.
const LISTEN_PROBE_EVERY: Duration = Duration::from_secs(15);

/// One listening connection, until it breaks: `Ok` if it had been listening (so the
/// next one starts over quickly), the error if it never got there.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &Tls,
    channel: &str,
    on: &(impl Fn(Option<String>) + Send + Sync),
) -> Result<(), String> {
    let (notes, mut notified) = tokio::sync::mpsc::unbounded_channel();
    // The connection is driven by a task of its own; notifications arrive as its
    // messages.
    let (client, driver) = match tls {
        Tls::Plain => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| describe(&e))?;
            (client, tokio::spawn(drive(connection, notes)))
        }
        Tls::Verified(connect) => {
            let (client, connection) = config
                .connect(connect.clone())
                .await
                .map_err(|e| describe(&e))?;
            (client, tokio::spawn(drive(connection, notes)))
        }
    };
    let listening = async {
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| describe(&e))?;
        // Whatever was sent before this connection listened is found by re-reading.
        on(None);
        loop {
            tokio::select! {
                got = notified.recv() => match got {
                    Some(payload) => on(Some(payload)),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(LISTEN_PROBE_EVERY) => {
                    let probe = tokio::time::timeout(DEADLINE, client.simple_query("SELECT 1")).await;
                    if !matches!(probe, Ok(Ok(_))) {
                        return Ok(());
                    }
                }
            }
        }
    };
    let out = listening.await;
    driver.abort();
    out
}

/// Drives a listening connection, sending each notification's payload on.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notes: tokio::sync::mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if notes.send(n.payload().to_string()).is_err() {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

/// How connections to the catalog are made.
#[derive(Clone)]
enum Tls {
    /// In the clear: the URL asks for no TLS (no `sslmode`, or `sslmode=disable`).
    Plain,
    /// TLS with the server's certificate verified (its name too) against the
    /// system's roots and the URL's `sslrootcert`, whatever `sslmode` other than
    /// `disable` the URL names: stricter than libpq's `require`, which checks nothing,
    /// since a catalog's traffic carries every team's keys and records.
    Verified(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    fn for_url(url: &str, root_cert: Option<&str>) -> Result<Self, String> {
        let mode = url
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("sslmode="));
        match (mode, root_cert) {
            (None | Some("disable"), None) => return Ok(Tls::Plain),
            (Some("disable"), Some(_)) => {
                return Err("sslmode=disable with an sslrootcert: send sslmode=require to use TLS, or drop sslrootcert".into())
            }
            _ => {}
        }
        let mut roots = rustls::RootCertStore::empty();
        // The system's roots: a managed database's certificate is usually under one.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(file) = root_cert {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert={file}: {e}; send a PEM file of the CA (or server) certificate"))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert={file}: no certificate in it; send a PEM file of the CA (or server) certificate"));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert={file}: {e}"))?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("setting up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Verified(
            tokio_postgres_rustls::MakeRustlsConnect::new(config),
        ))
    }
}

/// `url` without its `sslrootcert=FILE` parameter (libpq's, which the driver does
/// not know), and that file.
fn split_root_cert(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut root_cert = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("sslrootcert=") {
            Some(file) => {
                root_cert = Some(file.to_string());
                false
            }
            None => true,
        })
        .collect();
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, root_cert)
}

/// Runs `f`, which blocks, where the caller is: inside `block_in_place` on a worker of
/// a multi-thread runtime (never on a current-thread one, where it panics).
fn wait<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Why a statement on a pooled connection failed.
enum Failure {
    Pool(deadpool_postgres::PoolError),
    Db(tokio_postgres::Error),
}

async fn execute_on(
    client: &deadpool_postgres::ClientWrapper,
    sql: &str,
    params: &[Value],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client.prepare_cached(sql).await?;
    client.execute(&stmt, &refs(params)).await
}

async fn query_on(
    client: &deadpool_postgres::ClientWrapper,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(sql).await?;
    let rows = client.query(&stmt, &refs(params)).await?;
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.try_get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()
                .map(Row)
        })
        .collect()
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// A transaction's connection. Between statements the connection is here; during one,
/// on the runtime. One that is not given back after `COMMIT` or `ROLLBACK` (an error,
/// a deadline passed, a panic) is closed, not pooled: its transaction may still be
/// open, and the server rolls it back when the connection ends.
struct PgTx<'a> {
    db: &'a PgDb,
    conn: Option<Object>,
}

impl PgTx<'_> {
    /// Runs `op` with the connection on the runtime, and takes it back.
    fn step<T: Send + 'static, Fut>(
        &mut self,
        what: &str,
        sql: &str,
        op: impl FnOnce(Object) -> Fut,
    ) -> Result<T, CatalogError>
    where
        Fut: Future<Output = (Object, Result<T, tokio_postgres::Error>)> + Send + 'static,
    {
        let conn = self.conn.take().ok_or_else(|| {
            self.db.unavailable(format!(
                "the connection of a transaction was lost before {what}"
            ))
        })?;
        let runtime = self
            .db
            .runtime
            .as_ref()
            .ok_or_else(|| self.db.unavailable("the catalog is closing".into()))?;
        let (tx, rx) = mpsc::sync_channel(1);
        let fut = op(conn);
        runtime.spawn(async move {
            let (conn, result) = fut.await;
            // Unclaimed (the caller gave up on it, even just as it was sent), the
            // connection is closed, never back in the pool mid-transaction.
            let _ = tx.send((Unpooled(Some(conn)), result));
        });
        match wait(|| rx.recv_timeout(self.db.deadline)) {
            Ok((mut conn, result)) => {
                self.conn = conn.0.take();
                result.map_err(|e| self.db.error(&format!("running {}", excerpt(sql)), e))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.db.unavailable(format!(
                "no answer within {:?} while {what}",
                self.db.deadline
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self
                .db
                .unavailable(format!("its runtime stopped while {what}"))),
        }
    }

    /// The transaction ended: the connection goes back to the pool.
    fn release(&mut self) {
        self.conn = None;
    }
}

/// A transaction's connection on its way back to the caller: closed if dropped before
/// the caller takes it (see [`PgTx::step`]).
struct Unpooled(Option<Object>);

impl Drop for Unpooled {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        // Still here: the transaction did not end cleanly (`release` takes it).
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}

impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, CatalogError> {
        let sql_pg = Dialect::Postgres.placeholders(sql).into_owned();
        let params = params.to_vec();
        self.step("running a statement", sql, move |conn| async move {
            let result = execute_on(&conn, &sql_pg, &params).await;
            (conn, result)
        })
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, CatalogError> {
        let sql_pg = Dialect::Postgres.placeholders(sql).into_owned();
        let params = params.to_vec();
        self.step("running a query", sql, move |conn| async move {
            let result = query_on(&conn, &sql_pg, &params).await;
            (conn, result)
        })
    }

    fn batch(&mut self, sql: &str) -> Result<(), CatalogError> {
        let sql_owned = sql.to_string();
        self.step("running statements", sql, move |conn| async move {
            let result = conn.batch_execute(&sql_owned).await;
            (conn, result)
        })
    }
}

/// `url` without the password in its user part, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A driver error in words: the server's message (with its detail and hint), or the
/// driver's with the causes it wraps (a refused connection, a timeout).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string();
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Whether a Postgres error is an integrity constraint's (SQLSTATE class 23: a
/// unique key, a foreign key, NOT NULL).
pub(crate) fn is_constraint_violation(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("23"))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // The server infers each parameter's type from the statement; a value is sent
        // as whichever of the catalog's types it meets.
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    n.to_string().as_str().to_sql(&Type::TEXT, out)
                }
                _ => Err(format!("cannot send an integer as {ty}").into()),
            },
            Value::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    s.as_str().to_sql(&Type::TEXT, out)
                }
                Type::JSON => {
                    out.extend_from_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSONB => {
                    // jsonb's binary format: a version byte, then the text.
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                _ => Err(format!("cannot send text as {ty}").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`, which knows the value.
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        match *ty {
            Type::INT8 => Ok(Value::Int(i64::from_sql(ty, raw)?)),
            Type::INT4 => Ok(Value::Int(i64::from(i32::from_sql(ty, raw)?))),
            Type::INT2 => Ok(Value::Int(i64::from(i16::from_sql(ty, raw)?))),
            Type::BOOL => Ok(Value::Int(i64::from(bool::from_sql(ty, raw)?))),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Ok(Value::Text(<&str>::from_sql(&Type::TEXT, raw)?.to_string()))
            }
            Type::JSON => Ok(Value::Text(std::str::from_utf8(raw)?.to_string())),
            Type::JSONB => match raw.split_first() {
                Some((1, text)) => Ok(Value::Text(std::str::from_utf8(text)?.to_string())),
                _ => Err("a jsonb value of an unknown format version".into()),
            },
            _ => Err(format!(
                "a column of type {ty}, where the catalog reads integers and text (cast it in the query)"
            )
            .into()),
        }
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sql::args;
    use std::time::Instant;

    #[test]
    fn a_server_that_never_answers_is_an_error_in_time() {
        // Accepts connections, says nothing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "postgres://postgres@{}/none",
            listener.local_addr().unwrap()
        );
        listener.set_nonblocking(true).unwrap();
        let held = std::thread::spawn(move || {
            let mut open = Vec::new();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                match listener.accept() {
                    Ok((s, _)) => open.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let t = Instant::now();
        let e = match PgDb::connect_with_deadline(&url, Duration::from_millis(500)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("connected to a server that never answered"),
        };
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(
            e.contains("127.0.0.1"),
            "the message names the catalog: {e}"
        );
        drop(held);
    }

    #[test]
    fn a_statement_past_its_deadline_fails_and_leaves_no_open_transaction() {
        let Some(db) = crate::catalog::testing::PgDatabase::create() else {
            return;
        };
        let pg = PgDb::connect_with_deadline(&db.url, Duration::from_millis(500)).unwrap();
        let t = Instant::now();
        let e = pg
            .transaction(Durability::Synced, |tx| {
                tx.execute("CREATE TABLE t (n BIGINT)", &[])?;
                tx.query("SELECT 1 FROM pg_sleep(2)", &[])
            })
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(matches!(e, CatalogError::Unavailable { .. }), "{e}");
        // The pool still serves; the abandoned transaction was closed, not pooled, and
        // rolled back.
        std::thread::sleep(Duration::from_millis(2500));
        let open: i64 = pg
            .query(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                &[],
            )
            .unwrap()[0]
            .get(0)
            .unwrap();
        assert_eq!(open, 0);
        let tables = pg
            .query("SELECT CAST(to_regclass('t') AS TEXT)", args![])
            .unwrap();
        assert_eq!(tables[0].get::<Option<String>>(0).unwrap(), None);
    }

    /// Turns TLS on in the test server with a certificate for 127.0.0.1 (made here),
    /// and off again when dropped.
    struct ServerTls<'a> {
        db: &'a crate::catalog::testing::PgDatabase,
        /// The CA's certificate (PEM), for `sslrootcert`.
        cert: std::path::PathBuf,
        dir: std::path::PathBuf,
    }

    impl<'a> ServerTls<'a> {
        fn on(db: &'a crate::catalog::testing::PgDatabase, data_dir: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("pg-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            let ca = dir.join("ca.crt");
            std::fs::write(
                dir.join("ext"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
            )
            .unwrap();
            // A CA, and the server's certificate for 127.0.0.1 under it.
            let script = format!(
                "set -e; cd {}; \
                 openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=nullspace-test-ca -keyout ca.key -out ca.crt; \
                 openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr; \
                 openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext -out server.crt",
                dir.display()
            );
            let made = std::process::Command::new("sh")
                .args(["-c", &script])
                .output()
                .expect("openssl");
            assert!(made.status.success(), "{made:?}");
            // The server reads them as its own user, the key private to it.
            let uid = String::from_utf8(
                std::process::Command::new("id")
                    .args(["-u", "postgres"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap();
            let uid: u32 = uid.trim().parse().unwrap();
            for (from, name, mode) in [
                (&cert, "nullspace-test.crt", 0o644),
                (&key, "nullspace-test.key", 0o600),
            ] {
                let to = std::path::Path::new(data_dir).join(name);
                std::fs::copy(from, &to).unwrap();
                std::os::unix::fs::chown(&to, Some(uid), None).unwrap();
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            db.admin("ALTER SYSTEM SET ssl_cert_file = 'nullspace-test.crt'")
                .unwrap();
            db.admin("ALTER SYSTEM SET ssl_key_file = 'nullspace-test.key'")
                .unwrap();
            db.admin("ALTER SYSTEM SET ssl = on").unwrap();
            db.admin("SELECT pg_reload_conf()").unwrap();
            Self { db, cert: ca, dir }
        }
    }

    impl Drop for ServerTls<'_> {
        fn drop(&mut self) {
            for setting in ["ssl", "ssl_cert_file", "ssl_key_file"] {
                let _ = self.db.admin(&format!("ALTER SYSTEM RESET {setting}"));
            }
            let _ = self.db.admin("SELECT pg_reload_conf()");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn tls_to_the_catalog_verifies_the_servers_certificate() {
        let Some(db) = crate::catalog::testing::PgDatabase::create() else {
            return;
        };
        let plain = PgDb::connect(&db.url).unwrap();
        let data_dir: String = plain.query("SHOW data_directory", &[]).unwrap()[0]
            .get(0)
            .unwrap();
        let tls = ServerTls::on(&db, &data_dir);
        let trusted = format!(
            "{}?sslmode=require&sslrootcert={}",
            db.url,
            tls.cert.display()
        );
        // The reload takes effect soon after it is asked for.
        let deadline = Instant::now() + Duration::from_secs(10);
        let pg = loop {
            match PgDb::connect_with_deadline(&trusted, Duration::from_secs(5)) {
                Ok(pg) => break pg,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("TLS with the server's certificate trusted: {e}"),
            }
        };
        let encrypted: String = pg
            .query(
                "SELECT CAST(ssl AS TEXT) FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()[0]
            .get(0)
            .unwrap();
        assert_eq!(encrypted, "true");
        // libpq's verifying mode names the same.
        let full = trusted.replace("sslmode=require", "sslmode=verify-full");
        PgDb::connect_with_deadline(&full, Duration::from_secs(5)).unwrap();
        // A certificate nobody vouches for is refused, not used.
        let untrusted = format!("{}?sslmode=require", db.url);
        let e = PgDb::connect_with_deadline(&untrusted, Duration::from_secs(5))
            .err()
            .expect("an unverified server certificate is refused")
            .to_string();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        // A root certificate that is not one says so.
        let bad = format!("{}?sslmode=require&sslrootcert=/etc/hostname", db.url);
        let e = PgDb::connect(&bad).err().expect("refused").to_string();
        assert!(e.contains("sslrootcert=/etc/hostname"), "{e}");
        // And the clear stays the default.
        drop(pg);
        plain.query("SELECT 1", &[]).unwrap();
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://ns:s3cret@db.example:5432/catalog?sslmode=disable"),
            "postgres://ns:***@db.example:5432/catalog?sslmode=disable"
        );
        assert_eq!(
            redact("postgresql://postgres@127.0.0.1:19543/postgres"),
            "postgresql://postgres@127.0.0.1:19543/postgres"
        );
    }
}
