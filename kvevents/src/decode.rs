//! Batch decoding that accepts what any vLLM release sends: events as tagged maps (any key
//! order) or positional arrays, hashes as integers or bin, fields missing at the end (older
//! releases) and fields or event types it does not know (newer ones, skipped).

use crate::error::DecodeError;
use crate::msgpack::Reader;
use crate::types::{BlockRemoved, BlockStored, EventBatch, ExternalBlockHash, ExtraKey, KvEvent};

/// Decodes the msgpack payload of one live message or replayed batch.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut r = Reader::new(payload);
    let n = r.array()?;
    if n < 2 {
        return Err(DecodeError::Missing("EventBatch.events"));
    }
    let ts = r.float()?;
    let num_events = r.array()?;
    let mut events = Vec::with_capacity(num_events.min(payload.len()));
    for _ in 0..num_events {
        events.push(event(&mut r)?);
    }
    let data_parallel_rank = if n >= 3 {
        opt_i64(&mut r, "data_parallel_rank")?
    } else {
        None
    };
    for _ in 3..n {
        r.skip()?;
    }
    if !r.is_at_end() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

/// Field values gathered from either layout before the event is built.
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<ExternalBlockHash>>,
    parent_block_hash: Option<ExternalBlockHash>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<i64>,
    medium: Option<String>,
    lora_name: Option<String>,
    extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    group_idx: Option<i64>,
}

const STORED_ORDER: [&str; 9] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
];
const REMOVED_ORDER: [&str; 3] = ["block_hashes", "medium", "group_idx"];

fn event(r: &mut Reader<'_>) -> Result<KvEvent, DecodeError> {
    let mut f = Fields::default();
    let tag;
    if r.is_map()? {
        let n = r.map()?;
        let mut found = None;
        for _ in 0..n {
            match r.str()? {
                "type" => found = Some(r.str()?.to_string()),
                key => field(r, &mut f, key)?,
            }
        }
        tag = found.ok_or(DecodeError::Missing("event \"type\""))?;
    } else {
        let n = r.array()?;
        if n == 0 {
            return Err(DecodeError::Missing("event tag"));
        }
        tag = r.str()?.to_string();
        let order: &[&str] = match tag.as_str() {
            "BlockStored" => &STORED_ORDER,
            "BlockRemoved" => &REMOVED_ORDER,
            _ => &[],
        };
        for i in 1..n {
            match order.get(i - 1) {
                Some(key) => field(r, &mut f, key)?,
                None => r.skip()?,
            }
        }
    }
    Ok(match tag.as_str() {
        "BlockStored" => KvEvent::BlockStored(BlockStored {
            block_hashes: f.block_hashes.ok_or(DecodeError::Missing("block_hashes"))?,
            parent_block_hash: f.parent_block_hash,
            token_ids: f.token_ids.ok_or(DecodeError::Missing("token_ids"))?,
            block_size: f.block_size.ok_or(DecodeError::Missing("block_size"))?,
            lora_id: f.lora_id,
            medium: f.medium,
            lora_name: f.lora_name,
            extra_keys: f.extra_keys,
            group_idx: f.group_idx,
        }),
        "BlockRemoved" => KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: f.block_hashes.ok_or(DecodeError::Missing("block_hashes"))?,
            medium: f.medium,
            group_idx: f.group_idx,
        }),
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        _ => KvEvent::Unknown(tag),
    })
}

/// Reads the value of field `key` into `f`; unknown keys are skipped.
fn field(r: &mut Reader<'_>, f: &mut Fields, key: &str) -> Result<(), DecodeError> {
    match key {
        "block_hashes" => {
            let n = r.array()?;
            let mut hs = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                hs.push(hash(r)?);
            }
            f.block_hashes = Some(hs);
        }
        "parent_block_hash" => f.parent_block_hash = if r.nil()? { None } else { Some(hash(r)?) },
        "token_ids" => {
            let n = r.array()?;
            let mut ids = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                ids.push(u32::try_from(r.int()?).map_err(|_| DecodeError::OutOfRange("token id"))?);
            }
            f.token_ids = Some(ids);
        }
        "block_size" => {
            f.block_size =
                Some(u32::try_from(r.int()?).map_err(|_| DecodeError::OutOfRange("block_size"))?)
        }
        "lora_id" => f.lora_id = opt_i64(r, "lora_id")?,
        "medium" => f.medium = opt_string(r)?,
        "lora_name" => f.lora_name = opt_string(r)?,
        "extra_keys" => f.extra_keys = if r.nil()? { None } else { Some(extra_keys(r)?) },
        "group_idx" => f.group_idx = opt_i64(r, "group_idx")?,
        _ => r.skip()?,
    }
    Ok(())
}

fn hash(r: &mut Reader<'_>) -> Result<ExternalBlockHash, DecodeError> {
    if r.is_bin()? {
        return Ok(ExternalBlockHash::Bytes(r.bin()?.to_vec()));
    }
    // Python ints are unbounded; vLLM's are 64-bit, sent as uint64 (or a signed form of it).
    let v = r.int()?;
    let v = u64::try_from(v)
        .or_else(|_| i64::try_from(v).map(|s| s as u64))
        .map_err(|_| DecodeError::OutOfRange("block hash"))?;
    Ok(ExternalBlockHash::Int(v))
}

fn opt_i64(r: &mut Reader<'_>, what: &'static str) -> Result<Option<i64>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    i64::try_from(r.int()?)
        .map(Some)
        .map_err(|_| DecodeError::OutOfRange(what))
}

fn opt_string(r: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    if r.nil()? {
        return Ok(None);
    }
    Ok(Some(r.str()?.to_string()))
}

fn extra_keys(r: &mut Reader<'_>) -> Result<Vec<Option<Vec<ExtraKey>>>, DecodeError> {
    let n = r.array()?;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        if r.nil()? {
            out.push(None);
            continue;
        }
        let m = r.array()?;
        let mut items = Vec::with_capacity(m.min(64));
        for _ in 0..m {
            items.push(if r.is_str()? {
                ExtraKey::Str(r.str()?.to_string())
            } else if r.is_bin()? {
                ExtraKey::Bytes(r.bin()?.to_vec())
            } else if r.is_int()? {
                ExtraKey::Int(
                    i64::try_from(r.int()?).map_err(|_| DecodeError::OutOfRange("extra key"))?,
                )
            } else {
                // Keys of other shapes (nested tuples of multimodal features) are kept out.
                r.skip()?;
                continue;
            });
        }
        out.push(Some(items));
    }
    Ok(out)
}
