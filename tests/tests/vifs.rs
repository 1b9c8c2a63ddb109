//! The datapath follows this node's OVN interfaces through the local Open_vSwitch database:
//! VIFs (`--ovn-vifs`), attached when a port with `external_ids:iface-id` is added, detached
//! when it goes, ports without `iface-id` and non-system interfaces left alone; and the
//! uplinks of the bridge mappings (`--ovn-uplinks`).

use std::time::{Duration, Instant};

use unidler_tests::{
    agent::Agent,
    netns::{CLIENT_V4, Topology, send_frames, syn_to_server, veth_in},
    ovsdb_server::LocalOvs,
    require_root,
};

#[test]
fn ovn_vifs_are_followed_through_the_open_vswitch_database() {
    require_root();
    let topo = Topology::new("vf");
    let ovs = LocalOvs::start();
    let vsctl = |args: &[&str]| ovs.vsctl(args);
    // Pods' interfaces, in the agent's namespace (each a veth; the peer plays the pod).
    let base = topo.server_if.trim_end_matches('s').to_owned();
    let (vif, pod) = (format!("{base}va"), format!("{base}vb"));
    let (plain, plain_peer) = (format!("{base}pa"), format!("{base}pb"));
    let (uplink, outside) = (format!("{base}ua"), format!("{base}ub"));
    for (a, b) in [(&vif, &pod), (&plain, &plain_peer), (&uplink, &outside)] {
        veth_in(&topo.server_ns, a, b);
    }
    let ovs_db = ovs.remote();
    let mut agent = Agent::start(
        &topo.server_ns,
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
            "10.77.0.2:8080/tcp",
        ],
    );
    agent.wait_for_log("following OVN's interfaces", Duration::from_secs(5));

    // A port bound to a logical port: attached, quickly.
    let added = Instant::now();
    vsctl(&[
        "add-port",
        "br-int",
        &vif,
        "--",
        "set",
        "Interface",
        &vif,
        "external_ids:iface-id=pod-a",
    ]);
    let line = agent.wait_for_log(&format!("iface={vif} "), Duration::from_secs(5));
    assert!(line.contains("followed interface"), "{line}");
    assert!(line.contains("hook=\"tc\""), "a veth gets TC: {line}");
    let took = added.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "attached {took:?} after add-port"
    );

    // Its pod's first packet to an idle VIP is caught, named after the VIF.
    let syn = syn_to_server(CLIENT_V4.into(), 40000, 8080);
    topo.in_server(|| send_frames(&pod, [syn.clone()]));
    let event = agent
        .next_event(Duration::from_secs(5))
        .expect("an idle hit from the VIF");
    assert_eq!(event["iface"], vif.as_str());

    // A port without iface-id, and an internal interface with one: left alone.
    vsctl(&["add-port", "br-int", &plain]);
    vsctl(&[
        "add-port",
        "br-int",
        "int0",
        "--",
        "set",
        "Interface",
        "int0",
        "type=internal",
        "external_ids:iface-id=x",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let attached_plain = agent
        .log_lines()
        .any(|l| l.contains(&format!("iface={plain} ")) || l.contains("iface=int0 "));
    assert!(!attached_plain, "only VIFs are followed");

    // The uplink of the bridge mapping (a veth here; a NIC on a node): attached, and an
    // external client's SYN over it caught.
    vsctl(&["add-port", "br-ex", &uplink]);
    agent.wait_for_log(&format!("iface={uplink} "), Duration::from_secs(5));
    topo.in_server(|| send_frames(&outside, [syn]));
    let event = agent
        .next_event(Duration::from_secs(5))
        .expect("an idle hit from the uplink");
    assert_eq!(event["iface"], uplink.as_str());

    // The port goes: detached.
    vsctl(&["del-port", "br-int", &vif]);
    agent.wait_for_log("detached", Duration::from_secs(5));
    assert!(agent.is_running());
}
