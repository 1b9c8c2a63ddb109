//! `--ovn-vifs` on a real OVN node (ovs-vswitchd with the userspace datapath, ovn-controller):
//! the VIF present when the agent starts and one added later (a pod created) are covered, each
//! proved by real traffic from its pod to an idle VIP (an event naming the interface), and a
//! removed port (the pod deleted) is detached, the same interface in br-int without an iface-id
//! is left alone, and one re-created under the same name is covered again; with
//! `--ovn-uplinks`, the system interface of the bridge in `ovn-bridge-mappings` is covered too.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use unidler_tests::{
    agent::Agent,
    frames::Frame,
    netns::{in_netns, mac, send_frames, sh},
    ovn_chassis::{BACKEND_MAC, OvnNode},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 8);
const PORT: u16 = 8080;

/// One TCP connection attempt to the VIP from namespace `ns`.
fn knock(ns: &str) {
    unidler_tests::netns::in_netns(ns, || {
        let _ = std::net::TcpStream::connect_timeout(
            &SocketAddr::new(VIP.into(), PORT),
            Duration::from_millis(200),
        );
    });
}

/// Knocks from `ns` until the agent reports an event from `iface`, or panics after 10 s.
#[track_caller]
fn covered(agent: &mut Agent, ns: &str, iface: &str) {
    for _ in 0..20 {
        knock(ns);
        while let Some(event) = agent.next_event(Duration::from_millis(300)) {
            if event["iface"] == iface {
                return;
            }
        }
    }
    panic!(
        "no event from {iface}; agent log:\n{}",
        agent.log_lines().cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn vifs_of_a_real_ovs_are_covered_as_pods_come_and_go() {
    require_root();
    let mut node = OvnNode::start("ov");
    let ovs_db = node.conf_remote();
    let vip = format!("{VIP}:{PORT}/tcp");
    let mut agent = Agent::start(
        &node.node_ns,
        &[
            "run",
            // Attachments to followed interfaces are logged at debug.
            "--log-level",
            "info,unidler=debug",
            "--ovn-vifs",
            "--ovn-uplinks",
            "--ovs-db",
            &ovs_db,
            "--vip",
            &vip,
            "--vip-event-rate",
            "100",
            "--vip-event-burst",
            "100",
        ],
    );
    // The client's VIF was there before the agent.
    agent.wait_for_log(&format!("iface={}", node.node_if), Duration::from_secs(10));
    let client_ns = node.client_ns.clone();
    let client_if = node.node_if.clone();
    covered(&mut agent, &client_ns, &client_if);

    // A pod created: its port added to br-int with an iface-id.
    let pod_ns = node.add_backend_pod();
    let pod_if = node.backend_node_if();
    agent.wait_for_log(&format!("iface={pod_if}"), Duration::from_secs(10));
    covered(&mut agent, &pod_ns, &pod_if);

    // The pod deleted: its port leaves OVS, the agent detaches.
    node.vsctl(&["del-port", "br-int", &pod_if]);
    agent.wait_for_log("no longer one of OVN's interfaces", Duration::from_secs(10));
    for _ in 0..3 {
        knock(&pod_ns);
    }
    while let Some(event) = agent.next_event(Duration::from_millis(500)) {
        assert_ne!(event["iface"], pod_if, "an event from a detached interface");
    }
    // The client's VIF is still covered.
    covered(&mut agent, &client_ns, &client_if);

    // The same interface back in br-int without an iface-id: not an OVN VIF, left alone.
    node.vsctl(&["add-port", "br-int", &pod_if]);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        knock(&pod_ns);
    }
    while let Some(event) = agent.next_event(Duration::from_millis(500)) {
        assert_ne!(
            event["iface"], pod_if,
            "an event from a port without iface-id"
        );
    }

    // The pod's interface re-created under the same name (a new ifindex) and bound again.
    node.vsctl(&["del-port", "br-int", &pod_if]);
    sh(&["ip", "-n", &node.node_ns, "link", "del", &pod_if]);
    let pod_side = format!("{}b", pod_if.trim_end_matches('m'));
    sh(&[
        "ip",
        "-n",
        &node.node_ns,
        "link",
        "add",
        &pod_if,
        "type",
        "veth",
        "peer",
        "name",
        &pod_side,
        "netns",
        &pod_ns,
        "address",
        &mac(BACKEND_MAC),
    ]);
    sh(&["ip", "-n", &node.node_ns, "link", "set", &pod_if, "up"]);
    for args in [
        vec!["addr", "add", "192.168.77.12/24", "dev", pod_side.as_str()],
        vec!["link", "set", pod_side.as_str(), "up"],
        vec!["route", "replace", "default", "via", "192.168.77.1"],
    ] {
        let mut full = vec!["ip", "-n", pod_ns.as_str()];
        full.extend(args);
        sh(&full);
    }
    node.vsctl(&[
        "add-port",
        "br-int",
        &pod_if,
        "--",
        "set",
        "Interface",
        &pod_if,
        "external_ids:iface-id=vif2",
    ]);
    // (Attached on the port's appearance: `covered` knocks until the event comes.)
    covered(&mut agent, &pod_ns, &pod_if);

    // An uplink: a veth in a bridge named in ovn-bridge-mappings; a SYN from outside arrives
    // on it.
    let uplink = format!("{}u", client_if.trim_end_matches('n'));
    let outside = format!("{}o", client_if.trim_end_matches('n'));
    sh(&[
        "ip",
        "-n",
        &node.node_ns,
        "link",
        "add",
        &uplink,
        "type",
        "veth",
        "peer",
        "name",
        &outside,
    ]);
    for iface in [&uplink, &outside] {
        sh(&["ip", "-n", &node.node_ns, "link", "set", iface, "up"]);
    }
    node.vsctl(&[
        "add-br",
        "br-ex",
        "--",
        "set",
        "Bridge",
        "br-ex",
        "datapath_type=netdev",
        "--",
        "add-port",
        "br-ex",
        &uplink,
        "--",
        "set",
        "Open_vSwitch",
        ".",
        "external_ids:ovn-bridge-mappings=physnet:br-ex",
    ]);
    agent.wait_for_log(&format!("iface={uplink}"), Duration::from_secs(10));
    let syn = Frame::tcp_syn("192.0.2.7".parse().unwrap(), 40_000, VIP.into(), PORT).build();
    let node_ns = node.node_ns.clone();
    for _ in 0..20 {
        in_netns(&node_ns, || send_frames(&outside, [syn.clone()]));
        if let Some(event) = agent.next_event(Duration::from_millis(300))
            && event["iface"] == uplink
        {
            return;
        }
    }
    panic!("no event from the uplink {uplink}");
}
