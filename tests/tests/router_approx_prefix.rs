//! Issue 21: the Inference Gateway's approximate `prefix-cache-scorer` (llm-d's CPU-tier guide,
//! with `lruCapacityPerServer` and `single-profile-handler`) in front of two agents that publish
//! no KV events: the router learns prefixes from its own routing, so every request of a
//! shared-prefix group lands on the pod that served the group's first one, and those pods hit
//! their prefix caches (also when the group's last request comes through `/v1/responses`).
//! The parameters the router does not read are logged with why.

use std::collections::HashMap;

use e2e::cluster::{pod_flags, RouterProc};
use e2e::{Agent, Metrics, LONG_TEXT, SERVED_MODEL};
use serde_json::{json, Value};

const GROUPS: usize = 4;
const PER_GROUP: usize = 4;

const CONFIG: &str = "\
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: max-score-picker}
";

fn chat(group: usize, i: usize) -> Value {
    let start = group * 50;
    json!({
        "model": SERVED_MODEL,
        "messages": [
            {"role": "system", "content": format!("[group {group}] {}", &LONG_TEXT[start..start + 400])},
            {"role": "user", "content": format!("Question {i}.")},
        ],
        "max_tokens": 2,
        "temperature": 0.0,
    })
}

/// The same conversation as a Responses API request.
fn as_response(chat: &Value) -> Value {
    json!({
        "model": SERVED_MODEL,
        "instructions": chat["messages"][0]["content"],
        "input": [chat["messages"][1]],
        "max_output_tokens": 2,
        "temperature": 0.0,
    })
}

fn hits(m: &Metrics) -> f64 {
    m.value("vllm:prefix_cache_hits_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_stay_on_one_pod_without_events() {
    let (a, b) = tokio::join!(Agent::start(&[]), Agent::start(&[]));
    let dir = std::env::temp_dir().join(format!("e2e-approx-prefix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("epp.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut args = pod_flags([format!("a={}", a.base_url()), format!("b={}", b.base_url())]);
    args.extend(["--config".to_string(), config.display().to_string()]);
    let router = RouterProc::start(&args).await;

    let before = [a.metrics().await, b.metrics().await];
    // Round by round, so every group's later requests come after its first was routed.
    let mut served: HashMap<usize, Vec<String>> = HashMap::new();
    for i in 0..PER_GROUP {
        for group in 0..GROUPS {
            // The last round asks through the Responses API: the router reads it as the chat
            // it amounts to, so it shares the group's prefix too.
            let pod = if i + 1 == PER_GROUP {
                router
                    .post_ok("/v1/responses", &as_response(&chat(group, i)))
                    .await
            } else {
                router
                    .post_ok("/v1/chat/completions", &chat(group, i))
                    .await
            };
            served.entry(group).or_default().push(pod);
        }
    }
    for (group, pods) in &served {
        assert!(
            pods.iter().all(|p| *p == pods[0]),
            "group {group} was split across pods: {pods:?}"
        );
    }
    // The pods really reused the prefixes the router guessed they hold.
    let after = [a.metrics().await, b.metrics().await];
    let gained: f64 = (0..2).map(|i| hits(&after[i]) - hits(&before[i])).sum();
    let expected = (GROUPS * (PER_GROUP - 1) * 16) as f64;
    assert!(
        gained >= expected,
        "prefix cache hits grew by {gained} tokens, expected at least {expected}"
    );
    let log = router.log();
    assert!(
        log.contains("prefix-cache-scorer parameter hashBlockSize ignored"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
