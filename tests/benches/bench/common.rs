//! What several sections share: a test bed (Southbound server, namespaces, agent), a CMS-like
//! monitoring client, connection attempts, and measurements of latency, storms and processes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ovsdb::{Client, ClientOptions, MonitorRequest, Remote};
use unidler_tests::{
    agent::{Agent, southbound_args},
    netns::{Topology, send_frames},
    ovsdb_server::{self, OvsdbServer, TempDir},
};

use crate::figure::*;

/// A Southbound server with chassis-1, a namespace pair, and a release agent on the server end.
pub(crate) struct Bed {
    pub(crate) topo: Topology,
    pub(crate) sb: OvsdbServer,
    pub(crate) _state: TempDir,
    pub(crate) agent: Agent,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: Client,
}

pub(crate) fn bed(prefix: &str, vips: &[String], extra: &[&str]) -> Bed {
    let topo = Topology::new(prefix);
    let sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("bstate");
    let db = sb.unix_remote();
    let mut args = southbound_args(&topo.server_if, &db, state.path_str());
    let file;
    if !vips.is_empty() {
        // Many VIPs: a VIPs file keeps the command line short.
        let dir = state.0.join("vips.toml");
        let text: String = vips
            .iter()
            .map(|v| {
                let (addr, proto) = v.split_once('/').unwrap();
                format!(
                    "[[vip]]\nvip = \"{addr}\"\nprotocol = \"{proto}\"\nload_balancer = \"lb\"\n"
                )
            })
            .collect();
        std::fs::write(&dir, text).unwrap();
        file = dir.to_str().unwrap().to_owned();
        args.extend(["--vips-file", &file]);
    }
    args.extend_from_slice(extra);
    let agent = Agent::start(&topo.server_ns, &args);
    let rt = runtime();
    let client = event_monitor(&rt, &sb.unix_remote());
    Bed {
        topo,
        sb,
        _state: state,
        agent,
        rt,
        client,
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A client monitoring the Controller_Event rows of the Southbound server at `remote`, as the
/// CMS does.
pub(crate) fn event_monitor(rt: &tokio::runtime::Runtime, remote: &str) -> Client {
    rt.block_on(async {
        let mut o = ClientOptions::new(Remote::parse_list(remote).unwrap(), "OVN_Southbound");
        o.leader_only = false;
        o.monitors =
            vec![MonitorRequest::table("Controller_Event").columns(&["event_info", "seq_num"])];
        let c = Client::start(o).unwrap();
        c.wait_connected(Duration::from_secs(10)).await.unwrap();
        c
    })
}

/// Deletes every Controller_Event row, as the CMS does once it has acted, and waits until the
/// monitoring client has seen the table empty.
pub(crate) fn clear_events(rt: &tokio::runtime::Runtime, client: &Client) {
    rt.block_on(client.transact(&[ovsdb::Operation::Delete {
        table: "Controller_Event".into(),
        conditions: vec![],
    }]))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.replica().len("Controller_Event") > 0 {
        assert!(
            Instant::now() < deadline,
            "Controller_Event rows not cleared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A non-blocking TCP connect from namespace `netns` to `to`: sends one real SYN. Returns the
/// socket (drop it once done: closing a connecting socket sends nothing) and the instant just
/// before the SYN.
pub(crate) fn connect_from(netns: &str, to: SocketAddr) -> (socket2::Socket, Instant) {
    unidler_tests::netns::in_netns(netns, || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.set_nonblocking(true).unwrap();
        let t = Instant::now();
        let _ = socket.connect(&to.into());
        (socket, t)
    })
}

/// For each target in turn: a real connection attempt from `netns`, then the time until the
/// monitoring `client` sees the Controller_Event row for it. Returns the latencies in ms,
/// sorted (attempts whose row did not come within 5 s are left out).
pub(crate) fn measure_latency(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    netns: &str,
    targets: &[SocketAddr],
) -> Vec<f64> {
    let mut changes = client.subscribe();
    let mut lat = Vec::new();
    for &to in targets {
        let want = to.to_string();
        let (socket, sent) = connect_from(netns, to);
        let seen = rt.block_on(async {
            loop {
                let set = tokio::time::timeout(Duration::from_secs(5), changes.recv())
                    .await
                    .ok()?
                    .ok()?;
                for (_, _, change) in &set.changes {
                    if let ovsdb::RowChange::Insert(row) = change
                        && row
                            .get("event_info")
                            .is_some_and(|v| v.as_string_map().get("vip") == Some(&want))
                    {
                        // When the client had the row, not when this thread got to see it.
                        return Some(set.applied_at.unwrap_or_else(Instant::now));
                    }
                }
            }
        });
        drop(socket);
        if let Some(seen) = seen {
            lat.push(seen.duration_since(sent).as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// What a wake-up storm produced.
pub(crate) struct Storm {
    pub(crate) sent_in: Duration,
    pub(crate) rows: usize,
    /// From the first frame sent to the last row seen.
    pub(crate) last_row_at: Duration,
    pub(crate) complete: bool,
}

/// Sends `frames` (one SYN per idle VIP) out of `ifname` in `netns` at once, then waits until
/// `client` sees one row per frame, or until no new row came for 3 s (30 s at most).
pub(crate) fn measure_storm(
    client: &Client,
    netns: &str,
    ifname: &str,
    frames: Vec<Vec<u8>>,
) -> Storm {
    let expected = frames.len();
    let started = Instant::now();
    unidler_tests::netns::in_netns(netns, || send_frames(ifname, frames));
    let sent_in = started.elapsed();
    let (mut rows, mut last_row_at) = (0, Duration::ZERO);
    while rows < expected
        && started.elapsed() < Duration::from_secs(30)
        && started.elapsed() < last_row_at.max(sent_in) + Duration::from_secs(3)
    {
        let now = client.replica().len("Controller_Event");
        if now > rows {
            rows = now;
            last_row_at = started.elapsed();
        }
        if rows < expected {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Storm {
        sent_in,
        rows,
        last_row_at,
        complete: rows >= expected,
    }
}

/// The agent histograms [`latency_breakdown`] reports: (sum, count) of each.
pub(crate) const BREAKDOWN: [(&str, &str); 2] = [
    (
        "unidler_event_latency_seconds",
        "of which: kernel timestamp to row committed (mean)",
    ),
    (
        "unidler_ovsdb_transaction_duration_seconds",
        "of which: the transaction alone (mean)",
    ),
];

/// (sum, count) of each [`BREAKDOWN`] histogram of the agent running in `netns`.
pub(crate) fn histogram_totals(netns: &str) -> [(f64, f64); 2] {
    let metrics = unidler_tests::netns::in_netns(netns, || {
        unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics")
    })
    .unwrap_or_default();
    let get = |name: &str, suffix: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}_{suffix} "))?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    BREAKDOWN.map(|(name, _)| (get(name, "sum"), get(name, "count")))
}

/// Where an event's time goes, from agent histogram totals (summed over agent runs).
pub(crate) fn latency_breakdown(section: &'static str, totals: [(f64, f64); 2]) -> [Figure; 2] {
    std::array::from_fn(|i| {
        let (sum, count) = totals[i];
        figure(section, BREAKDOWN[i].1, sum / count * 1e3, "ms")
    })
}

pub(crate) use unidler_tests::process::cpu_seconds;

pub(crate) fn pid_of(pattern: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-n", "-f", pattern])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
