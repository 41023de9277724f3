//! Crash points for the kill -9 tests.
//!
//! A multi-step operation calls [`hit`] with a name between its steps (after each
//! effect that outlives the process: a file, a catalog row, an object in the store, a
//! VM stopped). In a debug build two environment variables, read once, act on it:
//!
//! - `NULLSPACE_TEST_FAILPOINT_LOG=FILE`: each name reached is appended to `FILE`, one
//!   per line (how a test learns which points an operation passes through);
//! - `NULLSPACE_TEST_FAILPOINT=NAME`: the process sends itself `SIGKILL` the first
//!   time `NAME` is reached, exactly what `kill -9` at that step does.
//!
//! A release build compiles [`hit`] to nothing and never reads the variables. It is a
//! few lines rather than the `fail` crate: the one action wanted (the process gone at
//! once, nothing unwound or flushed) is not one of that crate's, and its points are
//! compiled in by a cargo feature, which the workspace's test build would unify into
//! the shipped binary.

#[cfg(debug_assertions)]
mod armed {
    use std::io::Write;
    use std::sync::OnceLock;

    struct Config {
        kill_at: Option<String>,
        log: Option<std::sync::Mutex<std::fs::File>>,
    }

    fn config() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| Config {
            kill_at: std::env::var("NULLSPACE_TEST_FAILPOINT")
                .ok()
                .filter(|v| !v.is_empty()),
            log: std::env::var_os("NULLSPACE_TEST_FAILPOINT_LOG").and_then(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .ok()
                    .map(std::sync::Mutex::new)
            }),
        })
    }

    pub fn hit(name: &'static str) {
        let config = config();
        if let Some(log) = &config.log {
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(file, "{name}");
        }
        if config.kill_at.as_deref() == Some(name) {
            eprintln!("failpoint {name}: SIGKILL (NULLSPACE_TEST_FAILPOINT)");
            // SAFETY: kill and getpid have no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            // SIGKILL cannot be caught; the process ends before this returns.
            loop {
                std::thread::park();
            }
        }
    }
}

/// Marks the point `name` of a multi-step operation (`op.step`, unique across the
/// code). A debug build may log it or die there (see the crate docs); a release build
/// does nothing.
#[inline(always)]
pub fn hit(name: &'static str) {
    #[cfg(debug_assertions)]
    armed::hit(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}
