//! The text side of a model, without its weights: the tokenizer and chat template of a GGUF file
//! (from its metadata, [`gguf`]) or a Hugging Face directory ([`hf`]), the chat rendering
//! ([`chat`]) and request → prompt token ids ([`request`]); [`hub_cache`] finds a model named
//! by its Hugging Face id. Shared by the agent, which serves the
//! model, and the router, which must compute the same prompt tokens to key its prefix index.
//!
//! Nothing here reads tensors or runs a model; the agent's model loader sits above this crate.

pub mod chat;
pub mod chat_template;
mod error;
pub mod gguf;
pub mod hf;
pub mod hub_cache;
pub mod request;
pub mod tokenizer;

use std::io::{BufReader, Read, Seek};
use std::path::Path;

pub use chat_template::ChatTemplate;
pub use error::LoadError;
pub use request::{Endpoint, PromptKey, PromptLimits};
pub use tokenizer::Tokenizer;

/// What [`load`] reads from a model path.
pub struct Preprocessor {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Default served model name: the GGUF file stem or the directory name.
    pub name: String,
    /// The context length the model was trained for (GGUF `<arch>.context_length`, HF
    /// `max_position_embeddings`): the agent's default `--max-model-len`.
    pub context_length: Option<usize>,
}

/// Loads the tokenizer and chat template of a `.gguf` file (metadata only) or a Hugging Face
/// directory (`tokenizer.json` and its side files).
pub fn load(path: &Path) -> Result<Preprocessor, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        return load_hf(path);
    }
    let file = std::fs::File::open(path).map_err(LoadError::io(path))?;
    load_gguf(BufReader::new(file), path)
}

/// The text side of a GGUF read from `reader`; `path` names it in errors and gives the name.
pub fn load_gguf<R: Read + Seek>(reader: R, path: &Path) -> Result<Preprocessor, LoadError> {
    let meta = gguf::Metadata::read(reader, path)?;
    let tokenizer = Tokenizer::from_gguf(&meta)?;
    let chat_template = match meta.get("tokenizer.chat_template") {
        Some(v) => {
            let source = v.as_str().ok_or_else(|| {
                LoadError::malformed(path, "tokenizer.chat_template is not a string")
            })?;
            Some(ChatTemplate::new(
                source,
                tokenizer.bos_token().map(str::to_string),
                tokenizer.eos_token().map(str::to_string),
            )?)
        }
        None => None,
    };
    let context_length = meta
        .get("general.architecture")
        .and_then(gguf::MetaValue::as_str)
        .and_then(|arch| meta.get(&format!("{arch}.context_length")))
        .and_then(gguf::MetaValue::as_int)
        .and_then(|n| usize::try_from(n).ok());
    Ok(Preprocessor {
        tokenizer,
        chat_template,
        name: served_name(path, true),
        context_length,
    })
}

/// The text side of a Hugging Face checkpoint directory.
pub fn load_hf(dir: &Path) -> Result<Preprocessor, LoadError> {
    let (tokenizer, chat_template) = hf::load_tokenizer(dir)?;
    Ok(Preprocessor {
        tokenizer,
        chat_template,
        name: served_name(dir, false),
        context_length: hf::context_length(dir),
    })
}

/// The last path component as a served model name.
fn served_name(path: &Path, strip_extension: bool) -> String {
    let name = if strip_extension {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    //! Test helpers, shared with the agent's tests through the `test-support` feature: the
    //! default model's file and its text side, loaded once per test binary.

    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::Preprocessor;

    /// The default model (installed by scripts/install.sh), from the workspace root.
    pub fn gguf_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// The SmolLM2 GGUF's tokenizer and template, or `None` (after saying so) without the file.
    pub fn smollm() -> Option<&'static Preprocessor> {
        static MODEL: OnceLock<Option<Preprocessor>> = OnceLock::new();
        let model = MODEL.get_or_init(|| {
            let path = gguf_path();
            path.is_file()
                .then(|| super::load(&path).expect("loading the default GGUF"))
        });
        if model.is_none() {
            eprintln!("SKIPPED: {} not found", gguf_path().display());
        }
        model.as_ref()
    }

    /// A fresh scratch directory under the system temp dir, unique to this process.
    pub fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch dir");
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{scratch_dir, smollm};
    use super::*;
    use serde_json::json;

    #[test]
    fn loads_the_default_gguf_text_side() {
        let Some(m) = smollm() else { return };
        assert_eq!(m.name, "SmolLM2-135M-Instruct.Q4_1");
        assert!(m.chat_template.is_some());
        assert_eq!(m.tokenizer.eos_token_ids(), &[2]);
        assert_eq!(m.tokenizer.bos_token(), Some("<|im_start|>"));
        assert_eq!(m.tokenizer.eos_token(), Some("<|im_end|>"));
    }

    #[test]
    fn hf_directory_needs_only_the_tokenizer_files() {
        let Some(full) = smollm() else { return };
        let dir = scratch_dir("prompt-preprocess-hf");
        full.tokenizer
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        let tc = json!({"eos_token": "<|im_end|>", "chat_template": "{{ messages[0].content }}!"});
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        let pre = load(&dir).unwrap();
        assert_eq!(
            pre.tokenizer.encode("hello world", false).unwrap(),
            full.tokenizer.encode("hello world", false).unwrap()
        );
        let messages = json!([{"role": "user", "content": "Hi"}]);
        let rendered = pre
            .chat_template
            .unwrap()
            .render(&messages, false, None)
            .unwrap();
        assert_eq!(rendered, "Hi!");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors() {
        let dir = scratch_dir("prompt-preprocess-errors");
        assert!(matches!(
            load(&dir.join("missing.gguf")),
            Err(LoadError::NotFound(_))
        ));
        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"nope").unwrap();
        assert!(matches!(load(&junk), Err(LoadError::NotGguf(_))));
        assert!(matches!(
            load(&dir),
            Err(LoadError::MissingFile(p)) if p.ends_with("tokenizer.json")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
