//! The thread pool the CPU kernels run their parallel loops on.
//!
//! A forward step forks ~150 short loops (20-500 µs each). Handing each to sleeping threads
//! costs a wake-up per loop: measured on the 2-vCPU VM this project runs on, rayon lost
//! 50-100 µs per loop that way, a quarter of a 16-row step. Here the helper threads spin
//! (with a pause hint) while loops keep coming, so a loop starts on every core within a
//! microsecond or two; after 1 ms (`SPIN`) without work they park, so an idle server burns
//! nothing.
//!
//! One loop runs at a time: a loop started while another is running (another thread's) runs
//! on its calling thread alone. A loop started from inside a loop's task (the model's row
//! groups run each group as one task, whose kernels then loop) runs on that task's thread, but
//! open to the pool's threads that ran out of tasks of their own ([`Shared`]): groups rarely
//! finish together (measured serving 16 streams on 2 threads: ~3 ms of one-thread idling in a
//! ~30 ms step), and this way the first to finish helps the other. The caller always works on
//! its own loop, so a loop never waits for a helper to wake.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper spins before parking.
const SPIN: Duration = Duration::from_millis(1);
/// Spins between looks at the clock (reading it on every spin made it a tenth of a busy
/// server's profile) and yields of the core.
const SPINS_PER_CLOCK: u32 = 1024;
/// Bits of the state word for the task count and for the next task: loops of more tasks run
/// on the caller alone (the kernels' loops have at most a few thousand).
const INDEX_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const MAX_TASKS: usize = 1 << INDEX_BITS;
/// The epoch takes the remaining bits and wraps.
const EPOCH_MASK: u64 = (1 << (64 - 2 * INDEX_BITS)) - 1;

/// The loop epoch of a state word (see [`Pool::state`]).
fn epoch_of(state: u64) -> u64 {
    state >> (2 * INDEX_BITS)
}

/// Threads that run kernel loops, the caller's included: `AGENT_CPU_THREADS` when set, else
/// the machine's available parallelism.
pub fn threads() -> usize {
    pool().map_or(1, |p| p.helpers + 1)
}

/// How many of `len` items each task of a loop should take so that the tasks are equal (up to
/// rounding to a multiple of `align`) and hold at least about `min` items each, at most four
/// per thread: all `len` (one task, no fork) when `len < 2 · min`. Equal tasks matter for the
/// short loops of a decode step, where a fixed-size split (say 8192 + 1024 elements) leaves
/// one thread waiting for the other.
pub fn task_len(len: usize, min: usize, align: usize) -> usize {
    let tasks = (len / min.max(1)).clamp(1, threads() * 4);
    len.div_ceil(tasks).next_multiple_of(align.max(1)).max(1)
}

/// Runs `f(i)` for every `i` in `0..n`, spread over the pool; returns when all have run. Tasks
/// are claimed one at a time, so uneven ones balance out. A panic in a task is raised here
/// once every claimed task has finished.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let run_here = |f: &dyn Fn(usize)| (0..n).for_each(f);
    let Some(pool) = pool().filter(|_| n > 1 && n < MAX_TASKS) else {
        return run_here(&f);
    };
    if IN_TASK.get() {
        return match SLOT.get() {
            Some(slot) if !IN_SHARED.get() => pool.share(slot, n, &f),
            _ => run_here(&f),
        };
    }
    // A poisoned lock only means an earlier loop's task panicked (and said so).
    let _running = match pool.running.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => return run_here(&f),
    };
    pool.run(n, &f);
}

/// [`for_each`] over the elements of `items`, each task with exclusive access to its element.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let base = SendPtr(items.as_mut_ptr());
    for_each(items.len(), |i| {
        let base = &base;
        // SAFETY: `i` < `items.len()` and every index is handed to exactly one task, so each
        // element is borrowed mutably once, while `items` is borrowed for the whole call.
        f(unsafe { &mut *base.0.add(i) })
    });
}

struct SendPtr<T>(*mut T);
// SAFETY: only used by `for_each_mut`, which hands out disjoint elements of a `[T: Send]`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

thread_local! {
    /// Set while this thread runs a task (or, on helpers, always): nested loops run on it
    /// (shared, see [`SLOT`]).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// This thread's slot for sharing the loops its tasks start: helpers always have one, the
    /// thread whose loop is running has slot 0 meanwhile.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Set while this thread runs a task of a shared loop: loops those start run serially.
    static IN_SHARED: Cell<bool> = const { Cell::new(false) };
}

/// A loop started inside a task, open to other pool threads (see the module docs). Lives on
/// its starter's stack; others reach it only through a [`Slot`].
struct Shared<'a> {
    task: &'a Task,
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Shared<'_> {
    /// Claims and runs tasks until none is left.
    fn work(&self) {
        IN_SHARED.set(true);
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                break;
            }
            run_task(self.task, i, &self.panicked, &self.done);
        }
        IN_SHARED.set(false);
    }
}

/// Runs task `i` of a loop, noting a panic in `panicked` (raised later by the loop's starter)
/// and its end in `done`.
fn run_task(task: &Task, i: usize, panicked: &AtomicBool, done: &AtomicUsize) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(i)));
    if ran.is_err() {
        panicked.store(true, Ordering::Relaxed);
    }
    done.fetch_add(1, Ordering::Release);
}

/// Where a pool thread publishes the shared loop it is running. `visitors` counts threads
/// that may be looking at `job`: its starter retracts it and waits for none before the loop's
/// closure goes out of scope.
#[repr(align(128))]
struct Slot {
    job: AtomicPtr<Shared<'static>>,
    visitors: AtomicUsize,
}

/// The loop being run, as helpers see it: lifetime erased, valid while its loop runs.
type Task = dyn Fn(usize) + Sync;

struct Pool {
    helpers: usize,
    /// `epoch << 2·INDEX_BITS | tasks << INDEX_BITS | next task`. A new epoch announces a loop;
    /// claiming a task is a compare-and-swap on the whole word, so a helper late for one loop
    /// can never claim a task of the next under the old loop's closure.
    state: AtomicU64,
    /// The current loop's closure (a `*const &Task` on the caller's stack).
    task: AtomicPtr<&'static Task>,
    /// Tasks of the current loop finished.
    done: AtomicUsize,
    /// A task of the current loop panicked.
    panicked: AtomicBool,
    /// Held by the thread whose loop is running.
    running: Mutex<()>,
    /// Shared loops: slot 0 for the thread whose loop is running, then one per helper.
    slots: Box<[Slot]>,
    /// Parked helpers wait here; `sleepers` counts them.
    parked: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
}

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let threads = std::env::var("AGENT_CPU_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        if threads < 2 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers: threads - 1,
            state: AtomicU64::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            running: Mutex::new(()),
            slots: (0..threads)
                .map(|_| Slot {
                    job: AtomicPtr::new(std::ptr::null_mut()),
                    visitors: AtomicUsize::new(0),
                })
                .collect(),
            parked: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        }));
        for i in 0..pool.helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("kernel-{i}"))
                .spawn(move || pool.help(i + 1));
            if spawned.is_err() {
                // Fewer helpers than hoped only means less parallelism; none at all, none.
                return None;
            }
        }
        Some(pool)
    })
}

impl Pool {
    /// The caller's side of a loop (holding `running`).
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY (lifetime erasure): helpers call `task` only for tasks they claimed under this
        // loop's epoch, and this function returns only when every claimed task has finished.
        let task: &&'static Task = unsafe { std::mem::transmute(&f) };
        self.done.store(0, Ordering::Relaxed);
        self.panicked.store(false, Ordering::Relaxed);
        self.task
            .store(task as *const _ as *mut &'static Task, Ordering::Relaxed);
        let epoch = (epoch_of(self.state.load(Ordering::Relaxed)) + 1) & EPOCH_MASK;
        self.state.store(
            epoch << (2 * INDEX_BITS) | (n as u64) << INDEX_BITS,
            Ordering::SeqCst,
        );
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        IN_TASK.set(true);
        SLOT.set(Some(0));
        self.work(epoch);
        while self.done.load(Ordering::Acquire) < n {
            self.visit(0);
            std::hint::spin_loop();
        }
        SLOT.set(None);
        IN_TASK.set(false);
        if self.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked");
        }
    }

    /// Claims and runs tasks of loop `epoch` until none is left.
    fn work(&self, epoch: u64) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let tasks = (state >> INDEX_BITS) & INDEX_MASK;
            let next = state & INDEX_MASK;
            if epoch_of(state) != epoch || next >= tasks {
                return;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: the claim succeeded under `epoch` with a task left, so the loop
                    // has not finished and its closure is alive (see `run`).
                    let task = unsafe { *self.task.load(Ordering::Acquire) };
                    run_task(task, next as usize, &self.panicked, &self.done);
                    state = self.state.load(Ordering::Acquire);
                }
                Err(now) => state = now,
            }
        }
    }

    /// Runs loop `f` of `n` tasks, started inside a task on the thread of slot `slot`, with any
    /// pool thread that visits it.
    fn share(&self, slot: usize, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY (lifetime erasure): visitors reach `job` only between its publication and its
        // retraction below, counted in `visitors`, and this function returns only when none is
        // left (so every task a visitor claimed has finished).
        let task: &'static Task = unsafe { std::mem::transmute(f) };
        let job = Shared {
            task,
            tasks: n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        let slot = &self.slots[slot];
        slot.job
            .store(&job as *const Shared as *mut Shared, Ordering::SeqCst);
        job.work();
        slot.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while slot.visitors.load(Ordering::SeqCst) > 0 || job.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked");
        }
    }

    /// Works on the shared loops of threads other than slot `own`'s, if any.
    fn visit(&self, own: usize) {
        for (i, slot) in self.slots.iter().enumerate() {
            if i == own || slot.job.load(Ordering::Relaxed).is_null() {
                continue;
            }
            // Counted before looking: the loop's starter, retracting it, waits for us.
            slot.visitors.fetch_add(1, Ordering::SeqCst);
            let job = slot.job.load(Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: published and not yet retracted when loaded, and kept alive until
                // `visitors` drops back (see `share`).
                unsafe { (*job).work() };
            }
            slot.visitors.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A helper thread (slot `slot`): waits for loops (spinning, then parked) and works on
    /// them, and on shared loops while it has nothing else.
    fn help(&self, slot: usize) {
        IN_TASK.set(true);
        SLOT.set(Some(slot));
        let mut seen = 0;
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = epoch_of(self.state.load(Ordering::Acquire));
            if epoch != seen {
                seen = epoch;
                self.work(epoch);
                idle_since = Instant::now();
                continue;
            }
            self.visit(slot);
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(SPINS_PER_CLOCK) {
                std::hint::spin_loop();
                continue;
            }
            if idle_since.elapsed() < SPIN {
                // Lets any other runnable thread on this core (another process's, on a shared
                // machine) go first; returns at once when there is none.
                std::thread::yield_now();
                continue;
            }
            let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            // Re-checked after registering as a sleeper: a loop announced since is seen here,
            // or its caller sees the sleeper and wakes us.
            if epoch_of(self.state.load(Ordering::SeqCst)) == seen {
                drop(self.wake.wait(parked).unwrap_or_else(|e| e.into_inner()));
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
        }
    }
}

/// Runs `f` with this thread marked as inside a task, so kernel loops it starts run serially:
/// lets tests compare a pooled run with a one-thread run.
#[cfg(test)]
pub(crate) fn serially<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_TASK.replace(true);
    let r = f();
    IN_TASK.set(outer);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn mutable_elements_and_nested_loops() {
        let mut rows: Vec<Vec<u64>> = (0..40).map(|i| vec![i; 8]).collect();
        for_each_mut(&mut rows, |row| {
            // A loop inside a task (shared with idle threads, if any).
            let sum = AtomicU64::new(0);
            for_each(row.len(), |j| {
                sum.fetch_add(row[j], Ordering::Relaxed);
            });
            row.push(sum.into_inner());
        });
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row[8], 8 * i as u64);
        }
    }

    /// A task's loop is taken up by threads that finished their own tasks; loops nested deeper
    /// still run, once each. (Tries a few times: the other tests' loops, run at the same time,
    /// may hold the pool, and then this one's outer loop runs on its thread alone.)
    #[test]
    fn threads_without_tasks_help_with_a_task_s_loop() {
        if threads() < 2 {
            return;
        }
        let helped = (0..50).any(|_| {
            let workers = Mutex::new(std::collections::HashSet::new());
            let inner = AtomicUsize::new(0);
            for_each(2, |t| {
                if t == 0 {
                    return;
                }
                for_each(16, |_| {
                    workers.lock().unwrap().insert(std::thread::current().id());
                    for_each(4, |_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    });
                    std::thread::sleep(Duration::from_millis(1));
                });
            });
            assert_eq!(inner.into_inner(), 64);
            workers.into_inner().unwrap().len() >= 2
        });
        assert!(helped, "no thread helped");
    }

    #[test]
    fn loops_from_many_threads_at_once() {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for round in 0..200u64 {
                        let total = AtomicU64::new(0);
                        for_each(16, |i| {
                            total.fetch_add(i as u64 + t + round, Ordering::Relaxed);
                        });
                        assert_eq!(total.into_inner(), 120 + 16 * (t + round));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_pool_survives() {
        let caught = std::panic::catch_unwind(|| {
            for_each(64, |i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(caught.is_err());
        let count = AtomicUsize::new(0);
        for_each(64, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 64);
    }

    #[test]
    fn parked_helpers_wake_for_new_loops() {
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        for_each(1000, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 1000);
    }
}
