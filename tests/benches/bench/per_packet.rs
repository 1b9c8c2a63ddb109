//! Section 1: per-packet cost in the kernel (BPF_PROG_TEST_RUN) against a do-nothing XDP program.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use unidler::{
    datapath::{Datapath, LoadOptions},
    vip::VipSpec,
};
use unidler_common::{RateLimitConfig, VipState};
use unidler_tests::frames::{Frame, Ipv6Ext, L4, TCP_ACK};

use crate::figure::*;

pub(crate) const LO: u32 = 1;

/// Rounds per figure: each times the program and the empty program back to back.
pub(crate) const ROUNDS: usize = 15;

/// Medians over [`ROUNDS`] rounds of the program (`time(true)`) and of the empty program
/// (`time(false)`), timed alternately so that both see the same machine.
pub(crate) fn paired(mut time: impl FnMut(bool) -> f64) -> (f64, f64) {
    let (mut p, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        b.push(time(false));
        p.push(time(true));
    }
    (median(p), median(b))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pins the calling thread to the machine's last CPU: a test run executes on the CPU that asks
/// for it, and every figure of section 1 (program and empty program alike) should come from
/// the same one.
pub(crate) fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub(crate) fn per_packet() -> Vec<Figure> {
    pin_to_last_cpu();
    let mut out = Vec::new();
    let client4 = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 7));
    let client6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7));
    let vip4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
    let other4 = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
    let other6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1));
    for vips in [10u32, 100_000] {
        let mut dp = Datapath::load(&LoadOptions {
            rate_limits: RateLimitConfig::new(
                1_000_000_000,
                1_000_000_000,
                1_000_000_000,
                1_000_000_000,
            ),
            kernel_log_level: 0,
            // Checked on every idle hit, as the agent runs; never expires here.
            fail_open_after: Duration::from_secs(3600),
            ..LoadOptions::default()
        })
        .expect("load");
        let mut ring = dp.take_events().unwrap();
        // Filler VIPs, plus the ones the frames use.
        for i in 0..vips {
            let spec: VipSpec = format!(
                "10.{}.{}.{}:80/tcp",
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
            .parse()
            .unwrap();
            dp.upsert_vip(
                spec.vip.key(),
                VipState {
                    vip_id: i + 10,
                    ..VipState::default()
                },
            )
            .unwrap();
        }
        let add = |dp: &mut Datapath, s: &str, backends: u32| {
            let spec: VipSpec = s.parse().unwrap();
            dp.upsert_vip(
                spec.vip.key(),
                VipState {
                    backends,
                    vip_id: 1,
                    ..VipState::default()
                },
            )
            .unwrap();
        };
        add(&mut dp, "10.96.0.10:80/tcp", 0);
        add(&mut dp, "10.96.0.10:443/tcp", 3);
        let syn = |src, dst, port| Frame::tcp_syn(src, 40000, dst, port);
        let mut vlan = syn(client4, other4, 80);
        vlan.vlans = vec![(0x8100, 100)];
        let mut frag = syn(client4, vip4, 80);
        frag.ipv4_fragment = (100, false);
        let mut v6ext = syn(client6, other6, 80);
        v6ext.ipv6_ext = vec![Ipv6Ext::HopByHop { len8: 0 }];
        let ack = Frame::new(
            client4,
            vip4,
            L4::Tcp {
                src: 40000,
                dst: 443,
                flags: TCP_ACK,
            },
        );
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "non-VIP IPv4 TCP SYN",
                syn(client4, other4, 80).build(),
                false,
            ),
            (
                "non-VIP IPv6 TCP SYN",
                syn(client6, other6, 80).build(),
                false,
            ),
            ("non-VIP IPv6 SYN + hop-by-hop", v6ext.build(), false),
            (
                "VIP with backends, SYN",
                syn(client4, vip4, 443).build(),
                false,
            ),
            ("VIP with backends, ACK", ack.build(), false),
            ("VLAN-tagged non-VIP", vlan.build(), false),
            ("IPv4 non-first fragment", frag.build(), false),
            (
                "idle VIP SYN, event written",
                syn(client4, vip4, 80).build(),
                true,
            ),
        ];
        // The TC hook (pods' veths) on a few of the same frames, beside an empty TC program.
        let tc_cases: Vec<(&str, Vec<u8>, bool)> = cases
            .iter()
            .filter(|(name, _, _)| {
                matches!(
                    *name,
                    "non-VIP IPv4 TCP SYN"
                        | "VIP with backends, SYN"
                        | "idle VIP SYN, event written"
                )
            })
            .cloned()
            .collect();
        let base_frame = syn(client4, other4, 80).build();
        out.push(figure(
            "1 per-packet",
            format!("empty XDP program ({vips} VIPs)"),
            median(
                (0..ROUNDS)
                    .map(|_| dp.baseline_test_run(&base_frame, LO, 200_000).unwrap().1 as f64)
                    .collect(),
            ),
            "ns",
        ));
        for (name, frame, writes) in cases {
            // The ring holds ~14,500 events: drain between batches so writes really happen.
            let repeat = if writes { 5_000 } else { 200_000 };
            let (ns, baseline) = paired(|program| {
                if !program {
                    return dp.baseline_test_run(&frame, LO, repeat).unwrap().1 as f64;
                }
                let ns = dp.test_run_repeat(&frame, LO, repeat).unwrap().1 as f64;
                ring.drain(|_| {});
                ns
            });
            let target = if name.starts_with("non-VIP") {
                "within 1.5x of empty"
            } else if writes {
                "within 4x of empty"
            } else {
                ""
            };
            let f = figure("1 per-packet", format!("{name} ({vips} VIPs)"), ns, "ns")
                .vs("empty", baseline);
            out.push(if target.is_empty() {
                f
            } else {
                f.target(target)
            });
        }
        for (name, frame, writes) in tc_cases {
            let repeat = if writes { 5_000 } else { 200_000 };
            let (ns, baseline) = paired(|program| {
                if !program {
                    return dp.tc_baseline_test_run(&frame, repeat).unwrap().1 as f64;
                }
                let ns = dp.tc_test_run_repeat(&frame, repeat).unwrap().1 as f64;
                ring.drain(|_| {});
                ns
            });
            out.push(
                figure(
                    "1 per-packet",
                    format!("TC hook: {name} ({vips} VIPs)"),
                    ns,
                    "ns",
                )
                .vs("empty TC", baseline),
            );
        }
        // Holding on, as the agent runs by default. The first SYN of a flow is copied, whole,
        // to the held-frame ring; every later one of that flow (a retransmission, or a test
        // run's repeat) is looked up and not copied. The first is timed one run at a time, the
        // flow let go between runs as the agent does.
        dp.start_holding(64, 8_192).unwrap();
        let mut held = dp.take_held().unwrap();
        let idle_syn = syn(client4, vip4, 80).build();
        let idle_flow = unidler::hold::frame::parse(&idle_syn).unwrap().flow;
        const FIRSTS: u32 = 500;
        for tc in [false, true] {
            let (hook, empty) = if tc {
                ("TC hook: ", "empty TC")
            } else {
                ("", "empty")
            };
            let (ns, baseline) = paired(|program| {
                let mut sum = 0u64;
                for _ in 0..FIRSTS {
                    sum += match (program, tc) {
                        (false, false) => dp.baseline_test_run(&idle_syn, LO, 1).unwrap().1,
                        (false, true) => dp.tc_baseline_test_run(&idle_syn, 1).unwrap().1,
                        (true, true) => dp.tc_test_run_repeat(&idle_syn, 1).unwrap().1,
                        (true, false) => dp.test_run_repeat(&idle_syn, LO, 1).unwrap().1,
                    };
                    if program {
                        ring.drain(|_| {});
                        held.drain(|_| {});
                        dp.release_flow(&idle_flow, false).unwrap();
                        dp.set_held(&[(idle_flow.vip(), 0)], 0).unwrap();
                    }
                }
                sum as f64 / f64::from(FIRSTS)
            });
            out.push(
                figure(
                    "1 per-packet",
                    format!(
                        "{hook}idle VIP SYN, first of its flow: held, event written ({vips} VIPs)"
                    ),
                    ns,
                    "ns",
                )
                .vs(empty, baseline),
            );
            let (ns, baseline) = paired(|program| match (program, tc) {
                (false, false) => dp.baseline_test_run(&idle_syn, LO, 5_000).unwrap().1 as f64,
                (false, true) => dp.tc_baseline_test_run(&idle_syn, 5_000).unwrap().1 as f64,
                (true, _) => {
                    let ns = if tc {
                        dp.tc_test_run_repeat(&idle_syn, 5_000).unwrap().1
                    } else {
                        dp.test_run_repeat(&idle_syn, LO, 5_000).unwrap().1
                    };
                    ring.drain(|_| {});
                    held.drain(|_| {});
                    ns as f64
                }
            });
            out.push(
                figure(
                    "1 per-packet",
                    format!("{hook}idle VIP SYN, its flow held already: not copied, event written ({vips} VIPs)"),
                    ns,
                    "ns",
                )
                .vs(empty, baseline),
            );
        }
        dp.release_flow(&idle_flow, false).unwrap();
        dp.set_held(&[(idle_flow.vip(), 0)], 0).unwrap();
        // While a replayed flow waits for its answer, every TCP segment that is not a SYN is
        // looked up in HELD_FLOWS (here: a miss, another flow).
        let watched = unidler_common::FlowKey {
            proto: 6,
            ..Default::default()
        };
        dp.watch_answer(&watched, LO).unwrap();
        let ack_frame = ack.build();
        let (ns, baseline) = paired(|program| {
            if program {
                dp.test_run_repeat(&ack_frame, LO, 200_000).unwrap().1 as f64
            } else {
                dp.baseline_test_run(&ack_frame, LO, 200_000).unwrap().1 as f64
            }
        });
        out.push(
            figure(
                "1 per-packet",
                format!(
                    "VIP with backends, ACK, while a replay waits for its answer ({vips} VIPs)"
                ),
                ns,
                "ns",
            )
            .vs("empty", baseline),
        );
        dp.release_flow(&watched, false).unwrap();
        // Scoped VIPs (tenants reusing an address): the ingress interface's scope and the
        // VIP's state there are looked up; beside the same frame to an unscoped VIP.
        dp.set_iface_scope(LO, Some(10)).unwrap();
        let scoped = |dp: &mut Datapath, port: u16, backends: u32, vip_id: u32| {
            let spec: VipSpec = format!("10.96.0.10:{port}/tcp").parse().unwrap();
            dp.upsert_vip(
                spec.vip.key(),
                VipState {
                    backends: 0,
                    vip_id,
                    flags: unidler_common::VIP_FLAG_SCOPED,
                    ..VipState::default()
                },
            )
            .unwrap();
            dp.set_vip_scopes(vip_id, &[(10, backends)]).unwrap();
        };
        scoped(&mut dp, 8443, 3, 2);
        scoped(&mut dp, 8080, 0, 3);
        for (name, port, unscoped_port) in [
            ("VIP with backends, SYN", 8443, 443),
            ("idle VIP SYN, held and event written", 8080, 80),
        ] {
            let (with_scope, without) = (
                syn(client4, vip4, port).build(),
                syn(client4, vip4, unscoped_port).build(),
            );
            let repeat = if port == 8080 { 5_000 } else { 200_000 };
            let (ns, baseline) = paired(|program| {
                let frame = if program { &with_scope } else { &without };
                let ns = dp.test_run_repeat(frame, LO, repeat).unwrap().1;
                ring.drain(|_| {});
                held.drain(|_| {});
                ns as f64
            });
            out.push(
                figure(
                    "1 per-packet",
                    format!("{name}, scoped VIP ({vips} VIPs)"),
                    ns,
                    "ns",
                )
                .vs("unscoped", baseline),
            );
        }
        // Suppressed by the per-VIP limit: a fresh datapath with burst 1, rate 1/s.
        drop(dp);
        let mut limited = Datapath::load(&LoadOptions {
            rate_limits: RateLimitConfig::new(1, 1, 1_000_000, 1_000_000),
            kernel_log_level: 0,
            // Checked on every idle hit, as the agent runs; never expires here.
            fail_open_after: Duration::from_secs(3600),
            ..LoadOptions::default()
        })
        .unwrap();
        add(&mut limited, "10.96.0.10:80/tcp", 0);
        let f = syn(client4, vip4, 80).build();
        let (ns, base) = paired(|program| {
            if program {
                limited.test_run_repeat(&f, LO, 200_000).unwrap().1 as f64
            } else {
                limited.baseline_test_run(&f, LO, 200_000).unwrap().1 as f64
            }
        });
        out.push(
            figure(
                "1 per-packet",
                format!("idle VIP SYN, rate-limited ({vips} VIPs)"),
                ns,
                "ns",
            )
            .vs("empty", base),
        );
    }
    out
}
