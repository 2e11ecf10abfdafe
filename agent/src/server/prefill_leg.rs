//! llm-d's routing-sidecar flow, in the decode pod itself (tiers-pd.md §4): a completion or
//! chat request with the `x-prefiller-host-port` header is first sent to that prefill pod with
//! `kv_transfer_params.do_remote_decode`, `stream: false` and one token; its answer's
//! `kv_transfer_params` then go, with the original body, to this pod's own handler, which pulls
//! the prompt's blocks and decodes. So llm-d's endpoint picker (and our router) can drive our
//! pods with no sidecar container. A prefill pod that answers 4xx has its answer returned as
//! it is (as the sidecar does); one that cannot be reached, times out or fails (5xx) costs a
//! local prefill instead of an error.

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use protocol::ApiError;
use serde_json::{json, Map, Value};

use super::state::AppState;

pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
const REQUEST_ID_HEADER: &str = "x-request-id";
/// The whole prefill leg, long prompts included.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn prefill_leg(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(prefiller) = request.headers().get(PREFILLER_HEADER).cloned() else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_string();
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(PREFILLER_HEADER);
    let generates = path == "/v1/completions" || path == "/v1/chat/completions";
    // The first of a comma list, as the sidecar takes it.
    let target = prefiller
        .to_str()
        .ok()
        .and_then(|v| v.split(',').map(str::trim).find(|s| !s.is_empty()))
        .map(str::to_string);
    let (true, Some(target)) = (generates, target) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    let bytes = match to_bytes(body, state.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return ApiError::payload_too_large(state.config.max_body_bytes).into_response(),
    };
    // A body that is not a JSON object is the handler's to reject, with its own message.
    let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(&bytes) else {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let request_id = parts
        .headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        parts.headers.insert(REQUEST_ID_HEADER, v);
    }
    let url = format!("http://{target}{path}");
    let mut leg = state
        .http
        .post(&url)
        .timeout(PREFILL_TIMEOUT)
        .header(REQUEST_ID_HEADER, &request_id)
        .json(&Value::Object(prefill_body(&original)));
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        leg = leg.header(header::AUTHORIZATION, auth.clone());
    }
    match leg.send().await {
        Ok(answer) if answer.status().is_success() => {
            match answer.json::<Value>().await {
                Ok(v) => match v.get("kv_transfer_params") {
                    Some(params @ Value::Object(_)) => {
                        original.insert("kv_transfer_params".into(), params.clone());
                    }
                    // A prefill pod without P/D: nothing to pull, decode computes it all.
                    _ => {
                        original.remove("kv_transfer_params");
                    }
                },
                Err(e) => failed(&state, &url, &e.to_string(), &mut original),
            }
        }
        Ok(answer) if answer.status().is_client_error() => return relay(answer).await,
        Ok(answer) => failed(&state, &url, &answer.status().to_string(), &mut original),
        Err(e) => failed(&state, &url, &e.to_string(), &mut original),
    }
    let body = match serde_json::to_vec(&Value::Object(original)) {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// The sidecar's prefill-leg body: the original with the P/D ask, no streaming, one token.
fn prefill_body(original: &Map<String, Value>) -> Map<String, Value> {
    let mut body = original.clone();
    body.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false,
               "remote_engine_id": null, "remote_block_ids": null,
               "remote_host": null, "remote_port": null}),
    );
    body.insert("stream".into(), Value::Bool(false));
    body.remove("stream_options");
    for key in ["max_tokens", "max_completion_tokens", "min_tokens"] {
        body.insert(key.into(), json!(1));
    }
    body
}

fn failed(state: &AppState, url: &str, why: &str, original: &mut Map<String, Value>) {
    tracing::warn!("prefill leg to {url} failed ({why}); prefilling locally");
    state.metrics.kv_transfer.prefill_leg_failures.inc();
    original.remove("kv_transfer_params");
}

/// The prefill pod's own answer, status and body as they are.
async fn relay(answer: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let body = answer.bytes().await.unwrap_or_default();
    let mut response = (status, body).into_response();
    if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_leg_asks_for_one_unstreamed_token_and_a_remote_decode() {
        let original = json!({"model": "m", "prompt": "hi", "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 50, "temperature": 0});
        let Value::Object(original) = original else {
            unreachable!()
        };
        let body = prefill_body(&original);
        assert_eq!(body["stream"], false);
        assert!(!body.contains_key("stream_options"));
        for key in ["max_tokens", "max_completion_tokens", "min_tokens"] {
            assert_eq!(body[key], 1, "{key}");
        }
        assert_eq!(body["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(body["kv_transfer_params"]["do_remote_prefill"], false);
        assert_eq!(body["prompt"], "hi");
        assert_eq!(body["temperature"], 0);
    }
}
