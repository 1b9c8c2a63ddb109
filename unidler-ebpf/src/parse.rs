//! The parser: Ethernet, up to two VLAN tags, IPv4 or IPv6 (with extension headers), then
//! TCP, UDP or SCTP, every offset and loop bounded. It reads a packet's flow once
//! ([`classify`]); nothing after it touches packet memory.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use unidler_common::{Counter, FAMILY_IPV4, FAMILY_IPV6, FlowKey};

use crate::{
    hold::{holding_available, watching_answers},
    idle::maybe_vip_destination,
    packet::{Packet, header_at},
};

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
pub(crate) const MAX_L4_OFFSET: usize = 512;

/// A packet that needs a decision: a connection-opening packet, or a TCP segment that may
/// answer a replay. Its flow is read out of the packet by [`classify`], so that nothing after
/// the parser touches packet memory: the decision is the same code, and verified as one
/// state, whatever headers the packet had.
pub(crate) struct Parsed {
    /// A connection-opening packet (TCP SYN, UDP, SCTP INIT); else a TCP segment to look up
    /// in `HELD_FLOWS`.
    pub(crate) opening: bool,
    /// Addresses (IPv4-mapped for IPv4), ports and protocol, as the client sent them.
    pub(crate) flow: FlowKey,
    /// The frame came with a VLAN tag (in its bytes, or taken off by the kernel): it belongs
    /// to that VLAN's network, not to the interface's own.
    pub(crate) tagged: bool,
}

/// Parses the frame. `Ok(Some)` for a connection-opening packet, or a TCP segment while
/// replayed flows wait for their answer; `Ok(None)` for anything else (which needs nothing
/// more), `Err(counter)` for a frame it cannot parse.
#[inline(always)]
pub(crate) fn classify<P: Packet>(ctx: &P) -> Result<Option<Parsed>, Counter> {
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

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD
}
