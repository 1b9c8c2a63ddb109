//! A held frame, read in user space: its flow (for telling retransmissions apart and watching
//! for answers) and its L4 checksum made whole before it is replayed.
//!
//! A pod's packets leave its veth with the L4 checksum only begun (`CHECKSUM_PARTIAL`: the
//! sender's kernel leaves the rest to an offload that a veth never does). The skb says so, but
//! a replayed frame enters the stack as fresh bytes, checked like any received frame: its
//! checksum must be complete, so it is computed again before every replay.

use unidler_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

const ETH_HEADER: usize = 14;
const VLAN_TAG: usize = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_8021Q: u16 = 0x8100;
const ETHERTYPE_8021AD: u16 = 0x88a8;

/// Where a held frame's headers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The flow, as the kernel keys `HELD_FLOWS`.
    pub flow: FlowKey,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the L4 header.
    l4: usize,
    /// Bytes of L4 header and payload, from the IP header's length.
    l4_len: usize,
    ipv6: bool,
}

/// Reads a held frame's headers: Ethernet, up to two VLAN tags, IPv4 or IPv6 with extension
/// headers, then TCP, UDP or SCTP. None for anything else (the kernel holds nothing else).
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let be16 = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let mut ether_type = be16(12)?;
    let mut l3 = ETH_HEADER;
    for _ in 0..2 {
        if ether_type != ETHERTYPE_8021Q && ether_type != ETHERTYPE_8021AD {
            break;
        }
        ether_type = be16(l3 + 2)?;
        l3 += VLAN_TAG;
    }
    let mut flow = FlowKey::default();
    let (proto, l4, l4_len, ipv6) = match ether_type {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*frame.get(l3)? & 0x0f) * 4;
            let total = usize::from(be16(l3 + 2)?);
            let proto = *frame.get(l3 + 9)?;
            flow.family = FAMILY_IPV4;
            flow.src_addr = mapped(frame.get(l3 + 12..l3 + 16)?);
            flow.dst_addr = mapped(frame.get(l3 + 16..l3 + 20)?);
            (proto, l3 + ihl, total.checked_sub(ihl)?, false)
        }
        ETHERTYPE_IPV6 => {
            let payload = usize::from(be16(l3 + 4)?);
            flow.family = FAMILY_IPV6;
            flow.src_addr = frame.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            flow.dst_addr = frame.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            let mut next = *frame.get(l3 + 6)?;
            let mut at = l3 + 40;
            for _ in 0..8 {
                let len = match next {
                    0 | 43 | 60 | 135 => (usize::from(*frame.get(at + 1)?) + 1) * 8,
                    44 => 8,
                    51 => (usize::from(*frame.get(at + 1)?) + 2) * 4,
                    _ => break,
                };
                next = *frame.get(at)?;
                at += len;
            }
            (next, at, (l3 + 40 + payload).checked_sub(at)?, true)
        }
        _ => return None,
    };
    // The L4 header must fit what the IP header says is L4, and the frame: the checksum is
    // completed within it.
    let header = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_SCTP => 12,
        _ => return None,
    };
    if l4_len < header || l4 + l4_len > frame.len() {
        return None;
    }
    flow.proto = proto;
    // The kernel keys ports as they sit in the packet, read natively.
    flow.src_port_be = u16::from_ne_bytes([*frame.get(l4)?, *frame.get(l4 + 1)?]);
    flow.dst_port_be = u16::from_ne_bytes([*frame.get(l4 + 2)?, *frame.get(l4 + 3)?]);
    Some(Parsed {
        flow,
        l3,
        l4,
        l4_len,
        ipv6,
    })
}

fn mapped(v4: &[u8]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(v4);
    addr
}

/// Computes the L4 checksum of `frame` (parsed as `parsed`) again, in place: TCP and UDP
/// over the pseudo-header, SCTP as CRC32c.
pub fn complete_checksum(frame: &mut [u8], parsed: &Parsed) {
    let Parsed {
        l3,
        l4,
        l4_len,
        ipv6,
        flow,
    } = *parsed;
    let segment = l4..l4 + l4_len;
    match flow.proto {
        IPPROTO_SCTP => {
            frame[l4 + 8..l4 + 12].fill(0);
            let crc = crc32c(&frame[segment]);
            frame[l4 + 8..l4 + 12].copy_from_slice(&crc.to_le_bytes());
        }
        proto => {
            let at = l4 + if proto == IPPROTO_TCP { 16 } else { 6 };
            frame[at..at + 2].fill(0);
            let mut sum = 0u64;
            if ipv6 {
                sum += ones_sum(&frame[l3 + 8..l3 + 40]);
            } else {
                sum += ones_sum(&frame[l3 + 12..l3 + 20]);
            }
            sum += l4_len as u64 + u64::from(proto);
            sum += ones_sum(&frame[segment]);
            let mut folded = fold(sum);
            if folded == 0 && proto == IPPROTO_UDP {
                // A computed zero goes out as all ones: zero means "no checksum" in UDP.
                folded = 0xffff;
            }
            frame[at..at + 2].copy_from_slice(&folded.to_be_bytes());
        }
    }
}

/// The 16-bit one's complement sum of `bytes` (not yet folded).
fn ones_sum(bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a one's complement sum to 16 bits and complements it.
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// CRC32c (Castagnoli), as SCTP checks it (RFC 9260, appendix A).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP SYN from 10.0.0.1:40000 to 10.0.0.2:80 (a window and an MSS option), with a
    /// correct checksum computed by hand below.
    fn syn_v4() -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[
            0x45, 0, 0, 44, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        f.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0x02, 0xff, 0xff, 0, 0, 0, 0, 2, 4,
            0x05, 0xb4,
        ]);
        f
    }

    #[test]
    fn a_partial_checksum_is_made_whole_and_a_whole_one_stays() {
        let mut frame = syn_v4();
        let parsed = parse(&frame).expect("parses");
        assert_eq!(parsed.flow.proto, IPPROTO_TCP);
        assert_eq!(parsed.flow.dst_port_be, 80u16.to_be());
        complete_checksum(&mut frame, &parsed);
        // A correct checksum sums, with the pseudo-header, to all ones.
        let tcp = &frame[34..];
        let sum = ones_sum(&frame[26..34]) + tcp.len() as u64 + 6 + ones_sum(tcp);
        assert_eq!(fold(sum), 0, "checksum verifies");
        let whole = frame.clone();
        // A partial checksum (the pseudo-header sum only), as a veth hands it over.
        frame[50..52].copy_from_slice(&[0x12, 0x34]);
        complete_checksum(&mut frame, &parsed);
        assert_eq!(frame, whole);
    }

    #[test]
    fn crc32c_matches_the_rfc_test_vector() {
        // RFC 3720, B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn frames_the_kernel_never_holds_do_not_parse() {
        assert_eq!(parse(&[0u8; 10]), None);
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), None);
        let mut short = syn_v4();
        short.truncate(40);
        assert_eq!(parse(&short), None);
    }

    /// An IP header that claims less L4 than its protocol's header (a long IHL, a short total
    /// length) leaves no room for the checksum field: refused, never completed out of bounds.
    /// (Found by the `held_frame` fuzz target: an SCTP frame with IHL 11 and 8 bytes of L4.)
    #[test]
    fn an_l4_shorter_than_its_header_does_not_parse() {
        for (proto, header) in [(IPPROTO_TCP, 20u8), (IPPROTO_UDP, 8), (IPPROTO_SCTP, 12)] {
            // Room in the frame for any header; the IP header says less is L4.
            let mut frame = syn_v4();
            frame.resize(14 + 20 + 64, 0);
            frame[14 + 9] = proto;
            frame[14 + 2..14 + 4].copy_from_slice(&u16::from(20 + header - 1).to_be_bytes());
            assert_eq!(parse(&frame), None, "protocol {proto}: one byte short");
            frame[14 + 2..14 + 4].copy_from_slice(&u16::from(20 + header).to_be_bytes());
            let parsed = parse(&frame).unwrap_or_else(|| panic!("protocol {proto}: just enough"));
            complete_checksum(&mut frame, &parsed);
        }
        // The fuzzer's frame.
        let mut found = vec![
            2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0, 59, 0, 0, 52, 0, 1, 0, 0, 64, 132, 101, 228,
            10, 0, 0, 1, 10, 96, 0, 1, 156, 64, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 20, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        if let Some(parsed) = parse(&found) {
            complete_checksum(&mut found, &parsed);
        }
    }
}
