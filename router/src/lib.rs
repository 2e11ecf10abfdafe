//! The router: a KV-cache-aware front for several agents (or vLLM pods). `index` keeps which pod
//! holds which prompt blocks, `events` feeds it from the pods' ZMQ KV-event streams.

pub mod config;
pub mod events;
pub mod index;
pub mod load;
pub mod metrics;
pub mod pods;
pub mod proxy;
pub mod scoring;
