//! Forward-step benchmark (issue 2, goal (b) without HTTP): the time of one decode step of the
//! real model at batch 1 and at batch N over the paged KV cache, and what batching buys:
//! `N · t(1) / t(N)`, the step-level ceiling of the 16-stream / 1-stream throughput ratio.
//!
//! Every sequence is first prefilled to `--context` tokens (random ids), then decode steps of
//! batch 1 and batch N alternate (ABAB...) so machine noise hits both; the medians are printed.
//! Each decode step rewrites the same next slot of each sequence, so the context stays fixed.
//!
//! cargo bench -p agent --bench forward_step -- [--model PATH] [--batch N] [--context C]
//!     [--steps S] [--kv-dtype f16|bf16|f32]   (f16: the agent's default storage)

#[path = "../../kernels/benches/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use agent::model::{self, LlamaModel, Logits, StepInput};
use anyhow::{bail, Context, Result};
use common::median;
use kernels::{CpuKvCache, KvDtype, SeqAttn};
use rand::{Rng, SeedableRng};

const BLOCK_SIZE: usize = 16;
const PREFILL_CHUNK: usize = 512;

struct Args {
    model: PathBuf,
    batch: usize,
    context: usize,
    steps: usize,
    kv_dtype: KvDtype,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        batch: 16,
        context: 200,
        steps: 40,
        kv_dtype: KvDtype::F16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends `--bench`; it takes no value.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => args.model = value.into(),
            "--batch" => args.batch = value.parse()?,
            "--context" => args.context = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--kv-dtype" => {
                args.kv_dtype = match value.as_str() {
                    "f32" => KvDtype::F32,
                    "f16" => KvDtype::F16,
                    "bf16" => KvDtype::Bf16,
                    _ => bail!("--kv-dtype is f32, f16 or bf16"),
                }
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    if args.batch == 0 || args.context == 0 || args.steps == 0 {
        bail!("--batch, --context and --steps must be positive");
    }
    Ok(args)
}

/// One sequence: its block table and its tokens so far.
struct Seq {
    blocks: Vec<u32>,
    tokens: Vec<u32>,
}

impl Seq {
    fn slot(&self, pos: usize) -> usize {
        self.blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
    }
}

/// Runs one step: `seqs[i]` gets rows for positions `starts[i] .. tokens.len()`; the logits
/// buffer is reused across steps, as the engine does.
fn step(
    model: &LlamaModel,
    cache: &mut CpuKvCache,
    logits: &mut Logits,
    seqs: &[&Seq],
    starts: &[usize],
) -> Result<()> {
    let (mut ids, mut positions, mut slots, mut attn, mut logits_rows) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (seq, &start) in seqs.iter().zip(starts) {
        let query_start = ids.len();
        for pos in start..seq.tokens.len() {
            ids.push(seq.tokens[pos]);
            positions.push(pos);
            slots.push(seq.slot(pos));
        }
        attn.push(SeqAttn {
            block_table: &seq.blocks,
            context_len: seq.tokens.len(),
            query_start,
            query_len: seq.tokens.len() - start,
        });
        logits_rows.push(ids.len() - 1);
    }
    let input = StepInput {
        token_ids: &ids,
        positions: &positions,
        slots: &slots,
        seqs: &attn,
        logits_rows: &logits_rows,
        hidden_rows: &[],
    };
    model.forward(&input, cache, logits)?;
    std::hint::black_box(logits.rows());
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let loaded = model::load(&args.model)?;
    let model = &loaded.model;
    let vocab = loaded.config.vocab_size as u32;
    let len = args.context + 1;
    let blocks_per_seq = len.div_ceil(BLOCK_SIZE);
    let layout = model.kv_layout(args.batch * blocks_per_seq, BLOCK_SIZE);
    let mut cache = CpuKvCache::new(layout, args.kv_dtype);
    let mut logits = Logits::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seqs: Vec<Seq> = (0..args.batch)
        .map(|i| Seq {
            blocks: (0..blocks_per_seq)
                .map(|b| (i * blocks_per_seq + b) as u32)
                .collect(),
            tokens: (0..len).map(|_| rng.random_range(0..vocab)).collect(),
        })
        .collect();

    // Prefill positions 0 .. context (the decode steps below then write position `context`).
    let prefill = Instant::now();
    for seq in &seqs {
        let prompt = Seq {
            blocks: seq.blocks.clone(),
            tokens: seq.tokens[..args.context].to_vec(),
        };
        for start in (0..args.context).step_by(PREFILL_CHUNK) {
            let end = (start + PREFILL_CHUNK).min(args.context);
            let chunk = Seq {
                blocks: prompt.blocks.clone(),
                tokens: prompt.tokens[..end].to_vec(),
            };
            step(model, &mut cache, &mut logits, &[&chunk], &[start])?;
        }
    }

    eprintln!("prefill: {:.2} s", prefill.elapsed().as_secs_f64());

    let all: Vec<&Seq> = seqs.iter().collect();
    let decode_starts = vec![args.context; args.batch];
    let mut time = |batch: usize| -> Result<f64> {
        let t = Instant::now();
        step(
            model,
            &mut cache,
            &mut logits,
            &all[..batch],
            &decode_starts[..batch],
        )?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // Warm-up of both shapes.
    time(1)?;
    time(args.batch)?;
    let (mut one, mut many) = (vec![], vec![]);
    for _ in 0..args.steps {
        one.push(time(1)?);
        many.push(time(args.batch)?);
    }
    let (t1, tn) = (median(&mut one), median(&mut many));
    println!(
        "model {} | context {} | KV {:?} | threads {}",
        args.model.display(),
        args.context,
        args.kv_dtype,
        kernels::pool::threads()
    );
    println!(
        "decode step, batch 1:  {t1:.2} ms (median of {})",
        args.steps
    );
    println!(
        "decode step, batch {}: {tn:.2} ms (median of {})",
        args.batch, args.steps
    );
    println!(
        "batching gain {} x t(1) / t({}): {:.2}x",
        args.batch,
        args.batch,
        args.batch as f64 * t1 / tn
    );
    Ok(())
}
