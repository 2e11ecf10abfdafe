//! The inference engine: scheduler, sampling, detokenization, the engine loop and the handle
//! the server talks to. Knows nothing of HTTP.

pub mod types;

pub use types::*;
