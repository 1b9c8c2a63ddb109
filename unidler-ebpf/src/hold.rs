//! Holding: a dropped opening packet copied, whole, to the held-frame ring, within the limits
//! the agent sets (one per flow, per VIP, in all); and the answers to replayed flows.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::bindings::BPF_NOEXIST;
use unidler_common::{
    Counter, FLOW_ANSWERED, FlowKey, HELD_FRAME_MAX, HELD_FRAME_SMALL, HeldFrame, HeldHeader,
    HoldConfig, VipKey,
};

use crate::{
    limiter::CAS_ATTEMPTS,
    maps::{HELD, HELD_FLOWS, HELD_PER_VIP, HELD_TOTAL, HOLD, count},
    packet::Packet,
};

/// Set by the agent at load time (a constant for the verifier, which then drops the code
/// behind it where it is zero): whether this kernel can hold and replay opening packets
/// (`bpf_xdp_load_bytes` and live-frame test runs, Linux 5.18).
#[unsafe(no_mangle)]
static HOLDING_AVAILABLE: u8 = 0;

/// Whether holding is compiled in for this kernel (see [`HOLDING_AVAILABLE`]).
#[inline(always)]
pub(crate) fn holding_available() -> bool {
    // SAFETY: reads a global the loader sets; volatile, so that the compiler keeps the read.
    unsafe { core::ptr::read_volatile(&HOLDING_AVAILABLE) != 0 }
}

/// Whether replayed flows wait for their answer (the agent says so in `HOLD`).
#[inline(always)]
pub(crate) fn watching_answers() -> bool {
    HOLD.get(0).is_some_and(|h| h.watching_answers != 0)
}

/// Copies a dropped opening packet, whole, to the held-frame ring for the agent: in a small
/// entry if it is shorter than [`HELD_FRAME_SMALL`] (every SYN), else in a large one. Only
/// what the agent keeps: the first packet of a flow, within the limits (see
/// [`take_hold_room`]); each refusal counted.
#[inline(always)]
pub(crate) fn hold<P: Packet>(ctx: &P, flow: &FlowKey, config: &HoldConfig, now: u64) {
    let frame_len = ctx.frame_len();
    if frame_len == 0 || frame_len as usize > HELD_FRAME_MAX {
        count(Counter::HoldTooLarge);
        return;
    }
    let vip = flow.vip();
    let ifindex = ctx.ingress_ifindex();
    let Some(total) = take_hold_room(flow, &vip, ifindex, config) else {
        return;
    };
    let small = (frame_len as usize) < HELD_FRAME_SMALL;
    // The copy's length must be provably 1..=N on the very register the helper gets, for the
    // oldest verifier too. The volatile read hides the checks above from the compiler, which
    // would otherwise fold the masks below away; the masks then bound the length by
    // construction, `((len - 1) & mask) + 1` being at least 1.
    // SAFETY: reads a local.
    let len = unsafe { core::ptr::read_volatile(&frame_len) };
    let held = if small {
        hold_in::<HELD_FRAME_SMALL, P>(ctx, flow, now, ((len - 1) & HELD_SMALL_MASK) + 1)
    } else {
        hold_in::<HELD_FRAME_MAX, P>(ctx, flow, now, ((len - 1) & HELD_LEN_MASK) + 1)
    };
    if !held {
        give_back_hold_room(flow, &vip, total);
    }
}

/// Takes room for one held packet of `flow` (to `vip`, from `ifindex`): the flow's entry in
/// `HELD_FLOWS`, one of the VIP's places and one of the total. Reads first, so that a flood
/// past a limit costs lookups only. Returns the total's counter, to give back if the copy
/// fails; None, counted, if there is no room.
#[inline(always)]
fn take_hold_room(
    flow: &FlowKey,
    vip: &VipKey,
    ifindex: u32,
    config: &HoldConfig,
) -> Option<*mut u64> {
    // SAFETY: a lookup; the value is not used.
    if unsafe { HELD_FLOWS.get(flow) }.is_some() {
        count(Counter::HoldRetransmission);
        return None;
    }
    let total = HELD_TOTAL.get_ptr_mut(0)?;
    // SAFETY (the reads): map value pointers, 8-byte aligned, valid for the whole run.
    if unsafe { core::ptr::read_volatile(total) } >= u64::from(config.total) {
        count(Counter::HoldOverLimitTotal);
        return None;
    }
    let per_vip = HELD_PER_VIP.get_ptr_mut(vip);
    if let Some(held) = per_vip
        && unsafe { core::ptr::read_volatile(held) } >= u64::from(config.per_vip)
    {
        count(Counter::HoldOverLimitVip);
        return None;
    }
    if HELD_FLOWS
        .insert(flow, ifindex, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU held the flow in between.
        count(Counter::HoldRetransmission);
        return None;
    }
    // SAFETY (the takes): as above.
    if !unsafe { take_one(total, config.total) } {
        let _ = HELD_FLOWS.remove(flow);
        count(Counter::HoldOverLimitTotal);
        return None;
    }
    let taken = match per_vip {
        Some(held) => unsafe { take_one(held, config.per_vip) },
        // The VIP's first: counted as one, unless another CPU counted it first.
        None => {
            HELD_PER_VIP.insert(vip, 1, u64::from(BPF_NOEXIST)).is_ok()
                || HELD_PER_VIP
                    .get_ptr_mut(vip)
                    .is_some_and(|held| unsafe { take_one(held, config.per_vip) })
        }
    };
    if !taken {
        unsafe { give_back_one(total) };
        let _ = HELD_FLOWS.remove(flow);
        count(Counter::HoldOverLimitVip);
        return None;
    }
    Some(total)
}

/// Gives back what [`take_hold_room`] took, for a packet that was not copied after all. A
/// VIP's count that falls to zero is removed: the agent never saw the packet, so it would not.
#[inline(always)]
fn give_back_hold_room(flow: &FlowKey, vip: &VipKey, total: *mut u64) {
    // SAFETY: map value pointers, 8-byte aligned, valid for the whole run.
    unsafe {
        give_back_one(total);
        if let Some(held) = HELD_PER_VIP.get_ptr_mut(vip)
            && give_back_one(held) == 0
        {
            let _ = HELD_PER_VIP.remove(vip);
        }
    }
    let _ = HELD_FLOWS.remove(flow);
}

/// Adds one to `counter` if it is below `limit` (a compare-and-swap: two CPUs cannot both
/// take the last place). False if it is at the limit, or other CPUs kept winning.
///
/// # Safety
/// `counter` points into a map value, 8-byte aligned, valid for the whole program run.
#[inline(always)]
unsafe fn take_one(counter: *mut u64, limit: u32) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: as the caller promises.
        let current = unsafe { core::ptr::read_volatile(counter) };
        if current >= u64::from(limit) {
            return false;
        }
        // SAFETY: as above; BPF_CMPXCHG (ISA v3) on a map value.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                counter,
                current,
                current + 1,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}

/// Takes one from `counter`, never below zero (the agent may have written a lower count
/// meanwhile); returns what is left (1 if other CPUs kept winning: not zero, so kept).
///
/// # Safety
/// As [`take_one`].
#[inline(always)]
unsafe fn give_back_one(counter: *mut u64) -> u64 {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: as the caller promises.
        let current = unsafe { core::ptr::read_volatile(counter) };
        if current == 0 {
            return 0;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                counter,
                current,
                current - 1,
            )
        };
        if swapped {
            return current - 1;
        }
    }
    1
}

/// A mask that keeps every length below [`HELD_FRAME_SMALL`] (a power of two).
const HELD_SMALL_MASK: u32 = HELD_FRAME_SMALL as u32 - 1;
/// A mask that keeps every length up to [`HELD_FRAME_MAX`] (a power of two).
const HELD_LEN_MASK: u32 = HELD_FRAME_MAX as u32 - 1;

/// Writes one held-frame entry of `N` bytes of frame; `len` is at most `N`. Whether it did.
#[inline(always)]
fn hold_in<const N: usize, P: Packet>(ctx: &P, flow: &FlowKey, now: u64, len: u32) -> bool {
    let Some(mut entry) = HELD.reserve::<HeldFrame<N>>(0) else {
        count(Counter::HoldRingFull);
        return false;
    };
    let held = entry.as_mut_ptr();
    // SAFETY: `held` points to a reserved HeldFrame in the ring; fields are written one by
    // one (the frame is larger than the BPF stack), and the copy stays within `frame`.
    let copied = unsafe {
        let (vlan_proto_be, vlan_tci) = ctx.stripped_vlan().unwrap_or((0, 0));
        (*held).header = HeldHeader {
            timestamp_ns: now,
            flow: *flow,
            ifindex: ctx.ingress_ifindex(),
            len,
            vlan_proto_be,
            vlan_tci,
            _pad: 0,
        };
        ctx.copy_frame((*held).frame.as_mut_ptr(), len)
    };
    if copied {
        entry.submit(0);
        count(Counter::Held);
    } else {
        entry.discard(0);
        count(Counter::HoldTooLarge);
    }
    copied
}

/// A TCP segment while replayed flows wait for their answer: if it belongs to one of them
/// (the client's ACK to the server's SYN-ACK) and came in where the held packet did, the flow
/// is marked answered. The same flow from another interface (another pod, spoofing the
/// client) answers nothing.
#[inline(always)]
pub(crate) fn on_answer(flow: &FlowKey, ifindex: u32) {
    if let Some(answered) = HELD_FLOWS.get_ptr_mut(flow) {
        // SAFETY: a map value pointer, valid for the whole run.
        unsafe {
            if core::ptr::read_volatile(answered) == ifindex {
                core::ptr::write_volatile(answered, FLOW_ANSWERED);
                count(Counter::ReplaysAnswered);
            }
        }
    }
}
