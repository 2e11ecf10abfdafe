//! Mutation fuzzing of the decoders that take outside bytes (see README): [`targets`] are the
//! decoders and their invariants, [`mutate`] the edits, and [`run`] the loop that feeds one
//! target until its budget is spent or a check panics.

pub mod mutate;
pub mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mutate::{mutate, Rng};
pub use targets::{target, Target, Verdict, TARGETS};

/// Inputs kept for further mutation (seeds plus accepted inputs), at most.
const POOL_MAX: usize = 512;

/// When a run stops: after this many inputs or this long, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub inputs: u64,
    pub time: Duration,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub inputs: u64,
    pub accepted: u64,
    pub elapsed: Duration,
}

/// An input that made a check panic, and the panic's message.
#[derive(Debug, Clone)]
pub struct Finding {
    pub input: Vec<u8>,
    pub message: String,
}

/// Feeds `target` mutated inputs, deterministically from `seed`, until `budget` is spent.
pub fn run(target: &Target, budget: Budget, seed: u64) -> Result<Report, Finding> {
    let mut rng = Rng::new(seed);
    let mut pool = (target.seeds)();
    let started = Instant::now();
    let (mut inputs, mut accepted) = (0u64, 0u64);
    while inputs < budget.inputs && started.elapsed() < budget.time {
        let base = &pool[rng.below(pool.len())];
        let input = mutate(&mut rng, base, &pool, target.dictionary, target.max_len);
        inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| (target.check)(&input))) {
            Ok(Verdict::Accepted) => {
                accepted += 1;
                // Accepted inputs reach deeper: mutate them next. Replace at random when full.
                if pool.len() < POOL_MAX {
                    pool.push(input);
                } else {
                    let i = rng.below(POOL_MAX);
                    pool[i] = input;
                }
            }
            Ok(Verdict::Rejected) => {}
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                return Err(Finding { input, message });
            }
        }
    }
    Ok(Report {
        inputs,
        accepted,
        elapsed: started.elapsed(),
    })
}
