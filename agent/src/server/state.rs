//! What every handler shares: the engine handle, tokenizer, chat template, metrics and the
//! server settings taken from the command line.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prompt::{ChatTemplate, Tokenizer};
use protocol::ApiError;
use sha2::{Digest, Sha256};

use crate::engine::{EngineHandle, Pooling};
use crate::metrics::Metrics;

/// Server settings (from the command line and the loaded model).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--served-model-name` values; the first is the name responses carry.
    pub served_model_names: Vec<String>,
    /// The model path as given on the command line (`root` in `/v1/models`).
    pub model_root: String,
    pub max_model_len: usize,
    /// Most logprobs a request may ask for (`--max-logprobs`, vLLM's default 20).
    pub max_logprobs: usize,
    /// `--api-key` values; empty means no authentication.
    pub api_keys: Vec<String>,
    pub enable_prompt_tokens_details: bool,
    pub enable_force_include_usage: bool,
    /// `system_fingerprint` of responses.
    pub system_fingerprint: Option<String>,
    /// Largest request body accepted; larger ones get a 413.
    pub max_body_bytes: usize,
    /// How `/v1/embeddings` pools (`--pooler-config`).
    pub pooling: Pooling,
}

/// Shared handler state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServerConfig>,
    /// For the prefill leg this pod runs when a request names a prefill pod.
    pub http: reqwest::Client,
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        chat_template: Option<Arc<ChatTemplate>>,
        metrics: Arc<Metrics>,
        config: ServerConfig,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            chat_template,
            metrics,
            config: Arc::new(config),
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The model name responses carry.
    pub fn model_name(&self) -> &str {
        self.config
            .served_model_names
            .first()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// vLLM's `_check_model`: an absent or empty `model` means the served one.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None | Some("") => Ok(()),
            Some(m) if self.config.served_model_names.iter().any(|n| n == m) => Ok(()),
            Some(m) => Err(ApiError::model_not_found(m)),
        }
    }

    /// The checks every generation request passes before its own validation: the model is
    /// served, the engine is alive, and no unsupported field is set.
    pub fn admit(&self, common: &protocol::request::CommonFields) -> Result<(), ApiError> {
        self.check_model(common.model.as_ref().map(|m| m.0.as_str()))?;
        if !self.engine.is_alive() {
            return Err(ApiError::engine_dead());
        }
        super::validation::check_unsupported(common)
    }
}

/// Seconds since the Unix epoch (`created`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// vLLM's `hash` fingerprint mode, `<name>-<version>-<first 8 hex of a config hash>`: clients can
/// tell when the serving configuration changed.
pub fn system_fingerprint(config_summary: &str) -> String {
    let digest = Sha256::digest(config_summary.as_bytes());
    let hash8: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("agent-{}-{hash8}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_config() {
        let a = system_fingerprint("model=a block_size=16");
        assert!(a.starts_with(&format!("agent-{}-", env!("CARGO_PKG_VERSION"))));
        assert_eq!(
            a.len(),
            format!("agent-{}-", env!("CARGO_PKG_VERSION")).len() + 8
        );
        assert_eq!(a, system_fingerprint("model=a block_size=16"));
        assert_ne!(a, system_fingerprint("model=a block_size=32"));
    }
}
