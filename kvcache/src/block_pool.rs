//! The fixed pool of KV-cache blocks (vLLM `v1/core/block_pool.py`): reference counts, the free
//! queue in eviction order, and the prefix cache (block hash -> block). Every change to the set
//! of cached blocks becomes an event the engine pulls ([`BlockPool::take_events`]): a block is
//! announced once when it becomes a cached full block and retracted once when its hash leaves
//! the cache. The pool is the device tier: its events carry `medium` GPU.

use std::collections::HashMap;

use crate::block_hash::{BlockHash, ExtraKey};
use crate::events::{KvCacheEvent, Medium};

/// Index of a block in the pool (and in the KV tensors), `0..num_blocks`.
pub type BlockId = u32;

/// Not enough free blocks for an allocation; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("out of KV-cache blocks: {needed} needed, {available} available")]
pub struct NoSpace {
    pub needed: usize,
    pub available: usize,
}

/// Doubly linked list of free block ids threaded through two arrays, so that a prefix-cache
/// hit can take a block out of the middle in O(1) (vLLM `FreeKVCacheBlockQueue`). Index
/// `num_blocks` is a sentinel: its `next` is the head, its `prev` the tail.
struct FreeQueue {
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
    len: usize,
}

impl FreeQueue {
    /// All blocks free, in id order.
    fn new(num_blocks: usize) -> Self {
        let n = num_blocks + 1;
        let prev = (0..n).map(|i| ((i + n - 1) % n) as BlockId).collect();
        let next = (0..n).map(|i| ((i + 1) % n) as BlockId).collect();
        Self {
            prev,
            next,
            len: num_blocks,
        }
    }

    fn sentinel(&self) -> BlockId {
        (self.next.len() - 1) as BlockId
    }

    fn link_after(&mut self, at: BlockId, id: BlockId) {
        let after = self.next[at as usize];
        self.next[at as usize] = id;
        self.prev[id as usize] = at;
        self.next[id as usize] = after;
        self.prev[after as usize] = id;
        self.len += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (p, n) = (self.prev[id as usize], self.next[id as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.len -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        self.link_after(self.prev[self.sentinel() as usize], id);
    }

    fn push_front(&mut self, id: BlockId) {
        self.link_after(self.sentinel(), id);
    }

    fn pop_front(&mut self) -> Option<BlockId> {
        let head = self.next[self.sentinel() as usize];
        (head != self.sentinel()).then(|| {
            self.unlink(head);
            head
        })
    }

    /// Free blocks from the next to be reused to the last.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let end = self.sentinel();
        std::iter::successors(Some(self.next[end as usize]), |&id| {
            Some(self.next[id as usize])
        })
        .take_while(move |&id| id != end)
    }
}

pub struct BlockPool {
    ref_cnt: Vec<u32>,
    /// Hash of each block that is a cached full block.
    hashes: Vec<Option<BlockHash>>,
    /// Blocks with ref count 0, cached or not, in reuse order.
    free: FreeQueue,
    /// One block per hash: a block computed twice concurrently stays uncached the second time.
    cached: HashMap<BlockHash, BlockId>,
    enable_caching: bool,
    /// Changes of the cached set since the last [`BlockPool::take_events`].
    events: Vec<KvCacheEvent>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        // The sentinel takes id `num_blocks`.
        assert!(
            num_blocks < BlockId::MAX as usize,
            "too many KV-cache blocks: {num_blocks}"
        );
        Self {
            ref_cnt: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            free: FreeQueue::new(num_blocks),
            cached: HashMap::new(),
            enable_caching,
            events: Vec::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks not referenced by any request, including evictable cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    /// Fraction of blocks in use by requests (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.num_blocks() as f64
    }

    pub fn enable_caching(&self) -> bool {
        self.enable_caching
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_cnt[block as usize]
    }

    /// Takes `n` blocks from the head of the free queue, all or none, each with ref count 1.
    /// Cached blocks among them lose their hash (one `BlockRemoved` for all of them).
    pub fn get_new_blocks(&mut self, n: usize) -> Result<Vec<BlockId>, NoSpace> {
        if n > self.free.len {
            return Err(NoSpace {
                needed: n,
                available: self.free.len,
            });
        }
        let mut removed = Vec::new();
        let mut blocks = Vec::with_capacity(n);
        while blocks.len() < n {
            let Some(id) = self.free.pop_front() else {
                break;
            };
            if let Some(hash) = self.hashes[id as usize].take() {
                self.cached.remove(&hash);
                removed.push(hash);
            }
            self.ref_cnt[id as usize] = 1;
            blocks.push(id);
        }
        if !removed.is_empty() {
            self.events.push(KvCacheEvent::BlockRemoved {
                block_hashes: removed,
                medium: Medium::Gpu,
            });
        }
        Ok(blocks)
    }

    /// A prefix-cache hit: one more reference to each block, taking unreferenced ones out of
    /// the free queue so they cannot be evicted while in use.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &id in blocks {
            if self.ref_cnt[id as usize] == 0 {
                self.free.unlink(id);
            }
            self.ref_cnt[id as usize] += 1;
        }
    }

    /// Drops one reference to each block, given in eviction order (first = evicted first).
    /// Blocks reaching 0 return to the free queue: cached ones at the tail, in that order, so
    /// they survive as long as possible (LRU); uncached ones at the head, since they can never
    /// be hit and are best reused first (as vLLM does).
    pub fn free_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        let mut uncached = Vec::new();
        for id in blocks {
            let rc = &mut self.ref_cnt[id as usize];
            assert!(
                *rc > 0,
                "KV-cache block {id} freed more often than allocated"
            );
            *rc -= 1;
            if *rc == 0 {
                if self.hashes[id as usize].is_some() {
                    self.free.push_back(id);
                } else {
                    uncached.push(id);
                }
            }
        }
        uncached
            .into_iter()
            .rev()
            .for_each(|id| self.free.push_front(id));
    }

    /// Makes `blocks` (full, held by the caller, in chain order) cached under `hashes` and
    /// announces them. `token_ids` are their tokens concatenated (`blocks.len() * block_size`);
    /// `parent` is the hash of the block before the first one. A block whose hash is already
    /// cached elsewhere stays uncached; the stored ones go out as one `BlockStored` per
    /// contiguous run, which is one per call unless such a duplicate splits the chain.
    /// `extra_keys`, when given, holds each block's extra hash keys (for the events).
    pub fn cache_full_blocks(
        &mut self,
        blocks: &[BlockId],
        hashes: &[BlockHash],
        token_ids: &[u32],
        parent: Option<BlockHash>,
        lora_name: Option<&str>,
        extra_keys: Option<&[Vec<ExtraKey>]>,
    ) {
        if !self.enable_caching || blocks.is_empty() {
            return;
        }
        assert_eq!(blocks.len(), hashes.len(), "one hash per block");
        assert_eq!(
            token_ids.len() % blocks.len(),
            0,
            "token_ids must cover whole blocks"
        );
        let block_size = token_ids.len() / blocks.len();
        let meta = StoredMeta {
            hashes,
            token_ids,
            block_size,
            parent,
            lora_name,
            extra_keys,
        };
        let mut run_start = None;
        for (i, (&id, &hash)) in blocks.iter().zip(hashes).enumerate() {
            debug_assert!(
                self.ref_cnt[id as usize] > 0,
                "caching unreferenced block {id}"
            );
            let slot = &mut self.hashes[id as usize];
            let stored = slot.is_none() && !self.cached.contains_key(&hash);
            if stored {
                *slot = Some(hash);
                self.cached.insert(hash, id);
                run_start.get_or_insert(i);
            } else if let Some(start) = run_start.take() {
                self.events.push(meta.event(start..i));
            }
        }
        if let Some(start) = run_start {
            self.events.push(meta.event(start..blocks.len()));
        }
    }

    pub fn get_cached_block(&self, hash: &BlockHash) -> Option<BlockId> {
        self.cached.get(hash).copied()
    }

    /// Drops every cached hash (vLLM semantics: only while no block is in use, else `false`
    /// and nothing changes). Announced as `AllBlocksCleared`.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.ref_cnt.iter().any(|&rc| rc > 0) {
            return false;
        }
        self.cached.clear();
        self.hashes.fill(None);
        if self.enable_caching {
            self.events.push(KvCacheEvent::AllBlocksCleared);
        }
        true
    }

    /// The cache changes since the last call, oldest first (the engine publishes them once per
    /// step, merged with its connectors').
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.events)
    }

    /// The cached hashes, sorted (tests and debugging).
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        let mut hashes: Vec<BlockHash> = self.cached.keys().copied().collect();
        hashes.sort_unstable();
        hashes
    }

    /// Free blocks from the next to be reused to the last.
    #[cfg(test)]
    pub(crate) fn free_order(&self) -> Vec<BlockId> {
        self.free.iter().collect()
    }

    /// Panics if the internal structures disagree.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let free = self.free_order();
        assert_eq!(free.len(), self.free.len);
        let mut in_free = vec![false; self.num_blocks()];
        for &id in &free {
            assert!(!in_free[id as usize], "block {id} twice in the free queue");
            in_free[id as usize] = true;
        }
        for (id, &rc) in self.ref_cnt.iter().enumerate() {
            assert_eq!(
                rc == 0,
                in_free[id],
                "block {id}: ref {rc} vs free-queue membership"
            );
            if let Some(hash) = self.hashes[id] {
                assert_eq!(self.cached.get(&hash), Some(&(id as BlockId)));
            }
        }
        assert_eq!(self.cached.len(), self.hashes.iter().flatten().count());
    }
}

/// What `cache_full_blocks` announces, sliced into one `BlockStored` per contiguous run.
struct StoredMeta<'a> {
    hashes: &'a [BlockHash],
    token_ids: &'a [u32],
    block_size: usize,
    parent: Option<BlockHash>,
    lora_name: Option<&'a str>,
    extra_keys: Option<&'a [Vec<ExtraKey>]>,
}

impl StoredMeta<'_> {
    fn event(&self, run: std::ops::Range<usize>) -> KvCacheEvent {
        let parent_block_hash = match run.start {
            0 => self.parent,
            s => Some(self.hashes[s - 1]),
        };
        let bs = self.block_size;
        let extra_keys = self
            .extra_keys
            .map(|keys| keys[run.clone()].to_vec())
            .filter(|keys| keys.iter().any(|k| !k.is_empty()));
        KvCacheEvent::BlockStored {
            block_hashes: self.hashes[run.clone()].to_vec(),
            parent_block_hash,
            token_ids: self.token_ids[run.start * bs..run.end * bs].to_vec(),
            block_size: bs,
            lora_name: self.lora_name.map(str::to_string),
            extra_keys,
            medium: Medium::Gpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_hash::{BlockHasher, HashAlgo};

    fn pool(n: usize) -> BlockPool {
        BlockPool::new(n, true)
    }

    fn hashes(n: usize) -> Vec<BlockHash> {
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, None);
        let mut out = Vec::new();
        let tokens: Vec<u32> = (0..n as u32 * 2).collect();
        h.extend_request_hashes(&mut out, &tokens, 2, None);
        out
    }

    #[test]
    fn free_queue_links() {
        let mut q = FreeQueue::new(4);
        assert_eq!(q.iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        q.unlink(2);
        q.push_front(2);
        assert_eq!(q.pop_front(), Some(2));
        q.unlink(0);
        q.push_back(0);
        assert_eq!(q.iter().collect::<Vec<_>>(), [1, 3, 0]);
        assert_eq!(q.len, 3);
        assert_eq!(
            (q.pop_front(), q.pop_front(), q.pop_front(), q.pop_front()),
            (Some(1), Some(3), Some(0), None)
        );
        assert_eq!(q.len, 0);
        assert!(FreeQueue::new(0).iter().next().is_none());
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut p = pool(4);
        assert_eq!(p.get_new_blocks(3), Ok(vec![0, 1, 2]));
        assert_eq!(
            p.get_new_blocks(2),
            Err(NoSpace {
                needed: 2,
                available: 1
            })
        );
        assert_eq!(p.num_free_blocks(), 1);
        assert_eq!(p.usage(), 0.75);
        p.free_blocks([2, 1, 0]);
        assert_eq!(p.num_free_blocks(), 4);
        assert_eq!(p.usage(), 0.0);
        p.check_invariants();
    }

    #[test]
    fn uncached_blocks_are_reused_first_cached_last() {
        let mut p = pool(4);
        let hs = hashes(1);
        let b = p.get_new_blocks(4).expect("enough free blocks");
        p.cache_full_blocks(&b[..1], &hs, &[0, 1], None, None, None);
        // Free in eviction order: uncached 3 then 2 go to the head in that order, cached 0 to the
        // tail; 1 stays in use.
        p.free_blocks([3, 2, 0]);
        assert_eq!(p.free_order(), [3, 2, 0]);
        p.check_invariants();
    }

    #[test]
    fn store_touch_evict_emit_matching_events() {
        let mut p = pool(3);
        let hs = hashes(2);
        let b = p.get_new_blocks(2).expect("enough free blocks");
        p.cache_full_blocks(&b, &hs, &[0, 1, 2, 3], None, Some("lora"), None);
        assert_eq!(
            p.take_events(),
            vec![KvCacheEvent::BlockStored {
                block_hashes: hs.clone(),
                parent_block_hash: None,
                token_ids: vec![0, 1, 2, 3],
                block_size: 2,
                lora_name: Some("lora".into()),
                extra_keys: None,
                medium: Medium::Gpu,
            }]
        );
        assert_eq!(p.get_cached_block(&hs[1]), Some(b[1]));
        p.free_blocks(b.iter().rev().copied());
        assert_eq!(p.num_free_blocks(), 3);
        // A hit takes the block out of the free queue: it cannot be evicted while in use.
        p.touch(&[b[0]]);
        assert_eq!(p.ref_count(b[0]), 1);
        assert_eq!(p.num_free_blocks(), 2);
        // Two new blocks: the never-used block 2, then the cached block 1 (evicted).
        assert_eq!(p.get_new_blocks(2), Ok(vec![2, b[1]]));
        assert_eq!(
            p.take_events(),
            vec![KvCacheEvent::BlockRemoved {
                block_hashes: vec![hs[1]],
                medium: Medium::Gpu
            }]
        );
        assert_eq!(p.get_cached_block(&hs[1]), None);
        assert_eq!(p.cached_hashes(), vec![hs[0]]);
        p.check_invariants();
    }

    #[test]
    fn duplicate_hash_stays_uncached_and_splits_the_event() {
        let mut p = pool(6);
        let hs = hashes(3);
        let toks = [0, 1, 2, 3, 4, 5];
        let a = p.get_new_blocks(3).expect("enough free blocks");
        p.cache_full_blocks(&a[1..2], &hs[1..2], &toks[2..4], Some(hs[0]), None, None);
        p.take_events();
        let b = p.get_new_blocks(3).expect("enough free blocks");
        p.cache_full_blocks(&b, &hs, &toks, None, None, None);
        let stored = |hashes: Vec<BlockHash>, parent, tokens: Vec<u32>| KvCacheEvent::BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: 2,
            lora_name: None,
            extra_keys: None,
            medium: Medium::Gpu,
        };
        assert_eq!(
            p.take_events(),
            vec![
                stored(vec![hs[0]], None, vec![0, 1]),
                stored(vec![hs[2]], Some(hs[1]), vec![4, 5])
            ]
        );
        assert_eq!(p.get_cached_block(&hs[1]), Some(a[1]));
        // Re-caching the same blocks announces nothing new.
        p.cache_full_blocks(&b, &hs, &toks, None, None, None);
        assert!(p.take_events().is_empty());
        // Evicting the uncached duplicate announces nothing either.
        p.free_blocks(b.iter().rev().copied());
        p.free_blocks(a.iter().rev().copied());
        assert_eq!(p.get_new_blocks(2).map(|v| v.len()), Ok(2));
        assert!(p.take_events().is_empty());
        p.check_invariants();
    }

    #[test]
    fn reset_only_when_idle() {
        let mut p = pool(2);
        let hs = hashes(1);
        let b = p.get_new_blocks(1).expect("enough free blocks");
        p.cache_full_blocks(&b, &hs, &[0, 1], None, None, None);
        p.take_events();
        assert!(!p.reset_prefix_cache());
        assert_eq!(p.cached_hashes(), hs);
        assert!(p.take_events().is_empty());
        p.free_blocks(b);
        assert!(p.reset_prefix_cache());
        assert!(p.cached_hashes().is_empty());
        assert_eq!(p.take_events(), vec![KvCacheEvent::AllBlocksCleared]);
        // The block lost its hash: reusing it is not an eviction.
        assert_eq!(p.get_new_blocks(2).map(|v| v.len()), Ok(2));
        assert!(p.take_events().is_empty());
    }

    #[test]
    fn caching_disabled_stores_nothing() {
        let mut p = BlockPool::new(2, false);
        let b = p.get_new_blocks(1).expect("enough free blocks");
        p.cache_full_blocks(&b, &hashes(1), &[0, 1], None, None, None);
        assert!(p.cached_hashes().is_empty());
        p.free_blocks(b);
        assert!(p.reset_prefix_cache());
        assert!(p.take_events().is_empty());
    }
}
