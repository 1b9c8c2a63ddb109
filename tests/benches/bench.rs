//! `cargo xtask bench`: how fast unidler is, each figure beside a baseline measured in the
//! same run. Reports; never passes or fails. Writes `target/bench/results.json`.
//!
//! 1. per-packet cost in the kernel (BPF_PROG_TEST_RUN) against a do-nothing XDP program;
//! 2. end-to-end latency, connection attempt → Controller_Event row seen by a monitoring client;
//! 3. wake-up storm: 10,000 idle VIPs hit at once;
//! 4. SYN floods to one and to 10,000 idle VIPs: what reaches userspace, and the CPU it costs;
//! 5. VIP sync: 10,000 and 100,000 VIPs from the Southbound database, one incremental change,
//!    and the agent's resident memory.
//!
//! Arguments: section numbers to run (default all), e.g. `cargo xtask bench -- 1 3`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use ovsdb::{Client, ClientOptions, MonitorRequest, Remote};
use serde_json::json;
use unidler::{
    datapath::{Datapath, LoadOptions},
    vip::VipSpec,
};
use unidler_common::{RateLimitConfig, VipState};
use unidler_tests::{
    agent::{Agent, southbound_args},
    frames::{Frame, Ipv6Ext, L4, TCP_ACK},
    load_balancers::LoadBalancers,
    netns::{CLIENT_MAC, CLIENT_V4, SERVER_MAC, SERVER_V4, Topology, send_frames},
    ovsdb_server::{OvsdbServer, TempDir},
};

/// One reported figure.
struct Figure {
    section: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    /// (baseline name, baseline value) measured in the same run.
    baseline: Option<(String, f64)>,
    target: Option<String>,
}

fn figure(
    section: &'static str,
    name: impl Into<String>,
    value: f64,
    unit: &'static str,
) -> Figure {
    Figure {
        section,
        name: name.into(),
        value,
        unit,
        baseline: None,
        target: None,
    }
}

impl Figure {
    fn vs(mut self, name: impl Into<String>, value: f64) -> Self {
        self.baseline = Some((name.into(), value));
        self
    }
    fn target(mut self, t: impl Into<String>) -> Self {
        self.target = Some(t.into());
        self
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "benchmarks need root (BPF, namespaces)"
    );
    let wanted: HashSet<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |n: &str| wanted.is_empty() || wanted.contains(n);
    let mut figures = Vec::new();
    if run("1") {
        figures.extend(per_packet());
    }
    if run("2") {
        figures.extend(latency());
    }
    if run("3") {
        figures.extend(storm());
    }
    if run("4") {
        figures.extend(flood());
    }
    if run("5") {
        figures.extend(vip_sync());
    }
    print_table(&figures);
    write_json(&figures);
}

// ------------------------------------------------------------------ 1. per packet

const LO: u32 = 1;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn per_packet() -> Vec<Figure> {
    let mut out = Vec::new();
    let client4 = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 7));
    let client6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7));
    let vip4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
    let other4 = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
    let other6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1));
    for vips in [10u32, 100_000] {
        let mut dp = Datapath::load(&LoadOptions {
            rate_limits: RateLimitConfig::new(
                1_000_000_000,
                1_000_000_000,
                1_000_000_000,
                1_000_000_000,
            ),
            kernel_log_level: 0,
        })
        .expect("load");
        let mut ring = dp.take_events().unwrap();
        // Filler VIPs, plus the ones the frames use.
        for i in 0..vips {
            let spec: VipSpec = format!(
                "10.{}.{}.{}:80/tcp",
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
            .parse()
            .unwrap();
            dp.upsert_vip(
                spec.vip.key(),
                VipState {
                    vip_id: i + 10,
                    ..VipState::default()
                },
            )
            .unwrap();
        }
        let add = |dp: &mut Datapath, s: &str, backends: u32| {
            let spec: VipSpec = s.parse().unwrap();
            dp.upsert_vip(
                spec.vip.key(),
                VipState {
                    backends,
                    vip_id: 1,
                    ..VipState::default()
                },
            )
            .unwrap();
        };
        add(&mut dp, "10.96.0.10:80/tcp", 0);
        add(&mut dp, "10.96.0.10:443/tcp", 3);
        let syn = |src, dst, port| Frame::tcp_syn(src, 40000, dst, port);
        let mut vlan = syn(client4, other4, 80);
        vlan.vlans = vec![(0x8100, 100)];
        let mut frag = syn(client4, vip4, 80);
        frag.ipv4_fragment = (100, false);
        let mut v6ext = syn(client6, other6, 80);
        v6ext.ipv6_ext = vec![Ipv6Ext::HopByHop { len8: 0 }];
        let ack = Frame::new(
            client4,
            vip4,
            L4::Tcp {
                src: 40000,
                dst: 443,
                flags: TCP_ACK,
            },
        );
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "non-VIP IPv4 TCP SYN",
                syn(client4, other4, 80).build(),
                false,
            ),
            (
                "non-VIP IPv6 TCP SYN",
                syn(client6, other6, 80).build(),
                false,
            ),
            ("non-VIP IPv6 SYN + hop-by-hop", v6ext.build(), false),
            (
                "VIP with backends, SYN",
                syn(client4, vip4, 443).build(),
                false,
            ),
            ("VIP with backends, ACK", ack.build(), false),
            ("VLAN-tagged non-VIP", vlan.build(), false),
            ("IPv4 non-first fragment", frag.build(), false),
            (
                "idle VIP SYN, event written",
                syn(client4, vip4, 80).build(),
                true,
            ),
        ];
        let base_frame = syn(client4, other4, 80).build();
        let baseline = median(
            (0..5)
                .map(|_| dp.baseline_test_run(&base_frame, LO, 200_000).unwrap().1 as f64)
                .collect(),
        );
        out.push(figure(
            "1 per-packet",
            format!("empty XDP program ({vips} VIPs)"),
            baseline,
            "ns",
        ));
        for (name, frame, writes) in cases {
            let runs: Vec<f64> = (0..5)
                .map(|_| {
                    // The ring holds ~14,500 events: drain between batches so writes really happen.
                    let repeat = if writes { 5_000 } else { 200_000 };
                    let ns = dp.test_run_repeat(&frame, LO, repeat).unwrap().1 as f64;
                    ring.drain(|_| {});
                    ns
                })
                .collect();
            let ns = median(runs);
            let target = if name.starts_with("non-VIP") {
                "within 1.5x of empty"
            } else if writes {
                "within 4x of empty"
            } else {
                ""
            };
            let f = figure("1 per-packet", format!("{name} ({vips} VIPs)"), ns, "ns")
                .vs("empty", baseline);
            out.push(if target.is_empty() {
                f
            } else {
                f.target(target)
            });
        }
        // Suppressed by the per-VIP limit: a fresh datapath with burst 1, rate 1/s.
        drop(dp);
        let mut limited = Datapath::load(&LoadOptions {
            rate_limits: RateLimitConfig::new(1, 1, 1_000_000, 1_000_000),
            kernel_log_level: 0,
        })
        .unwrap();
        add(&mut limited, "10.96.0.10:80/tcp", 0);
        let f = syn(client4, vip4, 80).build();
        let ns = median(
            (0..5)
                .map(|_| limited.test_run_repeat(&f, LO, 200_000).unwrap().1 as f64)
                .collect(),
        );
        let base = median(
            (0..5)
                .map(|_| limited.baseline_test_run(&f, LO, 200_000).unwrap().1 as f64)
                .collect(),
        );
        out.push(
            figure(
                "1 per-packet",
                format!("idle VIP SYN, rate-limited ({vips} VIPs)"),
                ns,
                "ns",
            )
            .vs("empty", base),
        );
    }
    out
}

// ------------------------------------------------------------------ shared setup

/// A Southbound server with chassis-1, a namespace pair, and a release agent on the server end.
struct Bed {
    topo: Topology,
    sb: OvsdbServer,
    _state: TempDir,
    agent: Agent,
    rt: tokio::runtime::Runtime,
    client: Client,
}

fn bed(prefix: &str, vips: &[String], extra: &[&str]) -> Bed {
    let topo = Topology::new(prefix);
    let sb = OvsdbServer::southbound_with_chassis();
    let state = TempDir::new("bstate");
    let db = sb.unix_remote();
    let state_dir = state.0.to_str().unwrap().to_owned();
    let mut args = southbound_args(&topo.server_if, &db, &state_dir);
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let mut o = ClientOptions::new(
            Remote::parse_list(&sb.unix_remote()).unwrap(),
            "OVN_Southbound",
        );
        o.leader_only = false;
        o.monitors =
            vec![MonitorRequest::table("Controller_Event").columns(&["event_info", "seq_num"])];
        let c = Client::start(o).unwrap();
        c.wait_connected(Duration::from_secs(10)).await.unwrap();
        c
    });
    Bed {
        topo,
        sb,
        _state: state,
        agent,
        rt,
        client,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A non-blocking TCP connect from the client namespace: sends one real SYN and returns
/// the instant just before it.
fn syn_from_client(topo: &Topology, port: u16) -> Instant {
    topo.in_client(|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        let to = SocketAddr::new(SERVER_V4.into(), port);
        let t = Instant::now();
        let _ = socket.connect(&to.into());
        // Keep the socket open long enough for the SYN to leave.
        std::mem::forget(socket);
        t
    })
}

// ------------------------------------------------------------------ 2. latency

fn latency() -> Vec<Figure> {
    let n = 250u16;
    let vips: Vec<String> = (0..n)
        .map(|i| format!("10.77.0.2:{}/tcp", 10_000 + i))
        .collect();
    let bed = bed("bl", &vips, &[]);
    let mut changes = bed.client.subscribe();
    let mut lat = Vec::new();
    for i in 0..n {
        let want = format!("10.77.0.2:{}", 10_000 + i);
        let sent = syn_from_client(&bed.topo, 10_000 + i);
        let seen = bed.rt.block_on(async {
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
                        return Some(Instant::now());
                    }
                }
            }
        });
        if let Some(seen) = seen {
            lat.push(seen.duration_since(sent).as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort_by(f64::total_cmp);
    // Where the time goes, from the agent's own histograms.
    let metrics = bed
        .topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
        .unwrap_or_default();
    let mean_ms = |name: &str| {
        let get = |suffix: &str| {
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
        get("sum") / get("count") * 1e3
    };
    let breakdown = [
        figure(
            "2 latency",
            "of which: kernel timestamp to row committed (mean)",
            mean_ms("unidler_event_latency_seconds"),
            "ms",
        ),
        figure(
            "2 latency",
            "of which: the transaction alone (mean)",
            mean_ms("unidler_ovsdb_transaction_duration_seconds"),
            "ms",
        ),
    ];
    let mut out = vec![
        figure("2 latency", "events measured", lat.len() as f64, "events"),
        figure(
            "2 latency",
            "SYN to row at a monitoring client, p50",
            percentile(&lat, 0.5),
            "ms",
        )
        .vs("OVN p50 (ovn-baseline.sh)", 1.2)
        .target("at most half of OVN"),
        figure("2 latency", "SYN to row, p90", percentile(&lat, 0.9), "ms")
            .vs("OVN p90 (ovn-baseline.sh)", 1.45),
        figure("2 latency", "SYN to row, p99", percentile(&lat, 0.99), "ms").target("under 2 ms"),
    ];
    out.extend(breakdown);
    out
}

// ------------------------------------------------------------------ 3. storm

fn storm() -> Vec<Figure> {
    let n = 10_000u32;
    let vips: Vec<String> = (0..n)
        .map(|i| format!("10.77.0.2:{}/tcp", 20_000 + i))
        .collect();
    let bed = bed(
        "bs",
        &vips,
        &["--event-rate", "100000", "--event-burst", "20000"],
    );
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = Frame::tcp_syn(
                CLIENT_V4.into(),
                1024 + (i % 60000) as u16,
                SERVER_V4.into(),
                20_000 + i as u16,
            );
            f.src_mac = CLIENT_MAC;
            f.dst_mac = SERVER_MAC;
            f.build()
        })
        .collect();
    let started = Instant::now();
    let topo = &bed.topo;
    topo.in_client(|| send_frames(&topo.client_if, frames));
    let sent_in = started.elapsed();
    let deadline = started + Duration::from_secs(30);
    let mut rows = 0;
    while Instant::now() < deadline {
        rows = bed.client.replica().len("Controller_Event");
        if rows >= n as usize {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let all_in = started.elapsed();
    vec![
        figure(
            "3 storm",
            "SYNs sent (distinct idle VIPs)",
            n as f64,
            "packets",
        ),
        figure(
            "3 storm",
            "time to send them",
            sent_in.as_secs_f64() * 1e3,
            "ms",
        ),
        figure("3 storm", "rows written", rows as f64, "rows").target("all 10,000"),
        figure(
            "3 storm",
            "time until every row exists",
            all_in.as_secs_f64() * 1e3,
            "ms",
        )
        .target("within 2,000 ms"),
        figure(
            "3 storm",
            "rows per second",
            rows as f64 / all_in.as_secs_f64(),
            "rows/s",
        ),
    ]
}

// ------------------------------------------------------------------ 4. flood

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn pid_of(pattern: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-n", "-f", pattern])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn flood() -> Vec<Figure> {
    let mut out = Vec::new();
    for targets in [1u32, 10_000] {
        let vips: Vec<String> = (0..targets)
            .map(|i| format!("10.77.0.2:{}/tcp", 20_000 + i))
            .collect();
        let bed = bed("bf", &vips, &[]);
        let agent_pid = bed.agent.pid();
        let sb_pid = pid_of(&bed.sb.dir.join("sb.db").to_string_lossy()).unwrap_or(0);
        // Precomputed frames from many spoofed sources, sent in a loop for 10 s.
        let frames: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| {
                let src = IpAddr::from([10, 78, (i / 250 % 250) as u8, (i % 250) as u8 + 1]);
                let mut f = Frame::tcp_syn(
                    src,
                    1024 + (i % 60000) as u16,
                    SERVER_V4.into(),
                    20_000 + (i % targets) as u16,
                );
                f.src_mac = CLIENT_MAC;
                f.dst_mac = SERVER_MAC;
                f.build()
            })
            .collect();
        let (a0, s0) = (cpu_seconds(agent_pid), cpu_seconds(sb_pid));
        let started = Instant::now();
        let topo = &bed.topo;
        let sent = topo.in_client(|| {
            let mut sent = 0usize;
            while started.elapsed() < Duration::from_secs(10) {
                sent += send_frames(&topo.client_if, frames.iter().cloned());
            }
            sent
        });
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let (a1, s1) = (cpu_seconds(agent_pid), cpu_seconds(sb_pid));
        let rows = bed.client.replica().len("Controller_Event");
        let label = if targets == 1 {
            "1 idle VIP"
        } else {
            "10,000 idle VIPs"
        };
        out.push(figure(
            "4 flood",
            format!("{label}: SYNs generated per second"),
            sent as f64 / secs,
            "pps",
        ));
        out.push(
            figure(
                "4 flood",
                format!("{label}: rows written"),
                rows as f64,
                "rows",
            )
            .target(if targets == 1 {
                "1"
            } else {
                "within the rate limits"
            }),
        );
        out.push(
            figure(
                "4 flood",
                format!("{label}: agent CPU"),
                (a1 - a0) / secs * 100.0,
                "% of a core",
            )
            .target("under 5%"),
        );
        out.push(figure(
            "4 flood",
            format!("{label}: ovsdb-server CPU"),
            (s1 - s0) / secs * 100.0,
            "% of a core",
        ));
    }
    out
}

// ------------------------------------------------------------------ 5. VIP sync

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn vip_sync() -> Vec<Figure> {
    let mut out = Vec::new();
    {
        let bed = bed("bi", &[], &[]);
        std::thread::sleep(Duration::from_millis(500));
        out.push(figure(
            "5 VIP sync",
            "agent RSS at idle (no VIPs)",
            rss_mb(bed.agent.pid()),
            "MB",
        ));
    }
    for total in [10_000u32, 100_000] {
        let topo = Topology::new("bv");
        let sb = OvsdbServer::southbound_with_chassis();
        let per_lb = 100;
        let lbs = LoadBalancers::insert(&sb, total, per_lb);
        let state = TempDir::new("vstate");
        let db = sb.unix_remote();
        let state_dir = state.0.to_str().unwrap().to_owned();
        let started = Instant::now();
        let mut args = southbound_args(&topo.server_if, &db, &state_dir);
        args.extend(["--log-level", "info,unidler=debug"]);
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log(&format!("vips={total} "), Duration::from_secs(60));
        let load = figure(
            "5 VIP sync",
            format!("{total} VIPs: agent start to map synced"),
            started.elapsed().as_secs_f64() * 1e3,
            "ms",
        );
        out.push(if total == 100_000 {
            load.target("within 3,000 ms")
        } else {
            load
        });
        let changed = Instant::now();
        lbs.set_backends(7, "10.0.0.1:80");
        agent.wait_for_log(
            &format!("VIP map updated changes={per_lb} "),
            Duration::from_secs(10),
        );
        out.push(
            figure(
                "5 VIP sync",
                format!("{total} VIPs: one load balancer changed, commit to map"),
                changed.elapsed().as_secs_f64() * 1e3,
                "ms",
            )
            .target("within 10 ms"),
        );
        let rss = figure(
            "5 VIP sync",
            format!("agent RSS with {total} VIPs"),
            rss_mb(agent.pid()),
            "MB",
        );
        out.push(if total == 100_000 {
            rss.target("under 50 MB")
        } else {
            rss
        });
    }
    out
}

// ------------------------------------------------------------------ output

fn print_table(figures: &[Figure]) {
    println!();
    let header = [
        "SECTION", "FIGURE", "VALUE", "UNIT", "BASELINE", "RATIO", "TARGET",
    ];
    println!(
        "{:<14} {:<58} {:>12} {:<11} {:>26} {:>7}  {}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6]
    );
    for f in figures {
        let (base, ratio) = match &f.baseline {
            Some((name, v)) => (format!("{name} {v:.1}"), format!("{:.2}x", f.value / v)),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<14} {:<58} {:>12.2} {:<11} {:>26} {:>7}  {}",
            f.section,
            f.name,
            f.value,
            f.unit,
            base,
            ratio,
            f.target.as_deref().unwrap_or("")
        );
    }
}

fn write_json(figures: &[Figure]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let doc = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "figures": figures.iter().map(|f| json!({
            "section": f.section, "name": f.name, "value": f.value, "unit": f.unit,
            "baseline": f.baseline.as_ref().map(|(n, v)| json!({"name": n, "value": v})),
            "ratio": f.baseline.as_ref().map(|(_, v)| f.value / v),
            "target": f.target,
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nresults written to {}", path.display());
}
