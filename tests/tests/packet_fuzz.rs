//! Randomly mutated frames through BPF_PROG_TEST_RUN, against the reference model
//! (`tests/src/oracle.rs`), and the TC program deciding as the XDP program does.

#[path = "../packet_common/mod.rs"]
mod common;

use common::*;

#[test]
fn fuzz_randomized_frames_are_never_misclassified() {
    let mut h = Harness::with_fuzzed_vips();
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
