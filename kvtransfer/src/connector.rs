//! The P/D KV connector (our NixlConnector): one object for both roles.
//!
//! Producer (`kv_producer` / `kv_both`): a request with `kv_transfer_params.do_remote_decode`
//! that finishes keeps its full prompt blocks allocated under a lease, and its response carries
//! the NixlConnector's `kv_transfer_params` naming them; the side-channel server lets a decode
//! pod claim, renew and release them; released or lapsed leases are handed back to the engine
//! to free.
//!
//! Consumer (`kv_consumer` / `kv_both`): a request with `do_remote_prefill` first claims the
//! blocks it lacks locally (the lookup is `None` until the producer answered), then pulls them
//! with one-sided GETs into a host buffer on the transfer thread while it waits holding its
//! blocks, asks the producer whether they were pinned throughout, and only then writes them
//! into its device blocks (in `start_load_kv`). Any failure (bad params, unknown engine or
//! request, wrong blocks or tokens, unreachable or dead producer, timeout, lapsed lease) loads
//! nothing and the request prefills locally: the same output, later.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvcache::{
    BlockHash, BlockId, BlockIo, BlockLayout, ConnectorRequest, ConnectorStats, ExternalHit,
    FinishedAction, FinishedLoad, FinishedRequest, KvCacheEvent, KvConnector, Medium, RemoteRead,
    ScheduledBlocks, Transfer,
};

use crate::leases::Leases;
use crate::side_channel::{Answer, Clients, Server};
use crate::transfer::{PullJob, Transfers};
use crate::wire::{
    tokens_digest, ChannelReply, ChannelRequest, PeerMetadata, PoolShape, PrefillAnswer,
    RemotePrefill, RequestParams,
};

/// vLLM's `kv_role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRole {
    Producer,
    Consumer,
    Both,
}

impl KvRole {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "kv_producer" => Ok(Self::Producer),
            "kv_consumer" => Ok(Self::Consumer),
            "kv_both" => Ok(Self::Both),
            other => Err(format!(
                "kv_role {other:?}: expected kv_producer, kv_consumer or kv_both"
            )),
        }
    }

    fn produces(self) -> bool {
        self != Self::Consumer
    }

    fn consumes(self) -> bool {
        self != Self::Producer
    }
}

#[derive(Debug, Clone)]
pub struct PdConfig {
    pub role: KvRole,
    pub engine_id: String,
    /// Where the side channel listens, and the host the prefill answers name.
    pub side_channel_host: String,
    pub side_channel_port: u16,
    /// How long unread pinned blocks are kept (`kv_lease_duration`).
    pub lease: Duration,
    /// How long a pull may take before the request prefills locally.
    pub transfer_timeout: Duration,
}

/// Where a decode leg's pull stands.
enum Stage {
    /// The claim is out.
    Claiming,
    /// The producer holds the blocks for us.
    Claimed,
    /// GETs in flight on the transfer thread.
    Reading,
    /// Read; the release (which says whether the blocks were pinned throughout) is out.
    Verifying(Vec<u8>),
    /// Verified: written into the device blocks at the next `start_load_kv`.
    Landing(Vec<u8>),
    /// Nothing (more) to load.
    Over,
}

struct Pull {
    remote: RemotePrefill,
    /// Leading prompt blocks claimed (never the one holding the last prompt token).
    num_blocks: usize,
    stage: Stage,
    /// The device blocks being filled.
    local_blocks: Vec<BlockId>,
    /// Renew the claim once this passes.
    renew_at: Instant,
    /// The claim asked for the producer's metadata.
    wanted_metadata: bool,
    /// The scheduler holds the request's blocks until a `FinishedLoad` for it.
    awaited: bool,
}

/// What an answer from a side channel is for.
#[derive(Clone)]
enum Purpose {
    Claim(String),
    Release(Option<String>),
    Renew,
}

pub struct PdConnector {
    config: PdConfig,
    block_size: usize,
    layout: Option<BlockLayout>,
    transfers: Option<Transfers>,
    server: Option<Server>,
    leases: Arc<Mutex<Leases>>,
    /// This producer's metadata, once registered.
    local: Option<Arc<PeerMetadata>>,
    clients: Clients,
    /// Producers' metadata, by engine id.
    peers: HashMap<String, Arc<PeerMetadata>>,
    pulls: HashMap<String, Pull>,
    purposes: HashMap<u64, Purpose>,
    /// Transfer job id -> request.
    jobs: HashMap<u64, String>,
    next_tag: u64,
    next_handle: u64,
    loaded: Vec<FinishedLoad>,
    reads: Vec<RemoteRead>,
    stats: ConnectorStats,
}

impl PdConnector {
    pub fn new(config: PdConfig, block_size: usize) -> Self {
        let lease = config.lease;
        Self {
            config,
            block_size,
            layout: None,
            transfers: None,
            server: None,
            leases: Arc::new(Mutex::new(Leases::new(lease))),
            local: None,
            clients: Clients::default(),
            peers: HashMap::new(),
            pulls: HashMap::new(),
            purposes: HashMap::new(),
            jobs: HashMap::new(),
            next_tag: 0,
            next_handle: 0,
            loaded: Vec::new(),
            reads: Vec::new(),
            stats: ConnectorStats::default(),
        }
    }

    /// The side channel's address once listening (a producer's).
    pub fn side_channel_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(Server::local_addr)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&mut self, remote: &RemotePrefill, purpose: Purpose, request: ChannelRequest) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.purposes.insert(tag, purpose);
        self.clients.send(&remote.host, remote.port, tag, request);
    }

    fn release(&mut self, remote: &RemotePrefill, verify: Option<String>) {
        let request = ChannelRequest::Release {
            request_id: remote.request_id.clone(),
        };
        self.send(remote, Purpose::Release(verify), request);
    }

    fn claim(&mut self, id: &str, tokens: &[u32], want_metadata: bool) {
        let Some(pull) = self.pulls.get_mut(id) else {
            return;
        };
        pull.wanted_metadata = want_metadata;
        let remote = pull.remote.clone();
        let n = pull.num_blocks;
        let request = ChannelRequest::Claim {
            engine_id: remote.engine_id.clone(),
            request_id: remote.request_id.clone(),
            block_ids: remote.block_ids[..n].to_vec(),
            tokens_digest: tokens_digest(&tokens[..n * self.block_size]),
            want_metadata,
        };
        self.send(&remote, Purpose::Claim(id.to_string()), request);
    }

    /// A decode leg that will load nothing more: it prefills (the rest) locally.
    fn fall_back(&mut self, id: &str, why: &str) {
        tracing::warn!("request {id}: KV transfer failed ({why}); prefilling locally");
        self.stats.local_prefill_fallbacks += 1;
        if let Some(pull) = self.pulls.get_mut(id) {
            if std::mem::take(&mut pull.awaited) {
                self.loaded.push(FinishedLoad {
                    request_id: id.to_string(),
                    num_tokens: 0,
                });
            }
            pull.stage = Stage::Over;
        }
    }

    /// Takes in the side channels' answers and the transfer thread's results; renews claims
    /// that are getting old.
    fn poll(&mut self, tokens_of: &dyn Fn(&str) -> Option<Vec<u32>>) {
        for Answer { tag, reply } in self.clients.answers() {
            let Some(purpose) = self.purposes.remove(&tag) else {
                continue;
            };
            if reply.is_err() {
                self.stats.failed_notifications += 1;
            }
            match purpose {
                Purpose::Claim(id) => self.claim_answered(&id, reply, tokens_of),
                Purpose::Release(Some(id)) => {
                    let held = matches!(reply, Ok(ChannelReply::Released { held: true }));
                    let Some(pull) = self.pulls.get_mut(&id) else {
                        continue;
                    };
                    if !matches!(pull.stage, Stage::Verifying(_)) {
                        continue;
                    }
                    if held {
                        if let Stage::Verifying(data) =
                            std::mem::replace(&mut pull.stage, Stage::Over)
                        {
                            pull.stage = Stage::Landing(data);
                        }
                    } else {
                        self.stats.failed_transfers += 1;
                        self.fall_back(&id, "the producer's lease lapsed during the read");
                    }
                }
                Purpose::Release(None) | Purpose::Renew => {}
            }
        }
        if let Some(t) = &self.transfers {
            for r in t.finished() {
                let Some(id) = self.jobs.remove(&r.id) else {
                    continue;
                };
                let pull = self.pulls.get_mut(&id);
                let Some(pull) = pull.filter(|p| matches!(p.stage, Stage::Reading)) else {
                    continue;
                };
                let remote = pull.remote.clone();
                match r.data {
                    Ok(data) => {
                        self.reads.push(RemoteRead {
                            bytes: data.len() as u64,
                            seconds: r.seconds,
                            descriptors: r.descriptors,
                        });
                        pull.stage = Stage::Verifying(data);
                        self.release(&remote, Some(id));
                    }
                    Err(why) => {
                        self.stats.failed_transfers += 1;
                        self.release(&remote, None);
                        self.fall_back(&id, &why);
                    }
                }
            }
        }
        let now = Instant::now();
        let due: Vec<RemotePrefill> = self
            .pulls
            .values_mut()
            .filter(|p| matches!(p.stage, Stage::Claimed | Stage::Reading) && now >= p.renew_at)
            .map(|p| {
                p.renew_at = now + self.config.lease / 3;
                p.remote.clone()
            })
            .collect();
        for remote in due {
            let request = ChannelRequest::Renew {
                request_id: remote.request_id.clone(),
            };
            self.send(&remote, Purpose::Renew, request);
        }
    }

    fn claim_answered(
        &mut self,
        id: &str,
        reply: Result<ChannelReply, String>,
        tokens_of: &dyn Fn(&str) -> Option<Vec<u32>>,
    ) {
        let Some(pull) = self
            .pulls
            .get(id)
            .filter(|p| matches!(p.stage, Stage::Claiming))
        else {
            return;
        };
        let engine_id = pull.remote.engine_id.clone();
        let wanted = pull.wanted_metadata;
        match reply {
            Ok(ChannelReply::Claimed {
                expires_in_ms,
                generation,
                metadata,
            }) => {
                if let Some(meta) = metadata {
                    let ours = self.layout.as_ref().map(PoolShape::from);
                    if ours.as_ref() != Some(&meta.shape) {
                        let remote = pull.remote.clone();
                        self.release(&remote, None);
                        return self.fall_back(
                            id,
                            &format!(
                                "the producer's KV pool is shaped {:?}, this pod's {ours:?}",
                                meta.shape
                            ),
                        );
                    }
                    self.peers.insert(engine_id.clone(), Arc::new(meta));
                }
                let known = self
                    .peers
                    .get(&engine_id)
                    .is_some_and(|m| m.generation == generation);
                if !known {
                    // The producer restarted since we last saw it: ask again, with metadata.
                    match (wanted, tokens_of(id)) {
                        (false, Some(tokens)) => return self.claim(id, &tokens, true),
                        _ => return self.fall_back(id, "the producer sent no metadata"),
                    }
                }
                let renew_in = Duration::from_millis(expires_in_ms / 3);
                if let Some(p) = self.pulls.get_mut(id) {
                    p.stage = Stage::Claimed;
                    p.renew_at = Instant::now() + renew_in;
                }
            }
            Ok(ChannelReply::Refused { reason }) => self.fall_back(id, &reason),
            Ok(other) => self.fall_back(id, &format!("unexpected answer {other:?}")),
            Err(e) => self.fall_back(id, &e),
        }
    }

    /// Starts a decode leg's pull state: `None` when the request is not one.
    fn start_pull(&mut self, request: &ConnectorRequest<'_>, num_computed: usize) -> Option<()> {
        let id = request.request_id;
        let remote = match RequestParams::parse(request.kv_transfer_params) {
            Ok(p) => p.remote?,
            Err(why) => {
                self.stats.local_prefill_fallbacks += 1;
                tracing::warn!("request {id}: {why}; prefilling locally");
                return None;
            }
        };
        let bs = self.block_size;
        // Never the block holding the last prompt token: its logits are computed here.
        let num_blocks = remote
            .block_ids
            .len()
            .min(request.num_prompt_tokens.saturating_sub(1) / bs);
        let mut pull = Pull {
            remote,
            num_blocks,
            stage: Stage::Claiming,
            local_blocks: Vec::new(),
            renew_at: Instant::now(),
            wanted_metadata: false,
            awaited: false,
        };
        if num_blocks <= num_computed / bs {
            // This pod holds all of it already: nothing to read.
            pull.stage = Stage::Over;
            let remote = pull.remote.clone();
            self.pulls.insert(id.to_string(), pull);
            self.release(&remote, None);
            return Some(());
        }
        let want = !self.peers.contains_key(&pull.remote.engine_id);
        self.pulls.insert(id.to_string(), pull);
        self.claim(id, request.token_ids, want);
        Some(())
    }
}

impl KvConnector for PdConnector {
    fn register_kv_caches(&mut self, device: &dyn BlockIo) -> Result<(), String> {
        let layout = device.layout().clone();
        let arrays = if self.config.role.produces() {
            device.arrays()
        } else {
            Vec::new()
        };
        if arrays.iter().any(|a| a.device) {
            return Err("KV transfer of device memory needs a UCX built with CUDA \
                        (Debian's has none); not supported yet"
                .into());
        }
        let transfers = Transfers::start(layout.clone(), arrays)?;
        if self.config.role.produces() {
            let meta = Arc::new(PeerMetadata {
                engine_id: self.config.engine_id.clone(),
                generation: generation(),
                worker_address: transfers.local.worker_address.clone(),
                shape: PoolShape::from(&layout),
                arrays: transfers.local.arrays.clone(),
            });
            let bind = bind_addr(
                &self.config.side_channel_host,
                self.config.side_channel_port,
            )?;
            self.server = Some(Server::start(bind, self.leases.clone(), meta.clone())?);
            self.local = Some(meta);
        }
        self.transfers = Some(transfers);
        self.layout = Some(layout);
        Ok(())
    }

    fn get_num_new_matched_tokens(
        &mut self,
        request: &ConnectorRequest<'_>,
        num_computed_tokens: usize,
    ) -> Option<ExternalHit> {
        if !self.config.role.consumes() {
            return Some(ExternalHit::default());
        }
        let tokens = request.token_ids.to_vec();
        self.poll(&|_| Some(tokens.clone()));
        let id = request.request_id;
        if !self.pulls.contains_key(id) && self.start_pull(request, num_computed_tokens).is_none() {
            return Some(ExternalHit::default());
        }
        let pull = self.pulls.get(id)?;
        match pull.stage {
            Stage::Claiming => None,
            Stage::Claimed => {
                let end = pull.num_blocks * self.block_size;
                Some(ExternalHit {
                    num_tokens: end.saturating_sub(num_computed_tokens),
                    load_async: true,
                })
            }
            _ => Some(ExternalHit::default()),
        }
    }

    fn update_state_after_alloc(
        &mut self,
        request: &ConnectorRequest<'_>,
        block_ids: &[BlockId],
        num_device_tokens: usize,
        num_external_tokens: usize,
    ) {
        let bs = self.block_size;
        let Some(pull) = self.pulls.get_mut(request.request_id) else {
            return;
        };
        if !matches!(pull.stage, Stage::Claimed) {
            return;
        }
        pull.awaited = num_external_tokens > 0;
        let first = num_device_tokens / bs;
        let last = first + num_external_tokens / bs;
        if num_external_tokens == 0 || last > pull.num_blocks || last > block_ids.len() {
            let remote = pull.remote.clone();
            self.release(&remote, None);
            return self.fall_back(request.request_id, "nothing to read");
        }
        let (Some(peer), Some(transfers)) =
            (self.peers.get(&pull.remote.engine_id), &self.transfers)
        else {
            return self.fall_back(request.request_id, "no metadata for the producer");
        };
        let job = self.next_tag;
        self.next_tag += 1;
        pull.local_blocks = block_ids[first..last].to_vec();
        pull.stage = Stage::Reading;
        transfers.pull(PullJob {
            id: job,
            peer: peer.clone(),
            remote_blocks: pull.remote.block_ids[first..last].to_vec(),
            deadline: Instant::now() + self.config.transfer_timeout,
        });
        self.jobs.insert(job, request.request_id.to_string());
    }

    fn build_connector_meta(&mut self, _scheduled: &[ScheduledBlocks<'_>]) {}

    fn request_finished(&mut self, finished: &FinishedRequest<'_>) -> FinishedAction {
        let r = &finished.request;
        if let Some(pull) = self.pulls.remove(r.request_id) {
            // A read still in flight is released when it ends (its job has no request now).
            if matches!(pull.stage, Stage::Claiming | Stage::Claimed) {
                self.release(&pull.remote, None);
            }
        }
        let wants_decode = RequestParams::parse(r.kv_transfer_params)
            .map(|p| p.do_remote_decode)
            .unwrap_or(false);
        if !(wants_decode && finished.completed && self.config.role.produces()) {
            return FinishedAction::default();
        }
        let Some(local) = self.local.clone() else {
            return FinishedAction::default();
        };
        let bs = self.block_size;
        let n = (finished.num_computed_tokens.min(r.num_prompt_tokens) / bs)
            .min(finished.block_ids.len());
        let block_ids = finished.block_ids[..n].to_vec();
        let handle = format!("{}-pd{}", r.request_id, self.next_handle);
        self.next_handle += 1;
        let lease = self.config.lease;
        let expiry_unix = (SystemTime::now() + lease)
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let params = PrefillAnswer {
            engine_id: &local.engine_id,
            request_id: &handle,
            block_ids: &block_ids,
            host: &self.config.side_channel_host,
            port: self.config.side_channel_port,
            num_tokens: r.num_prompt_tokens,
            expiry_unix,
            generation: local.generation,
        }
        .to_json();
        if n == 0 {
            // Nothing whole to read: the decode pod computes the short prompt itself.
            return FinishedAction {
                hold: None,
                kv_transfer_params: Some(params),
            };
        }
        let tokens = r.token_ids[..n * bs].to_vec();
        self.leases()
            .pin(&handle, block_ids, tokens, bs, Instant::now());
        FinishedAction {
            hold: Some(handle),
            kv_transfer_params: Some(params),
        }
    }

    fn get_finished_sends(&mut self) -> Vec<String> {
        self.leases().take_done(Instant::now())
    }

    fn start_load_kv(&mut self, device: &mut dyn BlockIo) {
        self.poll(&|_| None);
        let bytes = device.layout().block_bytes();
        let bs = self.block_size;
        for (id, pull) in self.pulls.iter_mut() {
            if !matches!(pull.stage, Stage::Landing(_)) {
                continue;
            }
            let Stage::Landing(data) = std::mem::replace(&mut pull.stage, Stage::Over) else {
                continue;
            };
            for (i, &b) in pull.local_blocks.iter().enumerate() {
                device.write_block(b, &data[i * bytes..(i + 1) * bytes]);
            }
            pull.awaited = false;
            self.loaded.push(FinishedLoad {
                request_id: id.clone(),
                num_tokens: pull.local_blocks.len() * bs,
            });
        }
    }

    fn get_finished_loads(&mut self) -> Vec<FinishedLoad> {
        std::mem::take(&mut self.loaded)
    }

    fn wait_for_save(&mut self, _device: &dyn BlockIo) {}

    fn cached_blocks(&self) -> Vec<(Medium, Vec<BlockHash>)> {
        Vec::new()
    }

    fn stats(&self) -> ConnectorStats {
        let leases = self.leases();
        ConnectorStats {
            expired_leases: leases.expired,
            pinned_blocks: leases.pinned_blocks(),
            ..self.stats
        }
    }

    fn take_transfers(&mut self) -> Vec<Transfer> {
        Vec::new()
    }

    fn take_remote_reads(&mut self) -> Vec<RemoteRead> {
        std::mem::take(&mut self.reads)
    }

    fn take_events(&mut self) -> Vec<KvCacheEvent> {
        Vec::new()
    }

    fn reset_cache(&mut self) -> bool {
        true
    }

    fn idle_poll(&self) -> Option<Duration> {
        if !self.pulls.is_empty() || !self.purposes.is_empty() {
            Some(Duration::from_millis(1))
        } else if self.leases().has_work() {
            Some(Duration::from_millis(20))
        } else {
            None
        }
    }
}

fn bind_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("KV transfer side channel {host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("KV transfer side channel {host}:{port}: no address"))
}

/// A value that differs between starts of the same engine.
fn generation() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    xxhash_rust::xxh3::xxh3_64(
        &[
            nanos.to_le_bytes(),
            (std::process::id() as u128).to_le_bytes(),
        ]
        .concat(),
    )
}
