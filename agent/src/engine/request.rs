//! One request's state inside the engine: its tokens, progress through prefill/decode, sampler,
//! detokenizer and stop checks, and the timestamps the metrics need.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::detokenizer::{IncrementalDetokenizer, TokenDecoder};
use super::outbox::Outbox;
use super::sampling::{Sampled, SequenceSampler};
use super::stop_checker::StopChecker;
use super::types::{
    Finish, FinishReason, GenerateOutput, GenerateRequest, ParentRequest, Pooling, PoolingType,
    PromptLogprob, SamplingParams, StopReason,
};

/// Timestamps of a request's life, for the latency histograms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

pub(crate) struct Request {
    pub id: String,
    pub prompt_len: usize,
    /// Prompt followed by the generated tokens.
    pub all_token_ids: Vec<u32>,
    /// Tokens whose K/V are in the cache. Reset to 0 on preemption (recompute).
    pub num_computed_tokens: usize,
    /// Prompt tokens found in the prefix cache at first admission (`cached_tokens`).
    pub num_cached_tokens: Option<usize>,
    pub params: SamplingParams,
    pub cache_salt: Option<String>,
    pub kv_transfer_params: Option<serde_json::Value>,
    pub parent: Option<Arc<ParentRequest>>,
    pub num_preemptions: usize,
    /// Tokens a connector is loading asynchronously (the request waits for them).
    pub pending_kv_tokens: Option<usize>,
    /// Its asynchronous load ended: admitted next without another cache lookup.
    pub kv_ready: bool,
    pub timings: Timings,
    sampler: SequenceSampler,
    detokenizer: IncrementalDetokenizer,
    stop_checker: StopChecker,
    outputs: UnboundedSender<GenerateOutput>,
    /// Output accumulated during the current step, sent by [`Request::send_pending`].
    pending: GenerateOutput,
    /// `prompt_logprobs` computed so far (entry `k`: prompt token `k + 1`), until sent.
    prompt_logprobs: Vec<PromptLogprob>,
    /// Prompt positions whose logprob is done; positions recomputed after a preemption are
    /// not computed again.
    prompt_logprobs_done: usize,
    pub pooling: Option<Pooling>,
    /// The pooled hidden state so far (a sum for [`Pooling::Mean`]) and the rows in it.
    pooled: Vec<f32>,
    pooled_rows: usize,
}

/// Most prompt tokens of a `prompt_logprobs` request computed in one step: each needs a row of
/// logits (vocabulary-sized), which would otherwise take `--max-num-batched-tokens` rows.
pub(crate) const PROMPT_LOGPROBS_STEP_TOKENS: usize = 256;

impl Request {
    pub fn new(req: GenerateRequest, outputs: UnboundedSender<GenerateOutput>) -> Self {
        let prompt_len = req.prompt_token_ids.len();
        let sampler = SequenceSampler::new(&req.params, &req.prompt_token_ids);
        let detokenizer =
            IncrementalDetokenizer::new(&req.prompt_token_ids, req.params.skip_special_tokens);
        let stop_checker =
            StopChecker::new(&req.params.stop, req.params.include_stop_str_in_output);
        Self {
            id: req.request_id,
            prompt_len,
            all_token_ids: req.prompt_token_ids,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            params: req.params,
            cache_salt: req.cache_salt,
            kv_transfer_params: req.kv_transfer_params,
            parent: req.parent,
            num_preemptions: 0,
            pending_kv_tokens: None,
            kv_ready: false,
            timings: Timings {
                arrival: Instant::now(),
                first_scheduled: None,
                first_token: None,
                last_token: None,
            },
            sampler,
            detokenizer,
            stop_checker,
            outputs,
            pending: empty_output(prompt_len),
            prompt_logprobs: Vec::new(),
            prompt_logprobs_done: 0,
            pooling: req.pooling,
            pooled: Vec::new(),
            pooled_rows: 0,
        }
    }

    /// Whether the prefix cache may supply this request's prompt: not when every prompt
    /// position's output is needed (prompt logprobs, mean pooling).
    pub fn reads_prefix_cache(&self) -> bool {
        self.params.prompt_logprobs.is_none()
            && self.pooling.map(|p| p.kind) != Some(PoolingType::Mean)
    }

    /// Most tokens to compute in one step (see [`PROMPT_LOGPROBS_STEP_TOKENS`]).
    pub fn max_step_tokens(&self) -> usize {
        if self.params.prompt_logprobs.is_some() && self.prompt_logprobs_done + 1 < self.prompt_len
        {
            PROMPT_LOGPROBS_STEP_TOKENS
        } else {
            usize::MAX
        }
    }

    /// Whether position `pos` computed this step needs its logits for a prompt logprob.
    pub fn wants_prompt_logprob(&self, pos: usize) -> bool {
        self.params.prompt_logprobs.is_some()
            && pos + 1 < self.prompt_len
            && pos >= self.prompt_logprobs_done
    }

    /// Records position `pos`'s prompt logprob from its raw logits.
    pub fn record_prompt_logprob(&mut self, pos: usize, logits: &[f32]) {
        let (Some(n), Some(&next)) = (self.params.prompt_logprobs, self.all_token_ids.get(pos + 1))
        else {
            return;
        };
        if pos == self.prompt_logprobs_done {
            let lp = self.sampler.prompt_logprob(logits, next, n);
            self.prompt_logprobs.push(lp);
            self.prompt_logprobs_done += 1;
        }
    }

    /// Computed positions stop at `prompt_len - 1`; `prompt_len` marks them sent.
    fn prompt_logprobs_sent(&self) -> bool {
        self.prompt_logprobs_done == self.prompt_len
    }

    /// Whether position `pos` computed this step is pooled into the embedding.
    pub fn wants_hidden(&self, pos: usize) -> bool {
        match self.pooling.map(|p| p.kind) {
            None => false,
            Some(PoolingType::Last) => pos + 1 == self.prompt_len,
            Some(PoolingType::Mean) => pos < self.prompt_len && pos >= self.pooled_rows,
        }
    }

    /// Pools position `pos`'s final hidden state. Returns true once the embedding is complete
    /// (it is then in the pending output and the request is done).
    pub fn record_hidden(&mut self, pos: usize, hidden: &[f32]) -> bool {
        let Some(pooling) = self.pooling else {
            return false;
        };
        match pooling.kind {
            PoolingType::Last => {
                self.pooled = hidden.to_vec();
                self.pooled_rows = self.prompt_len;
            }
            PoolingType::Mean if pos == self.pooled_rows => {
                if self.pooled.is_empty() {
                    self.pooled = vec![0.0; hidden.len()];
                }
                for (acc, h) in self.pooled.iter_mut().zip(hidden) {
                    *acc += h;
                }
                self.pooled_rows += 1;
            }
            PoolingType::Mean => {}
        }
        if self.pooled_rows < self.prompt_len {
            return false;
        }
        let mut e = std::mem::take(&mut self.pooled);
        if pooling.kind == PoolingType::Mean {
            let n = self.prompt_len as f32;
            e.iter_mut().for_each(|x| *x /= n);
        }
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        if pooling.normalize && norm > 0.0 {
            e.iter_mut().for_each(|x| *x /= norm);
        }
        self.pending.embedding = Some(e);
        true
    }

    pub fn num_tokens(&self) -> usize {
        self.all_token_ids.len()
    }

    pub fn num_output_tokens(&self) -> usize {
        self.all_token_ids.len() - self.prompt_len
    }

    /// Samples the next token from `logits`, appends it and checks every stop condition.
    /// Returns the finish when the request is done.
    pub fn sample_and_append(
        &mut self,
        logits: &mut [f32],
        eos_token_ids: &[u32],
        max_model_len: usize,
        decoder: &dyn TokenDecoder,
    ) -> Option<Finish> {
        let sampled = self.sampler.sample(
            logits,
            &self.all_token_ids[self.prompt_len..],
            eos_token_ids,
        );
        self.append_token(sampled, eos_token_ids, max_model_len, decoder)
    }

    fn append_token(
        &mut self,
        sampled: Sampled,
        eos_token_ids: &[u32],
        max_model_len: usize,
        decoder: &dyn TokenDecoder,
    ) -> Option<Finish> {
        let token = sampled.token_id;
        self.all_token_ids.push(token);
        self.pending.token_ids.push(token);
        if let Some(logprobs) = sampled.logprobs {
            self.pending.logprobs.push(logprobs);
        }
        let stop = |reason: Option<StopReason>| {
            Some(Finish {
                reason: FinishReason::Stop,
                stop_reason: reason,
                error: None,
                kv_transfer_params: None,
            })
        };
        let past_min_tokens = self.num_output_tokens() > self.params.min_tokens;

        // Special tokens end the sequence before their text would be emitted.
        let mut finish = None;
        if past_min_tokens && !self.params.ignore_eos && eos_token_ids.contains(&token) {
            finish = stop(None);
        } else if past_min_tokens && self.params.stop_token_ids.contains(&token) {
            finish = stop(Some(StopReason::Token(token)));
        } else {
            let delta = self.detokenizer.push(decoder, token);
            if past_min_tokens {
                let check = self.stop_checker.push(&delta);
                self.pending.text.push_str(&check.emit);
                if let Some(text) = check.matched {
                    finish = stop(Some(StopReason::Text(text)));
                }
            } else {
                // Stop strings only count once min_tokens are out; still hold back a possible
                // partial match so it can complete after the threshold.
                let check = self.stop_checker.push_without_matching(&delta);
                self.pending.text.push_str(&check);
            }
        }
        if finish.is_none()
            && (self.num_output_tokens() >= self.params.max_tokens
                || self.num_tokens() >= max_model_len)
        {
            finish = Some(Finish::new(FinishReason::Length, None));
        }
        if let Some(f) = &finish {
            if f.stop_reason
                .as_ref()
                .map_or(true, |r| matches!(r, StopReason::Token(_)))
            {
                let rest = self.stop_checker.flush();
                self.pending.text.push_str(&rest);
            }
        }
        finish
    }

    /// Queues what this step produced (if anything) for the client. Returns false when the
    /// client is gone, so the caller can abort the request.
    pub fn send_pending(&mut self, finish: Option<Finish>, outbox: &mut Outbox) -> bool {
        if self.pending.token_ids.is_empty() && finish.is_none() {
            return true;
        }
        let mut out = std::mem::replace(&mut self.pending, empty_output(self.prompt_len));
        if self.params.prompt_logprobs.is_some()
            && self.prompt_logprobs_done + 1 >= self.prompt_len
            && !self.prompt_logprobs_sent()
        {
            out.prompt_logprobs = Some(std::mem::take(&mut self.prompt_logprobs));
            // Marks them sent: nothing is recorded past the prompt.
            self.prompt_logprobs_done = self.prompt_len;
        }
        out.finish = finish;
        out.num_cached_tokens = self.num_cached_tokens.unwrap_or(0);
        outbox.push(&self.outputs, out)
    }

    /// Whether the receiving side has gone away (client disconnected).
    pub fn is_disconnected(&self) -> bool {
        self.outputs.is_closed()
    }
}

fn empty_output(prompt_len: usize) -> GenerateOutput {
    GenerateOutput {
        token_ids: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        finish: None,
        prompt_logprobs: None,
        embedding: None,
        num_prompt_tokens: prompt_len,
        num_cached_tokens: 0,
    }
}
