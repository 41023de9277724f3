//! The SDK's one error type.

/// What went wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error body: its status, stable code and message.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code (`not_found`, `invalid_request`, `quota_exceeded`, ...).
        code: String,
        /// What went wrong and what to send instead.
        message: String,
        /// Structured details, `Null` when none.
        details: serde_json::Value,
    },
    /// The request did not complete (connection, timeout, body).
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// Local I/O (reading or writing a file for an upload or download).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Missing or bad configuration (no API key, bad URL).
    #[error("configuration: {0}")]
    Config(String),
    /// The server sent something this SDK does not understand.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// Refused or ended by the SDK itself, with a stable code like the API's: a
    /// request it will not send (`invalid_request`: conflicting options, naming what to
    /// send instead), a wait that ran out (`timeout`), a sandbox that failed while
    /// waited on (its diagnostic's code, or `sandbox_failed`).
    #[error("{code}: {message}")]
    Local {
        /// Stable code (`invalid_request`, `timeout`, `sandbox_failed`, ...).
        code: String,
        /// What went wrong and what to send instead.
        message: String,
    },
}

impl Error {
    /// The error's stable code: the API's, or the SDK's own for [`Error::Local`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } | Error::Local { code, .. } => Some(code),
            _ => None,
        }
    }

    /// An [`Error::Local`] with `code` and `message`.
    pub(crate) fn local(code: &str, message: impl Into<String>) -> Self {
        Error::Local {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// An [`Error::Local`] `invalid_request`: options the SDK will not send.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::local("invalid_request", message)
    }

    /// Whether this is the API's "no such thing" answer.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some("not_found")
    }
}

/// The SDK's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Turns a non-success response into [`Error::Api`].
pub(crate) async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(api_error(status.as_u16(), &text))
}

/// [`Error::Api`] from a refusal's status and body (the API's JSON error, or any text).
pub(crate) fn api_error(status: u16, text: &str) -> Error {
    let body: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    Error::Api {
        status,
        code: body["code"].as_str().unwrap_or("http_error").to_string(),
        message: body["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{status}: {text}")),
        details: body.get("details").cloned().unwrap_or_default(),
    }
}
