//! `nullspace-api`: serves the public API component over HTTP.
//!
//! ```text
//! nullspace-api --component FILE.wasm [--listen 127.0.0.1:7080] [--pool-manager http://127.0.0.1:7070 | unix:/PATH]
//!     [--max-body-bytes 1048576] [--request-timeout-s 60] [--ready-timeout-s 300] [--max-concurrent 256]
//!     [--threads 1] [--config FILE]
//! ```
//!
//! `--help` describes each flag (`config.rs`). Every flag is also read from `NULLSPACE_`
//! and its name in upper snake case (`--pool-manager`: `NULLSPACE_POOL_MANAGER`,
//! `--component`: `NULLSPACE_COMPONENT`), and from the TOML file `--config FILE`
//! (`NULLSPACE_CONFIG`) names, keyed by the flags' names (`pool-manager =
//! "http://10.0.0.5:7070"`); the command line wins over the environment, which wins over
//! the file (the pool manager's rules: `pool-manager/src/layered.rs`, shared).
//!
//! Prints `public API http://ADDR` on stderr once it listens; SIGINT or SIGTERM stop it
//! gracefully.

use api_host::{config, runtime, server, upstream};

/// mimalloc: glibc's malloc was a tenth of the time per public-API request (bench-api).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    // anyhow captures a backtrace for every error it makes when RUST_BACKTRACE is set,
    // and wasi:http makes errors on ordinary paths (a body stream's end): that costs more
    // than the request. Panics keep their backtraces.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    // Before the log: `--help` and a mistake in the flags print clap's text and exit.
    let config = match config::HostConfig::load(std::env::args_os(), |name| std::env::var_os(name))
    {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut rt = if config.threads <= 1 {
        // One thread: no wake-ups across CPUs between the connection, the guest and the
        // upstream client, which on a 2-core host is faster than two threads.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.threads);
        b
    };
    rt.enable_all().build()?.block_on(run(config))
}

async fn run(config: config::HostConfig) -> anyhow::Result<()> {
    let upstream = upstream::Upstream::new(&config.pool_manager, 64);
    let started = std::time::Instant::now();
    let runtime = runtime::ApiRuntime::load(&config.component, config.max_concurrent, upstream)?;
    tracing::info!(
        component = %config.component.display(),
        compile_ms = started.elapsed().as_millis() as u64,
        "component ready"
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    // Listened for before the line that says the host is up: a SIGTERM sent as soon as
    // a supervisor (or a test) reads it would otherwise be taken by tokio's handler
    // before any stream hears it, and be lost.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    eprintln!(
        "public API http://{} (pool manager {})",
        listener.local_addr()?,
        config.pool_manager
    );
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
    };
    server::serve(listener, config, runtime, shutdown).await
}
