//! Templates: their warm pools (ready capacity that creates check out).

use crate::models::Resources;
use crate::sandbox::{call, client};
use crate::{ConnectionConfig, Error, Result};
use serde::Serialize;

/// A template's warm pool: the API's own shape.
pub use api_model::WarmPoolStatus as WarmPool;

/// What to set a warm pool to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WarmPoolSettings {
    /// Ready instances to keep (0 to 16; 0 empties it).
    pub size: u32,
    /// Their shape (default 2 vCPUs, 2048 MiB, 8192 MiB disk); creates check out only
    /// with the same shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Refill in the background (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<bool>,
}

/// Calls on templates.
pub struct Templates;

impl Templates {
    /// A template's warm pool.
    pub async fn warm_pool(config: &ConnectionConfig, template: &str) -> Result<WarmPool> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!("/templates/{template}/warm-pool"),
            None,
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a warm pool: {e}")))
    }

    /// Sets a template's warm pool; it fills in the background.
    pub async fn set_warm_pool(
        config: &ConnectionConfig,
        template: &str,
        settings: &WarmPoolSettings,
    ) -> Result<WarmPool> {
        let http = client(config)?;
        let body = serde_json::to_value(settings).map_err(|e| Error::Protocol(e.to_string()))?;
        let v = call(
            &http,
            config,
            reqwest::Method::PUT,
            &format!("/templates/{template}/warm-pool"),
            Some(body),
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a warm pool: {e}")))
    }
}
