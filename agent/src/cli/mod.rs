//! Command line, spelled as `vllm serve`: `agent serve MODEL [flags]` with vLLM's flag names
//! and defaults (reference §3). Flags for features this server does not have are accepted so
//! deployments written for vLLM start, and say in their help what they do here.

mod compat;
mod kv_transfer;
mod offload;

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::Value;

use kernels::KvDtype;

use crate::engine::{Pooling, PoolingType};
use kvcache::HashAlgo;

/// Default KV-cache size on CPU, where `--gpu-memory-utilization` has nothing to measure.
pub const DEFAULT_KV_CACHE_MEMORY_BYTES: u64 = 1 << 30;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "vLLM-compatible inference node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over the OpenAI-compatible HTTP API (as `vllm serve`).
    Serve(Box<ServeArgs>),
}

/// `--dtype` values (vLLM's spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDtype {
    Auto,
    Half,
    Float16,
    Bfloat16,
    Float,
    Float32,
}

/// `--kv-cache-dtype` values this server can store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheDtype {
    Auto,
    Bfloat16,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("model_source").required(true).args(["model_tag", "model"])))]
pub struct ServeArgs {
    /// The model: a GGUF file, a Hugging Face model directory, or a Hugging Face id
    /// (`org/name`) found in the local hub cache (HF_HUB_CACHE / HF_HOME; no download).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<PathBuf>,

    /// The model, as an option (alternative to the positional MODEL).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<PathBuf>,

    /// The revision of a Hugging Face id MODEL: a branch or tag of the cache's refs, or a
    /// commit (default: main).
    #[arg(long)]
    pub revision: Option<String>,

    /// Names the model is served under (the first one is used in responses). Default: the
    /// Hugging Face id when MODEL is one, else the model file's stem or directory name.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    pub served_model_name: Vec<String>,

    #[command(flatten)]
    pub listen: httpserve::ListenArgs,

    #[command(flatten)]
    pub http: httpserve::HttpLimitArgs,

    /// Require `Authorization: Bearer <key>` on /v1 routes (one of these keys). Without it, the
    /// VLLM_API_KEY environment variable is used when set.
    #[arg(long, num_args = 1.., value_name = "KEY")]
    pub api_key: Vec<String>,

    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// Model data type. The CPU forward pass computes in float32 whatever this says; it sets
    /// the KV cache's storage when --kv-cache-dtype is auto (auto, half and float16 store
    /// float16, as vLLM stores a 16-bit model's KV; float32 keeps full precision).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: ModelDtype,

    /// KV-cache storage: auto follows --dtype. (fp8 is not available on the CPU path.)
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache_dtype: CacheDtype,

    /// Context length (prompt + output). Default: the model's maximum. Accepts 8k / 8K
    /// (1000 / 1024 multiples) and `auto`.
    #[arg(long, value_parser = parse_max_model_len, value_name = "TOKENS")]
    pub max_model_len: Option<ContextLen>,

    /// Accepted for compatibility; no effect on CPU (size the cache with
    /// --kv-cache-memory-bytes).
    #[arg(long, default_value_t = 0.92)]
    pub gpu_memory_utilization: f64,

    /// Memory for the KV cache, e.g. 1G, 512M, 2GiB, 1000000000 [default on CPU: 1 GiB].
    #[arg(long, value_parser = parse_byte_size, value_name = "BYTES")]
    pub kv_cache_memory_bytes: Option<u64>,

    /// Most sequences scheduled in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Most tokens processed in one step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Reuse KV blocks of identical prompt prefixes (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,

    /// Turn prefix caching off.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,

    /// Hash of prefix-cache blocks: sha256, sha256_cbor, xxhash, xxhash_cbor. Defaults to
    /// sha256_cbor: language-independent CBOR, so non-Python peers (routers, other pods
    /// sharing a storage tier) can recompute the same hashes.
    #[arg(long, default_value = "sha256_cbor")]
    pub prefix_caching_hash_algo: HashAlgo,

    /// Accepted for compatibility: chunked prefill is always on.
    #[arg(long, overrides_with = "no_enable_chunked_prefill")]
    pub enable_chunked_prefill: bool,

    /// Accepted for compatibility: chunked prefill cannot be turned off (a warning is logged).
    #[arg(long, overrides_with = "enable_chunked_prefill")]
    pub no_enable_chunked_prefill: bool,

    /// Report `usage.prompt_tokens_details.cached_tokens`.
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,

    /// Send usage on every streamed request, as if `stream_options.include_usage` (and
    /// `continuous_usage_stats`) were set.
    #[arg(long)]
    pub enable_force_include_usage: bool,

    /// KV-cache event publishing over ZMQ (JSON, vLLM's KVEventsConfig keys plus
    /// `event_encoding`: "map" or "array"); checked at start-up by `kv_events::KvEventsConfig`.
    #[arg(long, value_parser = parse_json_object, value_name = "JSON")]
    pub kv_events_config: Option<Value>,

    /// KV connector (JSON, vLLM's KVTransferConfig): `OffloadingConnector` with its
    /// `kv_connector_extra_config` is the CPU tier; `NixlConnector` with `kv_role` is P/D
    /// disaggregation (KV blocks over UCX, side channel from VLLM_NIXL_SIDE_CHANNEL_HOST/PORT).
    #[arg(long, value_parser = parse_json_object, value_name = "JSON")]
    pub kv_transfer_config: Option<Value>,

    /// Host memory for the CPU KV tier, in GiB (vLLM's native offloading; off by default).
    #[arg(long, value_name = "GIB")]
    pub kv_offloading_size: Option<f64>,

    /// KV offloading backend: native (the default; lmcache is not available here).
    #[arg(long, value_parser = ["native", "lmcache"])]
    pub kv_offloading_backend: Option<String>,

    /// Accepted; one worker per process (the model must fit it). `-tp` is accepted as well.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// Accepted for compatibility; sampling randomness is per request (the `seed` field).
    #[arg(long)]
    pub seed: Option<u64>,

    #[command(flatten)]
    pub compat: compat::CompatArgs,

    /// How /v1/embeddings pools a prompt (vLLM's PoolerConfig JSON): `pooling_type` LAST
    /// (default) or MEAN, `normalize` (default true).
    #[arg(long, value_parser = parse_pooler_config, value_name = "JSON")]
    pub pooler_config: Option<Pooling>,

    /// Most logprobs a request may ask for (vLLM's --max-logprobs).
    #[arg(long, default_value_t = 20)]
    pub max_logprobs: usize,

    /// Log level when RUST_LOG is not set: critical, error, warning, info, debug, trace.
    #[arg(long, default_value = "info", value_parser = ["critical", "error", "warning", "info", "debug", "trace"])]
    pub uvicorn_log_level: String,

    /// Log one line per request as it arrives (its sampling parameters and prompt length) and
    /// one as it ends (status, prompt, generated and cached tokens, latency). Off by default,
    /// as in vLLM.
    #[arg(long)]
    pub enable_log_requests: bool,

    /// No request log lines, whatever --enable-log-requests says (vLLM's older spelling).
    #[arg(long)]
    pub disable_log_requests: bool,

    /// No periodic stats line (throughput, running/waiting requests, KV cache usage, prefix
    /// cache hit rate; every VLLM_LOG_STATS_INTERVAL seconds, 10 by default, while busy).
    #[arg(long)]
    pub disable_log_stats: bool,
}

impl Cli {
    /// Parses the process arguments, accepting vLLM's `-tp` spelling.
    pub fn parse_args() -> Self {
        Self::parse_from(normalize_args(std::env::args()))
    }
}

/// vLLM's spellings clap cannot declare: `--max_model_len` for `--max-model-len` (vLLM's
/// parser reads `_` in a flag name as `-`), and the multi-letter short flags `-tp`, `-pp`,
/// `-dp`, `-O` (`-O3`, `-O.level=3`). Values are left alone.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    const SHORT: [(&str, &str); 3] = [
        ("-tp", "--tensor-parallel-size"),
        ("-pp", "--pipeline-parallel-size"),
        ("-dp", "--data-parallel-size"),
    ];
    args.into_iter()
        .map(|a| {
            for (short, long) in SHORT {
                match a.strip_prefix(short) {
                    Some("") => return long.to_string(),
                    Some(rest) if rest.starts_with('=') => return format!("{long}{rest}"),
                    _ => {}
                }
            }
            if let Some(level) = a.strip_prefix("-O").filter(|r| !r.is_empty()) {
                return format!("--compilation-config={}", level.trim_start_matches('='));
            }
            if a == "-O" {
                return "--compilation-config".to_string();
            }
            match a.strip_prefix("--") {
                Some(flag) if flag.contains('_') => {
                    let (name, value) = flag
                        .split_once('=')
                        .map_or((flag, None), |(n, v)| (n, Some(v)));
                    let name = name.replace('_', "-");
                    match value {
                        Some(v) => format!("--{name}={v}"),
                        None => format!("--{name}"),
                    }
                }
                _ => a,
            }
        })
        .collect()
}

pub use compat::notes as compatibility_notes;
pub use kv_transfer::pd_transfer;
pub use offload::cpu_offload;

/// The log level without RUST_LOG: vLLM's `VLLM_LOGGING_LEVEL` (DEBUG, INFO, WARNING, ERROR,
/// CRITICAL, any case) when set and valid, else `--uvicorn-log-level`, in tracing's names.
pub fn log_level(vllm_logging_level: Option<&str>, uvicorn_level: &str) -> &'static str {
    let named = |level: &str| match level.to_ascii_lowercase().as_str() {
        "critical" | "error" => Some("error"),
        "warning" | "warn" => Some("warn"),
        "info" => Some("info"),
        "debug" => Some("debug"),
        "trace" => Some("trace"),
        _ => None,
    };
    vllm_logging_level
        .and_then(named)
        .or_else(|| named(uvicorn_level))
        .unwrap_or("info")
}

impl ServeArgs {
    /// The model path, from the positional MODEL or `--model`.
    pub fn model_path(&self) -> PathBuf {
        // clap's required group guarantees one of them.
        self.model
            .clone()
            .or_else(|| self.model_tag.clone())
            .unwrap_or_default()
    }

    /// How the KV cache stores K and V, from --kv-cache-dtype and --dtype.
    pub fn kv_dtype(&self) -> KvDtype {
        match (self.kv_cache_dtype, self.dtype) {
            (CacheDtype::Bfloat16, _) | (CacheDtype::Auto, ModelDtype::Bfloat16) => KvDtype::Bf16,
            (CacheDtype::Auto, ModelDtype::Float | ModelDtype::Float32) => KvDtype::F32,
            (CacheDtype::Auto, ModelDtype::Auto | ModelDtype::Half | ModelDtype::Float16) => {
                KvDtype::F16
            }
        }
    }

    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv_cache_memory_bytes
            .unwrap_or(DEFAULT_KV_CACHE_MEMORY_BYTES)
    }

    /// The requested context length; `None` for the model's own.
    pub fn max_model_len(&self) -> Option<usize> {
        match self.max_model_len {
            Some(ContextLen::Tokens(n)) => Some(n),
            Some(ContextLen::Auto) | None => None,
        }
    }

    /// `--api-key` values, else `VLLM_API_KEY` (as vLLM).
    pub fn api_keys(&self) -> Vec<String> {
        if !self.api_key.is_empty() {
            return self.api_key.clone();
        }
        std::env::var("VLLM_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .into_iter()
            .collect()
    }
}

/// A JSON object argument (vLLM's config flags); invalid JSON is a start-up error.
fn parse_json_object(s: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err("expected a JSON object".to_string())
    }
}

/// `--pooler-config`: the keys this server pools with; any other key or pooling type is an
/// error (ignoring it would change the embeddings).
fn parse_pooler_config(s: &str) -> Result<Pooling, String> {
    let v = parse_json_object(s)?;
    let mut pooling = Pooling::default();
    for (key, value) in v.as_object().into_iter().flatten() {
        match (key.as_str(), value) {
            ("pooling_type", Value::String(t)) => {
                pooling.kind = match t.to_ascii_uppercase().as_str() {
                    "LAST" => PoolingType::Last,
                    "MEAN" => PoolingType::Mean,
                    _ => return Err(format!("pooling_type {t} is not supported (LAST, MEAN)")),
                }
            }
            ("normalize", Value::Bool(b)) => pooling.normalize = *b,
            (key, value) => return Err(format!("unsupported key {key} = {value}")),
        }
    }
    Ok(pooling)
}

/// vLLM's `human_readable_int`: `25.6k` (×1000), `2K` (×1024, no decimals), plain integers;
/// plus `KB`/`MB`/`GB`/`TB` (decimal) and `KiB`/`MiB`/`GiB`/`TiB` (binary).
pub fn parse_human_int(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (multiplier, binary): (u64, bool) = match suffix.trim() {
        "" => (1, true),
        "k" | "KB" | "kB" => (1_000, false),
        "m" | "MB" => (1_000_000, false),
        "g" | "GB" => (1_000_000_000, false),
        "t" | "TB" => (1_000_000_000_000, false),
        "K" | "KiB" => (1 << 10, true),
        "M" | "MiB" => (1 << 20, true),
        "G" | "GiB" => (1 << 30, true),
        "T" | "TiB" => (1 << 40, true),
        other => return Err(format!("unknown size suffix {other:?} in {s:?}")),
    };
    if binary {
        let n: u64 = number.parse().map_err(|_| {
            if number.contains('.') {
                format!(
                    "Decimals are not allowed with binary suffixes like {suffix}. Did you mean \
                     to use {number}{} instead?",
                    suffix.to_lowercase()
                )
            } else {
                format!("invalid number {s:?}")
            }
        })?;
        n.checked_mul(multiplier)
            .ok_or_else(|| format!("{s:?} is too large"))
    } else {
        let n: f64 = number
            .parse()
            .map_err(|_| format!("invalid number {s:?}"))?;
        Ok((n * multiplier as f64) as u64)
    }
}

fn parse_byte_size(s: &str) -> Result<u64, String> {
    parse_human_int(s)
}

/// `--max-model-len`: a token count, or the model's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextLen {
    Auto,
    Tokens(usize),
}

/// `auto` / `-1` or a size.
fn parse_max_model_len(s: &str) -> Result<ContextLen, String> {
    match s.trim() {
        "auto" | "-1" => Ok(ContextLen::Auto),
        other => parse_human_int(other).map(|n| ContextLen::Tokens(n as usize)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut full = vec!["agent".to_string(), "serve".to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        Cli::try_parse_from(normalize_args(full)).map(|cli| match cli.command {
            Command::Serve(args) => *args,
        })
    }

    #[test]
    fn log_level_from_vllm_env_then_uvicorn_flag() {
        assert_eq!(log_level(None, "info"), "info");
        assert_eq!(log_level(None, "critical"), "error");
        assert_eq!(log_level(Some("DEBUG"), "info"), "debug");
        assert_eq!(log_level(Some("WARNING"), "debug"), "warn");
        assert_eq!(log_level(Some("loud"), "warning"), "warn");
    }

    #[test]
    fn vllm_spellings_are_normalized() {
        let n = |args: &[&str]| normalize_args(args.iter().map(|s| s.to_string()));
        assert_eq!(
            n(&[
                "--max_model_len=8192",
                "--gpu_memory_utilization",
                "0.9",
                "--kv-events-config",
                "{\"a_b\": 1}"
            ]),
            [
                "--max-model-len=8192",
                "--gpu-memory-utilization",
                "0.9",
                "--kv-events-config",
                "{\"a_b\": 1}"
            ]
        );
        assert_eq!(
            n(&["-tp", "2", "-pp=1", "-dp", "1"]),
            [
                "--tensor-parallel-size",
                "2",
                "--pipeline-parallel-size=1",
                "--data-parallel-size",
                "1"
            ]
        );
        assert_eq!(
            n(&["-O3", "-O", "2", "-O.level=3"]),
            [
                "--compilation-config=3",
                "--compilation-config",
                "2",
                "--compilation-config=.level=3"
            ]
        );
        // Values keep their underscores.
        assert_eq!(
            n(&["--served-model-name", "my_model"]),
            ["--served-model-name", "my_model"]
        );
    }

    #[test]
    fn llm_d_pod_spec_flags_are_accepted_with_notes() {
        let a = parse(&[
            "Qwen/Qwen3-32B",
            "--disable-access-log-for-endpoints=/health,/metrics,/v1/models",
            "--disable-uvicorn-access-log",
            "--disable-hybrid-kv-cache-manager",
            "--max_model_len=8192",
            "--tensor-parallel-size=2",
            "--block-size=64",
            "--enforce-eager",
            "--trust-remote-code",
            "--otlp-traces-endpoint=http://otel-collector:4317",
            "--collect-detailed-traces=all",
            "--gpu-memory-utilization=0.95",
            "-O3",
            "--load-format",
            "auto",
        ])
        .unwrap();
        assert_eq!(a.max_model_len(), Some(8192));
        let notes = compatibility_notes(&a).unwrap();
        for flag in [
            "--enforce-eager",
            "--trust-remote-code",
            "--disable-uvicorn-access-log",
            "--disable-hybrid-kv-cache-manager",
            "--otlp-traces-endpoint",
            "--tensor-parallel-size 2",
            "--compilation-config",
        ] {
            assert!(
                notes.iter().any(|n| n.contains(flag)),
                "no note for {flag}: {notes:?}"
            );
        }
        assert!(notes.iter().all(|n| n.ends_with("; ignored")), "{notes:?}");
        assert!(compatibility_notes(&parse(&["/m.gguf"]).unwrap())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn flags_that_would_change_results_are_errors() {
        for (args, says) in [
            (
                &[
                    "/m.gguf",
                    "--enable-auto-tool-choice",
                    "--tool-call-parser",
                    "hermes",
                ][..],
                "tool-call parsing",
            ),
            (
                &["/m.gguf", "--reasoning-parser", "qwen3"][..],
                "reasoning parsing",
            ),
            (
                &["/m.gguf", "--quantization", "awq"][..],
                "--quantization awq",
            ),
            (
                &["/m.gguf", "--load-format", "bitsandbytes"][..],
                "--load-format bitsandbytes",
            ),
            (&["/m.gguf", "-tp", "0"][..], "at least 1"),
        ] {
            let err = compatibility_notes(&parse(args).unwrap()).unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
        assert!(
            compatibility_notes(&parse(&["/m.gguf", "--quantization", "gguf"]).unwrap()).is_ok()
        );
    }

    #[test]
    fn defaults_match_vllm() {
        let a = parse(&["/m.gguf"]).unwrap();
        assert_eq!(a.model_path(), PathBuf::from("/m.gguf"));
        assert_eq!((a.listen.host.as_str(), a.listen.port), ("0.0.0.0", 8000));
        assert_eq!(a.block_size, 16);
        assert_eq!(a.max_num_seqs, 256);
        assert_eq!(a.max_num_batched_tokens, 2048);
        assert!(a.prefix_caching());
        assert_eq!(a.prefix_caching_hash_algo, HashAlgo::Sha256Cbor);
        assert_eq!(a.kv_cache_bytes(), 1 << 30);
        assert_eq!(a.max_model_len(), None);
        assert_eq!(a.tensor_parallel_size, 1);
        assert_eq!(a.max_logprobs, 20);
        assert!(a.served_model_name.is_empty());
        assert_eq!(a.kv_dtype(), KvDtype::F16);
    }

    #[test]
    fn kv_cache_dtype_follows_dtype() {
        let kv = |args: &[&str]| parse(&[&["/m.gguf"], args].concat()).unwrap().kv_dtype();
        assert_eq!(kv(&["--dtype", "float32"]), KvDtype::F32);
        assert_eq!(kv(&["--dtype", "float"]), KvDtype::F32);
        assert_eq!(kv(&["--dtype", "half"]), KvDtype::F16);
        assert_eq!(kv(&["--dtype", "bfloat16"]), KvDtype::Bf16);
        assert_eq!(
            kv(&["--dtype", "float32", "--kv-cache-dtype", "bfloat16"]),
            KvDtype::Bf16
        );
        let err = parse(&["/m.gguf", "--kv-cache-dtype", "fp8"]).unwrap_err();
        assert!(err.to_string().contains("invalid value 'fp8'"), "{err}");
    }

    #[test]
    fn flags_parse() {
        let a = parse(&[
            "--model",
            "/m",
            "--served-model-name",
            "a",
            "b",
            "--port",
            "9000",
            "--api-key",
            "k",
            "--max-model-len",
            "4k",
            "--kv-cache-memory-bytes",
            "512MiB",
            "--no-enable-prefix-caching",
            "--prefix-caching-hash-algo",
            "sha256_cbor",
            "--enable-chunked-prefill",
            "--enable-prompt-tokens-details",
            "--enable-force-include-usage",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "publisher": "zmq"}"#,
            "-tp",
            "1",
            "--gpu-memory-utilization",
            "0.5",
            "--seed",
            "0",
            "--uvicorn-log-level",
            "warning",
            "--disable-log-requests",
            "--kv-offloading-size",
            "4",
            "--kv-offloading-backend",
            "native",
        ])
        .unwrap();
        assert_eq!(a.model_path(), PathBuf::from("/m"));
        assert_eq!(a.served_model_name, vec!["a", "b"]);
        assert_eq!(a.api_key, vec!["k"]);
        assert_eq!(a.max_model_len(), Some(4000));
        assert_eq!(a.kv_cache_bytes(), 512 << 20);
        assert!(!a.prefix_caching());
        assert_eq!(a.prefix_caching_hash_algo, HashAlgo::Sha256Cbor);
        assert!(a.enable_prompt_tokens_details && a.enable_force_include_usage);
        assert_eq!(a.kv_events_config.unwrap()["publisher"], "zmq");
        // The last of --enable/--no-enable wins, as with argparse.
        assert!(
            parse(&["m", "--no-enable-prefix-caching", "--enable-prefix-caching"])
                .unwrap()
                .prefix_caching()
        );
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["m", "--kv-transfer-config", "{not json"]).is_err());
        assert!(parse(&["m", "--kv-events-config", "[1]"]).is_err());
        assert!(parse(&["m", "--prefix-caching-hash-algo", "md5"]).is_err());
        assert!(parse(&["m", "--kv-cache-memory-bytes", "1.5G"]).is_err());
    }

    #[test]
    fn human_readable_sizes() {
        assert_eq!(parse_human_int("1G"), Ok(1 << 30));
        assert_eq!(parse_human_int("1g"), Ok(1_000_000_000));
        assert_eq!(parse_human_int("25.6k"), Ok(25_600));
        assert_eq!(parse_human_int("2GiB"), Ok(2 << 30));
        assert_eq!(parse_human_int("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_human_int("123"), Ok(123));
        assert!(parse_human_int("1.5K").unwrap_err().contains("Decimals"));
        assert!(parse_human_int("12x").is_err());
        assert_eq!(parse_max_model_len("auto"), Ok(ContextLen::Auto));
        assert_eq!(parse_max_model_len("8K"), Ok(ContextLen::Tokens(8192)));
    }
}
