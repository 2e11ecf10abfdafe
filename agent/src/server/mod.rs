//! HTTP server: the OpenAI-compatible API as vLLM serves it (routes, errors in vLLM's shape,
//! SSE streaming, /metrics).
//!
//! Request flow: [`extract`] reads the body like FastAPI + pydantic (the `protocol` crate's
//! types), [`validation`] and [`prepare`] check it and build engine parameters, [`generate`] fans the
//! sequences out to the engine, and [`completions`] / [`chat`] shape the JSON or SSE
//! ([`streaming`]) answer. [`routes`] assembles the router.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod errors;
pub mod extract;
pub mod generate;
pub mod logprobs;
pub mod prefill_leg;
pub mod prepare;
pub mod response;
pub mod responses;
pub mod routes;
pub mod state;
pub mod streaming;
pub mod tokenize;
pub mod validation;

#[cfg(test)]
pub(crate) mod test_support;

pub use routes::router;
pub use state::{system_fingerprint, AppState, ServerConfig};
