//! The device memory of the paged KV cache (CPU backend): one K and one V array per layer, in
//! one of the storage types of [`KvDtype`] (the forward pass computes in f32 whatever the
//! storage; 16-bit storage halves the memory and the bytes attention reads).
//!
//! Within a layer's array, block `b` holds one region per KV head, `block_size × head_dim`
//! elements each, at [`KvLayout::head_region`]. A V region is token-major (`[token][dim]`), a K
//! region dim-major (`[dim][token]`): the attention kernel then reads both as contiguous runs
//! and computes the scores of 8 positions per vector with no horizontal sums. A whole block
//! stays contiguous, so it moves between tiers as one piece.

use half::{bf16, f16};
use wide::f32x8;

use crate::attention::{cpu::CpuPagedAttention, PagedAttention, SeqAttn};

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
    /// Elements of K (or V) per layer.
    pub fn layer_len(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes one block occupies across all layers, K and V together, stored as `dtype`.
    pub fn bytes_per_block(&self, dtype: KvDtype) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * dtype.bytes()
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

/// How K and V are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }
}

/// An element type the cache stores: converts from the f32 the model computes and back, 8 at a
/// time for the attention kernel's vectors.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn load8(v: &[Self; 8]) -> f32x8;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn load8(v: &[Self; 8]) -> f32x8 {
        f32x8::new(*v)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn load8(v: &[Self; 8]) -> f32x8 {
        #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
        {
            use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
            let mut out = [0f32; 8];
            // SAFETY: the target has F16C (checked at compile time); 16 bytes are read from and
            // 32 written to arrays of exactly that size.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast())),
                )
            };
            f32x8::new(out)
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
        f32x8::new(v.map(f16::to_f32))
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn load8(v: &[Self; 8]) -> f32x8 {
        // bf16 is the top half of an f32: a shift, which compilers vectorize.
        f32x8::new(v.map(|x| f32::from_bits((x.to_bits() as u32) << 16)))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector load (F16C where the target has it) widens exactly like the scalar one,
    /// subnormals, infinities and signed zero included.
    fn load8_equals_scalar<E: KvElem>() {
        let values = [
            1.0,
            -2.5,
            65504.0,
            1e-7,
            -0.0,
            f32::INFINITY,
            2.5e-3,
            -1e-40,
            0.1,
            -7.0e3,
        ];
        for window in values.windows(8) {
            let v: [E; 8] = std::array::from_fn(|i| E::from_f32(window[i]));
            let scalar = v.map(|x| x.to_f32().to_bits());
            assert_eq!(E::load8(&v).to_array().map(f32::to_bits), scalar);
        }
    }

    #[test]
    fn sixteen_bit_loads() {
        load8_equals_scalar::<f16>();
        load8_equals_scalar::<bf16>();
        load8_equals_scalar::<f32>();
    }

    #[test]
    fn caches_start_zeroed_in_their_dtype() {
        let layout = KvLayout {
            num_layers: 2,
            num_blocks: 3,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
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
