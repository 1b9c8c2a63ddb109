//! unidler against OVN's own unidling path on one real OVN node (ovn-northd, ovs-vswitchd with
//! the userspace datapath, ovn-controller): for the same idle VIP, the row unidler writes is the
//! row ovn-controller writes, so the CMS cannot tell them apart; and while unidler runs, OVN's
//! own path stays quiet (the SYN never reaches it).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::{Agent, southbound_args},
    ovn_chassis::OvnNode,
    ovsdb_server::{EventRow, Southbound, TempDir},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const PORT: u16 = 8080;

/// One real connection attempt from the client namespace to the VIP.
fn knock(node: &OvnNode) {
    node.in_client(|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        let _ = socket.connect(&SocketAddr::new(VIP.into(), PORT).into());
        // Long enough for the SYN to leave before the socket goes.
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// Knocks until a Controller_Event row appears (a SYN may be lost while flows settle).
#[track_caller]
fn row_after_knocking(node: &OvnNode, who: &str) -> EventRow {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        knock(node);
        let rows = node.central.sb.event_rows();
        if let Some(row) = rows.first() {
            assert_eq!(rows.len(), 1, "{who}: one row per idle VIP: {rows:?}");
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{who} wrote no Controller_Event row within 30 s; ovn-controller log:\n{}",
            node.controller_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn unidler_writes_the_row_ovn_controller_writes_and_keeps_ovn_quiet() {
    require_root();
    let node = OvnNode::start("op");
    node.add_idle_load_balancer("web", &[format!("{VIP}:{PORT}")]);
    let nb_uuid = node
        .central
        .nbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Load_Balancer",
            "name=web",
        ])
        .trim()
        .to_owned();

    // OVN's own path.
    let ovn = row_after_knocking(&node, "ovn-controller");
    assert_eq!(ovn.event_type, "empty_lb_backends");
    assert_eq!(ovn.event_info["vip"], format!("{VIP}:{PORT}"));
    assert_eq!(ovn.event_info["load_balancer"], nb_uuid);
    assert!(
        node.packets_punted_for(VIP.into()) > 0,
        "OVN's trigger_event flow counted no packet"
    );
    node.central
        .sb
        .sbctl(&["--all", "destroy", "Controller_Event"]);

    // unidler on the same veth, reading what ovn-northd wrote, writing to the same database.
    let state = TempDir::new("opstate");
    let sb = node.central.sb.unix_remote();
    let mut agent = Agent::start(
        &node.node_ns,
        &[
            southbound_args(&node.node_if, &sb, state.path_str()),
            // ovs-vswitchd's userspace datapath reads the veth through AF_PACKET, which sees
            // a packet before TC ingress could drop it: here only XDP keeps it from OVN.
            vec!["--hook", "xdp"],
        ]
        .concat(),
    );
    agent.wait_for_log("VIP map synced", Duration::from_secs(30));
    let punted = node.packets_punted_for(VIP.into());
    let ours = row_after_knocking(&node, "unidler");
    assert_eq!(
        (&ours.event_type, &ours.event_info, &ours.chassis),
        (&ovn.event_type, &ovn.event_info, &ovn.chassis),
        "unidler's row differs from ovn-controller's"
    );

    // More attempts while the row exists: still one row, and none of the SYNs reached OVN's
    // own path (the XDP program dropped them before ovs-vswitchd saw them).
    for _ in 0..5 {
        knock(&node);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rows = node.central.sb.event_rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].uuid, ours.uuid);
    assert_eq!(
        node.packets_punted_for(VIP.into()),
        punted,
        "SYNs reached OVN's trigger_event flow while unidler ran"
    );
}
