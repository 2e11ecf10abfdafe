//! `POST /v1/completions`: prompts (text, token ids, or lists of either) → choices, as a JSON
//! response or an SSE stream, following vLLM's `OpenAIServingCompletion`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{BoxStream, Stream, StreamExt};
use prompt::Endpoint;
use protocol::request::{CompletionRequest, Generation, Prompt};
use protocol::response::{
    CompletionChoice, CompletionLogprobs, CompletionResponse, CompletionStreamChoice,
    CompletionStreamResponse, StopReasonWire, UsageInfo,
};
use protocol::ApiError;

use crate::engine::{PromptLogprob, TokenLogprob};

use super::extract::VllmJson;
use super::generate::{self, ChoiceEvent, ChoiceOutput, PreparedPrompt};
use super::logprobs::{completion_logprobs, echo_completion_logprobs, prompt_logprobs, TokenNamer};
use super::prepare::{self, Plan, PromptInput};
use super::response::{request_id_base, UsagePolicy};
use super::state::{unix_now, AppState};
use super::streaming::{chunk_json, sse_response};
use super::validation::{self, DEFAULT_COMPLETION_MAX_TOKENS};

/// What shapes the response of one completions request.
struct Completion {
    id: String,
    created: u64,
    model: String,
    prompts: Vec<PreparedPrompt>,
    n: usize,
    echo: bool,
    /// `echo` with `max_tokens == 0`: only the prompt comes back.
    echo_only: bool,
    logprobs: Option<usize>,
    return_token_ids: bool,
    tokens_as_ids: bool,
    usage: UsagePolicy,
    fingerprint: Option<String>,
}

pub async fn create_completion(
    State(state): State<AppState>,
    headers: HeaderMap,
    VllmJson(request): VllmJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let Generation { fields, common } = request;
    state.admit(&common)?;
    if fields.suffix.is_some() {
        return Err(ApiError::bad_request("suffix is not currently supported"));
    }
    let n = validation::check_n(fields.n.0)?;
    let max_tokens = fields
        .max_tokens
        .map_or(DEFAULT_COMPLETION_MAX_TOKENS, |m| m.0);
    let echo = common.echo();
    let echo_only = echo && max_tokens == 0;
    let logprobs = fields.logprobs.map(|l| l.0);
    let explicit_prompt_logprobs = validation::prompt_logprobs(&common)?;
    // vLLM: echoing with logprobs reports the prompt's logprobs too.
    let prompt_logprobs = match (echo, logprobs) {
        (true, Some(k)) => Some(k),
        _ => explicit_prompt_logprobs,
    };
    let inputs = match fields.prompt {
        Some(Prompt::Text(text)) => vec![PromptInput::Text(text)],
        Some(Prompt::Texts(texts)) => texts.into_iter().map(PromptInput::Text).collect(),
        Some(Prompt::Tokens(ids)) => vec![PromptInput::Tokens(ids)],
        Some(Prompt::TokenBatches(batches)) => {
            batches.into_iter().map(PromptInput::Tokens).collect()
        }
        None => {
            return Err(ApiError::invalid(
                "Either prompt or prompt_embeds must be provided and non-empty.",
                "prompt",
            ))
        }
    };
    let plan = Plan {
        // vLLM generates one token it then drops when echoing with max_tokens=0.
        requested_max_tokens: Some(if echo_only { 1 } else { max_tokens }),
        max_tokens_param: "max_tokens",
        logprobs,
        prompt_logprobs,
        add_special_tokens: Endpoint::Completions.add_special_tokens(common.add_special_tokens),
        need_text: echo,
    };
    let prompts = {
        let (state, common) = (state.clone(), common.clone());
        prepare::run_blocking(move || prepare::prepare(&state, &common, &plan, inputs)).await?
    };

    let id = format!(
        "cmpl-{}",
        request_id_base(&headers, common.request_id.as_ref())
    );
    let prompt_ids: Vec<String> = (0..prompts.len()).map(|p| format!("{id}-{p}")).collect();
    let cache_salt = common.cache_salt.as_ref().map(|s| s.0.as_str());
    let kv_transfer_params = common.kv_transfer_params();
    let events = generate::submit(
        &state.engine,
        &prompts,
        &prompt_ids,
        n,
        cache_salt,
        kv_transfer_params.as_ref(),
    )?;
    let completion = Completion {
        id,
        created: unix_now(),
        model: state.model_name().to_string(),
        n,
        echo,
        echo_only,
        logprobs: prompts.first().and_then(|p| p.params.logprobs),
        prompts,
        return_token_ids: common.return_token_ids(),
        tokens_as_ids: common.return_tokens_as_token_ids.is_some_and(|b| b.0),
        usage: UsagePolicy::new(&state, common.stream_options.as_ref()),
        fingerprint: state.config.system_fingerprint.clone(),
    };
    if common.stream() {
        return Ok(sse_response(stream_chunks(state, completion, events)));
    }
    let choices = generate::collect(events, completion.prompts.len() * n).await?;
    Ok(Json(full_response(&state, &completion, choices)).into_response())
}

/// The non-streaming response.
fn full_response(
    state: &AppState,
    c: &Completion,
    outputs: Vec<ChoiceOutput>,
) -> CompletionResponse {
    let namer = TokenNamer::new(&state.tokenizer, c.tokens_as_ids);
    let completion_tokens = outputs.iter().map(|o| o.token_ids.len()).sum();
    // vLLM reports the cached tokens of the last prompt.
    let cached = outputs
        .get((c.prompts.len() - 1) * c.n)
        .map(|o| o.num_cached_tokens);
    // As vLLM: the first output's (a P/D prefill leg's answer).
    let first_kv_transfer_params = outputs
        .first()
        .and_then(|o| o.finish.kv_transfer_params.clone());
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(index, out)| {
            let prompt = &c.prompts[index / c.n];
            let text = if c.echo_only {
                prompt.text.clone()
            } else if c.echo {
                format!("{}{}", prompt.text, out.text)
            } else {
                out.text
            };
            let prompt_lps = out.prompt_logprobs.as_deref();
            CompletionChoice {
                index,
                text,
                logprobs: c
                    .logprobs
                    .map(|k| choice_logprobs(c, prompt, prompt_lps, &out.logprobs, k, &namer, 0)),
                finish_reason: Some(out.finish.reason.as_str()),
                stop_reason: out.finish.stop_reason.as_ref().map(StopReasonWire::from),
                token_ids: c.return_token_ids.then_some(out.token_ids),
                prompt_logprobs: prompt_lps.map(|p| prompt_logprobs(p, &namer)),
                prompt_token_ids: c.return_token_ids.then(|| prompt.token_ids.clone()),
            }
        })
        .collect();
    let prompt_tokens = c.prompts.iter().map(|p| p.token_ids.len()).sum();
    let mut usage = UsageInfo::new(prompt_tokens, completion_tokens);
    let kv_transfer_params = first_kv_transfer_params;
    usage.prompt_tokens_details = Some(c.usage.details(cached));
    CompletionResponse {
        id: c.id.clone(),
        object: "text_completion",
        created: c.created,
        model: c.model.clone(),
        choices,
        service_tier: None,
        system_fingerprint: c.fingerprint.clone(),
        usage,
        kv_transfer_params,
    }
}

/// A choice's `logprobs`: with `echo`, the prompt's first (and only the prompt's when
/// `max_tokens` is 0, as the one generated token is dropped).
fn choice_logprobs(
    c: &Completion,
    prompt: &PreparedPrompt,
    prompt_lps: Option<&[PromptLogprob]>,
    generated: &[TokenLogprob],
    k: usize,
    namer: &TokenNamer<'_>,
    offset: usize,
) -> CompletionLogprobs {
    if !c.echo {
        return completion_logprobs(generated, k, namer, offset);
    }
    let generated = if c.echo_only { &[] } else { generated };
    let prompt_lps = prompt_lps.unwrap_or_default();
    echo_completion_logprobs(&prompt.token_ids, prompt_lps, generated, k, namer)
}

/// The SSE chunks of a streamed request (without the final `[DONE]`).
fn stream_chunks(
    state: AppState,
    c: Completion,
    mut events: BoxStream<'static, ChoiceEvent>,
) -> impl Stream<Item = String> + Send + 'static {
    async_stream::stream! {
        let namer = TokenNamer::new(&state.tokenizer, c.tokens_as_ids);
        let total = c.prompts.len() * c.n;
        let mut text_chars = vec![0usize; total];
        let mut num_tokens = vec![0usize; total];
        let mut prompt_sent = vec![false; total];
        let mut cached = None;
        while let Some(event) = events.next().await {
            let (index, out) = match event {
                ChoiceEvent::Output(index, out) => (index, out),
                ChoiceEvent::Lost(_) => {
                    yield ApiError::engine_dead().to_json();
                    return;
                }
            };
            cached.get_or_insert(out.num_cached_tokens);
            let prompt = &c.prompts[index / c.n];
            let mut prompt_token_ids = None;
            let echoing = c.echo && !prompt_sent[index];
            let text = if echoing {
                prompt_sent[index] = true;
                prompt_token_ids = Some(prompt.token_ids.clone());
                if c.echo_only {
                    prompt.text.clone()
                } else {
                    format!("{}{}", prompt.text, out.text)
                }
            } else {
                if c.return_token_ids && !prompt_sent[index] {
                    prompt_sent[index] = true;
                    prompt_token_ids = Some(prompt.token_ids.clone());
                }
                // Prefill-only steps carry nothing to send.
                if out.text.is_empty()
                    && out.token_ids.is_empty()
                    && num_tokens[index] == 0
                    && out.finish.is_none()
                {
                    continue;
                }
                out.text.clone()
            };
            let logprobs = c.logprobs.map(|k| match echoing {
                true => {
                    let prompt_lps = out.prompt_logprobs.as_deref();
                    choice_logprobs(&c, prompt, prompt_lps, &out.logprobs, k, &namer, 0)
                }
                false => completion_logprobs(&out.logprobs, k, &namer, text_chars[index]),
            });
            text_chars[index] += text.chars().count();
            num_tokens[index] += out.token_ids.len();
            if out.finish.as_ref().is_some_and(|f| f.reason == crate::engine::FinishReason::Error) {
                yield ApiError::generation_failed().to_json();
                return;
            }
            let finished = out.finish.is_some();
            let chunk = CompletionStreamResponse {
                id: c.id.clone(),
                object: "text_completion",
                created: c.created,
                model: c.model.clone(),
                choices: vec![CompletionStreamChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: out.finish.as_ref().map(|f| f.reason.as_str()),
                    stop_reason: out
                        .finish
                        .as_ref()
                        .and_then(|f| f.stop_reason.as_ref())
                        .map(StopReasonWire::from),
                    prompt_token_ids,
                    token_ids: c.return_token_ids.then_some(out.token_ids),
                }],
                usage: c
                    .usage
                    .continuous
                    .then(|| UsageInfo::new(prompt.token_ids.len(), num_tokens[index])),
                system_fingerprint: c.usage.fingerprint_on_finish(finished, &c.fingerprint),
            };
            yield chunk_json(&chunk);
        }
        if c.usage.include {
            let prompt_tokens = c.prompts.iter().map(|p| p.token_ids.len()).sum();
            let mut usage = UsageInfo::new(prompt_tokens, num_tokens.iter().sum());
            usage.prompt_tokens_details = c.usage.details(cached).map(Some);
            let chunk = CompletionStreamResponse {
                id: c.id.clone(),
                object: "text_completion",
                created: c.created,
                model: c.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
                system_fingerprint: c.fingerprint.clone(),
            };
            yield chunk_json(&chunk);
        }
    }
}
