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
