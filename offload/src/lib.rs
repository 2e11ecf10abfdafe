//! KV tiers below the device pool, as KV connectors (see `kvcache::connector`).
//!
//! - [`host_store`]: an LRU store of whole blocks in host memory, keyed by block hash.
//! - [`cpu`]: the CPU tier (vLLM's native offloading): prompt blocks stored as they complete,
//!   read back into the device pool on a device miss.
//! - [`files`]: the storage tier's block files (fingerprinted folder, checksummed, atomic).
//! - [`storage`]: the storage tier's reader and writer threads over those files.

pub mod cpu;
pub mod files;
pub mod host_store;
pub mod storage;

pub use cpu::{CpuOffloadConfig, CpuOffloadConnector};
pub use host_store::HostStore;
pub use storage::{FsTierConfig, StorageTier};
