//! The audit: one record per request the guest makes, handed to a sink.
//!
//! The proxy never waits on the sink and never queues without bound: a sink receives
//! records synchronously and must itself drop (and count) what it cannot keep. Two
//! sinks are provided: [`ChannelSink`] (a bounded channel to whoever stores them) and
//! [`MemorySink`] (a bounded ring of the latest records).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most detections kept in one record (the rest are counted in the last one's kind).
pub const MAX_DETECTIONS: usize = 32;

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
}

/// One thing the policy found in a request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Detection {
    /// What: a PII detector (`card`), `injection:<rule>`, `secret:<name>`,
    /// `upstreamCertificate`, `uninspected` (a compressed body), `cleartext` (a secret's
    /// placeholder kept, where over TLS the value would have gone in).
    pub kind: String,
    /// Where: `url`, `requestHeader:<name>`, `requestBody`, `responseHeader:<name>`,
    /// `responseBody`, `tls`.
    #[serde(rename = "where")]
    pub location: String,
    /// What was done: `log`, `redact`, `block`, `flag`, `strip`, `inserted`, `kept`,
    /// `masked`.
    pub action: String,
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
#[derive(Debug)]
pub struct ChannelSink {
    tx: tokio::sync::mpsc::Sender<AuditRecord>,
    dropped: AtomicU64,
}

impl ChannelSink {
    /// A sink and its receiving end, holding at most `capacity` records unread.
    pub fn new(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<AuditRecord>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    /// Records dropped because the consumer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl AuditSink for ChannelSink {
    fn record(&self, record: AuditRecord) {
        if self.tx.try_send(record).is_err() {
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
    fn records_serialize_camel_case() {
        let v = serde_json::to_value(rec(200)).unwrap();
        assert!(v.get("bytesIn").is_some() && v.get("durationMs").is_some());
        assert_eq!(v["detections"][0]["where"], "requestBody");
    }
}
