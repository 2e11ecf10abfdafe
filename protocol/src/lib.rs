//! The OpenAI-compatible API as vLLM speaks it, shared by the agent (which serves it) and the
//! router (which reads requests to route them and answers in the same error shape).
//!
//! - [`request`]: request bodies ([`fields`]: pydantic-style lax scalars and field errors).
//! - [`body`]: bytes → typed request with vLLM's 400s; [`raw`]: its "before" validators.
//! - [`response`]: response bodies, field order as vLLM's; [`responses`]: the Responses API.
//! - [`error`]: [`ApiError`], the `{"error": {...}}` body and its HTTP status.
//! - [`python`]: Python's spelling of values inside messages.
//! - [`sse`]: the event-stream framing of streamed responses.
//!
//! No HTTP server, no engine, no model: only wire types and the rules that read them.

pub mod body;
pub mod error;
pub mod fields;
pub mod paths;
pub mod python;
pub mod raw;
pub mod request;
pub mod response;
pub mod responses;
pub mod sse;

pub use error::ApiError;
