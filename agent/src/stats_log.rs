//! vLLM's periodic stats line (its `LoggingStatLogger`): every interval, the prompt and
//! generation throughput since the last line, running and waiting requests, KV cache usage and
//! the prefix cache hit rate, read from the engine's metrics. At info while there is traffic
//! (and once more as it stops, so the last line shows the pod idle), at debug otherwise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// vLLM's default `VLLM_LOG_STATS_INTERVAL`, in seconds.
pub const DEFAULT_INTERVAL_SECS: f64 = 10.0;

/// The interval from `VLLM_LOG_STATS_INTERVAL` (seconds, > 0), else the default.
pub fn interval(env: Option<&str>) -> Duration {
    let secs = env
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(DEFAULT_INTERVAL_SECS);
    Duration::from_secs_f64(secs)
}

/// The counters and gauges one line is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub running: f64,
    pub waiting: f64,
    /// 0..=1.
    pub kv_cache_usage: f64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
}

impl Snapshot {
    pub fn read(m: &Metrics) -> Self {
        Self {
            prompt_tokens: m.prompt_tokens.get(),
            generation_tokens: m.generation_tokens.get(),
            running: m.num_requests_running.get(),
            waiting: m.num_requests_waiting.get(),
            kv_cache_usage: m.kv_cache_usage_perc.get(),
            prefix_cache_queries: m.prefix_cache_queries.get(),
            prefix_cache_hits: m.prefix_cache_hits.get(),
        }
    }
}

/// One computed line and whether it belongs at info.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsLine {
    pub text: String,
    pub busy: bool,
}

/// Turns successive snapshots into lines; pure, so the arithmetic is tested without a clock.
#[derive(Debug)]
pub struct StatsLogger {
    last: Snapshot,
    last_busy: bool,
}

impl StatsLogger {
    pub fn new(start: Snapshot) -> Self {
        Self {
            last: start,
            last_busy: false,
        }
    }

    /// The line for the `elapsed` seconds since the previous one.
    pub fn line(&mut self, now: Snapshot, elapsed: f64) -> StatsLine {
        let per_sec = |a: u64, b: u64| a.saturating_sub(b) as f64 / elapsed.max(1e-9);
        let prompt = per_sec(now.prompt_tokens, self.last.prompt_tokens);
        let generation = per_sec(now.generation_tokens, self.last.generation_tokens);
        let queries = now
            .prefix_cache_queries
            .saturating_sub(self.last.prefix_cache_queries);
        let hits = now
            .prefix_cache_hits
            .saturating_sub(self.last.prefix_cache_hits);
        let hit_rate = if queries == 0 {
            0.0
        } else {
            hits as f64 / queries as f64
        };
        let active = prompt > 0.0 || generation > 0.0 || now.running > 0.0 || now.waiting > 0.0;
        let busy = active || self.last_busy;
        self.last = now;
        self.last_busy = active;
        StatsLine {
            text: format!(
                "Engine 000: Avg prompt throughput: {prompt:.1} tokens/s, Avg generation \
                 throughput: {generation:.1} tokens/s, Running: {} reqs, Waiting: {} reqs, GPU KV \
                 cache usage: {:.1}%, Prefix cache hit rate: {:.1}%",
                now.running as u64,
                now.waiting as u64,
                now.kv_cache_usage * 100.0,
                hit_rate * 100.0,
            ),
            busy,
        }
    }
}

/// Logs a stats line every `every` until the runtime shuts down.
pub async fn run(metrics: Arc<Metrics>, every: Duration) {
    let mut logger = StatsLogger::new(Snapshot::read(&metrics));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let line = logger.line(Snapshot::read(&metrics), (now - last).as_secs_f64());
        last = now;
        if line.busy {
            tracing::info!("{}", line.text);
        } else {
            tracing::debug!("{}", line.text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_and_hit_rate_are_over_the_interval() {
        let mut logger = StatsLogger::new(Snapshot {
            prompt_tokens: 100,
            generation_tokens: 50,
            prefix_cache_queries: 10,
            prefix_cache_hits: 10,
            ..Snapshot::default()
        });
        let line = logger.line(
            Snapshot {
                prompt_tokens: 300,
                generation_tokens: 150,
                running: 3.0,
                waiting: 1.0,
                kv_cache_usage: 0.125,
                prefix_cache_queries: 50,
                prefix_cache_hits: 20,
            },
            10.0,
        );
        assert_eq!(
            line.text,
            "Engine 000: Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: \
             10.0 tokens/s, Running: 3 reqs, Waiting: 1 reqs, GPU KV cache usage: 12.5%, \
             Prefix cache hit rate: 25.0%"
        );
        assert!(line.busy);
    }

    #[test]
    fn one_busy_line_after_traffic_stops_then_quiet() {
        let mut logger = StatsLogger::new(Snapshot::default());
        let idle = Snapshot::default();
        assert!(!logger.line(idle, 10.0).busy);
        let busy = Snapshot {
            generation_tokens: 10,
            running: 1.0,
            ..idle
        };
        assert!(logger.line(busy, 10.0).busy);
        let done = Snapshot {
            running: 0.0,
            ..busy
        };
        // The line that shows the pod gone idle is still at info, the next is not.
        let after = logger.line(done, 10.0);
        assert!(after.busy);
        assert!(after
            .text
            .contains("Avg generation throughput: 0.0 tokens/s, Running: 0 reqs"));
        assert!(!logger.line(done, 10.0).busy);
    }

    #[test]
    fn interval_from_env() {
        assert_eq!(interval(None), Duration::from_secs(10));
        assert_eq!(interval(Some("2.5")), Duration::from_millis(2500));
        assert_eq!(interval(Some("0")), Duration::from_secs(10));
        assert_eq!(interval(Some("soon")), Duration::from_secs(10));
    }
}
