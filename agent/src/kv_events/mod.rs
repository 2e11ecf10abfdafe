//! Publishing the block pool's cache events in vLLM's wire format (reference §5): the
//! `--kv-events-config` flag and the ZMQ publisher behind the pool's event sink.

pub mod config;
pub mod publisher;

pub use config::{HashForm, KvEventsConfig, KvEventsConfigError, PublisherKind};
pub use publisher::{start, PublisherEndpoints, PublisherError, ZmqEventSink};
