//! The ZMQ publisher (vLLM `ZmqEventPublisher`): the engine-side sink turns each step's cache
//! events into one batch and hands it to a publisher thread through a bounded queue; the thread
//! encodes it, sends `[topic, seq, payload]` on a PUB socket, keeps the last `buffer_steps`
//! payloads and answers replay requests on a ROUTER socket, each in full and at the pace its
//! subscriber reads, between batches. The engine never blocks on it: a full queue drops the
//! batch (counted, logged), and the skipped seq shows subscribers a gap.

use std::collections::VecDeque;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvevents::{encode_batch, encode_seq, Encoding, EventBatch, ExternalBlockHash, KvEvent};
use tracing::{debug, warn};

use super::config::{binds, HashForm, KvEventsConfig};
use crate::metrics::Metrics;
use kvcache::{BlockHash, ExtraKey, KvCacheEvent, KvEventSink};

/// How long the publisher thread waits for a batch before it looks at the replay socket.
const REPLAY_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error("KV events {what} {endpoint}: {source}")]
    Socket {
        what: &'static str,
        endpoint: String,
        source: zmq::Error,
    },
    #[error("cannot start the KV events publisher thread: {0}")]
    Thread(std::io::Error),
}

/// The endpoints the sockets ended up on (wildcard ports resolved).
#[derive(Debug, Clone)]
pub struct PublisherEndpoints {
    pub events: String,
    pub replay: Option<String>,
}

/// Opens the sockets (so a busy port is a start-up error), starts the publisher thread and
/// returns the sink the engine writes to. The thread ends once the sink is dropped and its
/// queue drained.
pub fn start(
    config: &KvEventsConfig,
    metrics: Arc<Metrics>,
) -> Result<(ZmqEventSink, PublisherEndpoints), PublisherError> {
    let ctx = zmq::Context::new();
    let socket_err = |what, endpoint: &str| {
        let endpoint = endpoint.to_string();
        move |source| PublisherError::Socket {
            what,
            endpoint,
            source,
        }
    };
    let publisher = ctx
        .socket(zmq::PUB)
        .map_err(socket_err("socket for", &config.endpoint))?;
    publisher
        .set_sndhwm(config.hwm)
        .map_err(socket_err("high-water mark for", &config.endpoint))?;
    // Let queued messages go out when the process stops, but never hang on a dead peer.
    publisher
        .set_linger(1000)
        .map_err(socket_err("linger for", &config.endpoint))?;
    let events_endpoint = if binds(&config.endpoint) {
        publisher
            .bind(&config.endpoint)
            .map_err(socket_err("bind", &config.endpoint))?;
        last_endpoint(&publisher).unwrap_or_else(|| config.endpoint.clone())
    } else {
        publisher
            .connect(&config.endpoint)
            .map_err(socket_err("connect", &config.endpoint))?;
        config.endpoint.clone()
    };
    let (replay, replay_endpoint) = match &config.replay_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let socket = ctx
                .socket(zmq::ROUTER)
                .map_err(socket_err("socket for", endpoint))?;
            socket
                .set_linger(0)
                .map_err(socket_err("linger for", endpoint))?;
            // A full pipe to a subscriber is an error we wait out, not a silent drop.
            socket
                .set_router_mandatory(true)
                .map_err(socket_err("ROUTER_MANDATORY for", endpoint))?;
            socket
                .bind(endpoint)
                .map_err(socket_err("bind", endpoint))?;
            let bound = last_endpoint(&socket).unwrap_or_else(|| endpoint.clone());
            (Some(socket), Some(bound))
        }
    };
    let (tx, rx) = mpsc::sync_channel(config.max_queue_size);
    let mut thread = PublisherThread {
        publisher,
        replay,
        topic: config.topic.clone().into_bytes(),
        encoding: config.encoding,
        buffer: VecDeque::new(),
        buffer_steps: config.buffer_steps,
        replays: VecDeque::new(),
    };
    std::thread::Builder::new()
        .name("kv-events".into())
        .spawn(move || thread.run(rx))
        .map_err(PublisherError::Thread)?;
    let sink = ZmqEventSink {
        queue: tx,
        next_seq: 0,
        hash_form: config.hash_form,
        metrics,
    };
    let endpoints = PublisherEndpoints {
        events: events_endpoint,
        replay: replay_endpoint,
    };
    Ok((sink, endpoints))
}

fn last_endpoint(socket: &zmq::Socket) -> Option<String> {
    socket.get_last_endpoint().ok()?.ok()
}

/// One batch on its way to the publisher thread.
struct Queued {
    seq: u64,
    batch: EventBatch,
}

/// The engine side: collects a step's events and queues them as one batch. Cheap: the
/// events are converted (hash form) here; encoding and I/O happen on the publisher thread.
pub struct ZmqEventSink {
    queue: SyncSender<Queued>,
    next_seq: u64,
    hash_form: HashForm,
    metrics: Arc<Metrics>,
}

impl ZmqEventSink {
    fn hash(&self, h: &BlockHash) -> ExternalBlockHash {
        match self.hash_form {
            HashForm::Int => ExternalBlockHash::Int(h.to_u64()),
            HashForm::Bytes => ExternalBlockHash::Bytes(h.as_bytes().to_vec()),
        }
    }

    fn convert(&self, event: KvCacheEvent) -> KvEvent {
        match event {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_name,
                extra_keys,
                medium,
            } => KvEvent::BlockStored(kvevents::BlockStored {
                block_hashes: block_hashes.iter().map(|h| self.hash(h)).collect(),
                parent_block_hash: parent_block_hash.as_ref().map(|h| self.hash(h)),
                token_ids,
                block_size: block_size as u32,
                lora_id: None,
                medium: Some(medium.as_str().to_string()),
                lora_name,
                extra_keys: extra_keys.map(|blocks| {
                    blocks
                        .into_iter()
                        .map(|keys| {
                            (!keys.is_empty()).then(|| keys.into_iter().map(extra_key).collect())
                        })
                        .collect()
                }),
                group_idx: None,
            }),
            KvCacheEvent::BlockRemoved {
                block_hashes,
                medium,
            } => KvEvent::BlockRemoved(kvevents::BlockRemoved {
                block_hashes: block_hashes.iter().map(|h| self.hash(h)).collect(),
                medium: Some(medium.as_str().to_string()),
                group_idx: None,
            }),
            KvCacheEvent::AllBlocksCleared => KvEvent::AllBlocksCleared,
        }
    }
}

fn extra_key(key: ExtraKey) -> kvevents::ExtraKey {
    match key {
        ExtraKey::Str(s) => kvevents::ExtraKey::Str(s),
    }
}

impl KvEventSink for ZmqEventSink {
    fn publish(&mut self, batch: Vec<KvCacheEvent>) {
        if batch.is_empty() {
            return;
        }
        let events = batch.into_iter().map(|e| self.convert(e)).collect();
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let batch = EventBatch {
            ts,
            events,
            data_parallel_rank: None,
        };
        // The seq is taken even if the batch is dropped, so subscribers see the loss as a gap.
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.queue.try_send(Queued { seq, batch }) {
            Ok(()) => self.metrics.kv_events_published.inc(),
            Err(TrySendError::Full(_)) => {
                self.metrics.kv_events_dropped.inc();
                let dropped = self.metrics.kv_events_dropped.get();
                // Once per power of two: visible without flooding the log under overload.
                if dropped.is_power_of_two() {
                    warn!(
                        seq,
                        dropped,
                        "KV events queue full: batch dropped (subscribers will see a seq gap)"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.kv_events_dropped.inc();
                warn!(seq, "KV events publisher thread is gone: batch dropped");
            }
        }
    }
}

struct PublisherThread {
    publisher: zmq::Socket,
    replay: Option<zmq::Socket>,
    topic: Vec<u8>,
    encoding: Encoding,
    /// The last `buffer_steps` payloads, oldest first, for replay.
    buffer: VecDeque<(u64, Payload)>,
    buffer_steps: usize,
    /// Replays being sent, oldest first.
    replays: VecDeque<ReplaySession>,
}

/// An encoded batch, shared by the replay buffer and the replays in flight.
type Payload = Arc<[u8]>;

/// Replays sent at once; more requests wait in the socket's receive queue meanwhile.
const MAX_REPLAYS: usize = 16;

/// A replay whose subscriber reads nothing for this long is abandoned (its peer is stuck).
const REPLAY_STALL: Duration = Duration::from_secs(30);

/// One replay on its way out: the batches buffered when it was asked for (taken then, so
/// eviction meanwhile cannot shorten what it promised), then the end marker. It is sent as
/// fast as the subscriber reads: the ROUTER socket reports a full pipe (`ROUTER_MANDATORY`)
/// instead of dropping, and the rest waits for the next round.
struct ReplaySession {
    identity: Vec<u8>,
    batches: VecDeque<(u64, Payload)>,
    last_progress: Instant,
}

/// How far one send round of a replay got.
enum Progress {
    /// Everything, end marker included.
    Done,
    /// The subscriber's pipe is full; the rest goes in a later round.
    Blocked,
    /// The subscriber is gone or the socket failed: abandon it.
    Failed,
}

impl ReplaySession {
    fn send_round(&mut self, socket: &zmq::Socket) -> Progress {
        let mut sent_any = false;
        let outcome = loop {
            let result = match self.batches.front() {
                Some((seq, payload)) => {
                    let frames: [&[u8]; 4] = [&self.identity, b"", &encode_seq(*seq), payload];
                    socket.send_multipart(frames, zmq::DONTWAIT)
                }
                None => {
                    let end: [&[u8]; 4] = [
                        &self.identity,
                        b"",
                        &kvevents::REPLAY_END_SEQ.to_be_bytes(),
                        b"",
                    ];
                    socket.send_multipart(end, zmq::DONTWAIT)
                }
            };
            match result {
                Ok(()) if self.batches.pop_front().is_some() => sent_any = true,
                Ok(()) => break Progress::Done,
                Err(zmq::Error::EAGAIN) => break Progress::Blocked,
                Err(e) => {
                    // EHOSTUNREACH: the subscriber disconnected before reading it all.
                    debug!(left = self.batches.len(), "KV events replay abandoned: {e}");
                    break Progress::Failed;
                }
            }
        };
        if sent_any {
            self.last_progress = Instant::now();
        }
        match outcome {
            Progress::Blocked if self.last_progress.elapsed() > REPLAY_STALL => {
                warn!(
                    left = self.batches.len(),
                    "KV events replay abandoned: its subscriber read nothing for {REPLAY_STALL:?}"
                );
                Progress::Failed
            }
            other => other,
        }
    }
}

impl PublisherThread {
    fn run(&mut self, queue: mpsc::Receiver<Queued>) {
        loop {
            match queue.recv_timeout(REPLAY_POLL) {
                Ok(item) => {
                    self.publish(item);
                    while let Ok(item) = queue.try_recv() {
                        self.publish(item);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.serve_replay();
        }
    }

    fn publish(&mut self, Queued { seq, batch }: Queued) {
        let payload: Payload = encode_batch(&batch, self.encoding).into();
        let frames: [&[u8]; 3] = [&self.topic, &encode_seq(seq), &payload];
        // PUB never blocks: at the high-water mark ZMQ drops for that subscriber.
        if let Err(e) = self.publisher.send_multipart(frames, zmq::DONTWAIT) {
            warn!(seq, "KV events send failed: {e}");
        }
        if self.buffer_steps > 0 {
            if self.buffer.len() == self.buffer_steps {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    /// Takes new replay requests (`[identity, "", start_seq]`: every buffered batch with
    /// seq >= start, then the end marker) while fewer than `MAX_REPLAYS` are in flight, and
    /// sends each replay in flight as far as its subscriber reads.
    fn serve_replay(&mut self) {
        let Some(socket) = &self.replay else {
            return;
        };
        while self.replays.len() < MAX_REPLAYS {
            let frames = match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    warn!("KV events replay receive failed: {e}");
                    break;
                }
            };
            let Some((identity, rest)) = frames.split_first() else {
                continue;
            };
            let start = kvevents::parse_replay_request(rest);
            // A malformed request still gets the end marker, so its client never hangs.
            let batches = match start {
                Some(start) => {
                    debug!(start, "KV events replay");
                    let first = self.buffer.partition_point(|(seq, _)| *seq < start);
                    self.buffer.range(first..).cloned().collect()
                }
                None => {
                    warn!(
                        "malformed KV events replay request ({} frames)",
                        frames.len()
                    );
                    VecDeque::new()
                }
            };
            self.replays.push_back(ReplaySession {
                identity: identity.clone(),
                batches,
                last_progress: Instant::now(),
            });
        }
        self.replays
            .retain_mut(|r| matches!(r.send_round(socket), Progress::Blocked));
    }
}

#[cfg(test)]
mod tests {
    use kvevents::{decode_batch, decode_seq, ReplayReply};
    use serde_json::json;

    use super::*;
    use crate::metrics::CacheConfigInfo;
    use kvcache::Medium;

    fn metrics() -> Arc<Metrics> {
        let cache = CacheConfigInfo {
            block_size: 4,
            num_gpu_blocks: 8,
            enable_prefix_caching: true,
            prefix_caching_hash_algo: "sha256_cbor".into(),
            cache_dtype: "auto".into(),
        };
        Arc::new(Metrics::new("m", 64, &cache).unwrap())
    }

    fn hash(i: u8) -> BlockHash {
        BlockHash::from_digest(&[i; 32])
    }

    fn stored(i: u8) -> KvCacheEvent {
        KvCacheEvent::BlockStored {
            block_hashes: vec![hash(i)],
            parent_block_hash: None,
            token_ids: vec![1, 2, 3, u32::from(i)],
            block_size: 4,
            lora_name: None,
            extra_keys: Some(vec![vec![ExtraKey::Str("salt".into())]]),
            medium: Medium::Gpu,
        }
    }

    fn recv(socket: &zmq::Socket, timeout_ms: i64) -> Option<Vec<Vec<u8>>> {
        let mut items = [socket.as_poll_item(zmq::POLLIN)];
        zmq::poll(&mut items, timeout_ms).unwrap();
        items[0]
            .is_readable()
            .then(|| socket.recv_multipart(0).unwrap())
    }

    /// Events and replay on loopback ports chosen by the system.
    fn loopback_config(topic: &str, buffer_steps: usize) -> KvEventsConfig {
        KvEventsConfig::parse(
            &json!({"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:*",
                    "replay_endpoint": "tcp://127.0.0.1:*", "topic": topic,
                    "buffer_steps": buffer_steps}),
            None,
        )
        .unwrap()
    }

    /// A SUB only gets messages published after its subscription arrived: publishes one-event
    /// batches until one comes through, and returns it.
    fn first_delivered(sink: &mut ZmqEventSink, sub: &zmq::Socket) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            sink.publish(vec![stored(0)]);
            if let Some(frames) = recv(sub, 50) {
                return frames;
            }
            assert!(
                Instant::now() < deadline,
                "no message reached the subscriber"
            );
        }
    }

    /// Reads one replay to its end marker: the seqs of its batches, each `["", seq, payload]`
    /// with a payload that decodes.
    fn replayed_seqs(dealer: &zmq::Socket) -> Vec<u64> {
        let mut seqs = Vec::new();
        loop {
            let frames = recv(dealer, 5000).expect("replay reply");
            match ReplayReply::from_frames(&frames).expect("a well-formed reply") {
                ReplayReply::End => return seqs,
                ReplayReply::Batch { seq, payload } => {
                    decode_batch(payload).unwrap();
                    seqs.push(seq);
                }
            }
        }
    }

    #[test]
    fn publishes_batches_and_replays_them() {
        let config = loopback_config("kv@pod:8000@m", 3);
        let metrics = metrics();
        let (mut sink, endpoints) = start(&config, metrics.clone()).unwrap();
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_subscribe(b"kv@").unwrap();
        sub.connect(&endpoints.events).unwrap();
        let first = first_delivered(&mut sink, &sub);
        assert_eq!(first[0], b"kv@pod:8000@m");
        let mut seq = decode_seq(&first[1]).unwrap();
        // A step without events sends nothing; the next batches follow in order.
        sink.publish(Vec::new());
        sink.publish(vec![
            stored(1),
            KvCacheEvent::BlockRemoved {
                block_hashes: vec![hash(1)],
                medium: Medium::Gpu,
            },
        ]);
        sink.publish(vec![KvCacheEvent::AllBlocksCleared]);
        for want in 0..2 {
            let frames = recv(&sub, 5000).expect("batch");
            assert_eq!(decode_seq(&frames[1]), Some(seq + 1));
            seq += 1;
            let batch = decode_batch(&frames[2]).unwrap();
            let tags: Vec<&str> = batch.events.iter().map(KvEvent::tag).collect();
            if want == 0 {
                assert_eq!(tags, ["BlockStored", "BlockRemoved"]);
                let KvEvent::BlockStored(s) = &batch.events[0] else {
                    unreachable!()
                };
                assert_eq!(s.block_hashes, [ExternalBlockHash::Int(hash(1).to_u64())]);
                assert_eq!(s.medium.as_deref(), Some("GPU"));
                assert_eq!(
                    s.extra_keys,
                    Some(vec![Some(vec![kvevents::ExtraKey::Str("salt".into())])])
                );
                assert!(batch.ts > 1.7e9);
            } else {
                assert_eq!(tags, ["AllBlocksCleared"]);
            }
        }
        assert_eq!(metrics.kv_events_published.get(), seq + 1);

        // Replay from 0: only the last `buffer_steps` batches are still there, then the end.
        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer
            .connect(endpoints.replay.as_deref().unwrap())
            .unwrap();
        dealer
            .send_multipart([&b""[..], &encode_seq(0)], 0)
            .unwrap();
        assert_eq!(replayed_seqs(&dealer), [seq - 2, seq - 1, seq]);
        // A malformed request still gets the end marker, so the client never hangs.
        dealer.send_multipart([&b""[..], b"bad"], 0).unwrap();
        let frames = recv(&dealer, 5000).expect("end marker");
        assert_eq!(
            ReplayReply::parse(&frames[1], &frames[2]),
            Some(ReplayReply::End)
        );
    }

    /// A replay larger than the socket's send high-water mark, to a subscriber that reads
    /// slowly: every batch arrives, then the end marker, and live publishing goes on meanwhile.
    #[test]
    fn a_replay_larger_than_the_pipe_arrives_whole_without_stalling_live_events() {
        let (mut sink, endpoints) = start(&loopback_config("kv@p@m", 5000), metrics()).unwrap();
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_rcvhwm(0).unwrap();
        sub.set_subscribe(b"").unwrap();
        sub.connect(&endpoints.events).unwrap();
        let mut last = decode_seq(&first_delivered(&mut sink, &sub)[1]).unwrap();
        let total_before = last + 2501;
        while last + 1 < total_before {
            sink.publish(vec![stored(1)]);
            let frames = recv(&sub, 5000).expect("live batch");
            last = decode_seq(&frames[1]).unwrap();
        }
        // Now all of 0..total_before are buffered; the subscriber drains live ones it missed.
        while recv(&sub, 100).is_some() {}

        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_rcvhwm(10).unwrap();
        dealer
            .connect(endpoints.replay.as_deref().unwrap())
            .unwrap();
        dealer
            .send_multipart([&b""[..], &encode_seq(0)], 0)
            .unwrap();
        // The replay fills the pipe and waits; a live batch still goes out at once.
        std::thread::sleep(Duration::from_millis(300));
        sink.publish(vec![stored(2)]);
        let live = recv(&sub, 2000).expect("a live batch during the replay");
        assert_eq!(decode_seq(&live[1]), Some(total_before));

        let replayed = replayed_seqs(&dealer);
        // Everything buffered when it was asked for, in order; the batch published after the
        // request is not part of it.
        assert_eq!(replayed, (0..total_before).collect::<Vec<_>>());
    }

    #[test]
    fn a_connecting_publisher_loses_no_first_batch() {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_subscribe(b"kv@").unwrap();
        sub.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = sub.get_last_endpoint().unwrap().unwrap();
        let config = KvEventsConfig::parse(
            &json!({"enable_kv_cache_events": true, "endpoint": endpoint, "topic": "kv@p@m"}),
            None,
        )
        .unwrap();
        let (mut sink, _) = start(&config, metrics()).unwrap();
        // As an agent between start-up and its first request: connected, nothing sent yet,
        // while the subscriber waits (polling, as the router's SUB does).
        assert!(recv(&sub, 500).is_none());
        sink.publish(vec![stored(0)]);
        let frames = recv(&sub, 5000).expect("the first batch");
        assert_eq!(decode_seq(&frames[1]), Some(0));
    }

    #[test]
    fn a_full_queue_drops_the_batch_and_leaves_a_seq_gap() {
        let (tx, rx) = mpsc::sync_channel(1);
        let metrics = metrics();
        let mut sink = ZmqEventSink {
            queue: tx,
            next_seq: 0,
            hash_form: HashForm::Bytes,
            metrics: metrics.clone(),
        };
        for i in 0..2 {
            sink.publish(vec![stored(i)]);
        }
        assert_eq!(metrics.kv_events_dropped.get(), 1);
        let first = rx.try_recv().unwrap();
        assert_eq!(first.seq, 0);
        let KvEvent::BlockStored(s) = &first.batch.events[0] else {
            panic!("{:?}", first.batch.events)
        };
        assert_eq!(s.block_hashes, [ExternalBlockHash::Bytes(vec![0; 32])]);
        sink.publish(vec![stored(2)]);
        assert_eq!(rx.try_recv().unwrap().seq, 2);
        assert_eq!(metrics.kv_events_published.get(), 2);
    }

    #[test]
    fn a_busy_port_is_a_start_up_error() {
        let ctx = zmq::Context::new();
        let holder = ctx.socket(zmq::PUB).unwrap();
        holder.bind("tcp://127.0.0.1:*").unwrap();
        let taken = holder.get_last_endpoint().unwrap().unwrap();
        let port = taken.rsplit(':').next().unwrap();
        let config = KvEventsConfig::parse(
            &json!({"enable_kv_cache_events": true, "endpoint": format!("tcp://*:{port}")}),
            None,
        )
        .unwrap();
        let err = start(&config, metrics()).err().expect("bind must fail");
        assert!(err.to_string().contains("bind"), "{err}");
    }
}
