//! Runs the real `unidler` binary inside a namespace and collects what it prints.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{ovsdb_server::CHASSIS, scaled};

/// The agent binary: `$UNIDLER_BIN` (set by `cargo xtask test`), else `target/<profile>/unidler`
/// beside this test executable.
#[track_caller]
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("UNIDLER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>  ->  target/<profile>/unidler
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("unidler"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        candidate.exists(),
        "agent binary not found at {}: run the tests with `cargo xtask test`, which builds it",
        candidate.display()
    );
    candidate
}

/// `run` arguments for an agent on `server_if` writing Controller_Event rows to the Southbound
/// database at `db` as [`CHASSIS`], keeping its state in `state_dir`; callers add the rest.
pub fn southbound_args<'a>(server_if: &'a str, db: &'a str, state_dir: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--iface",
        server_if,
        "--ovnsb-db",
        db,
        "--chassis",
        CHASSIS,
        "--state-dir",
        state_dir,
    ]
}

/// `run` arguments for an agent on an OVN node: the datapath on OVN's VIFs (as the local
/// Open_vSwitch database at `ovs_db` lists them), VIPs from and rows to the Southbound database
/// at `sb_db` as [`CHASSIS`], its state in `state_dir`, debug logs; callers add the rest.
pub fn ovn_node_args<'a>(ovs_db: &'a str, sb_db: &'a str, state_dir: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--ovn-vifs",
        "--ovs-db",
        ovs_db,
        "--ovnsb-db",
        sb_db,
        "--chassis",
        CHASSIS,
        "--state-dir",
        state_dir,
        "--log-level",
        "info,unidler=debug",
    ]
}

/// A running agent. Killed on drop if still running.
pub struct Agent {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line seen so far (logs).
    pub log: Vec<String>,
}

/// How an agent run ended.
#[derive(Debug)]
pub struct Exit {
    /// Exit status code (None if killed by a signal).
    pub code: Option<i32>,
    /// Everything it wrote to standard error.
    pub stderr: String,
}

impl Agent {
    /// Starts `unidler <args>` in namespace `netns` and waits until it says it is attached
    /// and watching. Panics with its logs if it exits or takes longer than 20 s ([`scaled`]).
    #[track_caller]
    pub fn start(netns: &str, args: &[&str]) -> Self {
        Self::start_binary(&agent_binary(), netns, args)
    }

    /// [`Agent::start`] with an explicit binary.
    #[track_caller]
    pub fn start_binary(bin: &std::path::Path, netns: &str, args: &[&str]) -> Self {
        let mut agent = Self::spawn_binary(bin, netns, args);
        agent.wait_for_log("watching for connection attempts", Duration::from_secs(20));
        agent
    }

    /// Starts `unidler <args>` in `netns` (or the current namespace if empty) without waiting.
    pub fn spawn(netns: &str, args: &[&str]) -> Self {
        Self::spawn_binary(&agent_binary(), netns, args)
    }

    /// [`Agent::spawn`] with an explicit binary.
    pub fn spawn_binary(bin: &std::path::Path, netns: &str, args: &[&str]) -> Self {
        let mut cmd = if netns.is_empty() {
            Command::new(bin)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]).arg(bin);
            c
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        let mut child = crate::die_with_parent(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
            log: Vec::new(),
        }
    }

    /// Waits until a log line contains `needle`.
    #[track_caller]
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_logs(needle, 1, timeout)
    }

    /// Waits (at most `timeout`, [`scaled`]) until the agent has logged `count` lines
    /// containing `needle`; returns the last of them. Panics with the log so far otherwise.
    #[track_caller]
    pub fn wait_for_logs(&mut self, needle: &str, count: usize, timeout: Duration) -> String {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log
                .iter()
                .filter(|l| l.contains(needle))
                .nth(count - 1)
            {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "agent did not log {needle:?} {count} time(s) within {timeout:?}; log so \
                     far:\n{}",
                    self.log.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "agent exited ({status:?}) before logging {needle:?}; log:\n{}",
                        self.log.join("\n")
                    )
                }
            }
        }
    }

    /// Collects events (stdout JSON lines) until `quiet` passes with none, or `max` passes
    /// (both [`scaled`]).
    pub fn events_until_quiet(&mut self, quiet: Duration, max: Duration) -> Vec<Value> {
        let (quiet, max) = (scaled(quiet), scaled(max));
        let deadline = Instant::now() + max;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return events;
            }
            match self.stdout.recv_timeout(quiet.min(left)) {
                Ok(line) => events.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("agent printed a non-JSON line {line:?}: {e}")),
                ),
                Err(_) => return events,
            }
        }
    }

    /// Waits for the next event for at most `timeout` ([`scaled`]).
    pub fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        self.stdout
            .recv_timeout(scaled(timeout))
            .ok()
            .map(|line| serde_json::from_str(&line).expect("JSON line"))
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line the agent has written so far (reading what is pending).
    pub fn log_lines(&mut self) -> impl Iterator<Item = &String> {
        while let Ok(line) = self.stderr.try_recv() {
            self.log.push(line);
        }
        self.log.iter()
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: i32) {
        // `ip netns exec` execs the agent, so the child pid is the agent's.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the agent to exit (at most `timeout`, [`scaled`]) and returns how it ended.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> Exit {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return Exit {
                    code: status.code(),
                    stderr: self.log.join("\n"),
                };
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {timeout:?}; log:\n{}",
                self.log.join("\n")
            );
            while let Ok(line) = self.stderr.try_recv() {
                self.log.push(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the agent to completion (for commands that should fail fast).
    #[track_caller]
    pub fn run_to_exit(netns: &str, args: &[&str]) -> Exit {
        Self::spawn(netns, args).wait(Duration::from_secs(20))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines_of(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
