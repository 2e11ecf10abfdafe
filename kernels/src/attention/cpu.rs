//! Multi-threaded CPU paged attention (written by the kernels owner).

use super::{PagedAttention, SeqAttn};
use crate::kv_cache::KvLayout;

/// CPU implementation of [`PagedAttention`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuPagedAttention;
