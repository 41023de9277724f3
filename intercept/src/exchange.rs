//! One exchange (a request and its response) as the audit will record it: what the
//! policy found and did, filled in as the exchange goes, and the record sent when it
//! ends.

use crate::audit::{
    cap, AuditRecord, AuditSink, Detection, MAX_AUDIT_HOST, MAX_AUDIT_METHOD, MAX_AUDIT_PATH,
    MAX_DETECTIONS,
};
use crate::body::ProxyBody;
use crate::secrets::{Counts, Hit, StreamReplacer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What became of a request (the audit's `action`), worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Allowed,
    Modified,
    Blocked,
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Modified => "modified",
            Outcome::Blocked => "blocked",
            Outcome::Error => "error",
        }
    }
}

/// One request's record in the making.
pub(crate) struct Exchange {
    time: String,
    started: Instant,
    method: String,
    host: String,
    /// The path and query as sent upstream (set once rewritten).
    pub(crate) path: String,
    /// The status the guest got (0 until it has one).
    pub(crate) status: u16,
    /// Response body bytes passed to the guest.
    pub(crate) bytes_in: Arc<AtomicU64>,
    /// Request body bytes passed upstream.
    pub(crate) bytes_out: Arc<AtomicU64>,
    detections: Vec<Detection>,
    outcome: Outcome,
}

pub(crate) type ExchangeRef = Arc<Mutex<Exchange>>;

pub(crate) fn lock(ex: &ExchangeRef) -> std::sync::MutexGuard<'_, Exchange> {
    ex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Exchange {
    /// A `method` request to `host`, arriving now (both capped as the record has them:
    /// the guest chooses them).
    pub(crate) fn start(mut method: String, mut host: String) -> ExchangeRef {
        cap(&mut method, MAX_AUDIT_METHOD);
        cap(&mut host, MAX_AUDIT_HOST);
        Arc::new(Mutex::new(Exchange {
            time: crate::audit::now_rfc3339(),
            started: Instant::now(),
            method,
            host,
            path: String::new(),
            status: 0,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            detections: Vec::new(),
            outcome: Outcome::Allowed,
        }))
    }

    pub(crate) fn detect(&mut self, kind: String, location: String, action: &str) {
        if self.detections.len() >= MAX_DETECTIONS {
            return;
        }
        // Capped first (a location names a header the guest chose), then bounded: a
        // body full of e-mail addresses is one detection per kind and place.
        let d = Detection::new(kind, location, action.to_string());
        if !self.detections.contains(&d) {
            self.detections.push(d);
        }
    }

    pub(crate) fn outcome(&mut self, o: Outcome) {
        self.outcome = self.outcome.max(o);
    }

    pub(crate) fn secrets(&mut self, counts: Counts, location: &str) {
        for (name, hit, _) in counts {
            self.detect(format!("secret:{name}"), location.to_string(), hit.action());
            match hit {
                Hit::Inserted | Hit::Masked => self.outcome(Outcome::Modified),
                Hit::Kept => {}
                // Said apart from a placeholder kept for a host not the secret's: here
                // the value would have gone in over TLS.
                Hit::Withheld => self.detect("cleartext".into(), location.to_string(), "kept"),
            }
        }
    }
}

/// Sends the exchange's record when dropped (with the response body: the exchange is
/// over).
pub(crate) struct AuditGuard {
    ex: ExchangeRef,
    sink: Option<Arc<dyn AuditSink>>,
}

impl AuditGuard {
    /// Sends `ex`'s record to `sink` (none: the audit is off) when dropped.
    pub(crate) fn new(ex: ExchangeRef, sink: Option<Arc<dyn AuditSink>>) -> Self {
        Self { ex, sink }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        let ex = lock(&self.ex);
        sink.record(
            AuditRecord {
                time: ex.time.clone(),
                method: ex.method.clone(),
                host: ex.host.clone(),
                path: ex.path.clone(),
                status: ex.status,
                bytes_in: ex.bytes_in.load(Ordering::Relaxed),
                bytes_out: ex.bytes_out.load(Ordering::Relaxed),
                duration_ms: ex.started.elapsed().as_millis() as u64,
                detections: ex.detections.clone(),
                action: ex.outcome.name().to_string(),
                dropped_before: 0,
            }
            .bounded(),
        );
    }
}

/// `url` as an audit record keeps it (lossy UTF-8, at most [`MAX_AUDIT_PATH`] bytes).
pub(crate) fn audit_path(url: &[u8]) -> String {
    // Only what can be kept is decoded (a cut URL is longer than the cap: it is cut
    // again, marked, below).
    let head = &url[..url.len().min(MAX_AUDIT_PATH + 1)];
    let mut s = String::from_utf8_lossy(head).into_owned();
    cap(&mut s, MAX_AUDIT_PATH);
    s
}

/// `body`, reporting its secret rewrites into the exchange when it ends.
pub(crate) fn report_at_end(
    body: ProxyBody,
    ex: &ExchangeRef,
    location: &'static str,
) -> ProxyBody {
    let ex = ex.clone();
    body.on_end(Box::new(move |r: &StreamReplacer| {
        lock(&ex).secrets(r.counts(), location)
    }))
}
