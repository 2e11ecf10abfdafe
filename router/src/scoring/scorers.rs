//! The scorers, with llm-d's semantics: each maps every candidate pod to a score in [0, 1]
//! (1 = best). A pod whose load is unknown or stale gets 0 from the load scorers.

use crate::load::LoadView;

/// Default `load-aware-scorer` threshold (llm-d: `queueThreshold` 128).
pub const DEFAULT_QUEUE_THRESHOLD: f64 = 128.0;

/// What the scorers know about one candidate pod for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    /// `None`: no fresh scrape.
    pub load: Option<LoadView>,
    /// The prefix index's tier-weighted share of the prompt's blocks the pod holds, 0..1.
    pub prefix_score: f64,
    /// Leading prompt blocks the pod holds.
    pub prefix_blocks: usize,
    /// The share of the prompt's leading blocks this router sent the pod before, 0..1.
    pub routed_score: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scorer {
    /// `precise-prefix-cache-scorer`: the index's longest-prefix score.
    PrecisePrefixCache,
    /// `prefix-cache-scorer` (the Inference Gateway's approximate one): the routing history's
    /// longest-prefix share, no events needed.
    PrefixCache,
    /// `kv-cache-utilization-scorer`: `1 - kv_cache_usage_perc`.
    KvCacheUtilization,
    /// `queue-scorer`: `(maxQ - q) / (maxQ - minQ)` over the candidates, 1 when all equal.
    Queue,
    /// `load-aware-scorer`: 0.5 for an empty queue, else `0.5 * (1 - min(q, T) / T)`.
    LoadAware { threshold: f64 },
}

impl Scorer {
    /// The plugin type this scorer is configured with.
    pub fn plugin_type(&self) -> &'static str {
        match self {
            Self::PrecisePrefixCache => "precise-prefix-cache-scorer",
            Self::PrefixCache => "prefix-cache-scorer",
            Self::KvCacheUtilization => "kv-cache-utilization-scorer",
            Self::Queue => "queue-scorer",
            Self::LoadAware { .. } => "load-aware-scorer",
        }
    }

    /// One score per pod, each clamped to [0, 1].
    pub fn score(&self, pods: &[PodView]) -> Vec<f64> {
        let raw: Vec<f64> = match self {
            Self::PrecisePrefixCache => pods.iter().map(|p| p.prefix_score).collect(),
            Self::PrefixCache => pods.iter().map(|p| p.routed_score).collect(),
            Self::KvCacheUtilization => pods
                .iter()
                .map(|p| p.load.map_or(0.0, |l| 1.0 - l.kv_usage))
                .collect(),
            Self::Queue => queue_scores(pods),
            Self::LoadAware { threshold } => pods
                .iter()
                .map(|p| p.load.map_or(0.0, |l| load_aware(l.queue, *threshold)))
                .collect(),
        };
        raw.into_iter().map(clamp01).collect()
    }
}

fn clamp01(s: f64) -> f64 {
    if s.is_nan() {
        0.0
    } else {
        s.clamp(0.0, 1.0)
    }
}

/// Min-max normalised queue lengths over the pods with a known load.
fn queue_scores(pods: &[PodView]) -> Vec<f64> {
    let known = pods.iter().filter_map(|p| p.load.map(|l| l.queue));
    let (min, max) = known.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), q| {
        (lo.min(q), hi.max(q))
    });
    pods.iter()
        .map(|p| match p.load {
            None => 0.0,
            Some(_) if max <= min => 1.0,
            Some(l) => (max - l.queue) / (max - min),
        })
        .collect()
}

fn load_aware(queue: f64, threshold: f64) -> f64 {
    if queue <= 0.0 {
        return 0.5;
    }
    let t = threshold.max(f64::MIN_POSITIVE);
    0.5 * (1.0 - queue.min(t) / t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(queue: f64, kv: f64) -> PodView {
        PodView {
            load: Some(LoadView {
                queue,
                running: 0.0,
                kv_usage: kv,
            }),
            prefix_score: 0.0,
            prefix_blocks: 0,
            routed_score: 0.0,
        }
    }

    fn stale() -> PodView {
        PodView {
            load: None,
            prefix_score: 0.0,
            prefix_blocks: 0,
            routed_score: 0.0,
        }
    }

    #[test]
    fn queue_scorer_is_min_max_normalised() {
        let pods = [pod(0.0, 0.0), pod(5.0, 0.0), pod(10.0, 0.0), stale()];
        assert_eq!(Scorer::Queue.score(&pods), vec![1.0, 0.5, 0.0, 0.0]);
        let equal = [pod(3.0, 0.0), pod(3.0, 0.0)];
        assert_eq!(Scorer::Queue.score(&equal), vec![1.0, 1.0]);
    }

    #[test]
    fn kv_cache_utilization_scorer() {
        let pods = [pod(0.0, 0.0), pod(0.0, 0.25), pod(0.0, 1.0), stale()];
        assert_eq!(
            Scorer::KvCacheUtilization.score(&pods),
            vec![1.0, 0.75, 0.0, 0.0]
        );
        // A usage gauge out of range is clamped, not trusted.
        assert_eq!(
            Scorer::KvCacheUtilization.score(&[pod(0.0, 1.5), pod(0.0, -1.0)]),
            vec![0.0, 1.0]
        );
    }

    #[test]
    fn load_aware_scorer() {
        let s = Scorer::LoadAware {
            threshold: DEFAULT_QUEUE_THRESHOLD,
        };
        let pods = [
            pod(0.0, 0.0),
            pod(32.0, 0.0),
            pod(64.0, 0.0),
            pod(128.0, 0.0),
        ];
        assert_eq!(s.score(&pods), vec![0.5, 0.375, 0.25, 0.0]);
        assert_eq!(s.score(&[pod(500.0, 0.0), stale()]), vec![0.0, 0.0]);
    }

    #[test]
    fn prefix_scorer_passes_the_index_score_through_clamped() {
        let mut a = stale();
        a.prefix_score = 0.8;
        let mut b = stale();
        b.prefix_score = 1.2;
        assert_eq!(
            Scorer::PrecisePrefixCache.score(&[a.clone(), b.clone()]),
            vec![0.8, 1.0]
        );
        a.routed_score = 0.25;
        assert_eq!(Scorer::PrefixCache.score(&[a, b]), vec![0.25, 0.0]);
    }
}
