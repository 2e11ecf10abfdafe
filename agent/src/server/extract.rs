//! Request body → typed request, failing the way vLLM (FastAPI + pydantic) fails: every
//! rejection is a 400 in vLLM's error shape, never axum's 415/422 plain-text ones.
//!
//! Order as in vLLM: the body must be UTF-8 JSON (`json_invalid`), the Content-Type must be
//! `application/json`, the raw object passes the endpoint's "before" validators, then the
//! fields are read (`1 validation error: {...}` with pydantic's error dict).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::errors::{py_float, ApiError};
use super::protocol::{
    ChatCompletionRequest, ChatFields, CommonFields, CompletionFields, CompletionRequest,
    DetokenizeRequest, FieldError, Generation, PathSeg, TokenizeRequest,
};
use super::state::AppState;
use super::validation;

/// A request body read as `T`, or vLLM's 400.
#[derive(Debug)]
pub struct VllmJson<T>(pub T);

/// A request type with its own raw ("before") checks.
pub trait WireRequest: Sized {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError>;
}

impl<T: WireRequest> FromRequest<AppState> for VllmJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type_ok = is_json_content_type(req.headers());
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.config.max_body_bytes)
            } else {
                ApiError::bad_request("There was an error parsing the body")
            }
        })?;
        // FastAPI only parses JSON bodies; others fail vLLM's Content-Type dependency.
        if !content_type_ok {
            return Err(ApiError::bad_request(
                "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            ));
        }
        let Some(body) = parse_body(&bytes)? else {
            return Err(schema_error(
                &FieldError::new("missing", "Field required"),
                &[],
                &Value::Null,
            ));
        };
        let Value::Object(obj) = &body else {
            return Err(schema_error(
                &FieldError::new(
                    "model_attributes_type",
                    "Input should be a valid dictionary or object to extract fields from",
                ),
                &[],
                &body,
            ));
        };
        T::from_json(obj).map(VllmJson)
    }
}

/// vLLM accepts `application/json` with any parameters (`; charset=utf-8`), case-insensitively.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// The JSON document of a body; `None` for an empty body.
fn parse_body(bytes: &[u8]) -> Result<Option<Value>, ApiError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    // Python's json.loads(bytes) decodes as UTF-8 (dropping a BOM) before parsing.
    let text = std::str::from_utf8(bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes))
        .map_err(|_| ApiError::bad_request("There was an error parsing the body"))?;
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
    let value = Value::Object(body.clone());
    serde_path_to_error::deserialize(&value).map_err(|e| {
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
        schema_error(&field_error, &loc, &value)
    })
}

/// pydantic's `input` values are cut here: a 10 MB prompt need not come back in an error.
const MAX_INPUT_REPR: usize = 1000;

/// vLLM's answer to a pydantic failure at `loc` (below `body`).
fn schema_error(e: &FieldError, loc: &[PathSeg], body: &Value) -> ApiError {
    // A missing field's input is the object that lacks it.
    let input_path = if e.kind == "missing" {
        &loc[..loc.len().saturating_sub(1)]
    } else {
        loc
    };
    let input = lookup(body, input_path).map_or("None".to_string(), py_repr);
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

fn lookup<'a>(v: &'a Value, path: &[PathSeg]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, seg| match seg {
        PathSeg::Key(k) => v.get(k),
        PathSeg::Index(i) => v.get(i),
    })
}

/// Python's `repr` of a JSON value (`None`, `True`, `'text'`, `{'k': 1}`).
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Number(n) if n.is_f64() => py_float(n.as_f64().unwrap_or(f64::NAN)),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(obj) => format!(
            "{{{}}}",
            obj.iter()
                .map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `repr` of a string: single quotes unless the text has `'` and no `"`.
pub fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
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
        validation::check_completion_raw(body)?;
        generation::<CompletionFields>(body)
    }
}

impl WireRequest for ChatCompletionRequest {
    fn from_json(body: &Map<String, Value>) -> Result<Self, ApiError> {
        validation::check_chat_raw(body)?;
        generation::<ChatFields>(body)
    }
}

impl WireRequest for TokenizeRequest {
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

    #[test]
    fn python_reprs() {
        assert_eq!(
            py_repr(&json!({"a": [1, 2.5, null, true], "b": "it's"})),
            r#"{'a': [1, 2.5, None, True], 'b': "it's"}"#
        );
        assert_eq!(py_str("a\nb'\""), r#"'a\nb\'"'"#);
    }

    #[test]
    fn content_type_check() {
        let mut h = HeaderMap::new();
        assert!(!is_json_content_type(&h));
        h.insert(
            CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json_content_type(&h));
        h.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json_content_type(&h));
    }
}
