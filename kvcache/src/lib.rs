//! Paged KV-cache bookkeeping, shared by the engine and the tiers below it: the device block
//! pool, prefix-cache hashing, per-request block tables, the cache events each store produces
//! (pulled by the engine, published once per step), and the pool's layout as memory regions
//! with the block read/write interface the executor implements, and the KV connector
//! interface through which tiers and transfers take part in a step. Knows nothing of the model,
//! ZMQ, files or HTTP.

pub mod block_hash;
pub mod block_pool;
pub mod connector;
pub mod events;
pub mod layout;
pub mod manager;

pub use block_hash::{
    BlockHash, BlockHasher, ExtraKey, HashAlgo, UnknownHashAlgo, DEFAULT_NONE_HASH_SEED,
};
pub use block_pool::{BlockId, BlockPool, NoSpace};
pub use connector::{
    ConnectorRequest, ConnectorStats, Direction, ExternalHit, FinishedAction, FinishedLoad,
    FinishedRequest, KvConnector, RemoteRead, ScheduledBlocks, Transfer,
};
pub use events::{KvCacheEvent, KvEventSink, Medium, NullSink};
pub use layout::{BlockIo, BlockLayout, BlockRegion, KvPart, PoolArray};
pub use manager::{HoldId, KvCacheManager};
