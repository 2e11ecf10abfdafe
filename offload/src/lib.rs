//! KV tiers below the device pool, as KV connectors (see `kvcache::connector`).
//!
//! - [`host_store`]: an LRU store of whole blocks in host memory, keyed by block hash.
//! - [`cpu`]: the CPU tier (vLLM's native offloading): prompt blocks stored as they complete,
//!   read back into the device pool on a device miss.

pub mod cpu;
pub mod host_store;

pub use cpu::{CpuOffloadConfig, CpuOffloadConnector};
pub use host_store::HostStore;
