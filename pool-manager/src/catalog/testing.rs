//! Catalogs for the unit tests: SQLite always, and PostgreSQL too when
//! `NULLSPACE_TEST_POSTGRES` holds a server's URL (`deploy/postgres.sh start DIR`
//! prints one), so the same assertions cover both backends. Each test gets a database
//! of its own, dropped when it ends, passed or not.

use super::{Catalog, Location};
use std::path::{Path, PathBuf};

/// The environment variable naming the test server.
const POSTGRES_ENV: &str = "NULLSPACE_TEST_POSTGRES";

/// A catalog for one test, and what it lives in.
pub(crate) struct TestCatalog {
    // Declared (so dropped) before the database it is connected to.
    catalog: Catalog,
    location: Location,
    /// Held to be dropped (with the database) after the catalog.
    _postgres: Option<PgDatabase>,
    dir: PathBuf,
}

impl TestCatalog {
    /// `sqlite` or `postgres`, for assertion messages.
    pub(crate) fn name(&self) -> &'static str {
        match self.location {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgres",
        }
    }

    /// The catalog.
    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Where it is.
    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// A second catalog on the same database (what a restart opens).
    pub(crate) fn reopen(&self) -> Catalog {
        Catalog::open_location(&self.location).unwrap()
    }

    /// A scratch directory of the test's own.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCatalog {
    fn drop(&mut self) {
        // The database (if any) goes after this, and after the catalog's connections:
        // fields drop in the order they are declared.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "catalog-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A catalog of every backend there is to test: SQLite, and PostgreSQL if configured.
pub(crate) fn backends() -> Vec<TestCatalog> {
    let mut all = vec![sqlite()];
    all.extend(postgres());
    all
}

/// A SQLite catalog in a fresh directory.
pub(crate) fn sqlite() -> TestCatalog {
    let dir = scratch("sqlite");
    let location = Location::Sqlite(dir.join("catalog.db"));
    TestCatalog {
        catalog: Catalog::open_location(&location).unwrap(),
        location,
        _postgres: None,
        dir,
    }
}

/// A migrated PostgreSQL catalog in a fresh database, if a server is configured.
pub(crate) fn postgres() -> Option<TestCatalog> {
    let db = PgDatabase::create()?;
    let location = Location::Postgres(db.url.clone());
    Catalog::migrate(&location).unwrap();
    Some(TestCatalog {
        catalog: Catalog::open_location(&location).unwrap(),
        location,
        _postgres: Some(db),
        dir: scratch("postgres"),
    })
}

/// A database of its own on the test server, dropped with this.
pub(crate) struct PgDatabase {
    admin_url: String,
    name: String,
    /// Its URL.
    pub(crate) url: String,
}

impl PgDatabase {
    /// A fresh, empty database; `None` (with a line saying so) where no server is
    /// configured.
    pub(crate) fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var(POSTGRES_ENV) else {
            // A run that promised a server (deploy/test.sh) fails instead of skipping.
            if std::env::var_os("NULLSPACE_TEST_REQUIRE_POSTGRES").is_some_and(|v| v == "1") {
                panic!("{POSTGRES_ENV} is not set, and NULLSPACE_TEST_REQUIRE_POSTGRES=1 says this run must test PostgreSQL");
            }
            eprintln!("{POSTGRES_ENV} is not set: testing the SQLite catalog only (deploy/postgres.sh start DIR prints a URL for it)");
            return None;
        };
        let name = format!(
            "nullspace_test_{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        if let Err(e) = admin(&admin_url, &format!("CREATE DATABASE {name}")) {
            panic!("{POSTGRES_ENV}: {e}");
        }
        Some(Self {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        })
    }
}

impl PgDatabase {
    /// Runs `sql` on the test server as its administrator (statements that may not
    /// run in a transaction too, e.g. `ALTER SYSTEM`).
    pub(crate) fn admin(&self, sql: &str) -> Result<(), String> {
        admin(&self.admin_url, sql)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Never a panic here: this runs while a failed test unwinds too.
        if let Err(e) = admin(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("dropping the test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database replaced by `database`.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{database}{query}")
}

/// Runs `sql` on the test server, on a thread of its own (callers may be inside a
/// runtime, where another cannot block).
fn admin(url: &str, sql: &str) -> Result<(), String> {
    let (url, statement) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let sql = statement;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connecting to {url}: {e}"))?;
            let driver = tokio::spawn(connection);
            let done = client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{sql}: {e}"));
            drop(client);
            let _ = driver.await;
            done
        })
    })
    .join()
    .unwrap_or_else(|_| Err(format!("{sql}: its thread panicked")))
}
