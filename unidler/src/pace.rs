//! When to take the next batch of records that arrive one by one: at once while they come
//! slowly or few at a time (one hit, a client's fan-out to a few services: no added latency)
//! or in bulk (a backlog goes out as fast as it can); not before a short pace while they keep
//! coming quickly in small batches (a flood over many idle VIPs lets a thousand hits a second
//! through), so that each wake-up, read or transaction carries many. What costs the agent
//! under load is waking up and the transaction, not the record.

use std::time::Duration;

use tokio::time::Instant;

/// Over how long the rate is judged: records are counted in windows of this length.
const WINDOW: Duration = Duration::from_millis(50);

/// Decides when the next batch may be taken, from the size of the last ones and the rate.
#[derive(Clone, Debug)]
pub struct Pacer {
    pace: Duration,
    /// Records in one window at which records are coming quickly.
    busy_records: usize,
    bulk: usize,
    /// Where the current window began, and the records taken in it and in the one before.
    window_start: Option<Instant>,
    current: usize,
    previous: usize,
    not_before: Option<Instant>,
}

impl Pacer {
    /// Paces batches `pace` apart while records come at `busy_per_second` or faster (judged
    /// over the current and the last 50 ms window) and each batch holds fewer than `bulk`.
    pub fn new(pace: Duration, busy_per_second: u32, bulk: usize) -> Self {
        let busy_records = (u128::from(busy_per_second) * WINDOW.as_millis()).div_ceil(1000);
        Self {
            pace,
            busy_records: (busy_records as usize).max(1),
            bulk,
            window_start: None,
            current: 0,
            previous: 0,
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
            // Nothing came: the next record is taken at once.
            self.not_before = None;
            return;
        }
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= 2 * WINDOW {
            (self.previous, self.current) = (0, 0);
            self.window_start = Some(now);
        } else if elapsed >= WINDOW {
            (self.previous, self.current) = (self.current, 0);
            self.window_start = Some(start + WINDOW);
        }
        self.current += records;
        let busy = self.current.max(self.previous) >= self.busy_records;
        self.not_before = (busy && records < self.bulk).then(|| now + self.pace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// 250 a second: 13 records in a 50 ms window.
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
    fn a_few_records_close_together_are_taken_at_once() {
        // A client opening connections to several idle services at once.
        let (mut pacer, start) = (pacer(), Instant::now());
        for i in 0..12u32 {
            pacer.taken(1, start + MS * i);
            assert_eq!(pacer.not_before, None, "record {i}");
        }
    }

    #[test]
    fn records_that_keep_coming_quickly_in_small_batches_are_paced() {
        let (mut pacer, start) = (pacer(), Instant::now());
        for i in 0..12u32 {
            pacer.taken(1, start + MS * i);
        }
        pacer.taken(1, start + 12 * MS);
        assert_eq!(pacer.not_before, Some(start + 22 * MS), "the 13th in 50 ms");
        // Paced, the batches hold what came meanwhile: still quick, still paced, also in
        // the next window (judged on the last one too).
        pacer.taken(10, start + 22 * MS);
        assert_eq!(pacer.not_before, Some(start + 32 * MS));
        pacer.taken(10, start + 52 * MS);
        assert_eq!(pacer.not_before, Some(start + 62 * MS));
        // The flood ends: the next record, two windows on, is taken at once.
        pacer.taken(1, start + 160 * MS);
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
