//! Nullspace's public control-plane API (`/api/v1`) as a stateless wasi:http component.
//!
//! Every request is checked here — API key present and well formed, path and method,
//! query parameters, body size, JSON, stale and unknown fields, ranges — and only a
//! request that passes is forwarded to a pool manager's internal API (`/v1/...`), with the
//! caller's key, which the pool manager resolves to a team. The component keeps nothing
//! between requests: one instance serves one request.
//!
//! The upstream is `NULLSPACE_UPSTREAM` at build time (default `http://127.0.0.1:7070`).
//! Our api-host sends every outbound request of the component to its configured pool
//! manager whatever the authority, so one `.wasm` serves any deployment; under a stock
//! host (`wasmtime serve`, Spin) the built-in address is used.

use api_model::{
    fields_param, is_sandbox_id, is_snapshot_id, parse_body, parse_query, reject_unknown_params,
    ApiError, BuildLogParams, CreateRequest, EgressPolicy, EventsParams, ForkBody, ListParams,
    MetricsParams, PreviewBody, RefreshBody, RestoreBody, TemplateBuildRequest, TimeoutBody,
    VolumeCreateRequest, WarmPoolBody, MAX_BODY_BYTES,
};
use spin_sdk::http::{IncomingRequest, Method, Request, Response};
use spin_sdk::http_component;

/// The pool manager's internal API, as built in.
const UPSTREAM: &str = match option_env!("NULLSPACE_UPSTREAM") {
    Some(u) => u,
    None => "http://127.0.0.1:7070",
};

/// The public OpenAPI document, served at `/api/v1/openapi.json`.
const OPENAPI: &str = include_str!("../openapi.json");

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    match serve(req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
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
}

async fn serve(req: IncomingRequest) -> Result<Response, ApiError> {
    let method = req.method();
    let path_with_query = req.path_with_query().unwrap_or_default();
    let (path, query) = match path_with_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_with_query.clone(), None),
    };
    let segments: Vec<&str> = path
        .strip_prefix("/api/v1")
        .map(|rest| rest.split('/').filter(|s| !s.is_empty()).collect())
        .ok_or_else(unknown_route)?;

    // Routes that need no key.
    match (&method, segments.as_slice()) {
        (Method::Get, ["openapi.json"]) => {
            return Ok(json_response(200, OPENAPI.as_bytes().to_vec()))
        }
        (Method::Get, ["health"]) => return Ok(json_response(200, br#"{"status":"ok"}"#.to_vec())),
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
    let url = match &query {
        Some(q) if !q.is_empty() => format!("{UPSTREAM}{}?{q}", forward.path),
        _ => format!("{UPSTREAM}{}", forward.path),
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
    let upstream: Response = spin_sdk::http::send(outbound).await.map_err(|e| {
        ApiError::upstream(format!(
            "the pool manager did not answer ({e}); try again, and check that it runs"
        ))
    })?;
    Ok(json_response(*upstream.status(), upstream.into_body()))
}

/// Checks a request against its route; returns what to send upstream.
fn route(
    method: &Method,
    segments: &[&str],
    pairs: &[(String, String)],
    body: Vec<u8>,
) -> Result<Forward, ApiError> {
    let forward = |method: Method, path: String, body: Vec<u8>| Forward { method, path, body };
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
                        parse_body::<NoFields>(&body)?;
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
            let allowed = match *action {
                "connect" | "pause" | "resume" | "refreshes" | "timeout" | "hibernate" | "fork"
                | "previews" => "POST",
                "events" | "logs" | "metrics" => "GET",
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
                "logs" => no_query()?,
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
            create_or_list(method, body, "templates", |b| {
                parse_body::<TemplateBuildRequest>(b)?.validate().map(drop)
            })
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
            create_or_list(method, body, "volumes", |b| {
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
        _ => Err(unknown_route()),
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

/// A collection's POST (a create, its body checked by `check`) or GET (a list, no body).
fn create_or_list(
    method: &Method,
    body: Vec<u8>,
    collection: &str,
    check: impl FnOnce(&[u8]) -> Result<(), ApiError>,
) -> Result<Forward, ApiError> {
    let path = format!("/v1/{collection}");
    match method {
        Method::Post => {
            check(&body)?;
            Ok(Forward {
                method: Method::Post,
                path,
                body,
            })
        }
        Method::Get => {
            empty_body(&body)?;
            Ok(Forward {
                method: Method::Get,
                path,
                body: Vec::new(),
            })
        }
        _ => Err(not_allowed(
            method,
            &format!("/api/v1/{collection}"),
            &["POST", "GET"],
        )),
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
