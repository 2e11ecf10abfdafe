//! Acceptance 2: a request that shares a prefix of full blocks with an earlier one reuses their
//! KV (reported in `usage.prompt_tokens_details.cached_tokens` and the prefix-cache counters),
//! and still generates exactly what an agent without prefix caching generates.

use e2e::{choice_token_ids, greedy_ids_request, Agent, Metrics, LONG_TEXT};
use serde_json::Value;

const BLOCK_SIZE: usize = 16;
const SHARED_BLOCKS: usize = 10;
const MAX_TOKENS: usize = 16;

fn counter_delta(before: &Metrics, after: &Metrics, name: &str) -> f64 {
    after.value(name) - before.value(name)
}

fn cached_tokens(resp: &Value) -> u64 {
    resp["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens in {resp}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_is_served_from_cache_with_identical_output() {
    let block_size = BLOCK_SIZE.to_string();
    let warm_flags = [
        "--block-size",
        &block_size,
        "--enable-prompt-tokens-details",
    ];
    let cold_flags = [
        "--block-size",
        &block_size,
        "--enable-prompt-tokens-details",
        "--no-enable-prefix-caching",
    ];
    let (warm, cold) = tokio::join!(Agent::start(&warm_flags), Agent::start(&cold_flags));

    let text_ids = warm.tokenize(LONG_TEXT).await;
    let shared = SHARED_BLOCKS * BLOCK_SIZE;
    assert!(
        text_ids.len() >= shared,
        "LONG_TEXT is only {} tokens",
        text_ids.len()
    );
    let prefix = &text_ids[..shared];
    let suffix_a = warm
        .tokenize("\n\nQuestion: how were the first machines programmed?")
        .await;
    let suffix_b = warm
        .tokenize("\n\nIn one sentence, the text says that")
        .await;
    let prompt_a = [prefix, &suffix_a[..]].concat();
    let prompt_b = [prefix, &suffix_b[..]].concat();
    assert_ne!(
        suffix_a.len() % BLOCK_SIZE,
        0,
        "the suffix should leave a partial block"
    );

    let m0 = warm.metrics().await;
    let warm_a = warm
        .post_ok(
            "/v1/completions",
            &greedy_ids_request(&prompt_a, MAX_TOKENS),
        )
        .await;
    let m1 = warm.metrics().await;
    let warm_b = warm
        .post_ok(
            "/v1/completions",
            &greedy_ids_request(&prompt_b, MAX_TOKENS),
        )
        .await;
    let m2 = warm.metrics().await;

    // The first request finds nothing; the second finds exactly the shared full blocks.
    assert_eq!(cached_tokens(&warm_a), 0, "first request: {warm_a}");
    assert_eq!(warm_a["usage"]["prompt_tokens"], prompt_a.len());
    assert_eq!(
        cached_tokens(&warm_b),
        shared as u64,
        "second request: {warm_b}"
    );
    assert_eq!(warm_b["usage"]["prompt_tokens"], prompt_b.len());

    assert_eq!(counter_delta(&m0, &m1, "vllm:prefix_cache_hits_total"), 0.0);
    assert_eq!(
        counter_delta(&m0, &m1, "vllm:prefix_cache_queries_total"),
        prompt_a.len() as f64
    );
    assert_eq!(
        counter_delta(&m1, &m2, "vllm:prefix_cache_hits_total"),
        shared as f64,
        "prefix cache hits for the second request"
    );
    assert_eq!(
        counter_delta(&m1, &m2, "vllm:prefix_cache_queries_total"),
        prompt_b.len() as f64
    );
    // As in vLLM, `prompt_tokens_total` counts every prompt token; what was actually computed
    // is that minus the hits: only the suffix.
    let prompt_b_tokens = counter_delta(&m1, &m2, "vllm:prompt_tokens_total");
    assert_eq!(prompt_b_tokens, prompt_b.len() as f64);
    let computed = prompt_b_tokens - counter_delta(&m1, &m2, "vllm:prefix_cache_hits_total");
    assert_eq!(
        computed,
        suffix_b.len() as f64,
        "tokens computed for the second request"
    );

    // Cold runs of the same prompts on an agent without prefix caching.
    let cold_a = cold
        .post_ok(
            "/v1/completions",
            &greedy_ids_request(&prompt_a, MAX_TOKENS),
        )
        .await;
    let cold_b = cold
        .post_ok(
            "/v1/completions",
            &greedy_ids_request(&prompt_b, MAX_TOKENS),
        )
        .await;
    assert_eq!(cached_tokens(&cold_b), 0, "cold agent: {cold_b}");
    assert_eq!(
        cold.metrics().await.value("vllm:prefix_cache_hits_total"),
        0.0
    );
    assert_eq!(
        choice_token_ids(&warm_a),
        choice_token_ids(&cold_a),
        "first request output"
    );
    assert_eq!(
        choice_token_ids(&warm_b),
        choice_token_ids(&cold_b),
        "output with a cached prefix differs from the cold output"
    );
}
