//! Pod load as the scorers see it: each pod's `/metrics` (`vllm:num_requests_waiting`,
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`) scraped on a short period (llm-d:
//! 50 ms) and considered stale after a while (llm-d: 2 s), its `/health`, and the router's own
//! count of requests in flight to it.
//!
//! A counter that goes backwards (`vllm:prompt_tokens_total`) means the pod's engine restarted
//! with an empty cache, which the monitor reports so that the pod's index entries are dropped
//! even before its new event stream says so. So does a pod that refused connections (nothing
//! listened on its port) and answers again: a new server process, whose counters may not show
//! it when the last scrape of the old one predates the traffic it served.
//!
//! A pod's queue is the router's own requests in flight to it, plus the pod's scraped waiting
//! count less the router's requests that were in flight when it was scraped. The router's count
//! is exact and current, the scrape up to one period old: subtracting what the scrape shows
//! running would hide a new request behind one that already finished, so a burst would pile
//! onto the pod that looked idle; not subtracting our own requests would count them twice, and
//! keep a finished one on an idle pod's queue until the next scrape.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Metric names read from a pod's page. vLLM before 0.10 called the KV usage gauge
/// `vllm:gpu_cache_usage_perc`.
const WAITING: &str = "vllm:num_requests_waiting";
const RUNNING: &str = "vllm:num_requests_running";
const KV_USAGE: &[&str] = &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"];
const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";

/// One scrape of a pod's engine gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    pub waiting: f64,
    pub running: f64,
    /// Fraction of KV blocks in use, 0..1.
    pub kv_usage: f64,
    /// `vllm:prompt_tokens_total`, when the page has it (restart detection).
    pub prompt_tokens: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetricsError {
    #[error("metric {0} is not on the page")]
    Missing(&'static str),
    #[error("line {line}: cannot read the value of {name}")]
    BadValue { line: usize, name: String },
}

/// Reads the load gauges from a Prometheus text page (format 0.0.4), whatever their labels.
/// Several series of one gauge (data-parallel engines) are summed; the KV usage is their mean.
pub fn parse_metrics(text: &str) -> Result<LoadSample, MetricsError> {
    // (sum, count) per wanted name; index 2.. are the KV usage spellings.
    let names = [WAITING, RUNNING, KV_USAGE[0], KV_USAGE[1], PROMPT_TOKENS];
    let mut acc = [(0.0f64, 0usize); 5];
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(i) = names.iter().position(|&w| w == &line[..name_end]) else {
            continue;
        };
        // After the labels (which may contain spaces inside quotes) comes the value, then an
        // optional timestamp.
        let rest = match line[name_end..].strip_prefix('{') {
            Some(labels) => match close_of_labels(labels) {
                Some(end) => &labels[end + 1..],
                None => "",
            },
            None => &line[name_end..],
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(parse_value)
            .ok_or_else(|| MetricsError::BadValue {
                line: n + 1,
                name: names[i].to_string(),
            })?;
        acc[i].0 += value;
        acc[i].1 += 1;
    }
    let sum = |i: usize, name: &'static str| match acc[i] {
        (_, 0) => Err(MetricsError::Missing(name)),
        (s, _) => Ok(s),
    };
    let kv = match (acc[2], acc[3]) {
        ((s, c), _) if c > 0 => s / c as f64,
        (_, (s, c)) if c > 0 => s / c as f64,
        _ => return Err(MetricsError::Missing(KV_USAGE[0])),
    };
    Ok(LoadSample {
        waiting: sum(0, WAITING)?,
        running: sum(1, RUNNING)?,
        kv_usage: kv,
        prompt_tokens: (acc[4].1 > 0).then_some(acc[4].0),
    })
}

/// Byte offset of the `}` that ends a label set (quotes and escapes respected).
fn close_of_labels(labels: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Load of one pod as scorers use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadView {
    /// Waiting requests: the router's requests in flight to the pod now, plus the pod's
    /// waiting gauge less the router's requests in flight when it was scraped (those are
    /// counted already, and may have finished since: counting them again kept a finished
    /// request on an idle pod's queue until the next scrape).
    pub queue: f64,
    pub running: f64,
    pub kv_usage: f64,
}

struct Observed {
    sample: LoadSample,
    at: Instant,
    /// The router's requests in flight to the pod when the sample was recorded.
    own_in_flight: usize,
}

/// What the router knows of one pod's load and health.
pub struct PodLoad {
    observed: Mutex<Option<Observed>>,
    /// The pod refused a connection since the last scrape.
    refused: AtomicBool,
    in_flight: AtomicUsize,
    dispatched: AtomicU64,
    healthy: AtomicBool,
}

impl Default for PodLoad {
    fn default() -> Self {
        Self::new()
    }
}

impl PodLoad {
    /// No sample yet; healthy until a probe or a connection says otherwise, so a pod can serve
    /// before its first scrape.
    pub fn new() -> Self {
        Self {
            observed: Mutex::new(None),
            refused: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            dispatched: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }

    /// Notes that the pod refused a connection (its server was not running).
    pub fn refused(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }

    /// Stores a scrape taken at `at`; true when the engine restarted: its prompt-token counter
    /// is below the previous scrape's, or it refused a connection since a previous scrape.
    pub fn record(&self, sample: LoadSample, at: Instant) -> bool {
        let mut o = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        let was_down = self.refused.swap(false, Ordering::Relaxed);
        let restarted = match (
            o.as_ref().map(|o| o.sample.prompt_tokens),
            sample.prompt_tokens,
        ) {
            // Before any scrape there is nothing to have restarted.
            (None, _) => false,
            (Some(Some(before)), Some(now)) if now < before => true,
            _ => was_down,
        };
        *o = Some(Observed {
            sample,
            at,
            own_in_flight: self.in_flight(),
        });
        restarted
    }

    /// The load, or `None` when there is no scrape younger than `stale_after` at `now`.
    pub fn view(&self, now: Instant, stale_after: Duration) -> Option<LoadView> {
        let o = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        let o = o.as_ref()?;
        if now.saturating_duration_since(o.at) > stale_after {
            return None;
        }
        Some(LoadView {
            queue: (o.sample.waiting - o.own_in_flight as f64).max(0.0) + self.in_flight() as f64,
            running: o.sample.running,
            kv_usage: o.sample.kv_usage,
        })
    }

    /// Counts a request sent to the pod until the returned guard is dropped.
    pub fn dispatch(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests sent to the pod and not finished (or abandoned) yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to the pod since the router started.
    pub fn dispatched(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }
}

/// One request in flight to a pod; dropping it (response finished, client gone) ends it.
pub struct InFlight(Arc<PodLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Scrape and probe periods.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonitorConfig {
    pub scrape_interval: Duration,
    /// `/health` is probed every this many scrape periods.
    pub health_every: u32,
    /// Per-request timeout of scrapes and probes.
    pub timeout: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_millis(50),
            health_every: 10,
            timeout: Duration::from_secs(1),
        }
    }
}

/// Scrapes `base_url`'s `/metrics` and probes its `/health` forever (abort the task to stop).
/// A failed probe marks the pod unhealthy, a successful one healthy again; a failed scrape
/// only leaves the last sample to go stale. `on_restart` runs when a scrape shows the engine
/// restarted.
pub async fn monitor(
    client: reqwest::Client,
    base_url: String,
    load: Arc<PodLoad>,
    cfg: MonitorConfig,
    on_restart: impl Fn() + Send + 'static,
) {
    let metrics_url = format!("{base_url}/metrics");
    let health_url = format!("{base_url}/health");
    let mut tick = tokio::time::interval(cfg.scrape_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u64.. {
        tick.tick().await;
        if round % u64::from(cfg.health_every.max(1)) == 0 {
            let ok = match client.get(&health_url).timeout(cfg.timeout).send().await {
                Ok(r) => r.status().is_success(),
                Err(e) => {
                    note_refused(&load, &e);
                    false
                }
            };
            if ok != load.is_healthy() {
                tracing::info!(pod = %base_url, healthy = ok, "pod health changed");
            }
            load.set_healthy(ok);
        }
        let started = Instant::now();
        let page = match client.get(&metrics_url).timeout(cfg.timeout).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            Ok(_) => None,
            Err(e) => {
                note_refused(&load, &e);
                None
            }
        };
        match page.as_deref().map(parse_metrics) {
            Some(Ok(sample)) => {
                if load.record(sample, started) {
                    tracing::warn!(pod = %base_url, "pod restarted (counters went back)");
                    on_restart();
                }
            }
            Some(Err(e)) => tracing::debug!(pod = %base_url, "unusable /metrics: {e}"),
            None => tracing::debug!(pod = %base_url, "/metrics scrape failed"),
        }
    }
}

/// Marks `load` refused when `e` is a refused connection (as opposed to a timeout, which a
/// running but slow or unreachable server also gives).
fn note_refused(load: &PodLoad, e: &reqwest::Error) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                load.refused();
                return;
            }
        }
        source = err.source();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="0",model_name="a } b \" c"} 2 1712345678000
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:num_requests_waiting_by_reason{reason="x"} 9
vllm:prefix_cache_hits_total{engine="0"} 100
"#;

    #[test]
    fn parses_gauges_whatever_the_labels() {
        let s = parse_metrics(PAGE).unwrap();
        assert_eq!(
            s,
            LoadSample {
                waiting: 3.0,
                running: 2.0,
                kv_usage: 0.25,
                prompt_tokens: None,
            }
        );
        let bare = "vllm:num_requests_waiting 1\nvllm:num_requests_running 0\n\
                    vllm:gpu_cache_usage_perc 0.5\nvllm:prompt_tokens_total{a=\"b\"} 12\n";
        let s = parse_metrics(bare).unwrap();
        assert_eq!((s.kv_usage, s.prompt_tokens), (0.5, Some(12.0)));
    }

    #[test]
    fn data_parallel_series_are_combined() {
        let page = "vllm:num_requests_waiting{engine=\"0\"} 1\n\
                    vllm:num_requests_waiting{engine=\"1\"} 2\n\
                    vllm:num_requests_running{engine=\"0\"} 4\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.2\n\
                    vllm:kv_cache_usage_perc{engine=\"1\"} 0.4\n";
        let s = parse_metrics(page).unwrap();
        assert_eq!((s.waiting, s.running), (3.0, 4.0));
        assert!((s.kv_usage - 0.3).abs() < 1e-12);
    }

    #[test]
    fn missing_or_bad_values_are_errors() {
        assert_eq!(
            parse_metrics("vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0\n"),
            Err(MetricsError::Missing(WAITING))
        );
        assert!(matches!(
            parse_metrics("vllm:num_requests_waiting{a=\"b\"} x\n"),
            Err(MetricsError::BadValue { line: 1, .. })
        ));
    }

    #[test]
    fn views_go_stale_and_count_the_routers_requests_in_flight() {
        let load = Arc::new(PodLoad::new());
        let t0 = Instant::now();
        let stale = Duration::from_secs(2);
        assert_eq!(load.view(t0, stale), None);
        let sample = LoadSample {
            waiting: 1.0,
            running: 2.0,
            kv_usage: 0.5,
            prompt_tokens: Some(100.0),
        };
        assert!(!load.record(sample, t0));
        // One waiting on the pod plus five of ours in flight.
        let ours: Vec<InFlight> = (0..5).map(|_| load.dispatch()).collect();
        assert_eq!(load.in_flight(), 5);
        let v = load.view(t0 + Duration::from_secs(1), stale).unwrap();
        assert_eq!((v.queue, v.running, v.kv_usage), (6.0, 2.0, 0.5));
        assert_eq!(load.view(t0 + Duration::from_millis(2001), stale), None);
        drop(ours);
        assert_eq!(load.in_flight(), 0);
        assert_eq!(load.view(t0, stale).unwrap().queue, 1.0);
        // A scrape taken while two of ours were in flight and waiting: once they finish, the
        // pod's queue is empty, not the scrape's two.
        let two: Vec<InFlight> = (0..2).map(|_| load.dispatch()).collect();
        let busy = LoadSample {
            waiting: 2.0,
            ..sample
        };
        assert!(!load.record(busy, t0 + Duration::from_millis(10)));
        assert_eq!(load.view(t0, stale).unwrap().queue, 2.0);
        drop(two);
        assert_eq!(load.view(t0, stale).unwrap().queue, 0.0);
        let b = load.dispatch();
        assert!(!load.record(sample, t0 + Duration::from_millis(50)));
        // The prompt-token counter going back is a restart.
        let reset = LoadSample {
            prompt_tokens: Some(3.0),
            ..sample
        };
        assert!(load.record(reset, t0 + Duration::from_millis(100)));
        assert!(!load.record(sample, t0 + Duration::from_millis(150)));
        // So is a refused connection followed by an answer, whatever the counter says.
        load.refused();
        assert!(load.record(sample, t0 + Duration::from_millis(200)));
        assert!(!load.record(sample, t0 + Duration::from_millis(250)));
        drop(b);
        assert_eq!((load.in_flight(), load.dispatched()), (0, 8));
    }

    /// Serves `page` as `/metrics` (and anything else) on `listener`, one connection at a time.
    async fn serve(listener: tokio::net::TcpListener, page: &'static str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                page.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(page.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn a_pod_that_went_down_and_answers_again_restarted() {
        // The same counter before and after: only the refused connections tell.
        const PAGE: &str = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n\
                            vllm:kv_cache_usage_perc 0\nvllm:prompt_tokens_total 0\n";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, PAGE));
        let restarts = Arc::new(AtomicUsize::new(0));
        let load = Arc::new(PodLoad::new());
        let counted = restarts.clone();
        let cfg = MonitorConfig {
            scrape_interval: Duration::from_millis(10),
            ..MonitorConfig::default()
        };
        let monitor = tokio::spawn(monitor(
            reqwest::Client::new(),
            format!("http://{addr}"),
            load.clone(),
            cfg,
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
            },
        ));
        let wait = |what: &'static str, ok: Box<dyn Fn() -> bool>| async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !ok() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let l = load.clone();
        wait(
            "a scrape",
            Box::new(move || l.view(Instant::now(), cfg.timeout).is_some()),
        )
        .await;
        assert_eq!(restarts.load(Ordering::Relaxed), 0);
        // Down: the port refuses connections.
        server.abort();
        let _ = server.await;
        let l = load.clone();
        wait(
            "a refusal",
            Box::new(move || l.refused.load(Ordering::Relaxed)),
        )
        .await;
        // Up again on the same port.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(serve(listener, PAGE));
        let r = restarts.clone();
        wait(
            "the restart",
            Box::new(move || r.load(Ordering::Relaxed) == 1),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            restarts.load(Ordering::Relaxed),
            1,
            "one restart, reported once"
        );
        monitor.abort();
        server.abort();
    }
}
