//! The audit: one record per request the guest makes, handed to a sink.
//!
//! The proxy never waits on the sink and never queues without bound: a sink receives
//! records synchronously and must itself drop (and count) what it cannot keep. Two
//! sinks are provided: [`ChannelSink`] (a bounded channel to whoever stores them; a
//! record delivered after some were dropped says how many, [`AuditRecord::dropped_before`])
//! and [`MemorySink`] (a bounded ring of the latest records).
//!
//! Much of a record is the guest's to choose (the method, the host, the path, header
//! names in locations), so each string field is capped, in one place
//! ([`AuditRecord::bounded`], [`Detection::new`]): the method at [`MAX_AUDIT_METHOD`]
//! bytes, the host at [`MAX_AUDIT_HOST`], the path at [`MAX_AUDIT_PATH`], a detection's
//! kind at [`MAX_AUDIT_KIND`] and its location at [`MAX_AUDIT_LOCATION`]; a field cut
//! ends with [`CUT_MARKER`] (within the cap). With at most [`MAX_DETECTIONS`]
//! detections, a record is a few KiB at most.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most detections kept in one record (further ones are dropped).
pub const MAX_DETECTIONS: usize = 32;
/// Longest method kept in a record, in bytes.
pub const MAX_AUDIT_METHOD: usize = 16;
/// Longest host kept in a record, in bytes (a DNS name's longest).
pub const MAX_AUDIT_HOST: usize = 255;
/// Longest path (and query) kept in a record, in bytes.
pub const MAX_AUDIT_PATH: usize = 2048;
/// Longest detection location kept (`requestHeader:<name>`), in bytes.
pub const MAX_AUDIT_LOCATION: usize = 128;
/// Longest detection kind kept (`secret:<name>`), in bytes.
pub const MAX_AUDIT_KIND: usize = 128;
/// What ends a field cut to its cap.
pub const CUT_MARKER: &str = "...";

/// `s` cut to at most `max` bytes (at a character boundary), ending with
/// [`CUT_MARKER`] if it was cut.
pub fn cap(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(CUT_MARKER.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    if max >= CUT_MARKER.len() {
        s.push_str(CUT_MARKER);
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One request, as the audit keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// When the request arrived, RFC 3339 UTC.
    pub time: String,
    /// The method.
    pub method: String,
    /// The host: the TLS server name, else the destination address.
    pub host: String,
    /// The path and query, as sent upstream (after redaction; never with a real secret).
    pub path: String,
    /// The status the guest got (0 if none: the connection failed first).
    pub status: u16,
    /// Body bytes received from the upstream and sent to the guest.
    pub bytes_in: u64,
    /// Body bytes sent by the guest to the upstream.
    pub bytes_out: u64,
    /// From the request's arrival to the response body's end.
    pub duration_ms: u64,
    /// What the policy found.
    pub detections: Vec<Detection>,
    /// What became of the request: `allowed`, `modified` (redacted, stripped, secrets
    /// inserted or masked), `blocked`, `error` (upstream unreachable or refused).
    pub action: String,
    /// How many records the sink dropped just before this one (its consumer fell
    /// behind: see [`ChannelSink`]); 0, and absent from the JSON, when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_before: u64,
}

impl AuditRecord {
    /// The record with each string field within its cap (see the module docs), the
    /// detections at most [`MAX_DETECTIONS`].
    pub fn bounded(mut self) -> Self {
        cap(&mut self.method, MAX_AUDIT_METHOD);
        cap(&mut self.host, MAX_AUDIT_HOST);
        cap(&mut self.path, MAX_AUDIT_PATH);
        self.detections.truncate(MAX_DETECTIONS);
        for d in &mut self.detections {
            d.bound();
        }
        self
    }
}

/// One thing the policy found in a request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Detection {
    /// What: a PII detector (`card`), `injection:<rule>`, `secret:<name>`,
    /// `upstreamCertificate`, `upstreamTls`, `upstream`, `uninspected` (a body not
    /// inspected: compressed, or no inspection budget free; with `block`, refused for
    /// it), `cleartext` (a secret's placeholder kept, where over TLS the value would have
    /// gone in), `upgrade` (a protocol switch refused: a secret went into its request),
    /// `egress` (the host refused by the egress gate), `timeout` (a deadline passed).
    pub kind: String,
    /// Where: `url`, `requestHeader:<name>`, `requestBody`, `responseHeader:<name>`,
    /// `responseReason`, `responseBody`, `responseTrailer:<name>`, `response`, `tls`,
    /// `sni`, `host`.
    #[serde(rename = "where")]
    pub location: String,
    /// What was done: `log`, `redact`, `block`, `flag`, `strip`, `inserted`, `kept`,
    /// `masked`.
    pub action: String,
}

impl Detection {
    /// A detection, its kind and location within their caps.
    pub fn new(kind: String, location: String, action: String) -> Self {
        let mut d = Self {
            kind,
            location,
            action,
        };
        d.bound();
        d
    }

    fn bound(&mut self) {
        cap(&mut self.kind, MAX_AUDIT_KIND);
        cap(&mut self.location, MAX_AUDIT_LOCATION);
        cap(&mut self.action, MAX_AUDIT_KIND);
    }
}

/// Where audit records go. Called on the proxy's tasks: it must not block.
pub trait AuditSink: Send + Sync {
    /// Takes one record (or drops it, counting, when full).
    fn record(&self, record: AuditRecord);
}

/// A sink that drops everything (audit off).
#[derive(Debug, Default)]
pub struct NullSink;

impl AuditSink for NullSink {
    fn record(&self, _: AuditRecord) {}
}

/// A bounded channel to a consumer; records past its capacity are dropped and counted.
/// The next record delivered after drops carries their number
/// ([`AuditRecord::dropped_before`]), so the consumer sees the gap where it is.
#[derive(Debug)]
pub struct ChannelSink {
    tx: tokio::sync::mpsc::Sender<AuditRecord>,
    dropped: AtomicU64,
    /// Dropped since the last record delivered.
    pending: AtomicU64,
}

impl ChannelSink {
    /// A sink and its receiving end, holding at most `capacity` records unread.
    pub fn new(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<AuditRecord>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
                pending: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Records dropped because the consumer fell behind (in all).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl AuditSink for ChannelSink {
    fn record(&self, mut record: AuditRecord) {
        let before = self.pending.swap(0, Ordering::AcqRel);
        record.dropped_before = record.dropped_before.saturating_add(before);
        if self.tx.try_send(record).is_err() {
            // Not delivered: its count and this one wait for the next that is.
            self.pending.fetch_add(before + 1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The latest `capacity` records, in memory.
#[derive(Debug)]
pub struct MemorySink {
    capacity: usize,
    records: Mutex<VecDeque<AuditRecord>>,
}

impl MemorySink {
    /// A ring of `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            records: Mutex::new(VecDeque::new()),
        }
    }

    /// The records kept, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: AuditRecord) {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == self.capacity {
            r.pop_front();
        }
        r.push_back(record);
    }
}

/// The time now, RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u16) -> AuditRecord {
        AuditRecord {
            time: now_rfc3339(),
            method: "GET".into(),
            host: "a.com".into(),
            path: "/".into(),
            status: n,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            detections: vec![Detection {
                kind: "card".into(),
                location: "requestBody".into(),
                action: "redact".into(),
            }],
            action: "modified".into(),
            dropped_before: 0,
        }
    }

    #[test]
    fn sinks_are_bounded() {
        let m = MemorySink::new(3);
        for i in 0..10 {
            m.record(rec(i));
        }
        assert_eq!(
            m.records().iter().map(|r| r.status).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        let (c, mut rx) = ChannelSink::new(2);
        for i in 0..5 {
            c.record(rec(i));
        }
        assert_eq!(c.dropped(), 3);
        assert_eq!(rx.try_recv().unwrap().status, 0);
    }

    #[test]
    fn a_channel_sink_says_what_it_dropped_with_the_next_record_delivered() {
        let (c, mut rx) = ChannelSink::new(2);
        for i in 0..5 {
            c.record(rec(i));
        }
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got.iter()
                .map(|r| (r.status, r.dropped_before))
                .collect::<Vec<_>>(),
            [(0, 0), (1, 0)]
        );
        // 2, 3 and 4 were dropped: the next one delivered says so, once.
        c.record(rec(5));
        c.record(rec(6));
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got.iter()
                .map(|r| (r.status, r.dropped_before))
                .collect::<Vec<_>>(),
            [(5, 3), (6, 0)]
        );
        assert_eq!(c.dropped(), 3);
        let v = serde_json::to_value(&got[0]).unwrap();
        assert_eq!(v["droppedBefore"], 3);
        assert!(serde_json::to_value(&got[1])
            .unwrap()
            .get("droppedBefore")
            .is_none());
    }

    #[test]
    fn records_are_capped_field_by_field() {
        let mut r = rec(200);
        r.method = "M".repeat(70_000);
        r.host = "h".repeat(16 * 1024);
        r.path = format!("/{}", "é".repeat(5000));
        r.detections = (0..100)
            .map(|i| {
                Detection::new(
                    format!("k{i}{}", "k".repeat(9000)),
                    format!("requestHeader:{}", "x".repeat(60_000)),
                    "log".into(),
                )
            })
            .collect();
        let r = r.bounded();
        assert_eq!(r.method.len(), MAX_AUDIT_METHOD);
        assert!(r.method.ends_with(CUT_MARKER));
        assert_eq!(r.host.len(), MAX_AUDIT_HOST);
        assert!(r.path.len() <= MAX_AUDIT_PATH && r.path.ends_with(CUT_MARKER));
        assert_eq!(r.detections.len(), MAX_DETECTIONS);
        for d in &r.detections {
            assert!(d.kind.len() <= MAX_AUDIT_KIND && d.location.len() <= MAX_AUDIT_LOCATION);
            assert!(d.location.starts_with("requestHeader:xx") && d.location.ends_with(CUT_MARKER));
        }
        assert!(serde_json::to_vec(&r).unwrap().len() < 16 * 1024);
        // Within its cap, a field is kept whole.
        let mut s = "GET".to_string();
        cap(&mut s, MAX_AUDIT_METHOD);
        assert_eq!(s, "GET");
    }

    #[test]
    fn records_serialize_camel_case() {
        let v = serde_json::to_value(rec(200)).unwrap();
        assert!(v.get("bytesIn").is_some() && v.get("durationMs").is_some());
        assert_eq!(v["detections"][0]["where"], "requestBody");
    }
}
