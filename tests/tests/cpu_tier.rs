//! Issue 18 (CPU tier) under pressure: preempted requests are re-admitted with their prompt
//! blocks reloaded from the CPU tier and still produce exactly the unpressured output; a client
//! that goes away mid-stream leaves no block in use; afterwards the device pool is free and the
//! tier holds at most its capacity (acceptance 6 for the device and CPU tiers).

use std::time::Duration;

use e2e::{choice_token_ids, greedy_all, Agent, LONG_TEXT, SERVED_MODEL};
use futures::StreamExt;
use serde_json::json;

/// K and V, 30 layers, 16 tokens, 3 KV heads, head dim 64, float16.
const BYTES_PER_BLOCK: usize = 368_640;
const MAX_TOKENS: usize = 48;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_requests_reload_from_the_cpu_tier_with_the_same_output() {
    let pool = (16 * BYTES_PER_BLOCK).to_string();
    // A tier of 40 blocks: smaller than the workload's blocks, so it evicts too.
    let tier = (40.0 * BYTES_PER_BLOCK as f64 / (1u64 << 30) as f64).to_string();
    let tight = [
        "--kv-cache-memory-bytes",
        &pool,
        "--max-model-len",
        "128",
        "--kv-offloading-size",
        &tier,
    ];
    let (tight, roomy) = tokio::join!(
        Agent::start(&tight),
        Agent::start(&["--max-model-len", "128"])
    );
    let ids = tight.tokenize(LONG_TEXT).await;
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            let start = i * 23 % (ids.len() - 60);
            ids[start..start + 40 + i * 3].to_vec()
        })
        .collect();
    let roomy_out = greedy_all(&roomy, &prompts, MAX_TOKENS).await;
    let tight_out = greedy_all(&tight, &prompts, MAX_TOKENS).await;
    let m = tight.metrics().await;
    assert!(m.value("vllm:num_preemptions_total") > 0.0, "no preemption");
    assert!(
        m.value("agent_kv_offload_hit_tokens_total") > 0.0,
        "no re-admitted request reloaded from the tier"
    );
    for (i, (t, r)) in tight_out.iter().zip(&roomy_out).enumerate() {
        assert_eq!(choice_token_ids(t), choice_token_ids(r), "request {i}");
    }

    // A stream dropped mid-way leaves nothing in use.
    let body = json!({"model": SERVED_MODEL, "prompt": prompts[0], "max_tokens": 80,
                      "ignore_eos": true, "stream": true});
    let resp = tight
        .client()
        .post(tight.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = resp.bytes_stream();
    for _ in 0..3 {
        chunks.next().await;
    }
    drop(chunks);
    let idle = tight.wait_idle(Duration::from_secs(10)).await;
    let usage = idle.value("vllm:kv_offload_cpu_cache_usage_perc");
    assert!(usage > 0.0 && usage <= 1.0, "CPU tier usage {usage}");
    let cached = tight.get("/debug/kv_cache").await.body;
    assert!(
        cached["tiers"]["CPU"]["num_cached_blocks"].as_u64() <= Some(40),
        "{cached}"
    );
}
