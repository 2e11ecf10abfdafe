//! Errors reading a model path's files: what is missing, unreadable or malformed, named by path.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
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
