//! Live migration's routes: the operator's `POST /v1/sandboxes/{id}/migrate` (served
//! by the sandbox's owner, where routing sends it), and the host-to-host routes the
//! source calls on the destination (`/v1/internal/migrations/{id}`...), which take a
//! migration token instead of an API key. See `sandboxes/migrate.rs`.

use crate::api::{to_completion, AnyCaller};
use crate::catalog::Role;
use crate::error::ApiError;
use crate::sandboxes::{incoming_socket, Manager, MIGRATION_TOKEN};
use api_model::{parse_body, MigrateBody, Migration};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::sync::Arc;

/// The routes, merged into the control API's router.
pub fn routes() -> Router<Arc<Manager>> {
    Router::new()
        .route("/v1/sandboxes/{id}/migrate", post(migrate))
        .route("/v1/internal/migrations/{id}", post(accept).delete(abandon))
        .route("/v1/internal/migrations/{id}/received", post(received))
        .route("/v1/internal/migrations/{id}/finish", post(finish))
        .route("/v1/internal/migrations/{id}/{stream}", get(stream))
        .route("/v1/internal/outgoing/{id}", post(outgoing))
}

/// Body of `POST /v1/internal/outgoing/{id}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OutgoingBody {
    from: String,
    to: String,
}

/// The source's answer to its destination: whether it still moves sandbox `id` there
/// (`{"moving": bool}`; 409 from a host that is not `from`).
async fn outgoing(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: OutgoingBody = parse_body(&body)?;
    let token = presented(&headers)?;
    Ok(Json(
        json!({ "moving": m.moving_out(&id, &body.from, &body.to, token)? }),
    ))
}

async fn migrate(
    State(m): State<Arc<Manager>>,
    caller: AnyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Migration>, ApiError> {
    if !matches!(caller.0.role, Role::Operator) {
        return Err(ApiError::forbidden(
            "moving a sandbox between hosts is the operator's: call this with an operator key (`nullspace-pool-manager admin key create --operator`)",
        ));
    }
    let body: MigrateBody = parse_body(&body)?;
    body.validate()?;
    Ok(Json(
        to_completion(async move {
            m.migrate(&id, body.host.as_deref(), body.postcopy_after())
                .await
        })
        .await?,
    ))
}

/// The migration token of a host-to-host call, checked for sandbox `id`; the epoch
/// it was issued in.
fn token(m: &Manager, headers: &HeaderMap, id: &str) -> Result<u64, ApiError> {
    m.check_migration_token(id, presented(headers)?)
}

/// The token a host-to-host call presents.
fn presented(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(MIGRATION_TOKEN)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "host-to-host migration calls carry a token in {MIGRATION_TOKEN}"
            ))
        })
}

/// Body of `POST /v1/internal/migrations/{id}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    from: String,
    spec: vmm::IncomingSpec,
}

/// Body of `POST /v1/internal/migrations/{id}/finish`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FinishBody {
    from: String,
}

async fn accept(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let epoch = token(&m, &headers, &id)?;
    let body: AcceptBody = parse_body(&body)?;
    let token = presented(&headers)?.to_string();
    let postcopy = to_completion(async move {
        m.accept_migration(&id, &body.from, epoch, &token, body.spec)
            .await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "postcopy": postcopy }))))
}

async fn abandon(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    token(&m, &headers, &id)?;
    m.abandon_migration(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn received(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    token(&m, &headers, &id)?;
    to_completion(async move { m.migration_received(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn finish(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    token(&m, &headers, &id)?;
    let body: FinishBody = parse_body(&body)?;
    to_completion(async move { m.finish_migration(&id, &body.from).await }).await?;
    Ok(Json(json!({ "running": true })))
}

/// Carries a migration stream (`ram`, `disk` or `vol0` to `vol7`) from the source into the incoming
/// VM's socket, through an HTTP upgrade.
async fn stream(
    State(m): State<Arc<Manager>>,
    Path((id, stream)): Path<(String, String)>,
    mut req: Request<Body>,
) -> Response {
    let answer = async {
        token(&m, req.headers(), &id)?;
        let which = incoming_socket(&stream).ok_or_else(|| {
            ApiError::not_found("migration stream", &stream).with_details(json!({
                "hint": "the streams are ram, disk and vol0 to vol7"
            }))
        })?;
        let upgrading = req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            == Some(crate::cluster::tunnel::STREAM_PROTOCOL);
        if !upgrading {
            return Err(ApiError::bad_request(format!(
                "a migration stream is an upgrade to {}",
                crate::cluster::tunnel::STREAM_PROTOCOL
            )));
        }
        let mut conn = m.incoming_stream(&id, which).await?;
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut conn).await;
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "a migration stream's upgrade failed")
                }
            }
        });
        Ok::<_, ApiError>(
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, crate::cluster::tunnel::STREAM_PROTOCOL)
                .header(header::CONNECTION, "upgrade")
                .body(Body::empty())
                .expect("response"),
        )
    }
    .await;
    answer.unwrap_or_else(IntoResponse::into_response)
}
