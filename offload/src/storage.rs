//! The storage tier's I/O threads over [`BlockFiles`]: writers publish blocks handed to them,
//! readers fetch a request's run of blocks into host buffers; the engine thread only queues
//! work and collects results ([`StorageTier::poll`]), so a slow volume never stalls a step.
//! Queued writes are bounded in bytes; beyond the bound a store is skipped and counted. With a
//! size cap, a sweeper keeps the folder under it, least recently used files first (reads mark
//! files used), checking after every tenth of the cap written.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kvcache::BlockHash;

use crate::files::{chain_time, BlockFiles, ReadError};

/// Most bytes of blocks waiting for a writer.
const MAX_QUEUED_WRITE_BYTES: usize = 256 << 20;
/// The sweeper's pause between checks.
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// How soon an idle engine collects the completions of queued work.
const BUSY_POLL: Duration = Duration::from_millis(2);

/// The storage tier as configured (`secondary_tiers: [{"type": "fs", …}]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTierConfig {
    pub root_dir: std::path::PathBuf,
    pub read_threads: usize,
    pub write_threads: usize,
    /// The folder's size cap (ours, `max_bytes`); none: unbounded, as vLLM's `fs` tier.
    pub max_bytes: Option<u64>,
}

/// What the I/O threads finished.
#[derive(Debug)]
pub enum Done {
    /// A block's file is in place, after `seconds` of writing.
    Written {
        hash: BlockHash,
        seconds: f64,
    },
    WriteFailed(BlockHash, String),
    /// A read job: the blocks read, in order, up to the first one missing or corrupt, in
    /// `seconds`.
    Read {
        request_id: String,
        blocks: Vec<Vec<u8>>,
        corrupt: bool,
        seconds: f64,
    },
    /// Files the sweeper removed to stay under the cap.
    Evicted(Vec<BlockHash>),
    /// A lookup: of the hashes asked for from chain depth `depth`, the leading `found` have a
    /// file.
    Found {
        request_id: String,
        depth: usize,
        found: usize,
    },
}

struct ReadJob {
    request_id: String,
    hashes: Vec<BlockHash>,
    /// Only which files exist (file-exists checks, off the engine thread: on a network volume
    /// each can be a round trip).
    lookup: bool,
    /// Chain depth of the first.
    depth: usize,
}

enum WriteJob {
    Block {
        hash: BlockHash,
        data: Vec<u8>,
        used: SystemTime,
    },
    /// Marks existing files used; no completion.
    Touch(Vec<(BlockHash, SystemTime)>),
}

pub struct StorageTier {
    writes: Sender<WriteJob>,
    reads: Sender<ReadJob>,
    done: Receiver<Done>,
    queued_bytes: Arc<AtomicUsize>,
    /// Jobs queued and not yet collected by [`poll`](Self::poll).
    outstanding: usize,
    sweeps: bool,
}

impl StorageTier {
    pub fn start(
        files: BlockFiles,
        block_bytes: usize,
        readers: usize,
        writers: usize,
        max_bytes: Option<u64>,
    ) -> Self {
        let files = Arc::new(files);
        let (done_tx, done) = mpsc::channel();
        let (writes, write_rx) = mpsc::channel::<WriteJob>();
        let (reads, read_rx) = mpsc::channel::<ReadJob>();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicUsize::new(0));
        let (w_files, queued, w_written) = (files.clone(), queued_bytes.clone(), written.clone());
        spawn_pool(
            "kv-fs-write",
            writers,
            write_rx,
            &done_tx,
            move |job| match job {
                WriteJob::Block { hash, data, used } => {
                    queued.fetch_sub(data.len(), Ordering::Relaxed);
                    let start = std::time::Instant::now();
                    Some(match w_files.write(&hash, &data, used) {
                        Ok(()) => {
                            w_written.fetch_add(data.len(), Ordering::Relaxed);
                            Done::Written {
                                hash,
                                seconds: start.elapsed().as_secs_f64(),
                            }
                        }
                        Err(e) => Done::WriteFailed(hash, e.to_string()),
                    })
                }
                WriteJob::Touch(files) => {
                    for (hash, used) in files {
                        w_files.touch(&hash, used);
                    }
                    None
                }
            },
        );
        let r_files = files.clone();
        spawn_pool(
            "kv-fs-read",
            readers,
            read_rx,
            &done_tx,
            move |job: ReadJob| {
                if job.lookup {
                    let found = job
                        .hashes
                        .iter()
                        .take_while(|h| r_files.contains(h))
                        .count();
                    return Some(Done::Found {
                        request_id: job.request_id,
                        depth: job.depth,
                        found,
                    });
                }
                let mut blocks = Vec::with_capacity(job.hashes.len());
                let mut corrupt = false;
                let now = SystemTime::now();
                let start = std::time::Instant::now();
                for (k, hash) in job.hashes.iter().enumerate() {
                    let mut buf = vec![0u8; block_bytes];
                    match r_files.read(hash, &mut buf) {
                        Ok(()) => {
                            r_files.touch(hash, chain_time(now, job.depth + k));
                            blocks.push(buf);
                        }
                        Err(e) => {
                            corrupt = e == ReadError::Corrupt;
                            break;
                        }
                    }
                }
                Some(Done::Read {
                    request_id: job.request_id,
                    blocks,
                    corrupt,
                    seconds: start.elapsed().as_secs_f64(),
                })
            },
        );
        if let Some(cap) = max_bytes {
            let (files, tx) = (files.clone(), done_tx.clone());
            let every = (cap / 10).max(1) as usize;
            let spawned = std::thread::Builder::new()
                .name("kv-fs-sweep".into())
                .spawn(move || {
                    // Once at start (the folder may be over the cap already), then as writes
                    // add up.
                    let mut due = true;
                    loop {
                        if due || written.load(Ordering::Relaxed) >= every {
                            written.store(0, Ordering::Relaxed);
                            let removed = files.sweep(cap, 0.9);
                            if !removed.is_empty() && tx.send(Done::Evicted(removed)).is_err() {
                                return;
                            }
                        }
                        due = false;
                        std::thread::sleep(SWEEP_EVERY);
                    }
                });
            drop(spawned);
        }
        Self {
            writes,
            reads,
            done,
            queued_bytes,
            outstanding: 0,
            sweeps: max_bytes.is_some(),
        }
    }

    /// Queues a write of a block used at `used`; false (skipped) when the queue is full.
    pub fn store(&mut self, hash: BlockHash, data: Vec<u8>, used: SystemTime) -> bool {
        let queued = self.queued_bytes.fetch_add(data.len(), Ordering::Relaxed);
        if queued + data.len() > MAX_QUEUED_WRITE_BYTES {
            self.queued_bytes.fetch_sub(data.len(), Ordering::Relaxed);
            return false;
        }
        let sent = self
            .writes
            .send(WriteJob::Block { hash, data, used })
            .is_ok();
        self.outstanding += usize::from(sent);
        sent
    }

    /// Queues marking existing files used (missing ones stay missing).
    pub fn touch(&self, files: Vec<(BlockHash, SystemTime)>) {
        if !files.is_empty() {
            let _ = self.writes.send(WriteJob::Touch(files));
        }
    }

    /// Queues a read of `hashes` for `request_id`; the first is at chain depth `depth`.
    pub fn fetch(&mut self, request_id: &str, hashes: Vec<BlockHash>, depth: usize) {
        self.queue_read(request_id, hashes, depth, false);
    }

    /// Queues finding how many leading `hashes` have a file ([`Done::Found`]).
    pub fn lookup(&mut self, request_id: &str, hashes: Vec<BlockHash>, depth: usize) {
        self.queue_read(request_id, hashes, depth, true);
    }

    fn queue_read(&mut self, request_id: &str, hashes: Vec<BlockHash>, depth: usize, lookup: bool) {
        let job = ReadJob {
            request_id: request_id.to_string(),
            hashes,
            lookup,
            depth,
        };
        self.outstanding += usize::from(self.reads.send(job).is_ok());
    }

    /// Everything finished since the last call.
    pub fn poll(&mut self) -> Vec<Done> {
        let done: Vec<Done> = self.done.try_iter().collect();
        let jobs = done
            .iter()
            .filter(|d| !matches!(d, Done::Evicted(_)))
            .count();
        self.outstanding = self.outstanding.saturating_sub(jobs);
        done
    }

    /// Soon while jobs are out; every sweep pause with a sweeper (its removals come unasked).
    pub fn idle_poll(&self) -> Option<Duration> {
        if self.outstanding > 0 {
            Some(BUSY_POLL)
        } else {
            self.sweeps.then_some(SWEEP_EVERY)
        }
    }
}

/// Starts `n` (at least one) threads named `{name}-{i}` taking jobs from one queue and sending
/// what `work` makes of each (if anything); a thread ends when either channel closes.
fn spawn_pool<J: Send + 'static>(
    name: &str,
    n: usize,
    jobs: Receiver<J>,
    done: &Sender<Done>,
    work: impl Fn(J) -> Option<Done> + Send + Sync + 'static,
) {
    let (jobs, work) = (Arc::new(Mutex::new(jobs)), Arc::new(work));
    for i in 0..n.max(1) {
        let (jobs, work, done) = (jobs.clone(), work.clone(), done.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || loop {
                // The lock is held only to take the next job.
                let Ok(Ok(job)) = jobs.lock().map(|r| r.recv()) else {
                    return;
                };
                if let Some(result) = work(job) {
                    if done.send(result).is_err() {
                        return;
                    }
                }
            });
        // A thread that cannot start leaves the others (or none: then the jobs wait).
        drop(spawned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache::BlockLayout;
    use std::time::{Duration, Instant};

    fn wait(tier: &mut StorageTier, n: usize) -> Vec<Done> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(tier.poll());
            assert!(Instant::now() < deadline, "{got:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn writes_then_reads_off_the_caller_thread() {
        let root = std::env::temp_dir().join(format!("offload-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let layout = BlockLayout {
            num_layers: 1,
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
            dtype: "float16",
            dtype_bytes: 2,
        };
        let files = BlockFiles::open(&root, "m", &layout, "sha256_cbor").unwrap();
        let mut tier = StorageTier::start(files, 16, 2, 2, None);
        assert_eq!(tier.idle_poll(), None);
        let hashes: Vec<BlockHash> = (1..=3).map(|i| BlockHash::from_digest(&[i; 32])).collect();
        for (i, h) in hashes.iter().take(2).enumerate() {
            assert!(tier.store(*h, vec![i as u8; 16], SystemTime::now()));
        }
        assert_eq!(tier.idle_poll(), Some(BUSY_POLL));
        let done = wait(&mut tier, 2);
        assert_eq!(tier.idle_poll(), None);
        assert!(
            done.iter().all(|d| matches!(d, Done::Written { .. })),
            "{done:?}"
        );
        tier.lookup("r", hashes.clone(), 7);
        match wait(&mut tier, 1).pop() {
            Some(Done::Found {
                request_id,
                depth,
                found,
            }) => assert_eq!((request_id.as_str(), depth, found), ("r", 7, 2)),
            other => panic!("{other:?}"),
        }
        // The third has no file: the read stops there.
        tier.fetch("r", hashes.clone(), 0);
        match wait(&mut tier, 1).pop() {
            Some(Done::Read {
                request_id,
                blocks,
                corrupt,
                ..
            }) => {
                assert_eq!(request_id, "r");
                assert_eq!(blocks, vec![vec![0u8; 16], vec![1u8; 16]]);
                assert!(!corrupt);
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
