//! Acceptance 3: when the KV pool runs out, the scheduler preempts running requests and
//! recomputes them later; every request still produces exactly the output it produces without
//! memory pressure, and afterwards the pool is entirely free.

use std::time::{Duration, Instant};

use e2e::{choice_token_ids, greedy_all, Agent, LONG_TEXT};

const BLOCK_SIZE: usize = 16;
/// K and V, 30 layers, 16 tokens, 3 KV heads, head dim 64, float16 (the default storage).
const BYTES_PER_BLOCK: usize = 2 * 30 * BLOCK_SIZE * 3 * 64 * 2;
/// About two finished requests' worth (each needs up to 7 blocks).
const POOL_BLOCKS: usize = 16;
const MAX_MODEL_LEN: usize = 128;
const REQUESTS: usize = 8;
const MAX_TOKENS: usize = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_requests_match_unpressured_output() {
    let pool_bytes = (POOL_BLOCKS * BYTES_PER_BLOCK).to_string();
    let max_model_len = MAX_MODEL_LEN.to_string();
    let block_size = BLOCK_SIZE.to_string();
    let tight_flags = [
        "--block-size",
        &block_size,
        "--kv-cache-memory-bytes",
        &pool_bytes,
        "--max-model-len",
        &max_model_len,
    ];
    let roomy_flags = [
        "--block-size",
        &block_size,
        "--max-model-len",
        &max_model_len,
    ];
    let (tight, roomy) = tokio::join!(Agent::start(&tight_flags), Agent::start(&roomy_flags));

    // Prompts of 25..60 tokens cut from different places, so they share no prefix blocks.
    let text_ids = tight.tokenize(LONG_TEXT).await;
    let prompts: Vec<Vec<u32>> = (0..REQUESTS)
        .map(|i| {
            let start = i * 23 % (text_ids.len() - 60);
            text_ids[start..start + 25 + i * 5].to_vec()
        })
        .collect();
    assert!(prompts
        .iter()
        .all(|p| p.len() + MAX_TOKENS <= MAX_MODEL_LEN));

    // One after the other: both agents use every core.
    let started = Instant::now();
    let roomy_out = greedy_all(&roomy, &prompts, MAX_TOKENS).await;
    println!("unpressured agent: {:?}", started.elapsed());
    let started = Instant::now();
    let tight_out = greedy_all(&tight, &prompts, MAX_TOKENS).await;
    println!("pressured agent: {:?}", started.elapsed());

    let preemptions = tight.metrics().await.value("vllm:num_preemptions_total");
    assert!(
        preemptions > 0.0,
        "no preemption with a {POOL_BLOCKS}-block pool and {REQUESTS} concurrent requests"
    );
    for (i, (t, r)) in tight_out.iter().zip(&roomy_out).enumerate() {
        assert_eq!(
            t["choices"][0]["finish_reason"], "length",
            "request {i}: {t}"
        );
        assert_eq!(
            choice_token_ids(t),
            choice_token_ids(r),
            "request {i} differs under memory pressure ({preemptions} preemptions)"
        );
    }
    tight.wait_idle(Duration::from_secs(5)).await;
    roomy.wait_idle(Duration::from_secs(5)).await;
}
