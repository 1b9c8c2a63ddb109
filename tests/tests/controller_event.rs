//! Idle hits become Controller_Event rows in a real OVN Southbound database, as
//! ovn-controller writes them, exactly once, across restarts and leader failover.

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::{Agent, southbound_args},
    netns::{CLIENT_V4, SERVER_V4, Topology},
    ovsdb_server::{self, CHASSIS, EventRow, Southbound, TempDir},
    require_root,
};

const LB: &str = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";
const WAIT: Duration = Duration::from_secs(20);

/// Sends one UDP datagram from the client namespace to the server address on `port`.
fn udp_hit(topo: &Topology, port: u16) {
    topo.in_client(|| {
        let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0)).unwrap();
        socket
            .send_to(b"wake up", SocketAddr::new(SERVER_V4.into(), port))
            .unwrap();
    });
}

/// A TCP connection attempt (which the datapath drops) from the client namespace.
fn tcp_hit(topo: &Topology, port: u16) {
    topo.in_client(|| {
        let addr = SocketAddr::new(SERVER_V4.into(), port);
        let result = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(result.is_err(), "idle VIP must not accept");
    });
}

#[track_caller]
fn wait_rows(
    what: &str,
    mut rows: impl FnMut() -> Vec<EventRow>,
    done: impl Fn(&[EventRow]) -> bool,
) -> Vec<EventRow> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = rows();
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; rows: {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_args<'a>(
    topo: &'a Topology,
    db: &'a str,
    state: &'a str,
    vips: &'a [String],
) -> Vec<&'a str> {
    let mut args = southbound_args(&topo.server_if, db, state);
    for vip in vips {
        args.extend(["--vip", vip.as_str()]);
    }
    args
}

#[test]
fn a_connection_attempt_writes_the_row_ovn_controller_would() {
    require_root();
    let topo = Topology::new("ce");
    let sb = ovsdb_server::southbound_with_chassis();
    let chassis = sb.chassis_uuid(CHASSIS);
    let state = TempDir::new("state");
    let db = sb.unix_remote();
    let vips = [format!("10.77.0.2:80/tcp@{LB}")];
    let args = agent_args(&topo, &db, state.path_str(), &vips);
    let agent = Agent::start(&topo.server_ns, &args);

    tcp_hit(&topo, 80);
    let rows = wait_rows("the row", || sb.event_rows(), |r| !r.is_empty());
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row.event_type, "empty_lb_backends");
    assert_eq!(
        row.event_info,
        BTreeMap::from([
            ("load_balancer".to_owned(), LB.to_owned()),
            ("protocol".to_owned(), "tcp".to_owned()),
            ("vip".to_owned(), "10.77.0.2:80".to_owned()),
        ])
    );
    assert_eq!(row.chassis.as_deref(), Some(chassis.as_str()));
    assert_eq!(row.seq_num, 1);

    // While the row exists, more hits insert nothing.
    tcp_hit(&topo, 80);
    tcp_hit(&topo, 80);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(sb.event_rows().len(), 1);

    // The CMS deletes it; the next hit writes a new one with the next seq_num.
    sb.sbctl(&["destroy", "Controller_Event", &row.uuid]);
    std::thread::sleep(Duration::from_millis(200));
    tcp_hit(&topo, 80);
    let rows = wait_rows(
        "the second row",
        || sb.event_rows(),
        |r| r.len() == 1 && r[0].uuid != row.uuid,
    );
    assert_eq!(rows[0].seq_num, 2);

    agent.signal(libc::SIGTERM);
    let exit = agent.wait(WAIT);
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    assert!(exit.stderr.contains("written=2"), "{}", exit.stderr);
    assert!(exit.stderr.contains("deduplicated=2"), "{}", exit.stderr);
}

#[test]
fn seq_num_keeps_increasing_across_agent_restarts() {
    require_root();
    let topo = Topology::new("cs");
    let sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("state");
    let db = sb.unix_remote();
    let vips = [
        format!("10.77.0.2:80/tcp@{LB}"),
        format!("10.77.0.2:53/udp@{LB}"),
    ];
    let args = agent_args(&topo, &db, state.path_str(), &vips);

    let agent = Agent::start(&topo.server_ns, &args);
    tcp_hit(&topo, 80);
    udp_hit(&topo, 53);
    wait_rows("two rows", || sb.event_rows(), |r| r.len() == 2);
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait(WAIT).code, Some(0));
    // The CMS consumed everything: nothing in the database tells the next run where to go on.
    sb.sbctl(&["--all", "destroy", "Controller_Event"]);

    let agent = Agent::start(&topo.server_ns, &args);
    udp_hit(&topo, 53);
    let rows = wait_rows(
        "the row after restart",
        || sb.event_rows(),
        |r| r.len() == 1,
    );
    assert_eq!(
        rows[0].seq_num, 3,
        "ovn-controller would restart at 1; we go on"
    );
    drop(agent);

    // A fresh state dir: the database's own rows still keep seq_num from going back.
    let fresh = TempDir::new("state2");
    let args = agent_args(&topo, &db, fresh.path_str(), &vips);
    let agent = Agent::start(&topo.server_ns, &args);
    tcp_hit(&topo, 80);
    let rows = wait_rows("a second row", || sb.event_rows(), |r| r.len() == 2);
    assert_eq!(rows.iter().map(|r| r.seq_num).max(), Some(4), "{rows:#?}");

    // A crash, and the CMS consumes everything: the state file still keeps seq_num going up
    // (past the rest of the block of numbers it had reserved).
    agent.signal(libc::SIGKILL);
    let _ = agent.wait(WAIT);
    sb.sbctl(&["--all", "destroy", "Controller_Event"]);
    let _agent = Agent::start(&topo.server_ns, &args);
    udp_hit(&topo, 53);
    let rows = wait_rows(
        "the row after a crash",
        || sb.event_rows(),
        |r| r.len() == 1,
    );
    assert!(
        rows[0].seq_num > 4,
        "seq_num went back after a crash: {rows:#?}"
    );
}

#[test]
fn hits_while_the_database_is_down_are_written_once_it_is_back() {
    require_root();
    let topo = Topology::new("cd");
    let mut sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("state");
    let db = sb.unix_remote();
    let vips: Vec<String> = (0..20)
        .map(|i| format!("10.77.0.2:{}/udp@{LB}", 7000 + i))
        .collect();
    let args = agent_args(&topo, &db, state.path_str(), &vips);
    let _agent = Agent::start(&topo.server_ns, &args);

    for i in 0..10 {
        udp_hit(&topo, 7000 + i);
    }
    wait_rows("ten rows", || sb.event_rows(), |r| r.len() == 10);
    sb.kill();
    for i in 10..20 {
        udp_hit(&topo, 7000 + i);
        udp_hit(&topo, 7000 + i); // a duplicate while waiting
    }
    std::thread::sleep(Duration::from_secs(3));
    sb.start();
    let rows = wait_rows("all twenty rows", || sb.event_rows(), |r| r.len() >= 20);
    assert_exactly_once(&rows, 20);
}

#[test]
fn every_event_lands_exactly_once_when_the_raft_leader_dies() {
    require_root();
    let topo = Topology::new("cr");
    let mut cluster = ovsdb_server::southbound_cluster(3);
    cluster.sbctl(&["chassis-add", "chassis-1", "geneve", "127.0.0.1"]);
    let state = TempDir::new("state");
    let db = cluster.unix_remotes();
    let n = 60u16;
    let vips: Vec<String> = (0..n)
        .map(|i| format!("10.77.0.2:{}/udp@{LB}", 8000 + i))
        .collect();
    let args = agent_args(&topo, &db, state.path_str(), &vips);
    let _agent = Agent::start(&topo.server_ns, &args);

    for i in 0..n {
        udp_hit(&topo, 8000 + i);
        if i == n / 3 {
            let leader = cluster.wait_for_leader(WAIT);
            cluster.servers[leader].kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.wait_for_leader(WAIT);
    let rows = wait_rows(
        "every row",
        || cluster.event_rows(),
        |r| r.len() >= n as usize,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&cluster.event_rows(), n as usize);
    drop(rows);
}

#[track_caller]
fn assert_exactly_once(rows: &[EventRow], n: usize) {
    let mut per_vip: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        *per_vip.entry(row.event_info["vip"].as_str()).or_default() += 1;
    }
    assert_eq!(per_vip.len(), n, "{rows:#?}");
    assert!(per_vip.values().all(|&c| c == 1), "duplicates: {per_vip:?}");
    let mut seqs: Vec<i64> = rows.iter().map(|r| r.seq_num).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "seq_nums are unique");
}

#[test]
fn a_full_queue_drops_and_counts_the_overflow() {
    require_root();
    let topo = Topology::new("cq");
    let mut sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("state");
    let db = sb.unix_remote();
    let vips: Vec<String> = (0..20)
        .map(|i| format!("10.77.0.2:{}/udp@{LB}", 6000 + i))
        .collect();
    let mut args = agent_args(&topo, &db, state.path_str(), &vips);
    args.extend(["--event-queue-size", "5"]);
    let mut agent = Agent::start(&topo.server_ns, &args);
    sb.kill();
    for i in 0..20 {
        udp_hit(&topo, 6000 + i);
    }
    agent.wait_for_log("event queue full", WAIT);
    sb.start();
    let rows = wait_rows("the queued rows", || sb.event_rows(), |r| r.len() >= 5);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sb.event_rows().len(), 5, "only what fitted: {rows:#?}");
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(WAIT);
    assert!(
        exit.stderr.contains("dropped_overflow=15"),
        "{}",
        exit.stderr
    );
}

/// Without --chassis, the chassis is the local Open_vSwitch database's system-id. If that
/// database comes up only after the agent (as on a booting node), the agent keeps asking and
/// then writes its rows for the right Chassis; until then /readyz names the Chassis it lacks.
#[test]
fn the_chassis_name_is_learned_when_the_open_vswitch_database_comes_up_late() {
    require_root();
    let topo = Topology::new("cl");
    let sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("clstate");
    // Where the Open_vSwitch database's socket will be: nothing yet.
    let ovs_sock = state.join("db.sock");
    let ovs_db = format!("unix:{}", ovs_sock.display());
    let db = sb.unix_remote();
    let vip = format!("10.77.0.2:80/tcp@{LB}");
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--ovnsb-db",
        &db,
        "--ovs-db",
        &ovs_db,
        "--state-dir",
        state.path_str(),
        "--vip",
        &vip,
    ];
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("using the hostname as chassis name", WAIT);
    let readyz = || {
        topo.in_server(|| {
            unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/readyz")
        })
        .map_err(|e| e.to_string())
    };
    let deadline = Instant::now() + WAIT;
    loop {
        match readyz() {
            Err(e) if e.contains("no Chassis row named") => break,
            other => assert!(Instant::now() < deadline, "/readyz: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tcp_hit(&topo, 80);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sb.event_rows().is_empty(),
        "no row for a chassis that is not ours"
    );

    // The node's Open_vSwitch database comes up, with this node's system-id.
    let ovs = ovsdb_server::OvsdbServer::standalone(
        "ovs",
        "/usr/share/openvswitch/vswitch.ovsschema",
        ovsdb_server::Listen::default(),
    );
    ovs.ctl("ovs-vsctl", &["--no-wait", "init"]);
    ovs.ctl(
        "ovs-vsctl",
        &[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "external_ids:system-id=chassis-1",
        ],
    );
    std::os::unix::fs::symlink(ovs.dir.join("ovs.sock"), &ovs_sock).unwrap();
    agent.wait_for_log("chassis name from the local Open_vSwitch", WAIT);
    let rows = wait_rows(
        "the waiting hit's row",
        || sb.event_rows(),
        |r| r.len() == 1,
    );
    let chassis = sb.chassis_uuid(CHASSIS);
    assert_eq!(rows[0].chassis.as_deref(), Some(chassis.as_str()));
    assert_eq!(readyz().unwrap(), "ready\n");
}

/// With `--dedup cluster`, a hit for a VIP that any chassis has already reported writes no
/// row: a wake-up storm across the cluster writes about one. The default (per chassis, as
/// ovn-controller) writes one per node.
#[test]
fn cluster_wide_dedup_writes_one_row_for_many_nodes() {
    require_root();
    let sb = ovsdb_server::southbound_with_chassis();
    sb.sbctl(&["chassis-add", "chassis-2", "geneve", "127.0.0.2"]);
    let db = sb.unix_remote();
    let vip = format!("10.77.0.2:80/tcp@{LB}");
    let node = |prefix: &str, chassis: &str, dedup: &str| {
        let topo = Topology::new(prefix);
        let state = TempDir::new(&format!("{prefix}st"));
        let args = [
            "run",
            "--iface",
            &topo.server_if,
            "--ovnsb-db",
            &db,
            "--chassis",
            chassis,
            "--state-dir",
            state.path_str(),
            "--vip",
            &vip,
            "--dedup",
            dedup,
        ];
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log("connected to OVN_Southbound", WAIT);
        (topo, state, agent)
    };
    let (first, _s1, _a1) = node("d1", "chassis-1", "cluster");
    let (second, _s2, _a2) = node("d2", "chassis-2", "cluster");
    tcp_hit(&first, 80);
    wait_rows("the first node's row", || sb.event_rows(), |r| r.len() == 1);
    tcp_hit(&second, 80);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(sb.event_rows().len(), 1, "one row for the cluster");

    // Per chassis (the default), the second node reports too.
    sb.sbctl(&["--all", "destroy", "Controller_Event"]);
    drop((_a1, _a2));
    let (first, _s3, _a3) = node("d3", "chassis-1", "chassis");
    let (second, _s4, _a4) = node("d4", "chassis-2", "chassis");
    tcp_hit(&first, 80);
    tcp_hit(&second, 80);
    let rows = wait_rows("a row per node", || sb.event_rows(), |r| r.len() == 2);
    assert_ne!(rows[0].chassis, rows[1].chassis);
}
