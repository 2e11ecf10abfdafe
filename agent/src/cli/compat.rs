//! `vllm serve` flags that pod specs written for vLLM carry (llm-d's guides and Helm values)
//! but that mean nothing on this server: accepted, each with a one-line note at start-up. A
//! flag whose absence here would change results (tool-call or reasoning parsing, a
//! quantization this model is not in) is a start-up error instead.

use clap::Args;

use super::ServeArgs;

/// Flags accepted for compatibility; see [`notes`] for what each one means here.
#[derive(Debug, Clone, Default, Args)]
pub struct CompatArgs {
    /// Accepted for compatibility: there are no CUDA graphs to turn off here.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Accepted for compatibility: no model code is run (architectures are built in).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted for compatibility: this server writes no HTTP access log.
    #[arg(long)]
    pub disable_uvicorn_access_log: bool,
    /// Accepted for compatibility: this server writes no HTTP access log.
    #[arg(long, value_name = "PATHS")]
    pub disable_access_log_for_endpoints: Option<String>,
    /// Accepted for compatibility: the KV cache has one group (no hybrid manager).
    #[arg(long)]
    pub disable_hybrid_kv_cache_manager: bool,
    /// Accepted for compatibility: text-only architectures.
    #[arg(long)]
    pub language_model_only: bool,
    /// Accepted for compatibility: the engine schedules each step synchronously.
    #[arg(long)]
    pub async_scheduling: bool,
    /// Accepted for compatibility: no OpenTelemetry exporter.
    #[arg(long, value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
    /// Accepted for compatibility: no OpenTelemetry exporter.
    #[arg(long, value_name = "MODULES")]
    pub collect_detailed_traces: Option<String>,
    /// Accepted for compatibility: one worker per process.
    #[arg(long, value_name = "BACKEND")]
    pub distributed_executor_backend: Option<String>,
    /// Only 1 (one worker per process); `-pp` is accepted as well.
    #[arg(long, default_value_t = 1)]
    pub pipeline_parallel_size: usize,
    /// Only 1 (one engine per process); `-dp` is accepted as well.
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Accepted for compatibility: preempted requests are recomputed, never swapped.
    #[arg(long, value_name = "GIB")]
    pub swap_space: Option<f64>,
    /// Accepted for compatibility: weights stay where the executor keeps them.
    #[arg(long, value_name = "GIB")]
    pub cpu_offload_gb: Option<f64>,
    /// Accepted for compatibility: prefills are chunked by --max-num-batched-tokens only.
    #[arg(long)]
    pub max_num_partial_prefills: Option<usize>,
    /// Accepted for compatibility: prefills are chunked by --max-num-batched-tokens only.
    #[arg(long)]
    pub max_long_partial_prefills: Option<usize>,
    /// Accepted for compatibility: prefills are chunked by --max-num-batched-tokens only.
    #[arg(long)]
    pub long_prefill_token_threshold: Option<usize>,
    /// Accepted for compatibility: nothing is compiled (`-O` is accepted as well).
    #[arg(long, value_name = "JSON|LEVEL")]
    pub compilation_config: Option<String>,
    /// Accepted for compatibility: no CUDA graphs.
    #[arg(long, value_name = "SIZES", num_args = 1..)]
    pub cuda_graph_sizes: Vec<String>,
    /// Accepted: `auto`, `gguf`, `safetensors` (MODEL is read as what it is); others are an
    /// error.
    #[arg(long, value_name = "FORMAT")]
    pub load_format: Option<String>,
    /// Accepted for compatibility: `auto` and `hf` read the same tokenizer.
    #[arg(long, value_name = "MODE")]
    pub tokenizer_mode: Option<String>,
    /// Not implemented: a start-up error (responses would keep tool calls as text).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// Not implemented: a start-up error (responses would keep tool calls as text).
    #[arg(long, value_name = "PARSER")]
    pub tool_call_parser: Option<String>,
    /// Not implemented: a start-up error (reasoning would stay in the content).
    #[arg(long, value_name = "PARSER")]
    pub reasoning_parser: Option<String>,
    /// Only `gguf` (a GGUF file runs as it is stored); others are an error.
    #[arg(long, value_name = "METHOD")]
    pub quantization: Option<String>,
}

/// What the flags given mean here: one note per flag that has no effect, or the error for
/// one this server cannot honour without changing results.
pub fn notes(args: &ServeArgs) -> Result<Vec<String>, String> {
    let c = &args.compat;
    let mut notes = Vec::new();
    let mut note = |on: bool, flag: &str, why: &str| {
        if on {
            notes.push(format!("{flag}: {why}; ignored"));
        }
    };
    note(c.enforce_eager, "--enforce-eager", "no CUDA graphs here");
    note(
        c.trust_remote_code,
        "--trust-remote-code",
        "no model code is run (built-in architectures)",
    );
    note(
        c.disable_uvicorn_access_log || c.disable_access_log_for_endpoints.is_some(),
        "--disable-uvicorn-access-log / --disable-access-log-for-endpoints",
        "this server writes no access log",
    );
    note(
        c.disable_hybrid_kv_cache_manager,
        "--disable-hybrid-kv-cache-manager",
        "one KV cache group",
    );
    note(
        c.language_model_only,
        "--language-model-only",
        "text-only architectures",
    );
    note(
        c.async_scheduling,
        "--async-scheduling",
        "steps are scheduled synchronously",
    );
    note(
        c.otlp_traces_endpoint.is_some() || c.collect_detailed_traces.is_some(),
        "--otlp-traces-endpoint / --collect-detailed-traces",
        "no OpenTelemetry exporter",
    );
    note(
        c.distributed_executor_backend.is_some(),
        "--distributed-executor-backend",
        "one worker per process",
    );
    note(
        c.swap_space.is_some(),
        "--swap-space",
        "preempted requests are recomputed, not swapped",
    );
    note(
        c.cpu_offload_gb.is_some(),
        "--cpu-offload-gb",
        "weights are not offloaded",
    );
    note(
        c.max_num_partial_prefills.is_some()
            || c.max_long_partial_prefills.is_some()
            || c.long_prefill_token_threshold.is_some(),
        "--max-num-partial-prefills / --max-long-partial-prefills / --long-prefill-token-threshold",
        "prefills are chunked by --max-num-batched-tokens",
    );
    note(
        c.compilation_config.is_some() || !c.cuda_graph_sizes.is_empty(),
        "--compilation-config / -O / --cuda-graph-sizes",
        "nothing is compiled or captured",
    );
    note(
        c.tokenizer_mode.as_deref().is_some_and(|m| m != "auto"),
        "--tokenizer-mode",
        "the model's tokenizer is read one way",
    );
    note(
        args.seed.is_some(),
        "--seed",
        "sampling randomness is per request (its `seed` field)",
    );
    note(
        args.no_enable_chunked_prefill,
        "--no-enable-chunked-prefill",
        "chunked prefill is always on",
    );
    if let Some(c) = args.kv_transfer_config.as_ref() {
        match c["kv_connector"].as_str() {
            Some("OffloadingConnector" | "NixlConnector") => {}
            other => {
                return Err(format!(
                    "--kv-transfer-config: kv_connector {other:?} is not available here \
                     (OffloadingConnector: CPU and storage tiers; NixlConnector: P/D over UCX)"
                ))
            }
        }
    }
    for (flag, n) in [
        ("--tensor-parallel-size", args.tensor_parallel_size),
        ("--pipeline-parallel-size", c.pipeline_parallel_size),
        ("--data-parallel-size", c.data_parallel_size),
    ] {
        if n == 0 {
            return Err(format!("{flag} must be at least 1"));
        }
        // Parallelism changes where the work runs, not what it computes.
        note(
            n > 1,
            &format!("{flag} {n}"),
            "one worker per process here (the model must fit it)",
        );
    }
    if c.enable_auto_tool_choice || c.tool_call_parser.is_some() {
        return Err(
            "--enable-auto-tool-choice / --tool-call-parser: tool-call parsing is not \
                    implemented, and without it tool calls would come back as plain text"
                .into(),
        );
    }
    if let Some(p) = &c.reasoning_parser {
        return Err(format!(
            "--reasoning-parser {p}: reasoning parsing is not implemented, and without it the \
             reasoning would come back inside the content"
        ));
    }
    // The format is the file's; these name what MODEL already is (or leave it to us).
    if let Some(q) = c.quantization.as_deref().filter(|q| *q != "gguf") {
        return Err(format!(
            "--quantization {q}: not supported (the model runs in the format it is stored in; \
             for a GGUF file that is `gguf`)"
        ));
    }
    if let Some(f) = c
        .load_format
        .as_deref()
        .filter(|f| !["auto", "gguf", "safetensors"].contains(f))
    {
        return Err(format!(
            "--load-format {f}: MODEL is read as what it is (gguf or safetensors)"
        ));
    }
    Ok(notes)
}
