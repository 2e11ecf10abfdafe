//! Paged-attention benchmark: one decode step's attention (every layer) for a batch of
//! sequences at a fixed context, with the KV cache stored as f32, f16 and bf16, alternating so
//! machine noise hits all three. Prints the median time and the KV bytes read per second.
//!
//! cargo bench -p kernels --bench attention -- [--batch N] [--context C] [--rounds R]
//!     [--tables shuffled|interleaved|contiguous]
//!
//! `--tables` says where a sequence's blocks lie: `shuffled` (the default) as a long-running
//! pool's free queue hands them out, `interleaved` as a fresh pool hands them to sequences that
//! grow in lockstep (block `b` of sequence `i` is `b · batch + i`), `contiguous` one run each.

mod common;

use std::time::Instant;

use common::median;

use half::{bf16, f16};
use kernels::{CpuPagedAttention, KvElem, KvLayout, PagedAttention, SeqAttn};
use rand::{Rng, SeedableRng};

/// The default model's attention geometry (SmolLM2-135M).
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;

struct Bench {
    layout: KvLayout,
    tables: Vec<Vec<u32>>,
    context: usize,
    q: Vec<f32>,
}

impl Bench {
    /// One layer's K and V in `E`, random.
    fn caches<E: KvElem>(&self, rng: &mut rand::rngs::StdRng) -> Vec<(Vec<E>, Vec<E>)> {
        let n = self.layout.layer_len();
        let mut random = || -> Vec<E> {
            (0..n)
                .map(|_| E::from_f32(rng.random_range(-1.0..1.0)))
                .collect()
        };
        (0..LAYERS).map(|_| (random(), random())).collect()
    }

    /// Seconds for every layer's attention of one decode step.
    fn step<E: KvElem>(&self, caches: &[(Vec<E>, Vec<E>)]) -> f64 {
        let seqs: Vec<SeqAttn> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, table)| SeqAttn {
                block_table: table,
                context_len: self.context,
                query_start: i,
                query_len: 1,
            })
            .collect();
        let mut out = vec![0f32; self.q.len()];
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let t = Instant::now();
        for (k, v) in caches {
            CpuPagedAttention.attend(&self.layout, k, v, &self.q, HEADS, &seqs, scale, &mut out);
        }
        std::hint::black_box(&out);
        t.elapsed().as_secs_f64()
    }
}

fn main() {
    let (mut batch, mut context, mut rounds): (usize, usize, usize) = (16, 200, 20);
    let mut tables = String::from("shuffled");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse().ok()).expect("a number");
        match flag.as_str() {
            "--batch" => batch = value(),
            "--context" => context = value(),
            "--rounds" => rounds = value(),
            "--tables" => tables = args.next().expect("a table layout"),
            _ => {}
        }
    }
    let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
    let layout = KvLayout {
        num_layers: LAYERS,
        num_blocks: batch * blocks_per_seq,
        block_size: BLOCK_SIZE,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let ids: Vec<u32> = match tables.as_str() {
        "shuffled" => {
            let mut ids: Vec<u32> = (0..layout.num_blocks as u32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            ids
        }
        "interleaved" => (0..batch)
            .flat_map(|i| (0..blocks_per_seq).map(move |b| (b * batch + i) as u32))
            .collect(),
        "contiguous" => (0..layout.num_blocks as u32).collect(),
        other => panic!("unknown --tables {other}"),
    };
    let bench = Bench {
        layout,
        tables: ids.chunks(blocks_per_seq).map(<[u32]>::to_vec).collect(),
        context,
        q: (0..batch * HEADS * HEAD_DIM)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
    };
    let f32s = bench.caches::<f32>(&mut rng);
    let f16s = bench.caches::<f16>(&mut rng);
    let bf16s = bench.caches::<bf16>(&mut rng);
    let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        a.push(bench.step(&f32s));
        b.push(bench.step(&f16s));
        c.push(bench.step(&bf16s));
    }
    // K and V of every attended position, every layer.
    let elements = (2 * LAYERS * batch * context * KV_HEADS * HEAD_DIM) as f64;
    println!(
        "batch {batch}, context {context}, {tables} tables, threads {}",
        kernels::pool::threads()
    );
    for (name, mut times, bytes) in [("f32", a, 4.0), ("f16", b, 2.0), ("bf16", c, 2.0)] {
        let t = median(&mut times);
        println!(
            "{name:>5}: {:6.2} ms per step, {:5.1} GB/s of KV read",
            t * 1e3,
            elements * bytes / t / 1e9
        );
    }
}
