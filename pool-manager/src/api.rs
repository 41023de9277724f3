//! The internal control-plane HTTP API (`openapi/internal.yaml`): what the public API
//! component calls. Authenticated by the caller's API key, which resolves to a team;
//! a team sees only its own sandboxes.

use crate::error::ApiError;
use crate::model::{CreateRequest, SandboxView};
use crate::sandboxes::{ListQuery, Manager};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Fields that older APIs accepted and this one refuses, with what to send instead.
pub const STALE_FIELDS: &[(&str, &str)] = &[
    ("timeoutMs", "send `timeout` in seconds"),
    ("autoResume", "send `lifecycle.autoResume`"),
    (
        "secure",
        "omit it: runtime access is always token-protected",
    ),
    ("allow_internet_access", "send `egress`"),
    ("network", "send `egress`"),
    ("mcp", "omit it"),
    ("volume_mounts", "send `mounts`"),
    ("volumeMounts", "send `mounts`"),
];

/// Fields a sandbox view has, for `fields=`.
pub const VIEW_FIELDS: &[&str] = &[
    "sandboxID",
    "templateID",
    "state",
    "resources",
    "metadata",
    "lifecycle",
    "timeout",
    "createdAt",
    "expiresAt",
    "timeline",
    "diagnostic",
    "runtime",
];

/// The router.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(detail).delete(delete))
        .route("/v1/sandboxes/{id}/connect", post(connect))
        .route("/v1/sandboxes/{id}/pause", post(pause))
        .route("/v1/sandboxes/{id}/resume", post(resume))
        .route("/v1/sandboxes/{id}/refreshes", post(refresh))
        .route("/v1/sandboxes/{id}/timeout", post(set_timeout))
        .route("/v1/sandboxes/{id}/events", get(events))
        .fallback(|| async {
            ApiError::not_found("route", "this path").with_details(json!({
                "hint": "see openapi/internal.yaml for the routes"
            }))
        })
        .with_state(manager)
}

/// The calling team, resolved from the request's API key.
pub struct Caller(pub String);

impl axum::extract::FromRequestParts<Arc<Manager>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        m: &Arc<Manager>,
    ) -> Result<Self, ApiError> {
        team(m, &parts.headers).map(Caller)
    }
}

/// The caller's team, from `X-API-Key` or `Authorization: Bearer`.
fn team(m: &Manager, headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .ok_or_else(|| {
            ApiError::unauthorized("no API key; send it as X-API-Key or Authorization: Bearer")
        })?;
    m.catalog.team_of_key(key.trim())?.ok_or_else(|| {
        ApiError::unauthorized(
            "unknown API key; create one with `nullspace-pool-manager admin key create`",
        )
    })
}

/// Parses a JSON body into `T`, refusing stale and unknown fields by name.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    if let Some(obj) = value.as_object() {
        for (field, instead) in STALE_FIELDS {
            if obj.contains_key(*field) {
                return Err(ApiError::bad_request(format!(
                    "field `{field}` is no longer accepted; {instead}"
                ))
                .with_details(json!({ "field": field })));
            }
        }
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    raw.as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Applies `fields=` to a view; `sandboxID` is always kept.
fn project(view: Value, fields: Option<&str>) -> Result<Value, ApiError> {
    let Some(fields) = fields.filter(|f| !f.is_empty()) else {
        return Ok(view);
    };
    let wanted: Vec<&str> = fields.split(',').map(str::trim).collect();
    if let Some(bad) = wanted.iter().find(|f| !VIEW_FIELDS.contains(f)) {
        return Err(ApiError::bad_request(format!(
            "fields contains unknown field `{bad}`; send a comma-separated subset of: {}",
            VIEW_FIELDS.join(", ")
        )));
    }
    let Value::Object(map) = view else {
        return Ok(view);
    };
    Ok(Value::Object(
        map.into_iter()
            .filter(|(k, _)| k == "sandboxID" || wanted.contains(&k.as_str()))
            .collect(),
    ))
}

fn single(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn reject_unknown_params(pairs: &[(String, String)], allowed: &[&str]) -> Result<(), ApiError> {
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{k}`; send only: {}",
            allowed.join(", ")
        )));
    }
    Ok(())
}

async fn create(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateRequest = parse_body(&body)?;
    let view = m.create(&team, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(&q);
    reject_unknown_params(
        &pairs,
        &["state", "metadata", "limit", "nextToken", "fields"],
    )?;
    let limit = match single(&pairs, "limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit {l:?} is invalid; send 1 to 100"))
            })?,
    };
    let states =
        single(&pairs, "state").map(|s| s.split(',').map(str::to_string).collect::<Vec<_>>());
    if let Some(states) = &states {
        const PUBLIC: &[&str] = &["starting", "running", "paused", "deleted", "error"];
        if let Some(bad) = states.iter().find(|s| !PUBLIC.contains(&s.as_str())) {
            return Err(ApiError::bad_request(format!(
                "state `{bad}` is unknown; send a comma-separated subset of: {}",
                PUBLIC.join(", ")
            )));
        }
    }
    let mut metadata = BTreeMap::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == "metadata") {
        let (mk, mv) = v.split_once('=').ok_or_else(|| {
            ApiError::bad_request(format!(
                "metadata filter {v:?} is not key=value; send metadata=key=value"
            ))
        })?;
        metadata.insert(mk.to_string(), mv.to_string());
    }
    let query = ListQuery {
        states,
        metadata,
        limit,
        next_token: single(&pairs, "nextToken").filter(|t| !t.is_empty()),
    };
    let (views, next) = m.list(&team, &query)?;
    let fields = single(&pairs, "fields");
    let items = views
        .into_iter()
        .map(|v| project(serde_json::to_value(v).expect("json"), fields.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "sandboxes": items, "nextToken": next })))
}

async fn detail(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(&q);
    reject_unknown_params(&pairs, &["fields"])?;
    let view = m.get(&team, &id)?;
    Ok(Json(project(
        serde_json::to_value(view).expect("json"),
        single(&pairs, "fields").as_deref(),
    )?))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    #[serde(default)]
    duration: Option<u64>,
}

async fn connect(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: TimeoutBody = parse_body(&body)?;
    Ok(Json(m.connect(&team, &id, b.timeout).await?))
}

async fn pause(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(m.pause(&team, &id).await?))
}

async fn resume(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(m.resume(&team, &id).await?))
}

async fn refresh(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: RefreshBody = parse_body(&body)?;
    Ok(Json(m.refresh(&team, &id, b.duration)?))
}

async fn set_timeout(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: TimeoutBody = parse_body(&body)?;
    let seconds = b
        .timeout
        .ok_or_else(|| ApiError::bad_request("timeout is required; send {\"timeout\": seconds}"))?;
    Ok(Json(m.set_timeout(&team, &id, seconds)?))
}

async fn delete(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.delete(&team, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn events(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    m.owned(&team, &id)?;
    let pairs = query_pairs(&q);
    reject_unknown_params(&pairs, &["after_event_id", "limit"])?;
    let after = match single(&pairs, "after_event_id") {
        None => 0,
        Some(a) => a.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "after_event_id {a:?} is not a number; send an event ID"
            ))
        })?,
    };
    let limit = single(&pairs, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(1000)
        .min(1000);
    Ok(Json(
        json!({ "events": m.catalog.events(&id, after, limit)? }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_fields_are_named_with_their_replacement() {
        let err =
            parse_body::<CreateRequest>(br#"{"templateID":"base","timeoutMs":1000}"#).unwrap_err();
        assert!(
            err.message.contains("`timeoutMs`") && err.message.contains("`timeout`"),
            "{}",
            err.message
        );
        let err = parse_body::<CreateRequest>(br#"{"templateID":"base","bogus":1}"#).unwrap_err();
        assert!(err.message.contains("bogus"), "{}", err.message);
    }

    #[test]
    fn projection_keeps_the_id_and_refuses_unknown_fields() {
        let v = json!({"sandboxID": "x", "state": "running", "metadata": {}});
        assert_eq!(
            project(v.clone(), Some("state")).unwrap(),
            json!({"sandboxID": "x", "state": "running"})
        );
        assert!(project(v, Some("nope")).is_err());
    }

    #[test]
    fn query_strings_decode() {
        let pairs = query_pairs(&Some(
            "metadata=team%3Dblue&state=running,paused&x=a+b".into(),
        ));
        assert_eq!(pairs[0], ("metadata".into(), "team=blue".into()));
        assert_eq!(pairs[2], ("x".into(), "a b".into()));
    }
}
