//! Metrics, health, readiness and the inspection commands, scraped during real traffic.

#[path = "../monitoring/mod.rs"]
mod monitoring;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use unidler::{datapath::KernelFeatures, telemetry::http_get};
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
    unidler_tests::prometheus::sample(metrics, series)
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
    let mut agent = Agent::start(&topo.server_ns, &args);
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
    // What the process is and how it does; the states an alert watches; every labelled
    // series there from the start, at 0.
    assert_eq!(
        sample(
            &m,
            &format!(
                "unidler_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(sample(&m, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&m, "process_open_fds") > 5.0);
    assert!(sample(&m, "process_cpu_seconds_total") > 0.0);
    assert!(sample(&m, "process_start_time_seconds") > 1.7e9);
    assert_eq!(sample(&m, "unidler_fail_open"), 0.0);
    assert_eq!(sample(&m, "unidler_vip_source_synced"), 1.0);
    assert_eq!(sample(&m, "unidler_ovsdb_connect_failures_total"), 0.0);
    assert_eq!(sample(&m, "unidler_attachments{state=\"failed\"}"), 0.0);
    assert_eq!(sample(&m, "unidler_vips{state=\"not_watched\"}"), 0.0);
    for outcome in ["expired", "abandoned", "replay_failed", "over_limit_total"] {
        sample(
            &m,
            &format!("unidler_hold_packets_total{{outcome=\"{outcome}\"}}"),
        );
    }
    for outcome in ["connected", "delivered", "abandoned", "expired", "not_held"] {
        assert_eq!(
            sample(
                &m,
                &format!("unidler_wakeups_total{{outcome=\"{outcome}\"}}")
            ),
            0.0
        );
    }
    assert_eq!(
        sample(
            &m,
            "unidler_wakeup_phase_seconds_count{phase=\"committed\"}"
        ),
        1.0,
        "the idle hit's wake-up goes on, its row committed"
    );
    // The OpenMetrics body says so.
    let head = topo.in_server(|| {
        use std::io::{Read as _, Write as _};
        let mut stream = TcpStream::connect(ADDR).unwrap();
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.split("\r\n\r\n").next().unwrap().to_lowercase()
    });
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(m.trim_end().ends_with("# EOF"));
    // Every series the shipped alerts and dashboard select is in this scrape, with the label
    // values they ask for.
    for (used_in, (name, labels)) in monitoring::series_used() {
        let present = m.lines().any(|l| {
            l.strip_prefix(name.as_str()).is_some_and(|rest| {
                (rest.starts_with(' ') && labels.is_empty())
                    || (rest.starts_with('{')
                        && labels
                            .iter()
                            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            })
        });
        assert!(
            present,
            "{used_in} selects {name}{labels:?}, which /metrics lacks"
        );
    }

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
    // The interfaces and their hook: TC on this veth (auto); no scope (VIPs not from OVN).
    let interfaces = in_ns(&topo, &["interfaces"]);
    let row: Vec<&str> = interfaces
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        row.len() == 6
            && row[0] == topo.server_if
            && row[2] == "tc"
            && row[3] == "-"
            && row[4..]
                == match KernelFeatures::probe().expect("probing the kernel").tcx {
                    true => ["tcx", "link"],
                    false => ["clsact", "filter"],
                },
        "{interfaces}"
    );

    // The wake-up as `unidler wakeups` shows it: going on, its row committed.
    let wakeups = in_ns(&topo, &["wakeups"]);
    let line = wakeups
        .lines()
        .find(|l| l.contains("10.77.0.2:80 "))
        .unwrap_or_else(|| panic!("{wakeups}"));
    assert!(line.contains("waking") && line.contains(LB), "{wakeups}");
    assert!(
        events.lines().nth(1).is_some_and(|l| l.contains("waking")
            && l.starts_with(&unidler::clock::rfc3339(std::time::SystemTime::now())[..11])),
        "wall-clock time and the wake-up's state: {events}"
    );

    // Database gone: not ready, and says why; the failures to reconnect are warned about and
    // counted.
    sb.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(&topo, "/readyz") {
            Err(e) if e.contains("503") => break,
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.wait_for_log("cannot connect to the database", Duration::from_secs(10));
    let m = get(&topo, "/metrics").unwrap();
    assert_eq!(sample(&m, "unidler_ovsdb_reconnects_total"), 1.0);
    assert!(sample(&m, "unidler_ovsdb_connect_failures_total") >= 1.0);
    assert_eq!(sample(&m, "unidler_ovsdb_connected"), 0.0);
    drop(agent);
}

/// An agent whose program is on no interface (a pattern that matches none) is alive but not
/// ready, and says why (it used to report ready).
#[test]
fn readiness_needs_an_interface_with_the_program() {
    require_root();
    let topo = Topology::new("tz");
    let mut agent = Agent::start(
        &topo.server_ns,
        &["run", "--iface", "nosuch*", "--vip", "10.77.0.2:80/tcp"],
    );
    assert_eq!(get(&topo, "/healthz").unwrap(), "ok\n");
    let readyz = get(&topo, "/readyz").unwrap_err();
    assert!(
        readyz.contains("503") && readyz.contains("on no interface"),
        "{readyz}"
    );
    // An interface that matches arrives: ready.
    // In the test's own namespace: gone with it.
    unidler_tests::netns::veth_in(&topo.server_ns, "nosuch0", "other0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&topo, "/readyz").is_err() {
        assert!(
            Instant::now() < deadline,
            "{:?}; {:?}",
            get(&topo, "/readyz"),
            agent.log_lines().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// More VIPs than the VIP map holds: the agent keeps running with what fits (it used to exit,
/// so every node crash-looped), and says so in the log, the metrics and /readyz.
#[test]
fn vips_beyond_the_map_capacity_are_reported_not_fatal() {
    require_root();
    let topo = Topology::new("tf");
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--max-vips",
        "2",
        "--vip",
        "10.77.0.2:80/tcp",
        "--vip",
        "10.77.0.2:81/tcp",
        "--vip",
        "10.77.0.2:82/tcp",
    ];
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("raise --max-vips", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        match get(&topo, "/readyz") {
            Err(e) if e.contains("do not fit") => break e,
            other => assert!(
                Instant::now() < deadline,
                "/readyz should name the overflow: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ready.contains("1 VIPs"), "{ready}");
    let m = get(&topo, "/metrics").unwrap();
    assert_eq!(sample(&m, "unidler_vips{state=\"not_watched\"}"), 1.0);
    assert_eq!(sample(&m, "unidler_vips{state=\"idle\"}"), 2.0);
    // The two that fit are watched: a connection attempt to each is dropped and reported.
    let attempts = [80u16, 81, 82].map(|port| {
        topo.in_client(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(SERVER_V4.into(), port),
                Duration::from_millis(300),
            )
        })
    });
    assert!(attempts.iter().all(Result::is_err), "nothing listens there");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &get(&topo, "/metrics").unwrap(),
        "unidler_kernel_idle_hits_total",
    ) < 2.0
    {
        assert!(Instant::now() < deadline, "two idle hits expected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.is_running(), "the agent keeps running");
}

/// A first monitor reply larger than the message limit: said at warn with the limit, the
/// agent keeps running (not ready), and it asks again only after the longest backoff rather
/// than re-downloading every few seconds.
#[test]
fn an_oversized_monitor_reply_is_reported_and_retried_slowly() {
    require_root();
    let topo = Topology::new("to");
    let sb = ovsdb_server::southbound_with_chassis();
    for i in 0..5 {
        sb.sbctl(&[
            "create",
            "Load_Balancer",
            &format!("name=lb{i}"),
            "protocol=tcp",
            &format!("vips:\"10.96.0.{i}:80\"=\"\""),
            "options:event=true",
        ]);
    }
    let state = TempDir::new("tostate");
    let db = sb.unix_remote();
    let mut args = southbound_args(&topo.server_if, &db, state.path_str());
    args.extend(["--ovsdb-max-message-size", "300"]);
    let mut agent = Agent::start(&topo.server_ns, &args);
    let line = agent.wait_for_log("exceeds 300 bytes", Duration::from_secs(10));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("message size limit"), "{line}");
    let ready = get(&topo, "/readyz").unwrap_err();
    assert!(
        ready.contains("Southbound database not connected"),
        "{ready}"
    );
    // Within the next 5 s (shorter than the 8 s backoff), no second attempt.
    std::thread::sleep(Duration::from_secs(5));
    let attempts = agent
        .log_lines()
        .filter(|l| l.contains("exceeds 300 bytes"))
        .count();
    assert_eq!(attempts, 1, "retried too soon");
    assert!(agent.is_running());
}

/// An agent on `topo`'s server end with one idle VIP, once its health endpoint answers.
fn agent_serving_health(topo: &Topology) -> Agent {
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--vip",
        "10.77.0.2:80/tcp",
    ];
    let agent = Agent::start(&topo.server_ns, &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(topo, "/healthz").is_err() {
        assert!(Instant::now() < deadline, "no /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// The inspection API is not on the metrics endpoint (the DaemonSet puts that on the node's
/// address), and slow or silent clients cannot hold the endpoint: their connections are
/// closed after the header timeout, and beyond the connection caps others are closed at once.
#[test]
fn endpoints_split_cap_connections_and_time_out_silent_clients() {
    use std::io::Read as _;
    require_root();
    let topo = Topology::new("th");
    let _agent = agent_serving_health(&topo);
    let not_here = get(&topo, "/api/vips").unwrap_err();
    assert!(not_here.contains("404"), "{not_here}");
    let api = topo
        .in_server(|| http_get("127.0.0.1:9478".parse().unwrap(), "/api/vips"))
        .unwrap();
    assert!(api.contains("10.77.0.2:80"), "{api}");

    // 64 clients connect and never send a byte: twice the cap.
    let silent: Vec<TcpStream> =
        topo.in_server(|| (0..64).map(|_| TcpStream::connect(ADDR).unwrap()).collect());
    let started = Instant::now();
    assert_eq!(get(&topo, "/healthz").unwrap(), "ok\n");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "/healthz waited {waited:?} behind silent clients"
    );
    // Each silent connection is closed by the agent, not kept forever.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 1];
        let kept = matches!(s.read(&mut buf), Err(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(!kept, "a silent connection was kept open");
    }
}

/// A GET of `path` on the health endpoint within `timeout` (as the kubelet's probe, 1 s), on
/// a connection of its own.
fn probe(topo: &Topology, path: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    topo.in_server(|| {
        let addr: SocketAddr = ADDR.parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok(body)
    })
}

/// Probes answer whatever other clients do: 40 keep-alive connections that stay open after
/// their answer and 40 that never send a byte (any pod can open them where the endpoint is
/// on the node's address) do not make the kubelet's 1 s probe fail, which would restart the
/// agent.
#[test]
fn probes_answer_while_idle_connections_hold_the_endpoint() {
    use std::io::{Read as _, Write as _};
    require_root();
    let topo = Topology::new("tp");
    let _agent = agent_serving_health(&topo);
    let held: Vec<TcpStream> = topo.in_server(|| {
        let mut held = Vec::new();
        for _ in 0..40 {
            let mut s = TcpStream::connect(ADDR).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: idle\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            held.push(s);
        }
        for _ in 0..40 {
            held.push(TcpStream::connect(ADDR).unwrap());
        }
        held
    });
    let mut failed = Vec::new();
    for _ in 0..10 {
        match probe(&topo, "/healthz", Duration::from_secs(1)) {
            Ok(body) if body.ends_with("ok\n") => {}
            other => failed.push(other),
        }
    }
    assert!(failed.is_empty(), "probes failed: {failed:?}");
    drop(held);
}
