//! Issue 21: an agent started with the container args of llm-d's guides (vLLM's flags, in
//! vLLM's spellings: `--flag=value`, `--max_model_len`, `-O3`) becomes healthy and serves,
//! noting at start-up each flag that means nothing here; a flag that would change results
//! without support stops it with a clear error.

use e2e::{agent_bin, failed_start, model_path, Agent, Launch, SERVED_MODEL};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_d_container_args_start_an_agent() {
    let agent = Agent::start(&[
        "--disable-access-log-for-endpoints=/health,/metrics,/v1/models",
        "--disable-uvicorn-access-log",
        "--disable-hybrid-kv-cache-manager",
        "--max_model_len=512",
        "--tensor-parallel-size=2",
        "--gpu-memory-utilization=0.95",
        "--enforce-eager",
        "--trust-remote-code",
        "--otlp-traces-endpoint=http://otel-collector:4317",
        "--collect-detailed-traces=all",
        "--prefix-caching-hash-algo",
        "sha256_cbor",
        "-O3",
    ])
    .await;
    let out = agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": "Hello", "max_tokens": 2}),
        )
        .await;
    assert_eq!(out["usage"]["completion_tokens"], 2);
    let log = agent.log();
    for note in [
        "--enforce-eager: ",
        "--trust-remote-code: ",
        "--tensor-parallel-size 2: ",
    ] {
        assert!(log.contains(note), "no start-up note {note:?} in:\n{log}");
    }
    // --max_model_len took effect.
    let too_long = json!({"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 600});
    agent
        .post("/v1/completions", &too_long)
        .await
        .assert_error(400, "BadRequestError");
}

#[test]
fn a_flag_that_would_change_results_stops_the_agent() {
    failed_start(
        std::process::Command::new(agent_bin())
            .arg("serve")
            .arg(model_path())
            .args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]),
        &["tool-call parsing is not implemented"],
    );
}

/// llm-d's pod specs set `VLLM_LOGGING_LEVEL`; the agent follows it (here: no info lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_logging_level_sets_the_log_level() {
    let launch = Launch {
        env: vec![("VLLM_LOGGING_LEVEL".into(), "WARNING".into())],
        ..Launch::default()
    };
    let agent = Agent::launch(&launch, &["--enforce-eager"]).await;
    let log = agent.log();
    assert!(
        !log.contains("Starting vLLM-compatible API server"),
        "{log}"
    );
    assert!(
        !log.contains("--enforce-eager: "),
        "an info note at WARNING:\n{log}"
    );
}
