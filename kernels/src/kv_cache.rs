//! The device memory of the paged KV cache (CPU backend): one K and one V array per layer.

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
