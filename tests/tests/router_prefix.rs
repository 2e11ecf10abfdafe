//! Router acceptance 1: on a workload of groups of chat requests sharing long group prefixes,
//! sent in shuffled order through the router to two agents, the prefix-aware profile keeps
//! every group on the pod that served its first request, and the agents' summed prefix-cache
//! hit rate is far higher than with round-robin on the same workload.
//!
//! The agents' KV caches hold about half of the groups' prefixes each: prefix-aware routing
//! splits the groups between the pods and keeps hitting; round-robin sends every group to both
//! pods, which then evict each other's prefixes (and miss once per pod per group anyway).
//!
//! Also: requests with a `cache_salt` match only blocks stored under the same salt (the agent
//! keys the first block with it, and so does the router), and the router reports each pod's
//! event stream on its own.

use std::collections::HashMap;

use e2e::cluster::{counter_delta, pod_events, pod_flags, Pod, RouterProc};
use e2e::{Metrics, LONG_TEXT, SERVED_MODEL};
use serde_json::{json, Value};

const GROUPS: usize = 6;
const PER_GROUP: usize = 5;
/// 32 blocks of 16 tokens (368,640 bytes each for this model in float16): room for three of the
/// ~9-block group prefixes plus the running request, not for six.
const KV_BYTES: &str = "11796480";

/// A group's shared system prompt (distinct per phase, so the phases never share blocks).
fn group_prefix(phase: &str, group: usize) -> String {
    let start = group * 40;
    format!(
        "[{phase} corpus, document {group}] {}",
        &LONG_TEXT[start..start + 560]
    )
}

fn chat(phase: &str, group: usize, i: usize) -> Value {
    json!({
        "model": SERVED_MODEL,
        "messages": [
            {"role": "system", "content": group_prefix(phase, group)},
            {"role": "user", "content": format!("Question {i}: summarise sentence {i}.")},
        ],
        "max_tokens": 4,
        "temperature": 0.0,
        "ignore_eos": true,
    })
}

/// Salted requests share cached prefixes with their own salt only.
async fn salted_requests_match_their_salt_only(router: &RouterProc) {
    let salted = |salt: &str, i: usize| {
        let mut body = chat("salt", 0, i);
        body["cache_salt"] = json!(salt);
        body
    };
    let batches = |m: &Metrics, pod: &str| pod_events(m, pod, "batches");
    let before = router.metrics().await;
    let (first, hit) = router
        .post_matched("/v1/chat/completions", &salted("tenant-1", 0))
        .await;
    assert_eq!(hit, 0.0, "a new salted prefix matched");
    // Until the router has the first request's blocks (its pod's next event batch).
    router
        .wait_for("the salted blocks' events", |m| {
            batches(m, &first) > batches(&before, &first)
        })
        .await;
    let (second, hit) = router
        .post_matched("/v1/chat/completions", &salted("tenant-1", 1))
        .await;
    assert_eq!(second, first, "same salt and prefix went to another pod");
    assert!(hit > 0.0, "same salt matched no block");
    let (_, hit) = router
        .post_matched("/v1/chat/completions", &salted("tenant-2", 2))
        .await;
    assert_eq!(hit, 0.0, "another salt matched the tenant-1 blocks");
    let (_, hit) = router
        .post_matched("/v1/chat/completions", &chat("salt", 0, 3))
        .await;
    assert_eq!(hit, 0.0, "an unsalted request matched salted blocks");
    // Each pod's event stream is reported on its own.
    let m = router.metrics().await;
    for pod in ["a", "b"] {
        assert!(
            batches(&m, pod) > 0.0,
            "no event batches counted for pod {pod}"
        );
        assert!(
            m.get("router_pod_event_lag_seconds", &[("pod", pod)])
                .is_some(),
            "no event lag for pod {pod}"
        );
    }
}

/// The workload: first requests of groups in concurrent pairs (as concurrent arrivals do, so
/// load spreads the groups), then the rest in a fixed shuffled order.
fn schedule() -> (Vec<[usize; 2]>, Vec<(usize, usize)>) {
    let firsts = (0..GROUPS / 2).map(|p| [2 * p, 2 * p + 1]).collect();
    let mut rest: Vec<(usize, usize)> = (0..GROUPS)
        .flat_map(|g| (1..PER_GROUP).map(move |i| (g, i)))
        .collect();
    // A fixed permutation (multiplicative step coprime with the length).
    let n = rest.len();
    let step = (1..n)
        .rev()
        .find(|s| gcd(*s, n) == 1 && *s > n / 3)
        .unwrap_or(1);
    rest = (0..n).map(|k| rest[(k * step) % n]).collect();
    (firsts, rest)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Runs the workload through `router`; returns each request's pod by group and the agents'
/// hit rate over the run.
async fn run(
    router: &RouterProc,
    pods: &[&Pod],
    phase: &str,
) -> (HashMap<usize, Vec<String>>, f64) {
    let before: Vec<Metrics> = futures::future::join_all(pods.iter().map(|p| p.metrics())).await;
    let mut served: HashMap<usize, Vec<String>> = HashMap::new();
    let (firsts, rest) = schedule();
    for [a, b] in firsts {
        let (ra, rb) = (chat(phase, a, 0), chat(phase, b, 0));
        let (pa, pb) = tokio::join!(
            router.post_ok("/v1/chat/completions", &ra),
            router.post_ok("/v1/chat/completions", &rb),
        );
        served.entry(a).or_default().push(pa);
        served.entry(b).or_default().push(pb);
    }
    for (g, i) in rest {
        let pod = router
            .post_ok("/v1/chat/completions", &chat(phase, g, i))
            .await;
        served.entry(g).or_default().push(pod);
    }
    let after: Vec<Metrics> = futures::future::join_all(pods.iter().map(|p| p.metrics())).await;
    let hits = counter_delta(&before, &after, "vllm:prefix_cache_hits_total");
    let queries = counter_delta(&before, &after, "vllm:prefix_cache_queries_total");
    assert!(queries > 0.0, "no prefix cache queries counted");
    (served, hits / queries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_aware_routing_beats_round_robin() {
    let flags = [
        "--kv-cache-memory-bytes",
        KV_BYTES,
        "--max-model-len",
        "512",
    ];
    let (a, b) = tokio::join!(Pod::start(&flags), Pod::start(&flags));
    let router_args = |policy: &str| -> Vec<String> {
        let mut v = vec!["--policy".to_string(), policy.to_string()];
        v.extend(pod_flags([a.spec("a", None), b.spec("b", None)]));
        v
    };
    let aware = RouterProc::start(&router_args("prefix-aware")).await;
    let (served, aware_rate) = run(&aware, &[&a, &b], "aware").await;
    for (g, pods) in &served {
        assert!(
            pods.iter().all(|p| p == &pods[0]),
            "group {g} was not kept on one pod: {pods:?} (all groups: {served:?})\nrouter log:\n{}",
            aware.log()
        );
    }
    let on_a = served.values().filter(|p| p[0] == "a").count();
    let m = aware.metrics().await;
    let hit_blocks = m.value("router_prefix_hit_blocks_sum");
    salted_requests_match_their_salt_only(&aware).await;
    drop(aware);

    let rr = RouterProc::start(&router_args("round-robin")).await;
    let (rr_served, rr_rate) = run(&rr, &[&a, &b], "rr").await;
    let split = rr_served
        .values()
        .filter(|p| p.iter().any(|x| x != &p[0]))
        .count();
    println!(
        "prefix cache hit rate (hits/queries, both agents): prefix-aware {aware_rate:.3} \
         (groups on pod a: {on_a}/{GROUPS}, router-matched blocks {hit_blocks}), round-robin \
         {rr_rate:.3} ({split}/{GROUPS} groups split over both pods)"
    );
    assert!(
        hit_blocks > 0.0,
        "the router never saw a prefix match: {hit_blocks}"
    );
    assert!(
        aware_rate > 0.5 && aware_rate > 1.5 * rr_rate,
        "prefix-aware {aware_rate:.3} should be far above round-robin {rr_rate:.3}"
    );
}
