//! `cargo xtask demo`: the datapath catching the first packet to an idle service.
//!
//! Makes two namespaces joined by a veth pair and its own OVN Southbound `ovsdb-server`, runs
//! the agent on the server end with one idle VIP and one VIP that has a backend (from a VIPs
//! file), makes a real TCP connection attempt to the idle one from the client, shows the
//! Controller_Event row appear, deletes it and gives the VIP a backend as a CMS would, shows
//! the client's first attempt connected as soon as the backend appeared (its SYN was held and
//! replayed), and removes everything again.

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
    ovsdb_server::{self, Listen, OvsdbServer, Southbound, TempDir},
    vips_file::VipsFile,
};

/// The Northbound load balancer the idle VIP belongs to (made up for the demo).
const LB: &str = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";

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

    let sb = ovsdb_server::southbound(Listen::default());
    sb.sbctl(&["chassis-add", "demo-chassis", "geneve", "127.0.0.1"]);
    say(&format!(
        "OVN Southbound ovsdb-server at {} with Chassis demo-chassis",
        sb.unix_remote()
    ));
    let state = TempDir::new("demo-state");
    let db = sb.unix_remote();
    let vips = VipsFile::new("10.77.0.2:8080", "tcp");
    let vips_text = |backends: u32| {
        format!(
            "[[vip]]\nvip = \"10.77.0.2:8080\"\nbackends = {backends}\nload_balancer = \"{LB}\"\n\n\
             [[vip]]\nvip = \"10.77.0.2:9090\"\nbackends = 1\n"
        )
    };
    vips.replace(&vips_text(0));
    let vips_path = vips.path_string();
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--ovnsb-db",
        &db,
        "--chassis",
        "demo-chassis",
        "--state-dir",
        state.0.to_str().expect("UTF-8 temp dir"),
        "--vips-file",
        &vips_path,
    ];
    say(&format!("starting: unidler {}", args.join(" ")));
    let mut agent = Agent::start_binary(agent_bin, &topo.server_ns, &args);
    show_log(&mut agent);

    say("client connects to 10.77.0.2:8080, an idle VIP (0 backends), once, waiting up to 10 s");
    let client = {
        let ns = topo.client_ns.clone();
        std::thread::spawn(move || {
            unidler_tests::netns::in_netns(&ns, || {
                let stream = TcpStream::connect_timeout(&idle, Duration::from_secs(10));
                (std::time::Instant::now(), stream.and_then(read_reply))
            })
        })
    };
    let rows = wait_for_rows(&sb, 1);
    say(
        "  its SYN was dropped by the datapath and held by the agent; ovn-sbctl list Controller_Event:",
    );
    for line in sb.sbctl(&["list", "Controller_Event"]).lines() {
        println!("      {line}");
    }
    let uuid = sb.sbctl(&["--bare", "--columns=_uuid", "list", "Controller_Event"]);
    say("the CMS consumes the event: ovn-sbctl destroy Controller_Event ...");
    sb.sbctl(&["destroy", "Controller_Event", uuid.trim()]);
    std::thread::sleep(Duration::from_millis(1300));
    // The client's own SYN retransmission (1 s) was not held twice, but reported again.
    sb.sbctl(&["--all", "destroy", "Controller_Event"]);
    say("the CMS scales the workload up: the VIP gets a backend (VIPs file rewritten, SIGHUP)");
    vips.replace(&vips_text(1));
    let backend_at = std::time::Instant::now();
    agent.signal(libc::SIGHUP);
    let (connected_at, first) = client.join().expect("client thread");
    let first_ok = first.is_ok();
    match first {
        Ok(reply) => say(&format!(
            "  the client's first attempt connected {:?} after the backend appeared (its held \
             SYN was replayed); the backend says: {}",
            connected_at.saturating_duration_since(backend_at),
            reply.trim()
        )),
        Err(err) => say(&format!("  the first attempt failed (unexpected!): {err}")),
    }
    show_log(&mut agent);

    say("client connects to 10.77.0.2:9090, a VIP with 1 backend");
    match connect(&topo, active) {
        Ok(reply) => say(&format!("  connected; the backend says: {}", reply.trim())),
        Err(err) => say(&format!("  failed (unexpected!): {err}")),
    }
    std::thread::sleep(Duration::from_millis(500));
    let quiet = sb
        .sbctl(&["--bare", "--columns=_uuid", "list", "Controller_Event"])
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    say(&format!("  Controller_Event rows for it: {quiet}"));

    say("stopping the agent (SIGTERM) and removing the namespaces");
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(10));
    for line in exit.stderr.lines().filter(|l| l.contains("totals")) {
        println!("    {line}");
    }
    drop(topo);
    if rows != 1 || quiet != 0 || !first_ok {
        bail!(
            "expected one row for the idle VIP, none for the active one, and the first attempt \
             connected; got {rows}, {quiet}, {first_ok}"
        );
    }
    say("done");
    Ok(())
}

fn connect(topo: &Topology, addr: SocketAddr) -> std::io::Result<String> {
    topo.in_client(|| {
        read_reply(TcpStream::connect_timeout(
            &addr,
            Duration::from_millis(800),
        )?)
    })
}

/// What the server writes before it closes the connection.
fn read_reply(mut stream: TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Waits up to 5 s for `n` Controller_Event rows; returns how many there are.
fn wait_for_rows(sb: &OvsdbServer, n: usize) -> usize {
    let count = || {
        sb.sbctl(&["--bare", "--columns=_uuid", "list", "Controller_Event"])
            .lines()
            .filter(|l| !l.is_empty())
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    count()
}

fn show_log(agent: &mut Agent) {
    for line in agent.log.drain(..) {
        println!("    {line}");
    }
}

fn say(what: &str) {
    println!("[demo] {what}");
}
