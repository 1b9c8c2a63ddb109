//! The rate limiters' arithmetic: a GCRA token bucket, taken with compare-and-swap.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

/// Most compare-and-swap attempts on one limiter before giving up (other CPUs kept winning).
pub(crate) const CAS_ATTEMPTS: usize = 4;

/// GCRA token bucket: whether an event at `now` fits, the theoretical arrival time being `tat`
/// (no more than `tolerance` ahead of `now`). Reads only.
#[inline(always)]
pub(crate) fn gcra_allows(tat: u64, now: u64, tolerance: u64) -> bool {
    let start = if tat > now { tat } else { now };
    start - now <= tolerance
}

/// GCRA token bucket: takes a token if one is left, advancing `tat` by `interval`. The update
/// is a compare-and-swap, so two CPUs cannot both spend the same token; a CPU that loses one
/// looks again (a bounded number of times) rather than give up with tokens left.
///
/// # Safety
/// `tat` points into a map value, 8-byte aligned, valid for the whole program run.
#[inline(always)]
pub(crate) unsafe fn gcra_take(tat: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: as the caller promises.
        let current = unsafe { core::ptr::read_volatile(tat) };
        if !gcra_allows(current, now, tolerance) {
            return false;
        }
        let start = if current > now { current } else { now };
        // SAFETY: as above; BPF_CMPXCHG (ISA v3) on a map value.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                tat,
                current,
                start + interval,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}
