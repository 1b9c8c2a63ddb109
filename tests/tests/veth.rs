//! The real agent on a real veth pair between two namespaces, with real sockets.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use unidler::telemetry::http_get;
use unidler_tests::{
    agent::Agent,
    netns::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, Topology, send_frames, syn_to_server},
    require_root,
};

const QUIET: Duration = Duration::from_millis(700);

/// Starts the agent on the server end of `topo` with `extra` arguments; `mode` is an
/// `--xdp-mode` (native, generic), or `tc` or `auto` for `--hook`.
#[track_caller]
fn agent(topo: &Topology, mode: &str, extra: &[&str]) -> Agent {
    let flag = if matches!(mode, "tc" | "auto") {
        "--hook"
    } else {
        "--xdp-mode"
    };
    let mut args = vec!["run", "--iface", &topo.server_if, flag, mode];
    args.extend_from_slice(extra);
    Agent::start(&topo.server_ns, &args)
}

/// A TCP connect from the client namespace, from a known local address, with a timeout.
/// Returns the local address and whether the connection was established.
fn connect(topo: &Topology, from: IpAddr, to: SocketAddr, timeout: Duration) -> (SocketAddr, bool) {
    topo.in_client(|| {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        let ok = socket.connect_timeout(&to.into(), timeout).is_ok();
        if ok {
            let mut stream: TcpStream = socket.into();
            stream.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping", "echo from the server");
        }
        (local, ok)
    })
}

/// A TCP echo server in the server namespace on `addr`, answering in a background thread.
fn echo_server(topo: &Topology, addr: SocketAddr) -> TcpListener {
    let listener = topo.in_server(|| TcpListener::bind(addr).unwrap());
    let clone = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for stream in clone.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buf = [0u8; 4];
            if stream.read_exact(&mut buf).is_ok() {
                let _ = stream.write_all(&buf);
            }
        }
    });
    listener
}

#[track_caller]
fn assert_event(event: &Value, vip: &str, protocol: &str, src: SocketAddr, iface: &str) {
    assert_eq!(event["vip"], vip, "{event}");
    assert_eq!(event["protocol"], protocol, "{event}");
    assert_eq!(event["src"], src.to_string(), "{event}");
    assert_eq!(event["iface"], iface, "{event}");
    assert_eq!(event["action"], "dropped", "{event}");
}

fn idle_tcp_connect_yields_one_event_and_no_connection(mode: &str) {
    require_root();
    let topo = Topology::new("ut");
    let vip = SocketAddr::new(SERVER_V4.into(), 8080);
    // A listener on the idle VIP: only the XDP drop keeps the connection from succeeding.
    let _server = echo_server(&topo, vip);
    let mut agent = agent(&topo, mode, &["--vip", "10.77.0.2:8080/tcp"]);
    let (local, connected) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(600));
    assert!(
        !connected,
        "connection to an idle VIP must not be established"
    );
    let events = agent.events_until_quiet(QUIET, Duration::from_secs(3));
    assert_eq!(events.len(), 1, "exactly one event: {events:?}");
    assert_event(&events[0], "10.77.0.2:8080", "tcp", local, &topo.server_if);
}

#[test]
fn idle_tcp_connect_native_mode() {
    idle_tcp_connect_yields_one_event_and_no_connection("native");
}

#[test]
fn idle_tcp_connect_tc_hook() {
    idle_tcp_connect_yields_one_event_and_no_connection("tc");
}

/// On a veth, auto means TC (native XDP would turn the peer's segmentation offloads off).
#[test]
fn auto_puts_tc_on_a_veth() {
    require_root();
    let topo = Topology::new("ua");
    let mut agent = agent(&topo, "auto", &["--vip", "10.77.0.2:8080/tcp"]);
    let line = agent.wait_for_log("datapath attached", Duration::from_secs(5));
    assert!(
        line.contains("hook=\"tc\"") || line.contains("hook=tc"),
        "{line}"
    );
    assert!(topo.server_xdp().is_none(), "no XDP program on the veth");
    let (_, ok) = connect(
        &topo,
        CLIENT_V4.into(),
        SocketAddr::new(SERVER_V4.into(), 8080),
        Duration::from_millis(300),
    );
    assert!(!ok);
    assert!(agent.next_event(Duration::from_secs(5)).is_some());
}

#[test]
fn idle_tcp_connect_generic_mode() {
    idle_tcp_connect_yields_one_event_and_no_connection("generic");
}

#[test]
fn idle_tcp_connect_over_ipv6() {
    require_root();
    let topo = Topology::new("u6");
    let vip = SocketAddr::new(SERVER_V6.into(), 8443);
    let _server = echo_server(&topo, vip);
    let mut agent = agent(&topo, "native", &["--vip", "[fd77::2]:8443/tcp"]);
    let (local, connected) = connect(&topo, CLIENT_V6.into(), vip, Duration::from_millis(600));
    assert!(!connected);
    let events = agent.events_until_quiet(QUIET, Duration::from_secs(3));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_event(&events[0], "[fd77::2]:8443", "tcp", local, &topo.server_if);
}

#[test]
fn udp_datagram_to_idle_vip_is_reported_and_dropped() {
    require_root();
    let topo = Topology::new("uu");
    let vip = SocketAddr::new(SERVER_V4.into(), 5353);
    let server = topo.in_server(|| UdpSocket::bind(vip).unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut agent = agent(&topo, "native", &["--vip", "10.77.0.2:5353/udp"]);
    let local = topo.in_client(|| {
        let socket = UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0)).unwrap();
        socket.send_to(b"query", vip).unwrap();
        socket.local_addr().unwrap()
    });
    let events = agent.events_until_quiet(QUIET, Duration::from_secs(3));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_event(&events[0], "10.77.0.2:5353", "udp", local, &topo.server_if);
    let mut buf = [0u8; 16];
    assert!(
        server.recv_from(&mut buf).is_err(),
        "the datagram must have been dropped before the socket"
    );
}

#[test]
fn vip_with_backends_connects_without_event_and_other_traffic_flows() {
    require_root();
    let topo = Topology::new("ua");
    let active = SocketAddr::new(SERVER_V4.into(), 8080);
    let not_a_vip = SocketAddr::new(SERVER_V4.into(), 9090);
    let not_a_vip6 = SocketAddr::new(SERVER_V6.into(), 9090);
    let _a = echo_server(&topo, active);
    let _b = echo_server(&topo, not_a_vip);
    let _c = echo_server(&topo, not_a_vip6);
    let mut agent = agent(
        &topo,
        "native",
        &[
            "--vip",
            "10.77.0.2:8080/tcp=2",
            "--vip",
            "10.77.0.2:7070/tcp",
        ],
    );
    let timeout = Duration::from_secs(2);
    assert!(
        connect(&topo, CLIENT_V4.into(), active, timeout).1,
        "VIP with backends"
    );
    assert!(
        connect(&topo, CLIENT_V4.into(), not_a_vip, timeout).1,
        "non-VIP port"
    );
    assert!(
        connect(&topo, CLIENT_V6.into(), not_a_vip6, timeout).1,
        "non-VIP IPv6"
    );
    let events = agent.events_until_quiet(QUIET, QUIET);
    assert!(events.is_empty(), "no events: {events:?}");
}

#[test]
fn syn_flood_to_one_idle_vip_reaches_userspace_as_a_trickle() {
    require_root();
    let topo = Topology::new("uf");
    let (burst, rate) = (5u32, 2u32);
    let mut agent = agent(
        &topo,
        "native",
        &[
            "--vip",
            "10.77.0.2:8080/tcp",
            "--vip-event-burst",
            &burst.to_string(),
            "--vip-event-rate",
            &rate.to_string(),
        ],
    );
    let frames: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            // Spoofed sources, as a flood would have.
            let src = IpAddr::from([10, 77, 1 + (i / 250) as u8, (i % 250) as u8 + 1]);
            syn_to_server(src, 1024 + i as u16, 8080)
        })
        .collect();
    let started = Instant::now();
    let sent = topo.in_client(|| send_frames(&topo.client_if, frames));
    let elapsed = started.elapsed();
    assert_eq!(sent, 1000);
    let events = agent.events_until_quiet(QUIET, Duration::from_secs(3));
    let allowed = burst as usize + (elapsed.as_secs_f64() * rate as f64).ceil() as usize + 1;
    assert!(
        (burst as usize..=allowed).contains(&events.len()),
        "{} events for 1000 SYNs sent in {elapsed:?}; allowed {burst}..={allowed}",
        events.len()
    );
    assert!(events.iter().all(|e| e["vip"] == "10.77.0.2:8080"));
}

#[test]
fn sigterm_detaches_and_exits_cleanly() {
    require_root();
    let topo = Topology::new("us");
    let agent = agent(&topo, "native", &["--vip", "10.77.0.2:8080/tcp"]);
    assert!(topo.server_xdp().is_some(), "attached while running");
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("kernel counters (totals)"),
        "{}",
        exit.stderr
    );
    assert_eq!(topo.server_xdp(), None, "detached after exit");
}

#[test]
fn a_second_run_after_a_crash_starts_cleanly() {
    require_root();
    let topo = Topology::new("uk");
    let first = agent(&topo, "native", &["--vip", "10.77.0.2:8080/tcp"]);
    first.signal(libc::SIGKILL);
    let exit = first.wait(Duration::from_secs(10));
    assert_eq!(exit.code, None, "killed by a signal");
    // The attachment was a BPF link owned by the dead process: the kernel released it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while topo.server_xdp().is_some() {
        assert!(
            Instant::now() < deadline,
            "XDP still attached after the crash"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vip = SocketAddr::new(SERVER_V4.into(), 8080);
    let _server = echo_server(&topo, vip);
    let mut second = agent(&topo, "native", &["--vip", "10.77.0.2:8080/tcp"]);
    let (_, connected) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(600));
    assert!(!connected);
    assert_eq!(
        second
            .events_until_quiet(QUIET, Duration::from_secs(3))
            .len(),
        1
    );
}

/// A second agent on the interface the first one is on (both with `mode`, as [`agent`]
/// takes it) exits with a message containing `refusal`.
#[track_caller]
fn a_second_agent_is_refused(prefix: &str, mode: &str, refusal: &str) {
    require_root();
    let topo = Topology::new(prefix);
    let _first = agent(&topo, mode, &["--vip", "10.77.0.2:8080/tcp"]);
    let flag = if mode == "tc" { "--hook" } else { "--xdp-mode" };
    let exit = Agent::run_to_exit(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vip",
            "10.77.0.2:8080/tcp",
            flag,
            mode,
            // Its own endpoints, so that the refusal is about the interface.
            "--metrics-addr",
            "127.0.0.1:9479",
            "--api-addr",
            "127.0.0.1:9480",
        ],
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(exit.stderr.contains(refusal), "{}", exit.stderr);
}

#[test]
fn a_second_agent_on_the_same_interface_is_refused_clearly() {
    a_second_agent_is_refused("ub", "native", "already has an XDP program");
}

/// With the TC hook, which takes several programs, a second agent is refused too: it would
/// report every hit twice.
#[test]
fn a_second_agent_with_the_tc_hook_is_refused_clearly() {
    a_second_agent_is_refused("u2", "tc", "another unidler is running on it");
}

/// The interface is deleted and made again under the same name (as a pod's veth is): its
/// attachment died with the old ifindex, so the agent attaches again and keeps catching
/// idle hits; while the interface is gone, /readyz says so.
#[test]
fn an_interface_re_created_under_its_name_is_attached_again() {
    require_root();
    let topo = Topology::new("vr");
    let vip = SocketAddr::new(SERVER_V4.into(), 8080);
    let _server = echo_server(&topo, vip);
    let mut agent = agent(&topo, "native", &["--vip", "10.77.0.2:8080/tcp"]);
    let (_, ok) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(300));
    assert!(!ok);
    assert!(
        agent.next_event(Duration::from_secs(5)).is_some(),
        "first event"
    );

    topo.delete_link();
    let readyz = || {
        topo.in_server(|| http_get("127.0.0.1:9477".parse().unwrap(), "/readyz"))
            .map_err(|e| e.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match readyz() {
            Err(e) if e.contains(&format!("not attached to {}", topo.server_if)) => break,
            other => assert!(Instant::now() < deadline, "/readyz: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    topo.recreate_link();
    agent.wait_for_log("XDP program attached again", Duration::from_secs(5));
    assert!(topo.server_xdp().is_some(), "program on the new interface");
    let (src, ok) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(300));
    assert!(!ok, "still dropped after the re-creation");
    let event = agent
        .next_event(Duration::from_secs(5))
        .expect("an event from the new interface");
    assert_event(&event, "10.77.0.2:8080", "tcp", src, &topo.server_if);
    assert_eq!(readyz().unwrap(), "ready\n");
}

/// `--iface` with a pattern follows the interfaces that match as they come and go (as pods'
/// veths do); one that refuses the program is logged and counted, and the agent goes on.
#[test]
fn interfaces_matching_a_pattern_are_followed_as_they_come_and_go() {
    require_root();
    let topo = Topology::new("vp");
    // New interfaces in the agent's namespace, named after the topology's tag.
    let base = topo.server_if.trim_end_matches('s').to_owned();
    let (first, first_peer) = (format!("{base}p1a"), format!("{base}p1b"));
    let refusing = format!("{base}p2a");
    let pattern = format!("{base}p*a");
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(["-n", &topo.server_ns])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    let mut agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            // Attachments to followed interfaces are logged at debug.
            "--log-level",
            "info,unidler=debug",
            "--iface",
            &pattern,
            "--xdp-mode",
            "native",
            "--vip",
            "10.77.0.2:8080/tcp",
        ],
    );

    // A veth pair appears: the matching end gets the program and catches an idle hit.
    ip(&[
        "link",
        "add",
        &first,
        "type",
        "veth",
        "peer",
        "name",
        &first_peer,
    ]);
    let created = std::time::Instant::now();
    ip(&["link", "set", &first, "up"]);
    ip(&["link", "set", &first_peer, "up"]);
    let line = agent.wait_for_log("followed interface", Duration::from_secs(5));
    assert!(line.contains(&first), "{line}");
    // A link notification, not the (10 s) safety-net timer, brought it in.
    let took = created.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "covered {took:?} after it appeared"
    );
    let syn = syn_to_server(CLIENT_V4.into(), 40000, 8080);
    topo.in_server(|| send_frames(&first_peer, [syn]));
    let event = agent
        .next_event(Duration::from_secs(5))
        .expect("an idle hit from the followed interface");
    assert_eq!(event["iface"], first.as_str());

    // A matching interface whose driver has no native XDP (a bridge): refused, counted.
    ip(&["link", "add", &refusing, "type", "bridge"]);
    agent.wait_for_log("could not be attached", Duration::from_secs(5));
    let metrics = topo
        .in_server(|| http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
        .unwrap();
    assert!(
        metrics.contains("unidler_attachments{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("unidler_attachments{state=\"attached\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("unidler_attach_failures_total 1"),
        "{metrics}"
    );

    // The veth goes: detached, nothing missing.
    ip(&["link", "del", &first]);
    agent.wait_for_log("interface gone: detached", Duration::from_secs(5));
    assert!(agent.is_running());
}

/// The TC hook after a crash: on kernels with TCX the link goes with the dead agent; before
/// TCX a clsact filter does not, and the next agent takes its place. Either way one program
/// judges each packet (one event, not two), and once that agent stops cleanly nothing is
/// left dropping.
#[test]
fn a_tc_attachment_left_by_a_crash_is_taken_over() {
    require_root();
    let topo = Topology::new("uc");
    let first = agent(&topo, "tc", &["--vip", "10.77.0.2:8080/tcp"]);
    first.signal(libc::SIGKILL);
    let exit = first.wait(Duration::from_secs(10));
    assert_eq!(exit.code, None, "killed by a signal");
    let vip = SocketAddr::new(SERVER_V4.into(), 8080);
    let _server = echo_server(&topo, vip);
    let mut second = agent(&topo, "tc", &["--vip", "10.77.0.2:8080/tcp"]);
    let (_, connected) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(600));
    assert!(!connected, "the idle VIP is dropped");
    assert_eq!(
        second
            .events_until_quiet(QUIET, Duration::from_secs(3))
            .len(),
        1,
        "one program judges the packet"
    );
    second.signal(libc::SIGTERM);
    let exit = second.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    let (_, connected) = connect(&topo, CLIENT_V4.into(), vip, Duration::from_millis(600));
    assert!(connected, "nothing is left dropping after a clean stop");
}
