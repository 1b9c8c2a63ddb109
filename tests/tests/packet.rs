//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: which frames open a
//! connection, how each header is parsed, and what the VIP map says (verdicts, events,
//! counters).

#[path = "../packet_common/mod.rs"]
mod common;

use common::*;

#[test]
fn syn_to_idle_vip_is_dropped_and_reported_v4_and_v6() {
    let mut h = Harness::new();
    let id4 = h.vip("10.96.0.10:80/tcp");
    let id6 = h.vip("[fd00:96::10]:443/tcp");
    for (frame, id, vip, src) in [
        (syn(CLIENT4, VIP4, 80), id4, VIP4, CLIENT4),
        (syn(CLIENT6, VIP6, 443), id6, VIP6, CLIENT6),
    ] {
        let run = h.check_against_model(&frame.build());
        assert_eq!(run.verdict, XDP_DROP);
        let e = run.events[0];
        assert_eq!(e.vip_id, id);
        assert_eq!(e.vip.addr, ip_to_bytes(vip));
        assert_eq!(e.src_addr, ip_to_bytes(src));
        assert_eq!(u16::from_be(e.src_port_be), 40000);
        assert_eq!(e.action, EventAction::Dropped as u32);
        assert!(e.timestamp_ns > 0);
        assert_eq!(run.counters.get(Counter::VipHits), 1);
        assert_eq!(run.counters.get(Counter::IdleDropped), 1);
        assert_eq!(run.counters.get(Counter::EventsWritten), 1);
        let key = frame_vip_key(&frame);
        assert_eq!(h.datapath.vip(&key).unwrap().hits, 1, "per-VIP hit count");
        assert_eq!(
            Vip::from_key(&e.vip).unwrap().endpoint(),
            Vip::from_key(&frame_vip_key(&frame)).unwrap().endpoint()
        );
    }
}

#[test]
fn only_tcp_syn_without_ack_rst_fin_opens_a_connection() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    for (flags, opening) in [
        (TCP_SYN, true),
        (TCP_SYN | TCP_PSH, true),
        (TCP_SYN | TCP_ACK, false),
        (TCP_ACK, false),
        (TCP_ACK | TCP_PSH, false),
        (TCP_RST, false),
        (TCP_SYN | TCP_RST, false),
        (TCP_SYN | TCP_FIN, false),
        (TCP_FIN | TCP_ACK, false),
        (0, false),
    ] {
        let run = h.check_against_model(&tcp(CLIENT4, VIP4, 80, flags).build());
        assert_eq!(run.events.len(), usize::from(opening), "flags {flags:#04x}");
        let verdict = if opening { XDP_DROP } else { XDP_PASS };
        assert_eq!(run.verdict, verdict, "flags {flags:#04x}");
    }
}

#[test]
fn udp_datagrams_and_sctp_init_open_connections() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:53/udp");
    h.vip("[fd00:96::10]:53/udp");
    h.vip("10.96.0.10:3868/sctp");
    let udp = |src, dst| Frame::new(src, dst, L4::Udp { src: 5353, dst: 53 });
    let sctp = |chunk_type| {
        Frame::new(
            CLIENT4,
            VIP4,
            L4::Sctp {
                src: 5000,
                dst: 3868,
                chunk_type,
            },
        )
    };
    assert_eq!(
        h.check_against_model(&udp(CLIENT4, VIP4).build())
            .events
            .len(),
        1
    );
    assert_eq!(
        h.check_against_model(&udp(CLIENT6, VIP6).build())
            .events
            .len(),
        1
    );
    let init = h.check_against_model(&sctp(SCTP_INIT).build());
    assert_eq!((init.verdict, init.events.len()), (XDP_DROP, 1));
    assert_eq!(init.events[0].vip.proto, 132);
    let data = h.check_against_model(&sctp(SCTP_DATA).build());
    assert_eq!((data.verdict, data.events.len()), (XDP_PASS, 0));
}

#[test]
fn vip_with_backends_and_non_vip_traffic_pass_untouched() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp=3");
    h.vip("10.96.0.10:8080/tcp");
    let active = h.check_against_model(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!(active.verdict, XDP_PASS);
    assert!(active.events.is_empty());
    assert_eq!(active.counters.get(Counter::VipHits), 1);
    assert_eq!(active.counters.idle_hits(), 0);

    let other = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11));
    for frame in [
        syn(CLIENT4, VIP4, 81),                                   // other port
        syn(CLIENT4, other, 8080),                                // other address
        Frame::new(CLIENT4, VIP4, L4::Udp { src: 1, dst: 8080 }), // other protocol
        Frame::new(CLIENT4, VIP4, L4::Other { proto: 1 }),        // ICMP
        syn(CLIENT6, VIP6, 8080),                                 // other family
    ] {
        let run = h.check_against_model(&frame.build());
        assert_eq!(run.verdict, XDP_PASS, "{frame:?}");
        assert_eq!(run.counters.get(Counter::VipHits), 0, "{frame:?}");
    }
    // Not IP at all (ARP).
    let mut arp = syn(CLIENT4, VIP4, 80).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let run = h.check_against_model(&arp);
    assert_eq!(run.counters.parse_failures(), 0);
}

#[test]
fn removed_vips_leave_the_address_prefilter_and_shared_buckets_stay() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.10:81/tcp");
    let key80 = "10.96.0.10:80/tcp".parse::<VipSpec>().unwrap().vip.key();
    h.datapath.remove_vip(&key80).unwrap();
    h.model.remove(&key80);
    // Port 80 is gone; port 81 shares the address (and its filter bucket) and still counts.
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 80).build())
            .events
            .len(),
        0
    );
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 81).build())
            .events
            .len(),
        1
    );
    let key81 = "10.96.0.10:81/tcp".parse::<VipSpec>().unwrap().vip.key();
    h.datapath.remove_vip(&key81).unwrap();
    h.model.remove(&key81);
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 81).build())
            .events
            .len(),
        0
    );
    // Back again.
    h.vip("10.96.0.10:81/tcp");
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 81).build())
            .events
            .len(),
        1
    );
}

#[test]
fn rewriting_an_entry_keeps_its_kernel_hit_count() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp=2");
    let key = "10.96.0.10:80/tcp".parse::<VipSpec>().unwrap().vip.key();
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 80).build())
            .verdict,
        XDP_PASS
    );
    assert_eq!(h.datapath.vip(&key).unwrap().hits, 1);
    // The service is idled: the agent rewrites the entry; the count stays.
    h.vip("10.96.0.10:80/tcp");
    assert_eq!(h.datapath.vip(&key).unwrap().hits, 1);
    assert_eq!(
        h.check_against_model(&syn(CLIENT4, VIP4, 80).build())
            .events
            .len(),
        1
    );
    assert_eq!(h.datapath.vip(&key).unwrap().hits, 2);
}

#[test]
fn pass_flag_lets_the_packet_through_and_still_reports() {
    let mut h = Harness::new();
    h.vip_with_flags("10.96.0.10:80/tcp", VIP_FLAG_PASS_WHEN_IDLE);
    let run = h.check_against_model(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(run.events[0].action, EventAction::Passed as u32);
    assert_eq!(run.counters.get(Counter::IdlePassed), 1);
    assert_eq!(run.counters.get(Counter::IdleDropped), 0);
}

#[test]
fn vlan_and_qinq_tagged_frames_are_parsed() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("[fd00:96::10]:443/tcp");
    for vlans in [
        vec![(0x8100, 100)],
        vec![(0x88a8, 200), (0x8100, 100)],
        vec![(0x8100, 1), (0x8100, 2)],
    ] {
        for mut frame in [syn(CLIENT4, VIP4, 80), syn(CLIENT6, VIP6, 443)] {
            frame.vlans = vlans.clone();
            let run = h.check_against_model(&frame.build());
            assert_eq!((run.verdict, run.events.len()), (XDP_DROP, 1), "{vlans:?}");
        }
    }
    let mut three = syn(CLIENT4, VIP4, 80);
    three.vlans = vec![(0x88a8, 1), (0x8100, 2), (0x8100, 3)];
    let run = h.check_against_model(&three.build());
    assert_eq!(run.counters.get(Counter::TooManyVlanTags), 1);
    assert_eq!(run.verdict, XDP_PASS);
}

#[test]
fn ipv4_options_are_skipped() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    for len in [4, 8, 20, 40] {
        let mut frame = syn(CLIENT4, VIP4, 80);
        // NOPs, then End of Options.
        frame.ipv4_options = vec![1; len];
        frame.ipv4_options[len - 1] = 0;
        let run = h.check_against_model(&frame.build());
        assert_eq!(
            (run.verdict, run.events.len()),
            (XDP_DROP, 1),
            "{len} option bytes"
        );
        assert_eq!(u16::from_be(run.events[0].vip.port_be), 80);
    }
    // IHL below 5 is malformed.
    let mut bad = syn(CLIENT4, VIP4, 80).build();
    bad[14] = 0x44;
    let run = h.check_against_model(&bad);
    assert_eq!(run.counters.get(Counter::BadIpv4Header), 1);
}

#[test]
fn non_first_fragments_never_match_first_fragments_do() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("[fd00:96::10]:443/tcp");
    // IPv4: offset 0 with MF carries the TCP header.
    let mut first = syn(CLIENT4, VIP4, 80);
    first.ipv4_fragment = (0, true);
    assert_eq!(h.check_against_model(&first.build()).events.len(), 1);
    // A later fragment whose payload happens to look like a SYN to the VIP.
    for more in [true, false] {
        let mut later = syn(CLIENT4, VIP4, 80);
        later.ipv4_fragment = (185, more);
        let run = h.check_against_model(&later.build());
        assert_eq!((run.verdict, run.events.len()), (XDP_PASS, 0));
        assert_eq!(run.counters.get(Counter::Fragments), 1);
    }
    // IPv6 fragment header.
    let mut first6 = syn(CLIENT6, VIP6, 443);
    first6.ipv6_ext = vec![Ipv6Ext::Fragment {
        offset: 0,
        more: true,
    }];
    assert_eq!(h.check_against_model(&first6.build()).events.len(), 1);
    let mut later6 = syn(CLIENT6, VIP6, 443);
    later6.ipv6_ext = vec![
        Ipv6Ext::HopByHop { len8: 0 },
        Ipv6Ext::Fragment {
            offset: 100,
            more: false,
        },
    ];
    let run = h.check_against_model(&later6.build());
    assert_eq!((run.verdict, run.events.len()), (XDP_PASS, 0));
    assert_eq!(run.counters.get(Counter::Fragments), 1);
}

#[test]
fn ipv6_extension_headers_are_walked_and_bounded() {
    let mut h = Harness::new();
    h.vip("[fd00:96::10]:443/tcp");
    let chains = [
        vec![Ipv6Ext::HopByHop { len8: 0 }],
        vec![Ipv6Ext::HopByHop { len8: 1 }, Ipv6Ext::Routing { len8: 2 }],
        vec![
            Ipv6Ext::HopByHop { len8: 0 },
            Ipv6Ext::DestOpts { len8: 0 },
            Ipv6Ext::Routing { len8: 0 },
            Ipv6Ext::Fragment {
                offset: 0,
                more: true,
            },
            Ipv6Ext::DestOpts { len8: 3 },
        ],
        vec![Ipv6Ext::DestOpts { len8: 0 }; 6],
        vec![Ipv6Ext::Auth { len4: 3 }],
        vec![Ipv6Ext::HopByHop { len8: 0 }, Ipv6Ext::Auth { len4: 1 }],
        vec![Ipv6Ext::Mobility { len8: 1 }],
    ];
    for chain in chains {
        let mut frame = syn(CLIENT6, VIP6, 443);
        frame.ipv6_ext = chain.clone();
        let run = h.check_against_model(&frame.build());
        assert_eq!((run.verdict, run.events.len()), (XDP_DROP, 1), "{chain:?}");
    }
    let mut too_many = syn(CLIENT6, VIP6, 443);
    too_many.ipv6_ext = vec![Ipv6Ext::DestOpts { len8: 0 }; 7];
    let run = h.check_against_model(&too_many.build());
    assert_eq!(run.counters.get(Counter::TooManyIpv6Extensions), 1);
    let mut too_long = syn(CLIENT6, VIP6, 443);
    too_long.ipv6_ext = vec![
        Ipv6Ext::DestOpts { len8: 40 },
        Ipv6Ext::DestOpts { len8: 40 },
    ];
    let run = h.check_against_model(&too_long.build());
    assert_eq!(run.counters.get(Counter::TooManyIpv6Extensions), 1);
    assert_eq!(run.verdict, XDP_PASS);
}

#[test]
fn an_ipv6_packet_to_an_ipv4_mapped_address_is_not_for_the_ipv4_vip() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    let mapped: IpAddr = "::ffff:10.96.0.10".parse().unwrap();
    let run = h.check_against_model(&syn(CLIENT6, mapped, 80).build());
    assert_eq!((run.verdict, run.events.len()), (XDP_PASS, 0));
    assert_eq!(run.counters.get(Counter::VipHits), 0);
    // The IPv4 packet to the same VIP still is.
    let run = h.check_against_model(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!((run.verdict, run.events.len()), (XDP_DROP, 1));
}

/// An IPv6 VIP of the IPv4-mapped form (`[::ffff:10.96.0.10]:80`, which OVN matches only as
/// IPv6) is not the IPv4 VIP of that address: idle, it drops no IPv4 packet, and beside the
/// IPv4 VIP each keeps its own state.
#[test]
fn an_ipv4_mapped_ipv6_vip_is_not_the_ipv4_vip() {
    let mut h = Harness::new();
    h.vip("[::ffff:10.96.0.10]:80/tcp");
    let run = h.check_against_model(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!(
        (run.verdict, run.events.len()),
        (XDP_PASS, 0),
        "an IPv4 SYN dropped for an idle IPv6 VIP"
    );
    h.vip("10.96.0.10:80/tcp=1");
    let mapped: VipSpec = "[::ffff:10.96.0.10]:80/tcp".parse().unwrap();
    let plain: VipSpec = "10.96.0.10:80/tcp".parse().unwrap();
    assert_ne!(mapped.vip.key(), plain.vip.key());
    assert_eq!(h.datapath.vip(&mapped.vip.key()).unwrap().backends, 0);
    assert_eq!(h.datapath.vip(&plain.vip.key()).unwrap().backends, 1);
}

#[test]
fn every_truncation_passes_and_is_counted() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.10:53/udp");
    h.vip("10.96.0.10:3868/sctp");
    h.vip("[fd00:96::10]:443/tcp");
    let mut qinq_v6 = syn(CLIENT6, VIP6, 443);
    qinq_v6.vlans = vec![(0x88a8, 5), (0x8100, 6)];
    qinq_v6.ipv6_ext = vec![Ipv6Ext::HopByHop { len8: 0 }, Ipv6Ext::Routing { len8: 1 }];
    let mut options = syn(CLIENT4, VIP4, 80);
    options.ipv4_options = vec![1; 12];
    // Each frame with how many trailing bytes the program does not need: it reads the whole
    // TCP and UDP header, but of SCTP only the common header and the first chunk's type.
    let frames = [
        (syn(CLIENT4, VIP4, 80), 0),
        (options, 0),
        (Frame::new(CLIENT4, VIP4, L4::Udp { src: 1, dst: 53 }), 0),
        (
            Frame::new(
                CLIENT4,
                VIP4,
                L4::Sctp {
                    src: 1,
                    dst: 3868,
                    chunk_type: SCTP_INIT,
                },
            ),
            19,
        ),
        (qinq_v6, 0),
    ];
    for (frame, unneeded) in frames {
        let bytes = frame.build();
        let needed = bytes.len() - unneeded;
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for len in 14..=bytes.len() {
            let run = h.check_against_model(&bytes[..len]);
            if len < needed {
                assert_eq!(run.verdict, XDP_PASS, "cut at {len}: {frame:?}");
                assert!(run.events.is_empty(), "cut at {len}: {frame:?}");
                assert_eq!(run.counters.parse_failures(), 1, "cut at {len}: {frame:?}");
            } else {
                assert_eq!(run.events.len(), 1, "{len} bytes are enough: {frame:?}");
            }
        }
    }
}
