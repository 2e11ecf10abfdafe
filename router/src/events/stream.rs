//! One pod's ordered event stream: seq tracking, gap recovery through the pod's replay socket,
//! restart handling, and application of each batch to the index, in seq order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvevents::{decode_batch, encode_seq, ReplayReply};

use super::{IngestStats, StreamStats};
use crate::index::PrefixIndex;

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
enum ReplayError {
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed reply ({0} frames)")]
    Malformed(usize),
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
}

impl PodStream {
    pub fn new(ctx: &Ctx, pod: Arc<str>, replay: Option<String>) -> Self {
        Self {
            stats: ctx.stats.pod(&pod),
            pod,
            replay,
            last: None,
            replayed: None,
        }
    }

    pub fn set_replay(&mut self, replay: Option<String>) {
        self.replay = replay;
    }

    /// Adds `n` to one counter, the pod's and the totals.
    fn count(&self, ctx: &Ctx, counter: fn(&StreamStats) -> &AtomicU64, n: u64) {
        for stats in [&ctx.stats.totals, &*self.stats] {
            counter(stats).fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a message of this pod's socket that is not a live batch.
    pub fn on_malformed(&self, ctx: &Ctx) {
        self.count(ctx, |s| &s.decode_errors, 1);
    }

    /// Handles one live batch.
    pub fn on_live(&mut self, ctx: &Ctx, seq: u64, payload: &[u8]) {
        if let Some((lo, hi)) = self.replayed {
            if (lo..=hi).contains(&seq) {
                self.count(ctx, |s| &s.duplicates, 1);
                return;
            }
            if seq > hi {
                self.replayed = None;
            }
        }
        match self.last {
            None if seq > 0 && self.replay.is_some() => {
                // Joined a running stream: fetch its start if still buffered.
                self.recover(ctx, 0, seq, payload);
            }
            None => {
                if seq > 0 {
                    // Joined late with no replay socket: what seqs 0..seq stored stays unknown.
                    // Not silent: a gap, so the operator sees the hole (and can add `replay=`).
                    self.count(ctx, |s| &s.gaps, 1);
                    let pod = &self.pod;
                    tracing::warn!(%pod, seq, "KV events begin after seq 0 and no replay socket");
                }
                self.apply(ctx, seq, payload)
            }
            Some(last) if seq == last + 1 => self.apply(ctx, seq, payload),
            Some(last) if seq > last + 1 => {
                self.count(ctx, |s| &s.gaps, 1);
                tracing::warn!(pod = %self.pod, last, seq, "KV event seq gap");
                self.recover(ctx, last + 1, seq, payload);
            }
            Some(last) => {
                // Seq went back: a new publisher process (engine restart) with a fresh cache.
                tracing::warn!(pod = %self.pod, last, seq, "KV event seq went back: clearing pod");
                self.reset(ctx);
                self.last = None;
                self.replayed = None;
                // As a new stream: its batches before `seq` (sent before we reconnected) are
                // fetched from the replay socket.
                self.on_live(ctx, seq, payload);
            }
        }
    }

    /// The pod's engine restarted, as its load monitor saw (before or after the new
    /// publisher's first batches came, and even when their seqs happen to follow the old
    /// ones'): the pod is cleared and the stream starts over from what the new publisher has
    /// sent, which its replay socket holds (the old publisher's buffer died with it).
    pub fn on_restart(&mut self, ctx: &Ctx) {
        tracing::warn!(pod = %self.pod, "pod restarted: clearing it, its stream starts over");
        ctx.index.clear_pod(&self.pod);
        self.last = None;
        self.replayed = None;
        if let Some(batches) = self.fetch(ctx, 0) {
            for (seq, batch) in &batches {
                self.accept_in_order(ctx, *seq, batch);
            }
            // Those may also be queued on the live socket.
            self.replayed = batches.last().map(|(newest, _)| (0, *newest));
        }
        // Counted last: once it shows, the stream has started over.
        self.count(ctx, |s| &s.resets, 1);
    }

    /// The replay socket's batches from `start` on (counted as a replay), or None (counted as
    /// a failure) when there is no socket or it did not answer.
    fn fetch(&self, ctx: &Ctx, start: u64) -> Option<Vec<(u64, Vec<u8>)>> {
        let endpoint = self.replay.as_deref()?;
        match replay(ctx, endpoint, start) {
            Ok(batches) => {
                self.count(ctx, |s| &s.replays, 1);
                Some(batches)
            }
            Err(e) => {
                self.count(ctx, |s| &s.replay_failures, 1);
                let pod = &self.pod;
                tracing::warn!(%pod, endpoint, start, error = %e, "KV event replay failed");
                None
            }
        }
    }

    /// Fills `start..live` from the replay socket, then applies the live batch. Whatever cannot
    /// be filled leaves the pod's state unknown, so the pod is cleared.
    fn recover(&mut self, ctx: &Ctx, start: u64, live: u64, payload: &[u8]) {
        let Some(batches) = self.fetch(ctx, start) else {
            if self.last.is_some() {
                self.reset(ctx);
            }
            self.apply(ctx, live, payload);
            return;
        };
        let mut newest = None;
        for (seq, batch) in &batches {
            if self.last.is_some_and(|l| *seq <= l) {
                continue;
            }
            self.accept_in_order(ctx, *seq, batch);
            newest = Some(*seq);
        }
        if self.last.is_none_or(|l| live > l) {
            self.accept_in_order(ctx, live, payload);
        }
        if let Some(newest) = newest.filter(|&n| n > live) {
            // Those were published after `live` and are still queued on the live socket.
            self.replayed = Some((live + 1, newest));
        }
    }

    /// Applies a batch that should follow `last`; a hole before it clears the pod first.
    fn accept_in_order(&mut self, ctx: &Ctx, seq: u64, payload: &[u8]) {
        // Before the first batch nothing of this stream was applied, so a lost start needs no
        // clear.
        let expected = self.last.map(|l| l + 1);
        if expected.is_some_and(|e| seq != e) {
            let pod = &self.pod;
            tracing::warn!(%pod, ?expected, seq, "KV events no longer buffered: clearing pod");
            self.reset(ctx);
        }
        self.apply(ctx, seq, payload);
    }

    fn reset(&self, ctx: &Ctx) {
        self.count(ctx, |s| &s.resets, 1);
        ctx.index.clear_pod(&self.pod);
    }

    fn apply(&mut self, ctx: &Ctx, seq: u64, payload: &[u8]) {
        self.last = Some(seq);
        match decode_batch(payload) {
            Ok(batch) => {
                ctx.index.apply_batch(&self.pod, &batch);
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
            Err(e) => {
                // The batch's changes are lost: what the pod holds is no longer known.
                self.count(ctx, |s| &s.decode_errors, 1);
                let pod = &self.pod;
                tracing::warn!(%pod, seq, error = %e, "undecodable KV event batch: clearing pod");
                self.reset(ctx);
            }
        }
    }
}

/// Asks a replay socket for every buffered batch from `start` on; returns them in seq order.
fn replay(ctx: &Ctx, endpoint: &str, start: u64) -> Result<Vec<(u64, Vec<u8>)>, ReplayError> {
    let sock = ctx.zmq.socket(zmq::DEALER)?;
    sock.set_linger(0)?;
    sock.connect(endpoint)?;
    sock.send_multipart([&b""[..], &encode_seq(start)[..]], 0)?;
    let timeout_ms = i64::try_from(ctx.replay_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut batches = Vec::new();
    loop {
        if sock.poll(zmq::POLLIN, timeout_ms)? == 0 {
            return Err(ReplayError::Timeout(ctx.replay_timeout));
        }
        let frames = sock.recv_multipart(0)?;
        let reply = match frames.as_slice() {
            [empty, seq, payload] if empty.is_empty() => ReplayReply::parse(seq, payload),
            _ => None,
        };
        match reply {
            Some(ReplayReply::End) => break,
            Some(ReplayReply::Batch { seq, payload }) => batches.push((seq, payload.to_vec())),
            None => return Err(ReplayError::Malformed(frames.len())),
        }
    }
    batches.sort_by_key(|(seq, _)| *seq);
    Ok(batches)
}
