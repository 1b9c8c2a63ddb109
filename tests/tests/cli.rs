//! The agent's command line: bad input gets a clear error and a non-zero exit, never a panic.

use unidler_tests::{agent::Agent, netns::Topology, require_root};

#[track_caller]
fn assert_clean_failure(args: &[&str], code: i32, needle: &str) -> String {
    let exit = Agent::run_to_exit("", args);
    assert_eq!(exit.code, Some(code), "{args:?}: {}", exit.stderr);
    assert!(
        exit.stderr.contains(needle),
        "{args:?} should say {needle:?}; it said:\n{}",
        exit.stderr
    );
    assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
    exit.stderr
}

#[test]
fn unknown_interface_is_named() {
    require_root();
    assert_clean_failure(
        &["run", "--iface", "nosuchif0", "--vip", "10.0.0.1:80/tcp"],
        1,
        "no network interface named \"nosuchif0\"",
    );
}

#[test]
fn malformed_vips_are_explained() {
    for (vip, needle) in [
        ("10.0.0.1:80", "no protocol"),
        ("10.0.0.1:80/icmp", "unknown protocol"),
        ("fd00::1:80/tcp", "bad address"),
        ("10.0.0.1:80/tcp=many", "bad backend count"),
    ] {
        assert_clean_failure(&["run", "--iface", "lo", "--vip", vip], 2, needle);
    }
}

#[test]
fn help_lists_every_run_flag() {
    let exit = Agent::run_to_exit("", &["run", "--help"]);
    assert_eq!(exit.code, Some(0));
    // clap prints help on stdout; the wrapper only captured stderr, so ask again directly.
    let out = std::process::Command::new(unidler_tests::agent::agent_binary())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--iface",
        "--hook",
        "--vip",
        "--idle-action",
        "--vip-event-rate",
        "--vip-event-burst",
        "--event-rate",
        "--event-burst",
        "--log-level",
        "--log-format",
        "UNIDLER_IFACE",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    // The nits an operator reading it found.
    assert!(
        !help.contains("--xdp-mode"),
        "the older spelling is not listed"
    );
    let hook = help.split("--hook").nth(1).unwrap();
    let hook = &hook[..hook.find("\n      --").unwrap()];
    assert!(hook.contains("[default: auto]"), "{hook}");
    assert!(
        help.contains("[@LOAD_BALANCER]"),
        "--vip's help names @LOAD_BALANCER"
    );
    for flag in ["--replay-after", "--idle-action"] {
        let text = help.split(flag).nth(1).unwrap();
        let text = &text[..text.find("\n      --").unwrap()];
        assert!(text.len() > 300, "{flag} says what it is for:{text}");
    }
}

/// `unidler help` and `unidler help --help` answer, as every subcommand's --help does.
#[test]
fn help_answers_everywhere() {
    for args in [
        &["help"][..],
        &["help", "--help"],
        &["help", "run"],
        &["wakeups", "--help"],
        &["--help"],
    ] {
        let out = std::process::Command::new(unidler_tests::agent::agent_binary())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

/// Values written as operators write them are read: `1h`, `1h30m`, `64MiB`, `:9477`; the run
/// then fails on the interface, past the parsing.
#[test]
fn durations_sizes_and_addresses_are_read_as_written() {
    require_root();
    for (flag, value) in [
        ("--hold-max-age", "1h"),
        ("--fail-open-after", "1h30m"),
        ("--ovsdb-max-message-size", "64MiB"),
        ("--metrics-addr", ":9477"),
        ("--metrics-addr", "[::1]:9477"),
    ] {
        assert_clean_failure(
            &[
                "run",
                "--iface",
                "nosuchif0",
                "--vip",
                "10.0.0.1:80/tcp",
                flag,
                value,
            ],
            1,
            "no network interface named \"nosuchif0\"",
        );
    }
    for (flag, value, needle) in [
        ("--hold-max-age", "1y", "bad duration"),
        ("--ovsdb-max-message-size", "64XB", "bad size"),
        ("--metrics-addr", "fd00::1:9477", "bad address"),
        // No queue at all would drop every hit.
        ("--event-queue-size", "0", "not in 1.."),
    ] {
        assert_clean_failure(&["run", "--iface", "lo", flag, value], 2, needle);
    }
}

/// An `ssl:` Southbound remote without the TLS files is refused at once, saying which flags
/// it needs (it used to retry silently forever).
#[test]
fn an_ssl_remote_without_its_files_is_refused() {
    let stderr = assert_clean_failure(
        &["run", "--iface", "lo", "--ovnsb-db", "ssl:127.0.0.1:6642"],
        2,
        "--ovnsb-private-key",
    );
    assert!(stderr.contains("ssl:127.0.0.1:6642"), "{stderr}");
}

#[test]
fn missing_privileges_name_the_capabilities() {
    require_root();
    // A veth pair so the interface check passes and the failure is really about privileges.
    let topo = Topology::new("up");
    let bin = unidler_tests::agent::agent_binary();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.server_ns])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(&bin)
        .args([
            "run",
            "--iface",
            &topo.server_if,
            "--vip",
            "10.77.0.2:80/tcp",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        assert!(stderr.contains(cap), "should name {cap}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Every flag and UNIDLER_* variable the DaemonSet and the systemd unit use exists in
/// `unidler run --help`, so the deployment files cannot drift from the binary.
#[test]
fn deployment_files_use_only_flags_the_binary_has() {
    let help = String::from_utf8(
        std::process::Command::new(unidler_tests::agent::agent_binary())
            .args(["run", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files = vec![root.join("unidler.service")];
    let mut dirs = vec![root.join("kubernetes")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            match path.is_dir() {
                true => dirs.push(path),
                false => files.push(path),
            }
        }
    }
    let mut checked = 0;
    for path in &files {
        let file = path.display();
        let text = std::fs::read_to_string(path).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for word in line.split(|c: char| c.is_whitespace() || c == '"' || c == '=') {
                let flag = word.trim_start_matches("- ");
                let is_flag = flag
                    .strip_prefix("--")
                    .is_some_and(|f| f.starts_with(|c: char| c.is_ascii_lowercase()));
                let is_env = flag.starts_with("UNIDLER_");
                if is_flag || is_env {
                    checked += 1;
                    assert!(
                        help.contains(&format!("{flag} "))
                            || help.contains(&format!("{flag}="))
                            || help.contains(&format!("{flag}\n"))
                            || help.contains(&format!("{flag}]")),
                        "{file} uses {flag}, which `unidler run --help` does not list"
                    );
                }
            }
        }
    }
    assert!(
        checked >= 15,
        "only {checked} flags found: is the parsing right?"
    );
}

/// A log level people write (`warning`) works; an unknown one is refused in one clear line,
/// the cause said once; an error is printed even under a filter that hides errors.
#[test]
fn log_levels_are_read_or_refused_clearly() {
    let exit = Agent::run_to_exit(
        "",
        &[
            "--log-level",
            "warning",
            "vips",
            "--api-addr",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("cannot reach the agent"),
        "--log-level warning hid the error: {:?}",
        exit.stderr
    );
    let stderr = assert_clean_failure(&["--log-level", "loud", "vips"], 2, "log level");
    assert!(stderr.contains("\"loud\""), "{stderr}");
    let stderr = assert_clean_failure(&["--log-level", "foo=bar=baz", "vips"], 2, "log level");
    assert_eq!(
        stderr.matches("expected one of").count(),
        1,
        "the cause said twice: {stderr}"
    );
}

/// The inspection commands name the flag that points them at the agent, and say the cause
/// once.
#[test]
fn an_unreachable_agent_names_the_api_address_flag() {
    let stderr = assert_clean_failure(&["vips", "--api-addr", "127.0.0.1:1"], 1, "--api-addr");
    assert!(!stderr.contains("--metrics-addr"), "{stderr}");
    assert_eq!(
        stderr.matches("Connection refused").count(),
        1,
        "the cause said twice: {stderr}"
    );
}
