//! Engine settings derived from the command line.

use kernels::KvDtype;

use kvcache::HashAlgo;

/// How the engine sizes its KV cache and batches.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// Blocks in the KV pool (derived from `--kv-cache-memory-bytes`).
    pub num_blocks: usize,
    /// How the cache stores K and V (`--kv-cache-dtype`, `--dtype`).
    pub kv_dtype: KvDtype,
    /// Most sequences in one step (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Most tokens in one step (`--max-num-batched-tokens`); longer prompts are prefilled in chunks.
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output (`--max-model-len`).
    pub max_model_len: usize,
    pub enable_prefix_caching: bool,
    pub hash_algo: HashAlgo,
    /// `PYTHONHASHSEED`, when set: seeds the prefix-cache hash as in vLLM.
    pub hash_seed: Option<String>,
    /// One info line per request as it arrives and as it ends (`--enable-log-requests`).
    pub log_requests: bool,
}
