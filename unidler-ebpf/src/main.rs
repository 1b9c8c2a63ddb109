//! The unidler datapath: one parser and one set of maps behind two entry points, an XDP
//! program (`unidler`, for physical interfaces) and a TC ingress classifier (`unidler_tc`, for
//! veths and other virtual interfaces, where native XDP would turn segmentation offloads off).
//!
//! For every frame: parse Ethernet, up to two VLAN tags, IPv4 or IPv6 (with extension
//! headers), then TCP, UDP or SCTP. A connection-opening packet (TCP SYN without ACK, any UDP
//! datagram, SCTP INIT) whose destination is a VIP with zero backends raises an event in the
//! `EVENTS` ring buffer, rate-limited per VIP and globally, and is dropped (or passed, if the
//! VIP says so). A dropped opening packet is also copied, whole, to the `HELD` ring, for the
//! agent to replay once the VIP has a backend; a replayed frame carries [`REPLAY_MARK`] in
//! its metadata and is let through. While replayed TCP flows wait for their answer, the
//! client's segments of those flows are looked up and marked answered. Every other frame passes (`XDP_PASS`, `TC_ACT_OK`). Anything the parser cannot read is
//! passed untouched and counted. All loops and offsets are bounded.
#![no_std]
#![no_main]
// Compare-and-swap for the rate limiters: the BPF target exposes no stable RMW atomics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_adjust_meta, bpf_xdp_load_bytes},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use unidler_common::{
    ADDRESS_FILTER_WORDS, Counter, EVENT_RING_BYTES, EventAction, FAMILY_IPV4, FAMILY_IPV6,
    FLOW_ANSWERED, FlowKey, HELD_FLOWS_CAPACITY, HELD_FRAME_MAX, HELD_FRAME_SMALL, HELD_RING_BYTES,
    Heartbeat, HeldFrame, HeldHeader, HoldConfig, IFACE_SCOPES_CAPACITY, IdleHitEvent, REPLAY_MARK,
    RateLimitConfig, ScopedVip, VIP_FLAG_PASS_WHEN_IDLE, VIP_FLAG_SCOPED, VIP_MAP_CAPACITY,
    VIP_SCOPES_CAPACITY, VipKey, VipState, address_bucket, address_bucket_ipv4,
};

/// VIP → backend count, id and flags. Written by the agent; the kernel only updates the
/// rate limiter state inside a value.
#[map]
static VIPS: HashMap<VipKey, VipState> = HashMap::with_max_entries(VIP_MAP_CAPACITY, 0);

/// Prefilter over VIP destination addresses: bit [`address_bucket`] is set while some VIP
/// has an address in that bucket. Checked (an inlined array access) before the hash lookup, so
/// a connection attempt to a non-VIP address costs no hash lookup. Maintained by the agent.
#[map]
static VIP_ADDRESS_FILTER: Array<u64> = Array::with_max_entries(ADDRESS_FILTER_WORDS, 0);

/// The scope of each interface that has one (in OVN, a VIF: the tunnel key of its logical
/// switch), by interface index; written by the agent, read only for scoped VIPs.
#[map]
static IFACE_SCOPES: HashMap<u32, u32> = HashMap::with_max_entries(IFACE_SCOPES_CAPACITY, 0);

/// The backends of a scoped VIP ([`VIP_FLAG_SCOPED`]) on each scope where it is; written by
/// the agent.
#[map]
static VIP_SCOPES: HashMap<ScopedVip, u32> = HashMap::with_max_entries(VIP_SCOPES_CAPACITY, 0);

/// Events for the agent: one [`IdleHitEvent`] per reported idle hit.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Per-CPU counters indexed by [`Counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Rate limits, one entry, written by the agent before it attaches the program.
#[map]
static CONFIG: Array<RateLimitConfig> = Array::with_max_entries(1, 0);

/// The agent's heartbeat, one entry, renewed by the agent: once it is too old, idle VIPs fail
/// open (see [`Heartbeat`]).
#[map]
static HEARTBEAT: Array<Heartbeat> = Array::with_max_entries(1, 0);

/// Holding, one entry, written by the agent (see [`HoldConfig`]).
#[map]
static HOLD: Array<HoldConfig> = Array::with_max_entries(1, 0);

/// Opening packets dropped for an idle VIP, whole, for the agent to hold and replay: one
/// [`HeldFrame`] each, small or large. Its size is the kernel's bound on holding.
#[map]
static HELD: RingBuf = RingBuf::with_byte_size(HELD_RING_BYTES, 0);

/// Flows the agent holds an opening packet of, one packet each: the kernel inserts a flow
/// when it copies its packet to `HELD`, with the interface index the packet came in on, and
/// copies no other packet of it (a retransmission) while it is there; the agent removes it
/// when it lets the packet go. While replayed flows wait for their answer, the kernel sets
/// [`FLOW_ANSWERED`] when the client sends a segment of one on that interface that answers
/// the server's SYN-ACK (its ACK, or its RST if it gave up).
#[map]
static HELD_FLOWS: HashMap<FlowKey, u32> = HashMap::with_max_entries(HELD_FLOWS_CAPACITY, 0);

/// Packets held per VIP: the kernel counts each it copies; the agent writes what it holds
/// (lower, as packets leave), and removes a VIP with none. Bounded by `HoldConfig::per_vip`.
#[map]
static HELD_PER_VIP: HashMap<VipKey, u64> = HashMap::with_max_entries(HELD_FLOWS_CAPACITY, 0);

/// Packets held in all, one entry, counted as `HELD_PER_VIP` is; bounded by
/// `HoldConfig::total`.
#[map]
static HELD_TOTAL: Array<u64> = Array::with_max_entries(1, 0);

/// The [`unidler_common::LAYOUT_VERSION`] of what the pinned maps and rings hold, one entry, written by the
/// agent and read by the next one before it adopts them; the program does not read it.
#[map]
static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// State of the global event rate limiter (GCRA theoretical arrival time), one entry.
#[map]
static GLOBAL_LIMITER: Array<u64> = Array::with_max_entries(1, 0);

// Protocol numbers as they appear in the packet: EtherTypes as network-order u16 read
// natively, IP protocols as the byte itself.
const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;
const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;
const ETH_P_8021AD: u16 = EtherType::Ieee8021ad as u16;
const PROTO_TCP: u8 = IpProto::Tcp as u8;
const PROTO_UDP: u8 = IpProto::Udp as u8;
const PROTO_SCTP: u8 = IpProto::Sctp as u8;
const IPV6_EXT_HOP_BY_HOP: u8 = IpProto::HopOpt as u8;
const IPV6_EXT_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPV6_EXT_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPV6_EXT_DEST_OPTS: u8 = IpProto::Ipv6Opts as u8;
const IPV6_EXT_AUTH: u8 = IpProto::Ah as u8;
const IPV6_EXT_MOBILITY: u8 = IpProto::MobilityHeader as u8;
/// The first 12 bytes of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the form VIP keys
/// give IPv4 addresses.
const IPV4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// The chunk type of an SCTP INIT (RFC 9260), the first chunk of an association's first packet.
const SCTP_CHUNK_INIT: u8 = 1;
/// The TCP flags that tell an opening segment: SYN set, ACK, RST and FIN clear.
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header (after ports, sequence and acknowledgement
/// numbers, and the data offset byte).
const TCP_FLAGS_OFFSET: usize = 13;
/// Most IPv6 extension headers walked before giving up.
const MAX_IPV6_EXTENSIONS: usize = 6;
/// Furthest offset at which an L4 header may start; keeps every packet offset bounded.
const MAX_L4_OFFSET: usize = 512;

/// What the datapath decided for a packet; each entry point says it in its own terms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// A packet as either hook sees it: its bytes, and the interface it arrived on.
trait Packet: EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// The whole frame's length (beyond `data_end` for an skb with paged data).
    fn frame_len(&self) -> u32;
    /// Copies `len` bytes of the frame from its start to `to`; false if it could not.
    ///
    /// # Safety
    /// `to` is valid for `len` bytes of writes.
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool;
    /// Whether the frame is one of the agent's replays ([`REPLAY_MARK`] in its metadata).
    fn is_replay(&self) -> bool;
    /// The VLAN tag the kernel took off the frame before the hook (TPID as in the frame,
    /// TCI), if it did.
    fn stripped_vlan(&self) -> Option<(u16, u16)>;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a plain field of the context the kernel hands us.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
    #[inline(always)]
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool {
        // SAFETY: as the caller promises; the helper checks the frame's bounds.
        unsafe { bpf_xdp_load_bytes(self.ctx, 0, to.cast(), len) == 0 }
    }
    #[inline(always)]
    fn is_replay(&self) -> bool {
        // Replays enter the stack through netif_receive_skb: native XDP never sees them.
        false
    }
    #[inline(always)]
    fn stripped_vlan(&self) -> Option<(u16, u16)> {
        // XDP sees the frame's bytes, tags included (a NIC that strips tags in hardware
        // leaves no trace of them here).
        None
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a plain field of the __sk_buff the kernel hands us.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        self.len()
    }
    #[inline(always)]
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool {
        // SAFETY: as the caller promises; the helper checks the skb's bounds.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), 0, to.cast(), len) == 0 }
    }
    #[inline(always)]
    fn is_replay(&self) -> bool {
        // SAFETY: a plain field of the __sk_buff; the metadata ends where the frame starts.
        let meta = unsafe { (*self.skb.skb).data_meta } as usize;
        let data = self.data();
        if meta + 4 > data {
            return false;
        }
        // The replay program puts the mark at the start of the metadata.
        // SAFETY: bounds checked just above.
        unsafe { core::ptr::read_unaligned(meta as *const u32) == REPLAY_MARK }
    }
    #[inline(always)]
    fn stripped_vlan(&self) -> Option<(u16, u16)> {
        // SAFETY: plain fields of the __sk_buff; vlan_proto is the TPID as the frame had it.
        let skb = unsafe { &*self.skb.skb };
        (skb.vlan_present != 0).then_some((skb.vlan_proto as u16, skb.vlan_tci as u16))
    }
}

/// What the datapath does with a classified packet, whichever the hook.
#[inline(always)]
fn act<P: Packet>(ctx: &P, classified: Result<Option<Parsed>, Counter>) -> Verdict {
    match classified {
        Ok(Some(parsed)) if parsed.opening => on_opening_packet(ctx, &parsed.flow, parsed.tagged),
        Ok(Some(parsed)) => {
            on_answer(&parsed.flow, ctx.ingress_ifindex());
            Verdict::Pass
        }
        Ok(None) => Verdict::Pass,
        Err(reason) => {
            count(reason);
            Verdict::Pass
        }
    }
}

#[xdp]
pub fn unidler(ctx: XdpContext) -> u32 {
    count(Counter::Packets);
    match act(&ctx, classify(&ctx)) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Headers the TC hook pulls into the linear part of an skb when they are not all there:
/// the furthest L4 header and the bytes of it the parser reads.
const TC_LINEAR_BYTES: u32 = (MAX_L4_OFFSET + 64) as u32;

#[classifier]
pub fn unidler_tc(ctx: TcContext) -> i32 {
    count(Counter::Packets);
    let mut classified = classify(&ctx);
    // An skb may carry headers beyond its linear part (GRO, some drivers). Only a packet
    // whose headers ran out there is pulled and looked at again: pulling every skb would
    // cost TCP streams dearly.
    if let Err(reason) = classified
        && is_cut_short(reason)
        && ctx.len() as usize > ctx.data_end() - ctx.data()
    {
        let wanted = if ctx.len() < TC_LINEAR_BYTES {
            ctx.len()
        } else {
            TC_LINEAR_BYTES
        };
        if ctx.pull_data(wanted).is_ok() {
            classified = classify(&ctx);
        }
    }
    match act(&ctx, classified) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Whether a parse failure may only mean that the headers were not all in the buffer.
#[inline(always)]
fn is_cut_short(reason: Counter) -> bool {
    matches!(
        reason,
        Counter::TruncatedEthernet
            | Counter::TruncatedVlan
            | Counter::BadIpv4Header
            | Counter::BadIpv6Header
            | Counter::TruncatedL4
    )
}

/// An XDP program that passes everything and does nothing else: the baseline the benchmarks
/// compare the real program with. Never attached.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The TC hook's baseline: passes everything, does nothing else. Never attached.
#[classifier]
pub fn baseline_pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Replays a held frame: run by the agent through `BPF_PROG_TEST_RUN` with live frames and
/// the frame's ingress interface, so that `XDP_PASS` hands it to that interface's stack as
/// if just received. Marks it as a replay ([`REPLAY_MARK`] in the metadata) so that the TC
/// hook on the interface lets it through. Never attached.
#[xdp]
pub fn unidler_replay(ctx: XdpContext) -> u32 {
    // SAFETY: the helper moves data_meta within the frame's headroom, or fails.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } == 0 {
        let (meta, data) = (ctx.metadata(), ctx.data());
        if meta + 4 <= data {
            // SAFETY: bounds checked just above.
            unsafe { core::ptr::write_unaligned(meta as *mut u32, REPLAY_MARK) };
        }
    }
    xdp_action::XDP_PASS
}

/// A packet that needs a decision: a connection-opening packet, or a TCP segment that may
/// answer a replay. Its flow is read out of the packet by [`classify`], so that nothing after
/// the parser touches packet memory: the decision is the same code, and verified as one
/// state, whatever headers the packet had.
struct Parsed {
    /// A connection-opening packet (TCP SYN, UDP, SCTP INIT); else a TCP segment to look up
    /// in `HELD_FLOWS`.
    opening: bool,
    /// Addresses (IPv4-mapped for IPv4), ports and protocol, as the client sent them.
    flow: FlowKey,
    /// The frame came with a VLAN tag (in its bytes, or taken off by the kernel): it belongs
    /// to that VLAN's network, not to the interface's own.
    tagged: bool,
}

/// Parses the frame. `Ok(Some)` for a connection-opening packet, or a TCP segment while
/// replayed flows wait for their answer; `Ok(None)` for anything else (which needs nothing
/// more), `Err(counter)` for a frame it cannot parse.
#[inline(always)]
fn classify<P: Packet>(ctx: &P) -> Result<Option<Parsed>, Counter> {
    let eth: &EthHdr = header_at(ctx, 0).ok_or(Counter::TruncatedEthernet)?;
    let mut ether_type = eth.ether_type;
    let mut l3 = EthHdr::LEN;
    if is_vlan(ether_type) {
        let vlan: &VlanHdr = header_at(ctx, l3).ok_or(Counter::TruncatedVlan)?;
        ether_type = vlan.ether_type;
        l3 += VlanHdr::LEN;
        if is_vlan(ether_type) {
            let vlan: &VlanHdr = header_at(ctx, l3).ok_or(Counter::TruncatedVlan)?;
            ether_type = vlan.ether_type;
            l3 += VlanHdr::LEN;
            if is_vlan(ether_type) {
                return Err(Counter::TooManyVlanTags);
            }
        }
    }

    let (proto, l4, ipv6) = match ether_type {
        ETH_P_IPV4 => {
            let ip: &Ipv4Hdr = header_at(ctx, l3).ok_or(Counter::BadIpv4Header)?;
            let ihl = ip.ihl() as usize;
            if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
                return Err(Counter::BadIpv4Header);
            }
            // Only the first fragment carries the L4 header.
            if ip.frag_offset() != 0 {
                return Err(Counter::Fragments);
            }
            (ip.proto, l3 + ihl, false)
        }
        ETH_P_IPV6 => {
            // The whole fixed header must be there: the addresses are read later.
            let ip: &Ipv6Hdr = header_at(ctx, l3).ok_or(Counter::BadIpv6Header)?;
            if ip.version() != 6 {
                return Err(Counter::BadIpv6Header);
            }
            let (proto, l4) = skip_ipv6_extensions(ctx, ip.next_hdr, l3 + Ipv6Hdr::LEN)?;
            (proto, l4, true)
        }
        _ => return Ok(None),
    };
    if l4 > MAX_L4_OFFSET {
        return Err(Counter::TooManyIpv6Extensions);
    }

    let opening = match proto {
        PROTO_TCP => {
            let tcp: &[u8; TcpHdr::LEN] = header_at(ctx, l4).ok_or(Counter::TruncatedL4)?;
            let flags = tcp[TCP_FLAGS_OFFSET];
            let syn_only =
                flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN) == TCP_FLAG_SYN;
            // The client's answer to the server's SYN-ACK: its ACK, or its RST (a client that
            // gave up). Looked at only while replayed flows wait for one.
            if flags & TCP_FLAG_SYN == 0
                && flags & (TCP_FLAG_ACK | TCP_FLAG_RST) != 0
                && holding_available()
                && watching_answers()
            {
                return Ok(read_flow(ctx, l3, l4, proto, ipv6).map(|flow| Parsed {
                    opening: false,
                    flow,
                    tagged: false,
                }));
            }
            syn_only
        }
        PROTO_UDP => {
            let _udp: &UdpHdr = header_at(ctx, l4).ok_or(Counter::TruncatedL4)?;
            true
        }
        PROTO_SCTP => {
            // The common header, then the first chunk's type.
            let chunk_type: &u8 = header_at(ctx, l4 + SctpHdr::LEN).ok_or(Counter::TruncatedL4)?;
            *chunk_type == SCTP_CHUNK_INIT
        }
        _ => false,
    };
    // The prefilter first, straight from the packet: most opening packets are to no VIP,
    // and their flow is never read.
    if !opening || !maybe_vip_destination(ctx, l3, ipv6) {
        return Ok(None);
    }
    let tagged = l3 != EthHdr::LEN || ctx.stripped_vlan().is_some();
    Ok(read_flow(ctx, l3, l4, proto, ipv6).map(|flow| Parsed {
        opening: true,
        flow,
        tagged,
    }))
}

/// Reads a packet's flow (addresses, ports, protocol) from its IP header at `l3` and its L4
/// header at `l4`; `None` if the packet is shorter, or for an IPv6 packet to an IPv4-mapped
/// address (`::ffff:a.b.c.d`), which is not a packet to the IPv4 address of that form (the
/// form of IPv4 keys): no VIP or replayed flow has such an address.
#[inline(always)]
fn read_flow<P: Packet>(ctx: &P, l3: usize, l4: usize, proto: u8, ipv6: bool) -> Option<FlowKey> {
    let mut flow = FlowKey {
        proto,
        family: if ipv6 { FAMILY_IPV6 } else { FAMILY_IPV4 },
        ..FlowKey::default()
    };
    if ipv6 {
        let addrs: &[u8; 32] = header_at(ctx, l3 + 8)?;
        if addrs[16..28] == IPV4_MAPPED_PREFIX {
            return None;
        }
        flow.src_addr.copy_from_slice(&addrs[..16]);
        flow.dst_addr.copy_from_slice(&addrs[16..]);
    } else {
        let addrs: &[u8; 8] = header_at(ctx, l3 + 12)?;
        flow.src_addr[..12].copy_from_slice(&IPV4_MAPPED_PREFIX);
        flow.src_addr[12..].copy_from_slice(&addrs[..4]);
        flow.dst_addr[..12].copy_from_slice(&IPV4_MAPPED_PREFIX);
        flow.dst_addr[12..].copy_from_slice(&addrs[4..]);
    }
    // Ports sit at the same place in TCP, UDP and SCTP headers.
    let ports: &[u8; 4] = header_at(ctx, l4)?;
    flow.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
    flow.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(flow)
}

/// Walks IPv6 extension headers from `next_header` at `offset`; returns the upper-layer
/// protocol and its offset. A non-first fragment is reported as [`Counter::Fragments`].
#[inline(always)]
fn skip_ipv6_extensions<P: Packet>(
    ctx: &P,
    mut next_header: u8,
    mut offset: usize,
) -> Result<(u8, usize), Counter> {
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next_header {
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS | IPV6_EXT_MOBILITY => {
                // Next header, then the length in 8-byte units beyond the first 8.
                let ext: &[u8; 2] = header_at(ctx, offset).ok_or(Counter::BadIpv6Header)?;
                next_header = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            IPV6_EXT_AUTH => {
                // Next header, then the length in 4-byte units beyond the first 8 (RFC 4302).
                let ext: &[u8; 2] = header_at(ctx, offset).ok_or(Counter::BadIpv6Header)?;
                next_header = ext[0];
                offset += (ext[1] as usize + 2) * 4;
            }
            IPV6_EXT_FRAGMENT => {
                // Next header, reserved, then offset (13 bits), flags; 8 bytes in all.
                let frag: &[u8; 8] = header_at(ctx, offset).ok_or(Counter::BadIpv6Header)?;
                if u16::from_be_bytes([frag[2], frag[3]]) >> 3 != 0 {
                    return Err(Counter::Fragments);
                }
                next_header = frag[0];
                offset += 8;
            }
            _ => return Ok((next_header, offset)),
        }
        if offset > MAX_L4_OFFSET {
            return Err(Counter::TooManyIpv6Extensions);
        }
    }
    match next_header {
        IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS | IPV6_EXT_FRAGMENT
        | IPV6_EXT_AUTH | IPV6_EXT_MOBILITY => Err(Counter::TooManyIpv6Extensions),
        _ => Ok((next_header, offset)),
    }
}

/// An opening packet that passed the prefilter: looks the destination up and acts if the
/// VIP is idle.
#[inline(always)]
fn on_opening_packet<P: Packet>(ctx: &P, flow: &FlowKey, tagged: bool) -> Verdict {
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

/// Set by the agent at load time (a constant for the verifier, which then drops the code
/// behind it where it is zero): whether this kernel can hold and replay opening packets
/// (`bpf_xdp_load_bytes` and live-frame test runs, Linux 5.18).
#[unsafe(no_mangle)]
static HOLDING_AVAILABLE: u8 = 0;

/// Whether holding is compiled in for this kernel (see [`HOLDING_AVAILABLE`]).
#[inline(always)]
fn holding_available() -> bool {
    // SAFETY: reads a global the loader sets; volatile, so that the compiler keeps the read.
    unsafe { core::ptr::read_volatile(&HOLDING_AVAILABLE) != 0 }
}

/// Whether replayed flows wait for their answer (the agent says so in `HOLD`).
#[inline(always)]
fn watching_answers() -> bool {
    HOLD.get(0).is_some_and(|h| h.watching_answers != 0)
}

/// Copies a dropped opening packet, whole, to the held-frame ring for the agent: in a small
/// entry if it is shorter than [`HELD_FRAME_SMALL`] (every SYN), else in a large one. Only
/// what the agent keeps: the first packet of a flow, within the limits (see
/// [`take_hold_room`]); each refusal counted.
#[inline(always)]
fn hold<P: Packet>(ctx: &P, flow: &FlowKey, config: &HoldConfig, now: u64) {
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
fn on_answer(flow: &FlowKey, ifindex: u32) {
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

/// Whether the destination of the packet whose IP header is at `l3` may be a VIP's address:
/// its prefilter bucket has one (an array lookup, no hash). A packet too short passes it
/// (the flow's read then fails).
#[inline(always)]
fn maybe_vip_destination<P: Packet>(ctx: &P, l3: usize, ipv6: bool) -> bool {
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
    debug!(ctx, "idle hit: vip_id {} ifindex {}", state.vip_id, ifindex);
}

/// Most compare-and-swap attempts on one limiter before giving up (other CPUs kept winning).
const CAS_ATTEMPTS: usize = 4;

/// GCRA token bucket: whether an event at `now` fits, the theoretical arrival time being `tat`
/// (no more than `tolerance` ahead of `now`). Reads only.
#[inline(always)]
fn gcra_allows(tat: u64, now: u64, tolerance: u64) -> bool {
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
unsafe fn gcra_take(tat: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
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

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *value += 1 };
    }
}

/// Whether `ether_type` (network order, read natively) is an 802.1Q or 802.1ad tag.
#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD
}

/// A reference to a `T` (a header, or a byte array) in the packet at `offset`, or `None` if
/// the packet is shorter. Every type used here has alignment 1 or 2, which packet data has.
#[inline(always)]
fn header_at<T, P: Packet>(ctx: &P, offset: usize) -> Option<&T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { &*(start as *const T) })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The program calls only helpers open to any license; GPL is declared so that aya-log's
/// helpers load everywhere.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
