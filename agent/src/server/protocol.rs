//! Wire types of the OpenAI-compatible API, spelled and ordered as vLLM sends them.
//!
//! Requests are read the way vLLM's pydantic models read them: scalars in pydantic's lax mode
//! (`"16"` is a valid integer, `1` a valid boolean), unknown fields ignored. A field that fails
//! reports a pydantic-style [`FieldError`]; [`super::extract`] turns it into vLLM's 400.
//! Responses are plain `Serialize` structs whose field order is vLLM's; `Option<Option<T>>` with
//! `skip_serializing_if` models pydantic's `exclude_unset` (absent vs. explicit `null`).

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::StopReason;

// ---------------------------------------------------------------------------------------------
// Field errors and lax scalars
// ---------------------------------------------------------------------------------------------

/// Separates the parts of a [`FieldError`] carried through serde's string-only custom errors.
const PART_SEP: char = '\u{1f}';
/// Separates the segments of a [`FieldError`]'s sub-path.
const PATH_SEP: char = '\u{1e}';

/// One step into a JSON document.
#[derive(Debug, Clone, PartialEq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A schema failure of one field: pydantic's error `type` and `msg`, and where inside the field
/// it happened (for unions checked by hand, e.g. `prompt[3]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub kind: &'static str,
    pub msg: String,
    pub sub_path: Vec<PathSeg>,
}

impl FieldError {
    pub fn new(kind: &'static str, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
            sub_path: Vec::new(),
        }
    }

    /// The same error, one level deeper (`seg` is prepended to the sub-path).
    fn at(mut self, seg: PathSeg) -> Self {
        self.sub_path.insert(0, seg);
        self
    }

    fn into_de<E: de::Error>(self) -> E {
        let path: Vec<String> = self
            .sub_path
            .iter()
            .map(|s| match s {
                PathSeg::Key(k) => format!("k{k}"),
                PathSeg::Index(i) => format!("i{i}"),
            })
            .collect();
        E::custom(format!(
            "{}{PART_SEP}{}{PART_SEP}{}",
            self.kind,
            self.msg,
            path.join(&PATH_SEP.to_string())
        ))
    }

    /// Reads back an error made by [`FieldError::into_de`]; other serde messages (e.g. `missing
    /// field`) become pydantic's equivalents.
    pub fn from_serde_message(message: &str) -> Self {
        let mut parts = message.splitn(3, PART_SEP);
        if let (Some(kind), Some(msg), Some(path)) = (parts.next(), parts.next(), parts.next()) {
            let sub_path = path
                .split(PATH_SEP)
                .filter(|s| !s.is_empty())
                .map(|s| match s.split_at(1) {
                    ("i", i) => i
                        .parse()
                        .map(PathSeg::Index)
                        .unwrap_or(PathSeg::Key(i.into())),
                    (_, k) => PathSeg::Key(k.to_string()),
                })
                .collect();
            return Self {
                kind: known_kind(kind),
                msg: msg.to_string(),
                sub_path,
            };
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            return Self::new("missing", "Field required").at(PathSeg::Key(field.to_string()));
        }
        Self::new("value_error", message)
    }
}

/// Maps a kind read back from a serde message onto the static set this module produces.
fn known_kind(kind: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "int_type",
        "int_parsing",
        "int_from_float",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "string_type",
        "list_type",
        "dict_type",
        "missing",
        "greater_than_equal",
        "less_than_equal",
        "string_too_short",
        "string_too_long",
    ];
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("value_error")
}

fn int_type() -> FieldError {
    FieldError::new("int_type", "Input should be a valid integer")
}

/// An integer as pydantic reads it in lax mode.
pub fn lax_int(v: &Value) -> Result<i64, FieldError> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if n.is_u64() {
                Err(FieldError::new(
                    "less_than_equal",
                    format!("Input should be less than or equal to {}", i64::MAX),
                ))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.2e18 {
                    Ok(f as i64)
                } else {
                    Err(FieldError::new(
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    ))
                }
            }
        }
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::String(s) => s.trim().parse().map_err(|_| {
            FieldError::new(
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            )
        }),
        _ => Err(int_type()),
    }
}

/// A float as pydantic reads it in lax mode (numeric strings, `"inf"`, booleans).
pub fn lax_float(v: &Value) -> Result<f64, FieldError> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => Ok(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse().map_err(|_| {
            FieldError::new(
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(FieldError::new(
            "float_type",
            "Input should be a valid number",
        )),
    }
}

/// A boolean as pydantic reads it in lax mode (`0`/`1`, `"yes"`, `"off"`, …).
pub fn lax_bool(v: &Value) -> Result<bool, FieldError> {
    let unparsable = || {
        FieldError::new(
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(false),
            Some(1.0) => Ok(true),
            _ => Err(unparsable()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(unparsable()),
        },
        _ => Err(FieldError::new(
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// A string; pydantic does not turn numbers into strings.
pub fn strict_str(v: &Value) -> Result<String, FieldError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(FieldError::new(
            "string_type",
            "Input should be a valid string",
        )),
    }
}

fn list_items(v: &Value) -> Result<&Vec<Value>, FieldError> {
    v.as_array()
        .ok_or_else(|| FieldError::new("list_type", "Input should be a valid list"))
}

/// Parses every item of a list with `f`, locating a failure at its index.
fn each<T>(
    items: &[Value],
    f: impl Fn(&Value) -> Result<T, FieldError>,
) -> Result<Vec<T>, FieldError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| f(v).map_err(|e| e.at(PathSeg::Index(i))))
        .collect()
}

/// A non-negative integer (pydantic `Annotated[int, Field(ge=0)]`), e.g. a token id.
fn non_negative_int(v: &Value) -> Result<i64, FieldError> {
    let i = lax_int(v)?;
    if i < 0 {
        return Err(FieldError::new(
            "greater_than_equal",
            "Input should be greater than or equal to 0",
        ));
    }
    Ok(i)
}

/// Implements `Deserialize` through a `&Value -> Result<T, FieldError>` reader.
macro_rules! read_via_value {
    ($ty:ty, $reader:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = Value::deserialize(d)?;
                $reader(&v).map_err(FieldError::into_de)
            }
        }
    };
}

/// Lax integer field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaxInt(pub i64);
read_via_value!(LaxInt, |v| lax_int(v).map(LaxInt));

/// Lax float field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaxFloat(pub f64);
read_via_value!(LaxFloat, |v| lax_float(v).map(LaxFloat));

/// Lax boolean field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaxBool(pub bool);
read_via_value!(LaxBool, |v| lax_bool(v).map(LaxBool));

/// String field (no coercion from other types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str(pub String);
read_via_value!(Str, |v| strict_str(v).map(Str));

/// A list of lax integers (token ids).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IntList(pub Vec<i64>);
read_via_value!(IntList, |v| list_items(v)
    .and_then(|items| each(items, lax_int))
    .map(IntList));

/// A list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StrList(pub Vec<String>);
read_via_value!(StrList, |v| list_items(v)
    .and_then(|items| each(items, strict_str))
    .map(StrList));

/// A JSON object kept as is (`dict[str, Any]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dict(pub Map<String, Value>);
read_via_value!(Dict, |v: &Value| v
    .as_object()
    .cloned()
    .map(Dict)
    .ok_or_else(|| FieldError::new(
        "dict_type",
        "Input should be a valid dictionary"
    )));

/// `logit_bias`: `dict[str, float]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FloatDict(pub Vec<(String, f64)>);
read_via_value!(FloatDict, |v: &Value| {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("dict_type", "Input should be a valid dictionary"))?;
    obj.iter()
        .map(|(k, v)| {
            lax_float(v)
                .map(|f| (k.clone(), f))
                .map_err(|e| e.at(PathSeg::Key(k.clone())))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(FloatDict)
});

// ---------------------------------------------------------------------------------------------
// Request unions
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

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

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<Str>,
    pub tokens: IntList,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// vLLM's `stop_reason`: the stop token id or the stop string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReasonWire {
    Token(u32),
    Text(String),
}

impl From<&StopReason> for StopReasonWire {
    fn from(r: &StopReason) -> Self {
        match r {
            StopReason::Token(t) => Self::Token(*t),
            StopReason::Text(s) => Self::Text(s.clone()),
        }
    }
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
    /// Always `null`: prompt logprobs are not computed.
    pub prompt_logprobs: Option<Value>,
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
    /// Always `null`: prompt logprobs are not computed.
    pub prompt_logprobs: Option<Value>,
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
    fn lax_scalars_follow_pydantic() {
        assert_eq!(lax_int(&json!("16")), Ok(16));
        assert_eq!(lax_int(&json!(3.0)), Ok(3));
        assert_eq!(lax_int(&json!(true)), Ok(1));
        assert_eq!(lax_int(&json!(3.5)).unwrap_err().kind, "int_from_float");
        assert_eq!(lax_int(&json!("x")).unwrap_err().kind, "int_parsing");
        assert_eq!(lax_int(&json!(null)).unwrap_err().kind, "int_type");
        assert_eq!(lax_float(&json!("0.5")), Ok(0.5));
        assert_eq!(lax_float(&json!(2)), Ok(2.0));
        assert_eq!(lax_float(&json!([1])).unwrap_err().kind, "float_type");
        assert_eq!(lax_bool(&json!("yes")), Ok(true));
        assert_eq!(lax_bool(&json!(0)), Ok(false));
        assert_eq!(lax_bool(&json!(2)).unwrap_err().kind, "bool_parsing");
        assert_eq!(lax_bool(&json!({})).unwrap_err().kind, "bool_type");
        assert_eq!(strict_str(&json!(5)).unwrap_err().kind, "string_type");
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
            StopReasonWire::from(&StopReason::Token(2)),
            StopReasonWire::from(&StopReason::Text("\n".into())),
        ])
        .unwrap();
        assert_eq!(v, r#"[2,"\n"]"#);
    }
}
