//! Attention and KV-cache kernels.
//!
//! The paged KV cache stores, per layer, K and V as `[num_blocks, block_size, num_kv_heads,
//! head_dim]` f32 arrays. A sequence's tokens live in the blocks of its block table: token `p`
//! of the sequence is at slot `block_table[p / block_size] * block_size + p % block_size`.
//!
//! [`PagedAttention`] is the interface a backend implements; [`CpuPagedAttention`] is the
//! multi-threaded CPU implementation (also the oracle for future GPU backends).
//!
//! [`QuantMatrix`] multiplies f32 activations by GGUF block-quantized weights on the CPU, with
//! weight reuse across the rows of a batch and results bit-identical to candle's `QMatMul`.

pub mod attention;
pub mod kv_cache;
pub mod quant_matmul;

pub use attention::{cpu::CpuPagedAttention, PagedAttention, SeqAttn};
pub use kv_cache::{CpuKvCache, KvLayout};
pub use quant_matmul::{matmul_many, BlockFormat, QuantMatmulError, QuantMatrix};
