//! `POST /tokenize` (a prompt, or chat messages through the chat template) and
//! `POST /detokenize`, as vLLM serves them.

use axum::extract::State;
use axum::Json;
use prompt::chat::{render, ChatRender};
use prompt::Endpoint;
use protocol::request::{DetokenizeRequest, TokenizeRequest};
use protocol::response::{DetokenizeResponse, TokenizeResponse};
use protocol::ApiError;

use super::extract::VllmJson;
use super::prepare::run_blocking;
use super::state::AppState;
use super::validation;

pub async fn tokenize(
    State(state): State<AppState>,
    VllmJson(request): VllmJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.check_model(request.model.as_ref().map(|m| m.0.as_str()))?;
    let response = run_blocking(move || {
        let (text, endpoint) = match (&request.messages, &request.prompt) {
            (Some(messages), _) => {
                let render_as = ChatRender::of_tokenize(&request, messages);
                let text = render(state.chat_template.as_deref(), &render_as)?;
                (text, Endpoint::ChatCompletions)
            }
            (None, Some(prompt)) => (prompt.0.clone(), Endpoint::Completions),
            (None, None) => {
                return Err(ApiError::invalid(
                    "Either `prompt` or `messages` must be provided.",
                    "prompt",
                ))
            }
        };
        let add_special_tokens = endpoint.add_special_tokens(request.add_special_tokens);
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
