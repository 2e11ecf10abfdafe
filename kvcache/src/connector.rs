//! The KV connector interface, in the shape of vLLM's `KVConnectorBase_V1`: how a store below
//! the device pool (a CPU or storage tier, later a P/D transfer) takes part in each step.
//!
//! Scheduler side, in the order of vLLM's `Scheduler.schedule()`: the device prefix hit comes
//! first, then [`KvConnector::get_num_new_matched_tokens`] says how many more tokens the
//! connector can supply, then the blocks are allocated and
//! [`KvConnector::update_state_after_alloc`] learns which ones to fill, and once the step is
//! planned [`KvConnector::build_connector_meta`] sees every scheduled request's blocks;
//! [`KvConnector::request_finished`] closes a request. Worker side, around the forward pass as
//! vLLM's model-runner mixin does: loads before it, saves after it. Copies reach device memory
//! only through [`BlockIo`]. Engine and worker share a process here, so one object plays both
//! roles and keeps the step's metadata itself.
//!
//! A lookup may take steps too (the answer is `None` until it is known), without holding up
//! other requests. A load completes within its step, or asynchronously: the request then waits for its KV
//! while holding its blocks (vLLM's WAITING_FOR_REMOTE_KVS) until
//! [`KvConnector::get_finished_loads`] reports it, and is scheduled from there. A connector
//! fetches asynchronously into its own buffers and writes device blocks only in
//! [`KvConnector::start_load_kv`], on the engine thread, so a request aborted mid-load frees its
//! blocks at once. A finished request's blocks may outlive it (vLLM's delayed frees): a P/D
//! producer keeps them for the decode pod to read, under a handle
//! [`KvConnector::request_finished`] returns, until [`KvConnector::get_finished_sends`] reports
//! it.

use crate::block_hash::BlockHash;
use crate::block_pool::BlockId;
use crate::events::{KvCacheEvent, Medium};
use crate::layout::BlockIo;

/// What a connector sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorRequest<'a> {
    pub request_id: &'a str,
    /// Prompt followed by the tokens generated so far.
    pub token_ids: &'a [u32],
    pub num_prompt_tokens: usize,
    /// The chained hash of each full block of `token_ids`.
    pub block_hashes: &'a [BlockHash],
    /// The request's `kv_transfer_params` as the client sent them (vLLM passes them to the
    /// connector as they are).
    pub kv_transfer_params: Option<&'a serde_json::Value>,
}

/// A request that ended, as [`KvConnector::request_finished`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct FinishedRequest<'a> {
    pub request: ConnectorRequest<'a>,
    /// Its block table, still allocated.
    pub block_ids: &'a [BlockId],
    pub num_computed_tokens: usize,
    /// Ended by its own limits (length, stop), not aborted or failed.
    pub completed: bool,
}

/// What happens to a finished request's blocks, and what its response carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinishedAction {
    /// Keep the blocks allocated until [`KvConnector::get_finished_sends`] returns this handle.
    pub hold: Option<String>,
    /// The response's top-level `kv_transfer_params`.
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// One read of a remote pod's blocks (vLLM's NIXL transfer metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemoteRead {
    pub bytes: u64,
    pub seconds: f64,
    /// Reads issued (one per block region).
    pub descriptors: usize,
}

/// What a connector can supply beyond the device hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExternalHit {
    /// Whole blocks, never the request's last token (its logits must be computed).
    pub num_tokens: usize,
    /// Loading outlasts the step: the request waits until the load is reported finished.
    pub load_async: bool,
}

/// An asynchronous load that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedLoad {
    pub request_id: String,
    /// Tokens now in the request's device blocks, from the first external one: the promised
    /// count, or fewer when the tail failed (the rest is recomputed).
    pub num_tokens: usize,
}

/// One scheduled request of the step, as the step's metadata needs it.
#[derive(Debug, Clone, Copy)]
pub struct ScheduledBlocks<'a> {
    pub request: ConnectorRequest<'a>,
    /// The request's block table.
    pub block_ids: &'a [BlockId],
    /// Tokens whose K/V are computed once this step's forward pass ran.
    pub num_computed_tokens: usize,
}

/// Which way a [`Transfer`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Towards the device pool (from the tier, or from the tier below into the tier).
    Load,
    /// Away from it.
    Store,
}

/// One copy, for the metrics: between the device pool and the connector's first tier
/// (`medium` that tier's), or between that tier and the one below (`medium` the lower one's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    pub medium: Medium,
    pub direction: Direction,
    pub bytes: u64,
    pub seconds: f64,
}

/// Running totals of a connector's lookups and failures, and its occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnectorStats {
    /// Blocks looked up in its first tier, and found there; then the rest looked up in the
    /// tier below, and found there (vLLM's tiering chunk queries and hits).
    pub primary_queried: u64,
    pub primary_hits: u64,
    pub secondary_queried: u64,
    pub secondary_hits: u64,
    /// Prompt tokens it supplied to admitted requests.
    pub hit_tokens: u64,
    pub evicted_blocks: u64,
    /// Stores not made: a lower tier's write queue was full.
    pub stores_skipped: u64,
    /// Stores a lower tier failed to write (a full or read-only volume).
    pub store_failures: u64,
    /// Stored blocks found damaged when read back (removed, recomputed).
    pub corrupt_blocks: u64,
    pub used_blocks: usize,
    pub capacity_blocks: usize,
    /// KV transfer: reads of a remote pod's blocks that failed (the request prefilled
    /// locally), side-channel messages that failed, this pod's pinned blocks whose lease lapsed
    /// unread, decode legs that prefilled locally for any reason, and blocks pinned now.
    pub failed_transfers: u64,
    pub failed_notifications: u64,
    pub expired_leases: u64,
    pub local_prefill_fallbacks: u64,
    pub pinned_blocks: usize,
}

pub trait KvConnector: Send {
    /// The device pool exists (vLLM's `register_kv_caches`): a transport registers its
    /// memory here, once, before any step.
    fn register_kv_caches(&mut self, _device: &dyn BlockIo) -> Result<(), String> {
        Ok(())
    }

    /// After the device hit of `num_computed_tokens`, the further tokens this connector holds;
    /// `None` while it is still finding out off the engine thread (a slow volume's lookups):
    /// the scheduler then asks again next step and admits the requests behind meanwhile, as
    /// vLLM's scheduler does.
    fn get_num_new_matched_tokens(
        &mut self,
        request: &ConnectorRequest<'_>,
        num_computed_tokens: usize,
    ) -> Option<ExternalHit>;

    /// The blocks were allocated: `block_ids` is the request's table, whose first
    /// `num_device_tokens` tokens came from the device cache and the next `num_external_tokens`
    /// are this connector's to fill.
    fn update_state_after_alloc(
        &mut self,
        request: &ConnectorRequest<'_>,
        block_ids: &[BlockId],
        num_device_tokens: usize,
        num_external_tokens: usize,
    );

    /// The step is planned: what to save after its forward pass.
    fn build_connector_meta(&mut self, scheduled: &[ScheduledBlocks<'_>]);

    /// A request ended (any reason); its per-request state goes, unless the connector keeps
    /// its blocks (see [`FinishedAction`]).
    fn request_finished(&mut self, finished: &FinishedRequest<'_>) -> FinishedAction;

    /// Handles of held blocks that may be freed now (read by their consumer, or their lease
    /// lapsed).
    fn get_finished_sends(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Before the forward pass: copy this step's loads, and the asynchronous loads whose data
    /// arrived, into the device pool.
    fn start_load_kv(&mut self, device: &mut dyn BlockIo);

    /// Asynchronous loads written into device blocks since the last call.
    fn get_finished_loads(&mut self) -> Vec<FinishedLoad>;

    /// After the forward pass: this step's saves out of the device pool.
    fn wait_for_save(&mut self, device: &dyn BlockIo);

    /// Per tier it manages (its events' medium), the hashes it holds, sorted
    /// (`/debug/kv_cache`).
    fn cached_blocks(&self) -> Vec<(Medium, Vec<BlockHash>)>;

    /// What it did so far, for the metrics.
    fn stats(&self) -> ConnectorStats;

    /// Its copies since the last call, for the metrics.
    fn take_transfers(&mut self) -> Vec<Transfer>;

    /// Its reads of remote pods' blocks since the last call, for the metrics.
    fn take_remote_reads(&mut self) -> Vec<RemoteRead> {
        Vec::new()
    }

    /// This connector's store changes since the last call (its medium on each).
    fn take_events(&mut self) -> Vec<KvCacheEvent>;

    /// Drops everything the connector holds (`/reset_prefix_cache?reset_external=true`);
    /// false if it cannot now.
    fn reset_cache(&mut self) -> bool;

    /// How soon an engine with nothing to compute must step again anyway, because work off
    /// the engine thread (transfers in flight, a sweeper's removals) finishes into the next
    /// step's collection and events; `None`: nothing runs in the background.
    fn idle_poll(&self) -> Option<std::time::Duration>;
}
