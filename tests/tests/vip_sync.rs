//! The VIP map follows OVN's Load_Balancer table (through a real ovn-northd) or a static file.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::{Agent, southbound_args},
    eventually,
    frames::Frame,
    load_balancers::{FollowingAgent, LoadBalancers},
    netns::{CLIENT_MAC, CLIENT_V4, SERVER_MAC, Topology, send_frames},
    ovsdb_server::{self, EventRow, OvnCentral, OvsdbServer, Southbound, TempDir},
    prometheus::sample,
    require_root,
};

const WAIT: Duration = Duration::from_secs(30);

/// How many Controller_Event rows `sb` has.
fn row_count(sb: &OvsdbServer) -> usize {
    sb.event_rows().len()
}

/// Waits until connections get through, then checks that they raise no event. (Attempts
/// made while the agent was still learning the change may have raised one: cleared first.)
#[track_caller]
fn passes_without_event(topo: &Topology, sb: &OvsdbServer, what: &str) {
    eventually(what, WAIT, || topo.connects(80));
    sb.sbctl(&["--all", "destroy", "Controller_Event"]);
    assert!(topo.connects(80), "{what}: still passing");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(row_count(sb), 0, "{what}: no event");
}

#[test]
fn load_balancers_from_ovn_northd_drive_events_and_traffic() {
    require_root();
    let topo = Topology::new("vo");
    let ovn = OvnCentral::with_idle_load_balancer("10.77.0.2:80");
    let lb_uuid = ovn.nbctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "load_balancer",
        "name=lb0",
    ]);
    let _l = topo.listen(80);
    let state = TempDir::new("vstate");
    let db = ovn.sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("vips=1", WAIT);

    // Idle with event=true: the SYN is dropped and the row names the NB load balancer.
    assert!(!topo.connects(80));
    eventually("the Controller_Event row", WAIT, || row_count(&ovn.sb) == 1);
    let row = &ovn.sb.event_rows()[0];
    assert_eq!(row.event_info["load_balancer"], lb_uuid.trim());
    assert_eq!(row.event_info["vip"], "10.77.0.2:80");
    ovn.sb.sbctl(&["--all", "destroy", "Controller_Event"]);

    // Backends return: traffic flows, no event.
    ovn.set_backends("10.77.0.2:80", "10.0.0.5:80");
    passes_without_event(&topo, &ovn.sb, "traffic to flow with backends");

    // Idled again: caught again.
    ovn.set_backends("10.77.0.2:80", "");
    eventually("the SYN to be dropped again", WAIT, || !topo.connects(80));
    eventually("a new row", WAIT, || row_count(&ovn.sb) == 1);
    ovn.sb.sbctl(&["--all", "destroy", "Controller_Event"]);

    // reject=true wins over event: the packet goes on (to OVN, which would reject it).
    ovn.nbctl(&[
        "--wait=sb",
        "set",
        "load_balancer",
        "lb0",
        "options:reject=true",
    ]);
    passes_without_event(&topo, &ovn.sb, "reject to let the packet pass");
    // Neither reject nor event: not reported either.
    // (Both in one transaction: in between, the VIP would be reportable again.)
    ovn.nbctl(&[
        "--wait=sb",
        "remove",
        "load_balancer",
        "lb0",
        "options",
        "reject",
        "--",
        "remove",
        "load_balancer",
        "lb0",
        "options",
        "event",
    ]);
    passes_without_event(&topo, &ovn.sb, "event=false to let the packet pass");
    // The global controller_event option turns it back on for every load balancer.
    ovn.nbctl(&[
        "--wait=sb",
        "set",
        "NB_Global",
        ".",
        "options:controller_event=true",
    ]);
    eventually("the global option", WAIT, || !topo.connects(80));
    eventually("a row again", WAIT, || row_count(&ovn.sb) == 1);

    // The load balancer goes away: so does the VIP.
    ovn.nbctl(&["--wait=sb", "lb-del", "lb0"]);
    eventually("the VIP to leave the map", WAIT, || topo.connects(80));
}

#[test]
fn a_vips_file_is_followed_and_a_bad_one_keeps_the_last_good_state() {
    require_root();
    let topo = Topology::new("vf");
    let _l = topo.listen(80);
    let dir = TempDir::new("vfile");
    let file = dir.join("vips.toml");
    let write = |text: &str| {
        // Write then rename, as an editor or a ConfigMap update would.
        let tmp = dir.join("vips.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("[[vip]]\nvip = \"10.77.0.2:80\"\nload_balancer = \"lb-file\"\n");
    let mut agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(!topo.connects(80));
    let event = agent.next_event(Duration::from_secs(5)).expect("an event");
    assert_eq!(event["vip"], "10.77.0.2:80");
    assert_eq!(event["load_balancer"], "lb-file");

    write("[[vip]]\nvip = \"10.77.0.2:80\"\nbackends = 2\n");
    eventually("the reload to activate the VIP", WAIT, || topo.connects(80));

    write("[[vip]]\nvip = \"10.77.0.2:80\"\nbackends = \"lots\"\n");
    agent.wait_for_log("VIPs file rejected", WAIT);
    assert!(
        agent.log.iter().any(|l| l.contains("line 3")),
        "{:?}",
        agent.log
    );
    assert!(topo.connects(80), "the last good state stays");

    write("[[vip]]\nvip = \"10.77.0.2:80\"\n");
    eventually("idle again", WAIT, || !topo.connects(80));

    // A bad file at start is an error, with the line.
    write("[[vip]]\nvip = \"10.77.0.2\"\n");
    let exit = Agent::run_to_exit(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            file.to_str().unwrap(),
            // The first agent still serves 9477 and 9478 in this namespace.
            "--metrics-addr",
            "127.0.0.1:9479",
            "--api-addr",
            "127.0.0.1:9480",
        ],
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(exit.stderr.contains("line 2"), "{}", exit.stderr);
}

#[test]
fn one_hundred_thousand_vips_load_from_the_southbound_database() {
    require_root();
    let per_lb = 100;
    // Kept whole: its namespaces and server live as long as it does.
    let mut following = FollowingAgent::start("vs", 100_000, per_lb);
    let sync_time = following.sync.total;
    println!("100,000 VIPs: agent start to map synced in {sync_time:?}");

    // One incremental change: one load balancer gets backends.
    let changed = Instant::now();
    following.lbs.set_backends(7, "10.0.0.1:80");
    let line = following
        .agent
        .wait_for_log(&format!("VIP map updated changes={per_lb} "), WAIT);
    println!(
        "one load balancer changed: applied {:?} after the commit ({line})",
        changed.elapsed()
    );
}

#[test]
fn a_resync_after_reconnect_removes_vips_the_database_lost() {
    require_root();
    let topo = Topology::new("vr");
    let _l = topo.listen(80);
    let mut sb = ovsdb_server::southbound_with_chassis();
    sb.sbctl(&[
        "create",
        "Load_Balancer",
        "name=lb0",
        "protocol=tcp",
        "options:event=true",
        "vips:\"10.77.0.2:80\"=\"\"",
    ]);
    let state = TempDir::new("rstate");
    let db = sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let _agent = Agent::start(&topo.server_ns, &args);
    eventually("the VIP to be watched", WAIT, || !topo.connects(80));
    // While the agent is away from the database, the load balancer goes.
    sb.kill();
    let db_file = sb.dir.join("sb.db");
    unidler_tests::ovsdb_server::run(
        Command::new("ovsdb-tool")
            .arg("transact")
            .arg(&db_file)
            .arg(r#"["OVN_Southbound",{"op":"delete","table":"Load_Balancer","where":[]}]"#),
    );
    sb.start();
    eventually("the resync to drop the VIP", WAIT, || topo.connects(80));
}

/// The load balancers the agent follows, and its map's idle and active VIPs, from its metrics.
#[track_caller]
fn followed(topo: &Topology) -> (f64, f64, f64) {
    let metrics = topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
        .expect("/metrics");
    let sample = |series: &str| {
        unidler_tests::prometheus::sample(&metrics, series)
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    (
        sample("unidler_ovn_load_balancers"),
        sample("unidler_vips{state=\"idle\"}"),
        sample("unidler_vips{state=\"active\"}"),
    )
}

/// Every load balancer is followed, and the VIPs of those that report enter the map:
/// `options:event=true`, or every one while `SB_Global` has `options:controller_event=true`,
/// never one with `options:reject=true` (any of `true`, `TRUE`, `True`, as northd reads them).
/// One that starts or stops reporting brings its VIP into the map or takes it out.
#[test]
fn the_vips_of_load_balancers_that_report_are_watched() {
    require_root();
    let topo = Topology::new("vc");
    let _l = topo.listen(80);
    let sb = ovsdb_server::southbound_with_chassis();
    // Twenty active services (no event option, as ovn-kubernetes leaves them), one idle.
    for i in 0..20 {
        sb.sbctl(&[
            "create",
            "Load_Balancer",
            &format!("name=active{i}"),
            "protocol=tcp",
            &format!("vips:\"10.96.1.{i}:80\"=\"10.0.0.1:8080\""),
        ]);
    }
    sb.sbctl(&[
        "create",
        "Load_Balancer",
        "name=idle",
        "protocol=tcp",
        "options:event=true",
        "vips:\"10.77.0.2:80\"=\"\"",
    ]);
    let state = TempDir::new("cstate");
    let db = sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("VIP map synced vips=1 ", WAIT);
    assert_eq!(followed(&topo), (21.0, 1.0, 0.0), "the idle one's VIP only");
    assert!(!topo.connects(80), "the idle VIP is watched");

    // An active one that reports: its VIP enters the map.
    sb.sbctl(&["set", "Load_Balancer", "active3", "options:event=TRUE"]);
    eventually("active3's VIP in the map", WAIT, || {
        followed(&topo) == (21.0, 1.0, 1.0)
    });
    // Rejecting wins over reporting (OVN rejects, it does not report): the idle one's VIP
    // leaves the map while it rejects, and comes back when it no longer does.
    sb.sbctl(&["set", "Load_Balancer", "idle", "options:reject=True"]);
    eventually("the rejecting one's VIP out of the map", WAIT, || {
        followed(&topo) == (21.0, 0.0, 1.0)
    });
    assert!(topo.connects(80), "a rejecting load balancer's VIP passes");
    sb.sbctl(&["set", "Load_Balancer", "idle", "options:reject=false"]);
    eventually("its VIP watched again", WAIT, || {
        followed(&topo) == (21.0, 1.0, 1.0)
    });
    assert!(!topo.connects(80), "watched again");

    // The global option makes every load balancer report, but a rejecting one.
    sb.sbctl(&["set", "Load_Balancer", "active5", "options:reject=true"]);
    sb.sbctl(&["set", "SB_Global", ".", "options:controller_event=true"]);
    eventually("every VIP but the rejecting one's", WAIT, || {
        followed(&topo) == (21.0, 1.0, 19.0)
    });

    // The idle one stops reporting itself: the global option still makes it report.
    sb.sbctl(&["remove", "Load_Balancer", "idle", "options", "event"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(followed(&topo), (21.0, 1.0, 19.0));
    assert!(!topo.connects(80), "reports through the global option");

    // Without the global option, only active3 reports: the idle VIP leaves the map.
    sb.sbctl(&["remove", "SB_Global", ".", "options", "controller_event"]);
    eventually("active3's VIP alone", WAIT, || {
        followed(&topo) == (21.0, 0.0, 1.0)
    });
    passes_without_event(
        &topo,
        &sb,
        "the VIP of a load balancer that stopped reporting",
    );
}

/// A VIP idle in a load balancer that reports and with backends in one that does not (tenants
/// reusing an address; a cluster-wide and a per-node load balancer of one VIP) is forwarded by
/// OVN: it passes, and no row names it. Through the real monitor, not rows fed to the source.
#[test]
fn a_vip_with_backends_in_a_load_balancer_that_does_not_report_passes() {
    require_root();
    let topo = Topology::new("vn");
    let _l = topo.listen(80);
    let sb = ovsdb_server::southbound_with_chassis();
    sb.sbctl(&[
        "create",
        "Load_Balancer",
        "name=lba",
        "protocol=tcp",
        "options:event=true",
        "vips:\"10.77.0.2:80\"=\"\"",
    ]);
    sb.sbctl(&[
        "create",
        "Load_Balancer",
        "name=lbb",
        "protocol=tcp",
        "vips:\"10.77.0.2:80\"=\"10.0.0.1:8080\"",
    ]);
    let state = TempDir::new("nstate");
    let db = sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("VIP map synced vips=1 ", WAIT);
    assert_eq!(followed(&topo), (2.0, 0.0, 1.0), "active through lbb");
    passes_without_event(&topo, &sb, "a VIP lbb forwards");
    // lbb's backend goes: idle, watched.
    sb.sbctl(&["set", "Load_Balancer", "lbb", "vips:\"10.77.0.2:80\"=\"\""]);
    eventually("idle once lbb has no backend", WAIT, || {
        followed(&topo) == (2.0, 1.0, 0.0)
    });
    assert!(
        !topo.connects(80),
        "watched once no load balancer forwards it"
    );
}

/// The Southbound schema of OVN 23.09 and later, as far as the agent reads it: a load
/// balancer's logical switches and routers in `ls_datapath_group` and `lr_datapath_group`.
/// Written into `dir`; returns its path.
fn schema_with_switch_and_router_groups(dir: &TempDir) -> String {
    let text = std::fs::read_to_string(ovsdb_server::SB_SCHEMA).expect("the Southbound schema");
    let mut schema: serde_json::Value = serde_json::from_str(&text).expect("schema JSON");
    let group = serde_json::json!({"type": {
        "key": {"type": "uuid", "refTable": "Logical_DP_Group"}, "min": 0, "max": 1}});
    let columns = schema["tables"]["Load_Balancer"]["columns"]
        .as_object_mut()
        .expect("Load_Balancer columns");
    columns.insert("ls_datapath_group".into(), group.clone());
    columns.insert("lr_datapath_group".into(), group);
    let path = dir.join("ovn-sb-newer.ovsschema");
    std::fs::write(&path, schema.to_string()).expect("write the schema");
    path.to_str().expect("a UTF-8 path").to_owned()
}

/// From OVN 23.09, northd names a load balancer's logical switches in `ls_datapath_group` (its
/// routers in `lr_datapath_group`) and leaves `datapath_group` empty: the agent asks for those
/// columns where the Southbound schema has them (and not where it does not: the other tests
/// run OVN 23.03's), and a load balancer applies where they say.
#[test]
fn the_switch_groups_of_newer_ovn_say_where_a_load_balancer_applies() {
    require_root();
    let topo = Topology::new("vg");
    let _l = topo.listen(80);
    let dir = TempDir::new("vgschema");
    let sb = OvsdbServer::standalone(
        "sb",
        &schema_with_switch_and_router_groups(&dir),
        ovsdb_server::Listen::default(),
    );
    sb.sbctl(&["chassis-add", ovsdb_server::CHASSIS, "geneve", "127.0.0.1"]);
    let chassis = sb
        .sbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Chassis",
            &format!("name={}", ovsdb_server::CHASSIS),
        ])
        .trim()
        .to_owned();
    // Switch 1 has a port of this node, switch 2 none; a load balancer on each (through a
    // group of its own), both idle. ovn-sbctl does not know the new columns: ovsdb-client.
    let lb = |name: &str, vip: &str, group: &str| {
        serde_json::json!({"op": "insert", "table": "Load_Balancer", "row": {
            "name": name, "vips": ["map", [[vip, ""]]], "protocol": "tcp",
            "options": ["map", [["event", "true"]]],
            "ls_datapath_group": ["named-uuid", group]}})
    };
    let txn = serde_json::json!([
        "OVN_Southbound",
        {"op": "insert", "table": "Datapath_Binding", "row": {"tunnel_key": 101}, "uuid-name": "sw1"},
        {"op": "insert", "table": "Datapath_Binding", "row": {"tunnel_key": 102}, "uuid-name": "sw2"},
        {"op": "insert", "table": "Port_Binding", "row": {
            "logical_port": "pod-a", "tunnel_key": 1, "datapath": ["named-uuid", "sw1"],
            "chassis": ["uuid", chassis]}},
        {"op": "insert", "table": "Logical_DP_Group", "row": {"datapaths": ["named-uuid", "sw1"]}, "uuid-name": "g1"},
        {"op": "insert", "table": "Logical_DP_Group", "row": {"datapaths": ["named-uuid", "sw2"]}, "uuid-name": "g2"},
        lb("here", "10.77.0.2:80", "g1"),
        lb("elsewhere", "10.77.0.3:80", "g2"),
    ]);
    let out = Command::new("ovsdb-client")
        .args(["transact", &sb.unix_remote(), &txn.to_string()])
        .output()
        .expect("ovsdb-client");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !reply.contains("\"error\""),
        "transaction: {reply} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state = TempDir::new("vgstate");
    let db = sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let mut agent = Agent::start(&topo.server_ns, &args);
    // Once this node's datapaths are known, only the load balancer of switch 1 applies.
    agent.wait_for_log("following the logical ports bound to this chassis", WAIT);
    eventually("the VIP of switch 1 only", WAIT, || {
        followed(&topo) == (2.0, 1.0, 0.0)
    });
    assert!(!topo.connects(80), "the VIP of switch 1 is watched");
}

/// A UDP packet from the client namespace to `SERVER_V4:port` (an idle VIP's: a hit).
fn udp_hit(topo: &Topology, port: u16) {
    topo.in_client(|| {
        let socket = std::net::UdpSocket::bind((unidler_tests::netns::CLIENT_V4, 0)).unwrap();
        socket
            .send_to(b"wake up", (unidler_tests::netns::SERVER_V4, port))
            .unwrap();
    });
}

/// The load balancer each VIP's row of `/api/vips` names (null: not known yet), by port.
#[track_caller]
fn shown_names(topo: &Topology) -> Vec<(String, Option<String>)> {
    let body = topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9478".parse().unwrap(), "/api/vips"))
        .expect("/api/vips");
    let rows: Vec<unidler::telemetry::VipRow> =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    rows.into_iter().map(|r| (r.vip, r.load_balancer)).collect()
}

/// Events name the Northbound load balancer, `external_ids:lb_id` of the Southbound row. The
/// agent does not monitor that column (with 100,000s of load balancers it would be a fifth of
/// the server's work at every start): it reads a row's `lb_id` when a VIP of it is first hit.
/// A hit while the database is away waits for the name, and is written with it once the
/// database is back; a row without `lb_id` is named by its UUID, as OVN names it.
#[test]
fn the_name_of_a_load_balancer_is_read_when_it_is_first_hit() {
    require_root();
    const NB_A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
    const NB_C: &str = "0c0c0c0c-0000-4000-8000-00000000000c";
    let topo = Topology::new("vn");
    let mut sb = ovsdb_server::southbound_with_chassis();
    let create = |name: &str, port: u16, lb_id: Option<&str>| {
        let mut args = vec![
            "create".to_owned(),
            "Load_Balancer".to_owned(),
            format!("name={name}"),
            "protocol=udp".to_owned(),
            "options:event=true".to_owned(),
            format!("vips:\"10.77.0.2:{port}\"=\"\""),
        ];
        args.extend(lb_id.map(|id| format!("external_ids:lb_id={id}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sb.sbctl(&args).trim().to_owned()
    };
    create("a", 7001, Some(NB_A));
    let b_row = create("b", 7002, None);
    create("c", 7003, Some(NB_C));
    let state = TempDir::new("nstate");
    let db = sb.unix_remote();
    let args = southbound_args(&topo.server_if, &db, state.path_str());
    let mut agent = Agent::start(&topo.server_ns, &args);
    agent.wait_for_log("VIP map synced vips=3 ", WAIT);
    assert!(
        shown_names(&topo).iter().all(|(_, name)| name.is_none()),
        "no name is read before a hit needs it: {:?}",
        shown_names(&topo)
    );

    let name_of = |rows: &[EventRow], port: u16| -> Vec<String> {
        let vip = format!("10.77.0.2:{port}");
        rows.iter()
            .filter(|r| r.event_info.get("vip") == Some(&vip))
            .map(|r| {
                r.event_info
                    .get("load_balancer")
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    udp_hit(&topo, 7001);
    udp_hit(&topo, 7002);
    let rows = eventually_rows(&sb, 2);
    assert_eq!(name_of(&rows, 7001), [NB_A], "lb_id names it");
    assert_eq!(name_of(&rows, 7002), [b_row], "no lb_id: its row's UUID");
    assert!(
        shown_names(&topo).contains(&("10.77.0.2:7001".into(), Some(NB_A.into()))),
        "known once read: {:?}",
        shown_names(&topo)
    );

    // The database goes away before C's first hit: the hit waits for C's name.
    sb.kill();
    udp_hit(&topo, 7003);
    udp_hit(&topo, 7003);
    std::thread::sleep(Duration::from_secs(2));
    sb.start();
    let rows = eventually_rows(&sb, 3);
    assert_eq!(
        name_of(&rows, 7003),
        [NB_C],
        "once, named after C: {rows:#?}"
    );
}

/// One load balancer of `vips` idle VIPs (`lb0`, as [`LoadBalancers`] makes them) and an agent
/// following it with `extra` arguments, whose kernel limits let every hit through.
struct NamesBed {
    agent: Agent,
    topo: Topology,
    sb: OvsdbServer,
    _lbs: LoadBalancers,
    _state: TempDir,
}

impl NamesBed {
    fn start(prefix: &str, vips: u32, extra: &[&str]) -> Self {
        let topo = Topology::new(prefix);
        let sb = ovsdb_server::southbound_with_chassis();
        let lbs = LoadBalancers::insert(&sb, vips, vips);
        let state = TempDir::new(&format!("{prefix}st"));
        let db = sb.unix_remote();
        let mut args = southbound_args(&topo.server_if, &db, state.path_str());
        // Kernel limits above the storm, and no failing open while the database is away
        // (however slow the machine): every hit reaches the agent.
        args.extend([
            "--event-burst",
            "20000",
            "--event-rate",
            "100000",
            "--fail-open-after",
            "0",
        ]);
        args.extend_from_slice(extra);
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log(&format!("VIP map synced vips={vips} "), WAIT);
        Self {
            agent,
            topo,
            sb,
            _lbs: lbs,
            _state: state,
        }
    }

    /// A SYN from the client to each VIP `n` in `vips` (`10.100.x.y:80`, see
    /// [`LoadBalancers`]), at once.
    fn hit(&self, vips: std::ops::Range<u32>) {
        let frames: Vec<Vec<u8>> = vips
            .clone()
            .map(|n| {
                let vip =
                    std::net::Ipv4Addr::new(10, (100 + n / 65536) as u8, (n / 256) as u8, n as u8);
                let mut frame =
                    Frame::tcp_syn(CLIENT_V4.into(), 1024 + (n % 60_000) as u16, vip.into(), 80);
                frame.src_mac = CLIENT_MAC;
                frame.dst_mac = SERVER_MAC;
                frame.build()
            })
            .collect();
        let client_if = &self.topo.client_if;
        let sent = self.topo.in_client(|| send_frames(client_if, frames));
        assert_eq!(sent, vips.len());
    }

    /// The agent's sample of `series` (0 if absent).
    fn metric(&self, series: &str) -> f64 {
        let metrics = self
            .topo
            .in_server(|| {
                unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics")
            })
            .unwrap_or_default();
        sample(&metrics, series).unwrap_or(0.0)
    }

    /// Waits until the agent has read `n` hits in all.
    #[track_caller]
    fn wait_received(&self, n: u32) {
        eventually(&format!("{n} hits read by the agent"), WAIT, || {
            self.metric("unidler_events_total{stage=\"received\"}") == f64::from(n)
        });
    }
}

/// The VIPs of `rows`, each once, and the load balancer names they give.
fn vips_and_names(rows: &[EventRow]) -> (Vec<&str>, std::collections::BTreeSet<&str>) {
    let mut vips: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.event_info.get("vip").map(String::as_str))
        .collect();
    vips.sort_unstable();
    vips.dedup();
    let names = rows
        .iter()
        .filter_map(|r| r.event_info.get("load_balancer").map(String::as_str))
        .collect();
    (vips, names)
}

/// A storm of hits to 9,000 VIPs of one load balancer while the database is away: each hit
/// waits for the load balancer's name, none is taken for a duplicate of another VIP's, and
/// once the database is back every VIP has its row, named by `lb_id`. Hits again: no second
/// row.
#[test]
fn a_storm_over_one_load_balancer_while_the_database_is_away_writes_every_vip_once() {
    require_root();
    const VIPS: u32 = 9_000;
    let mut bed = NamesBed::start("vw", VIPS, &[]);
    bed.sb.kill();
    bed.hit(0..VIPS);
    bed.wait_received(VIPS);
    assert_eq!(
        bed.metric("unidler_events_waiting_for_names"),
        f64::from(VIPS)
    );
    bed.sb.start();
    let rows = eventually_rows(&bed.sb, VIPS as usize);
    let (vips, names) = vips_and_names(&rows);
    assert_eq!(
        (rows.len(), vips.len()),
        (VIPS as usize, VIPS as usize),
        "one row for each VIP"
    );
    assert_eq!(names, [LoadBalancers::lb_id(0).as_str()].into());
    assert_eq!(bed.metric("unidler_events_waiting_for_names"), 0.0);
    assert_eq!(
        bed.metric("unidler_events_total{stage=\"dropped_overflow\"}"),
        0.0
    );

    bed.hit(0..VIPS);
    bed.wait_received(2 * VIPS);
    eventually("the second hits found duplicates", WAIT, || {
        bed.metric("unidler_events_total{stage=\"deduplicated\"}") == f64::from(VIPS)
    });
    assert_eq!(
        bed.sb.event_rows().len(),
        VIPS as usize,
        "hits of VIPs with rows add none"
    );
}

/// At most `--event-queue-size` hits wait for names, one per VIP: beyond it hits are dropped
/// and counted (as the writer drops hits beyond its queue), never written under another
/// name, so a VIP's next hit writes its only row.
#[test]
fn hits_beyond_the_event_queue_size_waiting_for_names_are_dropped_and_counted() {
    require_root();
    let mut bed = NamesBed::start("vq", 150, &["--event-queue-size", "100"]);
    bed.sb.kill();
    bed.hit(0..150);
    bed.wait_received(150);
    bed.hit(0..10);
    bed.wait_received(160);
    assert_eq!(bed.metric("unidler_events_waiting_for_names"), 100.0);
    assert_eq!(
        (
            bed.metric("unidler_events_total{stage=\"deduplicated\"}"),
            bed.metric("unidler_events_total{stage=\"dropped_overflow\"}"),
        ),
        (10.0, 50.0),
        "the second hits of waiting VIPs are duplicates; 50 VIPs found no room"
    );
    assert!(
        bed.agent
            .log_lines()
            .any(|l| l.contains("idle hits keep waiting for load balancer names")),
        "the overflow is logged"
    );
    bed.sb.start();
    let rows = eventually_rows(&bed.sb, 100);
    assert_eq!(rows.len(), 100);
    assert_eq!(
        vips_and_names(&rows).1,
        [LoadBalancers::lb_id(0).as_str()].into()
    );

    // The dropped VIPs' next hits are named (the name is known now) and written.
    bed.hit(100..150);
    let rows = eventually_rows(&bed.sb, 150);
    let (vips, names) = vips_and_names(&rows);
    assert_eq!((rows.len(), vips.len()), (150, 150), "each VIP once");
    assert_eq!(names, [LoadBalancers::lb_id(0).as_str()].into());
}

/// Waits until `sb` has at least `n` Controller_Event rows; returns them.
#[track_caller]
fn eventually_rows(sb: &OvsdbServer, n: usize) -> Vec<EventRow> {
    let mut rows = Vec::new();
    eventually(&format!("{n} Controller_Event rows"), WAIT, || {
        rows = sb.event_rows();
        rows.len() >= n
    });
    std::thread::sleep(Duration::from_millis(300));
    sb.event_rows()
}

/// A VIPs file that is not a regular file is refused, never waited on: a FIFO at start is a
/// clear error, not a hang; one renamed over the file while the agent runs leaves the last
/// good VIPs in place, health answering and SIGTERM obeyed (a read of a FIFO on the runtime's
/// thread had blocked all three). A device is refused too, not read forever.
#[test]
fn a_vips_file_that_is_not_a_regular_file_is_refused_and_never_waited_on() {
    require_root();
    let topo = Topology::new("vq");
    let _l = topo.listen(80);
    let dir = TempDir::new("vfifo");
    let fifo = dir.join("fifo");
    let mkfifo = |path: &std::path::Path| {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    };
    mkfifo(&fifo);
    for path in [fifo.to_str().unwrap(), "/dev/zero"] {
        let exit = Agent::run_to_exit(
            &topo.server_ns,
            &["run", "--iface", &topo.server_if, "--vips-file", path],
        );
        assert_eq!(exit.code, Some(1), "{path}: {}", exit.stderr);
        assert!(
            exit.stderr.contains("not a regular file"),
            "{path}: {}",
            exit.stderr
        );
    }

    let file = dir.join("vips.toml");
    std::fs::write(&file, "[[vip]]\nvip = \"10.77.0.2:80\"\n").unwrap();
    let mut agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            "--iface",
            &topo.server_if,
            "--vips-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(!topo.connects(80), "the idle VIP is watched");
    let other = dir.join("other-fifo");
    mkfifo(&other);
    std::fs::rename(&other, &file).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("VIPs file unreadable", WAIT);
    let health = topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/healthz"));
    assert!(health.is_ok(), "health answers: {health:?}");
    assert!(!topo.connects(80), "the last good VIPs stay");
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
}
