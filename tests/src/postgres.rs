//! A PostgreSQL server for the tests that need one (`NULLSPACE_TEST_POSTGRES`, set by
//! deploy/test.sh): fresh databases, and the pool manager's commands against them.

/// The test server's URL, or a message saying how to get one.
/// Where the run promised a server (`NULLSPACE_TEST_REQUIRE_POSTGRES=1`, as
/// deploy/test.sh does), its absence fails the test instead of skipping it.
pub fn server() -> Result<String, String> {
    std::env::var("NULLSPACE_TEST_POSTGRES").map_err(|_| {
        let why = "NULLSPACE_TEST_POSTGRES is not set (deploy/test.sh sets it; by hand: deploy/postgres.sh start DIR, and export the URL it prints)";
        if std::env::var_os("NULLSPACE_TEST_REQUIRE_POSTGRES").is_some_and(|v| v == "1") {
            panic!("{why}; NULLSPACE_TEST_REQUIRE_POSTGRES=1 says this run must test PostgreSQL");
        }
        why.to_string()
    })
}

/// A database of its own on the test server, dropped (with its sessions) afterwards.
pub struct FreshDatabase {
    server: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl FreshDatabase {
    /// A new database `nullspace_e2e_<tag>_<pid>` on `server`.
    pub async fn create(server: &str, tag: &str) -> Self {
        let name = format!("nullspace_e2e_{tag}_{}", std::process::id());
        admin(
            server,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await;
        admin(server, &format!("CREATE DATABASE {name}")).await;
        Self {
            server: server.to_string(),
            url: with_database(server, &name),
            name,
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        // On a thread of its own: this runs inside the test's runtime.
        let (server, sql) = (
            self.server.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin(&server, &sql))
        })
        .join();
    }
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{database}{query}")
}

/// Runs `sql` on `server`.
pub async fn admin(server: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to NULLSPACE_TEST_POSTGRES ({server}): {e}"));
    let driver = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = driver.await;
}

/// Runs `nullspace-pool-manager ARGS`; returns its stdout, or its stderr as the error.
pub fn pool_manager(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(crate::workspace_binary("nullspace-pool-manager"))
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A PostgreSQL server a bench started itself (deploy/postgres.sh): stopped, and its
/// directory removed, when dropped, or from the panic hook (release builds abort on
/// panic: no drop runs).
pub struct OwnPostgres {
    script: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl OwnPostgres {
    /// The suite's server if `NULLSPACE_TEST_POSTGRES` names one, else one of its own on
    /// `port`; with its URL.
    pub fn or_suites(port: &str) -> anyhow::Result<(Option<Self>, String)> {
        if let Ok(url) = std::env::var("NULLSPACE_TEST_POSTGRES") {
            return Ok((None, url));
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres.sh");
        let dir = std::env::temp_dir().join(format!("bench-pg-{}", std::process::id()));
        let out = std::process::Command::new(&script)
            .arg("start")
            .arg(&dir)
            .arg(port)
            .output()?;
        let own = Self { script, dir };
        anyhow::ensure!(
            out.status.success(),
            "deploy/postgres.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (script, dir) = (own.script.clone(), own.dir.clone());
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            stop_postgres(&script, &dir);
        }));
        let url = String::from_utf8(out.stdout)?.trim().to_string();
        eprintln!("PostgreSQL of this run: {url}");
        Ok((Some(own), url))
    }
}

fn stop_postgres(script: &std::path::Path, dir: &std::path::Path) {
    let _ = std::process::Command::new(script)
        .arg("stop")
        .arg(dir)
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        stop_postgres(&self.script, &self.dir);
    }
}
