//! vLLM-compatible inference node agent: an OpenAI API server over a paged, prefix-cached
//! KV cache with continuous batching.
//!
//! Layering (each layer knows nothing of the ones above it):
//! - `kvcache` (its own crate): block pool, prefix-cache hashing, block tables, cache events.
//! - [`model`]: weights from GGUF / HF files and the forward pass (the tokenizer and chat
//!   template come from the `prompt` crate).
//! - [`engine`]: scheduler, sampling, the engine loop and the handle the server talks to.
//! - [`server`]: HTTP (OpenAI protocol, errors, streaming); [`metrics`]: Prometheus;
//!   [`stats_log`]: vLLM's periodic stats line, from the metrics.

pub mod cli;
pub mod engine;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod server;
pub mod stats_log;
