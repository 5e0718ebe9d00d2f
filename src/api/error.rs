//! The one map from everything that can go wrong in a request to what the client sees.
//!
//! Every handler returns [`ApiError`]; [`ErrorCode`] is the closed list of stable codes of
//! API.md with their HTTP statuses, shared by REST bodies, SSE errors and WebSocket `error`
//! events. Server-side failures (`internal`) answer with an opaque message while the full cause
//! chain goes to the log.

use std::fmt;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// The stable error codes of the service contract. Exhaustive: adding one means adding its
/// status here and its line in API.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NotFound,
    AdapterNotFound,
    InvalidRequest,
    InvalidAdapter,
    PayloadTooLarge,
    Conflict,
    QuotaExceeded,
    RateLimited,
    Overloaded,
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of API.md (for metrics pre-registration and tests).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::AdapterNotFound,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidAdapter,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Conflict,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    /// The wire spelling of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AdapterNotFound => "adapter_not_found",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidAdapter => "invalid_adapter",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Conflict => "conflict",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::AdapterNotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidAdapter => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::QuotaExceeded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a request can fail with. Variants carry what the message needs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("adapter '{name}' does not exist")]
    AdapterNotFound { name: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid adapter: {0}")]
    InvalidAdapter(String),
    #[error("the upload exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("{0}")]
    Conflict(String),
    /// A quota that time alone may or may not restore (daily tokens, stored adapters).
    #[error("{message}")]
    QuotaExceeded {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A rate or concurrency limit: retrying after `retry_after` may succeed.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    Overloaded(String),
    /// A failure on our side; the cause is logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The message clients get for every `internal` error.
const INTERNAL_MESSAGE: &str = "internal error";

impl ApiError {
    /// Wraps any server-side failure as an opaque `internal` error.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(cause.into())
    }

    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::AdapterNotFound { .. } => ErrorCode::AdapterNotFound,
            ApiError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ApiError::InvalidAdapter(_) => ErrorCode::InvalidAdapter,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::Overloaded(_) => ErrorCode::Overloaded,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The message safe to show the client: the error's text, except for `internal`.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => INTERNAL_MESSAGE.to_owned(),
            other => other.to_string(),
        }
    }

    /// How long the client should wait before retrying, for 429s that have an answer.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::QuotaExceeded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Logs the cause chain of server-side errors once; client errors are not worth a line.
    pub fn log(&self) {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.public_message(),
            },
        }
    }
}

/// Whole seconds for a `Retry-After` header, rounded up and never zero (zero invites a busy loop).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The JSON error body of every failed REST call.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Code and human-readable message.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code().status()
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        error_response(self.code(), self.public_message(), self.retry_after())
    }
}

/// The HTTP answer for an error known only by its parts (one that crossed a channel).
pub fn error_response(
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
) -> HttpResponse {
    let mut response = HttpResponse::build(code.status());
    if let Some(wait) = retry_after {
        response.insert_header((
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(wait)),
        ));
    }
    response.json(ErrorBody {
        error: ErrorDetail { code, message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body_json(error: &ApiError) -> serde_json::Value {
        let response = error.error_response();
        let bytes = response
            .into_body()
            .try_into_bytes()
            .expect("a json body is in memory");
        serde_json::from_slice(&bytes).expect("the body is json")
    }

    #[test]
    fn every_code_has_the_status_of_the_contract() {
        let expected = [
            ("unauthorized", 401),
            ("forbidden", 403),
            ("not_found", 404),
            ("adapter_not_found", 404),
            ("invalid_request", 400),
            ("invalid_adapter", 422),
            ("payload_too_large", 413),
            ("conflict", 409),
            ("quota_exceeded", 429),
            ("rate_limited", 429),
            ("overloaded", 503),
            ("internal", 500),
        ];
        for (code, (name, status)) in ErrorCode::ALL.iter().zip(expected) {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.status().as_u16(), status, "{name}");
            assert_eq!(serde_json::to_value(code).unwrap(), name);
        }
    }

    #[test]
    fn internal_errors_hide_their_cause_from_the_client() {
        let error = ApiError::internal(anyhow::anyhow!("password=hunter2 in connection string"));
        let body = body_json(&error);
        assert_eq!(body["error"]["code"], "internal");
        assert_eq!(body["error"]["message"], "internal error");
        assert!(!body.to_string().contains("hunter2"));
    }

    #[test]
    fn rate_limited_answers_carry_a_retry_after_header_in_whole_seconds() {
        let error = ApiError::RateLimited {
            message: "slow down".into(),
            retry_after: Duration::from_millis(1500),
        };
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    }

    #[test]
    fn client_errors_show_their_message() {
        let body = body_json(&ApiError::AdapterNotFound {
            name: "legal-v2".into(),
        });
        assert_eq!(body["error"]["code"], "adapter_not_found");
        assert_eq!(
            body["error"]["message"],
            "adapter 'legal-v2' does not exist"
        );
    }
}
