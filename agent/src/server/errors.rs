//! API errors in vLLM's wire shape: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status vLLM uses, plus the Python-style number formatting its messages carry.

use std::fmt::Display;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EngineError;

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

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Dead => Self::engine_dead(),
            EngineError::Overloaded => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "ServiceUnavailableError",
                param: None,
            },
            EngineError::DuplicateRequestId(_) => Self::bad_request(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A float as Python's `str(float)` prints it (`1.0`, `0.5`, `1e-05`, `inf`), so messages read
/// like vLLM's.
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".to_string();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let abs = v.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust prints `1e-5` / `1.5e20`; Python `1e-05` / `1.5e+20`.
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((s.as_str(), "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{v}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
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

    #[test]
    fn engine_errors_map_to_statuses() {
        assert_eq!(
            ApiError::from(EngineError::Dead).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            ApiError::from(EngineError::Overloaded).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(-1.0), "-1.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(2.0), "2.0");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(1.5e20), "1.5e+20");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(f64::INFINITY), "inf");
        assert_eq!(py_float(f64::NAN), "nan");
        assert_eq!(py_float(0.0), "0.0");
    }
}
