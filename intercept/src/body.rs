//! Bodies on their way through: a bounded prefix read for inspection, then the rest
//! streamed, optionally rewritten (secrets) as it passes, and counted.
//!
//! What a hostile guest or server can make the proxy hold per exchange is bounded:
//! at most [`MAX_INSPECT_BYTES`] of prefix, one frame in flight, and the secret
//! rewriter's carry (the longest pattern, at most 4 KiB). A prefix is read under an
//! idle deadline ([`read_prefix_idle`]), and the session's inspection budget it was
//! read under travels with the body until its head is handed on ([`ProxyBody::holding`]).

use crate::secrets::StreamReplacer;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// Most body bytes buffered for inspection (PII, injection) per body. A text body
/// longer than this is inspected up to here and the rest is streamed uninspected
/// (though a response is still masked in all of it). Buffers come out of the session's
/// inspection budget ([`crate::proxy::SESSION_INSPECT_BUDGET`]).
pub const MAX_INSPECT_BYTES: usize = 1 << 20;

/// A boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy can read a prefix of and stream the rest.
pub type Inner = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What a body's end reports: where a rewriter's counts go.
pub(crate) type OnEnd = Box<dyn FnOnce(&StreamReplacer) + Send>;

/// What is done to a body's trailers before they are passed (masking).
pub(crate) type OnTrailers = Box<dyn FnMut(&mut HeaderMap) + Send>;

/// A body that sent nothing for its idle deadline while its prefix was read.
#[derive(Debug, thiserror::Error)]
#[error("no body data arrived for {0:?}")]
pub struct BodyIdle(pub Duration);

/// The start of a body, and whether it ended within it.
#[derive(Debug)]
pub struct Prefix {
    /// Up to [`MAX_INSPECT_BYTES`] (or the limit asked) of data.
    pub data: Vec<u8>,
    /// Data read past the limit (from the last frame), to send after the prefix.
    pub overflow: Bytes,
    /// Whether the body ended (the prefix is all of it).
    pub ended: bool,
}

/// Reads up to `limit` bytes of `body`. Trailers met within the prefix are dropped.
pub async fn read_prefix(body: &mut Inner, limit: usize) -> Result<Prefix, BoxError> {
    read(body, limit, None).await
}

/// [`read_prefix`], failing with [`BodyIdle`] when `body` brings nothing for `idle`
/// (a sender stalling mid-prefix holds the buffer no longer than that).
pub async fn read_prefix_idle(
    body: &mut Inner,
    limit: usize,
    idle: Duration,
) -> Result<Prefix, BoxError> {
    read(body, limit, Some(idle)).await
}

async fn read(body: &mut Inner, limit: usize, idle: Option<Duration>) -> Result<Prefix, BoxError> {
    use http_body_util::BodyExt;
    let mut data = Vec::new();
    loop {
        if data.len() >= limit {
            return Ok(Prefix {
                data,
                overflow: Bytes::new(),
                ended: body.is_end_stream(),
            });
        }
        let frame = match idle {
            Some(idle) => tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| Box::new(BodyIdle(idle)) as BoxError)?,
            None => body.frame().await,
        };
        match frame {
            None => {
                return Ok(Prefix {
                    data,
                    overflow: Bytes::new(),
                    ended: true,
                })
            }
            Some(frame) => {
                let Ok(mut chunk) = frame?.into_data() else {
                    continue;
                };
                let room = limit - data.len();
                if chunk.len() > room {
                    let overflow = chunk.split_off(room);
                    data.extend_from_slice(&chunk);
                    return Ok(Prefix {
                        data,
                        overflow,
                        ended: false,
                    });
                }
                data.extend_from_slice(&chunk);
            }
        }
    }
}

/// Counters a body adds the bytes it passes to (the exchange's and the connection's).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters(pub Vec<Arc<AtomicU64>>);

impl Counters {
    fn add(&self, n: usize) {
        for c in &self.0 {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A body sent on by the proxy: an optional head (the inspected, possibly rewritten
/// prefix), then the rest of the original, each chunk through an optional rewriter.
pub struct ProxyBody {
    head: Option<Bytes>,
    rest: Option<Inner>,
    rewriter: Option<StreamReplacer>,
    on_end: Option<OnEnd>,
    on_trailers: Option<OnTrailers>,
    /// Trailers waiting for the rewriter's held-back bytes to go first.
    trailers: Option<HeaderMap>,
    exact: Option<u64>,
    counters: Counters,
    /// The inspection budget the head was read under: given back once the head has
    /// been handed on and more is asked for (or the body dropped).
    held: Option<OwnedSemaphorePermit>,
    /// Dropped with the body: whatever must happen when the exchange is over (the
    /// audit record).
    _guard: Option<Box<dyn Send>>,
    finished: bool,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody")
            .field("exact", &self.exact)
            .finish_non_exhaustive()
    }
}

impl ProxyBody {
    /// A body of exactly `data`.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self {
            exact: Some(data.len() as u64),
            head: (!data.is_empty()).then_some(data),
            rest: None,
            rewriter: None,
            on_end: None,
            on_trailers: None,
            trailers: None,
            counters: Counters::default(),
            held: None,
            _guard: None,
            finished: false,
        }
    }

    /// `head`, then `rest` (if any), each through `rewriter`.
    pub fn streamed(head: Bytes, rest: Option<Inner>, rewriter: Option<StreamReplacer>) -> Self {
        Self {
            head: (!head.is_empty()).then_some(head),
            rest,
            rewriter,
            on_end: None,
            on_trailers: None,
            trailers: None,
            exact: None,
            counters: Counters::default(),
            held: None,
            _guard: None,
            finished: false,
        }
    }

    /// The original body, untouched (its size hint kept, so the framing is the same).
    pub fn pass(body: Inner) -> Self {
        Self::streamed(Bytes::new(), Some(body), None)
    }

    pub(crate) fn counted(mut self, counters: Counters) -> Self {
        self.counters = counters;
        self
    }

    pub(crate) fn on_end(mut self, f: OnEnd) -> Self {
        self.on_end = Some(f);
        self
    }

    pub(crate) fn guarded(mut self, guard: Box<dyn Send>) -> Self {
        self._guard = Some(guard);
        self
    }

    pub(crate) fn on_trailers(mut self, f: OnTrailers) -> Self {
        self.on_trailers = Some(f);
        self
    }

    /// The body holding `permit` (the inspection budget its head was read under) until
    /// the head has been handed on and more is asked for, or the body is dropped.
    pub fn holding(mut self, permit: Option<OwnedSemaphorePermit>) -> Self {
        self.held = permit;
        self
    }

    fn rewrite(&mut self, data: Bytes) -> Bytes {
        match &mut self.rewriter {
            Some(r) => Bytes::from(r.push(&data)),
            None => data,
        }
    }

    fn end(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        self.finished = true;
        let tail = self.rewriter.as_mut().map(|r| r.finish());
        if let (Some(f), Some(r)) = (self.on_end.take(), &self.rewriter) {
            f(r);
        }
        tail.filter(|t| !t.is_empty()).map(Bytes::from)
    }
}

impl Drop for ProxyBody {
    /// Reports the rewriter's counts if the body was not polled to its end (hyper stops
    /// at `is_end_stream`, and a guest may go mid-body). This runs before the guard
    /// field is dropped, so the audit record has them.
    fn drop(&mut self) {
        if let (Some(f), Some(r)) = (self.on_end.take(), &self.rewriter) {
            f(r);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.head.is_none() {
            // The head (the inspected prefix) went with an earlier frame.
            this.held = None;
        }
        loop {
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if let Some(head) = this.head.take() {
                let out = this.rewrite(head);
                if out.is_empty() {
                    continue;
                }
                this.counters.add(out.len());
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            let Some(rest) = this.rest.as_mut() else {
                return Poll::Ready(this.end().map(|tail| {
                    this.counters.add(tail.len());
                    Ok(Frame::data(tail))
                }));
            };
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.rest = None,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.rewrite(data);
                        if out.is_empty() {
                            continue;
                        }
                        this.counters.add(out.len());
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    // Trailers end the body: what a rewriter held back goes first, then
                    // they, through the trailer hook (masking).
                    Err(frame) => {
                        let Ok(mut trailers) = frame.into_trailers() else {
                            continue;
                        };
                        if let Some(f) = this.on_trailers.as_mut() {
                            f(&mut trailers);
                        }
                        let tail = match this.rewriter.as_mut() {
                            Some(r) if r.held() > 0 => r.finish(),
                            _ => Vec::new(),
                        };
                        if tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        this.trailers = Some(trailers);
                        this.counters.add(tail.len());
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.trailers.is_none()
            && self.rewriter.as_ref().is_none_or(|r| r.held() == 0)
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(n) = self.exact {
            return SizeHint::with_exact(n);
        }
        match (&self.head, &self.rest, &self.rewriter) {
            (None, Some(rest), None) => rest.size_hint(),
            // Counting only: as long as what it passes.
            (None, Some(rest), Some(r)) if r.is_identity() => rest.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn stream_of(chunks: usize, size: usize) -> Inner {
        let s = futures_stream(chunks, size);
        http_body_util::StreamBody::new(s).boxed_unsync()
    }

    fn futures_stream(
        chunks: usize,
        size: usize,
    ) -> impl futures_util::stream::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static
    {
        futures_util::stream::iter(
            (0..chunks).map(move |_| Ok(Frame::data(Bytes::from(vec![b'a'; size])))),
        )
    }

    #[tokio::test]
    async fn a_prefix_is_bounded_and_the_rest_streams_whole() {
        // 20 MiB in 100 KiB frames: the prefix holds exactly the limit, the frame that
        // crosses it is split, and the body sent on is the whole of it.
        let mut body = stream_of(200, 100 * 1024 + 7);
        let p = read_prefix(&mut body, MAX_INSPECT_BYTES).await.unwrap();
        assert_eq!(p.data.len(), MAX_INSPECT_BYTES);
        assert!(p.data.capacity() <= 2 * MAX_INSPECT_BYTES);
        assert!(!p.ended);
        let total = p.data.len() + p.overflow.len();
        let mut head = p.data;
        head.extend_from_slice(&p.overflow);
        let out = ProxyBody::streamed(Bytes::from(head), Some(body), None);
        let mut n = 0;
        let mut largest = 0;
        let mut out = std::pin::pin!(out);
        while let Some(f) = out.frame().await {
            let d = f.unwrap().into_data().unwrap();
            if n > 0 {
                largest = largest.max(d.len());
            }
            n += d.len();
        }
        assert_eq!(n, 200 * (100 * 1024 + 7));
        assert!(total <= MAX_INSPECT_BYTES + 100 * 1024 + 7);
        // After the head, frames pass one at a time, never merged.
        assert_eq!(largest, 100 * 1024 + 7);
    }

    #[tokio::test]
    async fn a_short_body_ends_within_the_prefix() {
        let mut body = stream_of(3, 10);
        let p = read_prefix(&mut body, MAX_INSPECT_BYTES).await.unwrap();
        assert!(p.ended && p.data.len() == 30 && p.overflow.is_empty());
    }
}
