//! The Responses API (`POST /v1/responses`), the subset vLLM serves without tools: the request
//! read as a chat (`instructions` and `input` → messages), the `response` object with one
//! assistant message of `output_text`, and the typed events of its stream.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::body::WireRequest;
use crate::request::ChatCompletionRequest;
use crate::ApiError;

/// Keys of a Responses request that mean the same in a chat completion and pass through.
const SAMPLING_KEYS: [&str; 14] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "min_tokens",
    "request_id",
    "cache_salt",
    "priority",
];

/// What the response object echoes back of its request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Echoed {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub metadata: Option<Value>,
    pub user: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
}

/// A Responses request as a chat-completions body, and what the answer echoes. Tools, stored
/// conversations (`previous_response_id`), background runs and non-text formats are refused:
/// they would change what the client gets.
pub fn to_chat_body(body: &Map<String, Value>) -> Result<(Map<String, Value>, Echoed), ApiError> {
    let unsupported = |field: &str, why: &str| {
        ApiError::invalid(
            format!("`{field}` is not supported by this server: {why}."),
            field,
        )
    };
    if body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return Err(unsupported("tools", "no tool-call parser"));
    }
    if body
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(unsupported(
            "previous_response_id",
            "responses are not stored",
        ));
    }
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("background", "responses are not stored"));
    }
    if let Some(kind) = body
        .get("text")
        .and_then(|t| t.pointer("/format/type"))
        .and_then(Value::as_str)
    {
        if kind != "text" {
            return Err(unsupported("text", "only the text format"));
        }
    }
    let mut messages = Vec::new();
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "`instructions` must be a string.",
                "instructions",
            ))
        }
    };
    if let Some(text) = &instructions {
        messages.push(json!({"role": "system", "content": text}));
    }
    match body.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                messages.push(
                    input_message(item)
                        .map_err(|why| ApiError::invalid(format!("input[{i}]: {why}"), "input"))?,
                );
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "`input` must be a string or a list of messages.",
                "input",
            ))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(m) = body.get("max_output_tokens").filter(|m| !m.is_null()) {
        chat.insert("max_tokens".into(), m.clone());
    }
    if let Some(stream) = body.get("stream") {
        chat.insert("stream".into(), stream.clone());
    }
    for key in SAMPLING_KEYS {
        if let Some(v) = body.get(key) {
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(model) = body.get("model") {
        chat.insert("model".into(), model.clone());
    }
    let echoed = Echoed {
        instructions,
        max_output_tokens: body.get("max_output_tokens").and_then(Value::as_u64),
        metadata: body.get("metadata").filter(|m| !m.is_null()).cloned(),
        user: body.get("user").and_then(Value::as_str).map(str::to_string),
        temperature: body.get("temperature").and_then(Value::as_f64),
        top_p: body.get("top_p").and_then(Value::as_f64),
    };
    Ok((chat, echoed))
}

/// A Responses request: the chat it is served as, and what the answer echoes of it.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    pub chat: ChatCompletionRequest,
    pub echoed: Echoed,
}

impl WireRequest for ResponsesRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        let (chat, echoed) = to_chat_body(body)?;
        Ok(Self {
            chat: ChatCompletionRequest::from_json(&chat)?,
            echoed,
        })
    }
}

/// One `input` item: a message (`type` "message" or absent) whose content is a string or
/// text parts (`input_text`, `output_text` for earlier assistant turns).
fn input_message(item: &Value) -> Result<Value, String> {
    let obj = item.as_object().ok_or("an item must be an object")?;
    match obj.get("type").and_then(Value::as_str) {
        None | Some("message") => {}
        Some(other) => return Err(format!("items of type {other:?} are not supported")),
    }
    let role = obj
        .get("role")
        .and_then(Value::as_str)
        .ok_or("a message needs a role")?;
    let role = if role == "developer" { "system" } else { role };
    if !matches!(role, "system" | "user" | "assistant") {
        return Err(format!("role {role:?} is not supported"));
    }
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some(other) => {
                        return Err(format!("content of type {other:?} is not supported"))
                    }
                    None => return Err("a content part needs a type".into()),
                }
            }
            text
        }
        _ => return Err("a message needs content".into()),
    };
    Ok(json!({"role": role, "content": content}))
}

/// The `response` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    /// `in_progress`, `completed`, or `incomplete` (output cut at `max_output_tokens`).
    pub status: &'static str,
    pub background: bool,
    pub error: Option<Value>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub metadata: Option<Value>,
    pub model: String,
    pub output: Vec<OutputMessage>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub reasoning: Option<Value>,
    pub service_tier: &'static str,
    pub store: bool,
    pub temperature: f64,
    pub text: Value,
    pub tool_choice: &'static str,
    pub tools: Vec<Value>,
    pub top_p: f64,
    pub truncation: &'static str,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
}

impl ResponseObject {
    /// A response in progress, with nothing generated yet.
    pub fn new(id: String, created_at: u64, model: String, echoed: &Echoed) -> Self {
        Self {
            id,
            object: "response",
            created_at,
            status: "in_progress",
            background: false,
            error: None,
            incomplete_details: None,
            instructions: echoed.instructions.clone(),
            max_output_tokens: echoed.max_output_tokens,
            metadata: echoed.metadata.clone(),
            model,
            output: Vec::new(),
            parallel_tool_calls: true,
            previous_response_id: None,
            reasoning: None,
            service_tier: "auto",
            store: false,
            temperature: echoed.temperature.unwrap_or(1.0),
            text: json!({"format": {"type": "text"}}),
            tool_choice: "auto",
            tools: Vec::new(),
            top_p: echoed.top_p.unwrap_or(1.0),
            truncation: "disabled",
            usage: None,
            user: echoed.user.clone(),
        }
    }

    /// Done: `completed`, or `incomplete` when the output hit its token budget.
    pub fn finish(&mut self, message: OutputMessage, cut: bool, usage: ResponseUsage) {
        self.status = if cut { "incomplete" } else { "completed" };
        self.incomplete_details = cut.then_some(IncompleteDetails {
            reason: "max_output_tokens",
        });
        self.output = vec![message];
        self.usage = Some(usage);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncompleteDetails {
    pub reason: &'static str,
}

/// The assistant message of the output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputMessage {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub role: &'static str,
    pub content: Vec<OutputText>,
}

impl OutputMessage {
    pub fn new(id: String, status: &'static str, content: Vec<OutputText>) -> Self {
        Self {
            id,
            kind: "message",
            status,
            role: "assistant",
            content,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    pub annotations: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

impl ResponseUsage {
    pub fn new(input_tokens: usize, cached_tokens: usize, output_tokens: usize) -> Self {
        Self {
            input_tokens,
            input_tokens_details: InputTokensDetails { cached_tokens },
            output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: input_tokens + output_tokens,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: usize,
}

/// One event of a streamed response; `type` names it, and the SSE frame's `event:` line too.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum StreamEvent {
    #[serde(rename = "response.created")]
    Created {
        sequence_number: usize,
        response: ResponseObject,
    },
    #[serde(rename = "response.in_progress")]
    InProgress {
        sequence_number: usize,
        response: ResponseObject,
    },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        sequence_number: usize,
        output_index: usize,
        item: OutputMessage,
    },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        sequence_number: usize,
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        sequence_number: usize,
        item_id: String,
        output_index: usize,
        content_index: usize,
        delta: String,
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        sequence_number: usize,
        item_id: String,
        output_index: usize,
        content_index: usize,
        text: String,
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        sequence_number: usize,
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        sequence_number: usize,
        output_index: usize,
        item: OutputMessage,
    },
    #[serde(rename = "response.completed")]
    Completed {
        sequence_number: usize,
        response: ResponseObject,
    },
    #[serde(rename = "response.incomplete")]
    Incomplete {
        sequence_number: usize,
        response: ResponseObject,
    },
}

impl StreamEvent {
    /// The event's `type`, for the SSE `event:` line.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::OutputItemAdded { .. } => "response.output_item.added",
            Self::ContentPartAdded { .. } => "response.content_part.added",
            Self::OutputTextDelta { .. } => "response.output_text.delta",
            Self::OutputTextDone { .. } => "response.output_text.done",
            Self::ContentPartDone { .. } => "response.content_part.done",
            Self::OutputItemDone { .. } => "response.output_item.done",
            Self::Completed { .. } => "response.completed",
            Self::Incomplete { .. } => "response.incomplete",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_request_becomes_a_chat() {
        let (chat, echoed) = to_chat_body(&obj(json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 8,
            "temperature": 0, "stream": true, "metadata": {"k": "v"}, "store": true,
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Hello."}]},
                {"role": "developer", "content": [{"type": "input_text", "text": "More"}]},
            ],
        })))
        .unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({"model": "m", "max_tokens": 8, "temperature": 0, "stream": true,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "system", "content": "More"},
            ]})
        );
        assert_eq!(echoed.max_output_tokens, Some(8));
        assert_eq!(echoed.metadata, Some(json!({"k": "v"})));
        let (chat, _) = to_chat_body(&obj(json!({"input": "Hi"}))).unwrap();
        assert_eq!(chat["messages"], json!([{"role": "user", "content": "Hi"}]));
    }

    #[test]
    fn refusals_name_the_field() {
        let param = |v: Value| to_chat_body(&obj(v)).unwrap_err().param;
        assert_eq!(
            param(json!({"input": "x", "tools": [{"type": "function"}]})).as_deref(),
            Some("tools")
        );
        assert_eq!(
            param(json!({"input": "x", "previous_response_id": "resp_1"})).as_deref(),
            Some("previous_response_id")
        );
        assert_eq!(
            param(json!({"input": "x", "text": {"format": {"type": "json_schema"}}})).as_deref(),
            Some("text")
        );
        assert_eq!(param(json!({})).as_deref(), Some("input"));
        assert_eq!(
            param(json!({"input": [{"type": "function_call", "name": "f"}]})).as_deref(),
            Some("input")
        );
    }

    #[test]
    fn events_are_tagged_with_their_type() {
        let e = StreamEvent::OutputTextDelta {
            sequence_number: 3,
            item_id: "msg_1".into(),
            output_index: 0,
            content_index: 0,
            delta: "Hi".into(),
            logprobs: Vec::new(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], e.kind());
        assert_eq!(v["delta"], "Hi");
        assert_eq!(v["sequence_number"], 3);
    }
}
