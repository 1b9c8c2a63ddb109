//! What the hold counts, exported as metrics.

use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};

/// What the hold counts, exported as metrics (cheap to clone: the values are shared).
#[derive(Clone, Debug)]
pub struct HoldMetrics {
    /// Packets held now.
    pub held_now: Gauge,
    /// Held packets by what became of them (`held`, `retransmission`, `over_limit_vip`,
    /// `over_limit_total`, `replayed`, `answered`, `abandoned`, `expired`, `discarded`,
    /// `replay_failed`).
    pub packets: Family<[(&'static str, &'static str); 1], Counter>,
    /// Seconds from the first packet held for a VIP to its first replay.
    pub wait_seconds: Histogram,
}

impl Default for HoldMetrics {
    fn default() -> Self {
        let metrics = Self {
            held_now: Gauge::default(),
            packets: Family::default(),
            wait_seconds: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        };
        // Every series from the start, at zero.
        for outcome in [
            "held",
            "replayed",
            "answered",
            "abandoned",
            "expired",
            "discarded",
            "replay_failed",
            "retransmission",
            "over_limit_vip",
            "over_limit_total",
            "not_understood",
        ] {
            metrics.count(outcome, 0);
        }
        metrics
    }
}

impl HoldMetrics {
    /// Counts `n` packets with `outcome`.
    pub(super) fn count(&self, outcome: &'static str, n: u64) {
        self.packets
            .get_or_create(&[("outcome", outcome)])
            .inc_by(n);
    }
}
