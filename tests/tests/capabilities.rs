//! The agent, and every subcommand an operator runs, with exactly the capabilities the shipped
//! manifests grant (the DaemonSet's `capabilities.add`, the systemd unit's bounding set), as
//! root with every other capability dropped: it loads, attaches with both hooks, reports an
//! idle hit, answers `vips`, `events`, `wakeups` and `interfaces`, pins with `--pin-dir`, and `detach`
//! removes what it pinned.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, process::Command, time::Duration};

use unidler_tests::{
    agent::{Agent, agent_binary},
    netns::{SERVER_V4, Topology},
    ovsdb_server::TempDir,
    require_root,
};

/// The capabilities the DaemonSets add (the agent's, the uninstall's), which the systemd unit
/// must grant alike: lower-case names without `CAP_`, as `setpriv` takes them.
fn granted_capabilities() -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let added = |file: &str| -> Vec<String> {
        let daemonset = std::fs::read_to_string(root.join(file)).unwrap();
        let add = daemonset
            .lines()
            .find_map(|l| l.trim().strip_prefix("add:"))
            .expect("the DaemonSet adds capabilities");
        let mut caps: Vec<String> = add
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_lowercase())
            .collect();
        caps.sort();
        caps
    };
    let mut from_daemonset = added("deploy/kubernetes/base/daemonset.yaml");
    assert_eq!(
        added("deploy/kubernetes/uninstall/base/daemonset.yaml"),
        from_daemonset,
        "the uninstall runs `unidler detach` with the agent's capabilities"
    );
    let unit = std::fs::read_to_string(root.join("deploy/unidler.service")).unwrap();
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    let mut from_unit: Vec<String> = bounding
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    from_daemonset.sort();
    from_unit.sort();
    assert_eq!(
        from_daemonset, from_unit,
        "the manifests grant different sets"
    );
    from_daemonset
}

/// Capability numbers, for checking the agent's effective set.
fn capability_bit(name: &str) -> u32 {
    match name {
        "net_admin" => 12,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("unknown capability {other}"),
    }
}

/// A wrapper that runs the agent as root with exactly `caps` (bounding, inheritable and
/// ambient sets, and so permitted and effective after exec).
struct Restricted {
    _dir: TempDir,
    wrapper: PathBuf,
}

impl Restricted {
    fn new(caps: &[String]) -> Self {
        let dir = TempDir::new("caps");
        let set = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let wrapper = dir.0.join("unidler");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec setpriv --bounding-set={set} --inh-caps={set} \
                 --ambient-caps={set} -- {} \"$@\"\n",
                agent_binary().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { _dir: dir, wrapper }
    }

    /// Runs a subcommand in `netns` with the restricted capabilities; panics unless it
    /// succeeds; returns its standard output.
    #[track_caller]
    fn run(&self, netns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&self.wrapper)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unidler {args:?} with the manifests' capabilities: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `unidler run` on `topo`'s server end with `hook`, one idle VIP, its endpoints on `api` and
/// `metrics`, and `extra` arguments.
fn run_args(topo: &Topology, hook: &str, api: &str, metrics: &str, extra: &[&str]) -> Vec<String> {
    let vip = format!("{SERVER_V4}:8080/tcp");
    let mut args = vec![
        "run",
        "--iface",
        &topo.server_if,
        "--hook",
        hook,
        "--vip",
        &vip,
        "--api-addr",
        api,
        "--metrics-addr",
        metrics,
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(str::to_owned).collect()
}

impl Restricted {
    /// Starts the agent with the restricted capabilities and `args` ([`run_args`]).
    #[track_caller]
    fn start(&self, topo: &Topology, args: &[String]) -> Agent {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_binary(&self.wrapper, &topo.server_ns, &args)
    }
}

/// The effective capabilities of process `pid`.
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

#[test]
fn the_agent_and_its_subcommands_run_with_the_manifests_capabilities() {
    require_root();
    let caps = granted_capabilities();
    let expected = caps.iter().fold(0u64, |m, c| m | 1 << capability_bit(c));
    let restricted = Restricted::new(&caps);
    let topo = Topology::new("cp");
    let api = "127.0.0.1:19488";
    const METRICS: &str = "127.0.0.1:19489";
    // A listener on the idle VIP: only the datapath keeps the connection from succeeding.
    let _listener = topo.listen(8080);
    for hook in ["tc", "xdp-generic"] {
        let mut agent = restricted.start(&topo, &run_args(&topo, hook, api, METRICS, &[]));
        assert_eq!(
            effective_capabilities(agent.pid()),
            expected,
            "the agent runs with other capabilities than the manifests grant"
        );
        assert!(
            !topo.connects(8080),
            "a SYN to the idle VIP got through ({hook})"
        );
        let event = agent
            .next_event(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no event for an idle hit with the {hook} hook"));
        assert_eq!(event["vip"], format!("{SERVER_V4}:8080"), "{event}");
        let vips = restricted.run(&topo.server_ns, &["vips", "--api-addr", api]);
        assert!(vips.contains(&format!("{SERVER_V4}:8080")), "{vips}");
        let events = restricted.run(&topo.server_ns, &["events", "--api-addr", api]);
        assert!(events.contains(&format!("{SERVER_V4}:8080")), "{events}");
        let interfaces = restricted.run(&topo.server_ns, &["interfaces", "--api-addr", api]);
        assert!(interfaces.contains(&topo.server_if), "{interfaces}");
        let wakeups = restricted.run(&topo.server_ns, &["wakeups", "--api-addr", api]);
        assert!(wakeups.contains(&format!("{SERVER_V4}:8080")), "{wakeups}");
        agent.signal(libc::SIGTERM);
        let exit = agent.wait(Duration::from_secs(10));
        assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    }

    // Pinned: the datapath outlives the agent, and `detach` removes it, both with the same
    // capabilities.
    let bpffs = TempDir::new("caps-bpffs");
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf", bpffs.path_str()])
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t bpf");
    let pin_dir = format!("{}/unidler", bpffs.path_str());
    let pinned = ["--pin-dir", pin_dir.as_str()];
    let agent = restricted.start(
        &topo,
        &run_args(&topo, "xdp-generic", api, METRICS, &pinned),
    );
    agent.signal(libc::SIGTERM);
    let exit = agent.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    restricted.run(&topo.server_ns, &["detach", "--pin-dir", &pin_dir]);
    let left = std::path::Path::new(&pin_dir).exists();
    let _ = Command::new("umount").arg(bpffs.path_str()).status();
    assert!(!left, "detach left the pin directory");
}

/// With exactly the manifests' capabilities a second agent on an interface is refused with
/// the TC hook too (telling another agent's program from ours needed `CAP_SYS_ADMIN`), and the
/// kernel's TC attachment is probed as with every capability.
#[test]
fn a_second_agent_is_refused_with_the_manifests_capabilities() {
    require_root();
    let restricted = Restricted::new(&granted_capabilities());
    let topo = Topology::new("c2");
    let mut first = restricted.start(
        &topo,
        &run_args(&topo, "tc", "127.0.0.1:19688", "127.0.0.1:19689", &[]),
    );
    let expected = unidler::datapath::KernelFeatures::probe().expect("probe");
    let probed = first.wait_for_log("kernel features probed", Duration::from_secs(5));
    assert!(
        probed.contains(&format!("tc=\"{}\"", expected.tc_attachment())),
        "{probed}"
    );
    let second_args = run_args(&topo, "tc", "127.0.0.1:19690", "127.0.0.1:19691", &[]);
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.server_ns])
        .arg(&restricted.wrapper)
        .args(&second_args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another unidler is running on it"),
        "{stderr}"
    );
    first.signal(libc::SIGTERM);
    let exit = first.wait(Duration::from_secs(10));
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
}
