//! The idle decision: a prefilter over VIP addresses, the VIP's state (on the packet's
//! scope, for a scoped VIP), the fail-open heartbeat, and the rate-limited event.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::debug;
use unidler_common::{
    Counter, EventAction, FlowKey, IdleHitEvent, ScopedVip, VIP_FLAG_PASS_WHEN_IDLE,
    VIP_FLAG_SCOPED, VipKey, VipState, address_bucket, address_bucket_ipv4,
};

use crate::{
    Verdict,
    hold::{hold, holding_available},
    limiter::{gcra_allows, gcra_take},
    maps::{
        CONFIG, EVENTS, GLOBAL_LIMITER, HEARTBEAT, HOLD, IFACE_SCOPES, VIP_ADDRESS_FILTER,
        VIP_SCOPES, VIPS, count,
    },
    packet::{Packet, header_at},
};

/// An opening packet that passed the prefilter: looks the destination up and acts if the
/// VIP is idle.
#[inline(always)]
pub(crate) fn on_opening_packet<P: Packet>(ctx: &P, flow: &FlowKey, tagged: bool) -> Verdict {
    let vip = flow.vip();
    let Some(state) = VIPS.get_ptr_mut(vip) else {
        return Verdict::Pass;
    };
    count(Counter::VipHits);
    // SAFETY: a map value pointer stays valid for the whole program run.
    let state = unsafe { &mut *state };
    // SAFETY: an 8-byte aligned field of the map value; BPF_XADD.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut state.hits, 1) };
    let backends = if state.flags & VIP_FLAG_SCOPED != 0 {
        // A VIP that differs between this node's logical datapaths, judged by the one the
        // packet is on. Where that is not known (a tagged frame, which belongs to its VLAN's
        // network; an interface without a scope), or the VIP is not there: pass, and let
        // OVN decide.
        if tagged {
            return Verdict::Pass;
        }
        match scoped_backends(ctx.ingress_ifindex(), state.vip_id) {
            Some(backends) => backends,
            None => return Verdict::Pass,
        }
    } else {
        state.backends
    };
    if backends != 0 {
        return Verdict::Pass;
    }
    // Idle hits are not counted apart: the agent derives them from their outcomes.
    let now = unsafe { bpf_ktime_get_ns() };
    if HEARTBEAT.get(0).is_some_and(|h| h.expired(now)) {
        // Nobody vouches for the map: let OVN's own path see the packet.
        count(Counter::IdleFailedOpen);
        return Verdict::Pass;
    }
    if ctx.is_replay() {
        // The agent replays only for a VIP with a backend; this one is idle again since. The
        // replay goes on (OVN's path decides), and raises nothing here.
        count(Counter::ReplayedToIdle);
        return Verdict::Pass;
    }
    let (verdict, action) = if state.flags & VIP_FLAG_PASS_WHEN_IDLE != 0 {
        count(Counter::IdlePassed);
        (Verdict::Pass, EventAction::Passed)
    } else {
        count(Counter::IdleDropped);
        if holding_available()
            && let Some(config) = HOLD.get(0)
            && config.holding != 0
        {
            hold(ctx, flow, config, now);
        }
        (Verdict::Drop, EventAction::Dropped)
    };
    report(ctx, flow, &vip, state, action, now);
    verdict
}

/// A scoped VIP's backends on the scope of interface `ifindex`: two lookups, paid only by
/// opening packets to VIPs that differ between this node's logical datapaths. None if the
/// interface has no scope, or the VIP is not on it.
#[inline(always)]
fn scoped_backends(ifindex: u32, vip_id: u32) -> Option<u32> {
    // SAFETY: plain reads of map values the agent writes whole.
    let scope = *unsafe { IFACE_SCOPES.get(ifindex) }?;
    unsafe { VIP_SCOPES.get(ScopedVip { vip_id, scope }) }.copied()
}

/// Whether the destination of the packet whose IP header is at `l3` may be a VIP's address:
/// its prefilter bucket has one (an array lookup, no hash). A packet too short passes it
/// (the flow's read then fails).
#[inline(always)]
pub(crate) fn maybe_vip_destination<P: Packet>(ctx: &P, l3: usize, ipv6: bool) -> bool {
    let bucket = if ipv6 {
        match header_at::<[u8; 16], P>(ctx, l3 + 24) {
            Some(addr) => address_bucket(addr),
            None => return true,
        }
    } else {
        match header_at::<[u8; 4], P>(ctx, l3 + 16) {
            Some(addr) => address_bucket_ipv4(addr),
            None => return true,
        }
    };
    maybe_vip_address(bucket)
}

/// Whether some VIP's address falls in prefilter bucket `bucket`.
#[inline(always)]
fn maybe_vip_address(bucket: u32) -> bool {
    VIP_ADDRESS_FILTER
        .get(bucket / 64)
        .is_some_and(|word| word & (1 << (bucket % 64)) != 0)
}

/// Writes an event for an idle hit seen at `now` if both rate limiters allow it.
#[inline(always)]
fn report<P: Packet>(
    ctx: &P,
    flow: &FlowKey,
    vip: &VipKey,
    state: &mut VipState,
    action: EventAction,
    now: u64,
) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    let Some(global) = GLOBAL_LIMITER.get_ptr_mut(0) else {
        return;
    };
    let vip_tat: *mut u64 = &mut state.event_tat_ns;
    // The VIP's limiter is asked first but spent last: a VIP token is taken only once the
    // global limiter has given one, so a global refusal costs the VIP nothing.
    // SAFETY (all three): map value pointers, 8-byte aligned, valid for the whole run.
    if !gcra_allows(
        unsafe { core::ptr::read_volatile(vip_tat) },
        now,
        config.vip_tolerance_ns,
    ) {
        count(Counter::RateLimitedVip);
        return;
    }
    if !unsafe {
        gcra_take(
            global,
            now,
            config.global_interval_ns,
            config.global_tolerance_ns,
        )
    } {
        count(Counter::RateLimitedGlobal);
        return;
    }
    if !unsafe {
        gcra_take(
            vip_tat,
            now,
            config.vip_interval_ns,
            config.vip_tolerance_ns,
        )
    } {
        // Another CPU took the VIP's last token in between (the global token is spent).
        count(Counter::RateLimitedVip);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<IdleHitEvent>(0) else {
        count(Counter::RingFull);
        return;
    };
    let ifindex = ctx.ingress_ifindex();
    entry.write(IdleHitEvent {
        timestamp_ns: now,
        vip: *vip,
        vip_id: state.vip_id,
        src_addr: flow.src_addr,
        src_port_be: flow.src_port_be,
        _pad: 0,
        ifindex,
        action: action as u32,
        _pad2: 0,
    });
    entry.submit(0);
    count(Counter::EventsWritten);
    // The record names the program (`unidler`) as its target: its names and text are copied
    // byte by byte, and each byte costs the verifier (on Linux 6.1, per call site).
    debug!(ctx, target: "unidler", "idle hit: vip_id {} if {}", state.vip_id, ifindex);
}
