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
use wasmtime_wasi_http::p2::bindings::ProxyPre;
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
}

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
}

impl ApiRuntime {
    /// Compiles `component` for an engine sized for `max_concurrent` live instances.
    pub fn load(component: &Path, max_concurrent: u32, upstream: Upstream) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(max_concurrent)
            .total_core_instances(max_concurrent * 4)
            .total_memories(max_concurrent * 2)
            .total_tables(max_concurrent * 2)
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
        Ok(Self { pre, upstream })
    }

    /// Runs one request in a new instance; resolves to the component's response.
    pub async fn handle(
        &self,
        request: http::Request<wasmtime_wasi_http::p2::body::HyperIncomingBody>,
    ) -> anyhow::Result<http::Response<HyperOutgoingBody>> {
        let mut store = Store::new(
            self.pre.engine(),
            RequestState {
                wasi: WasiCtx::builder().inherit_stderr().build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                upstream: self.upstream.clone(),
            },
        );
        store.epoch_deadline_async_yield_and_update(1);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = self.pre.clone();
        let guest: GuestFuture = Box::pin(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        });
        // The guest runs on this task, not a spawned one: a hop between threads costs
        // more than the whole guest on this kind of machine. Until it answers it is
        // driven here; after that the response body drives it (it may still be
        // writing the body).
        let mut guest = Some(guest);
        let mut receiver = receiver;
        let outcome = tokio::select! {
            biased;
            answer = &mut receiver => answer,
            done = guest.as_mut().unwrap() => {
                retire(guest.take());
                match receiver.try_recv() {
                    Ok(answer) => Ok(answer),
                    Err(_) => {
                        let why = match done {
                            Ok(()) => anyhow::anyhow!("the component never set a response"),
                            Err(e) => anyhow::Error::from(e).context("the component failed"),
                        };
                        return Err(why);
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(resp)) => Ok(resp.map(|body| GuestDrivenBody { guest, body }.boxed_unsync())),
            Ok(Err(code)) => Err(anyhow::anyhow!("the component answered an error: {code:?}")),
            Err(_) => Err(anyhow::anyhow!("the component dropped its response")),
        }
    }
}

type GuestFuture = Pin<Box<dyn Future<Output = wasmtime::Result<()>> + Send>>;

/// Drops a finished guest (its store: the instance goes back to the pool, its memory
/// reset) in a task of its own, after the response it wrote has gone out rather than
/// before: that is tens of microseconds off every request's latency.
fn retire(guest: Option<GuestFuture>) {
    if let Some(guest) = guest {
        tokio::spawn(async move { drop(guest) });
    }
}

/// A response body that also drives the guest that writes it, to completion.
struct GuestDrivenBody {
    guest: Option<GuestFuture>,
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
            if let Poll::Ready(done) = guest.as_mut().poll(cx) {
                if let Err(e) = done {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "the component failed after answering"
                    );
                }
                retire(self.guest.take());
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
