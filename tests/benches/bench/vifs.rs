//! Section 8: following OVN's VIFs (`--ovn-vifs`) through a real Open_vSwitch database: the
//! time from `ovs-vsctl add-port` to the program attached, 500 VIFs attached with the agent
//! at rest, and VIFs added and removed at 100 a second, with nothing left attached after.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use unidler_tests::{
    agent::Agent,
    netns::Topology,
    ovsdb_server::{Listen, OvsdbServer},
};

use crate::{
    common::cpu_seconds,
    figure::{Figure, figure},
    vip_sync::rss_mb,
};

const VSWITCH_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// Runs `ip -n NS -batch -` with `commands`.
fn ip_batch(netns: &str, commands: &str) {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    child.wait().unwrap();
}

/// One `ovs-vsctl --no-wait` run of several commands joined with `--`.
fn vsctl_batch(ovs: &OvsdbServer, commands: &[Vec<String>]) {
    let mut args: Vec<String> = vec!["--no-wait".into()];
    for (i, command) in commands.iter().enumerate() {
        if i > 0 {
            args.push("--".into());
        }
        args.extend(command.iter().cloned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ovs.ctl("ovs-vsctl", &args);
}

fn add_port(name: &str) -> Vec<String> {
    ["add-port", "br-int", name, "--", "set", "Interface", name]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("external_ids:iface-id={name}")])
        .collect()
}

/// Interfaces the agent has the program on, from its own metrics.
fn attached(topo: &Topology) -> usize {
    let metrics = topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9477".parse().unwrap(), "/metrics"))
        .unwrap_or_default();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("unidler_attachments{state=\"attached\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn vifs() -> Vec<Figure> {
    const SECTION: &str = "8 VIFs";
    let topo = Topology::new("b8");
    let ovs = OvsdbServer::standalone("ovs", VSWITCH_SCHEMA, Listen::default());
    ovs.ctl("ovs-vsctl", &["--no-wait", "init"]);
    ovs.ctl("ovs-vsctl", &["--no-wait", "add-br", "br-int"]);
    let ovs_db = ovs.unix_remote();
    let mut agent = Agent::start(
        &topo.server_ns,
        &[
            "run",
            // Attachments to followed interfaces are logged at debug.
            "--log-level",
            "info,unidler=debug",
            "--ovn-vifs",
            "--ovs-db",
            &ovs_db,
            "--vip",
            "10.77.0.2:8080/tcp",
        ],
    );
    agent.wait_for_log("connected to Open_vSwitch", Duration::from_secs(10));
    let mut out = Vec::new();

    // Latency: one port at a time.
    let mut latencies = Vec::new();
    for i in 0..50 {
        let name = format!("lat{i}");
        ip_batch(
            &topo.server_ns,
            &format!("link add {name} type veth peer name {name}p\nlink set {name} up\n"),
        );
        vsctl_batch(&ovs, &[add_port(&name)]);
        // From the commit (add-port returns once the database has it) to the attachment's
        // log line (which arrives a little after the attachment itself).
        let committed = Instant::now();
        agent.wait_for_log(&format!("iface={name} "), Duration::from_secs(10));
        latencies.push(committed.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    out.push(figure(SECTION, "add-port to attached, p50", pct(0.5), "ms"));
    out.push(figure(SECTION, "add-port to attached, p99", pct(0.99), "ms").target("under 100 ms"));

    // 500 VIFs at rest.
    let names: Vec<String> = (0..450).map(|i| format!("rest{i}")).collect();
    let mut batch = String::new();
    for name in &names {
        batch.push_str(&format!(
            "link add {name} type veth peer name {name}p\nlink set {name} up\n"
        ));
    }
    ip_batch(&topo.server_ns, &batch);
    for chunk in names.chunks(50) {
        let commands: Vec<Vec<String>> = chunk.iter().map(|n| add_port(n)).collect();
        vsctl_batch(&ovs, &commands);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached(&topo) < 500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    out.push(figure(SECTION, "VIFs attached", attached(&topo) as f64, "VIFs").target("500"));
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.pid();
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(5));
    out.push(figure(
        SECTION,
        "500 VIFs: agent CPU at rest",
        (cpu_seconds(pid) - cpu0) / 5.0 * 100.0,
        "% of a core",
    ));
    out.push(figure(SECTION, "500 VIFs: agent RSS", rss_mb(pid), "MB"));

    // Churn: 100 VIFs added and removed every second.
    let seconds = 30;
    let rss_before = rss_mb(pid);
    let churn_started = Instant::now();
    for round in 0..seconds {
        let started = Instant::now();
        let names: Vec<String> = (0..100).map(|i| format!("ch{}x{i}", round % 2)).collect();
        let mut add = String::new();
        for name in &names {
            add.push_str(&format!(
                "link add {name} type veth peer name {name}p\nlink set {name} up\n"
            ));
        }
        ip_batch(&topo.server_ns, &add);
        vsctl_batch(&ovs, &names.iter().map(|n| add_port(n)).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(400));
        let del: Vec<Vec<String>> = names
            .iter()
            .map(|n| vec!["del-port".into(), "br-int".into(), n.clone()])
            .collect();
        vsctl_batch(&ovs, &del);
        let mut gone = String::new();
        for name in &names {
            gone.push_str(&format!("link del {name}\n"));
        }
        ip_batch(&topo.server_ns, &gone);
        if let Some(rest) = Duration::from_secs(1).checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let churn = churn_started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    // The harness (ip, ovs-vsctl with hundreds of ports) may not keep the pace: say what it
    // achieved.
    out.push(
        figure(
            SECTION,
            format!(
                "churn: VIFs added and removed per second ({} in all)",
                100 * seconds
            ),
            f64::from(100 * seconds) / churn,
            "VIFs/s",
        )
        .target("100 (if the harness keeps up)"),
    );
    out.push(
        figure(
            SECTION,
            "churn: attachments left besides the 500 at rest",
            attached(&topo).saturating_sub(500) as f64,
            "",
        )
        .target("0"),
    );
    out.push(figure(SECTION, "churn: agent RSS after", rss_mb(pid), "MB").vs("before", rss_before));
    out
}
