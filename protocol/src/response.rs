//! Response bodies, spelled and ordered as vLLM sends them. Plain `Serialize` structs whose field
//! order is vLLM's; `Option<Option<T>>` with `skip_serializing_if` models pydantic's
//! `exclude_unset` (absent vs. explicit `null`).

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

/// vLLM's `stop_reason`: the stop token id or the stop string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReasonWire {
    Token(u32),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// `usage`. `prompt_tokens_details`: `None` leaves the key out (streamed chunks),
/// `Some(None)` sends `null` (full responses without `--enable-prompt-tokens-details`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageInfo {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<Option<PromptTokensDetails>>,
}

impl UsageInfo {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// `/v1/embeddings` response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: UsageInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingData {
    pub index: usize,
    pub object: &'static str,
    pub embedding: EmbeddingValue,
}

/// An embedding as `encoding_format` asks: a list of floats, or base64 of little-endian
/// float32 bytes (what the `openai` client asks for by default).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

/// `top_logprobs` entry of the completions API: `{token: logprob}` in vLLM's order. Equal
/// token strings collapse as in a Python dict (first position, last value).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopLogprobMap(pub Vec<(String, f64)>);

impl TopLogprobMap {
    pub fn insert(&mut self, token: String, logprob: f64) {
        match self.0.iter_mut().find(|(t, _)| *t == token) {
            Some(entry) => entry.1 = logprob,
            None => self.0.push((token, logprob)),
        }
    }
}

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One token's entry in vLLM's `prompt_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptTokenLogprob {
    pub logprob: f64,
    pub rank: usize,
    pub decoded_token: String,
}

/// One prompt position of `prompt_logprobs`: token id → entry, in vLLM's order (the prompt's
/// token first, then the top alternatives).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptLogprobMap(pub Vec<(u32, PromptTokenLogprob)>);

impl Serialize for PromptLogprobMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (id, entry) in &self.0 {
            map.serialize_entry(&id.to_string(), entry)?;
        }
        map.end()
    }
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then one map per token.
pub type PromptLogprobs = Vec<Option<PromptLogprobMap>>;

/// `logprobs` of a completions choice.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f64>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
}

impl CompletionLogprobs {
    /// Appends `other` (the next tokens of the same choice).
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.text_offset.extend(other.text_offset);
        self.token_logprobs.extend(other.token_logprobs);
        self.tokens.extend(other.tokens);
        self.top_logprobs.extend(other.top_logprobs);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatLogprobEntry {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Option<Vec<ChatLogprobEntry>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonWire>,
    pub token_ids: Option<Vec<u32>>,
    /// With `prompt_logprobs` (or completions' `echo` with `logprobs`).
    pub prompt_logprobs: Option<PromptLogprobs>,
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// Non-streaming `/v1/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub service_tier: Option<String>,
    pub system_fingerprint: Option<String>,
    pub usage: UsageInfo,
    pub kv_transfer_params: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionStreamChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonWire>,
    pub prompt_token_ids: Option<Vec<u32>>,
    pub token_ids: Option<Vec<u32>>,
}

/// One streamed `/v1/completions` chunk (also the final usage chunk, with no choices).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionStreamResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// The assistant message of a non-streaming chat choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessageOut {
    pub role: String,
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub annotations: Option<Value>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
    pub reasoning: Option<String>,
}

impl ChatMessageOut {
    pub fn new(role: String, content: String) -> Self {
        Self {
            role,
            content: Some(content),
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            reasoning: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonWire>,
    pub token_ids: Option<Vec<u32>>,
}

/// Non-streaming `/v1/chat/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub service_tier: Option<String>,
    pub system_fingerprint: Option<String>,
    pub usage: UsageInfo,
    /// With `prompt_logprobs` (or completions' `echo` with `logprobs`).
    pub prompt_logprobs: Option<PromptLogprobs>,
    pub prompt_token_ids: Option<Vec<u32>>,
    pub kv_transfer_params: Option<Value>,
}

/// A streamed chat delta; unset fields are left out.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatStreamChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// Set (possibly to `null`) on the finishing chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Option<StopReasonWire>>,
    /// Set (possibly to `null`) on token chunks, left out of role and echo chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Option<Vec<u32>>>,
}

/// One streamed `/v1/chat/completions` chunk (also the final usage chunk, with no choices).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatStreamResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatStreamChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Set (possibly to `null`) on the first chunk of each choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Option<Vec<u32>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPermission {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub allow_create_engine: bool,
    pub allow_sampling: bool,
    pub allow_logprobs: bool,
    pub allow_search_indices: bool,
    pub allow_view: bool,
    pub allow_fine_tuning: bool,
    pub organization: &'static str,
    pub group: Option<String>,
    pub is_blocking: bool,
}

impl ModelPermission {
    /// vLLM's default permission entry.
    pub fn new(id: String, created: u64) -> Self {
        Self {
            id,
            object: "model_permission",
            created,
            allow_create_engine: false,
            allow_sampling: true,
            allow_logprobs: true,
            allow_search_indices: false,
            allow_view: true,
            allow_fine_tuning: false,
            organization: "*",
            group: None,
            is_blocking: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: Option<String>,
    pub parent: Option<String>,
    pub max_model_len: Option<usize>,
    pub permission: Vec<ModelPermission>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionResponse {
    pub version: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_details_absent_or_null() {
        let mut u = UsageInfo::new(3, 2);
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            r#"{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}"#
        );
        u.prompt_tokens_details = Some(None);
        assert!(serde_json::to_string(&u)
            .unwrap()
            .ends_with(r#""prompt_tokens_details":null}"#));
        u.prompt_tokens_details = Some(Some(PromptTokensDetails { cached_tokens: 16 }));
        assert!(serde_json::to_string(&u)
            .unwrap()
            .ends_with(r#""prompt_tokens_details":{"cached_tokens":16}}"#));
    }

    #[test]
    fn top_logprob_map_keeps_python_dict_semantics() {
        let mut m = TopLogprobMap::default();
        m.insert("a".into(), -1.0);
        m.insert("b".into(), -2.0);
        m.insert("a".into(), -3.0);
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":-3.0,"b":-2.0}"#);
    }

    #[test]
    fn stop_reason_is_int_or_string() {
        let v = serde_json::to_string(&vec![
            StopReasonWire::Token(2),
            StopReasonWire::Text("\n".into()),
        ])
        .unwrap();
        assert_eq!(v, r#"[2,"\n"]"#);
    }
}
