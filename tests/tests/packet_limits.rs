//! The program's limits through BPF_PROG_TEST_RUN: the rate limiters (per VIP, global, under
//! contention from every CPU), a full ring, and failing open once the heartbeat expires.

#[path = "../packet_common/mod.rs"]
mod common;

use common::*;

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

/// The hold's counts read back from the kernel, as many as a flood leaves (more than one batch
/// of the batched read): every one, each with its count, and none that was removed; both
/// through the datapath and through the batched read itself, on the pinned map.
#[test]
fn every_held_count_is_read_back_from_the_kernel() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    require_root();
    let bpffs = unidler_tests::bpffs::BpfFs::mount();
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(bpffs.pin_dir().into()),
        ..LoadOptions::default()
    })
    .expect("load");
    let vip = |i: u32| unidler_common::VipKey {
        addr: ip_to_bytes(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i))),
        port_be: 80u16.to_be(),
        proto: 6,
        family: unidler_common::FAMILY_IPV4,
    };
    let written: Vec<_> = (0..10_000u32).map(|i| (vip(i), 1 + i % 7)).collect();
    datapath.set_held(&written, 12_345).unwrap();
    // Some let go again.
    let gone: Vec<_> = (0..10_000u32).step_by(10).map(|i| (vip(i), 0)).collect();
    datapath.set_held(&gone, 12_000).unwrap();
    let sorted = |mut entries: Vec<(unidler_common::VipKey, u32)>| {
        entries.sort_by_key(|(vip, _)| (vip.addr, vip.port_be));
        entries
    };
    let want = sorted(
        written
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 0)
            .map(|(_, entry)| entry)
            .collect(),
    );

    let (read, total) = datapath.held_counts();
    assert_eq!(total, 12_000);
    assert_eq!(read.len(), want.len());
    assert!(
        sorted(read) == want,
        "the counts read back differ from those written"
    );

    let pinned = MapData::from_pin(bpffs.map_path(unidler_common::map_names::HELD_PER_VIP))
        .expect("pinned map");
    let map: BpfHashMap<MapData, unidler_common::VipKey, u64> =
        BpfHashMap::try_from(Map::HashMap(pinned)).expect("a hash map of these types");
    let batched = unidler::map_batch::lookup_all(&map).expect("one batched read");
    let batched = sorted(batched.into_iter().map(|(v, n)| (v, n as u32)).collect());
    assert_eq!(batched.len(), want.len());
    assert!(
        batched == want,
        "the batched read differs from what was written"
    );
}
