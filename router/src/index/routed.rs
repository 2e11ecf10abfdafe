//! The Inference Gateway's approximate prefix cache (`prefix-cache-scorer`): which prompt blocks
//! this router has sent to which pod, learned from its own routing decisions instead of the
//! pods' KV events. Each pod keeps its `lruCapacityPerServer` most recently routed blocks; a
//! prompt scores on a pod by the share of its leading blocks (at most `maxPrefixBlocksToMatch`)
//! routed there. Keys are the precise index's block keys, so a block here is a pod's KV block.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// llm-d's `maxPrefixBlocksToMatch` default.
pub const DEFAULT_MAX_PREFIX_BLOCKS: usize = 256;
/// llm-d's `lruCapacityPerServer` default.
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: usize = 31_250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedConfig {
    pub max_prefix_blocks: usize,
    pub lru_capacity_per_server: usize,
}

impl Default for RoutedConfig {
    fn default() -> Self {
        Self {
            max_prefix_blocks: DEFAULT_MAX_PREFIX_BLOCKS,
            lru_capacity_per_server: DEFAULT_LRU_CAPACITY_PER_SERVER,
        }
    }
}

/// One pod's routed blocks in recency order.
#[derive(Debug, Default)]
struct PodLru {
    /// Key → its last use.
    stamps: HashMap<u64, u64>,
    /// Last use → key; the first entry is the least recently routed.
    order: BTreeMap<u64, u64>,
}

impl PodLru {
    fn touch(&mut self, key: u64, stamp: u64, capacity: usize) {
        if let Some(old) = self.stamps.insert(key, stamp) {
            self.order.remove(&old);
        }
        self.order.insert(stamp, key);
        while self.stamps.len() > capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.stamps.remove(&oldest);
        }
    }

    fn leading(&self, keys: &[u64]) -> usize {
        keys.iter()
            .take_while(|k| self.stamps.contains_key(k))
            .count()
    }
}

#[derive(Debug, Default)]
struct Inner {
    pods: HashMap<String, PodLru>,
    clock: u64,
}

/// The routing history, shared by the request handlers.
#[derive(Debug)]
pub struct RoutedPrefixes {
    cfg: RoutedConfig,
    inner: Mutex<Inner>,
}

impl RoutedPrefixes {
    pub fn new(cfg: RoutedConfig) -> Self {
        Self {
            cfg,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere leaves consistent maps (every update completes under the lock).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The blocks of a prompt this scorer looks at.
    pub fn truncate<'a>(&self, keys: &'a [u64]) -> &'a [u64] {
        &keys[..keys.len().min(self.cfg.max_prefix_blocks)]
    }

    /// Per pod in `pods`, the share of `keys` (already truncated) whose leading blocks were
    /// routed to it; 0 for every pod when there are no full blocks.
    pub fn scores<'p>(&self, keys: &[u64], pods: impl IntoIterator<Item = &'p str>) -> Vec<f64> {
        let inner = self.lock();
        pods.into_iter()
            .map(|pod| match (keys.len(), inner.pods.get(pod)) {
                (0, _) | (_, None) => 0.0,
                (n, Some(lru)) => lru.leading(keys) as f64 / n as f64,
            })
            .collect()
    }

    /// Records that `keys` (already truncated) went to `pod`: its cache now holds them.
    pub fn record(&self, pod: &str, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        let capacity = self.cfg.lru_capacity_per_server;
        let mut inner = self.lock();
        let Inner { pods, clock } = &mut *inner;
        let lru = pods.entry(pod.to_string()).or_default();
        // The prompt's first block is touched last, so a prefix is evicted from its end.
        for &key in keys.iter().rev() {
            *clock += 1;
            lru.touch(key, *clock, capacity);
        }
    }

    /// Forgets a pod that left or restarted (its cache is gone).
    pub fn forget(&self, pod: &str) {
        self.lock().pods.remove(pod);
    }

    /// Blocks held for `pod`.
    pub fn len(&self, pod: &str) -> usize {
        self.lock().pods.get(pod).map_or(0, |l| l.stamps.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(max_prefix_blocks: usize, lru_capacity_per_server: usize) -> RoutedPrefixes {
        RoutedPrefixes::new(RoutedConfig {
            max_prefix_blocks,
            lru_capacity_per_server,
        })
    }

    #[test]
    fn scores_are_the_routed_share_of_leading_blocks() {
        let r = routed(256, 100);
        r.record("a", &[1, 2, 3, 4]);
        r.record("b", &[1, 9]);
        let pods = ["a", "b", "c"];
        assert_eq!(r.scores(&[1, 2, 3, 4], pods), vec![1.0, 0.25, 0.0]);
        // Only the leading run counts: a gap ends the match.
        assert_eq!(r.scores(&[1, 7, 3, 4], pods), vec![0.25, 0.25, 0.0]);
        assert_eq!(r.scores(&[], pods), vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn capacity_evicts_least_recently_routed_from_the_prefix_end() {
        let r = routed(256, 3);
        r.record("a", &[1, 2, 3]);
        r.record("a", &[1, 5]);
        assert_eq!(r.len("a"), 3);
        // 1 and 5 are fresh; of 2 and 3, 3 (the older end of the first prompt) went first.
        assert_eq!(r.scores(&[1, 2], ["a"]), vec![1.0]);
        assert_eq!(r.scores(&[1, 2, 3], ["a"]), vec![2.0 / 3.0]);
        assert_eq!(r.scores(&[1, 5], ["a"]), vec![1.0]);
    }

    #[test]
    fn truncation_and_forgetting() {
        let r = routed(2, 100);
        let keys = [1, 2, 3, 4];
        let head = r.truncate(&keys);
        assert_eq!(head, &[1, 2]);
        r.record("a", head);
        assert_eq!(r.scores(r.truncate(&[1, 2, 8, 9]), ["a"]), vec![1.0]);
        r.forget("a");
        assert_eq!(r.scores(head, ["a"]), vec![0.0]);
        assert_eq!(r.len("a"), 0);
    }
}
