//! The axum extractor of request bodies: every rejection is a 400 in vLLM's error shape, never
//! axum's 415/422 plain-text ones. Order as in vLLM: the body is read (413 over the limit, 408
//! when the client pauses past `--http-body-timeout`), the
//! Content-Type must be `application/json`, then [`protocol::body`] reads the JSON.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use protocol::body::{request_object, WireRequest};
use protocol::ApiError;

use super::state::AppState;

/// A request body read as `T`, or vLLM's 400.
#[derive(Debug)]
pub struct VllmJson<T>(pub T);

impl<T: WireRequest> FromRequest<AppState> for VllmJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type_ok = is_json_content_type(req.headers());
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.config.max_body_bytes)
            } else if let Some(waited) = httpserve::body_timeout(&rejection) {
                ApiError::body_timeout(waited)
            } else {
                ApiError::unreadable_body()
            }
        })?;
        // FastAPI only parses JSON bodies; others fail vLLM's Content-Type dependency.
        if !content_type_ok {
            return Err(ApiError::bad_request(
                "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            ));
        }
        T::from_json(&request_object(&bytes)?).map(VllmJson)
    }
}

/// vLLM accepts `application/json` with any parameters (`; charset=utf-8`), case-insensitively.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_check() {
        let mut h = HeaderMap::new();
        assert!(!is_json_content_type(&h));
        h.insert(
            CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json_content_type(&h));
        h.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json_content_type(&h));
    }
}
