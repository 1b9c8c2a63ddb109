//! The maps the programs share with the agent, and the counters.
//!
//! Their names (the statics' names) are the ones the agent opens them by:
//! [`unidler_common::map_names`].

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use unidler_common::{
    ADDRESS_FILTER_WORDS, Counter, EVENT_RING_BYTES, FlowKey, HELD_FLOWS_CAPACITY, HELD_RING_BYTES,
    Heartbeat, HoldConfig, IFACE_SCOPES_CAPACITY, RateLimitConfig, ScopedVip, VIP_MAP_CAPACITY,
    VIP_SCOPES_CAPACITY, VipKey, VipState,
};

/// VIP → backend count, id and flags. Written by the agent; the kernel only updates the
/// rate limiter state inside a value.
#[map]
pub(crate) static VIPS: HashMap<VipKey, VipState> = HashMap::with_max_entries(VIP_MAP_CAPACITY, 0);

/// Prefilter over VIP destination addresses: bit [`unidler_common::address_bucket`] is set while some VIP
/// has an address in that bucket. Checked (an inlined array access) before the hash lookup, so
/// a connection attempt to a non-VIP address costs no hash lookup. Maintained by the agent.
#[map]
pub(crate) static VIP_ADDRESS_FILTER: Array<u64> = Array::with_max_entries(ADDRESS_FILTER_WORDS, 0);

/// The scope of each interface that has one (in OVN, a VIF: the tunnel key of its logical
/// switch), by interface index; written by the agent, read only for scoped VIPs.
#[map]
pub(crate) static IFACE_SCOPES: HashMap<u32, u32> =
    HashMap::with_max_entries(IFACE_SCOPES_CAPACITY, 0);

/// The backends of a scoped VIP ([`unidler_common::VIP_FLAG_SCOPED`]) on each scope where it is; written by
/// the agent.
#[map]
pub(crate) static VIP_SCOPES: HashMap<ScopedVip, u32> =
    HashMap::with_max_entries(VIP_SCOPES_CAPACITY, 0);

/// Events for the agent: one [`unidler_common::IdleHitEvent`] per reported idle hit.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Per-CPU counters indexed by [`Counter`].
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Rate limits, one entry, written by the agent before it attaches the program.
#[map]
pub(crate) static CONFIG: Array<RateLimitConfig> = Array::with_max_entries(1, 0);

/// The agent's heartbeat, one entry, renewed by the agent: once it is too old, idle VIPs fail
/// open (see [`Heartbeat`]).
#[map]
pub(crate) static HEARTBEAT: Array<Heartbeat> = Array::with_max_entries(1, 0);

/// Holding, one entry, written by the agent (see [`HoldConfig`]).
#[map]
pub(crate) static HOLD: Array<HoldConfig> = Array::with_max_entries(1, 0);

/// Opening packets dropped for an idle VIP, whole, for the agent to hold and replay: one
/// [`unidler_common::HeldFrame`] each, small or large. Its size is the kernel's bound on holding.
#[map]
pub(crate) static HELD: RingBuf = RingBuf::with_byte_size(HELD_RING_BYTES, 0);

/// Flows the agent holds an opening packet of, one packet each: the kernel inserts a flow
/// when it copies its packet to `HELD`, with the interface index the packet came in on, and
/// copies no other packet of it (a retransmission) while it is there; the agent removes it
/// when it lets the packet go. While replayed flows wait for their answer, the kernel sets
/// [`unidler_common::FLOW_ANSWERED`] when the client sends a segment of one on that interface that answers
/// the server's SYN-ACK (its ACK, or its RST if it gave up).
#[map]
pub(crate) static HELD_FLOWS: HashMap<FlowKey, u32> =
    HashMap::with_max_entries(HELD_FLOWS_CAPACITY, 0);

/// Packets held per VIP: the kernel counts each it copies; the agent writes what it holds
/// (lower, as packets leave), and removes a VIP with none. Bounded by `HoldConfig::per_vip`.
#[map]
pub(crate) static HELD_PER_VIP: HashMap<VipKey, u64> =
    HashMap::with_max_entries(HELD_FLOWS_CAPACITY, 0);

/// Packets held in all, one entry, counted as `HELD_PER_VIP` is; bounded by
/// `HoldConfig::total`.
#[map]
pub(crate) static HELD_TOTAL: Array<u64> = Array::with_max_entries(1, 0);

/// The [`unidler_common::LAYOUT_VERSION`] of what the pinned maps and rings hold, one entry, written by the
/// agent and read by the next one before it adopts them; the program does not read it.
#[map]
pub(crate) static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// State of the global event rate limiter (GCRA theoretical arrival time), one entry.
#[map]
pub(crate) static GLOBAL_LIMITER: Array<u64> = Array::with_max_entries(1, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *value += 1 };
    }
}
