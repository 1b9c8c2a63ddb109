//! Section 2: end-to-end latency, connection attempt → Controller_Event row seen by a monitoring client.

use std::net::SocketAddr;

use unidler_tests::netns::SERVER_V4;

use crate::{common::*, figure::*, vs_ovn::OvnFigures};

pub(crate) fn latency(ovn: Option<&OvnFigures>) -> Vec<Figure> {
    let n = 250u16;
    let vips: Vec<String> = (0..n)
        .map(|i| format!("10.77.0.2:{}/tcp", 10_000 + i))
        .collect();
    let bed = bed("bl", &vips, &[]);
    let targets: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::new(SERVER_V4.into(), 10_000 + i))
        .collect();
    let lat = measure_latency(&bed.rt, &bed.client, &bed.topo.client_ns, &targets);
    let breakdown = latency_breakdown("2 latency", histogram_totals(&bed.topo.server_ns));
    // OVN's figures: measured in this run by section 6 (--vs-ovn), else the ones
    // ../shared/reference/ovn-baseline.sh measured on this machine.
    let (ovn_p50, ovn_p90) = match ovn {
        Some(o) => (
            ("OVN p50 (section 6)", percentile(&o.latency, 0.5)),
            ("OVN p90 (section 6)", percentile(&o.latency, 0.9)),
        ),
        None => (
            ("OVN p50 (ovn-baseline.sh)", 1.2),
            ("OVN p90 (ovn-baseline.sh)", 1.45),
        ),
    };
    let mut out = vec![
        figure("2 latency", "events measured", lat.len() as f64, "events"),
        figure(
            "2 latency",
            "SYN to row at a monitoring client, p50",
            percentile(&lat, 0.5),
            "ms",
        )
        .vs(ovn_p50.0, ovn_p50.1)
        .target("at most half of OVN"),
        figure("2 latency", "SYN to row, p90", percentile(&lat, 0.9), "ms")
            .vs(ovn_p90.0, ovn_p90.1),
        figure("2 latency", "SYN to row, p99", percentile(&lat, 0.99), "ms").target("under 2 ms"),
    ];
    out.extend(breakdown);
    out
}
