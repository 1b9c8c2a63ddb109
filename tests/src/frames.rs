//! Builds Ethernet frames byte by byte for packet-level tests and traffic generators.
//!
//! A [`Frame`] describes the headers; [`Frame::build`] lays them out with correct lengths
//! and IPv4 checksum (XDP does not check checksums, the kernel stack does).

use std::net::IpAddr;

/// L4 part of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment with these flag bits (see the `TCP_*` constants).
    Tcp { src: u16, dst: u16, flags: u8 },
    /// A UDP datagram.
    Udp { src: u16, dst: u16 },
    /// An SCTP packet whose first chunk has this type (1 is INIT).
    Sctp { src: u16, dst: u16, chunk_type: u8 },
    /// Some other protocol number, with a few payload bytes.
    Other { proto: u8 },
}

/// TCP FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP PSH.
pub const TCP_PSH: u8 = 0x08;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;
/// SCTP INIT chunk type.
pub const SCTP_INIT: u8 = 1;
/// SCTP DATA chunk type.
pub const SCTP_DATA: u8 = 0;

/// An IPv6 extension header to put before the L4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options, `len8` extra 8-byte units.
    HopByHop { len8: u8 },
    /// Routing header, `len8` extra 8-byte units.
    Routing { len8: u8 },
    /// Destination options, `len8` extra 8-byte units.
    DestOpts { len8: u8 },
    /// Fragment header with this offset (in 8-byte units) and more-fragments flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header (RFC 4302) with `len4` 4-byte units of ICV (its length field
    /// says `len4 + 1`: the header's size in 4-byte units, minus 2).
    Auth { len4: u8 },
    /// Mobility header (RFC 6275), `len8` extra 8-byte units.
    Mobility { len8: u8 },
}

impl Ipv6Ext {
    fn number(self) -> u8 {
        match self {
            Ipv6Ext::HopByHop { .. } => 0,
            Ipv6Ext::Routing { .. } => 43,
            Ipv6Ext::DestOpts { .. } => 60,
            Ipv6Ext::Fragment { .. } => 44,
            Ipv6Ext::Auth { .. } => 51,
            Ipv6Ext::Mobility { .. } => 135,
        }
    }
}

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// Source address (both must be the same family).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 options bytes (a multiple of 4, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub ipv4_fragment: (u16, bool),
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ipv6Ext>,
    /// The L4 header.
    pub l4: L4,
    /// Payload bytes after the L4 header.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame from `src` to `dst` carrying `l4`, no VLAN, no options.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlans: Vec::new(),
            src,
            dst,
            ipv4_options: Vec::new(),
            ipv4_fragment: (0, false),
            ipv6_ext: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP SYN from `src:sport` to `dst:dport`.
    pub fn tcp_syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                src: sport,
                dst: dport,
                flags: TCP_SYN,
            },
        )
    }

    /// Lays the frame out in bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ipv4_options.len();
                let total = ihl + l4.len();
                let (off, more) = self.ipv4_fragment;
                let frag = (off & 0x1fff) | if more { 0x2000 } else { 0 };
                let start = f.len();
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&(total as u16).to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(self.l4_proto());
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&self.ipv4_options);
                let sum = checksum(&f[start..start + ihl]);
                f[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ext = Vec::new();
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = self
                        .ipv6_ext
                        .get(i + 1)
                        .map_or(self.l4_proto(), |n| n.number());
                    match *e {
                        Ipv6Ext::HopByHop { len8 }
                        | Ipv6Ext::Routing { len8 }
                        | Ipv6Ext::DestOpts { len8 }
                        | Ipv6Ext::Mobility { len8 } => {
                            ext.push(next);
                            ext.push(len8);
                            // PadN option filling the rest of the header.
                            let rest = 6 + 8 * len8 as usize;
                            ext.push(1);
                            ext.push((rest - 2) as u8);
                            ext.extend(std::iter::repeat_n(0, rest - 2));
                        }
                        Ipv6Ext::Fragment { offset, more } => {
                            ext.push(next);
                            ext.push(0);
                            let v = (offset << 3) | u16::from(more);
                            ext.extend_from_slice(&v.to_be_bytes());
                            ext.extend_from_slice(&0x0102_0304u32.to_be_bytes());
                        }
                        Ipv6Ext::Auth { len4 } => {
                            // Next header, payload length, reserved, SPI, sequence, ICV.
                            ext.push(next);
                            ext.push(len4 + 1);
                            ext.extend_from_slice(&[0, 0]);
                            ext.extend_from_slice(&0x1000u32.to_be_bytes());
                            ext.extend_from_slice(&1u32.to_be_bytes());
                            ext.extend(std::iter::repeat_n(0xab, 4 * len4 as usize));
                        }
                    }
                }
                let first = self
                    .ipv6_ext
                    .first()
                    .map_or(self.l4_proto(), |e| e.number());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                f.push(first);
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be the same IP family"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn l4_proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Other { proto } => proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self.l4 {
            L4::Tcp { src, dst, flags } => {
                b.extend_from_slice(&src.to_be_bytes());
                b.extend_from_slice(&dst.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                b.push(5 << 4);
                b.push(flags);
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
            }
            L4::Udp { src, dst } => {
                b.extend_from_slice(&src.to_be_bytes());
                b.extend_from_slice(&dst.to_be_bytes());
                b.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
            }
            L4::Sctp {
                src,
                dst,
                chunk_type,
            } => {
                b.extend_from_slice(&src.to_be_bytes());
                b.extend_from_slice(&dst.to_be_bytes());
                b.extend_from_slice(&[0; 8]);
                b.push(chunk_type);
                b.push(0);
                b.extend_from_slice(&20u16.to_be_bytes());
                b.extend_from_slice(&[0; 16]);
            }
            L4::Other { .. } => b.extend_from_slice(&[0; 8]),
        }
        b.extend_from_slice(&self.payload);
        b
    }
}

/// The Internet checksum of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
