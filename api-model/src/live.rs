//! Shapes of the live side of a sandbox that the pool manager sends and the SDKs read:
//! lifecycle events, resource samples, preview URLs.

use serde::{Deserialize, Serialize};

/// One entry of a sandbox's lifecycle event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing per sandbox (1, 2, 3, ...).
    pub id: u64,
    /// When (ISO 8601).
    pub at: String,
    /// `sandbox.created`, `sandbox.running`, `sandbox.paused`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// What the event says.
    pub data: serde_json::Value,
}

/// One resource sample of a running sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricSample {
    /// Unix seconds.
    pub timestamp: i64,
    /// Guest CPU busy since the previous sample, percent of all its vCPUs.
    pub cpu_used_pct: f64,
    pub cpu_count: u32,
    #[serde(rename = "memUsedMiB")]
    pub mem_used_mib: u64,
    #[serde(rename = "memTotalMiB")]
    pub mem_total_mib: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub tasks: u32,
    /// CPU of the VM's process on the host since the previous sample, percent of one
    /// host core (an idle sandbox should stay under 1).
    pub host_cpu_pct: f64,
}

/// A preview URL of a port and the proxy target for application proxies, as
/// `POST /sandboxes/{id}/previews` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Preview {
    pub port: u16,
    /// Reachable without a token.
    pub public: bool,
    /// The host name the port is served under (`<port>-<sandbox>.<domain>`).
    pub host: String,
    /// Opens the port in a browser (with the token unless public); redact before
    /// logging.
    pub url: String,
    /// The signed preview token (also in `url`).
    pub token: String,
    pub expires_at: String,
    pub proxy_target: ProxyTarget,
}

/// Where an application proxy forwards, and the token it sends in `header`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTarget {
    pub url: String,
    pub header: String,
    pub token: String,
}
