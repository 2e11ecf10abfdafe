//! vLLM-compatible inference node agent: an OpenAI API server over a paged, prefix-cached
//! KV cache with continuous batching.
//!
//! Layering (each layer knows nothing of the ones above it):
//! - [`kv_cache`]: block pool, prefix-cache hashing, per-request block tables, cache events.
//! - [`model`]: model files (GGUF / HF), tokenizer, chat template, the forward pass.
//! - [`engine`]: scheduler, sampling, the engine loop and the handle the server talks to.
//! - [`server`]: HTTP (OpenAI protocol, errors, streaming); [`metrics`]: Prometheus.

pub mod cli;
pub mod engine;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod server;
