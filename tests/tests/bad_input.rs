//! Acceptance 6: malformed and invalid requests get vLLM's status and error body
//! (`{"error":{"message","type","param","code"}}`), never take the server down, and leave no
//! KV blocks or requests behind.

use std::time::Duration;

use e2e::{Agent, Reply, SERVED_MODEL};
use serde_json::{json, Value};

const MAX_MODEL_LEN: usize = 256;
const BAD_REQUEST: &str = "BadRequestError";

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": SERVED_MODEL, "prompt": "Hello", "max_tokens": 4});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn expect_bad_request(agent: &Agent, case: &str, reply: Reply) {
    assert!(
        reply.status == 400,
        "{case}: expected 400, got {} {}\nagent output:\n{}",
        reply.status,
        reply.body,
        agent.log()
    );
    reply.assert_error(400, BAD_REQUEST);
    let health = agent.get("/health").await;
    assert_eq!(health.status, 200, "{case}: agent unhealthy afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_vllm_errors_and_leave_nothing_behind() {
    let agent = Agent::start(&["--max-model-len", &MAX_MODEL_LEN.to_string()]).await;

    let raw_cases: [(&str, &[u8]); 4] = [
        (
            "truncated JSON",
            br#"{"model": "SmolLM2-135M-Instruct", "prompt": "#,
        ),
        ("not JSON at all", b"hello there"),
        (
            "non-UTF-8 bytes",
            b"{\"model\": \"SmolLM2-135M-Instruct\", \"prompt\": \"\xff\xfe\xfd\"}",
        ),
        ("empty body", b""),
    ];
    for (case, body) in raw_cases {
        let reply = agent.post_raw("/v1/completions", body.to_vec()).await;
        expect_bad_request(&agent, case, reply).await;
    }

    let json_cases = [
        ("negative max_tokens", completion(json!({"max_tokens": -1}))),
        ("zero max_tokens", completion(json!({"max_tokens": 0}))),
        (
            "max_tokens beyond max_model_len",
            completion(json!({"max_tokens": 1_000_000_000})),
        ),
        (
            "negative temperature",
            completion(json!({"temperature": -0.5})),
        ),
        ("top_p above 1", completion(json!({"top_p": 1.5}))),
        ("n = 0", completion(json!({"n": 0}))),
        (
            "max_tokens of the wrong type",
            completion(json!({"max_tokens": "ten"})),
        ),
        (
            "temperature of the wrong type",
            completion(json!({"temperature": [1]})),
        ),
        (
            "prompt of the wrong type",
            completion(json!({"prompt": {"text": "hi"}})),
        ),
        ("missing prompt", json!({"model": SERVED_MODEL})),
        (
            "token id out of the vocabulary",
            completion(json!({"prompt": [1, 49152]})),
        ),
        (
            "stream_options without stream",
            completion(json!({"stream_options": {"include_usage": true}})),
        ),
    ];
    for (case, body) in json_cases {
        let reply = agent.post("/v1/completions", &body).await;
        expect_bad_request(&agent, case, reply).await;
    }

    let chat_cases = [
        (
            "empty messages",
            json!({"model": SERVED_MODEL, "messages": []}),
        ),
        (
            "messages of the wrong type",
            json!({"model": SERVED_MODEL, "messages": "hi"}),
        ),
        (
            "message without a role",
            json!({"model": SERVED_MODEL, "messages": [{"content": "hi"}]}),
        ),
    ];
    for (case, body) in chat_cases {
        let reply = agent.post("/v1/chat/completions", &body).await;
        expect_bad_request(&agent, case, reply).await;
    }

    // Too long: the error names the limit and the prompt's length.
    let long_prompt: Vec<u32> = (0..MAX_MODEL_LEN as u32 + 10).map(|i| 100 + i).collect();
    let reply = agent
        .post(
            "/v1/completions",
            &completion(json!({"prompt": long_prompt})),
        )
        .await;
    let err = reply.assert_error(400, BAD_REQUEST).clone();
    let message = err["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("maximum context length")
            && message.contains(&MAX_MODEL_LEN.to_string())
            && message.contains(&(MAX_MODEL_LEN + 10).to_string()),
        "too-long prompt message: {message}"
    );

    // A 10 MB body: refused as too large (413) or as too long a prompt (400), with an error
    // body either way; the agent must not fall over.
    let huge = completion(json!({"prompt": "hello ".repeat(10 * 1024 * 1024 / 6)}));
    let huge_bytes = serde_json::to_vec(&huge).expect("serialise");
    assert!(huge_bytes.len() >= 10 * 1000 * 1000);
    let reply = agent.post_raw("/v1/completions", huge_bytes).await;
    match reply.status {
        413 => {
            let err = &reply.body["error"];
            assert!(
                err["message"].is_string() && err.get("param").is_some(),
                "{}",
                reply.body
            );
            assert_eq!(err["code"], 413, "{}", reply.body);
        }
        _ => {
            reply.assert_error(400, BAD_REQUEST);
        }
    }

    // Unknown fields are accepted and ignored.
    let reply = agent
        .post(
            "/v1/completions",
            &completion(json!({"no_such_field": 1, "another": {"nested": true}})),
        )
        .await;
    assert_eq!(reply.status, 200, "unknown fields: {}", reply.body);
    assert_eq!(reply.body["usage"]["completion_tokens"], 4);
    let reply = agent
        .post(
            "/v1/chat/completions",
            &json!({"model": SERVED_MODEL, "max_tokens": 2, "bogus": "x",
                    "messages": [{"role": "user", "content": "Hi", "extra": 1}]}),
        )
        .await;
    assert_eq!(reply.status, 200, "unknown chat fields: {}", reply.body);

    // Unknown model: 404 naming the model.
    let reply = agent
        .post(
            "/v1/completions",
            &completion(json!({"model": "no-such-model"})),
        )
        .await;
    let err = reply.assert_error(404, "NotFoundError");
    assert_eq!(err["param"], "model", "{}", reply.body);

    assert_eq!(agent.get("/health").await.status, 200);
    agent.wait_idle(Duration::from_secs(5)).await;
}
