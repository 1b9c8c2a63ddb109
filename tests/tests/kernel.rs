//! The agent on the running kernel: it starts where the kernel has what the datapath needs, and
//! refuses in a few lines, naming the kernel, the missing feature and the version that has it,
//! where it does not. The kernel matrix (`cargo xtask test --kernel 5.10`) runs this below the
//! floor with `UNIDLER_EXPECT_REFUSAL=1`, so that a kernel that should refuse and does not fails;
//! on the others with `UNIDLER_EXPECT_FEATURES` (e.g. `tc="clsact" holding=true`), what its
//! start must say it found: the probes are checked against the kernel, not against themselves.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use unidler::datapath::{KernelFeatures, kernel_release};
use unidler_tests::{agent::agent_binary, require_root};

/// Runs `unidler run` on loopback at `log_level` until it has attached its datapath (then
/// stops it with SIGTERM, which must end it cleanly) or exits by itself; returns its exit
/// status if it exited by itself (None if it started), and its standard error.
fn start_agent(state_dir: &std::path::Path, log_level: &str) -> (Option<i32>, String) {
    let mut child = Command::new(agent_binary())
        .args([
            "run",
            "--iface",
            "lo",
            "--hook",
            "xdp-generic",
            "--vip",
            "10.255.77.1:80/tcp",
            "--metrics-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--log-level",
            log_level,
            "--state-dir",
        ])
        .arg(state_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent");
    let (lines_tx, lines) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = String::new();
    // Verification under emulation takes seconds; a refusal comes before any of it.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("datapath attached") {
                    // SAFETY: signals our own child.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    let status = child.wait().expect("wait");
                    assert_eq!(status.code(), Some(0), "no clean stop:\n{seen}");
                    return (None, seen);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                return (status.code(), seen);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent neither started nor refused within 180 s:\n{seen}");
        }
    }
}

#[test]
fn the_agent_starts_or_refuses_this_kernel_in_a_few_lines() {
    require_root();
    let features = KernelFeatures::probe().expect("probing the kernel");
    let expect_refusal = std::env::var_os("UNIDLER_EXPECT_REFUSAL").is_some();
    let state = tempfile_dir();
    // The default level where the kernel is refused: what an operator sees.
    let supported = features.check_required().is_ok();
    let (status, stderr) = start_agent(&state, if supported { "debug" } else { "info" });
    let _ = std::fs::remove_dir_all(&state);
    match features.check_required() {
        Ok(()) => {
            assert!(
                !expect_refusal,
                "this kernel ({}) was expected to be refused, but it has every required \
                 feature: {features:?}",
                kernel_release()
            );
            assert_eq!(
                status, None,
                "the agent did not start on a kernel with every required feature:\n{stderr}"
            );
            assert!(
                stderr.contains("kernel features probed"),
                "the start does not say what the kernel offers:\n{stderr}"
            );
            if let Ok(expected) = std::env::var("UNIDLER_EXPECT_FEATURES") {
                assert!(
                    stderr
                        .lines()
                        .any(|l| l.contains("kernel features probed") && l.contains(&expected)),
                    "this kernel should have been found to offer {expected}:\n{stderr}"
                );
            }
            // What the kernel matrix reports of each kernel: its features, and each program's
            // verification (time, instructions).
            for line in stderr
                .lines()
                .filter(|l| l.contains("kernel features probed") || l.contains("program verified"))
            {
                println!("{}", line.split_once("unidler").map_or(line, |(_, l)| l));
            }
        }
        Err(refusal) => {
            assert_eq!(status, Some(1), "a refused kernel must exit 1:\n{stderr}");
            // A few lines, not the verifier's 91 KB.
            assert!(
                stderr.len() < 1_000 && stderr.lines().count() <= 3,
                "the refusal is too long ({} bytes):\n{stderr}",
                stderr.len()
            );
            // What the kernel matrix reports of this kernel.
            println!("{}", stderr.trim());
            let release = kernel_release();
            assert!(stderr.contains(&release), "kernel not named:\n{stderr}");
            for feature in &refusal.missing {
                assert!(
                    stderr.contains(feature.name()) && stderr.contains(feature.since()),
                    "{feature:?} and its version not named:\n{stderr}"
                );
            }
        }
    }
}

/// A fresh state directory of this test's own.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("unidler-kernel-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state dir");
    dir
}
