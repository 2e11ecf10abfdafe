//! KV-events benchmark (issue 3): how many events the ZMQ publisher moves per second, and what
//! publishing costs the engine step.
//!
//! 1. Synthetic: the block manager idle-loops block changes (each step stores a fresh 8-block
//!    prompt and frees it, so a full pool evicts) through the real publisher, with a real SUB
//!    decoding every batch; the same loop with the null sink gives the per-step cost.
//! 2. Real engine: the same greedy workload on the model with events on and off, alternating
//!    rounds (ABAB...) so machine noise hits both; median wall time per round.
//!
//! cargo bench -p agent --bench kv_events -- [--model PATH] [--seconds S] [--rounds R]

#[path = "../../kernels/benches/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::engine::{self, EngineConfig, GenerateRequest, SamplingParams};
use agent::kv_events::{self, KvEventsConfig};
use agent::metrics::{CacheConfigInfo, Metrics};
use agent::model;
use anyhow::{bail, Context, Result};
use common::median;
use kvcache::{BlockHasher, BlockPool, HashAlgo, KvCacheManager, KvEventSink, NullSink};
use kvevents::{decode_batch, KvEvent};

const BLOCK_SIZE: usize = 16;
const POOL_BLOCKS: usize = 4096;
const BLOCKS_PER_STEP: usize = 8;

fn metrics() -> Result<Arc<Metrics>> {
    let cache = CacheConfigInfo {
        block_size: BLOCK_SIZE,
        num_gpu_blocks: POOL_BLOCKS,
        enable_prefix_caching: true,
        prefix_caching_hash_algo: "sha256_cbor".into(),
        cache_dtype: "auto".into(),
    };
    Ok(Arc::new(Metrics::new("bench", 4096, &cache)?))
}

fn publisher(metrics: Arc<Metrics>) -> Result<(kv_events::ZmqEventSink, String)> {
    let config = KvEventsConfig::parse(
        &serde_json::json!({"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:*",
                            "replay_endpoint": "tcp://127.0.0.1:*", "topic": "kv@bench@m"}),
        None,
    )?;
    let (sink, endpoints) = kv_events::start(&config, metrics)?;
    Ok((sink, endpoints.events))
}

/// Counts what a subscriber receives: batches, events, block hashes.
#[derive(Default)]
struct Received {
    batches: AtomicU64,
    events: AtomicU64,
    blocks: AtomicU64,
}

fn subscribe(endpoint: &str, received: Arc<Received>) -> Result<()> {
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_subscribe(b"")?;
    sub.set_rcvhwm(0)?;
    sub.set_rcvtimeo(100)?;
    sub.connect(endpoint)?;
    std::thread::spawn(move || loop {
        let Ok(frames) = sub.recv_multipart(0) else {
            continue;
        };
        let Some(Ok(batch)) = frames.get(2).map(|p| decode_batch(p)) else {
            continue;
        };
        received.batches.fetch_add(1, Ordering::Relaxed);
        received
            .events
            .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        let blocks: usize = batch
            .events
            .iter()
            .map(|e| match e {
                KvEvent::BlockStored(s) => s.block_hashes.len(),
                KvEvent::BlockRemoved(r) => r.block_hashes.len(),
                _ => 0,
            })
            .sum();
        received.blocks.fetch_add(blocks as u64, Ordering::Relaxed);
    });
    Ok(())
}

/// One synthetic engine: the manager over a pool whose events go to `sink`.
struct Synthetic {
    kv: KvCacheManager,
    sink: Box<dyn KvEventSink>,
    step: u64,
}

impl Synthetic {
    fn new(sink: Box<dyn KvEventSink>) -> Self {
        let pool = BlockPool::new(POOL_BLOCKS, true);
        let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, None);
        Self {
            kv: KvCacheManager::new(pool, BLOCK_SIZE, hasher, true),
            sink,
            step: 0,
        }
    }

    /// Stores a fresh prompt of `BLOCKS_PER_STEP` full blocks and frees it: one BlockStored
    /// per step, plus a BlockRemoved once the pool is full of cached blocks.
    fn step(&mut self) {
        self.step += 1;
        let id = format!("r{}", self.step);
        let n = BLOCKS_PER_STEP * BLOCK_SIZE;
        let tokens: Vec<u32> = (0..n as u64)
            .map(|i| ((self.step * 7919 + i * 104729) % 49152) as u32)
            .collect();
        let (hit, _) = self.kv.find_cached_prefix(&id, &tokens, None);
        if self.kv.allocate_slots(&id, n, &hit).is_ok() {
            self.kv.cache_blocks(&id, &tokens, n);
        }
        self.kv.free(&id);
        self.sink.publish(self.kv.take_events());
    }
}

fn synthetic(seconds: f64) -> Result<()> {
    let metrics = metrics()?;
    let (sink, endpoint) = publisher(metrics.clone())?;
    let received = Arc::new(Received::default());
    subscribe(&endpoint, received.clone())?;
    let mut engine = Synthetic::new(Box::new(sink));
    // Slow joiner: step until the subscriber gets something, then fill the pool so every
    // measured step also evicts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.batches.load(Ordering::Relaxed) == 0 {
        engine.step();
        std::thread::sleep(Duration::from_millis(1));
        if Instant::now() > deadline {
            bail!("the subscriber received nothing");
        }
    }
    for _ in 0..POOL_BLOCKS / BLOCKS_PER_STEP {
        engine.step();
    }
    std::thread::sleep(Duration::from_millis(500));
    let (b0, e0, k0) = (
        received.batches.load(Ordering::Relaxed),
        received.events.load(Ordering::Relaxed),
        received.blocks.load(Ordering::Relaxed),
    );
    let dropped0 = metrics.kv_events_dropped.get();
    let start = Instant::now();
    let mut steps = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        engine.step();
        steps += 1;
    }
    let engine_secs = start.elapsed().as_secs_f64();
    // Let the subscriber drain, then count.
    let mut last = u64::MAX;
    while received.batches.load(Ordering::Relaxed) != last {
        last = received.batches.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
    }
    let total_secs = start.elapsed().as_secs_f64() - 0.3;
    let batches = received.batches.load(Ordering::Relaxed) - b0;
    let events = received.events.load(Ordering::Relaxed) - e0;
    let blocks = received.blocks.load(Ordering::Relaxed) - k0;
    let dropped = metrics.kv_events_dropped.get() - dropped0;
    println!(
        "synthetic publisher ({BLOCKS_PER_STEP}-block store + eviction per step, sha256_cbor):"
    );
    println!(
        "  engine side: {steps} steps in {engine_secs:.2} s = {:.0} steps/s ({:.2} us/step)",
        steps as f64 / engine_secs,
        engine_secs * 1e6 / steps as f64
    );
    println!(
        "  received by a SUB: {batches} batches, {events} events ({blocks} block hashes) in {total_secs:.2} s = {:.0} events/s, {:.0} blocks/s; dropped batches: {dropped}",
        events as f64 / total_secs,
        blocks as f64 / total_secs
    );

    // The same loop with events off: the difference is what publishing costs a step.
    let mut off = Synthetic::new(Box::new(NullSink));
    for _ in 0..POOL_BLOCKS / BLOCKS_PER_STEP {
        off.step();
    }
    let start = Instant::now();
    for _ in 0..steps {
        off.step();
    }
    let off_us = start.elapsed().as_secs_f64() * 1e6 / steps as f64;
    let on_us = engine_secs * 1e6 / steps as f64;
    println!(
        "  null sink: {off_us:.2} us/step; publishing adds {:.2} us per step with {} block events",
        on_us - off_us,
        BLOCKS_PER_STEP * 2
    );
    Ok(())
}

/// Runs the workload once on a fresh engine; returns wall seconds and engine steps' tokens.
fn engine_round(
    model_path: &str,
    events: bool,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<f64> {
    let loaded = model::load(std::path::Path::new(model_path)).context("loading the model")?;
    let metrics = metrics()?;
    let sink: Box<dyn KvEventSink> = if events {
        let (sink, endpoint) = publisher(metrics.clone())?;
        subscribe(&endpoint, Arc::new(Received::default()))?;
        Box::new(sink)
    } else {
        Box::new(NullSink)
    };
    let config = EngineConfig {
        block_size: BLOCK_SIZE,
        // Small enough that the workload evicts (BlockRemoved as well as BlockStored).
        num_blocks: 96,
        kv_dtype: kernels::KvDtype::F16,
        max_num_seqs: 256,
        max_num_batched_tokens: 2048,
        max_model_len: 512,
        enable_prefix_caching: true,
        hash_algo: HashAlgo::Sha256Cbor,
        hash_seed: None,
        log_requests: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let handle = engine::start(
        config,
        loaded.model,
        Arc::new(loaded.tokenizer),
        metrics,
        sink,
        None,
        rt.handle(),
    )?;
    let start = Instant::now();
    rt.block_on(async {
        let mut streams = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            streams.push(handle.generate(GenerateRequest {
                request_id: format!("b{i}"),
                prompt_token_ids: p.clone(),
                params,
                cache_salt: None,
                parent: None,
                pooling: None,
                kv_transfer_params: None,
            })?);
        }
        for mut s in streams {
            while s.recv().await.is_some() {}
        }
        anyhow::Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

fn real_engine(model_path: &str, rounds: usize) -> Result<()> {
    // 8 groups sharing a 48-token prefix, 4 requests each, 16 generated tokens.
    let prompts: Vec<Vec<u32>> = (0..32u32)
        .map(|i| {
            let group = i % 8;
            (0..48)
                .map(|t| 1000 + group * 97 + t)
                .chain((0..24).map(|t| 20000 + i * 31 + t))
                .collect()
        })
        .collect();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate the order so drift in machine load hits both sides.
        for events in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let secs = engine_round(model_path, events, &prompts, 16)?;
            if events {
                on.push(secs)
            } else {
                off.push(secs)
            }
        }
    }
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    println!("real engine, 32 requests x 16 tokens, 96-block pool, {rounds} rounds each:");
    println!("  events off: median {m_off:.3} s  (rounds {off:.3?})");
    println!("  events on:  median {m_on:.3} s  (rounds {on:.3?})");
    println!("  difference: {:+.2}%", (m_on / m_off - 1.0) * 100.0);
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    // cargo runs benches from the crate directory: default to the repository's model.
    let (mut model_path, mut seconds, mut rounds) = (
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .to_string(),
        3.0,
        5usize,
    );
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?,
            "--seconds" => seconds = args.next().context("--seconds S")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds R")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    synthetic(seconds)?;
    if std::path::Path::new(&model_path).is_file() {
        real_engine(&model_path, rounds)?;
    } else {
        println!("{model_path} not found: real-engine comparison skipped");
    }
    Ok(())
}
