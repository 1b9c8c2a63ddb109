//! Section 7: what the datapath costs a pod's TCP traffic. One veth pair between two
//! namespaces, a TCP stream from the client to a server for a few seconds, with nothing
//! attached and with the agent attached by each hook (rounds alternating), and the ratio of
//! the throughput to nothing attached.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::Agent,
    netns::{SERVER_V4, Topology},
};

use crate::figure::{Figure, figure};

/// How long each stream runs.
const STREAM: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

/// Gbit/s of one TCP stream from the client to the server namespace.
fn stream_gbps(topo: &Topology, port: u16) -> f64 {
    let listener =
        topo.in_server(|| TcpListener::bind(SocketAddr::new(SERVER_V4.into(), port)).unwrap());
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let started = Instant::now();
    topo.in_client(|| {
        let mut conn = TcpStream::connect(SocketAddr::new(SERVER_V4.into(), port)).unwrap();
        let chunk = vec![0x5au8; 256 * 1024];
        while started.elapsed() < STREAM {
            conn.write_all(&chunk).unwrap();
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    server.join().unwrap();
    received.load(Ordering::Relaxed) as f64 * 8.0 / elapsed / 1e9
}

pub(crate) fn hooks() -> Vec<Figure> {
    let topo = Topology::new("bh");
    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("nothing attached", Vec::new()),
        ("tc", Vec::new()),
        ("xdp", Vec::new()),
        ("xdp-generic", Vec::new()),
    ];
    let mut port = 5201;
    for _ in 0..ROUNDS {
        for (hook, samples) in &mut results {
            let agent = (*hook != "nothing attached").then(|| {
                Agent::start(
                    &topo.server_ns,
                    &[
                        "run",
                        "--iface",
                        &topo.server_if,
                        "--hook",
                        hook,
                        "--vip",
                        "10.77.0.2:80/tcp",
                    ],
                )
            });
            std::thread::sleep(Duration::from_millis(300));
            samples.push(stream_gbps(&topo, port));
            port += 1;
            drop(agent);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let nothing = median(&results[0].1);
    let mut out = vec![figure(
        "7 hooks",
        "TCP through a veth, nothing attached",
        nothing,
        "Gbit/s",
    )];
    for (hook, samples) in &results[1..] {
        let f = figure(
            "7 hooks",
            format!("TCP through a veth, agent attached with --hook {hook}"),
            median(samples),
            "Gbit/s",
        )
        .vs("nothing", nothing);
        out.push(if *hook == "tc" {
            f.target("at least 0.95x")
        } else {
            f
        });
    }
    out
}
