//! Layout and element types of the paged KV cache, shared by the kernels that read it and the
//! storage that holds it. Within a layer's K or V array, block `b` holds one region per KV head,
//! `block_size × head_dim` elements each, at [`KvLayout::head_region`]. A V region is token-major
//! (`[token][dim]`), a K region dim-major (`[dim][token]`): the attention kernel then reads both
//! as contiguous runs and computes the scores of 8 positions per vector with no horizontal sums.
//! A whole block stays contiguous, so it moves between tiers as one piece.

use half::{bf16, f16};
use wide::f32x8;

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
}
