//! HTTP callers of the control API (internal or public) and of a sandbox's data plane.

use crate::Daemon;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A caller of the internal API with one key (a team's or the operator's).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
}

/// The small shape tests use.
pub fn small() -> Value {
    json!({ "vcpus": 1, "memMiB": 512, "diskSizeMiB": 1024 })
}

impl Api {
    pub fn new(daemon: &Daemon, key: String) -> Self {
        Self::at(&daemon.control, key)
    }

    /// A caller of the API whose `/v1/...` routes live under `base` (the pool manager's
    /// URL, or the public API's URL + `/api`).
    pub fn at(base: &str, key: String) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            base: base.to_string(),
            key,
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("X-API-Key", &self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create(&self, body: Value) -> Value {
        let (status, v) = self
            .call(reqwest::Method::POST, "/v1/sandboxes", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn get(&self, id: &str) -> Value {
        let (status, v) = self.fetch(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// GET on the control API.
    pub async fn fetch(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Deletes a sandbox.
    pub async fn delete(&self, id: &str) -> StatusCode {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None,
        )
        .await
        .0
    }

    /// Polls a sandbox until `state`, failing after `within`.
    pub async fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.get(id).await;
            if v["state"] == state {
                return v;
            }
            assert!(Instant::now() < deadline, "{id} never became {state}: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The data plane of one sandbox, with its runtime token.
pub struct Runtime {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Runtime {
    pub fn of(sandbox: &Value) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: sandbox["runtime"]["target"]["baseUrl"]
                .as_str()
                .unwrap()
                .to_string(),
            token: sandbox["runtime"]["token"].as_str().unwrap().to_string(),
        }
    }

    /// POSTs JSON to a data-plane path (relative to the sandbox's base URL).
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Writes `data` to `path` in the sandbox (panics unless it is written).
    pub async fn put_file(&self, path: &str, data: &[u8]) {
        let resp = self
            .http
            .put(format!("{}/files?path={path}", self.base))
            .bearer_auth(&self.token)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "writing {path}");
    }

    /// Reads file `path` from the sandbox, if it is there.
    pub async fn read_file(&self, path: &str) -> Option<Vec<u8>> {
        let resp = self.get(&format!("/files?path={path}")).await;
        resp.status().is_success().then_some(())?;
        Some(resp.bytes().await.ok()?.to_vec())
    }

    /// GETs a data-plane path.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// Runs a shell command; returns (stdout, stderr, exit code).
    pub async fn run(&self, cmd: &str) -> (String, String, i64) {
        let resp = self
            .http
            .post(format!("{}/commands", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "cmd": cmd }))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await.unwrap();
        let (mut out, mut err, mut code) = (String::new(), String::new(), -1);
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            match v["event"].as_str().unwrap() {
                "stdout" => out.push_str(v["data"].as_str().unwrap()),
                "stderr" => err.push_str(v["data"].as_str().unwrap()),
                "exit" => code = v["exitCode"].as_i64().unwrap_or(-1),
                _ => {}
            }
        }
        (out, err, code)
    }
}

/// The host (its name in `hosts`: name and edge URL) whose edge serves `view`'s runtime.
pub fn owner_of<'a>(view: &Value, hosts: &[(&'a str, String)]) -> &'a str {
    let base = view["runtime"]["target"]["baseUrl"]
        .as_str()
        .unwrap_or_default();
    hosts
        .iter()
        .find(|(_, edge)| base.starts_with(edge.as_str()))
        .map(|(name, _)| *name)
        .unwrap_or_else(|| panic!("no host's edge serves {view}"))
}

/// A sandbox created through `api` (`body`) that placement put on host `on`: others
/// are deleted and the create sent again, up to 8 times.
pub async fn create_on(api: &Api, on: &str, hosts: &[(&str, String)], body: Value) -> Value {
    for _ in 0..8 {
        let sbx = api.create(body.clone()).await;
        if owner_of(&sbx, hosts) == on {
            return sbx;
        }
        api.delete(sbx["sandboxID"].as_str().unwrap()).await;
    }
    panic!("no create landed on {on}");
}

/// A WebSocket client's connection.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `http_url` (its `ws://` form) with `headers`, opened within 30 s.
pub async fn websocket(http_url: &str, headers: &[(&str, &str)]) -> Ws {
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        try_websocket(http_url, headers),
    )
    .await
    .expect("the WebSocket opens within 30 s")
    .unwrap_or_else(|e| panic!("{http_url}: {e}"))
}

/// One try at [`websocket`]: the handshake's error if it is refused.
pub async fn try_websocket(http_url: &str, headers: &[(&str, &str)]) -> Result<Ws, String> {
    try_websocket_answered(http_url, headers)
        .await
        .map(|(ws, _)| ws)
}

/// [`try_websocket`], with the headers of the upgrade's answer.
pub async fn try_websocket_answered(
    http_url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, reqwest::header::HeaderMap), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = http_url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(
            name.parse::<reqwest::header::HeaderName>().unwrap(),
            value.parse().unwrap(),
        );
    }
    let (ws, answer) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| e.to_string())?;
    let mut got = reqwest::header::HeaderMap::new();
    for (name, value) in answer.headers() {
        if let (Ok(n), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(name.as_str().as_bytes()),
            reqwest::header::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            got.append(n, v);
        }
    }
    Ok((ws, got))
}

/// [`try_websocket`] until it opens (a server still starting, an owner's address still
/// cached elsewhere), for up to 30 s.
pub async fn websocket_when_ready(http_url: &str, headers: &[(&str, &str)]) -> Ws {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            try_websocket(http_url, headers),
        )
        .await
        {
            Ok(Ok(ws)) => return ws,
            Ok(Err(e)) if std::time::Instant::now() > deadline => panic!("{http_url}: {e}"),
            Err(_) if std::time::Instant::now() > deadline => {
                panic!("{http_url}: no handshake within 30 s")
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// Reads messages until `done` says so (returning that one), for up to 60 s.
pub async fn read_ws_until(
    ws: &mut Ws,
    mut done: impl FnMut(tokio_tungstenite::tungstenite::Message) -> bool,
) -> String {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the awaited message within 60 s")
            .expect("the socket open")
            .expect("a message");
        let text = format!("{msg:?}");
        if done(msg) {
            return text;
        }
    }
}
