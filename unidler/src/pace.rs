//! When to take the next batch of records that arrive one by one: at once while they come
//! slowly (one hit, one connection: no added latency) or in bulk (a backlog goes out as fast
//! as it can); not before a short pace while they come quickly in ones and twos (a flood over
//! many idle VIPs lets through a thousand hits a second), so that each wake-up, read or
//! transaction carries many. What costs the agent under load is waking up and the transaction,
//! not the record.

use std::time::Duration;

use tokio::time::Instant;

/// Decides when the next batch may be taken, from the size of the last ones and their rate.
#[derive(Clone, Debug)]
pub struct Pacer {
    pace: Duration,
    busy_per_second: f64,
    bulk: usize,
    /// When the last batch of records was taken.
    last: Option<Instant>,
    not_before: Option<Instant>,
}

impl Pacer {
    /// Paces batches `pace` apart while records come faster than `busy_per_second` and each
    /// batch holds fewer than `bulk`.
    pub fn new(pace: Duration, busy_per_second: u32, bulk: usize) -> Self {
        Self {
            pace,
            busy_per_second: f64::from(busy_per_second),
            bulk,
            last: None,
            not_before: None,
        }
    }

    /// When the next batch may be taken; None: at once.
    pub fn not_before(&self) -> Option<Instant> {
        self.not_before.filter(|at| *at > Instant::now())
    }

    /// Records that a batch of `records` was taken at `now`.
    pub fn taken(&mut self, records: usize, now: Instant) {
        if records == 0 {
            // Nothing came: the rate is unknown, the next record is taken at once.
            self.not_before = None;
            return;
        }
        let quick = self.last.is_some_and(|last| {
            let since = now.saturating_duration_since(last).as_secs_f64();
            records as f64 > self.busy_per_second * since
        });
        self.not_before = (quick && records < self.bulk).then(|| now + self.pace);
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacer() -> Pacer {
        Pacer::new(10 * MS, 250, 64)
    }

    #[test]
    fn records_that_come_slowly_are_taken_at_once() {
        let (mut pacer, start) = (pacer(), Instant::now());
        for i in 0..100u32 {
            // One every 5 ms: 200 a second, under the busy rate.
            pacer.taken(1, start + 5 * MS * i);
            assert_eq!(pacer.not_before, None, "record {i}");
        }
    }

    #[test]
    fn records_that_come_quickly_in_small_batches_are_paced() {
        let (mut pacer, start) = (pacer(), Instant::now());
        pacer.taken(1, start);
        assert_eq!(pacer.not_before, None, "the first after a quiet spell");
        pacer.taken(1, start + MS);
        assert_eq!(pacer.not_before, Some(start + 11 * MS));
        // Paced, the batches hold what came meanwhile: still quick, still paced.
        pacer.taken(11, start + 11 * MS);
        assert_eq!(pacer.not_before, Some(start + 21 * MS));
        // The flood ends: the next record, 100 ms on, is taken at once.
        pacer.taken(1, start + 121 * MS);
        assert_eq!(pacer.not_before, None);
    }

    #[test]
    fn a_backlog_is_taken_without_pacing() {
        let (mut pacer, start) = (pacer(), Instant::now());
        pacer.taken(1, start);
        pacer.taken(64, start + MS);
        assert_eq!(pacer.not_before, None, "a full batch: more wait");
        pacer.taken(0, start + 2 * MS);
        assert_eq!(pacer.not_before, None, "nothing taken");
    }
}
