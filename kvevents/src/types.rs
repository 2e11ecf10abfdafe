//! The event types as they travel (vLLM's msgspec structs `EventBatch`, `BlockStored`,
//! `BlockRemoved`, `AllBlocksCleared`).

use std::fmt;
use std::str::FromStr;

/// A block hash as events carry it: the 64-bit form (last 8 digest bytes, big-endian; vLLM's
/// default) or the full digest as msgpack bin (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExternalBlockHash {
    Int(u64),
    Bytes(Vec<u8>),
}

/// One element of a block's extra-keys tuple (LoRA name, cache salt, multimodal hashes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    Str(String),
    Int(i64),
    Bytes(Vec<u8>),
}

/// Full blocks that entered the cache, in chain order; `token_ids` holds
/// `block_hashes.len() * block_size` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<ExternalBlockHash>,
    pub parent_block_hash: Option<ExternalBlockHash>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// Per block: its extra keys (None for a block without). Omitted when no block has any.
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    pub group_idx: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<ExternalBlockHash>,
    pub medium: Option<String>,
    pub group_idx: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    AllBlocksCleared,
    /// An event type this crate does not know (a newer vLLM); consumers skip it.
    Unknown(String),
}

impl KvEvent {
    /// The msgspec tag: the struct's class name.
    pub fn tag(&self) -> &str {
        match self {
            Self::BlockStored(_) => "BlockStored",
            Self::BlockRemoved(_) => "BlockRemoved",
            Self::AllBlocksCleared => "AllBlocksCleared",
            Self::Unknown(tag) => tag,
        }
    }
}

/// What one engine step changed. `ts` is seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

/// How events are laid out inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// A msgpack map per event with the tag under `"type"` (vLLM >= 0.33).
    #[default]
    Map,
    /// A positional msgpack array per event, tag first (vLLM <= 0.23).
    Array,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown event encoding {0:?} (expected \"map\" or \"array\")")]
pub struct UnknownEncoding(pub String);

impl FromStr for Encoding {
    type Err = UnknownEncoding;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "map" => Ok(Self::Map),
            "array" => Ok(Self::Array),
            other => Err(UnknownEncoding(other.to_string())),
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Map => "map",
            Self::Array => "array",
        })
    }
}
