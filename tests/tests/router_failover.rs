//! Router acceptance 4: a pod killed mid-run: every request still succeeds (those in flight on
//! the killed pod are retried on the other one, as no byte had reached the client yet), and
//! the router stops choosing the dead pod. Also: a client that drops a stream through the
//! router aborts the request on the pod, and streams a pod cuts by dying end with an error event
//! and `[DONE]` (issue 17, 6).

use std::time::{Duration, Instant};

use e2e::cluster::{long_completion, pod_flags, pods_behind_router, Pod, RouterProc};
use e2e::sse::{Event, SseStream};
use e2e::SERVED_MODEL;
use serde_json::json;

const REQUESTS: usize = 16;

/// A long streamed completion through the router, its head received.
async fn long_stream(router: &RouterProc) -> reqwest::Response {
    let mut long = long_completion();
    long["stream"] = json!(true);
    router
        .client()
        .post(router.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .expect("streaming request through the router")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pod_does_not_fail_requests() {
    let (mut a, b, router) = pods_behind_router(&[]).await;

    // A dropped stream through the router frees the pod.
    let resp = long_stream(&router).await;
    let pod = resp
        .headers()
        .get("x-router-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("x-router-pod");
    let mut stream = SseStream::new(resp);
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Ok(Some(Event::Json(_)))));
    }
    drop(stream);
    let target = if pod == "a" { &a } else { &b };
    let deadline = Instant::now() + Duration::from_secs(5);
    while target.metrics().await.value("vllm:num_requests_running") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the pod still runs the dropped stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two clients send requests while pod a is killed after a few of them.
    let body = |i: usize| {
        json!({
            "model": SERVED_MODEL,
            "prompt": format!("Request {i}: tell me about the number {i}."),
            "max_tokens": 24,
            "ignore_eos": true,
        })
    };
    let router = &router;
    let worker = |w: usize| async move {
        let mut pods = Vec::new();
        for i in (w..REQUESTS).step_by(2) {
            let r = router.post("/v1/completions", &body(i)).await;
            assert_eq!(
                r.reply.status,
                200,
                "request {i} failed: {}\nrouter log:\n{}",
                r.reply.body,
                router.log()
            );
            pods.push(r.pod.unwrap_or_default());
        }
        pods
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        a.kill();
    };
    let (p0, p1, ()) = tokio::join!(worker(0), worker(1), killer);
    let served: Vec<String> = p0.into_iter().chain(p1).collect();
    assert_eq!(served.len(), REQUESTS);
    println!("served by: {served:?}");
    assert!(served.iter().any(|p| p == "b"));
    // After the kill, new requests go to b.
    for i in 0..4 {
        let pod = router.post_ok("/v1/completions", &body(100 + i)).await;
        assert_eq!(pod, "b");
    }
    let m = router.metrics().await;
    assert_eq!(m.get("router_pod_healthy", &[("pod", "a")]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_a_dying_pod_end_with_an_error_event() {
    const STREAMS: usize = 4;
    let mut pod = Pod::start(&[]).await;
    let router = RouterProc::start(&pod_flags([pod.spec("a", None)])).await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let resp = long_stream(&router).await;
        assert_eq!(resp.status().as_u16(), 200);
        let mut stream = SseStream::new(resp);
        for _ in 0..2 {
            assert!(matches!(stream.next().await, Ok(Some(Event::Json(_)))));
        }
        streams.push(stream);
    }
    pod.kill();
    for (i, stream) in streams.into_iter().enumerate() {
        let events = stream
            .collect()
            .await
            .unwrap_or_else(|e| panic!("stream {i} was cut without an ending: {e}"));
        let n = events.len();
        assert!(n >= 2, "stream {i}: {events:?}");
        assert_eq!(events[n - 1], Event::Done, "stream {i}");
        let Event::Json(error) = &events[n - 2] else {
            panic!("stream {i}: no error event before [DONE]: {events:?}");
        };
        assert_eq!(error["error"]["code"], json!(500), "stream {i}: {error}");
        assert_eq!(error["error"]["type"], json!("InternalServerError"));
    }
    let broken = router
        .metrics()
        .await
        .get("router_upstream_broken_responses_total", &[("pod", "a")]);
    assert_eq!(broken, Some(STREAMS as f64));
}
