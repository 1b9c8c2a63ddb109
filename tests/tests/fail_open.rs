//! Fail open: when the agent cannot vouch for the VIP map, idle VIPs let packets through (so
//! that OVN's own path handles them, as without us), and drop again once it can.

use std::time::{Duration, Instant};

use unidler_tests::{
    agent::{Agent, southbound_args},
    netns::Topology,
    ovsdb_server::{OvnCentral, TempDir},
    proxy::UnixProxy,
    require_root,
};

const WAIT: Duration = Duration::from_secs(40);

/// The Southbound database becomes unreachable from the agent only (ovn-controller would
/// still see it), and the service gets a backend meanwhile: the agent cannot learn it, so
/// after --fail-open-after the kernel lets the client through instead of dropping forever.
#[test]
fn idle_vips_fail_open_while_the_southbound_database_is_cut_off_from_the_agent() {
    require_root();
    let topo = Topology::new("fo");
    let ovn = OvnCentral::with_idle_load_balancer("10.77.0.2:80");
    let _listener = topo.listen(80);

    let state = TempDir::new("fostate");
    let proxy = UnixProxy::start(&state.join("sb.sock"), &ovn.sb.dir.join("sb.sock"));
    let db = proxy.remote();
    let mut args = southbound_args(&topo.server_if, &db, state.path_str());
    args.extend(["--fail-open-after", "2s"]);
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("vips=1", WAIT);
    assert!(!topo.connects(80), "idle and vouched for: dropped");

    proxy.cut();
    let cut_at = Instant::now();
    ovn.set_backends("10.77.0.2:80", "10.0.0.5:80");
    while !topo.connects(80) {
        assert!(
            cut_at.elapsed() < WAIT,
            "still dropped {WAIT:?} after the agent lost the database"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failed_open_after = cut_at.elapsed();
    assert!(
        failed_open_after >= Duration::from_secs(2),
        "passed before --fail-open-after could have run out: {failed_open_after:?}"
    );
    agent.wait_for_log("idle VIPs fail open", Duration::from_secs(1));

    // The database is back: the agent resyncs (the VIP now has a backend) and vouches again.
    proxy.restore();
    agent.wait_for_log("idle VIPs drop again", WAIT);
    assert!(topo.connects(80), "active after the resync");
    // Idled again: dropped again, as the map is vouched for once more.
    ovn.set_backends("10.77.0.2:80", "");
    let deadline = Instant::now() + WAIT;
    while topo.connects(80) {
        assert!(Instant::now() < deadline, "never dropped again");
        std::thread::sleep(Duration::from_millis(200));
    }
}
