//! The router's own Prometheus metrics (`router_*`): routing decisions per pod, prefix blocks
//! matched per decision, decision latency, retries; and, sampled when `/metrics` is rendered,
//! per-pod in-flight/health/load, the index size, and the event streams' counters and lag, over
//! all pods and per pod.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use std::sync::atomic::Ordering;

use crate::events::{IngestStats, StreamStats};
use crate::index::IndexStats;
use crate::pods::Pod;

const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];
const BLOCK_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

pub struct RouterMetrics {
    registry: Registry,
    decisions: IntCounterVec,
    prefix_hit_blocks: Histogram,
    decision_latency: Histogram,
    retries: IntCounter,
    upstream_failures: IntCounterVec,
    broken_responses: IntCounterVec,
    pod_in_flight: GaugeVec,
    pod_healthy: GaugeVec,
    pod_queue: GaugeVec,
    pod_kv_usage: GaugeVec,
    index_keys: IntGauge,
    index_entries: IntGauge,
    index_engine_hashes: IntGauge,
    index_unresolved: IntGauge,
    index_refused: IntGauge,
    event_lag: Gauge,
    event_counts: GaugeVec,
    pod_event_lag: GaugeVec,
    pod_event_counts: GaugeVec,
}

impl RouterMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        // process_* (memory, CPU seconds, open fds, start time), as the agent and vLLM give.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, GaugeVec::new(Opts::new(name, help), labels)?)
        };
        let pod_gauge = |name: &str, help: &str| gauge_vec(name, help, &["pod"]);
        let int_gauge = |name: &str, help: &str| registered(&registry, IntGauge::new(name, help)?);
        let histogram = |name: &str, help: &str, b: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(b.to_vec());
            registered(&registry, Histogram::with_opts(opts)?)
        };
        let pod_counter = |name: &str, help: &str| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &["pod"])?,
            )
        };
        const COUNTERS: &str = "(batches, events, decode_errors, gaps, replays, \
                                replay_failures, resets, duplicates)";
        Ok(Self {
            decisions: pod_counter("router_decisions_total", "Requests routed, by chosen pod.")?,
            prefix_hit_blocks: histogram(
                "router_prefix_hit_blocks",
                "Leading prompt blocks the chosen pod holds, per decision.",
                BLOCK_BUCKETS,
            )?,
            decision_latency: histogram(
                "router_decision_latency_seconds",
                "Time from request arrival to the pod choice (parsing, tokenizing, scoring).",
                LATENCY_BUCKETS,
            )?,
            retries: registered(
                &registry,
                IntCounter::new(
                    "router_retries_total",
                    "Requests sent to another pod after the first choice refused them.",
                )?,
            )?,
            upstream_failures: pod_counter(
                "router_upstream_failures_total",
                "Attempts a pod refused (connection failed or 503) before any byte was sent.",
            )?,
            broken_responses: pod_counter(
                "router_upstream_broken_responses_total",
                "Responses the pod cut after their head (a stream then ends with an error event).",
            )?,
            pod_in_flight: pod_gauge("router_pod_in_flight", "Requests in flight, per pod.")?,
            pod_healthy: pod_gauge("router_pod_healthy", "1 when the pod's /health passes.")?,
            pod_queue: pod_gauge(
                "router_pod_queue",
                "Waiting requests the scorers see (-1: load unknown or stale).",
            )?,
            pod_kv_usage: pod_gauge(
                "router_pod_kv_cache_usage_perc",
                "KV cache usage the scorers see (-1: unknown or stale).",
            )?,
            index_keys: int_gauge("router_index_keys", "Block keys in the prefix index.")?,
            index_entries: int_gauge(
                "router_index_pod_entries",
                "(block key, pod) pairs in the prefix index.",
            )?,
            index_engine_hashes: int_gauge(
                "router_index_engine_hashes",
                "Engine block hashes mapped to router keys, over all pods.",
            )?,
            index_unresolved: int_gauge(
                "router_index_unresolved_blocks",
                "Stored blocks whose parent or hash could not be resolved.",
            )?,
            index_refused: int_gauge(
                "router_index_refused_blocks",
                "Stored blocks not indexed because their pod was at the per-pod block limit.",
            )?,
            event_lag: registered(
                &registry,
                Gauge::new(
                    "router_event_lag_seconds",
                    "Age of the last applied KV event batch when it was applied (its timestamp to \
                 then).",
                )?,
            )?,
            event_counts: gauge_vec(
                "router_kv_events",
                &format!(
                    "KV event ingestion counters over all pods {COUNTERS}, and unknown_topics \
                     (centralized-mode messages naming no known pod)."
                ),
                &["counter"],
            )?,
            pod_event_lag: pod_gauge(
                "router_pod_event_lag_seconds",
                "Age of a pod's last applied KV event batch when it was applied.",
            )?,
            pod_event_counts: gauge_vec(
                "router_pod_kv_events",
                &format!("KV event ingestion counters per followed pod {COUNTERS}."),
                &["pod", "counter"],
            )?,
            registry,
        })
    }

    /// Records one routing decision.
    pub fn decision(&self, pod: &str, prefix_blocks: usize, latency_seconds: f64) {
        self.decisions.with_label_values(&[pod]).inc();
        self.prefix_hit_blocks.observe(prefix_blocks as f64);
        self.decision_latency.observe(latency_seconds);
    }

    /// Records a pod refusing an attempt.
    pub fn upstream_failure(&self, pod: &str) {
        self.upstream_failures.with_label_values(&[pod]).inc();
    }

    /// The counter of `pod`'s responses cut after their head.
    pub fn broken_responses(&self, pod: &str) -> prometheus::IntCounter {
        self.broken_responses.with_label_values(&[pod])
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    /// Renders the page, sampling the live state first.
    pub fn render(
        &self,
        pods: &[std::sync::Arc<Pod>],
        stale_after: std::time::Duration,
        index: IndexStats,
        events: &IngestStats,
    ) -> String {
        let now = std::time::Instant::now();
        for g in [
            &self.pod_in_flight,
            &self.pod_healthy,
            &self.pod_queue,
            &self.pod_kv_usage,
        ] {
            g.reset();
        }
        for p in pods {
            let name = [&*p.name];
            self.pod_in_flight
                .with_label_values(&name)
                .set(p.load.in_flight() as f64);
            self.pod_healthy
                .with_label_values(&name)
                .set(if p.load.is_healthy() { 1.0 } else { 0.0 });
            let view = p.load.view(now, stale_after);
            self.pod_queue
                .with_label_values(&name)
                .set(view.map_or(-1.0, |v| v.queue));
            self.pod_kv_usage
                .with_label_values(&name)
                .set(view.map_or(-1.0, |v| v.kv_usage));
        }
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.index_keys.set(clamp(index.keys as u64));
        self.index_entries.set(clamp(index.pod_entries as u64));
        self.index_engine_hashes
            .set(clamp(index.engine_hashes as u64));
        self.index_unresolved.set(clamp(index.unresolved_blocks));
        self.index_refused.set(clamp(index.refused_blocks));
        self.event_lag.set(lag_seconds(&events.totals));
        let unknown = ("unknown_topics", &events.unknown_topics);
        for (counter, v) in events.totals.counters().into_iter().chain([unknown]) {
            self.event_counts
                .with_label_values(&[counter])
                .set(v.load(Ordering::Relaxed) as f64);
        }
        // Removed pods' series go.
        self.pod_event_lag.reset();
        self.pod_event_counts.reset();
        for (pod, stats) in events.per_pod() {
            self.pod_event_lag
                .with_label_values(&[&*pod])
                .set(lag_seconds(&stats));
            for (counter, v) in stats.counters() {
                self.pod_event_counts
                    .with_label_values(&[&*pod, counter])
                    .set(v.load(Ordering::Relaxed) as f64);
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `c`, registered with `registry`.
fn registered<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> prometheus::Result<C> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn lag_seconds(s: &StreamStats) -> f64 {
    s.last_lag_us.load(Ordering::Relaxed) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_decisions_index_and_streams() {
        let m = RouterMetrics::new().unwrap();
        m.decision("a", 3, 0.0002);
        m.decision("a", 0, 0.0004);
        m.decision("b", 1, 0.00001);
        m.upstream_failure("b");
        m.retry();
        let stats = IndexStats {
            pods: 2,
            keys: 10,
            pod_entries: 12,
            engine_hashes: 12,
            unresolved_blocks: 1,
            refused_blocks: 3,
        };
        let events = IngestStats::default();
        events.totals.gaps.store(1, Ordering::Relaxed);
        events.totals.last_lag_us.store(250_000, Ordering::Relaxed);
        let pod_a = events.pod(&"a".into());
        pod_a.gaps.store(1, Ordering::Relaxed);
        pod_a.batches.store(7, Ordering::Relaxed);
        pod_a.last_lag_us.store(250_000, Ordering::Relaxed);
        events.pod(&"b".into()).resets.store(2, Ordering::Relaxed);
        let page = m.render(&[], std::time::Duration::from_secs(2), stats, &events);
        for line in [
            "router_decisions_total{pod=\"a\"} 2",
            "router_decisions_total{pod=\"b\"} 1",
            "router_prefix_hit_blocks_sum 4",
            "router_prefix_hit_blocks_count 3",
            "router_decision_latency_seconds_bucket{le=\"0.00025\"} 2",
            "router_upstream_failures_total{pod=\"b\"} 1",
            "router_retries_total 1",
            "router_index_keys 10",
            "router_index_pod_entries 12",
            "router_index_refused_blocks 3",
            "router_event_lag_seconds 0.25",
            "router_kv_events{counter=\"gaps\"} 1",
            "router_pod_kv_events{counter=\"gaps\",pod=\"a\"} 1",
            "router_pod_kv_events{counter=\"batches\",pod=\"a\"} 7",
            "router_pod_kv_events{counter=\"gaps\",pod=\"b\"} 0",
            "router_pod_kv_events{counter=\"resets\",pod=\"b\"} 2",
            "router_pod_event_lag_seconds{pod=\"a\"} 0.25",
            "router_pod_event_lag_seconds{pod=\"b\"} 0",
        ] {
            assert!(page.contains(line), "missing {line:?} in\n{page}");
        }
        // A removed pod's series go at the next render.
        events.remove_pod("b");
        let page = m.render(&[], std::time::Duration::from_secs(2), stats, &events);
        assert!(page.contains("router_pod_event_lag_seconds{pod=\"a\"}"));
        assert!(!page.contains("router_pod_event_lag_seconds{pod=\"b\"}"));
        assert!(!page.contains("router_pod_kv_events{counter=\"resets\",pod=\"b\"}"));
    }
}
