//! A reference model of the XDP program's classification, written plainly over byte slices,
//! against which the randomized tests compare the real program.

use std::collections::HashMap;

use unidler_common::{Counter, VipKey};

/// XDP_DROP.
pub const XDP_DROP: u32 = 1;
/// XDP_PASS.
pub const XDP_PASS: u32 = 2;

/// What the program should do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The XDP verdict.
    pub verdict: u32,
    /// The parse-failure or fragment counter it should bump, if any.
    pub failure: Option<Counter>,
    /// The event it should write (given unlimited rate): VIP, source address, source port.
    pub event: Option<(VipKey, [u8; 16], u16)>,
}

impl Outcome {
    fn pass() -> Self {
        Self {
            verdict: XDP_PASS,
            failure: None,
            event: None,
        }
    }
    fn failed(counter: Counter) -> Self {
        Self {
            failure: Some(counter),
            ..Self::pass()
        }
    }
}

/// VIPs as the model sees them: key → (backends, pass_when_idle).
pub type VipModel = HashMap<VipKey, (u32, bool)>;

/// The expected outcome for `frame` given `vips`.
pub fn expected(frame: &[u8], vips: &VipModel) -> Outcome {
    match parse(frame) {
        Err(counter) => Outcome::failed(counter),
        Ok(None) => Outcome::pass(),
        Ok(Some((key, src, sport))) => match vips.get(&key) {
            Some(&(0, pass)) => Outcome {
                verdict: if pass { XDP_PASS } else { XDP_DROP },
                failure: None,
                event: Some((key, src, sport)),
            },
            _ => Outcome::pass(),
        },
    }
}

type Opening = Option<(VipKey, [u8; 16], u16)>;

fn parse(f: &[u8]) -> Result<Opening, Counter> {
    let get = |range: std::ops::Range<usize>, err: Counter| f.get(range).ok_or(err);
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);

    let mut ethertype = be16(get(12..14, Counter::TruncatedEthernet)?);
    let mut l3 = 14;
    let mut tags = 0;
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        tags += 1;
        if tags > 2 {
            return Err(Counter::TooManyVlanTags);
        }
        ethertype = be16(get(l3 + 2..l3 + 4, Counter::TruncatedVlan)?);
        l3 += 4;
    }

    let mut dst = [0u8; 16];
    let mut src = [0u8; 16];
    let (proto, l4) = match ethertype {
        0x0800 => {
            let h = get(l3..l3 + 20, Counter::BadIpv4Header)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return Err(Counter::BadIpv4Header);
            }
            if be16(&h[6..8]) & 0x1fff != 0 {
                return Err(Counter::Fragments);
            }
            dst[10] = 0xff;
            dst[11] = 0xff;
            dst[12..].copy_from_slice(&h[16..20]);
            src[10] = 0xff;
            src[11] = 0xff;
            src[12..].copy_from_slice(&h[12..16]);
            (h[9], l3 + ihl)
        }
        0x86dd => {
            let h = get(l3..l3 + 40, Counter::BadIpv6Header)?;
            if h[0] >> 4 != 6 {
                return Err(Counter::BadIpv6Header);
            }
            src.copy_from_slice(&h[8..24]);
            dst.copy_from_slice(&h[24..40]);
            let mut next = h[6];
            let mut off = l3 + 40;
            let mut walked = 0;
            loop {
                match next {
                    // Hop-by-hop, routing, destination options, mobility: 8-byte units.
                    0 | 43 | 60 | 135 => {
                        if walked == 6 {
                            return Err(Counter::TooManyIpv6Extensions);
                        }
                        let e = get(off..off + 2, Counter::BadIpv6Header)?;
                        next = e[0];
                        off += (usize::from(e[1]) + 1) * 8;
                    }
                    // Authentication header: 4-byte units, plus 2.
                    51 => {
                        if walked == 6 {
                            return Err(Counter::TooManyIpv6Extensions);
                        }
                        let e = get(off..off + 2, Counter::BadIpv6Header)?;
                        next = e[0];
                        off += (usize::from(e[1]) + 2) * 4;
                    }
                    44 => {
                        if walked == 6 {
                            return Err(Counter::TooManyIpv6Extensions);
                        }
                        let e = get(off..off + 8, Counter::BadIpv6Header)?;
                        if be16(&e[2..4]) >> 3 != 0 {
                            return Err(Counter::Fragments);
                        }
                        next = e[0];
                        off += 8;
                    }
                    _ => break,
                }
                walked += 1;
                if off > 512 {
                    return Err(Counter::TooManyIpv6Extensions);
                }
            }
            (next, off)
        }
        _ => return Ok(None),
    };

    let opening = match proto {
        6 => get(l4..l4 + 20, Counter::TruncatedL4)?[13] & 0x17 == 0x02,
        17 => {
            get(l4..l4 + 8, Counter::TruncatedL4)?;
            true
        }
        132 => get(l4..l4 + 13, Counter::TruncatedL4)?[12] == 1,
        _ => false,
    };
    // An IPv6 destination of the IPv4-mapped form is never a VIP.
    if !opening || (ethertype == 0x86dd && dst[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
    {
        return Ok(None);
    }
    let ports = &f[l4..l4 + 4];
    let key = VipKey {
        addr: dst,
        port_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        family: if ethertype == 0x86dd {
            unidler_common::FAMILY_IPV6
        } else {
            unidler_common::FAMILY_IPV4
        },
    };
    Ok(Some((key, src, u16::from_ne_bytes([ports[0], ports[1]]))))
}
