//! Continuous batching with chunked prefill (vLLM v1 style): every step gets a token budget;
//! running requests are served first (one token each when decoding, a chunk when prefilling),
//! then waiting requests are admitted while blocks and budget last. When the pool runs dry the
//! most recently admitted request is preempted and later recomputed from scratch (its own
//! freed blocks usually come back as prefix-cache hits).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use kvcache::{ConnectorRequest, KvCacheManager, KvConnector};

use super::request::Request;

/// Limits the scheduler works within.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
}

/// One request's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScheduledRequest {
    pub request_id: String,
    /// Tokens computed this step, starting at the request's `num_computed_tokens`.
    pub num_new_tokens: usize,
}

/// What a step will run, plus the bookkeeping the metrics need.
#[derive(Debug, Default)]
pub(crate) struct SchedulerOutput {
    pub scheduled: Vec<ScheduledRequest>,
    pub num_preemptions: usize,
    /// Prompt tokens looked up in / found in the prefix cache by newly admitted requests.
    pub prefix_cache_queries: usize,
    pub prefix_cache_hits: usize,
    /// Prompt tokens of newly admitted requests a connector supplies (a lower tier's hits).
    pub external_hits: usize,
}

impl SchedulerOutput {
    pub fn total_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_new_tokens).sum()
    }
}

pub(crate) struct Scheduler {
    limits: SchedulerLimits,
    waiting: VecDeque<String>,
    /// In admission order: preemption takes from the back.
    running: Vec<String>,
    /// Holding their blocks while a connector loads their KV asynchronously (vLLM's
    /// WAITING_FOR_REMOTE_KVS); counted as waiting.
    waiting_for_kv: Vec<String>,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            waiting_for_kv: Vec::new(),
        }
    }

    pub fn add(&mut self, request_id: String) {
        self.waiting.push_back(request_id);
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.waiting_for_kv.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || !self.waiting_for_kv.is_empty()
    }

    /// Forgets a request (finished or aborted); the caller frees its blocks.
    pub fn remove(&mut self, request_id: &str) {
        self.running.retain(|id| id != request_id);
        self.waiting.retain(|id| id != request_id);
        self.waiting_for_kv.retain(|id| id != request_id);
    }

    /// Asynchronous loads that ended: each request counts its loaded tokens as computed (a
    /// failed tail is recomputed in the blocks it already holds) and goes back to the head of
    /// the queue, to be scheduled without another cache lookup.
    pub fn kv_loaded(
        &mut self,
        requests: &mut HashMap<String, Request>,
        loads: Vec<kvcache::FinishedLoad>,
    ) {
        for load in loads {
            let Some(at) = self
                .waiting_for_kv
                .iter()
                .position(|id| *id == load.request_id)
            else {
                continue;
            };
            let id = self.waiting_for_kv.remove(at);
            if let Some(req) = requests.get_mut(&id) {
                let promised = req.pending_kv_tokens.take().unwrap_or(0);
                req.num_computed_tokens += load.num_tokens.min(promised);
                let computed = req.num_computed_tokens.min(req.prompt_len);
                req.num_cached_tokens.get_or_insert(computed);
                req.kv_ready = true;
                self.waiting.push_front(id);
            }
        }
    }

    /// Decides the next step. Allocates the KV slots of everything it schedules.
    pub fn schedule(
        &mut self,
        requests: &mut HashMap<String, Request>,
        kv: &mut KvCacheManager,
        mut connector: Option<&mut (dyn KvConnector + 'static)>,
    ) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.limits.max_num_batched_tokens;

        // Running requests first, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i].clone();
            let Some(req) = requests.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let num_new = step_tokens(req, req.num_computed_tokens, budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let target = req.num_computed_tokens + num_new;
            let mut scheduled = true;
            while kv.allocate_slots(&id, target, &[]).is_err() {
                // Out of blocks: recompute the most recently admitted request later.
                let Some(victim) = self.running.pop() else {
                    break;
                };
                kv.free(&victim);
                if let Some(v) = requests.get_mut(&victim) {
                    v.num_computed_tokens = 0;
                    v.num_preemptions += 1;
                }
                self.waiting.push_front(victim.clone());
                out.num_preemptions += 1;
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            budget -= num_new;
            out.scheduled.push(ScheduledRequest {
                request_id: id,
                num_new_tokens: num_new,
            });
            i += 1;
        }

        // Admit waiting requests only when nothing had to be preempted this step.
        let mut looking = Vec::new();
        while out.num_preemptions == 0
            && budget > 0
            && self.running.len() < self.limits.max_num_seqs
        {
            let Some(id) = self.waiting.front().cloned() else {
                break;
            };
            let Some(req) = requests.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            // Back from an asynchronous load, the request's blocks are allocated and filled:
            // no lookup. Otherwise the device prefix cache first, then the tiers below it.
            let (cached_blocks, num_cached, num_external, load_async) = if req.kv_ready {
                (Vec::new(), req.num_computed_tokens, 0, false)
            } else {
                let (cached_blocks, num_cached) = match self.limits.enable_prefix_caching {
                    // Looked up either way: the lookup also keeps the request's cache_salt for
                    // the blocks it will store.
                    true => {
                        let found = kv.find_cached_prefix(
                            &id,
                            &req.all_token_ids,
                            req.cache_salt.as_deref(),
                        );
                        if req.reads_prefix_cache() {
                            found
                        } else {
                            (Vec::new(), 0)
                        }
                    }
                    false => (Vec::new(), 0),
                };
                let hit = match connector.as_deref_mut() {
                    Some(c) if req.reads_prefix_cache() => {
                        match c.get_num_new_matched_tokens(&connector_request(req, kv), num_cached)
                        {
                            Some(hit) => hit,
                            None => {
                                // Still looking: the requests behind it go first this step.
                                self.waiting.pop_front();
                                looking.push(id);
                                continue;
                            }
                        }
                    }
                    _ => kvcache::ExternalHit::default(),
                };
                // Nothing to load is nothing to wait for.
                let load_async = hit.load_async && hit.num_tokens > 0;
                (cached_blocks, num_cached, hit.num_tokens, load_async)
            };
            let num_computed = num_cached + num_external;
            // An asynchronous load computes nothing this step: the blocks are only reserved.
            let num_new = if load_async {
                0
            } else {
                step_tokens(req, num_computed, budget)
            };
            if kv
                .allocate_slots(&id, num_computed + num_new, &cached_blocks)
                .is_err()
            {
                break;
            }
            if let (Some(c), false) = (connector.as_deref_mut(), req.kv_ready) {
                let table = kv.block_table(&id);
                c.update_state_after_alloc(
                    &connector_request(req, kv),
                    table,
                    num_cached,
                    num_external,
                );
            }
            self.waiting.pop_front();
            req.kv_ready = false;
            let first_admission = req.num_cached_tokens.is_none();
            if first_admission {
                out.prefix_cache_queries += req.prompt_len;
                out.prefix_cache_hits += num_cached.min(req.prompt_len);
                out.external_hits += num_external.min(req.prompt_len);
            }
            if load_async {
                req.num_computed_tokens = num_cached;
                req.pending_kv_tokens = Some(num_external);
                self.waiting_for_kv.push(id);
                continue;
            }
            self.running.push(id.clone());
            req.num_computed_tokens = num_computed;
            if first_admission {
                // As vLLM: cached tokens count the device hit and what a connector loaded.
                req.num_cached_tokens = Some(num_computed.min(req.prompt_len));
            }
            req.timings.first_scheduled.get_or_insert_with(Instant::now);
            budget -= num_new;
            out.scheduled.push(ScheduledRequest {
                request_id: id,
                num_new_tokens: num_new,
            });
        }
        // Requests whose lookup is still out keep their place at the head of the queue.
        for id in looking.into_iter().rev() {
            self.waiting.push_front(id);
        }
        out
    }
}

/// Tokens `req` computes this step from `num_computed`: the rest of its sequence, within the
/// step's `budget` and the request's own per-step bound.
fn step_tokens(req: &Request, num_computed: usize, budget: usize) -> usize {
    (req.num_tokens() - num_computed)
        .min(budget)
        .min(req.max_step_tokens())
}

/// What a connector sees of `req`.
pub(super) fn connector_request<'a>(
    req: &'a Request,
    kv: &'a KvCacheManager,
) -> ConnectorRequest<'a> {
    ConnectorRequest {
        request_id: &req.id,
        token_ids: &req.all_token_ids,
        num_prompt_tokens: req.prompt_len,
        block_hashes: kv.block_hashes(&req.id),
        kv_transfer_params: req.kv_transfer_params.as_ref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::{GenerateRequest, SamplingParams};
    use kvcache::{BlockHasher, BlockPool, HashAlgo};

    const BS: usize = 16;

    fn manager(num_blocks: usize) -> KvCacheManager {
        let pool = BlockPool::new(num_blocks, true);
        KvCacheManager::new(pool, BS, BlockHasher::new(HashAlgo::Sha256Cbor, None), true)
    }

    fn add(sched: &mut Scheduler, reqs: &mut HashMap<String, Request>, id: &str, prompt: Vec<u32>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx); // keep the channel open for the test's lifetime
        let params = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let req = GenerateRequest {
            request_id: id.to_string(),
            prompt_token_ids: prompt,
            params,
            cache_salt: None,
            parent: None,
            pooling: None,
            kv_transfer_params: None,
        };
        reqs.insert(id.to_string(), Request::new(req, tx));
        sched.add(id.to_string());
    }

    /// Plays the model's part: marks scheduled tokens computed and appends a token to every
    /// request whose prefill is done.
    fn run_step(
        plan: &SchedulerOutput,
        reqs: &mut HashMap<String, Request>,
        kv: &mut KvCacheManager,
    ) {
        for s in &plan.scheduled {
            let r = reqs.get_mut(&s.request_id).unwrap();
            r.num_computed_tokens += s.num_new_tokens;
            kv.cache_blocks(&s.request_id, &r.all_token_ids, r.num_computed_tokens);
            if r.num_computed_tokens == r.num_tokens() {
                r.all_token_ids.push(7);
            }
        }
    }

    /// (request, tokens) of each scheduled entry, in order.
    fn scheduled(plan: &SchedulerOutput) -> Vec<(&str, usize)> {
        plan.scheduled
            .iter()
            .map(|x| (x.request_id.as_str(), x.num_new_tokens))
            .collect()
    }

    fn limits(max_num_seqs: usize, max_num_batched_tokens: usize) -> SchedulerLimits {
        SchedulerLimits {
            max_num_seqs,
            max_num_batched_tokens,
            enable_prefix_caching: true,
        }
    }

    #[test]
    fn long_prompt_is_prefilled_in_chunks_within_the_budget() {
        let mut kv = manager(64);
        let mut reqs = HashMap::new();
        let mut s = Scheduler::new(limits(8, 32));
        add(&mut s, &mut reqs, "a", (0..100).collect());
        let mut chunks = Vec::new();
        for _ in 0..5 {
            let plan = s.schedule(&mut reqs, &mut kv, None);
            chunks.push(plan.total_tokens());
            run_step(&plan, &mut reqs, &mut kv);
        }
        // 100 prompt tokens in 32-token chunks, then one decode token.
        assert_eq!(chunks, vec![32, 32, 32, 4, 1]);
        assert_eq!(kv.block_table("a").len(), 7); // 101 tokens
    }

    #[test]
    fn decodes_share_the_budget_with_a_prefill_chunk() {
        let mut kv = manager(64);
        let mut reqs = HashMap::new();
        let mut s = Scheduler::new(limits(8, 20));
        add(&mut s, &mut reqs, "a", (0..10).collect());
        let plan = s.schedule(&mut reqs, &mut kv, None);
        run_step(&plan, &mut reqs, &mut kv);
        add(&mut s, &mut reqs, "b", (100..150).collect());
        let plan = s.schedule(&mut reqs, &mut kv, None);
        assert_eq!(scheduled(&plan), vec![("a", 1), ("b", 19)]);
    }

    #[test]
    fn admission_stops_at_max_num_seqs() {
        let mut kv = manager(64);
        let mut reqs = HashMap::new();
        let mut s = Scheduler::new(limits(2, 1000));
        for id in ["a", "b", "c"] {
            add(&mut s, &mut reqs, id, vec![1, 2, 3]);
        }
        let plan = s.schedule(&mut reqs, &mut kv, None);
        assert_eq!(plan.scheduled.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    }

    #[test]
    fn out_of_blocks_preempts_the_latest_request_and_frees_its_blocks() {
        // 4 blocks: two requests of 2 full blocks each fill the pool exactly.
        let mut kv = manager(4);
        let mut reqs = HashMap::new();
        let mut s = Scheduler::new(limits(8, 1000));
        add(&mut s, &mut reqs, "a", (0..32).collect());
        add(&mut s, &mut reqs, "b", (100..132).collect());
        let plan = s.schedule(&mut reqs, &mut kv, None);
        assert_eq!(plan.scheduled.len(), 2);
        run_step(&plan, &mut reqs, &mut kv); // both now hold 33 tokens: a third block each
        let plan = s.schedule(&mut reqs, &mut kv, None);
        assert_eq!(plan.num_preemptions, 1);
        assert_eq!(
            plan.scheduled,
            vec![ScheduledRequest {
                request_id: "a".into(),
                num_new_tokens: 1
            }]
        );
        assert_eq!(reqs["b"].num_computed_tokens, 0);
        assert!(kv.block_table("b").is_empty());
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    }

    #[test]
    fn shared_prefix_is_admitted_as_computed() {
        let mut kv = manager(64);
        let mut reqs = HashMap::new();
        let mut s = Scheduler::new(limits(8, 1000));
        let prefix: Vec<u32> = (0..48).collect();
        add(
            &mut s,
            &mut reqs,
            "a",
            prefix.iter().copied().chain([500, 501]).collect(),
        );
        let plan = s.schedule(&mut reqs, &mut kv, None);
        run_step(&plan, &mut reqs, &mut kv);
        add(
            &mut s,
            &mut reqs,
            "b",
            prefix.iter().copied().chain([900]).collect(),
        );
        let plan = s.schedule(&mut reqs, &mut kv, None);
        assert_eq!(
            plan.scheduled[1],
            ScheduledRequest {
                request_id: "b".into(),
                num_new_tokens: 1
            }
        );
        assert_eq!(reqs["b"].num_cached_tokens, Some(48));
        assert_eq!(
            (plan.prefix_cache_queries, plan.prefix_cache_hits),
            (49, 48)
        );
        assert_eq!(kv.block_table("a")[..3], kv.block_table("b")[..3]);
    }

    /// A tier holding the first blocks of some prompts, loaded asynchronously: a load lands
    /// (into the device, as `start_load_kv` would) after `delay` polls, `short` tokens short
    /// of what was promised; `unknown` (request, count): that request's first lookups are
    /// still out.
    struct SlowTier {
        held: std::collections::HashSet<kvcache::BlockHash>,
        unknown: Option<(&'static str, u32)>,
        in_flight: Vec<(String, usize, u32)>,
        delay: u32,
        short: usize,
        landed: Vec<kvcache::FinishedLoad>,
    }

    impl SlowTier {
        fn poll(&mut self) {
            for load in &mut self.in_flight {
                load.2 = load.2.saturating_sub(1);
            }
            let (done, rest): (Vec<_>, Vec<_>) = self.in_flight.drain(..).partition(|l| l.2 == 0);
            self.in_flight = rest;
            self.landed
                .extend(done.into_iter().map(|(id, n, _)| kvcache::FinishedLoad {
                    request_id: id,
                    num_tokens: n - self.short,
                }));
        }
    }

    impl KvConnector for SlowTier {
        fn get_num_new_matched_tokens(
            &mut self,
            r: &ConnectorRequest<'_>,
            num_computed_tokens: usize,
        ) -> Option<kvcache::ExternalHit> {
            if let Some((id, left)) = &mut self.unknown {
                if *id == r.request_id && *left > 0 {
                    *left -= 1;
                    return None;
                }
            }
            let first = num_computed_tokens / BS;
            let last = (r.token_ids.len() - 1) / BS;
            let n = r.block_hashes[first..last]
                .iter()
                .take_while(|h| self.held.contains(h))
                .count();
            Some(kvcache::ExternalHit {
                num_tokens: n * BS,
                load_async: true,
            })
        }
        fn update_state_after_alloc(
            &mut self,
            r: &ConnectorRequest<'_>,
            _: &[kvcache::BlockId],
            _: usize,
            num_external_tokens: usize,
        ) {
            self.in_flight
                .push((r.request_id.to_string(), num_external_tokens, self.delay));
        }
        fn build_connector_meta(&mut self, _: &[kvcache::ScheduledBlocks<'_>]) {}
        fn request_finished(
            &mut self,
            f: &kvcache::FinishedRequest<'_>,
        ) -> kvcache::FinishedAction {
            self.in_flight.retain(|l| l.0 != f.request.request_id);
            kvcache::FinishedAction::default()
        }
        fn start_load_kv(&mut self, _: &mut dyn kvcache::BlockIo) {}
        fn get_finished_loads(&mut self) -> Vec<kvcache::FinishedLoad> {
            std::mem::take(&mut self.landed)
        }
        fn wait_for_save(&mut self, _: &dyn kvcache::BlockIo) {}
        fn cached_blocks(&self) -> Vec<(kvcache::Medium, Vec<kvcache::BlockHash>)> {
            Vec::new()
        }
        fn stats(&self) -> kvcache::ConnectorStats {
            kvcache::ConnectorStats::default()
        }
        fn take_events(&mut self) -> Vec<kvcache::KvCacheEvent> {
            Vec::new()
        }
        fn reset_cache(&mut self) -> bool {
            true
        }
        fn idle_poll(&self) -> Option<std::time::Duration> {
            None
        }
        fn take_transfers(&mut self) -> Vec<kvcache::Transfer> {
            Vec::new()
        }
    }

    fn slow_tier(prompt: &[u32], blocks: usize, delay: u32, short: usize) -> SlowTier {
        let mut hashes = Vec::new();
        BlockHasher::new(HashAlgo::Sha256Cbor, None).extend_request_hashes(
            &mut hashes,
            prompt,
            BS,
            None,
        );
        SlowTier {
            held: hashes.into_iter().take(blocks).collect(),
            unknown: None,
            in_flight: Vec::new(),
            delay,
            short,
            landed: Vec::new(),
        }
    }

    #[test]
    fn an_asynchronous_load_holds_its_blocks_and_resumes_past_them() {
        let prompt: Vec<u32> = (0..83).collect();
        let mut tier = slow_tier(&prompt, 4, 2, 0);
        let mut s = Scheduler::new(limits(8, 256));
        let mut kv = manager(16);
        let mut reqs = HashMap::new();
        add(&mut s, &mut reqs, "a", prompt.clone());
        add(&mut s, &mut reqs, "b", (1000..1020).collect());
        // "a" waits for 4 blocks (64 tokens) with them reserved; "b" runs meanwhile.
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("b", 20)]);
        assert_eq!(kv.block_table("a").len(), 4);
        assert_eq!((s.num_waiting(), s.num_running()), (1, 1));
        assert_eq!(plan.external_hits, 64);
        run_step(&plan, &mut reqs, &mut kv);
        tier.poll();
        s.kv_loaded(&mut reqs, tier.get_finished_loads());
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("b", 1)], "a's load has not landed");
        tier.poll();
        s.kv_loaded(&mut reqs, tier.get_finished_loads());
        // Landed: only the 19 tokens past the loaded blocks are computed.
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("b", 1), ("a", 19)]);
        assert_eq!(reqs["a"].num_computed_tokens, 64);
        assert_eq!(reqs["a"].num_cached_tokens, Some(64));
        assert_eq!(kv.block_table("a").len(), 6);
    }

    #[test]
    fn a_short_load_is_recomputed_and_an_abort_frees_the_reserved_blocks() {
        let prompt: Vec<u32> = (0..83).collect();
        let mut tier = slow_tier(&prompt, 4, 1, 32);
        let mut s = Scheduler::new(limits(8, 256));
        let mut kv = manager(16);
        let mut reqs = HashMap::new();
        add(&mut s, &mut reqs, "a", prompt.clone());
        assert!(s
            .schedule(&mut reqs, &mut kv, Some(&mut tier))
            .scheduled
            .is_empty());
        tier.poll();
        s.kv_loaded(&mut reqs, tier.get_finished_loads());
        // Two of four blocks arrived: the other 51 tokens are computed in the held blocks.
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("a", 51)]);

        let mut tier = slow_tier(&prompt, 4, 5, 0);
        let mut kv = manager(16);
        let mut s = Scheduler::new(limits(8, 256));
        add(&mut s, &mut reqs, "c", prompt);
        s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(kv.num_free_blocks(), 12);
        s.remove("c");
        let table = kv.block_table("c").to_vec();
        tier.request_finished(&kvcache::FinishedRequest {
            request: connector_request(&reqs["c"], &kv),
            block_ids: &table,
            num_computed_tokens: 0,
            completed: false,
        });
        kv.free("c");
        assert_eq!(kv.num_free_blocks(), 16);
        assert!(!s.has_work());
        assert!(tier.in_flight.is_empty());
    }

    #[test]
    fn a_lookup_still_out_lets_the_requests_behind_it_go_first() {
        let prompt: Vec<u32> = (0..83).collect();
        let mut tier = slow_tier(&prompt, 4, 1, 0);
        tier.unknown = Some(("a", 2));
        let mut s = Scheduler::new(limits(8, 256));
        let mut kv = manager(16);
        let mut reqs = HashMap::new();
        add(&mut s, &mut reqs, "a", prompt);
        add(&mut s, &mut reqs, "b", (1000..1020).collect());
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("b", 20)]);
        assert!(
            kv.block_table("a").is_empty(),
            "nothing reserved while looking"
        );
        assert_eq!(
            plan.prefix_cache_queries, 20,
            "a is not counted until admitted"
        );
        run_step(&plan, &mut reqs, &mut kv);
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(scheduled(&plan), vec![("b", 1)]);
        run_step(&plan, &mut reqs, &mut kv);
        // The answer is in: a waits for its 4 blocks like any asynchronous load.
        let plan = s.schedule(&mut reqs, &mut kv, Some(&mut tier));
        assert_eq!(plan.external_hits, 64);
        assert_eq!(kv.block_table("a").len(), 4);
        assert_eq!(s.num_waiting(), 1);
    }
}
