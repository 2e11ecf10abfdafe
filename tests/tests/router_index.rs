//! Router acceptance 5: the router's prefix index, fed the KV events of a real agent run (with
//! evictions), scores prompts exactly as a brute-force recomputation from the agent's cached
//! blocks (`GET /debug/kv_cache`): the agent's own block hashes of each prompt, and the run of
//! leading ones the agent holds.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::cluster::Pod;
use e2e::{LONG_TEXT, SERVED_MODEL};
use kvcache::{BlockHasher, HashAlgo};
use router::events::{EventIngest, IngestConfig, PodEndpoints};
use router::index::{IndexConfig, PrefixIndex};
use serde_json::json;

const BLOCK_SIZE: usize = 16;
/// 24 blocks (368,640 bytes each in float16): the run below stores more than that, so blocks
/// get evicted.
const KV_BYTES: &str = "8847360";

/// Leading blocks of `tokens` whose agent hash is in `cached`.
fn brute_force(hasher: &BlockHasher, cached: &HashSet<u64>, tokens: &[u32]) -> usize {
    let mut hashes = Vec::new();
    hasher.extend_request_hashes(&mut hashes, tokens, BLOCK_SIZE, None);
    hashes
        .iter()
        .take_while(|h| cached.contains(&h.to_u64()))
        .count()
}

fn indexed(index: &PrefixIndex, tokens: &[u32]) -> (usize, f64) {
    let keys = index.block_keys(tokens, None);
    index
        .longest_prefix(&keys)
        .into_iter()
        .find(|m| &*m.pod == "a")
        .map_or((0, 0.0), |m| (m.blocks, m.score))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_matches_brute_force_over_cached_blocks() {
    let pod = Pod::start(&[
        "--kv-cache-memory-bytes",
        KV_BYTES,
        "--max-model-len",
        "384",
        "--prefix-caching-hash-algo",
        "sha256_cbor",
    ])
    .await;
    let index = Arc::new(
        PrefixIndex::new(IndexConfig {
            block_size: BLOCK_SIZE,
            ..IndexConfig::new(SERVED_MODEL)
        })
        .expect("index config"),
    );
    let ingest = EventIngest::start(index.clone(), IngestConfig::default());
    ingest
        .add_pod(
            "a",
            PodEndpoints {
                events: Some(format!("tcp://127.0.0.1:{}", pod.events)),
                replay: Some(format!("tcp://127.0.0.1:{}", pod.replay)),
                topic_names: Vec::new(),
            },
        )
        .expect("subscribing to the agent");

    // Token prompts: families sharing prefixes of different lengths, more than the cache holds.
    let base: Vec<u32> = {
        let r = pod
            .post(
                "/tokenize",
                &json!({"model": SERVED_MODEL, "prompt": LONG_TEXT}),
            )
            .await;
        e2e::token_ids(&r.body["tokens"])
    };
    assert!(base.len() >= 200, "LONG_TEXT is only {} tokens", base.len());
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for family in 0..4u32 {
        for variant in 0..3usize {
            let mut p = vec![1000 + family];
            p.extend_from_slice(&base[..40 + 50 * variant]);
            p.push(2000 + variant as u32);
            prompts.push(p);
        }
    }
    for p in &prompts {
        let body = json!({"model": SERVED_MODEL, "prompt": p, "max_tokens": 3, "ignore_eos": true});
        let r = pod.post("/v1/completions", &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, None);
    // Probes: every prompt, and prefixes of them cut mid-block.
    let probes: Vec<&[u32]> = prompts
        .iter()
        .flat_map(|p| [&p[..], &p[..p.len() * 2 / 3]])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cached = pod.cached_block_hashes().await;
        let expected: Vec<usize> = probes
            .iter()
            .map(|t| brute_force(&hasher, &cached, t))
            .collect();
        let got: Vec<(usize, f64)> = probes.iter().map(|t| indexed(&index, t)).collect();
        let blocks: Vec<usize> = got.iter().map(|g| g.0).collect();
        // The agent's cache shows a block before its event reaches the index: wait for both
        // the probes and the index's whole block count to agree.
        let indexed_blocks = index.stats().engine_hashes;
        if blocks == expected && indexed_blocks == cached.len() {
            for ((n, score), t) in got.iter().zip(&probes) {
                let total = t.len() / BLOCK_SIZE;
                assert!((score - *n as f64 / total as f64).abs() < 1e-12);
            }
            let stats = index.stats();
            println!(
                "{} probes agree; agent caches {} blocks, index holds {} keys ({} unresolved)",
                probes.len(),
                cached.len(),
                stats.keys,
                stats.unresolved_blocks
            );
            assert!(
                expected.iter().any(|&n| n > 0) && expected.iter().any(|&n| n == 0),
                "the probes should include hits and misses: {expected:?}"
            );
            assert_eq!(stats.engine_hashes, cached.len());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "index disagrees with the agent's cache:\n  brute force {expected:?}\n  index       \
             {blocks:?}\n  blocks: agent {}, index {indexed_blocks}\nagent log:\n{}",
            cached.len(),
            pod.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
