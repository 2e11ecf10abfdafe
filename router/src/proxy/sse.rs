//! A pod's event stream relayed whole events at a time, so that a pod that dies mid-stream
//! leaves the client a well-formed ending: the partial event is dropped and the stream ends with
//! an error event in the agent's shape and `data: [DONE]`, as the agent ends its own failed
//! streams.

use std::convert::Infallible;

use axum::body::Bytes;
use futures::stream::{self, Stream, StreamExt};
use protocol::ApiError;

/// Upstream chunks regrouped at event boundaries (`\n\n`). On an upstream error, `on_cut` is
/// called once and the error ending is sent instead of the incomplete rest.
pub fn whole_events<S, E, F>(
    upstream: S,
    on_cut: F,
) -> impl Stream<Item = Result<Bytes, Infallible>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
    F: FnOnce(&E) -> ApiError + Send + 'static,
{
    struct State<S, F> {
        upstream: S,
        pending: Vec<u8>,
        on_cut: Option<F>,
    }
    let state = State {
        upstream,
        pending: Vec::new(),
        on_cut: Some(on_cut),
    };
    stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        loop {
            match st.upstream.next().await {
                Some(Ok(chunk)) => {
                    st.pending.extend_from_slice(&chunk);
                    let Some(end) = last_boundary(&st.pending) else {
                        continue;
                    };
                    let rest = st.pending.split_off(end);
                    let whole = std::mem::replace(&mut st.pending, rest);
                    return Some((Ok(Bytes::from(whole)), Some(st)));
                }
                // A clean end: whatever the pod sent last is its own business.
                None if st.pending.is_empty() => return None,
                None => {
                    let rest = std::mem::take(&mut st.pending);
                    return Some((Ok(Bytes::from(rest)), None));
                }
                Some(Err(e)) => {
                    let error = st.on_cut.take().map(|f| f(&e))?;
                    let ending = protocol::sse::error_ending(&error);
                    return Some((Ok(Bytes::from(ending)), None));
                }
            }
        }
    })
}

/// The end of the last complete event in `buf`.
fn last_boundary(buf: &[u8]) -> Option<usize> {
    buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn relayed(chunks: Vec<Result<&'static str, &'static str>>) -> (String, bool) {
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = cut.clone();
        let upstream = stream::iter(
            chunks
                .into_iter()
                .map(|c| c.map(|s| Bytes::from_static(s.as_bytes()))),
        );
        let out: Vec<_> = whole_events(upstream, move |e| {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
            ApiError::internal(format!("pod lost: {e}"))
        })
        .collect()
        .await;
        let text = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        (text, cut.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[tokio::test]
    async fn whole_streams_pass_unchanged() {
        let (text, cut) = relayed(vec![
            Ok("data: {\"a\""),
            Ok(":1}\n\ndata: [DO"),
            Ok("NE]\n\n"),
        ])
        .await;
        assert_eq!(text, "data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert!(!cut);
    }

    #[tokio::test]
    async fn a_cut_stream_ends_with_an_error_event_and_done() {
        let (text, cut) = relayed(vec![
            Ok("data: {\"a\":1}\n\ndata: {\"b\""),
            Err("connection reset"),
        ])
        .await;
        assert!(cut);
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events[0], "data: {\"a\":1}");
        let error: serde_json::Value =
            serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(error["error"]["code"], 500);
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connection reset"));
        assert_eq!(events[2], "data: [DONE]");
        assert_eq!(events.len(), 3);
    }
}
