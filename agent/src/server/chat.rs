//! `POST /v1/chat/completions`: messages → the model's chat template → one prompt → `n`
//! choices, as a JSON response or an SSE stream, following vLLM's `OpenAIServingChat`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{BoxStream, Stream, StreamExt};
use prompt::chat::{content_text, render, ChatRender};
use prompt::Endpoint;
use protocol::request::{ChatCompletionRequest, Generation};
use protocol::response::{
    ChatChoice, ChatCompletionResponse, ChatLogprobs, ChatMessageOut, ChatStreamChoice,
    ChatStreamResponse, Delta, StopReasonWire, UsageInfo,
};
use protocol::ApiError;
use serde_json::Value;

use crate::engine::FinishReason;

use super::extract::VllmJson;
use super::generate::{self, ChoiceEvent, ChoiceOutput, PreparedPrompt};
use super::logprobs::{chat_logprobs, prompt_logprobs, TokenNamer};
use super::prepare::{self, Plan, PromptInput};
use super::response::{request_id_base, UsagePolicy};
use super::state::{unix_now, AppState};
use super::streaming::{chunk_json, sse_response};
use super::validation;

/// The role of generated messages (vLLM's `--response-role` default).
const RESPONSE_ROLE: &str = "assistant";

/// What shapes the response of one chat request.
pub(super) struct Chat {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt: PreparedPrompt,
    n: usize,
    role: String,
    /// With `echo`: the last message's content, sent before the generated text.
    echo: Option<String>,
    logprobs: Option<usize>,
    return_token_ids: bool,
    tokens_as_ids: bool,
    usage: UsagePolicy,
    fingerprint: Option<String>,
}

/// `tool_choice`: only `none` can be served (no tool-call parser).
fn check_tool_choice(tool_choice: Option<&Value>, has_tools: bool) -> Result<(), ApiError> {
    let choice = match tool_choice {
        None if has_tools => "auto",
        None | Some(Value::Null) => "none",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => "named",
    };
    match choice {
        "none" => Ok(()),
        "auto" => Err(ApiError::bad_request(
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be \
             set",
        )),
        _ => Err(ApiError::invalid(
            "`tool_choice` \"required\" and named tool choice are not supported by this server.",
            "tool_choice",
        )),
    }
}

pub async fn create_chat_completion(
    State(state): State<AppState>,
    headers: HeaderMap,
    VllmJson(request): VllmJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let stream = request.common.stream();
    let (chat, events) = start(&state, &headers, request, "chatcmpl-").await?;
    if stream {
        return Ok(sse_response(stream_chunks(state, chat, events)));
    }
    let choices = generate::collect(events, chat.n).await?;
    Ok(Json(full_response(&state, &chat, choices)).into_response())
}

/// Checks, templates and submits a chat request (also the Responses API's, turned into one):
/// what shapes its answer and the engine's events. `id_prefix` starts the response id.
pub(super) async fn start(
    state: &AppState,
    headers: &HeaderMap,
    request: ChatCompletionRequest,
    id_prefix: &str,
) -> Result<(Chat, BoxStream<'static, ChoiceEvent>), ApiError> {
    let Generation { fields, common } = request;
    state.admit(&common)?;
    let template_in_kwargs = fields
        .chat_template_kwargs
        .as_ref()
        .is_some_and(|k| k.0.get("chat_template").is_some_and(|t| !t.is_null()));
    if fields.chat_template.is_some() || template_in_kwargs {
        return Err(ApiError::bad_request(
            "Chat template is passed with request, but --trust-request-chat-template is not \
             set. Refused request with untrusted chat template.",
        ));
    }
    check_tool_choice(
        fields.tool_choice.as_ref(),
        fields.tools.as_ref().is_some_and(|t| !t.is_empty()),
    )?;
    let n = validation::check_n(fields.n.map_or(1, |n| n.0))?;
    let Some(last) = fields.messages.last() else {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message.",
            "messages",
        ));
    };
    let add_generation_prompt = ChatRender::of_chat(&fields).add_generation_prompt;
    let role = if add_generation_prompt {
        RESPONSE_ROLE.to_string()
    } else {
        last.role.clone()
    };
    let echo = if common.echo() && last.role == role {
        Some(content_text(last)?).filter(|t| !t.is_empty())
    } else {
        None
    };
    let (requested_max_tokens, max_tokens_param) =
        match (fields.max_completion_tokens, fields.max_tokens) {
            (Some(m), _) => (Some(m.0), "max_completion_tokens"),
            (None, m) => (m.map(|m| m.0), "max_tokens"),
        };
    let plan = Plan {
        requested_max_tokens,
        max_tokens_param,
        logprobs: fields
            .logprobs
            .is_some_and(|b| b.0)
            .then(|| fields.top_logprobs.map_or(0, |t| t.0)),
        prompt_logprobs: validation::prompt_logprobs(&common)?,
        add_special_tokens: Endpoint::ChatCompletions.add_special_tokens(common.add_special_tokens),
        need_text: false,
    };
    let mut prompts = {
        let (state, common) = (state.clone(), common.clone());
        prepare::run_blocking(move || {
            let chat = ChatRender::of_chat(&fields);
            prepare::prompt_limits(&state, &common).check_chat(&state.tokenizer, &chat)?;
            let text = render(state.chat_template.as_deref(), &chat)?;
            prepare::prepare(&state, &common, &plan, vec![PromptInput::Text(text)])
        })
        .await?
    };

    let id = format!(
        "{id_prefix}{}",
        request_id_base(headers, common.request_id.as_ref())
    );
    let cache_salt = common.cache_salt.as_ref().map(|s| s.0.as_str());
    let kv_transfer_params = common.kv_transfer_params();
    let events = generate::submit(
        &state.engine,
        &prompts,
        std::slice::from_ref(&id),
        n,
        cache_salt,
        kv_transfer_params.as_ref(),
    )?;
    let prompt = prompts.remove(0);
    let chat = Chat {
        id,
        created: unix_now(),
        model: state.model_name().to_string(),
        logprobs: prompt.params.logprobs,
        prompt,
        n,
        role,
        echo,
        return_token_ids: common.return_token_ids(),
        tokens_as_ids: common.return_tokens_as_token_ids.is_some_and(|b| b.0),
        usage: UsagePolicy::new(state, common.stream_options.as_ref()),
        fingerprint: state.config.system_fingerprint.clone(),
    };
    Ok((chat, events))
}

/// The non-streaming response.
fn full_response(state: &AppState, c: &Chat, outputs: Vec<ChoiceOutput>) -> ChatCompletionResponse {
    let namer = TokenNamer::new(&state.tokenizer, c.tokens_as_ids);
    let completion_tokens = outputs.iter().map(|o| o.token_ids.len()).sum();
    let cached = outputs.first().map(|o| o.num_cached_tokens);
    // As vLLM: the first output's (a P/D prefill leg's answer).
    let kv_transfer_params = outputs
        .first()
        .and_then(|o| o.finish.kv_transfer_params.clone());
    let prompt_lps = outputs
        .first()
        .and_then(|o| o.prompt_logprobs.as_deref())
        .map(|p| prompt_logprobs(p, &namer));
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(index, out)| {
            let content = match &c.echo {
                Some(echo) => format!("{echo}{}", out.text),
                None => out.text,
            };
            ChatChoice {
                index,
                message: ChatMessageOut::new(c.role.clone(), content),
                logprobs: c.logprobs.map(|k| ChatLogprobs {
                    content: Some(chat_logprobs(&out.logprobs, k, &namer)),
                }),
                finish_reason: Some(out.finish.reason.as_str()),
                stop_reason: out.finish.stop_reason.as_ref().map(StopReasonWire::from),
                token_ids: c.return_token_ids.then_some(out.token_ids),
            }
        })
        .collect();
    let mut usage = UsageInfo::new(c.prompt.token_ids.len(), completion_tokens);
    usage.prompt_tokens_details = Some(c.usage.details(cached));
    ChatCompletionResponse {
        id: c.id.clone(),
        object: "chat.completion",
        created: c.created,
        model: c.model.clone(),
        choices,
        service_tier: None,
        system_fingerprint: c.fingerprint.clone(),
        usage,
        prompt_logprobs: prompt_lps,
        prompt_token_ids: c.return_token_ids.then(|| c.prompt.token_ids.clone()),
        kv_transfer_params,
    }
}

impl Chat {
    fn chunk(&self, choice: ChatStreamChoice) -> ChatStreamResponse {
        ChatStreamResponse {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
            system_fingerprint: None,
            prompt_token_ids: None,
        }
    }

    /// `usage` of a chunk when continuous usage stats are on.
    fn running_usage(&self, completion_tokens: usize) -> Option<UsageInfo> {
        self.usage
            .continuous
            .then(|| UsageInfo::new(self.prompt.token_ids.len(), completion_tokens))
    }
}

/// The SSE chunks of a streamed request (without the final `[DONE]`).
fn stream_chunks(
    state: AppState,
    c: Chat,
    mut events: BoxStream<'static, ChoiceEvent>,
) -> impl Stream<Item = String> + Send + 'static {
    async_stream::stream! {
        let namer = TokenNamer::new(&state.tokenizer, c.tokens_as_ids);
        let mut num_tokens = vec![0usize; c.n];
        let mut finish_sent = vec![false; c.n];
        let mut cached = None;
        while let Some(event) = events.next().await {
            let (index, out) = match event {
                ChoiceEvent::Output(index, out) => (index, out),
                ChoiceEvent::Lost(_) => {
                    yield ApiError::engine_dead().to_json();
                    return;
                }
            };
            // vLLM sends the role (and echo) chunks once the engine has answered.
            if cached.is_none() {
                cached = Some(out.num_cached_tokens);
                for i in 0..c.n {
                    let mut chunk = c.chunk(ChatStreamChoice {
                        index: i,
                        delta: Delta { role: Some(c.role.clone()), content: Some(String::new()) },
                        logprobs: None,
                        finish_reason: None,
                        stop_reason: None,
                        token_ids: None,
                    });
                    chunk.prompt_token_ids =
                        Some(c.return_token_ids.then(|| c.prompt.token_ids.clone()));
                    chunk.usage = c.running_usage(0);
                    yield chunk_json(&chunk);
                }
                if let Some(echo) = &c.echo {
                    for i in 0..c.n {
                        let mut chunk = c.chunk(ChatStreamChoice {
                            index: i,
                            delta: Delta { role: None, content: Some(echo.clone()) },
                            logprobs: None,
                            finish_reason: None,
                            stop_reason: None,
                            token_ids: None,
                        });
                        chunk.usage = c.running_usage(0);
                        yield chunk_json(&chunk);
                    }
                }
            }
            if finish_sent[index] {
                continue;
            }
            if out.finish.as_ref().is_some_and(|f| f.reason == FinishReason::Error) {
                yield ApiError::generation_failed().to_json();
                return;
            }
            // Prefill-only steps carry nothing to send.
            if out.text.is_empty()
                && out.token_ids.is_empty()
                && num_tokens[index] == 0
                && out.finish.is_none()
            {
                continue;
            }
            num_tokens[index] += out.token_ids.len();
            let logprobs = c.logprobs.map(|k| ChatLogprobs {
                content: Some(chat_logprobs(&out.logprobs, k, &namer)),
            });
            let finished = out.finish.is_some();
            finish_sent[index] = finished;
            let mut chunk = c.chunk(ChatStreamChoice {
                index,
                delta: Delta { role: None, content: Some(out.text) },
                logprobs,
                finish_reason: out.finish.as_ref().map(|f| f.reason.as_str()),
                stop_reason: out
                    .finish
                    .as_ref()
                    .map(|f| f.stop_reason.as_ref().map(StopReasonWire::from)),
                token_ids: Some(c.return_token_ids.then_some(out.token_ids)),
            });
            chunk.usage = c.running_usage(num_tokens[index]);
            chunk.system_fingerprint = c.usage.fingerprint_on_finish(finished, &c.fingerprint);
            yield chunk_json(&chunk);
        }
        if c.usage.include {
            let mut usage = UsageInfo::new(c.prompt.token_ids.len(), num_tokens.iter().sum());
            usage.prompt_tokens_details = c.usage.details(cached).map(Some);
            let chunk = ChatStreamResponse {
                id: c.id.clone(),
                object: "chat.completion.chunk",
                created: c.created,
                model: c.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
                system_fingerprint: c.fingerprint.clone(),
                prompt_token_ids: None,
            };
            yield chunk_json(&chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_choice_refusals() {
        assert!(check_tool_choice(None, true).is_err());
        assert!(check_tool_choice(Some(&Value::String("required".into())), true).is_err());
        check_tool_choice(Some(&Value::String("none".into())), true).unwrap();
        check_tool_choice(None, false).unwrap();
    }
}
