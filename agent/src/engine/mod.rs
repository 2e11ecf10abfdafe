//! The inference engine: scheduler, sampling, detokenization, the engine loop and the handle
//! the server talks to. Knows nothing of HTTP.

pub mod config;
mod core;
pub mod detokenizer;
pub mod handle;
mod outbox;
mod request;
pub mod sampling;
mod scheduler;
pub mod stop_checker;
pub mod types;

pub use config::EngineConfig;
pub use core::start;
pub use handle::{EngineHandle, RequestStream, TierBlocks};
pub use types::*;
