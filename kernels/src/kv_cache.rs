//! The device memory of the paged KV cache (CPU backend): one K and one V array per layer.
//!
//! Within a layer's array, block `b` holds one region per KV head, `block_size × head_dim`
//! floats each, at [`KvLayout::head_region`]. A V region is token-major (`[token][dim]`), a K
//! region dim-major (`[dim][token]`): the attention kernel then reads both as contiguous runs
//! and computes the scores of 8 positions per vector with no horizontal sums. A whole block
//! stays contiguous, so it moves between tiers as one piece.

/// Geometry of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// f32 elements of K (or V) per layer.
    pub fn layer_len(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes one block occupies across all layers, K and V together.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * std::mem::size_of::<f32>()
    }

    /// Elements of one token's K (or V) row: `num_kv_heads * head_dim`.
    pub fn token_stride(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Start of `kv_head`'s region of `block` in a layer's K or V array.
    pub fn head_region(&self, block: usize, kv_head: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.block_size * self.head_dim
    }

    /// Where element `dim` of `kv_head` for cache slot `slot` (`block * block_size + offset`)
    /// lives: `(k_index, v_index)`.
    pub fn slot_index(&self, slot: usize, kv_head: usize, dim: usize) -> (usize, usize) {
        let (block, offset) = (slot / self.block_size, slot % self.block_size);
        let region = self.head_region(block, kv_head);
        (
            region + dim * self.block_size + offset,
            region + offset * self.head_dim + dim,
        )
    }
}

/// K and V arrays for every layer. Zero-initialised lazily by the OS (`vec![0.0; n]`).
pub struct CpuKvCache {
    layout: KvLayout,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    pub fn new(layout: KvLayout) -> Self {
        let n = layout.layer_len();
        Self {
            layout,
            k: (0..layout.num_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..layout.num_layers).map(|_| vec![0.0; n]).collect(),
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Mutable K and V of one layer.
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }
}
