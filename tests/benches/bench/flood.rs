//! Section 4: SYN floods to one and to 10,000 idle VIPs: what reaches userspace, and the CPU it costs.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use unidler_tests::netns::{send_frames, syn_to_server};

use crate::{common::*, figure::*};

pub(crate) fn flood() -> Vec<Figure> {
    let mut out = Vec::new();
    for targets in [1u32, 10_000] {
        let vips: Vec<String> = (0..targets)
            .map(|i| format!("10.77.0.2:{}/tcp", 20_000 + i))
            .collect();
        let bed = bed("bf", &vips, &[]);
        let agent_pid = bed.agent.pid();
        let sb_pid = pid_of(&bed.sb.dir.join("sb.db").to_string_lossy()).unwrap_or(0);
        // Precomputed frames from many spoofed sources, sent in a loop for 10 s.
        let frames: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| {
                let src = IpAddr::from([10, 78, (i / 250 % 250) as u8, (i % 250) as u8 + 1]);
                syn_to_server(
                    src,
                    1024 + (i % 60000) as u16,
                    20_000 + (i % targets) as u16,
                )
            })
            .collect();
        let (a0, s0) = (cpu_seconds(agent_pid), cpu_seconds(sb_pid));
        let started = Instant::now();
        let topo = &bed.topo;
        let sent = topo.in_client(|| {
            let mut sent = 0usize;
            while started.elapsed() < Duration::from_secs(10) {
                sent += send_frames(&topo.client_if, frames.iter().cloned());
            }
            sent
        });
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let (a1, s1) = (cpu_seconds(agent_pid), cpu_seconds(sb_pid));
        let rows = bed.client.replica().len("Controller_Event");
        let received = unidler_tests::netns::in_netns(&bed.topo.server_ns, || {
            unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics")
        })
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("unidler_events_total{stage=\"received\"} ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN);
        let label = if targets == 1 {
            "1 idle VIP"
        } else {
            "10,000 idle VIPs"
        };
        out.push(figure(
            "4 flood",
            format!("{label}: SYNs generated per second"),
            sent as f64 / secs,
            "pps",
        ));
        // Per VIP: a burst of 5, then 1/s; globally: a burst of 1,000, then 1,000/s.
        let allowed = (targets as f64 * (5.0 + secs)).min(1_000.0 + 1_000.0 * secs);
        out.push(
            figure(
                "4 flood",
                format!("{label}: events that reached userspace"),
                received,
                "events",
            )
            .target(format!("at most {allowed:.0} (the limits)")),
        );
        out.push(
            figure(
                "4 flood",
                format!("{label}: rows written"),
                rows as f64,
                "rows",
            )
            .target(if targets == 1 {
                "1"
            } else {
                "within the rate limits"
            }),
        );
        out.push(
            figure(
                "4 flood",
                format!("{label}: agent CPU"),
                (a1 - a0) / secs * 100.0,
                "% of a core",
            )
            .target("under 5%"),
        );
        out.push(figure(
            "4 flood",
            format!("{label}: ovsdb-server CPU"),
            (s1 - s0) / secs * 100.0,
            "% of a core",
        ));
    }
    out
}
