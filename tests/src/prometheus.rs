//! Reading the agent's `/metrics` (Prometheus text) in tests.

/// The value of the sample `series` (metric name and labels, as printed) in `metrics`, if any.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
