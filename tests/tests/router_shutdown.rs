//! Issue 21: SIGTERM (what Kubernetes sends) stops the router as it stops the agent: it stops
//! accepting, the stream in flight runs to its `[DONE]`, and then the process exits cleanly.

use std::time::Duration;

use e2e::cluster::{pod_flags, Pod, RouterProc};
use e2e::sse::{Event, SseStream};
use e2e::SERVED_MODEL;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_stream_in_flight_finish_then_exits() {
    let pod = Pod::start(&[]).await;
    let mut router = RouterProc::start(&pod_flags([pod.spec("a", None)])).await;
    let body = json!({
        "model": SERVED_MODEL,
        "prompt": "Write a story about a lighthouse keeper.",
        "max_tokens": 64,
        "ignore_eos": true,
        "stream": true,
    });
    let resp = router
        .client()
        .post(router.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("a stream through the router");
    let mut stream = SseStream::new(resp);
    let mut chunks = 0;
    while chunks < 2 {
        match stream.next().await {
            Ok(Some(Event::Json(_))) => chunks += 1,
            other => panic!("before SIGTERM: {other:?}\n{}", router.log()),
        }
    }
    router.terminate();
    // New connections are refused once the signal is handled.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", router.port))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "still accepting 2 s after SIGTERM\n{}",
        router.log()
    );
    let done = loop {
        match stream.next().await {
            Ok(Some(Event::Json(_))) => chunks += 1,
            Ok(Some(Event::Done)) => break true,
            Ok(None) => break false,
            Err(e) => panic!("the stream broke after SIGTERM: {e}\n{}", router.log()),
        }
    };
    assert!(
        done,
        "the stream ended without [DONE] after {chunks} chunks\n{}",
        router.log()
    );
    // 64 tokens, one chunk each.
    assert_eq!(chunks, 64, "{}", router.log());
    let status = router.exited_within(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "router exit after the stream: {status:?}\n{}",
        router.log()
    );
}
