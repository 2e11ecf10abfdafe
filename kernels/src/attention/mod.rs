//! The paged-attention interface shared by all backends.

pub mod cpu;

use crate::kv_layout::{KvElem, KvLayout};

/// One sequence's part of a batched attention call.
///
/// The sequence's new tokens occupy rows `query_start .. query_start + query_len` of `q`/`out`.
/// Their positions are `context_len - query_len .. context_len`; their K/V must already be
/// written to the cache (see [`PagedAttention::write_kv`]). Each new token attends causally to
/// every cached position up to and including its own. A decode step is `query_len == 1`; a
/// prefill chunk after cached/earlier blocks is `query_len > 1` with `context_len > query_len`.
#[derive(Debug, Clone, Copy)]
pub struct SeqAttn<'a> {
    pub block_table: &'a [u32],
    pub context_len: usize,
    pub query_start: usize,
    pub query_len: usize,
}

/// A paged-attention backend. One call covers a whole engine step: many sequences, some
/// prefilling a chunk, some decoding.
pub trait PagedAttention {
    /// Writes K and V rows (`[num_tokens, num_kv_heads, head_dim]`) into one layer's cache at
    /// `slots[i]` (a flat slot index `block * block_size + offset`), converted to the cache's
    /// element type.
    fn write_kv<E: KvElem>(
        &self,
        layout: &KvLayout,
        k_cache: &mut [E],
        v_cache: &mut [E],
        slots: &[usize],
        k: &[f32],
        v: &[f32],
    );

    /// Computes `softmax(q·kᵀ·scale + causal mask)·v` for every sequence in `seqs`.
    /// `q` and `out` are `[num_tokens, num_heads, head_dim]`; query head `h` reads KV head
    /// `h / (num_heads / num_kv_heads)` (grouped-query attention).
    #[allow(clippy::too_many_arguments)]
    fn attend<E: KvElem>(
        &self,
        layout: &KvLayout,
        k_cache: &[E],
        v_cache: &[E],
        q: &[f32],
        num_heads: usize,
        seqs: &[SeqAttn<'_>],
        scale: f32,
        out: &mut [f32],
    );
}
