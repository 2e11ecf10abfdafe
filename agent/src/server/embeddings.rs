//! `POST /v1/embeddings`, as vLLM's pooling runner serves a decoder model: each input runs
//! through the engine like a prompt (batched with everything else), its final hidden states
//! are pooled (`--pooler-config`: last token by default, or mean) and L2-normalised unless the
//! request or the config says otherwise. `encoding_format` `float` or `base64` (little-endian
//! float32, what the `openai` client asks for by default).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use base64::Engine as _;
use futures::future::try_join_all;
use prompt::{Endpoint, PromptLimits};
use protocol::request::{EmbeddingRequest, Prompt};
use protocol::response::{EmbeddingData, EmbeddingResponse, EmbeddingValue, UsageInfo};
use protocol::ApiError;

use crate::engine::{FinishReason, GenerateRequest, Pooling, SamplingParams};

use super::extract::VllmJson;
use super::prepare::run_blocking;
use super::response::request_id_base;
use super::state::{unix_now, AppState};
use super::validation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

pub async fn create_embedding(
    State(state): State<AppState>,
    headers: HeaderMap,
    VllmJson(request): VllmJson<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    state.check_model(request.model.as_ref().map(|m| m.0.as_str()))?;
    if !state.engine.is_alive() {
        return Err(ApiError::engine_dead());
    }
    if request.messages.is_some() {
        return Err(ApiError::invalid(
            "Chat-style `messages` are not supported for embeddings by this server; send \
             `input`.",
            "messages",
        ));
    }
    if request.dimensions.is_some() {
        return Err(ApiError::invalid(
            format!(
                "Model \"{}\" does not support matryoshka representation, changing output \
                 dimensions will lead to poor results.",
                state.model_name()
            ),
            "dimensions",
        ));
    }
    if let Some(p) = request.priority.filter(|p| p.0 != 0) {
        return Err(ApiError::bad_request(format!(
            "Got priority {} but Priority scheduling is not enabled.",
            p.0
        )));
    }
    let encoding = match request.encoding_format.as_ref().map(|f| f.0.as_str()) {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`encoding_format` must be 'float' or 'base64', got {other:?}."),
                "encoding_format",
            ))
        }
    };
    let pooling = Pooling {
        normalize: request
            .normalize
            .map_or(state.config.pooling.normalize, |b| b.0),
        ..state.config.pooling
    };
    let prompts = {
        let (state, request) = (state.clone(), request.clone());
        run_blocking(move || tokenize_inputs(&state, &request)).await?
    };

    let id = format!(
        "embd-{}",
        request_id_base(&headers, request.request_id.as_ref())
    );
    let mut runs = Vec::with_capacity(prompts.len());
    for (i, tokens) in prompts.iter().enumerate() {
        let engine_request = GenerateRequest {
            request_id: format!("{id}-{i}-{:08x}", rand::random::<u32>()),
            prompt_token_ids: tokens.clone(),
            params: SamplingParams::default(),
            cache_salt: None,
            parent: None,
            pooling: Some(pooling),
            kv_transfer_params: None,
        };
        // An error drops the streams made so far, which aborts them.
        runs.push(state.engine.generate(engine_request)?);
    }
    let embeddings = try_join_all(runs.into_iter().map(|mut run| async move {
        while let Some(out) = run.recv().await {
            match (out.finish, out.embedding) {
                (Some(f), _) if f.reason == FinishReason::Error => break,
                (_, Some(e)) => return Ok(e),
                (Some(_), None) => break,
                (None, None) => {}
            }
        }
        Err(ApiError::generation_failed())
    }))
    .await?;

    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, e)| EmbeddingData {
            index,
            object: "embedding",
            embedding: match encoding {
                Encoding::Float => EmbeddingValue::Float(e),
                Encoding::Base64 => EmbeddingValue::Base64(base64_f32(&e)),
            },
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        id,
        object: "list",
        created: unix_now(),
        model: state.model_name().to_string(),
        data,
        usage: UsageInfo::new(prompt_tokens, 0),
    }))
}

/// Each input's token ids, checked against the context as vLLM checks embedding inputs (the
/// whole context is usable: nothing is generated).
fn tokenize_inputs(
    state: &AppState,
    request: &EmbeddingRequest,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let max_model_len = state.config.max_model_len;
    let vocab_size = state.tokenizer.vocab_size();
    let truncate = request.truncate_prompt_tokens.map(|t| t.0);
    let limits = PromptLimits {
        max_model_len,
        truncate_prompt_tokens: truncate,
    };
    let add_special = Endpoint::Completions.add_special_tokens(request.add_special_tokens);
    let texts_or_ids: Vec<Result<String, Vec<i64>>> = match request.input.clone() {
        Some(Prompt::Text(t)) => vec![Ok(t)],
        Some(Prompt::Texts(ts)) => ts.into_iter().map(Ok).collect(),
        Some(Prompt::Tokens(ids)) => vec![Err(ids)],
        Some(Prompt::TokenBatches(batches)) => batches.into_iter().map(Err).collect(),
        None => Vec::new(),
    };
    if texts_or_ids.is_empty() {
        return Err(ApiError::invalid("`input` must not be empty.", "input"));
    }
    texts_or_ids
        .into_iter()
        .map(|input| {
            let mut ids = match input {
                Ok(text) => limits.encode(&state.tokenizer, &text, add_special)?,
                Err(raw) => validation::token_ids(&raw, vocab_size)?,
            };
            if let Some(limit) = truncate {
                validation::truncate_prompt(&mut ids, limit, max_model_len, None, "max_tokens")?;
            }
            validation::check_prompt_tokens(&ids, vocab_size)?;
            if ids.len() > max_model_len {
                return Err(ApiError::invalid_value(
                    format!(
                        "This model's maximum context length is {max_model_len} tokens. However, \
                         you requested {} tokens in the input for embedding generation. Please \
                         reduce the length of the input.",
                        ids.len()
                    ),
                    "input_tokens",
                    ids.len(),
                ));
            }
            Ok(ids)
        })
        .collect()
}

/// Base64 of the little-endian float32 bytes (numpy's `tobytes()` on x86, as vLLM sends).
fn base64_f32(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 -> bytes 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }
}
