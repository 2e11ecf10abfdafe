//! The prefix index (llm-d's kvblock index, Dynamo's kv-router indexer): which pod holds which
//! prompt blocks, fed by the pods' KV events and queried per request with the router's own block
//! keys (see `keys` for their exact definition).
//!
//! Events name blocks by engine hash; the index maps each pod's engine hashes to router keys
//! computed from `BlockStored.token_ids` and the parent's router key (looked up by the parent's
//! engine hash for that pod, or the model root when the parent is None), so the engine's hash
//! algorithm and seed never matter. Both hash forms map to one engine key: a 32-byte digest to
//! its last 8 bytes read big-endian, which is exactly vLLM's 64-bit form of the same digest.
//!
//! Concurrency: pods' engine maps each have their own lock and the key table is split into
//! shards by key, so ingesting different pods and scoring run side by side. A pod's events must
//! be applied in order (the `events` module keeps one ordered stream per pod).
//!
//! Memory is bounded: approximate LRU over keys (CLOCK, see `table`) at `max_keys`,
//! `max_pods_per_key` pods per key (the pod whose store is the oldest gives way), and an engine
//! map per pod holding only blocks the pod has not removed, at most `max_blocks_per_pod` (new
//! blocks beyond it are refused and counted: a pod, or a publisher spoofing one, cannot grow
//! the router without bound).
//!
//! Storage groups (ours, beyond llm-d): pods that mount one shared storage tier (a volume of
//! block files) declare the same group. Their STORAGE-medium events go to the group's own
//! engine map and key entries rather than the pod's, so a block any member wrote counts for
//! every member: a pod that never saw a prefix can still win it from the shared volume. A
//! group lives while it has members; a member's restart keeps it (the files outlive the
//! engine). Known limit: two engine hashes of one
//! pod with the same router key (identical content under two engine hashes) share one entry, so
//! removing one clears both.

mod keys;
pub mod routed;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use kvevents::{BlockRemoved, BlockStored, EventBatch, ExternalBlockHash, KvEvent};

pub use keys::{block_keys, chain_key, root_key};
use table::{mix, KeyTable, MixState};

/// Storage tiers as the events' `medium` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Gpu,
    Cpu,
    Storage,
}

impl Tier {
    /// `None` is the GPU (vLLM before tiers); names are matched case-insensitively and unknown
    /// ones (an offloading backend's own tier names) count as storage.
    pub fn from_medium(medium: Option<&str>) -> Self {
        match medium {
            None => Self::Gpu,
            Some(m) if m.eq_ignore_ascii_case("GPU") => Self::Gpu,
            Some(m) if m.eq_ignore_ascii_case("CPU") => Self::Cpu,
            Some(_) => Self::Storage,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Gpu => 1,
            Self::Cpu => 2,
            Self::Storage => 4,
        }
    }
}

/// Weight of a matched block by the best tier holding it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierWeights {
    pub gpu: f64,
    pub cpu: f64,
    pub storage: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        Self {
            gpu: 1.0,
            cpu: 0.8,
            storage: 0.5,
        }
    }
}

impl TierWeights {
    /// Best weight for every tier-bit combination.
    fn table(&self) -> [f64; 8] {
        let mut t = [0.0; 8];
        for (mask, w) in t.iter_mut().enumerate() {
            for (tier, weight) in [
                (Tier::Gpu, self.gpu),
                (Tier::Cpu, self.cpu),
                (Tier::Storage, self.storage),
            ] {
                if mask as u8 & tier.bit() != 0 && weight > *w {
                    *w = weight;
                }
            }
        }
        t
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexConfig {
    /// Model name: seeds the key chain.
    pub model: String,
    /// Tokens per block; must equal the engines' block size.
    pub block_size: usize,
    pub max_keys: usize,
    pub max_pods_per_key: usize,
    /// Engine hashes mapped per pod; far above a real pod's blocks (all tiers) at the default.
    pub max_blocks_per_pod: usize,
    pub tier_weights: TierWeights,
    /// Key-table shards (locks).
    pub shards: usize,
}

impl IndexConfig {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            block_size: 16,
            max_keys: 1 << 22,
            max_pods_per_key: 10,
            max_blocks_per_pod: 1 << 21,
            tier_weights: TierWeights::default(),
            shards: 64,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("tier weight {0} is not in [0, 1]")]
    Weight(f64),
}

/// A pod's match for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PodMatch {
    pub pod: Arc<str>,
    /// Leading blocks of the prompt the pod holds (any tier).
    pub blocks: usize,
    /// Tier-weighted leading blocks / prompt blocks, in [0, 1].
    pub score: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub pods: usize,
    /// Router keys held.
    pub keys: usize,
    /// (key, pod) pairs over all keys.
    pub pod_entries: usize,
    /// Engine hashes mapped, over all pods and storage groups.
    pub engine_hashes: usize,
    /// Stored blocks that could not be mapped: unknown engine hash of an offloaded block or of a
    /// parent, or token ids that do not fit the block size.
    pub unresolved_blocks: u64,
    /// New blocks not mapped because their pod was at `max_blocks_per_pod`.
    pub refused_blocks: u64,
}

/// What a pod's engine hash stands for.
#[derive(Clone, Copy)]
struct Mapped {
    key: u64,
    tiers: u8,
}

struct EngineMap {
    map: HashMap<u64, Mapped, MixState>,
    /// Set under this lock when the pod leaves, so a late batch cannot re-add entries.
    removed: bool,
    /// The pod's storage group, whose map takes its STORAGE-medium blocks (lock order: a
    /// pod's map, then its group's).
    group: Option<Arc<PodState>>,
}

impl EngineMap {
    fn new() -> Self {
        Self {
            map: HashMap::default(),
            removed: false,
            group: None,
        }
    }
}

/// A pod, or a storage group (an id in the key table like a pod's, never a routing target).
struct PodState {
    id: u32,
    name: Arc<str>,
    engine: Mutex<EngineMap>,
}

#[derive(Default)]
struct Registry {
    by_name: HashMap<Arc<str>, Arc<PodState>>,
    by_id: HashMap<u32, Arc<str>>,
    groups: HashMap<Arc<str>, Arc<PodState>>,
    /// Group id -> its member pods' ids.
    members: HashMap<u32, Vec<u32>>,
    /// Pod id -> its group's id.
    group_of: HashMap<u32, u32>,
}

impl Registry {
    /// Takes `pod` out of its group; the group itself when it was the last member.
    fn leave_group(&mut self, pod: u32) -> Option<Arc<PodState>> {
        let group = self.group_of.remove(&pod)?;
        let members = self.members.get_mut(&group)?;
        members.retain(|&m| m != pod);
        if !members.is_empty() {
            return None;
        }
        self.members.remove(&group);
        let name = self
            .groups
            .iter()
            .find(|(_, g)| g.id == group)
            .map(|(n, _)| n.clone())?;
        self.groups.remove(&name)
    }
}

pub struct PrefixIndex {
    root: u64,
    block_size: usize,
    weights: [f64; 8],
    shards: Box<[Mutex<KeyTable>]>,
    pods: RwLock<Registry>,
    next_pod: AtomicU32,
    unresolved: AtomicU64,
    max_blocks_per_pod: usize,
    refused: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these tables structurally broken (every update
    // is a few field writes), so keep serving rather than propagate the poison.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Both hash forms as one engine key (see the module header).
fn engine_key(h: &ExternalBlockHash) -> u64 {
    match h {
        ExternalBlockHash::Int(v) => *v,
        ExternalBlockHash::Bytes(b) => {
            let tail = &b[b.len().saturating_sub(8)..];
            tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        }
    }
}

impl PrefixIndex {
    pub fn new(cfg: IndexConfig) -> Result<Self, IndexConfigError> {
        for (name, v) in [
            ("block_size", cfg.block_size),
            ("max_keys", cfg.max_keys),
            ("max_pods_per_key", cfg.max_pods_per_key),
            ("max_blocks_per_pod", cfg.max_blocks_per_pod),
            ("shards", cfg.shards),
        ] {
            if v == 0 {
                return Err(IndexConfigError::Zero(name));
            }
        }
        let w = cfg.tier_weights;
        for v in [w.gpu, w.cpu, w.storage] {
            if !(0.0..=1.0).contains(&v) {
                return Err(IndexConfigError::Weight(v));
            }
        }
        let per_shard = cfg.max_keys.div_ceil(cfg.shards);
        Ok(Self {
            root: root_key(&cfg.model),
            block_size: cfg.block_size,
            weights: w.table(),
            shards: (0..cfg.shards)
                .map(|_| Mutex::new(KeyTable::new(per_shard, cfg.max_pods_per_key)))
                .collect(),
            pods: RwLock::new(Registry::default()),
            next_pod: AtomicU32::new(0),
            unresolved: AtomicU64::new(0),
            max_blocks_per_pod: cfg.max_blocks_per_pod,
            refused: AtomicU64::new(0),
        })
    }

    /// The router keys of the full blocks of a prompt; `cache_salt` is the request's (its
    /// first block is keyed with it, as the engine does).
    pub fn block_keys(&self, tokens: &[u32], cache_salt: Option<&str>) -> Vec<u64> {
        block_keys(self.root, self.block_size, tokens, cache_salt)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, KeyTable> {
        // High bits: the table's hash map uses the low ones of the same mix.
        lock(&self.shards[(mix(key) >> 40) as usize % self.shards.len()])
    }

    fn pod(&self, name: &str) -> Arc<PodState> {
        if let Some(p) = self
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .get(name)
        {
            return p.clone();
        }
        let mut reg = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = reg.by_name.get(name) {
            return p.clone();
        }
        let state = self.new_state(name);
        reg.by_id.insert(state.id, state.name.clone());
        reg.by_name.insert(state.name.clone(), state.clone());
        state
    }

    fn new_state(&self, name: &str) -> Arc<PodState> {
        Arc::new(PodState {
            id: self.next_pod.fetch_add(1, Ordering::Relaxed),
            name: name.into(),
            engine: Mutex::new(EngineMap::new()),
        })
    }

    /// Puts `pod` in the storage group `group` (none: out of any), registering either on first
    /// sight. Set it before the pod's events flow: STORAGE blocks already mapped stay the pod's.
    pub fn set_storage_group(&self, pod: &str, group: Option<&str>) {
        let known = || {
            self.pods
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .by_name
                .get(pod)
                .cloned()
        };
        let state = match group {
            Some(_) => self.pod(pod),
            // Out of any group: a pod not seen yet stays unregistered.
            None => match known() {
                Some(state) => state,
                None => return,
            },
        };
        let (joined, dropped) = {
            let mut reg = self.pods.write().unwrap_or_else(PoisonError::into_inner);
            let dropped = reg.leave_group(state.id);
            let joined = group.map(|name| {
                let g = match reg.groups.get(name) {
                    Some(g) => g.clone(),
                    None => {
                        let g = self.new_state(name);
                        reg.groups.insert(g.name.clone(), g.clone());
                        g
                    }
                };
                reg.group_of.insert(state.id, g.id);
                reg.members.entry(g.id).or_default().push(state.id);
                g
            });
            (joined, dropped)
        };
        lock(&state.engine).group = joined;
        if let Some(g) = dropped {
            self.drop_state(&g);
        }
    }

    /// Clears a pod or group that left the registry; late events for it are ignored.
    fn drop_state(&self, state: &PodState) {
        let mut engine = lock(&state.engine);
        engine.removed = true;
        engine.group = None;
        self.clear_locked(state.id, &mut engine);
    }

    /// Applies one event of `pod` (registering the pod on first sight).
    pub fn apply(&self, pod: &str, event: &KvEvent) {
        let state = self.pod(pod);
        let mut engine = lock(&state.engine);
        self.apply_locked(state.id, &mut engine, event);
    }

    /// Applies a batch's events in order under one lock of the pod.
    pub fn apply_batch(&self, pod: &str, batch: &EventBatch) {
        let state = self.pod(pod);
        let mut engine = lock(&state.engine);
        for event in &batch.events {
            self.apply_locked(state.id, &mut engine, event);
        }
    }

    fn apply_locked(&self, pod: u32, engine: &mut EngineMap, event: &KvEvent) {
        if engine.removed {
            return;
        }
        match event {
            KvEvent::BlockStored(e) => self.stored(pod, engine, e),
            KvEvent::BlockRemoved(e) => self.removed(pod, engine, e),
            KvEvent::AllBlocksCleared => self.clear_locked(pod, engine),
            KvEvent::Unknown(_) => {}
        }
    }

    fn stored(&self, pod: u32, engine: &mut EngineMap, e: &BlockStored) {
        let tier = Tier::from_medium(e.medium.as_deref());
        match engine.group.clone() {
            Some(group) if tier == Tier::Storage => {
                let mut shared = lock(&group.engine);
                if !shared.removed {
                    self.stored_into(group.id, &mut shared, Some(&*engine), tier.bit(), e);
                }
            }
            _ => self.stored_into(pod, engine, None, tier.bit(), e),
        }
    }

    /// Maps `e`'s blocks into `target` (the pod's own map, or its group's with the pod's map as
    /// `also`, where the tokens of blocks the pod announced first are found).
    fn stored_into(
        &self,
        pod: u32,
        target: &mut EngineMap,
        also: Option<&EngineMap>,
        tier: u8,
        e: &BlockStored,
    ) {
        let known = |target: &EngineMap, ek: u64| {
            target
                .map
                .get(&ek)
                .or_else(|| also.and_then(|a| a.map.get(&ek)))
                .map(|m| m.key)
        };
        if e.token_ids.is_empty() {
            // An offloaded copy: the tokens are known from the block's first store.
            for h in &e.block_hashes {
                let ek = engine_key(h);
                let Some(key) = known(target, ek) else {
                    self.unresolved.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if target.map.len() >= self.max_blocks_per_pod && !target.map.contains_key(&ek) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                target
                    .map
                    .entry(ek)
                    .or_insert(Mapped { key, tiers: 0 })
                    .tiers |= tier;
                self.shard(key).add(key, pod, tier);
            }
            return;
        }
        let engine = target;
        let bs = self.block_size;
        let parent = match &e.parent_block_hash {
            None => Some(self.root),
            Some(h) => known(engine, engine_key(h)),
        };
        let (Some(mut parent), true) = (parent, e.token_ids.len() == e.block_hashes.len() * bs)
        else {
            self.unresolved
                .fetch_add(e.block_hashes.len() as u64, Ordering::Relaxed);
            return;
        };
        for (i, h) in e.block_hashes.iter().enumerate() {
            let extra = e
                .extra_keys
                .as_ref()
                .and_then(|per_block| per_block.get(i))
                .and_then(|x| x.as_deref());
            let key = chain_key(parent, &e.token_ids[i * bs..(i + 1) * bs], extra);
            let ek = engine_key(h);
            if engine.map.len() >= self.max_blocks_per_pod && !engine.map.contains_key(&ek) {
                // The rest of the chain hangs off this block: refused with it.
                let refused = e.block_hashes.len() - i;
                self.refused.fetch_add(refused as u64, Ordering::Relaxed);
                return;
            }
            let m = engine.map.entry(ek).or_insert(Mapped { key, tiers: 0 });
            if m.key != key {
                // The engine reused a hash for other content (a restart the stream did not
                // show): forget the old block.
                self.shard(m.key).remove(m.key, pod, m.tiers);
                *m = Mapped { key, tiers: 0 };
            }
            m.tiers |= tier;
            self.shard(key).add(key, pod, tier);
            parent = key;
        }
    }

    fn removed(&self, pod: u32, engine: &mut EngineMap, e: &BlockRemoved) {
        let tier = Tier::from_medium(e.medium.as_deref());
        if let (Some(group), Tier::Storage) = (engine.group.clone(), tier) {
            // A shared file is gone for every member, whoever wrote it.
            let mut shared = lock(&group.engine);
            self.removed_from(group.id, &mut shared, tier.bit(), e);
        }
        self.removed_from(pod, engine, tier.bit(), e);
    }

    fn removed_from(&self, pod: u32, engine: &mut EngineMap, tier: u8, e: &BlockRemoved) {
        for h in &e.block_hashes {
            let ek = engine_key(h);
            let Some(m) = engine.map.get_mut(&ek) else {
                continue;
            };
            if m.tiers & tier == 0 {
                continue;
            }
            m.tiers &= !tier;
            self.shard(m.key).remove(m.key, pod, tier);
            if m.tiers == 0 {
                engine.map.remove(&ek);
            }
        }
    }

    fn clear_locked(&self, pod: u32, engine: &mut EngineMap) {
        for (_, m) in engine.map.drain() {
            self.shard(m.key).remove(m.key, pod, m.tiers);
        }
    }

    /// Forgets everything `pod` holds (AllBlocksCleared, an engine restart, lost events).
    pub fn clear_pod(&self, pod: &str) {
        let state = self
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .get(pod)
            .cloned();
        if let Some(state) = state {
            let mut engine = lock(&state.engine);
            self.clear_locked(state.id, &mut engine);
        }
    }

    /// Clears `pod` and drops it from the index; events still in flight for it are ignored.
    pub fn remove_pod(&self, pod: &str) {
        let (state, group) = {
            let mut reg = self.pods.write().unwrap_or_else(PoisonError::into_inner);
            let state = reg.by_name.remove(pod);
            let group = state.as_ref().and_then(|s| {
                reg.by_id.remove(&s.id);
                reg.leave_group(s.id)
            });
            (state, group)
        };
        for s in state.iter().chain(&group) {
            self.drop_state(s);
        }
    }

    /// Per pod holding the prompt's first block (itself or through its storage group): the
    /// run of leading blocks it holds and its tier-weighted score (weighted run / prompt
    /// blocks). Pods absent from the result hold no leading block (score 0). Walks the blocks
    /// in order and stops at the first one no candidate holds.
    pub fn longest_prefix(&self, keys: &[u64]) -> Vec<PodMatch> {
        struct Run {
            pod: u32,
            blocks: usize,
            weight: f64,
            open: bool,
        }
        let reg = self.pods.read().unwrap_or_else(PoisonError::into_inner);
        let grouped = !reg.group_of.is_empty();
        let mut runs: Vec<Run> = Vec::new();
        for (i, &key) in keys.iter().enumerate() {
            let mut shard = self.shard(key);
            let Some(slots) = shard.get(key) else {
                break;
            };
            if i == 0 {
                // Only pods holding the first block can have a run; a group's slot stands for
                // each of its members.
                let mut first: Vec<(u32, u8)> = Vec::with_capacity(slots.len());
                for s in slots {
                    let members = match reg.members.get(&s.pod) {
                        Some(members) => members.as_slice(),
                        None => std::slice::from_ref(&s.pod),
                    };
                    for &pod in members {
                        match first.iter_mut().find(|(p, _)| *p == pod) {
                            Some((_, tiers)) => *tiers |= s.tiers,
                            None => first.push((pod, s.tiers)),
                        }
                    }
                }
                runs.extend(first.into_iter().map(|(pod, tiers)| Run {
                    pod,
                    blocks: 1,
                    weight: self.weights[tiers as usize & 7],
                    open: true,
                }));
                continue;
            }
            let mut any = false;
            for run in runs.iter_mut().filter(|r| r.open) {
                let held = |id: u32| slots.iter().find(|s| s.pod == id).map(|s| s.tiers);
                let mut tiers = held(run.pod);
                if grouped {
                    if let Some(shared) = reg.group_of.get(&run.pod).and_then(|&g| held(g)) {
                        tiers = Some(tiers.unwrap_or(0) | shared);
                    }
                }
                match tiers {
                    Some(t) => {
                        run.blocks += 1;
                        run.weight += self.weights[t as usize & 7];
                        any = true;
                    }
                    None => run.open = false,
                }
            }
            if !any {
                break;
            }
        }
        runs.into_iter()
            .filter_map(|r| {
                Some(PodMatch {
                    pod: reg.by_id.get(&r.pod)?.clone(),
                    blocks: r.blocks,
                    score: r.weight / keys.len() as f64,
                })
            })
            .collect()
    }

    /// Names of the pods the index knows.
    pub fn pods(&self) -> Vec<Arc<str>> {
        let reg = self.pods.read().unwrap_or_else(PoisonError::into_inner);
        reg.by_name.values().map(|p| p.name.clone()).collect()
    }

    pub fn stats(&self) -> IndexStats {
        let (pods, engine_hashes) = {
            let reg = self.pods.read().unwrap_or_else(PoisonError::into_inner);
            let hashes = reg
                .by_name
                .values()
                .chain(reg.groups.values())
                .map(|p| lock(&p.engine).map.len())
                .sum();
            (reg.by_name.len(), hashes)
        };
        let (mut keys, mut pod_entries) = (0, 0);
        for s in self.shards.iter() {
            let s = lock(s);
            keys += s.len();
            pod_entries += s.entries();
        }
        IndexStats {
            pods,
            keys,
            pod_entries,
            engine_hashes,
            unresolved_blocks: self.unresolved.load(Ordering::Relaxed),
            refused_blocks: self.refused.load(Ordering::Relaxed),
        }
    }
}
