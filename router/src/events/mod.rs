//! KV-event ingestion over ZMQ into the prefix index, in the two llm-d modes:
//! - pod discovery: one SUB per pod connects to the pod's PUB (`add_pod` with an events
//!   endpoint); one thread per pod, so a pod's batches are applied in order;
//! - centralized: one SUB binds (`bind`) and publishers connect to it; the pod is the known pod
//!   the topic `kv@<name>@<model>` names (the whole topic when it has no `@`; see [`topics`]:
//!   a topic naming no known pod is counted and dropped), and batches go to a fixed worker per
//!   pod (sharded by pod name), so order is kept per pod.
//!
//! Each pod's stream tracks seqs (see `stream`): a gap is filled from the pod's replay socket
//! or else the pod is cleared, a seq going back (engine restart) clears the pod, and an
//! undecodable batch is counted and ignored. A pod-discovery thread runs its pod's replays
//! inline; a centralized worker runs them on a thread of their own and goes on with its other
//! pods meanwhile. Nothing a publisher sends can stop ingestion. A restart
//! seen elsewhere (the load monitor, [`EventIngest::pod_restarted`]) is handed to the pod's
//! stream, in order with its batches, so the stream starts over on the new publisher's seqs.
//!
//! Counters (`IngestStats`) are kept per pod and in total, as plain atomics: a stream looks its
//! pod's counters up once when it starts, never per event.

mod stream;
mod topics;

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvevents::decode_seq;

use crate::index::PrefixIndex;
use stream::{Ctx, PodStream, ReplayError, ReplayRequest, Replayed};
use topics::TopicNames;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    /// SUB topic prefix filter; empty subscribes to everything.
    pub topic_filter: String,
    /// How long a replay socket may take for each reply message before recovery gives up.
    pub replay_timeout: Duration,
    /// Worker threads of the centralized mode.
    pub central_workers: usize,
    /// How often idle threads check whether to stop.
    pub poll_interval: Duration,
    /// SUB receive high-water mark (messages); beyond it ZMQ drops, which shows up as gaps.
    pub rcv_hwm: i32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            topic_filter: "kv@".into(),
            replay_timeout: Duration::from_secs(1),
            central_workers: 2,
            poll_interval: Duration::from_millis(50),
            // vLLM's publisher default.
            rcv_hwm: 100_000,
        }
    }
}

/// One event stream's counters; also their sums over all pods (`IngestStats::totals`).
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Batches applied to the index.
    pub batches: AtomicU64,
    pub events: AtomicU64,
    /// Malformed messages or batches.
    pub decode_errors: AtomicU64,
    pub gaps: AtomicU64,
    /// Replays that answered (filled a gap or a stream's start).
    pub replays: AtomicU64,
    pub replay_failures: AtomicU64,
    /// Pod cleared because its state became unknown (restart, unfillable gap, bad batch).
    pub resets: AtomicU64,
    /// Live batches dropped because a replay had already applied them.
    pub duplicates: AtomicU64,
    /// Age of the last applied batch when applied (now - batch.ts), microseconds.
    pub last_lag_us: AtomicU64,
}

impl StreamStats {
    /// The counters (all but the lag) by their metric label.
    pub fn counters(&self) -> [(&'static str, &AtomicU64); 8] {
        [
            ("batches", &self.batches),
            ("events", &self.events),
            ("decode_errors", &self.decode_errors),
            ("gaps", &self.gaps),
            ("replays", &self.replays),
            ("replay_failures", &self.replay_failures),
            ("resets", &self.resets),
            ("duplicates", &self.duplicates),
        ]
    }
}

/// Ingestion counters for the router's metrics: totals over all pods, and each followed pod's
/// own. A stream takes its pod's counters once, when it starts, so counting an event touches
/// only atomics.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Sums over all pods (pods since removed included), plus malformed messages of the
    /// centralized socket, which name no pod.
    pub totals: StreamStats,
    /// Centralized-mode messages whose topic names no known pod (they have no pod to count for).
    pub unknown_topics: AtomicU64,
    pods: RwLock<HashMap<Arc<str>, Arc<StreamStats>>>,
}

impl IngestStats {
    /// `pod`'s counters, created on first use; a pod's streams share them until it is removed.
    pub(crate) fn pod(&self, pod: &Arc<str>) -> Arc<StreamStats> {
        if let Some(s) = self
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pod)
        {
            return s.clone();
        }
        let mut pods = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        pods.entry(pod.clone()).or_default().clone()
    }

    pub(crate) fn remove_pod(&self, pod: &str) {
        self.pods
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pod);
    }

    /// Each pod's counters, by pod name.
    pub fn per_pod(&self) -> Vec<(Arc<str>, Arc<StreamStats>)> {
        let pods = self.pods.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = pods.iter().map(|(p, s)| (p.clone(), s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Where a pod's events come from. `events: None` means the pod publishes to the centralized
/// socket (`bind`); `replay` is its replay ROUTER in either mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodEndpoints {
    pub events: Option<String>,
    pub replay: Option<String>,
    /// Names its centralized-mode topics may carry besides the pod's own (`HOST:PORT`, `HOST`).
    pub topic_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("zmq socket for {endpoint}: {source}")]
    Zmq {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("the centralized subscriber is already bound to {0}")]
    AlreadyBound(String),
}

/// A thread that stops (and is joined) when dropped.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(name: String, f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || f(flag))
            .ok();
        if thread.is_none() {
            tracing::error!("could not spawn a KV event thread");
        }
        Self { stop, thread }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A panicked thread has nothing left to clean up.
            let _ = t.join();
        }
    }
}

enum CentralMsg {
    Batch {
        pod: Arc<str>,
        seq: u64,
        payload: Vec<u8>,
    },
    Register {
        pod: Arc<str>,
        replay: Option<String>,
    },
    Forget {
        pod: Arc<str>,
    },
    Restarted {
        pod: Arc<str>,
    },
    /// The answer to a replay a stream asked for.
    Replayed {
        pod: Arc<str>,
        id: u64,
        result: Result<Replayed, ReplayError>,
    },
    Stop,
}

/// The centralized workers' queues; a pod always goes to the same one.
#[derive(Clone)]
struct Shards(Vec<mpsc::Sender<CentralMsg>>);

impl Shards {
    fn send(&self, pod: &str, msg: CentralMsg) {
        let mut h = DefaultHasher::new();
        pod.hash(&mut h);
        let shard = (h.finish() % self.0.len() as u64) as usize;
        // A worker only exits once every sender is gone, so this cannot fail while we hold one.
        let _ = self.0[shard].send(msg);
    }
}

struct Central {
    endpoint: String,
    receiver: Option<Worker>,
    shards: Shards,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Central {
    fn drop(&mut self) {
        // Receiver first, so nothing follows the stop. Replays in flight answer into a closed
        // queue.
        self.receiver.take();
        for shard in self.shards.0.drain(..) {
            let _ = shard.send(CentralMsg::Stop);
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A pod-discovery subscriber thread and its restart flag.
struct Subscriber {
    worker: Worker,
    /// Set by [`EventIngest::pod_restarted`]; the thread takes it when it next wakes.
    restarted: Arc<AtomicBool>,
}

struct PodEntry {
    endpoints: PodEndpoints,
    /// Pod-discovery subscriber; None for a pod of the centralized socket.
    subscriber: Option<Subscriber>,
}

pub struct EventIngest {
    ctx: Arc<Ctx>,
    cfg: IngestConfig,
    pods: Mutex<HashMap<String, PodEntry>>,
    central: Mutex<Option<Central>>,
    topics: Arc<TopicNames>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn poll_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `[topic, seq, payload]` of a live message.
fn live_frames(frames: &[Vec<u8>]) -> Option<(&[u8], u64, &[u8])> {
    match frames {
        [topic, seq, payload] => Some((topic, decode_seq(seq)?, payload)),
        _ => None,
    }
}

/// The pod a centralized-mode topic names: `kv@<pod>@<model>` -> `<pod>`.
fn pod_from_topic(topic: &[u8]) -> Option<&str> {
    let topic = std::str::from_utf8(topic).ok()?;
    let pod = topic.split('@').nth(1).unwrap_or(topic);
    (!pod.is_empty()).then_some(pod)
}

/// Receives until stopped, handing each message to `on_message` as `Some`; `None` each time
/// the loop wakes (at least every `poll`), before the messages that woke it.
fn receive_loop(
    sock: &zmq::Socket,
    stop: &AtomicBool,
    poll: Duration,
    mut on_message: impl FnMut(Option<Vec<Vec<u8>>>),
) {
    while !stop.load(Ordering::Relaxed) {
        on_message(None);
        match sock.poll(zmq::POLLIN, poll_ms(poll)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "KV event socket poll failed");
                return;
            }
        }
        loop {
            match sock.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => on_message(Some(frames)),
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::error!(error = %e, "KV event socket receive failed");
                    return;
                }
            }
        }
    }
}

impl EventIngest {
    /// An ingest feeding `index`; no thread runs until pods are added or a socket bound.
    pub fn start(index: Arc<PrefixIndex>, cfg: IngestConfig) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                index,
                stats: Arc::new(IngestStats::default()),
                zmq: zmq::Context::new(),
                replay_timeout: cfg.replay_timeout,
            }),
            cfg,
            pods: Mutex::new(HashMap::new()),
            central: Mutex::new(None),
            topics: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<IngestStats> {
        self.ctx.stats.clone()
    }

    fn zmq_err(endpoint: &str) -> impl FnOnce(zmq::Error) -> IngestError + '_ {
        move |source| IngestError::Zmq {
            endpoint: endpoint.to_string(),
            source,
        }
    }

    /// A SUB socket with the topic filter, not yet connected or bound.
    fn sub_socket(&self, endpoint: &str) -> Result<zmq::Socket, IngestError> {
        let sock = self
            .ctx
            .zmq
            .socket(zmq::SUB)
            .map_err(Self::zmq_err(endpoint))?;
        sock.set_linger(0).map_err(Self::zmq_err(endpoint))?;
        sock.set_maxmsgsize(stream::MAX_MESSAGE_BYTES)
            .map_err(Self::zmq_err(endpoint))?;
        sock.set_rcvhwm(self.cfg.rcv_hwm)
            .map_err(Self::zmq_err(endpoint))?;
        sock.set_subscribe(self.cfg.topic_filter.as_bytes())
            .map_err(Self::zmq_err(endpoint))?;
        Ok(sock)
    }

    /// Starts following a pod. Adding a pod again with other endpoints restarts its stream and
    /// clears what the index knew of it; with the same endpoints it is a no-op.
    pub fn add_pod(&self, pod: &str, endpoints: PodEndpoints) -> Result<(), IngestError> {
        let mut pods = lock(&self.pods);
        if let Some(old) = pods.get(pod) {
            if old.endpoints == endpoints {
                return Ok(());
            }
            self.forget(&mut pods, pod);
        }
        let name: Arc<str> = pod.into();
        self.topics.insert(&name, &endpoints.topic_names);
        let subscriber = match &endpoints.events {
            Some(endpoint) => {
                let sock = self.sub_socket(endpoint)?;
                sock.connect(endpoint).map_err(Self::zmq_err(endpoint))?;
                let ctx = self.ctx.clone();
                let poll = self.cfg.poll_interval;
                let mut stream = PodStream::new(&ctx, name.clone(), endpoints.replay.clone());
                let restarted = Arc::new(AtomicBool::new(false));
                let flag = restarted.clone();
                let worker = Worker::spawn(format!("kv-sub-{pod}"), move |stop| {
                    receive_loop(&sock, &stop, poll, |frames| {
                        let Some(frames) = frames else {
                            if flag.swap(false, Ordering::Relaxed) {
                                let request = stream.on_restart(&ctx);
                                replay_inline(&ctx, &mut stream, request);
                            }
                            return;
                        };
                        match live_frames(&frames) {
                            Some((_, seq, payload)) => {
                                let request = stream.on_live(&ctx, seq, payload);
                                replay_inline(&ctx, &mut stream, request);
                            }
                            None => {
                                stream.on_malformed(&ctx);
                                let topic = topic_of(&frames);
                                let frames = frames.len();
                                tracing::warn!(%topic, frames, "malformed KV event message");
                            }
                        }
                    })
                });
                Some(Subscriber { worker, restarted })
            }
            None => {
                if let Some(central) = lock(&self.central).as_ref() {
                    central.shards.send(
                        pod,
                        CentralMsg::Register {
                            pod: name,
                            replay: endpoints.replay.clone(),
                        },
                    );
                }
                None
            }
        };
        pods.insert(
            pod.to_string(),
            PodEntry {
                endpoints,
                subscriber,
            },
        );
        Ok(())
    }

    /// Stops following a pod and drops its index state.
    pub fn remove_pod(&self, pod: &str) {
        let mut pods = lock(&self.pods);
        self.forget(&mut pods, pod);
    }

    /// The pod's engine restarted (its load monitor saw it): its stream clears the pod and
    /// starts over from the new publisher's first batch, in order with the batches it is
    /// applying.
    pub fn pod_restarted(&self, pod: &str) {
        let pods = lock(&self.pods);
        let Some(entry) = pods.get(pod) else {
            return;
        };
        match (&entry.subscriber, lock(&self.central).as_ref()) {
            (Some(sub), _) => sub.restarted.store(true, Ordering::Relaxed),
            (None, Some(central)) => central
                .shards
                .send(pod, CentralMsg::Restarted { pod: pod.into() }),
            (None, None) => self.ctx.index.clear_pod(pod),
        }
    }

    fn forget(&self, pods: &mut HashMap<String, PodEntry>, pod: &str) {
        self.topics.remove(pod);
        let subscriber = pods.remove(pod).and_then(|e| e.subscriber);
        match (subscriber, lock(&self.central).as_ref()) {
            (Some(sub), _) => {
                // Joined before the index forgets the pod, so no batch of it lands afterwards.
                drop(sub.worker);
                self.ctx.forget_pod(pod);
            }
            // The pod's worker drops it in order with its queued batches.
            (None, Some(central)) => central
                .shards
                .send(pod, CentralMsg::Forget { pod: pod.into() }),
            (None, None) => self.ctx.forget_pod(pod),
        }
    }

    /// Binds the centralized subscriber (e.g. `tcp://*:5557`); returns the bound endpoint (with
    /// the port chosen when the endpoint asked for `*`).
    pub fn bind(&self, endpoint: &str) -> Result<String, IngestError> {
        // Same lock order as add_pod: pods, then central.
        let pods = lock(&self.pods);
        let mut central = lock(&self.central);
        if let Some(c) = central.as_ref() {
            return Err(IngestError::AlreadyBound(c.endpoint.clone()));
        }
        let sock = self.sub_socket(endpoint)?;
        sock.bind(endpoint).map_err(Self::zmq_err(endpoint))?;
        let bound = sock
            .get_last_endpoint()
            .map_err(Self::zmq_err(endpoint))?
            .unwrap_or_else(|_| endpoint.to_string());

        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for i in 0..self.cfg.central_workers.max(1) {
            let (tx, rx) = mpsc::channel::<CentralMsg>();
            let ctx = self.ctx.clone();
            let answers = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kv-central-{i}"))
                .spawn(move || central_worker(&ctx, &answers, rx));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => tracing::error!(error = %e, "could not spawn a KV event worker"),
            }
            senders.push(tx);
        }
        let shards = Shards(senders);
        let to_workers = shards.clone();
        let ctx = self.ctx.clone();
        let poll = self.cfg.poll_interval;
        let topics = self.topics.clone();
        let receiver = Worker::spawn("kv-central-sub".into(), move |stop| {
            receive_loop(&sock, &stop, poll, |frames| {
                let Some(frames) = frames else {
                    return;
                };
                let live =
                    live_frames(&frames).and_then(|(t, s, p)| Some((pod_from_topic(t)?, s, p)));
                match live {
                    Some((name, seq, payload)) => match topics.resolve(name) {
                        Some(pod) => to_workers.send(
                            &pod,
                            CentralMsg::Batch {
                                pod: pod.clone(),
                                seq,
                                payload: payload.to_vec(),
                            },
                        ),
                        None => {
                            let n = ctx.stats.unknown_topics.fetch_add(1, Ordering::Relaxed);
                            // Logged at 1, 2, 4, 8, …: a flood is seen without flooding the log.
                            let count = n + 1;
                            if count.is_power_of_two() {
                                tracing::warn!(
                                    pod = name,
                                    count,
                                    "KV events for no known pod dropped"
                                );
                            }
                        }
                    },
                    None => {
                        // No pod to count it for: the topic named none.
                        ctx.stats
                            .totals
                            .decode_errors
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(frames = frames.len(), "malformed KV event message");
                    }
                }
            });
        });
        let c = Central {
            endpoint: bound.clone(),
            receiver: Some(receiver),
            shards,
            workers,
        };
        // Pods registered before the bind get their replay endpoints now.
        for (pod, entry) in pods.iter() {
            if entry.subscriber.is_none() {
                c.shards.send(
                    pod,
                    CentralMsg::Register {
                        pod: pod.as_str().into(),
                        replay: entry.endpoints.replay.clone(),
                    },
                );
            }
        }
        *central = Some(c);
        Ok(bound)
    }
}

/// The topic of a malformed message, for the log.
fn topic_of(frames: &[Vec<u8>]) -> String {
    frames
        .first()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default()
}

/// Runs a stream's replay on the calling thread (a pod-discovery thread serves one pod only).
fn replay_inline(ctx: &Ctx, stream: &mut PodStream, request: Option<ReplayRequest>) {
    if let Some(request) = request {
        let result = stream::replay(ctx, &request);
        stream.on_replay(ctx, request.id, result);
    }
}

/// Runs a replay on a thread of its own; the answer comes back to the worker as `Replayed`.
fn replay_async(
    ctx: &Arc<Ctx>,
    answers: &mpsc::Sender<CentralMsg>,
    pod: &Arc<str>,
    stream: &mut PodStream,
    request: Option<ReplayRequest>,
) {
    let Some(request) = request else {
        return;
    };
    let (thread_ctx, answers, thread_pod) = (ctx.clone(), answers.clone(), pod.clone());
    let id = request.id;
    let spawned = std::thread::Builder::new()
        .name("kv-replay".into())
        .spawn(move || {
            let result = stream::replay(&thread_ctx, &request);
            // The worker may have stopped meanwhile: then nobody waits for the answer.
            let _ = answers.send(CentralMsg::Replayed {
                pod: thread_pod,
                id,
                result,
            });
        });
    if let Err(e) = spawned {
        stream.on_replay(ctx, id, Err(ReplayError::Thread(e)));
    }
}

/// Applies one shard's pods' batches in arrival order.
fn central_worker(
    ctx: &Arc<Ctx>,
    answers: &mpsc::Sender<CentralMsg>,
    rx: mpsc::Receiver<CentralMsg>,
) {
    let mut streams: HashMap<Arc<str>, PodStream> = HashMap::new();
    let mut replays: HashMap<Arc<str>, String> = HashMap::new();
    for msg in rx {
        match msg {
            CentralMsg::Batch { pod, seq, payload } => {
                let stream = streams.entry(pod.clone()).or_insert_with(|| {
                    PodStream::new(ctx, pod.clone(), replays.get(&pod).cloned())
                });
                let request = stream.on_live(ctx, seq, &payload);
                replay_async(ctx, answers, &pod, stream, request);
            }
            CentralMsg::Replayed { pod, id, result } => {
                if let Some(stream) = streams.get_mut(&pod) {
                    stream.on_replay(ctx, id, result);
                }
            }
            CentralMsg::Stop => return,
            CentralMsg::Register { pod, replay } => {
                if let Some(s) = streams.get_mut(&pod) {
                    s.set_replay(replay.clone());
                }
                match replay {
                    Some(r) => replays.insert(pod, r),
                    None => replays.remove(&pod),
                };
            }
            CentralMsg::Restarted { pod } => match streams.get_mut(&pod) {
                Some(s) => {
                    let request = s.on_restart(ctx);
                    replay_async(ctx, answers, &pod, s, request);
                }
                // No batch of it yet: there is no seq to forget, only index state.
                None => ctx.index.clear_pod(&pod),
            },
            CentralMsg::Forget { pod } => {
                streams.remove(&pod);
                replays.remove(&pod);
                ctx.forget_pod(&pod);
            }
        }
    }
}

impl Drop for EventIngest {
    fn drop(&mut self) {
        lock(&self.pods).clear();
        lock(&self.central).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_pods() {
        assert_eq!(pod_from_topic(b"kv@10.0.0.1:8000@m"), Some("10.0.0.1:8000"));
        assert_eq!(pod_from_topic(b"kv@10.0.0.1:8000"), Some("10.0.0.1:8000"));
        assert_eq!(pod_from_topic(b"pod-a"), Some("pod-a"));
        assert_eq!(pod_from_topic(b"kv@@m"), None);
        assert_eq!(pod_from_topic(b""), None);
        assert_eq!(pod_from_topic(&[0xff, 0xfe]), None);
    }

    #[test]
    fn live_frames_need_three_frames_and_an_8_byte_seq() {
        let ok = vec![b"t".to_vec(), 5u64.to_be_bytes().to_vec(), b"p".to_vec()];
        assert_eq!(live_frames(&ok), Some((&b"t"[..], 5, &b"p"[..])));
        assert_eq!(live_frames(&ok[..2]), None);
        let bad_seq = vec![b"t".to_vec(), vec![1, 2], b"p".to_vec()];
        assert_eq!(live_frames(&bad_seq), None);
    }
}
