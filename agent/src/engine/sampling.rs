//! Per-sequence token sampling with vLLM v1 semantics: logprobs from the raw logits, then
//! logits processors (min_tokens, logit_bias), penalties (repetition, frequency, presence), then
//! greedy argmax or temperature → min_p → top_k → top_p → random draw.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::types::{PromptLogprob, SamplingParams, TokenLogprob};

/// Below this temperature sampling is greedy (vLLM's `_SAMPLING_EPS`).
const SAMPLING_EPS: f32 = 1e-5;

/// One sampled token, with its logprobs when the request asked for them.
#[derive(Debug)]
pub struct Sampled {
    pub token_id: u32,
    pub logprobs: Option<TokenLogprob>,
}

/// Samples the tokens of one sequence. Keeps the RNG and the running counts of generated tokens,
/// so penalties cost O(distinct tokens) per step instead of a recount of the whole history.
pub struct SequenceSampler {
    temperature: f32,
    top_p: f32,
    /// 0: off.
    top_k: usize,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    min_tokens: usize,
    ignore_eos: bool,
    stop_token_ids: Vec<u32>,
    num_logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    /// Sorted, deduplicated prompt ids; empty unless the repetition penalty is on.
    prompt_tokens: Vec<u32>,
    output_counts: HashMap<u32, u32>,
    /// How many leading entries of the output history are in `output_counts`.
    counted: usize,
    rng: ChaCha20Rng,
    /// Scratch buffers reused across steps: a copy of the raw logits (for the sampled token's
    /// raw logprob), per-token sampling weights and (token, value) candidates.
    raw: Vec<f32>,
    weights: Vec<f32>,
    candidates: Vec<Candidate>,
}

impl SequenceSampler {
    /// Seeds its RNG from `params.seed` (ChaCha, deterministic: same seed ⇒ same outputs) or
    /// from OS entropy.
    pub fn new(params: &SamplingParams, prompt_token_ids: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        let mut prompt_tokens = Vec::new();
        if params.repetition_penalty != 1.0 {
            prompt_tokens.extend_from_slice(prompt_token_ids);
            prompt_tokens.sort_unstable();
            prompt_tokens.dedup();
        }
        let mut logit_bias: Vec<(u32, f32)> =
            params.logit_bias.iter().map(|(&id, &b)| (id, b)).collect();
        // Stable order so that float additions are reproducible run to run.
        logit_bias.sort_unstable_by_key(|&(id, _)| id);
        Self {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: usize::try_from(params.top_k).unwrap_or(0),
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            min_tokens: params.min_tokens,
            ignore_eos: params.ignore_eos,
            stop_token_ids: params.stop_token_ids.clone(),
            num_logprobs: params.logprobs,
            logit_bias,
            prompt_tokens,
            output_counts: HashMap::new(),
            counted: 0,
            rng,
            raw: Vec::new(),
            weights: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token. `logits` is the raw model output (vocab-sized; modified in place).
    /// `output_token_ids`: tokens generated so far; each call's history must extend the previous
    /// one's (a shorter history makes the sampler recount). `eos_token_ids`: ids that end
    /// generation, masked while fewer than `min_tokens` tokens have been generated. Logprobs
    /// (a pass over the vocabulary and a copy of it) are computed only when the request asked
    /// for them.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        output_token_ids: &[u32],
        eos_token_ids: &[u32],
    ) -> Sampled {
        let raw = self.num_logprobs.map(|n| {
            let lse = log_sum_exp(logits, &mut self.weights);
            let top = match n {
                0 => Vec::new(),
                n => top_logprobs(logits, &self.weights, n, lse, &mut self.candidates),
            };
            self.raw.clear();
            self.raw.extend_from_slice(logits);
            (lse, top)
        });
        self.apply_processors(logits, output_token_ids, eos_token_ids);
        let token_id = if self.temperature < SAMPLING_EPS {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        Sampled {
            token_id,
            logprobs: raw.map(|(lse, top)| TokenLogprob {
                token_id,
                logprob: self.raw[token_id as usize] - lse,
                top,
            }),
        }
    }

    /// A prompt position's logprob of `token_id` (the prompt's next token) and its `n` highest
    /// alternatives, from the raw logits: no processor applies to prompt logprobs, as in vLLM.
    pub fn prompt_logprob(&mut self, logits: &[f32], token_id: u32, n: usize) -> PromptLogprob {
        let lse = log_sum_exp(logits, &mut self.weights);
        let top = match n {
            0 => Vec::new(),
            n => top_logprobs(logits, &self.weights, n, lse, &mut self.candidates),
        };
        let logit = logits.get(token_id as usize).copied();
        let logit = logit.unwrap_or(f32::NEG_INFINITY);
        PromptLogprob {
            entry: TokenLogprob {
                token_id,
                logprob: logit - lse,
                top,
            },
            // vLLM's rank: 1 + the tokens strictly more likely.
            rank: 1 + logits.iter().filter(|&&l| l > logit).count(),
        }
    }

    /// Logits processors and penalties, in vLLM v1's order.
    fn apply_processors(&mut self, logits: &mut [f32], output: &[u32], eos: &[u32]) {
        self.count_new_outputs(output);
        if output.len() < self.min_tokens {
            let eos: &[u32] = if self.ignore_eos { &[] } else { eos };
            for &id in eos.iter().chain(&self.stop_token_ids) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for &(id, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let rep = self.repetition_penalty;
        if rep != 1.0 {
            let mut penalize = |id: u32| {
                if let Some(l) = logits.get_mut(id as usize) {
                    if *l > 0.0 {
                        *l /= rep;
                    } else {
                        *l *= rep;
                    }
                }
            };
            for &id in &self.prompt_tokens {
                penalize(id);
            }
            // Tokens seen in both prompt and output are penalized once.
            for &id in self.output_counts.keys() {
                if self.prompt_tokens.binary_search(&id).is_err() {
                    penalize(id);
                }
            }
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= self.frequency_penalty * count as f32 + self.presence_penalty;
                }
            }
        }
    }

    fn count_new_outputs(&mut self, output: &[u32]) {
        if output.len() < self.counted {
            self.output_counts.clear();
            self.counted = 0;
        }
        for &id in &output[self.counted..] {
            *self.output_counts.entry(id).or_insert(0) += 1;
        }
        self.counted = output.len();
    }

    /// Temperature, min_p, top_k, top_p (vLLM v1 applies min_p before top-k/top-p), then a draw.
    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let max = max_value(logits);
        if !max.is_finite() {
            // Everything masked (or an infinite logit): nothing to draw from.
            return argmax(logits);
        }
        // Weights are probabilities relative to the most likely token, so min_p's
        // "prob < min_p * max_prob" is "weight < min_p".
        let weights = &mut self.weights;
        exp_weights(logits, max, 1.0 / self.temperature, self.min_p, weights);
        let mut total = sum_f64(weights);
        let top_k = (self.top_k > 0 && self.top_k < weights.len()).then_some(self.top_k);
        if top_k.is_none() && self.top_p >= 1.0 {
            let u = self.rng.random::<f64>() * total;
            return pick_in_chunks(u, weights).unwrap_or_else(|| argmax(logits));
        }

        // Gather only the tokens that can make the top-k (k of them) or the nucleus (more than
        // p of the mass, with room to spare for rounding).
        let (min_count, min_mass) = match top_k {
            Some(k) => (k, 0.0),
            None => (1, total * (1.0 + f64::from(self.top_p)) / 2.0),
        };
        let cands = &mut self.candidates;
        gather_candidates(weights, min_count, min_mass, cands);
        if let Some(k) = top_k {
            if k < cands.len() {
                cands.select_nth_unstable(k - 1);
                // Ties with the k-th value stay in, as in vLLM.
                let kth = cands[k - 1].value();
                cands.retain(|c| c.value() >= kth);
            }
            total = mass(cands);
        }
        if self.top_p < 1.0 {
            let keep = nucleus_len(cands, self.top_p, total);
            cands.truncate(keep);
            total = mass(cands);
        }
        let u = self.rng.random::<f64>() * total;
        pick(u, cands.iter().map(|c| (c.id(), c.value()))).unwrap_or_else(|| argmax(logits))
    }
}

/// The `n` highest raw logprobs, highest first (ties: lower id first). `weights` holds
/// `exp(logit - max)` (from [`log_sum_exp`]) to narrow the search.
fn top_logprobs(
    logits: &[f32],
    weights: &[f32],
    n: usize,
    lse: f32,
    cands: &mut Vec<Candidate>,
) -> Vec<(u32, f32)> {
    gather_candidates(weights, n, 0.0, cands);
    // Rank by the logits themselves: distinct logits can round to the same weight.
    for c in cands.iter_mut() {
        *c = Candidate::new(c.id(), logits[c.id() as usize]);
    }
    let n = n.min(cands.len());
    if n == 0 {
        return Vec::new();
    }
    if n < cands.len() {
        cands.select_nth_unstable(n - 1);
    }
    cands[..n].sort_unstable();
    cands[..n]
        .iter()
        .map(|c| (c.id(), c.value() - lse))
        .collect()
}

/// Fills `out` with `(id, weight)` for the tokens whose weight reaches the highest floor at which
/// at least `min_count` tokens and `min_mass` total weight remain, so that top-k / top-p / top-n
/// searches work on a short list instead of the whole vocabulary. The last resort keeps all.
fn gather_candidates(weights: &[f32], min_count: usize, min_mass: f64, out: &mut Vec<Candidate>) {
    const FLOORS: [f32; 6] = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7];
    let floor = FLOORS
        .into_iter()
        .find(|&floor| {
            let (count, mass) = count_and_mass_from(weights, floor);
            count >= min_count && mass >= min_mass
        })
        .unwrap_or(0.0);
    out.clear();
    out.extend(
        weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w >= floor)
            .map(|(i, &w)| Candidate::new(i as u32, w)),
    );
}

/// Reorders `cands` so that the top-p nucleus comes first and returns its length: tokens in
/// descending order are kept while the weight strictly above them is below `top_p * total`
/// (vLLM's rule), and at least one is. `total` is the weight of the whole distribution, of which
/// `cands` holds the heaviest part. A mass-guided quickselect: expected O(n), sorting only a
/// small final range.
fn nucleus_len(cands: &mut [Candidate], top_p: f32, total: f64) -> usize {
    /// Ranges this small are sorted and walked instead of split further.
    const SORT_BELOW: usize = 64;
    let target = f64::from(top_p) * total;
    // Invariant: cands[..lo] rank above cands[lo..hi], are all kept and weigh `above`; the cut
    // lies in lo..=hi.
    let (mut lo, mut hi, mut above) = (0, cands.len(), 0.0);
    while hi - lo > SORT_BELOW {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable(mid - lo);
        let before_mid = above + mass(&cands[lo..mid]);
        if before_mid >= target {
            hi = mid;
        } else {
            above = before_mid + f64::from(cands[mid].value());
            lo = mid + 1;
        }
    }
    cands[lo..hi].sort_unstable();
    let mut cut = lo;
    for c in &cands[lo..hi] {
        if above >= target {
            break;
        }
        above += f64::from(c.value());
        cut += 1;
    }
    cut.max(1)
}

/// The first item at which the running weight passes `u`; when rounding leaves `u` unreached,
/// the last positive-weight item. `None` only when no weight is positive.
fn pick(mut u: f64, items: impl Iterator<Item = (u32, f32)>) -> Option<u32> {
    let mut last = None;
    for (id, w) in items {
        if w > 0.0 {
            u -= f64::from(w);
            last = Some(id);
            if u < 0.0 {
                break;
            }
        }
    }
    last
}

/// [`pick`] over a whole vocabulary of weights (index = token id), skipping chunks by their
/// (vectorized) sums instead of walking every token. Rounding past the end lands in the last
/// chunk with weight.
fn pick_in_chunks(mut u: f64, weights: &[f32]) -> Option<u32> {
    const CHUNK: usize = 256;
    let mut last = None;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let sum = sum_f64(chunk);
        if sum <= 0.0 {
            continue;
        }
        last = Some(c);
        if u < sum {
            break;
        }
        u -= sum;
    }
    let c = last?;
    let base = c * CHUNK;
    let chunk = &weights[base..weights.len().min(base + CHUNK)];
    pick(
        u,
        chunk
            .iter()
            .enumerate()
            .map(|(i, &w)| ((base + i) as u32, w)),
    )
}

/// A token and a value (weight or logit) packed into one integer whose ascending order is
/// "highest value first, then lowest id", so selections and sorts compare single integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate(u64);

impl Candidate {
    fn new(id: u32, value: f32) -> Self {
        Self((u64::from(!order_bits(value)) << 32) | u64::from(id))
    }

    fn id(self) -> u32 {
        self.0 as u32
    }

    fn value(self) -> f32 {
        from_order_bits(!((self.0 >> 32) as u32))
    }
}

/// Maps floats to integers with the same order (negatives below positives, NaN aside).
fn order_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn from_order_bits(o: u32) -> f32 {
    f32::from_bits(if o >> 31 == 1 { o & 0x7FFF_FFFF } else { !o })
}

fn mass(cands: &[Candidate]) -> f64 {
    cands.iter().map(|c| f64::from(c.value())).sum()
}

/// Accumulator lanes for the vocab-wide reductions below: independent lanes let the compiler
/// vectorize them (a single float accumulator is a serial dependency chain).
const LANES: usize = 8;

/// Largest value, NaNs ignored; -inf for an empty or all-NaN slice.
fn max_value(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            if x > *a {
                *a = x;
            }
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum, accumulated in f64 lanes.
fn sum_f64(xs: &[f32]) -> f64 {
    count_and_mass_from(xs, f32::NEG_INFINITY).1
}

/// How many values are at least `floor`, and their sum (in f64 lanes).
fn count_and_mass_from(xs: &[f32], floor: f32) -> (usize, f64) {
    let mut count = [0usize; LANES];
    let mut mass = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let keep = c[j] >= floor;
            count[j] += usize::from(keep);
            mass[j] += if keep { f64::from(c[j]) } else { 0.0 };
        }
    }
    let kept = rest.iter().filter(|&&x| x >= floor);
    (
        count.iter().sum::<usize>() + kept.clone().count(),
        mass.iter().sum::<f64>() + kept.map(|&x| f64::from(x)).sum::<f64>(),
    )
}

/// `out[i] = exp((logits[i] - max) * inv_t)`, zeroed below `floor`. Its own pass (rather than
/// fused into a sum) so that it vectorizes.
fn exp_weights(logits: &[f32], max: f32, inv_t: f32, floor: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(logits.iter().map(|&l| {
        let w = fast_exp((l - max) * inv_t);
        if w < floor {
            0.0
        } else {
            w
        }
    }));
}

/// Index of the largest logit; ties go to the lowest id, NaNs are ignored.
fn argmax(logits: &[f32]) -> u32 {
    let max = max_value(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// `ln Σ exp(l)`; leaves `exp(l - max)` in `scratch` (all zeros when the max is not finite).
fn log_sum_exp(logits: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let max = max_value(logits);
    if !max.is_finite() {
        scratch.clear();
        scratch.resize(logits.len(), 0.0);
        return max;
    }
    exp_weights(logits, max, 1.0, 0.0, scratch);
    max + sum_f64(scratch).ln() as f32
}

/// `exp(x)` for `x <= 0` within ~2 ulp, branch-free so that loops over the vocabulary vectorize
/// (libm's `expf` is a call per element). Cephes' expf: `2^n * e^r` with `|r| <= ln2/2`.
/// Returns 0 below -87 (where f32 would go subnormal) and for -inf.
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 0.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // The low mantissa bits of `shifted` hold `n` (no float-to-int conversion, which would not
    // vectorize): 2^n is `n + 127` in the exponent field.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// Deterministic pseudo-random logits in [-4, 4).
    fn noisy_logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_000;
                x as f32 / 1250.0 - 4.0
            })
            .collect()
    }

    fn draw(p: &SamplingParams, logits: &[f32], steps: usize) -> Vec<u32> {
        let mut s = SequenceSampler::new(p, &[]);
        (0..steps)
            .map(|_| s.sample(&mut logits.to_vec(), &[], &[]).token_id)
            .collect()
    }

    fn frequencies(p: &SamplingParams, logits: &[f32], steps: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for id in draw(p, logits, steps) {
            counts[id as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / steps as f64).collect()
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let p = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        let logits = noisy_logits(49152, 1);
        let expected = argmax(&logits);
        assert_eq!(draw(&p, &logits, 5), vec![expected; 5]);
        assert_eq!(draw(&p, &[1.0, 3.0, 3.0, -1.0], 1), vec![1]);
    }

    #[test]
    fn same_seed_same_samples_different_seed_differs() {
        let logits = noisy_logits(1000, 2);
        let variants = [
            params(),
            SamplingParams {
                top_k: 100,
                ..params()
            },
            SamplingParams {
                top_p: 0.8,
                min_p: 0.01,
                ..params()
            },
        ];
        for p in variants {
            let a = draw(&p, &logits, 200);
            assert_eq!(a, draw(&p, &logits, 200));
            let other = SamplingParams { seed: Some(8), ..p };
            assert_ne!(a, draw(&other, &logits, 200));
        }
    }

    #[test]
    fn top_k_and_top_logprobs_over_a_full_vocab() {
        // Many tied values: ties with the k-th value are kept, top-n ties go to the lower id.
        let logits = noisy_logits(49152, 5);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let kth = logits[order[49] as usize];
        let p = SamplingParams {
            top_k: 50,
            logprobs: Some(20),
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[]);
        let lse = log_sum_exp(&logits, &mut Vec::new());
        for _ in 0..300 {
            let out = s.sample(&mut logits.clone(), &[], &[]).logprobs.unwrap();
            assert!(logits[out.token_id as usize] >= kth);
            let ids: Vec<u32> = out.top.iter().map(|&(id, _)| id).collect();
            assert_eq!(ids, order[..20]);
            assert_eq!(out.top[0].1, logits[order[0] as usize] - lse);
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        // A unique maximum: top_k keeps every token tied with the k-th value.
        let mut logits = noisy_logits(49152, 3);
        logits[1234] = 5.0;
        let greedy = 1234;
        for seed in 0..20 {
            let k1 = SamplingParams {
                top_k: 1,
                seed: Some(seed),
                ..params()
            };
            let p0 = SamplingParams {
                top_p: 1e-6,
                seed: Some(seed),
                ..params()
            };
            assert_eq!(draw(&k1, &logits, 3), vec![greedy; 3]);
            assert_eq!(draw(&p0, &logits, 3), vec![greedy; 3]);
        }
    }

    #[test]
    fn distribution_matches_softmax() {
        let logits = [1.0f32, 0.0, -0.5];
        let want = softmax(&logits);
        let got = frequencies(&params(), &logits, 20_000);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
        }
        // Temperature 0.5 doubles the logits.
        let hot = SamplingParams {
            temperature: 0.5,
            ..params()
        };
        let want = softmax(&[2.0, 0.0, -1.0]);
        let got = frequencies(&hot, &logits, 20_000);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_renormalize_over_the_kept_tokens() {
        // Probabilities 0.5, 0.3, 0.2.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let k2 = SamplingParams {
            top_k: 2,
            ..params()
        };
        let got = frequencies(&k2, &logits, 20_000);
        assert_eq!(got[2], 0.0);
        assert!((got[0] - 0.625).abs() < 0.02, "{got:?}");
        // p = 0.7: the mass above token 1 is 0.5 < 0.7 (kept), above token 2 it is 0.8 (dropped).
        let p07 = SamplingParams {
            top_p: 0.7,
            ..params()
        };
        let got = frequencies(&p07, &logits, 20_000);
        assert_eq!(got[2], 0.0);
        assert!((got[0] - 0.625).abs() < 0.02, "{got:?}");
        // p = 0.85 keeps all three.
        let p085 = SamplingParams {
            top_p: 0.85,
            ..params()
        };
        assert!(frequencies(&p085, &logits, 5_000)[2] > 0.1);
    }

    #[test]
    fn top_p_over_a_full_vocab_keeps_the_nucleus() {
        let logits = noisy_logits(49152, 4);
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut before = 0.0;
        let nucleus: Vec<usize> = order
            .iter()
            .copied()
            .take_while(|&i| {
                let keep = before < 0.3;
                before += probs[i];
                keep
            })
            .collect();
        let p = SamplingParams {
            top_p: 0.3,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[]);
        for _ in 0..500 {
            let id = s.sample(&mut logits.clone(), &[], &[]).token_id as usize;
            assert!(nucleus.contains(&id), "{id} not in the nucleus");
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(fast_exp(x));
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        for (n, salt) in [(1, 1), (5, 2), (64, 3), (65, 4), (1000, 5), (5000, 6)] {
            for top_p in [0.0f32, 0.1, 0.5, 0.9, 0.999] {
                let mut cands: Vec<Candidate> = noisy_logits(n, salt)
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| Candidate::new(i as u32, (2.0 * l).exp()))
                    .collect();
                let mut sorted = cands.clone();
                sorted.sort();
                let total = mass(&sorted);
                let mut above = 0.0;
                let want = sorted
                    .iter()
                    .take_while(|c| {
                        let keep = above < f64::from(top_p) * total;
                        above += f64::from(c.value());
                        keep
                    })
                    .count()
                    .max(1);
                let got = nucleus_len(&mut cands, top_p, total);
                assert_eq!(got, want, "n={n} p={top_p}");
                let mut kept = cands[..got].to_vec();
                kept.sort();
                assert_eq!(kept, sorted[..want], "n={n} p={top_p}");
            }
        }
    }

    #[test]
    fn candidates_order_by_value_then_id() {
        let values = [
            3.5f32,
            -0.0,
            0.0,
            -2.0,
            f32::NEG_INFINITY,
            1e-30,
            -1e30,
            3.5,
        ];
        let mut cands: Vec<Candidate> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| Candidate::new(i as u32, v))
            .collect();
        cands.sort();
        let order: Vec<u32> = cands.iter().map(|c| c.id()).collect();
        assert_eq!(order, vec![0, 7, 5, 2, 1, 3, 6, 4]);
        for c in cands {
            assert_eq!(c.value().to_bits(), values[c.id() as usize].to_bits());
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_max() {
        // Relative to the top token: 1, 0.3, 0.05.
        let logits = [2.0f32, 2.0 + 0.3f32.ln(), 2.0 + 0.05f32.ln()];
        let p = SamplingParams {
            min_p: 0.1,
            ..params()
        };
        let got = frequencies(&p, &logits, 5_000);
        assert_eq!(got[2], 0.0);
        assert!(got[1] > 0.15, "{got:?}");
    }

    #[test]
    fn penalties_follow_the_vllm_formulas() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[0, 1, 1]);
        let mut logits = vec![4.0, -4.0, 3.0, 1.0, -1.0];
        s.apply_processors(&mut logits, &[1, 2, 2, 4], &[]);
        // 0: prompt only → /2. 1: prompt + once in output → *2, then -0.5 - 0.25.
        // 2: twice in output → /2, then -1.0 - 0.25. 3: untouched. 4: once → *2 - 0.75.
        assert_eq!(logits, vec![2.0, -8.75, 0.25, 1.0, -2.75]);
        // Counts grow incrementally with the history.
        let mut logits = vec![0.0; 5];
        s.apply_processors(&mut logits, &[1, 2, 2, 4, 3, 3, 3], &[]);
        assert_eq!(logits, vec![0.0, -0.75, -1.25, -1.75, -0.75]);
        // A shorter history is recounted from scratch.
        let mut logits = vec![0.0; 5];
        s.apply_processors(&mut logits, &[3], &[]);
        assert_eq!(logits, vec![0.0, 0.0, 0.0, -0.75, 0.0]);
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_ids() {
        let p = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![3],
            ..params()
        };
        let ninf = f32::NEG_INFINITY;
        let mut s = SequenceSampler::new(&p, &[]);
        let mut logits = vec![1.0; 5];
        s.apply_processors(&mut logits, &[0], &[4]);
        assert_eq!(logits, vec![1.0, 1.0, 1.0, ninf, ninf]);
        let mut logits = vec![1.0; 5];
        s.apply_processors(&mut logits, &[0, 0], &[4]);
        assert_eq!(logits, vec![1.0; 5]);

        let ignore = SamplingParams {
            ignore_eos: true,
            ..p
        };
        let mut s = SequenceSampler::new(&ignore, &[]);
        let mut logits = vec![1.0; 5];
        s.apply_processors(&mut logits, &[], &[4]);
        assert_eq!(logits, vec![1.0, 1.0, 1.0, ninf, 1.0]);
        // Greedy never picks a masked eos even when it is the argmax.
        let greedy = SamplingParams {
            temperature: 0.0,
            min_tokens: 1,
            ..params()
        };
        let mut s = SequenceSampler::new(&greedy, &[]);
        assert_eq!(s.sample(&mut [0.0, 9.0, 1.0], &[], &[1]).token_id, 2);
    }

    #[test]
    fn logit_bias_is_added() {
        let p = SamplingParams {
            temperature: 0.0,
            logit_bias: [(2, 5.0), (0, -1.5)].into_iter().collect(),
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[]);
        let mut logits = vec![1.0, 2.0, 0.0];
        s.apply_processors(&mut logits, &[], &[]);
        assert_eq!(logits, vec![-0.5, 2.0, 5.0]);
        assert_eq!(s.sample(&mut [1.0, 2.0, 0.0], &[], &[]).token_id, 2);
    }

    #[test]
    fn logprobs_come_from_the_raw_logits() {
        let raw = vec![1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lse = raw.iter().map(|l| l.exp()).sum::<f32>().ln();
        let p = SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            logit_bias: [(4, 10.0)].into_iter().collect(),
            ..params()
        };
        let mut s = SequenceSampler::new(&p, &[]);
        let out = s.sample(&mut raw.clone(), &[], &[]).logprobs.unwrap();
        assert_eq!(out.token_id, 4);
        assert!((out.logprob - (-1.0 - lse)).abs() < 1e-5);
        let ids: Vec<u32> = out.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        for &(id, lp) in &out.top {
            assert!((lp - (raw[id as usize] - lse)).abs() < 1e-5);
        }
        // logprobs=0: the sampled token's logprob, no alternatives.
        let zero = SamplingParams {
            logprobs: Some(0),
            ..params()
        };
        let out = SequenceSampler::new(&zero, &[]).sample(&mut raw.clone(), &[], &[]);
        let out = out.logprobs.unwrap();
        assert!(out.top.is_empty());
        assert!((out.logprob - (raw[out.token_id as usize] - lse)).abs() < 1e-5);
        // Not requested: none computed.
        let out = SequenceSampler::new(&params(), &[]).sample(&mut raw.clone(), &[], &[]);
        assert!(out.logprobs.is_none());
    }
}
