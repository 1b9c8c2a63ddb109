//! Section 3: wake-up storm, 10,000 idle VIPs hit at once.

use unidler_tests::netns::{CLIENT_V4, syn_to_server};

use crate::{common::*, figure::*};

pub(crate) fn storm() -> Vec<Figure> {
    let n = 10_000u32;
    let vips: Vec<String> = (0..n)
        .map(|i| format!("10.77.0.2:{}/tcp", 20_000 + i))
        .collect();
    let bed = bed(
        "bs",
        &vips,
        &["--event-rate", "100000", "--event-burst", "20000"],
    );
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            syn_to_server(
                CLIENT_V4.into(),
                1024 + (i % 60000) as u16,
                20_000 + i as u16,
            )
        })
        .collect();
    let storm = measure_storm(
        &bed.client,
        &bed.topo.client_ns,
        &bed.topo.client_if,
        frames,
    );
    vec![
        figure(
            "3 storm",
            "SYNs sent (distinct idle VIPs)",
            n as f64,
            "packets",
        ),
        figure(
            "3 storm",
            "time to send them",
            storm.sent_in.as_secs_f64() * 1e3,
            "ms",
        ),
        figure("3 storm", "rows written", storm.rows as f64, "rows").target("all 10,000"),
        figure(
            "3 storm",
            if storm.complete {
                "time until every row exists"
            } else {
                "time until the last row (not all came)"
            },
            storm.last_row_at.as_secs_f64() * 1e3,
            "ms",
        )
        .target("within 2,000 ms"),
        figure(
            "3 storm",
            "rows per second",
            storm.rows as f64 / storm.last_row_at.as_secs_f64(),
            "rows/s",
        ),
    ]
}
