//! Issue 17 (1): a body near the size limit costs the router and the agent about its own size in
//! memory and a short time, whatever the prompt: a text that cannot fit the context is refused
//! before the tokenizer sees it (the router routes it by load and passes the pod's 400 on), and
//! one with `truncate_prompt_tokens` has only its tail tokenized. Before the fix a 60 MB prompt
//! took the router 38 s and 5.9 GB.

use std::time::{Duration, Instant};

use e2e::cluster::{pod_flags, Pod, RouterProc};
use e2e::{peak_rss_mib, SERVED_MODEL};
use serde_json::{json, Value};

/// Under both binaries' 64 MiB body limit.
const PROMPT_BYTES: usize = 60 << 20;
/// Peak memory may grow by a few copies of the body (the bytes as they arrive, the parsed
/// document, a typed copy of the prompt; about 5-6 here), never by the tokenizer's cost of
/// about 100 bytes a character (the router's 5.9 GB before the fix).
const MAX_GROWTH_MIB: f64 = 12.0 * (PROMPT_BYTES >> 20) as f64;
/// Generous for a loaded 2-core machine; the unbounded path took 38 s.
const MAX_SECONDS: u64 = 20;

fn cases(text: &str) -> Vec<(&'static str, &'static str, Value, u16)> {
    vec![
        (
            "completion",
            "/v1/completions",
            json!({"model": SERVED_MODEL, "prompt": text, "max_tokens": 1}),
            400,
        ),
        (
            "chat",
            "/v1/chat/completions",
            json!({"model": SERVED_MODEL, "max_tokens": 1,
                   "messages": [{"role": "user", "content": text}]}),
            400,
        ),
        (
            "truncated completion",
            "/v1/completions",
            json!({"model": SERVED_MODEL, "prompt": text, "max_tokens": 1,
                   "truncate_prompt_tokens": 16}),
            200,
        ),
    ]
}

async fn send(client: &reqwest::Client, url: &str, body: &[u8]) -> (u16, Value, Duration) {
    let start = Instant::now();
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_cost_their_size_not_the_tokenizers() {
    let pod = Pod::start(&[]).await;
    let router = RouterProc::start(&pod_flags([pod.spec("a", None)])).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let text = "a ".repeat(PROMPT_BYTES / 2);
    // Peaks since these baselines, over every case so far.
    let (router_base, agent_base) = (peak_rss_mib(router.pid()), peak_rss_mib(pod.pid()));

    for (name, path, body, status) in cases(&text) {
        let bytes = serde_json::to_vec(&body).unwrap();
        for (who, url, pid, base) in [
            ("agent", pod.url(path), pod.pid(), agent_base),
            ("router", router.url(path), router.pid(), router_base),
        ] {
            let (got, reply, took) = send(&client, &url, &bytes).await;
            let growth = peak_rss_mib(pid) - base;
            assert_eq!(got, status, "{name} via {who}: {reply}");
            if status == 400 {
                let message = reply["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("input characters"),
                    "{name} via {who}: {reply}"
                );
            }
            assert!(
                took < Duration::from_secs(MAX_SECONDS),
                "{name} via {who} took {took:?}"
            );
            assert!(
                growth < MAX_GROWTH_MIB,
                "{name} via {who}: peak memory grew by {growth:.0} MiB"
            );
            eprintln!("{name} via {who}: {got} in {took:?}, peak +{growth:.0} MiB");
        }
    }
    let health = client.get(router.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
