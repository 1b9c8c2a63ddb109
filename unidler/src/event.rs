//! Events as the agent reports them: a kernel [`IdleHitEvent`] resolved against the
//! [`VipRegistry`] into the VIP, its load balancer and the interface name.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::Serialize;
use unidler_common::{EventAction, FAMILY_IPV6, IdleHitEvent, VipKey};

use crate::{
    registry::VipRegistry,
    vip::{LoadBalancerName, Protocol, Vip, ip_from_bytes},
};

/// One idle hit, ready to print or to turn into a `Controller_Event` row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdleHit {
    /// The VIP's kernel key (what the hit was for, unspelt).
    #[serde(skip)]
    pub key: VipKey,
    /// The VIP in OVN's spelling: `IP:PORT`, or `[IP]:PORT` for IPv6.
    pub vip: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: Protocol,
    /// The client that tried to connect: `IP:PORT` (`[IP]:PORT` for IPv6).
    pub src: String,
    /// Interface the packet arrived on.
    pub iface: String,
    /// Its index.
    pub ifindex: u32,
    /// UUID of the Northbound Load_Balancer, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    /// While the name is not read yet: the Southbound Load_Balancer row to read it from
    /// ([`crate::ovn::lb_names`]).
    #[serde(skip)]
    pub load_balancer_row: Option<[u64; 2]>,
    /// `dropped` or `passed`: what the datapath did with the packet.
    pub action: &'static str,
    /// When the kernel saw the packet, `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
}

impl IdleHit {
    /// Resolves a kernel event against the VIPs as they are now. None for a VIP that has
    /// left the map since the kernel wrote the event (a row for it would name no load
    /// balancer, and nobody is waiting for it any more). `iface_name` maps an ifindex to a
    /// name, `scope` to its scope (a scoped VIP names the load balancer of that scope).
    pub fn resolve(
        event: &IdleHitEvent,
        registry: &VipRegistry,
        iface_name: impl Fn(u32) -> String,
        scope: impl Fn(u32) -> Option<u32>,
    ) -> Option<Self> {
        let vip = Vip::from_key(&event.vip)?;
        if !registry.contains(&vip) {
            return None;
        }
        let name = registry.load_balancer_on(&vip, scope(event.ifindex));
        let load_balancer_row = name.as_ref().and_then(LoadBalancerName::southbound_row);
        let load_balancer = name
            .filter(|_| load_balancer_row.is_none())
            .as_ref()
            .map(ToString::to_string);
        // The source is of the VIP's family.
        let src_ip = match event.vip.family {
            FAMILY_IPV6 => IpAddr::V6(Ipv6Addr::from(event.src_addr)),
            _ => ip_from_bytes(event.src_addr),
        };
        let src = SocketAddr::new(src_ip, u16::from_be(event.src_port_be));
        Some(Self {
            key: event.vip,
            vip: vip.endpoint(),
            protocol: vip.protocol,
            src: src.to_string(),
            iface: iface_name(event.ifindex),
            ifindex: event.ifindex,
            load_balancer,
            load_balancer_row,
            action: if event.action == EventAction::Passed as u32 {
                "passed"
            } else {
                "dropped"
            },
            timestamp_ns: event.timestamp_ns,
        })
    }
}

/// The name of interface `ifindex`, or `if<N>` if it has none (any more).
pub fn iface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(vip: &Vip) -> IdleHitEvent {
        IdleHitEvent {
            vip: vip.key(),
            ifindex: 1,
            action: EventAction::Dropped as u32,
            ..IdleHitEvent::default()
        }
    }

    #[test]
    fn a_hit_for_a_vip_that_left_the_map_is_not_reported() {
        let vip = "10.96.0.10:80/tcp"
            .parse::<crate::vip::VipSpec>()
            .unwrap()
            .vip;
        let mut registry = VipRegistry::new();
        registry.upsert(vip, 0, 0, Some("lb".into()));
        let hit = IdleHit::resolve(&event(&vip), &registry, |_| "eth0".into(), |_| None).unwrap();
        assert_eq!(hit.load_balancer.as_deref(), Some("lb"));
        registry.remove(&vip);
        assert_eq!(
            IdleHit::resolve(&event(&vip), &registry, |_| "eth0".into(), |_| None),
            None,
            "it would name no load balancer"
        );
    }
}
