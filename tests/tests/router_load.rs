//! Router acceptance 2: when one pod is saturated (requests waiting in its queue), new requests
//! without a prefix advantage go to the other pod.

use e2e::cluster::{long_completion, pods_behind_router};
use e2e::SERVED_MODEL;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pod_is_avoided() {
    // One sequence at a time per agent, so extra requests wait in its queue.
    let flags = ["--max-num-seqs", "1"];
    let (a, _b, router) = pods_behind_router(&flags).await;

    // Saturate pod a directly (not through the router): one long request runs, three wait.
    let long = long_completion();
    let client = reqwest::Client::new();
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let req = client.post(a.url("/v1/completions")).json(&long).send();
        hogs.push(tokio::spawn(req));
    }
    // Until the router's scrape shows a's queue.
    router
        .wait_for("pod a's queue", |m| {
            m.get("router_pod_queue", &[("pod", "a")]).unwrap_or(0.0) >= 2.0
        })
        .await;

    for i in 0..6 {
        let body = json!({
            "model": SERVED_MODEL,
            "prompt": format!("Request {i}: name a colour that starts with the letter {}.", (b'a' + i) as char),
            "max_tokens": 2,
        });
        let pod = router.post_ok("/v1/completions", &body).await;
        assert_eq!(pod, "b", "request {i} went to the saturated pod");
    }
    for h in hogs {
        h.abort();
    }
}
