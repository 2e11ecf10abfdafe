//! API errors in vLLM's wire shape: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status vLLM uses. With the `axum` feature an [`ApiError`] is also an axum response.

use std::fmt::Display;

use http::StatusCode;
use serde::Serialize;

/// vLLM's `EngineDeadError` text.
const ENGINE_DEAD_MESSAGE: &str =
    "EngineCore encountered an issue. See stack trace (above) for the root cause.";

/// One error response. `kind` is the wire `type` (`BadRequestError`, `NotFoundError`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 `BadRequestError` without a parameter (vLLM's plain `ValueError` path).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "BadRequestError",
            param: None,
        }
    }

    /// A 400 as vLLM's `VLLMValidationError` renders it: the message gets a
    /// ` (parameter=…)` suffix and `param` is set.
    pub fn invalid(message: impl Display, param: &str) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(format!("{message} (parameter={param})"))
        }
    }

    /// Like [`ApiError::invalid`], with the rejected value in the suffix
    /// (` (parameter=…, value=…)`).
    pub fn invalid_value(message: impl Display, param: &str, value: impl Display) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(format!("{message} (parameter={param}, value={value})"))
        }
    }

    /// Starlette's HTTP errors (unknown route, wrong method) as vLLM's handler renders them:
    /// `type` and `message` are the status phrase.
    pub fn http(status: StatusCode) -> Self {
        let phrase = status.canonical_reason().unwrap_or("Error");
        Self {
            status,
            message: phrase.to_string(),
            kind: phrase,
            param: None,
        }
    }

    /// 404 for a `model` that is not served.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "NotFoundError",
            param: Some("model".to_string()),
        }
    }

    /// 500 `InternalServerError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "InternalServerError",
            param: None,
        }
    }

    /// 500 for a dead engine, with vLLM's `EngineDeadError` text.
    pub fn engine_dead() -> Self {
        Self::internal(ENGINE_DEAD_MESSAGE)
    }

    /// 500 for a request the engine finished with `finish_reason == "error"` (vLLM's
    /// `GenerationError`).
    pub fn generation_failed() -> Self {
        Self::internal("Internal server error")
    }

    /// 503 `ServiceUnavailableError` (an engine that takes no more requests).
    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "ServiceUnavailableError",
            param: None,
        }
    }

    /// 400 for a body that could not be read or decoded (FastAPI's message).
    pub fn unreadable_body() -> Self {
        Self::bad_request("There was an error parsing the body")
    }

    /// 408 for a body whose client paused longer than the server waits.
    pub fn body_timeout(waited: std::time::Duration) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("The request body paused for more than {waited:?}"),
            kind: "Request Timeout",
            param: None,
        }
    }

    /// 413 for a body over the server's limit.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("Request body is larger than the limit of {limit_bytes} bytes"),
            kind: "Request Entity Too Large",
            param: None,
        }
    }

    /// The `{"error": {...}}` body, fields in vLLM's order.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorInfo {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        }
    }

    /// The body as one JSON line, for an SSE `data:` event.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorInfo<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorInfo<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for ApiError {
    fn into_response(self) -> axum_core::response::Response {
        let mut response = axum_core::response::IntoResponse::into_response(self.to_json());
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_vllm_shape() {
        let e = ApiError::model_not_found("gpt-x");
        assert_eq!(
            e.to_json(),
            r#"{"error":{"message":"The model `gpt-x` does not exist.","type":"NotFoundError","param":"model","code":404}}"#
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn validation_errors_carry_parameter_suffix() {
        let e = ApiError::invalid_value("top_p must be in (0, 1], got 1.5.", "top_p", 1.5);
        assert_eq!(
            e.message,
            "top_p must be in (0, 1], got 1.5. (parameter=top_p, value=1.5)"
        );
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = ApiError::invalid(
            "Stream options can only be defined when `stream=True`.",
            "stream_options",
        );
        assert!(e.message.ends_with("(parameter=stream_options)"));
    }
}
