//! The wasm side: one engine with the pooling allocator, the component compiled and
//! pre-instantiated once, and a fresh instance in a fresh store for every request.

use crate::upstream::Upstream;
use anyhow::Context as _;
use http_body_util::BodyExt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How often running guests yield to other tasks (epoch tick).
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most linear memory one instance may have (each pool slot reserves this much).
const MAX_MEMORY_BYTES: usize = 64 << 20;

/// The state of one request's store.
pub struct RequestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    upstream: Upstream,
    memory: MemoryPeak,
}

/// The largest linear memory the instance asked for: an instance that grew big is not
/// kept (kept instances are not reset, so what they hold stays resident).
#[derive(Default)]
struct MemoryPeak(usize);

impl wasmtime::ResourceLimiter for MemoryPeak {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.0 = self.0.max(desired);
        Ok(desired <= MAX_MEMORY_BYTES)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

/// The largest declared body the host collects before it answers (see
/// [`ApiRuntime::handle`]); larger ones (recordings) are streamed as written.
const MAX_WHOLE_BODY: usize = 256 << 10;

/// The most memory an instance may have grown to and still be kept.
const MAX_KEPT_MEMORY: usize = 8 << 20;

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.upstream,
        }
    }
}

/// The compiled component, ready to instantiate (a clone shares the engine, the
/// compiled code and the instance pool).
#[derive(Clone)]
pub struct ApiRuntime {
    pre: ProxyPre<RequestState>,
    upstream: Upstream,
    idle: IdleInstances,
}

/// How many finished instances are kept for their caller's next request, in all.
const MAX_IDLE: usize = 16;

/// How many requests one instance serves before it is dropped (bounds what a slow leak
/// in the guest could grow to).
const MAX_REUSES: u32 = 1000;

/// An instance that finished a request without a fault, kept for the next request of
/// the same API key.
struct Idle {
    key: String,
    store: Store<RequestState>,
    proxy: Proxy,
    served: u32,
}

/// Finished instances by caller, the most recently used last. An instance only ever
/// serves requests with one API key: whatever a request leaves in its memory (the key,
/// the pool manager's answers) is that caller's own, never another team's.
#[derive(Clone, Default)]
struct IdleInstances(std::sync::Arc<IdleShared>);

#[derive(Default)]
struct IdleShared {
    idle: std::sync::Mutex<std::collections::VecDeque<Idle>>,
    /// Requests served by a kept instance, and by a new one.
    reused: std::sync::atomic::AtomicU64,
    created: std::sync::atomic::AtomicU64,
}

impl IdleInstances {
    /// The instance kept for `key` (any key, or none, counts as a request served).
    fn take(&self, key: Option<&str>) -> Option<Idle> {
        use std::sync::atomic::Ordering::Relaxed;
        let taken = key.and_then(|key| {
            let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter()
                .rposition(|i| i.key == key)
                .and_then(|at| idle.remove(at))
        });
        match taken {
            Some(_) => self.0.reused.fetch_add(1, Relaxed),
            None => self.0.created.fetch_add(1, Relaxed),
        };
        taken
    }

    fn put(&self, instance: Idle) {
        if instance.served >= MAX_REUSES {
            return drop_later(instance);
        }
        let evicted = {
            let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push_back(instance);
            (idle.len() > MAX_IDLE).then(|| idle.pop_front()).flatten()
        };
        if let Some(old) = evicted {
            drop_later(old);
        }
    }
}

/// Drops `value` (a store: its instance goes back to the pool, its memory reset) in a
/// task of its own, after the response at hand has gone out rather than before.
fn drop_later<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move { drop(value) });
        }
        Err(_) => drop(value),
    }
}

/// The API key a request carries, by the component's and the pool manager's rules
/// (`X-API-Key`, else `Authorization: Bearer`; the issued shape only): an instance is
/// kept only for a key that can be one.
fn caller_key(headers: &http::HeaderMap) -> Option<String> {
    api_model::api_key(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .ok()
        .map(str::to_string)
}

impl ApiRuntime {
    /// Compiles `component` for an engine sized for `max_concurrent` requests at once
    /// (and the idle instances kept beside them).
    pub fn load(component: &Path, max_concurrent: u32, upstream: Upstream) -> anyhow::Result<Self> {
        let instances = max_concurrent + MAX_IDLE as u32;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 4)
            .total_memories(instances * 2)
            .total_tables(instances * 2)
            .max_memory_size(MAX_MEMORY_BYTES)
            // Resetting the first pages with memset instead of madvise saves re-faulting
            // them on every request. The component's stack (128 KiB) and data sit there.
            .linear_memory_keep_resident(512 << 10)
            .table_keep_resident(64 << 10)
            // Only the pages a request dirtied are reset (PAGEMAP_SCAN, Linux 6.7+;
            // older kernels reset the whole kept-resident prefix, as before).
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            // Bounds checks in the guest's code instead of guard pages: without
            // virtual-memory tricks a recycled memory slot keeps its read/write pages,
            // where guard pages cost an mprotect on every instantiation and every
            // memory.grow (a fifth of the host's time per request, measured).
            .signals_based_traps(false)
            .memory_guard_size(0)
            .memory_reservation(MAX_MEMORY_BYTES as u64)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let bytes = std::fs::read(component)
            .with_context(|| format!("reading the component {}", component.display()))?;
        let component = Component::new(&engine, &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                "{} is not a component this host can run (build it with deploy/build-component.sh)",
                component.display()
            )
            })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        let pre = ProxyPre::new(linker.instantiate_pre(&component)?)
            .map_err(anyhow::Error::from)
            .context("the component does not export wasi:http/incoming-handler")?;

        // Epoch ticks let a long-running guest yield instead of holding a thread.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Self {
            pre,
            upstream,
            idle: IdleInstances::default(),
        })
    }

    /// Requests served so far by an instance kept from the same caller's earlier one,
    /// and by a new instance.
    pub fn instance_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.idle.0.reused.load(Relaxed),
            self.idle.0.created.load(Relaxed),
        )
    }

    /// Runs one request, in an instance its caller's last request left or a new one;
    /// resolves to the component's response.
    pub async fn handle(
        &self,
        request: http::Request<wasmtime_wasi_http::p2::body::HyperIncomingBody>,
    ) -> anyhow::Result<http::Response<HyperOutgoingBody>> {
        let key = caller_key(request.headers());
        let kept = self.idle.take(key.as_deref());
        let (mut store, proxy, served) = match kept {
            Some(idle) => (idle.store, Some(idle.proxy), idle.served),
            None => (
                Store::new(
                    self.pre.engine(),
                    RequestState {
                        wasi: WasiCtx::builder().inherit_stderr().build(),
                        http: WasiHttpCtx::new(),
                        table: ResourceTable::new(),
                        upstream: self.upstream.clone(),
                        memory: MemoryPeak::default(),
                    },
                ),
                None,
                0,
            ),
        };
        store.limiter(|state| &mut state.memory);
        store.epoch_deadline_async_yield_and_update(1);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = self.pre.clone();
        let guest: GuestFuture = Box::pin(async move {
            let proxy = match proxy {
                Some(proxy) => proxy,
                None => pre.instantiate_async(&mut store).await?,
            };
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await?;
            Ok((store, proxy))
        });
        let guest = Guest {
            future: guest,
            key,
            served,
            idle: self.idle.clone(),
            keep: true,
        };
        // The guest runs on this task, not a spawned one: a hop between threads costs
        // more than the whole guest on this kind of machine. Until it answers it is
        // driven here; after that the response body drives it (it may still be
        // writing the body).
        let mut guest = Some(guest);
        let mut receiver = receiver;
        let outcome = tokio::select! {
            biased;
            answer = &mut receiver => answer,
            done = &mut guest.as_mut().unwrap().future => {
                let answer = receiver.try_recv();
                let mut finished = guest.take().unwrap();
                // A guest that ended without answering is not kept.
                finished.keep = answer.is_ok();
                let done = finished.finish(done);
                match answer {
                    Ok(answer) => Ok(answer),
                    Err(_) => {
                        let why = match done {
                            Ok(()) => anyhow::anyhow!("the component never set a response"),
                            Err(e) => e.context("the component failed"),
                        };
                        return Err(why);
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(resp)) => {
                // An instance that refused the key or failed is not kept: a refused
                // key is nobody's, and a failure may have left it in any state.
                let status = resp.status();
                if let Some(g) = guest.as_mut() {
                    g.keep = status != http::StatusCode::UNAUTHORIZED && !status.is_server_error();
                }
                let small = resp
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|len| len <= MAX_WHOLE_BODY);
                let (parts, body) = resp.into_parts();
                let body = GuestDrivenBody { guest, body };
                if !small {
                    return Ok(http::Response::from_parts(parts, body.boxed_unsync()));
                }
                // A small answer (every JSON one) goes out whole: the component sets its
                // response before it writes the body, and a head sent before its body
                // is a second write, and a second wake-up of the client. Collecting it
                // also lets the instance go back before the response is sent.
                let whole = body
                    .collect()
                    .await
                    .context("the component failed while writing its response")?
                    .to_bytes();
                Ok(http::Response::from_parts(
                    parts,
                    http_body_util::Full::new(whole)
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                ))
            }
            Ok(Err(code)) => Err(anyhow::anyhow!("the component answered an error: {code:?}")),
            Err(_) => Err(anyhow::anyhow!("the component dropped its response")),
        }
    }
}

type GuestFuture =
    Pin<Box<dyn Future<Output = wasmtime::Result<(Store<RequestState>, Proxy)>> + Send>>;

/// A request's guest: its future, and where its instance goes when it is done.
struct Guest {
    future: GuestFuture,
    key: Option<String>,
    served: u32,
    idle: IdleInstances,
    /// Whether its instance may be kept once it is done (it answered, and not with a
    /// refusal of the key or a failure).
    keep: bool,
}

impl Guest {
    /// Keeps the instance of a guest that finished without a fault for its caller's
    /// next request (or drops it after the response); says how the guest ended.
    fn finish(self, done: wasmtime::Result<(Store<RequestState>, Proxy)>) -> anyhow::Result<()> {
        match (done, self.key) {
            // Kept only if it left nothing behind: no resource still open (a body's
            // writer there would hold a response open), no memory grown past a few MiB.
            (Ok((store, proxy)), Some(key))
                if self.keep
                    && store.data().table.is_empty()
                    && store.data().memory.0 <= MAX_KEPT_MEMORY =>
            {
                self.idle.put(Idle {
                    key,
                    store,
                    proxy,
                    served: self.served + 1,
                });
                Ok(())
            }
            (Ok(instance), _) => {
                drop_later(instance);
                Ok(())
            }
            (Err(e), _) => Err(anyhow::Error::from(e)),
        }
    }
}

/// A response body that also drives the guest that writes it, to completion.
struct GuestDrivenBody {
    guest: Option<Guest>,
    body: HyperOutgoingBody,
}

impl http_body::Body for GuestDrivenBody {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(guest) = self.guest.as_mut() {
            if let Poll::Ready(done) = guest.future.as_mut().poll(cx) {
                if let Err(e) = self.guest.take().unwrap().finish(done) {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "the component failed after answering"
                    );
                }
            }
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.guest.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::caller_key;

    #[test]
    fn an_instance_is_kept_only_for_a_key_of_the_issued_shape() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let key = "ns_0123456789abcdef0123456789abcdef";
        let other = "ns_fedcba9876543210fedcba9876543210";
        assert_eq!(
            caller_key(&headers(&[("x-api-key", key)])).as_deref(),
            Some(key)
        );
        let bearer = format!("Bearer {key}");
        assert_eq!(
            caller_key(&headers(&[("authorization", &bearer)])).as_deref(),
            Some(key)
        );
        // X-API-Key wins, as in the component and the pool manager.
        let bearer_other = format!("Bearer {other}");
        assert_eq!(
            caller_key(&headers(&[
                ("x-api-key", key),
                ("authorization", &bearer_other)
            ]))
            .as_deref(),
            Some(key)
        );
        for bad in [
            vec![],
            vec![("x-api-key", "")],
            vec![("x-api-key", "ns_short")],
            vec![("x-api-key", "ns_0123456789ABCDEF0123456789ABCDEF")],
            vec![("authorization", "Basic abc")],
        ] {
            assert_eq!(caller_key(&headers(&bad)), None, "{bad:?}");
        }
    }
}
