//! Request → prompt token ids without the engine: the defaults the agent applies to each endpoint
//! (one place, used by the agent's handlers and by the router), and the whole path for a
//! process that only needs the tokens a request will prefill (the router keys its prefix index
//! with them).

use protocol::body::typed;
use protocol::fields::LaxBool;
use protocol::request::{ChatFields, CommonFields, CompletionFields, Prompt};
use protocol::ApiError;
use serde_json::{Map, Value};

use crate::chat::{render, ChatRender};
use crate::{Preprocessor, Tokenizer};

/// Which OpenAI endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    /// vLLM's `add_special_tokens` default: on for completions (the tokenizer's BOS), off for
    /// chat (the template writes its own special tokens).
    fn add_special_tokens_default(self) -> bool {
        self == Self::Completions
    }

    /// A request's `add_special_tokens`, or the endpoint's default.
    pub fn add_special_tokens(self, requested: Option<LaxBool>) -> bool {
        requested.map_or(self.add_special_tokens_default(), |b| b.0)
    }
}

/// What a request's prompt is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptKey {
    pub tokens: Vec<u32>,
    /// The request's `cache_salt`, when non-empty (an empty one is no salt, as in the engine).
    pub cache_salt: Option<String>,
}

/// The bounds a prompt is held to before the chat template or the tokenizer spends time and
/// memory on it, one place for the agent (which answers with the 400s) and the router (which
/// then keys nothing and routes by load).
#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    pub max_model_len: usize,
    /// The request's `truncate_prompt_tokens`, which lets a longer text through: its end is kept.
    pub truncate_prompt_tokens: Option<i64>,
}

impl PromptLimits {
    /// A conversation whose message text alone cannot fit is refused before rendering.
    pub fn check_chat(&self, tokenizer: &Tokenizer, chat: &ChatRender<'_>) -> Result<(), ApiError> {
        match self.truncate_prompt_tokens {
            None => tokenizer.check_length(chat.content_chars(), self.max_model_len),
            Some(_) => Ok(()),
        }
    }

    /// A text's token ids: refused before tokenizing when it cannot fit, only its tail tokenized
    /// when the request truncates (the caller keeps the last tokens).
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let ids = match self.truncate_prompt_tokens {
            None => {
                tokenizer.check_length(text.chars().count(), self.max_model_len)?;
                tokenizer.encode(text, add_special_tokens)
            }
            Some(limit) => {
                let keep = truncation_keep(limit, self.max_model_len);
                tokenizer.encode_tail(text, keep, add_special_tokens)
            }
        };
        ids.map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// How many tokens of a prompt's end to tokenize for `truncate_prompt_tokens = limit`: the limit,
/// or all that `max_model_len` allows when it is -1 (other values are refused later, and need no
/// more).
fn truncation_keep(limit: i64, max_model_len: usize) -> usize {
    match usize::try_from(limit) {
        Ok(n) if n > 0 => n.min(max_model_len),
        _ => max_model_len,
    }
}

impl Preprocessor {
    /// The token ids the agent would prefill for `body` (the first prompt of a batch) and its
    /// cache salt, or `None` when the body is not a request the agent would accept as read,
    /// including a text too long for `max_model_len` (refused before tokenizing, as the agent
    /// does, so that a huge body costs no more than reading it).
    pub fn prompt(
        &self,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        max_model_len: usize,
    ) -> Option<PromptKey> {
        let common: CommonFields = typed(body).ok()?;
        let limits = PromptLimits {
            max_model_len,
            truncate_prompt_tokens: common.truncate_prompt_tokens.map(|t| t.0),
        };
        let mut ids = match endpoint {
            Endpoint::Completions => self.completion(body, &common, &limits)?,
            Endpoint::ChatCompletions => self.chat(body, &common, &limits)?,
        };
        // `truncate_prompt_tokens`: the agent keeps the last N tokens.
        if let Some(n) = common.truncate_prompt_tokens.map(|t| t.0) {
            if n > 0 && (n as usize) < ids.len() {
                ids.drain(..ids.len() - n as usize);
            }
        }
        Some(PromptKey {
            tokens: ids,
            cache_salt: common.cache_salt.map(|s| s.0).filter(|s| !s.is_empty()),
        })
    }

    fn completion(
        &self,
        body: &Map<String, Value>,
        common: &CommonFields,
        limits: &PromptLimits,
    ) -> Option<Vec<u32>> {
        let fields: CompletionFields = typed(body).ok()?;
        let add_special = Endpoint::Completions.add_special_tokens(common.add_special_tokens);
        let text_ids = |text: &str| limits.encode(&self.tokenizer, text, add_special).ok();
        match fields.prompt? {
            Prompt::Text(text) => text_ids(&text),
            Prompt::Texts(texts) => text_ids(texts.first()?),
            Prompt::Tokens(ids) => to_u32(&ids),
            Prompt::TokenBatches(batches) => to_u32(batches.first()?),
        }
    }

    fn chat(
        &self,
        body: &Map<String, Value>,
        common: &CommonFields,
        limits: &PromptLimits,
    ) -> Option<Vec<u32>> {
        let fields: ChatFields = typed(body).ok()?;
        let chat = ChatRender::of_chat(&fields);
        limits.check_chat(&self.tokenizer, &chat).ok()?;
        let text = render(self.chat_template.as_ref(), &chat).ok()?;
        let add_special = Endpoint::ChatCompletions.add_special_tokens(common.add_special_tokens);
        limits.encode(&self.tokenizer, &text, add_special).ok()
    }
}

fn to_u32(ids: &[i64]) -> Option<Vec<u32>> {
    ids.iter().map(|&i| u32::try_from(i).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::smollm;
    use serde_json::json;

    const MAX_MODEL_LEN: usize = 8192;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn prompt_tokens(t: &Preprocessor, endpoint: Endpoint, body: Value) -> Option<Vec<u32>> {
        t.prompt(endpoint, &obj(body), MAX_MODEL_LEN)
            .map(|p| p.tokens)
    }

    #[test]
    fn special_token_defaults_per_endpoint() {
        let requested = |v: Value| {
            serde_json::from_value::<CommonFields>(v)
                .unwrap()
                .add_special_tokens
        };
        assert!(Endpoint::Completions.add_special_tokens(requested(json!({}))));
        assert!(!Endpoint::ChatCompletions.add_special_tokens(requested(json!({}))));
        let off = requested(json!({"add_special_tokens": false}));
        assert!(!Endpoint::Completions.add_special_tokens(off));
        let on = requested(json!({"add_special_tokens": "yes"}));
        assert!(Endpoint::ChatCompletions.add_special_tokens(on));
    }

    #[test]
    fn cache_salt_comes_with_the_tokens() {
        let Some(t) = smollm() else { return };
        for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
            let body = |salt: Value| {
                obj(
                    json!({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                           "cache_salt": salt}),
                )
            };
            let salted = t
                .prompt(endpoint, &body(json!("tenant-1")), MAX_MODEL_LEN)
                .unwrap();
            assert_eq!(salted.cache_salt.as_deref(), Some("tenant-1"));
            assert_eq!(
                t.prompt(endpoint, &body(json!("")), MAX_MODEL_LEN)
                    .unwrap()
                    .cache_salt,
                None
            );
            assert_eq!(
                t.prompt(endpoint, &body(Value::Null), MAX_MODEL_LEN)
                    .unwrap()
                    .cache_salt,
                None
            );
            assert_eq!(
                t.prompt(endpoint, &body(Value::Null), MAX_MODEL_LEN)
                    .unwrap()
                    .tokens,
                salted.tokens
            );
        }
    }

    #[test]
    fn completion_prompts() {
        let Some(t) = smollm() else { return };
        assert_eq!(t.name, "SmolLM2-135M-Instruct.Q4_1");
        let text = prompt_tokens(t, Endpoint::Completions, json!({"prompt": "Hello world"}));
        assert_eq!(
            text.unwrap(),
            t.tokenizer.encode("Hello world", true).unwrap()
        );
        let batch = json!({"prompt": [[5, 6, 7], [8]], "truncate_prompt_tokens": 2});
        assert_eq!(
            prompt_tokens(t, Endpoint::Completions, batch),
            Some(vec![6, 7])
        );
        let texts = json!({"prompt": ["a b", "c"]});
        assert_eq!(
            prompt_tokens(t, Endpoint::Completions, texts),
            Some(t.tokenizer.encode("a b", true).unwrap())
        );
        // What the agent refuses gives no tokens.
        for bad in [
            json!({}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "stream": "maybe"}),
        ] {
            assert_eq!(prompt_tokens(t, Endpoint::Completions, bad), None);
        }
    }

    #[test]
    fn chat_prompts_use_the_template_without_special_tokens() {
        let Some(t) = smollm() else { return };
        let body = json!({"messages": [{"role": "user", "content": "What is 2+2?"}]});
        let ids = prompt_tokens(t, Endpoint::ChatCompletions, body).unwrap();
        let expected =
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                        Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                        <|im_start|>assistant\n";
        assert_eq!(ids, t.tokenizer.encode(expected, false).unwrap());
        assert_eq!(ids[0], 1, "<|im_start|> is one special token");
        let no_gen = json!({"messages": [{"role": "user", "content": "Hi"}],
                            "add_generation_prompt": false});
        let ids = prompt_tokens(t, Endpoint::ChatCompletions, no_gen).unwrap();
        let expected = expected.replace("What is 2+2?", "Hi");
        let expected = expected.trim_end_matches("<|im_start|>assistant\n");
        assert_eq!(ids, t.tokenizer.encode(expected, false).unwrap());
        assert_eq!(
            prompt_tokens(t, Endpoint::ChatCompletions, json!({"messages": "hi"})),
            None
        );
    }

    #[test]
    fn texts_that_cannot_fit_are_not_tokenized() {
        let Some(t) = smollm() else { return };
        let limit = 64 * t.tokenizer.max_chars_per_token();
        // Room for what the chat template adds around the content.
        let fits = "a ".repeat((limit - 1000) / 2);
        let over = "a ".repeat(limit / 2 + 1);
        let completion = |p: &str| json!({"model": "m", "prompt": p});
        let chat = |p: &str| json!({"model": "m", "messages": [{"role": "user", "content": p}]});
        for body in [completion(&fits), chat(&fits)] {
            let endpoint = if body.get("prompt").is_some() {
                Endpoint::Completions
            } else {
                Endpoint::ChatCompletions
            };
            assert!(t.prompt(endpoint, &obj(body), 64).is_some());
        }
        assert!(t
            .prompt(Endpoint::Completions, &obj(completion(&over)), 64)
            .is_none());
        assert!(t
            .prompt(Endpoint::ChatCompletions, &obj(chat(&over)), 64)
            .is_none());
    }

    #[test]
    fn truncation_tokenizes_only_the_tail_and_keeps_the_same_tokens() {
        let Some(t) = smollm() else { return };
        let text: String = (0..3000)
            .map(|i| format!("word{} and, more\n", i * 7919 % 1000))
            .collect();
        let full = t.tokenizer.encode(&text, true).unwrap();
        for keep in [1usize, 10, 100, 500] {
            let tail = t.tokenizer.encode_tail(&text, keep, true).unwrap();
            assert!(tail.len() > keep, "keep {keep}: only {} tokens", tail.len());
            assert!(tail.len() < full.len() / 2 || keep == 500);
            assert_eq!(
                tail[tail.len() - keep..],
                full[full.len() - keep..],
                "keep {keep}"
            );
            let body = json!({"prompt": text, "truncate_prompt_tokens": keep});
            let got = t
                .prompt(Endpoint::Completions, &obj(body), MAX_MODEL_LEN)
                .unwrap();
            assert_eq!(got.tokens, full[full.len() - keep..]);
        }
        assert_eq!(truncation_keep(-1, 99), 99);
        assert_eq!(truncation_keep(0, 99), 99);
        assert_eq!(truncation_keep(7, 99), 7);
        assert_eq!(truncation_keep(1000, 99), 99);
    }
}
