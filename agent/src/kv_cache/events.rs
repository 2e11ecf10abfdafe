//! KV-cache events (vLLM `distributed/kv_events.py`): what the block pool announces when a
//! block enters or leaves the prefix cache, and the sink trait publishers implement.

use std::sync::{Arc, Mutex, PoisonError};

use super::block_hash::{BlockHash, ExtraKey};

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

/// Receives cache events as they happen; `end_step` closes one engine step's batch.
pub trait KvEventSink: Send {
    fn on_event(&mut self, event: KvCacheEvent);
    fn end_step(&mut self) {}
}

/// Discards every event (events disabled).
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

impl KvEventSink for NullSink {
    fn on_event(&mut self, _event: KvCacheEvent) {}
}

/// Keeps events in memory. Clones share one buffer, so a test can hand a clone to the pool and
/// read events through the other.
#[derive(Debug, Clone, Default)]
pub struct CollectingSink {
    inner: Arc<Mutex<Collected>>,
}

#[derive(Debug, Default)]
struct Collected {
    events: Vec<KvCacheEvent>,
    steps: usize,
}

impl CollectingSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events received since the last `take`, oldest first.
    pub fn take(&self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.lock().events)
    }

    /// Number of `end_step` calls so far.
    pub fn steps(&self) -> usize {
        self.lock().steps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        // The data is a plain Vec: still consistent if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KvEventSink for CollectingSink {
    fn on_event(&mut self, event: KvCacheEvent) {
        self.lock().events.push(event);
    }

    fn end_step(&mut self) {
        self.lock().steps += 1;
    }
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

    #[test]
    fn collecting_sink_shares_its_buffer_between_clones() {
        let reader = CollectingSink::new();
        let mut boxed: Box<dyn KvEventSink> = Box::new(reader.clone());
        boxed.on_event(KvCacheEvent::AllBlocksCleared);
        boxed.on_event(KvCacheEvent::BlockRemoved {
            block_hashes: vec![],
            medium: Medium::Cpu,
        });
        boxed.end_step();
        assert_eq!(reader.steps(), 1);
        assert_eq!(
            reader.take(),
            vec![
                KvCacheEvent::AllBlocksCleared,
                KvCacheEvent::BlockRemoved {
                    block_hashes: vec![],
                    medium: Medium::Cpu
                },
            ]
        );
        assert!(reader.take().is_empty());
        let mut null = NullSink;
        null.on_event(KvCacheEvent::AllBlocksCleared);
        null.end_step();
    }
}
