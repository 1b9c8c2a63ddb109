//! The clocks: `CLOCK_MONOTONIC`, which the kernel's timestamps use, and its conversion to
//! wall-clock time for what operators read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of the kernel's timestamps
/// (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of monotonic instant `ns` (as the wall clock is now: a clock step
/// since moves it with it).
pub fn wall_clock_of(ns: u64) -> SystemTime {
    let now = SystemTime::now();
    let mono = monotonic_ns();
    if ns <= mono {
        now - Duration::from_nanos(mono - ns)
    } else {
        now + Duration::from_nanos(ns - mono)
    }
}

/// `time` as RFC 3339 in UTC with milliseconds: `2026-12-07T07:30:00.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_times_are_spelt_as_rfc_3339() {
        let at = |secs: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_796_628_600, 123)), "2026-12-07T07:30:00.123Z");
    }

    #[test]
    fn a_monotonic_instant_maps_to_the_wall_clock() {
        let ten_s_ago = monotonic_ns() - 10_000_000_000;
        let age = SystemTime::now()
            .duration_since(wall_clock_of(ten_s_ago))
            .unwrap();
        assert!(age >= Duration::from_secs(10) && age < Duration::from_secs(11));
    }
}
