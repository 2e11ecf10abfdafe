//! The engine loop: one thread owns the model, the KV cache and every request. Each iteration
//! takes in new commands, schedules a step, runs one batched forward pass, samples, and sends
//! the requests their new tokens (one batch per iteration, see [`super::outbox`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use kernels::SeqAttn;
use prompt::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::model::{CpuKvPool, LlamaModel, Logits, StepInput};
use kvcache::{
    BlockHasher, BlockPool, ConnectorStats, FinishedAction, FinishedRequest, HoldId,
    KvCacheManager, KvConnector, KvEventSink, Medium, ScheduledBlocks,
};

use super::config::EngineConfig;
use super::detokenizer::TokenDecoder;
use super::handle::{EngineCommand, EngineHandle, TierBlocks};
use super::outbox::Outbox;
use super::request::Request;
use super::scheduler::{connector_request, Scheduler, SchedulerLimits, SchedulerOutput};
use super::types::{EngineError, Finish, FinishReason, GenerateOutput, GenerateRequest};

impl TokenDecoder for Tokenizer {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        Tokenizer::decode(self, ids, skip_special_tokens)
    }
}

/// How often an engine with requests but nothing to compute (loads or lookups in flight)
/// checks again.
const LOAD_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// Starts the engine thread and returns the handle to it. `sink` receives every cached-block
/// change (the KV-events publisher plugs in there); `connector`, when given, adds a tier below
/// the device pool; `runtime` runs the task that delivers the engine's outputs to the requests'
/// streams.
pub fn start(
    config: EngineConfig,
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
    sink: Box<dyn KvEventSink>,
    connector: Option<Box<dyn KvConnector>>,
    runtime: &tokio::runtime::Handle,
) -> Result<EngineHandle, EngineError> {
    let (outbox, deliver) = Outbox::new();
    runtime.spawn(deliver);
    let (tx, rx) = mpsc::channel();
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            // Marks the engine dead however the thread ends, panics included.
            let _alive = AliveGuard(flag);
            match EngineCore::new(config, model, tokenizer, metrics, sink, connector, outbox) {
                Ok(mut core) => {
                    let _ = ready_tx.send(Ok(()));
                    core.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|_| EngineError::Dead)?;
    ready
        .recv()
        .map_err(|_| EngineError::Dead)?
        .map_err(EngineError::Start)?;
    Ok(EngineHandle::new(tx, alive))
}

impl Drop for EngineCore {
    fn drop(&mut self) {
        // Before the pool: a transfer must let go of the pool's memory first.
        self.connector.take();
    }
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub(crate) struct EngineCore {
    config: EngineConfig,
    model: LlamaModel,
    /// The device KV pool (on the CPU executor, host memory).
    pool: CpuKvPool,
    /// The step's logits, kept across steps (see [`Logits`]).
    logits: Logits,
    kv: KvCacheManager,
    scheduler: Scheduler,
    requests: HashMap<String, Request>,
    outbox: Outbox,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    metrics: Arc<Metrics>,
    /// Where each step's cache events go (the KV-events publisher, or nowhere).
    sink: Box<dyn KvEventSink>,
    /// A tier below the device pool or a P/D transfer, when configured. Dropped before the
    /// pool (see Drop): a transfer may have the pool's memory registered.
    connector: Option<Box<dyn KvConnector>>,
    /// Finished requests' blocks the connector keeps (a P/D producer's), by its handle.
    held: HashMap<String, HoldId>,
    /// The connector's totals at the last metrics update.
    connector_stats: ConnectorStats,
}

impl EngineCore {
    pub(crate) fn new(
        config: EngineConfig,
        model: LlamaModel,
        tokenizer: Arc<Tokenizer>,
        metrics: Arc<Metrics>,
        sink: Box<dyn KvEventSink>,
        mut connector: Option<Box<dyn KvConnector>>,
        outbox: Outbox,
    ) -> Result<Self, String> {
        let pool = CpuKvPool::new(
            model.kv_layout(config.num_blocks, config.block_size),
            config.kv_dtype,
        );
        if let Some(c) = &mut connector {
            c.register_kv_caches(&pool)?;
        }
        let hasher = BlockHasher::new(config.hash_algo, config.hash_seed.as_deref());
        let blocks = BlockPool::new(config.num_blocks, config.enable_prefix_caching);
        let kv = KvCacheManager::new(
            blocks,
            config.block_size,
            hasher,
            config.enable_prefix_caching,
        );
        let scheduler = Scheduler::new(SchedulerLimits {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            enable_prefix_caching: config.enable_prefix_caching,
        });
        let eos_token_ids = tokenizer.eos_token_ids().to_vec();
        Ok(Self {
            config,
            model,
            pool,
            logits: Logits::default(),
            kv,
            scheduler,
            requests: HashMap::new(),
            outbox,
            tokenizer,
            eos_token_ids,
            metrics,
            sink,
            connector,
            held: HashMap::new(),
            connector_stats: ConnectorStats::default(),
        })
    }

    fn run(&mut self, commands: mpsc::Receiver<EngineCommand>) {
        let mut stalled = false;
        loop {
            if !self.scheduler.has_work() {
                // Idle: sleep until a command arrives (all handles gone means shut down), or
                // until the connector's background work wants collecting.
                match self.connector.as_ref().and_then(|c| c.idle_poll()) {
                    None => match commands.recv() {
                        Ok(cmd) => self.handle_command(cmd),
                        Err(_) => return,
                    },
                    Some(wait) => match commands.recv_timeout(wait) {
                        Ok(cmd) => self.handle_command(cmd),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    },
                }
            } else if stalled {
                // The last step computed nothing (every request waits on a connector): poll
                // without spinning.
                match commands.recv_timeout(LOAD_POLL) {
                    Ok(cmd) => self.handle_command(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle_command(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            stalled = !self.step();
            self.outbox.flush();
        }
    }

    fn handle_command(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Add { request, outputs } => self.add_request(request, outputs),
            EngineCommand::Abort(id) => self.finish(&id, Finish::new(FinishReason::Abort, None)),
            EngineCommand::ResetPrefixCache {
                reset_external,
                reply,
            } => {
                let mut ok = self.kv.reset_prefix_cache();
                if let Some(c) = self.connector.as_mut().filter(|_| reset_external) {
                    ok &= c.reset_cache();
                }
                self.publish_events();
                let _ = reply.send(ok);
            }
            EngineCommand::CachedBlocks(reply) => {
                let mut tiers = vec![TierBlocks {
                    medium: Medium::Gpu,
                    hashes: self.kv.cached_hashes(),
                }];
                if let Some(c) = &self.connector {
                    tiers.extend(
                        c.cached_blocks()
                            .into_iter()
                            .map(|(medium, hashes)| TierBlocks { medium, hashes }),
                    );
                }
                let _ = reply.send(tiers);
            }
        }
        self.update_gauges();
    }

    fn add_request(&mut self, request: GenerateRequest, outputs: UnboundedSender<GenerateOutput>) {
        if self.requests.contains_key(&request.request_id) {
            let prompt_len = request.prompt_token_ids.len();
            let error = GenerateOutput {
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
                finish: Some(Finish::new(
                    FinishReason::Error,
                    Some(EngineError::DuplicateRequestId(request.request_id).to_string()),
                )),
                prompt_logprobs: None,
                embedding: None,
                num_prompt_tokens: prompt_len,
                num_cached_tokens: 0,
            };
            self.outbox.push(&outputs, error);
            return;
        }
        let id = request.request_id.clone();
        if self.config.log_requests {
            tracing::info!(
                "Received request {id}: params: {:?}, num_prompt_tokens: {}",
                request.params,
                request.prompt_token_ids.len()
            );
        }
        self.requests
            .insert(id.clone(), Request::new(request, outputs));
        self.scheduler.add(id);
    }

    /// Ends a request: frees its blocks, sends its last output, records its metrics.
    fn finish(&mut self, id: &str, finish: Finish) {
        let Some(mut req) = self.requests.remove(id) else {
            return;
        };
        self.scheduler.remove(id);
        let mut finish = finish;
        let action = match &mut self.connector {
            Some(c) => c.request_finished(&FinishedRequest {
                request: connector_request(&req, &self.kv),
                block_ids: self.kv.block_table(id),
                num_computed_tokens: req.num_computed_tokens,
                completed: matches!(finish.reason, FinishReason::Length | FinishReason::Stop),
            }),
            None => FinishedAction::default(),
        };
        match action.hold {
            Some(handle) => {
                if let Some(hold) = self.kv.hold(id) {
                    self.held.insert(handle, hold);
                }
            }
            None => self.kv.free(id),
        }
        finish.kv_transfer_params = action.kv_transfer_params;
        let reason = finish.reason;
        req.send_pending(Some(finish), &mut self.outbox);
        self.record_finished(&req, reason);
    }

    fn record_finished(&self, req: &Request, reason: FinishReason) {
        let m = &self.metrics;
        let now = Instant::now();
        let t = &req.timings;
        m.record_finished(reason.as_str());
        m.e2e_request_latency
            .observe(now.duration_since(t.arrival).as_secs_f64());
        let generated = req.num_output_tokens();
        if self.config.log_requests {
            tracing::info!(
                "Finished request {}: status: {}, num_prompt_tokens: {}, \
                 num_generation_tokens: {generated}, num_cached_tokens: {}, e2e: {:.3}s",
                req.id,
                reason.as_str(),
                req.prompt_len,
                req.num_cached_tokens.unwrap_or(0),
                now.duration_since(t.arrival).as_secs_f64(),
            );
        }
        m.request_prompt_tokens.observe(req.prompt_len as f64);
        m.request_generation_tokens.observe(generated as f64);
        m.request_params_max_tokens
            .observe(req.params.max_tokens as f64);
        let parent = match &req.parent {
            None => Some((1, generated)),
            Some(p) => p.child_finished(generated),
        };
        if let Some((n, longest)) = parent {
            m.request_params_n.observe(n as f64);
            m.request_max_num_generation_tokens.observe(longest as f64);
        }
        if let Some(first) = t.first_scheduled {
            m.request_queue_time
                .observe(first.duration_since(t.arrival).as_secs_f64());
            m.request_inference_time
                .observe(now.duration_since(first).as_secs_f64());
            if let Some(tok) = t.first_token {
                m.request_prefill_time
                    .observe(tok.duration_since(first).as_secs_f64());
                m.request_decode_time
                    .observe(now.duration_since(tok).as_secs_f64());
            }
        }
    }

    fn update_gauges(&mut self) {
        self.metrics
            .num_requests_running
            .set(self.scheduler.num_running() as f64);
        self.metrics
            .num_requests_waiting
            .set(self.scheduler.num_waiting() as f64);
        self.metrics.kv_cache_usage_perc.set(self.kv.usage());
        if let Some(c) = &mut self.connector {
            let now = c.stats();
            self.metrics
                .offload
                .record_stats(&self.connector_stats, &now);
            self.metrics
                .kv_transfer
                .record_stats(&self.connector_stats, &now);
            self.connector_stats = now;
            for t in c.take_transfers() {
                self.metrics.offload.record_transfer(&t);
            }
            for r in c.take_remote_reads() {
                self.metrics.kv_transfer.record_read(&r);
            }
        }
    }

    /// Runs one scheduler step end to end; false when it computed nothing.
    fn step(&mut self) -> bool {
        self.abort_disconnected();
        let plan = self.scheduler.schedule(
            &mut self.requests,
            &mut self.kv,
            self.connector.as_deref_mut(),
        );
        self.build_connector_meta(&plan);
        self.record_schedule(&plan);
        // Loads land before the forward pass (this step's, and asynchronous ones that arrived).
        if let Some(c) = &mut self.connector {
            c.start_load_kv(&mut self.pool);
            let loads = c.get_finished_loads();
            self.scheduler.kv_loaded(&mut self.requests, loads);
            for handle in c.get_finished_sends() {
                if let Some(hold) = self.held.remove(&handle) {
                    self.kv.release_hold(hold);
                }
            }
        }
        if plan.scheduled.is_empty() {
            self.publish_events();
            self.update_gauges();
            return false;
        }
        match self.execute(&plan) {
            Ok(finished) => {
                for (id, finish) in finished {
                    self.finish(&id, finish);
                }
            }
            Err(e) => {
                tracing::error!("forward pass failed: {e}");
                for s in &plan.scheduled {
                    self.finish(
                        &s.request_id,
                        Finish::new(FinishReason::Error, Some(e.to_string())),
                    );
                }
            }
        }
        self.publish_events();
        self.update_gauges();
        true
    }

    /// Publishes this step's cache changes as one batch, the device pool's then the
    /// connector's (nothing when nothing changed).
    fn publish_events(&mut self) {
        let mut events = self.kv.take_events();
        if let Some(c) = &mut self.connector {
            events.extend(c.take_events());
        }
        if !events.is_empty() {
            self.sink.publish(events);
        }
    }

    /// Shows the connector the planned step: each scheduled request's blocks and how far
    /// they will be computed.
    fn build_connector_meta(&mut self, plan: &SchedulerOutput) {
        let Some(c) = &mut self.connector else {
            return;
        };
        let scheduled: Vec<ScheduledBlocks<'_>> = plan
            .scheduled
            .iter()
            .filter_map(|s| {
                let req = self.requests.get(&s.request_id)?;
                Some(ScheduledBlocks {
                    request: connector_request(req, &self.kv),
                    block_ids: self.kv.block_table(&req.id),
                    num_computed_tokens: req.num_computed_tokens + s.num_new_tokens,
                })
            })
            .collect();
        c.build_connector_meta(&scheduled);
    }

    /// Clients that went away never read their output: free their blocks now.
    fn abort_disconnected(&mut self) {
        let gone: Vec<String> = self
            .requests
            .values()
            .filter(|r| r.is_disconnected())
            .map(|r| r.id.clone())
            .collect();
        for id in gone {
            self.finish(&id, Finish::new(FinishReason::Abort, None));
        }
    }

    fn record_schedule(&self, plan: &SchedulerOutput) {
        let m = &self.metrics;
        m.num_preemptions.inc_by(plan.num_preemptions as u64);
        m.prefix_cache_queries
            .inc_by(plan.prefix_cache_queries as u64);
        m.prefix_cache_hits.inc_by(plan.prefix_cache_hits as u64);
        if self.connector.is_some() {
            m.offload
                .external_queries
                .inc_by(plan.prefix_cache_queries as u64);
            m.offload.external_hits.inc_by(plan.external_hits as u64);
        }
        if !plan.scheduled.is_empty() {
            m.iteration_tokens.observe(plan.total_tokens() as f64);
        }
    }

    /// Runs the forward pass for `plan`, samples where a sequence reached its end, and returns
    /// the requests that finished.
    fn execute(
        &mut self,
        plan: &SchedulerOutput,
    ) -> Result<Vec<(String, Finish)>, crate::model::ModelError> {
        let block_size = self.config.block_size;
        let total = plan.total_tokens();
        let mut token_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut logits_rows = Vec::new();
        let mut hidden_rows = Vec::new();
        // (scheduled entry, logits row) of the entries that sample a token this step (their
        // prefill is complete).
        let mut samples = Vec::new();
        // (scheduled entry, position, logits row) of each prompt-logprob row, and (scheduled
        // entry, position) of each pooled row (hidden row `k` is `pooled[k]`).
        let mut prompt_rows = Vec::new();
        let mut pooled = Vec::new();
        for (i, s) in plan.scheduled.iter().enumerate() {
            let req = &self.requests[&s.request_id];
            let table = self.kv.block_table(&s.request_id);
            let start = req.num_computed_tokens;
            for pos in start..start + s.num_new_tokens {
                token_ids.push(req.all_token_ids[pos]);
                positions.push(pos);
                slots.push(table[pos / block_size] as usize * block_size + pos % block_size);
                if req.wants_prompt_logprob(pos) {
                    prompt_rows.push((i, pos, logits_rows.len()));
                    logits_rows.push(token_ids.len() - 1);
                }
                if req.wants_hidden(pos) {
                    hidden_rows.push(token_ids.len() - 1);
                    pooled.push((i, pos));
                }
            }
            if req.pooling.is_none() && start + s.num_new_tokens == req.num_tokens() {
                samples.push((i, logits_rows.len()));
                logits_rows.push(token_ids.len() - 1);
            }
        }
        let mut query_start = 0;
        let seqs: Vec<SeqAttn<'_>> = plan
            .scheduled
            .iter()
            .map(|s| {
                let req = &self.requests[&s.request_id];
                let seq = SeqAttn {
                    block_table: self.kv.block_table(&s.request_id),
                    context_len: req.num_computed_tokens + s.num_new_tokens,
                    query_start,
                    query_len: s.num_new_tokens,
                };
                query_start += s.num_new_tokens;
                seq
            })
            .collect();
        let input = StepInput {
            token_ids: &token_ids,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logits_rows: &logits_rows,
            hidden_rows: &hidden_rows,
        };
        self.model
            .forward(&input, self.pool.cache_mut(), &mut self.logits)?;
        drop(seqs);

        for s in &plan.scheduled {
            if let Some(req) = self.requests.get_mut(&s.request_id) {
                req.num_computed_tokens += s.num_new_tokens;
                self.kv
                    .cache_blocks(&s.request_id, &req.all_token_ids, req.num_computed_tokens);
            }
        }
        if let Some(c) = &mut self.connector {
            c.wait_for_save(&self.pool);
        }

        let mut finished = Vec::new();
        for &(i, pos, row) in &prompt_rows {
            if let Some(req) = self.requests.get_mut(&plan.scheduled[i].request_id) {
                req.record_prompt_logprob(pos, self.logits.row(row));
            }
        }
        for (row, &(i, pos)) in pooled.iter().enumerate() {
            let id = &plan.scheduled[i].request_id;
            if let Some(req) = self.requests.get_mut(id) {
                if req.record_hidden(pos, self.logits.hidden_row(row)) {
                    finished.push((id.clone(), Finish::new(FinishReason::Stop, None)));
                }
            }
        }

        let now = Instant::now();
        let mut new_tokens = 0u64;
        let mut prompt_tokens = 0usize;
        for &(i, row) in &samples {
            let id = &plan.scheduled[i].request_id;
            let Some(req) = self.requests.get_mut(id) else {
                continue;
            };
            let finish = req.sample_and_append(
                self.logits.row_mut(row),
                &self.eos_token_ids,
                self.config.max_model_len,
                self.tokenizer.as_ref(),
            );
            new_tokens += 1;
            let t = &mut req.timings;
            match t.last_token {
                None => {
                    // Prefill just completed (once per request, preemptions aside).
                    prompt_tokens += req.prompt_len;
                    self.metrics
                        .time_to_first_token
                        .observe(now.duration_since(t.arrival).as_secs_f64())
                }
                Some(last) => {
                    let gap = now.duration_since(last).as_secs_f64();
                    self.metrics.inter_token_latency.observe(gap);
                    self.metrics.time_per_output_token.observe(gap);
                }
            }
            t.first_token.get_or_insert(now);
            t.last_token = Some(now);
            match finish {
                Some(f) => finished.push((id.clone(), f)),
                None => {
                    if !req.send_pending(None, &mut self.outbox) {
                        finished.push((id.clone(), Finish::new(FinishReason::Abort, None)));
                    }
                }
            }
        }
        self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        self.metrics.generation_tokens.inc_by(new_tokens);
        Ok(finished)
    }
}
