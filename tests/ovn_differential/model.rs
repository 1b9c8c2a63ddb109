//! The model: what the agent should show and the kernel should do, computed from the whole
//! world by the rules the README states; and the differences from what they do.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::world::{LbSpec, TUNNEL_KEYS, World};

/// A VIP as the model and the comparison name it: protocol number, family, address, port.
pub type Key = (u8, u8, [u8; 16], u16);

pub fn protocol_number(protocol: Option<&str>) -> u8 {
    match protocol {
        None | Some("tcp") => 6,
        Some("udp") => 17,
        Some("sctp") => 132,
        Some(other) => panic!("protocol {other}"),
    }
}

/// The key of `addr` (IPv4 stored IPv4-mapped, as the kernel map keeps it; the family tells
/// them apart).
pub fn key_of(addr: SocketAddr, protocol: u8) -> Key {
    let (family, bytes) = match addr.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    (protocol, family, bytes, addr.port())
}

pub fn spelt(key: &Key) -> String {
    let ip = match key.1 {
        4 => IpAddr::V4(std::net::Ipv6Addr::from(key.2).to_ipv4_mapped().unwrap()),
        _ => IpAddr::V6(std::net::Ipv6Addr::from(key.2)),
    };
    format!("{}/{}", SocketAddr::new(ip, key.3), key.0)
}

/// How many backends a `vips` value lists.
pub fn count_backends(value: &str) -> u32 {
    value.split(',').filter(|b| !b.trim().is_empty()).count() as u32
}

/// What the agent should show and the kernel should do: each watched VIP's backends, and,
/// for each, whether it is dropped as idle on each local datapath (by tunnel key) and on an
/// interface without a scope (None).
#[derive(Default, PartialEq, Eq)]
pub struct Expected {
    pub backends: BTreeMap<Key, u32>,
    pub idle: BTreeMap<(Key, Option<u32>), bool>,
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (key, backends) in &self.backends {
            let idle: Vec<String> = self
                .idle
                .iter()
                .filter(|((k, _), idle)| k == key && **idle)
                .map(|((_, scope), _)| scope.map_or("unscoped".to_owned(), |s| s.to_string()))
                .collect();
            writeln!(
                f,
                "{}: {backends} backends, idle on [{}]",
                spelt(key),
                idle.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The model: computed from the whole world, by the rules the README states, without any of
/// the agent's incremental machinery.
pub fn model(world: &World) -> Expected {
    let true_ish = |v: Option<&str>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let global = true_ish(world.global_event);
    let local: BTreeSet<usize> = world
        .ports
        .iter()
        .filter(|p| p.bound)
        .map(|p| p.datapath)
        .collect();
    let applies = |lb: &LbSpec, dp: usize| {
        lb.datapaths.contains(&dp) || lb.group.is_some_and(|g| world.groups[g].contains(&dp))
    };
    // (reports, backends, datapaths it applies on) of every local load balancer, per VIP.
    let mut having: BTreeMap<Key, Vec<(bool, u32, BTreeSet<usize>)>> = BTreeMap::new();
    for lb in world.lbs.values() {
        let on: BTreeSet<usize> = local.iter().copied().filter(|d| applies(lb, *d)).collect();
        if !local.is_empty() && on.is_empty() {
            continue;
        }
        let reports = (global || true_ish(lb.event)) && !true_ish(lb.reject);
        for (key, value) in &lb.vips {
            let Ok(addr) = key.parse::<SocketAddr>() else {
                continue;
            };
            having
                .entry(key_of(addr, protocol_number(lb.protocol)))
                .or_default()
                .push((reports, count_backends(value), on.clone()));
        }
    }
    let mut expected = Expected::default();
    for (key, lbs) in having {
        if !lbs.iter().any(|(reports, _, _)| *reports) {
            continue;
        }
        let backends = lbs.iter().map(|(_, b, _)| *b).max().unwrap_or(0);
        expected.backends.insert(key, backends);
        expected.idle.insert((key, None), backends == 0);
        for dp in &local {
            let here: Vec<_> = lbs.iter().filter(|(_, _, on)| on.contains(dp)).collect();
            let idle = if here.iter().any(|(reports, b, _)| *reports || *b > 0) {
                here.iter().all(|(_, b, _)| *b == 0)
            } else {
                false
            };
            expected.idle.insert((key, Some(TUNNEL_KEYS[*dp])), idle);
        }
    }
    expected
}

/// The local datapaths' tunnel keys in `world`.
pub fn local_scopes(world: &World) -> BTreeSet<u32> {
    world
        .ports
        .iter()
        .filter(|p| p.bound)
        .map(|p| TUNNEL_KEYS[p.datapath])
        .collect()
}

/// The differences between `want` and `got`, one line each.
pub fn differences(want: &Expected, got: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    for (key, b) in &want.backends {
        match got.backends.get(key) {
            None => out.push(format!("{} missing (want {b} backends)", spelt(key))),
            Some(g) if g != b => out.push(format!("{}: {g} backends, want {b}", spelt(key))),
            _ => {}
        }
    }
    for key in got
        .backends
        .keys()
        .filter(|k| !want.backends.contains_key(k))
    {
        out.push(format!("{} present, should not be watched", spelt(key)));
    }
    for ((key, scope), idle) in &want.idle {
        if let Some(g) = got.idle.get(&(*key, *scope))
            && g != idle
        {
            out.push(format!(
                "{} on {}: {}, want {}",
                spelt(key),
                scope.map_or("an unscoped interface".to_owned(), |s| format!("scope {s}")),
                if *g { "dropped as idle" } else { "passed" },
                if *idle { "dropped as idle" } else { "passed" },
            ));
        }
    }
    out
}
