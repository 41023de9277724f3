//! A sandbox and the control-plane calls on it.

use crate::commands::Commands;
use crate::error::check;
use crate::files::Files;
use crate::models::{
    ListQuery, RestoreOptions, RuntimeAccess, SandboxInfo, SandboxPage, SnapshotInfo,
};
use crate::{ConnectionConfig, CreateOptions, Error, InheritVolumes, Result, Snapshot};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// A connected sandbox: its ID, the API it lives behind, and its data-plane access.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub(crate) config: ConnectionConfig,
    pub(crate) http: reqwest::Client,
    id: String,
    pub(crate) runtime: Option<RuntimeAccess>,
}

pub(crate) fn client(config: &ConnectionConfig) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(config.request_timeout)
        .build()?)
}

/// Calls the public API; returns the JSON body (`Null` for 204).
pub(crate) async fn call(
    http: &reqwest::Client,
    config: &ConnectionConfig,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = http
        .request(method, config.url(path))
        .header("X-API-Key", &config.api_key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = check(req.send().await?).await?;
    if resp.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    Ok(resp.json().await?)
}

fn info(v: Value) -> Result<SandboxInfo> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a sandbox: {e}")))
}

/// The `fields=` value: the names joined, each checked (the API checks them against
/// its views).
fn fields_param(fields: &[&str]) -> Result<String> {
    if fields.is_empty() {
        return Err(Error::invalid(
            "fields is empty; send at least one name, e.g. [\"id\", \"status\"]",
        ));
    }
    if let Some(bad) = fields
        .iter()
        .find(|f| f.trim().is_empty() || f.contains(','))
    {
        return Err(Error::invalid(format!(
            "fields contains {bad:?}; send each name on its own, e.g. [\"id\", \"status\"]"
        )));
    }
    Ok(fields
        .iter()
        .map(|f| f.trim())
        .collect::<Vec<_>>()
        .join(","))
}

/// `view` with exactly the `fields` asked for (the API adds `sandboxID` when `id` was
/// not asked for: a compact map has only what the caller named).
fn only(view: Value, fields: &[&str]) -> Result<Map<String, Value>> {
    let Value::Object(mut map) = view else {
        return Err(Error::Protocol(format!(
            "a sandbox that is not an object: {view}"
        )));
    };
    map.retain(|k, _| fields.iter().any(|f| f.trim() == k));
    Ok(map)
}

/// `GET /sandboxes` with `query` (and a `fields=` projection).
async fn list_raw(
    config: &ConnectionConfig,
    query: &ListQuery,
    fields: Option<&str>,
) -> Result<Value> {
    let http = client(config)?;
    let mut params: Vec<(String, String)> = Vec::new();
    if !query.states.is_empty() {
        params.push(("state".into(), query.states.join(",")));
    }
    for (k, v) in &query.metadata {
        params.push(("metadata".into(), format!("{k}={v}")));
    }
    if let Some(l) = query.limit {
        params.push(("limit".into(), l.to_string()));
    }
    if let Some(t) = &query.next_token {
        params.push(("nextToken".into(), t.clone()));
    }
    if let Some(f) = fields {
        params.push(("fields".into(), f.to_string()));
    }
    let resp = http
        .get(config.url("/sandboxes"))
        .query(&params)
        .header("X-API-Key", &config.api_key)
        .send()
        .await?;
    Ok(check(resp).await?.json().await?)
}

/// The error of a sandbox that failed while waited on.
fn failed(info: &SandboxInfo) -> Error {
    match &info.diagnostic {
        Some(d) => Error::local(
            &d.code,
            format!(
                "sandbox {} is {}: {} ({})",
                info.sandbox_id, info.state, d.message, d.action
            ),
        ),
        None => Error::local(
            "sandbox_failed",
            format!(
                "sandbox {} is {} and will not run; create another, or read its logs for why",
                info.sandbox_id, info.state
            ),
        ),
    }
}

/// One page of [`Sandbox::list_fields`]: compact raw maps.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldsPage {
    /// The sandboxes, each with exactly the names asked for.
    pub sandboxes: Vec<Map<String, Value>>,
    /// Pass back (in [`ListQuery::next_token`]) for the next page; `None` on the last.
    pub next_token: Option<String>,
}

fn snapshot_info(v: Value) -> Result<SnapshotInfo> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a snapshot: {e}")))
}

impl Sandbox {
    /// Creates a sandbox and returns it connected (still `starting`, without data-plane
    /// access, when [`CreateOptions::wait_ready`] is `false`: see
    /// [`Sandbox::wait_ready`]). Options that conflict are refused before any request
    /// ([`CreateOptions::to_body`]).
    pub async fn create(config: &ConnectionConfig, options: &CreateOptions) -> Result<Sandbox> {
        let body = options.to_body()?;
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::POST,
            "/sandboxes",
            Some(body),
        )
        .await?;
        Ok(Self::from_info(config.clone(), http, info(v)?))
    }

    /// Connects to an existing sandbox (resuming it if paused), optionally setting its
    /// timeout, with fresh data-plane access.
    pub async fn connect(
        config: &ConnectionConfig,
        sandbox_id: &str,
        timeout: Option<u64>,
    ) -> Result<Sandbox> {
        let http = client(config)?;
        let body = timeout.map_or_else(|| json!({}), |t| json!({ "timeout": t }));
        let v = call(
            &http,
            config,
            reqwest::Method::POST,
            &format!("/sandboxes/{sandbox_id}/connect"),
            Some(body),
        )
        .await?;
        Ok(Self::from_info(config.clone(), http, info(v)?))
    }

    /// A handle on an existing sandbox that shares it with other clients: a running
    /// sandbox is read (its current runtime token, which ends no other client's), and
    /// only one that is not running is connected (resumed, with a new token). Use
    /// [`Sandbox::connect`] to take the runtime access over, ending older tokens.
    pub async fn attach(config: &ConnectionConfig, sandbox_id: &str) -> Result<Sandbox> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!("/sandboxes/{sandbox_id}"),
            None,
        )
        .await?;
        let found = info(v)?;
        if found.state == "running" && found.runtime.is_some() {
            return Ok(Self::from_info(config.clone(), http, found));
        }
        Self::connect(config, sandbox_id, None).await
    }

    /// One page of the team's sandboxes.
    pub async fn list(config: &ConnectionConfig, query: &ListQuery) -> Result<SandboxPage> {
        let v = list_raw(config, query, None).await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a list: {e}")))
    }

    /// One page of the team's sandboxes as compact raw maps with exactly the `fields`
    /// asked for (seed 004's `fields=`): view names (`sandboxID`, `state`, `metadata`,
    /// `expiresAt`, ...) or the seeds' `id` and `status`. An empty `fields` is
    /// `invalid_request`.
    ///
    /// ```no_run
    /// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// use nullspace::{ListQuery, Sandbox};
    /// let page = Sandbox::list_fields(config, &ListQuery::default(), &["id", "status"]).await?;
    /// for s in &page.sandboxes {
    ///     println!("{} {}", s["id"], s["status"]);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_fields(
        config: &ConnectionConfig,
        query: &ListQuery,
        fields: &[&str],
    ) -> Result<FieldsPage> {
        let wanted = fields_param(fields)?;
        let mut v = list_raw(config, query, Some(&wanted)).await?;
        let sandboxes = match v.get_mut("sandboxes").map(Value::take) {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| only(item, fields))
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(Error::Protocol(format!("a list without sandboxes: {v}"))),
        };
        let next_token = v
            .get("nextToken")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(FieldsPage {
            sandboxes,
            next_token,
        })
    }

    /// A sandbox's description as a compact raw map with exactly the `fields` asked for
    /// (see [`Sandbox::list_fields`]); read-only, never wakes a paused sandbox.
    ///
    /// ```no_run
    /// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// let s = nullspace::Sandbox::get_info_by_id_fields(config, "sbx-…", &["id", "status"]).await?;
    /// assert_eq!(s.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn get_info_by_id_fields(
        config: &ConnectionConfig,
        sandbox_id: &str,
        fields: &[&str],
    ) -> Result<Map<String, Value>> {
        let wanted = fields_param(fields)?;
        let http = client(config)?;
        let resp = http
            .get(config.url(&format!("/sandboxes/{sandbox_id}")))
            .query(&[("fields", wanted)])
            .header("X-API-Key", &config.api_key)
            .send()
            .await?;
        only(check(resp).await?.json().await?, fields)
    }

    /// A sandbox's description without connecting (never wakes a paused one).
    pub async fn get_info_by_id(
        config: &ConnectionConfig,
        sandbox_id: &str,
    ) -> Result<SandboxInfo> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!("/sandboxes/{sandbox_id}"),
            None,
        )
        .await?;
        info(v)
    }

    /// A handle on a sandbox by ID, without a call: control-plane methods (kill, pause,
    /// set_timeout, get_info) work; commands and files need [`Sandbox::connect`].
    pub fn from_id(config: &ConnectionConfig, sandbox_id: &str) -> Result<Sandbox> {
        Ok(Self {
            config: config.clone(),
            http: client(config)?,
            id: sandbox_id.to_string(),
            runtime: None,
        })
    }

    fn from_info(config: ConnectionConfig, http: reqwest::Client, info: SandboxInfo) -> Self {
        Self {
            config,
            http,
            id: info.sandbox_id,
            runtime: info.runtime,
        }
    }

    /// Its ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Data-plane access as of the last create, connect or resume.
    pub fn runtime(&self) -> Option<&RuntimeAccess> {
        self.runtime.as_ref()
    }

    async fn control(
        &self,
        method: reqwest::Method,
        action: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let path = if action.is_empty() {
            format!("/sandboxes/{}", self.id)
        } else {
            format!("/sandboxes/{}/{action}", self.id)
        };
        call(&self.http, &self.config, method, &path, body).await
    }

    /// Its current description.
    pub async fn get_info(&self) -> Result<SandboxInfo> {
        info(self.control(reqwest::Method::GET, "", None).await?)
    }

    /// Waits until it is `running` (after a create with
    /// [`CreateOptions::wait_ready`]`(false)`), polling its description every 200 ms,
    /// then takes its data-plane access from it. Fails with the diagnostic's code (or
    /// `sandbox_failed`) if it ends in `error` or `deleted`, and with `timeout` once
    /// `timeout` has passed.
    ///
    /// ```no_run
    /// # async fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// use nullspace::{CreateOptions, Sandbox};
    /// use std::time::Duration;
    /// let mut sbx = Sandbox::create(config, &CreateOptions::new("base").wait_ready(false)).await?;
    /// // ... other work while it boots ...
    /// sbx.wait_ready(Duration::from_secs(60)).await?;
    /// sbx.commands().run("echo ready").await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut state = String::from("not yet read");
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A single slow answer must not carry the wait past its deadline.
            if let Ok(found) = tokio::time::timeout(left, self.get_info()).await {
                let info = found?;
                match info.state.as_str() {
                    "running" => {
                        if info.runtime.is_some() {
                            self.runtime = info.runtime;
                        }
                        return Ok(());
                    }
                    "error" | "deleted" => return Err(failed(&info)),
                    _ => state = info.state,
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Error::local(
                    "timeout",
                    format!(
                        "sandbox {} was not running after {:.1} s (last seen: {state}); wait longer, or read its logs and timeline (get_info) for what holds it up",
                        self.id,
                        timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(left.min(Duration::from_millis(200))).await;
        }
    }

    /// Whether it is running now.
    pub async fn is_running(&self) -> Result<bool> {
        Ok(self.get_info().await?.state == "running")
    }

    /// Ends it. `true` if this call ended it, `false` if it was already gone (the API
    /// answers a second delete with `not_found`).
    pub async fn kill(&self) -> Result<bool> {
        match self.control(reqwest::Method::DELETE, "", None).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets its timeout to `seconds` from now.
    pub async fn set_timeout(&self, seconds: u64) -> Result<()> {
        self.control(
            reqwest::Method::POST,
            "timeout",
            Some(json!({ "timeout": seconds })),
        )
        .await
        .map(drop)
    }

    /// Replaces its egress policy; a running sandbox follows it at once (open
    /// connections it no longer allows are reset).
    pub async fn set_egress(&self, policy: &api_model::EgressPolicy) -> Result<SandboxInfo> {
        let body = serde_json::to_value(policy).map_err(|e| Error::Protocol(e.to_string()))?;
        info(
            self.control(reqwest::Method::PUT, "egress", Some(body))
                .await?,
        )
    }

    /// Extends its life by `duration` seconds from now (default: its timeout).
    pub async fn refresh(&self, duration: Option<u64>) -> Result<()> {
        let body = duration.map_or_else(|| json!({}), |d| json!({ "duration": d }));
        self.control(reqwest::Method::POST, "refreshes", Some(body))
            .await
            .map(drop)
    }

    /// Pauses it: memory and disk kept in a snapshot, the VM ended.
    pub async fn pause(&self) -> Result<()> {
        self.control(reqwest::Method::POST, "pause", Some(json!({})))
            .await
            .map(drop)
    }

    /// Resumes it; data-plane access is refreshed.
    pub async fn resume(&mut self) -> Result<()> {
        let v = self
            .control(reqwest::Method::POST, "resume", Some(json!({})))
            .await?;
        self.runtime = info(v)?.runtime;
        Ok(())
    }

    /// Pauses it into object storage (hibernates): any worker sharing the store can
    /// resume or restore it.
    pub async fn hibernate(&self) -> Result<()> {
        self.control(reqwest::Method::POST, "hibernate", Some(json!({})))
            .await
            .map(drop)
    }

    /// Moves it to another host of the cluster without stopping it (an operator key):
    /// to `host`, or where placement chooses. Its processes run on; command streams,
    /// terminals and previews reconnect.
    pub async fn migrate(&self, host: Option<&str>) -> Result<crate::Migration> {
        self.migrate_with(&crate::MigrateBody {
            host: host.map(str::to_string),
            ..Default::default()
        })
        .await
    }

    /// [`Sandbox::migrate`] with every option: whether the copy may switch to
    /// post-copy, and when (`postcopy_after_ms`).
    pub async fn migrate_with(&self, options: &crate::MigrateBody) -> Result<crate::Migration> {
        let body = serde_json::to_value(options)
            .map_err(|e| Error::Protocol(format!("a migration request: {e}")))?;
        let v = self
            .control(reqwest::Method::POST, "migrate", Some(body))
            .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a migration: {e}")))
    }

    /// Takes a manual snapshot to object storage; the sandbox keeps running. Manual
    /// snapshots accumulate and survive [`Sandbox::kill`]; the ID works as a template.
    pub async fn create_snapshot(&self) -> Result<SnapshotInfo> {
        snapshot_info(
            self.control(reqwest::Method::POST, "snapshots", Some(json!({})))
                .await?,
        )
    }

    /// Takes a manual snapshot and gives it `name`, unique in the team (409 if taken):
    /// [`crate::CreateOptions::snapshot_named`] starts sandboxes from it by that name.
    pub async fn snapshot_named(&self, name: &str) -> Result<Snapshot> {
        let info = snapshot_info(
            self.control(
                reqwest::Method::POST,
                "snapshots",
                Some(json!({ "name": name })),
            )
            .await?,
        )?;
        Snapshot::new(self.config.clone(), self.http.clone(), info)
    }

    /// Seed 001's `snapshot()`: takes a manual snapshot like
    /// [`Sandbox::create_snapshot`] and returns it as a [`Snapshot`] that can restore
    /// and delete itself.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let info = self.create_snapshot().await?;
        Snapshot::new(self.config.clone(), self.http.clone(), info)
    }

    /// Its snapshots (pause, periodic, manual), newest first.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Self::list_snapshots_of(&self.config, &self.id).await
    }

    /// The snapshots of any sandbox of the team, also one deleted or on another worker.
    pub async fn list_snapshots_of(
        config: &ConnectionConfig,
        sandbox_id: &str,
    ) -> Result<Vec<SnapshotInfo>> {
        let http = client(config)?;
        let v = call(
            &http,
            config,
            reqwest::Method::GET,
            &format!("/sandboxes/{sandbox_id}/snapshots"),
            None,
        )
        .await?;
        let list = v.get("snapshots").cloned().unwrap_or(Value::Null);
        serde_json::from_value(list).map_err(|e| Error::Protocol(format!("snapshots: {e}")))
    }

    /// Deletes one of its stored snapshots.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.control(
            reqwest::Method::DELETE,
            &format!("snapshots/{snapshot_id}"),
            None,
        )
        .await
        .map(drop)
    }

    /// Starts a new sandbox from a snapshot of `sandbox_id` (it may be deleted, or on
    /// another worker) and returns it connected.
    pub async fn restore(
        config: &ConnectionConfig,
        sandbox_id: &str,
        options: &RestoreOptions,
    ) -> Result<Sandbox> {
        let http = client(config)?;
        let mut body = serde_json::to_value(options).map_err(|e| Error::Protocol(e.to_string()))?;
        body["sandboxID"] = json!(sandbox_id);
        let v = call(
            &http,
            config,
            reqwest::Method::POST,
            "/sandboxes/restore",
            Some(body),
        )
        .await?;
        Ok(Self::from_info(config.clone(), http, info(v)?))
    }

    /// Branches it into `count` running children with its memory, processes and disk;
    /// it keeps running. Its read-write volumes are mounted read-only in the children
    /// (see [`Sandbox::fork_with`]).
    pub async fn fork(&self, count: u32) -> Result<Vec<Sandbox>> {
        self.fork_with(count, InheritVolumes::Readonly).await
    }

    /// [`Sandbox::fork`], saying what the children do with its read-write volumes:
    /// [`InheritVolumes::Readonly`] (the same volume, read-only: a write fails with
    /// EROFS) or [`InheritVolumes::Copy`] (each child a new volume of their content,
    /// named in its `mounts`).
    pub async fn fork_with(&self, count: u32, volumes: InheritVolumes) -> Result<Vec<Sandbox>> {
        let v = self
            .control(
                reqwest::Method::POST,
                "fork",
                Some(json!({ "count": count, "volumes": volumes })),
            )
            .await?;
        let children: Vec<SandboxInfo> =
            serde_json::from_value(v.get("sandboxes").cloned().unwrap_or(Value::Null))
                .map_err(|e| Error::Protocol(format!("fork children: {e}")))?;
        Ok(children
            .into_iter()
            .map(|c| Self::from_info(self.config.clone(), self.http.clone(), c))
            .collect())
    }

    /// Commands in the sandbox.
    pub fn commands(&self) -> Commands<'_> {
        Commands { sandbox: self }
    }

    /// Its filesystem.
    pub fn files(&self) -> Files<'_> {
        Files { sandbox: self }
    }

    /// A data-plane request to `path` under this sandbox's base URL.
    pub(crate) fn data(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder> {
        let rt = self.runtime.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "no data-plane access for {}: connect to it first (it may be paused)",
                self.id
            ))
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", rt.target.base_url))
            .bearer_auth(&rt.token))
    }
}
