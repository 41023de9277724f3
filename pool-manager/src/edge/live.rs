//! The data plane's long-lived streams: the lifecycle event stream, terminals and port
//! proxies over WebSocket (which a wasi:http component cannot serve), and directory
//! watches as NDJSON.

use super::{Edge, JsonErr};
use crate::error::{agent_error, ApiError};
use crate::sandboxes::recording::PtyLog;
use agent_client::{ProcessEvent, PtyOptions};
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Keep-alive pings on idle WebSockets (proxies drop silent connections).
const PING_EVERY: Duration = Duration::from_secs(20);

impl Edge {
    /// Who may follow a sandbox's events: its team's API key, or its runtime token.
    fn authorize_events(&self, headers: &HeaderMap, id: &str) -> Result<(), ApiError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // An API key (the control API's own check) or else a runtime token.
        if headers.contains_key("x-api-key") || bearer.is_some_and(|b| b.starts_with("ns_")) {
            let team = crate::api::team(&self.manager, headers)?;
            self.manager.owned(&team, id).map(drop)
        } else {
            self.authorize(headers, id).map(drop)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    #[serde(default)]
    after_event_id: Option<u64>,
    #[serde(default)]
    live_only: Option<bool>,
}

/// `GET /v1/sandboxes/{id}/lifecycle/ws`: the event log after `after_event_id` (all of
/// it by default; none with `live_only=true`), then live events, one JSON text message
/// each, in order, without gaps or duplicates.
pub(super) async fn lifecycle_ws(
    State(edge): State<Edge>,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<EventsQuery>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    edge.authorize_events(&headers, &id)?;
    let catalog_last = edge.manager.catalog.last_event_id(&id)?;
    let after = match (q.live_only.unwrap_or(false), q.after_event_id) {
        // Live only: nothing before now, unless the caller resumes after a known event.
        (true, None) => catalog_last,
        (_, Some(after)) => after,
        (false, None) => 0,
    };
    Ok(ws
        .protocols([super::WS_PROTOCOL])
        .on_upgrade(move |socket| follow_events(edge, id, after, socket)))
}

async fn follow_events(edge: Edge, id: String, mut after: u64, mut socket: WebSocket) {
    let catalog = &edge.manager.catalog;
    // Subscribed before the first read: an event appended in between is not missed.
    let mut appended = catalog.subscribe_events();
    loop {
        let events = match catalog.events(&id, after, 500) {
            Ok(e) => e,
            Err(e) => {
                // The catalog is away for a moment (a restart, a failover): the stream
                // waits for it rather than ending; the client may still leave.
                tracing::debug!(sandbox = %id, error = %e, "event stream: the catalog did not answer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    msg = socket.recv() => match msg {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                        _ => continue,
                    },
                }
            }
        };
        for e in &events {
            let text = serde_json::to_string(e).expect("json");
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
            after = e.id;
        }
        if events.len() == 500 {
            continue;
        }
        // Wait for this sandbox's next event (a lagging receiver re-reads the log).
        loop {
            tokio::select! {
                got = appended.recv() => match got {
                    Ok(sandbox) if sandbox != id && sandbox != crate::catalog::ANY_SANDBOX => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => continue,
                },
                _ = tokio::time::sleep(PING_EVERY) => {
                    if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PtyQuery {
    #[serde(default)]
    cols: Option<u16>,
    #[serde(default)]
    rows: Option<u16>,
    /// A command line instead of the user's login shell.
    #[serde(default)]
    cmd: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    /// Attach to this terminal (its process's PID, from the `x-nullspace-pty-pid`
    /// header of the upgrade that opened it) instead of opening one.
    #[serde(default)]
    pid: Option<u32>,
}

/// The upgrade answer's header naming the terminal's process, for `?pid=` later.
const PTY_PID: &str = "x-nullspace-pty-pid";

/// `GET /v1/sandboxes/{id}/pty`: a terminal over WebSocket. Binary messages are the
/// terminal's bytes both ways; a text message `{"type":"resize","cols":C,"rows":R}`
/// resizes it; the last message is `{"type":"exit","exitCode":N,"signal":S}`. The
/// first message is `{"type":"started","pid":N}` and the upgrade's answer names the
/// terminal's process too (`x-nullspace-pty-pid`): when the
/// socket ends without an exit (the sandbox moved to another host, its host restarted),
/// `?pid=` attaches to the same terminal again, its output meanwhile first (up to 1 MiB;
/// within 120 s, after which the terminal gets a hangup). A socket the client closes
/// hangs the terminal up.
pub(super) async fn pty_ws(
    State(edge): State<Edge>,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PtyQuery>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    if q.pid.is_some() && (q.cmd.is_some() || q.user.is_some() || q.cwd.is_some()) {
        return Err(ApiError::bad_request(
            "pid attaches to a terminal opened earlier, which has its command, user and cwd; send pid alone (with cols and rows), or cmd, user and cwd without pid",
        ));
    }
    let (agent, env, recorder) = edge.recorded_agent(&headers, &id).await?;
    let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    let command = q.cmd.clone();
    let process = match q.pid {
        // Its size stays unless asked.
        Some(pid) => agent
            .pty_attach(pid, q.cols.zip(q.rows))
            .await
            .map_err(agent_error)?,
        None => {
            let options = PtyOptions {
                command: q.cmd,
                cols,
                rows,
                env,
                user: q.user,
                cwd: q.cwd,
            };
            agent.pty(options).await.map_err(agent_error)?
        }
    };
    let pid = process.pid();
    // A recorded sandbox's session is an asciicast of its own.
    let log = recorder.and_then(|r| r.pty_opened(cols, rows, command.as_deref()));
    // An open terminal keeps the sandbox from idling.
    let busy = edge.manager.activity.busy(&id);
    let mut answer = ws
        .protocols([super::WS_PROTOCOL])
        .on_upgrade(move |socket| async move {
            let _busy = busy;
            terminal(process, socket, log, pid).await
        });
    answer
        .headers_mut()
        .insert(PTY_PID, axum::http::HeaderValue::from(pid));
    Ok(answer)
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TerminalControl {
    Resize { cols: u16, rows: u16 },
}

/// Bridges a terminal and its WebSocket; `log` (a recorded sandbox's) gets the bytes
/// both ways and the resizes.
async fn terminal(
    mut process: agent_client::Process,
    mut socket: WebSocket,
    mut log: Option<PtyLog>,
    pid: u32,
) {
    // First, which terminal this is (a browser cannot read the upgrade's headers).
    let started = json!({ "type": "started", "pid": pid });
    if socket
        .send(Message::Text(started.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            event = process.next_event() => match event {
                Ok(Some(ProcessEvent::Stdout(b))) | Ok(Some(ProcessEvent::Stderr(b))) => {
                    if let Some(l) = log.as_mut() {
                        l.output(&b);
                    }
                    if socket.send(Message::Binary(b.into())).await.is_err() {
                        return;
                    }
                }
                Ok(Some(ProcessEvent::Exited(s))) => {
                    let exit = json!({ "type": "exit", "exitCode": s.code, "signal": s.signal });
                    let _ = socket.send(Message::Text(exit.to_string().into())).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                _ => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            msg = socket.recv() => match msg {
                // Keystrokes are not recorded: with echo off they are passwords (sudo,
                // passwd), and what the terminal echoes is in the output anyway.
                Some(Ok(Message::Binary(b))) if process.write_stdin(&b).await.is_err() => return,
                Some(Ok(Message::Text(t))) => {
                    if let Ok(TerminalControl::Resize { cols, rows }) = serde_json::from_str(t.as_str()) {
                        if let Some(l) = log.as_mut() {
                            l.resized(cols, rows);
                        }
                        let _ = process.resize(cols, rows).await;
                    }
                }
                // The user left: the terminal's session gets a hangup (the stream's cancel).
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
}

/// `GET /v1/sandboxes/{id}/ports/{port}/ws`: a raw TCP connection to a port inside the
/// sandbox, as binary WebSocket messages (what `nullspace sandbox proxy` and SSH's
/// ProxyCommand ride on).
pub(super) async fn port_ws(
    State(edge): State<Edge>,
    Path((id, port)): Path<(String, u16)>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let tunnel = agent.connect_port(port).await.map_err(agent_error)?;
    let busy = edge.manager.activity.busy(&id);
    Ok(ws
        .protocols([super::WS_PROTOCOL])
        .on_upgrade(move |socket| async move {
            let _busy = busy;
            bridge_port(tunnel, socket).await
        }))
}

async fn bridge_port(tunnel: tokio::io::DuplexStream, mut socket: WebSocket) {
    let (mut from_port, mut to_port) = tokio::io::split(tunnel);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = from_port.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    if socket.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) if to_port.write_all(&b).await.is_err() => return,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = to_port.shutdown().await;
                    return;
                }
                _ => {}
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// `GET /v1/sandboxes/{id}/files/watch?path=&recursive=`: one JSON event per line
/// (`{"type":"create|write|remove|rename|chmod","path",...}`) until the caller
/// disconnects.
pub(super) async fn watch(
    State(edge): State<Edge>,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<WatchQuery>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let watch = agent
        .watch_dir(&q.path, q.recursive)
        .await
        .map_err(agent_error)?;
    let lines = futures::stream::unfold(Some(watch), |watch| async move {
        let mut watch = watch?;
        match watch.next().await {
            Ok(Some(event)) => {
                let line = format!("{}\n", serde_json::to_string(&event).expect("json"));
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), Some(watch)))
            }
            // Ended (or the VM went away): the response ends; the caller may watch again.
            Ok(None) | Err(_) => None,
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("a valid response"))
}
