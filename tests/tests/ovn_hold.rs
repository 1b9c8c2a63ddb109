//! On a real OVN node (ovn-northd, ovs-vswitchd with the userspace datapath, ovn-controller),
//! the test acting as the CMS: a client's first connection to an idle service is held by
//! unidler, the CMS reads and deletes the Controller_Event row and, a moment later, adds the
//! backend in the Northbound database; the held SYN is replayed through OVN's own forwarding
//! (load balancer, router, ACLs as configured) and the connection succeeds within 200 ms of
//! that commit. OVN writes no row of its own for the replayed packet. The agent reports the
//! wake-up phase by phase, in order and with the times the test as the CMS saw.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use unidler::telemetry::{WakeupRow, http_get};
use unidler_tests::{
    agent::{Agent, southbound_args},
    netns::{connect_in_background, echoes, in_netns, syn_backoff, tcp_echo_server},
    ovn_chassis::{BACKEND_V4, OvnNode},
    ovsdb_server::{Southbound, TempDir},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 9);
const PORT: u16 = 8080;
/// When the CMS adds the backend, after the client's first SYN (its next retransmission, on
/// the exponential schedule, is due at 3 s).
const BACKEND_AFTER: Duration = Duration::from_millis(1300);
/// How soon after the Northbound commit the client must be connected.
const WITHIN: Duration = Duration::from_millis(200);

#[test]
fn the_first_connection_succeeds_through_ovn_once_the_cms_adds_the_backend() {
    require_root();
    let mut node = OvnNode::start("oh");
    node.add_backend_pod();
    node.add_idle_load_balancer("web", &[format!("{VIP}:{PORT}")]);
    let backend_ns = node.backend_ns.clone().expect("a backend pod");
    let accepted = tcp_echo_server(&backend_ns, SocketAddr::new(BACKEND_V4.into(), PORT));
    syn_backoff(&node.client_ns, 0);

    let state = TempDir::new("ohstate");
    let sb = node.central.sb.unix_remote();
    let openflow = node.openflow_target();
    let mut agent = Agent::start(
        &node.node_ns,
        &[
            southbound_args(&node.node_if, &sb, state.path_str()),
            // ovs-vswitchd's userspace datapath reads the veth through AF_PACKET, before TC
            // ingress: here only XDP keeps the SYN from OVN.
            vec!["--hook", "xdp", "--openflow-bridge", &openflow],
        ]
        .concat(),
    );
    agent.wait_for_log("VIP map synced", Duration::from_secs(30));

    let vip = SocketAddr::new(VIP.into(), PORT);
    let client = connect_in_background(&node.client_ns, vip, Duration::from_secs(10));
    let started = Instant::now();

    // The CMS: reads the row, deletes it (as ovn-kubernetes does), scales the workload up.
    let deadline = started + Duration::from_secs(1);
    let event_row = loop {
        if let Some(row) = node.central.sb.event_rows().into_iter().next() {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "no Controller_Event row for the first SYN"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(event_row.event_info["vip"], format!("{VIP}:{PORT}"));
    std::thread::sleep(BACKEND_AFTER.saturating_sub(started.elapsed()));
    // Rows of the client's retransmission at 1 s, deleted as the CMS does.
    node.central
        .sb
        .sbctl(&["--all", "destroy", "Controller_Event"]);
    let consumed = started.elapsed();
    assert_eq!(
        node.packets_punted_for(VIP.into()),
        0,
        "while idle, every SYN was held by unidler, none punted by OVN"
    );
    node.central.nbctl(&[
        "set",
        "Load_Balancer",
        "web",
        &format!("vips:\"{VIP}:{PORT}\"=\"{BACKEND_V4}:{PORT}\""),
    ]);
    let committed = Instant::now();
    let backend = started.elapsed();

    let (connected, mut stream) = client.join().expect("client");
    assert!(echoes(&mut stream), "the backend answers");
    let after = connected.saturating_duration_since(committed);
    assert!(
        after < WITHIN,
        "connected {after:?} after the Northbound commit (limit {WITHIN:?}); agent log:\n{}",
        agent.log_lines().cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection");
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("connected {after:?} after the Northbound commit");
    let lb = &event_row.event_info["load_balancer"];
    the_wakeup_is_reported_phase_by_phase(&node.node_ns, lb, consumed, backend, &mut agent);
    assert_eq!(
        node.central.sb.event_rows(),
        Vec::new(),
        "no row for a service that is waking; the VIP's flows:\n{}",
        node.flows_matching(&format!("nw_dst={VIP},")).join("\n")
    );
}

/// The agent's account of the wake-up: one, connected, its phases in order, each at about
/// the time the test (as the CMS) saw it; its log line, and its metrics.
fn the_wakeup_is_reported_phase_by_phase(
    node_ns: &str,
    lb: &str,
    consumed: Duration,
    backend: Duration,
    agent: &mut Agent,
) {
    let get = |port: u16, path: &str| {
        in_netns(node_ns, || http_get(([127, 0, 0, 1], port).into(), path)).expect(path)
    };
    let api = |path: &str| get(9478, path);
    let rows: Vec<WakeupRow> = serde_json::from_str(&api("/api/wakeups")).unwrap();
    let [row] = rows.as_slice() else {
        panic!("one wake-up: {rows:#?}")
    };
    assert_eq!(row.vip, format!("{VIP}:{PORT}"));
    assert_eq!(row.protocol, "tcp");
    assert_eq!(
        row.load_balancer.as_deref(),
        Some(lb),
        "as its row names it"
    );
    assert_eq!(row.outcome.as_deref(), Some("connected"), "{row:#?}");
    assert_eq!(
        row.held, 1,
        "the first SYN; its retransmission repeats its flow"
    );
    assert!(row.replayed >= 1, "{row:#?}");
    let names: Vec<&str> = row.phases.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "committed",
            "consumed",
            "backend",
            "forwarding",
            "replayed",
            "finished"
        ],
        "{row:#?}"
    );
    let at = |phase: &str| {
        Duration::from_secs_f64(row.phases.iter().find(|(p, _)| p == phase).unwrap().1)
    };
    let times: Vec<Duration> = row
        .phases
        .iter()
        .map(|(_, s)| Duration::from_secs_f64(*s))
        .collect();
    assert!(times.is_sorted(), "phases in time order: {row:#?}");
    assert!(at("committed") < Duration::from_millis(500), "{row:#?}");
    // The test's clock starts a little after the client's first SYN.
    let near = |agent_saw: Duration, test_saw: Duration| {
        agent_saw + Duration::from_millis(100) >= test_saw
            && agent_saw <= test_saw + Duration::from_millis(700)
    };
    assert!(
        near(at("consumed"), consumed),
        "consumed at {consumed:?}: {row:#?}"
    );
    assert!(
        near(at("backend"), backend),
        "backend at {backend:?}: {row:#?}"
    );
    assert!(
        at("finished") < at("backend") + WITHIN + Duration::from_millis(300),
        "{row:#?}"
    );
    assert!(
        row.started.ends_with('Z') && row.started.len() == 24,
        "{}",
        row.started
    );
    agent.wait_for_log(
        &format!("wake-up of {VIP}:{PORT}/tcp ({lb}) connected: committed "),
        Duration::from_secs(1),
    );
    let metrics = get(9477, "/metrics");
    let sample = |series: &str| unidler_tests::prometheus::sample(&metrics, series);
    assert_eq!(
        sample(r#"unidler_wakeups_total{outcome="connected"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(r#"unidler_wakeups_total{outcome="expired"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(r#"unidler_wakeup_phase_seconds_count{phase="consumed"}"#),
        Some(1.0)
    );
    let events = api("/api/events");
    let events: Vec<unidler::telemetry::EventRow> = serde_json::from_str(&events).unwrap();
    assert!(
        !events.is_empty()
            && events
                .iter()
                .all(|e| e.wakeup.as_deref() == Some("connected")),
        "every hit of the wake-up shows what became of it: {events:#?}"
    );
}
