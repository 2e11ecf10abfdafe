//! Sending a request to the pods of a decision in order. A pod that fails before its response
//! head arrives (connection refused or reset, the process died mid-request) or answers 503
//! (not ready, overloaded) is skipped before anything reaches the client; the first other
//! answer is streamed back as it arrives, with the pod's name in `x-router-pod`. Dropping the client's response (the
//! client went away) drops the upstream response, which closes that connection to the pod, so
//! the pod aborts the request as vLLM does on a disconnect.

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use protocol::ApiError;

use super::{has_body, Decision, RouterState};

/// Response header naming the pod that served the request.
pub const POD_HEADER: &str = "x-router-pod";

/// The client's request, as forwarded to each pod tried.
pub struct Attempt {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those the
/// client library sets itself.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

pub async fn send(s: &RouterState, mut decision: Decision, attempt: Attempt) -> Response {
    if decision.order.is_empty() {
        return ApiError::service_unavailable("No pods are available to serve the request.")
            .into_response();
    }
    let mut last_failure = String::new();
    let mut first = decision.first_in_flight.take();
    for (i, pod) in decision.order.iter().enumerate() {
        if i > 0 {
            s.metrics.retry();
        }
        let url = format!("{}{}", pod.spec.url, attempt.path_and_query);
        let mut req = s.client.request(attempt.method.clone(), &url);
        for (name, value) in attempt.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
            req = req.header(name, value);
        }
        if has_body(&attempt.method) {
            req = req.body(attempt.body.clone());
        }
        let in_flight = match first.take() {
            Some(counted) if i == 0 => counted,
            _ => pod.load.dispatch(),
        };
        let last = i + 1 == decision.order.len();
        match req.send().await {
            Ok(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE && !last => {
                s.metrics.upstream_failure(&pod.name);
                last_failure = format!("pod {} answered 503", pod.name);
                tracing::debug!(pod = %pod.name, "503, trying the next pod");
            }
            Ok(resp) => {
                // The first choice was recorded as it was chosen; a fallback takes it over.
                if let Some(routed) = s.routed.as_ref().filter(|_| i > 0) {
                    routed.record(&pod.name, &decision.routed_keys);
                }
                s.metrics.decision(
                    &pod.name,
                    decision.prefix_blocks[i],
                    decision.latency.as_secs_f64(),
                );
                return relay(
                    resp,
                    in_flight,
                    &pod.name,
                    s.metrics.broken_responses(&pod.name),
                );
            }
            Err(e) => {
                s.metrics.upstream_failure(&pod.name);
                if e.is_connect() {
                    // Refused or unreachable: keep it out of rankings until a probe passes.
                    pod.load.set_healthy(false);
                }
                tracing::warn!(pod = %pod.name, error = %e, "pod failed, trying the next");
                last_failure = format!("pod {}: {e}", pod.name);
            }
        }
    }
    ApiError::service_unavailable(format!(
        "No pod could serve the request (last: {last_failure})"
    ))
    .into_response()
}

/// The pod's answer with its status and headers; the body passes through chunk by chunk (an
/// event stream whole events at a time, see [`super::sse`]) and keeps the pod's in-flight count
/// until it ends or is dropped. The count is released when the pod's body ends, before the end
/// reaches the client: a client that sends its next request as soon as this one completes must
/// not find it still counted against the pod. A body the pod cuts is counted in `broken`.
fn relay(
    resp: reqwest::Response,
    in_flight: crate::load::InFlight,
    pod: &str,
    broken: prometheus::IntCounter,
) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::with_capacity(resp.headers().len());
    for (name, value) in resp.headers().iter().filter(|(n, _)| !hop_by_hop(n)) {
        headers.append(name.clone(), value.clone());
    }
    let event_stream = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let release = futures::stream::once(async move { drop(in_flight) })
        .filter_map(|()| async { None::<Result<Bytes, reqwest::Error>> });
    let upstream = resp.bytes_stream().chain(release);
    let name = pod.to_string();
    let body = if event_stream {
        Body::from_stream(super::sse::whole_events(Box::pin(upstream), move |e| {
            broken.inc();
            tracing::warn!(pod = %name, error = %e, "pod cut a stream");
            ApiError::internal(format!(
                "The pod serving this request failed mid-stream: {e}"
            ))
        }))
    } else {
        Body::from_stream(upstream.inspect(move |chunk| {
            if let Err(e) = chunk {
                broken.inc();
                tracing::warn!(pod = %name, error = %e, "pod cut a response");
            }
        }))
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    if let Ok(v) = HeaderValue::from_str(pod) {
        out.headers_mut().insert(POD_HEADER, v);
    }
    out
}
