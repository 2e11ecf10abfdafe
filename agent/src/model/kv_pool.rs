//! The CPU executor's KV pool: the kernels' [`CpuKvCache`] that the forward pass writes and
//! attends over, seen by tiers and transfers as a `kvcache::BlockIo` (whole blocks to and from
//! host buffers, region by region).

use kernels::{CpuKvCache, KvDtype, KvLayout};
use kvcache::{BlockId, BlockIo, BlockLayout, KvPart, PoolArray};

pub struct CpuKvPool {
    cache: CpuKvCache,
    layout: BlockLayout,
}

/// The pool's geometry as the tiers and transfers see it.
pub fn block_layout(layout: &KvLayout, dtype: KvDtype) -> BlockLayout {
    BlockLayout {
        num_layers: layout.num_layers,
        num_blocks: layout.num_blocks,
        block_size: layout.block_size,
        num_kv_heads: layout.num_kv_heads,
        head_dim: layout.head_dim,
        dtype: dtype_name(dtype),
        dtype_bytes: dtype.bytes(),
    }
}

impl CpuKvPool {
    pub fn new(layout: KvLayout, dtype: KvDtype) -> Self {
        Self {
            layout: block_layout(&layout, dtype),
            cache: CpuKvCache::new(layout, dtype),
        }
    }

    /// The cache the forward pass runs on.
    pub fn cache_mut(&mut self) -> &mut CpuKvCache {
        &mut self.cache
    }
}

/// vLLM's names of the storage types.
fn dtype_name(dtype: KvDtype) -> &'static str {
    match dtype {
        KvDtype::F32 => "float32",
        KvDtype::F16 => "float16",
        KvDtype::Bf16 => "bfloat16",
    }
}

impl BlockIo for CpuKvPool {
    fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    fn read_block(&self, block: BlockId, out: &mut [u8]) {
        let mut at = 0;
        for r in self.layout.regions(block) {
            let src = self
                .cache
                .block_region(r.layer, r.part == KvPart::V, block as usize);
            out[at..at + r.len].copy_from_slice(src);
            at += r.len;
        }
    }

    fn write_block(&mut self, block: BlockId, data: &[u8]) {
        let mut at = 0;
        for r in self.layout.regions(block) {
            let dst = self
                .cache
                .block_region_mut(r.layer, r.part == KvPart::V, block as usize);
            dst.copy_from_slice(&data[at..at + r.len]);
            at += r.len;
        }
    }

    fn arrays(&self) -> Vec<PoolArray> {
        (0..self.layout.num_layers)
            .flat_map(|layer| {
                [KvPart::K, KvPart::V].map(|part| {
                    let bytes = self.cache.array(layer, part == KvPart::V);
                    PoolArray {
                        layer,
                        part,
                        addr: bytes.as_ptr() as usize,
                        len: bytes.len(),
                        device: false,
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_round_trips_through_host_memory() {
        let layout = KvLayout {
            num_layers: 2,
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let mut pool = CpuKvPool::new(layout, KvDtype::Bf16);
        let rows: Vec<f32> = (0..16).map(|i| i as f32 - 3.5).collect();
        for layer in 0..2 {
            // Slots 2 and 3: block 1.
            pool.cache_mut().write_kv(
                layer,
                &[2, 3],
                &[rows.clone(), rows.clone()].concat(),
                &[rows.clone(), rows.clone()].concat(),
            );
        }
        let n = pool.layout().block_bytes();
        assert_eq!(n, 2 * 2 * 2 * 2 * 8 * 2);
        let mut saved = vec![0u8; n];
        pool.read_block(1, &mut saved);
        assert!(saved.iter().any(|&b| b != 0));
        let mut empty = vec![0u8; n];
        pool.read_block(3, &mut empty);
        assert!(empty.iter().all(|&b| b == 0));
        pool.write_block(3, &saved);
        pool.read_block(3, &mut empty);
        assert_eq!(empty, saved);
    }
}
