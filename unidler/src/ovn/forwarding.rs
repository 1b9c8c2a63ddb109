//! Whether the node's forwarding carries a VIP's backend yet: on an OVN node, held packets are
//! replayed only once it does. ovn-controller learns of the backend from the same Southbound
//! change as the agent and installs its OpenFlow flows a few milliseconds later; a packet
//! replayed before that would meet the old flows: dropped, and, with `options:event=true`,
//! punted to ovn-controller, which would write a Controller_Event row for a service that is
//! already waking.
//!
//! One reader serves every waking VIP, on a thread of its own: each round it reads the
//! integration bridge's flows with one `ovs-ofctl dump-flows` per VIP address (filtered by
//! protocol and address; the VIPs on that address judged from the same dump), or, when many
//! addresses of a protocol wait, one dump of the whole protocol for them all, one process at a
//! time, then waits 5 ms, doubling to 100 ms while nothing new waits. Ready means: among the
//! flows of the VIP's port on the logical datapath the held packets came in on (OpenFlow
//! `metadata`, the datapath's tunnel key; every datapath for a VIP that is the same on all),
//! some flow load-balances the VIP (`group:`, OVN's `ct_lb_mark` with backends), and none sends
//! it to the controller (the `trigger_event` flow of a VIP without backends) or drops it.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{debug, warn};
use unidler_common::{IPPROTO_SCTP, IPPROTO_TCP, VipKey};

use crate::vip::Vip;

/// The first wait between two reads of the flows.
const POLL_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between two reads, while the same VIPs wait.
const POLL_MOST: Duration = Duration::from_millis(100);

/// Most addresses of one protocol read one dump each in a round; beyond, one dump of the
/// whole protocol serves them all (one process, however many VIPs wake at once).
const ADDRESSES_PER_DUMP: usize = 8;

/// Longest one `ovs-ofctl` may take (a stalled `ovs-vswitchd`): then the VIPs of its
/// address are `Unknown`, and replayed.
const DUMP_TIMEOUT: Duration = Duration::from_secs(1);

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

/// A VIP waiting for the node's forwarding to carry its backend, on one logical datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Waiting {
    /// The VIP.
    pub vip: VipKey,
    /// The tunnel key of the logical datapath its held packets came in on; 0: every datapath
    /// (a VIP that is the same on all).
    pub datapath: u32,
}

/// Where and how long the node's forwarding is read.
#[derive(Clone, Debug)]
pub struct FlowReader {
    /// `ovs-ofctl` target of the bridge, e.g. `unix:/var/run/openvswitch/br-int.mgmt`.
    pub target: String,
    /// Longest wait for a VIP's flows.
    pub max_wait: Duration,
}

/// The running reader: where waiting VIPs are sent.
#[derive(Clone, Debug)]
pub struct ForwardingReader {
    requests: std_mpsc::Sender<Waiting>,
    /// `ovs-ofctl` target of the bridge.
    pub target: String,
}

impl ForwardingReader {
    /// Waits (on the reader's thread) until the bridge's flows carry `waiting`'s backend; the
    /// outcome comes on the channel the reader was started with.
    pub fn wait_for(&self, waiting: Waiting) {
        let _ = self.requests.send(waiting);
    }
}

impl FlowReader {
    /// Starts the reader's thread; outcomes go to `done`. The thread ends with the last
    /// [`ForwardingReader`], or once `done` is closed.
    pub fn start(
        self,
        done: mpsc::UnboundedSender<(Waiting, ForwardingCheck)>,
    ) -> std::io::Result<ForwardingReader> {
        let (requests, waiting) = std_mpsc::channel();
        let target = self.target.clone();
        std::thread::Builder::new()
            .name("forwarding".into())
            .spawn(move || self.run(&waiting, &done))?;
        Ok(ForwardingReader { requests, target })
    }

    fn run(
        &self,
        requests: &std_mpsc::Receiver<Waiting>,
        done: &mpsc::UnboundedSender<(Waiting, ForwardingCheck)>,
    ) {
        let mut waiting: Vec<(Waiting, Instant)> = Vec::new();
        let mut pause = POLL_FIRST;
        loop {
            // Blocks while nothing waits; else waits at most `pause` for more.
            let arrived = if waiting.is_empty() {
                match requests.recv() {
                    Ok(w) => Some(w),
                    Err(_) => return,
                }
            } else {
                match requests.recv_timeout(pause) {
                    Ok(w) => Some(w),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            match arrived {
                Some(first) => {
                    pause = POLL_FIRST;
                    for w in std::iter::once(first).chain(requests.try_iter()) {
                        if !waiting.iter().any(|(x, _)| *x == w) {
                            waiting.push((w, Instant::now()));
                        }
                    }
                }
                None => pause = (pause * 2).min(POLL_MOST),
            }
            if self.read_round(&mut waiting, done).is_err() {
                return;
            }
        }
    }

    /// One round: one dump per address among `waiting`, and what it decides sent at once
    /// (and removed); also those whose wait is over, whatever the dumps. Err once `done` is
    /// closed.
    fn read_round(
        &self,
        waiting: &mut Vec<(Waiting, Instant)>,
        done: &mpsc::UnboundedSender<(Waiting, ForwardingCheck)>,
    ) -> Result<(), ()> {
        // By protocol, then by address.
        let mut by_protocol: BTreeMap<&'static str, BTreeMap<String, Vec<Waiting>>> =
            BTreeMap::new();
        let mut decided: Vec<(Waiting, ForwardingCheck)> = Vec::new();
        for (w, _) in waiting.iter() {
            match match_fields(&w.vip) {
                Some((protocol, address)) => by_protocol
                    .entry(protocol)
                    .or_default()
                    .entry(address)
                    .or_default()
                    .push(*w),
                None => decided.push((*w, ForwardingCheck::Ready)),
            }
        }
        // A dump per address while few wait; one of the whole protocol for many addresses.
        // Each dump with its VIPs, and the address each is judged at where the dump has more
        // than one.
        let mut dumps: Vec<(String, Vec<Judged>)> = Vec::new();
        for (protocol, addresses) in by_protocol {
            if addresses.len() > ADDRESSES_PER_DUMP {
                let members = addresses
                    .into_iter()
                    .flat_map(|(address, ws)| {
                        ws.into_iter().map(move |w| (w, Some(address.clone())))
                    })
                    .collect();
                dumps.push((protocol.to_owned(), members));
            } else {
                for (address, members) in addresses {
                    let members = members.into_iter().map(|w| (w, None)).collect();
                    dumps.push((format!("{protocol},{address}"), members));
                }
            }
        }
        fn send(
            decided: &mut Vec<(Waiting, ForwardingCheck)>,
            waiting: &mut Vec<(Waiting, Instant)>,
            done: &mpsc::UnboundedSender<(Waiting, ForwardingCheck)>,
        ) -> Result<(), ()> {
            for (w, outcome) in decided.drain(..) {
                waiting.retain(|(x, _)| *x != w);
                debug!(vip = %crate::vip::Spelt(&w.vip), datapath = w.datapath, ?outcome, "forwarding checked");
                done.send((w, outcome)).map_err(|_| ())?;
            }
            Ok(())
        }
        send(&mut decided, waiting, done)?;
        for (filter, members) in dumps {
            match self.dump(&filter) {
                Ok(dump) => {
                    let flows = parse_flows(&dump);
                    for (w, address) in members {
                        let port = u16::from_be(w.vip.port_be);
                        if flows_carry(&flows, address.as_deref(), port, w.datapath) {
                            decided.push((w, ForwardingCheck::Ready));
                        }
                    }
                }
                Err(e) => {
                    debug!("cannot read the bridge's flows: {e}");
                    decided.extend(
                        members
                            .into_iter()
                            .map(|(w, _)| (w, ForwardingCheck::Unknown)),
                    );
                }
            }
            send(&mut decided, waiting, done)?;
        }
        decided.extend(
            waiting
                .iter()
                .filter(|(_, since)| since.elapsed() >= self.max_wait)
                .map(|(w, _)| (*w, ForwardingCheck::TimedOut)),
        );
        send(&mut decided, waiting, done)
    }

    /// The bridge's flows that match `filter`, as `ovs-ofctl` prints them.
    fn dump(&self, filter: &str) -> std::io::Result<String> {
        let out = Command::new("ovs-ofctl")
            .args([
                &format!("--timeout={}", DUMP_TIMEOUT.as_secs()),
                "-O",
                "OpenFlow15",
                "dump-flows",
                &self.target,
                filter,
            ])
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The `ovs-ofctl` match for the packets to a VIP's address: its protocol (`tcp`, `udp6`...)
/// and its destination address field (`nw_dst=10.96.0.10`, `ipv6_dst=fd00::10`), as
/// `ovs-ofctl` prints them too. The port is matched in [`flows_carry`], so that the VIPs of
/// one address share a dump.
fn match_fields(vip: &VipKey) -> Option<(&'static str, String)> {
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
    Some((proto, format!("{dst}={}", addr.ip())))
}

/// A waiting VIP in a dump, with the address field it is judged at when the dump is of its
/// whole protocol (None: the dump is of its address alone).
type Judged = (Waiting, Option<String>);

/// One dumped flow: the port and logical datapath it matches, and its actions.
#[derive(Debug, PartialEq, Eq)]
struct Flow<'a> {
    /// `tp_dst`, if the flow matches one.
    port: Option<u16>,
    /// `nw_dst=...` or `ipv6_dst=...`, if the flow matches one.
    address: Option<&'a str>,
    /// `metadata` (the logical datapath's tunnel key), if the flow matches one.
    datapath: Option<u32>,
    actions: &'a str,
}

fn parse_flows(dump: &str) -> Vec<Flow<'_>> {
    dump.lines()
        .filter_map(|line| {
            let (matches, actions) = line.split_once(" actions=")?;
            let field = |name: &str| {
                matches
                    .split([',', ' '])
                    .find_map(|f| f.strip_prefix(name))
                    .map(|v| v.split('/').next().unwrap_or(v))
            };
            let number = |v: &str| match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            };
            let address = matches
                .split([',', ' '])
                .find(|f| f.starts_with("nw_dst=") || f.starts_with("ipv6_dst="));
            Some(Flow {
                address,
                port: field("tp_dst=").and_then(number).map(|p| p as u16),
                datapath: field("metadata=").and_then(number).map(|d| d as u32),
                actions,
            })
        })
        .collect()
}

/// Whether the flows of `port` (at `address`, a [`match_fields`] field, if the dump was not
/// of that address alone) on logical datapath `datapath` (0: on any) load-balance (a `group:`
/// action) and none punts to the controller or drops.
fn flows_carry(flows: &[Flow<'_>], address: Option<&str>, port: u16, datapath: u32) -> bool {
    let mine: Vec<&str> = flows
        .iter()
        .filter(|f| f.port == Some(port) && (datapath == 0 || f.datapath == Some(datapath)))
        .filter(|f| address.is_none_or(|a| f.address == Some(a)))
        .map(|f| f.actions)
        .collect();
    mine.iter().any(|a| a.contains("group:"))
        && !mine
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
        let event = " cookie=0x1, table=13, priority=130,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=8080 actions=controller(userdata=00.00)";
        let pre = " cookie=0x2, table=14, priority=120,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=8080 actions=set_field:0x1->xxreg0,ct(table=15,zone=NXM_NX_REG13[0..15],nat)";
        let drop = " cookie=0x3, table=20, priority=120,ct_state=+new+trk,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=8080 actions=drop";
        let lb = " cookie=0x4, table=20, priority=120,ct_state=+new+trk,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=8080 actions=set_field:0/0x2->xxreg0,group:1";
        let carry = |lines: &[&str]| flows_carry(&parse_flows(&lines.join("\n")), None, 8080, 0);
        assert!(!carry(&[event, pre, drop]));
        assert!(!carry(&[event, pre, lb]), "the event flow is still there");
        assert!(!carry(&[pre]));
        assert!(carry(&[pre, lb]));
        assert!(
            !flows_carry(&parse_flows(&[pre, lb].join("\n")), None, 8081, 0),
            "another port's flows"
        );
        let dump = [pre, lb].join("\n");
        let flows = parse_flows(&dump);
        assert!(flows_carry(&flows, Some("nw_dst=10.96.9.9"), 8080, 0));
        assert!(
            !flows_carry(&flows, Some("nw_dst=10.96.9.99"), 8080, 0),
            "another address's flows, in a dump of the whole protocol"
        );
    }

    /// A VIP on several logical datapaths (a scoped VIP) is ready on the datapath its held
    /// packets came in on when that datapath's flows carry it, whatever another's do.
    #[test]
    fn a_vip_is_judged_on_the_datapath_its_packets_came_in_on() {
        let dump = [
            " table=13, priority=130,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=8080 actions=controller(userdata=00.00)",
            " table=20, priority=120,ct_state=+new+trk,tcp,metadata=0x2,nw_dst=10.96.9.9,tp_dst=8080 actions=group:7",
        ]
        .join("\n");
        let flows = parse_flows(&dump);
        assert_eq!(flows[0].datapath, Some(1));
        assert_eq!(flows[1].port, Some(8080));
        assert!(flows_carry(&flows, None, 8080, 2), "datapath 2 carries it");
        assert!(
            !flows_carry(&flows, None, 8080, 1),
            "datapath 1 still punts"
        );
        assert!(
            !flows_carry(&flows, None, 8080, 0),
            "not yet on every datapath"
        );
    }
}
