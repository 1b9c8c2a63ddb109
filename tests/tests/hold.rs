//! Held packets: the client's first connection attempt to an idle VIP is held by the agent and
//! replayed into the server's stack once the VIP has a backend, so it succeeds then, not at the
//! client's next SYN retransmission. Through a real veth pair, with the default hook (TC).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use unidler::telemetry::http_get;
use unidler_tests::{
    agent::Agent,
    eventually,
    netns::{
        CLIENT_V4, SERVER_V4, SERVER_V6, Topology, connect_in_background, echoes, send_frames,
    },
    require_root,
    vips_file::VipsFile,
};

const METRICS: &str = "127.0.0.1:9477";
/// When the backend appears after the client's first SYN (the example: between the
/// client's first retransmissions with either backoff schedule).
const BACKEND_AFTER: Duration = Duration::from_millis(1300);
/// How soon after the backend the client must be connected.
const WITHIN: Duration = Duration::from_millis(100);

/// Starts the agent on the server's veth end with `vips` and extra arguments.
#[track_caller]
fn agent(topo: &Topology, vips: &VipsFile, extra: &[&str]) -> Agent {
    let path = vips.path_string();
    let mut args = vec![
        "run",
        "--iface",
        &topo.server_if,
        "--vips-file",
        &path,
        "--summary-interval",
        "0",
    ];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("holding opening packets", Duration::from_secs(5));
    agent
}

/// Gives the VIP a backend (file rewritten, SIGHUP for an immediate reload); returns when.
fn backend_appears(agent: &Agent, vips: &VipsFile) -> Instant {
    vips.set_backends(1);
    let at = Instant::now();
    agent.signal(libc::SIGHUP);
    at
}

/// The client's SYN retransmissions back off exponentially (1, 3, 7 s after the first SYN),
/// as on the RHEL kernels most clusters run.
fn exponential_syn_backoff(topo: &Topology) {
    unidler_tests::netns::syn_backoff(&topo.client_ns, 0);
}

fn metrics(topo: &Topology) -> String {
    topo.in_server(|| http_get(METRICS.parse().unwrap(), "/metrics").unwrap())
}

/// The value of the sample `series` (name and labels) in Prometheus text, 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    unidler_tests::prometheus::sample(metrics, series).unwrap_or(0.0)
}

fn hold_count(topo: &Topology, outcome: &str) -> f64 {
    sample(
        &metrics(topo),
        &format!("unidler_hold_packets_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A TCP echo listener on the server at `addr`, counting the connections it accepts.
fn echo_server(topo: &Topology, addr: SocketAddr) -> Arc<AtomicUsize> {
    unidler_tests::netns::tcp_echo_server(&topo.server_ns, addr)
}

/// The client connects to `vip` (one `connect` call, the kernel's own SYN retransmissions)
/// while the VIP is idle; its backend appears `BACKEND_AFTER` later. The connection must be
/// established within `WITHIN` of that, and carry data.
#[track_caller]
fn first_connect_succeeds(ip: IpAddr, tag: &str) {
    let topo = Topology::new(tag);
    exponential_syn_backoff(&topo);
    let vip = SocketAddr::new(ip, 8080);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let accepted = echo_server(&topo, vip);
    let agent = agent(&topo, &vips, &[]);

    let client = connect_in_background(&topo.client_ns, vip, Duration::from_secs(10));
    std::thread::sleep(BACKEND_AFTER);
    assert_eq!(hold_count(&topo, "held"), 1.0, "the first SYN is held");
    // `unidler vips` shows it beside its VIP.
    let table =
        topo.in_server(|| http_get("127.0.0.1:9478".parse().unwrap(), "/api/vips").unwrap());
    let rows: Vec<serde_json::Value> = serde_json::from_str(&table).unwrap();
    assert_eq!(rows[0]["held"], 1, "{table}");
    let backend = backend_appears(&agent, &vips);
    let (connected, mut stream) = client.join().expect("client");
    assert!(echoes(&mut stream), "the connection carries data");
    let after = connected.saturating_duration_since(backend);
    // Under emulation (the kernel matrix) everything is slower, this too.
    let within = unidler_tests::scaled(WITHIN);
    assert!(
        after < within,
        "{ip}: connected {after:?} after the backend appeared (limit {within:?}); the next SYN \
         retransmission was due 1.7 s after it"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection");
    eventually("the replay answered", Duration::from_secs(3), || {
        hold_count(&topo, "answered") == 1.0
    });
    let m = metrics(&topo);
    assert_eq!(sample(&m, "unidler_held_packets"), 0.0);
    assert_eq!(
        sample(
            &m,
            "unidler_kernel_not_held_total{reason=\"retransmission\"}"
        ),
        1.0,
        "the retransmission 1 s after the first SYN is not held twice, nor copied"
    );
    assert_eq!(sample(&m, "unidler_kernel_held_total"), 1.0);
}

#[test]
fn the_first_tcp_connect_succeeds_as_soon_as_the_backend_appears_ipv4() {
    require_root();
    first_connect_succeeds(SERVER_V4.into(), "hold4");
}

#[test]
fn the_first_tcp_connect_succeeds_as_soon_as_the_backend_appears_ipv6() {
    require_root();
    first_connect_succeeds(SERVER_V6.into(), "hold6");
}

#[test]
fn one_udp_datagram_is_answered_exactly_once() {
    require_root();
    let topo = Topology::new("holdu");
    let vip = SocketAddr::new(SERVER_V4.into(), 5353);
    let vips = VipsFile::new(&vip.to_string(), "udp");
    let server = topo.in_server(|| UdpSocket::bind(vip).unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                received.fetch_add(1, Ordering::SeqCst);
                let _ = server.send_to(&buf[..n], from);
            }
        });
    }
    let agent = agent(&topo, &vips, &[]);
    let client = {
        let ns = topo.client_ns.clone();
        std::thread::spawn(move || {
            unidler_tests::netns::in_netns(&ns, || {
                let socket = UdpSocket::bind((CLIENT_V4, 0)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                // A 512-byte query, sent once, as a DNS client's first try.
                socket.send_to(&[7u8; 512], vip).unwrap();
                let mut buf = [0u8; 1500];
                let (n, _) = socket.recv_from(&mut buf).expect("answered");
                assert_eq!(n, 512);
                Instant::now()
            })
        })
    };
    std::thread::sleep(BACKEND_AFTER);
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "nothing reached the server while idle"
    );
    let backend = backend_appears(&agent, &vips);
    let answered = client.join().expect("client");
    let after = answered.saturating_duration_since(backend);
    assert!(
        after < unidler_tests::scaled(WITHIN),
        "answered {after:?} after the backend appeared"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(received.load(Ordering::SeqCst), 1, "delivered exactly once");
    assert_eq!(hold_count(&topo, "replayed"), 1.0);
}

/// 100,000 spoofed SYNs while the VIP is idle: the agent holds at most its limits, and, once
/// the backend appears, replays at most that many flows; its memory stays bounded.
#[test]
fn a_syn_flood_while_idle_is_held_within_the_limits() {
    require_root();
    let topo = Topology::new("holdf");
    let vip = SocketAddr::new(SERVER_V4.into(), 8081);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let _listener = echo_server(&topo, vip);
    let agent = agent(
        &topo,
        &vips,
        &[
            "--hold-per-vip",
            "64",
            "--hold-total",
            "100",
            "--hold-max-age",
            "5",
        ],
    );
    let frames = (0..100_000u32).map(|i| {
        let src = IpAddr::from([10, 78 + (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        unidler_tests::netns::syn_to_server(src, 1024 + (i % 60_000) as u16, 8081)
    });
    let sent = topo.in_client(|| send_frames(&topo.client_if, frames));
    assert_eq!(sent, 100_000);
    eventually("the flood seen and held", Duration::from_secs(10), || {
        let m = metrics(&topo);
        sample(&m, "unidler_kernel_idle_hits_total") >= 100_000.0
            && sample(&m, "unidler_held_packets") == 64.0
    });
    let m = metrics(&topo);
    assert_eq!(
        sample(&m, "unidler_hold_packets_total{outcome=\"held\"}"),
        64.0,
        "held up to the VIP's limit"
    );
    // The limit is the kernel's: it hands the agent only what the agent keeps, so a flood
    // costs the agent 64 reads, not 100,000.
    assert_eq!(
        sample(&m, "unidler_kernel_held_total"),
        64.0,
        "the kernel copied only what is kept"
    );
    assert_eq!(
        sample(
            &m,
            "unidler_kernel_not_held_total{reason=\"over_limit_vip\"}"
        ),
        100_000.0 - 64.0
    );
    assert_eq!(
        sample(&m, "unidler_hold_packets_total{outcome=\"over_limit_vip\"}"),
        0.0,
        "nothing for the agent to refuse"
    );
    let rss_kb = rss_kb(agent.pid());
    assert!(rss_kb < 100_000, "agent RSS {rss_kb} kB after the flood");

    backend_appears(&agent, &vips);
    // Spoofed clients never answer: each flow is replayed with backoff, at most
    // MAX_REPLAYS_PER_FLOW times, then given up.
    eventually("held packets given up", Duration::from_secs(10), || {
        sample(&metrics(&topo), "unidler_held_packets") == 0.0
    });
    let m = metrics(&topo);
    assert_eq!(
        sample(&m, "unidler_hold_packets_total{outcome=\"abandoned\"}")
            + sample(&m, "unidler_hold_packets_total{outcome=\"expired\"}"),
        64.0
    );
    let replays = sample(&m, "unidler_hold_packets_total{outcome=\"replayed\"}");
    let most = 64.0 * f64::from(unidler::hold::MAX_REPLAYS_PER_FLOW);
    assert!(
        (64.0..=most).contains(&replays),
        "{replays} replays of 64 flows (at most {most})"
    );
}

/// The limits are the kernel's: per VIP, in total, and one packet per flow. What the agent
/// lets go (a replay answered) the kernel may hold again.
#[test]
fn the_kernel_hands_the_agent_only_what_it_keeps() {
    require_root();
    let topo = Topology::new("holdk");
    let vips = VipsFile::new(&SocketAddr::new(SERVER_V4.into(), 8084).to_string(), "tcp");
    let both = |backends_8084: u32| {
        format!(
            "[[vip]]\nvip = \"{SERVER_V4}:8084\"\nprotocol = \"tcp\"\nbackends = \
             {backends_8084}\n[[vip]]\nvip = \"{SERVER_V4}:8085\"\nprotocol = \"tcp\"\n\
             backends = 0\n"
        )
    };
    vips.replace(&both(0));
    let _listener = echo_server(&topo, SocketAddr::new(SERVER_V4.into(), 8084));
    let agent = agent(&topo, &vips, &["--hold-per-vip", "3", "--hold-total", "5"]);
    let kernel = |reason: &str| {
        sample(
            &metrics(&topo),
            &format!("unidler_kernel_not_held_total{{reason=\"{reason}\"}}"),
        )
    };
    // Five flows to 8084, each sent twice: three held, their copies retransmissions; two
    // over the VIP's limit, twice each.
    for _ in 0..2 {
        for sport in 41001..41006 {
            one_syn(&topo, sport, 8084);
        }
    }
    // Five flows to 8085: two fit in the total, three do not.
    for sport in 41011..41016 {
        one_syn(&topo, sport, 8085);
    }
    eventually("five held", Duration::from_secs(3), || {
        sample(&metrics(&topo), "unidler_held_packets") == 5.0
    });
    assert_eq!(kernel("retransmission"), 3.0);
    assert_eq!(kernel("over_limit_vip"), 4.0);
    assert_eq!(kernel("over_limit_total"), 3.0);
    let m = metrics(&topo);
    assert_eq!(sample(&m, "unidler_kernel_held_total"), 5.0);
    for outcome in ["retransmission", "over_limit_vip", "over_limit_total"] {
        assert_eq!(
            sample(
                &m,
                &format!("unidler_hold_packets_total{{outcome=\"{outcome}\"}}")
            ),
            0.0,
            "the agent refused nothing: {outcome}"
        );
    }

    // 8084 gets a backend: its three SYNs are replayed and answered (the client's kernel
    // resets the unknown connection). Their room in the total is free again.
    vips.replace(&both(1));
    agent.signal(libc::SIGHUP);
    eventually("8084's packets let go", Duration::from_secs(5), || {
        sample(&metrics(&topo), "unidler_held_packets") == 2.0
    });
    one_syn(&topo, 41016, 8085);
    eventually("8085 holds a third", Duration::from_secs(3), || {
        sample(&metrics(&topo), "unidler_held_packets") == 3.0
    });
    // And a flow that was let go is held again when it comes back.
    vips.replace(&both(0));
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    one_syn(&topo, 41001, 8084);
    eventually("a flow let go is held anew", Duration::from_secs(3), || {
        sample(&metrics(&topo), "unidler_held_packets") == 4.0
    });
    assert_eq!(sample(&metrics(&topo), "unidler_kernel_held_total"), 7.0);
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// One SYN frame from the client to the VIP, as the client's kernel would send it.
fn one_syn(topo: &Topology, sport: u16, dport: u16) {
    let frame = unidler_tests::netns::syn_to_server(CLIENT_V4.into(), sport, dport);
    topo.in_client(|| send_frames(&topo.client_if, [frame]));
}

#[test]
fn old_packets_expire_and_a_deleted_vips_are_discarded() {
    require_root();
    let topo = Topology::new("holde");
    let vip = SocketAddr::new(SERVER_V4.into(), 8082);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let agent = agent(&topo, &vips, &["--hold-max-age", "1"]);
    one_syn(&topo, 40001, 8082);
    eventually("held", Duration::from_secs(2), || {
        hold_count(&topo, "held") == 1.0
    });
    eventually("expired", Duration::from_secs(3), || {
        hold_count(&topo, "expired") == 1.0
    });
    backend_appears(&agent, &vips);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        hold_count(&topo, "replayed"),
        0.0,
        "an expired packet is never replayed"
    );

    // Idle again, a packet held, then the VIP deleted.
    vips.set_backends(0);
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    one_syn(&topo, 40002, 8082);
    eventually("held again", Duration::from_secs(2), || {
        hold_count(&topo, "held") == 2.0
    });
    vips.replace("");
    agent.signal(libc::SIGHUP);
    eventually("discarded", Duration::from_secs(3), || {
        hold_count(&topo, "discarded") == 1.0
    });
    assert_eq!(sample(&metrics(&topo), "unidler_held_packets"), 0.0);
}

#[test]
fn a_max_age_of_zero_holds_nothing() {
    require_root();
    let topo = Topology::new("hold0");
    let vip = SocketAddr::new(SERVER_V4.into(), 8083);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let path = vips.path_string();
    let mut agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            &path,
            "--hold-max-age",
            "0",
        ],
    );
    agent.wait_for_log("holding is off", Duration::from_secs(5));
    one_syn(&topo, 40003, 8083);
    std::thread::sleep(Duration::from_millis(300));
    let m = metrics(&topo);
    assert_eq!(sample(&m, "unidler_kernel_idle_hits_total"), 1.0);
    assert_eq!(sample(&m, "unidler_kernel_held_total"), 0.0);
    assert_eq!(sample(&m, "unidler_held_packets"), 0.0);
}

/// A replayed SYN whose client meanwhile connected by its own retransmission, or gave up:
/// no RST to the live connection, no second connection.
#[test]
fn a_replay_after_the_client_connected_or_gave_up_does_no_harm() {
    require_root();
    let topo = Topology::new("holdh");
    let vip = SocketAddr::new(SERVER_V4.into(), 8084);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let accepted = echo_server(&topo, vip);
    // The replay comes 1.5 s after the backend: the client's own retransmission (linear
    // schedule, one a second) gets there first.
    let agent = agent(&topo, &vips, &["--replay-after", "1500ms"]);
    let client = {
        let ns = topo.client_ns.clone();
        std::thread::spawn(move || {
            unidler_tests::netns::in_netns(&ns, || {
                let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(10))
                    .expect("connects by its own retransmission");
                let connected = Instant::now();
                // The connection outlives the replay, and carries data both ways after it.
                std::thread::sleep(Duration::from_secs(3));
                stream.write_all(b"after").unwrap();
                let mut reply = [0u8; 5];
                stream
                    .read_exact(&mut reply)
                    .expect("no RST: the connection lives");
                assert_eq!(&reply, b"after");
                connected
            })
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let backend = backend_appears(&agent, &vips);
    let connected = client.join().expect("client");
    assert!(
        connected.saturating_duration_since(backend) < Duration::from_millis(1500),
        "connected by its own retransmission, before the replay"
    );
    assert!(
        hold_count(&topo, "replayed") >= 1.0,
        "the SYN was replayed all the same"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "no second connection");

    // A client that gave up: its replayed SYN is answered by the server, refused by the
    // client's kernel (no socket): nothing is established.
    vips.set_backends(0);
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    one_syn(&topo, 40004, 8084);
    eventually("held", Duration::from_secs(2), || {
        hold_count(&topo, "held") == 2.0
    });
    backend_appears(&agent, &vips);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(hold_count(&topo, "replayed") >= 2.0);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "nothing established for a gone client"
    );
}

/// A replayed frame enters its interface's stack through `netif_receive_skb` and so passes the
/// TC hook again: the mark the replay program writes in its metadata lets it through there,
/// unheld and unreported, even if its VIP is idle (again) by then; an unmarked copy of the
/// same frame is dropped and held.
#[test]
fn a_replayed_frame_is_let_through_by_the_tc_hook_and_never_held_again() {
    use unidler::{
        datapath::{Datapath, Hook, LoadOptions},
        vip::VipSpec,
    };
    use unidler_common::{Counter, VipState};

    require_root();
    let topo = Topology::new("holdm");
    let vip = SocketAddr::new(SERVER_V4.into(), 8085);
    let listener = topo.listen(8085);
    listener.set_nonblocking(true).unwrap();
    let frame = unidler_tests::netns::syn_to_server(CLIENT_V4.into(), 40_100, 8085);
    topo.in_server(|| {
        let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
        let spec: VipSpec = format!("{vip}/tcp").parse().unwrap();
        dp.upsert_vip(spec.vip.key(), VipState::default()).unwrap();
        dp.start_holding(64, 8_192).unwrap();
        let (ifindex, hook) = dp.attach(&topo.server_if, Hook::Tc).unwrap();
        assert_eq!(hook, Hook::Tc);

        // The replay: through the stack of the server's veth, marked.
        dp.replay(&frame, ifindex).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let c = dp.counters().unwrap();
        assert_eq!(
            c.get(Counter::ReplayedToIdle),
            1,
            "the TC hook saw the replay"
        );
        assert_eq!(c.get(Counter::Held), 0, "a replay is not held");
        assert_eq!(c.get(Counter::EventsWritten), 0, "a replay is not reported");
        assert_eq!(c.get(Counter::IdleDropped), 0, "a replay is not dropped");

        // The same frame from the wire, unmarked: dropped, held, reported.
        send_frames_in(&topo.client_ns, &topo.client_if, frame.clone());
        std::thread::sleep(Duration::from_millis(100));
        let c = dp.counters().unwrap();
        assert_eq!(c.get(Counter::IdleDropped), 1);
        assert_eq!(c.get(Counter::Held), 1);
    });
}

fn send_frames_in(ns: &str, iface: &str, frame: Vec<u8>) {
    unidler_tests::netns::in_netns(ns, || send_frames(iface, [frame]));
}

/// Frames the server's veth end has sent (its SYN-ACKs, here; the metrics are fetched over
/// loopback).
fn server_frames_sent(topo: &Topology) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/tx_packets", topo.server_if);
    unidler_tests::netns::sh(&["ip", "netns", "exec", &topo.server_ns, "cat", &path])
        .trim()
        .parse()
        .unwrap()
}

/// A SYN that came in on VLAN 100 belongs to that VLAN's network, not to the untagged one of
/// the interface (in OVN, a tagged child port or a trunk sub-port rather than the parent). Its
/// replay must enter where it came from, tag included: the untagged stack, which has a
/// listener on the VIP, never sees it and never answers it.
#[test]
fn a_vlan_tagged_syn_is_replayed_with_its_tag() {
    require_root();
    let topo = Topology::new("holdvl");
    // No IPv6 on the server: its router solicitations would count as frames sent.
    unidler_tests::netns::sh(&[
        "ip",
        "netns",
        "exec",
        &topo.server_ns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
    ]);
    let vip = SocketAddr::new(SERVER_V4.into(), 8080);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let accepted = echo_server(&topo, vip);
    let agent = agent(&topo, &vips, &[]);
    let mut syn =
        unidler_tests::frames::Frame::tcp_syn(CLIENT_V4.into(), 41000, SERVER_V4.into(), 8080);
    syn.src_mac = unidler_tests::netns::CLIENT_MAC;
    syn.dst_mac = unidler_tests::netns::SERVER_MAC;
    syn.vlans = vec![(0x8100, 100)];
    let client_if = topo.client_if.clone();
    topo.in_client(move || send_frames(&client_if, [syn.build()]));
    eventually("the tagged SYN held", Duration::from_secs(3), || {
        hold_count(&topo, "held") == 1.0
    });
    let sent_before = server_frames_sent(&topo);
    backend_appears(&agent, &vips);
    eventually("the tagged SYN replayed", Duration::from_secs(3), || {
        hold_count(&topo, "replayed") >= 1.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server_frames_sent(&topo),
        sent_before,
        "the untagged stack answered a SYN of VLAN 100: it was replayed without its tag"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}
