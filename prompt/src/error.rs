//! Errors reading a model path's files: what is missing, unreadable or malformed, named by path.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error(
        "model {id} is not in the Hugging Face cache at {} ({why}); this server does not \
         download: fetch it where the hub is reachable (`huggingface-cli download {id}` with \
         HF_HUB_CACHE or HF_HOME pointing at this cache) or give the model's directory or \
         .gguf file",
        cache.display()
    )]
    NotCached {
        id: String,
        cache: PathBuf,
        why: String,
    },
    #[error(
        "{} holds several GGUF files ({}): give one of them as MODEL",
        dir.display(),
        files.join(", ")
    )]
    AmbiguousGguf { dir: PathBuf, files: Vec<String> },
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF file (no GGUF magic at its start)")]
    NotGguf(PathBuf),
    #[error("malformed {path}: {reason}")]
    MalformedConfig { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
}

impl LoadError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub fn malformed(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::MalformedConfig {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
