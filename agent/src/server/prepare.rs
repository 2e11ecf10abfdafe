//! Prompt preparation shared by completions and chat: text → token ids, vLLM's length checks
//! and truncation, and each prompt's engine [`SamplingParams`] (output budget clamped to what
//! is left of the context).

use super::generate::PreparedPrompt;
use super::state::AppState;
use super::validation::{self, Limits};
use prompt::PromptLimits;
use protocol::request::CommonFields;
use protocol::ApiError;

/// One prompt as the request gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<i64>),
}

/// How a request's prompts become engine requests.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Requested output length (`None`: as much as fits).
    pub requested_max_tokens: Option<i64>,
    /// The field the request set it with (`max_tokens` / `max_completion_tokens`).
    pub max_tokens_param: &'static str,
    /// Requested top-logprobs count, if any.
    pub logprobs: Option<i64>,
    /// Requested prompt top-logprobs count, if any.
    pub prompt_logprobs: Option<i64>,
    pub add_special_tokens: bool,
    /// Whether token prompts need their text (for `echo`).
    pub need_text: bool,
}

/// The request's bounds on its prompt text (shared with the router: [`PromptLimits`]).
pub fn prompt_limits(state: &AppState, common: &CommonFields) -> PromptLimits {
    PromptLimits {
        max_model_len: state.config.max_model_len,
        truncate_prompt_tokens: common.truncate_prompt_tokens.map(|t| t.0),
    }
}

/// Tokenizes and checks `inputs`. CPU-bound (tokenizer): run it with [`run_blocking`].
pub fn prepare(
    state: &AppState,
    common: &CommonFields,
    plan: &Plan,
    inputs: Vec<PromptInput>,
) -> Result<Vec<PreparedPrompt>, ApiError> {
    let max_model_len = state.config.max_model_len;
    let vocab_size = state.tokenizer.vocab_size();
    validation::check_requested_max_tokens(
        plan.requested_max_tokens,
        plan.max_tokens_param,
        max_model_len,
    )?;
    let limits = Limits {
        vocab_size,
        max_logprobs: state.config.max_logprobs,
    };
    let prompt_limits = prompt_limits(state, common);
    inputs
        .into_iter()
        .map(|input| {
            let (mut token_ids, text) = match input {
                PromptInput::Text(text) => {
                    let add_special = plan.add_special_tokens;
                    let ids = prompt_limits.encode(&state.tokenizer, &text, add_special)?;
                    (ids, text)
                }
                PromptInput::Tokens(raw) => {
                    let ids = validation::token_ids(&raw, vocab_size)?;
                    let text = if plan.need_text {
                        state.tokenizer.decode(&ids, false)
                    } else {
                        String::new()
                    };
                    (ids, text)
                }
            };
            if let Some(limit) = common.truncate_prompt_tokens {
                validation::truncate_prompt(
                    &mut token_ids,
                    limit.0,
                    max_model_len,
                    plan.requested_max_tokens,
                    plan.max_tokens_param,
                )?;
            }
            validation::check_prompt_tokens(&token_ids, vocab_size)?;
            let budget = validation::output_budget(
                token_ids.len(),
                plan.requested_max_tokens,
                plan.max_tokens_param,
                max_model_len,
            )?;
            let params = validation::sampling_params(
                common,
                budget,
                plan.logprobs,
                plan.prompt_logprobs,
                limits,
            )?;
            Ok(PreparedPrompt {
                token_ids,
                text,
                params,
            })
        })
        .collect()
}

/// Runs CPU-bound request work (templating, tokenizing) off the async workers.
pub async fn run_blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_support::{test_config, test_state, MAX_MODEL_LEN};
    use serde_json::json;

    fn common(v: serde_json::Value) -> CommonFields {
        serde_json::from_value(v).unwrap()
    }

    const PLAN: Plan = Plan {
        requested_max_tokens: Some(16),
        max_tokens_param: "max_tokens",
        logprobs: None,
        prompt_logprobs: None,
        add_special_tokens: true,
        need_text: true,
    };

    #[test]
    fn text_and_token_prompts() {
        let (state, _rx) = test_state(test_config(), true);
        let prompts = prepare(
            &state,
            &common(json!({})),
            &PLAN,
            vec![
                PromptInput::Text("hello world foo".into()),
                PromptInput::Tokens(vec![3, 4]),
            ],
        )
        .unwrap();
        assert_eq!(prompts[0].token_ids, vec![1, 2, 3]);
        assert_eq!(prompts[0].text, "hello world foo");
        assert_eq!(prompts[0].params.max_tokens, 16);
        assert_eq!(prompts[1].text, "foo bar");
    }

    #[test]
    fn budget_is_clamped_per_prompt() {
        let (state, _rx) = test_state(test_config(), true);
        let long: Vec<i64> = vec![1; MAX_MODEL_LEN - 4];
        let prompts = prepare(
            &state,
            &common(json!({})),
            &PLAN,
            vec![PromptInput::Tokens(long)],
        )
        .unwrap();
        assert_eq!(prompts[0].params.max_tokens, 4);
    }

    #[test]
    fn refusals() {
        let (state, _rx) = test_state(test_config(), true);
        let c = common(json!({}));
        let too_long = vec![PromptInput::Tokens(vec![1; MAX_MODEL_LEN])];
        let e = prepare(&state, &c, &PLAN, too_long).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input_tokens"));
        let e = prepare(&state, &c, &PLAN, vec![PromptInput::Tokens(vec![1, 99])]).unwrap_err();
        assert_eq!(e.message, "Token id 99 is out of vocabulary");
        let big = Plan {
            requested_max_tokens: Some(MAX_MODEL_LEN as i64 + 1),
            ..PLAN
        };
        let e = prepare(&state, &c, &big, vec![PromptInput::Tokens(vec![1])]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        // Far more text than the context could hold is refused before tokenizing.
        let huge = "hello ".repeat(10_000);
        let e = prepare(&state, &c, &PLAN, vec![PromptInput::Text(huge)]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input_text"));
        // Truncation keeps the end of the prompt.
        let t = common(json!({"truncate_prompt_tokens": 2}));
        let p = prepare(&state, &t, &PLAN, vec![PromptInput::Tokens(vec![1, 2, 3])]).unwrap();
        assert_eq!(p[0].token_ids, vec![2, 3]);
    }
}
