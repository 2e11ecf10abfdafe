//! `POST /v1/responses`: the Responses API without tools, served as the chat completion it
//! amounts to (`instructions` and `input` become messages, see `protocol::responses`): one
//! assistant message of `output_text`, `incomplete` when cut at `max_output_tokens`, and as a
//! stream the typed events the `openai` client reads (created … output_text.delta … completed).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{BoxStream, Stream, StreamExt};
use protocol::responses::{
    OutputMessage, OutputText, ResponseObject, ResponseUsage, ResponsesRequest, StreamEvent,
};
use protocol::ApiError;

use crate::engine::FinishReason;

use super::chat::{self, Chat};
use super::extract::VllmJson;
use super::generate::{self, ChoiceEvent};
use super::streaming::{chunk_json, sse_typed_response};

pub async fn create_response(
    State(state): State<super::state::AppState>,
    headers: HeaderMap,
    VllmJson(request): VllmJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let ResponsesRequest { chat: body, echoed } = request;
    let stream = body.common.stream();
    let (chat, events) = chat::start(&state, &headers, body, "resp_").await?;
    let message_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let response = ResponseObject::new(chat.id.clone(), chat.created, chat.model.clone(), &echoed);
    if stream {
        return Ok(sse_typed_response(stream_events(
            chat, response, message_id, events,
        )));
    }
    let out = generate::collect(events, 1)
        .await?
        .pop()
        .ok_or_else(ApiError::engine_dead)?;
    let cut = out.finish.reason == FinishReason::Length;
    let mut response = response;
    response.finish(
        OutputMessage::new(message_id, status(cut), vec![OutputText::new(out.text)]),
        cut,
        ResponseUsage::new(
            chat.prompt.token_ids.len(),
            out.num_cached_tokens,
            out.token_ids.len(),
        ),
    );
    Ok(Json(response).into_response())
}

fn status(cut: bool) -> &'static str {
    if cut {
        "incomplete"
    } else {
        "completed"
    }
}

/// The typed events of a streamed response.
fn stream_events(
    chat: Chat,
    mut response: ResponseObject,
    item_id: String,
    mut events: BoxStream<'static, ChoiceEvent>,
) -> impl Stream<Item = (&'static str, String)> + Send + 'static {
    async_stream::stream! {
        let mut seq = 0usize;
        let mut next = || { seq += 1; seq - 1 };
        let emit = |e: StreamEvent| (e.kind(), chunk_json(&e));
        yield emit(StreamEvent::Created { sequence_number: next(), response: response.clone() });
        yield emit(StreamEvent::InProgress { sequence_number: next(), response: response.clone() });
        let item = |status, text: Option<String>| {
            OutputMessage::new(item_id.clone(), status, text.map(OutputText::new).into_iter().collect())
        };
        yield emit(StreamEvent::OutputItemAdded {
            sequence_number: next(),
            output_index: 0,
            item: item("in_progress", None),
        });
        yield emit(StreamEvent::ContentPartAdded {
            sequence_number: next(),
            item_id: item_id.clone(),
            output_index: 0,
            content_index: 0,
            part: OutputText::new(String::new()),
        });
        let (mut text, mut tokens, mut cached, mut cut) = (String::new(), 0, 0, false);
        while let Some(event) = events.next().await {
            let out = match event {
                ChoiceEvent::Output(_, out) => out,
                ChoiceEvent::Lost(_) => {
                    yield error_event(next(), &ApiError::engine_dead());
                    return;
                }
            };
            if out.finish.as_ref().is_some_and(|f| f.reason == FinishReason::Error) {
                yield error_event(next(), &ApiError::generation_failed());
                return;
            }
            tokens += out.token_ids.len();
            cached = out.num_cached_tokens;
            cut = out.finish.as_ref().is_some_and(|f| f.reason == FinishReason::Length);
            if !out.text.is_empty() {
                text.push_str(&out.text);
                yield emit(StreamEvent::OutputTextDelta {
                    sequence_number: next(),
                    item_id: item_id.clone(),
                    output_index: 0,
                    content_index: 0,
                    delta: out.text,
                    logprobs: Vec::new(),
                });
            }
        }
        yield emit(StreamEvent::OutputTextDone {
            sequence_number: next(),
            item_id: item_id.clone(),
            output_index: 0,
            content_index: 0,
            text: text.clone(),
            logprobs: Vec::new(),
        });
        yield emit(StreamEvent::ContentPartDone {
            sequence_number: next(),
            item_id: item_id.clone(),
            output_index: 0,
            content_index: 0,
            part: OutputText::new(text.clone()),
        });
        let done = item(status(cut), Some(text));
        yield emit(StreamEvent::OutputItemDone {
            sequence_number: next(),
            output_index: 0,
            item: done.clone(),
        });
        response.finish(done, cut, ResponseUsage::new(chat.prompt.token_ids.len(), cached, tokens));
        let sequence_number = next();
        yield emit(match cut {
            true => StreamEvent::Incomplete { sequence_number, response },
            false => StreamEvent::Completed { sequence_number, response },
        });
    }
}

/// The Responses API's `error` event.
fn error_event(sequence_number: usize, e: &ApiError) -> (&'static str, String) {
    let body = serde_json::json!({
        "type": "error",
        "sequence_number": sequence_number,
        "code": e.status.as_u16().to_string(),
        "message": e.message,
        "param": e.param,
    });
    ("error", body.to_string())
}
