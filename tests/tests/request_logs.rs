//! Issue 21: vLLM's request log lines (`--enable-log-requests`, off with
//! `--disable-log-requests`) and its periodic stats line (every `VLLM_LOG_STATS_INTERVAL`
//! seconds while busy, off with `--disable-log-stats`), read from a real agent's output.

use std::time::{Duration, Instant};

use e2e::{Agent, Launch, SERVED_MODEL};
use serde_json::json;

async fn agent(extra: &[&str]) -> Agent {
    let launch = Launch {
        env: vec![("VLLM_LOG_STATS_INTERVAL".into(), "0.5".into())],
        ..Launch::default()
    };
    Agent::launch(&launch, extra).await
}

async fn one_request(agent: &Agent) {
    agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": "Hello there", "max_tokens": 5,
                    "ignore_eos": true, "request_id": "log-me"}),
        )
        .await;
}

/// Waits up to 10 s for a line containing every one of `parts`.
async fn wait_for_line(agent: &Agent, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = agent
            .log()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_stats_lines() {
    let agent = agent(&["--enable-log-requests"]).await;
    one_request(&agent).await;
    let received = wait_for_line(&agent, &["INFO", "Received request cmpl-"]).await;
    assert!(received.contains("num_prompt_tokens: "), "{received}");
    assert!(received.contains("max_tokens: 5"), "{received}");
    let finished = wait_for_line(&agent, &["INFO", "Finished request cmpl-"]).await;
    assert!(finished.contains("status: length"), "{finished}");
    assert!(finished.contains("num_generation_tokens: 5"), "{finished}");
    // The interval that saw the request reports its tokens, at info.
    let stats = wait_for_line(
        &agent,
        &["INFO", "Avg generation throughput", "GPU KV cache usage"],
    )
    .await;
    assert!(stats.contains("Prefix cache hit rate: "), "{stats}");
    let busy = agent
        .log()
        .lines()
        .filter(|l| l.contains("Avg prompt throughput"))
        .any(|l| !l.contains("Avg generation throughput: 0.0 tokens/s"));
    assert!(busy, "no stats line counted the request:\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_off_by_default_and_by_flag() {
    for flags in [
        &[][..],
        &[
            "--enable-log-requests",
            "--disable-log-requests",
            "--disable-log-stats",
        ][..],
    ] {
        let agent = agent(flags).await;
        one_request(&agent).await;
        // Two stats intervals pass.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let log = agent.log();
        assert!(!log.contains("Received request"), "{flags:?}:\n{log}");
        assert!(!log.contains("Finished request"), "{flags:?}:\n{log}");
        let stats = log.contains("Avg prompt throughput");
        assert_eq!(stats, flags.is_empty(), "{flags:?}:\n{log}");
    }
}
