//! The `text/event-stream` response of a streamed request, framed by [`protocol::sse`]: each
//! event, then `[DONE]`, also after an error event.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;

/// The frame of one event.
pub fn event(json: &str) -> Bytes {
    Bytes::from(protocol::sse::event(json))
}

/// Serializes one chunk as an event payload.
pub fn chunk_json<T: Serialize>(chunk: &T) -> String {
    // Response structs always serialize: no maps with non-string keys, no failing impls.
    serde_json::to_string(chunk).unwrap_or_default()
}

/// A `text/event-stream` response of `events` (JSON payloads) followed by `[DONE]`. Dropping
/// the body (client gone) drops `events` and whatever it owns.
pub fn sse_response<S>(events: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let frames = events
        .map(|json| event(&json))
        .chain(stream::once(async {
            Bytes::from_static(protocol::sse::DONE.as_bytes())
        }))
        .map(Ok::<_, Infallible>);
    let mut response = Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}

/// A `text/event-stream` response of typed events (`(type, JSON payload)`), the Responses
/// API's framing: no `[DONE]` at the end.
pub fn sse_typed_response<S>(events: S) -> Response
where
    S: Stream<Item = (&'static str, String)> + Send + 'static,
{
    let frames = events.map(|(kind, json)| {
        Ok::<_, Infallible>(Bytes::from(protocol::sse::typed_event(kind, &json)))
    });
    let mut response = Body::from_stream(frames).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_events_and_done() {
        let response = sse_response(stream::iter(vec!["{\"a\":1}".to_string(), "{}".into()]));
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            &body[..],
            b"data: {\"a\":1}\n\ndata: {}\n\ndata: [DONE]\n\n"
        );
    }
}
