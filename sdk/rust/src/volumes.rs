//! Durable volumes: create, list, inspect, delete. Mount one at a sandbox's launch with
//! [`crate::CreateOptions::mount`].

use crate::sandbox::{call, client};
use crate::{ConnectionConfig, Error, Result};
pub use api_model::VolumeView as Volume;
use serde_json::json;

/// The team's volumes.
pub struct Volumes;

fn volume(v: serde_json::Value) -> Result<Volume> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a volume: {e}")))
}

impl Volumes {
    /// Creates an empty volume of `size_mib` (server default 1024), optionally named
    /// (names are unique per team and work wherever an ID does).
    pub async fn create(
        config: &ConnectionConfig,
        name: Option<&str>,
        size_mib: Option<u64>,
    ) -> Result<Volume> {
        let mut body = json!({});
        if let Some(n) = name {
            body["name"] = json!(n);
        }
        if let Some(s) = size_mib {
            body["sizeMiB"] = json!(s);
        }
        let http = client(config)?;
        volume(call(&http, config, reqwest::Method::POST, "/volumes", Some(body)).await?)
    }

    /// A volume by ID or name: its size, saved version and holders.
    pub async fn get(config: &ConnectionConfig, id: &str) -> Result<Volume> {
        let http = client(config)?;
        volume(
            call(
                &http,
                config,
                reqwest::Method::GET,
                &format!("/volumes/{id}"),
                None,
            )
            .await?,
        )
    }

    /// The team's volumes, oldest first.
    pub async fn list(config: &ConnectionConfig) -> Result<Vec<Volume>> {
        let http = client(config)?;
        let v = call(&http, config, reqwest::Method::GET, "/volumes", None).await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("volumes: {e}")))
    }

    /// Deletes a volume and its content; refused (409) while a sandbox holds it.
    pub async fn delete(config: &ConnectionConfig, id: &str) -> Result<()> {
        let http = client(config)?;
        call(
            &http,
            config,
            reqwest::Method::DELETE,
            &format!("/volumes/{id}"),
            None,
        )
        .await
        .map(drop)
    }
}
