//! The KV connector's metrics: vLLM's `vllm:kv_offload_*` and `vllm:external_prefix_cache_*`
//! names where they exist (reference tiers-pd.md §1), `agent_` otherwise. Device ↔ CPU tier
//! copies are vLLM's load / store, CPU tier ↔ files its tiering read / write; the running totals
//! of [`ConnectorStats`] advance as deltas, each [`Transfer`] is observed once.

use kvcache::{ConnectorStats, Direction, Medium, Transfer};
use prometheus::{
    Counter, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

/// vLLM's `TRANSFER_SIZE_BUCKETS` (bytes per transfer).
const SIZE_BUCKETS: &[f64] = &[1e6, 5e6, 10e6, 20e6, 40e6, 60e6, 80e6, 100e6, 150e6, 200e6];
/// Seconds per transfer: a block memcpy to a read of many files.
const SECONDS_BUCKETS: &[f64] = &[
    1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];
/// vLLM's tier labels of the tiering metrics: the CPU tier, then the file system.
const TIERS: [&str; 2] = ["0:primary", "1:fs"];

pub struct OffloadMetrics {
    load_bytes: IntCounter,
    store_bytes: IntCounter,
    load_time: Counter,
    store_time: Counter,
    load_size: Histogram,
    store_size: Histogram,
    read_bytes: IntCounter,
    write_bytes: IntCounter,
    read_time: Counter,
    write_time: Counter,
    transfer_seconds: HistogramVec,
    chunk_queries: IntCounterVec,
    chunk_hits: IntCounterVec,
    pub external_queries: IntCounter,
    pub external_hits: IntCounter,
    hit_tokens: IntCounter,
    evicted_blocks: IntCounter,
    stores_skipped: IntCounter,
    store_failures: IntCounter,
    corrupt_blocks: IntCounter,
    usage: Gauge,
}

impl OffloadMetrics {
    /// Registers them in `registry`, labelled as every engine metric (`model_name`, `engine`).
    pub fn new(registry: &Registry, model_name: &str) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        let hopts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .const_label("model_name", model_name)
                .const_label("engine", "0")
                .buckets(buckets.to_vec())
        };
        let register = |c: Box<dyn prometheus::core::Collector>| registry.register(c);
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(name, help))?;
            register(Box::new(c.clone()))?;
            Ok(c)
        };
        let seconds = |name: &str, help: &str| -> prometheus::Result<Counter> {
            let c = Counter::with_opts(opts(name, help))?;
            register(Box::new(c.clone()))?;
            Ok(c)
        };
        let sizes = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(hopts(name, help, SIZE_BUCKETS))?;
            register(Box::new(h.clone()))?;
            Ok(h)
        };
        let per_tier = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(opts(name, help), &["tier"])?;
            register(Box::new(c.clone()))?;
            for tier in TIERS {
                c.with_label_values(&[tier]);
            }
            Ok(c)
        };
        let transfer_seconds = HistogramVec::new(
            hopts(
                "agent_kv_offload_transfer_seconds",
                "Seconds per KV transfer, by tier (CPU: device pool copies; STORAGE: file \
                 reads and writes) and direction.",
                SECONDS_BUCKETS,
            ),
            &["tier", "direction"],
        )?;
        register(Box::new(transfer_seconds.clone()))?;
        let usage = Gauge::with_opts(opts(
            "vllm:kv_offload_cpu_cache_usage_perc",
            "CPU KV tier usage. 1 means 100 percent usage.",
        ))?;
        register(Box::new(usage.clone()))?;
        Ok(Self {
            load_bytes: counter(
                "vllm:kv_offload_load_bytes_total",
                "Bytes loaded from the CPU KV tier into the device pool.",
            )?,
            store_bytes: counter(
                "vllm:kv_offload_store_bytes_total",
                "Bytes stored from the device pool into the CPU KV tier.",
            )?,
            load_time: seconds(
                "vllm:kv_offload_load_time_total",
                "Seconds spent loading blocks into the device pool.",
            )?,
            store_time: seconds(
                "vllm:kv_offload_store_time_total",
                "Seconds spent storing blocks out of the device pool.",
            )?,
            load_size: sizes(
                "vllm:kv_offload_load_size",
                "Bytes per load into the device pool.",
            )?,
            store_size: sizes(
                "vllm:kv_offload_store_size",
                "Bytes per store out of the device pool.",
            )?,
            read_bytes: counter(
                "vllm:kv_offload_tiering_read_bytes_total",
                "Bytes read from the storage tier's files.",
            )?,
            write_bytes: counter(
                "vllm:kv_offload_tiering_write_bytes_total",
                "Bytes written to the storage tier's files.",
            )?,
            read_time: seconds(
                "vllm:kv_offload_tiering_read_time_total",
                "Seconds the storage tier's readers spent reading files.",
            )?,
            write_time: seconds(
                "vllm:kv_offload_tiering_write_time_total",
                "Seconds the storage tier's writers spent writing files.",
            )?,
            transfer_seconds,
            chunk_queries: per_tier(
                "vllm:kv_offload_tiering_chunk_queries_total",
                "Blocks looked up in each KV tier (the file system's: those the CPU tier lacked).",
            )?,
            chunk_hits: per_tier(
                "vllm:kv_offload_tiering_chunk_hits_total",
                "Blocks found in each KV tier.",
            )?,
            external_queries: counter(
                "vllm:external_prefix_cache_queries_total",
                "Prompt tokens of admitted requests looked up through the KV connector.",
            )?,
            external_hits: counter(
                "vllm:external_prefix_cache_hits_total",
                "Prompt tokens of admitted requests the KV connector supplied.",
            )?,
            hit_tokens: counter(
                "agent_kv_offload_hit_tokens_total",
                "Prompt tokens of admitted requests supplied by the KV tiers.",
            )?,
            evicted_blocks: counter(
                "agent_kv_offload_evicted_blocks_total",
                "Blocks evicted from the CPU KV tier to make room.",
            )?,
            stores_skipped: counter(
                "vllm:kv_offload_stores_skipped_total",
                "Blocks not stored in the storage tier: its write queue was full.",
            )?,
            store_failures: counter(
                "agent_kv_offload_store_failures_total",
                "Blocks the storage tier failed to write (a full or read-only volume).",
            )?,
            corrupt_blocks: counter(
                "agent_kv_offload_corrupt_blocks_total",
                "Stored blocks found damaged when read back (removed and recomputed).",
            )?,
            usage,
        })
    }

    /// Advances the running totals from `prev` to `now`.
    pub fn record_stats(&self, prev: &ConnectorStats, now: &ConnectorStats) {
        let add = |c: &IntCounter, a: u64, b: u64| c.inc_by(b.saturating_sub(a));
        add(&self.hit_tokens, prev.hit_tokens, now.hit_tokens);
        add(
            &self.evicted_blocks,
            prev.evicted_blocks,
            now.evicted_blocks,
        );
        add(
            &self.stores_skipped,
            prev.stores_skipped,
            now.stores_skipped,
        );
        add(
            &self.store_failures,
            prev.store_failures,
            now.store_failures,
        );
        add(
            &self.corrupt_blocks,
            prev.corrupt_blocks,
            now.corrupt_blocks,
        );
        let tiers = [
            (
                prev.primary_queried,
                now.primary_queried,
                prev.primary_hits,
                now.primary_hits,
            ),
            (
                prev.secondary_queried,
                now.secondary_queried,
                prev.secondary_hits,
                now.secondary_hits,
            ),
        ];
        for (tier, (q0, q1, h0, h1)) in TIERS.iter().zip(tiers) {
            add(&self.chunk_queries.with_label_values(&[tier]), q0, q1);
            add(&self.chunk_hits.with_label_values(&[tier]), h0, h1);
        }
        if now.capacity_blocks > 0 {
            self.usage
                .set(now.used_blocks as f64 / now.capacity_blocks as f64);
        }
    }

    pub fn record_transfer(&self, t: &Transfer) {
        let (bytes, time, size) = match (t.medium, t.direction) {
            (Medium::Storage, Direction::Load) => (&self.read_bytes, &self.read_time, None),
            (Medium::Storage, Direction::Store) => (&self.write_bytes, &self.write_time, None),
            (_, Direction::Load) => (&self.load_bytes, &self.load_time, Some(&self.load_size)),
            (_, Direction::Store) => (&self.store_bytes, &self.store_time, Some(&self.store_size)),
        };
        bytes.inc_by(t.bytes);
        time.inc_by(t.seconds.max(0.0));
        if let Some(size) = size {
            size.observe(t.bytes as f64);
        }
        let direction = match t.direction {
            Direction::Load => "load",
            Direction::Store => "store",
        };
        self.transfer_seconds
            .with_label_values(&[t.medium.as_str(), direction])
            .observe(t.seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_land_in_vllm_names_by_tier() {
        let registry = Registry::new();
        let m = OffloadMetrics::new(&registry, "m").unwrap();
        let t = |medium, direction, bytes| Transfer {
            medium,
            direction,
            bytes,
            seconds: 0.002,
        };
        m.record_transfer(&t(Medium::Cpu, Direction::Load, 3_000_000));
        m.record_transfer(&t(Medium::Storage, Direction::Store, 368_640));
        let now = ConnectorStats {
            primary_queried: 10,
            primary_hits: 4,
            secondary_queried: 6,
            secondary_hits: 5,
            ..ConnectorStats::default()
        };
        m.record_stats(&ConnectorStats::default(), &now);
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            "vllm:kv_offload_load_bytes_total{engine=\"0\",model_name=\"m\"} 3000000",
            "vllm:kv_offload_load_size_bucket{engine=\"0\",model_name=\"m\",le=\"5000000\"} 1",
            "vllm:kv_offload_load_size_bucket{engine=\"0\",model_name=\"m\",le=\"1000000\"} 0",
            "vllm:kv_offload_tiering_write_bytes_total{engine=\"0\",model_name=\"m\"} 368640",
            "vllm:kv_offload_store_bytes_total{engine=\"0\",model_name=\"m\"} 0",
            "agent_kv_offload_transfer_seconds_count{direction=\"store\",engine=\"0\",model_name=\"m\",tier=\"STORAGE\"} 1",
            "vllm:kv_offload_tiering_chunk_hits_total{engine=\"0\",model_name=\"m\",tier=\"0:primary\"} 4",
            "vllm:kv_offload_tiering_chunk_queries_total{engine=\"0\",model_name=\"m\",tier=\"1:fs\"} 6",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
