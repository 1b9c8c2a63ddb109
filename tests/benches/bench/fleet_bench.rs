//! Section 10: many agents on one clustered Southbound database (`tests/scenarios/fleet.rs`):
//! `UNIDLER_BENCH_AGENTS` (default 200) agents' worth of Southbound clients, each with its own
//! Chassis and connection, and 10,000 load balancers, on a real 3-member RAFT cluster. The
//! initial sync (all load balancers idle services', and again with 100 of them), a wake-up storm (one idle VIP hit on every chassis at once) with per-chassis
//! and cluster-wide deduplication, a restart of the whole cluster, and the same with a leader
//! failover in the middle of the reconnect storm.

#[path = "../../scenarios/fleet.rs"]
mod fleet;

use unidler::ovn::controller_event::Dedup;

use crate::figure::{Figure, figure};

const LOAD_BALANCERS: u32 = 10_000;
/// Idle services' load balancers in the second cold start.
const FEW_IDLE: u32 = 100;

pub(crate) fn fleet_bench() -> Vec<Figure> {
    const S: &str = "10 fleet";
    let n: usize = std::env::var("UNIDLER_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let (mut fleet, sync) = fleet::Fleet::start(n, LOAD_BALANCERS, false);
    let mut out = vec![
        figure(
            S,
            format!("{n} agents, {LOAD_BALANCERS} LBs: all synced"),
            sync.seconds,
            "s",
        ),
        figure(
            S,
            "  Southbound CPU for the sync (3 servers)",
            sync.db_cpu_seconds,
            "s",
        ),
        figure(
            S,
            "  busiest server's CPU (the leader)",
            sync.busiest_cpu_seconds,
            "s",
        ),
        figure(
            S,
            "  Southbound RSS after (3 servers)",
            sync.db_rss_mb,
            "MB",
        ),
    ];
    for (dedup, name) in [
        (Dedup::Chassis, "per chassis"),
        (Dedup::Cluster, "cluster-wide"),
    ] {
        let w = fleet.wake_up(dedup);
        out.extend([
            figure(
                S,
                format!("wake-up on {n} chassis, {name}: rows"),
                w.rows as f64,
                "rows",
            )
            .vs("ovn-controllers", n as f64),
            figure(
                S,
                format!("  {name}: CMS sees the first row"),
                w.first_row_seconds * 1e3,
                "ms",
            ),
            figure(
                S,
                format!("  {name}: every agent done"),
                w.all_done_seconds * 1e3,
                "ms",
            ),
            figure(
                S,
                format!("  {name}: Southbound CPU"),
                w.db_cpu_seconds,
                "s",
            ),
        ]);
    }
    for (failover, name) in [
        (false, "cluster restart"),
        (true, "cluster restart + leader failover"),
    ] {
        let c = fleet.restart_cluster(failover);
        out.extend([
            figure(S, format!("{name}: all {n} resynced"), c.seconds, "s"),
            figure(
                S,
                format!("  {name}: Southbound CPU"),
                c.db_cpu_seconds,
                "s",
            ),
        ]);
    }
    drop(fleet);
    // The same cold start where, as in ovn-kubernetes, only idle services' load balancers
    // have options:event=true (the agents follow them all, with their options).
    let (few, few_sync) = fleet::Fleet::start_some_idle(n, LOAD_BALANCERS, FEW_IDLE, false);
    drop(few);
    out.extend([
        figure(
            S,
            format!("{n} agents, {LOAD_BALANCERS} LBs of which {FEW_IDLE} idle: all synced"),
            few_sync.seconds,
            "s",
        )
        .vs("all idle", sync.seconds),
        figure(
            S,
            "  Southbound CPU for the sync (3 servers)",
            few_sync.db_cpu_seconds,
            "s",
        )
        .vs("all idle", sync.db_cpu_seconds),
    ]);
    // The same cold start with the agents connected to any member (--ovnsb-any-member).
    let (_fleet, any) = fleet::Fleet::start(n, LOAD_BALANCERS, true);
    out.extend([
        figure(
            S,
            format!("{n} agents via any member: all synced"),
            any.seconds,
            "s",
        )
        .vs("leader only", sync.seconds),
        figure(
            S,
            "  Southbound CPU for the sync (3 servers)",
            any.db_cpu_seconds,
            "s",
        ),
        figure(S, "  busiest server's CPU", any.busiest_cpu_seconds, "s")
            .vs("leader only", sync.busiest_cpu_seconds),
    ]);
    out
}
