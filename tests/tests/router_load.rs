//! Router acceptance 2: when one pod is saturated (requests waiting in its queue), new requests
//! without a prefix advantage go to the other pod.

use std::time::{Duration, Instant};

use e2e::cluster::{Pod, RouterProc};
use e2e::SERVED_MODEL;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pod_is_avoided() {
    // One sequence at a time per agent, so extra requests wait in its queue.
    let flags = ["--max-num-seqs", "1"];
    let (a, b) = tokio::join!(Pod::start(&flags), Pod::start(&flags));
    let router = RouterProc::start(&[
        "--pod".into(),
        a.spec("a", None),
        "--pod".into(),
        b.spec("b", None),
    ])
    .await;

    // Saturate pod a directly (not through the router): one long request runs, three wait.
    let long = json!({
        "model": SERVED_MODEL,
        "prompt": "Write a very long story about a lighthouse keeper.",
        "max_tokens": 2000,
        "ignore_eos": true,
    });
    let client = reqwest::Client::new();
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let req = client.post(a.url("/v1/completions")).json(&long).send();
        hogs.push(tokio::spawn(req));
    }
    // Until the router's scrape shows a's queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = router.metrics().await;
        if m.get("router_pod_queue", &[("pod", "a")]).unwrap_or(0.0) >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router never saw pod a's queue:\n{}",
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
