//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: verdicts, events, counters.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use unidler::{
    datapath::{Counters, Datapath, EventRing, LoadOptions},
    vip::{Vip, VipSpec, ip_to_bytes},
};
use unidler_common::{
    Counter, EventAction, IdleHitEvent, RateLimitConfig, VIP_FLAG_PASS_WHEN_IDLE, VipState,
};
use unidler_tests::{
    frames::{
        Frame, Ipv6Ext, L4, SCTP_DATA, SCTP_INIT, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
    },
    oracle::{self, VipModel, XDP_DROP, XDP_PASS},
    require_root,
    rng::Rng,
};

/// Loopback's ifindex: test runs need an existing interface.
const LO: u32 = 1;
const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 7));
const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10));

/// A loaded program with the VIPs a test gave it and a model of them for the oracle.
struct Harness {
    datapath: Datapath,
    events: EventRing,
    model: VipModel,
    next_id: u32,
}

/// What one run of the program did.
#[derive(Debug)]
struct Run {
    verdict: u32,
    events: Vec<IdleHitEvent>,
    counters: Counters,
}

impl Harness {
    /// Rate limits high enough never to interfere.
    #[track_caller]
    fn new() -> Self {
        Self::with_limits(RateLimitConfig::new(
            1_000_000, 1_000_000, 1_000_000, 1_000_000,
        ))
    }

    #[track_caller]
    fn with_limits(rate_limits: RateLimitConfig) -> Self {
        Self::with_options(LoadOptions {
            rate_limits,
            kernel_log_level: 0,
            ..LoadOptions::default()
        })
    }

    #[track_caller]
    fn with_options(options: LoadOptions) -> Self {
        require_root();
        let mut datapath =
            Datapath::load(&options).unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
        let events = datapath.take_events().expect("event ring");
        Self {
            datapath,
            events,
            model: VipModel::new(),
            next_id: 100,
        }
    }

    /// Adds a VIP from `IP:PORT/PROTO[=BACKENDS]`; returns its id.
    #[track_caller]
    fn vip(&mut self, spec: &str) -> u32 {
        self.vip_with_flags(spec, 0)
    }

    #[track_caller]
    fn vip_with_flags(&mut self, spec: &str, flags: u32) -> u32 {
        let spec: VipSpec = spec.parse().unwrap();
        self.next_id += 1;
        let key = spec.vip.key();
        self.datapath
            .upsert_vip(
                key,
                VipState {
                    backends: spec.backends,
                    vip_id: self.next_id,
                    flags,
                    ..VipState::default()
                },
            )
            .unwrap();
        self.model
            .insert(key, (spec.backends, flags & VIP_FLAG_PASS_WHEN_IDLE != 0));
        self.next_id
    }

    #[track_caller]
    fn run(&mut self, frame: &[u8]) -> Run {
        let before = self.datapath.counters().unwrap();
        let verdict = self
            .datapath
            .test_run(frame, LO)
            .unwrap_or_else(|e| panic!("test run on {} bytes: {e}", frame.len()));
        let mut events = Vec::new();
        self.events.drain(|e| events.push(e));
        let counters = self.datapath.counters().unwrap().since(&before);
        Run {
            verdict,
            events,
            counters,
        }
    }

    /// Runs `frame` and checks verdict, event and counters against the reference model.
    #[track_caller]
    fn check_against_model(&mut self, frame: &[u8]) -> Run {
        let want = oracle::expected(frame, &self.model);
        let run = self.run(frame);
        let ctx = || format!("frame {:02x?}\nexpected {want:?}\ngot {run:?}", frame);
        assert_eq!(run.verdict, want.verdict, "verdict\n{}", ctx());
        assert_eq!(run.counters.get(Counter::Packets), 1, "{}", ctx());
        match want.failure {
            Some(counter) => {
                assert_eq!(run.counters.get(counter), 1, "{counter:?}\n{}", ctx());
                let failures = run.counters.parse_failures() + run.counters.get(Counter::Fragments);
                assert_eq!(failures, 1, "exactly one failure counted\n{}", ctx());
            }
            None => assert_eq!(
                run.counters.parse_failures() + run.counters.get(Counter::Fragments),
                0,
                "no failure counted\n{}",
                ctx()
            ),
        }
        match want.event {
            Some((vip, src, sport)) => {
                assert_eq!(run.events.len(), 1, "one event\n{}", ctx());
                let e = &run.events[0];
                assert_eq!(e.vip, vip, "{}", ctx());
                assert_eq!(e.src_addr, src, "{}", ctx());
                assert_eq!(e.src_port_be, sport, "{}", ctx());
                assert_eq!(e.ifindex, LO, "{}", ctx());
                assert_eq!(run.counters.idle_hits(), 1, "{}", ctx());
            }
            None => {
                assert!(run.events.is_empty(), "no event\n{}", ctx());
                assert_eq!(run.counters.idle_hits(), 0, "{}", ctx());
            }
        }
        run
    }
}

fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Frame {
    Frame::tcp_syn(src, 40000, dst, dport)
}

fn tcp(src: IpAddr, dst: IpAddr, dport: u16, flags: u8) -> Frame {
    Frame::new(
        src,
        dst,
        L4::Tcp {
            src: 40000,
            dst: dport,
            flags,
        },
    )
}

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

fn frame_vip_key(frame: &Frame) -> unidler_common::VipKey {
    let port = match frame.l4 {
        L4::Tcp { dst, .. } | L4::Udp { dst, .. } | L4::Sctp { dst, .. } => dst,
        L4::Other { .. } => 0,
    };
    unidler_common::VipKey {
        addr: ip_to_bytes(frame.dst),
        port_be: port.to_be(),
        proto: 6,
        family: match frame.dst {
            IpAddr::V4(_) => unidler_common::FAMILY_IPV4,
            IpAddr::V6(_) => unidler_common::FAMILY_IPV6,
        },
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
fn idle_vips_fail_open_once_the_heartbeat_expires_and_drop_again_when_renewed() {
    let mut h = Harness::with_options(LoadOptions {
        rate_limits: RateLimitConfig::new(1_000_000, 1_000_000, 1_000_000, 1_000_000),
        kernel_log_level: 0,
        fail_open_after: Duration::from_millis(200),
        ..LoadOptions::default()
    });
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.11:80/tcp=2");
    let run = h.run(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!(
        (run.verdict, run.events.len()),
        (XDP_DROP, 1),
        "fresh heartbeat"
    );

    std::thread::sleep(Duration::from_millis(300));
    let run = h.run(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!(run.verdict, XDP_PASS, "expired heartbeat: fail open");
    assert!(run.events.is_empty(), "OVN's own path reports it");
    assert_eq!(run.counters.get(Counter::IdleFailedOpen), 1);
    assert_eq!(run.counters.idle_hits(), 1, "still an idle hit");
    // Nothing else changes: VIPs with backends and other packets pass as always.
    let active: IpAddr = "10.96.0.11".parse().unwrap();
    let run = h.run(&syn(CLIENT4, active, 80).build());
    assert_eq!(
        (run.verdict, run.counters.get(Counter::IdleFailedOpen)),
        (XDP_PASS, 0)
    );

    h.datapath.renew_heartbeat().unwrap();
    let run = h.run(&syn(CLIENT4, VIP4, 80).build());
    assert_eq!((run.verdict, run.events.len()), (XDP_DROP, 1), "renewed");
}

/// Every CPU hits the same idle VIP at once: the rate limiters must hand out exactly the
/// tokens they have. (A CPU that loses a compare-and-swap must retry, not give up with
/// tokens left; a per-VIP token must not be spent when the global limiter refuses.)
#[test]
fn rate_limiters_lose_no_token_under_contention_from_every_cpu() {
    const GLOBAL_BURST: u32 = 2000;
    const PER_CPU: u32 = 20_000;
    // The per-VIP limiter never refuses (an hour of tolerance: under emulation a vCPU may
    // stall for over a second between reading the clock and spending the token); the global
    // one allows its burst and then (one per hour) nothing more during the test.
    const HOUR_NS: u64 = 3_600_000_000_000;
    let mut h = Harness::with_limits(RateLimitConfig {
        vip_interval_ns: 1,
        vip_tolerance_ns: HOUR_NS,
        global_interval_ns: HOUR_NS,
        global_tolerance_ns: u64::from(GLOBAL_BURST - 1) * HOUR_NS,
    });
    h.vip("10.96.0.10:80/tcp");
    let frame = syn(CLIENT4, VIP4, 80).build();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "needs two CPUs to contend");
    let before = h.datapath.counters().unwrap();
    let datapath = &h.datapath;
    std::thread::scope(|scope| {
        for cpu in 0..cpus {
            let frame = &frame;
            scope.spawn(move || {
                pin_to_cpu(cpu);
                let (verdict, _) = datapath.test_run_repeat(frame, LO, PER_CPU).unwrap();
                assert_eq!(verdict, XDP_DROP);
            });
        }
    });
    let c = h.datapath.counters().unwrap().since(&before);
    let hits = u64::from(PER_CPU) * cpus as u64;
    assert_eq!(c.idle_hits(), hits);
    assert_eq!(
        c.get(Counter::EventsWritten),
        u64::from(GLOBAL_BURST),
        "events: exactly the global burst; rate-limited per VIP {}, globally {}",
        c.get(Counter::RateLimitedVip),
        c.get(Counter::RateLimitedGlobal)
    );
    assert_eq!(
        c.get(Counter::RateLimitedVip),
        0,
        "the per-VIP limit never refuses"
    );
    assert_eq!(
        c.get(Counter::RateLimitedGlobal),
        hits - u64::from(GLOBAL_BURST)
    );
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
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

#[test]
fn per_vip_rate_limit_turns_a_burst_into_a_trickle() {
    // 5 back to back, then 1 per second per VIP; global limit out of the way.
    let mut h = Harness::with_limits(RateLimitConfig::new(1, 5, 1_000_000, 1_000_000));
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.10:81/tcp");
    let mut events = 0;
    let mut limited = 0;
    let started = std::time::Instant::now();
    for i in 0..200u16 {
        let mut frame = syn(CLIENT4, VIP4, 80 + (i % 2));
        frame.l4 = L4::Tcp {
            src: 1024 + i,
            dst: 80 + (i % 2),
            flags: TCP_SYN,
        };
        let run = h.run(&frame.build());
        assert_eq!(
            run.verdict, XDP_DROP,
            "rate limiting never changes the verdict"
        );
        events += run.events.len();
        limited += run.counters.get(Counter::RateLimitedVip);
    }
    // Each VIP gets its burst of 5, plus one token per second the loop took (and one for
    // the second it started in).
    let extra = 2 * (started.elapsed().as_secs() as usize + 1);
    assert!((10..=10 + extra).contains(&events), "events {events}");
    assert_eq!(events as u64 + limited, 200);
}

#[test]
fn global_rate_limit_caps_all_vips_together() {
    let mut h = Harness::with_limits(RateLimitConfig::new(1_000_000, 1_000_000, 1, 3));
    for port in 1..=20 {
        h.vip(&format!("10.96.0.10:{port}/tcp"));
    }
    let mut events = 0;
    let mut limited = 0;
    for port in 1..=20 {
        let run = h.run(&syn(CLIENT4, VIP4, port).build());
        events += run.events.len();
        limited += run.counters.get(Counter::RateLimitedGlobal);
    }
    assert!((3..=4).contains(&events), "events {events}");
    assert_eq!(events as u64 + limited, 20);
}

#[test]
fn a_full_ring_is_counted_not_fatal() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    let frame = syn(CLIENT4, VIP4, 80).build();
    let before = h.datapath.counters().unwrap();
    // Never drained: the 1 MiB ring holds about 14,500 events.
    for _ in 0..20_000 {
        assert_eq!(h.datapath.test_run(&frame, LO).unwrap(), XDP_DROP);
    }
    let c = h.datapath.counters().unwrap().since(&before);
    assert!(c.get(Counter::RingFull) > 0, "{c:?}");
    assert_eq!(
        c.get(Counter::RingFull) + c.get(Counter::EventsWritten),
        20_000
    );
    let mut drained = 0;
    h.events.drain(|_| drained += 1);
    assert_eq!(drained as u64, c.get(Counter::EventsWritten));
    // And it recovers once drained.
    assert_eq!(h.run(&frame).events.len(), 1);
}

#[test]
fn fuzz_randomized_frames_are_never_misclassified() {
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.10:53/udp");
    h.vip("10.96.0.10:3868/sctp");
    h.vip("10.96.0.10:443/tcp=2");
    h.vip("[fd00:96::10]:443/tcp");
    h.vip("[fd00:96::10]:53/udp");
    let mut v6_ext = syn(CLIENT6, VIP6, 443);
    v6_ext.ipv6_ext = vec![
        Ipv6Ext::HopByHop { len8: 0 },
        Ipv6Ext::Fragment {
            offset: 0,
            more: true,
        },
    ];
    let mut vlan = Frame::new(CLIENT6, VIP6, L4::Udp { src: 9, dst: 53 });
    vlan.vlans = vec![(0x8100, 7)];
    let mut opts = syn(CLIENT4, VIP4, 80);
    opts.ipv4_options = vec![1; 8];
    let seeds: Vec<Vec<u8>> = [
        syn(CLIENT4, VIP4, 80),
        syn(CLIENT4, VIP4, 443),
        Frame::new(CLIENT4, VIP4, L4::Udp { src: 9, dst: 53 }),
        Frame::new(
            CLIENT4,
            VIP4,
            L4::Sctp {
                src: 9,
                dst: 3868,
                chunk_type: SCTP_INIT,
            },
        ),
        v6_ext,
        vlan,
        opts,
    ]
    .iter()
    .map(Frame::build)
    .collect();

    // `cargo xtask fuzz` runs it for longer from a random seed (UNIDLER_FUZZ_SECONDS,
    // UNIDLER_FUZZ_SEED); by default 20,000 frames from a fixed seed.
    let until = std::env::var("UNIDLER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let seed = std::env::var("UNIDLER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000_0001u64);
    eprintln!("frame fuzzing seed {seed}");
    let mut rng = Rng(seed);
    let (mut events, mut failures) = (0, 0);
    for i in 0.. {
        let done = match until {
            Some(until) => std::time::Instant::now() >= until,
            None => i >= 20_000,
        };
        if done {
            break;
        }
        let mut frame = seeds[rng.below(seeds.len())].clone();
        // Flip a few bytes, biased to the headers where the decisions are made.
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(frame.len().min(90));
            frame[at] = match rng.below(4) {
                0 => rng.next_u64() as u8,
                1 => frame[at] ^ (1 << rng.below(8)),
                // Values the parser branches on.
                2 => [
                    0x81, 0x00, 0x88, 0xa8, 0x86, 0xdd, 0x08, 0x45, 0x60, 6, 17, 132, 0, 43, 44,
                    60, 51, 135, 0xff, 0x02, 0x12,
                ][rng.below(21)],
                _ => 0,
            };
        }
        if rng.below(4) == 0 {
            let len = 14 + rng.below(frame.len() - 13);
            frame.truncate(len);
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.check_against_model(&frame)
        }))
        .unwrap_or_else(|p| {
            eprintln!("randomized case {i} (seed {seed:#x}) failed");
            std::panic::resume_unwind(p)
        });
        events += run.events.len();
        failures += run.counters.parse_failures();
    }
    // The mutations must exercise both outcomes, or the test proves little.
    assert!(events > 1000, "only {events} events");
    assert!(failures > 1000, "only {failures} parse failures");
}

/// The TC hook runs the same parser on the same maps: on every frame it decides as the XDP
/// program does (TC_ACT_OK for XDP_PASS, TC_ACT_SHOT for XDP_DROP), with the same event and
/// the same counters.
#[test]
fn fuzz_the_tc_hook_decides_as_xdp_does() {
    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;
    let mut h = Harness::new();
    h.vip("10.96.0.10:80/tcp");
    h.vip("10.96.0.10:53/udp");
    h.vip("10.96.0.10:443/tcp=2");
    h.vip("[fd00:96::10]:443/tcp");
    let mut v6 = syn(CLIENT6, VIP6, 443);
    v6.ipv6_ext = vec![Ipv6Ext::HopByHop { len8: 0 }];
    let mut vlan = syn(CLIENT4, VIP4, 80);
    vlan.vlans = vec![(0x8100, 7)];
    let seeds: Vec<Vec<u8>> = [
        syn(CLIENT4, VIP4, 80),
        syn(CLIENT4, VIP4, 443),
        tcp(CLIENT4, VIP4, 80, TCP_ACK),
        Frame::new(CLIENT4, VIP4, L4::Udp { src: 9, dst: 53 }),
        v6,
        vlan,
    ]
    .iter()
    .map(Frame::build)
    .collect();
    let mut rng = Rng(0x7c_0001);
    for i in 0..4_000 {
        let mut frame = seeds[i % seeds.len()].clone();
        if i >= seeds.len() {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(frame.len().min(90));
                frame[at] ^= 1 << rng.below(8);
            }
        }
        let xdp = h.run(&frame);
        let before = h.datapath.counters().unwrap();
        let (verdict, _) = h.datapath.tc_test_run_repeat(&frame, 1).unwrap();
        let mut events = Vec::new();
        h.events.drain(|e| events.push(e));
        let counters = h.datapath.counters().unwrap().since(&before);
        let expected = if xdp.verdict == XDP_DROP {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        assert_eq!(verdict, expected, "frame {frame:02x?}");
        assert_eq!(events.len(), xdp.events.len(), "frame {frame:02x?}");
        if let (Some(t), Some(x)) = (events.first(), xdp.events.first()) {
            assert_eq!(
                (t.vip, t.src_addr, t.src_port_be),
                (x.vip, x.src_addr, x.src_port_be)
            );
        }
        assert_eq!(counters, xdp.counters, "frame {frame:02x?}");
    }
}

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
