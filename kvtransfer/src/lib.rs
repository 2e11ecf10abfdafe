//! KV blocks moved between pods for prefill/decode disaggregation: thin UCX bindings, the
//! transfer thread, the side channel, pinned-block leases, the wire types, and the P/D KV
//! connector the agent plugs in.

pub mod connector;
pub mod leases;
pub mod side_channel;
pub mod transfer;
pub mod ucx;
pub mod wire;

pub use connector::{KvRole, PdConfig, PdConnector};
