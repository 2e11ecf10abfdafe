//! The text side of a model without its weights: tokenizer, chat template and served name,
//! read from the same GGUF file or Hugging Face directory [`super::load`] takes. For processes
//! that must produce the agent's exact prompt tokens without running the model (the router).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use super::{gguf, hf, served_name, ChatTemplate, ModelError, Tokenizer};

/// What [`load_preprocessor`] reads from a model path.
pub struct Preprocessor {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Default served model name, as [`super::LoadedModel::name`].
    pub name: String,
}

/// Loads the tokenizer and chat template of a `.gguf` file (metadata only; tensor data is not
/// read) or a Hugging Face directory (`tokenizer.json` and its side files; no safetensors).
pub fn load_preprocessor(path: &Path) -> Result<Preprocessor, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let (tokenizer, chat_template) = hf::load_tokenizer(path)?;
        return Ok(Preprocessor {
            tokenizer,
            chat_template,
            name: served_name(path, false),
        });
    }
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ct = gguf::read_content(&mut BufReader::new(file), path)?;
    let (tokenizer, chat_template) = gguf::tokenizer_and_template(&ct, path)?;
    Ok(Preprocessor {
        tokenizer,
        chat_template,
        name: served_name(path, true),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{gguf_path, scratch_dir, smollm};
    use super::*;
    use serde_json::json;

    #[test]
    fn gguf_preprocessor_matches_the_full_loader() {
        let Some(full) = smollm() else { return };
        let pre = load_preprocessor(&gguf_path()).unwrap();
        assert_eq!(pre.name, full.name);
        let text = "<|im_start|>user\nHello, 12345 world!<|im_end|>\n";
        for special in [false, true] {
            assert_eq!(
                pre.tokenizer.encode(text, special).unwrap(),
                full.tokenizer.encode(text, special).unwrap()
            );
        }
        assert_eq!(
            pre.tokenizer.eos_token_ids(),
            full.tokenizer.eos_token_ids()
        );
        let messages = json!([{"role": "user", "content": "Hi"}]);
        let render = |t: &Option<ChatTemplate>| t.as_ref().unwrap().render(&messages, true, None);
        assert_eq!(
            render(&pre.chat_template).unwrap(),
            render(&full.chat_template).unwrap()
        );
    }

    #[test]
    fn hf_directory_needs_only_the_tokenizer_files() {
        let Some(full) = smollm() else { return };
        let dir = scratch_dir("preprocess-hf");
        full.tokenizer
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        let tc = json!({"eos_token": "<|im_end|>", "chat_template": "{{ messages[0].content }}!"});
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        let pre = load_preprocessor(&dir).unwrap();
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
        let dir = scratch_dir("preprocess-errors");
        assert!(matches!(
            load_preprocessor(&dir.join("missing.gguf")),
            Err(ModelError::NotFound(_))
        ));
        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"nope").unwrap();
        assert!(matches!(
            load_preprocessor(&junk),
            Err(ModelError::NotGguf(_))
        ));
        assert!(matches!(
            load_preprocessor(&dir),
            Err(ModelError::MissingFile(p)) if p.ends_with("tokenizer.json")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
