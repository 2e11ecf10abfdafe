//! Attention, KV-cache and quantized-matmul kernels, and the thread pool they run on.
//!
//! The paged KV cache stores, per layer, K and V as arrays of `num_blocks` blocks in f32, f16
//! or bf16 ([`KvDtype`]), each block one region per KV head (K dim-major, V token-major: see
//! [`KvLayout::head_region`]).
//! A sequence's tokens live in the blocks of its block table: token `p` of the sequence is at
//! slot `block_table[p / block_size] * block_size + p % block_size`.
//!
//! [`PagedAttention`] is the interface a backend implements; [`CpuPagedAttention`] is the
//! multi-threaded CPU implementation (also the oracle for future GPU backends).
//!
//! [`QuantMatrix`] multiplies f32 activations by GGUF block-quantized weights on the CPU, with
//! weight reuse across the rows of a batch, results independent of the batch and equal to
//! candle's `QMatMul` up to float rounding.
//!
//! [`pool`] runs the kernels' parallel loops on spinning helper threads (a fork costs about a
//! microsecond, where waking sleeping threads cost 50-100 µs on a VM).

pub mod attention;
pub mod kv_cache;
pub mod kv_layout;
pub mod pool;
pub mod quant_matmul;

pub use attention::{cpu::CpuPagedAttention, PagedAttention, SeqAttn};
pub use kv_cache::{CpuKvCache, KvLayerMut};
pub use kv_layout::{KvDtype, KvElem, KvLayout};
pub use quant_matmul::{matmul_many, BlockFormat, QuantMatmulError, QuantMatrix};
