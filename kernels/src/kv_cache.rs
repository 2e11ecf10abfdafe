//! The memory of the paged KV cache (CPU backend): one K and one V array per layer, in one of
//! the storage types of [`KvDtype`] (the forward pass computes in f32 whatever the storage;
//! 16-bit storage halves the memory and the bytes attention reads), laid out as
//! [`crate::kv_layout`] describes.

use half::{bf16, f16};

use crate::attention::{cpu::CpuPagedAttention, PagedAttention, SeqAttn};
use crate::kv_layout::{KvDtype, KvLayout};

/// One layer's K and V arrays, mutable, in their storage type.
pub enum KvLayerMut<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
    Bf16(&'a mut [bf16], &'a mut [bf16]),
}

/// Every layer's K and V arrays of one element type.
struct Arrays<E> {
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
}

impl<E> Arrays<E> {
    /// `layers` pairs of arrays of `len` zeros, from `zeros` (which should get pages lazily
    /// zeroed by the OS: a 1 GiB cache is then not written at start-up).
    fn new(layers: usize, zeros: impl Fn() -> Vec<E>) -> Self {
        Self {
            k: (0..layers).map(|_| zeros()).collect(),
            v: (0..layers).map(|_| zeros()).collect(),
        }
    }

    fn layer(&self, layer: usize) -> (&[E], &[E]) {
        (&self.k[layer], &self.v[layer])
    }

    fn layer_mut(&mut self, layer: usize) -> (&mut [E], &mut [E]) {
        (&mut self.k[layer], &mut self.v[layer])
    }
}

enum Storage {
    F32(Arrays<f32>),
    F16(Arrays<f16>),
    Bf16(Arrays<bf16>),
}

/// K and V arrays for every layer.
pub struct CpuKvCache {
    layout: KvLayout,
    storage: Storage,
}

impl CpuKvCache {
    pub fn new(layout: KvLayout, dtype: KvDtype) -> Self {
        use half::vec::HalfBitsVecExt;
        let (n, layers) = (layout.layer_len(), layout.num_layers);
        // Zeroed u16 vectors come from the allocator's lazily zeroed pages; reinterpreted.
        let storage = match dtype {
            KvDtype::F32 => Storage::F32(Arrays::new(layers, || vec![0.0; n])),
            KvDtype::F16 => Storage::F16(Arrays::new(layers, || vec![0u16; n].reinterpret_into())),
            KvDtype::Bf16 => {
                Storage::Bf16(Arrays::new(layers, || vec![0u16; n].reinterpret_into()))
            }
        };
        Self { layout, storage }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn dtype(&self) -> KvDtype {
        match self.storage {
            Storage::F32(_) => KvDtype::F32,
            Storage::F16(_) => KvDtype::F16,
            Storage::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Writes one layer's new K and V rows (`[slots, kv_heads, head_dim]`, f32) at `slots`,
    /// converted to the storage type (see [`PagedAttention::write_kv`]).
    pub fn write_kv(&mut self, layer: usize, slots: &[usize], k: &[f32], v: &[f32]) {
        let layout = self.layout;
        let attention = CpuPagedAttention;
        match self.layer_mut(layer) {
            KvLayerMut::F32(kc, vc) => attention.write_kv(&layout, kc, vc, slots, k, v),
            KvLayerMut::F16(kc, vc) => attention.write_kv(&layout, kc, vc, slots, k, v),
            KvLayerMut::Bf16(kc, vc) => attention.write_kv(&layout, kc, vc, slots, k, v),
        }
    }

    /// One layer's attention for `seqs` with the CPU kernel (see [`PagedAttention::attend`]).
    /// Only reads the cache, so attention of several row groups can run at once.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        num_heads: usize,
        seqs: &[SeqAttn],
        scale: f32,
        out: &mut [f32],
    ) {
        let (layout, attention) = (&self.layout, CpuPagedAttention);
        match &self.storage {
            Storage::F32(a) => {
                let (k, v) = a.layer(layer);
                attention.attend(layout, k, v, q, num_heads, seqs, scale, out)
            }
            Storage::F16(a) => {
                let (k, v) = a.layer(layer);
                attention.attend(layout, k, v, q, num_heads, seqs, scale, out)
            }
            Storage::Bf16(a) => {
                let (k, v) = a.layer(layer);
                attention.attend(layout, k, v, q, num_heads, seqs, scale, out)
            }
        }
    }

    /// The bytes of `block` in layer `layer`'s K array (`v == false`) or V array: one
    /// contiguous region of `num_kv_heads × block_size × head_dim` elements (see
    /// [`crate::kv_layout`]), how tiers and transfers copy blocks.
    pub fn block_region(&self, layer: usize, v: bool, block: usize) -> &[u8] {
        let range = self.region_range(block);
        match &self.storage {
            Storage::F32(a) => as_bytes(&pick(a.layer(layer), v)[range]),
            Storage::F16(a) => as_bytes(&pick(a.layer(layer), v)[range]),
            Storage::Bf16(a) => as_bytes(&pick(a.layer(layer), v)[range]),
        }
    }

    /// A layer's whole K (`v` false) or V array: every block's region of it, in block order.
    pub fn array(&self, layer: usize, v: bool) -> &[u8] {
        match &self.storage {
            Storage::F32(a) => as_bytes(pick(a.layer(layer), v)),
            Storage::F16(a) => as_bytes(pick(a.layer(layer), v)),
            Storage::Bf16(a) => as_bytes(pick(a.layer(layer), v)),
        }
    }

    /// [`Self::block_region`], writable.
    pub fn block_region_mut(&mut self, layer: usize, v: bool, block: usize) -> &mut [u8] {
        let range = self.region_range(block);
        match &mut self.storage {
            Storage::F32(a) => as_bytes_mut(&mut pick_mut(a.layer_mut(layer), v)[range]),
            Storage::F16(a) => as_bytes_mut(&mut pick_mut(a.layer_mut(layer), v)[range]),
            Storage::Bf16(a) => as_bytes_mut(&mut pick_mut(a.layer_mut(layer), v)[range]),
        }
    }

    /// Elements of `block` in a layer's K or V array.
    fn region_range(&self, block: usize) -> std::ops::Range<usize> {
        let l = &self.layout;
        let len = l.num_kv_heads * l.block_size * l.head_dim;
        let start = l.head_region(block, 0);
        start..start + len
    }

    /// Mutable K and V of one layer.
    pub fn layer_mut(&mut self, layer: usize) -> KvLayerMut<'_> {
        match &mut self.storage {
            Storage::F32(a) => {
                let (k, v) = a.layer_mut(layer);
                KvLayerMut::F32(k, v)
            }
            Storage::F16(a) => {
                let (k, v) = a.layer_mut(layer);
                KvLayerMut::F16(k, v)
            }
            Storage::Bf16(a) => {
                let (k, v) = a.layer_mut(layer);
                KvLayerMut::Bf16(k, v)
            }
        }
    }
}

fn pick<'a, E>((k, v): (&'a [E], &'a [E]), want_v: bool) -> &'a [E] {
    if want_v {
        v
    } else {
        k
    }
}

fn pick_mut<'a, E>((k, v): (&'a mut [E], &'a mut [E]), want_v: bool) -> &'a mut [E] {
    if want_v {
        v
    } else {
        k
    }
}

/// The storage types are plain numbers (`f32`, `f16`, `bf16`: no padding, every bit pattern
/// valid), so their memory can be viewed and written as bytes.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f16 {}
impl Plain for bf16 {}

fn as_bytes<E: Plain>(x: &[E]) -> &[u8] {
    // SAFETY: `E` is a plain number type (see `Plain`); the view covers exactly `x`'s bytes
    // and borrows it.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn as_bytes_mut<E: Plain>(x: &mut [E]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any bytes written are a valid `E`.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout {
        num_layers: 2,
        num_blocks: 3,
        block_size: 4,
        num_kv_heads: 2,
        head_dim: 8,
    };

    #[test]
    fn a_block_region_is_that_block_of_every_head() {
        let mut cache = CpuKvCache::new(LAYOUT, KvDtype::F16);
        // Slot 1 of block 2 (slot 9): every head's K and V rows land in block 2's regions only.
        let k: Vec<f32> = (0..16).map(|i| i as f32 + 1.0).collect();
        cache.write_kv(1, &[9], &k, &k);
        for block in 0..3 {
            for v in [false, true] {
                let region = cache.block_region(1, v, block);
                assert_eq!(region.len(), 2 * 4 * 8 * 2);
                let nonzero = region.iter().any(|&b| b != 0);
                assert_eq!(nonzero, block == 2, "block {block} v={v}");
                assert!(cache.block_region(0, v, block).iter().all(|&b| b == 0));
            }
        }
        // Copying block 2's regions into block 0 makes them equal.
        for v in [false, true] {
            let bytes = cache.block_region(1, v, 2).to_vec();
            cache.block_region_mut(1, v, 0).copy_from_slice(&bytes);
            assert_eq!(cache.block_region(1, v, 0), &bytes[..]);
        }
    }

    #[test]
    fn caches_start_zeroed_in_their_dtype() {
        let layout = LAYOUT;
        assert_eq!(layout.bytes_per_block(KvDtype::F16), 2 * 2 * 4 * 2 * 8 * 2);
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
            let mut cache = CpuKvCache::new(layout, dtype);
            assert_eq!(cache.dtype(), dtype);
            let all_zero = match cache.layer_mut(1) {
                KvLayerMut::F32(k, v) => k.iter().chain(v.iter()).all(|x| *x == 0.0),
                KvLayerMut::F16(k, v) => k.iter().chain(v.iter()).all(|x| x.to_f32() == 0.0),
                KvLayerMut::Bf16(k, v) => k.iter().chain(v.iter()).all(|x| x.to_f32() == 0.0),
            };
            assert!(all_zero, "{dtype:?}");
        }
    }
}
