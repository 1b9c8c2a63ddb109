//! Metrics, health, readiness and the inspection commands, scraped during real traffic.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use unidler::telemetry::http_get;
use unidler_tests::{
    agent::{Agent, agent_binary, southbound_args},
    netns::{SERVER_V4, Topology},
    ovsdb_server::{self, Southbound, TempDir},
    require_root,
};

const LB: &str = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";
const ADDR: &str = "127.0.0.1:9477";

fn get(topo: &Topology, path: &str) -> Result<String, String> {
    topo.in_server(|| http_get(ADDR.parse().unwrap(), path).map_err(|e| e.to_string()))
}

/// The value of one sample line `name{labels} value` in Prometheus text.
#[track_caller]
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

fn in_ns(topo: &Topology, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.server_ns])
        .arg(agent_binary())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metrics_health_and_inspection_during_real_traffic() {
    require_root();
    let topo = Topology::new("tm");
    let mut sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("tstate");
    let db = sb.unix_remote();
    let idle = format!("10.77.0.2:80/tcp@{LB}");
    let mut args = southbound_args(&topo.server_if, &db, state.path_str());
    args.extend(["--vip", &idle, "--vip", "10.77.0.2:81/tcp=2"]);
    let agent = Agent::start(&topo.server_ns, &args);
    assert_eq!(get(&topo, "/healthz").unwrap(), "ok\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&topo, "/readyz").is_err() {
        assert!(
            Instant::now() < deadline,
            "never ready: {:?}",
            get(&topo, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Traffic: one idle hit, one connection to the active VIP.
    let server =
        topo.in_server(|| TcpListener::bind(SocketAddr::new(SERVER_V4.into(), 81)).unwrap());
    let connect = |port| {
        topo.in_client(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(SERVER_V4.into(), port),
                Duration::from_millis(500),
            )
            .is_ok()
        })
    };
    assert!(!connect(80));
    assert!(connect(81));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.event_rows().is_empty() {
        assert!(Instant::now() < deadline, "no row");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    drop(server);

    let m = get(&topo, "/metrics").unwrap();
    assert_eq!(sample(&m, "unidler_kernel_idle_hits_total"), 1.0);
    assert_eq!(sample(&m, "unidler_kernel_vip_hits_total"), 2.0);
    assert_eq!(
        sample(&m, "unidler_kernel_packets_total{verdict=\"drop\"}"),
        1.0
    );
    assert!(sample(&m, "unidler_kernel_packets_total{verdict=\"pass\"}") >= 3.0);
    assert_eq!(sample(&m, "unidler_kernel_events_written_total"), 1.0);
    assert_eq!(sample(&m, "unidler_events_total{stage=\"received\"}"), 1.0);
    assert_eq!(sample(&m, "unidler_events_total{stage=\"written\"}"), 1.0);
    assert_eq!(sample(&m, "unidler_vips{state=\"idle\"}"), 1.0);
    assert_eq!(sample(&m, "unidler_vips{state=\"active\"}"), 1.0);
    assert_eq!(sample(&m, "unidler_ovsdb_connected"), 1.0);
    assert_eq!(sample(&m, "unidler_event_queue_depth"), 0.0);
    assert_eq!(sample(&m, "unidler_event_latency_seconds_count"), 1.0);
    assert_eq!(
        sample(&m, "unidler_ovsdb_transaction_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "unidler_kernel_parse_failures_total{reason=\"truncated_l4\"}"
        ),
        0.0
    );

    // The inspection commands, as an operator runs them on the node.
    let table = in_ns(&topo, &["vips"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("VIP") && lines[0].contains("HITS"),
        "{table}"
    );
    let idle_line = lines
        .iter()
        .find(|l| l.starts_with("10.77.0.2:80 "))
        .expect(&table);
    assert!(
        idle_line.contains("idle") && idle_line.contains(LB),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&in_ns(&topo, &["vips", "--json"])).unwrap();
    let active = json
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == "10.77.0.2:81")
        .unwrap();
    assert_eq!(
        (active["state"].as_str(), active["hits"].as_u64()),
        (Some("active"), Some(1))
    );
    let events = in_ns(&topo, &["events"]);
    assert!(
        events
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("10.77.0.2:80") && l.contains("dropped")),
        "{events}"
    );

    // Database gone: not ready, and says why.
    sb.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(&topo, "/readyz") {
            Err(e) if e.contains("503") => break,
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
}
