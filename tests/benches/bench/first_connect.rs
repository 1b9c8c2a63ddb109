//! Section 9: the first connection after scale-to-zero. A client connects once (its kernel
//! retransmits the SYN on its own schedule) to an idle VIP; its backend appears some time
//! later. Measured: from the backend appearing (the VIP source's change reaching the agent) to
//! the client's connection established, with holding (the agent replays the held SYN) and
//! without (`--hold-max-age 0`: dropped, as OVN does, so the client waits for its next
//! retransmission), for both SYN backoff schedules.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::Agent,
    netns::{SERVER_V4, Topology, in_netns, sh},
    vips_file::VipsFile,
};

use crate::figure::{Figure, figure};

/// Seconds from the client's first SYN to its backend appearing.
const READY_AFTER: [f64; 5] = [0.2, 0.5, 1.3, 2.5, 5.0];

/// Seconds from the backend appearing to the client connected, for one run.
fn time_to_connect(schedule: u8, ready_after: f64, hold: bool) -> f64 {
    let topo = Topology::new("fc");
    sh(&[
        "ip",
        "netns",
        "exec",
        &topo.client_ns,
        "sysctl",
        "-qw",
        &format!("net.ipv4.tcp_syn_linear_timeouts={schedule}"),
    ]);
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
    let client = {
        let ns = topo.client_ns.clone();
        std::thread::spawn(move || {
            in_netns(&ns, || {
                let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(30));
                let at = Instant::now();
                stream.expect("connects");
                at
            })
        })
    };
    std::thread::sleep(Duration::from_secs_f64(ready_after));
    vips.set_backends(1);
    let backend = Instant::now();
    agent.signal(libc::SIGHUP);
    let connected = client.join().expect("client");
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
