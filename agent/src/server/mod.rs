//! HTTP server: the OpenAI-compatible API, errors in vLLM's shape, streaming, /metrics.

pub mod errors;
pub mod protocol;
