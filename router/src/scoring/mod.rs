//! Scheduling: a profile's weighted scorers rate every candidate pod, its picker orders them.
//! The order is complete (best first) so that a request whose pod refuses it goes to the next
//! best one.

mod scorers;

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::seq::SliceRandom;

pub use scorers::{PodView, Scorer, DEFAULT_QUEUE_THRESHOLD};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Picker {
    /// `max-score-picker`: highest weighted sum first, ties in random order.
    MaxScore,
    /// `random-picker`: uniform random order.
    Random,
    /// `round-robin-picker`: the candidates in turn, scores ignored (the baseline policy).
    RoundRobin,
}

impl Picker {
    pub fn plugin_type(&self) -> &'static str {
        match self {
            Self::MaxScore => "max-score-picker",
            Self::Random => "random-picker",
            Self::RoundRobin => "round-robin-picker",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightedScorer {
    /// The plugin name the profile refers to.
    pub name: String,
    pub scorer: Scorer,
    pub weight: f64,
}

/// One scheduling profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub scorers: Vec<WeightedScorer>,
    pub picker: Picker,
}

impl Profile {
    /// Whether requests must be tokenized (for the prefix index or the routing history).
    pub fn uses_prefix(&self) -> bool {
        self.uses(Scorer::PrecisePrefixCache) || self.uses(Scorer::PrefixCache)
    }

    /// Whether a scorer counts in the ranking.
    pub fn uses(&self, scorer: Scorer) -> bool {
        self.picker != Picker::RoundRobin && self.scorers.iter().any(|s| s.scorer == scorer)
    }
}

/// The candidates in the order to try them, with their weighted scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// Indexes into the candidate slice, best first.
    pub order: Vec<usize>,
    /// Weighted score sum per candidate (by candidate index).
    pub totals: Vec<f64>,
}

/// A profile with its round-robin position.
#[derive(Debug)]
pub struct Scheduler {
    profile: Profile,
    next: AtomicUsize,
}

impl Scheduler {
    pub fn new(profile: Profile) -> Self {
        Self {
            profile,
            next: AtomicUsize::new(0),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Orders `pods` (given in a stable order, e.g. by name, for round-robin to rotate over).
    pub fn rank(&self, pods: &[PodView]) -> Ranking {
        let mut totals = vec![0.0; pods.len()];
        if self.profile.picker != Picker::RoundRobin {
            for ws in &self.profile.scorers {
                for (t, s) in totals.iter_mut().zip(ws.scorer.score(pods)) {
                    *t += ws.weight * s;
                }
            }
        }
        let mut order: Vec<usize> = (0..pods.len()).collect();
        match self.profile.picker {
            Picker::MaxScore => {
                // Shuffle, then a stable sort: equal totals stay in random order.
                order.shuffle(&mut rand::rng());
                order.sort_by(|&a, &b| totals[b].total_cmp(&totals[a]));
            }
            Picker::Random => order.shuffle(&mut rand::rng()),
            Picker::RoundRobin => {
                if !order.is_empty() {
                    let start = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
                    order.rotate_left(start);
                }
            }
        }
        Ranking { order, totals }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadView;
    use std::collections::HashSet;

    fn pod(queue: f64, kv: f64, prefix: f64) -> PodView {
        PodView {
            load: Some(LoadView {
                queue,
                running: 0.0,
                kv_usage: kv,
            }),
            prefix_score: prefix,
            prefix_blocks: 0,
            routed_score: 0.0,
        }
    }

    /// llm-d's sample weights: prefix 3, KV utilization 2, queue 2.
    fn sample_profile(picker: Picker) -> Profile {
        let ws = |scorer: Scorer, weight| WeightedScorer {
            name: scorer.plugin_type().into(),
            scorer,
            weight,
        };
        Profile {
            name: "default".into(),
            scorers: vec![
                ws(Scorer::PrecisePrefixCache, 3.0),
                ws(Scorer::KvCacheUtilization, 2.0),
                ws(Scorer::Queue, 2.0),
            ],
            picker,
        }
    }

    #[test]
    fn weighted_sum_and_max_score_order() {
        let s = Scheduler::new(sample_profile(Picker::MaxScore));
        // a: full prefix hit but busy; b: idle, no prefix; c: half prefix, half loaded.
        let pods = [pod(4.0, 0.5, 1.0), pod(0.0, 0.0, 0.0), pod(2.0, 0.25, 0.5)];
        let r = s.rank(&pods);
        // a = 3*1 + 2*0.5 + 2*0 = 4; b = 0 + 2*1 + 2*1 = 4; c = 1.5 + 1.5 + 1 = 4.0
        assert_eq!(r.totals, vec![4.0, 4.0, 4.0]);
        let pods = [pod(4.0, 0.5, 1.0), pod(0.0, 0.0, 0.0), pod(2.0, 0.25, 0.75)];
        let r = s.rank(&pods);
        assert_eq!(r.totals, vec![4.0, 4.0, 4.75]);
        assert_eq!(r.order[0], 2);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let s = Scheduler::new(sample_profile(Picker::MaxScore));
        let pods = [pod(0.0, 0.0, 0.0), pod(0.0, 0.0, 0.0), pod(9.0, 0.9, 0.0)];
        let firsts: HashSet<usize> = (0..200).map(|_| s.rank(&pods).order[0]).collect();
        assert_eq!(firsts, HashSet::from([0, 1]));
        assert!((0..50).all(|_| s.rank(&pods).order[2] == 2));
    }

    #[test]
    fn round_robin_rotates_and_ignores_scores() {
        let s = Scheduler::new(sample_profile(Picker::RoundRobin));
        assert!(!s.profile().uses_prefix());
        let pods = [pod(0.0, 0.0, 1.0), pod(9.0, 1.0, 0.0), pod(0.0, 0.0, 0.0)];
        let firsts: Vec<usize> = (0..6).map(|_| s.rank(&pods).order[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(s.rank(&pods).order, vec![0, 1, 2]);
        assert_eq!(s.rank(&pods).order, vec![1, 2, 0]);
        assert!(s.rank(&[]).order.is_empty());
    }

    #[test]
    fn random_picker_visits_every_pod_first() {
        let s = Scheduler::new(sample_profile(Picker::Random));
        let pods = [pod(0.0, 0.0, 1.0), pod(9.0, 1.0, 0.0), pod(0.0, 0.0, 0.0)];
        let firsts: HashSet<usize> = (0..300).map(|_| s.rank(&pods).order[0]).collect();
        assert_eq!(firsts.len(), 3);
        let mut order = s.rank(&pods).order;
        order.sort();
        assert_eq!(order, vec![0, 1, 2]);
    }
}
