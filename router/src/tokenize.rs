//! The prompt tokens of a request, exactly as the agent computes them: the same tokenizer and
//! chat template (loaded from the same model path without its weights), the agent's request
//! types, its chat rendering and its `add_special_tokens` defaults (on for completions, off
//! for chat). A request the agent would reject yields no tokens; the pod then answers it.
//! The request's `cache_salt` comes along: the engine keys the first block with it.

use std::path::Path;

use agent::model::preprocess::{load_preprocessor, Preprocessor};
use agent::model::ModelError;
use agent::server::chat::{render, ChatRender};
use agent::server::extract::typed;
use agent::server::protocol::{ChatFields, CommonFields, CompletionFields, Prompt};
use serde_json::{Map, Value};

/// Which OpenAI endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// What the router keys a request's prompt by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptKey {
    pub tokens: Vec<u32>,
    /// The request's `cache_salt`, when non-empty (an empty one is no salt, as in the engine).
    pub cache_salt: Option<String>,
}

pub struct PromptTokenizer {
    pre: Preprocessor,
}

impl PromptTokenizer {
    /// Loads the tokenizer and chat template of a GGUF file or HF directory.
    pub fn load(model: &Path) -> Result<Self, ModelError> {
        Ok(Self {
            pre: load_preprocessor(model)?,
        })
    }

    /// The served name the model path implies (the agent's default).
    pub fn default_name(&self) -> &str {
        &self.pre.name
    }

    /// The token ids the agent would prefill for `body` (the first prompt of a batch) and its
    /// cache salt, or `None` when the body is not a request the agent would accept.
    pub fn prompt(&self, endpoint: Endpoint, body: &Map<String, Value>) -> Option<PromptKey> {
        let common: CommonFields = typed(body).ok()?;
        let mut ids = match endpoint {
            Endpoint::Completions => self.completion(body, &common)?,
            Endpoint::ChatCompletions => self.chat(body, &common)?,
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

    fn completion(&self, body: &Map<String, Value>, common: &CommonFields) -> Option<Vec<u32>> {
        let fields: CompletionFields = typed(body).ok()?;
        let add_special = common.add_special_tokens.is_none_or(|b| b.0);
        match fields.prompt? {
            Prompt::Text(text) => self.pre.tokenizer.encode(&text, add_special).ok(),
            Prompt::Texts(texts) => self.pre.tokenizer.encode(texts.first()?, add_special).ok(),
            Prompt::Tokens(ids) => to_u32(&ids),
            Prompt::TokenBatches(batches) => to_u32(batches.first()?),
        }
    }

    fn chat(&self, body: &Map<String, Value>, common: &CommonFields) -> Option<Vec<u32>> {
        let fields: ChatFields = typed(body).ok()?;
        let text = render(
            self.pre.chat_template.as_ref(),
            &ChatRender {
                messages: &fields.messages,
                add_generation_prompt: fields.add_generation_prompt.is_none_or(|b| b.0),
                continue_final_message: fields.continue_final_message.is_some_and(|b| b.0),
                chat_template_kwargs: fields.chat_template_kwargs.as_ref(),
                documents: fields.documents.as_deref(),
                tools: fields.tools.as_deref(),
            },
        )
        .ok()?;
        let add_special = common.add_special_tokens.is_some_and(|b| b.0);
        self.pre.tokenizer.encode(&text, add_special).ok()
    }
}

fn to_u32(ids: &[i64]) -> Option<Vec<u32>> {
    ids.iter().map(|&i| u32::try_from(i).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> Option<PromptTokenizer> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.is_file() {
            eprintln!("SKIPPED: {} not found", path.display());
            return None;
        }
        Some(PromptTokenizer::load(&path).unwrap())
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    impl PromptTokenizer {
        fn prompt_tokens(&self, endpoint: Endpoint, body: &Map<String, Value>) -> Option<Vec<u32>> {
            self.prompt(endpoint, body).map(|p| p.tokens)
        }
    }

    #[test]
    fn cache_salt_comes_with_the_tokens() {
        let Some(t) = model() else { return };
        for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
            let body = |salt: Value| {
                obj(
                    json!({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                           "cache_salt": salt}),
                )
            };
            let salted = t.prompt(endpoint, &body(json!("tenant-1"))).unwrap();
            assert_eq!(salted.cache_salt.as_deref(), Some("tenant-1"));
            assert_eq!(
                t.prompt(endpoint, &body(json!(""))).unwrap().cache_salt,
                None
            );
            assert_eq!(
                t.prompt(endpoint, &body(Value::Null)).unwrap().cache_salt,
                None
            );
            assert_eq!(
                t.prompt(endpoint, &body(Value::Null)).unwrap().tokens,
                salted.tokens
            );
        }
    }

    #[test]
    fn completion_prompts() {
        let Some(t) = model() else { return };
        assert_eq!(t.default_name(), "SmolLM2-135M-Instruct.Q4_1");
        let text = t
            .prompt_tokens(
                Endpoint::Completions,
                &obj(json!({"prompt": "Hello world"})),
            )
            .unwrap();
        assert_eq!(text, t.pre.tokenizer.encode("Hello world", true).unwrap());
        let batch = json!({"prompt": [[5, 6, 7], [8]], "truncate_prompt_tokens": 2});
        assert_eq!(
            t.prompt_tokens(Endpoint::Completions, &obj(batch)),
            Some(vec![6, 7])
        );
        let texts = json!({"prompt": ["a b", "c"]});
        assert_eq!(
            t.prompt_tokens(Endpoint::Completions, &obj(texts)),
            Some(t.pre.tokenizer.encode("a b", true).unwrap())
        );
        // What the agent refuses gives no tokens.
        for bad in [
            json!({}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "stream": "maybe"}),
        ] {
            assert_eq!(t.prompt_tokens(Endpoint::Completions, &obj(bad)), None);
        }
    }

    #[test]
    fn chat_prompts_use_the_template_without_special_tokens() {
        let Some(t) = model() else { return };
        let body = json!({"messages": [{"role": "user", "content": "What is 2+2?"}]});
        let ids = t
            .prompt_tokens(Endpoint::ChatCompletions, &obj(body))
            .unwrap();
        let expected =
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                        Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                        <|im_start|>assistant\n";
        assert_eq!(ids, t.pre.tokenizer.encode(expected, false).unwrap());
        assert_eq!(ids[0], 1, "<|im_start|> is one special token");
        let no_gen = json!({"messages": [{"role": "user", "content": "Hi"}],
                            "add_generation_prompt": false});
        let ids = t
            .prompt_tokens(Endpoint::ChatCompletions, &obj(no_gen))
            .unwrap();
        let expected = expected.replace("What is 2+2?", "Hi");
        let expected = expected.trim_end_matches("<|im_start|>assistant\n");
        assert_eq!(ids, t.pre.tokenizer.encode(expected, false).unwrap());
        assert_eq!(
            t.prompt_tokens(Endpoint::ChatCompletions, &obj(json!({"messages": "hi"}))),
            None
        );
    }
}
