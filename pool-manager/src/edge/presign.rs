//! Presigned file URLs (seed 002: files "… download, and presign"): a caller with the
//! runtime token asks for a URL that reads (GET) or writes (PUT) one path of the sandbox
//! without any credential until it expires; whoever holds the URL can do exactly that
//! and nothing else.
//!
//! The URL carries a token signed with the cluster's token key whose subject binds the
//! sandbox, the method and the path, so it is good on every host (the owner is routed
//! to) and cannot be bent to another path or method. It is issued in the sandbox's
//! runtime epoch: it ends with its expiry, its sandbox, or a `connect` (which revokes
//! runtime tokens, and with them whatever a leaked token presigned).

use super::{stream_download, stream_upload, Edge, JsonErr};
use crate::error::ApiError;
use crate::tokens::{runtime_epoch, TokenError};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// Longest a presigned URL may live, in seconds (a day).
pub const MAX_PRESIGN_S: u64 = 24 * 3600;
/// Lifetime of a presigned URL whose request names none, in seconds.
const DEFAULT_PRESIGN_S: u64 = 3600;

/// The body of `POST /v1/sandboxes/{id}/files/presign`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PresignBody {
    path: String,
    /// `GET` (download) or `PUT` (upload); default `GET`.
    #[serde(default)]
    method: Option<String>,
    /// Seconds from now, 1 to [`MAX_PRESIGN_S`] (default 3600).
    #[serde(default)]
    expires: Option<u64>,
}

/// The query of a presigned URL.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PresignedQuery {
    path: String,
    token: String,
}

/// What a presigned token's signature covers.
fn subject(sandbox: &str, method: &str, path: &str) -> String {
    format!("{sandbox}:file:{method}:{path}")
}

fn method_of(m: Option<&str>) -> Result<&'static str, ApiError> {
    match m.unwrap_or("GET").to_ascii_uppercase().as_str() {
        "GET" => Ok("GET"),
        "PUT" => Ok("PUT"),
        other => Err(ApiError::bad_request(format!(
            "method {other:?} cannot be presigned; send \"GET\" (download) or \"PUT\" (upload)"
        ))),
    }
}

/// `POST /v1/sandboxes/{id}/files/presign` (runtime token): `{url, method, path,
/// expiresAt}`.
pub(super) async fn issue(
    State(edge): State<Edge>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let record = edge.authorize(&headers, &id)?;
    let b: PresignBody = api_model::parse_body(&body)?;
    let method = method_of(b.method.as_deref())?;
    if b.path.is_empty() || b.path.len() > 4096 || b.path.contains('\0') {
        return Err(ApiError::bad_request(
            "path must be 1 to 4096 bytes without NUL; send e.g. \"/workspace/report.csv\"",
        ));
    }
    let ttl = b.expires.unwrap_or(DEFAULT_PRESIGN_S);
    if !(1..=MAX_PRESIGN_S).contains(&ttl) {
        return Err(ApiError::bad_request(format!(
            "expires {ttl} is out of range; send 1 to {MAX_PRESIGN_S} seconds"
        )));
    }
    let expires = chrono::Utc::now().timestamp() + ttl as i64;
    let token = edge.tokens.issue(
        &subject(&id, method, &b.path),
        runtime_epoch(&record),
        expires,
    );
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("path", &b.path)
        .append_pair("token", &token)
        .finish();
    Ok(Json(json!({
        "url": format!("{}/v1/sandboxes/{id}/files/presigned?{query}", edge.manager.edge_url),
        "method": method,
        "path": b.path,
        "expiresAt": crate::model::iso8601(expires * 1000),
    })))
}

/// Checks a presigned request: the token's signature, expiry, sandbox, method and
/// path; the sandbox must still exist.
fn authorize(
    edge: &Edge,
    id: &str,
    method: &str,
    q: &PresignedQuery,
) -> Result<crate::model::SandboxRecord, ApiError> {
    let refused = |why: String| {
        ApiError::unauthorized(format!(
            "the presigned URL is refused ({why}); ask for a new one with files/presign"
        ))
    };
    let issued = edge
        .tokens
        .verify(
            &q.token,
            &subject(id, method, &q.path),
            chrono::Utc::now().timestamp(),
        )
        .map_err(|e| match e {
            // Another subject: another sandbox, path or method than it was made for.
            TokenError::OtherSandbox => ApiError::forbidden(format!(
                "this presigned URL is not for {method} of this path in sandbox {id}"
            )),
            e => refused(e.to_string()),
        })?;
    let record = edge
        .live_record(id)?
        .ok_or_else(|| refused(format!("sandbox {id} does not exist (or was deleted)")))?;
    if issued != runtime_epoch(&record) {
        return Err(refused(
            "connect revoked the runtime tokens it was issued under".into(),
        ));
    }
    Ok(record)
}

/// `GET …/files/presigned?path&token`: the file, no other credential.
pub(super) async fn download(
    State(edge): State<Edge>,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PresignedQuery>>,
) -> Result<Response, ApiError> {
    let record = authorize(&edge, &id, "GET", &q)?;
    let (agent, _) = edge.agent_of(record).await?;
    stream_download(&agent, &q.path).await
}

/// `PUT …/files/presigned?path&token`: writes the body to the file.
pub(super) async fn upload(
    State(edge): State<Edge>,
    Path(id): Path<String>,
    JsonErr(Query(q)): JsonErr<Query<PresignedQuery>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let record = authorize(&edge, &id, "PUT", &q)?;
    let (agent, _) = edge.agent_of(record).await?;
    stream_upload(&agent, &q.path, None, None, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_bound_to_its_sandbox_method_and_path() {
        let signer = crate::tokens::TokenSigner::new(vec![7; 32]);
        let t = signer.issue(&subject("sbx-1", "GET", "/a b.txt"), 7, i64::MAX);
        assert!(signer
            .verify(&t, &subject("sbx-1", "GET", "/a b.txt"), 0)
            .is_ok());
        for other in [
            subject("sbx-1", "PUT", "/a b.txt"),
            subject("sbx-1", "GET", "/a b.txt2"),
            subject("sbx-2", "GET", "/a b.txt"),
        ] {
            assert!(signer.verify(&t, &other, 0).is_err(), "{other}");
        }
        assert!(method_of(Some("delete")).is_err());
        assert_eq!(method_of(Some("put")).unwrap(), "PUT");
    }
}
