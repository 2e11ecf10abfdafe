//! Prometheus metrics with vLLM's names, labels and bucket edges (reference §2).
//!
//! The engine updates them live; the server renders them on `/metrics`. The KV connector's
//! are in `offload` (tiers) and `kv_transfer` (P/D).

mod kv_transfer;
mod offload;

pub use kv_transfer::KvTransferMetrics;
pub use offload::OffloadMetrics;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// vLLM's buckets of `vllm:request_params_n`.
const N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// vLLM's `build_1_2_5_buckets(max_model_len)`: 1, 2, 5, 10, 20, 50, … up to the limit.
fn one_two_five_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exp = 1.0f64;
    'outer: loop {
        for m in [1.0, 2.0, 5.0] {
            let v = m * exp;
            if v > max as f64 {
                break 'outer;
            }
            out.push(v);
        }
        exp *= 10.0;
    }
    out
}

/// Why a request finished, as the `finished_reason` label of `vllm:request_success_total`.
pub const FINISHED_REASONS: &[&str] = &["stop", "length", "abort", "error"];

/// All engine metrics, pre-labelled with `model_name` and `engine`.
pub struct Metrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub num_preemptions: IntCounter,
    request_success: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_prefill_time: Histogram,
    pub request_decode_time: Histogram,
    pub request_inference_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    /// Per parent request (its `n` choices together): `n`, and its longest choice's tokens.
    pub request_params_n: Histogram,
    pub request_max_num_generation_tokens: Histogram,
    pub request_params_max_tokens: Histogram,
    /// vLLM's older name of the inter-token latency, still scraped by dashboards: the same
    /// observations.
    pub time_per_output_token: Histogram,
    pub iteration_tokens: Histogram,
    /// KV-event batches handed to the publisher thread / dropped because its queue was full
    /// (ours; vLLM has no such metric).
    pub kv_events_published: IntCounter,
    pub kv_events_dropped: IntCounter,
    /// The KV connector's (tiers').
    pub offload: OffloadMetrics,
    /// The P/D transfer's.
    pub kv_transfer: KvTransferMetrics,
    model_name: String,
}

/// The cache geometry published once in `vllm:cache_config_info`.
pub struct CacheConfigInfo {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub enable_prefix_caching: bool,
    pub prefix_caching_hash_algo: String,
    pub cache_dtype: String,
}

impl Metrics {
    pub fn new(
        model_name: &str,
        max_model_len: usize,
        cache: &CacheConfigInfo,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        // process_* (memory, CPU seconds, open fds, start time), as prometheus_client gives
        // vLLM.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let labels = |opts: Opts| {
            opts.const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        let hlabels = |opts: HistogramOpts| {
            opts.const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<Gauge> {
            let g = Gauge::with_opts(labels(Opts::new(name, help)))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(labels(Opts::new(name, help)))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
                let h =
                    Histogram::with_opts(hlabels(HistogramOpts::new(name, help).buckets(buckets)))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };

        let cache_info = GaugeVec::new(
            labels(Opts::new(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
            )),
            &[
                "block_size",
                "num_gpu_blocks",
                "enable_prefix_caching",
                "prefix_caching_hash_algo",
                "cache_dtype",
            ],
        )?;
        registry.register(Box::new(cache_info.clone()))?;
        cache_info
            .with_label_values(&[
                cache.block_size.to_string().as_str(),
                cache.num_gpu_blocks.to_string().as_str(),
                if cache.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                },
                cache.prefix_caching_hash_algo.as_str(),
                cache.cache_dtype.as_str(),
            ])
            .set(1.0);

        let request_success = IntCounterVec::new(
            labels(Opts::new(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
            )),
            &["finished_reason"],
        )?;
        registry.register(Box::new(request_success.clone()))?;
        for reason in FINISHED_REASONS {
            request_success.with_label_values(&[reason]);
        }
        let token_buckets = one_two_five_buckets(max_model_len);

        Ok(Self {
            num_requests_running: gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            )?,
            num_requests_waiting: gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            )?,
            kv_cache_usage_perc: gauge(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            )?,
            prompt_tokens: counter(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
            )?,
            generation_tokens: counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
            )?,
            prefix_cache_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            )?,
            prefix_cache_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            )?,
            num_preemptions: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
            )?,
            request_success,
            time_to_first_token: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS.to_vec(),
            )?,
            inter_token_latency: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS.to_vec(),
            )?,
            e2e_request_latency: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            request_queue_time: histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            request_prefill_time: histogram(
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            request_decode_time: histogram(
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            request_inference_time: histogram(
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            time_per_output_token: histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                ITL_BUCKETS.to_vec(),
            )?,
            request_params_n: histogram(
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                N_BUCKETS.to_vec(),
            )?,
            request_max_num_generation_tokens: histogram(
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                token_buckets.clone(),
            )?,
            request_params_max_tokens: histogram(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                token_buckets.clone(),
            )?,
            request_prompt_tokens: histogram(
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                token_buckets.clone(),
            )?,
            request_generation_tokens: histogram(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                token_buckets,
            )?,
            iteration_tokens: histogram(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                ITERATION_TOKEN_BUCKETS.to_vec(),
            )?,
            kv_events_published: counter(
                "agent_kv_events_published_batches_total",
                "KV cache event batches queued for publishing.",
            )?,
            kv_events_dropped: counter(
                "agent_kv_events_dropped_batches_total",
                "KV cache event batches dropped because the publisher queue was full.",
            )?,
            offload: OffloadMetrics::new(&registry, model_name)?,
            kv_transfer: KvTransferMetrics::new(&registry, model_name)?,
            registry,
            model_name: model_name.to_string(),
        })
    }

    /// Counts one finished request under its `finished_reason` label.
    pub fn record_finished(&self, reason: &str) {
        self.request_success.with_label_values(&[reason]).inc();
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Renders the registry in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_two_five_buckets_stop_at_limit() {
        assert_eq!(
            one_two_five_buckets(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(one_two_five_buckets(8192).last(), Some(&5000.0));
    }

    #[test]
    fn renders_vllm_names_with_labels() {
        let info = CacheConfigInfo {
            block_size: 16,
            num_gpu_blocks: 100,
            enable_prefix_caching: true,
            prefix_caching_hash_algo: "sha256_cbor".into(),
            cache_dtype: "auto".into(),
        };
        let m = Metrics::new("m", 8192, &info).unwrap();
        m.prompt_tokens.inc_by(3);
        m.record_finished("stop");
        let text = m.render();
        assert!(
            text.contains("vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 3"),
            "{text}"
        );
        assert!(text.contains(
            "vllm:request_success_total{engine=\"0\",finished_reason=\"stop\",model_name=\"m\"} 1"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m\",le=\"2560\"}"
        ));
        assert!(text.contains("num_gpu_blocks=\"100\""));
    }
}
