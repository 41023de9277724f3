//! The live side of a sandbox: its lifecycle event stream (reconnecting, resuming after
//! the last event it yielded), interactive terminals, directory watches, and preview
//! URLs.

use crate::sandbox::call;
use crate::{Error, Result, Sandbox};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// One lifecycle event: the API's own shape.
pub use api_model::Event;

/// Where an event stream starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventStreamOptions {
    /// Only events after this ID.
    pub after_event_id: Option<u64>,
    /// Skip the replay of past events (reconnects still resume after the last event
    /// yielded).
    pub live_only: bool,
}

/// A sandbox's lifecycle events as they happen. It reconnects by itself (also across a
/// restart of the pool manager) and resumes after the last event it yielded: no gap, no
/// duplicate.
pub struct EventStream {
    rx: mpsc::Receiver<Result<Event>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventStream {
    /// The next event; `None` once the sandbox is gone (deleted) or the stream gave up.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.rx.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Output of a terminal, or its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Bytes the terminal wrote.
    Output(Vec<u8>),
    /// Its process ended.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An interactive terminal in a sandbox.
pub struct Pty {
    socket: Socket,
    ended: bool,
}

impl Pty {
    /// Sends keystrokes (bytes) to the terminal.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.socket
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .map_err(ws_error)
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let msg = serde_json::json!({ "type": "resize", "cols": cols, "rows": rows });
        self.socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .map_err(ws_error)
    }

    /// The next output or the exit; `None` after the exit.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        while !self.ended {
            match self.socket.next().await? {
                Ok(Message::Binary(b)) => return Some(Ok(PtyEvent::Output(b.to_vec()))),
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["type"] == "exit" {
                        self.ended = true;
                        return Some(Ok(PtyEvent::Exit {
                            exit_code: v["exitCode"].as_i64().map(|c| c as i32),
                            signal: v["signal"].as_i64().map(|c| c as i32),
                        }));
                    }
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(ws_error(e))),
            }
        }
        None
    }

    /// Closes the terminal (its session gets a hangup).
    pub async fn close(mut self) -> Result<()> {
        self.socket.close(None).await.map_err(ws_error)
    }
}

/// A change in a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// `create`, `write`, `remove`, `rename` or `chmod`.
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    /// For a rename: the old path.
    #[serde(default)]
    pub from: Option<String>,
    /// Whether the path is a directory.
    #[serde(default)]
    pub dir: bool,
}

/// A directory watch: [`Watch::next`] yields changes until it is dropped.
pub struct Watch {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    pending: Vec<u8>,
}

impl Watch {
    /// The next change; `None` if the watch ended (the sandbox stopped).
    pub async fn next(&mut self) -> Option<Result<FsEvent>> {
        loop {
            if let Some(n) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=n).collect();
                return Some(
                    serde_json::from_slice(&line[..n])
                        .map_err(|e| Error::Protocol(format!("a watch event: {e}"))),
                );
            }
            match self.body.next().await? {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

/// A preview URL of a port and its proxy target: the API's own shapes.
pub use api_model::{Preview, ProxyTarget};

/// `url` with any preview token replaced by `REDACTED`, for logs.
pub fn redact_preview_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k == "ns_preview_token" => format!("{k}=REDACTED"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// A token with all but its first 6 characters hidden, for logs.
pub fn redact_preview_token(token: &str) -> String {
    let shown: String = token.chars().take(6).collect();
    format!("{shown}…REDACTED")
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> Error {
    Error::Protocol(format!("websocket: {e}"))
}

/// `http(s)://` → `ws(s)://`.
fn ws_url(http: &str) -> String {
    if let Some(rest) = http.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", http.trim_start_matches("http://"))
    }
}

impl Sandbox {
    async fn open_ws(&self, path: &str, bearer: &str) -> Result<Socket> {
        let base = self
            .runtime
            .as_ref()
            .map(|r| r.target.base_url.clone())
            .ok_or_else(|| {
                Error::Config(format!(
                    "no data-plane access for {}: connect to it first (it may be paused)",
                    self.id()
                ))
            })?;
        ws_connect(&format!("{}{path}", ws_url(&base)), bearer).await
    }

    /// Opens an interactive terminal (the default user's login shell) of this size.
    pub async fn pty(&self, cols: u16, rows: u16) -> Result<Pty> {
        let token = self
            .runtime
            .as_ref()
            .map(|r| r.token.clone())
            .unwrap_or_default();
        let socket = self
            .open_ws(&format!("/pty?cols={cols}&rows={rows}"), &token)
            .await?;
        Ok(Pty {
            socket,
            ended: false,
        })
    }

    /// Follows the sandbox's lifecycle events (see [`EventStream`]). Every event type is
    /// passed through, those of a security policy included: `sandbox.audit` (`data`
    /// `{"records": [...], "total": n}`: up to 20 records with detections or not allowed,
    /// each an [`crate::AuditRecord`] in JSON) and `sandbox.security_policy_updated`
    /// (`{"securityPolicy": {...}}`).
    pub fn stream_events(&self, options: EventStreamOptions) -> EventStream {
        let (tx, rx) = mpsc::channel(256);
        let sandbox = self.clone();
        let task = tokio::spawn(async move { follow(sandbox, options, tx).await });
        EventStream { rx, task }
    }

    /// A signed preview URL (and proxy target) for `port`.
    pub async fn get_preview_url(&self, port: u16) -> Result<Preview> {
        self.preview(serde_json::json!({ "port": port })).await
    }

    /// Seed 004's `getHost`: the host name `port` is served under
    /// (`<port>-<sandbox id>.<preview domain>`), e.g. for a `Host` header or to build a
    /// URL of your own. Port 0 is `invalid_request`.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// let host = sbx.get_host(8080).await?;
    /// println!("https://{host}/");
    /// # Ok(()) }
    /// ```
    pub async fn get_host(&self, port: u16) -> Result<String> {
        if port == 0 {
            return Err(Error::invalid(
                "port 0 is not a port; send 1 to 65535 (the port the sandbox serves on)",
            ));
        }
        Ok(self.get_preview_url(port).await?.host)
    }

    /// A target for an application proxy: forward to its URL with its token in the
    /// `x-nullspace-preview-proxy-token` header (no token in browser-visible URLs).
    pub async fn create_preview_proxy_target(&self, port: u16) -> Result<ProxyTarget> {
        Ok(self.get_preview_url(port).await?.proxy_target)
    }

    /// Makes `port` reachable without a token (or private again).
    pub async fn set_port_public(&self, port: u16, public: bool) -> Result<Preview> {
        self.preview(serde_json::json!({ "port": port, "public": public }))
            .await
    }

    async fn preview(&self, body: serde_json::Value) -> Result<Preview> {
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::POST,
            &format!("/sandboxes/{}/previews", self.id()),
            Some(body),
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a preview: {e}")))
    }
}

impl crate::Files<'_> {
    /// Watches a directory (everything under it with `recursive`).
    pub async fn watch_dir(&self, path: &str, recursive: bool) -> Result<Watch> {
        let resp = self
            .sandbox
            .data(reqwest::Method::GET, "/files/watch")?
            .query(&[
                ("path", path),
                ("recursive", if recursive { "true" } else { "false" }),
            ])
            // A watch lasts as long as the caller wants.
            .timeout(std::time::Duration::from_secs(365 * 24 * 3600))
            .send()
            .await?;
        let resp = crate::error::check(resp).await?;
        Ok(Watch {
            body: resp.bytes_stream().boxed(),
            pending: Vec::new(),
        })
    }
}

async fn ws_connect(url: &str, bearer: &str) -> Result<Socket> {
    let mut request = url
        .into_client_request()
        .map_err(|e| Error::Config(format!("{url}: {e}")))?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {bearer}")
            .parse()
            .map_err(|_| Error::Config("a token that is not a header value".into()))?,
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            Err(crate::error::api_error(
                resp.status().as_u16(),
                &String::from_utf8_lossy(body),
            ))
        }
        Err(e) => Err(ws_error(e)),
    }
}

/// Connects, yields, reconnects after the last yielded event until the receiver goes.
async fn follow(
    mut sandbox: Sandbox,
    options: EventStreamOptions,
    tx: mpsc::Sender<Result<Event>>,
) {
    let mut last = options.after_event_id;
    let mut backoff = std::time::Duration::from_millis(100);
    let mut failures = 0;
    loop {
        let query = match (last, options.live_only) {
            (Some(after), _) => format!("?after_event_id={after}"),
            (None, true) => "?live_only=true".to_string(),
            (None, false) => String::new(),
        };
        let key = sandbox.config.api_key.clone();
        match sandbox
            .open_ws(&format!("/lifecycle/ws{query}"), &key)
            .await
        {
            Ok(mut socket) => {
                failures = 0;
                backoff = std::time::Duration::from_millis(100);
                while let Some(msg) = socket.next().await {
                    match msg {
                        Ok(Message::Text(t)) => {
                            let Ok(event) = serde_json::from_str::<Event>(t.as_str()) else {
                                continue;
                            };
                            // Never a duplicate, whatever the server resends.
                            if last.is_some_and(|l| event.id <= l) {
                                continue;
                            }
                            last = Some(event.id);
                            let deleted = event.kind == "sandbox.deleted";
                            if tx.send(Ok(event)).await.is_err() || deleted {
                                return;
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if matches!(&e, Error::Api { status, .. } if *status == 401 || *status == 403 || *status == 404)
                    || failures > 60
                {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        // The data plane may have moved (a restarted pool manager): ask the API.
        if let Ok(info) = Sandbox::get_info_by_id(&sandbox.config, sandbox.id()).await {
            if let Some(rt) = info.runtime {
                sandbox.runtime = Some(rt);
            }
        }
    }
}

/// One resource sample: the API's own shape.
pub use api_model::MetricSample as Metric;

/// Seed 001's name of a resource sample ([`Metric`]).
pub type SandboxMetrics = Metric;

pub use crate::time::MetricsTime;

/// A sample's timestamp as a [`std::time::SystemTime`] (the sample type is the API's
/// shape, so the helper is a trait: `use nullspace::MetricTimestamp`).
pub trait MetricTimestamp {
    /// When the sample was taken.
    fn time(&self) -> std::time::SystemTime;
}

impl MetricTimestamp for Metric {
    fn time(&self) -> std::time::SystemTime {
        crate::time::unix_to_system_time(self.timestamp)
    }
}

/// A recording of a sandbox ([`Sandbox::recordings`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// Its ID, for [`Sandbox::recording`].
    #[serde(rename = "recordingID")]
    pub recording_id: String,
    /// `commands` (JSON lines) or `pty` (asciicast v2).
    pub kind: String,
    pub size_bytes: u64,
    /// ISO 8601.
    pub created_at: String,
}

/// One line of a sandbox's logs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LogLine {
    #[serde(default)]
    pub time: Option<String>,
    /// `console`, `lifecycle`, `diagnostic`, `start` (the template's start command) or
    /// `process` (a background command).
    pub source: String,
    /// The process of a `start` or `process` line.
    #[serde(default)]
    pub pid: Option<u32>,
    /// `stdout` or `stderr`, for a `start` or `process` line.
    #[serde(default)]
    pub stream: Option<String>,
    pub text: String,
}

impl Sandbox {
    /// Resource samples (seed 001's `SandboxMetrics`) from `start` to `end`: Unix
    /// seconds or [`std::time::SystemTime`] (see [`MetricsTime`]). `start` defaults to
    /// the sandbox's creation, `end` to now (both decided by the server). Samples are
    /// kept for the sandbox's whole life: every 5 s for the last hour, coarser before.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// use nullspace::MetricTimestamp;
    /// use std::time::{Duration, SystemTime};
    /// let since = SystemTime::now() - Duration::from_secs(600);
    /// for m in sbx.get_metrics(Some(since.into()), None).await? {
    ///     println!("{:?}: {:.1}% CPU, {} MiB", m.time(), m.cpu_used_pct, m.mem_used_mib);
    /// }
    /// let all = sbx.get_metrics(None, None).await?; // its whole life
    /// # Ok(()) }
    /// ```
    pub async fn get_metrics(
        &self,
        start: Option<MetricsTime>,
        end: Option<MetricsTime>,
    ) -> Result<Vec<Metric>> {
        let mut q = Vec::new();
        if let Some(s) = start {
            q.push(format!("start={}", s.unix_seconds()));
        }
        if let Some(e) = end {
            q.push(format!("end={}", e.unix_seconds()));
        }
        let query = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::GET,
            &format!("/sandboxes/{}/metrics{query}", self.id()),
            None,
        )
        .await?;
        serde_json::from_value(v["metrics"].clone())
            .map_err(|e| Error::Protocol(format!("metrics: {e}")))
    }

    /// All its logs, every page: boot console, lifecycle events, the diagnostic of a
    /// failure, and the output of the start command and background commands.
    pub async fn logs(&self) -> Result<Vec<LogLine>> {
        let (mut all, mut next) = self.logs_page(0, None).await?;
        while let Some(offset) = next {
            let (page, more) = self.logs_page(offset, None).await?;
            all.extend(page);
            next = more;
        }
        Ok(all)
    }

    /// Its recordings (created with [`crate::CreateOptions::recording`]), also after it
    /// ended.
    pub async fn recordings(&self) -> Result<Vec<Recording>> {
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::GET,
            &format!("/sandboxes/{}/recordings", self.id()),
            None,
        )
        .await?;
        serde_json::from_value(v["recordings"].clone())
            .map_err(|e| Error::Protocol(format!("recordings: {e}")))
    }

    /// A recording's bytes: JSON lines of commands (`kind` `commands`), or an asciicast
    /// v2 terminal session (`pty`).
    pub async fn recording(&self, recording_id: &str) -> Result<Vec<u8>> {
        let resp = self
            .http
            .get(self.config.url(&format!(
                "/sandboxes/{}/recordings/{recording_id}",
                self.id()
            )))
            .header("X-API-Key", &self.config.api_key)
            .send()
            .await?;
        Ok(crate::error::check(resp).await?.bytes().await?.to_vec())
    }

    /// One page of its logs from line `offset` (at most `limit`, 1 to 1000), and the
    /// offset of the next page if there is more.
    pub async fn logs_page(
        &self,
        offset: usize,
        limit: Option<usize>,
    ) -> Result<(Vec<LogLine>, Option<usize>)> {
        let limit = limit.map_or(String::new(), |l| format!("&limit={l}"));
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::GET,
            &format!("/sandboxes/{}/logs?offset={offset}{limit}", self.id()),
            None,
        )
        .await?;
        let lines = serde_json::from_value(v["logs"].clone())
            .map_err(|e| Error::Protocol(format!("logs: {e}")))?;
        Ok((lines, v["next"].as_u64().map(|n| n as usize)))
    }

    /// A raw connection to `port` inside the sandbox as a WebSocket of binary messages
    /// (what `nullspace sandbox proxy` carries SSH over).
    pub async fn connect_port(&self, port: u16) -> Result<PortConnection> {
        let token = self
            .runtime
            .as_ref()
            .map(|r| r.token.clone())
            .unwrap_or_default();
        Ok(PortConnection {
            socket: self.open_ws(&format!("/ports/{port}/ws"), &token).await?,
        })
    }
}

/// A TCP connection to a port inside a sandbox.
pub struct PortConnection {
    socket: Socket,
}

impl PortConnection {
    /// Copies between this connection and a local reader/writer (stdin/stdout, say)
    /// until either side ends.
    pub async fn pipe(
        self,
        mut input: impl tokio::io::AsyncRead + Unpin,
        mut output: impl tokio::io::AsyncWrite + Unpin,
    ) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sink, mut stream) = self.socket.split();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = input.read(&mut buf) => match n? {
                    0 => {
                        let _ = sink.send(Message::Close(None)).await;
                        // Drain what the far side still sends.
                        while let Some(Ok(Message::Binary(b))) = stream.next().await {
                            output.write_all(&b).await?;
                        }
                        output.flush().await?;
                        return Ok(());
                    }
                    n => sink.send(Message::Binary(buf[..n].to_vec().into())).await.map_err(ws_error)?,
                },
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        output.write_all(&b).await?;
                        output.flush().await?;
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Err(e)) => return Err(ws_error(e)),
                    _ => {}
                },
            }
        }
    }
}
