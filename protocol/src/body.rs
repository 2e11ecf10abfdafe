//! A request body to a typed request, failing the way vLLM (FastAPI + pydantic) fails: the body
//! must be UTF-8 JSON (`json_invalid`), an object, pass the endpoint's "before" validators
//! ([`crate::raw`]), then every field is read (`1 validation error: {...}` with pydantic's error
//! dict). The HTTP side (Content-Type, body limits) is the server's.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::fields::{FieldError, PathSeg};
use crate::python::{py_repr, py_str};
use crate::raw;
use crate::request::{
    ChatCompletionRequest, ChatFields, CommonFields, CompletionFields, CompletionRequest,
    DetokenizeRequest, EmbeddingRequest, Generation, TokenizeRequest,
};

/// A request type with its own raw ("before") checks.
pub trait WireRequest: Sized {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError>;
}

/// The request object of a body, or vLLM's 400: not JSON, empty, or not an object.
pub fn request_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let Some(body) = parse_body(bytes)? else {
        return Err(schema_error(
            &FieldError::new("missing", "Field required"),
            &[],
            &Body::Other(&Value::Null),
        ));
    };
    match body {
        Value::Object(obj) => Ok(obj),
        other => Err(schema_error(
            &FieldError::new(
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
            ),
            &[],
            &Body::Other(&other),
        )),
    }
}

/// The JSON document of a body; `None` for an empty body.
fn parse_body(bytes: &[u8]) -> Result<Option<Value>, ApiError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    // Python's json.loads(bytes) decodes as UTF-8 (dropping a BOM) before parsing.
    let text = std::str::from_utf8(bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes))
        .map_err(|_| ApiError::unreadable_body())?;
    serde_json::from_str(text).map(Some).map_err(|e| {
        // Python reports a premature end at the end of the text.
        let pos = if e.is_eof() {
            text.chars().count()
        } else {
            char_position(text, e.line(), e.column())
        };
        let message = format!(
            "1 validation error:\n  {{'type': 'json_invalid', 'loc': ('body', {pos}), 'msg': 'JSON \
             decode error', 'input': {{}}, 'ctx': {{'error': {}}}}}",
            py_str(&python_json_message(&e))
        );
        ApiError {
            param: Some(format!("body.{pos}")),
            ..ApiError::bad_request(message)
        }
    })
}

/// The character offset of serde_json's 1-based line / byte column (Python reports `pos`).
fn char_position(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let byte = (line_start + column.saturating_sub(1)).min(text.len());
    text.char_indices().take_while(|(i, _)| *i < byte).count()
}

/// Python's `json` messages for the usual serde_json ones.
fn python_json_message(e: &serde_json::Error) -> String {
    let raw = e.to_string();
    let msg = raw.split(" at line ").next().unwrap_or(&raw);
    match msg {
        "expected value" | "EOF while parsing a value" => "Expecting value",
        "key must be a string" | "EOF while parsing an object" => {
            "Expecting property name enclosed in double quotes"
        }
        "expected `,` or `}`" | "expected `,` or `]`" | "EOF while parsing a list" => {
            "Expecting ',' delimiter"
        }
        "expected `:`" => "Expecting ':' delimiter",
        "trailing characters" => "Extra data",
        "EOF while parsing a string" => "Unterminated string starting at",
        m if m.starts_with("control character") => "Invalid control character at",
        m => m,
    }
    .to_string()
}

/// Reads `T` from the body object; a failing field becomes vLLM's schema 400.
pub fn typed<T: DeserializeOwned>(body: &Map<String, Value>) -> Result<T, ApiError> {
    // Read in place: a copy of the body per call would cost a 60 MB prompt 60 MB each time.
    let fields = serde::de::value::MapDeserializer::<_, serde_json::Error>::new(
        body.iter().map(|(k, v)| (k.as_str(), v)),
    );
    serde_path_to_error::deserialize(fields).map_err(|e| {
        let mut loc: Vec<PathSeg> = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(PathSeg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSeg::Index(*index)),
                _ => None,
            })
            .collect();
        let field_error = FieldError::from_serde_message(&e.inner().to_string());
        loc.extend(field_error.sub_path.iter().cloned());
        schema_error(&field_error, &loc, &Body::Object(body))
    })
}

/// pydantic's `input` values are cut here: a 10 MB prompt need not come back in an error.
const MAX_INPUT_REPR: usize = 1000;

/// vLLM's answer to a pydantic failure at `loc` (below `body`).
fn schema_error(e: &FieldError, loc: &[PathSeg], body: &Body) -> ApiError {
    // A missing field's input is the object that lacks it.
    let input_path = if e.kind == "missing" {
        &loc[..loc.len().saturating_sub(1)]
    } else {
        loc
    };
    let input = match (body, input_path) {
        (Body::Object(obj), []) => py_repr(&Value::Object((*obj).clone())),
        _ => lookup(body, input_path).map_or("None".to_string(), py_repr),
    };
    let input = if input.chars().count() > MAX_INPUT_REPR {
        let cut: String = input.chars().take(MAX_INPUT_REPR).collect();
        format!("{cut}...")
    } else {
        input
    };
    let mut loc_repr = vec!["'body'".to_string()];
    let mut param = vec!["body".to_string()];
    for seg in loc {
        match seg {
            PathSeg::Key(k) => {
                loc_repr.push(py_str(k));
                param.push(k.clone());
            }
            PathSeg::Index(i) => {
                loc_repr.push(i.to_string());
                param.push(i.to_string());
            }
        }
    }
    let loc_tuple = if loc_repr.len() == 1 {
        format!("({},)", loc_repr[0])
    } else {
        format!("({})", loc_repr.join(", "))
    };
    let message = format!(
        "1 validation error:\n  {{'type': {}, 'loc': {loc_tuple}, 'msg': {}, 'input': {input}}}",
        py_str(e.kind),
        py_str(&e.msg)
    );
    ApiError {
        param: Some(param.join(".")),
        ..ApiError::bad_request(message)
    }
}

/// The document a schema error points into: the request object, or a body that is not one.
enum Body<'a> {
    Object(&'a Map<String, Value>),
    Other(&'a Value),
}

/// The value at `path`; the whole object only as an owned copy (`None` here), since pydantic
/// reports it as the input of a missing top-level field, an error path only.
fn lookup<'a>(body: &Body<'a>, path: &[PathSeg]) -> Option<&'a Value> {
    match (body, path.split_first()) {
        (Body::Other(v), _) => descend(v, path),
        (Body::Object(obj), Some((PathSeg::Key(k), rest))) => descend(obj.get(k)?, rest),
        (Body::Object(_), _) => None,
    }
}

fn descend<'a>(v: &'a Value, path: &[PathSeg]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, seg| match seg {
        PathSeg::Key(k) => v.get(k),
        PathSeg::Index(i) => v.get(i),
    })
}

/// Reads both halves of a generation request (each with exact error paths).
fn generation<F: DeserializeOwned>(body: &Map<String, Value>) -> Result<Generation<F>, ApiError> {
    Ok(Generation {
        fields: typed(body)?,
        common: typed::<CommonFields>(body)?,
    })
}

impl WireRequest for CompletionRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        raw::check_completion_raw(body)?;
        generation::<CompletionFields>(body)
    }
}

impl WireRequest for ChatCompletionRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        raw::check_chat_raw(body)?;
        generation::<ChatFields>(body)
    }
}

impl WireRequest for TokenizeRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        typed(body)
    }
}

impl WireRequest for EmbeddingRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        typed(body)
    }
}

impl WireRequest for DetokenizeRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        typed(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn schema_error_message_is_pydantic_like() {
        let e = typed::<CommonFields>(&obj(json!({"temperature": "hot"}))).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("body.temperature"));
        assert_eq!(
            e.message,
            "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'temperature'), \
             'msg': 'Input should be a valid number, unable to parse string as a number', \
             'input': 'hot'}"
        );
    }

    #[test]
    fn missing_field_reports_the_parent_as_input() {
        let e = typed::<ChatFields>(&obj(json!({"messages": [{"content": "x"}]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body.messages.0.role"));
        assert!(
            e.message.contains("'loc': ('body', 'messages', 0, 'role')"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("'input': {'content': 'x'}"),
            "{}",
            e.message
        );
    }

    #[test]
    fn json_errors_point_at_the_character() {
        let e = parse_body(br#"{"a": }"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body.6"));
        assert!(
            e.message.contains("'ctx': {'error': 'Expecting value'}"),
            "{}",
            e.message
        );
        let e = parse_body(br#"{"prompt": "#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body.11"));
        let e = parse_body("{\"é\": 1,}".as_bytes()).unwrap_err();
        assert!(e.message.contains("JSON decode error"));
        assert!(parse_body(b"").unwrap().is_none());
        let e = parse_body(b"{\"a\": \"\xff\"}").unwrap_err();
        assert_eq!(e.message, "There was an error parsing the body");
        assert_eq!(parse_body(b"\xef\xbb\xbf{}").unwrap(), Some(json!({})));
    }
}
