//! The data-plane edge (`openapi/dataplane.yaml`): commands and files of one sandbox,
//! reached with the runtime token from create/connect. Output streams as NDJSON while the
//! command runs; file bodies stream in both directions.
//!
//! A token opens the sandbox only while it is of the sandbox's current runtime epoch
//! (see `tokens`): each request reads the sandbox's record once, for that check and for
//! the state and environment the request needs.

use crate::error::{agent_error, ApiError};
use crate::model::{InternalState, SandboxRecord};
use crate::sandboxes::recording::{CommandLog, CommandStart, Recorder};
use crate::sandboxes::{Manager, Wake, WAKE_WINDOW};
use crate::tokens::{runtime_epoch, TokenError, TokenSigner};
use agent_client::{AgentClient, ProcessEvent, StdinWriter};
use agent_protocol::{Command, ExecRequest};
use api_model::parse_body;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

mod live;

/// Edge state: the manager, the token checker, and stdin writers of running commands.
#[derive(Clone)]
pub struct Edge {
    manager: Arc<Manager>,
    tokens: TokenSigner,
    stdin: Arc<Mutex<HashMap<(String, u32), StdinWriter>>>,
}

/// The router.
pub fn router(manager: Arc<Manager>, tokens: TokenSigner) -> Router {
    let owner_routing = axum::middleware::from_fn_with_state(
        (manager.clone(), crate::cluster::routing::Face::Edge),
        crate::cluster::routing::to_owner,
    );
    let cors_manager = manager.clone();
    let edge = Edge {
        manager,
        tokens,
        stdin: Arc::default(),
    };
    Router::new()
        .route("/v1/sandboxes/{id}/commands", post(run).get(list_commands))
        .route("/v1/sandboxes/{id}/commands/{pid}", get(attach))
        .route("/v1/sandboxes/{id}/commands/{pid}/stdin", post(stdin))
        .route("/v1/sandboxes/{id}/commands/{pid}/signal", post(signal))
        .route(
            "/v1/sandboxes/{id}/files",
            get(download).put(upload).delete(remove),
        )
        .route("/v1/sandboxes/{id}/files/list", get(list_dir))
        .route("/v1/sandboxes/{id}/files/stat", get(stat))
        .route("/v1/sandboxes/{id}/files/presign", post(presign::issue))
        .route(
            "/v1/sandboxes/{id}/files/presigned",
            get(presign::download).put(presign::upload),
        )
        .route("/v1/sandboxes/{id}/files/mkdir", post(mkdir))
        .route("/v1/sandboxes/{id}/files/rename", post(rename))
        .route("/v1/sandboxes/{id}/files/watch", get(live::watch))
        .route("/v1/sandboxes/{id}/lifecycle/ws", get(live::lifecycle_ws))
        .route("/v1/sandboxes/{id}/pty", get(live::pty_ws))
        .route("/v1/sandboxes/{id}/ports/{port}/ws", get(live::port_ws))
        .fallback(|| async { ApiError::not_found("route", "this path") })
        .layer(owner_routing)
        .layer(axum::middleware::map_request(credential_from_subprotocol))
        .layer(dashboard_cors(cors_manager))
        .with_state(edge)
}

/// The WebSocket subprotocol every upgrade answers with: a browser that offers
/// subprotocols (to carry its credential, below) fails a handshake that selects none.
pub(crate) const WS_PROTOCOL: &str = "nullspace.v1";

/// The prefix of the subprotocol that carries a browser's credential: browsers cannot
/// set headers on a WebSocket, and a credential in the URL would end up in logs and
/// history. `new WebSocket(url, ["nullspace.v1", "nullspace.auth." + token])`.
const AUTH_PROTOCOL_PREFIX: &str = "nullspace.auth.";

/// A request without `Authorization` whose offered subprotocols carry a credential gets
/// it as `Authorization: Bearer` (then every check, and a forward to the owner host,
/// sees one kind of request).
async fn credential_from_subprotocol(mut req: axum::extract::Request) -> axum::extract::Request {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return req;
    }
    let credential = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(AUTH_PROTOCOL_PREFIX))
        .and_then(|c| axum::http::HeaderValue::from_str(&format!("Bearer {c}")).ok());
    if let Some(value) = credential {
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    req
}

/// CORS for the dashboard: cross-origin calls (files, commands) are allowed from the
/// public API's origin only (`--public-url`, which serves `/dashboard/`), read per
/// request since that origin is known once the public listener is bound.
fn dashboard_cors(manager: Arc<Manager>) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.as_bytes() == manager.public_url().as_bytes()
        }))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([
            header::CONTENT_DISPOSITION,
            header::CONTENT_LENGTH,
            HeaderName::from_static("retry-after"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

mod presign;

/// An extractor whose rejection is the one JSON error body instead of axum's text.
pub struct JsonErr<E>(pub E);

impl<S, E> axum::extract::FromRequestParts<S> for JsonErr<E>
where
    S: Send + Sync,
    E: axum::extract::FromRequestParts<S>,
    E::Rejection: std::fmt::Display,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match E::from_request_parts(parts, state).await {
            Ok(v) => Ok(JsonErr(v)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "{rejection}; see openapi/dataplane.yaml for this route's parameters"
            ))),
        }
    }
}

impl Edge {
    /// Checks the runtime token and returns the sandbox's agent and env vars. A paused
    /// sandbox with autoResume is woken first (seed 000: SDK calls wake it, as preview
    /// traffic does); one still waking after [`WAKE_WINDOW`] is a 503 with Retry-After.
    async fn agent(
        &self,
        headers: &HeaderMap,
        id: &str,
    ) -> Result<(AgentClient, BTreeMap<String, String>), ApiError> {
        let record = self.authorize(headers, id)?;
        self.agent_of(record).await
    }

    /// The agent of sandbox `record` (a caller already checked a credential for it),
    /// waking it if it is paused with autoResume.
    async fn agent_of(
        &self,
        record: SandboxRecord,
    ) -> Result<(AgentClient, BTreeMap<String, String>), ApiError> {
        let id = record.id.as_str();
        self.manager.activity.touch(id);
        let agent = if record.state == InternalState::Stopped && record.auto_resume {
            self.wake(&record).await?
        } else {
            match self.manager.running_agent(&record).await {
                Ok(agent) => agent,
                // Paused between the read and the lock (the idle sweeper, say): an
                // autoResume sandbox is woken rather than refused.
                Err(e) if record.auto_resume => {
                    let now = self.manager.catalog.sandbox(id)?.ok_or(e)?;
                    self.wake(&now).await?
                }
                Err(e) => return Err(e),
            }
        };
        Ok((agent, record.env_vars))
    }

    /// Wakes paused autoResume sandbox `record` for a data-plane call: its agent, or a
    /// 503 with Retry-After while it is still waking.
    async fn wake(&self, record: &SandboxRecord) -> Result<AgentClient, ApiError> {
        match self
            .manager
            .wake_agent(record, WAKE_WINDOW, "data-plane")
            .await
        {
            Ok(agent) => Ok(agent),
            Err(Wake::Unavailable(why)) => Err(ApiError::new(503, "sandbox_unavailable", why)
                .with_details(serde_json::json!({ "retryAfterS": 5 }))),
            Err(Wake::Gone(e)) => Err(e),
        }
    }

    /// Like [`Edge::agent`], with the sandbox's recorder if it is recorded.
    async fn recorded_agent(
        &self,
        headers: &HeaderMap,
        id: &str,
    ) -> Result<(AgentClient, BTreeMap<String, String>, Option<Arc<Recorder>>), ApiError> {
        let record = self.authorize(headers, id)?;
        let recorder = self.manager.recordings.recorder(&record).await;
        let (agent, env) = self.agent_of(record).await?;
        Ok((agent, env, recorder))
    }

    /// Checks that the request carries a current runtime token of sandbox `id`, and
    /// returns the sandbox's record (read here, once per request, after the token's
    /// signature passed: a forged token costs no catalog read).
    fn authorize(&self, headers: &HeaderMap, id: &str) -> Result<SandboxRecord, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("send the runtime token as Authorization: Bearer")
            })?;
        let issued = self
            .tokens
            .verify(token.trim(), id, chrono::Utc::now().timestamp())
            .map_err(runtime_token_refused)?;
        // A deleted sandbox answers exactly as one that never existed (or whose record
        // was pruned): its tokens end with it.
        let record = self.live_record(id)?.ok_or_else(|| {
                ApiError::unauthorized(format!(
                    "the runtime token is refused: sandbox {id} does not exist (or was deleted); create a new one"
                ))
            })?;
        if issued != runtime_epoch(&record) {
            return Err(runtime_token_refused(TokenError::Revoked));
        }
        Ok(record)
    }

    /// The record of sandbox `id` unless it is deleted (or being deleted): a deleted
    /// sandbox answers as one that never existed, and every credential of it ends.
    fn live_record(&self, id: &str) -> Result<Option<SandboxRecord>, ApiError> {
        Ok(self
            .manager
            .catalog
            .sandbox(id)?
            .filter(|r| !matches!(r.state, InternalState::Deleted | InternalState::Destroying)))
    }
}

/// The answer to a runtime token that is refused.
fn runtime_token_refused(e: TokenError) -> ApiError {
    match e {
        TokenError::Revoked => ApiError::new(
            401,
            "token_revoked",
            "the runtime token was replaced: connect issued a newer one, which ends the older ones; use the newest token, or call connect for a fresh one",
        ),
        TokenError::OtherSandbox => {
            ApiError::forbidden("this runtime token belongs to another sandbox")
        }
        e => ApiError::unauthorized(format!(
            "the runtime token is refused ({e}); call connect for a fresh one"
        )),
    }
}

/// A command to run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// A shell command line.
    #[serde(default)]
    cmd: Option<String>,
    /// Or a program and its arguments.
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    stdin: bool,
}

fn ndjson_line(v: Value) -> Bytes {
    let mut line = serde_json::to_vec(&v).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn output_line(stream: &str, bytes: &[u8]) -> Bytes {
    match std::str::from_utf8(bytes) {
        Ok(text) => ndjson_line(json!({ "event": stream, "data": text })),
        Err(_) => ndjson_line(json!({
            "event": stream,
            "dataBase64": base64::engine::general_purpose::STANDARD.encode(bytes)
        })),
    }
}

/// Streams a process's events as NDJSON until it exits or detaches; the sandbox counts
/// as busy (never idle) while the stream lasts. A recorded sandbox's `log` gets each
/// event as it passes (an attach to a background command records its output too).
fn stream_process(
    edge: &Edge,
    id: &str,
    process: agent_client::Process,
    log: Option<CommandLog>,
) -> Response {
    let busy = edge.manager.activity.busy(id);
    let pid = process.pid();
    let key = (id.to_string(), pid);
    edge.stdin
        .lock()
        .unwrap()
        .insert(key.clone(), process.stdin());
    let stdin_map = edge.stdin.clone();
    let start = futures::stream::once(async move {
        Ok::<Bytes, std::io::Error>(ndjson_line(json!({ "event": "start", "pid": pid })))
    });
    let events = futures::stream::unfold(
        Some((process, stdin_map, key, busy, log)),
        |state| async move {
            let (mut process, stdin_map, key, busy, log) = state?;
            let log_ref = log.as_ref();
            let line = match process.next_event().await {
                Ok(Some(ProcessEvent::Stdout(b))) => {
                    log_ref.inspect(|l| l.output("stdout", &b));
                    output_line("stdout", &b)
                }
                Ok(Some(ProcessEvent::Stderr(b))) => {
                    log_ref.inspect(|l| l.output("stderr", &b));
                    output_line("stderr", &b)
                }
                Ok(Some(ProcessEvent::Exited(s))) => {
                    stdin_map.lock().unwrap().remove(&key);
                    log_ref.inspect(|l| l.exited(s.code, s.signal));
                    return Some((
                        Ok(ndjson_line(
                            json!({ "event": "exit", "exitCode": s.code, "signal": s.signal }),
                        )),
                        None,
                    ));
                }
                Ok(Some(ProcessEvent::Detached)) | Ok(None) => {
                    stdin_map.lock().unwrap().remove(&key);
                    log_ref.inspect(|l| l.detached());
                    return Some((Ok(ndjson_line(json!({ "event": "detached" }))), None));
                }
                Err(e) => {
                    stdin_map.lock().unwrap().remove(&key);
                    let err = agent_error(e);
                    log_ref.inspect(|l| l.failed(&err.message));
                    return Some((
                        Ok(ndjson_line(
                            json!({ "event": "error", "code": err.code, "message": err.message }),
                        )),
                        None,
                    ));
                }
            };
            Some((Ok(line), Some((process, stdin_map, key, busy, log))))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(start.chain(events)))
        .expect("response")
}

async fn run(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (agent, sandbox_env, recorder) = edge.recorded_agent(&headers, &id).await?;
    let b: RunBody = parse_body(&body)?;
    let command = match (b.cmd, b.argv) {
        (Some(cmd), None) => Command::Shell(cmd),
        (None, Some(argv)) => Command::Argv(argv),
        _ => {
            return Err(ApiError::bad_request(
                "send exactly one of `cmd` (a shell command line) or `argv` (a program and its arguments)",
            ))
        }
    };
    // The sandbox's envVars apply to every command; the command's own envs win.
    let mut env = sandbox_env;
    env.extend(b.envs);
    // What the transcript says of the command (never its environment: secrets live
    // there).
    let asked = recorder
        .as_ref()
        .map(|_| (command.clone(), b.cwd.clone(), b.user.clone()));
    let started = agent
        .exec(ExecRequest {
            command,
            env,
            cwd: b.cwd,
            user: b.user,
            background: b.background,
            stdin: b.stdin,
            // A background command starts detached, so all of its output waits in its
            // backlog for whoever attaches.
            attach: !b.background,
        })
        .await
        .map_err(agent_error);
    let log = recorder.zip(asked).map(|(recorder, (command, cwd, user))| {
        let log = recorder.command_started(CommandStart {
            pid: started.as_ref().ok().map(|p| p.pid()),
            command: &command,
            cwd: cwd.as_deref(),
            user: user.as_deref(),
            background: b.background,
        });
        if let Err(e) = &started {
            log.failed(&e.message);
        }
        log
    });
    let process = started?;
    if b.background {
        return Ok((StatusCode::CREATED, Json(json!({ "pid": process.pid() }))).into_response());
    }
    Ok(stream_process(&edge, &id, process, log))
}

async fn list_commands(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    Ok(Json(
        json!({ "processes": agent.processes().await.map_err(agent_error)? }),
    ))
}

async fn attach(
    State(edge): State<Edge>,
    headers: HeaderMap,
    JsonErr(Path((id, pid))): JsonErr<Path<(String, u32)>>,
) -> Result<Response, ApiError> {
    let (agent, _, recorder) = edge.recorded_agent(&headers, &id).await?;
    let process = agent.attach(pid).await.map_err(agent_error)?;
    let log = recorder.map(|r| r.command_attached(pid));
    Ok(stream_process(&edge, &id, process, log))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinQuery {
    #[serde(default)]
    eof: bool,
}

async fn stdin(
    State(edge): State<Edge>,
    headers: HeaderMap,
    JsonErr(Path((id, pid))): JsonErr<Path<(String, u32)>>,
    JsonErr(Query(q)): JsonErr<Query<StdinQuery>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    edge.agent(&headers, &id).await?;
    let writer = edge
        .stdin
        .lock()
        .unwrap()
        .get(&(id.clone(), pid))
        .cloned()
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "process {pid} has no open stdin here; start it with \"stdin\": true and keep its output stream (or an attach) open"
            ))
        })?;
    if !body.is_empty() {
        writer.write(&body).await.map_err(agent_error)?;
    }
    if q.eof {
        writer.close().await.map_err(agent_error)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: i32,
}

async fn signal(
    State(edge): State<Edge>,
    headers: HeaderMap,
    JsonErr(Path((id, pid))): JsonErr<Path<(String, u32)>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let b: SignalBody = parse_body(&body)?;
    agent.signal(pid, b.signal).await.map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

async fn download(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PathQuery>>,
) -> Result<Response, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    stream_download(&agent, &q.path).await
}

/// A file of the sandbox as a streamed response body.
async fn stream_download(agent: &AgentClient, path: &str) -> Result<Response, ApiError> {
    let mut download = agent.download(path).await.map_err(agent_error)?;
    // The first chunk (or error) decides the status; the rest streams.
    let first = download.chunk().await.map_err(agent_error)?;
    let head = futures::stream::iter(first.map(|c| Ok::<Bytes, std::io::Error>(Bytes::from(c))));
    let rest = futures::stream::unfold(download, |mut d| async move {
        match d.chunk().await {
            Ok(Some(c)) => Some((Ok(Bytes::from(c)), d)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), d)),
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(head.chain(rest)))
        .expect("response"))
}

async fn upload(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PathQuery>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let mode = q
        .mode
        .as_deref()
        .map(|m| {
            u32::from_str_radix(m, 8).map_err(|_| {
                ApiError::bad_request(format!("mode {m:?} is not octal; send e.g. 644"))
            })
        })
        .transpose()?;
    stream_upload(&agent, &q.path, mode, q.user.as_deref(), body).await
}

/// Writes a request body to a file of the sandbox (atomically: the agent replaces it).
async fn stream_upload(
    agent: &AgentClient,
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let mut upload = agent.upload(path, mode, user).await.map_err(agent_error)?;
    let mut body = body.into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading the upload body: {e}")))?;
        upload.send(&chunk).await.map_err(agent_error)?;
    }
    let bytes = upload.finish().await.map_err(agent_error)?;
    Ok(Json(json!({ "path": path, "bytes": bytes })))
}

async fn remove(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PathQuery>>,
) -> Result<StatusCode, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    agent.remove(&q.path).await.map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_dir(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PathQuery>>,
) -> Result<Json<Value>, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    Ok(Json(
        json!({ "entries": agent.list_dir(&q.path).await.map_err(agent_error)? }),
    ))
}

async fn stat(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PathQuery>>,
) -> Result<Json<Value>, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    Ok(Json(
        serde_json::to_value(agent.stat(&q.path).await.map_err(agent_error)?).expect("json"),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[serde(default)]
    user: Option<String>,
}

async fn mkdir(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let b: MkdirBody = parse_body(&body)?;
    agent
        .mkdir(&b.path, b.user.as_deref())
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    from: String,
    to: String,
}

async fn rename(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let (agent, _) = edge.agent(&headers, &id).await?;
    let b: RenameBody = parse_body(&body)?;
    agent.rename(&b.from, &b.to).await.map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}
