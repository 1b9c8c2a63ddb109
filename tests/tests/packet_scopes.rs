//! Decisions that depend on the ingress interface, through BPF_PROG_TEST_RUN: a scoped VIP
//! judged by the interface's scope, and a replayed flow's answer seen only on its interface.

#[path = "../packet_common/mod.rs"]
mod common;

use common::*;

/// A scoped VIP (tenants reusing an address): a packet is judged by the VIP's state on the
/// scope of the interface it arrived on; absent there, it passes; an interface without a
/// scope sees the VIP's own entry.
#[test]
fn a_scoped_vip_is_judged_by_the_scope_of_the_ingress_interface() {
    require_root();
    let topo = unidler_tests::netns::Topology::new("pks");
    let server_if = topo.server_if.clone();
    unidler_tests::netns::in_netns(&topo.server_ns, move || {
        let vif = unidler::datapath::ifindex_of(&server_if).unwrap();
        let mut h = Harness::new();
        let spec: VipSpec = "10.96.0.10:80/tcp".parse().unwrap();
        let syn = Frame::tcp_syn(CLIENT4, 40000, VIP4, 80).build();
        let verdict = |h: &mut Harness, ifindex: u32| {
            let verdict = h.datapath.test_run(&syn, ifindex).unwrap();
            h.events.drain(|_| {});
            verdict
        };
        let scoped = |backends| VipState {
            backends,
            vip_id: 7,
            flags: unidler_common::VIP_FLAG_SCOPED,
            ..VipState::default()
        };
        // Idle on the node; on scope 10 idle, not on scope 20.
        h.datapath.upsert_vip(spec.vip.key(), scoped(0)).unwrap();
        h.datapath.set_vip_scopes(7, &[(10, 0)]).unwrap();
        h.datapath.set_iface_scope(vif, Some(20)).unwrap();
        assert_eq!(
            verdict(&mut h, vif),
            XDP_PASS,
            "not on the interface's scope"
        );
        assert_eq!(
            verdict(&mut h, LO),
            XDP_PASS,
            "no scope: which datapath the packet is on is not known, OVN decides"
        );
        h.datapath.set_iface_scope(vif, Some(10)).unwrap();
        assert_eq!(
            verdict(&mut h, vif),
            XDP_DROP,
            "idle on the interface's scope"
        );
        let mut tagged = Frame::tcp_syn(CLIENT4, 40000, VIP4, 80);
        tagged.vlans = vec![(0x8100, 100)];
        let tagged = tagged.build();
        let verdict_tagged = h.datapath.test_run(&tagged, vif).unwrap();
        h.events.drain(|_| {});
        assert_eq!(
            verdict_tagged, XDP_PASS,
            "a tagged frame belongs to its VLAN's network, not the interface's scope"
        );
        // With backends on the node, idle on scope 10 still drops there.
        h.datapath.upsert_vip(spec.vip.key(), scoped(2)).unwrap();
        assert_eq!(verdict(&mut h, vif), XDP_DROP, "idle on its scope");
        assert_eq!(verdict(&mut h, LO), XDP_PASS, "active on the node");
        h.datapath.set_vip_scopes(7, &[(10, 3)]).unwrap();
        assert_eq!(verdict(&mut h, vif), XDP_PASS, "active on its scope");
        // Scopes replaced: the old one goes from the kernel.
        h.datapath.set_vip_scopes(7, &[(30, 0)]).unwrap();
        assert_eq!(verdict(&mut h, vif), XDP_PASS, "scope 10 gone: not there");
        h.datapath.set_iface_scope(vif, None).unwrap();
        assert_eq!(
            verdict(&mut h, vif),
            XDP_PASS,
            "no scope: active on the node"
        );
        // Unscoped VIP: the interfaces' scopes do not matter.
        h.datapath.set_vip_scopes(7, &[]).unwrap();
        h.datapath
            .upsert_vip(
                spec.vip.key(),
                VipState {
                    vip_id: 7,
                    ..VipState::default()
                },
            )
            .unwrap();
        h.datapath.set_iface_scope(vif, Some(20)).unwrap();
        assert_eq!(verdict(&mut h, vif), XDP_DROP, "unscoped idle VIP");
        assert_eq!(
            h.datapath.test_run(&tagged, vif).unwrap(),
            XDP_DROP,
            "unscoped idle VIP, tagged: the same on every datapath"
        );
    });
}

/// A replayed flow is answered by the client's segment on the interface its held packet came
/// in on; the same flow from another interface (another pod, or a spoofer) answers nothing,
/// so it cannot cancel the client's replays.
#[test]
fn a_replayed_flow_is_answered_only_on_the_interface_its_packet_came_in_on() {
    require_root();
    let topo = unidler_tests::netns::Topology::new("pka");
    let server_if = topo.server_if.clone();
    unidler_tests::netns::in_netns(&topo.server_ns, move || {
        let vif = unidler::datapath::ifindex_of(&server_if).unwrap();
        let h = Harness::new();
        let flow = unidler_common::FlowKey {
            src_addr: ip_to_bytes(CLIENT4),
            dst_addr: ip_to_bytes(VIP4),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: 6,
            family: unidler_common::FAMILY_IPV4,
            ..Default::default()
        };
        let mut datapath = h.datapath;
        datapath.watch_answer(&flow, vif).unwrap();
        let ack = Frame::new(
            CLIENT4,
            VIP4,
            L4::Tcp {
                src: 40000,
                dst: 80,
                flags: TCP_ACK,
            },
        )
        .build();
        assert_eq!(datapath.test_run(&ack, LO).unwrap(), XDP_PASS);
        assert!(
            !datapath.is_answered(&flow),
            "answered by a segment from another interface"
        );
        assert_eq!(datapath.test_run(&ack, vif).unwrap(), XDP_PASS);
        assert!(datapath.is_answered(&flow), "the client's own answer");
        datapath.release_flow(&flow, false).unwrap();
    });
}
