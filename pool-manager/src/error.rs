//! The one error body every route answers with: `{"code", "message", "details"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error for a caller: HTTP status, a stable code, and a message that says what to do.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: serde_json::Value::Null,
        }
    }

    /// 400: the request is malformed; the message names the field and the fix.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401: no or bad credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: credentials valid, but not for this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: no such thing visible to the caller.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} '{id}' does not exist"),
        )
    }

    /// 409: the thing is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }

    /// 501: the option belongs to a feature that has not landed.
    pub fn not_implemented(field: &str, message: impl Into<String>) -> Self {
        Self {
            details: json!({ "field": field }),
            ..Self::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", message)
        }
    }

    /// 500: our fault; the message says what failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if !self.details.is_null() {
            body["details"] = self.details;
        }
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        match e {
            crate::catalog::CatalogError::Conflict(m) => Self::conflict(m),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<agent_client::ClientError> for ApiError {
    fn from(e: agent_client::ClientError) -> Self {
        use agent_protocol::ErrorCode as C;
        match e {
            agent_client::ClientError::Agent(a) => {
                let (status, code) = match a.code {
                    C::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                    C::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
                    C::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
                    C::NotADirectory | C::IsADirectory | C::InvalidArgument | C::UnknownUser => {
                        (StatusCode::BAD_REQUEST, "invalid_request")
                    }
                    C::FrameTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                    _ => (StatusCode::BAD_GATEWAY, "sandbox_error"),
                };
                Self::new(status, code, a.message)
            }
            agent_client::ClientError::Disconnected => Self::new(
                StatusCode::CONFLICT,
                "invalid_state",
                "the sandbox is not running; connect to resume it",
            ),
            other => Self::new(StatusCode::BAD_GATEWAY, "sandbox_error", other.to_string()),
        }
    }
}
