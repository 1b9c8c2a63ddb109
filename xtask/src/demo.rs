//! `cargo xtask demo`: the datapath catching the first packet to an idle service.
//!
//! Makes two namespaces joined by a veth pair, runs the agent on the server end with one idle
//! VIP and one VIP that has a backend, makes real TCP connection attempts from the client,
//! prints what the agent reports, and removes everything again.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};
use unidler_tests::{
    agent::Agent,
    netns::{SERVER_V4, Topology},
};

pub fn run(agent_bin: &Path) -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads XDP: run it as root");
    }
    let topo = Topology::new("demo");
    say(&format!(
        "namespaces {} (client) and {} (server), joined by veth {} <-> {}",
        topo.client_ns, topo.server_ns, topo.client_if, topo.server_if
    ));
    let idle = SocketAddr::new(SERVER_V4.into(), 8080);
    let active = SocketAddr::new(SERVER_V4.into(), 9090);
    // Real servers on both VIPs: only the datapath decides what reaches them.
    let servers: Vec<TcpListener> = [idle, active]
        .into_iter()
        .map(|addr| topo.in_server(|| TcpListener::bind(addr)))
        .collect::<std::io::Result<_>>()?;
    for server in &servers {
        let server = server.try_clone()?;
        std::thread::spawn(move || {
            for mut stream in server.incoming().flatten() {
                let _ = stream.write_all(b"hello from the backend\n");
            }
        });
    }

    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--vip",
        "10.77.0.2:8080/tcp",
        "--vip",
        "10.77.0.2:9090/tcp=1",
    ];
    say(&format!("starting: unidler {}", args.join(" ")));
    let mut agent = Agent::start_binary(agent_bin, &topo.server_ns, &args);
    show_log(&mut agent);

    say("client connects to 10.77.0.2:8080, an idle VIP (0 backends)");
    match connect(&topo, idle) {
        Ok(reply) => say(&format!("  connected (unexpected!): {reply}")),
        Err(err) => say(&format!(
            "  no connection: {err} (the SYN was dropped by XDP)"
        )),
    }
    let events = agent.events_until_quiet(Duration::from_millis(500), Duration::from_secs(3));
    for event in &events {
        say(&format!("  agent reported: {event}"));
    }

    say("client connects to 10.77.0.2:9090, a VIP with 1 backend");
    match connect(&topo, active) {
        Ok(reply) => say(&format!("  connected; the backend says: {}", reply.trim())),
        Err(err) => say(&format!("  failed (unexpected!): {err}")),
    }
    let quiet = agent.events_until_quiet(Duration::from_millis(500), Duration::from_secs(1));
    say(&format!("  agent reported {} events for it", quiet.len()));

    say("stopping the agent (SIGTERM) and removing the namespaces");
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(10));
    for line in exit.stderr.lines().filter(|l| l.contains("counters")) {
        println!("    {line}");
    }
    drop(topo);
    if events.len() != 1 || !quiet.is_empty() {
        bail!(
            "expected one event for the idle VIP and none for the active one, got {} and {}",
            events.len(),
            quiet.len()
        );
    }
    say("done");
    Ok(())
}

fn connect(topo: &Topology, addr: SocketAddr) -> std::io::Result<String> {
    topo.in_client(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(800))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    })
}

fn show_log(agent: &mut Agent) {
    for line in agent.log.drain(..) {
        println!("    {line}");
    }
}

fn say(what: &str) {
    println!("[demo] {what}");
}
