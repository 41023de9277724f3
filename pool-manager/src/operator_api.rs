//! The operator's routes (teams, quotas, keys) and the key routes teams use on their
//! own keys. An operator key runs the platform and acts for no team; a team key sees
//! only its own team's keys (others' are 404, like every other team's resource).

use crate::api::AnyCaller;
use crate::catalog::{KeyInfo, KeyOwner, Role, Team, OPERATOR_TEAM_ID};
use crate::error::ApiError;
use crate::quotas::LimitsPatch;
use crate::sandboxes::Manager;
use api_model::{parse_body, KeyRequest, RotateRequest, TeamCreateRequest};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// The routes, merged into the control API's router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/teams", get(list_teams).post(create_team))
        .route("/v1/teams/{team}", get(team))
        .route("/v1/teams/{team}/quota", put(set_quota).get(team))
        .route(
            "/v1/teams/{team}/keys",
            get(team_keys).post(create_team_key),
        )
        .route("/v1/keys", get(own_keys).post(create_own_key))
        .route("/v1/keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
}

fn operator(caller: &AnyCaller) -> Result<(), ApiError> {
    match caller.0.role {
        Role::Operator => Ok(()),
        Role::Team => Err(ApiError::forbidden(
            "teams, quotas and other teams' keys are the operator's: call this with an operator key (`nullspace-pool-manager admin key create --operator`)",
        )),
    }
}

/// Refuses key management to a key that is being rotated out.
fn may_manage_keys(caller: &AnyCaller) -> Result<(), ApiError> {
    if caller.0.rotating_out {
        return Err(ApiError::forbidden(
            "this key is being rotated out: it still works until its end, but makes, rotates and revokes no keys; use the key that replaced it",
        ));
    }
    Ok(())
}

/// A tenant team by ID or name (never the operator's own).
fn tenant(m: &Manager, id_or_name: &str) -> Result<Team, ApiError> {
    m.catalog
        .team(id_or_name)?
        .filter(|t| t.id != OPERATOR_TEAM_ID)
        .ok_or_else(|| ApiError::not_found("team", id_or_name))
}

/// A team with its limits (in force, and its own) and what it holds.
fn team_view(m: &Manager, t: &Team) -> Result<Value, ApiError> {
    let limits = m.limits(&t.id)?;
    let usage = m.usage(&t.id)?;
    Ok(json!({
        "id": t.id,
        "name": t.name,
        "limits": limits,
        "ownLimits": m.catalog.limits(&t.id)?,
        "usage": usage,
    }))
}

async fn list_teams(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
) -> Result<Json<Value>, ApiError> {
    operator(&caller)?;
    let mut out = Vec::new();
    for t in m.catalog.teams()? {
        if t.id != OPERATOR_TEAM_ID {
            out.push(team_view(&m, &t)?);
        }
    }
    Ok(Json(json!({ "teams": out })))
}

async fn create_team(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator(&caller)?;
    let b: TeamCreateRequest = parse_body(&body)?;
    b.validate()?;
    let t = m.catalog.create_team(&b.name, None)?;
    if let Some(l) = &b.limits {
        m.catalog.set_limits(&t.id, l)?;
    }
    tracing::info!(team = %t.id, name = %t.name, "team created");
    Ok((StatusCode::CREATED, Json(team_view(&m, &t)?)).into_response())
}

async fn team(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(team): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operator(&caller)?;
    let t = tenant(&m, &team)?;
    Ok(Json(team_view(&m, &t)?))
}

async fn set_quota(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(team): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    operator(&caller)?;
    let t = tenant(&m, &team)?;
    let patch: LimitsPatch = parse_body(&body)?;
    patch.validate()?;
    let own = m.catalog.set_limits(&t.id, &patch)?;
    tracing::info!(team = %t.id, limits = %serde_json::to_string(&own).unwrap_or_default(), "team quota set");
    Ok(Json(team_view(&m, &t)?))
}

/// A new key's answer: the key itself, shown this once.
fn issued(key: String, info: Option<KeyInfo>) -> Response {
    let mut body = serde_json::to_value(info).expect("json");
    body["key"] = json!(key);
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn team_keys(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(team): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operator(&caller)?;
    let t = tenant(&m, &team)?;
    Ok(Json(json!({ "keys": m.catalog.keys(Some(&t.id))? })))
}

async fn create_team_key(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(team): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    operator(&caller)?;
    may_manage_keys(&caller)?;
    let t = tenant(&m, &team)?;
    key_request(&body)?;
    let key = m.catalog.create_key(&t.id, None)?;
    tracing::info!(team = %t.id, "key issued");
    let info = m.catalog.key(&key_id(&key))?;
    Ok(issued(key, info))
}

/// Checks a key request's body (may be empty): keys issued over the API are team keys.
fn key_request(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    parse_body::<KeyRequest>(body)?.validate()
}

/// A key's ID: the first 16 hex digits of its hash.
fn key_id(key: &str) -> String {
    crate::catalog::hash_key(key)[..16].to_string()
}

async fn own_keys(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
) -> Result<Json<Value>, ApiError> {
    let team = match caller.0.role {
        Role::Operator => None,
        Role::Team => Some(caller.0.team_id.as_str()),
    };
    Ok(Json(json!({ "keys": m.catalog.keys(team)? })))
}

async fn create_own_key(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    body: Bytes,
) -> Result<Response, ApiError> {
    key_request(&body)?;
    may_manage_keys(&caller)?;
    if caller.0.role == Role::Operator {
        return Err(ApiError::bad_request(
            "operator keys are made on the host (`nullspace-pool-manager admin key create --operator`); a team's keys with POST /teams/{team}/keys",
        ));
    }
    let key = m.catalog.create_key(&caller.0.team_id, None)?;
    tracing::info!(team = %caller.0.team_id, "key issued");
    let info = m.catalog.key(&key_id(&key))?;
    Ok(issued(key, info))
}

/// The key `id` if the caller may act on it: its own team's (a team key) or any (an
/// operator key); otherwise 404, as for anything else of another team.
fn visible_key(m: &Manager, caller: &KeyOwner, id: &str) -> Result<KeyInfo, ApiError> {
    m.catalog
        .key(id)?
        .filter(|k| caller.role == Role::Operator || k.team_id == caller.team_id)
        .ok_or_else(|| {
            ApiError::not_found("key", id)
                .with_details(json!({ "hint": "key IDs are 16 hex digits; GET /keys lists yours" }))
        })
}

async fn revoke_key(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let k = visible_key(&m, &caller.0, &id)?;
    may_manage_keys(&caller)?;
    m.catalog
        .expire_key(&k.id, chrono::Utc::now().timestamp_millis())?;
    tracing::info!(key = %k.id, team = %k.team_id, "key revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_key(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let k = visible_key(&m, &caller.0, &id)?;
    may_manage_keys(&caller)?;
    let grace = if body.is_empty() {
        RotateRequest::default()
    } else {
        parse_body::<RotateRequest>(&body)?
    }
    .grace_s()?;
    let role = if k.role == "operator" {
        Role::Operator
    } else {
        Role::Team
    };
    let key = m.catalog.create_key_with_role(&k.team_id, None, role)?;
    m.catalog.expire_key(
        &k.id,
        chrono::Utc::now().timestamp_millis() + grace as i64 * 1000,
    )?;
    tracing::info!(key = %k.id, team = %k.team_id, grace_s = grace, "key rotated");
    let info = m.catalog.key(&key_id(&key))?;
    let mut body = serde_json::to_value(info).expect("json");
    body["key"] = json!(key);
    // The old key as it is now: its end, or gone if the grace was 0.
    body["replaces"] =
        json!({ "id": k.id, "expiresAt": m.catalog.key(&k.id)?.and_then(|k| k.expires_at) });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
