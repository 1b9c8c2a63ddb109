//! VIPs scoped like OVN: two tenants' logical switches on one node reuse a VIP; each pod's
//! packets are judged by the load balancers of its own switch. The agent follows real
//! `ovsdb-server`s (the Southbound database with the switches, this node's ports and the load
//! balancers; the local Open_vSwitch database with the pods' VIFs) and the pods' veths.

use std::{net::IpAddr, time::Duration};

use unidler::telemetry::http_get;
use unidler_tests::{
    agent::{Agent, ovn_node_args},
    eventually,
    netns::{CLIENT_V4, Topology, send_frames, syn_to_server, veth_in},
    ovsdb_server::{self, CHASSIS, LocalOvs, Southbound as _, TempDir},
    require_root,
};

/// How long a test waits for what should happen.
const WAIT: Duration = Duration::from_secs(10);
const VIP_PORT: u16 = 8080;
const LB_A: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const LB_B: &str = "bbbbbbbb-0000-0000-0000-000000000002";
const LB_GW: &str = "cccccccc-0000-0000-0000-000000000003";
/// A VIP only on the gateway router (a NodePort, say).
const GW_PORT: u16 = 9090;

/// The first value of `create`'s output (a UUID).
fn created(out: String) -> String {
    out.trim().to_owned()
}

#[track_caller]
fn metric(topo: &Topology, series: &str) -> f64 {
    let text = topo
        .in_server(|| http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
        .expect("metrics");
    unidler_tests::prometheus::sample(&text, series)
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn two_tenants_reusing_a_vip_are_each_judged_by_their_own_load_balancer() {
    require_root();
    let topo = Topology::new("sc");
    // The Southbound database: two logical switches (tenants A and B), a port of each bound
    // to this chassis, and a load balancer of the same VIP on each: A's idle, B's with a
    // backend.
    let sb = ovsdb_server::southbound_with_chassis();
    let chassis = sb.chassis_uuid(CHASSIS);
    let switch = |key: &str| {
        created(sb.sbctl(&["create", "Datapath_Binding", &format!("tunnel_key={key}")]))
    };
    let (switch_a, switch_b, router) = (switch("101"), switch("102"), switch("103"));
    for (port, switch, kind) in [
        ("pod-a", &switch_a, ""),
        ("pod-b", &switch_b, ""),
        ("rtoe-GR_node", &router, "l3gateway"),
    ] {
        sb.sbctl(&[
            "create",
            "Port_Binding",
            &format!("logical_port={port}"),
            &format!("datapath={switch}"),
            "tunnel_key=1",
            &format!("chassis={chassis}"),
            &format!("type=\"{kind}\""),
        ]);
    }
    let vip = format!("\"{}:{VIP_PORT}\"", ovsdb_server_vip());
    let load_balancer = |name: &str, lb_id: &str, switch: &str, backends: &str| {
        let vip = if name == "lb-gw" {
            format!("\"{}:{GW_PORT}\"", ovsdb_server_vip())
        } else {
            vip.clone()
        };
        created(sb.sbctl(&[
            "create",
            "Load_Balancer",
            &format!("name={name}"),
            &format!("vips={{{vip}=\"{backends}\"}}"),
            "protocol=tcp",
            "options:event=true",
            &format!("external_ids:lb_id={lb_id}"),
            &format!("datapaths={switch}"),
        ]))
    };
    load_balancer("lb-a", LB_A, &switch_a, "");
    let lb_b = load_balancer("lb-b", LB_B, &switch_b, "10.1.1.1:8080");
    load_balancer("lb-gw", LB_GW, &router, "");

    // The local Open_vSwitch database, and the pods' veths (the peer plays the pod).
    let ovs = LocalOvs::start();
    let vsctl = |args: &[&str]| ovs.vsctl(args);
    let base = topo.server_if.trim_end_matches('s').to_owned();
    let pods = [
        (format!("{base}aa"), format!("{base}ab"), "pod-a"),
        (format!("{base}ba"), format!("{base}bb"), "pod-b"),
    ];
    // The uplink of the bridge mapping (a NIC on a node): the peer plays the outside.
    let (uplink, outside) = (format!("{base}ua"), format!("{base}ub"));
    for (vif, pod) in pods
        .iter()
        .map(|(v, p, _)| (v, p))
        .chain([(&uplink, &outside)])
    {
        veth_in(&topo.server_ns, vif, pod);
    }

    let state = TempDir::new("scstate");
    let (ovs_db, sb_db) = (ovs.remote(), sb.unix_remote());
    let mut args = ovn_node_args(&ovs_db, &sb_db, state.path_str());
    args.push("--ovn-uplinks");
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("VIP map synced", Duration::from_secs(10));
    for (vif, _, port) in &pods {
        vsctl(&[
            "add-port",
            "br-int",
            vif,
            "--",
            "set",
            "Interface",
            vif,
            &format!("external_ids:iface-id={port}"),
        ]);
    }
    vsctl(&["add-port", "br-ex", &uplink]);
    agent.wait_for_log(&format!("iface={uplink} "), Duration::from_secs(10));
    // Two VIFs on their switches, the uplink on the gateway router.
    agent.wait_for_logs("interface scoped to its logical datapath", 3, WAIT);

    let syn = |sport| syn_to_server(IpAddr::V4(CLIENT_V4), sport, VIP_PORT);
    let rows_naming = |lb: &str| {
        sb.event_rows()
            .iter()
            .filter(|r| r.event_info.get("load_balancer").map(String::as_str) == Some(lb))
            .count()
    };

    // Tenant A's pod: its switch's load balancer is idle: dropped, its row names lb-a.
    topo.in_server(|| send_frames(&pods[0].1, [syn(41000)]));
    eventually("A's row", WAIT, || rows_naming(LB_A) == 1);
    let idle_hits = metric(&topo, "unidler_kernel_idle_hits_total");
    let vip_hits = metric(&topo, "unidler_kernel_vip_hits_total");
    assert_eq!(idle_hits, 1.0);

    // Tenant B's pod, same VIP: its switch's load balancer has a backend: passed, no row.
    topo.in_server(|| send_frames(&pods[1].1, [syn(42000)]));
    eventually("B's SYN seen", WAIT, || {
        metric(&topo, "unidler_kernel_vip_hits_total") > vip_hits
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&topo, "unidler_kernel_idle_hits_total"),
        idle_hits,
        "B's SYN is not an idle hit"
    );
    assert_eq!(rows_naming(LB_B), 0);
    // A's SYN is held on A's switch, where the VIP is still idle: not replayed (node-wide the
    // VIP has B's backend).
    let replayed = |topo: &Topology| {
        let text = topo
            .in_server(|| http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
            .expect("metrics");
        unidler_tests::prometheus::sample(&text, "unidler_hold_packets_total{outcome=\"replayed\"}")
            .unwrap_or(0.0)
    };
    assert_eq!(metric(&topo, "unidler_held_packets"), 1.0, "A's SYN held");
    // What the operator sees: the VIP's state per switch, and each interface's scope.
    let api = |path: &str| -> serde_json::Value {
        let body = topo
            .in_server(|| http_get("127.0.0.1:9478".parse().unwrap(), path))
            .expect("api");
        serde_json::from_str(&body).expect("JSON")
    };
    let vips = api("/api/vips");
    let x = vips
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vip"] == format!("{}:{VIP_PORT}", ovsdb_server_vip()))
        .expect("the tenants' VIP listed");
    let scopes: Vec<(u64, u64)> = x["scopes"]
        .as_array()
        .expect("scopes listed")
        .iter()
        .map(|s| {
            (
                s["scope"].as_u64().unwrap(),
                s["backends"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(scopes, [(101, 0), (102, 1)], "{x}");
    let interfaces = api("/api/interfaces");
    let scope_of = |iface: &str| {
        interfaces
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["iface"] == iface)
            .map(|r| r["scope"].clone())
    };
    assert_eq!(scope_of(&pods[0].0), Some(serde_json::json!(101)));
    assert_eq!(scope_of(&uplink), Some(serde_json::json!(103)));
    assert_eq!(replayed(&topo), 0.0, "A's switch is still idle");

    // B's backend goes: B's pod is caught too, and its row names B's load balancer.
    sb.sbctl(&[
        "set",
        "Load_Balancer",
        &lb_b,
        &format!("vips={{{vip}=\"\"}}"),
    ]);
    agent.wait_for_log("VIP map updated", Duration::from_secs(5));
    topo.in_server(|| send_frames(&pods[1].1, [syn(42001)]));
    eventually("B's row", WAIT, || rows_naming(LB_B) == 1);
    assert_eq!(rows_naming(LB_A), 1, "A's row is A's alone");

    // The uplink leads to the gateway router: its load balancer's VIP is caught there, the
    // tenants' VIP (not on the router) passes; a pod's SYN to the router's VIP passes too.
    let idle_hits = metric(&topo, "unidler_kernel_idle_hits_total");
    let vip_hits = metric(&topo, "unidler_kernel_vip_hits_total");
    topo.in_server(|| send_frames(&outside, [syn(43000)]));
    let gw_syn = syn_to_server(IpAddr::V4(CLIENT_V4), 43001, GW_PORT);
    topo.in_server(|| send_frames(&pods[0].1, [gw_syn.clone()]));
    eventually("both SYNs seen", WAIT, || {
        metric(&topo, "unidler_kernel_vip_hits_total") >= vip_hits + 2.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&topo, "unidler_kernel_idle_hits_total"),
        idle_hits,
        "neither is an idle hit"
    );
    topo.in_server(|| send_frames(&outside, [gw_syn]));
    eventually("the router's row", WAIT, || rows_naming(LB_GW) == 1);

    // A's load balancer gets a backend: A's held SYN is replayed.
    sb.sbctl(&[
        "set",
        "Load_Balancer",
        "lb-a",
        &format!("vips={{{vip}=\"10.1.1.2:8080\"}}"),
    ]);
    eventually("A's SYN replayed", WAIT, || replayed(&topo) >= 1.0);
}

/// The VIP both tenants use.
fn ovsdb_server_vip() -> String {
    unidler_tests::netns::SERVER_V4.to_string()
}
