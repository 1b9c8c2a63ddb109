//! VIPs scoped like OVN, on a real OVN node (`ovn-northd`, `ovs-vswitchd` with the userspace
//! datapath, `ovn-controller`): two tenants' logical switches, a pod on each, and a load
//! balancer of the same VIP on each switch, as the CMS makes them: northd fills
//! `Load_Balancer.datapaths`, ovn-controller binds the pods' ports to this chassis. The agent's
//! XDP hook keeps what it drops from OVS's AF_PACKET reader, so OVN writes no row of its own.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use unidler::telemetry::http_get;
use unidler_tests::{
    agent::{Agent, ovn_node_args},
    eventually,
    frames::Frame,
    netns::{in_netns, send_frames},
    ovn_chassis::{CLIENT_V4, OvnNode, SWITCH},
    ovsdb_server::{Southbound as _, TempDir},
    require_root,
};

const VIP: &str = "10.96.7.7:8080";
const SWITCH_B: &str = "sw-b";
const POD_B_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 11);
const POD_B_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 1, 0x11];
/// How long a test waits for what should happen.
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn on_a_real_ovn_node_each_tenant_is_judged_by_its_own_switch() {
    require_root();
    let mut node = OvnNode::start("osc");
    let (pod_b_ns, pod_b_if) = node.add_pod(SWITCH_B, "pod-b", POD_B_MAC, POD_B_V4);
    // Tenant A's service at VIP is idle (on A's switch); tenant B's, same VIP, has a backend.
    let lb = |name: &str, switch: &str, backends: &str| {
        let uuid = node.central.nbctl(&[
            "create",
            "Load_Balancer",
            &format!("name={name}"),
            "protocol=tcp",
            &format!("vips:\"{VIP}\"=\"{backends}\""),
            "options:event=true",
        ]);
        node.central.nbctl(&["ls-lb-add", switch, name]);
        uuid.trim().to_owned()
    };
    let lb_a = lb("lb-a", SWITCH, "");
    let lb_b = lb("lb-b", SWITCH_B, "10.1.1.1:8080");
    node.central.nbctl(&["--timeout=120", "--wait=hv", "sync"]);

    let state = TempDir::new("oscstate");
    let (ovs_db, sb_db) = (node.conf_remote(), node.central.sb.unix_remote());
    let mut args = ovn_node_args(&ovs_db, &sb_db, state.path_str());
    args.extend(["--hook", "xdp"]);
    let mut agent = Agent::start(&node.node_ns, &args);
    agent.wait_for_log("VIP map synced", Duration::from_secs(20));
    agent.wait_for_logs("interface scoped to its logical datapath", 2, WAIT);

    let metric = |series: &str| {
        let text = in_netns(&node.node_ns, || {
            http_get("127.0.0.1:9477".parse().unwrap(), "/metrics")
        })
        .expect("metrics");
        unidler_tests::prometheus::sample(&text, series).unwrap_or(0.0)
    };
    let rows_naming = |lb: &str| {
        node.central
            .sb
            .event_rows()
            .iter()
            .filter(|r| r.event_info.get("load_balancer").map(String::as_str) == Some(lb))
            .count()
    };
    let vip: std::net::SocketAddr = VIP.parse().unwrap();
    let syn =
        |src: Ipv4Addr, sport| Frame::tcp_syn(IpAddr::V4(src), sport, vip.ip(), vip.port()).build();

    // Tenant A's pod: idle on its switch: dropped, the row names A's load balancer.
    let client_if = node.client_if.clone();
    in_netns(&node.client_ns, || {
        send_frames(&client_if, [syn(CLIENT_V4, 41000)])
    });
    eventually("A's row", WAIT, || rows_naming(&lb_a) == 1);
    let idle_hits = metric("unidler_kernel_idle_hits_total");
    let vip_hits = metric("unidler_kernel_vip_hits_total");
    assert_eq!(idle_hits, 1.0, "A's SYN was caught here, not by OVN");

    // Tenant B's pod, same VIP: B's switch has a backend: passed on to OVN.
    in_netns(&pod_b_ns, || send_frames(&pod_b_if, [syn(POD_B_V4, 42000)]));
    eventually("B's SYN seen", WAIT, || {
        metric("unidler_kernel_vip_hits_total") > vip_hits
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric("unidler_kernel_idle_hits_total"),
        idle_hits,
        "B's SYN is not an idle hit"
    );
    assert_eq!(rows_naming(&lb_b), 0);

    // B's backend goes: B's pod is caught too, and its row names B's load balancer.
    node.central.nbctl(&[
        "set",
        "Load_Balancer",
        "lb-b",
        &format!("vips:\"{VIP}\"=\"\""),
    ]);
    node.central.nbctl(&["--timeout=120", "--wait=sb", "sync"]);
    agent.wait_for_log("VIP map updated", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    in_netns(&pod_b_ns, || send_frames(&pod_b_if, [syn(POD_B_V4, 42001)]));
    eventually("B's row", WAIT, || rows_naming(&lb_b) == 1);
    assert_eq!(
        metric("unidler_kernel_idle_hits_total"),
        idle_hits + 1.0,
        "B's SYN was caught here"
    );
    assert_eq!(rows_naming(&lb_a), 1, "A's row is A's alone");
}
