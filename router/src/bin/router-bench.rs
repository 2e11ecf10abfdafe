//! Benchmark (a) of issue 4: prefix-index ingest rate (block events per second on one thread,
//! decoded batches applied, and msgpack decode + apply) and scoring latency of 8k-token prompts
//! against 64 pods and ~1M indexed blocks. Run in release:
//! `cargo run --release -p router --bin router-bench -- [docs] [queries]`.

use std::time::{Duration, Instant};

use kvevents::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, Encoding, EventBatch, ExternalBlockHash,
    KvEvent,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use router::index::{IndexConfig, PrefixIndex};

const PODS: usize = 64;
const BLOCK: usize = 16;
const PROMPT_TOKENS: usize = 8192;
const DOC_BLOCKS: usize = PROMPT_TOKENS / BLOCK;
/// Blocks per BlockStored: one 512-token prefill chunk per engine step.
const STEP_BLOCKS: usize = 32;
const VOCAB: u32 = 49152;

fn doc_tokens(doc: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(doc);
    (0..PROMPT_TOKENS)
        .map(|_| rng.random_range(0..VOCAB))
        .collect()
}

/// A content hash standing in for the engine's (any function of the chain will do).
fn engine_hash(doc: u64, block: usize) -> u64 {
    (doc << 20 | block as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555
}

/// The engine steps storing a whole document.
fn store_batches(doc: u64, tokens: &[u32]) -> Vec<EventBatch> {
    (0..DOC_BLOCKS)
        .step_by(STEP_BLOCKS)
        .map(|from| {
            let to = from + STEP_BLOCKS;
            EventBatch {
                ts: 0.0,
                events: vec![KvEvent::BlockStored(BlockStored {
                    block_hashes: (from..to)
                        .map(|b| ExternalBlockHash::Int(engine_hash(doc, b)))
                        .collect(),
                    parent_block_hash: from
                        .checked_sub(1)
                        .map(|p| ExternalBlockHash::Int(engine_hash(doc, p))),
                    token_ids: tokens[from * BLOCK..to * BLOCK].to_vec(),
                    block_size: BLOCK as u32,
                    lora_id: None,
                    medium: Some("GPU".into()),
                    lora_name: None,
                    extra_keys: None,
                    group_idx: None,
                })],
                data_parallel_rank: None,
            }
        })
        .collect()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{name:<38} p50 {:>8.2} us  p99 {:>8.2} us  mean {:>8.2} us  (n={})",
        pct(&v, 0.5).as_secs_f64() * 1e6,
        pct(&v, 0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        v.len()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let docs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let queries: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let mut cfg = IndexConfig::new("bench-model");
    cfg.max_keys = 1 << 22;
    let index = PrefixIndex::new(cfg).unwrap_or_else(|e| panic!("config: {e}"));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let names: Vec<String> = (0..PODS).map(|p| format!("pod-{p}")).collect();

    // Ingest: each document goes to 1-3 pods, as a prefill of 16 steps of 32 blocks.
    let (mut apply_time, mut decode_apply_time) = (Duration::ZERO, Duration::ZERO);
    let (mut blocks, mut blocks_decoded) = (0u64, 0u64);
    let mut holders: Vec<Vec<usize>> = Vec::new();
    for doc in 0..docs {
        let tokens = doc_tokens(doc);
        let batches = store_batches(doc, &tokens);
        let n = rng.random_range(1..=3);
        let mut pods: Vec<usize> = (0..n).map(|_| rng.random_range(0..PODS)).collect();
        pods.sort();
        pods.dedup();
        for (i, &pod) in pods.iter().enumerate() {
            let name = &names[pod];
            if i == 0 && doc % 8 == 0 {
                // One in eight first copies goes over the wire format: decode + apply.
                let payloads: Vec<Vec<u8>> = batches
                    .iter()
                    .map(|b| encode_batch(b, Encoding::Map))
                    .collect();
                let t = Instant::now();
                for p in &payloads {
                    match decode_batch(p) {
                        Ok(b) => index.apply_batch(name, &b),
                        Err(e) => panic!("decode: {e}"),
                    }
                }
                decode_apply_time += t.elapsed();
                blocks_decoded += DOC_BLOCKS as u64;
            } else {
                let t = Instant::now();
                for b in &batches {
                    index.apply_batch(name, b);
                }
                apply_time += t.elapsed();
                blocks += DOC_BLOCKS as u64;
            }
        }
        holders.push(pods);
    }
    let s = index.stats();
    println!(
        "index: {} pods, {} keys, {} pod entries, {} engine hashes",
        s.pods, s.keys, s.pod_entries, s.engine_hashes
    );
    println!(
        "ingest (decoded batches applied, 1 thread): {:.2} M block events/s ({} blocks in {:.3} s)",
        blocks as f64 / apply_time.as_secs_f64() / 1e6,
        blocks,
        apply_time.as_secs_f64()
    );
    println!(
        "ingest (msgpack decode + apply, 1 thread):  {:.2} M block events/s ({} blocks in {:.3} s)",
        blocks_decoded as f64 / decode_apply_time.as_secs_f64() / 1e6,
        blocks_decoded,
        decode_apply_time.as_secs_f64()
    );

    // Scoring: 8k-token prompts that fully match (512 blocks on 1-3 pods), match half, or miss.
    let mut hash_t = Vec::with_capacity(queries);
    let mut full_t = Vec::with_capacity(queries);
    let mut half_t = Vec::with_capacity(queries);
    let mut miss_t = Vec::with_capacity(queries);
    let mut checked = 0;
    for q in 0..queries {
        let doc = rng.random_range(0..docs);
        let mut tokens = doc_tokens(doc);
        let t = Instant::now();
        let keys = index.block_keys(&tokens, None);
        hash_t.push(t.elapsed());

        let t = Instant::now();
        let m = index.longest_prefix(&keys);
        full_t.push(t.elapsed());
        if q % 64 == 0 {
            assert_eq!(m.len(), holders[doc as usize].len(), "doc {doc}");
            assert!(m.iter().all(|m| m.blocks == DOC_BLOCKS));
            checked += 1;
        }

        tokens[PROMPT_TOKENS / 2] ^= 1;
        let keys = index.block_keys(&tokens, None);
        let t = Instant::now();
        let m = index.longest_prefix(&keys);
        half_t.push(t.elapsed());
        assert!(m.iter().all(|m| m.blocks == DOC_BLOCKS / 2));

        tokens[0] ^= 1;
        let keys = index.block_keys(&tokens, None);
        let t = Instant::now();
        let m = index.longest_prefix(&keys);
        miss_t.push(t.elapsed());
        assert!(m.is_empty());
    }
    // One hot prompt (a shared system prompt) asked again and again: its blocks stay cached.
    let hot = index.block_keys(&doc_tokens(0), None);
    let mut hot_t = Vec::with_capacity(queries);
    for _ in 0..queries {
        let t = Instant::now();
        let m = index.longest_prefix(&hot);
        hot_t.push(t.elapsed());
        assert!(m.iter().all(|m| m.blocks == DOC_BLOCKS));
    }
    println!("scoring, 8k-token prompts ({checked} results checked):");
    report("block_keys (hash 512 blocks)", hash_t);
    report("longest_prefix, full hit (random doc)", full_t);
    report("longest_prefix, 256-block hit", half_t);
    report("longest_prefix, miss", miss_t);
    report("longest_prefix, one hot prompt", hot_t);

    // Removal rate: every pod drops its copy of the first eighth of the documents.
    let t = Instant::now();
    let mut removed = 0u64;
    for doc in 0..docs / 8 {
        let ev = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: (0..DOC_BLOCKS)
                .map(|b| ExternalBlockHash::Int(engine_hash(doc, b)))
                .collect(),
            medium: Some("GPU".into()),
            group_idx: None,
        });
        for pod in &holders[doc as usize] {
            index.apply(&names[*pod], &ev);
            removed += DOC_BLOCKS as u64;
        }
    }
    println!(
        "removal (BlockRemoved applied, 1 thread): {:.2} M block events/s",
        removed as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}
