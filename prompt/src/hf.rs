//! The text side of a Hugging Face checkpoint directory: `tokenizer.json`, the special tokens
//! and chat template of `tokenizer_config.json` (or `chat_template.jinja`), and the extra EOS ids
//! of `generation_config.json`. No `config.json` and no safetensors are read here.

use std::path::Path;

use serde_json::Value;

use crate::{ChatTemplate, LoadError, Tokenizer};

/// Tokenizer (`tokenizer.json`) plus special tokens and chat template from the side files.
pub fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>), LoadError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(LoadError::MissingFile(tok_path));
    }
    let inner = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let token = |key: &str| -> Option<String> {
        match tc.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let bos = token("bos_token");
    let eos = token("eos_token");

    let mut eos_ids: Vec<u32> = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
    let gen = read_json_opt(&dir.join("generation_config.json"))?;
    let gen_eos = match gen.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    for id in gen_eos.into_iter().filter_map(|id| u32::try_from(id).ok()) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }

    let source = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    };
    let jinja = dir.join("chat_template.jinja");
    let source = match source {
        Some(s) => Some(s),
        None if jinja.is_file() => Some(read_required(&jinja)?),
        None => None,
    };
    let template = source
        .map(|s| ChatTemplate::new(&s, bos.clone(), eos.clone()))
        .transpose()?;
    Ok((Tokenizer::new(inner, eos_ids, bos, eos), template))
}

/// `max_position_embeddings` of the directory's `config.json`, when it has one that says.
pub fn context_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let n = config.get("max_position_embeddings")?.as_u64()?;
    usize::try_from(n).ok()
}

pub fn read_required(path: &Path) -> Result<String, LoadError> {
    if !path.is_file() {
        return Err(LoadError::MissingFile(path.to_path_buf()));
    }
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A JSON object file, or `null` when the file does not exist.
fn read_json_opt(path: &Path) -> Result<Value, LoadError> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&read_required(path)?)
        .map_err(|e| LoadError::malformed(path, e.to_string()))
}
