//! Where the API is and who is calling.

use crate::{Error, Result};
use std::time::Duration;

/// Default per-request timeout (creates wait for a running VM: keep it generous).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// How to reach the public API: its URL, an API key, a per-request timeout.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Base URL, e.g. `http://127.0.0.1:7080` (the `/api/v1` prefix is added).
    pub api_url: String,
    /// The team's API key.
    pub api_key: String,
    /// Per-request HTTP timeout.
    pub request_timeout: Duration,
}

impl ConnectionConfig {
    /// A configuration from explicit values.
    pub fn new(api_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self {
            api_url: normalize(&api_url.into()),
            api_key: api_key.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// From `NULLSPACE_API_URL` / `NULLSPACE_API_KEY`, falling back to the dev stack's
    /// `~/.local/state/nullspace/dev.env` (what `deploy/up.sh` writes).
    pub fn from_env() -> Result<Self> {
        let file = dev_env();
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| file.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let api_key = get("NULLSPACE_API_KEY").ok_or_else(|| {
            Error::Config(
                "no API key: set NULLSPACE_API_KEY (deploy/up.sh writes one to ~/.local/state/nullspace/dev.env)"
                    .into(),
            )
        })?;
        let api_url = get("NULLSPACE_API_URL").unwrap_or_else(|| "http://127.0.0.1:7080".into());
        Ok(Self::new(api_url, api_key))
    }

    /// This configuration with another API key (a per-call override).
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = key.into();
        self
    }

    /// This configuration with another domain: `host:port` or a URL.
    pub fn with_domain(mut self, domain: &str) -> Self {
        self.api_url = normalize(domain);
        self
    }

    /// This configuration with another per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.api_url)
    }
}

/// `host:port` → `http://host:port`; no trailing slash.
fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix("/api/v1").unwrap_or(url);
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// `KEY=VALUE` lines of the dev stack's env file, if there is one.
fn dev_env() -> Vec<(String, String)> {
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/state"))
        });
    let Some(path) = dir.map(|d| d.join("nullspace/dev.env")) else {
        return Vec::new();
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_become_base_urls() {
        assert_eq!(normalize("127.0.0.1:7080"), "http://127.0.0.1:7080");
        assert_eq!(
            normalize("https://api.example.com/"),
            "https://api.example.com"
        );
        assert_eq!(normalize("http://h:1/api/v1"), "http://h:1");
    }
}
