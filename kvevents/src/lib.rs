//! vLLM's KV-cache event wire format (`vllm/distributed/kv_events.py`), in one place for the
//! agent's publisher and the router's subscriber: the event types, their msgpack encodings
//! (the tagged-map form of vLLM >= 0.33 and the positional-array form of older releases), the
//! 3-frame ZMQ live message and the replay socket's frames. No sockets here.

mod decode;
mod encode;
mod error;
mod frames;
mod msgpack;
mod types;

pub use decode::decode_batch;
pub use encode::encode_batch;
pub use error::DecodeError;
pub use frames::{decode_seq, encode_seq, parse_replay_request, ReplayReply, REPLAY_END_SEQ};
pub use types::{
    BlockRemoved, BlockStored, Encoding, EventBatch, ExternalBlockHash, ExtraKey, KvEvent,
    UnknownEncoding,
};
