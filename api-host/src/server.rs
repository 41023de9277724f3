//! The HTTP side: accept loop, limits, timeouts, graceful shutdown.

use crate::config::HostConfig;
use crate::runtime::ApiRuntime;
use api_model::ApiError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Bytes a body may run past the limit before the host cuts it: the component enforces
/// the exact limit itself (and answers 413), the host only bounds what a broken or
/// foreign component would read.
const LIMIT_SLACK: usize = 64 * 1024;

/// Largest oversized body the host reads (and discards) before answering 413.
const DRAIN_LIMIT: u64 = 16 << 20;

struct Shared {
    config: HostConfig,
    runtime: ApiRuntime,
    slots: Semaphore,
    /// Responses by status class (1xx..5xx) and requests in flight, for `/metrics`:
    /// shared by every thread serving one runtime (the pool manager runs several).
    counters: Arc<Counters>,
}

/// What `/metrics` reports, whichever thread served it.
#[derive(Default)]
pub struct Counters {
    served: [std::sync::atomic::AtomicU64; 5],
    in_flight: std::sync::atomic::AtomicI64,
}

impl Shared {
    /// Prometheus' text format: responses by status class, requests in flight.
    fn prometheus(&self) -> String {
        use std::sync::atomic::Ordering;
        let mut out = String::from("# HELP nullspace_api_responses_total Responses by status class.\n# TYPE nullspace_api_responses_total counter\n");
        for (i, n) in self.counters.served.iter().enumerate() {
            out.push_str(&format!(
                "nullspace_api_responses_total{{class=\"{}xx\"}} {}\n",
                i + 1,
                n.load(Ordering::Relaxed)
            ));
        }
        let (reused, created) = self.runtime.instance_counts();
        out.push_str(&format!("# HELP nullspace_api_instances_total Requests by the instance that served them: kept from the same API key's earlier request, or new.\n# TYPE nullspace_api_instances_total counter\nnullspace_api_instances_total{{instance=\"kept\"}} {reused}\nnullspace_api_instances_total{{instance=\"new\"}} {created}\n"));
        let in_flight = self.counters.in_flight.load(Ordering::Relaxed).max(0);
        out.push_str(&format!("# HELP nullspace_api_in_flight Requests being served.\n# TYPE nullspace_api_in_flight gauge\nnullspace_api_in_flight {in_flight}\n"));
        out
    }
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    config: HostConfig,
    runtime: ApiRuntime,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_counted(listener, config, runtime, Default::default(), shutdown).await
}

/// [`serve`], counting into `counters` (shared by the threads that serve one listener).
pub async fn serve_counted(
    listener: TcpListener,
    config: HostConfig,
    runtime: ApiRuntime,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        slots: Semaphore::new(config.max_concurrent as usize),
        counters,
        config,
        runtime,
    });
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&shared, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    info!("shutting down: no new connections; waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections closed"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => warn!("requests still running after {SHUTDOWN_GRACE:?}; stopping anyway"),
    }
    Ok(())
}

/// Whether a request waits on a VM (a boot, a restore, a snapshot written out): the
/// longer time limit.
fn waits_for_readiness(method: &http::Method, path: &str) -> bool {
    if method != http::Method::POST {
        return false;
    }
    let path = path.trim_end_matches('/');
    path == "/api/v1/sandboxes"
        || [
            "/connect",
            "/resume",
            "/pause",
            "/hibernate",
            "/snapshots",
            "/fork",
            "/restore",
        ]
        .iter()
        .any(|action| path.ends_with(action))
}

async fn handle(
    shared: &Shared,
    req: http::Request<Incoming>,
) -> http::Response<HyperOutgoingBody> {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::debug_span!("request", %method, %path);
    if method == http::Method::GET && path == "/metrics" {
        return http::Response::builder()
            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(
                Full::new(Bytes::from(shared.prometheus()))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .expect("a valid response");
    }
    let resp = async {
        let _in_flight = InFlight::count(&shared.counters);
        let Ok(_slot) = shared.slots.try_acquire() else {
            let mut resp = error(&ApiError::new(
                503,
                "overloaded",
                "the API is serving its maximum of concurrent requests; retry shortly",
            ));
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            return resp;
        };
        let limit = shared.config.max_body_bytes;
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(declared) = declared.filter(|l| *l > limit as u64) {
            // Most clients read no answer before they finished sending: take a moderately
            // large body in (and drop it) so they see the 413 instead of a broken pipe.
            if declared <= DRAIN_LIMIT {
                let drain = req.into_body().collect();
                let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
            }
            return error(&ApiError::too_large(limit));
        }
        let timeout = if waits_for_readiness(&method, &path) {
            shared.config.ready_timeout
        } else {
            shared.config.request_timeout
        };
        let req = req.map(|body| {
            Limited::new(body, limit + LIMIT_SLACK)
                .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))
                .boxed_unsync()
        });
        match tokio::time::timeout(timeout, shared.runtime.handle(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                warn!(error = format!("{e:#}"), "request failed in the component");
                error(&ApiError::internal(
                    "the API component failed on this request; see the api-host log",
                ))
            }
            Err(_) => error(&ApiError::new(
                504,
                "timeout",
                format!(
                    "the request took longer than {} s; check the sandbox's state with GET, then retry",
                    timeout.as_secs()
                ),
            )),
        }
    }
    .instrument(span)
    .await;
    debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "served");
    if let Some(n) = shared
        .counters
        .served
        .get((resp.status().as_u16() / 100).saturating_sub(1) as usize)
    {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    resp
}

/// One request in flight, counted while it lives.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn count(counters: &'a Counters) -> Self {
        counters
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A JSON error response made by the host itself.
fn error(e: &ApiError) -> http::Response<HyperOutgoingBody> {
    let body = Bytes::from(serde_json::to_vec(&e.body()).unwrap_or_default());
    http::Response::builder()
        .status(e.status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_wait_on_a_vm_get_the_longer_limit() {
        let post = http::Method::POST;
        assert!(waits_for_readiness(&post, "/api/v1/sandboxes"));
        assert!(waits_for_readiness(
            &post,
            "/api/v1/sandboxes/sbx-1/connect"
        ));
        assert!(waits_for_readiness(
            &post,
            "/api/v1/sandboxes/sbx-1/resume/"
        ));
        assert!(waits_for_readiness(&post, "/api/v1/sandboxes/restore"));
        assert!(waits_for_readiness(
            &post,
            "/api/v1/sandboxes/sbx-1/snapshots"
        ));
        assert!(!waits_for_readiness(
            &post,
            "/api/v1/sandboxes/sbx-1/refreshes"
        ));
        assert!(!waits_for_readiness(
            &http::Method::GET,
            "/api/v1/sandboxes/sbx-1/snapshots"
        ));
        assert!(!waits_for_readiness(
            &http::Method::GET,
            "/api/v1/sandboxes"
        ));
    }
}
