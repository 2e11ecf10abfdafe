//! One pod's ordered event stream: seq tracking, gap recovery through the pod's replay socket,
//! restart handling, and application of each batch to the index, in seq order.
//!
//! The stream does no I/O itself: when it needs a replay it returns a [`ReplayRequest`], holds
//! the live batches that come meanwhile, and goes on when its driver hands back the answer
//! ([`PodStream::on_replay`]). So a driver that serves many pods (the centralized workers) runs
//! replays off its thread and a mute replay socket delays only its own pod. Replays that fail
//! back off (1 s, doubling to 60 s); a gap meanwhile clears the pod without asking again.
//!
//! A payload that does not decode is counted and ignored, as if it never came: it changes no
//! state, so garbage under a pod's topic cannot wipe the pod or trigger replays; if a real
//! batch was lost that way, the next one shows the gap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvevents::{decode_batch, encode_seq, EventBatch, ReplayReply};

use super::{IngestStats, StreamStats};
use crate::index::PrefixIndex;

/// The largest ZMQ message a KV event socket accepts; a peer sending more is disconnected.
/// vLLM batches are a step's events: far below this even for 128k-token prompts.
pub(crate) const MAX_MESSAGE_BYTES: i64 = 64 << 20;

/// A replay may bring at most this much, and take at most this long in all.
const MAX_REPLAY_BYTES: usize = 512 << 20;
const REPLAY_DEADLINE: Duration = Duration::from_secs(60);

/// Live batches held while a replay is in flight; beyond either bound the replay is given up.
const MAX_HELD_BATCHES: usize = 10_000;
const MAX_HELD_BYTES: usize = 256 << 20;

/// Backoff after a failed replay: the first wait, and the most it doubles to.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

static NEXT_REPLAY_ID: AtomicU64 = AtomicU64::new(0);

/// What a stream needs besides its own state; shared by all streams of an ingest.
pub(crate) struct Ctx {
    pub index: Arc<PrefixIndex>,
    pub stats: Arc<IngestStats>,
    pub zmq: zmq::Context,
    pub replay_timeout: Duration,
}

impl Ctx {
    /// Drops everything known of `pod`: its index state and its counters.
    pub fn forget_pod(&self, pod: &str) {
        self.index.remove_pod(pod);
        self.stats.remove_pod(pod);
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed reply ({0} frames)")]
    Malformed(usize),
    #[error("more than {} MiB or {:?}", MAX_REPLAY_BYTES >> 20, REPLAY_DEADLINE)]
    TooLarge,
    #[error("could not start a replay thread: {0}")]
    Thread(std::io::Error),
}

/// The buffered batches a replay socket returned, in seq order.
pub(crate) type Replayed = Vec<(u64, Vec<u8>)>;

/// A replay the stream asks its driver for; the answer goes back with `id`.
#[derive(Debug, Clone)]
pub(crate) struct ReplayRequest {
    pub id: u64,
    pub endpoint: String,
    pub start: u64,
}

/// A replay in flight and what came live meanwhile.
struct Recovery {
    id: u64,
    start: u64,
    held: Vec<(u64, EventBatch)>,
    held_bytes: usize,
    /// Started by a restart, which is counted once the stream has started over.
    restart: bool,
}

pub(crate) struct PodStream {
    pod: Arc<str>,
    /// The pod's own counters (the totals are counted too).
    stats: Arc<StreamStats>,
    replay: Option<String>,
    /// Seq of the last batch applied (or given up on).
    last: Option<u64>,
    /// Seqs already applied from a replay that may still arrive live: dropped as duplicates.
    replayed: Option<(u64, u64)>,
    recovery: Option<Recovery>,
    /// Failed replays in a row, and until when none is asked for.
    failures: u32,
    backoff_until: Option<Instant>,
}

impl PodStream {
    pub fn new(ctx: &Ctx, pod: Arc<str>, replay: Option<String>) -> Self {
        Self {
            stats: ctx.stats.pod(&pod),
            pod,
            replay,
            last: None,
            replayed: None,
            recovery: None,
            failures: 0,
            backoff_until: None,
        }
    }

    pub fn set_replay(&mut self, replay: Option<String>) {
        self.replay = replay;
    }

    /// Adds `n` to one counter, the pod's and the totals.
    fn count(&self, ctx: &Ctx, counter: fn(&StreamStats) -> &AtomicU64, n: u64) -> u64 {
        counter(&ctx.stats.totals).fetch_add(n, Ordering::Relaxed);
        counter(&self.stats).fetch_add(n, Ordering::Relaxed) + n
    }

    /// Counts a message of this pod's socket that is not a live batch.
    pub fn on_malformed(&self, ctx: &Ctx) {
        self.count(ctx, |s| &s.decode_errors, 1);
    }

    /// Counts an undecodable payload; logged at the pod's 1st, 2nd, 4th, … so a flood of
    /// garbage is seen without flooding the log.
    fn undecodable(&self, ctx: &Ctx, seq: u64, error: &dyn std::fmt::Display) {
        let n = self.count(ctx, |s| &s.decode_errors, 1);
        if n.is_power_of_two() {
            let pod = &self.pod;
            tracing::warn!(%pod, seq, count = n, %error, "undecodable KV event batch ignored");
        }
    }

    /// Handles one live batch; may ask for a replay.
    pub fn on_live(&mut self, ctx: &Ctx, seq: u64, payload: &[u8]) -> Option<ReplayRequest> {
        let batch = match decode_batch(payload) {
            Ok(batch) => batch,
            Err(e) => {
                self.undecodable(ctx, seq, &e);
                return None;
            }
        };
        if let Some(r) = &mut self.recovery {
            if r.held.len() < MAX_HELD_BATCHES && r.held_bytes + payload.len() <= MAX_HELD_BYTES {
                r.held.push((seq, batch));
                r.held_bytes += payload.len();
                return None;
            }
            let pod = &self.pod;
            tracing::warn!(%pod, "too many KV events waiting on a replay: giving it up");
            if let Some(recovery) = self.recovery.take() {
                self.give_up(ctx, recovery);
            }
        }
        self.on_batch(ctx, seq, batch)
    }

    fn on_batch(&mut self, ctx: &Ctx, seq: u64, batch: EventBatch) -> Option<ReplayRequest> {
        if let Some((lo, hi)) = self.replayed {
            if (lo..=hi).contains(&seq) {
                self.count(ctx, |s| &s.duplicates, 1);
                return None;
            }
            if seq > hi {
                self.replayed = None;
            }
        }
        match self.last {
            None if seq > 0 => {
                // Joined a running stream: fetch its start if still buffered.
                if self.may_replay() {
                    return self.start_recovery(0, vec![(seq, batch)], false);
                }
                // What seqs 0..seq stored stays unknown. Not silent: a gap, so the operator
                // sees the hole (and can add `replay=`).
                self.count(ctx, |s| &s.gaps, 1);
                let pod = &self.pod;
                tracing::warn!(%pod, seq, "KV events begin after seq 0 and no replay to fetch them");
                self.apply(ctx, seq, &batch);
            }
            None => self.apply(ctx, seq, &batch),
            Some(last) if seq == last + 1 => self.apply(ctx, seq, &batch),
            Some(last) if seq > last + 1 => {
                self.count(ctx, |s| &s.gaps, 1);
                tracing::warn!(pod = %self.pod, last, seq, "KV event seq gap");
                if self.may_replay() {
                    return self.start_recovery(last + 1, vec![(seq, batch)], false);
                }
                // No replay to ask (none configured, or backing off): the state is unknown.
                self.reset(ctx);
                self.apply(ctx, seq, &batch);
            }
            Some(last) => {
                // Seq went back: a new publisher process (engine restart) with a fresh cache.
                tracing::warn!(pod = %self.pod, last, seq, "KV event seq went back: clearing pod");
                self.reset(ctx);
                self.last = None;
                self.replayed = None;
                // As a new stream: its batches before `seq` (sent before we reconnected) are
                // fetched from the replay socket.
                return self.on_batch(ctx, seq, batch);
            }
        }
        None
    }

    /// The pod's engine restarted, as its load monitor saw (before or after the new
    /// publisher's first batches came, and even when their seqs happen to follow the old
    /// ones'): the pod is cleared and the stream starts over from what the new publisher has
    /// sent, which its replay socket holds (the old publisher's buffer died with it). A replay
    /// in flight is abandoned (its answer would be the old process's).
    pub fn on_restart(&mut self, ctx: &Ctx) -> Option<ReplayRequest> {
        tracing::warn!(pod = %self.pod, "pod restarted: clearing it, its stream starts over");
        ctx.index.clear_pod(&self.pod);
        self.last = None;
        self.replayed = None;
        self.recovery = None;
        // A new process deserves a fresh try.
        self.failures = 0;
        self.backoff_until = None;
        let request = self.start_recovery(0, Vec::new(), true);
        if request.is_none() {
            self.count(ctx, |s| &s.resets, 1);
        }
        request
    }

    /// Whether a gap may ask for a replay: there is a socket and failed replays are not
    /// backing off.
    fn may_replay(&self) -> bool {
        self.replay.is_some() && self.backoff_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Asks for `start..`, holding `held` (the live batch that showed the need) until the
    /// answer; None when there is no replay socket.
    fn start_recovery(
        &mut self,
        start: u64,
        held: Vec<(u64, EventBatch)>,
        restart: bool,
    ) -> Option<ReplayRequest> {
        let endpoint = self.replay.clone()?;
        // Unique across streams, so the answer to a forgotten pod's replay never lands on its
        // successor.
        let id = NEXT_REPLAY_ID.fetch_add(1, Ordering::Relaxed);
        self.recovery = Some(Recovery {
            id,
            start,
            held,
            held_bytes: 0,
            restart,
        });
        Some(ReplayRequest {
            id,
            endpoint,
            start,
        })
    }

    /// The answer to replay `id`: fills what the stream asked for, then applies what was held.
    /// An answer to a replay since abandoned is dropped.
    pub fn on_replay(&mut self, ctx: &Ctx, id: u64, result: Result<Replayed, ReplayError>) {
        let Some(recovery) = self.recovery.take_if(|r| r.id == id) else {
            return;
        };
        match result {
            Ok(batches) => {
                self.count(ctx, |s| &s.replays, 1);
                self.failures = 0;
                self.backoff_until = None;
                self.fill(ctx, &recovery, batches);
            }
            Err(e) => {
                self.count(ctx, |s| &s.replay_failures, 1);
                self.failures += 1;
                let wait = BACKOFF_FIRST
                    .saturating_mul(1 << (self.failures - 1).min(6))
                    .min(BACKOFF_MAX);
                self.backoff_until = Some(Instant::now() + wait);
                let (pod, start) = (&self.pod, recovery.start);
                tracing::warn!(%pod, start, error = %e, ?wait, "KV event replay failed; next one not before the wait");
                self.give_up(ctx, recovery);
                return;
            }
        }
        if recovery.restart {
            // Counted last: once it shows, the stream has started over.
            self.count(ctx, |s| &s.resets, 1);
        }
    }

    /// Applies a replay's batches from the recovery's start, then the held live ones.
    fn fill(&mut self, ctx: &Ctx, recovery: &Recovery, batches: Replayed) {
        let mut newest = None;
        for (seq, payload) in batches {
            if seq < recovery.start || self.last.is_some_and(|l| seq <= l) {
                continue;
            }
            let batch = match decode_batch(&payload) {
                Ok(b) => b,
                Err(e) => {
                    // Skipped: the next batch shows the hole.
                    self.undecodable(ctx, seq, &e);
                    continue;
                }
            };
            if self.last.is_none() && seq > recovery.start {
                self.count(ctx, |s| &s.gaps, 1);
                let (pod, start) = (&self.pod, recovery.start);
                tracing::warn!(%pod, start, seq, "KV events from the stream's start no longer buffered");
            }
            self.accept_in_order(ctx, seq, &batch);
            newest = Some(seq);
        }
        let mut newest_live = None;
        for (seq, batch) in &recovery.held {
            // Held batches the replay also brought were applied from it.
            if self.last.is_none_or(|l| *seq > l) {
                self.accept_in_order(ctx, *seq, batch);
            }
            newest_live = Some(newest_live.map_or(*seq, |n: u64| n.max(*seq)));
        }
        if let Some(newest) = newest.filter(|&n| newest_live.is_none_or(|l| n > l)) {
            // Those were published after the newest live batch seen and are still queued on
            // the live socket.
            let from = newest_live.map_or(recovery.start, |l| l + 1);
            self.replayed = Some((from, newest));
        }
    }

    /// Gives up a recovery (taken out of the stream): what it would have filled stays unknown,
    /// so the pod is cleared, and the held batches are applied as a stream that starts with them.
    fn give_up(&mut self, ctx: &Ctx, recovery: Recovery) {
        if self.last.is_some() || recovery.restart {
            self.reset(ctx);
        }
        self.last = None;
        for (seq, batch) in &recovery.held {
            self.accept_in_order(ctx, *seq, batch);
        }
    }

    /// Applies a batch that should follow `last`; a hole before it clears the pod first.
    fn accept_in_order(&mut self, ctx: &Ctx, seq: u64, batch: &EventBatch) {
        // Before the first batch nothing of this stream was applied, so a lost start needs no
        // clear.
        let expected = self.last.map(|l| l + 1);
        if expected.is_some_and(|e| seq != e) {
            let pod = &self.pod;
            tracing::warn!(%pod, ?expected, seq, "KV events no longer buffered: clearing pod");
            self.reset(ctx);
        }
        self.apply(ctx, seq, batch);
    }

    fn reset(&self, ctx: &Ctx) {
        self.count(ctx, |s| &s.resets, 1);
        ctx.index.clear_pod(&self.pod);
    }

    fn apply(&mut self, ctx: &Ctx, seq: u64, batch: &EventBatch) {
        self.last = Some(seq);
        ctx.index.apply_batch(&self.pod, batch);
        self.count(ctx, |s| &s.batches, 1);
        self.count(ctx, |s| &s.events, batch.events.len() as u64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let lag_us = ((now - batch.ts) * 1e6).max(0.0) as u64;
        for stats in [&ctx.stats.totals, &*self.stats] {
            stats.last_lag_us.store(lag_us, Ordering::Relaxed);
        }
    }
}

/// Asks a replay socket for every buffered batch from `start` on; returns them in seq order.
/// Bounded: each reply within `replay_timeout`, all of it within `REPLAY_DEADLINE` and
/// `MAX_REPLAY_BYTES`.
pub(crate) fn replay(ctx: &Ctx, request: &ReplayRequest) -> Result<Replayed, ReplayError> {
    let sock = ctx.zmq.socket(zmq::DEALER)?;
    sock.set_linger(0)?;
    sock.set_maxmsgsize(MAX_MESSAGE_BYTES)?;
    sock.connect(&request.endpoint)?;
    sock.send_multipart([&b""[..], &encode_seq(request.start)[..]], 0)?;
    let deadline = Instant::now() + REPLAY_DEADLINE;
    let timeout_ms = i64::try_from(ctx.replay_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut batches = Vec::new();
    let mut bytes = 0usize;
    loop {
        if sock.poll(zmq::POLLIN, timeout_ms)? == 0 {
            return Err(ReplayError::Timeout(ctx.replay_timeout));
        }
        let frames = sock.recv_multipart(0)?;
        match ReplayReply::from_frames(&frames) {
            Some(ReplayReply::End) => break,
            Some(ReplayReply::Batch { seq, payload }) => {
                bytes += payload.len();
                if bytes > MAX_REPLAY_BYTES || Instant::now() > deadline {
                    return Err(ReplayError::TooLarge);
                }
                batches.push((seq, payload.to_vec()));
            }
            None => return Err(ReplayError::Malformed(frames.len())),
        }
    }
    batches.sort_by_key(|(seq, _)| *seq);
    Ok(batches)
}
