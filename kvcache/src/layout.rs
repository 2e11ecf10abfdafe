//! The device KV pool as the tiers and transfers see it: each block as a list of contiguous
//! memory regions (per layer, K and V), in the spirit of Dynamo's block layouts, and the block
//! read/write interface the executor provides over its memory. Copies and registrations address
//! blocks by region; whatever backs the pool (host vectors today, device memory with CUDA)
//! stays behind [`BlockIo`].

use crate::block_pool::BlockId;

/// Which half of a layer's cache a region belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPart {
    K,
    V,
}

/// One contiguous piece of a block: `len` bytes at `offset` in layer `layer`'s `part` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRegion {
    pub layer: usize,
    pub part: KvPart,
    pub offset: usize,
    pub len: usize,
}

/// Geometry of the device KV pool. Within a layer's K or V array, block `b` is one region of
/// `num_kv_heads × block_size × head_dim` elements at `b` times that size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The storage type's name (`float16`, `bfloat16`, `float32`) and size in bytes.
    pub dtype: &'static str,
    pub dtype_bytes: usize,
}

impl BlockLayout {
    /// Bytes of one region (one layer's K or V of one block).
    pub fn region_bytes(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim * self.dtype_bytes
    }

    /// Bytes of a whole block: every layer's K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.region_bytes()
    }

    /// `block`'s regions in copy order (layer by layer, K then V); a block copied to a host
    /// buffer is these regions concatenated.
    pub fn regions(&self, block: BlockId) -> impl Iterator<Item = BlockRegion> + '_ {
        let len = self.region_bytes();
        let offset = block as usize * len;
        (0..self.num_layers).flat_map(move |layer| {
            [KvPart::K, KvPart::V].map(|part| BlockRegion {
                layer,
                part,
                offset,
                len,
            })
        })
    }
}

/// Where one of the pool's arrays lies (a layer's K or V: that part of every block, block `b`'s
/// region at `b × region_bytes`), for a transport to register it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolArray {
    pub layer: usize,
    pub part: KvPart,
    pub addr: usize,
    pub len: usize,
    /// In device memory (a GPU executor's), not host memory.
    pub device: bool,
}

/// Whole blocks of the device pool copied to and from host buffers of
/// [`BlockLayout::block_bytes`] bytes (the regions concatenated in [`BlockLayout::regions`]
/// order). The executor implements it over its memory.
pub trait BlockIo {
    fn layout(&self) -> &BlockLayout;
    /// Copies `block` into `out` (`out.len() == block_bytes`).
    fn read_block(&self, block: BlockId, out: &mut [u8]);
    /// Copies `data` (`block_bytes` long) into `block`.
    fn write_block(&mut self, block: BlockId, data: &[u8]);
    /// The pool's arrays in [`BlockLayout::regions`] order (layer by layer, K then V). Their
    /// memory stays put for the pool's life.
    fn arrays(&self) -> Vec<PoolArray>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_cover_a_block_layer_by_layer() {
        let layout = BlockLayout {
            num_layers: 3,
            num_blocks: 10,
            block_size: 16,
            num_kv_heads: 3,
            head_dim: 64,
            dtype: "float16",
            dtype_bytes: 2,
        };
        // The default model's figure (README): 2 × 30 × 16 × 3 × 64 × 2 bytes per block.
        assert_eq!(
            BlockLayout {
                num_layers: 30,
                ..layout.clone()
            }
            .block_bytes(),
            368_640
        );
        let regions: Vec<BlockRegion> = layout.regions(4).collect();
        assert_eq!(regions.len(), 6);
        assert_eq!(
            regions.iter().map(|r| r.len).sum::<usize>(),
            layout.block_bytes()
        );
        assert_eq!(
            regions[3],
            BlockRegion {
                layer: 1,
                part: KvPart::V,
                offset: 4 * 6144,
                len: 6144
            }
        );
    }
}
