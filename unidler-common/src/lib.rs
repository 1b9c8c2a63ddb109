//! Types shared by the XDP program (`unidler-ebpf`) and the agent (`unidler`).
//!
//! Every struct here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`
//! with explicit padding fields (always zero) and a size checked at compile time. Multi-byte
//! fields that come straight from a packet keep network byte order and say so in their name
//! (`_be`); everything else is in host byte order.
#![no_std]

/// IANA protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol number of SCTP.
pub const IPPROTO_SCTP: u8 = 132;

/// The names of the maps the programs and the agent share: the names of the programs'
/// statics (`unidler-ebpf/src/maps.rs`), which the agent opens them by.
pub mod map_names {
    /// VIP → backend count, id and flags.
    pub const VIPS: &str = "VIPS";
    /// The prefilter over VIP destination addresses.
    pub const VIP_ADDRESS_FILTER: &str = "VIP_ADDRESS_FILTER";
    /// The scope of each interface that has one.
    pub const IFACE_SCOPES: &str = "IFACE_SCOPES";
    /// A scoped VIP's backends on each scope.
    pub const VIP_SCOPES: &str = "VIP_SCOPES";
    /// The ring of idle hits.
    pub const EVENTS: &str = "EVENTS";
    /// The per-CPU counters.
    pub const COUNTERS: &str = "COUNTERS";
    /// The rate limits.
    pub const CONFIG: &str = "CONFIG";
    /// The agent's heartbeat.
    pub const HEARTBEAT: &str = "HEARTBEAT";
    /// Holding's settings.
    pub const HOLD: &str = "HOLD";
    /// The ring of held frames.
    pub const HELD: &str = "HELD";
    /// The flows held, and the answers to replayed ones.
    pub const HELD_FLOWS: &str = "HELD_FLOWS";
    /// Packets held per VIP.
    pub const HELD_PER_VIP: &str = "HELD_PER_VIP";
    /// Packets held in all.
    pub const HELD_TOTAL: &str = "HELD_TOTAL";
    /// The layout version of the pinned maps.
    pub const LAYOUT: &str = "LAYOUT";
    /// The global event rate limiter's state.
    pub const GLOBAL_LIMITER: &str = "GLOBAL_LIMITER";
}

/// The version of the records kept in pinned maps and rings: the types of this crate that
/// cross in them, their sizes and the meaning of their fields. Any change to one of them
/// bumps it. An agent adopts a pinned datapath only of its own version; one of another (or
/// of none: agents before it) has all its maps re-created, and says so.
pub const LAYOUT_VERSION: u32 = 2;

/// Capacity of the VIP map: OVN clusters with tens of thousands of services fit with room.
pub const VIP_MAP_CAPACITY: u32 = 131_072;

/// Size in bytes of the event ring buffer (a power of two, a multiple of the page size).
/// 1 MiB holds about 14,500 events (72 bytes each with the ring's header): a wake-up storm of
/// 10,000 services fits even if the agent is slow to read.
pub const EVENT_RING_BYTES: u32 = 1024 * 1024;

/// Largest frame the datapath holds for replay, in bytes: a TCP SYN with every option (60-byte
/// header) over IPv6 with two VLAN tags (122 bytes), or a UDP datagram of 900 bytes of payload
/// over IPv6 with two VLAN tags, fit. Larger frames are not held (and counted). A power of
/// two, which the kernel's length mask relies on: the copy's length is bounded by the mask
/// alone, with no comparison an older verifier could lose track of.
pub const HELD_FRAME_MAX: usize = 1024;

/// Frames shorter than this are held in a small entry ([`HeldFrame<HELD_FRAME_SMALL>`], 200
/// bytes in the ring): every TCP SYN (74-98 bytes with options and VLAN tags, IPv6 included)
/// and most small datagrams. A power of two, which the kernel's length mask relies on.
pub const HELD_FRAME_SMALL: usize = 128;

/// Size in bytes of the held-frame ring buffer: about 5,200 SYNs (200 bytes each with the
/// ring's header), or 950 frames of up to [`HELD_FRAME_MAX`] bytes (1,096), between two reads
/// of the agent. The kernel copies only what the agent keeps (one packet per flow, within
/// `--hold-per-vip` and `--hold-total`), so it fills only if the agent stops reading; what
/// does not fit is counted ([`Counter::HoldRingFull`]). The agent maps it twice (as every
/// ring buffer reader does), so it counts double in the agent's resident memory.
pub const HELD_RING_BYTES: u32 = 1024 * 1024;

/// Capacity of the map of flows held (`HELD_FLOWS`); `--hold-total` is at most this.
pub const HELD_FLOWS_CAPACITY: u32 = 16_384;

/// The value of a `HELD_FLOWS` entry once the client answered the replay. Before that, the
/// value is the interface index the held packet came in on: only a segment of the flow that
/// comes in on that interface answers it.
pub const FLOW_ANSWERED: u32 = u32::MAX;

/// What the XDP replay program writes in a replayed frame's metadata (in front of the
/// frame, where the TC hook reads it): the frame is a replay, to let through as it is.
pub const REPLAY_MARK: u32 = 0x756e_6964;

/// Name of the XDP program that replays held frames (through `BPF_PROG_TEST_RUN` with live
/// frames): marks the frame as a replay and passes it to the stack.
pub const REPLAY_PROGRAM_NAME: &str = "unidler_replay";

/// Name of the do-nothing XDP program in the same object, the benchmarks' baseline.
pub const BASELINE_PROGRAM_NAME: &str = "baseline_pass";
/// Name of the do-nothing TC program in the same object, the TC hook's baseline.
pub const BASELINE_TC_PROGRAM_NAME: &str = "baseline_pass_tc";

/// log2 of the bits in the VIP address prefilter (`VIP_ADDRESS_FILTER`).
pub const ADDRESS_FILTER_ORDER: u32 = 20;
/// Bits in the VIP address prefilter: one per address bucket (2^20 bits, 128 KiB, so that
/// even 100,000 VIP addresses leave about nine buckets in ten empty).
pub const ADDRESS_FILTER_BITS: u32 = 1 << ADDRESS_FILTER_ORDER;
/// `u64` words in the VIP address prefilter.
pub const ADDRESS_FILTER_WORDS: u32 = ADDRESS_FILTER_BITS / 64;

/// The prefilter bucket of an address (16 bytes, IPv4-mapped): the low 64 bits (the IPv4
/// address, or an IPv6 interface identifier, where service addresses differ) folded to 32 and
/// hashed multiplicatively (Fibonacci) down to [`ADDRESS_FILTER_ORDER`] bits. Half the bytes
/// of the address, as the kernel reads them one at a time. The kernel skips the VIP lookup
/// for an opening packet whose destination bucket has no VIP.
#[inline(always)]
pub const fn address_bucket(addr: &[u8; 16]) -> u32 {
    let high = u32::from_be_bytes([addr[8], addr[9], addr[10], addr[11]]);
    let low = u32::from_be_bytes([addr[12], addr[13], addr[14], addr[15]]);
    fibonacci_bucket(high ^ low)
}

/// [`address_bucket`] of IPv4 address `addr` (keyed IPv4-mapped, `::ffff:a.b.c.d`), without
/// building the mapped form: its words XOR to `0x0000ffff ^ addr`.
#[inline(always)]
pub const fn address_bucket_ipv4(addr: &[u8; 4]) -> u32 {
    fibonacci_bucket(0x0000_ffff ^ u32::from_be_bytes(*addr))
}

#[inline(always)]
const fn fibonacci_bucket(folded: u32) -> u32 {
    folded.wrapping_mul(0x9e37_79b1) >> (32 - ADDRESS_FILTER_ORDER)
}

/// Name of the XDP program inside the object file.
pub const PROGRAM_NAME: &str = "unidler";
/// Name of the TC ingress program (same parser and maps) inside the object file.
pub const TC_PROGRAM_NAME: &str = "unidler_tc";

/// Key of the VIP map: one load-balancer VIP, `address:port/protocol`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Destination address. IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Destination L4 port in network byte order, as it appears in the packet.
    pub port_be: u16,
    /// IP protocol number: [`IPPROTO_TCP`], [`IPPROTO_UDP`] or [`IPPROTO_SCTP`].
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`]: `[::ffff:a.b.c.d]:80` (IPv6, as OVN matches it)
    /// is not `a.b.c.d:80`, though their addresses are the same bytes.
    pub family: u8,
}

/// The address family of an IPv4 key ([`VipKey::family`], [`FlowKey::family`]); its address
/// is IPv4-mapped.
pub const FAMILY_IPV4: u8 = 4;
/// The address family of an IPv6 key, IPv4-mapped addresses included.
pub const FAMILY_IPV6: u8 = 6;

/// Per-VIP flag: when the VIP has no backends, let the opening packet pass (`XDP_PASS`)
/// instead of dropping it. The event is reported either way.
pub const VIP_FLAG_PASS_WHEN_IDLE: u32 = 1 << 0;

/// Per-VIP flag: the VIP is not the same on every logical datapath of this node's interfaces
/// (tenants reusing an address; a load balancer applied on some logical switches only). For
/// a packet that arrived on an interface with a scope (`IFACE_SCOPES`), what counts is the
/// VIP's entry for that scope in `VIP_SCOPES`: its backends, or, without one, that the VIP
/// is not there (the packet passes). Interfaces without a scope see the VIP's own entry.
pub const VIP_FLAG_SCOPED: u32 = 1 << 1;

/// Capacity of `IFACE_SCOPES` (interface index → scope): the interfaces the datapath is on.
pub const IFACE_SCOPES_CAPACITY: u32 = 8192;

/// Capacity of `VIP_SCOPES`: the per-scope states of scoped VIPs.
pub const VIP_SCOPES_CAPACITY: u32 = 65_536;

/// Key of `VIP_SCOPES`: a scoped VIP (by the id the agent gave it) on one scope (in OVN, the
/// tunnel key of a logical datapath).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScopedVip {
    /// The VIP's `vip_id`.
    pub vip_id: u32,
    /// The scope.
    pub scope: u32,
}

/// Value of the VIP map.
///
/// The agent writes `backends`, `vip_id` and `flags`. The kernel writes only
/// `event_tat_ns`, the state of the VIP's event rate limiter (the agent writes it as zero, a
/// fresh bucket, whenever it rewrites the entry), and `hits` (the agent carries it over).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipState {
    /// Number of backends behind the VIP; zero means the service is idle.
    pub backends: u32,
    /// Identifier the agent assigned to this VIP; events carry it so that the agent can
    /// resolve the load balancer without parsing the key again.
    pub vip_id: u32,
    /// `VIP_FLAG_*` bits.
    pub flags: u32,
    /// Padding; always zero.
    pub _pad: u32,
    /// Rate limiter state: the GCRA "theoretical arrival time" of the next event, in
    /// `CLOCK_MONOTONIC` nanoseconds. Zero is a full bucket.
    pub event_tat_ns: u64,
    /// Connection-opening packets seen for this VIP (idle or not), counted by the kernel.
    pub hits: u64,
}

/// Rate limits for events, written by the agent into the `CONFIG` array before attaching.
///
/// Both limits are GCRA token buckets: at most `burst` events back to back, then one event
/// per `interval_ns`. A `tolerance_ns` of `(burst - 1) * interval_ns` gives a burst of `burst`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per VIP: nanoseconds between events once the burst is spent.
    pub vip_interval_ns: u64,
    /// Per VIP: burst tolerance in nanoseconds (`(burst - 1) * interval`).
    pub vip_tolerance_ns: u64,
    /// All VIPs together: nanoseconds between events once the burst is spent.
    pub global_interval_ns: u64,
    /// All VIPs together: burst tolerance in nanoseconds.
    pub global_tolerance_ns: u64,
}

impl RateLimitConfig {
    /// Builds the kernel's configuration from events per second and burst sizes.
    /// A rate of zero is treated as one event per second; a burst of zero as one.
    pub const fn new(vip_rate: u32, vip_burst: u32, global_rate: u32, global_burst: u32) -> Self {
        let (vip_interval_ns, vip_tolerance_ns) = gcra(vip_rate, vip_burst);
        let (global_interval_ns, global_tolerance_ns) = gcra(global_rate, global_burst);
        Self {
            vip_interval_ns,
            vip_tolerance_ns,
            global_interval_ns,
            global_tolerance_ns,
        }
    }
}

const fn gcra(rate_per_sec: u32, burst: u32) -> (u64, u64) {
    let rate = if rate_per_sec == 0 { 1 } else { rate_per_sec } as u64;
    let burst = if burst == 0 { 1 } else { burst } as u64;
    let interval = 1_000_000_000 / rate;
    (interval, (burst - 1) * interval)
}

/// The agent's heartbeat, one entry of the `HEARTBEAT` array: the dead-man switch that makes
/// idle VIPs fail open. The agent renews `renewed_ns` while it can vouch for the VIP map (its
/// VIP source is in sync); once the heartbeat is older than `fail_open_after_ns`, the kernel
/// passes opening packets to idle VIPs instead of dropping them (OVN's own path then handles
/// them, as without us). Both in `CLOCK_MONOTONIC` nanoseconds; a `fail_open_after_ns` of
/// zero never fails open.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// When the agent last vouched for the VIP map.
    pub renewed_ns: u64,
    /// How old the heartbeat may get before idle VIPs fail open; zero: never.
    pub fail_open_after_ns: u64,
}

impl Heartbeat {
    /// Whether, at `now_ns`, the heartbeat is too old: idle VIPs fail open.
    #[inline(always)]
    pub const fn expired(&self, now_ns: u64) -> bool {
        self.fail_open_after_ns != 0
            && now_ns.saturating_sub(self.renewed_ns) > self.fail_open_after_ns
    }
}

/// Holding, one entry of the `HOLD` array, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldConfig {
    /// Non-zero: opening packets dropped for an idle VIP are copied to the held-frame ring.
    pub holding: u32,
    /// Non-zero while some replayed TCP flow waits for its answer: the kernel then looks
    /// TCP segments up in `HELD_FLOWS` (otherwise they cost one load more, no lookup).
    pub watching_answers: u32,
    /// Most packets held for one VIP (`--hold-per-vip`): counted in `HELD_PER_VIP`.
    pub per_vip: u32,
    /// Most packets held in all (`--hold-total`): counted in `HELD_TOTAL`.
    pub total: u32,
}

/// One TCP flow (or UDP, SCTP association) as the client sent it: the key of `HELD_FLOWS`,
/// and the identity of a held packet on both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, IPv4-mapped for IPv4.
    pub src_addr: [u8; 16],
    /// Destination address (the VIP's), IPv4-mapped for IPv4.
    pub dst_addr: [u8; 16],
    /// Source L4 port in network byte order.
    pub src_port_be: u16,
    /// Destination L4 port in network byte order.
    pub dst_port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Padding; always zero.
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The VIP the flow is sent to: its destination.
    #[inline(always)]
    pub const fn vip(&self) -> VipKey {
        VipKey {
            addr: self.dst_addr,
            port_be: self.dst_port_be,
            proto: self.proto,
            family: self.family,
        }
    }
}

/// What leads every entry of the held-frame ring (see [`HeldFrame`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldHeader {
    /// When the packet was seen, `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
    /// The packet's flow, as the kernel keyed it in `HELD_FLOWS` (its destination is the
    /// VIP).
    pub flow: FlowKey,
    /// Interface index the packet arrived on.
    pub ifindex: u32,
    /// Bytes of the frame that follows (the whole frame, from its Ethernet header).
    pub len: u32,
    /// The VLAN tag the kernel took off the frame before the hook saw it (TC ingress: the
    /// outer tag is in the skb, not in the bytes): its TPID in network byte order, as the
    /// frame had it; zero if the frame had none there. The agent puts it back before a replay.
    pub vlan_proto_be: u16,
    /// That tag's TCI (priority, DEI and VLAN id), host order.
    pub vlan_tci: u16,
    /// Padding; always zero.
    pub _pad: u32,
}

/// One entry in the held-frame ring: an opening packet to an idle VIP, dropped and handed
/// to the agent to replay once the VIP has a backend. Entries come in two sizes, `N` of
/// [`HELD_FRAME_SMALL`] or [`HELD_FRAME_MAX`] bytes: the ring's reserve needs a constant size,
/// and most held frames are SYNs of under 100 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldFrame<const N: usize> {
    /// Where, when and for which VIP; how long the frame is.
    pub header: HeldHeader,
    /// The frame (its first `header.len` bytes).
    pub frame: [u8; N],
}

/// What the XDP program did with the packet that raised an event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventAction {
    /// The packet was dropped (`XDP_DROP`), as OVN does for a VIP without backends.
    Dropped = 1,
    /// The packet was passed on (`XDP_PASS`) because the VIP has [`VIP_FLAG_PASS_WHEN_IDLE`].
    Passed = 2,
}

/// One entry in the event ring buffer: a connection-opening packet reached an idle VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdleHitEvent {
    /// When the packet was seen, `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
    pub timestamp_ns: u64,
    /// The VIP the packet was sent to.
    pub vip: VipKey,
    /// The VIP's `vip_id` from the VIP map.
    pub vip_id: u32,
    /// Source address of the packet, IPv4-mapped for IPv4.
    pub src_addr: [u8; 16],
    /// Source L4 port in network byte order.
    pub src_port_be: u16,
    /// Padding; always zero.
    pub _pad: u16,
    /// Interface index the packet arrived on (`xdp_md.ingress_ifindex`).
    pub ifindex: u32,
    /// An [`EventAction`] value.
    pub action: u32,
    /// Padding; always zero.
    pub _pad2: u32,
}

/// Indexes of the per-CPU `COUNTERS` array. The agent sums each over all CPUs. (Idle hits
/// are not counted apart: they are [`Counter::IdleDropped`], [`Counter::IdlePassed`] and
/// [`Counter::IdleFailedOpen`] together.)
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the program ran on.
    Packets = 0,
    /// Connection-opening packets (TCP SYN, UDP, SCTP INIT) whose destination is a VIP.
    VipHits,
    /// Events written to the ring buffer.
    EventsWritten,
    /// Events not written because the VIP's rate limit was exhausted.
    RateLimitedVip,
    /// Events not written because the global rate limit was exhausted.
    RateLimitedGlobal,
    /// Events not written because the ring buffer was full.
    RingFull,
    /// Idle hits whose packet was dropped.
    IdleDropped,
    /// Idle hits whose packet was passed because of [`VIP_FLAG_PASS_WHEN_IDLE`].
    IdlePassed,
    /// Idle hits whose packet was passed because the agent's [`Heartbeat`] had expired
    /// (fail-open); no event is written for them.
    IdleFailedOpen,
    /// Dropped opening packets handed to the agent to hold (the held-frame ring).
    Held,
    /// Dropped opening packets not held: longer than [`HELD_FRAME_MAX`].
    HoldTooLarge,
    /// Dropped opening packets not held: the held-frame ring was full.
    HoldRingFull,
    /// Dropped opening packets not held: their flow is held already (a retransmission).
    HoldRetransmission,
    /// Dropped opening packets not held: their VIP has `--hold-per-vip` held.
    HoldOverLimitVip,
    /// Dropped opening packets not held: `--hold-total` are held.
    HoldOverLimitTotal,
    /// Replayed frames (recognised by [`REPLAY_MARK`]) that found their VIP idle again, let
    /// through without being held or reported.
    ReplayedToIdle,
    /// TCP segments that answered a replay (the client's ACK for a replayed SYN).
    ReplaysAnswered,
    /// Non-first IP fragments: no L4 header, so never matched against VIPs.
    Fragments,
    /// Parse failure: frame shorter than an Ethernet header.
    TruncatedEthernet,
    /// Parse failure: VLAN tag cut short.
    TruncatedVlan,
    /// Parse failure: more than two VLAN tags.
    TooManyVlanTags,
    /// Parse failure: IPv4 header cut short, or IHL below 5, or version not 4.
    BadIpv4Header,
    /// Parse failure: IPv6 header or extension header cut short, or version not 6.
    BadIpv6Header,
    /// Parse failure: more IPv6 extension headers than the program walks.
    TooManyIpv6Extensions,
    /// Parse failure: TCP, UDP or SCTP header cut short.
    TruncatedL4,
}

impl Counter {
    /// Number of counters, the size of the `COUNTERS` array.
    pub const COUNT: u32 = Counter::TruncatedL4 as u32 + 1;

    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Packets,
        Counter::VipHits,
        Counter::EventsWritten,
        Counter::RateLimitedVip,
        Counter::RateLimitedGlobal,
        Counter::RingFull,
        Counter::IdleDropped,
        Counter::IdlePassed,
        Counter::IdleFailedOpen,
        Counter::Held,
        Counter::HoldTooLarge,
        Counter::HoldRingFull,
        Counter::HoldRetransmission,
        Counter::HoldOverLimitVip,
        Counter::HoldOverLimitTotal,
        Counter::ReplayedToIdle,
        Counter::ReplaysAnswered,
        Counter::Fragments,
        Counter::TruncatedEthernet,
        Counter::TruncatedVlan,
        Counter::TooManyVlanTags,
        Counter::BadIpv4Header,
        Counter::BadIpv6Header,
        Counter::TooManyIpv6Extensions,
        Counter::TruncatedL4,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::VipHits => "vip_hits",
            Counter::EventsWritten => "events_written",
            Counter::RateLimitedVip => "rate_limited_vip",
            Counter::RateLimitedGlobal => "rate_limited_global",
            Counter::RingFull => "ring_full",
            Counter::IdleDropped => "idle_dropped",
            Counter::IdlePassed => "idle_passed",
            Counter::IdleFailedOpen => "idle_failed_open",
            Counter::Held => "held",
            Counter::HoldTooLarge => "hold_too_large",
            Counter::HoldRingFull => "hold_ring_full",
            Counter::HoldRetransmission => "hold_retransmission",
            Counter::HoldOverLimitVip => "hold_over_limit_vip",
            Counter::HoldOverLimitTotal => "hold_over_limit_total",
            Counter::ReplayedToIdle => "replayed_to_idle",
            Counter::ReplaysAnswered => "replays_answered",
            Counter::Fragments => "fragments",
            Counter::TruncatedEthernet => "truncated_ethernet",
            Counter::TruncatedVlan => "truncated_vlan",
            Counter::TooManyVlanTags => "too_many_vlan_tags",
            Counter::BadIpv4Header => "bad_ipv4_header",
            Counter::BadIpv6Header => "bad_ipv6_header",
            Counter::TooManyIpv6Extensions => "too_many_ipv6_extensions",
            Counter::TruncatedL4 => "truncated_l4",
        }
    }

    /// Whether this counter counts a parse failure (a frame passed because it could not be parsed).
    pub const fn is_parse_failure(self) -> bool {
        (self as u32) >= (Counter::TruncatedEthernet as u32)
    }
}

const _: () = assert!(core::mem::size_of::<VipKey>() == 20);
const _: () = assert!(core::mem::size_of::<VipState>() == 32);
const _: () = assert!(core::mem::size_of::<RateLimitConfig>() == 32);
const _: () = assert!(core::mem::size_of::<IdleHitEvent>() == 64);
const _: () = assert!(core::mem::size_of::<Heartbeat>() == 16);
const _: () = assert!(core::mem::size_of::<HoldConfig>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<HeldHeader>() == 64);
const _: () = assert!(core::mem::size_of::<ScopedVip>() == 8);
const _: () = assert!(core::mem::size_of::<HeldFrame<HELD_FRAME_SMALL>>() == 64 + HELD_FRAME_SMALL);
const _: () = assert!(core::mem::size_of::<HeldFrame<HELD_FRAME_MAX>>() == 64 + HELD_FRAME_MAX);
const _: () = assert!(HELD_FRAME_SMALL.is_power_of_two() && HELD_FRAME_SMALL < HELD_FRAME_MAX);
const _: () = assert!(HELD_FRAME_MAX.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data `#[repr(C)]` structs with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipState {}
    unsafe impl aya::Pod for RateLimitConfig {}
    unsafe impl aya::Pod for IdleHitEvent {}
    unsafe impl aya::Pod for Heartbeat {}
    unsafe impl aya::Pod for HoldConfig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for HeldHeader {}
    unsafe impl aya::Pod for ScopedVip {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_bucket_is_the_bucket_of_the_mapped_address() {
        for a in [
            [0, 0, 0, 0],
            [10, 96, 0, 10],
            [192, 168, 77, 11],
            [255; 4],
            [1, 2, 3, 4],
        ] {
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            mapped[12..].copy_from_slice(&a);
            assert_eq!(address_bucket_ipv4(&a), address_bucket(&mapped), "{a:?}");
        }
    }
}
