//! Issue 18 acceptance 5 (CPU tier): the router prefers the pod whose CPU tier holds a prompt's
//! prefix over a pod with nothing. A prompt is routed to pod X, pushed out of X's small device
//! pool by traffic sent to X directly, and asked again through the router: only X's CPU tier
//! (events with medium CPU, weighted 0.8) still holds it, and the router both matches those
//! blocks and picks X.

use e2e::cluster::{pod_events, pod_flags, Pod, RouterProc};
use e2e::SERVED_MODEL;
use serde_json::{json, Value};

/// 120 blocks of 368,640 bytes: one 1,500-token prompt at a time.
const DEVICE: [&str; 6] = [
    "--kv-cache-memory-bytes",
    "44236800",
    "--max-model-len",
    "1800",
    "--kv-offloading-size",
    "0.25",
];

fn prompt(seed: u32) -> Value {
    let tokens: Vec<u32> = (0..1500u32)
        .map(|i| 100 + (i.wrapping_mul(7919).wrapping_add(seed * 104_729)) % 39_000)
        .collect();
    json!({"model": SERVED_MODEL, "prompt": tokens, "max_tokens": 1, "temperature": 0.0})
}

/// Until the router has applied every batch `pod` (named `name`) published.
async fn router_caught_up(router: &RouterProc, pod: &Pod, name: &str) {
    let published = pod
        .metrics()
        .await
        .value("agent_kv_events_published_batches_total");
    router
        .wait_for("the pod's batches", |m| {
            pod_events(m, name, "batches") >= published
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_in_a_pods_cpu_tier_wins_it() {
    let (a, b) = tokio::join!(Pod::start(&DEVICE), Pod::start(&DEVICE));
    let router = RouterProc::start(&pod_flags([a.spec("a", None), b.spec("b", None)])).await;
    let target = router.post_ok("/v1/completions", &prompt(0)).await;
    let x = if target == "a" { &a } else { &b };
    // Two other long prompts straight to X evict the first from its device pool.
    for seed in [1, 2] {
        let r = x.post("/v1/completions", &prompt(seed)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    router_caught_up(&router, x, &target).await;
    let (again, hit_blocks) = router.post_matched("/v1/completions", &prompt(0)).await;
    assert_eq!(
        again, target,
        "the pod holding the prefix in its CPU tier lost it"
    );
    // 93 full blocks, weighted 0.8 on the CPU tier, all matched (none left on the device).
    assert!(hit_blocks >= 90.0, "matched {hit_blocks} blocks");
    let cached = x.metrics().await.value("agent_kv_offload_hit_tokens_total");
    assert!(
        cached >= 1400.0,
        "the pod reloaded {cached} tokens from its CPU tier"
    );
}
