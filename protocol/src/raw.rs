//! vLLM's "before" validators: the checks its pydantic request models run on the raw JSON object,
//! before any field is read (so they win over a field's type error).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::python::py_repr;

/// Python truthiness of an optional JSON value (absent, `null`, `false`, `0`, `""`, `[]`, `{}`
/// are false), as vLLM's raw validators test `data.get(...)`.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// `stream_options` needs `stream`.
fn check_stream_options(body: &Map<String, Value>) -> Result<(), ApiError> {
    if truthy(body.get("stream_options")) && !truthy(body.get("stream")) {
        return Err(ApiError::invalid(
            "Stream options can only be defined when `stream=True`.",
            "stream_options",
        ));
    }
    Ok(())
}

/// A raw logprobs-count field: a number, and non-negative or -1.
fn check_logprob_count(body: &Map<String, Value>, field: &str) -> Result<(), ApiError> {
    let Some(v) = body.get(field).filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Some(n) = v.as_f64() else {
        return Err(ApiError::invalid_value(
            format!("`{field}` must be an integer."),
            field,
            py_repr(v),
        ));
    };
    if n < 0.0 && n != -1.0 {
        return Err(ApiError::invalid_value(
            format!("`{field}` must be a positive value or -1."),
            field,
            v,
        ));
    }
    Ok(())
}

/// vLLM's `CompletionRequest` "before" validators.
pub fn check_completion_raw(body: &Map<String, Value>) -> Result<(), ApiError> {
    check_logprob_count(body, "logprobs")?;
    check_logprob_count(body, "prompt_logprobs")?;
    check_stream_options(body)?;
    let prompt_empty = match body.get("prompt") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if prompt_empty && !truthy(body.get("prompt_embeds")) {
        return Err(ApiError::invalid(
            "Either prompt or prompt_embeds must be provided and non-empty.",
            "prompt",
        ));
    }
    Ok(())
}

/// vLLM's `ChatCompletionRequest` "before" validators.
pub fn check_chat_raw(body: &Map<String, Value>) -> Result<(), ApiError> {
    check_stream_options(body)?;
    check_logprob_count(body, "prompt_logprobs")?;
    check_logprob_count(body, "top_logprobs")?;
    if let Some(top) = body.get("top_logprobs").and_then(Value::as_f64) {
        if (top == -1.0 || top > 0.0) && !truthy(body.get("logprobs")) {
            return Err(ApiError::invalid(
                "when using `top_logprobs`, `logprobs` must be set to true.",
                "top_logprobs",
            ));
        }
    }
    if body
        .get("tools")
        .is_some_and(|t| t.as_array().is_some_and(Vec::is_empty))
    {
        return Err(ApiError::invalid(
            "`tools` must not be an empty array. Either provide at least one tool or omit the \
             field entirely.",
            "tools",
        ));
    }
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(choice) => {
            if body.get("tools").is_none_or(Value::is_null) {
                return Err(ApiError::invalid(
                    "When using `tool_choice`, `tools` must be set.",
                    "tool_choice",
                ));
            }
            let named_or_keyword =
                choice.is_object() || matches!(choice.as_str(), Some("auto") | Some("required"));
            if !named_or_keyword {
                return Err(ApiError::invalid(
                    format!(
                        "Invalid value for `tool_choice`: {}! Only named tools, \"none\", \"auto\" \
                         or \"required\" are supported.",
                        choice.as_str().map_or_else(|| py_repr(choice), str::to_string)
                    ),
                    "tool_choice",
                ));
            }
        }
    }
    if truthy(body.get("continue_final_message")) && truthy(body.get("add_generation_prompt")) {
        return Err(ApiError::bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn raw_completion_checks() {
        let e = check_completion_raw(&obj(
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
        ))
        .unwrap_err();
        assert_eq!(
            e.message,
            "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
        );
        // An empty dict is falsy in Python: accepted.
        check_completion_raw(&obj(json!({"prompt": "x", "stream_options": {}}))).unwrap();
        let e = check_completion_raw(&obj(json!({"prompt": ""}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(check_completion_raw(&obj(json!({}))).is_err());
        let e = check_completion_raw(&obj(json!({"prompt": "x", "logprobs": -2}))).unwrap_err();
        assert_eq!(
            e.message,
            "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)"
        );
        let e = check_completion_raw(&obj(json!({"prompt": "x", "logprobs": "a"}))).unwrap_err();
        assert_eq!(
            e.message,
            "`logprobs` must be an integer. (parameter=logprobs, value='a')"
        );
        check_completion_raw(&obj(json!({"prompt": [1, 2], "logprobs": -1}))).unwrap();
    }

    #[test]
    fn raw_chat_checks() {
        let base = |extra: Value| {
            let mut o = obj(json!({"messages": [{"role": "user", "content": "x"}]}));
            o.extend(obj(extra));
            check_chat_raw(&o)
        };
        base(json!({})).unwrap();
        let e = base(json!({"top_logprobs": 2})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        base(json!({"top_logprobs": 2, "logprobs": true})).unwrap();
        base(json!({"top_logprobs": 0})).unwrap();
        assert!(base(json!({"tools": []})).is_err());
        assert!(base(json!({"tool_choice": "auto"})).is_err());
        assert!(base(json!({"tool_choice": "bogus", "tools": [{}]})).is_err());
        base(json!({"tool_choice": "none"})).unwrap();
        assert!(
            base(json!({"continue_final_message": true, "add_generation_prompt": true})).is_err()
        );
        base(json!({"continue_final_message": true})).unwrap();
    }
}
