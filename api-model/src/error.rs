//! The one error body every route answers with: `{"code", "message", "details"}`.

use serde_json::{json, Value};

/// An error for a caller: HTTP status, a stable code, and a message that says what to do.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Stable machine-readable code (`invalid_request`, `not_found`, ...).
    pub code: &'static str,
    /// What went wrong and what to send instead.
    pub message: String,
    /// Structured extras (`field`, `available`, ...); `Null` when none.
    pub details: Value,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    /// 400: the request is malformed; the message names the field and the fix.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", message)
    }

    /// 401: no or bad credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", message)
    }

    /// 403: credentials valid, but not for this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "forbidden", message)
    }

    /// 404: no such thing visible to the caller.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(404, "not_found", format!("{what} '{id}' does not exist"))
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str, allowed: &[&str]) -> Self {
        Self::new(
            405,
            "method_not_allowed",
            format!(
                "{method} is not allowed on {path}; send {}",
                allowed.join(" or ")
            ),
        )
        .with_details(json!({ "allowed": allowed }))
    }

    /// The methods a 405 allows, for an `Allow` header.
    pub fn allowed_methods(&self) -> Option<String> {
        let list = self.details.get("allowed")?.as_array()?;
        Some(
            list.iter()
                .filter_map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    /// 409: the thing is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "invalid_state", message)
    }

    /// 413: the body is larger than the route accepts.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "too_large",
            format!("the request body is larger than {limit} bytes; send a smaller one"),
        )
    }

    /// 429: the team has reached a quota.
    pub fn quota(message: impl Into<String>) -> Self {
        Self::new(429, "quota_exceeded", message)
    }

    /// 501: the option belongs to a feature that has not landed.
    pub fn not_implemented(field: &str, message: impl Into<String>) -> Self {
        Self {
            details: json!({ "field": field }),
            ..Self::new(501, "not_implemented", message)
        }
    }

    /// 507: the host has too little disk left to take a snapshot safely.
    pub fn insufficient_storage(message: impl Into<String>) -> Self {
        Self::new(507, "insufficient_storage", message)
    }

    /// 409: a create asked for a warm-pool instance (`require`) and none is ready: the
    /// pool's state, not the server, refuses it (retry, or send `prefer`).
    pub fn warm_pool_unavailable(message: impl Into<String>) -> Self {
        Self::new(409, "warm_pool_unavailable", message)
    }

    /// 503: the snapshot store (local directory or S3) failed; nothing was changed.
    pub fn storage(message: impl Into<String>) -> Self {
        Self::new(503, "storage_unavailable", message)
    }

    /// 500: our fault; the message says what failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// 502: the component could not reach a pool manager, or got nonsense back.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(502, "upstream_unavailable", message)
    }

    /// Adds details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut body = json!({ "code": self.code, "message": self.message });
        if !self.details.is_null() {
            body["details"] = self.details.clone();
        }
        body
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        // An error that knows when to come back says so in the header clients read.
        let retry = self.details.get("retryAfterS").and_then(|v| v.as_u64());
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(s) = retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            );
        }
        response
    }
}
