//! Chaos: the agent, a 3-member RAFT Southbound cluster, a CMS that consumes the rows, and
//! real traffic, while members are killed, the agent's connections are cut and the agent
//! itself is restarted (first without, then with `--pin-dir`, adopting the pinned datapath).
//!
//! Throughout: a UDP hit to a fresh idle VIP every 50 ms (each must give exactly one row), a
//! SYN flood at a few idle TCP VIPs (held within the limits; their rows come and go), and
//! every 10 s the last hit VIPs given a backend (their held datagrams replayed, each at most
//! once). `/healthz` must answer within 2 s at every step. The agent's memory is sampled 20 s
//! after each start and at its end.
//!
//! Runs 40 s by default; `UNIDLER_CHAOS_SECONDS` for longer (`cargo xtask chaos --minutes
//! N`), where the schedule below gives, per 30 minutes, over 1,000 cuts, 100 member kills and
//! 20 agent restarts, and the agents' memory at the same age must not rise by 5 % from the
//! first third of the run to the last.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ovsdb::{Atom, Client, ClientOptions, Condition, MonitorRequest, Operation, Remote, Value};
use unidler::telemetry::http_get;
use unidler_tests::{
    agent::Agent,
    bpffs::BpfFs,
    netns::{CLIENT_V4, SERVER_V4, Topology, in_netns, send_frames, syn_to_server},
    ovsdb_server::{self, CHASSIS, Southbound, TempDir},
    proxy::UnixProxy,
    require_root,
    rng::Rng,
};

/// First port of the idle UDP VIPs; each hit goes to a port of its own, so that each must give
/// exactly one row.
const FIRST_PORT: u16 = 20_000;
/// How many: more than a 30-minute run hits (one every 50 ms).
const VIPS: u16 = 40_000;
/// The idle TCP VIPs the SYN flood aims at.
const FLOOD_PORTS: std::ops::Range<u16> = 61_000..61_010;
/// The server's address, as the VIPs file spells it.
const SERVER: &str = "10.77.0.2";

/// The schedule: a cut of every connection of the agent's for `CUT_FOR`, every `CUT_EVERY`;
/// a member killed for `KILL_FOR`, every `KILL_EVERY`; the agent restarted every
/// `RESTART_EVERY` (more often in a short run, at least twice); the last hit VIPs given a
/// backend every `WAKE_EVERY`.
const CUT_EVERY: Duration = Duration::from_millis(1_400);
const CUT_FOR: Duration = Duration::from_millis(400);
const KILL_EVERY: Duration = Duration::from_secs(14);
const KILL_FOR: Duration = Duration::from_secs(3);
const RESTART_EVERY: Duration = Duration::from_secs(75);
const WAKE_EVERY: Duration = Duration::from_secs(10);
/// How many of the last hit VIPs each wake-up gives a backend.
const WAKE_BATCH: u16 = 20;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The VIPs file: every UDP VIP idle but those in `backed`, and the flood's TCP VIPs idle.
fn vips_text(backed: &BTreeSet<u16>) -> String {
    let mut text = String::with_capacity(usize::from(VIPS) * 80);
    for port in (0..VIPS).map(|i| FIRST_PORT + i) {
        text += &format!(
            "[[vip]]\nvip = \"{SERVER}:{port}\"\nprotocol = \"udp\"\nload_balancer = \"lb\"\n"
        );
        if backed.contains(&port) {
            text += "backends = 1\n";
        }
    }
    for port in FLOOD_PORTS {
        text += &format!(
            "[[vip]]\nvip = \"{SERVER}:{port}\"\nprotocol = \"tcp\"\nload_balancer = \"lb\"\n"
        );
    }
    text
}

/// The CMS: follows the Controller_Event table and deletes every row it sees, as
/// ovn-kubernetes does; remembers each row's VIP and protocol, by row.
struct Cms {
    seen: Arc<Mutex<BTreeMap<String, (String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Cms {
    fn start(remotes: &str) -> Self {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let remotes = Remote::parse_list(remotes).unwrap();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut options = ClientOptions::new(remotes, "OVN_Southbound");
                    options.monitors =
                        vec![MonitorRequest::table("Controller_Event").columns(&["event_info"])];
                    let client = Client::start(options).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let rows: Vec<(String, String, String)> = client
                            .replica()
                            .rows("Controller_Event")
                            .map(|(uuid, row)| {
                                let info = row
                                    .get("event_info")
                                    .map(Value::as_string_map)
                                    .unwrap_or_default();
                                (
                                    uuid.to_string(),
                                    info.get("vip").cloned().unwrap_or_default(),
                                    info.get("protocol").cloned().unwrap_or_default(),
                                )
                            })
                            .collect();
                        if rows.is_empty() {
                            continue;
                        }
                        {
                            let mut seen = seen.lock().unwrap();
                            for (uuid, vip, protocol) in &rows {
                                seen.entry(uuid.clone())
                                    .or_insert((vip.clone(), protocol.clone()));
                            }
                        }
                        let deletes: Vec<Operation> = rows
                            .iter()
                            .map(|(uuid, _, _)| Operation::Delete {
                                table: "Controller_Event".into(),
                                conditions: vec![Condition::eq(
                                    "_uuid",
                                    Value::Atom(Atom::Uuid(ovsdb::Uuid::parse(uuid).unwrap())),
                                )],
                            })
                            .collect();
                        // A failure (a member down, a new leader) is tried again next round.
                        let _ = client.transact(&deletes).await;
                    }
                });
            })
        };
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Rows seen, per VIP (`IP:PORT/protocol`).
    fn rows_per_vip(&self) -> BTreeMap<String, usize> {
        let mut per_vip = BTreeMap::new();
        for (vip, protocol) in self.seen.lock().unwrap().values() {
            *per_vip.entry(format!("{vip}/{protocol}")).or_default() += 1;
        }
        per_vip
    }
}

impl Drop for Cms {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The SYN flood: SYNs from random source ports at the flood's TCP VIPs, about a thousand a
/// second, from the client's namespace until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(topo: &Topology) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ns, iface) = (topo.client_ns.clone(), topo.client_if.clone());
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                in_netns(&ns, || {
                    let mut rng = Rng(0x5eed_f100d);
                    while !stop.load(Ordering::Relaxed) {
                        let frames: Vec<Vec<u8>> = (0..10)
                            .map(|_| {
                                let sport = 1024 + rng.below(60_000) as u16;
                                let port = FLOOD_PORTS.start + rng.below(FLOOD_PORTS.len()) as u16;
                                syn_to_server(CLIENT_V4.into(), sport, port)
                            })
                            .collect();
                        let n = send_frames(&iface, frames);
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
        };
        Self {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// UDP listeners on the ports given a backend: a replayed datagram lands here; none may
/// land twice.
#[derive(Default)]
struct Listeners {
    sockets: Vec<(u16, UdpSocket)>,
    received: BTreeMap<u16, usize>,
}

impl Listeners {
    fn listen(&mut self, topo: &Topology, ports: impl IntoIterator<Item = u16>) {
        for port in ports {
            let socket = topo.in_server(|| {
                let socket = UdpSocket::bind(SocketAddr::new(SERVER_V4.into(), port)).unwrap();
                socket.set_nonblocking(true).unwrap();
                socket
            });
            self.sockets.push((port, socket));
        }
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 64];
        for (port, socket) in &self.sockets {
            while socket.recv(&mut buf).is_ok() {
                *self.received.entry(*port).or_default() += 1;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    cuts: u32,
    kills: u32,
    restarts: u32,
    pinned_restarts: u32,
    wakes: u32,
}

#[test]
fn every_hit_lands_exactly_once_through_kills_cuts_and_restarts() {
    require_root();
    let seconds: u64 = std::env::var("UNIDLER_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let total = Duration::from_secs(seconds);
    // At least two restarts, one of each kind, however short the run.
    let restart_every = RESTART_EVERY.min(total / 3);
    let topo = Topology::new("ch");
    let mut cluster = ovsdb_server::southbound_cluster(3);
    cluster.sbctl(&["chassis-add", CHASSIS, "geneve", "127.0.0.1"]);
    let state = TempDir::new("chstate");
    let bpffs = BpfFs::mount();
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
    let cms = Cms::start(&cluster.unix_remotes());
    let vips_file = state.join("vips.toml");
    let mut backed = BTreeSet::new();
    std::fs::write(&vips_file, vips_text(&backed)).unwrap();
    let pin_dir = bpffs.pin_dir();
    let start_agent = |pinned: bool| {
        let mut args = vec![
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
        if pinned {
            args.extend(["--pin-dir", &pin_dir]);
        }
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

    let flood = Flood::start(&topo);
    let mut listeners = Listeners::default();
    let mut tally = Tally::default();
    let mut agent = Some(start_agent(false));
    let mut agent_started = Instant::now();
    // (settled 20 s after its start, at its end) for each agent, in kB.
    let mut rss: Vec<(Option<u64>, u64)> = vec![(None, 0)];
    let mut sent = 0u16;
    let started = Instant::now();
    let mut next_cut = started + CUT_EVERY;
    let mut next_kill = started + KILL_EVERY / 3;
    let mut next_restart = started + restart_every;
    let mut next_wake = started + WAKE_EVERY;
    let mut down: Option<(usize, Instant)> = None;
    let mut cut_until: Option<Instant> = None;
    while started.elapsed() < total && sent < VIPS {
        // Traffic: one hit to a fresh VIP every 50 ms.
        hit(FIRST_PORT + sent);
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
        listeners.drain();

        // The watchdog: the agent answers its health probe promptly, whatever happens.
        let asked = Instant::now();
        assert!(healthz(), "no /healthz after {:?}", started.elapsed());
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "/healthz took {:?}",
            asked.elapsed()
        );
        let pid = agent.as_ref().unwrap().pid();
        let last = rss.last_mut().unwrap();
        if last.0.is_none() && agent_started.elapsed() > Duration::from_secs(20) {
            last.0 = Some(rss_kb(pid));
        }

        let now = Instant::now();
        // Heal what is due.
        if let Some((member, since)) = down
            && now - since > KILL_FOR
        {
            cluster.servers[member].start();
            down = None;
        }
        if let Some(until) = cut_until
            && now > until
        {
            proxies.iter().for_each(UnixProxy::restore);
            cut_until = None;
        }
        // Cut the agent off from every member (a partition).
        if now > next_cut && cut_until.is_none() {
            proxies.iter().for_each(UnixProxy::cut);
            cut_until = Some(now + CUT_FOR);
            next_cut = now + CUT_EVERY;
            tally.cuts += 1;
        }
        // Kill the leader (or, every other time, another member).
        if now > next_kill && down.is_none() {
            let leader = cluster.leader();
            let member = match (leader, tally.kills % 2) {
                (Some(l), 0) => l,
                (Some(l), _) => (l + 1) % cluster.servers.len(),
                (None, _) => tally.kills as usize % cluster.servers.len(),
            };
            cluster.servers[member].kill();
            down = Some((member, now));
            next_kill = now + KILL_EVERY;
            tally.kills += 1;
        }
        // Give the last hit VIPs a backend: their held datagrams are replayed.
        if now > next_wake && sent > WAKE_BATCH {
            let ports: Vec<u16> = (sent - WAKE_BATCH..sent)
                .map(|i| FIRST_PORT + i)
                .filter(|p| !backed.contains(p))
                .collect();
            listeners.listen(&topo, ports.iter().copied());
            backed.extend(ports);
            let tmp = state.join("vips.tmp");
            std::fs::write(&tmp, vips_text(&backed)).unwrap();
            std::fs::rename(&tmp, &vips_file).unwrap();
            next_wake = now + WAKE_EVERY;
            tally.wakes += 1;
        }
        // Restart the agent (SIGTERM: it writes what it holds first); from halfway on with
        // --pin-dir, each adopting the last one's datapath.
        // (Not while cut off: the new agent must be able to connect while the loop waits.)
        if now > next_restart
            && cut_until.is_none()
            && started.elapsed() + Duration::from_secs(5) < total
        {
            cluster.wait_for_leader(Duration::from_secs(20));
            let pinned = started.elapsed() > total / 2;
            let old = agent.take().unwrap();
            rss.last_mut().unwrap().1 = rss_kb(old.pid());
            old.signal(libc::SIGTERM);
            let exit = old.wait(Duration::from_secs(10));
            assert_eq!(exit.code, Some(0), "{}", exit.stderr);
            agent = Some(start_agent(pinned));
            agent_started = Instant::now();
            rss.push((None, 0));
            next_restart = Instant::now() + restart_every;
            tally.restarts += 1;
            tally.pinned_restarts += u32::from(pinned);
        }
    }
    let flooded = flood.sent.load(Ordering::Relaxed);
    drop(flood);

    // Everything heals; every hit must land, once.
    if let Some((member, _)) = down {
        cluster.servers[member].start();
    }
    proxies.iter().for_each(UnixProxy::restore);
    cluster.wait_for_leader(Duration::from_secs(20));
    let agent = agent.unwrap();
    rss.last_mut().unwrap().1 = rss_kb(agent.pid());
    let wanted: BTreeSet<String> = (0..sent)
        .map(|i| format!("{SERVER}:{}/udp", FIRST_PORT + i))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let per_vip = loop {
        let per_vip = cms.rows_per_vip();
        if wanted.iter().all(|v| per_vip.contains_key(v)) || Instant::now() > deadline {
            break per_vip;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_secs(1));
    listeners.drain();
    let twice: Vec<_> = per_vip
        .iter()
        .filter(|(v, n)| v.ends_with("/udp") && **n > 1)
        .collect();
    assert!(twice.is_empty(), "rows written twice: {twice:?}");
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|v| !per_vip.contains_key(*v))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {sent} hits have no row ({:?}...)",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let extra: Vec<&String> = per_vip
        .keys()
        .filter(|v| v.ends_with("/udp") && !wanted.contains(*v))
        .collect();
    assert!(extra.is_empty(), "rows for VIPs never hit: {extra:?}");
    let replayed_twice: Vec<_> = listeners.received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        replayed_twice.is_empty(),
        "datagrams delivered twice: {replayed_twice:?}"
    );
    assert!(
        tally.restarts >= 2 && tally.pinned_restarts >= 1,
        "the agent was restarted too little: {tally:?}"
    );
    let flood_rows: usize = per_vip
        .iter()
        .filter(|(v, _)| v.ends_with("/tcp"))
        .map(|(_, n)| n)
        .sum();
    let settled: Vec<u64> = rss.iter().filter_map(|(s, _)| *s).collect();
    let ends: Vec<u64> = rss.iter().map(|(_, e)| *e).collect();
    // Drift: the agents' memory at the same age (20 s after each start; at each end), the
    // last third of the run's agents against the first third. Each agent grows by a few
    // percent in its first minute (warm-up, shown as `warm-up`); a leak, in the agent or in
    // what it adopts, would show as a rise from agent to agent.
    let third_trend = |samples: &[u64]| {
        let n = samples.len() / 3;
        if n == 0 {
            return 0.0;
        }
        let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
        mean(&samples[samples.len() - n..]) / mean(&samples[..n]) - 1.0
    };
    let drift = third_trend(&settled).max(third_trend(&ends));
    let warm_up = rss
        .iter()
        .filter_map(|(s, e)| Some(*e as f64 / (*s)? as f64 - 1.0))
        .fold(0.0f64, f64::max);
    eprintln!(
        "chaos: {:?} over {seconds} s: {} cuts, {} member kills, {} agent restarts ({} with \
         --pin-dir), {sent} UDP hits each written once, {} SYNs flooded ({flood_rows} rows of \
         the flood's VIPs), {} wake-ups: {} held datagrams replayed, none twice; /healthz \
         always within 2 s; agent RSS settled {settled:?} kB, at its ends {ends:?} kB, drift \
         {:.1} % (warm-up of one agent at most {:.1} %)",
        started.elapsed(),
        tally.cuts,
        tally.kills,
        tally.restarts,
        tally.pinned_restarts,
        flooded,
        tally.wakes,
        listeners.received.values().sum::<usize>(),
        drift * 100.0,
        warm_up * 100.0,
    );
    // A long run's memory must stay flat (a short one has too few samples to say).
    if seconds >= 600 {
        assert!(drift < 0.05, "agent memory drifted {:.1} %", drift * 100.0);
    }
}
