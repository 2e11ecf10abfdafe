//! Issue 21: the vLLM metrics dashboards scrape are on the agent's `/metrics`
//! (`vllm:request_params_n` and `vllm:request_max_num_generation_tokens` once per parent
//! request, …), and the `process_*` family is on both binaries.

use e2e::cluster::{pod_flags, Pod, RouterProc};
use e2e::{get_text, Agent, SERVED_MODEL};
use serde_json::json;

const PROCESS: [&str; 4] = [
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_start_time_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_and_process_metrics_are_exported() {
    let agent = Agent::start(&[]).await;
    agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": "Hello", "max_tokens": 3, "n": 2}),
        )
        .await;
    let page = get_text(agent.client(), &agent.url("/metrics")).await;
    for name in [
        "vllm:request_params_n_count",
        "vllm:request_params_max_tokens_count",
        "vllm:request_max_num_generation_tokens_count",
        "vllm:request_inference_time_seconds_count",
        "vllm:time_per_output_token_seconds_count",
    ] {
        let line = page
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} on the agent:\n{page}"));
        let expected = match name {
            // One parent request of n = 2; max_tokens per sequence; 2 gaps per sequence.
            "vllm:request_params_n_count" | "vllm:request_max_num_generation_tokens_count" => " 1",
            "vllm:time_per_output_token_seconds_count" => " 4",
            _ => " 2",
        };
        assert!(line.ends_with(expected), "{line}");
    }
    assert!(
        page.contains(
            "vllm:request_params_n_sum{engine=\"0\",model_name=\"SmolLM2-135M-Instruct\"} 2"
        ),
        "{page}"
    );
    for name in PROCESS {
        assert!(page.contains(name), "no {name} on the agent");
    }
    drop(agent);

    let pod = Pod::start(&[]).await;
    let router = RouterProc::start(&pod_flags([pod.spec("a", None)])).await;
    let page = get_text(router.client(), &router.url("/metrics")).await;
    for name in PROCESS {
        assert!(page.contains(name), "no {name} on the router:\n{page}");
    }
}
