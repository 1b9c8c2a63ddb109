//! Section 9: the first connection after scale-to-zero. A client connects once (its kernel
//! retransmits the SYN on its own schedule) to an idle VIP; its backend appears some time
//! later. Measured: from the backend appearing (the VIP source's change reaching the agent) to
//! the client's connection established, with holding (the agent replays the held SYN) and
//! without (`--hold-max-age 0`: dropped, as OVN does, so the client waits for its next
//! retransmission), for both SYN backoff schedules. With `--vs-ovn`, the same on a real OVN
//! node: OVN alone against unidler, from the Northbound commit that adds the backend.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::{Agent, southbound_args},
    netns::{SERVER_V4, Topology, connect_in_background, syn_backoff},
    ovn_chassis::{BACKEND_V4, OvnNode},
    ovsdb_server::{Southbound as _, TempDir},
    vips_file::VipsFile,
};

use crate::figure::{Figure, figure};

/// Seconds from the client's first SYN to its backend appearing.
const READY_AFTER: [f64; 5] = [0.2, 0.5, 1.3, 2.5, 5.0];

/// Seconds from the backend appearing to the client connected, for one run.
fn time_to_connect(schedule: u8, ready_after: f64, hold: bool) -> f64 {
    let topo = Topology::new("fc");
    syn_backoff(&topo.client_ns, schedule);
    let vip = SocketAddr::new(SERVER_V4.into(), 8090);
    let vips = VipsFile::new(&vip.to_string(), "tcp");
    let listener = topo.in_server(|| TcpListener::bind(vip).unwrap());
    let path = vips.path_string();
    let max_age = if hold { "60" } else { "0" };
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--vips-file",
        &path,
        "--hold-max-age",
        max_age,
        "--summary-interval",
        "0",
    ];
    let agent = Agent::start(&topo.server_ns, &args);
    let client = connect_in_background(&topo.client_ns, vip, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs_f64(ready_after));
    vips.set_backends(1);
    let backend = Instant::now();
    agent.signal(libc::SIGHUP);
    let (connected, _stream) = client.join().expect("client");
    drop(listener);
    connected.saturating_duration_since(backend).as_secs_f64()
}

pub(crate) fn first_connect() -> Vec<Figure> {
    let mut out = Vec::new();
    for (schedule, name) in [(0u8, "exponential (RHEL)"), (4, "linear (6.5+ default)")] {
        for ready_after in READY_AFTER {
            let held = time_to_connect(schedule, ready_after, true);
            let dropped = time_to_connect(schedule, ready_after, false);
            out.push(
                figure(
                    "9 first connect",
                    format!("backend {ready_after} s after the SYN, {name} backoff: held"),
                    held * 1000.0,
                    "ms",
                )
                .vs("dropped", dropped * 1000.0)
                .target("within 100 ms of the backend"),
            );
        }
    }
    out
}

/// The same on a real OVN node (with `--vs-ovn`): OVN alone against unidler on the client's
/// veth, the benchmark acting as the CMS (reads and deletes the row, then adds the backend in
/// the Northbound database); measured from that commit to the client's connection.
pub(crate) fn first_connect_on_ovn() -> Vec<Figure> {
    let mut node = OvnNode::start("fco");
    node.add_backend_pod();
    let vip = SocketAddr::new(Ipv4Addr::new(10, 96, 9, 9).into(), 8080);
    node.add_idle_load_balancer("web", &[vip.to_string()]);
    let listener = node.in_backend(|| TcpListener::bind((BACKEND_V4, vip.port())).unwrap());
    std::thread::spawn(move || for _ in listener.incoming() {});
    let state = TempDir::new("fcostate");
    let sb = node.central.sb.unix_remote();
    let openflow = node.openflow_target();
    let mut out = Vec::new();
    for (schedule, name) in [(0u8, "exponential (RHEL)"), (4, "linear (6.5+ default)")] {
        syn_backoff(&node.client_ns, schedule);
        for ready_after in READY_AFTER {
            let ovn = commit_to_connect(&node, vip, ready_after);
            let agent = agent_on(&node, &sb, &state, &openflow);
            let held = commit_to_connect(&node, vip, ready_after);
            agent.signal(libc::SIGTERM);
            agent.wait(Duration::from_secs(10));
            out.push(
                figure(
                    "9 first connect",
                    format!("OVN node: backend {ready_after} s after the SYN, {name}: unidler"),
                    held * 1000.0,
                    "ms",
                )
                .vs("OVN alone", ovn * 1000.0)
                .target("within 100 ms of the commit"),
            );
        }
    }
    out
}

/// One run on the OVN node: the VIP idle, the client connects, the CMS consumes the rows and
/// adds the backend `ready_after` seconds later; seconds from that commit to the connection.
fn commit_to_connect(node: &OvnNode, vip: SocketAddr, ready_after: f64) -> f64 {
    let set_vip = |backend: &str| format!("vips:\"{vip}\"=\"{backend}\"");
    node.central
        .nbctl(&["--wait=hv", "set", "Load_Balancer", "web", &set_vip("")]);
    node.central
        .sb
        .sbctl(&["--all", "destroy", "Controller_Event"]);
    let client = connect_in_background(&node.client_ns, vip, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs_f64(ready_after));
    node.central
        .sb
        .sbctl(&["--all", "destroy", "Controller_Event"]);
    node.central.nbctl(&[
        "set",
        "Load_Balancer",
        "web",
        &set_vip(&format!("{BACKEND_V4}:{}", vip.port())),
    ]);
    let committed = Instant::now();
    let (connected, _stream) = client.join().expect("client");
    connected.saturating_duration_since(committed).as_secs_f64()
}

/// 1,000 idle VIPs on the OVN node, a client connecting to each (exponential SYN backoff), all
/// given a backend in one Northbound commit 2 s later: the time from the commit to the last
/// connection, and the agent's CPU meanwhile, the `ovs-ofctl` runs of its forwarding reader
/// included (they are its children).
pub(crate) fn many_waking_on_ovn() -> Vec<Figure> {
    const VIPS: u16 = 1000;
    let mut node = OvnNode::start("fcm");
    node.add_backend_pod();
    let vips: Vec<SocketAddr> = (0..VIPS)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1);
            SocketAddr::new(ip.into(), 8080)
        })
        .collect();
    let texts: Vec<String> = vips.iter().map(ToString::to_string).collect();
    node.add_idle_load_balancer("many", &texts);
    let listener = node.in_backend(|| TcpListener::bind((BACKEND_V4, 8080)).unwrap());
    std::thread::spawn(move || for _ in listener.incoming() {});
    let state = TempDir::new("fcmstate");
    let sb = node.central.sb.unix_remote();
    let openflow = node.openflow_target();
    syn_backoff(&node.client_ns, 0);
    let agent = agent_on(&node, &sb, &state, &openflow);
    let clients: Vec<_> = vips
        .iter()
        .map(|vip| connect_in_background(&node.client_ns, *vip, Duration::from_secs(60)))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let cpu_before = cpu_with_children(agent.pid());
    let backends: Vec<String> = texts
        .iter()
        .map(|vip| format!("\"{vip}\"=\"{BACKEND_V4}:8080\""))
        .collect();
    node.central.nbctl(&[
        "set",
        "Load_Balancer",
        "many",
        &format!("vips={{{}}}", backends.join(",")),
    ]);
    let committed = Instant::now();
    let last = clients
        .into_iter()
        .map(|c| c.join().expect("client").0)
        .max()
        .unwrap();
    let cpu = cpu_with_children(agent.pid()) - cpu_before;
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    vec![
        figure(
            "9 first connect",
            "OVN node: 1,000 VIPs given a backend in one commit: commit to the last connection",
            last.saturating_duration_since(committed).as_secs_f64() * 1000.0,
            "ms",
        )
        .target("before the clients' next SYN (1 s after the commit)"),
        figure(
            "9 first connect",
            "OVN node: 1,000 VIPs waking: agent CPU, its ovs-ofctl runs included",
            cpu * 1000.0,
            "ms",
        ),
    ]
}

/// CPU seconds of process `pid` and of its children it has waited for (`/proc/PID/stat`
/// utime, stime, cutime, cstime).
fn cpu_with_children(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The agent on the OVN node's veth, its VIPs from the Southbound database `sb`, reading the
/// bridge's flows at `openflow`; returns once its VIP map is synced.
fn agent_on(node: &OvnNode, sb: &str, state: &TempDir, openflow: &str) -> Agent {
    let mut agent = Agent::start(
        &node.node_ns,
        &[
            southbound_args(&node.node_if, sb, state.path_str()),
            // The userspace datapath reads the veth before TC: XDP here.
            vec!["--hook", "xdp", "--openflow-bridge", openflow],
            vec!["--summary-interval", "0"],
        ]
        .concat(),
    );
    agent.wait_for_log("VIP map synced", Duration::from_secs(60));
    agent
}
