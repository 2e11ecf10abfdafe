//! The CPU tier, as vLLM's native offloading (`OffloadingConnector` with `CPUOffloadingSpec`)
//! behaves: after each forward pass the newly completed prompt blocks (all blocks with
//! `offload_prompt_only` off) are copied into a host-memory store keyed by their chained hash;
//! when a request's prefix runs past the device hit, the longest run of further blocks the
//! store holds is copied back into the request's fresh device blocks before its forward pass,
//! and counts as computed.
//!
//! Events: `BlockStored` / `BlockRemoved` with medium CPU, one per block; by default in vLLM's
//! placeholder form (only the block's hash), or self-describing (parent, tokens, block size).
//!
//! Copies are block memcpys between host buffers on the engine thread: with the CPU executor
//! both sides are host memory, so there is no transfer to overlap; a device executor would run
//! them on its copy stream behind the same calls.
//!
//! With a storage tier below (vLLM's `TieringOffloadingSpec` with an `fs` secondary tier),
//! every block stored here is also written to a file, off the engine thread; a lookup goes on
//! past the CPU run with file-exists checks on the tier's reader threads (the answer comes a
//! step or more later; the request waits, others run), and when files are needed the load is
//! asynchronous: the files are read by the storage tier's threads and copied into the device
//! blocks in the `start_load_kv` of the step they arrive in. Events for files carry medium
//! STORAGE: stores for the files this agent wrote (others' files on a shared volume are theirs
//! to announce), removals for every file its sweeper removes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Instant, SystemTime};

use kvcache::{
    BlockHash, BlockId, BlockIo, ConnectorRequest, ConnectorStats, Direction, ExternalHit,
    FinishedAction, FinishedLoad, FinishedRequest, KvCacheEvent, KvConnector, Medium,
    ScheduledBlocks, Transfer,
};

use crate::files::chain_time;
use crate::host_store::HostStore;
use crate::storage::{Done, StorageTier};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuOffloadConfig {
    /// Host memory for the store (`cpu_bytes_to_use`).
    pub cpu_bytes: u64,
    /// Store prompt blocks only (vLLM's default), or generated ones too.
    pub offload_prompt_only: bool,
    /// Events carry the block's parent, tokens and size instead of its hash alone.
    pub self_describing_events: bool,
    /// A storage tier below, started by the caller ([`CpuOffloadConnector::with_storage`]).
    pub storage: Option<crate::storage::FsTierConfig>,
}

/// One block to copy out after the forward pass.
#[derive(Debug)]
struct Save {
    block: BlockId,
    hash: BlockHash,
    parent: Option<BlockHash>,
    /// The block's tokens (self-describing events only).
    tokens: Vec<u32>,
    /// The use time its file gets (see `files`).
    used: SystemTime,
}

pub struct CpuOffloadConnector {
    cfg: CpuOffloadConfig,
    block_size: usize,
    block_bytes: usize,
    store: HostStore,
    /// This step's loads: device block ← stored hash.
    loads: Vec<(BlockId, BlockHash)>,
    saves: Vec<Save>,
    /// Per running request, the blocks already handed to a save (or found stored).
    saved_upto: HashMap<String, usize>,
    /// Per running request with saves, when its first ones were made: its files' use time.
    first_saved: HashMap<String, SystemTime>,
    /// This step's requests' runs of blocks, marked used after the saves.
    runs: Vec<Vec<BlockHash>>,
    events: Vec<KvCacheEvent>,
    stats: ConnectorStats,
    transfers: Vec<Transfer>,
    storage: Option<StorageTier>,
    /// Asynchronous loads waiting for their files: the device blocks to fill, and the blocks
    /// of the request's run that came from host memory before them.
    reading: HashMap<String, (Vec<BlockId>, usize)>,
    /// Reads that arrived, for the next `start_load_kv` to copy in.
    arrived: Vec<(String, Vec<Vec<u8>>)>,
    /// File lookups per request: the chain depth they start at, and the answer once in.
    lookups: HashMap<String, (usize, Option<usize>)>,
    landed: Vec<FinishedLoad>,
    /// Files this agent wrote (and announced).
    files_held: BTreeSet<BlockHash>,
    /// Parent and tokens of blocks being written, for self-describing events.
    writing: HashMap<BlockHash, (Option<BlockHash>, Vec<u32>)>,
}

impl CpuOffloadConnector {
    /// A tier of `cfg.cpu_bytes` for blocks of `block_size` tokens, `block_bytes` each; an
    /// error when not even one block fits.
    pub fn new(
        cfg: CpuOffloadConfig,
        block_size: usize,
        block_bytes: usize,
    ) -> Result<Self, String> {
        let capacity = usize::try_from(cfg.cpu_bytes / block_bytes.max(1) as u64).unwrap_or(0);
        if capacity == 0 {
            return Err(format!(
                "the CPU offloading size ({} bytes) holds no KV block of {block_bytes} bytes",
                cfg.cpu_bytes
            ));
        }
        Ok(Self {
            cfg,
            block_size,
            block_bytes,
            store: HostStore::new(capacity, block_bytes),
            loads: Vec::new(),
            saves: Vec::new(),
            saved_upto: HashMap::new(),
            first_saved: HashMap::new(),
            runs: Vec::new(),
            events: Vec::new(),
            stats: ConnectorStats::default(),
            transfers: Vec::new(),
            storage: None,
            reading: HashMap::new(),
            arrived: Vec::new(),
            lookups: HashMap::new(),
            landed: Vec::new(),
            files_held: BTreeSet::new(),
            writing: HashMap::new(),
        })
    }

    /// Adds a storage tier below this one.
    pub fn with_storage(mut self, storage: StorageTier) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Takes in what the storage tier's threads finished (reads wait in `arrived` for the
    /// device).
    fn drain_storage(&mut self) {
        let Some(storage) = &mut self.storage else {
            return;
        };
        for done in storage.poll() {
            match done {
                Done::Written { hash, seconds } => {
                    self.transfers.push(Transfer {
                        medium: Medium::Storage,
                        direction: Direction::Store,
                        bytes: self.block_bytes as u64,
                        seconds,
                    });
                    let (parent, tokens) = self.writing.remove(&hash).unwrap_or_default();
                    if self.files_held.insert(hash) {
                        let event = self.stored_event(hash, parent, tokens, Medium::Storage);
                        self.events.push(event);
                    }
                }
                Done::Evicted(hashes) => {
                    // Every file the sweeper removed is announced, others' too: a router that
                    // groups the pods sharing the volume drops it for all of them (elsewhere,
                    // removing a block a pod never announced changes nothing).
                    for h in &hashes {
                        self.files_held.remove(h);
                    }
                    if !hashes.is_empty() {
                        self.events.push(KvCacheEvent::BlockRemoved {
                            block_hashes: hashes,
                            medium: Medium::Storage,
                        });
                    }
                }
                Done::WriteFailed(hash, _) => {
                    self.writing.remove(&hash);
                    self.stats.store_failures += 1;
                }
                Done::Read {
                    request_id,
                    blocks,
                    corrupt,
                    seconds,
                } => {
                    self.stats.corrupt_blocks += u64::from(corrupt);
                    self.transfers.push(Transfer {
                        medium: Medium::Storage,
                        direction: Direction::Load,
                        bytes: blocks.iter().map(|b| b.len() as u64).sum(),
                        seconds,
                    });
                    self.arrived.push((request_id, blocks));
                }
                Done::Found {
                    request_id,
                    depth,
                    found,
                } => {
                    if let Some((at, answer)) = self.lookups.get_mut(&request_id) {
                        if *at == depth {
                            *answer = Some(found);
                        }
                    }
                }
            }
        }
    }

    /// Copies the arrived reads into their requests' device blocks; returns the bytes.
    fn land_reads(&mut self, device: &mut dyn BlockIo) -> u64 {
        let mut to_device = 0;
        for (request_id, blocks) in std::mem::take(&mut self.arrived) {
            // An aborted request's read lands here too: dropped.
            let Some((targets, from_host)) = self.reading.remove(&request_id) else {
                continue;
            };
            for (block, data) in targets.iter().zip(&blocks) {
                device.write_block(*block, data);
                to_device += data.len() as u64;
            }
            self.landed.push(FinishedLoad {
                request_id,
                num_tokens: (from_host + blocks.len()) * self.block_size,
            });
        }
        to_device
    }

    /// Blocks held, and the most the store holds.
    pub fn usage(&self) -> (usize, usize) {
        (self.store.len(), self.store.capacity())
    }

    fn stored_event(
        &self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: Vec<u32>,
        medium: Medium,
    ) -> KvCacheEvent {
        let describe = self.cfg.self_describing_events;
        KvCacheEvent::BlockStored {
            block_hashes: vec![hash],
            parent_block_hash: parent.filter(|_| describe),
            token_ids: if describe { tokens } else { Vec::new() },
            block_size: if describe { self.block_size } else { 0 },
            lora_name: None,
            extra_keys: None,
            medium,
        }
    }
}

impl KvConnector for CpuOffloadConnector {
    fn get_num_new_matched_tokens(
        &mut self,
        request: &ConnectorRequest<'_>,
        num_computed_tokens: usize,
    ) -> Option<ExternalHit> {
        self.drain_storage();
        let bs = self.block_size;
        let first = num_computed_tokens / bs;
        // Never the last token: its logits are computed.
        let last = (request.token_ids.len().saturating_sub(1) / bs).min(request.block_hashes.len());
        let run = &request.block_hashes[first.min(last)..last];
        let in_memory = run.iter().take_while(|h| self.store.contains(h)).count();
        let on_disk = match &mut self.storage {
            Some(storage) if in_memory < run.len() => {
                // The files past the host run: asked of the readers, answered in a later step.
                let at = first + in_memory;
                match self.lookups.get(request.request_id) {
                    Some(&(depth, Some(found))) if depth == at => found,
                    Some(&(depth, None)) if depth == at => return None,
                    _ => {
                        storage.lookup(request.request_id, run[in_memory..].to_vec(), at);
                        self.lookups
                            .insert(request.request_id.to_string(), (at, None));
                        return None;
                    }
                }
            }
            _ => 0,
        };
        self.stats.primary_queried += run.len() as u64;
        self.stats.primary_hits += in_memory as u64;
        if self.storage.is_some() {
            self.stats.secondary_queried += (run.len() - in_memory) as u64;
            self.stats.secondary_hits += on_disk as u64;
        }
        // Host memory is copied within the step; files are read by the storage tier first.
        Some(ExternalHit {
            num_tokens: (in_memory + on_disk) * bs,
            load_async: on_disk > 0,
        })
    }

    fn update_state_after_alloc(
        &mut self,
        request: &ConnectorRequest<'_>,
        block_ids: &[BlockId],
        num_device_tokens: usize,
        num_external_tokens: usize,
    ) {
        let bs = self.block_size;
        let first = num_device_tokens / bs;
        let n = num_external_tokens / bs;
        let hashes = &request.block_hashes[first..first + n];
        let blocks = &block_ids[first..first + n];
        self.store.touch_run(&request.block_hashes[..first + n]);
        self.lookups.remove(request.request_id);
        // The run found a step ago is still in memory: nothing was stored in between.
        let in_memory = hashes.iter().take_while(|h| self.store.contains(h)).count();
        self.loads.extend(
            blocks
                .iter()
                .copied()
                .zip(hashes.iter().copied())
                .take(in_memory),
        );
        if let (Some(storage), true) = (&mut self.storage, in_memory < n) {
            storage.fetch(
                request.request_id,
                hashes[in_memory..].to_vec(),
                first + in_memory,
            );
            self.reading.insert(
                request.request_id.to_string(),
                (blocks[in_memory..].to_vec(), in_memory),
            );
        }
        self.stats.hit_tokens += num_external_tokens as u64;
        // Blocks that came from the device cache or from here need no save.
        self.saved_upto
            .insert(request.request_id.to_string(), first + n);
    }

    fn build_connector_meta(&mut self, scheduled: &[ScheduledBlocks<'_>]) {
        let bs = self.block_size;
        for s in scheduled {
            let r = &s.request;
            let limit = if self.cfg.offload_prompt_only {
                s.num_computed_tokens.min(r.num_prompt_tokens)
            } else {
                s.num_computed_tokens
            };
            // Blocks whose hash exists yet (a generated block's comes once it is computed).
            let full = (limit / bs)
                .min(r.block_hashes.len())
                .min(s.block_ids.len());
            let from = self.saved_upto.get(r.request_id).copied().unwrap_or(0);
            if full <= from {
                continue;
            }
            let used = match self.first_saved.get(r.request_id) {
                Some(t) => *t,
                None => {
                    // The request's first saves: the files of the prefix it found (here, on
                    // the device or another pod's) become as recent as its own.
                    let now = SystemTime::now();
                    self.first_saved.insert(r.request_id.to_string(), now);
                    if let Some(storage) = &self.storage {
                        let prefix = r.block_hashes[..from].iter().enumerate();
                        storage.touch(prefix.map(|(d, h)| (*h, chain_time(now, d))).collect());
                    }
                    now
                }
            };
            self.runs.push(r.block_hashes[..full].to_vec());
            for i in from..full {
                let tokens = if self.cfg.self_describing_events {
                    r.token_ids[i * bs..(i + 1) * bs].to_vec()
                } else {
                    Vec::new()
                };
                self.saves.push(Save {
                    block: s.block_ids[i],
                    hash: r.block_hashes[i],
                    parent: i.checked_sub(1).map(|p| r.block_hashes[p]),
                    tokens,
                    used: chain_time(used, i),
                });
            }
            self.saved_upto.insert(r.request_id.to_string(), full);
        }
    }

    fn request_finished(&mut self, finished: &FinishedRequest<'_>) -> FinishedAction {
        let request_id = finished.request.request_id;
        self.saved_upto.remove(request_id);
        self.lookups.remove(request_id);
        self.first_saved.remove(request_id);
        self.reading.remove(request_id);
        FinishedAction::default()
    }

    fn start_load_kv(&mut self, device: &mut dyn BlockIo) {
        let start = Instant::now();
        let mut bytes = 0;
        // Lookups and loads happen in the same step, before any save can evict: every hash
        // looked up is still held.
        for (block, hash) in std::mem::take(&mut self.loads) {
            if let Some(data) = self.store.get(&hash) {
                device.write_block(block, data);
                bytes += data.len() as u64;
            }
        }
        self.drain_storage();
        bytes += self.land_reads(device);
        if bytes > 0 {
            self.transfers.push(Transfer {
                medium: Medium::Cpu,
                direction: Direction::Load,
                bytes,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }

    fn get_finished_loads(&mut self) -> Vec<FinishedLoad> {
        std::mem::take(&mut self.landed)
    }

    fn wait_for_save(&mut self, device: &dyn BlockIo) {
        let start = Instant::now();
        // The runs' held blocks first, so this step's stores cannot evict them, and again after,
        // so each run is ordered head last.
        let runs = std::mem::take(&mut self.runs);
        let mut bytes = 0;
        for run in &runs {
            self.store.touch_run(run);
        }
        for save in std::mem::take(&mut self.saves) {
            if self.store.contains(&save.hash) {
                continue;
            }
            let evicted = self
                .store
                .insert(save.hash, |buf| device.read_block(save.block, buf));
            if !evicted.is_empty() {
                self.stats.evicted_blocks += evicted.len() as u64;
                self.events.push(KvCacheEvent::BlockRemoved {
                    block_hashes: evicted,
                    medium: Medium::Cpu,
                });
            }
            bytes += self.block_bytes as u64;
            if let Some(storage) = &mut self.storage {
                if !self.files_held.contains(&save.hash) {
                    let data = self.store.get(&save.hash).map(<[u8]>::to_vec);
                    match data.map(|d| storage.store(save.hash, d, save.used)) {
                        Some(true) => {
                            self.writing
                                .insert(save.hash, (save.parent, save.tokens.clone()));
                        }
                        _ => self.stats.stores_skipped += 1,
                    }
                }
            }
            let event = self.stored_event(save.hash, save.parent, save.tokens, Medium::Cpu);
            self.events.push(event);
        }
        for run in &runs {
            self.store.touch_run(run);
        }
        if bytes > 0 {
            self.transfers.push(Transfer {
                medium: Medium::Cpu,
                direction: Direction::Store,
                bytes,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }

    fn cached_blocks(&self) -> Vec<(Medium, Vec<BlockHash>)> {
        let mut tiers = vec![(Medium::Cpu, self.store.hashes())];
        if self.storage.is_some() {
            tiers.push((Medium::Storage, self.files_held.iter().copied().collect()));
        }
        tiers
    }

    fn stats(&self) -> ConnectorStats {
        let (used_blocks, capacity_blocks) = self.usage();
        ConnectorStats {
            used_blocks,
            capacity_blocks,
            ..self.stats
        }
    }

    fn take_events(&mut self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.events)
    }

    fn take_transfers(&mut self) -> Vec<Transfer> {
        std::mem::take(&mut self.transfers)
    }

    fn reset_cache(&mut self) -> bool {
        let hashes = self.store.clear();
        if !hashes.is_empty() {
            self.events.push(KvCacheEvent::BlockRemoved {
                block_hashes: hashes,
                medium: Medium::Cpu,
            });
        }
        true
    }

    fn idle_poll(&self) -> Option<std::time::Duration> {
        self.storage.as_ref().and_then(StorageTier::idle_poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache::{BlockHasher, BlockLayout, HashAlgo};

    /// A device pool of `n` blocks of 8 bytes, each byte the block's "content".
    struct Device {
        layout: BlockLayout,
        data: Vec<[u8; 8]>,
    }

    impl Device {
        fn new(n: usize) -> Self {
            Self {
                layout: BlockLayout {
                    num_layers: 1,
                    num_blocks: n,
                    block_size: 2,
                    num_kv_heads: 1,
                    head_dim: 2,
                    dtype: "float16",
                    dtype_bytes: 2,
                },
                data: vec![[0; 8]; n],
            }
        }
    }

    impl BlockIo for Device {
        fn layout(&self) -> &BlockLayout {
            &self.layout
        }
        fn read_block(&self, block: BlockId, out: &mut [u8]) {
            out.copy_from_slice(&self.data[block as usize]);
        }
        fn write_block(&mut self, block: BlockId, data: &[u8]) {
            self.data[block as usize].copy_from_slice(data);
        }
        fn arrays(&self) -> Vec<kvcache::PoolArray> {
            Vec::new()
        }
    }

    fn connector(blocks: u64, self_describing: bool) -> CpuOffloadConnector {
        let cfg = CpuOffloadConfig {
            cpu_bytes: blocks * 8,
            offload_prompt_only: true,
            self_describing_events: self_describing,
            storage: None,
        };
        CpuOffloadConnector::new(cfg, 2, 8).unwrap()
    }

    fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        BlockHasher::new(HashAlgo::Sha256Cbor, None)
            .extend_request_hashes(&mut out, tokens, 2, None);
        out
    }

    fn request<'a>(id: &'a str, tokens: &'a [u32], h: &'a [BlockHash]) -> ConnectorRequest<'a> {
        ConnectorRequest {
            request_id: id,
            token_ids: tokens,
            num_prompt_tokens: tokens.len(),
            block_hashes: h,
            kv_transfer_params: None,
        }
    }

    #[test]
    fn saves_prompt_blocks_then_loads_them_into_new_blocks() {
        let mut c = connector(8, false);
        let mut dev = Device::new(8);
        let tokens: Vec<u32> = (0..7).collect();
        let h = hashes(&tokens);
        assert_eq!(h.len(), 3);
        // First run: nothing held; blocks 0..4 computed in two steps.
        let r = request("a", &tokens, &h);
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 0).map(|h| h.num_tokens),
            Some(0)
        );
        c.update_state_after_alloc(&r, &[0, 1, 2, 3], 0, 0);
        for (b, byte) in [(0, 10), (1, 11), (2, 12)] {
            dev.data[b] = [byte; 8];
        }
        c.build_connector_meta(&[ScheduledBlocks {
            request: r,
            block_ids: &[0, 1, 2, 3],
            num_computed_tokens: 4,
        }]);
        c.wait_for_save(&dev);
        c.build_connector_meta(&[ScheduledBlocks {
            request: r,
            block_ids: &[0, 1, 2, 3],
            num_computed_tokens: 7,
        }]);
        c.wait_for_save(&dev);
        c.request_finished(&FinishedRequest {
            request: r,
            block_ids: &[0, 1, 2, 3],
            num_computed_tokens: 7,
            completed: true,
        });
        let events = c.take_events();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events.iter().all(|e| matches!(e, KvCacheEvent::BlockStored { token_ids, block_size: 0, parent_block_hash: None, medium: Medium::Cpu, .. } if token_ids.is_empty())));
        let stored: Vec<(Direction, u64)> = c
            .take_transfers()
            .iter()
            .map(|t| (t.direction, t.bytes))
            .collect();
        // Two steps' copies out of the device: blocks 0 and 1, then block 2.
        assert_eq!(stored, [(Direction::Store, 16), (Direction::Store, 8)]);

        // Again, with the device holding block 0 only: blocks 1 and 2 come from the tier.
        let r = request("b", &tokens, &h);
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 2).map(|h| h.num_tokens),
            Some(4)
        );
        c.update_state_after_alloc(&r, &[0, 5, 6, 7], 2, 4);
        c.start_load_kv(&mut dev);
        assert_eq!((dev.data[5], dev.data[6]), ([11; 8], [12; 8]));
        // Nothing to save again: those blocks are held.
        c.build_connector_meta(&[ScheduledBlocks {
            request: r,
            block_ids: &[0, 5, 6, 7],
            num_computed_tokens: 7,
        }]);
        c.wait_for_save(&dev);
        assert!(c.take_events().is_empty());
        assert_eq!(c.stats().hit_tokens, 4);
        let loaded = c.take_transfers();
        assert_eq!(
            (loaded.len(), loaded[0].direction, loaded[0].bytes),
            (1, Direction::Load, 16)
        );
        let s = c.stats();
        assert_eq!((s.primary_queried, s.primary_hits), (3 + 2, 2));
    }

    #[test]
    fn the_last_token_is_never_matched_and_a_gap_ends_the_run() {
        let mut c = connector(8, false);
        let dev = Device::new(4);
        let tokens: Vec<u32> = (0..6).collect();
        let h = hashes(&tokens);
        let r = request("a", &tokens, &h);
        let all = [ScheduledBlocks {
            request: r,
            block_ids: &[0, 1, 2],
            num_computed_tokens: 6,
        }];
        c.build_connector_meta(&all);
        c.wait_for_save(&dev);
        // Three full blocks held, but the third holds the last token.
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 0).map(|h| h.num_tokens),
            Some(4)
        );
        assert!(c.reset_cache());
        let removed = c.take_events().pop();
        assert!(
            matches!(removed, Some(KvCacheEvent::BlockRemoved { ref block_hashes, medium: Medium::Cpu }) if block_hashes.len() == 3)
        );
        // A request whose first block came from the device saves from the second on: the
        // store then holds blocks 1 and 2 only, and a lookup from 0 finds nothing.
        let other = request("b", &tokens, &h);
        c.update_state_after_alloc(&other, &[0, 1, 2], 2, 0);
        c.build_connector_meta(&[ScheduledBlocks {
            request: other,
            block_ids: &[0, 1, 2],
            num_computed_tokens: 6,
        }]);
        c.wait_for_save(&dev);
        assert_eq!(c.usage().0, 2);
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 0).map(|h| h.num_tokens),
            Some(0)
        );
        assert_eq!(
            c.get_num_new_matched_tokens(&r, 2).map(|h| h.num_tokens),
            Some(2)
        );
    }

    #[test]
    fn eviction_and_self_describing_events() {
        let mut c = connector(2, true);
        let dev = Device::new(4);
        let tokens: Vec<u32> = (0..7).collect();
        let h = hashes(&tokens);
        let r = request("a", &tokens, &h);
        c.build_connector_meta(&[ScheduledBlocks {
            request: r,
            block_ids: &[0, 1, 2, 3],
            num_computed_tokens: 7,
        }]);
        c.wait_for_save(&dev);
        let events = c.take_events();
        // Three stores into two slots: the first block is evicted by the third.
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!(
            events[2],
            KvCacheEvent::BlockRemoved {
                block_hashes: vec![h[0]],
                medium: Medium::Cpu
            }
        );
        match &events[3] {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                ..
            } => {
                assert_eq!(block_hashes, &vec![h[2]]);
                assert_eq!(*parent_block_hash, Some(h[1]));
                assert_eq!(token_ids, &vec![4, 5]);
                assert_eq!(*block_size, 2);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(c.usage(), (2, 2));
        assert!(CpuOffloadConnector::new(
            CpuOffloadConfig {
                cpu_bytes: 7,
                offload_prompt_only: true,
                self_describing_events: false,
                storage: None,
            },
            2,
            8
        )
        .is_err());
    }
}
