//! Helpers shared by the index test crates: an engine's own block hash chain (any function of
//! the chain that differs from the router's keys) and BlockStored events as engines send them.

// Each test crate uses a subset of these.
#![allow(dead_code)]

use kvevents::{BlockStored, ExternalBlockHash};

/// An engine's hash of a block after `parent`.
pub fn engine_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = parent.unwrap_or(0x5eed) ^ 0xdead_beef;
    for &t in tokens {
        h = (h ^ u64::from(t))
            .wrapping_mul(0x100_0000_01b3)
            .rotate_left(17);
    }
    h
}

/// Engine hashes of the full blocks of `tokens`.
pub fn engine_chain(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            let h = engine_hash(parent, b);
            parent = Some(h);
            h
        })
        .collect()
}

/// A plain BlockStored (no LoRA, no extra keys); `token_ids` empty for offloaded copies.
pub fn block_stored(
    block_hashes: Vec<ExternalBlockHash>,
    parent_block_hash: Option<ExternalBlockHash>,
    token_ids: Vec<u32>,
    block_size: usize,
    medium: Option<&str>,
) -> BlockStored {
    BlockStored {
        block_hashes,
        parent_block_hash,
        token_ids,
        block_size: block_size as u32,
        lora_id: None,
        medium: medium.map(str::to_string),
        lora_name: None,
        extra_keys: None,
        group_idx: None,
    }
}
