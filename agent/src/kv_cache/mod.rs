//! Paged KV-cache bookkeeping: block pool, prefix-cache hashing, per-request block tables, cache events.

pub mod block_hash;
pub mod block_pool;
pub mod events;
pub mod manager;

pub use block_hash::{
    BlockHash, BlockHasher, ExtraKey, HashAlgo, UnknownHashAlgo, DEFAULT_NONE_HASH_SEED,
};
pub use block_pool::{BlockId, BlockPool, NoSpace};
pub use events::{CollectingSink, KvCacheEvent, KvEventSink, Medium, NullSink};
pub use manager::KvCacheManager;
