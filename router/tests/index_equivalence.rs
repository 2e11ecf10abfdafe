//! Property test: after any sequence of random events, the index scores every prompt exactly as
//! a naive model does that keeps, per pod, each live block's full token prefix and tiers and
//! compares tokens directly (no hashing, no chains). Two of the pods share a storage group,
//! whose STORAGE blocks the model keeps apart and counts for both.

use std::collections::HashMap;

mod common;

use common::{block_stored, engine_chain};
use kvevents::{BlockRemoved, ExternalBlockHash, KvEvent};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use router::index::{IndexConfig, PrefixIndex, Tier, TierWeights};

const BS: usize = 3;
const PODS: [&str; 4] = ["p0", "p1", "p2", "p3"];
const MEDIA: [Option<&str>; 4] = [None, Some("GPU"), Some("CPU"), Some("STORAGE")];
/// The pods in the storage group "g".
const GROUPED: [&str; 2] = ["p2", "p3"];
const STORAGE_BIT: u8 = 4;

/// Random hash form: vLLM's int, or a 32-byte digest ending in it.
fn wire(rng: &mut ChaCha8Rng, h: u64) -> ExternalBlockHash {
    if rng.random_bool(0.5) {
        ExternalBlockHash::Int(h)
    } else {
        let mut b: Vec<u8> = (0..24).map(|_| rng.random()).collect();
        b.extend_from_slice(&h.to_be_bytes());
        ExternalBlockHash::Bytes(b)
    }
}

fn tier_bit(medium: Option<&str>) -> u8 {
    match Tier::from_medium(medium) {
        Tier::Gpu => 1,
        Tier::Cpu => 2,
        Tier::Storage => 4,
    }
}

/// Engine hash -> (the block's full token prefix, tier bits).
type Blocks = HashMap<u64, (Vec<u32>, u8)>;

/// Per pod its blocks, and the storage group's.
#[derive(Default)]
struct Naive {
    pods: HashMap<&'static str, Blocks>,
    group: Blocks,
}

impl Naive {
    fn score(&self, pod: &str, prompt: &[u32], w: &TierWeights) -> (usize, f64) {
        let none = Blocks::new();
        let own = self.pods.get(pod).unwrap_or(&none);
        let shared = if GROUPED.contains(&pod) {
            &self.group
        } else {
            &none
        };
        let (mut n, mut weight) = (0, 0.0);
        for end in (BS..=prompt.len()).step_by(BS) {
            let best = own
                .values()
                .chain(shared.values())
                .filter(|(prefix, _)| prefix.as_slice() == &prompt[..end])
                .map(|(_, tiers)| {
                    [(1, w.gpu), (2, w.cpu), (4, w.storage)]
                        .iter()
                        .filter(|(bit, _)| tiers & bit != 0)
                        .map(|(_, x)| *x)
                        .fold(0.0, f64::max)
                })
                .fold(None, |acc: Option<f64>, x| {
                    Some(acc.map_or(x, |a| a.max(x)))
                });
            match best {
                Some(x) => {
                    n += 1;
                    weight += x;
                }
                None => break,
            }
        }
        (n, weight)
    }
}

/// A universe of sequences sharing prefixes, so pods and prompts overlap a lot.
fn universe(rng: &mut ChaCha8Rng) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Vec<u32>> = vec![];
    for _ in 0..12 {
        let mut s = match seqs.choose(rng) {
            Some(base) if rng.random_bool(0.7) => {
                let keep = rng.random_range(0..=base.len() / BS) * BS;
                base[..keep].to_vec()
            }
            _ => vec![],
        };
        let extra = rng.random_range(1..6) * BS;
        s.extend((0..extra).map(|_| rng.random_range(0..5u32)));
        seqs.push(s);
    }
    seqs
}

fn run(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weights = TierWeights {
        gpu: 1.0,
        cpu: 0.7,
        storage: 0.3,
    };
    let mut cfg = IndexConfig::new("eq");
    cfg.block_size = BS;
    cfg.shards = 3;
    cfg.tier_weights = weights;
    let ix = PrefixIndex::new(cfg).unwrap();
    for pod in GROUPED {
        ix.set_storage_group(pod, Some("g"));
    }
    let mut naive = Naive::default();
    let seqs = universe(&mut rng);
    // Prompt/pod pairs with a non-empty match: the comparison must not be vacuous.
    let mut hits = 0;
    for step in 0..600 {
        let pod = *PODS.choose(&mut rng).unwrap();
        let own = naive.pods.entry(pod).or_default();
        let shared = &mut naive.group;
        let seq = seqs.choose(&mut rng).unwrap();
        let nblocks = seq.len() / BS;
        let hashes = engine_chain(seq, BS);
        let medium = *MEDIA.choose(&mut rng).unwrap();
        let bit = tier_bit(medium);
        // A grouped pod's STORAGE blocks are the group's; their prefixes may come from its own.
        let to_group = |bit: u8| GROUPED.contains(&pod) && bit == STORAGE_BIT;
        let prefix_of = |own: &Blocks, shared: &Blocks, h: u64, bit: u8| {
            let found = if to_group(bit) {
                shared.get(&h).or_else(|| own.get(&h))
            } else {
                own.get(&h)
            };
            found.map(|(prefix, _)| prefix.clone())
        };
        let event = match rng.random_range(0..100) {
            // Store blocks from..to (the parent may be unknown to this pod: ignored by both).
            0..=49 => {
                let from = rng.random_range(0..nblocks);
                let to = rng.random_range(from + 1..=nblocks);
                let parent = from.checked_sub(1).map(|p| hashes[p]);
                let parent_prefix = match parent {
                    None => Some(vec![]),
                    Some(p) => prefix_of(own, shared, p, bit),
                };
                let target = if to_group(bit) { shared } else { own };
                if let Some(mut prefix) = parent_prefix {
                    for (i, h) in hashes.iter().enumerate().take(to).skip(from) {
                        prefix.extend_from_slice(&seq[i * BS..(i + 1) * BS]);
                        let e = target.entry(*h).or_insert((prefix.clone(), 0));
                        e.1 |= bit;
                    }
                }
                KvEvent::BlockStored(block_stored(
                    hashes[from..to]
                        .iter()
                        .map(|&h| wire(&mut rng, h))
                        .collect(),
                    parent.map(|p| wire(&mut rng, p)),
                    seq[from * BS..to * BS].to_vec(),
                    BS,
                    medium,
                ))
            }
            // Offloaded copies: hashes only.
            50..=64 => {
                let medium = medium.unwrap_or("CPU");
                let bit = tier_bit(Some(medium));
                let picked: Vec<u64> = hashes
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.5))
                    .collect();
                for &h in &picked {
                    if let Some(prefix) = prefix_of(own, shared, h, bit) {
                        let target = if to_group(bit) {
                            &mut *shared
                        } else {
                            &mut *own
                        };
                        target.entry(h).or_insert((prefix, 0)).1 |= bit;
                    }
                }
                KvEvent::BlockStored(block_stored(
                    picked.iter().map(|&h| wire(&mut rng, h)).collect(),
                    None,
                    vec![],
                    BS,
                    Some(medium),
                ))
            }
            65..=96 => {
                let picked: Vec<u64> = hashes
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.4))
                    .collect();
                let mut targets = vec![&mut *own];
                if to_group(bit) {
                    targets.push(&mut *shared);
                }
                for model in targets {
                    for h in &picked {
                        if let Some(e) = model.get_mut(h) {
                            e.1 &= !bit;
                            if e.1 == 0 {
                                model.remove(h);
                            }
                        }
                    }
                }
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: picked.iter().map(|&h| wire(&mut rng, h)).collect(),
                    medium: medium.map(str::to_string),
                    group_idx: None,
                })
            }
            // A pod's clear leaves the shared files.
            _ => {
                own.clear();
                KvEvent::AllBlocksCleared
            }
        };
        ix.apply(pod, &event);

        // Every prompt of the universe (and a longer variant) scores the same in both.
        if step % 10 == 9 {
            for seq in &seqs {
                let mut longer = seq.clone();
                longer.extend([9, 9, 9, 9, 9]);
                for prompt in [seq, &longer] {
                    let keys = ix.block_keys(prompt, None);
                    let got = ix.longest_prefix(&keys);
                    for p in PODS {
                        let (n, w) = naive.score(p, prompt, &weights);
                        let m = got.iter().find(|m| &*m.pod == p);
                        let (gn, gs) = m.map_or((0, 0.0), |m| (m.blocks, m.score));
                        hits += usize::from(n > 0);
                        assert_eq!(gn, n, "seed {seed} step {step} pod {p} prompt {prompt:?}");
                        let want = w / keys.len() as f64;
                        assert!(
                            (gs - want).abs() < 1e-9,
                            "seed {seed} step {step}: {gs} vs {want}"
                        );
                    }
                }
            }
        }
    }
    assert!(hits > 200, "seed {seed}: only {hits} matches");
    // The index holds exactly the naive model's live blocks.
    let live: usize = naive.pods.values().map(HashMap::len).sum::<usize>() + naive.group.len();
    assert_eq!(ix.stats().engine_hashes, live, "seed {seed}");
}

#[test]
fn index_matches_brute_force_recomputation() {
    for seed in 0..40 {
        run(seed);
    }
}
