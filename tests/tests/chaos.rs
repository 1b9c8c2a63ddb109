//! Chaos: the agent, a 3-member RAFT Southbound cluster and real traffic, while members are
//! killed and restarted, the agent's connections are cut and the agent itself is restarted.
//! Every hit lands exactly once, nothing hangs, memory stays flat.
//!
//! Runs 40 s by default (`UNIDLER_CHAOS_SECONDS` for longer).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use unidler::telemetry::http_get;
use unidler_tests::{
    agent::Agent,
    netns::{CLIENT_V4, SERVER_V4, Topology},
    ovsdb_server::{self, CHASSIS, Southbound, TempDir},
    proxy::UnixProxy,
    require_root,
};

/// First port of the idle VIPs; each hit goes to a port of its own, so that each must give
/// exactly one row.
const FIRST_PORT: u16 = 20_000;
const VIPS: u16 = 4_000;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn every_hit_lands_exactly_once_through_kills_cuts_and_restarts() {
    require_root();
    let seconds: u64 = std::env::var("UNIDLER_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let topo = Topology::new("ch");
    let mut cluster = ovsdb_server::southbound_cluster(3);
    cluster.sbctl(&["chassis-add", CHASSIS, "geneve", "127.0.0.1"]);
    let state = TempDir::new("chstate");
    // The agent reaches each member through a proxy the test can cut.
    let proxies: Vec<UnixProxy> = cluster
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            UnixProxy::start(
                &state.join(&format!("sb{i}.sock")),
                &s.dir.join(format!("{}.sock", s.name)),
            )
        })
        .collect();
    let remotes = proxies
        .iter()
        .map(UnixProxy::remote)
        .collect::<Vec<_>>()
        .join(",");
    let vips_file = state.join("vips.toml");
    let text: String = (0..VIPS)
        .map(|i| {
            format!(
                "[[vip]]\nvip = \"10.77.0.2:{}\"\nprotocol = \"udp\"\nload_balancer = \"lb\"\n",
                FIRST_PORT + i
            )
        })
        .collect();
    std::fs::write(&vips_file, text).unwrap();
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--ovnsb-db",
        &remotes,
        "--chassis",
        CHASSIS,
        "--state-dir",
        state.path_str(),
        "--vips-file",
        vips_file.to_str().unwrap(),
        "--event-queue-size",
        "100000",
    ];
    let start_agent = || {
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log("connected to OVN_Southbound", Duration::from_secs(30));
        agent
    };
    let healthz = || {
        topo.in_server(|| http_get("127.0.0.1:9477".parse().unwrap(), "/healthz"))
            .is_ok()
    };
    let client = topo.in_client(|| UdpSocket::bind(SocketAddr::new(CLIENT_V4.into(), 0)).unwrap());
    let hit = |port: u16| {
        client
            .send_to(b"wake", SocketAddr::new(SERVER_V4.into(), port))
            .unwrap();
    };

    let mut agent = Some(start_agent());
    let mut sent = 0u16;
    let mut rss_after_restart = None;
    let started = Instant::now();
    let total = Duration::from_secs(seconds);
    let mut next_action = Instant::now() + Duration::from_secs(3);
    let mut action = 0usize;
    let mut down: Option<(usize, Instant)> = None;
    let mut cut_until: Option<Instant> = None;
    let mut restarted = false;
    while started.elapsed() < total && sent < VIPS {
        // Traffic: one hit to a fresh VIP every 50 ms.
        hit(FIRST_PORT + sent);
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));

        // The watchdog: the agent answers its health probe promptly, whatever happens.
        let asked = Instant::now();
        assert!(healthz(), "no /healthz after {:?}", started.elapsed());
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "/healthz took {:?}",
            asked.elapsed()
        );

        // Heal what is due.
        if let Some((member, since)) = down
            && since.elapsed() > Duration::from_secs(3)
        {
            cluster.servers[member].start();
            down = None;
        }
        if let Some(until) = cut_until
            && Instant::now() > until
        {
            proxies.iter().for_each(UnixProxy::restore);
            cut_until = None;
        }
        if Instant::now() < next_action || down.is_some() || cut_until.is_some() {
            continue;
        }
        next_action = Instant::now() + Duration::from_secs(4);
        match action % 3 {
            // Kill the leader (or a member) and bring it back 3 s later.
            0 => {
                let member = cluster.leader().unwrap_or(action % cluster.servers.len());
                cluster.servers[member].kill();
                down = Some((member, Instant::now()));
            }
            // Cut the agent off from every member for 3 s (a partition).
            1 => {
                proxies.iter().for_each(UnixProxy::cut);
                cut_until = Some(Instant::now() + Duration::from_secs(3));
            }
            // Restart the agent once, halfway (SIGTERM: it writes what it holds first).
            _ if !restarted && started.elapsed() > total / 2 => {
                cluster.wait_for_leader(Duration::from_secs(20));
                std::thread::sleep(Duration::from_millis(300));
                let old = agent.take().unwrap();
                old.signal(libc::SIGTERM);
                let exit = old.wait(Duration::from_secs(10));
                assert_eq!(exit.code, Some(0), "{}", exit.stderr);
                let new = start_agent();
                std::thread::sleep(Duration::from_secs(2));
                rss_after_restart = Some(rss_kb(new.pid()));
                agent = Some(new);
                restarted = true;
            }
            _ => {}
        }
        action += 1;
    }

    // Everything heals; every hit must land, once.
    if let Some((member, _)) = down {
        cluster.servers[member].start();
    }
    proxies.iter().for_each(UnixProxy::restore);
    cluster.wait_for_leader(Duration::from_secs(20));
    let agent = agent.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let per_vip = loop {
        let mut per_vip: BTreeMap<String, usize> = BTreeMap::new();
        for row in cluster.event_rows() {
            *per_vip.entry(row.event_info["vip"].clone()).or_default() += 1;
        }
        if per_vip.len() >= usize::from(sent) || Instant::now() > deadline {
            break per_vip;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let twice: Vec<_> = per_vip.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows written twice: {twice:?}");
    let missing: Vec<u16> = (0..sent)
        .map(|i| FIRST_PORT + i)
        .filter(|port| !per_vip.contains_key(&format!("10.77.0.2:{port}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {sent} hits have no row (ports {:?}...)",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let extra = per_vip.len() - usize::from(sent);
    assert_eq!(extra, 0, "rows for VIPs never hit");
    if let Some(before) = rss_after_restart {
        let after = rss_kb(agent.pid());
        assert!(
            after < before + 20 * 1024,
            "agent memory grew from {before} kB to {after} kB"
        );
    }
    assert!(restarted || seconds < 10, "the agent was never restarted");
}
