//! Per-request block tables over the block pool (vLLM `v1/core/kv_cache_manager.py`): prefix
//! lookup, slot allocation, caching of newly completed blocks, release.

use std::collections::HashMap;

use crate::block_hash::{BlockHash, BlockHasher, ExtraKey};
use crate::block_pool::{BlockId, BlockPool, NoSpace};
use crate::events::KvCacheEvent;

/// What the manager keeps per live request.
#[derive(Debug, Default)]
struct RequestBlocks {
    /// Block table: block `i` holds tokens `i * block_size ..`.
    blocks: Vec<BlockId>,
    /// Chained hashes of the request's full blocks computed so far (may run ahead of `blocks`).
    block_hashes: Vec<BlockHash>,
    /// Leading blocks already in the prefix cache (hits, or cached by `cache_blocks`).
    num_cached_blocks: usize,
    cache_salt: Option<String>,
}

pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    hasher: BlockHasher,
    enable_prefix_caching: bool,
    requests: HashMap<String, RequestBlocks>,
    /// Blocks of finished requests kept allocated for a connector (a P/D producer's, until the
    /// decode side read them): vLLM's delayed frees.
    held: HashMap<u64, RequestBlocks>,
    next_hold: u64,
}

/// A finished request's blocks kept allocated by [`KvCacheManager::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HoldId(u64);

impl KvCacheManager {
    pub fn new(
        pool: BlockPool,
        block_size: usize,
        hasher: BlockHasher,
        enable_prefix_caching: bool,
    ) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            pool,
            block_size,
            hasher,
            enable_prefix_caching,
            requests: HashMap::new(),
            held: HashMap::new(),
            next_hold: 0,
        }
    }

    /// The longest run of leading full blocks of `all_token_ids` present in the prefix cache,
    /// and the number of tokens they hold. Never the whole sequence: at least one token is left
    /// to compute, since the last position's logits are needed (vLLM caps the hit at
    /// `num_tokens - 1`). The hashes computed here are kept for the request; `cache_salt`
    /// (first block only) is remembered for its later blocks. Touches nothing.
    pub fn find_cached_prefix(
        &mut self,
        request_id: &str,
        all_token_ids: &[u32],
        cache_salt: Option<&str>,
    ) -> (Vec<BlockId>, usize) {
        let req = self.requests.entry(request_id.to_string()).or_default();
        if req.blocks.is_empty() {
            req.cache_salt = cache_salt.map(str::to_string);
        }
        if !self.enable_prefix_caching {
            return (Vec::new(), 0);
        }
        self.hasher.extend_request_hashes(
            &mut req.block_hashes,
            all_token_ids,
            self.block_size,
            req.cache_salt.as_deref(),
        );
        let max_blocks = all_token_ids.len().saturating_sub(1) / self.block_size;
        let blocks: Vec<BlockId> = req.block_hashes[..max_blocks]
            .iter()
            .map_while(|h| self.pool.get_cached_block(h))
            .collect();
        let num_tokens = blocks.len() * self.block_size;
        (blocks, num_tokens)
    }

    /// Grows the request's block table to cover `num_tokens` tokens. `cached_blocks` (from
    /// [`Self::find_cached_prefix`], only on the request's first allocation) become its leading
    /// blocks. All or nothing: on `Err` no block changed hands.
    pub fn allocate_slots(
        &mut self,
        request_id: &str,
        num_tokens: usize,
        cached_blocks: &[BlockId],
    ) -> Result<(), NoSpace> {
        let req = self.requests.entry(request_id.to_string()).or_default();
        debug_assert!(
            cached_blocks.is_empty() || req.blocks.is_empty(),
            "cached blocks for a request that already has a block table"
        );
        let have = req.blocks.len() + cached_blocks.len();
        let needed = num_tokens.div_ceil(self.block_size).saturating_sub(have);
        // Hit blocks nobody references sit in the free queue; touching them takes them out,
        // so they are not available for the new blocks.
        let hits_in_free_queue = cached_blocks
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count();
        let available = self.pool.num_free_blocks() - hits_in_free_queue;
        if needed > available {
            return Err(NoSpace { needed, available });
        }
        if !cached_blocks.is_empty() {
            self.pool.touch(cached_blocks);
            req.blocks.extend_from_slice(cached_blocks);
            req.num_cached_blocks = cached_blocks.len();
        }
        req.blocks.extend(self.pool.get_new_blocks(needed)?);
        Ok(())
    }

    /// After a step: caches the request's blocks completed within its first
    /// `num_computed_tokens` tokens, announcing them in the pool's events.
    pub fn cache_blocks(
        &mut self,
        request_id: &str,
        all_token_ids: &[u32],
        num_computed_tokens: usize,
    ) {
        if !self.enable_prefix_caching {
            return;
        }
        let Some(req) = self.requests.get_mut(request_id) else {
            return;
        };
        let bs = self.block_size;
        let num_full = (num_computed_tokens.min(all_token_ids.len()) / bs).min(req.blocks.len());
        let first = req.num_cached_blocks;
        if num_full <= first {
            return;
        }
        self.hasher.extend_request_hashes(
            &mut req.block_hashes,
            &all_token_ids[..num_full * bs],
            bs,
            req.cache_salt.as_deref(),
        );
        let parent = first.checked_sub(1).map(|i| req.block_hashes[i]);
        // The salt keys the request's first block only (as in the hash).
        let extra_keys: Option<Vec<Vec<ExtraKey>>> = match req.cache_salt.as_deref() {
            Some(salt) if first == 0 && !salt.is_empty() => {
                let mut keys = vec![Vec::new(); num_full];
                keys[0].push(ExtraKey::Str(salt.to_string()));
                Some(keys)
            }
            _ => None,
        };
        self.pool.cache_full_blocks(
            &req.blocks[first..num_full],
            &req.block_hashes[first..num_full],
            &all_token_ids[first * bs..num_full * bs],
            parent,
            None,
            extra_keys.as_deref(),
        );
        req.num_cached_blocks = num_full;
    }

    /// Releases the request's blocks and forgets it. Tail blocks go first into the eviction
    /// order: they are the least likely to be shared.
    pub fn free(&mut self, request_id: &str) {
        if let Some(req) = self.requests.remove(request_id) {
            self.pool.free_blocks(req.blocks.into_iter().rev());
        }
    }

    /// Forgets the request but keeps its blocks allocated (and their cached prefix shareable)
    /// until [`Self::release_hold`]; the request id is free for reuse at once.
    pub fn hold(&mut self, request_id: &str) -> Option<HoldId> {
        let req = self.requests.remove(request_id)?;
        let id = HoldId(self.next_hold);
        self.next_hold += 1;
        self.held.insert(id.0, req);
        Some(id)
    }

    /// Frees held blocks as [`Self::free`] frees a request's.
    pub fn release_hold(&mut self, hold: HoldId) {
        if let Some(req) = self.held.remove(&hold.0) {
            self.pool.free_blocks(req.blocks.into_iter().rev());
        }
    }

    /// Blocks held for connectors now.
    pub fn num_held_blocks(&self) -> usize {
        self.held.values().map(|r| r.blocks.len()).sum()
    }

    /// The request's block table (empty for an unknown request).
    pub fn block_table(&self, request_id: &str) -> &[BlockId] {
        self.requests
            .get(request_id)
            .map_or(&[], |r| r.blocks.as_slice())
    }

    /// The chained hashes of the request's full blocks computed so far (by
    /// [`Self::find_cached_prefix`] and [`Self::cache_blocks`]); empty without prefix caching.
    pub fn block_hashes(&self, request_id: &str) -> &[BlockHash] {
        self.requests
            .get(request_id)
            .map_or(&[], |r| r.block_hashes.as_slice())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    /// See [`BlockPool::reset_prefix_cache`]: `false` while any request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }

    /// The device pool's cache changes since the last call (see [`BlockPool::take_events`]).
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        self.pool.take_events()
    }

    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        self.pool.cached_hashes()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::block_hash::HashAlgo;

    const BS: usize = 4;

    fn manager(num_blocks: usize) -> KvCacheManager {
        let pool = BlockPool::new(num_blocks, true);
        let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, None);
        KvCacheManager::new(pool, BS, hasher, true)
    }

    /// Admits a request as the engine does: prefix lookup, allocation for the whole sequence,
    /// then caching once it is computed. Returns the number of cached tokens.
    fn run_prefill(kv: &mut KvCacheManager, id: &str, tokens: &[u32]) -> Result<usize, NoSpace> {
        let (hit, num_cached) = kv.find_cached_prefix(id, tokens, None);
        kv.allocate_slots(id, tokens.len(), &hit)?;
        kv.cache_blocks(id, tokens, tokens.len());
        Ok(num_cached)
    }

    fn stored_hashes(events: &[KvCacheEvent]) -> Vec<BlockHash> {
        events
            .iter()
            .flat_map(|e| match e {
                KvCacheEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn removed_hashes(events: &[KvCacheEvent]) -> Vec<BlockHash> {
        events
            .iter()
            .flat_map(|e| match e {
                KvCacheEvent::BlockRemoved { block_hashes, .. } => block_hashes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn held_blocks_outlive_their_request_and_stay_shareable_until_released() {
        let mut kv = manager(8);
        let tokens: Vec<u32> = (0..10).collect();
        run_prefill(&mut kv, "a", &tokens).unwrap();
        assert_eq!(kv.num_free_blocks(), 5);
        let hold = kv.hold("a").unwrap();
        assert!(kv.hold("a").is_none());
        assert_eq!((kv.num_free_blocks(), kv.num_held_blocks()), (5, 3));
        // The id is free again, and the held prefix is a hit for it.
        assert_eq!(run_prefill(&mut kv, "a", &tokens).unwrap(), 8);
        kv.free("a");
        assert_eq!(kv.num_free_blocks(), 5);
        kv.release_hold(hold);
        assert_eq!((kv.num_free_blocks(), kv.num_held_blocks()), (8, 0));
    }

    #[test]
    fn allocate_and_free_leave_the_pool_free() {
        let mut kv = manager(8);
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(run_prefill(&mut kv, "a", &tokens), Ok(0));
        assert_eq!(kv.block_table("a").len(), 3);
        assert_eq!(kv.num_free_blocks(), 5);
        // Decode into the partial block: no new block; crossing into a fourth: one more.
        assert_eq!(kv.allocate_slots("a", 12, &[]), Ok(()));
        assert_eq!(kv.block_table("a").len(), 3);
        assert_eq!(kv.allocate_slots("a", 13, &[]), Ok(()));
        assert_eq!(kv.block_table("a").len(), 4);
        kv.free("a");
        assert!(kv.block_table("a").is_empty());
        assert_eq!(kv.num_free_blocks(), kv.num_blocks());
        assert_eq!(kv.usage(), 0.0);
        kv.pool.check_invariants();
    }

    #[test]
    fn prefix_hits_share_blocks() {
        let mut kv = manager(16);
        let shared: Vec<u32> = (100..112).collect();
        let a: Vec<u32> = shared.iter().copied().chain([1, 2, 3]).collect();
        let b: Vec<u32> = shared.iter().copied().chain([7, 8, 9, 10, 11]).collect();
        assert_eq!(run_prefill(&mut kv, "a", &a), Ok(0));
        let events = kv.take_events();
        assert_eq!(stored_hashes(&events).len(), 3);
        let (hit, n) = kv.find_cached_prefix("b", &b, None);
        assert_eq!((hit.as_slice(), n), (&kv.block_table("a")[..3], 12));
        assert_eq!(kv.allocate_slots("b", b.len(), &hit), Ok(()));
        for &blk in &hit {
            assert_eq!(kv.pool.ref_count(blk), 2);
        }
        assert_eq!(&kv.block_table("b")[..3], hit.as_slice());
        assert_eq!(kv.block_table("b").len(), 5);
        kv.cache_blocks("b", &b, b.len());
        // Only b's fourth block is new; it chains from the last shared block.
        match kv.take_events().as_slice() {
            [KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                ..
            }] => {
                assert_eq!(block_hashes.len(), 1);
                assert_eq!(*parent_block_hash, Some(kv.requests["b"].block_hashes[2]));
                assert_eq!(token_ids, &b[12..16]);
            }
            other => panic!("unexpected events {other:?}"),
        }
        kv.free("a");
        kv.free("b");
        assert_eq!(kv.num_free_blocks(), 16);
        kv.pool.check_invariants();
    }

    #[test]
    fn salt_separates_caches() {
        let mut kv = manager(16);
        let tokens: Vec<u32> = (0..9).collect();
        let (hit, _) = kv.find_cached_prefix("a", &tokens, Some("tenant-a"));
        assert_eq!(kv.allocate_slots("a", tokens.len(), &hit), Ok(()));
        kv.cache_blocks("a", &tokens, tokens.len());
        // The events carry the salt as the first block's extra key, as the hash covered it.
        match kv.take_events().as_slice() {
            [KvCacheEvent::BlockStored { extra_keys, .. }] => assert_eq!(
                extra_keys.as_deref(),
                Some(&[vec![ExtraKey::Str("tenant-a".into())], vec![]][..])
            ),
            other => panic!("unexpected events {other:?}"),
        }
        assert_eq!(kv.find_cached_prefix("b", &tokens, Some("tenant-b")).1, 0);
        assert_eq!(kv.find_cached_prefix("c", &tokens, None).1, 0);
        assert_eq!(kv.find_cached_prefix("d", &tokens, Some("tenant-a")).1, 8);
    }

    #[test]
    fn salt_applies_to_a_first_block_completed_by_decoding() {
        let mut kv = manager(8);
        let mut tokens: Vec<u32> = vec![1, 2, 3];
        let (hit, _) = kv.find_cached_prefix("a", &tokens, Some("s"));
        assert_eq!(kv.allocate_slots("a", 3, &hit), Ok(()));
        kv.cache_blocks("a", &tokens, 3);
        tokens.extend([4, 5]);
        assert_eq!(kv.allocate_slots("a", 5, &[]), Ok(()));
        kv.cache_blocks("a", &tokens, 5);
        assert_eq!(kv.find_cached_prefix("b", &tokens, Some("s")).1, 4);
        assert_eq!(kv.find_cached_prefix("c", &tokens, None).1, 0);
    }

    #[test]
    fn hit_is_capped_below_the_full_sequence() {
        let mut kv = manager(8);
        let tokens: Vec<u32> = (0..8).collect();
        assert_eq!(run_prefill(&mut kv, "a", &tokens), Ok(0));
        // Same 8 tokens (two full blocks): only the first block may hit.
        assert_eq!(kv.find_cached_prefix("b", &tokens, None).1, 4);
        // One more token: both blocks hit, the ninth is computed.
        let longer: Vec<u32> = (0..9).collect();
        assert_eq!(kv.find_cached_prefix("c", &longer, None).1, 8);
        // A single token never hits.
        assert_eq!(kv.find_cached_prefix("d", &tokens[..1], None).1, 0);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut kv = manager(4);
        let a: Vec<u32> = (0..9).collect();
        assert_eq!(run_prefill(&mut kv, "a", &a), Ok(0));
        kv.free("a");
        kv.take_events();
        // b hits a's two full blocks (both at ref 0, in the free queue) and needs 3 more blocks;
        // only 2 others are free, since the hits themselves are taken.
        let b: Vec<u32> = (0..20).collect();
        let (hit, n) = kv.find_cached_prefix("b", &b, None);
        assert_eq!(n, 8);
        assert_eq!(
            kv.allocate_slots("b", b.len(), &hit),
            Err(NoSpace {
                needed: 3,
                available: 2
            })
        );
        assert_eq!(kv.num_free_blocks(), 4);
        assert!(kv.block_table("b").is_empty());
        assert!(kv.take_events().is_empty());
        assert_eq!(kv.cached_hashes().len(), 2);
        // 16 tokens fit: two hits plus two fresh blocks, without evicting the hits.
        assert_eq!(kv.allocate_slots("b", 16, &hit), Ok(()));
        assert_eq!(&kv.block_table("b")[..2], hit.as_slice());
        assert!(removed_hashes(&kv.take_events()).is_empty());
        kv.pool.check_invariants();
    }

    #[test]
    fn lru_eviction_order() {
        let mut kv = manager(6);
        let a: Vec<u32> = (0..9).collect();
        let b: Vec<u32> = (50..59).collect();
        assert_eq!(run_prefill(&mut kv, "a", &a), Ok(0));
        kv.free("a");
        assert_eq!(run_prefill(&mut kv, "b", &b), Ok(0));
        kv.free("b");
        let stored = stored_hashes(&kv.take_events());
        assert_eq!(stored.len(), 4);
        let (b0, b1) = (stored[2], stored[3]);
        // A hit on a's blocks makes them the most recently used.
        assert_eq!(run_prefill(&mut kv, "a2", &a), Ok(8));
        kv.free("a2");
        assert!(kv.take_events().is_empty());
        // Fresh blocks come from the uncached free blocks first, then from the least recently
        // used chain, b, tail block first.
        assert_eq!(kv.allocate_slots("c", 12, &[]), Ok(()));
        assert_eq!(removed_hashes(&kv.take_events()), vec![b1]);
        assert_eq!(kv.allocate_slots("c", 16, &[]), Ok(()));
        assert_eq!(removed_hashes(&kv.take_events()), vec![b0]);
        let mut a_hashes = stored[..2].to_vec();
        a_hashes.sort_unstable();
        assert_eq!(kv.cached_hashes(), a_hashes);
        assert_eq!(kv.find_cached_prefix("a3", &a, None).1, 8);
        kv.pool.check_invariants();
    }

    #[test]
    fn reset_prefix_cache_needs_an_idle_pool() {
        let mut kv = manager(4);
        let a: Vec<u32> = (0..9).collect();
        assert_eq!(run_prefill(&mut kv, "a", &a), Ok(0));
        kv.take_events();
        assert!(!kv.reset_prefix_cache());
        kv.free("a");
        assert!(kv.reset_prefix_cache());
        assert_eq!(kv.take_events(), vec![KvCacheEvent::AllBlocksCleared]);
        assert_eq!(kv.find_cached_prefix("b", &a, None).1, 0);
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let pool = BlockPool::new(8, false);
        let mut kv = KvCacheManager::new(pool, BS, BlockHasher::new(HashAlgo::Sha256, None), false);
        let a: Vec<u32> = (0..9).collect();
        assert_eq!(run_prefill(&mut kv, "a", &a), Ok(0));
        assert_eq!(run_prefill(&mut kv, "b", &a), Ok(0));
        assert!(kv.cached_hashes().is_empty());
        assert!(kv.take_events().is_empty());
    }

    /// splitmix64: a deterministic generator for the randomized workload.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Replays events onto a set, checking that each is consistent with what came before.
    fn apply(events: &[KvCacheEvent], announced: &mut BTreeSet<BlockHash>) {
        for e in events {
            match e {
                KvCacheEvent::BlockStored {
                    block_hashes,
                    token_ids,
                    block_size,
                    ..
                } => {
                    assert_eq!(token_ids.len(), block_hashes.len() * block_size);
                    for h in block_hashes {
                        assert!(announced.insert(*h), "{h:?} stored twice");
                    }
                }
                KvCacheEvent::BlockRemoved { block_hashes, .. } => {
                    for h in block_hashes {
                        assert!(announced.remove(h), "{h:?} removed but never announced");
                    }
                }
                KvCacheEvent::AllBlocksCleared => announced.clear(),
            }
        }
    }

    #[test]
    fn events_track_the_cache_over_a_random_workload() {
        let mut kv = manager(24);
        let mut rng = Rng(7);
        // A few shared prefixes so that requests hit, collide and evict each other.
        let prefixes: Vec<Vec<u32>> = (0..4)
            .map(|p| (0..12).map(|i| p * 1000 + i).collect())
            .collect();
        struct Live {
            id: String,
            tokens: Vec<u32>,
            computed: usize,
        }
        let mut live: Vec<Live> = Vec::new();
        let mut announced = BTreeSet::new();
        let mut next_id = 0;
        let mut hits = 0;
        for _ in 0..3000 {
            match rng.below(10) {
                // Admit a request: shared prefix + random tail, prefilled in chunks later.
                0..=2 => {
                    let mut tokens = prefixes[rng.below(prefixes.len())][..rng.below(13)].to_vec();
                    tokens.extend((0..rng.below(10)).map(|_| rng.below(50) as u32));
                    if tokens.is_empty() {
                        continue;
                    }
                    let id = format!("r{next_id}");
                    next_id += 1;
                    let (hit, n) = kv.find_cached_prefix(&id, &tokens, None);
                    assert!(n < tokens.len());
                    if kv.allocate_slots(&id, n + 1, &hit).is_ok() {
                        hits += hit.len();
                        kv.cache_blocks(&id, &tokens, n);
                        live.push(Live {
                            id,
                            tokens,
                            computed: n,
                        });
                    } else {
                        kv.free(&id);
                    }
                }
                // Step a request: prefill a chunk or decode one token.
                3..=7 if !live.is_empty() => {
                    let i = rng.below(live.len());
                    let r = &mut live[i];
                    if r.computed == r.tokens.len() {
                        r.tokens.push(rng.below(50) as u32);
                    }
                    let target = (r.computed + 1 + rng.below(6)).min(r.tokens.len());
                    if kv.allocate_slots(&r.id, target, &[]).is_ok() {
                        r.computed = target;
                        kv.cache_blocks(&r.id, &r.tokens, r.computed);
                    } else {
                        // Preempted, as the scheduler would on NoSpace.
                        let r = live.swap_remove(i);
                        kv.free(&r.id);
                    }
                }
                8 if !live.is_empty() => {
                    let r = live.swap_remove(rng.below(live.len()));
                    kv.free(&r.id);
                }
                9 if rng.below(20) == 0 => {
                    let idle = live.is_empty();
                    assert_eq!(kv.reset_prefix_cache(), idle);
                }
                _ => {}
            }
            apply(&kv.take_events(), &mut announced);
            assert_eq!(
                announced.iter().copied().collect::<Vec<_>>(),
                kv.cached_hashes()
            );
            kv.pool.check_invariants();
            let held: usize = live.iter().map(|r| kv.block_table(&r.id).len()).sum();
            assert!(kv.num_free_blocks() + held >= kv.num_blocks());
        }
        assert!(hits > 50, "workload produced too few prefix hits ({hits})");
        for r in live.drain(..) {
            kv.free(&r.id);
        }
        assert_eq!(kv.num_free_blocks(), kv.num_blocks());
        kv.pool.check_invariants();
    }
}
