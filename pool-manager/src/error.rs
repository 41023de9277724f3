//! The one error body every route answers with: `{"code", "message", "details"}`.

pub use api_model::ApiError;

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        match e {
            crate::catalog::CatalogError::Conflict(m) => Self::conflict(m),
            // The database did not answer (down, cut off, or past a deadline): the
            // request may succeed on a retry, or through another host.
            e @ crate::catalog::CatalogError::Unavailable { .. } => Self::new(
                503,
                "catalog_unavailable",
                format!("{e}; retry shortly (or through another host)"),
            ),
            crate::catalog::CatalogError::Postgres { ref error, .. }
                if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                Self::new(
                    503,
                    "catalog_busy",
                    format!("{e}: another request of the team holds it; retry shortly"),
                )
            }
            other => Self::internal(other.to_string()),
        }
    }
}

/// A guest agent's failure as the caller's error (the orphan rule keeps this a function:
/// both types live in other crates).
pub fn agent_error(e: agent_client::ClientError) -> ApiError {
    {
        use agent_protocol::ErrorCode as C;
        match e {
            agent_client::ClientError::Agent(a) => {
                let (status, code) = match a.code {
                    C::NotFound => (404, "not_found"),
                    C::PermissionDenied => (403, "permission_denied"),
                    C::AlreadyExists => (409, "already_exists"),
                    C::NotADirectory | C::IsADirectory | C::InvalidArgument | C::UnknownUser => {
                        (400, "invalid_request")
                    }
                    C::FrameTooLarge => (413, "too_large"),
                    _ => (502, "sandbox_error"),
                };
                ApiError::new(status, code, a.message)
            }
            // The sandbox's own limit, not the team's quota: closing streams frees it.
            e @ agent_client::ClientError::TooManyStreams { .. } => {
                ApiError::new(429, "too_many_streams", e.to_string())
            }
            agent_client::ClientError::Disconnected => ApiError::new(
                409,
                "invalid_state",
                "the sandbox is not running; connect to resume it",
            ),
            other => ApiError::new(502, "sandbox_error", other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::agent_error;

    #[test]
    fn too_many_streams_is_a_429_that_says_what_to_do() {
        let e = agent_error(agent_client::ClientError::TooManyStreams { limit: 1024 });
        assert_eq!((e.status, e.code), (429, "too_many_streams"));
        assert!(e.message.contains("close some"), "{}", e.message);
    }
}
