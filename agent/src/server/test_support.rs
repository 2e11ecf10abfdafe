//! Test fixtures for the server modules: a small real tokenizer and chat template, and an
//! [`AppState`] whose engine handle is a channel the test reads (so a test sees exactly the
//! `GenerateRequest`s a handler submits and can answer them).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};

use prompt::{ChatTemplate, Tokenizer};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::AddedToken;

use crate::engine::handle::EngineCommand;
use crate::engine::EngineHandle;
use crate::metrics::{CacheConfigInfo, Metrics};

use super::state::{AppState, ServerConfig};

pub const VOCAB: &[&str] = &[
    "<|endoftext|>",
    "hello",
    "world",
    "foo",
    "bar",
    "[UNK]",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "assistant",
    "system",
];
pub const EOS_ID: u32 = 7;
pub const MAX_MODEL_LEN: usize = 32;
pub const MODEL: &str = "test-model";

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A word-level tokenizer over [`VOCAB`] with the ChatML markers as special tokens.
pub fn test_tokenizer() -> Tokenizer {
    let vocab: HashMap<String, u32> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .expect("static vocabulary");
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Whitespace {}));
    inner
        .add_special_tokens([
            AddedToken::from("<|endoftext|>", true),
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ])
        .expect("static special tokens");
    Tokenizer::new(inner, vec![EOS_ID], None, Some("<|im_end|>".into()))
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        served_model_names: vec![MODEL.into(), "alias".into()],
        model_root: "/models/test.gguf".into(),
        max_model_len: MAX_MODEL_LEN,
        max_logprobs: 20,
        api_keys: Vec::new(),
        enable_prompt_tokens_details: false,
        enable_force_include_usage: false,
        system_fingerprint: Some("fp-test".into()),
        max_body_bytes: 16 << 20,
        pooling: crate::engine::Pooling::default(),
    }
}

/// State over a channel "engine": the receiver gets every command handlers send.
pub fn test_state(config: ServerConfig, alive: bool) -> (AppState, mpsc::Receiver<EngineCommand>) {
    let (tx, rx) = mpsc::channel();
    let engine = EngineHandle::new(tx, Arc::new(AtomicBool::new(alive)));
    let info = CacheConfigInfo {
        block_size: 16,
        num_gpu_blocks: 8,
        enable_prefix_caching: true,
        prefix_caching_hash_algo: "sha256".into(),
        cache_dtype: "auto".into(),
    };
    let metrics = Arc::new(Metrics::new(MODEL, MAX_MODEL_LEN, &info).expect("metrics"));
    let template = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).expect("template");
    let state = AppState::new(
        engine,
        Arc::new(test_tokenizer()),
        Some(Arc::new(template)),
        metrics,
        config,
    );
    (state, rx)
}
