//! Nullspace's public control-plane API (`/api/v1`) as a stateless wasi:http component.
//!
//! Every request is checked here — API key present and well formed, path and method,
//! query parameters, body size, JSON, stale and unknown fields, ranges — and only a
//! request that passes is forwarded to a pool manager's internal API (`/v1/...`), with the
//! caller's key, which the pool manager resolves to a team. The component keeps nothing
//! between requests: one instance serves one request.
//!
//! The upstream is `NULLSPACE_UPSTREAM` in the component's environment at run time
//! (wasi:cli/environment; default `http://127.0.0.1:7070`), so one `.wasm` serves every
//! deployment: Spin passes a component's `environment` (spin.toml), `wasmtime serve -Scli
//! --env NULLSPACE_UPSTREAM=URL` its `--env`. Our api-host gives the component an empty
//! environment and sends every outbound request to its own `--pool-manager` whatever the
//! authority.

use api_model::{
    fields_param, is_recording_id, is_sandbox_id, is_snapshot_id, parse_body, parse_query,
    reject_unknown_params, ApiError, BuildLogParams, CreateRequest, EgressPolicy, EventsParams,
    ForkBody, ListParams, MetricsParams, MigrateBody, PreviewBody, RefreshBody, RestoreBody,
    TemplateBuildRequest, TimeoutBody, VolumeCreateRequest, WarmPoolBody, MAX_BODY_BYTES,
};
use spin_sdk::http::{
    Fields, IncomingRequest, IncomingResponse, Method, OutgoingResponse, Request, Response,
    ResponseOutparam,
};
use spin_sdk::http_component;

mod dashboard;

/// The pool manager's internal API when the environment names none.
const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:7070";

/// The environment variable that names the upstream.
const UPSTREAM_VAR: &str = "NULLSPACE_UPSTREAM";

/// The upstream this instance forwards to: `NULLSPACE_UPSTREAM` from the host's
/// environment (unset or empty: the default).
fn upstream() -> Result<String, ApiError> {
    upstream_from(environment())
}

/// The component's environment: wasi:cli/environment, imported directly (the preview1
/// *proxy* adapter answers `environ_get` with nothing, so `std::env` sees none of it).
#[cfg(target_arch = "wasm32")]
fn environment() -> Vec<(String, String)> {
    wasi::cli::environment::get_environment()
}

/// The process's environment, for the routing tests on the build host.
#[cfg(not(target_arch = "wasm32"))]
fn environment() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// `NULLSPACE_UPSTREAM` of `env`, checked: an `http://` or `https://` base URL without
/// query, its trailing slashes dropped.
fn upstream_from(env: Vec<(String, String)>) -> Result<String, ApiError> {
    let value = env
        .into_iter()
        .find(|(k, _)| k == UPSTREAM_VAR)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    if value.is_empty() {
        return Ok(DEFAULT_UPSTREAM.to_string());
    }
    let base = value.trim_end_matches('/');
    let authority = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .map(|rest| rest.split('/').next().unwrap_or_default());
    match authority {
        Some(a) if !a.is_empty() && !base.contains(['?', '#', ' ']) => Ok(base.to_string()),
        _ => Err(ApiError::upstream(format!(
            "the component's {UPSTREAM_VAR} {value:?} is not an http:// or https:// URL: \
             fix the deployment's environment (e.g. {DEFAULT_UPSTREAM})"
        ))),
    }
}

/// The public OpenAPI document, served at `/api/v1/openapi.json`.
const OPENAPI: &str = include_str!("../openapi.json");

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    let whole = match serve(req).await {
        Ok(Answer::Whole(resp)) => resp,
        Ok(Answer::Stream(upstream)) => return stream_through(upstream, out).await,
        Err(e) => error_response(&e),
    };
    let mut whole = whole;
    let body = std::mem::take(whole.body_mut());
    match OutgoingResponse::try_from(whole) {
        Ok(resp) => {
            if let Err(e) = out.set_with_body(resp, body).await {
                eprintln!("writing the response failed: {e}");
            }
        }
        Err(e) => eprintln!("making the response failed: {e}"),
    }
}

/// What the component answers: a whole response (JSON, small), or an upstream answer
/// whose body is streamed through as it comes (a recording: up to the 64 MiB a sandbox
/// records, more than an instance's memory should hold).
enum Answer {
    Whole(Response),
    Stream(IncomingResponse),
}

/// The headers of a streamed answer that are passed on.
const STREAMED_HEADERS: &[&str] = &["content-type", "content-length", "content-disposition"];

/// Sends `upstream`'s status, [`STREAMED_HEADERS`] and body on, chunk by chunk. An
/// upstream that fails mid-body ends the body short of its declared length, which the
/// client sees as an error (never as a whole, shorter recording).
async fn stream_through(upstream: IncomingResponse, out: ResponseOutparam) {
    use futures::{SinkExt, StreamExt};
    let headers = upstream.headers();
    let mut pass: Vec<(String, Vec<u8>)> = Vec::new();
    for name in STREAMED_HEADERS {
        for value in headers.get(&name.to_string()) {
            pass.push((name.to_string(), value));
        }
    }
    drop(headers);
    let resp = match Fields::from_list(&pass) {
        Ok(fields) => OutgoingResponse::new(fields),
        Err(e) => {
            eprintln!("passing the upstream's headers on failed: {e:?}");
            OutgoingResponse::new(Fields::new())
        }
    };
    if resp.set_status_code(upstream.status()).is_err() {
        eprintln!("the upstream answered status {}", upstream.status());
    }
    let mut sink = resp.take_body();
    out.set(resp);
    // `upstream` stays alive while its body is read: dropping it cancels the request.
    let mut body = upstream.take_body_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                if sink.send(bytes).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                eprintln!("the upstream's body failed: {e:?}");
                return;
            }
        }
    }
    let _ = sink.close().await;
}

/// A body that must be empty or `{}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// A checked request, ready to forward.
struct Forward {
    method: Method,
    path: String,
    body: Vec<u8>,
    /// Its answer's body is streamed through, not read whole (a recording's bytes).
    stream: bool,
}

async fn serve(req: IncomingRequest) -> Result<Answer, ApiError> {
    let method = req.method();
    let path_with_query = req.path_with_query().unwrap_or_default();
    let (path, query) = match path_with_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_with_query.clone(), None),
    };
    if let Some(page) = dashboard::serve(&method, &path) {
        return Ok(Answer::Whole(page));
    }
    let segments: Vec<&str> = path
        .strip_prefix("/api/v1")
        .map(|rest| rest.split('/').filter(|s| !s.is_empty()).collect())
        .ok_or_else(unknown_route)?;

    // Routes that need no key.
    match (&method, segments.as_slice()) {
        (Method::Get, ["openapi.json"]) => {
            return Ok(Answer::Whole(json_response(
                200,
                OPENAPI.as_bytes().to_vec(),
            )))
        }
        (Method::Get, ["health"]) => {
            return Ok(Answer::Whole(json_response(
                200,
                br#"{"status":"ok"}"#.to_vec(),
            )))
        }
        _ => {}
    }

    let headers = req.headers();
    let header = |name: &str| -> Option<String> {
        headers
            .get(&name.to_string())
            .into_iter()
            .next()
            .and_then(|v| String::from_utf8(v).ok())
    };
    let (x_api_key, authorization) = (header("x-api-key"), header("authorization"));
    let key = api_model::api_key(|name| match name {
        "x-api-key" => x_api_key.as_deref(),
        "authorization" => authorization.as_deref(),
        _ => None,
    })?
    .to_string();
    let declared = header("content-length").and_then(|l| l.trim().parse::<usize>().ok());
    if declared.is_some_and(|l| l > MAX_BODY_BYTES) {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    drop(headers);
    let body = read_body(req).await?;
    let pairs = parse_query(query.as_deref());

    let forward = route(&method, &segments, &pairs, body)?;
    let base = upstream()?;
    let url = match &query {
        Some(q) if !q.is_empty() => format!("{base}{}?{q}", forward.path),
        _ => format!("{base}{}", forward.path),
    };
    let outbound = Request::builder()
        .method(forward.method)
        .uri(url)
        .header("x-api-key", key)
        // A declared length lets both hosts write head and body at once: chunked
        // encoding costs a second write, and a second wake-up of the other side.
        .header("content-type", "application/json")
        .header("content-length", forward.body.len().to_string())
        .body(forward.body)
        .build();
    let unanswered = |e: spin_sdk::http::SendError| {
        ApiError::upstream(format!(
            "the pool manager did not answer ({e}); try again, and check that it runs"
        ))
    };
    if forward.stream {
        let upstream: IncomingResponse =
            spin_sdk::http::send(outbound).await.map_err(unanswered)?;
        if upstream.status() == 200 {
            return Ok(Answer::Stream(upstream));
        }
        // A refusal is a small JSON error: answered whole, as any other.
        let status = upstream.status();
        let body = upstream.into_body().await.map_err(|e| {
            ApiError::upstream(format!("reading the pool manager's answer failed: {e:?}"))
        })?;
        return Ok(Answer::Whole(json_response(status, body)));
    }
    let upstream: Response = spin_sdk::http::send(outbound).await.map_err(unanswered)?;
    let status = *upstream.status();
    // A rate-limited create says when to come back; the header is all clients read.
    let retry_after = upstream
        .header("retry-after")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut response = json_response(status, upstream.into_body());
    if let Some(v) = retry_after {
        response.set_header("retry-after", v);
    }
    Ok(Answer::Whole(response))
}

/// Checks a request against its route; returns what to send upstream.
fn route(
    method: &Method,
    segments: &[&str],
    pairs: &[(String, String)],
    body: Vec<u8>,
) -> Result<Forward, ApiError> {
    let forward = |method: Method, path: String, body: Vec<u8>| Forward {
        method,
        path,
        body,
        stream: false,
    };
    let no_query = || reject_unknown_params(pairs, &[]);
    match segments {
        ["sandboxes"] => match method {
            Method::Post => {
                no_query()?;
                let create: CreateRequest = parse_body(&body)?;
                create.validate()?;
                Ok(forward(Method::Post, "/v1/sandboxes".into(), body))
            }
            Method::Get => {
                ListParams::parse(pairs)?;
                empty_body(&body)?;
                Ok(forward(Method::Get, "/v1/sandboxes".into(), Vec::new()))
            }
            _ => Err(not_allowed(method, "/api/v1/sandboxes", &["POST", "GET"])),
        },
        ["sandboxes", "restore"] => {
            if *method != Method::Post {
                return Err(not_allowed(method, "/api/v1/sandboxes/restore", &["POST"]));
            }
            no_query()?;
            parse_body::<RestoreBody>(&body)?.validate()?;
            Ok(forward(Method::Post, "/v1/sandboxes/restore".into(), body))
        }
        ["sandboxes", id] => {
            let id = sandbox_id(id)?;
            let path = format!("/v1/sandboxes/{id}");
            match method {
                Method::Get => {
                    reject_unknown_params(pairs, &["fields"])?;
                    fields_param(pairs)?;
                    empty_body(&body)?;
                    Ok(forward(Method::Get, path, Vec::new()))
                }
                Method::Delete => {
                    no_query()?;
                    empty_body(&body)?;
                    Ok(forward(Method::Delete, path, Vec::new()))
                }
                _ => Err(not_allowed(
                    method,
                    "/api/v1/sandboxes/{id}",
                    &["GET", "DELETE"],
                )),
            }
        }
        ["sandboxes", id, action] => {
            let id = sandbox_id(id)?;
            let path = format!("/v1/sandboxes/{id}/{action}");
            if *action == "snapshots" {
                return match method {
                    Method::Post => {
                        no_query()?;
                        parse_body::<api_model::SnapshotBody>(&body)?.validate()?;
                        Ok(forward(Method::Post, path, body))
                    }
                    Method::Get => {
                        no_query()?;
                        empty_body(&body)?;
                        Ok(forward(Method::Get, path, Vec::new()))
                    }
                    _ => Err(not_allowed(
                        method,
                        "/api/v1/sandboxes/{id}/snapshots",
                        &["POST", "GET"],
                    )),
                };
            }
            if *action == "egress" {
                if *method != Method::Put {
                    return Err(not_allowed(
                        method,
                        "/api/v1/sandboxes/{id}/egress",
                        &["PUT"],
                    ));
                }
                no_query()?;
                parse_body::<EgressPolicy>(&body)?.compile()?;
                return Ok(forward(Method::Put, path, body));
            }
            if *action == "security-policy" {
                if *method != Method::Put {
                    return Err(not_allowed(
                        method,
                        "/api/v1/sandboxes/{id}/security-policy",
                        &["PUT"],
                    ));
                }
                no_query()?;
                // The shape is the pool manager's to check (the proxy's own rules).
                let policy: serde_json::Value = parse_body(&body)?;
                if !policy.is_object() {
                    return Err(ApiError::bad_request(
                        "send the security policy as a JSON object (pii, injectionDefense, transforms, audit, envMasking)",
                    ));
                }
                return Ok(forward(Method::Put, path, body));
            }
            let allowed = match *action {
                "connect" | "access" | "pause" | "resume" | "refreshes" | "timeout"
                | "hibernate" | "fork" | "previews" | "migrate" => "POST",
                "events" | "logs" | "metrics" | "recordings" | "audit" => "GET",
                _ => return Err(unknown_route()),
            };
            if method.to_string() != allowed {
                return Err(not_allowed(
                    method,
                    &format!("/api/v1/sandboxes/{{id}}/{action}"),
                    &[allowed],
                ));
            }
            match *action {
                "events" => {
                    EventsParams::parse(pairs)?;
                }
                "metrics" => {
                    MetricsParams::parse(pairs)?;
                }
                "logs" => {
                    api_model::SandboxLogParams::parse(pairs)?;
                }
                "audit" => {
                    api_model::AuditParams::parse(pairs)?;
                }
                "recordings" => no_query()?,
                _ => {}
            }
            if allowed == "GET" {
                empty_body(&body)?;
                return Ok(forward(Method::Get, path, Vec::new()));
            }
            no_query()?;
            match *action {
                "connect" => {
                    parse_body::<TimeoutBody>(&body)?.checked()?;
                }
                "timeout" => {
                    parse_body::<TimeoutBody>(&body)?
                        .checked()?
                        .ok_or_else(|| {
                            ApiError::bad_request(
                                "timeout is required; send {\"timeout\": seconds}",
                            )
                        })?;
                }
                "refreshes" => {
                    parse_body::<RefreshBody>(&body)?.checked()?;
                }
                "fork" => {
                    parse_body::<ForkBody>(&body)?.validate()?;
                }
                "previews" => {
                    parse_body::<PreviewBody>(&body)?.validate()?;
                }
                "migrate" => {
                    parse_body::<MigrateBody>(&body)?.validate()?;
                }
                _ => {
                    parse_body::<NoFields>(&body)?;
                }
            }
            Ok(forward(Method::Post, path, body))
        }
        ["observability", "summary"] => {
            if *method != Method::Get {
                return Err(not_allowed(
                    method,
                    "/api/v1/observability/summary",
                    &["GET"],
                ));
            }
            no_query()?;
            empty_body(&body)?;
            Ok(forward(
                Method::Get,
                "/v1/observability/summary".into(),
                Vec::new(),
            ))
        }
        ["templates"] => {
            no_query()?;
            create_or_list(
                method,
                body,
                "/v1/templates".into(),
                "/api/v1/templates",
                |b| parse_body::<TemplateBuildRequest>(b)?.validate().map(drop),
            )
        }
        ["templates", template] => {
            let template = template_id(template)?;
            no_query()?;
            get_or_delete(
                method,
                &body,
                format!("/v1/templates/{template}"),
                "/api/v1/templates/{id}",
            )
        }
        ["volumes"] => {
            no_query()?;
            create_or_list(method, body, "/v1/volumes".into(), "/api/v1/volumes", |b| {
                parse_body::<VolumeCreateRequest>(b)?.validate().map(drop)
            })
        }
        ["volumes", volume] => {
            // A volume ID, or a name: the same characters as a template's.
            let volume = template_id(volume).map_err(|_| ApiError::not_found("volume", volume))?;
            no_query()?;
            get_or_delete(
                method,
                &body,
                format!("/v1/volumes/{volume}"),
                "/api/v1/volumes/{id}",
            )
        }
        ["templates", template, "logs"] => {
            let template = template_id(template)?;
            if *method != Method::Get {
                return Err(not_allowed(method, "/api/v1/templates/{id}/logs", &["GET"]));
            }
            BuildLogParams::parse(pairs)?;
            empty_body(&body)?;
            Ok(forward(
                Method::Get,
                format!("/v1/templates/{template}/logs"),
                Vec::new(),
            ))
        }
        ["templates", template, "warm-pool"] => {
            let template = template_id(template)?;
            let path = format!("/v1/templates/{template}/warm-pool");
            no_query()?;
            match method {
                Method::Put => {
                    parse_body::<WarmPoolBody>(&body)?.validate()?;
                    Ok(forward(Method::Put, path, body))
                }
                Method::Get => {
                    empty_body(&body)?;
                    Ok(forward(Method::Get, path, Vec::new()))
                }
                _ => Err(not_allowed(
                    method,
                    "/api/v1/templates/{id}/warm-pool",
                    &["PUT", "GET"],
                )),
            }
        }
        ["sandboxes", id, "recordings", recording] => {
            let id = sandbox_id(id)?;
            if *method != Method::Get {
                return Err(not_allowed(
                    method,
                    "/api/v1/sandboxes/{id}/recordings/{recordingID}",
                    &["GET"],
                ));
            }
            // Only names recordings are given go on: no path can hide in one.
            if !is_recording_id(recording) {
                return Err(ApiError::bad_request(format!(
                    "{recording:?} is not a recording ID: they are commands.jsonl, commands-N.jsonl or pty-N.cast (GET /api/v1/sandboxes/{{id}}/recordings lists them)"
                ))
                .with_details(serde_json::json!({ "field": "recordingID" })));
            }
            no_query()?;
            empty_body(&body)?;
            Ok(Forward {
                method: Method::Get,
                path: format!("/v1/sandboxes/{id}/recordings/{recording}"),
                body: Vec::new(),
                stream: true,
            })
        }
        ["sandboxes", id, "snapshots", snapshot] => {
            let id = sandbox_id(id)?;
            if !is_snapshot_id(snapshot) {
                return Err(ApiError::not_found("snapshot", snapshot));
            }
            if *method != Method::Delete {
                return Err(not_allowed(
                    method,
                    "/api/v1/sandboxes/{id}/snapshots/{snapshotID}",
                    &["DELETE"],
                ));
            }
            no_query()?;
            empty_body(&body)?;
            Ok(forward(
                Method::Delete,
                format!("/v1/sandboxes/{id}/snapshots/{snapshot}"),
                Vec::new(),
            ))
        }
        // Teams, quotas and keys. The pool manager decides who may: the team routes are
        // the operator's (a team key gets 403 there); the key routes act on the caller's
        // own team's keys (an operator key: on any).
        ["teams"] => {
            no_query()?;
            create_or_list(method, body, "/v1/teams".into(), "/api/v1/teams", |b| {
                parse_body::<api_model::TeamCreateRequest>(b)?.validate()
            })
        }
        ["teams", team] => {
            let team = team_ref(team)?;
            if *method != Method::Get {
                return Err(not_allowed(method, "/api/v1/teams/{team}", &["GET"]));
            }
            no_query()?;
            empty_body(&body)?;
            Ok(forward(
                Method::Get,
                format!("/v1/teams/{team}"),
                Vec::new(),
            ))
        }
        ["teams", team, "quota"] => {
            let team = team_ref(team)?;
            let path = format!("/v1/teams/{team}/quota");
            no_query()?;
            match method {
                Method::Put => {
                    parse_body::<api_model::LimitsPatch>(&body)?.validate()?;
                    Ok(forward(Method::Put, path, body))
                }
                Method::Get => {
                    empty_body(&body)?;
                    Ok(forward(Method::Get, path, Vec::new()))
                }
                _ => Err(not_allowed(
                    method,
                    "/api/v1/teams/{team}/quota",
                    &["PUT", "GET"],
                )),
            }
        }
        ["teams", team, "keys"] => {
            let team = team_ref(team)?;
            no_query()?;
            create_or_list(
                method,
                body,
                format!("/v1/teams/{team}/keys"),
                "/api/v1/teams/{team}/keys",
                |b| parse_body::<api_model::KeyRequest>(b)?.validate(),
            )
        }
        ["keys"] => {
            no_query()?;
            create_or_list(method, body, "/v1/keys".into(), "/api/v1/keys", |b| {
                parse_body::<api_model::KeyRequest>(b)?.validate()
            })
        }
        ["keys", id] => {
            let id = key_id(id)?;
            if *method != Method::Delete {
                return Err(not_allowed(method, "/api/v1/keys/{keyID}", &["DELETE"]));
            }
            no_query()?;
            empty_body(&body)?;
            Ok(forward(
                Method::Delete,
                format!("/v1/keys/{id}"),
                Vec::new(),
            ))
        }
        ["keys", id, "rotate"] => {
            let id = key_id(id)?;
            if *method != Method::Post {
                return Err(not_allowed(
                    method,
                    "/api/v1/keys/{keyID}/rotate",
                    &["POST"],
                ));
            }
            no_query()?;
            parse_body::<api_model::RotateRequest>(&body)?.grace_s()?;
            Ok(forward(Method::Post, format!("/v1/keys/{id}/rotate"), body))
        }
        _ => Err(unknown_route()),
    }
}

/// A team by name or ID (`team-…`); anything else cannot exist, so it is a 404.
fn team_ref(team: &str) -> Result<&str, ApiError> {
    if api_model::is_team_ref(team) {
        Ok(team)
    } else {
        Err(ApiError::not_found("team", team))
    }
}

/// A key's ID: 16 lower-case hex digits (of its hash). Anything else cannot exist.
fn key_id(id: &str) -> Result<&str, ApiError> {
    if id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(ApiError::not_found("key", id).with_details(
            serde_json::json!({ "hint": "key IDs are 16 hex digits; GET /api/v1/keys lists yours" }),
        ))
    }
}

/// A sandbox ID as the pool manager issues them (`sbx-` + 20 hex digits). Anything else
/// cannot exist, so it is a 404 without a round trip.
fn sandbox_id<'a>(id: &'a str) -> Result<&'a str, ApiError> {
    if is_sandbox_id(id) {
        Ok(id)
    } else {
        Err(ApiError::not_found("sandbox", id))
    }
}

/// A template ID: 1 to 128 characters of `[A-Za-z0-9._-]` (anything else cannot exist).
fn template_id<'a>(id: &'a str) -> Result<&'a str, ApiError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(id)
    } else {
        Err(ApiError::not_found("template", id))
    }
}

fn empty_body(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(())
    } else {
        Err(ApiError::bad_request("this route takes no body; send none"))
    }
}

/// A collection's POST (a create, its body checked by `check`) or GET (a list, no body):
/// forwarded to `path`; `route` names it in a 405.
fn create_or_list(
    method: &Method,
    body: Vec<u8>,
    path: String,
    route: &str,
    check: impl FnOnce(&[u8]) -> Result<(), ApiError>,
) -> Result<Forward, ApiError> {
    match method {
        Method::Post => {
            check(&body)?;
            Ok(Forward {
                method: Method::Post,
                path,
                body,
                stream: false,
            })
        }
        Method::Get => {
            empty_body(&body)?;
            Ok(Forward {
                method: Method::Get,
                path,
                body: Vec::new(),
                stream: false,
            })
        }
        _ => Err(not_allowed(method, route, &["POST", "GET"])),
    }
}

/// A resource's GET (read) or DELETE, neither with a body.
fn get_or_delete(
    method: &Method,
    body: &[u8],
    path: String,
    route: &str,
) -> Result<Forward, ApiError> {
    empty_body(body)?;
    match method {
        Method::Get | Method::Delete => Ok(Forward {
            method: method.clone(),
            path,
            body: Vec::new(),
            stream: false,
        }),
        _ => Err(not_allowed(method, route, &["GET", "DELETE"])),
    }
}

fn unknown_route() -> ApiError {
    ApiError::new(
        404,
        "not_found",
        "no such route; see /api/v1/openapi.json for the routes",
    )
}

fn not_allowed(method: &Method, path: &str, allowed: &[&str]) -> ApiError {
    ApiError::method_not_allowed(&method.to_string(), path, allowed)
}

/// Reads the request body, refusing more than [`MAX_BODY_BYTES`] whatever the host allows.
async fn read_body(req: IncomingRequest) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    let mut stream = std::pin::pin!(req.into_body_stream());
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e:?}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::too_large(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn json_response(status: u16, body: Vec<u8>) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string())
        .body(body)
        .build()
}

fn error_response(e: &ApiError) -> Response {
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    let mut resp = Response::builder();
    resp.status(e.status)
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string());
    if e.status == 401 {
        resp.header("www-authenticate", "Bearer");
    }
    if let Some(allowed) = e.allowed_methods() {
        resp.header("allow", allowed);
    }
    resp.body(body).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_comes_from_the_environment_at_run_time() {
        let env = |v: &str| {
            vec![
                ("PATH".to_string(), "/bin".to_string()),
                (UPSTREAM_VAR.to_string(), v.to_string()),
            ]
        };
        assert_eq!(upstream_from(Vec::new()).unwrap(), DEFAULT_UPSTREAM);
        assert_eq!(upstream_from(env("")).unwrap(), DEFAULT_UPSTREAM);
        assert_eq!(
            upstream_from(env(" http://10.0.0.5:7070/ ")).unwrap(),
            "http://10.0.0.5:7070"
        );
        assert_eq!(
            upstream_from(env("https://pool.nullspace.svc:7070/base")).unwrap(),
            "https://pool.nullspace.svc:7070/base"
        );
        for bad in [
            "10.0.0.5:7070",
            "ftp://x",
            "http://",
            "http://x?y=1",
            "http:///v1",
        ] {
            let e = upstream_from(env(bad)).unwrap_err();
            assert_eq!((e.status, e.code), (502, "upstream_unavailable"), "{bad}");
            assert!(e.message.contains(UPSTREAM_VAR), "{bad}: {}", e.message);
        }
    }

    fn call(method: Method, path: &str, body: &str) -> Result<Forward, ApiError> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let pairs = parse_query(Some(query));
        route(&method, &segments, &pairs, body.as_bytes().to_vec())
    }

    fn forwarded(method: Method, path: &str, body: &str) -> (String, String) {
        let f = call(method, path, body).unwrap_or_else(|e| panic!("{path}: {e}"));
        (f.method.to_string(), f.path)
    }

    fn refused(method: Method, path: &str, body: &str) -> ApiError {
        match call(method, path, body) {
            Ok(f) => panic!("{path} was forwarded to {}", f.path),
            Err(e) => e,
        }
    }

    const KEY_ID: &str = "0123456789abcdef";

    #[test]
    fn team_quota_and_key_routes_go_to_the_pool_manager() {
        let cases = [
            (Method::Get, "teams", "", "GET", "/v1/teams"),
            (
                Method::Post,
                "teams",
                r#"{"name":"blue"}"#,
                "POST",
                "/v1/teams",
            ),
            (
                Method::Post,
                "teams",
                r#"{"name":"blue","limits":{"vcpus":8,"createBurst":5}}"#,
                "POST",
                "/v1/teams",
            ),
            (Method::Get, "teams/blue", "", "GET", "/v1/teams/blue"),
            (
                Method::Get,
                "teams/team-0123456789ab",
                "",
                "GET",
                "/v1/teams/team-0123456789ab",
            ),
            (
                Method::Get,
                "teams/blue/quota",
                "",
                "GET",
                "/v1/teams/blue/quota",
            ),
            (
                Method::Put,
                "teams/blue/quota",
                r#"{"memoryMiB":4096,"createsPerMinute":0}"#,
                "PUT",
                "/v1/teams/blue/quota",
            ),
            (
                Method::Get,
                "teams/blue/keys",
                "",
                "GET",
                "/v1/teams/blue/keys",
            ),
            (
                Method::Post,
                "teams/blue/keys",
                "",
                "POST",
                "/v1/teams/blue/keys",
            ),
            (
                Method::Post,
                "teams/blue/keys",
                r#"{"role":"team"}"#,
                "POST",
                "/v1/teams/blue/keys",
            ),
            (Method::Get, "keys", "", "GET", "/v1/keys"),
            (Method::Post, "keys", "{}", "POST", "/v1/keys"),
            (
                Method::Delete,
                "keys/0123456789abcdef",
                "",
                "DELETE",
                "/v1/keys/0123456789abcdef",
            ),
            (
                Method::Post,
                "keys/0123456789abcdef/rotate",
                "",
                "POST",
                "/v1/keys/0123456789abcdef/rotate",
            ),
            (
                Method::Post,
                "keys/0123456789abcdef/rotate",
                r#"{"graceSeconds":604800}"#,
                "POST",
                "/v1/keys/0123456789abcdef/rotate",
            ),
        ];
        for (method, path, body, want_method, want_path) in cases {
            assert_eq!(
                forwarded(method, path, body),
                (want_method.to_string(), want_path.to_string()),
                "{path}"
            );
        }
    }

    #[test]
    fn wrong_methods_are_405_with_allow() {
        let cases = [
            (Method::Delete, "teams", "POST, GET"),
            (Method::Put, "teams/blue", "GET"),
            (Method::Post, "teams/blue/quota", "PUT, GET"),
            (Method::Delete, "teams/blue/keys", "POST, GET"),
            (Method::Put, "keys", "POST, GET"),
            (Method::Get, "keys/0123456789abcdef", "DELETE"),
            (Method::Get, "keys/0123456789abcdef/rotate", "POST"),
        ];
        for (method, path, allow) in cases {
            let e = refused(method, path, "");
            assert_eq!((e.status, e.code), (405, "method_not_allowed"), "{path}");
            assert_eq!(e.allowed_methods().as_deref(), Some(allow), "{path}");
        }
    }

    #[test]
    fn ids_that_cannot_exist_are_404_without_a_round_trip() {
        for path in [
            "keys/0123456789abcde",
            "keys/0123456789abcdef0",
            "keys/0123456789ABCDEF",
            "keys/0123456789abcdeg/rotate",
            "teams/blue%20team",
            "teams/blue:1/quota",
        ] {
            let method = if path.starts_with("keys/") && !path.ends_with("rotate") {
                Method::Delete
            } else if path.ends_with("rotate") {
                Method::Post
            } else {
                Method::Get
            };
            let e = refused(method, path, "");
            assert_eq!((e.status, e.code), (404, "not_found"), "{path}");
        }
        let long = format!("teams/{}/keys", "a".repeat(65));
        assert_eq!(refused(Method::Get, &long, "").status, 404);
        let ok = format!("teams/{}/keys", "a".repeat(64));
        assert_eq!(forwarded(Method::Get, &ok, "").1, format!("/v1/{ok}"));
        // Unknown sub-routes stay 404.
        assert_eq!(refused(Method::Get, "teams/blue/members", "").status, 404);
        assert_eq!(
            refused(Method::Get, &format!("keys/{KEY_ID}/x"), "").status,
            404
        );
    }

    #[test]
    fn bodies_and_queries_are_checked_before_they_go_upstream() {
        let bad = |method: Method, path: &str, body: &str, needle: &str| {
            let e = refused(method, path, body);
            assert_eq!(
                (e.status, e.code),
                (400, "invalid_request"),
                "{path} {body}"
            );
            assert!(e.message.contains(needle), "{path} {body}: {}", e.message);
            e
        };
        // Teams.
        bad(Method::Post, "teams", "", "name");
        bad(Method::Post, "teams", r#"{"name":""}"#, "1-64");
        bad(Method::Post, "teams", r#"{"name":"a b"}"#, "1-64");
        bad(Method::Post, "teams", r#"{"name":"operator"}"#, "reserved");
        bad(Method::Post, "teams", r#"{"name":"team-x"}"#, "reserved");
        bad(Method::Post, "teams", r#"{"name":"b","quota":{}}"#, "quota");
        bad(
            Method::Post,
            "teams",
            r#"{"name":"b","limits":{}}"#,
            "at least one",
        );
        bad(Method::Get, "teams?all=1", "", "all");
        bad(Method::Get, "teams/blue", "{}", "no body");
        // Quotas.
        bad(Method::Put, "teams/blue/quota", "{}", "at least one");
        bad(Method::Put, "teams/blue/quota", r#"{"cpus":4}"#, "cpus");
        bad(Method::Put, "teams/blue/quota", r#"{"vcpus":-1}"#, "u64");
        bad(
            Method::Put,
            "teams/blue/quota",
            r#"{"vcpus":1.5}"#,
            "invalid body",
        );
        let e = bad(
            Method::Put,
            "teams/blue/quota",
            r#"{"diskMiB":1099511627777}"#,
            "beyond",
        );
        assert_eq!(e.details["field"], "diskMiB");
        forwarded(
            Method::Put,
            "teams/blue/quota",
            r#"{"diskMiB":1099511627776}"#,
        );
        bad(
            Method::Put,
            "teams/blue/quota",
            r#"{"createBurst":0,"createsPerMinute":5}"#,
            "createBurst",
        );
        forwarded(
            Method::Put,
            "teams/blue/quota",
            r#"{"createBurst":0,"createsPerMinute":0}"#,
        );
        bad(Method::Put, "teams/blue/quota", "[]", "JSON object");
        // Keys.
        bad(
            Method::Post,
            "keys",
            r#"{"role":"operator"}"#,
            "operator keys",
        );
        bad(
            Method::Post,
            "teams/blue/keys",
            r#"{"role":"admin"}"#,
            "role",
        );
        bad(Method::Post, "keys", r#"{"name":"ci"}"#, "name");
        bad(Method::Get, "keys?team=blue", "", "team");
        bad(Method::Delete, &format!("keys/{KEY_ID}"), "{}", "no body");
        let rotate = format!("keys/{KEY_ID}/rotate");
        let e = bad(
            Method::Post,
            &rotate,
            r#"{"graceSeconds":604801}"#,
            "604800",
        );
        assert_eq!(e.details["field"], "graceSeconds");
        bad(Method::Post, &rotate, r#"{"graceSeconds":-1}"#, "u64");
        bad(Method::Post, &rotate, r#"{"grace":10}"#, "grace");
        forwarded(Method::Post, &rotate, r#"{"graceSeconds":0}"#);
    }

    #[test]
    fn recordings_are_listed_and_streamed_and_only_their_names_go_upstream() {
        let sbx = "sbx-0123456789abcdef0123";
        assert_eq!(
            forwarded(Method::Get, &format!("sandboxes/{sbx}/recordings"), ""),
            ("GET".into(), format!("/v1/sandboxes/{sbx}/recordings"))
        );
        for id in ["commands.jsonl", "commands-2.jsonl", "pty-1.cast"] {
            let f = call(Method::Get, &format!("sandboxes/{sbx}/recordings/{id}"), "").unwrap();
            assert_eq!(f.path, format!("/v1/sandboxes/{sbx}/recordings/{id}"));
            assert!(f.stream, "{id}: its body is streamed through");
        }
        let listed = call(Method::Get, &format!("sandboxes/{sbx}/recordings"), "").unwrap();
        assert!(!listed.stream);
        for bad in [
            "..%2F..",
            "..",
            "meta.json",
            "pty-0.cast",
            "commands",
            "pty-1.cast%00",
        ] {
            let e = refused(
                Method::Get,
                &format!("sandboxes/{sbx}/recordings/{bad}"),
                "",
            );
            assert_eq!((e.status, e.code), (400, "invalid_request"), "{bad}");
            assert_eq!(e.details["field"], "recordingID", "{bad}");
        }
        let e = refused(
            Method::Delete,
            &format!("sandboxes/{sbx}/recordings/pty-1.cast"),
            "",
        );
        assert_eq!(e.allowed_methods().as_deref(), Some("GET"));
        let e = refused(Method::Post, &format!("sandboxes/{sbx}/recordings"), "");
        assert_eq!(e.allowed_methods().as_deref(), Some("GET"));
        let e = refused(
            Method::Get,
            &format!("sandboxes/{sbx}/recordings?all=1"),
            "",
        );
        assert_eq!(e.status, 400);
        let e = refused(Method::Get, "sandboxes/sbx-nope/recordings/pty-1.cast", "");
        assert_eq!(e.status, 404);
        // The create field is checked here too.
        forwarded(
            Method::Post,
            "sandboxes",
            r#"{"templateID":"base","recording":true}"#,
        );
        let e = refused(
            Method::Post,
            "sandboxes",
            r#"{"templateID":"base","recording":1}"#,
        );
        assert_eq!(e.status, 400);
    }

    #[test]
    fn the_collections_that_share_a_helper_keep_their_routes() {
        assert_eq!(
            forwarded(Method::Get, "templates", ""),
            ("GET".into(), "/v1/templates".into())
        );
        assert_eq!(
            forwarded(Method::Get, "volumes", ""),
            ("GET".into(), "/v1/volumes".into())
        );
        let e = refused(Method::Put, "volumes", "");
        assert!(e.message.contains("/api/v1/volumes"), "{}", e.message);
        assert_eq!(e.allowed_methods().as_deref(), Some("POST, GET"));
    }
}
