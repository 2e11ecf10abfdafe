//! Acceptance 5: a client that goes away aborts its request: the engine stops generating for
//! it and frees its KV blocks within seconds, and the server keeps serving.

use std::time::Duration;

use e2e::sse::{Event, SseStream};
use e2e::{Agent, SERVED_MODEL};
use serde_json::json;

/// 2000 tokens take half a minute at this model's speed on 2 cores: far longer than the
/// deadline below, so only an abort can free the engine in time.
const LONG_MAX_TOKENS: usize = 2000;
const ABORT_DEADLINE: Duration = Duration::from_secs(5);

fn long_request(stream: bool) -> serde_json::Value {
    json!({
        "model": SERVED_MODEL,
        "prompt": "Write a very long story about a lighthouse keeper.",
        "max_tokens": LONG_MAX_TOKENS,
        "ignore_eos": true,
        "temperature": 0.0,
        "stream": stream,
    })
}

/// Waits for the request to be running, then for the engine to be idle again after the caller
/// dropped the connection; then checks that the agent still answers.
async fn assert_aborted_and_healthy(agent: &Agent) {
    agent.wait_idle(ABORT_DEADLINE).await;
    // Nothing keeps generating in the background.
    let generated = agent.metrics().await.value("vllm:generation_tokens_total");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        agent.metrics().await.value("vllm:generation_tokens_total"),
        generated,
        "tokens are still being generated after the disconnect"
    );
    let reply = agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(reply["usage"]["completion_tokens"], 4, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_aborts_request() {
    let agent = Agent::start(&[]).await;
    let resp = agent
        .client()
        .post(agent.url("/v1/completions"))
        .json(&long_request(true))
        .send()
        .await
        .expect("streaming request");
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = SseStream::new(resp);
    for _ in 0..5 {
        match stream.next().await {
            Ok(Some(Event::Json(_))) => {}
            other => panic!("expected a completion chunk, got {other:?}"),
        }
    }
    let running = agent.metrics().await.value("vllm:num_requests_running");
    assert_eq!(running, 1.0, "the streaming request should be running");
    drop(stream);
    assert_aborted_and_healthy(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_non_streaming_request_aborts() {
    let agent = Agent::start(&[]).await;
    let request = agent
        .client()
        .post(agent.url("/v1/completions"))
        .json(&long_request(false))
        .timeout(Duration::from_secs(2))
        .send();
    // The client gives up after 2 s and closes the connection mid-generation.
    let result = request.await;
    assert!(
        matches!(&result, Err(e) if e.is_timeout()),
        "expected the client to time out, got {result:?}"
    );
    assert_aborted_and_healthy(&agent).await;
}
