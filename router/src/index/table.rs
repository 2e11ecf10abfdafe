//! One shard of the key table: router block key -> the pods holding that block (with their
//! tiers), with a cap on keys and a cap on pods per key.
//!
//! Key eviction is CLOCK (second chance), the usual constant-time LRU approximation: lookups
//! and stores to a key already present set its reference bit (a new key starts clear, so a
//! block nobody asked for again goes first); at the cap a hand sweeps the slots, clearing set
//! bits and evicting the first key found clear. Unlike a linked LRU list, a lookup writes only
//! to its own slot, so scoring a long prompt costs one or two cache misses per block, and the
//! first pods of a key live inline in its slot.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use smallvec::SmallVec;

/// Hasher for keys that are already hashes: one multiply spreads them over hashbrown's bits.
#[derive(Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = mix(v);
    }
}

pub(crate) type MixState = BuildHasherDefault<MixHasher>;

pub(crate) fn mix(v: u64) -> u64 {
    (v ^ (v >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A pod's presence on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PodSlot {
    pub pod: u32,
    /// Tier bits (see `Tier`).
    pub tiers: u8,
    /// Table clock when this pod last stored the block; compared by wrapping age, so the
    /// 32-bit clock may wrap.
    stored: u32,
}

/// Most keys are on one to three pods: two fit inline.
type Pods = SmallVec<[PodSlot; 2]>;

struct Slot {
    key: u64,
    live: bool,
    referenced: bool,
    pods: Pods,
}

pub(crate) struct KeyTable {
    map: HashMap<u64, u32, MixState>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    hand: usize,
    max_keys: usize,
    max_pods: usize,
    clock: u32,
    /// Pod entries over all keys.
    entries: usize,
}

impl KeyTable {
    pub fn new(max_keys: usize, max_pods: usize) -> Self {
        Self {
            map: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            max_keys,
            max_pods,
            clock: 0,
            entries: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The pods holding `key`, marking it used.
    pub fn get(&mut self, key: u64) -> Option<&[PodSlot]> {
        let idx = *self.map.get(&key)?;
        let slot = &mut self.slots[idx as usize];
        slot.referenced = true;
        Some(&slot.pods)
    }

    /// Records that `pod` holds `key` in the tiers `tiers`. At the pods-per-key cap the pod that
    /// stored the block longest ago gives way; at the key cap CLOCK picks a key to evict.
    pub fn add(&mut self, key: u64, pod: u32, tiers: u8) {
        self.clock = self.clock.wrapping_add(1);
        let idx = match self.map.get(&key) {
            Some(&idx) => {
                self.slots[idx as usize].referenced = true;
                idx
            }
            None => {
                if self.map.len() >= self.max_keys {
                    self.evict();
                }
                let idx = self.alloc(key);
                self.map.insert(key, idx);
                idx
            }
        };
        let clock = self.clock;
        let pods = &mut self.slots[idx as usize].pods;
        if let Some(s) = pods.iter_mut().find(|s| s.pod == pod) {
            s.tiers |= tiers;
            s.stored = clock;
            return;
        }
        if pods.len() >= self.max_pods {
            if let Some(stalest) =
                (0..pods.len()).max_by_key(|&i| clock.wrapping_sub(pods[i].stored))
            {
                pods.swap_remove(stalest);
                self.entries -= 1;
            }
        }
        pods.push(PodSlot {
            pod,
            tiers,
            stored: clock,
        });
        self.entries += 1;
    }

    /// Clears `tiers` of `pod` on `key`; the pod leaves the key when no tier is left, the key
    /// leaves the table when no pod is left.
    pub fn remove(&mut self, key: u64, pod: u32, tiers: u8) {
        let Some(&idx) = self.map.get(&key) else {
            return;
        };
        let pods = &mut self.slots[idx as usize].pods;
        let Some(i) = pods.iter().position(|s| s.pod == pod) else {
            return;
        };
        pods[i].tiers &= !tiers;
        if pods[i].tiers == 0 {
            pods.swap_remove(i);
            self.entries -= 1;
        }
        if pods.is_empty() {
            self.map.remove(&key);
            self.release(idx);
        }
    }

    /// CLOCK: the first live slot from the hand with its reference bit clear goes; set bits
    /// are cleared on the way (at most two sweeps).
    fn evict(&mut self) {
        for _ in 0..2 * self.slots.len() {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let slot = &mut self.slots[i];
            if !slot.live {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let key = slot.key;
            self.entries -= slot.pods.len();
            self.map.remove(&key);
            self.release(i as u32);
            return;
        }
    }

    fn alloc(&mut self, key: u64) -> u32 {
        let slot = Slot {
            key,
            live: true,
            referenced: false,
            pods: Pods::new(),
        };
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx as usize] = slot;
                idx
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        slot.live = false;
        // Drop a spilled pod list now rather than when the slot is reused.
        slot.pods = Pods::new();
        self.free.push(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(t: &mut KeyTable, key: u64) -> Vec<(u32, u8)> {
        let mut v: Vec<_> = t
            .get(key)
            .map(|p| p.iter().map(|s| (s.pod, s.tiers)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn add_remove_tiers() {
        let mut t = KeyTable::new(10, 10);
        t.add(1, 7, 0b001);
        t.add(1, 7, 0b010);
        t.add(1, 8, 0b001);
        assert_eq!(pods(&mut t, 1), vec![(7, 0b011), (8, 0b001)]);
        assert_eq!((t.len(), t.entries()), (1, 2));
        t.remove(1, 7, 0b001);
        assert_eq!(pods(&mut t, 1), vec![(7, 0b010), (8, 0b001)]);
        t.remove(1, 7, 0b010);
        t.remove(1, 8, 0b100); // a tier it does not hold: no change
        assert_eq!(pods(&mut t, 1), vec![(8, 0b001)]);
        t.remove(1, 8, 0b111);
        assert_eq!((t.len(), t.entries()), (0, 0));
        assert!(t.get(1).is_none());
        t.remove(1, 8, 0b111); // absent key: no-op
    }

    #[test]
    fn clock_evicts_a_key_not_used_since_the_last_sweep() {
        let mut t = KeyTable::new(3, 10);
        t.add(1, 0, 1);
        t.add(2, 0, 1);
        t.add(3, 0, 1);
        // None used since stored: the hand evicts the first, 1.
        t.add(4, 0, 1);
        assert!(t.get(1).is_none());
        assert_eq!(t.len(), 3);
        // 2 and 3 are unreferenced now; using 2 gives it a second chance, so 3 goes.
        assert!(t.get(2).is_some());
        t.add(5, 0, 1);
        assert!(t.get(3).is_none());
        for k in [2, 4, 5] {
            assert!(t.get(k).is_some(), "key {k}");
        }
        assert_eq!(t.entries(), 3);
        // Freed slots are reused.
        t.remove(4, 0, 1);
        t.add(6, 0, 1);
        assert_eq!(t.slots.len(), 3);
        // Stores to present keys count as use; with every key used the hand clears all bits and
        // evicts where it started (slot 0, key 6).
        for k in [2, 5, 6] {
            t.add(k, 1, 1);
        }
        t.add(7, 0, 1);
        assert_eq!(t.len(), 3);
        assert!(t.get(6).is_none());
        assert!(t.get(7).is_some());
    }

    #[test]
    fn pod_ages_survive_clock_wrap() {
        let mut t = KeyTable::new(10, 2);
        t.clock = u32::MAX - 1;
        t.add(1, 10, 1); // stored at u32::MAX
        t.add(1, 11, 1); // stored at 0 after the wrap
        t.add(1, 12, 1); // the oldest store (pod 10) gives way
        assert_eq!(pods(&mut t, 1), vec![(11, 1), (12, 1)]);
    }

    #[test]
    fn pods_per_key_cap_evicts_stalest_store() {
        let mut t = KeyTable::new(10, 2);
        t.add(1, 10, 1);
        t.add(1, 11, 1);
        t.add(1, 10, 2); // pod 10 stores again: pod 11 is now the stalest
        t.add(1, 12, 1);
        assert_eq!(pods(&mut t, 1), vec![(10, 3), (12, 1)]);
        assert_eq!(t.entries(), 2);
    }
}
