//! `cargo xtask bench`: how fast unidler is, each figure beside a baseline measured in the
//! same run. Reports; never passes or fails. Writes `target/bench/results.json`.
//!
//! 1. per-packet cost in the kernel (BPF_PROG_TEST_RUN) against a do-nothing program (XDP,
//!    and TC for a few frames);
//! 2. end-to-end latency, connection attempt → Controller_Event row seen by a monitoring client;
//! 3. wake-up storm: 10,000 idle VIPs hit at once;
//! 4. SYN floods to one and to 10,000 idle VIPs: what reaches userspace, and the CPU it costs;
//! 5. VIP sync: 10,000 and 100,000 VIPs from the Southbound database, one incremental change,
//!    and the agent's resident memory;
//! 6. with `--vs-ovn`: 2 and 3 side by side with real OVN's own path on the same veth;
//! 7. TCP throughput through a veth with the agent attached by each hook, against nothing;
//! 8. following OVN's VIFs: add-port to attached, 500 VIFs at rest, churn of 100 a second;
//! 9. the first connection after scale-to-zero: backend to connected, held and replayed
//!    against dropped (the client's own retransmission), for both SYN backoff schedules; with
//!    `--vs-ovn` also on a real OVN node, unidler against OVN alone;
//! 10. many agents (200, `UNIDLER_BENCH_AGENTS`) on one 3-member RAFT Southbound cluster with
//!     10,000 load balancers: sync, wake-up storm (per chassis, cluster-wide), cluster restart,
//!     leader failover.
//!
//! Arguments: section numbers to run (default all), e.g. `cargo xtask bench -- 1 3`, and
//! `--vs-ovn` to add section 6 (`cargo xtask bench --vs-ovn -- 6` runs it alone).

mod common;
mod figure;
mod first_connect;
mod fleet_bench;
mod flood;
mod hooks;
mod latency;
mod per_packet;
mod storm;
mod vifs;
mod vip_sync;
mod vs_ovn;

use std::collections::HashSet;

use crate::{
    figure::{print_table, write_json},
    first_connect::{first_connect, first_connect_on_ovn, many_waking_on_ovn},
    fleet_bench::fleet_bench,
    flood::flood,
    hooks::hooks,
    latency::latency,
    per_packet::per_packet,
    storm::storm,
    vifs::vifs,
    vip_sync::vip_sync,
    vs_ovn::vs_ovn,
};

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "benchmarks need root (BPF, namespaces)"
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let with_ovn = args.iter().any(|a| a == "--vs-ovn");
    let wanted: HashSet<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let run = |n: &str| wanted.is_empty() || wanted.contains(n);
    let mut figures = Vec::new();
    // Section 6 (with --vs-ovn) runs first: section 2 compares against its OVN figures.
    let mut ovn = None;
    let mut side_by_side = Vec::new();
    if with_ovn && run("6") {
        let (f, o) = vs_ovn();
        side_by_side = f;
        ovn = Some(o);
    } else if wanted.contains("6") {
        eprintln!("section 6 runs only with --vs-ovn (it starts real OVN)");
    }
    if run("1") {
        // On a thread of its own, so that its CPU pinning ends with it.
        figures.extend(std::thread::spawn(per_packet).join().expect("section 1"));
    }
    if run("2") {
        figures.extend(latency(ovn.as_ref()));
    }
    if run("3") {
        figures.extend(storm());
    }
    if run("4") {
        figures.extend(flood());
    }
    if run("5") {
        figures.extend(vip_sync());
    }
    if run("7") {
        figures.extend(hooks());
    }
    if run("8") {
        figures.extend(vifs());
    }
    if run("10") {
        figures.extend(fleet_bench());
    }
    if run("9") {
        figures.extend(first_connect());
        if with_ovn {
            figures.extend(first_connect_on_ovn());
            figures.extend(many_waking_on_ovn());
        }
    }
    figures.extend(side_by_side);
    print_table(&figures);
    write_json(&figures);
}
