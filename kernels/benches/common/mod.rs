//! Helpers shared by the benchmarks: the kernels' own, and the agent's (included by path).

/// The median of `v`, sorted in place (the upper middle one of an even count).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
