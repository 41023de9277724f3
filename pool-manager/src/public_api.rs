//! The public API served by this process (`--public-listen ADDR --public-component FILE`):
//! the same API component and host as `nullspace-api`, with the component's outbound
//! calls dispatched straight into this daemon's control routes.
//!
//! On one host this is the cheap way to run the public API: a separate API process costs
//! each request a second round trip between processes, and on a small VM each wake-up
//! of a process on the other CPU is ~40 µs (measured with `bench-api`: about the
//! component's own work). For the same reason the listener runs on threads of its own,
//! each a single-threaded runtime: a request, its wasm instance and a read-only route
//! stay on one thread, where the daemon's multi-threaded runtime would wake another CPU
//! for each of the tasks wasi:http spawns. Routes that change things run on the daemon's
//! runtime, as they do from the control listener (what they start outlives the request).
//! Clusters keep `nullspace-api` as a tier of its own.

use crate::sandboxes::Manager;
use anyhow::Context as _;
use api_host::config::HostConfig;
use api_host::runtime::ApiRuntime;
use api_host::upstream::{Dispatch, Upstream};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use wasmtime_wasi_http::Error as WasiHttpError;

/// The public API, compiled and bound, ready to serve.
pub struct PublicApi {
    listener: std::net::TcpListener,
    config: HostConfig,
    runtime: ApiRuntime,
    threads: usize,
}

impl PublicApi {
    /// Compiles `component` and binds `listen`, to be served by `threads` threads; the
    /// host's limits are `nullspace-api`'s defaults, `--max-concurrent` shared out among
    /// the threads.
    pub fn bind(
        manager: Arc<Manager>,
        listen: &str,
        component: &Path,
        threads: usize,
    ) -> anyhow::Result<Self> {
        let args: [&std::ffi::OsStr; 5] = [
            "nullspace-api".as_ref(),
            "--component".as_ref(),
            component.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
        ];
        let mut config = HostConfig::load(args, |_| None)
            .map_err(|e| anyhow::anyhow!("--public-listen / --public-component: {e}"))?;
        let main = tokio::runtime::Handle::current();
        let upstream = Upstream::in_process(dispatch(crate::api::router(manager), main));
        let runtime = ApiRuntime::load(component, config.max_concurrent, upstream)
            .with_context(|| format!("--public-component {}", component.display()))?;
        let listener = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("binding --public-listen {listen}"))?;
        listener.set_nonblocking(true)?;
        // Each thread serves at most its share: together never more than the pool holds.
        config.max_concurrent = (config.max_concurrent / threads as u32).max(1);
        Ok(Self {
            listener,
            config,
            runtime,
            threads,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` turns true, then lets in-flight requests finish; returns when
    /// every thread has.
    pub async fn serve(self, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut done = Vec::new();
        let counters = Arc::new(api_host::server::Counters::default());
        for i in 0..self.threads {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let listener = self.listener.try_clone()?;
            let (config, runtime, mut stop, counters) = (
                self.config.clone(),
                self.runtime.clone(),
                stop.clone(),
                counters.clone(),
            );
            std::thread::Builder::new()
                .name(format!("public-api-{i}"))
                .spawn(move || {
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|rt| {
                            rt.block_on(async move {
                                let listener = tokio::net::TcpListener::from_std(listener)?;
                                let shutdown = async move {
                                    let _ = stop.wait_for(|s| *s).await;
                                };
                                api_host::server::serve_counted(
                                    listener, config, runtime, counters, shutdown,
                                )
                                .await
                            })
                        });
                    let _ = tx.send(served);
                })?;
            done.push(rx);
        }
        for rx in done {
            rx.await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a public API thread ended abnormally")))?;
        }
        Ok(())
    }
}

/// Whether a request is one of the cheap catalog reads that run on the listener's own
/// thread: a sandbox, a page of them, a sandbox's events. Everything else (a VM, S3,
/// another host, a change) runs on the daemon's runtime, whose tasks and connections
/// outlive the request and whose threads may block.
fn runs_inline(method: &http::Method, path: &str) -> bool {
    if *method != http::Method::GET {
        return false;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(
        segments.as_slice(),
        ["v1", "health"]
            | ["v1", "sandboxes"]
            | ["v1", "sandboxes", _]
            | ["v1", "sandboxes", _, "events"]
    )
}

/// The control routes as the component's upstream: [`runs_inline`] reads on the
/// caller's thread, anything else on the daemon's runtime, as from its own listener.
fn dispatch(router: axum::Router, main: tokio::runtime::Handle) -> Dispatch {
    Arc::new(
        move |request: http::Request<wasmtime_wasi_http::WasiBody>| {
            let router = router.clone();
            let read = runs_inline(request.method(), request.uri().path());
            let main = main.clone();
            Box::pin(async move {
                // The body is read here, on the thread the component writes it from:
                // read on the daemon's runtime, each piece the component wrote would
                // wake a thread on the other CPU, and the component's next write would
                // wait for it.
                let request = whole_body(request).await?;
                if read {
                    return Ok(route(router, request).await);
                }
                main.spawn(route(router, request)).await.map_err(|e| {
                    WasiHttpError::InternalError(Some(format!("the route ended abnormally: {e}")))
                })
            })
        },
    )
}

/// The request with its body read whole, as a socket would have taken it: a route that
/// never reads its body (pause, resume) would otherwise drop it while the component is
/// still writing it, and the component sees its request fail (StreamError::Closed).
/// Bodies are small: the host and the component cap them at 1 MiB.
async fn whole_body(
    request: http::Request<wasmtime_wasi_http::WasiBody>,
) -> Result<http::Request<axum::body::Body>, WasiHttpError> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| WasiHttpError::InternalError(Some(format!("reading the request body: {e}"))))?
        .to_bytes();
    Ok(http::Request::from_parts(
        parts,
        axum::body::Body::from(body),
    ))
}

/// Runs `request` through the control routes.
async fn route(
    mut router: axum::Router,
    request: http::Request<axum::body::Body>,
) -> http::Response<wasmtime_wasi_http::WasiBody> {
    let response = tower_service::Service::call(&mut router, request)
        .await
        .unwrap_or_else(|never| match never {});
    response.map(|body| {
        body.map_err(|e| WasiHttpError::InternalError(Some(e.to_string())))
            .boxed_unsync()
    })
}

#[cfg(test)]
mod tests {
    use super::runs_inline;

    #[test]
    fn only_cheap_catalog_reads_run_on_the_listener_thread() {
        let get = http::Method::GET;
        for path in [
            "/v1/health",
            "/v1/sandboxes",
            "/v1/sandboxes/sbx-1",
            "/v1/sandboxes/sbx-1/events",
        ] {
            assert!(runs_inline(&get, path), "{path}");
        }
        for path in [
            "/v1/sandboxes/sbx-1/metrics",
            "/v1/sandboxes/sbx-1/recordings",
            "/v1/sandboxes/sbx-1/logs",
            "/v1/templates",
            "/v1/snapshots",
        ] {
            assert!(!runs_inline(&get, path), "{path}");
        }
        assert!(!runs_inline(&http::Method::POST, "/v1/sandboxes"));
        assert!(!runs_inline(&http::Method::DELETE, "/v1/sandboxes/sbx-1"));
        assert!(!runs_inline(&http::Method::HEAD, "/v1/sandboxes"));
    }
}
