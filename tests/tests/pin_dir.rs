//! A datapath that outlives the agent (`--pin-dir`): SIGKILL leaves it attached and dropping,
//! the next agent adopts it and reports the hits of the gap, each once; an agent that takes
//! over from another while traffic runs loses nothing; `unidler detach` leaves the interface
//! clean.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::{Agent, agent_binary, southbound_args},
    bpffs::BpfFs,
    netns::{SERVER_V4, Topology, send_frames, syn_to_server},
    ovsdb_server::{self, Southbound, TempDir},
    require_root,
    vips_file::VipsFile,
};

/// Load options for a datapath pinned in `bpffs`.
fn pinned(bpffs: &BpfFs) -> unidler::datapath::LoadOptions {
    unidler::datapath::LoadOptions {
        pin_dir: Some(bpffs.pin_dir().into()),
        ..Default::default()
    }
}

/// A VIPs file with idle VIPs on the server's address at `ports`, and `active` with a backend.
fn vips_file(ports: std::ops::Range<u16>, active: Option<u16>) -> VipsFile {
    let file = VipsFile::new("10.77.0.2:1", "tcp");
    let mut text = String::new();
    for port in ports {
        text += &format!("[[vip]]\nvip = \"{SERVER_V4}:{port}\"\n\n");
    }
    if let Some(port) = active {
        text += &format!("[[vip]]\nvip = \"{SERVER_V4}:{port}\"\nbackends = 1\n");
    }
    file.replace(&text);
    file
}

/// Listeners on the server's address at `ports`: a SYN that gets through connects.
fn listeners(topo: &Topology, ports: impl IntoIterator<Item = u16>) -> Vec<std::net::TcpListener> {
    ports.into_iter().map(|p| topo.listen(p)).collect()
}

/// Rows per VIP (`IP:PORT`) in the Southbound database.
fn rows_per_vip(sb: &impl Southbound) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for row in sb.event_rows() {
        *out.entry(row.event_info["vip"].clone()).or_default() += 1;
    }
    out
}

#[test]
fn after_sigkill_the_datapath_keeps_dropping_and_the_next_agent_reports_the_gap_once() {
    require_root();
    let topo = Topology::new("pk");
    let fs = BpfFs::mount();
    let pin_dir = fs.pin_dir();
    let sb = ovsdb_server::southbound_with_chassis();
    let db = sb.unix_remote();
    let state = TempDir::new("pkstate");
    let vips = vips_file(9001..9011, None);
    let _l = listeners(&topo, 9001..9011);
    let path = vips.path_string();
    let args = [
        southbound_args(&topo.server_if, &db, state.path_str()),
        vec!["--vips-file", &path, "--pin-dir", &pin_dir],
    ]
    .concat();
    let first = Agent::start(&topo.server_ns, &args);
    assert!(!topo.connects(9001), "an idle VIP drops");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rows_per_vip(&sb).is_empty() {
        assert!(Instant::now() < deadline, "no row for the first hit");
        std::thread::sleep(Duration::from_millis(50));
    }

    first.signal(libc::SIGKILL);
    first.wait(Duration::from_secs(5));
    // No agent: the pinned program still drops every attempt (the fail-open time, 15 s, is
    // far off) and records it.
    for port in 9001..9007 {
        assert!(
            !topo.connects(port),
            "{port}: a SYN passed while no agent ran"
        );
    }

    let mut second = Agent::start(&topo.server_ns, &args);
    second.wait_for_log("adopted the pinned attachment", Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    let expected: BTreeMap<String, usize> = (9001..9007)
        .map(|p| (format!("{SERVER_V4}:{p}"), 1))
        .collect();
    loop {
        let rows = rows_per_vip(&sb);
        if rows == expected {
            break;
        }
        assert!(
            Instant::now() < deadline && rows.values().all(|n| *n == 1),
            "rows per VIP {rows:?}, expected {expected:?}; log:\n{}",
            second.log_lines().cloned().collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still dropping, and still one row each.
    assert!(!topo.connects(9002));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rows_per_vip(&sb), expected);
    // The VIP map was adopted, not re-created: the hits before the kill are still counted.
    let vips_json = topo.in_server(|| {
        unidler::telemetry::http_get("127.0.0.1:9478".parse().unwrap(), "/api/vips").unwrap()
    });
    let rows: Vec<serde_json::Value> = serde_json::from_str(&vips_json).unwrap();
    let hits = rows
        .iter()
        .find(|r| r["vip"] == format!("{SERVER_V4}:9001"))
        .and_then(|r| r["hits"].as_u64())
        .unwrap();
    assert!(hits >= 2, "9001 was hit before and during the gap: {hits}");
}

#[test]
fn an_agent_taking_over_while_traffic_runs_loses_nothing() {
    require_root();
    let topo = Topology::new("pt");
    let fs = BpfFs::mount();
    let pin_dir = fs.pin_dir();
    let vips = vips_file(9200..9240, Some(9300));
    let idle_listeners = listeners(&topo, 9200..9240);
    let _active = listeners(&topo, [9300]);
    let path = vips.path_string();
    // Native XDP here (the other tests adopt TC links).
    let args = [
        "run",
        "--iface",
        &topo.server_if,
        "--hook",
        "xdp",
        "--vips-file",
        &path,
        "--pin-dir",
        &pin_dir,
    ];
    let mut first = Agent::start(&topo.server_ns, &args);

    // One SYN to each idle VIP, 50 ms apart, while the client keeps connecting to the
    // active VIP; the agents change over in the middle.
    let traffic = {
        let client_if = topo.client_if.clone();
        let client_ns = topo.client_ns.clone();
        std::thread::spawn(move || {
            let mut failed = 0;
            for port in 9200..9240u16 {
                unidler_tests::netns::in_netns(&client_ns, || {
                    send_frames(
                        &client_if,
                        [syn_to_server(
                            "10.77.0.1".parse().unwrap(),
                            40_000 + port - 9200,
                            port,
                        )],
                    );
                    let active = SocketAddr::new(SERVER_V4.into(), 9300);
                    if std::net::TcpStream::connect_timeout(&active, Duration::from_millis(200))
                        .is_err()
                    {
                        failed += 1;
                    }
                });
                std::thread::sleep(Duration::from_millis(50));
            }
            failed
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    first.signal(libc::SIGTERM);
    let mut reported: Vec<String> = first
        .events_until_quiet(Duration::from_millis(300), Duration::from_secs(5))
        .iter()
        .map(|e| e["vip"].as_str().unwrap().to_owned())
        .collect();
    first.wait(Duration::from_secs(5));
    let mut second = Agent::start(&topo.server_ns, &args);
    let failed = traffic.join().unwrap();
    reported.extend(
        second
            .events_until_quiet(Duration::from_millis(500), Duration::from_secs(5))
            .iter()
            .map(|e| e["vip"].as_str().unwrap().to_owned()),
    );
    assert_eq!(
        failed, 0,
        "connections to the active VIP failed during the change-over"
    );
    reported.sort();
    let expected: Vec<String> = (9200..9240).map(|p| format!("{SERVER_V4}:{p}")).collect();
    assert_eq!(
        reported, expected,
        "every idle hit reported once, by one agent or the other"
    );
    for listener in &idle_listeners {
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "a SYN to an idle VIP got through"
        );
    }
}

#[test]
fn detach_removes_a_pinned_datapath_and_leaves_the_interface_clean() {
    require_root();
    let topo = Topology::new("pd");
    let fs = BpfFs::mount();
    let pin_dir = fs.pin_dir();
    let vips = vips_file(9400..9401, None);
    let _l = listeners(&topo, [9400]);
    let path = vips.path_string();
    let agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            &path,
            "--pin-dir",
            &pin_dir,
        ],
    );
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(5));
    assert!(
        exit.stderr.contains("leaving the datapath attached"),
        "{}",
        exit.stderr
    );
    assert!(
        !topo.connects(9400),
        "after SIGTERM the pinned datapath still drops"
    );

    let out = Command::new("ip")
        .args(["netns", "exec", &topo.server_ns])
        .arg(agent_binary())
        .args(["detach", "--pin-dir", &pin_dir])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&topo.server_if), "{said}");
    // The kernel releases an unpinned link once the bpffs entry is freed (after an RCU grace
    // period): moments, not at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !topo.connects(9400) {
        assert!(Instant::now() < deadline, "after detach nothing drops");
    }
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "the pin directory is gone"
    );
}

#[test]
fn a_pinned_map_of_another_shape_is_recreated_and_said_so() {
    require_root();
    let topo = Topology::new("pm");
    let fs = BpfFs::mount();
    let pin_dir = fs.pin_dir();
    let vips = vips_file(9500..9501, None);
    let path = vips.path_string();
    let args = |max_vips: &'static str| {
        vec![
            "run".to_owned(),
            "--iface".into(),
            topo.server_if.clone(),
            "--vips-file".into(),
            path.clone(),
            "--pin-dir".into(),
            pin_dir.clone(),
            "--max-vips".into(),
            max_vips.into(),
        ]
    };
    let first = Agent::start(
        &topo.server_ns,
        &args("100").iter().map(String::as_str).collect::<Vec<_>>(),
    );
    first.signal(libc::SIGTERM);
    first.wait(Duration::from_secs(5));
    let mut second = Agent::start(
        &topo.server_ns,
        &args("200").iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let line = second.wait_for_log("re-created empty", Duration::from_secs(1));
    assert!(line.contains("VIPS"), "{line}");
    second.wait_for_log("adopted the pinned attachment", Duration::from_secs(1));
    assert!(
        !topo.connects(9500),
        "the re-created map has the idle VIP again"
    );
}

#[test]
fn an_attachment_the_next_agent_does_not_want_is_removed() {
    require_root();
    let topo = Topology::new("pw");
    let fs = BpfFs::mount();
    let pin_dir = fs.pin_dir();
    let vips = vips_file(9600..9601, None);
    let path = vips.path_string();
    // A second interface in the server's namespace.
    let extra = format!("{}x", topo.server_if);
    let peer = format!("{}y", topo.server_if);
    unidler_tests::netns::sh(&[
        "ip",
        "-n",
        &topo.server_ns,
        "link",
        "add",
        &extra,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ]);
    unidler_tests::netns::sh(&["ip", "-n", &topo.server_ns, "link", "set", &extra, "up"]);
    let first = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--iface",
            &extra,
            "--vips-file",
            &path,
            "--pin-dir",
            &pin_dir,
        ],
    );
    first.signal(libc::SIGTERM);
    first.wait(Duration::from_secs(5));
    let pinned =
        |iface: &str| std::path::Path::new(&format!("{pin_dir}/links/tc@{iface}")).exists();
    assert!(
        pinned(&extra) && pinned(&topo.server_if),
        "both attachments pinned"
    );

    let mut second = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            &path,
            "--pin-dir",
            &pin_dir,
        ],
    );
    second.wait_for_log("not wanted here: detached", Duration::from_secs(1));
    assert!(!pinned(&extra), "the unwanted attachment is unpinned");
    assert!(pinned(&topo.server_if), "the wanted one stays");
    assert!(!topo.connects(9600), "and still drops");
}

/// The flows an agent held (or watched for their replay's answer), and its counts of held
/// packets, go with it: the next agent on the same pin directory starts with none. (Flows
/// leaked, 40 more at each restart, until new ones failed at the map's capacity; counts
/// left over would refuse holding packets nobody holds.)
#[test]
fn held_flows_and_counts_do_not_outlive_the_agent_that_held_them() {
    require_root();
    let bpffs = BpfFs::mount();
    let options = pinned(&bpffs);
    let flow = unidler_common::FlowKey {
        proto: 6,
        src_port_be: 40000u16.to_be(),
        ..Default::default()
    };
    {
        let mut first = unidler::datapath::Datapath::load(&options).expect("load");
        first.watch_answer(&flow, 1).unwrap();
        first.set_held(&[(flow.vip(), 3)], 3).unwrap();
        assert_eq!(first.held_flows(), 1);
        assert_eq!(first.held_counts(), (vec![(flow.vip(), 3)], 3));
    }
    let second = unidler::datapath::Datapath::load(&options).expect("load again");
    assert_eq!(second.held_flows(), 0, "the first agent's held flow leaked");
    assert_eq!(
        second.held_counts(),
        (vec![], 0),
        "the first agent's counts leaked"
    );
}

/// The records inside pinned maps and rings have a layout the maps' shapes do not show (a
/// ring's entries, a field's meaning): an agent adopts a pinned datapath only of its own
/// layout version. One of another version has every map re-created.
#[test]
fn pinned_maps_of_another_layout_version_are_recreated() {
    require_root();
    let bpffs = BpfFs::mount();
    let options = pinned(&bpffs);
    let spec: unidler::vip::VipSpec = "10.96.0.10:80/tcp".parse().unwrap();
    let key = spec.vip.key();
    {
        let mut first = unidler::datapath::Datapath::load(&options).expect("load");
        first
            .upsert_vip(key, unidler_common::VipState::default())
            .unwrap();
    }
    {
        let second = unidler::datapath::Datapath::load(&options).expect("load again");
        assert!(second.vip(&key).is_some(), "same layout: adopted");
    }
    let pins = unidler::pinning::PinDir::open(std::path::Path::new(&bpffs.pin_dir())).unwrap();
    assert_eq!(
        pins.layout_version().unwrap(),
        Some(unidler_common::LAYOUT_VERSION)
    );
    pins.write_layout_version(unidler_common::LAYOUT_VERSION - 1)
        .unwrap();
    drop(pins);
    let third = unidler::datapath::Datapath::load(&options).expect("load a third time");
    assert!(
        third.vip(&key).is_none(),
        "maps of another layout version adopted"
    );
    drop(third);
    let pins = unidler::pinning::PinDir::open(std::path::Path::new(&bpffs.pin_dir())).unwrap();
    assert_eq!(
        pins.layout_version().unwrap(),
        Some(unidler_common::LAYOUT_VERSION),
        "the re-created maps carry this agent's version"
    );
}

/// One agent per pin directory: a second one is refused clearly instead of reading the same
/// rings (each event printed twice, held datagrams delivered twice), and so is `detach` while
/// the agent runs; once it is gone, both work.
#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused() {
    require_root();
    let topo = Topology::new("pl");
    let bpffs = BpfFs::mount();
    let pin_dir = bpffs.pin_dir();
    let vip = format!("{SERVER_V4}:8080/tcp");
    let args = |api: &'static str, metrics: &'static str| {
        vec![
            "run".to_owned(),
            "--iface".to_owned(),
            topo.server_if.clone(),
            "--vip".to_owned(),
            vip.clone(),
            "--pin-dir".to_owned(),
            pin_dir.clone(),
            "--api-addr".to_owned(),
            api.to_owned(),
            "--metrics-addr".to_owned(),
            metrics.to_owned(),
        ]
    };
    let first_args = args("127.0.0.1:19588", "127.0.0.1:19589");
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let first = Agent::start(&topo.server_ns, &first_args);
    let second_args = args("127.0.0.1:19590", "127.0.0.1:19591");
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let second = Agent::run_to_exit(&topo.server_ns, &second_args);
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("in use by another unidler"),
        "{}",
        second.stderr
    );
    let detach = Agent::run_to_exit(&topo.server_ns, &["detach", "--pin-dir", &pin_dir]);
    assert_ne!(
        detach.code,
        Some(0),
        "detach while the agent runs: {}",
        detach.stderr
    );
    assert!(
        detach.stderr.contains("in use by another unidler"),
        "{}",
        detach.stderr
    );
    first.signal(libc::SIGTERM);
    let exit = first.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    let detach = Agent::run_to_exit(&topo.server_ns, &["detach", "--pin-dir", &pin_dir]);
    assert_eq!(detach.code, Some(0), "{}", detach.stderr);
}

/// Holding is off until the agent turns it on: an agent with `--hold-max-age 0` that adopts
/// the pinned maps of one that held does not leave the kernel copying packets nobody replays.
#[test]
fn holding_does_not_outlive_the_agent_that_turned_it_on() {
    require_root();
    let bpffs = BpfFs::mount();
    let options = pinned(&bpffs);
    {
        let mut first = unidler::datapath::Datapath::load(&options).expect("load");
        first.start_holding(64, 8_192).unwrap();
        assert!(first.is_holding());
    }
    let second = unidler::datapath::Datapath::load(&options).expect("load again");
    assert!(!second.is_holding(), "the first agent's holding stayed on");
}
