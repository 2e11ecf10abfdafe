//! Chat templates: a Hugging Face Jinja chat template compiled once with minijinja, configured
//! like transformers' renderer (trim/lstrip blocks, Python string methods, `raise_exception`,
//! a `tojson` that prints like Python's `json.dumps`).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Map;

use crate::LoadError;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template. `Send + Sync`; rendering does not mutate it.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` become template globals.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, LoadError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates rely on it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| LoadError::Template(format!("compiling chat template: {e:#}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (the OpenAI messages array). `extra_kwargs` (e.g. `tools`, request
    /// `chat_template_kwargs`) become globals; `messages` and `add_generation_prompt` always
    /// take the values given here.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra_kwargs: Option<&Map<String, serde_json::Value>>,
    ) -> Result<String, LoadError> {
        let mut ctx = Map::new();
        // Like transformers: an unset special token is undefined (renders empty), not None.
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(t) = token {
                ctx.insert(key.into(), t.clone().into());
            }
        }
        if let Some(extra) = extra_kwargs {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| LoadError::Template(e.to_string()))?;
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| LoadError::Template(format!("rendering chat template: {e:#}")))
    }
}

/// `raise_exception(msg)`: how HF templates reject unsupported conversations.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// i.e. `", "`/`": "` separators inline, `","` + newlines when indented, no HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    // Scalars print the same in serde_json and Python (same escapes, non-ASCII kept).
    let scalar = |v: &J| serde_json::to_string(v).unwrap_or_default();
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                out.push_str(&scalar(&J::String(k.clone())));
                out.push_str(": ");
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        J::Array(_) => out.push_str("[]"),
        J::Object(_) => out.push_str("{}"),
        scalar_value => out.push_str(&scalar(scalar_value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The template of SmolLM2-135M-Instruct (GGUF `tokenizer.chat_template`).
    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm() -> ChatTemplate {
        ChatTemplate::new(
            SMOLLM,
            Some("<|im_start|>".into()),
            Some("<|im_end|>".into()),
        )
        .unwrap()
    }

    #[test]
    fn chatml_inserts_default_system_prompt() {
        let msgs = json!([{"role": "user", "content": "What is the capital of France?"}]);
        assert_eq!(
            smollm().render(&msgs, true, None).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_keeps_given_system_prompt_without_generation_prompt() {
        let msgs = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}
        ]);
        assert_eq!(
            smollm().render(&msgs, false, None).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn hf_features_globals_and_kwargs() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role not in ['user'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n[{{ m.content.strip().upper() }}|{{ m.content.startswith(' hi') }}]\n{% endfor %}{{ tools | tojson }}|{{ flag }}|{{ eos_token }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let extra = json!({"tools": [{"name": "f", "x": [1, 2.5, "é\"\n"]}], "flag": true});
        let out = t
            .render(
                &json!([{"role": "user", "content": " hi there "}]),
                false,
                extra.as_object(),
            )
            .unwrap();
        // trim_blocks/lstrip_blocks remove the block lines' whitespace; booleans print like
        // Python's; the unset eos_token is undefined, so empty.
        assert_eq!(
            out,
            "<s>[HI THERE|True]\n[{\"name\": \"f\", \"x\": [1, 2.5, \"é\\\"\\n\"]}]|True|"
        );

        let err = t
            .render(&json!([{"role": "tool", "content": "x"}]), false, None)
            .unwrap_err();
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn tojson_indent_matches_python() {
        let t = ChatTemplate::new("{{ x | tojson(indent=2) }}", None, None).unwrap();
        let extra = json!({"x": {"a": [1, {}], "b": []}});
        // python: json.dumps({"a": [1, {}], "b": []}, indent=2)
        assert_eq!(
            t.render(&json!([]), false, extra.as_object()).unwrap(),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, LoadError::Template(_)), "{err}");
    }
}
