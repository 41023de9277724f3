//! The internal control-plane HTTP API (`openapi/internal.yaml`): what the public API
//! component calls. Authenticated by the caller's API key, which resolves to a team;
//! a team sees only its own sandboxes.

use crate::catalog::{KeyOwner, Role};
use crate::error::ApiError;
use crate::model::{CreateRequest, SandboxView};
use crate::sandboxes::{Actor, ListQuery, Manager};
use api_model::{
    fields_param, parse_body, parse_query, project, reject_unknown_params, EventsParams, ForkBody,
    ListParams, RefreshBody, RestoreBody, TimeoutBody, WarmPoolBody,
};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

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
        .route("/v1/sandboxes/{id}/access", post(access))
        .route("/v1/sandboxes/{id}/pause", post(pause))
        .route("/v1/sandboxes/{id}/resume", post(resume))
        .route("/v1/sandboxes/{id}/refreshes", post(refresh))
        .route("/v1/sandboxes/{id}/timeout", post(set_timeout))
        .route("/v1/sandboxes/{id}/events", get(events))
        .route("/v1/sandboxes/{id}/hibernate", post(hibernate))
        .route(
            "/v1/sandboxes/{id}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/sandboxes/{id}/fork", post(fork))
        .route("/v1/sandboxes/{id}/previews", post(create_preview))
        .route("/v1/sandboxes/{id}/egress", put(set_egress))
        .route(
            "/v1/sandboxes/{id}/security-policy",
            put(set_security_policy),
        )
        .route("/v1/sandboxes/{id}/audit", get(audit))
        .route("/v1/volumes", post(create_volume).get(list_volumes))
        .route("/v1/volumes/{id}", get(volume).delete(delete_volume))
        .route("/v1/sandboxes/{id}/logs", get(logs))
        .route("/v1/sandboxes/{id}/metrics", get(metrics))
        .route("/v1/sandboxes/{id}/recordings", get(list_recordings))
        .route(
            "/v1/sandboxes/{id}/recordings/{recording}",
            get(download_recording),
        )
        .route("/v1/observability/summary", get(summary))
        .route("/metrics", get(prometheus))
        .route("/v1/sandboxes/restore", post(restore))
        .route("/v1/templates", post(build_template).get(list_templates))
        .route("/v1/templates/{id}", get(template).delete(delete_template))
        .route("/v1/templates/{id}/logs", get(build_log))
        .route(
            "/v1/templates/{id}/warm-pool",
            axum::routing::put(set_warm_pool).get(warm_pool),
        )
        .merge(crate::operator_api::routes())
        .merge(crate::migration_api::routes())
        .fallback(|| async {
            ApiError::not_found("route", "this path").with_details(json!({
                "hint": "see openapi/internal.yaml for the routes"
            }))
        })
        .layer(axum::middleware::from_fn_with_state(
            (manager.clone(), crate::cluster::routing::Face::Control),
            crate::cluster::routing::to_owner,
        ))
        .with_state(manager)
}

/// The calling team, resolved from the request's (team) API key.
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

/// Whoever calls, team or operator.
pub struct AnyCaller(pub KeyOwner);

impl axum::extract::FromRequestParts<Arc<Manager>> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        m: &Arc<Manager>,
    ) -> Result<Self, ApiError> {
        owner(m, &parts.headers).map(AnyCaller)
    }
}

impl AnyCaller {
    /// As the actor on a warm pool.
    pub fn actor(&self) -> Actor<'_> {
        match self.0.role {
            Role::Operator => Actor::Operator,
            Role::Team => Actor::Team(&self.0.team_id),
        }
    }
}

/// The key's owner, from `X-API-Key` or `Authorization: Bearer`.
pub(crate) fn owner(m: &Manager, headers: &HeaderMap) -> Result<KeyOwner, ApiError> {
    let key = api_model::api_key(|name| headers.get(name).and_then(|v| v.to_str().ok()))?;
    m.catalog.key_owner(key)?.ok_or_else(|| {
        ApiError::unauthorized(
            "unknown API key (or one revoked or rotated out); ask the operator for one (`nullspace-pool-manager admin key create --team TEAM`)",
        )
    })
}

/// The caller's team, from a team key: an operator key runs the platform and acts for
/// no team.
pub(crate) fn team(m: &Manager, headers: &HeaderMap) -> Result<String, ApiError> {
    let o = owner(m, headers)?;
    match o.role {
        Role::Team => Ok(o.team_id),
        Role::Operator => Err(ApiError::forbidden(
            "this is an operator key: it manages teams, quotas, keys and the built-in warm pools; call team routes with a team key (POST /teams/{team}/keys issues one)",
        )),
    }
}

/// Runs a lifecycle operation to its end in a task of its own. hyper drops a handler
/// whose caller hung up; an operation dropped halfway would leave its VM out of its
/// slot (ended), its volumes frozen or its snapshot half-recorded, and its intent
/// row gone with it. Only a crash may cut one short: that is what intents recover.
pub(crate) async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError::internal(format!("the operation ended abnormally: {e}")))?
}

async fn create(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateRequest = parse_body(&body)?;
    // On a cluster: the host placement picks, which may be another one.
    let valid = req.validate()?;
    let warm_only = valid.warm_pool == Some(api_model::WarmPoolMode::Require);
    m.check_region(valid.region.as_deref())?;
    // Warm pools are kept per template ID: a name (imageName, snapshotName) matches none.
    let template = match &valid.source {
        api_model::StartSource::Template(t) => t.as_str(),
        _ => "",
    };
    if let Some(placed) = crate::cluster::placement::place_create(
        &m,
        &headers,
        template,
        valid.resources,
        warm_only,
        valid.region.as_deref(),
        &body,
    )
    .await?
    {
        return Ok(placed);
    }
    // Placed here by another host: its reservation ends now, as this host's record of
    // the sandbox (written within the create's first milliseconds) takes its place;
    // held to the end it would count twice for the whole create.
    if let Some(r) = headers
        .get(crate::cluster::placement::RESERVATION)
        .and_then(|v| v.to_str().ok())
    {
        let _ = m.catalog.release_reservation(r);
    }
    let view = to_completion(async move { m.create(&team, req).await }).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let params = ListParams::parse(&parse_query(q.as_deref()))?;
    let query = ListQuery {
        states: params.states,
        metadata: params.metadata,
        limit: params.limit,
        next_token: params.next_token,
    };
    let (views, next) = m.list(&team, &query)?;
    let items: Vec<Value> = views
        .into_iter()
        .map(|v| {
            project(
                serde_json::to_value(v).expect("json"),
                params.fields.as_deref(),
            )
        })
        .collect();
    Ok(Json(json!({ "sandboxes": items, "nextToken": next })))
}

async fn detail(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = parse_query(q.as_deref());
    reject_unknown_params(&pairs, &["fields"])?;
    let fields = fields_param(&pairs)?;
    let view = m.get(&team, &id)?;
    Ok(Json(project(
        serde_json::to_value(view).expect("json"),
        fields.as_deref(),
    )))
}

async fn connect(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: TimeoutBody = parse_body(&body)?;
    let timeout = b.checked()?;
    Ok(Json(
        to_completion(async move { m.connect(&team, &id, timeout).await }).await?,
    ))
}

/// Data-plane access for one more client: no resume, no older token ended.
async fn access(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let _: NoFields = parse_body(&body)?;
    Ok(Json(json!({ "runtime": m.access(&team, &id)? })))
}

async fn pause(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(
        to_completion(async move { m.pause(&team, &id).await }).await?,
    ))
}

async fn resume(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    Ok(Json(
        to_completion(async move { m.resume(&team, &id).await }).await?,
    ))
}

async fn refresh(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: RefreshBody = parse_body(&body)?;
    Ok(Json(m.refresh(&team, &id, b.checked()?)?))
}

async fn set_timeout(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let b: TimeoutBody = parse_body(&body)?;
    let seconds = b
        .checked()?
        .ok_or_else(|| ApiError::bad_request("timeout is required; send {\"timeout\": seconds}"))?;
    Ok(Json(m.set_timeout(&team, &id, seconds)?))
}

async fn set_egress(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let policy: api_model::EgressPolicy = parse_body(&body)?;
    Ok(Json(m.set_egress(&team, &id, policy).await?))
}

async fn set_security_policy(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    let policy: Value = parse_body(&body)?;
    Ok(Json(m.set_security_policy(&team, &id, policy).await?))
}

async fn audit(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = api_model::AuditParams::parse(&parse_query(q.as_deref()))?;
    Ok(Json(m.audit(&team, &id, p.after, p.limit)?))
}

async fn delete(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    to_completion(async move { m.delete(&team, &id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn events(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    m.owned(&team, &id)?;
    let p = EventsParams::parse(&parse_query(q.as_deref()))?;
    Ok(Json(
        json!({ "events": m.catalog.events(&id, p.after, p.limit as usize)? }),
    ))
}

/// A body that must be empty or `{}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

async fn hibernate(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SandboxView>, ApiError> {
    parse_body::<NoFields>(&body)?;
    Ok(Json(
        to_completion(async move { m.hibernate(&team, &id).await }).await?,
    ))
}

async fn create_snapshot(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: api_model::SnapshotBody = parse_body(&body)?;
    b.validate()?;
    let view = to_completion(async move { m.create_snapshot(&team, &id, b.name).await }).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_snapshots(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "snapshots": m.list_snapshots(&team, &id).await? }),
    ))
}

async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path((id, snapshot)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    to_completion(async move { m.delete_snapshot(&team, &id, &snapshot).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fork(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: ForkBody = parse_body(&body)?;
    let children = to_completion(async move { m.fork(&team, &id, b).await }).await?;
    Ok((StatusCode::CREATED, Json(json!({ "sandboxes": children }))).into_response())
}

async fn restore(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: RestoreBody = parse_body(&body)?;
    let view = to_completion(async move { m.restore(&team, b).await }).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn set_warm_pool(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(template): Path<String>,
    body: Bytes,
) -> Result<Json<crate::sandboxes::PoolStatus>, ApiError> {
    let b: WarmPoolBody = parse_body(&body)?;
    Ok(Json(m.set_warm_pool(caller.actor(), &template, b).await?))
}

async fn warm_pool(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(template): Path<String>,
) -> Result<Json<crate::sandboxes::PoolStatus>, ApiError> {
    Ok(Json(m.warm_pool_status(caller.actor(), &template)?))
}

async fn build_template(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: api_model::TemplateBuildRequest = parse_body(&body)?;
    let view = m.build_template(&team, b).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

async fn list_templates(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    reject_unknown_params(&parse_query(q.as_deref()), &[])?;
    Ok(Json(json!({ "templates": m.list_templates(&team)? })))
}

async fn template(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<api_model::TemplateView>, ApiError> {
    Ok(Json(m.template_view(&team, &id)?))
}

async fn delete_template(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_template(&team, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_volume(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: api_model::VolumeCreateRequest = parse_body(&body)?;
    let view = m.create_volume(&team, b).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_volumes(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
) -> Result<Json<Vec<api_model::VolumeView>>, ApiError> {
    Ok(Json(m.list_volumes(&team).await?))
}

async fn volume(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<Json<api_model::VolumeView>, ApiError> {
    Ok(Json(m.get_volume(&team, &id).await?))
}

async fn delete_volume(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_volume(&team, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn build_log(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<api_model::BuildLogPage>, ApiError> {
    let p = api_model::BuildLogParams::parse(&parse_query(q.as_deref()))?;
    let page = m
        .build_log(
            &team,
            &id,
            p.after,
            p.limit,
            std::time::Duration::from_secs(p.wait_s),
        )
        .await?;
    Ok(Json(page))
}

async fn create_preview(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: api_model::PreviewBody = parse_body(&body)?;
    let view = m.create_preview(&team, &id, b).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn logs(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = api_model::SandboxLogParams::parse(&parse_query(q.as_deref()))?;
    let (logs, next) = m.logs(&team, &id, p.offset, p.limit).await?;
    Ok(Json(json!({ "logs": logs, "next": next })))
}

async fn metrics(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = api_model::MetricsParams::parse(&parse_query(q.as_deref()))?;
    Ok(Json(
        json!({ "metrics": m.metrics(&team, &id, p.start, p.end).await? }),
    ))
}

async fn list_recordings(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    reject_unknown_params(&parse_query(q.as_deref()), &[])?;
    Ok(Json(
        json!({ "recordings": m.list_recordings(&team, &id).await? }),
    ))
}

/// A recording's bytes, streamed from the store: `application/x-ndjson` (commands) or
/// `application/x-asciicast` (a terminal session).
async fn download_recording(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
    Path((id, recording)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    reject_unknown_params(&parse_query(q.as_deref()), &[])?;
    let d = m.recording(&team, &id, &recording).await?;
    use axum::http::header;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, d.kind.content_type())
        .header(header::CONTENT_LENGTH, d.size_bytes)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{recording}\""),
        )
        .body(axum::body::Body::from_stream(d.body))
        .expect("a valid response"))
}

async fn summary(
    State(m): State<Arc<Manager>>,
    Caller(team): Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(m.summary(&team).await?))
}

/// Prometheus' text format; no key: bind the control API to loopback (the default).
async fn prometheus(State(m): State<Arc<Manager>>) -> Result<Response, ApiError> {
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        m.prometheus()?,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    /// The paths a router's source declares (`.route("/v1/...", ...)`), with path
    /// parameters written `{}`.
    fn routes_in(source: &str) -> Vec<String> {
        let mut out = Vec::new();
        // The code, not its tests (this one mentions `.route(` itself).
        let mut rest = source.split("#[cfg(test)]").next().unwrap_or_default();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let Some(start) = rest.find('"') else { break };
            let Some(len) = rest[start + 1..].find('"') else {
                break;
            };
            out.push(normalized(&rest[start + 1..start + 1 + len]));
        }
        out
    }

    fn normalized(path: &str) -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push_str("{}");
                }
                '}' => in_param = false,
                c if !in_param => out.push(c),
                _ => {}
            }
        }
        out
    }

    /// The paths an OpenAPI YAML document lists (two-space indented `/...:` keys).
    fn documented(yaml: &str) -> Vec<String> {
        yaml.lines()
            .filter_map(|l| l.strip_prefix("  /"))
            .filter_map(|l| l.split_once(':').map(|(p, _)| normalized(&format!("/{p}"))))
            .collect()
    }

    fn check(router: &str, doc: &str, name: &str) {
        let documented = documented(doc);
        let served = routes_in(router);
        assert!(served.len() > 5, "no routes found in the source of {name}");
        let missing: Vec<&String> = served.iter().filter(|r| !documented.contains(r)).collect();
        assert!(missing.is_empty(), "{name} does not document {missing:?}");
        let stale: Vec<&String> = documented.iter().filter(|d| !served.contains(d)).collect();
        assert!(
            stale.is_empty(),
            "{name} documents routes nobody serves: {stale:?}"
        );
    }

    #[test]
    fn the_openapi_documents_list_exactly_the_routes_served() {
        let control = [
            include_str!("api.rs"),
            include_str!("operator_api.rs"),
            include_str!("migration_api.rs"),
        ]
        .map(|s| s.split("#[cfg(test)]").next().unwrap_or_default())
        .concat();
        check(
            &control,
            include_str!("../openapi/internal.yaml"),
            "internal.yaml",
        );
        check(
            include_str!("edge/mod.rs"),
            include_str!("../openapi/dataplane.yaml"),
            "dataplane.yaml",
        );
    }
}
