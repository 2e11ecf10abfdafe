//! Request bodies of the OpenAI-compatible API as vLLM reads them: `/v1/completions`,
//! `/v1/chat/completions`, `/v1/embeddings`, `/tokenize`, `/detokenize`. Unknown fields are ignored; the two halves
//! of a generation request ([`CommonFields`] and the endpoint's own) are read separately so that
//! each failure keeps its exact path.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::fields::{
    each, list_items, non_negative_int, read_via_value, strict_str, Dict, FieldError, FloatDict,
    IntList, LaxBool, LaxFloat, LaxInt, PathSeg, Str, StrList,
};

/// `prompt` of `/v1/completions`: `str | list[str] | list[int] | list[list[int]]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenBatches(Vec<Vec<i64>>),
}

fn read_prompt(v: &Value) -> Result<Prompt, FieldError> {
    let items = match v {
        Value::String(s) => return Ok(Prompt::Text(s.clone())),
        Value::Array(items) => items,
        _ => {
            return Err(FieldError::new(
                "string_type",
                "Input should be a valid string",
            ))
        }
    };
    // Which branch of the union the first item selects; the rest must agree.
    match items.first() {
        None => Ok(Prompt::Tokens(Vec::new())),
        Some(Value::String(_)) => each(items, strict_str).map(Prompt::Texts),
        Some(Value::Array(_)) => each(items, |item| {
            list_items(item).and_then(|ids| each(ids, non_negative_int))
        })
        .map(Prompt::TokenBatches),
        Some(_) => each(items, non_negative_int).map(Prompt::Tokens),
    }
}
read_via_value!(Prompt, read_prompt);

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stop(pub Vec<String>);
read_via_value!(Stop, |v: &Value| match v {
    Value::String(s) => Ok(Stop(vec![s.clone()])),
    Value::Array(items) => each(items, strict_str).map(Stop),
    _ => Err(FieldError::new(
        "string_type",
        "Input should be a valid string"
    )),
});

/// `stream_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct StreamOptions {
    /// vLLM's default is `True` when the key is absent (an explicit `null` is falsy).
    #[serde(default = "some_true")]
    pub include_usage: Option<LaxBool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<LaxBool>,
}

fn some_true() -> Option<LaxBool> {
    Some(LaxBool(true))
}

fn default_true() -> LaxBool {
    LaxBool(true)
}

/// One part of a list-valued message `content`.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    Text(String),
    /// A part this server cannot use (images, audio, …): its `type`.
    Other(String),
}

/// A message's `content`: a string or a list of parts.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

fn read_content_part(v: &Value) -> Result<ContentPart, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("dict_type", "Input should be a valid dictionary"))?;
    let kind = match obj.get("type") {
        None => None,
        Some(t) => Some(strict_str(t).map_err(|e| e.at(PathSeg::Key("type".into())))?),
    };
    match kind.as_deref() {
        None | Some("text") | Some("input_text") => {
            let text = obj
                .get("text")
                .ok_or_else(|| FieldError::new("missing", "Field required"))
                .and_then(strict_str)
                .map_err(|e| e.at(PathSeg::Key("text".into())))?;
            Ok(ContentPart::Text(text))
        }
        Some(other) => Ok(ContentPart::Other(other.to_string())),
    }
}

/// One chat message. Keys the chat template may use besides `role` and `content`
/// (`name`, `tool_calls`, `tool_call_id`, `reasoning`) are kept in `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    pub extra: Map<String, Value>,
}

/// Message keys passed through to the chat template.
const MESSAGE_PASSTHROUGH_KEYS: &[&str] = &["name", "tool_calls", "tool_call_id", "reasoning"];

fn read_message(v: &Value) -> Result<ChatMessageIn, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("dict_type", "Input should be a valid dictionary"))?;
    let role = obj
        .get("role")
        .ok_or_else(|| FieldError::new("missing", "Field required"))
        .and_then(strict_str)
        .map_err(|e| e.at(PathSeg::Key("role".into())))?;
    let content = match obj.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(MessageContent::Text(s.clone())),
        Some(Value::Array(parts)) => Some(MessageContent::Parts(
            each(parts, read_content_part).map_err(|e| e.at(PathSeg::Key("content".into())))?,
        )),
        Some(_) => {
            return Err(
                FieldError::new("string_type", "Input should be a valid string")
                    .at(PathSeg::Key("content".into())),
            )
        }
    };
    let mut extra = Map::new();
    for key in MESSAGE_PASSTHROUGH_KEYS {
        if let Some(v) = obj.get(*key).filter(|v| !v.is_null()) {
            extra.insert((*key).to_string(), v.clone());
        }
    }
    // vLLM renames the deprecated `reasoning_content` to `reasoning`.
    if let Some(v) = obj.get("reasoning_content").filter(|v| !v.is_null()) {
        extra
            .entry("reasoning".to_string())
            .or_insert_with(|| v.clone());
    }
    Ok(ChatMessageIn {
        role,
        content,
        extra,
    })
}
read_via_value!(ChatMessageIn, read_message);

/// Fields `/v1/completions` and `/v1/chat/completions` share (vLLM's sampling and extra params).
#[derive(Debug, Clone, Deserialize)]
pub struct CommonFields {
    #[serde(default)]
    pub model: Option<Str>,
    #[serde(default)]
    pub frequency_penalty: Option<LaxFloat>,
    #[serde(default)]
    pub presence_penalty: Option<LaxFloat>,
    #[serde(default)]
    pub logit_bias: Option<FloatDict>,
    #[serde(default)]
    pub seed: Option<LaxInt>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<LaxBool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub temperature: Option<LaxFloat>,
    #[serde(default)]
    pub top_p: Option<LaxFloat>,
    #[serde(default)]
    pub user: Option<Str>,
    #[serde(default)]
    pub echo: Option<LaxBool>,
    #[serde(default)]
    pub use_beam_search: Option<LaxBool>,
    #[serde(default)]
    pub top_k: Option<LaxInt>,
    #[serde(default)]
    pub min_p: Option<LaxFloat>,
    #[serde(default)]
    pub repetition_penalty: Option<LaxFloat>,
    #[serde(default)]
    pub stop_token_ids: Option<IntList>,
    #[serde(default)]
    pub include_stop_str_in_output: Option<LaxBool>,
    #[serde(default)]
    pub ignore_eos: Option<LaxBool>,
    #[serde(default)]
    pub min_tokens: Option<LaxInt>,
    #[serde(default = "default_true")]
    pub skip_special_tokens: LaxBool,
    #[serde(default = "default_true")]
    pub spaces_between_special_tokens: LaxBool,
    #[serde(default)]
    pub truncate_prompt_tokens: Option<LaxInt>,
    #[serde(default)]
    pub add_special_tokens: Option<LaxBool>,
    #[serde(default)]
    pub priority: Option<LaxInt>,
    #[serde(default)]
    pub request_id: Option<Str>,
    #[serde(default)]
    pub return_tokens_as_token_ids: Option<LaxBool>,
    #[serde(default)]
    pub return_token_ids: Option<LaxBool>,
    #[serde(default)]
    pub cache_salt: Option<Str>,
    #[serde(default)]
    pub kv_transfer_params: Option<Dict>,
    // vLLM features this server does not implement; a request that sets them gets a 400
    // instead of silently different output.
    #[serde(default)]
    pub allowed_token_ids: Option<IntList>,
    #[serde(default)]
    pub bad_words: Option<StrList>,
    #[serde(default)]
    pub prompt_logprobs: Option<LaxInt>,
    #[serde(default)]
    pub logprob_token_ids: Option<IntList>,
    #[serde(default)]
    pub response_format: Option<Dict>,
    #[serde(default)]
    pub structured_outputs: Option<Dict>,
}

impl CommonFields {
    pub fn stream(&self) -> bool {
        self.stream.is_some_and(|b| b.0)
    }

    pub fn echo(&self) -> bool {
        self.echo.is_some_and(|b| b.0)
    }

    pub fn return_token_ids(&self) -> bool {
        self.return_token_ids.is_some_and(|b| b.0)
    }

    /// `kv_transfer_params` as a JSON object, for the KV connector.
    pub fn kv_transfer_params(&self) -> Option<Value> {
        self.kv_transfer_params
            .as_ref()
            .map(|d| Value::Object(d.0.clone()))
    }
}

/// A generation request: the endpoint's own fields and the shared ones. The two halves are
/// read from the same JSON object separately (serde's `flatten` would lose error paths).
#[derive(Debug, Clone)]
pub struct Generation<F> {
    pub fields: F,
    pub common: CommonFields,
}

/// `POST /v1/completions`.
pub type CompletionRequest = Generation<CompletionFields>;

/// `POST /v1/chat/completions`.
pub type ChatCompletionRequest = Generation<ChatFields>;

/// The `/v1/completions` fields besides [`CommonFields`].
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionFields {
    #[serde(default)]
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub logprobs: Option<LaxInt>,
    /// `None` (absent or `null`) means vLLM's default of 16.
    #[serde(default)]
    pub max_tokens: Option<LaxInt>,
    #[serde(default = "one")]
    pub n: LaxInt,
    #[serde(default)]
    pub suffix: Option<Str>,
}

fn one() -> LaxInt {
    LaxInt(1)
}

/// The `/v1/chat/completions` fields besides [`CommonFields`].
#[derive(Debug, Clone, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub logprobs: Option<LaxBool>,
    #[serde(default)]
    pub top_logprobs: Option<LaxInt>,
    #[serde(default)]
    pub max_tokens: Option<LaxInt>,
    #[serde(default)]
    pub max_completion_tokens: Option<LaxInt>,
    #[serde(default)]
    pub n: Option<LaxInt>,
    #[serde(default)]
    pub add_generation_prompt: Option<LaxBool>,
    #[serde(default)]
    pub continue_final_message: Option<LaxBool>,
    #[serde(default)]
    pub chat_template: Option<Str>,
    #[serde(default)]
    pub chat_template_kwargs: Option<Dict>,
    #[serde(default)]
    pub documents: Option<Vec<Dict>>,
    #[serde(default)]
    pub tools: Option<Vec<Dict>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Read for vLLM's type check (`bool | None`); without tool parsers its value changes nothing.
    #[serde(default)]
    pub parallel_tool_calls: Option<LaxBool>,
}

/// `POST /tokenize`: either a completion-style `prompt` or chat `messages`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<Str>,
    #[serde(default)]
    pub prompt: Option<Str>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub add_special_tokens: Option<LaxBool>,
    #[serde(default)]
    pub add_generation_prompt: Option<LaxBool>,
    #[serde(default)]
    pub continue_final_message: Option<LaxBool>,
    #[serde(default)]
    pub return_token_strs: Option<LaxBool>,
    #[serde(default)]
    pub chat_template_kwargs: Option<Dict>,
    #[serde(default)]
    pub tools: Option<Vec<Dict>>,
}

/// `POST /v1/embeddings`: `input` in the shapes of completions' `prompt`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    #[serde(default)]
    pub model: Option<Str>,
    #[serde(default)]
    pub input: Option<Prompt>,
    /// vLLM's chat form of the request (not served here: a 400 says so).
    #[serde(default)]
    pub messages: Option<Value>,
    /// `float` (default) or `base64` (little-endian float32 bytes).
    #[serde(default)]
    pub encoding_format: Option<Str>,
    #[serde(default)]
    pub dimensions: Option<LaxInt>,
    #[serde(default)]
    pub user: Option<Str>,
    #[serde(default)]
    pub truncate_prompt_tokens: Option<LaxInt>,
    #[serde(default)]
    pub add_special_tokens: Option<LaxBool>,
    /// vLLM's pooling parameter: L2-normalise (default: the server's pooler config).
    #[serde(default)]
    pub normalize: Option<LaxBool>,
    #[serde(default)]
    pub request_id: Option<Str>,
    #[serde(default)]
    pub priority: Option<LaxInt>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<Str>,
    pub tokens: IntList,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, FieldError)> {
        serde_path_to_error::deserialize(&v).map_err(|e| {
            (
                e.path().to_string(),
                FieldError::from_serde_message(&e.inner().to_string()),
            )
        })
    }

    #[test]
    fn prompt_union_variants() {
        let p = |v| read_prompt(&v);
        assert_eq!(p(json!("hi")), Ok(Prompt::Text("hi".into())));
        assert_eq!(
            p(json!(["a", "b"])),
            Ok(Prompt::Texts(vec!["a".into(), "b".into()]))
        );
        assert_eq!(p(json!([1, 2])), Ok(Prompt::Tokens(vec![1, 2])));
        assert_eq!(
            p(json!([[1], [2, 3]])),
            Ok(Prompt::TokenBatches(vec![vec![1], vec![2, 3]]))
        );
        let e = p(json!(["a", 1])).unwrap_err();
        assert_eq!(
            (e.kind, e.sub_path),
            ("string_type", vec![PathSeg::Index(1)])
        );
        let e = p(json!([1, -2])).unwrap_err();
        assert_eq!(e.kind, "greater_than_equal");
        assert_eq!(p(json!(5)).unwrap_err().kind, "string_type");
    }

    #[test]
    fn completion_request_reads_defaults_and_ignores_unknown_fields() {
        let body = json!({"prompt": "hi", "max_tokens": "5", "whatever": [1], "stream": 1});
        let f: CompletionFields = parse(body.clone()).unwrap();
        let c: CommonFields = parse(body).unwrap();
        assert_eq!(f.max_tokens, Some(LaxInt(5)));
        assert_eq!(f.n, LaxInt(1));
        assert!(c.stream());
        assert!(c.skip_special_tokens.0);
        assert_eq!(c.stream_options, None);
    }

    #[test]
    fn field_errors_keep_their_path() {
        let (path, e) =
            parse::<CommonFields>(json!({"prompt": "x", "temperature": "hot"})).unwrap_err();
        assert_eq!(path, "temperature");
        assert_eq!(e.kind, "float_parsing");
        let (path, e) = parse::<CompletionFields>(json!({"prompt": "x", "n": null})).unwrap_err();
        assert_eq!(path, "n");
        assert_eq!(e.kind, "int_type");
        let (path, e) =
            parse::<CommonFields>(json!({"prompt": "x", "stream_options": {"include_usage": []}}))
                .unwrap_err();
        assert_eq!(path, "stream_options.include_usage");
        assert_eq!(e.kind, "bool_type");
        let chat = |v: Value| json!({"messages": [], "parallel_tool_calls": v});
        let (path, e) = parse::<ChatFields>(chat(json!("sometimes"))).unwrap_err();
        assert_eq!(
            (path.as_str(), e.kind),
            ("parallel_tool_calls", "bool_parsing")
        );
        let (_, e) = parse::<ChatFields>(chat(json!({"a": 1}))).unwrap_err();
        assert_eq!(e.kind, "bool_type");
        for ok in [json!(null), json!(false), json!("yes"), json!(1)] {
            assert!(parse::<ChatFields>(chat(ok.clone())).is_ok(), "{ok}");
        }
    }

    #[test]
    fn chat_request_messages() {
        let r: ChatFields = parse(json!({
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}],
                 "name": "bob", "junk": 1},
                {"role": "assistant", "content": null, "reasoning_content": "r"}
            ]
        }))
        .unwrap();
        assert_eq!(
            r.messages[0].content,
            Some(MessageContent::Text("s".into()))
        );
        assert_eq!(
            r.messages[1].content,
            Some(MessageContent::Parts(vec![
                ContentPart::Text("a".into()),
                ContentPart::Other("image_url".into())
            ]))
        );
        assert_eq!(r.messages[1].extra.get("name"), Some(&json!("bob")));
        assert!(r.messages[1].extra.get("junk").is_none());
        assert_eq!(r.messages[2].extra.get("reasoning"), Some(&json!("r")));

        let (path, e) = parse::<ChatFields>(json!({})).unwrap_err();
        assert_eq!((path.as_str(), e.kind), (".", "missing"));
        assert_eq!(e.sub_path, vec![PathSeg::Key("messages".into())]);
        let (path, e) = parse::<ChatFields>(json!({"messages": [{"content": "x"}]})).unwrap_err();
        assert_eq!(path, "messages[0]");
        assert_eq!(
            (e.kind, e.sub_path),
            ("missing", vec![PathSeg::Key("role".into())])
        );
    }

    #[test]
    fn stream_options_default_include_usage() {
        let o: StreamOptions = parse(json!({})).unwrap();
        assert_eq!(o.include_usage, Some(LaxBool(true)));
        let o: StreamOptions = parse(json!({"include_usage": null})).unwrap();
        assert_eq!(o.include_usage, None);
    }
}
