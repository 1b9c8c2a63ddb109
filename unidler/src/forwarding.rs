//! Whether the node's forwarding carries a VIP's backend yet: on an OVN node, held packets are
//! replayed only once it does. ovn-controller learns of the backend from the same Southbound
//! change as the agent and installs its OpenFlow flows a few milliseconds later; a packet
//! replayed before that would meet the old flows: dropped, and, with `options:event=true`,
//! punted to ovn-controller, which would write a Controller_Event row for a service that is
//! already waking.
//!
//! The integration bridge's flows for the VIP are read with `ovs-ofctl dump-flows` (filtered
//! by the VIP's protocol, address and port). Ready means: some flow load-balances the VIP
//! (`group:`, OVN's `ct_lb_mark` with backends), and none sends it to the controller (the
//! `trigger_event` flow of a VIP without backends) or drops it.

use std::{process::Command, time::Duration};

use tokio::sync::mpsc;
use tracing::{debug, warn};
use unidler_common::{IPPROTO_SCTP, IPPROTO_TCP, VipKey};

use crate::vip::Vip;

/// How often the flows are read while a VIP waits.
const POLL: Duration = Duration::from_millis(5);

/// What a forwarding check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardingCheck {
    /// The flows carry the backend: replay now.
    Ready,
    /// The flows were not ready within the wait: replay anyway (TCP replays repeat until
    /// answered).
    TimedOut,
    /// The flows cannot be read (no `ovs-ofctl`, no bridge): replay now, and say so once.
    Unknown,
}

/// Reads an OVS bridge's OpenFlow flows for VIPs.
#[derive(Clone, Debug)]
pub struct FlowReader {
    /// `ovs-ofctl` target of the bridge, e.g. `unix:/var/run/openvswitch/br-int.mgmt`.
    pub target: String,
    /// Longest wait for a VIP's flows.
    pub max_wait: Duration,
}

impl FlowReader {
    /// Waits (off the agent's loop) until the bridge's flows carry `vip`'s backend, then sends
    /// the VIP and what was found on `ready`.
    pub fn wait_for(&self, vip: VipKey, ready: mpsc::UnboundedSender<(VipKey, ForwardingCheck)>) {
        let reader = self.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let outcome = loop {
                match reader.carries(&vip) {
                    Ok(true) => break ForwardingCheck::Ready,
                    Ok(false) if started.elapsed() >= reader.max_wait => {
                        break ForwardingCheck::TimedOut;
                    }
                    Ok(false) => std::thread::sleep(POLL),
                    Err(e) => {
                        debug!("cannot read the bridge's flows: {e}");
                        break ForwardingCheck::Unknown;
                    }
                }
            };
            debug!(vip = ?Vip::from_key(&vip).map(|v| v.to_string()), ?outcome, waited = ?started.elapsed(), "forwarding checked");
            let _ = ready.send((vip, outcome));
        });
    }

    /// Whether the bridge's flows load-balance `vip` and none punts or drops it.
    fn carries(&self, vip: &VipKey) -> std::io::Result<bool> {
        let Some(filter) = flow_filter(vip) else {
            return Ok(true);
        };
        let out = Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15", "dump-flows", &self.target, &filter])
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(flows_carry(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// The `ovs-ofctl` match for a VIP's packets: protocol, destination address and port.
fn flow_filter(vip: &VipKey) -> Option<String> {
    let vip = Vip::from_key(vip)?;
    let addr = vip.addr();
    let v6 = addr.is_ipv6();
    let proto = match (vip.protocol.number(), v6) {
        (IPPROTO_TCP, false) => "tcp",
        (IPPROTO_TCP, true) => "tcp6",
        (IPPROTO_SCTP, false) => "sctp",
        (IPPROTO_SCTP, true) => "sctp6",
        (_, false) => "udp",
        (_, true) => "udp6",
    };
    let dst = if v6 { "ipv6_dst" } else { "nw_dst" };
    Some(format!(
        "{proto},{dst}={},tp_dst={}",
        addr.ip(),
        addr.port()
    ))
}

/// Whether dumped flows load-balance (a `group:` action) and none punts to the controller or
/// drops.
fn flows_carry(dump: &str) -> bool {
    let actions: Vec<&str> = dump
        .lines()
        .filter_map(|l| l.split_once(" actions=").map(|(_, a)| a))
        .collect();
    actions.iter().any(|a| a.contains("group:"))
        && !actions
            .iter()
            .any(|a| a.starts_with("controller(") || *a == "drop")
}

/// Logs, once per agent, that readiness is unknown.
pub fn warn_unknown_once(warned: &mut bool, target: &str) {
    if !*warned {
        *warned = true;
        warn!(
            target,
            "cannot read the integration bridge's flows (is ovs-ofctl installed, the OVS run \
             directory mounted?): held packets are replayed as soon as the Southbound database \
             has the backend, possibly before ovn-controller installed its flows"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_load_balancing_flows_without_punt_or_drop_carry_the_vip() {
        let event = " cookie=0x1, table=13, priority=130,tcp,nw_dst=10.96.9.9,tp_dst=8080 actions=controller(userdata=00.00)";
        let pre = " cookie=0x2, table=14, priority=120,tcp,nw_dst=10.96.9.9,tp_dst=8080 actions=set_field:0x1->xxreg0,ct(table=15,zone=NXM_NX_REG13[0..15],nat)";
        let drop = " cookie=0x3, table=20, priority=120,ct_state=+new+trk,tcp,nw_dst=10.96.9.9,tp_dst=8080 actions=drop";
        let lb = " cookie=0x4, table=20, priority=120,ct_state=+new+trk,tcp,nw_dst=10.96.9.9,tp_dst=8080 actions=set_field:0/0x2->xxreg0,group:1";
        assert!(!flows_carry(&[event, pre, drop].join("\n")));
        assert!(
            !flows_carry(&[event, pre, lb].join("\n")),
            "the event flow is still there"
        );
        assert!(!flows_carry(pre));
        assert!(flows_carry(&[pre, lb].join("\n")));
    }
}
