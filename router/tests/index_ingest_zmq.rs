//! Event ingestion over real ZMQ sockets: a test publisher (XPUB, so it knows when the router's
//! subscription arrived) and a test replay ROUTER speaking vLLM's protocol.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use common::block_stored;
use kvevents::{
    encode_batch, encode_seq, Encoding, EventBatch, ExternalBlockHash, KvEvent, REPLAY_END_SEQ,
};
use router::events::{EventIngest, IngestConfig, IngestStats, PodEndpoints, StreamStats};
use router::index::{IndexConfig, PrefixIndex};

const BS: usize = 4;

fn setup() -> (Arc<PrefixIndex>, EventIngest, zmq::Context) {
    setup_with(IngestConfig {
        replay_timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(10),
        ..IngestConfig::default()
    })
}

fn setup_with(ingest: IngestConfig) -> (Arc<PrefixIndex>, EventIngest, zmq::Context) {
    let mut cfg = IndexConfig::new("m");
    cfg.block_size = BS;
    let index = Arc::new(PrefixIndex::new(cfg).unwrap());
    let ingest = EventIngest::start(index.clone(), ingest);
    (index, ingest, zmq::Context::new())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tokens(chain: u32) -> Vec<u32> {
    (0..(4 * BS) as u32).map(|i| chain * 100 + i).collect()
}

/// A batch storing blocks `from..to` of chain `chain` (engine hash = chain*1000 + block).
fn store(chain: u32, from: usize, to: usize) -> EventBatch {
    let t = tokens(chain);
    let h = |i: usize| ExternalBlockHash::Int(u64::from(chain) * 1000 + i as u64);
    EventBatch {
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
        events: vec![KvEvent::BlockStored(block_stored(
            (from..to).map(h).collect(),
            from.checked_sub(1).map(h),
            t[from * BS..to * BS].to_vec(),
            BS,
            Some("GPU"),
        ))],
        data_parallel_rank: None,
    }
}

/// Leading blocks of `chain` that `pod` holds.
fn held(index: &PrefixIndex, pod: &str, chain: u32) -> usize {
    index
        .longest_prefix(&index.block_keys(&tokens(chain), None))
        .iter()
        .find(|m| &*m.pod == pod)
        .map_or(0, |m| m.blocks)
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct TestPub {
    sock: zmq::Socket,
    endpoint: String,
    topic: String,
    /// Bound like the agent's publisher, or connected to a centralized subscriber.
    bound: bool,
}

/// Binds `sock` to `endpoint` and returns the bound endpoint, retrying while a closed socket of
/// a previous process still holds the port (ZMQ closes sockets asynchronously).
fn bind_retrying(sock: &zmq::Socket, endpoint: &str) -> String {
    let start = Instant::now();
    loop {
        match sock.bind(endpoint) {
            Ok(()) => return sock.get_last_endpoint().unwrap().unwrap(),
            Err(zmq::Error::EADDRINUSE) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("bind {endpoint}: {e}"),
        }
    }
}

/// An XPUB that queues without limit: a test's bursts must not be dropped at the high-water
/// mark.
fn xpub(ctx: &zmq::Context) -> zmq::Socket {
    let sock = ctx.socket(zmq::XPUB).unwrap();
    sock.set_sndhwm(0).unwrap();
    sock
}

impl TestPub {
    /// An XPUB that binds, like the agent's publisher.
    fn bind(ctx: &zmq::Context, topic: &str) -> Self {
        let sock = xpub(ctx);
        let endpoint = bind_retrying(&sock, "tcp://127.0.0.1:*");
        Self {
            sock,
            endpoint,
            topic: topic.into(),
            bound: true,
        }
    }

    /// An XPUB that connects to a centralized subscriber.
    fn connect(ctx: &zmq::Context, endpoint: &str, topic: &str) -> Self {
        let sock = xpub(ctx);
        sock.connect(endpoint).unwrap();
        Self {
            sock,
            endpoint: endpoint.into(),
            topic: topic.into(),
            bound: false,
        }
    }

    /// Blocks until a subscriber's subscription arrived (ZMQ drops messages sent before).
    fn wait_subscribed(&self) {
        assert!(
            self.sock.poll(zmq::POLLIN, 10_000).unwrap() > 0,
            "no subscriber"
        );
        let sub = self.sock.recv_bytes(0).unwrap();
        assert_eq!(sub[0], 1, "subscribe message");
    }

    fn send(&self, seq: u64, batch: &EventBatch, encoding: Encoding) {
        self.send_raw(seq, &encode_batch(batch, encoding));
    }

    fn send_raw(&self, seq: u64, payload: &[u8]) {
        self.sock
            .send_multipart([self.topic.as_bytes(), &encode_seq(seq)[..], payload], 0)
            .unwrap();
    }
}

/// Buffered (seq, payload) batches of the test replay socket.
type Buffer = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// vLLM's replay socket over a buffer the test controls; `answer: false` makes it mute.
struct TestReplay {
    endpoint: String,
    buffer: Buffer,
    requests: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestReplay {
    fn start(ctx: &zmq::Context, answer: bool) -> Self {
        Self::start_at(ctx, "tcp://127.0.0.1:*", answer)
    }

    fn start_at(ctx: &zmq::Context, endpoint: &str, answer: bool) -> Self {
        let sock = ctx.socket(zmq::ROUTER).unwrap();
        let endpoint = bind_retrying(&sock, endpoint);
        let buffer: Buffer = Arc::default();
        let requests: Arc<Mutex<Vec<u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (b, r, s) = (buffer.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if sock.poll(zmq::POLLIN, 10).unwrap() == 0 {
                    continue;
                }
                let frames = sock.recv_multipart(0).unwrap();
                let start = u64::from_be_bytes(frames[2].as_slice().try_into().unwrap());
                r.lock().unwrap().push(start);
                if !answer {
                    continue;
                }
                let id = &frames[0];
                for (seq, payload) in b.lock().unwrap().iter().filter(|(seq, _)| *seq >= start) {
                    sock.send_multipart([&id[..], b"", &encode_seq(*seq)[..], payload], 0)
                        .unwrap();
                }
                sock.send_multipart([&id[..], b"", &REPLAY_END_SEQ.to_be_bytes()[..], b""], 0)
                    .unwrap();
            }
        });
        Self {
            endpoint,
            buffer,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn keep(&self, seq: u64, batch: &EventBatch) {
        self.buffer
            .lock()
            .unwrap()
            .push((seq, encode_batch(batch, Encoding::Map)));
    }

    fn requests(&self) -> Vec<u64> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestReplay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// An engine restart: the old process's publisher and replay socket go away and the new
/// process's come back on the same endpoints, seqs from 0. It publishes `missed` (seqs 0..)
/// before any subscriber can be connected (before it binds or connects), so only its replay
/// socket has them; returns once the router's subscription reached the new publisher.
fn restart(
    ctx: &zmq::Context,
    publisher: TestPub,
    replay: TestReplay,
    missed: &[EventBatch],
) -> (TestPub, TestReplay) {
    let replay_endpoint = replay.endpoint.clone();
    drop(replay);
    let replay = TestReplay::start_at(ctx, &replay_endpoint, true);
    let TestPub {
        sock,
        endpoint,
        topic,
        bound,
    } = publisher;
    drop(sock);
    let publisher = TestPub {
        sock: xpub(ctx),
        endpoint,
        topic,
        bound,
    };
    for (seq, batch) in missed.iter().enumerate() {
        replay.keep(seq as u64, batch);
        publisher.send(seq as u64, batch, Encoding::Map);
    }
    if bound {
        bind_retrying(&publisher.sock, &publisher.endpoint);
    } else {
        publisher.sock.connect(&publisher.endpoint).unwrap();
    }
    publisher.wait_subscribed();
    (publisher, replay)
}

/// A pod-discovery subscriber on a fresh publisher, subscription confirmed.
fn follow(
    ingest: &EventIngest,
    ctx: &zmq::Context,
    pod: &str,
    replay: Option<&TestReplay>,
) -> TestPub {
    let p = TestPub::bind(ctx, &format!("kv@{pod}@m"));
    ingest
        .add_pod(
            pod,
            PodEndpoints {
                events: Some(p.endpoint.clone()),
                replay: replay.map(|r| r.endpoint.clone()),
                topic_names: Vec::new(),
            },
        )
        .unwrap();
    p.wait_subscribed();
    p
}

fn batches(stats: &IngestStats) -> u64 {
    count(&stats.totals.batches)
}

/// A stream's (batches, gaps, replays, resets) counters.
fn stream_counts(s: &StreamStats) -> (u64, u64, u64, u64) {
    (
        count(&s.batches),
        count(&s.gaps),
        count(&s.replays),
        count(&s.resets),
    )
}

/// `pod`'s own counters, if it has any.
fn pod_stats(stats: &IngestStats, pod: &str) -> Option<Arc<StreamStats>> {
    stats
        .per_pod()
        .into_iter()
        .find(|(p, _)| &**p == pod)
        .map(|(_, s)| s)
}

#[test]
fn each_pod_has_its_own_counters_and_lag() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let pa = follow(&ingest, &ctx, "a", None);
    let pb = follow(&ingest, &ctx, "b", None);
    pa.send(0, &store(1, 0, 4), Encoding::Map);
    // A gap on a only (no replay: a is cleared).
    pa.send(3, &store(2, 0, 4), Encoding::Map);
    let mut old = store(1, 0, 4);
    old.ts -= 5.0;
    pb.send(0, &old, Encoding::Map);
    wait_until("three batches", || batches(&stats) == 3);
    let (a, b) = (
        pod_stats(&stats, "a").unwrap(),
        pod_stats(&stats, "b").unwrap(),
    );
    assert_eq!(stream_counts(&a), (2, 1, 0, 1));
    assert_eq!(stream_counts(&b), (1, 0, 0, 0));
    assert_eq!(stream_counts(&stats.totals), (3, 1, 0, 1));
    assert!(count(&a.last_lag_us) < 4_000_000);
    assert!(
        (5_000_000..20_000_000).contains(&count(&b.last_lag_us)),
        "b's lag is its own batch's: {}",
        count(&b.last_lag_us)
    );
    assert_eq!(held(&index, "b", 1), 4);
    // A removed pod's counters go; the totals keep what it counted.
    ingest.remove_pod("a");
    assert!(pod_stats(&stats, "a").is_none());
    assert_eq!(batches(&stats), 3);
    let names: Vec<String> = stats.per_pod().iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(names, ["b"]);
}

#[test]
fn live_batches_in_both_encodings_and_topic_filter() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let p = follow(&ingest, &ctx, "a", None);
    p.send(0, &store(1, 0, 2), Encoding::Map);
    p.send(1, &store(1, 2, 4), Encoding::Array);
    // Another topic on the same socket is filtered out by the SUB ("kv@" prefix).
    p.sock
        .send_multipart(
            [
                &b"other"[..],
                &encode_seq(2)[..],
                &encode_batch(&store(2, 0, 4), Encoding::Map),
            ],
            0,
        )
        .unwrap();
    wait_until("two batches", || batches(&stats) == 2);
    assert_eq!(held(&index, "a", 1), 4);
    assert_eq!(held(&index, "a", 2), 0);
    assert_eq!(count(&stats.totals.events), 2);
    assert_eq!(
        (count(&stats.totals.gaps), count(&stats.totals.resets)),
        (0, 0)
    );
    assert!(count(&stats.totals.last_lag_us) < 10_000_000);
}

#[test]
fn gap_is_filled_by_replay_and_replayed_batches_are_not_applied_twice() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    let all = [
        store(1, 0, 1),
        store(1, 1, 2),
        store(1, 2, 3),
        store(1, 3, 4),
    ];
    for (seq, b) in all.iter().enumerate() {
        replay.keep(seq as u64, b);
    }
    p.send(0, &all[0], Encoding::Map);
    // Seq 1 is lost on the live socket.
    p.send(2, &all[2], Encoding::Map);
    p.send(3, &all[3], Encoding::Map);
    wait_until("replayed chain", || {
        held(&index, "a", 1) == 4 && count(&stats.totals.duplicates) == 1
    });
    assert_eq!(replay.requests(), vec![1]);
    assert_eq!(batches(&stats), 4);
    assert_eq!(
        (
            count(&stats.totals.gaps),
            count(&stats.totals.replays),
            count(&stats.totals.resets)
        ),
        (1, 1, 0)
    );
    // Live batches go on after the recovery.
    p.send(4, &store(2, 0, 4), Encoding::Map);
    wait_until("live after replay", || held(&index, "a", 2) == 4);
}

#[test]
fn gap_without_replay_clears_the_pod() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let p = follow(&ingest, &ctx, "a", None);
    p.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("first batch", || held(&index, "a", 1) == 4);
    p.send(5, &store(2, 0, 4), Encoding::Map);
    wait_until("second batch", || batches(&stats) == 2);
    assert_eq!(
        held(&index, "a", 1),
        0,
        "blocks from before the gap are dropped"
    );
    assert_eq!(held(&index, "a", 2), 4);
    assert_eq!(
        (count(&stats.totals.gaps), count(&stats.totals.resets)),
        (1, 1)
    );
}

#[test]
fn gap_the_replay_buffer_no_longer_covers_clears_the_pod() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    p.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("first batch", || held(&index, "a", 1) == 4);
    // Seqs 1..3 fell out of the publisher's buffer; 3 and 4 are still there.
    replay.keep(3, &store(2, 0, 2));
    replay.keep(4, &store(2, 2, 4));
    p.send(4, &store(2, 2, 4), Encoding::Map);
    wait_until("recovery", || held(&index, "a", 2) == 4);
    assert_eq!(held(&index, "a", 1), 0);
    assert_eq!(
        (count(&stats.totals.replays), count(&stats.totals.resets)),
        (1, 1)
    );
}

#[test]
fn mute_replay_times_out_and_clears_the_pod() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, false);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    p.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("first batch", || held(&index, "a", 1) == 4);
    p.send(2, &store(2, 0, 4), Encoding::Map);
    wait_until("give-up", || {
        count(&stats.totals.replay_failures) == 1 && held(&index, "a", 2) == 4
    });
    assert_eq!(held(&index, "a", 1), 0);
    assert_eq!(count(&stats.totals.resets), 1);
}

#[test]
fn seq_going_back_means_restart_and_clears_the_pod() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let p = follow(&ingest, &ctx, "a", None);
    p.send(0, &store(1, 0, 2), Encoding::Map);
    p.send(1, &store(1, 2, 4), Encoding::Map);
    wait_until("old stream", || held(&index, "a", 1) == 4);
    p.send(0, &store(2, 0, 4), Encoding::Array);
    wait_until("new stream", || held(&index, "a", 2) == 4);
    assert_eq!(held(&index, "a", 1), 0);
    assert_eq!(
        (count(&stats.totals.resets), count(&stats.totals.gaps)),
        (1, 0)
    );
    // The new stream continues normally.
    p.send(1, &store(3, 0, 4), Encoding::Map);
    wait_until("continuation", || held(&index, "a", 3) == 4);
    assert_eq!(count(&stats.totals.resets), 1);
}

#[test]
fn joining_a_running_stream_replays_its_start() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    let all = [store(1, 0, 2), store(1, 2, 4), store(2, 0, 4)];
    for (seq, b) in all.iter().enumerate() {
        replay.keep(seq as u64, b);
    }
    p.send(2, &all[2], Encoding::Map);
    wait_until("start filled", || {
        held(&index, "a", 1) == 4 && held(&index, "a", 2) == 4
    });
    assert_eq!(replay.requests(), vec![0]);
    assert_eq!(
        (
            batches(&stats),
            count(&stats.totals.resets),
            count(&stats.totals.gaps)
        ),
        (3, 0, 0)
    );
}

#[test]
fn malformed_messages_are_counted_and_ingestion_goes_on() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let p = follow(&ingest, &ctx, "a", None);
    p.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("first batch", || held(&index, "a", 1) == 4);
    // Wrong frame count, bad seq frame, undecodable payloads (one at the next seq, one ahead).
    p.sock.send_multipart([&b"kv@a@m"[..], b"x"], 0).unwrap();
    p.sock
        .send_multipart([&b"kv@a@m"[..], b"123", b"\x93"], 0)
        .unwrap();
    p.send_raw(1, b"\xc1 not msgpack");
    p.send_raw(9, b"\x92\x01");
    p.send(1, &store(2, 0, 4), Encoding::Map);
    wait_until("batch after garbage", || held(&index, "a", 2) == 4);
    assert_eq!(count(&stats.totals.decode_errors), 4);
    // Garbage changes nothing: the pod keeps what it had, and no gap was seen.
    assert_eq!(held(&index, "a", 1), 4);
    assert_eq!(
        (count(&stats.totals.gaps), count(&stats.totals.resets)),
        (0, 0)
    );
}

/// Issue 17 (5): random payloads under a real pod's topic, at random seqs, neither wipe the
/// pod nor make the router ask its replay socket for anything.
#[test]
fn random_payloads_under_a_pods_topic_neither_wipe_nor_replay() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    replay.keep(0, &store(1, 0, 4));
    p.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("first batch", || held(&index, "a", 1) == 4);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..1000 {
        let len = (next() % 64) as usize;
        let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        p.send_raw(next() % 1_000_000, &payload);
    }
    p.send(1, &store(2, 0, 4), Encoding::Map);
    wait_until("the next real batch", || held(&index, "a", 2) == 4);
    assert_eq!(count(&stats.totals.decode_errors), 1000);
    assert_eq!(held(&index, "a", 1), 4);
    assert!(replay.requests().is_empty(), "{:?}", replay.requests());
    assert_eq!(
        (count(&stats.totals.gaps), count(&stats.totals.resets)),
        (0, 0)
    );
}

#[test]
fn remove_pod_stops_following_and_forgets_its_blocks() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let pa = follow(&ingest, &ctx, "a", None);
    let pb = follow(&ingest, &ctx, "b", None);
    pa.send(0, &store(1, 0, 4), Encoding::Map);
    pb.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("both pods", || {
        held(&index, "a", 1) == 4 && held(&index, "b", 1) == 4
    });
    ingest.remove_pod("a");
    assert_eq!(held(&index, "a", 1), 0);
    pa.send(1, &store(2, 0, 4), Encoding::Map);
    pb.send(1, &store(2, 0, 4), Encoding::Map);
    wait_until("b's batch", || held(&index, "b", 2) == 4);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(held(&index, "a", 2), 0);
    assert_eq!(batches(&stats), 3);
    assert_eq!(index.stats().pods, 1);
}

#[test]
fn centralized_mode_tells_pods_apart_by_topic_and_replays() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    // One pod named by its address, with its replay socket; one named `b` whose topic carries
    // its bare IP (llm-d's `kv@$(POD_IP)@MODEL`); and a publisher no pod answers to.
    ingest
        .add_pod(
            "10.0.0.1:8000",
            PodEndpoints {
                events: None,
                replay: Some(replay.endpoint.clone()),
                topic_names: Vec::new(),
            },
        )
        .unwrap();
    let b_names = vec!["10.0.0.2:8000".to_string(), "10.0.0.2".to_string()];
    let b = PodEndpoints {
        events: None,
        replay: None,
        topic_names: b_names,
    };
    ingest.add_pod("b", b).unwrap();
    let endpoint = ingest.bind("tcp://127.0.0.1:*").unwrap();
    assert!(ingest.bind("tcp://127.0.0.1:*").is_err());
    let p1 = TestPub::connect(&ctx, &endpoint, "kv@10.0.0.1:8000@m");
    let p2 = TestPub::connect(&ctx, &endpoint, "kv@10.0.0.2@m");
    let stranger = TestPub::connect(&ctx, &endpoint, "kv@10.9.9.9:8000@m");
    p1.wait_subscribed();
    p2.wait_subscribed();
    stranger.wait_subscribed();
    p1.send(0, &store(1, 0, 2), Encoding::Map);
    p2.send(0, &store(2, 0, 4), Encoding::Array);
    stranger.send(0, &store(4, 0, 4), Encoding::Map);
    p1.send(1, &store(1, 2, 4), Encoding::Map);
    wait_until("both pods", || {
        held(&index, "10.0.0.1:8000", 1) == 4 && held(&index, "b", 2) == 4
    });
    wait_until("the stranger counted", || count(&stats.unknown_topics) >= 1);
    assert_eq!(held(&index, "10.0.0.1:8000", 2), 0);
    assert_eq!(held(&index, "b", 1), 0);
    assert_eq!(held(&index, "10.9.9.9:8000", 4), 0);
    assert!(
        pod_stats(&stats, "10.9.9.9:8000").is_none(),
        "no state for an unknown topic"
    );
    // A gap on the first pod is filled from its replay socket.
    replay.keep(2, &store(3, 0, 2));
    replay.keep(3, &store(3, 2, 4));
    p1.send(3, &store(3, 2, 4), Encoding::Map);
    wait_until("replayed", || held(&index, "10.0.0.1:8000", 3) == 4);
    assert_eq!(replay.requests(), vec![2]);
    assert_eq!(
        (
            count(&stats.totals.gaps),
            count(&stats.totals.replays),
            count(&stats.totals.resets)
        ),
        (1, 1, 0)
    );
    // Removing a centralized pod drops its state once its worker gets there.
    ingest.remove_pod("b");
    wait_until("forgotten", || held(&index, "b", 2) == 0);
}

/// `pod`'s old process (on `publisher` and `replay`) stored chain 1; its new process stored
/// chains 2 and 3 before the router noticed. After `pod_restarted` the pod holds exactly the
/// new process's blocks, fetched from its replay socket, and its live batches follow on.
fn check_pod_restarted(
    index: &PrefixIndex,
    ingest: &EventIngest,
    ctx: &zmq::Context,
    pod: &str,
    publisher: TestPub,
    replay: TestReplay,
) {
    let stats = ingest.stats();
    publisher.send(0, &store(1, 0, 2), Encoding::Map);
    publisher.send(1, &store(1, 2, 4), Encoding::Map);
    wait_until("old process's chain", || held(index, pod, 1) == 4);
    let (publisher, replay) = restart(
        ctx,
        publisher,
        replay,
        &[store(2, 0, 2), store(2, 2, 4), store(3, 0, 4)],
    );
    // Nothing of the new process reached the router: it still believes the old state.
    assert_eq!((held(index, pod, 1), batches(&stats)), (4, 2));
    ingest.pod_restarted(pod);
    let s = pod_stats(&stats, pod).unwrap();
    // Counted once the stream has started over.
    wait_until("restart handled", || count(&s.resets) == 1);
    assert_eq!(
        [1, 2, 3].map(|chain| held(index, pod, chain)),
        [0, 4, 4],
        "only the new process's blocks"
    );
    let idx = index.stats();
    assert_eq!((idx.engine_hashes, idx.pod_entries), (8, 8));
    assert_eq!(replay.requests(), vec![0]);
    assert_eq!((count(&s.batches), count(&s.replays)), (5, 1));
    // The next live batch follows the replayed ones: no gap, no second replay.
    replay.keep(3, &store(4, 0, 4));
    publisher.send(3, &store(4, 0, 4), Encoding::Map);
    wait_until("live batch after the restart", || held(index, pod, 4) == 4);
    assert_eq!((stream_counts(&s), count(&s.duplicates)), ((6, 0, 1, 1), 0));
    assert_eq!(replay.requests(), vec![0]);
}

#[test]
fn pod_restarted_starts_over_from_the_new_process_replay() {
    let (index, ingest, ctx) = setup();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    check_pod_restarted(&index, &ingest, &ctx, "a", p, replay);
}

#[test]
fn pod_restarted_in_centralized_mode_starts_over_too() {
    let (index, ingest, ctx) = setup();
    let pod = "10.0.0.1:8000";
    let replay = TestReplay::start(&ctx, true);
    ingest
        .add_pod(
            pod,
            PodEndpoints {
                events: None,
                replay: Some(replay.endpoint.clone()),
                topic_names: Vec::new(),
            },
        )
        .unwrap();
    let endpoint = ingest.bind("tcp://127.0.0.1:*").unwrap();
    let p = TestPub::connect(&ctx, &endpoint, &format!("kv@{pod}@m"));
    p.wait_subscribed();
    check_pod_restarted(&index, &ingest, &ctx, pod, p, replay);
}

#[test]
fn seq_going_back_fetches_the_new_process_start_from_replay() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let replay = TestReplay::start(&ctx, true);
    let p = follow(&ingest, &ctx, "a", Some(&replay));
    for i in 0..4 {
        p.send(i as u64, &store(1, i, i + 1), Encoding::Map);
    }
    wait_until("old process's chain", || held(&index, "a", 1) == 4);
    // The new process's seqs 0 and 1 went out before the router reconnected; seq 2 is the first
    // it sees, behind the old process's last (3).
    let (p, replay) = restart(&ctx, p, replay, &[store(2, 0, 2), store(2, 2, 4)]);
    replay.keep(2, &store(3, 0, 4));
    p.send(2, &store(3, 0, 4), Encoding::Map);
    wait_until("new process's state", || held(&index, "a", 3) == 4);
    assert_eq!([1, 2, 3].map(|chain| held(&index, "a", chain)), [0, 4, 4]);
    let idx = index.stats();
    assert_eq!((idx.engine_hashes, idx.pod_entries), (8, 8));
    assert_eq!(replay.requests(), vec![0]);
    let s = pod_stats(&stats, "a").unwrap();
    assert_eq!(stream_counts(&s), (7, 0, 1, 1));
    // The new stream goes on live, without another replay.
    p.send(3, &store(4, 0, 4), Encoding::Map);
    wait_until("live batch after the restart", || held(&index, "a", 4) == 4);
    assert_eq!(stream_counts(&s), (8, 0, 1, 1));
    assert_eq!(replay.requests(), vec![0]);
}

#[test]
fn a_stream_joined_late_without_replay_is_a_counted_gap() {
    let (index, ingest, ctx) = setup();
    let stats = ingest.stats();
    let p = follow(&ingest, &ctx, "late", None);
    // Seqs 0..5 went before the subscription: nothing can fetch them.
    p.send(5, &store(1, 0, 2), Encoding::Map);
    wait_until("the batch", || held(&index, "late", 1) == 2);
    let s = pod_stats(&stats, "late").unwrap();
    assert_eq!((count(&s.gaps), count(&s.resets)), (1, 0));
    p.send(6, &store(1, 2, 4), Encoding::Map);
    wait_until("the next batch", || held(&index, "late", 1) == 4);
    assert_eq!(count(&s.gaps), 1);
}

/// Issue 17 (5): centralized pods share workers, yet a pod whose replay socket is mute delays
/// only itself: other pods' batches are applied while its replay waits, its own later batches
/// wait for it and are applied in order once it fails, and the next gap soon after does not
/// ask the mute socket again (backoff).
#[test]
fn a_mute_replay_delays_only_its_own_pod_and_backs_off() {
    let (index, ingest, ctx) = setup_with(IngestConfig {
        replay_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(10),
        central_workers: 1,
        ..IngestConfig::default()
    });
    let stats = ingest.stats();
    let mute = TestReplay::start(&ctx, false);
    for (pod, replay) in [("slow", Some(mute.endpoint.clone())), ("fast", None)] {
        let endpoints = PodEndpoints {
            events: None,
            replay,
            topic_names: Vec::new(),
        };
        ingest.add_pod(pod, endpoints).unwrap();
    }
    let endpoint = ingest.bind("tcp://127.0.0.1:*").unwrap();
    let slow = TestPub::connect(&ctx, &endpoint, "kv@slow@m");
    let fast = TestPub::connect(&ctx, &endpoint, "kv@fast@m");
    slow.wait_subscribed();
    fast.wait_subscribed();
    slow.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("slow's first batch", || held(&index, "slow", 1) == 4);

    slow.send(2, &store(2, 0, 4), Encoding::Map);
    wait_until("slow's replay request", || mute.requests() == [1]);
    slow.send(3, &store(3, 0, 4), Encoding::Map);
    fast.send(0, &store(1, 0, 4), Encoding::Map);
    wait_until("fast's batch", || held(&index, "fast", 1) == 4);
    let s = pod_stats(&stats, "slow").unwrap();
    assert_eq!(
        count(&s.replay_failures),
        0,
        "fast waited for slow's replay"
    );
    assert_eq!(held(&index, "slow", 2), 0, "held until the replay answers");

    wait_until("slow's replay to fail", || {
        held(&index, "slow", 2) == 4 && held(&index, "slow", 3) == 4
    });
    assert_eq!(
        held(&index, "slow", 1),
        0,
        "state before the gap is unknown"
    );
    assert_eq!(
        (count(&s.replay_failures), count(&s.gaps), count(&s.resets)),
        (1, 1, 1)
    );
    // Backing off: the next gap clears the pod without asking again.
    slow.send(5, &store(4, 0, 4), Encoding::Map);
    wait_until("slow's batch after the second gap", || {
        held(&index, "slow", 4) == 4
    });
    assert_eq!(mute.requests(), [1]);
    assert_eq!(held(&index, "slow", 3), 0);
    assert_eq!((count(&s.gaps), count(&s.resets)), (2, 2));
}
