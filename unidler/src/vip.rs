//! Service VIPs as people write them (`10.96.0.10:53/udp`, `[fd00::1]:80/tcp=3`), as the
//! kernel keys them ([`VipKey`]), and as VIP sources want them ([`DesiredVip`], [`VipUpdate`]),
//! whatever those sources are.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use serde::Serialize;
use thiserror::Error;
use unidler_common::{FAMILY_IPV4, FAMILY_IPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, VipKey};

/// The L4 protocols a VIP can have, as OVN names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP: a SYN without ACK opens a connection.
    Tcp,
    /// UDP: every datagram counts as opening.
    Udp,
    /// SCTP: an INIT chunk opens an association.
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        }
    }

    /// The protocol with this IP protocol number, if it is one of ours.
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            IPPROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// OVN's spelling: `tcp`, `udp` or `sctp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = VipError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(VipError::UnknownProtocol(s.to_owned())),
        }
    }
}

/// Why a VIP or protocol could not be read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum VipError {
    /// Not `tcp`, `udp` or `sctp`.
    #[error("unknown protocol {0:?} (expected tcp, udp or sctp)")]
    UnknownProtocol(String),
    /// A `--vip` that does not follow [`VipSpec`]'s form; the message names the part.
    #[error("{problem} in {spec:?}; {VIP_SPEC_HINT}")]
    Spec {
        /// The whole text given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
}

const VIP_SPEC_HINT: &str = "expected IP:PORT/PROTO[=BACKENDS][@LOAD_BALANCER], \
                             e.g. 10.96.0.10:80/tcp or [fd00::10]:53/udp=2";

/// A load-balancer VIP: address, port and protocol. Kept compact (20 bytes), as the agent holds
/// every VIP of a cluster several times over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    /// The address as [`ip_to_bytes`] spells it (IPv4 as IPv4-mapped IPv6).
    ip: [u8; 16],
    port: u16,
    /// L4 protocol.
    pub protocol: Protocol,
    /// An IPv6 address, even of the IPv4-mapped form (`[::ffff:a.b.c.d]:80`, which OVN
    /// matches only as IPv6).
    ipv6: bool,
}

impl Vip {
    /// A VIP, of `addr`'s own family.
    pub fn new(addr: SocketAddr, protocol: Protocol) -> Self {
        Self {
            ip: ip_to_bytes(addr.ip()),
            port: addr.port(),
            protocol,
            ipv6: addr.is_ipv6(),
        }
    }

    /// Address and port.
    pub fn addr(&self) -> SocketAddr {
        let ip = match self.ipv6 {
            true => IpAddr::V6(Ipv6Addr::from(self.ip)),
            false => ip_from_bytes(self.ip),
        };
        SocketAddr::new(ip, self.port)
    }

    /// The key of this VIP in the kernel's VIP map.
    pub fn key(&self) -> VipKey {
        VipKey {
            addr: self.ip,
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            family: if self.ipv6 { FAMILY_IPV6 } else { FAMILY_IPV4 },
        }
    }

    /// The VIP a kernel key stands for, if its protocol and family are ones of ours.
    pub fn from_key(key: &VipKey) -> Option<Self> {
        Some(Self {
            ip: key.addr,
            port: u16::from_be(key.port_be),
            protocol: Protocol::from_number(key.proto)?,
            ipv6: match key.family {
                FAMILY_IPV4 => false,
                FAMILY_IPV6 => true,
                _ => return None,
            },
        })
    }

    /// OVN's spelling of the address part: `IP:PORT`, or `[IP]:PORT` for IPv6.
    pub fn endpoint(&self) -> String {
        self.addr().to_string()
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.protocol)
    }
}

/// A kernel VIP key spelt as OVN spells its VIP, with the protocol: `10.96.0.10:80/tcp`,
/// `[fd00::10]:80/tcp` (for logs).
pub struct Spelt<'a>(pub &'a VipKey);

impl fmt::Display for Spelt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Vip::from_key(self.0) {
            Some(vip) => vip.fmt(f),
            None => f.write_str("(not a VIP key)"),
        }
    }
}

/// A VIP given on the command line: `IP:PORT/PROTO[=BACKENDS][@LOAD_BALANCER]`, IPv6 as
/// `[IP]:PORT/PROTO`. `=BACKENDS` omitted means zero backends, an idle service;
/// `@LOAD_BALANCER` is the Northbound Load_Balancer UUID its events name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    /// The VIP.
    pub vip: Vip,
    /// How many backends it has.
    pub backends: u32,
    /// The load balancer it belongs to, if given.
    pub load_balancer: Option<String>,
}

impl FromStr for VipSpec {
    type Err = VipError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| VipError::Spec {
            spec: s.to_owned(),
            problem,
        };
        let (rest, load_balancer) = match s.rsplit_once('@') {
            Some((_, "")) => return Err(bad("empty load balancer".into())),
            Some((rest, lb)) => (rest, Some(lb.to_owned())),
            None => (s, None),
        };
        let (vip, backends) = match rest.split_once('=') {
            Some((vip, n)) => (
                vip,
                n.parse::<u32>()
                    .map_err(|e| bad(format!("bad backend count {n:?}: {e}")))?,
            ),
            None => (rest, 0),
        };
        let (addr, proto) = vip
            .rsplit_once('/')
            .ok_or_else(|| bad("no protocol".into()))?;
        let protocol: Protocol = proto.parse().map_err(|e: VipError| bad(e.to_string()))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| bad(format!("bad address {addr:?}: {e}")))?;
        if addr.port() == 0 {
            return Err(bad("port 0 is not a service port".into()));
        }
        Ok(Self {
            vip: Vip::new(addr, protocol),
            backends,
            load_balancer,
        })
    }
}

impl VipSpec {
    /// The VIP as a source wants it in the map.
    pub fn desired(&self) -> DesiredVip {
        DesiredVip {
            vip: self.vip,
            backends: self.backends,
            load_balancer: self.load_balancer.as_deref().map(LoadBalancerName::new),
            scoped: None,
        }
    }
}

/// A VIP as a source wants it in the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    /// The VIP.
    pub vip: Vip,
    /// Its backend count.
    pub backends: u32,
    /// The load balancer its events name (in OVN, the Northbound Load_Balancer's UUID).
    pub load_balancer: Option<LoadBalancerName>,
    /// Where the VIP differs between this node's logical datapaths: its state on each scope
    /// where it is (absent scopes: not there, packets pass). None: the same everywhere, as
    /// `backends` and `load_balancer` say.
    pub scoped: Option<Box<[ScopeEntry]>>,
}

/// A VIP's state on one scope (in OVN, a logical datapath, by tunnel key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeEntry {
    /// The scope.
    pub scope: u32,
    /// The VIP's backends there.
    pub backends: u32,
    /// The load balancer its events name there.
    pub load_balancer: Option<LoadBalancerName>,
}

/// The name a VIP's events give its load balancer (`event_info:load_balancer`). OVN's are
/// UUIDs: kept as 16 bytes, without an allocation (the agent holds one per VIP, 100,000s);
/// any other text is kept as is, shared.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum LoadBalancerName {
    /// A UUID written in its canonical form (lowercase `8-4-4-4-12` hex), as a number.
    Uuid([u64; 2]),
    /// Any other text.
    Text(Arc<str>),
    /// Not known yet: the name is in the Southbound Load_Balancer row of this UUID
    /// (`external_ids:lb_id`, else the row's own UUID), read when an event first needs it
    /// ([`crate::ovn::lb_names`]). Never written as a name: its text is `sb-row:UUID`.
    SouthboundRow([u64; 2]),
}

impl LoadBalancerName {
    /// The name `text`; a canonical UUID is kept as a number (and written back the same).
    pub fn new(text: &str) -> Self {
        match canonical_uuid(text) {
            Some(n) => Self::from_uuid(n),
            None => Self::Text(text.into()),
        }
    }

    /// The UUID `n`.
    pub fn from_uuid(n: u128) -> Self {
        Self::Uuid([(n >> 64) as u64, n as u64])
    }

    /// The Southbound row to read the name from, while it is not known.
    pub fn southbound_row(&self) -> Option<[u64; 2]> {
        match self {
            Self::SouthboundRow(row) => Some(*row),
            _ => None,
        }
    }
}

fn uuid_text([high, low]: [u64; 2]) -> ovsdb::Uuid {
    ovsdb::Uuid::from_u128((u128::from(high) << 64) | u128::from(low))
}

/// The UUID `text` spells in canonical form (lowercase `8-4-4-4-12` hex), if it does.
fn canonical_uuid(text: &str) -> Option<u128> {
    ovsdb::Uuid::number_of(text).filter(|_| !text.bytes().any(|c| c.is_ascii_uppercase()))
}

impl fmt::Display for LoadBalancerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uuid(n) => write!(f, "{}", uuid_text(*n)),
            Self::Text(text) => f.write_str(text),
            Self::SouthboundRow(row) => write!(f, "sb-row:{}", uuid_text(*row)),
        }
    }
}

impl fmt::Debug for LoadBalancerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl From<&str> for LoadBalancerName {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for LoadBalancerName {
    fn from(text: String) -> Self {
        Self::new(&text)
    }
}

/// A change of the desired VIP set, as a VIP source sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VipUpdate {
    /// The whole set: VIPs not in it leave the map.
    Replace(Vec<DesiredVip>),
    /// Some VIPs added or changed, some removed.
    Changes {
        /// Added or changed.
        upsert: Vec<DesiredVip>,
        /// Gone.
        remove: Vec<Vip>,
    },
}

/// An address as the kernel stores it: 16 bytes, IPv4-mapped for IPv4.
pub fn ip_to_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`ip_to_bytes`]: IPv4-mapped addresses come back as IPv4.
pub fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
    canonical_ip(IpAddr::V6(Ipv6Addr::from(bytes)))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_idle_by_default() {
        let spec: VipSpec = "10.96.0.10:80/tcp".parse().unwrap();
        assert_eq!(spec.backends, 0);
        assert_eq!(spec.vip.endpoint(), "10.96.0.10:80");
        assert_eq!(spec.vip.protocol, Protocol::Tcp);
    }

    #[test]
    fn parses_ipv6_with_backends() {
        let spec: VipSpec = "[fd00::10]:53/UDP=3".parse().unwrap();
        assert_eq!(spec.backends, 3);
        assert_eq!(spec.vip.endpoint(), "[fd00::10]:53");
        assert_eq!(spec.vip.protocol, Protocol::Udp);
    }

    /// OVN matches `[::ffff:a.b.c.d]:port` only as IPv6: it is a VIP of its own, spelt as
    /// OVN spells it, never the IPv4 VIP of that address.
    #[test]
    fn an_ipv4_mapped_ipv6_vip_keeps_its_family_and_spelling() {
        let mapped: VipSpec = "[::ffff:10.203.1.2]:8082/tcp".parse().unwrap();
        let plain: VipSpec = "10.203.1.2:8082/tcp".parse().unwrap();
        assert_ne!(mapped.vip, plain.vip);
        assert_ne!(mapped.vip.key(), plain.vip.key());
        assert_eq!(mapped.vip.endpoint(), "[::ffff:10.203.1.2]:8082");
        assert_eq!(plain.vip.endpoint(), "10.203.1.2:8082");
        for vip in [mapped.vip, plain.vip] {
            assert_eq!(Vip::from_key(&vip.key()), Some(vip));
        }
        assert_eq!(size_of::<Vip>(), 20);
    }

    #[test]
    fn load_balancer_names_keep_their_text() {
        let uuid = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";
        for text in [uuid, "5B3CFB03-2143-4e8a-9067-dac1ef7ec6d7", "lb-1", ""] {
            assert_eq!(LoadBalancerName::new(text).to_string(), text);
        }
        assert!(matches!(
            LoadBalancerName::new(uuid),
            LoadBalancerName::Uuid(_)
        ));
        assert!(matches!(
            LoadBalancerName::new(&uuid.to_uppercase()),
            LoadBalancerName::Text(_)
        ));
        assert_eq!(
            LoadBalancerName::from_uuid(1).to_string(),
            "00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(size_of::<Option<LoadBalancerName>>(), 24);
    }

    #[test]
    fn parses_load_balancer() {
        let spec: VipSpec = "10.0.0.1:80/tcp@5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7"
            .parse()
            .unwrap();
        assert_eq!(spec.backends, 0);
        assert_eq!(
            spec.load_balancer.as_deref(),
            Some("5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7")
        );
        let spec: VipSpec = "[fd00::1]:80/udp=2@lb".parse().unwrap();
        assert_eq!(
            (spec.backends, spec.load_balancer.as_deref()),
            (2, Some("lb"))
        );
        assert!("10.0.0.1:80/tcp@".parse::<VipSpec>().is_err());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "10.0.0.1:80",
            "10.0.0.1/tcp",
            "10.0.0.1:80/icmp",
            "fd00::1:80/tcp",
            "10.0.0.1:0/tcp",
            "10.0.0.1:80/tcp=-1",
            "10.0.0.1:99999/tcp",
        ] {
            let err = bad.parse::<VipSpec>().unwrap_err().to_string();
            assert!(err.contains(bad) || err.contains("icmp"), "{bad}: {err}");
        }
    }

    #[test]
    fn key_round_trips_and_maps_ipv4() {
        let vip: Vip = "192.168.1.100:80/sctp".parse::<VipSpec>().unwrap().vip;
        let key = vip.key();
        assert_eq!(&key.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(key.port_be, 80u16.to_be());
        assert_eq!(key.proto, IPPROTO_SCTP);
        assert_eq!(Vip::from_key(&key), Some(vip));
        assert_eq!(key.family, FAMILY_IPV4);
    }
}
