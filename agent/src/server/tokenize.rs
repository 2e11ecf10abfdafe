//! `POST /tokenize` (a prompt, or chat messages through the chat template) and
//! `POST /detokenize`, as vLLM serves them.

use axum::extract::State;
use axum::Json;

use super::chat::{render, ChatRender};
use super::errors::ApiError;
use super::extract::VllmJson;
use super::prompt::run_blocking;
use super::protocol::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::state::AppState;
use super::validation;

pub async fn tokenize(
    State(state): State<AppState>,
    VllmJson(request): VllmJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.check_model(request.model.as_ref().map(|m| m.0.as_str()))?;
    let response = run_blocking(move || {
        let (text, add_special_tokens_default) = match (&request.messages, &request.prompt) {
            (Some(messages), _) => {
                let text = render(
                    state.chat_template.as_deref(),
                    &ChatRender {
                        messages,
                        add_generation_prompt: request.add_generation_prompt.is_none_or(|b| b.0),
                        continue_final_message: request.continue_final_message.is_some_and(|b| b.0),
                        chat_template_kwargs: request.chat_template_kwargs.as_ref(),
                        documents: None,
                        tools: request.tools.as_deref(),
                    },
                )?;
                (text, false)
            }
            (None, Some(prompt)) => (prompt.0.clone(), true),
            (None, None) => {
                return Err(ApiError::invalid(
                    "Either `prompt` or `messages` must be provided.",
                    "prompt",
                ))
            }
        };
        let add_special_tokens = request
            .add_special_tokens
            .map_or(add_special_tokens_default, |b| b.0);
        let tokens = state
            .tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let token_strs = request.return_token_strs.is_some_and(|b| b.0).then(|| {
            tokens
                .iter()
                .map(|&id| state.tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        });
        Ok(TokenizeResponse {
            count: tokens.len(),
            max_model_len: state.config.max_model_len,
            tokens,
            token_strs,
        })
    })
    .await?;
    Ok(Json(response))
}

pub async fn detokenize(
    State(state): State<AppState>,
    VllmJson(request): VllmJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    state.check_model(request.model.as_ref().map(|m| m.0.as_str()))?;
    let ids = validation::token_ids(&request.tokens.0, state.tokenizer.vocab_size())?;
    Ok(Json(DetokenizeResponse {
        prompt: state.tokenizer.decode(&ids, false),
    }))
}
