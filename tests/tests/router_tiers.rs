//! Issue 18 acceptance 5: the router prefers the pod whose lower tiers hold a prompt's prefix.
//! CPU tier: a prompt is routed to pod X, pushed out of X's small device pool by traffic sent to
//! X directly, and asked again through the router: only X's CPU tier (events with medium CPU,
//! weighted 0.8) still holds it, and the router both matches those blocks and picks X. Storage
//! groups: a pod that shares a storage folder with the one that computed a prompt wins it.

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

/// The CPU and storage tiers of llm-d's tiered-prefix-cache guide over the folder `root`.
fn tiered(root: &std::path::Path) -> Vec<String> {
    let config = json!({
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": 200 * 368_640,
            "secondary_tiers": [{"type": "fs", "root_dir": root, "n_read_threads": 2,
                                 "n_write_threads": 2}],
        },
    });
    let mut flags: Vec<String> = DEVICE[..4].iter().map(|s| s.to_string()).collect();
    flags.extend([
        "--enable-prompt-tokens-details".into(),
        "--kv-transfer-config".into(),
        config.to_string(),
    ]);
    flags
}

/// Acceptance 5, storage half: pods a and b mount one storage folder and are one storage
/// group for the router; c has no tiers. a serves a prompt (writing its blocks to the folder)
/// and dies; the prompt, asked through the router, goes to b, which never saw it, rather than
/// to c, and b serves it from the shared files with a's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_group_member_wins_a_prefix_another_member_wrote() {
    let root = tempfile::tempdir().expect("a temp dir");
    let flags = tiered(root.path());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (mut a, b, c) = tokio::join!(
        Pod::start(&flags),
        Pod::start(&flags),
        Pod::start(&DEVICE[..4])
    );
    let router = RouterProc::start(&pod_flags([
        format!("{},storage=shared", a.spec("a", None)),
        format!("{},storage=shared", b.spec("b", None)),
        c.spec("c", None),
    ]))
    .await;
    let mut body = prompt(3);
    body["max_tokens"] = json!(8);
    let cold = a.post("/v1/completions", &body).await;
    assert_eq!(cold.status, 200, "{}", cold.body);
    // The files are announced as the writes finish, also once the engine is idle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let tiers = a.debug_kv_cache().await;
        if tiers["tiers"]["STORAGE"]["num_cached_blocks"].as_u64() >= Some(93) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a never announced its files: {tiers}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    router_caught_up(&router, &a, "a").await;
    a.kill();
    router
        .wait_for("a to be seen down", |m| {
            m.get("router_pod_healthy", &[("pod", "a")]) == Some(0.0)
        })
        .await;
    let (pod, hit_blocks) = router.post_matched("/v1/completions", &body).await;
    assert_eq!(pod, "b", "the storage group's other member lost the prefix");
    assert!(hit_blocks >= 90.0, "matched {hit_blocks} blocks");
    let again = b.post("/v1/completions", &body).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        again.body["choices"][0]["text"], cold.body["choices"][0]["text"],
        "b's output from the shared files differs from a's"
    );
    let loaded = b.metrics().await.value("agent_kv_offload_hit_tokens_total");
    assert!(
        loaded >= 1400.0,
        "b reloaded {loaded} tokens from the files"
    );
}
