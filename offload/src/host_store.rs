//! Whole KV blocks in host memory, keyed by block hash, at most `capacity` of them, least
//! recently used evicted first. Evicted buffers are kept for the next insert, so a full store
//! allocates nothing. A request's run of blocks is marked used back to front (as vLLM's LRU
//! offloading manager touches), so its first block is the most recent: the store gives up a
//! chain's tail before its head, and what is left of a prefix stays usable.

use std::collections::{BTreeMap, HashMap};

use kvcache::BlockHash;

#[derive(Debug)]
pub struct HostStore {
    capacity: usize,
    block_bytes: usize,
    /// Hash → (data, last use).
    blocks: HashMap<BlockHash, (Vec<u8>, u64)>,
    /// Last use → hash; the first entry is the least recently used.
    order: BTreeMap<u64, BlockHash>,
    clock: u64,
    spare: Option<Vec<u8>>,
}

impl HostStore {
    pub fn new(capacity: usize, block_bytes: usize) -> Self {
        Self {
            capacity,
            block_bytes,
            blocks: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            spare: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.blocks.contains_key(hash)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The block's bytes (its recency is [`touch_run`](Self::touch_run)'s business).
    pub fn get(&self, hash: &BlockHash) -> Option<&[u8]> {
        self.blocks.get(hash).map(|(data, _)| data.as_slice())
    }

    /// Marks the held blocks of a run as just used, last to first.
    pub fn touch_run(&mut self, run: &[BlockHash]) {
        for hash in run.iter().rev() {
            let stamp = self.clock + 1;
            let Some((_, used)) = self.blocks.get_mut(hash) else {
                continue;
            };
            self.clock = stamp;
            self.order.remove(used);
            *used = stamp;
            self.order.insert(stamp, *hash);
        }
    }

    /// Stores a block filled by `fill` (a `block_bytes` buffer), as the most recently used;
    /// returns the hashes evicted to make room. A hash already held is only marked as used.
    pub fn insert(&mut self, hash: BlockHash, fill: impl FnOnce(&mut [u8])) -> Vec<BlockHash> {
        if self.contains(&hash) {
            self.touch_run(&[hash]);
            return Vec::new();
        }
        if self.capacity == 0 {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        while self.blocks.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((data, _)) = self.blocks.remove(&oldest) {
                self.spare = Some(data);
            }
            evicted.push(oldest);
        }
        let mut data = self
            .spare
            .take()
            .unwrap_or_else(|| vec![0; self.block_bytes]);
        fill(&mut data);
        let stamp = self.tick();
        self.blocks.insert(hash, (data, stamp));
        self.order.insert(stamp, hash);
        evicted
    }

    /// Drops every block; returns their hashes.
    pub fn clear(&mut self) -> Vec<BlockHash> {
        self.order.clear();
        let hashes = self.blocks.drain().map(|(h, _)| h).collect();
        self.spare = None;
        hashes
    }

    /// The held hashes, sorted.
    pub fn hashes(&self) -> Vec<BlockHash> {
        let mut h: Vec<BlockHash> = self.blocks.keys().copied().collect();
        h.sort_unstable();
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u8) -> BlockHash {
        BlockHash::from_digest(&[i; 32])
    }

    #[test]
    fn lru_eviction_and_reuse() {
        let mut s = HostStore::new(2, 4);
        assert!(s.insert(hash(1), |b| b.fill(1)).is_empty());
        assert!(s.insert(hash(2), |b| b.fill(2)).is_empty());
        // Using 1 makes 2 the oldest; reading alone does not.
        assert_eq!(s.get(&hash(1)), Some(&[1u8; 4][..]));
        s.touch_run(&[hash(1)]);
        assert_eq!(s.get(&hash(2)), Some(&[2u8; 4][..]));
        assert_eq!(s.insert(hash(3), |b| b.fill(3)), vec![hash(2)]);
        assert!(!s.contains(&hash(2)));
        assert_eq!(s.get(&hash(3)), Some(&[3u8; 4][..]));
        // Inserting a held hash changes nothing but its recency.
        assert!(s.insert(hash(1), |_| panic!("not refilled")).is_empty());
        assert_eq!(s.insert(hash(4), |b| b.fill(4)), vec![hash(3)]);
        assert_eq!(s.hashes(), vec![hash(1), hash(4)]);
        assert_eq!(s.clear().len(), 2);
        assert!(s.is_empty());
    }

    #[test]
    fn a_run_is_given_up_tail_first() {
        let mut s = HostStore::new(4, 1);
        for i in 1..=4 {
            s.insert(hash(i), |b| b.fill(i));
        }
        // Stored in chain order, then marked as a run: 4 is now the oldest, 1 the newest.
        s.touch_run(&[hash(1), hash(2), hash(3), hash(4)]);
        assert_eq!(s.insert(hash(5), |b| b.fill(5)), vec![hash(4)]);
        assert_eq!(s.insert(hash(6), |b| b.fill(6)), vec![hash(3)]);
        // Absent hashes in a run are skipped.
        s.touch_run(&[hash(9), hash(2)]);
        assert_eq!(s.insert(hash(7), |b| b.fill(7)), vec![hash(1)]);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut s = HostStore::new(0, 4);
        assert!(s.insert(hash(1), |b| b.fill(1)).is_empty());
        assert!(s.is_empty());
    }
}
