//! The transfer thread: the one owner of this pod's UCX context and worker. It registers the
//! KV pool's arrays (so peers can read this pod's blocks), keeps one endpoint per peer, and
//! runs pulls: one-sided GETs of a peer's blocks into a host buffer, polled to completion,
//! failure or deadline. Between events it sleeps on the worker's event fd, so an idle pod costs
//! nothing, yet the worker keeps answering peers whose transport emulates RMA in software
//! (tcp). A failed or late pull force-closes its peer's endpoint before its buffer goes, so a
//! GET can never land in freed memory.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvcache::{BlockId, BlockLayout, PoolArray};

use crate::ucx::{Context, Endpoint, MemRegion, RemoteKey, Request, UcxError, Worker};
use crate::wire::{PeerMetadata, RemoteArray};

/// A pull of `remote_blocks` from `peer`, to finish by `deadline`.
#[derive(Debug, Clone)]
pub struct PullJob {
    pub id: u64,
    pub peer: Arc<PeerMetadata>,
    pub remote_blocks: Vec<BlockId>,
    pub deadline: Instant,
}

/// A pull that ended: the blocks, concatenated in `BlockLayout::regions` order, or why not.
#[derive(Debug)]
pub struct PullResult {
    pub id: u64,
    pub data: Result<Vec<u8>, String>,
    /// GETs issued (vLLM's descriptors).
    pub descriptors: usize,
    pub seconds: f64,
}

enum Command {
    Pull(PullJob),
    Shutdown,
}

/// The handle the connector holds; dropping it stops the thread (after its endpoints close and
/// the pool's registrations are undone).
pub struct Transfers {
    commands: Sender<Command>,
    wake: WakeFd,
    results: Receiver<PullResult>,
    /// This worker's address and the pool arrays' keys, for peers.
    pub local: LocalRegistration,
    thread: Option<JoinHandle<()>>,
}

/// What peers need to read this pod's pool.
#[derive(Debug, Clone)]
pub struct LocalRegistration {
    pub worker_address: Vec<u8>,
    pub arrays: Vec<RemoteArray>,
}

impl Transfers {
    /// Starts the thread. `pool` lists the arrays peers may read (a producer's pool); the
    /// memory must outlive the returned handle.
    pub fn start(layout: BlockLayout, pool: Vec<PoolArray>) -> Result<Self, String> {
        let (commands, rx) = mpsc::channel();
        let (results_tx, results) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let wake = WakeFd::new()?;
        let wake_fd = wake.fd;
        let thread = std::thread::Builder::new()
            .name("kv-transfer".into())
            .spawn(move || run(layout, pool, rx, results_tx, ready_tx, wake_fd))
            .map_err(|e| format!("starting the KV transfer thread: {e}"))?;
        let local = ready
            .recv()
            .map_err(|_| "the KV transfer thread died at start-up".to_string())??;
        Ok(Self {
            commands,
            wake,
            results,
            local,
            thread: Some(thread),
        })
    }

    pub fn pull(&self, job: PullJob) {
        if self.commands.send(Command::Pull(job)).is_ok() {
            self.wake.signal();
        }
    }

    /// Pulls that ended since the last call.
    pub fn finished(&self) -> Vec<PullResult> {
        self.results.try_iter().collect()
    }
}

impl Drop for Transfers {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        self.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An eventfd the connector signals when it queues a command.
struct WakeFd {
    fd: i32,
}

impl WakeFd {
    fn new() -> Result<Self, String> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for WakeFd {
    fn drop(&mut self) {
        // SAFETY: our fd, closed once, after the thread that reads it was joined.
        unsafe { libc::close(self.fd) };
    }
}

/// An endpoint and the peer's unpacked array keys (dropped before the endpoint closes).
struct Peer<'w> {
    keys: Vec<RemoteKey>,
    ep: Endpoint<'w>,
}

struct Active {
    job: PullJob,
    buffer: Vec<u8>,
    requests: Vec<Request>,
    descriptors: usize,
    started: Instant,
    /// Set when issuing failed part-way: the pull fails once its peer is closed.
    error: Option<String>,
}

fn run(
    layout: BlockLayout,
    pool: Vec<PoolArray>,
    commands: Receiver<Command>,
    results: Sender<PullResult>,
    ready: mpsc::SyncSender<Result<LocalRegistration, String>>,
    wake_fd: i32,
) {
    let fail = |e: UcxError| {
        let _ = ready.send(Err(format!("KV transfer: {e}")));
    };
    let ctx = match Context::new() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let worker = match Worker::new(&ctx) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    let registered = match register(&ctx, &worker, &pool) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let efd = match worker.event_fd() {
        Ok(fd) => fd,
        Err(e) => return fail(e),
    };
    let (_regions, local) = registered;
    if ready.send(Ok(local)).is_err() {
        return;
    }
    let mut peers: HashMap<String, Peer<'_>> = HashMap::new();
    let mut active: Vec<Active> = Vec::new();
    loop {
        loop {
            match commands.try_recv() {
                Ok(Command::Pull(job)) => match start_pull(&worker, &mut peers, &layout, job) {
                    Ok(a) => active.push(a),
                    Err(r) => {
                        let _ = results.send(r);
                    }
                },
                Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                    fail_peers(&mut peers, &mut active, &results, None, "shutting down");
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        while worker.progress() > 0 {}
        collect(&mut peers, &mut active, &results);
        // Sleep until the worker or the connector has something; with pulls out, wake at
        // least every millisecond to check their deadlines.
        match worker.arm() {
            Ok(true) => {
                let timeout = if active.is_empty() { 1000 } else { 1 };
                wait(&[efd, wake_fd], timeout);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("KV transfer: {e}; polling instead");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// Registers each pool array and packs its key.
#[allow(clippy::type_complexity)]
fn register<'c>(
    ctx: &'c Context,
    worker: &Worker<'c>,
    pool: &[PoolArray],
) -> Result<(Vec<MemRegion<'c>>, LocalRegistration), UcxError> {
    let mut regions = Vec::with_capacity(pool.len());
    let mut arrays = Vec::with_capacity(pool.len());
    for a in pool {
        let region = ctx.register(a.addr as *mut u8, a.len)?;
        arrays.push(RemoteArray {
            addr: region.addr,
            len: region.len as u64,
            rkey: region.packed_rkey()?,
        });
        regions.push(region);
    }
    Ok((
        regions,
        LocalRegistration {
            worker_address: worker.address()?,
            arrays,
        },
    ))
}

/// Issues a pull's GETs, connecting to its peer first if need be.
fn start_pull<'w>(
    worker: &'w Worker<'w>,
    peers: &mut HashMap<String, Peer<'w>>,
    layout: &BlockLayout,
    job: PullJob,
) -> Result<Active, PullResult> {
    let started = Instant::now();
    let failed = |job: &PullJob, why: String| PullResult {
        id: job.id,
        data: Err(why),
        descriptors: 0,
        seconds: started.elapsed().as_secs_f64(),
    };
    let region = layout.region_bytes();
    let per_block = 2 * layout.num_layers;
    if job.peer.arrays.len() != per_block {
        return Err(failed(
            &job,
            format!(
                "the peer has {} KV arrays, this pod {per_block}",
                job.peer.arrays.len()
            ),
        ));
    }
    for &b in &job.remote_blocks {
        let end = (b as u64 + 1) * region as u64;
        if job.peer.arrays.iter().any(|a| a.len < end) {
            return Err(failed(
                &job,
                format!("block {b} is outside the peer's pool"),
            ));
        }
    }
    let key = job.peer.key();
    if !peers.contains_key(&key) {
        let peer = connect(worker, &job.peer).map_err(|e| failed(&job, e.to_string()))?;
        peers.insert(key.clone(), peer);
    }
    let peer = &peers[&key];
    let mut buffer = vec![0u8; job.remote_blocks.len() * layout.block_bytes()];
    let mut requests = Vec::new();
    let mut descriptors = 0;
    for (i, &b) in job.remote_blocks.iter().enumerate() {
        for (r, array) in job.peer.arrays.iter().enumerate() {
            let at = (i * per_block + r) * region;
            let remote = array.addr + b as u64 * region as u64;
            // SAFETY: the buffer lives in the returned Active until every request completed or
            // the endpoint was force-closed; keys[r] belongs to this endpoint.
            let issued = unsafe {
                peer.ep.get(
                    buffer.as_mut_ptr().add(at),
                    region,
                    remote,
                    &peer.keys[r],
                    None,
                )
            };
            descriptors += 1;
            match issued {
                Ok(Some(req)) => requests.push(req),
                Ok(None) => {}
                Err(e) => {
                    // Requests already issued land in `buffer`: hand it to collect(), which
                    // sees the failed endpoint and closes it first.
                    return Ok(Active {
                        job,
                        buffer,
                        requests,
                        descriptors,
                        started,
                        error: Some(e.to_string()),
                    });
                }
            }
        }
    }
    Ok(Active {
        job,
        buffer,
        requests,
        descriptors,
        started,
        error: None,
    })
}

fn connect<'w>(worker: &'w Worker<'w>, meta: &PeerMetadata) -> Result<Peer<'w>, UcxError> {
    let ep = worker.connect(&meta.worker_address)?;
    let mut keys = Vec::with_capacity(meta.arrays.len());
    for a in &meta.arrays {
        match ep.unpack_rkey(&a.rkey) {
            Ok(k) => keys.push(k),
            Err(e) => {
                drop(keys);
                ep.close();
                return Err(e);
            }
        }
    }
    Ok(Peer { keys, ep })
}

/// Hands back the pulls that completed; fails (and disconnects) the peers with a pull that
/// failed or ran past its deadline.
fn collect<'w>(
    peers: &mut HashMap<String, Peer<'w>>,
    active: &mut Vec<Active>,
    results: &Sender<PullResult>,
) {
    let now = Instant::now();
    let mut broken: Option<(String, String)> = None;
    let mut i = 0;
    while i < active.len() {
        let a = &mut active[i];
        let mut error = a.error.clone();
        a.requests.retain(|r| match r.poll() {
            None => true,
            Some(Ok(())) => false,
            Some(Err(e)) => {
                error.get_or_insert(e.to_string());
                false
            }
        });
        let key = a.job.peer.key();
        if peers.get(&key).is_some_and(|p| p.ep.failed()) {
            error.get_or_insert("the peer went away".into());
        }
        if error.is_none() && !a.requests.is_empty() && now >= a.job.deadline {
            error = Some("timed out".into());
        }
        if let Some(why) = error {
            broken = Some((key, why));
            break;
        }
        if a.requests.is_empty() {
            let a = active.swap_remove(i);
            let _ = results.send(PullResult {
                id: a.job.id,
                descriptors: a.descriptors,
                seconds: a.started.elapsed().as_secs_f64(),
                data: Ok(a.buffer),
            });
            continue;
        }
        i += 1;
    }
    if let Some((key, why)) = broken {
        fail_peers(peers, active, results, Some(&key), &why);
    }
}

/// Fails every pull from the peer `key` (every peer: `None`) and closes its endpoint, which
/// cancels their GETs, before their buffers are dropped.
fn fail_peers<'w>(
    peers: &mut HashMap<String, Peer<'w>>,
    active: &mut Vec<Active>,
    results: &Sender<PullResult>,
    key: Option<&str>,
    why: &str,
) {
    let hit = |k: &str| key.is_none_or(|key| key == k);
    let (failed, kept): (Vec<Active>, Vec<Active>) =
        active.drain(..).partition(|a| hit(&a.job.peer.key()));
    *active = kept;
    let closing: Vec<String> = peers.keys().filter(|k| hit(k)).cloned().collect();
    for k in closing {
        if let Some(peer) = peers.remove(&k) {
            drop(peer.keys);
            peer.ep.close();
        }
    }
    for a in failed {
        let Active {
            job,
            buffer,
            requests,
            descriptors,
            started,
            ..
        } = a;
        drop(requests);
        drop(buffer);
        let _ = results.send(PullResult {
            id: job.id,
            data: Err(why.to_string()),
            descriptors,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
}

/// Blocks until one of `fds` is readable or `timeout_ms` passed; drains the eventfd.
fn wait(fds: &[i32], timeout_ms: i32) {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfd for the call's duration.
    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if let Some(p) = polls.last().filter(|p| p.revents & libc::POLLIN != 0) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from the nonblocking eventfd.
        unsafe { libc::read(p.fd, (&mut n as *mut u64).cast(), 8) };
    }
}
