//! Section 6 (`--vs-ovn`): sections 2 and 3 side by side with real OVN's own path on the same veth.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use unidler_tests::{
    agent::{Agent, southbound_args},
    frames::Frame,
    ovn_chassis::{self, OvnNode},
    ovsdb_server::TempDir,
};

use crate::{common::*, figure::*};

/// OVN's own figures from section 6, for section 2 to compare against.
pub(crate) struct OvnFigures {
    pub(crate) latency: Vec<f64>,
}

/// Sections 2 and 3 again, on one real OVN node (ovn-northd, ovs-vswitchd with the userspace
/// datapath, ovn-controller) and the very same veth: OVN's own path (trigger_event →
/// packet-in → ovn-controller → row) and unidler's agent on that veth, reading the load
/// balancers ovn-northd wrote and writing rows into the same Southbound database. Latency is
/// measured in rounds alternating between the two; the storm once each.
pub(crate) fn vs_ovn() -> (Vec<Figure>, OvnFigures) {
    const SECTION: &str = "6 vs OVN";
    const LATENCY_ROUNDS: usize = 5;
    let node = OvnNode::start("bo");
    // 250 VIPs for latency, 10,000 for the storm (in load balancers of 1,000: one command
    // line each), all without backends and with options:event=true.
    let latency_vips: Vec<SocketAddr> = (0..250u32)
        .map(|i| SocketAddr::new(Ipv4Addr::new(10, 96, 0, i as u8 + 1).into(), 80))
        .collect();
    let storm_vips: Vec<SocketAddr> = (0..10_000u32)
        .map(|i| {
            SocketAddr::new(
                Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1).into(),
                80,
            )
        })
        .collect();
    // One more per round, to warm each side up before it is timed (discarded).
    let warm_up_vips: Vec<SocketAddr> = (0..LATENCY_ROUNDS as u8)
        .map(|i| SocketAddr::new(Ipv4Addr::new(10, 96, 1, i + 1).into(), 80))
        .collect();
    let text = |vips: &[SocketAddr]| vips.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    node.add_idle_load_balancer(
        "latency",
        &text(&[latency_vips.as_slice(), &warm_up_vips].concat()),
    );
    for (i, chunk) in storm_vips.chunks(1_000).enumerate() {
        node.add_idle_load_balancer(&format!("storm{i}"), &text(chunk));
    }
    let total_vips = latency_vips.len() + warm_up_vips.len() + storm_vips.len();
    let frames: Vec<Vec<u8>> = storm_vips
        .iter()
        .enumerate()
        .map(|(i, vip)| {
            let mut f = Frame::tcp_syn(
                ovn_chassis::CLIENT_V4.into(),
                1024 + (i % 60_000) as u16,
                vip.ip(),
                vip.port(),
            );
            f.src_mac = ovn_chassis::CLIENT_MAC;
            f.dst_mac = ovn_chassis::GATEWAY_MAC;
            f.build()
        })
        .collect();
    let rt = runtime();
    let sb = node.central.sb.unix_remote();
    let client = event_monitor(&rt, &sb);

    // Latency in rounds, OVN's own path and unidler alternately, so that both see the machine
    // in the same states; each round uses VIPs of its own. While the agent runs, its XDP
    // program drops the SYNs to idle VIPs, so OVN's path stays quiet.
    let state = TempDir::new("ostate");
    let mut args = southbound_args(&node.node_if, &sb, state.path_str());
    args.extend(["--event-rate", "100000", "--event-burst", "20000"]);
    // ovs-vswitchd's userspace datapath reads the veth through AF_PACKET, before TC ingress:
    // only XDP keeps the SYN from OVN's own path here.
    args.extend(["--hook", "xdp"]);
    let start_agent = || {
        let mut agent = Agent::start(&node.node_ns, &args);
        agent.wait_for_log(&format!("vips={total_vips} "), Duration::from_secs(60));
        // Steady state, as on a node where it has long been running: past the heap trim
        // that follows a full sync.
        std::thread::sleep(Duration::from_millis(1500));
        agent
    };
    let (mut ovn_latency, mut ours_latency) = (Vec::new(), Vec::new());
    // Each round's first hit, after the agent's start: it reads its load balancer's name
    // (`lb_id`) from the database first.
    let (mut ovn_first, mut ours_first) = (Vec::new(), Vec::new());
    let mut totals = [(0.0, 0.0); 2];
    let rounds = latency_vips.chunks(latency_vips.len() / LATENCY_ROUNDS);
    for (round, warm_up) in rounds.zip(&warm_up_vips) {
        clear_events(&rt, &client);
        ovn_first.extend(measure_latency(&rt, &client, &node.client_ns, &[*warm_up]));
        ovn_latency.extend(measure_latency(&rt, &client, &node.client_ns, round));
        clear_events(&rt, &client);
        let agent = start_agent();
        ours_first.extend(measure_latency(&rt, &client, &node.client_ns, &[*warm_up]));
        let before = histogram_totals(&node.node_ns);
        ours_latency.extend(measure_latency(&rt, &client, &node.client_ns, round));
        let after = histogram_totals(&node.node_ns);
        for ((total, b), a) in totals.iter_mut().zip(before).zip(after) {
            total.0 += a.0 - b.0;
            total.1 += a.1 - b.1;
        }
        drop(agent);
    }
    ovn_latency.sort_by(f64::total_cmp);
    ours_latency.sort_by(f64::total_cmp);
    let breakdown = latency_breakdown(SECTION, totals);

    // The storm: OVN's path, then unidler's.
    clear_events(&rt, &client);
    let ovn_cpu = || cpu_seconds(node.controller_pid()) + cpu_seconds(node.vswitchd_pid());
    let c0 = ovn_cpu();
    let ovn_storm = measure_storm(&client, &node.client_ns, &node.client_if, frames.clone());
    let ovn_storm_cpu = ovn_cpu() - c0;
    clear_events(&rt, &client);
    let agent = start_agent();
    let a0 = cpu_seconds(agent.pid());
    let ours_storm = measure_storm(&client, &node.client_ns, &node.client_if, frames);
    let ours_storm_cpu = cpu_seconds(agent.pid()) - a0;
    drop(agent);

    let mut out = vec![
        figure(
            SECTION,
            "events measured (unidler | OVN)",
            ours_latency.len() as f64,
            "events",
        )
        .vs("OVN", ovn_latency.len() as f64),
    ];
    for (label, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        let f = figure(
            SECTION,
            format!("SYN to row at a monitoring client, {label}"),
            percentile(&ours_latency, p),
            "ms",
        )
        .vs(format!("OVN {label}"), percentile(&ovn_latency, p));
        out.push(match label {
            "p50" => f.target("at most half of OVN"),
            "p99" => f.target("under 2 ms"),
            _ => f,
        });
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    out.push(
        figure(
            SECTION,
            "first hit after the agent's start, mean",
            mean(&ours_first),
            "ms",
        )
        .vs("OVN's first", mean(&ovn_first)),
    );
    out.extend(breakdown);
    out.extend([
        figure(
            SECTION,
            "storm: rows written for 10,000 idle VIPs",
            ours_storm.rows as f64,
            "rows",
        )
        .vs("OVN", ovn_storm.rows as f64)
        .target("all 10,000"),
        figure(
            SECTION,
            "storm: time until the last row exists",
            ours_storm.last_row_at.as_secs_f64() * 1e3,
            "ms",
        )
        .vs("OVN", ovn_storm.last_row_at.as_secs_f64() * 1e3)
        .target("within 2,000 ms"),
        figure(
            SECTION,
            "storm: rows per second",
            ours_storm.rows as f64 / ours_storm.last_row_at.as_secs_f64(),
            "rows/s",
        )
        .vs(
            "OVN",
            ovn_storm.rows as f64 / ovn_storm.last_row_at.as_secs_f64(),
        ),
        figure(
            SECTION,
            "storm: CPU used (agent | ovn-controller + ovs-vswitchd)",
            ours_storm_cpu * 1e3,
            "ms",
        )
        .vs("OVN", ovn_storm_cpu * 1e3),
    ]);
    (
        out,
        OvnFigures {
            latency: ovn_latency,
        },
    )
}
