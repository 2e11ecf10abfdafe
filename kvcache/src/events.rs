//! KV-cache events (vLLM `distributed/kv_events.py`): what a block store (the device pool, a
//! tier below it) announces when a block enters or leaves it, and the sink the engine
//! publishes each step's batch to.

use crate::block_hash::{BlockHash, ExtraKey};

/// Storage tier a block lives in. The device pool reports `Gpu`, as vLLM does, even when the
/// "device" is host memory: consumers key the primary tier on that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    Gpu,
    Cpu,
    Storage,
}

impl Medium {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
            Self::Storage => "STORAGE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Full blocks that became cached, in chain order. `parent_block_hash` is the hash of the
    /// block before the first one (None for a chain that starts at the first block);
    /// `token_ids.len() == block_hashes.len() * block_size`.
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<u32>,
        block_size: usize,
        lora_name: Option<String>,
        /// Per block, the extra keys its hash covered (the cache salt of a request's first
        /// block); None when no block in the event has any.
        extra_keys: Option<Vec<Vec<ExtraKey>>>,
        medium: Medium,
    },
    /// Blocks whose hashes left the cache (evicted for reuse).
    BlockRemoved {
        block_hashes: Vec<BlockHash>,
        medium: Medium,
    },
    /// The whole prefix cache was dropped.
    AllBlocksCleared,
}

/// Where the engine publishes each step's cache changes: one call per step that changed
/// anything, the device pool's events followed by each connector's (the ZMQ publisher
/// implements it).
pub trait KvEventSink: Send {
    fn publish(&mut self, batch: Vec<KvCacheEvent>);
}

/// Discards every batch (events disabled).
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

impl KvEventSink for NullSink {
    fn publish(&mut self, _batch: Vec<KvCacheEvent>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medium_names() {
        assert_eq!(Medium::Gpu.as_str(), "GPU");
        assert_eq!(Medium::Cpu.as_str(), "CPU");
        assert_eq!(Medium::Storage.as_str(), "STORAGE");
    }
}
