//! The P/D transfer's metrics under vLLM's NixlConnector names (`vllm:nixl_*`, as its
//! `NixlPromMetrics` registers them), plus ours for what vLLM does not count: decode legs that
//! prefilled locally, and the blocks a producer holds pinned now.

use kvcache::{ConnectorStats, RemoteRead};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

/// vLLM's transfer-time buckets for `nixl_xfer_time_seconds`.
const XFER_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];
const BYTES_BUCKETS: &[f64] = &[
    1e5, 1e6, 5e6, 10e6, 20e6, 40e6, 60e6, 80e6, 100e6, 150e6, 200e6, 500e6,
];
const DESCRIPTOR_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5];

pub struct KvTransferMetrics {
    xfer_time: Histogram,
    bytes: Histogram,
    descriptors: Histogram,
    failed_transfers: IntCounter,
    failed_notifications: IntCounter,
    expired: IntCounter,
    fallbacks: IntCounter,
    pinned: IntGauge,
    /// Prefill legs (`x-prefiller-host-port`) whose prefill pod could not be reached or failed
    /// (5xx): the request was served here from scratch.
    pub prefill_leg_failures: IntCounter,
}

impl KvTransferMetrics {
    pub fn new(registry: &Registry, model_name: &str) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<Histogram> {
                let h = Histogram::with_opts(
                    HistogramOpts::new(name, help)
                        .const_label("model_name", model_name)
                        .const_label("engine", "0")
                        .buckets(buckets.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let pinned = IntGauge::with_opts(opts(
            "agent_kv_transfer_pinned_blocks",
            "Blocks of finished prefills held for decode pods to read.",
        ))?;
        registry.register(Box::new(pinned.clone()))?;
        Ok(Self {
            xfer_time: histogram(
                "vllm:nixl_xfer_time_seconds",
                "Histogram of transfer duration for KV cache transfers from prefill pods.",
                XFER_BUCKETS,
            )?,
            bytes: histogram(
                "vllm:nixl_bytes_transferred",
                "Histogram of bytes transferred per KV cache transfer.",
                BYTES_BUCKETS,
            )?,
            descriptors: histogram(
                "vllm:nixl_num_descriptors",
                "Histogram of reads (one per block region) per KV cache transfer.",
                DESCRIPTOR_BUCKETS,
            )?,
            failed_transfers: counter(
                "vllm:nixl_num_failed_transfers_total",
                "Number of failed KV cache transfers.",
            )?,
            failed_notifications: counter(
                "vllm:nixl_num_failed_notifications_total",
                "Number of failed side-channel messages.",
            )?,
            expired: counter(
                "vllm:nixl_num_kv_expired_reqs_total",
                "Number of requests whose pinned KV blocks were freed unread (prefill side).",
            )?,
            fallbacks: counter(
                "agent_kv_transfer_local_prefill_fallbacks_total",
                "Decode legs that prefilled locally because their KV could not be transferred.",
            )?,
            pinned,
            prefill_leg_failures: counter(
                "agent_kv_transfer_prefill_leg_failures_total",
                "Prefill legs whose prefill pod was unreachable or failed; served locally.",
            )?,
        })
    }

    pub fn record_stats(&self, prev: &ConnectorStats, now: &ConnectorStats) {
        let add = |c: &IntCounter, a: u64, b: u64| c.inc_by(b.saturating_sub(a));
        add(
            &self.failed_transfers,
            prev.failed_transfers,
            now.failed_transfers,
        );
        add(
            &self.failed_notifications,
            prev.failed_notifications,
            now.failed_notifications,
        );
        add(&self.expired, prev.expired_leases, now.expired_leases);
        add(
            &self.fallbacks,
            prev.local_prefill_fallbacks,
            now.local_prefill_fallbacks,
        );
        self.pinned.set(now.pinned_blocks as i64);
    }

    pub fn record_read(&self, r: &RemoteRead) {
        self.xfer_time.observe(r.seconds);
        self.bytes.observe(r.bytes as f64);
        self.descriptors.observe(r.descriptors as f64);
    }
}
