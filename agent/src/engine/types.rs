//! The engine's public request/response types: what the server hands in and gets back.
//! Nothing here knows about HTTP or the OpenAI JSON shapes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How to pick tokens for one sequence (one choice). Values are already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or -1: disabled.
    pub top_k: i32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Output budget, already clamped to `max_model_len - prompt_len`.
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub include_stop_str_in_output: bool,
    /// Number of top logprobs to return per generated token (`None`: no logprobs).
    pub logprobs: Option<usize>,
    /// Number of top logprobs to return per prompt token (`None`: none). Such a request reads
    /// nothing from the prefix cache (every prompt position's logits are needed, as in vLLM).
    pub prompt_logprobs: Option<usize>,
    pub logit_bias: HashMap<u32, f32>,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: HashMap::new(),
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// One generation request for one sequence (the server fans `n > 1` out into several).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
    /// Mixed into the first block's hash so tenants do not share cached prefixes.
    pub cache_salt: Option<String>,
    /// The `n > 1` choices of one prompt share one; None for a lone sequence.
    pub parent: Option<Arc<ParentRequest>>,
    /// Set for an embedding request: the prompt is run, its final hidden states pooled, and the
    /// request ends with the embedding instead of generating.
    pub pooling: Option<Pooling>,
    /// The request's `kv_transfer_params` (P/D), passed to the KV connector as they are.
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// How an embedding pools a prompt's final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub kind: PoolingType,
    /// L2-normalise the result (vLLM's embed default).
    pub normalize: bool,
}

impl Default for Pooling {
    /// vLLM's default for a decoder model's embeddings: the last token, normalised.
    fn default() -> Self {
        Self {
            kind: PoolingType::Last,
            normalize: true,
        }
    }
}

/// vLLM's `PoolingType`, the ones a decoder model's embedding uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingType {
    /// The last token's hidden state (vLLM's default for decoder models).
    Last,
    /// The mean over all prompt tokens.
    Mean,
}

/// The `n` sequences of one prompt, for the metrics vLLM keeps per parent request
/// (`vllm:request_params_n`, `vllm:request_max_num_generation_tokens`), which can only be
/// observed once the last of them finished.
#[derive(Debug)]
pub struct ParentRequest {
    n: usize,
    unfinished: AtomicUsize,
    longest: AtomicUsize,
}

impl ParentRequest {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            n,
            unfinished: AtomicUsize::new(n),
            longest: AtomicUsize::new(0),
        })
    }

    /// Records a finished child with `generation_tokens`; `(n, longest child)` once it was the
    /// last.
    pub fn child_finished(&self, generation_tokens: usize) -> Option<(usize, usize)> {
        self.longest.fetch_max(generation_tokens, Ordering::AcqRel);
        (self.unfinished.fetch_sub(1, Ordering::AcqRel) == 1)
            .then(|| (self.n, self.longest.load(Ordering::Acquire)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// What made a `stop` finish: vLLM's `stop_reason` (None for EOS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    Text(String),
}

/// The log-probability of one generated token and the top alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Highest first; `len == SamplingParams::logprobs`.
    pub top: Vec<(u32, f32)>,
}

/// One prompt token's logprob (`prompt_logprobs`): its entry and its rank in the vocabulary
/// (1 = the most likely), which vLLM reports for prompt tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub entry: TokenLogprob,
    pub rank: usize,
}

/// Output produced for one request by one engine step (or its final message).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    /// Tokens generated since the previous output.
    pub token_ids: Vec<u32>,
    /// Text generated since the previous output; text that may still turn into a stop string
    /// is held back until it cannot.
    pub text: String,
    /// One entry per token in `token_ids` when logprobs were requested.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last output of the request.
    pub finish: Option<Finish>,
    /// With `prompt_logprobs`, once, on the first output after the prompt: entry `k` is
    /// prompt token `k + 1`'s (the first token has none).
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// An embedding request's result, on its last output.
    pub embedding: Option<Vec<f32>>,
    pub num_prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache (reported as `cached_tokens`).
    pub num_cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub stop_reason: Option<StopReason>,
    /// Set when `reason == Error`.
    pub error: Option<String>,
    /// From the KV connector (a P/D prefill leg's answer): the response's `kv_transfer_params`.
    pub kv_transfer_params: Option<serde_json::Value>,
}

impl Finish {
    /// A finish without a stop reason (length, abort, error, EOS).
    pub fn new(reason: FinishReason, error: Option<String>) -> Self {
        Self {
            reason,
            stop_reason: None,
            error,
            kv_transfer_params: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is not running")]
    Dead,
    #[error("request id {0} is already in use")]
    DuplicateRequestId(String),
    #[error("the engine is overloaded, try again later")]
    Overloaded,
    #[error("the engine did not start: {0}")]
    Start(String),
}
