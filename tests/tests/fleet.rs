//! Many agents on one clustered Southbound database, at a size a test can afford: 20 agents'
//! worth of Southbound clients, 1,000 load balancers, a real 3-member RAFT cluster. Every agent
//! syncs; a wake-up storm (the same idle VIP hit on every chassis at once) writes one row per
//! chassis by default (as ovn-controller) and one row in all with `--dedup cluster`; every
//! agent resyncs after a restart of the whole cluster, and after a leader failover in the middle
//! of that. The benchmark's section 10 runs the same at 200 agents and 10,000 load balancers.

// The costs the scenario measures are the benchmark's to report; this test asserts outcomes.
#[allow(dead_code)]
#[path = "../scenarios/fleet.rs"]
mod fleet;

use unidler::ovn::controller_event::Dedup;

#[test]
fn agents_sync_deduplicate_cluster_wide_and_resync_after_cluster_restarts() {
    let (mut fleet, sync) = fleet::Fleet::start(20, 1_000, false);
    eprintln!("sync: {sync:?}");
    let per_chassis = fleet.wake_up(Dedup::Chassis);
    eprintln!("wake-up, per chassis: {per_chassis:?}");
    assert_eq!(
        per_chassis.rows, 20,
        "one row per chassis, as ovn-controller writes"
    );
    let cluster_wide = fleet.wake_up(Dedup::Cluster);
    eprintln!("wake-up, cluster-wide: {cluster_wide:?}");
    assert_eq!(cluster_wide.rows, 1, "one row for the whole cluster");
    let restart = fleet.restart_cluster(false);
    eprintln!("cluster restart: {restart:?}");
    assert!(restart.seconds < 30.0, "resync took {restart:?}");
    let failover = fleet.restart_cluster(true);
    eprintln!("cluster restart with a leader failover: {failover:?}");
    assert!(failover.seconds < 30.0, "resync took {failover:?}");
    // Still writing after all that.
    assert_eq!(fleet.wake_up(Dedup::Cluster).rows, 1);
}

#[test]
fn agents_connected_to_any_member_sync_and_write_through_followers() {
    let (fleet, sync) = fleet::Fleet::start(20, 1_000, true);
    eprintln!("sync through any member: {sync:?}");
    // Writes sent to followers are forwarded to the leader; the guard still holds.
    assert_eq!(fleet.wake_up(Dedup::Cluster).rows, 1);
    assert_eq!(fleet.wake_up(Dedup::Chassis).rows, 20);
}
