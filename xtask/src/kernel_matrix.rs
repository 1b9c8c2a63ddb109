//! `cargo xtask test --kernel <series>` and `--kernels`: a selection of the tests run inside
//! Debian's kernels, booted under qemu (TCG) by virtme-ng.
//!
//! The test executables are built on the host; the guest sees the host's filesystem read-only
//! (virtme-ng) and runs them from `target/`. It writes each test target's output and exit status
//! into `target/kernel-matrix/<series>/`, the one folder it may write to on the host, which is
//! followed while the guest runs and read when it is gone: a kernel passes only if every test of
//! its selection ran and passed. [`MATRIX`] says what each kernel runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build, cargo,
    kernels::{self, Kernel},
    setup, target_dir, workspace_root,
};

/// The tests one kernel runs.
pub struct KernelTests {
    /// The kernel series ([`kernels::SERIES`]), as `--kernel` takes it.
    pub kernel: &'static str,
    /// Test targets of `unidler-tests` and which of their tests run.
    pub suites: &'static [Suite],
    /// Environment variables the tests get in this kernel's guest (on top of
    /// [`GUEST_TIME_SCALE`] and the agent binary's path).
    pub guest_env: &'static [(&'static str, &'static str)],
}

/// Tests of one test target (`tests/tests/<target>.rs`).
///
/// Time limits are about four times what the tests took in a guest on a 2-vCPU machine, so that
/// a guest that hangs everywhere still ends well inside CI's 90 minutes.
pub struct Suite {
    /// The test target's name.
    pub target: &'static str,
    /// A test runs if its name contains one of these; none means every test of the target.
    /// Each must match a test: a filter that matches none fails the run.
    pub filters: &'static [&'static str],
    /// How long the guest lets the target's tests run before it kills them.
    pub time_limit: Duration,
}

/// Kernels that load the datapath: the agent starts and says what the kernel offers, the
/// program through `BPF_PROG_TEST_RUN`, the agent on a veth with both hooks, and the first
/// connection after scale-to-zero succeeding by replay.
const DATAPATH_SUITES: &[Suite] = &[
    Suite {
        target: "kernel",
        filters: &[],
        time_limit: Duration::from_secs(3 * 60),
    },
    Suite {
        target: "packet",
        filters: &[],
        time_limit: Duration::from_secs(3 * 60),
    },
    // Every limit test but the rate limiters under contention from every CPU: under emulation
    // (2 vCPUs as host threads) the per-VIP limiter refused 1 of 2,000 tokens in most runs,
    // even with an hour of tolerance (a compare-and-swap that kept losing); on the host it
    // holds, and `cargo xtask test` runs it.
    Suite {
        target: "packet_limits",
        filters: &[
            "a_full_ring_is_counted_not_fatal",
            "global_rate_limit_caps_all_vips_together",
            "idle_vips_fail_open_once_the_heartbeat_expires_and_drop_again_when_renewed",
            "per_vip_rate_limit_turns_a_burst_into_a_trickle",
        ],
        time_limit: Duration::from_secs(2 * 60),
    },
    Suite {
        target: "packet_fuzz",
        filters: &[],
        time_limit: Duration::from_secs(3 * 60),
    },
    Suite {
        target: "packet_scopes",
        filters: &[],
        time_limit: Duration::from_secs(2 * 60),
    },
    Suite {
        target: "veth",
        filters: &[
            "idle_tcp_connect_native_mode",
            "idle_tcp_connect_tc_hook",
            "idle_tcp_connect_over_ipv6",
            "udp_datagram_to_idle_vip_is_reported_and_dropped",
            "vip_with_backends_connects_without_event_and_other_traffic_flows",
            "sigterm_detaches_and_exits_cleanly",
            "a_tc_attachment_left_by_a_crash_is_taken_over",
            "a_second_agent_with_the_tc_hook_is_refused_clearly",
        ],
        time_limit: Duration::from_secs(8 * 60),
    },
    Suite {
        target: "hold",
        filters: &[
            "the_first_tcp_connect_succeeds_as_soon_as_the_backend_appears_ipv4",
            "the_first_tcp_connect_succeeds_as_soon_as_the_backend_appears_ipv6",
            "one_udp_datagram_is_answered_exactly_once",
            "a_vlan_tagged_syn_is_replayed_with_its_tag",
            "the_kernel_hands_the_agent_only_what_it_keeps",
        ],
        time_limit: Duration::from_secs(5 * 60),
    },
    Suite {
        target: "capabilities",
        filters: &[],
        time_limit: Duration::from_secs(3 * 60),
    },
];

/// What each kernel runs, in the order `--kernels` boots them.
pub const MATRIX: &[KernelTests] = &[
    KernelTests {
        kernel: "6.1",
        suites: DATAPATH_SUITES,
        // What the probes must find: no TCX (6.6), holding (5.18).
        guest_env: &[("UNIDLER_EXPECT_FEATURES", "tc=\"clsact\" holding=true")],
    },
    KernelTests {
        kernel: "6.12",
        suites: DATAPATH_SUITES,
        guest_env: &[("UNIDLER_EXPECT_FEATURES", "tc=\"tcx\" holding=true")],
    },
    // Below the floor: the agent must refuse to start, and say why in a few lines.
    KernelTests {
        kernel: "5.10",
        suites: &[Suite {
            target: "kernel",
            filters: &[],
            time_limit: Duration::from_secs(3 * 60),
        }],
        guest_env: &[("UNIDLER_EXPECT_REFUSAL", "1")],
    },
];

/// The guest's vCPUs (the tests' "every CPU at once" needs more than one).
const GUEST_CPUS: &str = "2";
/// The guest's memory (the selection leaves at least 1.7 GB of it available).
const GUEST_MEMORY: &str = "2G";
/// How many times longer than on real hardware the test harness waits in a guest
/// (`UNIDLER_TEST_TIME_SCALE`): without KVM, loading the datapath (the verifier) takes over
/// 20 s instead of a third of a second.
const GUEST_TIME_SCALE: &str = "10";
/// What booting a guest may take on top of its tests' time limits, before it is killed (it
/// takes 10-20 s).
const BOOT_ALLOWANCE: Duration = Duration::from_secs(3 * 60);
/// Lines of a failed test's output, or of a log, shown in the report.
const SHOWN_LINES: usize = 40;

/// Runs the selections of `kernels` (names in [`MATRIX`]), each in its own guest, narrowed to
/// tests whose names contain one of `narrowing` (if any); fails unless every selected test of
/// every kernel ran and passed.
pub fn test(kernels: &[&str], narrowing: &[String]) -> Result<()> {
    if let Some(option) = narrowing.iter().find(|a| a.starts_with('-')) {
        bail!(
            "with --kernel, extra arguments narrow the kernel's selection to tests whose names \
             contain them; {option:?} is not a test name"
        );
    }
    let entries = kernels
        .iter()
        .map(|name| {
            MATRIX.iter().find(|e| e.kernel == *name).with_context(|| {
                format!(
                    "no kernel {name:?} in the matrix; it has {}",
                    MATRIX
                        .iter()
                        .map(|e| e.kernel)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let tools = setup::ensure_all()?;
    if !crate::is_root() {
        bail!(
            "the tests load BPF programs and create network namespaces in the guest, and \
             unpacking kernels needs root: run as root (sudo -E cargo xtask test --kernel ...)"
        );
    }
    let vng = setup::ensure_vm_tools()?;
    let mut booted = Vec::new();
    for entry in &entries {
        let series = kernels::SERIES
            .iter()
            .find(|s| s.name == entry.kernel)
            .with_context(|| format!("kernel {} has no Debian series", entry.kernel))?;
        booted.push((entry, kernels::ensure(series)?));
    }
    let agent = build(&tools, false)?;
    // Targets that exist; a kernel naming one that does not fails on its own, without a boot.
    let targets: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.suites.iter().map(|s| s.target))
        .filter(|t| test_source(t).exists())
        .collect();
    let executables = build_test_executables(&tools, &targets)?;

    let mut outcomes = Vec::new();
    for (entry, kernel) in &booted {
        let outcome = match plan(entry, &executables, narrowing) {
            Ok(plan) => run_in_guest(&vng, entry, kernel, &agent, &plan)?,
            Err(err) => KernelOutcome::could_not_run(entry.kernel, kernel, format!("{err:#}")),
        };
        outcome.print_details();
        outcomes.push(outcome);
    }
    print_summary(&outcomes);
    print_kernel_figures(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.kernel)
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed on {} (see above)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The names `--kernels` runs.
pub fn all_kernels() -> Vec<&'static str> {
    MATRIX.iter().map(|e| e.kernel).collect()
}

fn test_source(target: &str) -> PathBuf {
    workspace_root()
        .join("tests/tests")
        .join(format!("{target}.rs"))
}

/// Builds the test executables of `targets` (with the bootstrapped tools, as `cargo xtask test`
/// does); returns each target's executable.
fn build_test_executables(
    tools: &Path,
    targets: &BTreeSet<&str>,
) -> Result<BTreeMap<String, PathBuf>> {
    if targets.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut cmd = cargo(tools);
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--package",
        "unidler-tests",
    ]);
    for target in targets {
        cmd.args(["--test", target]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("building the test executables failed: {}", out.status);
    }
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && targets.contains(name) {
            executables.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    if let Some(missing) = targets.iter().find(|t| !executables.contains_key(**t)) {
        bail!("cargo built no test executable for {missing}");
    }
    Ok(executables)
}

/// One test target's tests, as the guest runs them.
struct PlannedSuite {
    suite: &'static Suite,
    executable: PathBuf,
    /// Exact test names, in the order the executable lists them.
    tests: Vec<String>,
}

/// The exact tests of `entry`'s selection (narrowed), from the executables' own lists.
fn plan(
    entry: &KernelTests,
    executables: &BTreeMap<String, PathBuf>,
    narrowing: &[String],
) -> Result<Vec<PlannedSuite>> {
    let mut planned = Vec::new();
    for suite in entry.suites {
        let executable = executables.get(suite.target).with_context(|| {
            format!(
                "kernel {}'s selection runs test target `{}`, and there is no {}",
                entry.kernel,
                suite.target,
                test_source(suite.target).display()
            )
        })?;
        let listed = list_tests(executable)?;
        if let Some(unmatched) = suite
            .filters
            .iter()
            .find(|f| !listed.iter().any(|t| t.contains(**f)))
        {
            bail!(
                "kernel {}'s selection names {unmatched:?} in `{}`, which has no such test",
                entry.kernel,
                suite.target
            );
        }
        let tests: Vec<String> = listed
            .into_iter()
            .filter(|t| suite.filters.is_empty() || suite.filters.iter().any(|f| t.contains(f)))
            .filter(|t| narrowing.is_empty() || narrowing.iter().any(|n| t.contains(n.as_str())))
            .collect();
        if !tests.is_empty() {
            planned.push(PlannedSuite {
                suite,
                executable: executable.clone(),
                tests,
            });
        }
    }
    if planned.is_empty() {
        if narrowing.is_empty() {
            bail!("kernel {}'s selection has no tests", entry.kernel);
        }
        bail!(
            "none of kernel {}'s selected tests has a name containing {}",
            entry.kernel,
            narrowing.join(" or ")
        );
    }
    Ok(planned)
}

/// The tests an executable has (`--list`). Ignored ones are listed too: given to the guest by
/// name, libtest reports them `ignored`, which counts as not passed.
fn list_tests(executable: &Path) -> Result<Vec<String>> {
    let listing = crate::output_of(Command::new(executable).arg("--list"))?;
    Ok(listing
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// What happened to one test target's tests in the guest.
struct SuiteOutcome {
    target: &'static str,
    planned: Vec<String>,
    /// Test name to libtest's verdict (`ok`, `FAILED`, `ignored`).
    verdicts: BTreeMap<String, String>,
    /// The executable's exit status and its run time in the guest, if it finished.
    exit: Option<(i32, u64)>,
    time_limit: Duration,
    log: PathBuf,
}

impl SuiteOutcome {
    fn passed(&self) -> Vec<&str> {
        self.with_verdict(|v| v == "ok")
    }

    /// Tests that ran and did not pass (ignored ones included: nothing is skipped quietly).
    fn failed(&self) -> Vec<&str> {
        self.with_verdict(|v| v != "ok")
    }

    /// Tests with no verdict: not started, or stopped before they ended.
    fn unfinished(&self) -> Vec<&str> {
        self.planned
            .iter()
            .filter(|t| !self.verdicts.contains_key(*t))
            .map(String::as_str)
            .collect()
    }

    fn with_verdict(&self, keep: impl Fn(&str) -> bool) -> Vec<&str> {
        self.planned
            .iter()
            .filter(|t| self.verdicts.get(*t).is_some_and(|v| keep(v)))
            .map(String::as_str)
            .collect()
    }

    fn ok(&self) -> bool {
        self.exit.is_some_and(|(code, _)| code == 0) && self.passed().len() == self.planned.len()
    }

    /// Why the executable ended abnormally, if it did.
    fn abnormal_end(&self) -> Option<String> {
        match self.exit {
            None => Some("the guest did not finish it".to_owned()),
            Some((124 | 137, _)) => Some(format!(
                "killed at its time limit of {} s",
                self.time_limit.as_secs()
            )),
            Some((0 | 101, _)) => None,
            Some((code, _)) => Some(format!("exited with status {code}")),
        }
    }
}

/// What happened on one kernel.
struct KernelOutcome {
    kernel: &'static str,
    release: String,
    /// Why the kernel's tests could not run at all, if they could not.
    could_not_run: Option<String>,
    suites: Vec<SuiteOutcome>,
    /// Whether the guest got to the end of its script.
    guest_finished: bool,
    wall_time: Duration,
    console_log: Option<PathBuf>,
    /// The guest's lowest `MemAvailable` seen, in kB.
    lowest_available_kb: Option<u64>,
    /// The verifier logs of refused programs, copied out of the guest.
    verifier_logs: Vec<PathBuf>,
}

impl KernelOutcome {
    fn could_not_run(kernel: &'static str, k: &Kernel, why: String) -> Self {
        Self {
            kernel,
            release: k.release.clone(),
            could_not_run: Some(why),
            suites: Vec::new(),
            guest_finished: false,
            wall_time: Duration::ZERO,
            console_log: None,
            lowest_available_kb: None,
            verifier_logs: Vec::new(),
        }
    }

    fn passed(&self) -> bool {
        self.could_not_run.is_none() && self.guest_finished && self.suites.iter().all(|s| s.ok())
    }

    fn count(&self, of: impl Fn(&SuiteOutcome) -> usize) -> usize {
        self.suites.iter().map(of).sum()
    }

    /// Per target: counts, failed tests with the end of their output, abnormal ends.
    fn print_details(&self) {
        let tag = format!("[{}]", self.kernel);
        if let Some(why) = &self.could_not_run {
            println!("{tag} FAILED: could not run: {why}");
            return;
        }
        for suite in &self.suites {
            let time = suite
                .exit
                .map_or_else(|| "-".to_owned(), |(_, secs)| format!("{secs} s"));
            println!(
                "{tag} {}: {} passed, {} failed, {} unfinished ({time})",
                suite.target,
                suite.passed().len(),
                suite.failed().len(),
                suite.unfinished().len()
            );
            let log = fs::read_to_string(&suite.log).unwrap_or_default();
            for test in suite.failed() {
                println!(
                    "{tag} {}: {test} {}; the end of its output:",
                    suite.target, suite.verdicts[test]
                );
                print_lines(&tag, &last_lines(&failure_output(&log, test), SHOWN_LINES));
            }
            if let Some(why) = suite.abnormal_end() {
                let running = unfinished_test(&log)
                    .map(|t| format!(" while {t} ran"))
                    .unwrap_or_default();
                println!(
                    "{tag} {}: {why}{running}; unfinished: {}",
                    suite.target,
                    suite.unfinished().join(", ")
                );
                println!("{tag} the end of {}:", suite.log.display());
                print_lines(&tag, &last_lines(&log, SHOWN_LINES));
            }
        }
        for log in &self.verifier_logs {
            println!("{tag} a verifier log from the guest: {}", log.display());
        }
        if let Some(kb) = self.lowest_available_kb {
            println!(
                "{tag} guest memory: at least {} MB of {GUEST_MEMORY} available throughout",
                kb / 1024
            );
        }
        if !self.guest_finished {
            println!("{tag} FAILED: the guest stopped before its tests were done");
            if let Some(console) = &self.console_log {
                let text = fs::read_to_string(console).unwrap_or_default();
                println!(
                    "{tag} the end of the guest's console ({}):",
                    console.display()
                );
                print_lines(&tag, &last_lines(&text, SHOWN_LINES));
            }
        }
    }
}

fn print_lines(tag: &str, text: &str) {
    for line in text.lines() {
        println!("{tag}   | {line}");
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// libtest's captured output of a failed `test` (`---- <test> stdout ----` up to the next
/// section), or nothing.
fn failure_output(log: &str, test: &str) -> String {
    let header = format!("---- {test} stdout ----");
    let Some(start) = log.find(&header) else {
        return String::new();
    };
    let body = &log[start + header.len()..];
    let end = ["\n---- ", "\nfailures:\n", "\nsuccesses:\n"]
        .iter()
        .filter_map(|m| body.find(m))
        .min()
        .unwrap_or(body.len());
    body[..end].trim_matches('\n').to_owned()
}

fn print_summary(outcomes: &[KernelOutcome]) {
    println!();
    println!("kernel matrix (qemu TCG, {GUEST_CPUS} vCPUs, {GUEST_MEMORY}):");
    println!(
        "  {:<6} {:<22} {:>6} {:>6} {:>10} {:>8}  result",
        "kernel", "release", "passed", "failed", "unfinished", "time"
    );
    for o in outcomes {
        let result = if o.passed() {
            "ok"
        } else if o.could_not_run.is_some() {
            "FAILED (could not run)"
        } else if !o.guest_finished {
            "FAILED (guest did not finish)"
        } else {
            "FAILED"
        };
        let secs = o.wall_time.as_secs();
        println!(
            "  {:<6} {:<22} {:>6} {:>6} {:>10} {:>5}m{:02}s  {result}",
            o.kernel,
            o.release,
            o.count(|s| s.passed().len()),
            o.count(|s| s.failed().len()),
            o.count(|s| s.unfinished().len()),
            secs / 60,
            secs % 60,
        );
    }
}

/// What each kernel's start said (`tests/tests/kernel.rs` prints it): the features probed,
/// each program's verification (time under emulation, instructions), or the refusal. The
/// kernel table in docs/kernels.md is read from here.
fn print_kernel_figures(outcomes: &[KernelOutcome]) {
    println!();
    println!("what each kernel's start said (tests/tests/kernel.rs):");
    for o in outcomes {
        let log = target_dir()
            .join("kernel-matrix")
            .join(o.kernel)
            .join("kernel.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        for line in text.lines().filter(|l| {
            [
                "kernel features probed",
                "program verified",
                "cannot run the datapath",
            ]
            .iter()
            .any(|needle| l.contains(needle))
        }) {
            println!("  [{}] {}", o.kernel, line.trim());
        }
    }
}

/// Boots `kernel` and runs `plan` in it; what happened, whether or not the tests passed.
fn run_in_guest(
    vng: &Path,
    entry: &KernelTests,
    kernel: &Kernel,
    agent: &Path,
    plan: &[PlannedSuite],
) -> Result<KernelOutcome> {
    let tag = format!("[{}]", entry.kernel);
    let dir = target_dir().join("kernel-matrix").join(entry.kernel);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let script = dir.join("guest.sh");
    fs::write(&script, guest_script(&dir, agent, entry.guest_env, plan))?;
    let console_log = dir.join("console.log");
    let console = fs::File::create(&console_log)?;
    let tests: usize = plan.iter().map(|p| p.tests.len()).sum();
    println!(
        "{tag} booting {} ({}) under qemu without KVM; tests: {tests} in {}",
        kernel.release,
        kernel.package,
        plan.iter()
            .map(|p| p.suite.target)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let limit = plan.iter().map(|p| p.suite.time_limit).sum::<Duration>() + BOOT_ALLOWANCE;
    let started = Instant::now();
    let mut vng_command = Command::new(vng);
    // vng runs virtme-run, installed beside it, from PATH.
    if let Some(bin) = vng.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        vng_command.env("PATH", crate::path_with(bin));
    }
    let mut child = vng_command
        .arg("--run")
        .arg(&kernel.image)
        .args([
            "--disable-kvm",
            "--cpus",
            GUEST_CPUS,
            "--memory",
            GUEST_MEMORY,
            "--verbose",
        ])
        .arg("--rwdir")
        .arg(&dir)
        .arg("--exec")
        .arg(format!("/bin/sh {}", shell_quote_path(&script)))
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group, so that qemu goes with it if it has to be killed.
        .process_group(0)
        .spawn()
        .with_context(|| format!("could not start {}", vng.display()))?;
    let mut follower = LogFollower::new(&tag, plan.iter().map(|p| log_path(&dir, p)).collect());
    loop {
        follower.print_new_lines();
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            println!(
                "{tag} the guest is still running after {} s: killing it",
                limit.as_secs()
            );
            // SAFETY: kill has no memory preconditions; the group is the one vng leads.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            child.wait()?;
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    follower.print_new_lines();
    let wall_time = started.elapsed();
    // vng's own exit status does not carry the guest's: the files the guest wrote say it all.
    let suites = plan
        .iter()
        .map(|p| {
            let log = log_path(&dir, p);
            let text = fs::read_to_string(&log).unwrap_or_default();
            SuiteOutcome {
                target: p.suite.target,
                planned: p.tests.clone(),
                verdicts: verdicts(&text),
                exit: read_exit(&dir.join(format!("{}.exit", p.suite.target))),
                time_limit: p.suite.time_limit,
                log,
            }
        })
        .collect();
    Ok(KernelOutcome {
        kernel: entry.kernel,
        release: kernel.release.clone(),
        could_not_run: None,
        suites,
        guest_finished: dir.join("finished").exists(),
        wall_time,
        console_log: Some(console_log),
        lowest_available_kb: fs::read_to_string(dir.join("memory.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .min(),
        verifier_logs: verifier_logs_in(&dir),
    })
}

/// The `unidler-verifier-*.log` files in `dir`.
fn verifier_logs_in(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("unidler-verifier-"))
        })
        .collect();
    logs.sort();
    logs
}

fn log_path(dir: &Path, planned: &PlannedSuite) -> PathBuf {
    dir.join(format!("{}.log", planned.suite.target))
}

/// `<exit status> <seconds>`, as the guest script writes it.
fn read_exit(path: &Path) -> Option<(i32, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let code = fields.next()?.parse().ok()?;
    let secs = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((code, secs))
}

/// libtest's `test <name> ... <verdict>` lines.
fn verdicts(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| {
            let (name, verdict) = l.strip_prefix("test ")?.split_once(" ...")?;
            let verdict = verdict.trim();
            (!verdict.is_empty()).then(|| (name.to_owned(), verdict.to_owned()))
        })
        .collect()
}

/// The test libtest had started and not finished when its output ends, if any.
fn unfinished_test(log: &str) -> Option<&str> {
    let last = log.lines().rev().find(|l| l.starts_with("test "))?;
    let (name, verdict) = last.strip_prefix("test ")?.split_once(" ...")?;
    verdict.trim().is_empty().then_some(name)
}

/// The script the guest runs: bpffs mounted, then each executable on its tests (exact names,
/// one at a time, killed at its time limit), its output to `<target>.log` and its exit status
/// and run time to `<target>.exit`; the verifier logs the agent left in `/tmp`, then `finished`
/// last. Meanwhile `memory.log` samples `MemAvailable` (kB) every 2 s.
fn guest_script(dir: &Path, agent: &Path, env: &[(&str, &str)], plan: &[PlannedSuite]) -> String {
    let q = shell_quote_path;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `cargo xtask test --kernel`; runs in the guest."
    );
    let _ = writeln!(s, "cd {}", q(dir));
    let _ = writeln!(s, "uname -r > kernel-release");
    let _ = writeln!(s, "mount -t bpf bpf /sys/fs/bpf");
    let _ = writeln!(
        s,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    let _ = writeln!(
        s,
        "(while :; do sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; \
         sleep 2; done) > memory.log &"
    );
    // No backtraces: the panic's message and place are what the report shows.
    let _ = writeln!(
        s,
        "export UNIDLER_BIN={} UNIDLER_TEST_TIME_SCALE={GUEST_TIME_SCALE} RUST_BACKTRACE=0",
        q(agent)
    );
    for (name, value) in env {
        let _ = writeln!(s, "export {name}={}", shell_quote(value));
    }
    // cargo runs test executables in their package's folder.
    let _ = writeln!(s, "cd {}", q(&workspace_root().join("tests")));
    for p in plan {
        let target = p.suite.target;
        let _ = write!(
            s,
            "start=$(date +%s)\ntimeout -k 10 {} {} --exact --test-threads 1 --show-output",
            p.suite.time_limit.as_secs(),
            q(&p.executable)
        );
        for test in &p.tests {
            let _ = write!(s, " {}", shell_quote(test));
        }
        let _ = writeln!(s, " > {} 2>&1", q(&dir.join(format!("{target}.log"))));
        let _ = writeln!(
            s,
            "echo \"$? $(( $(date +%s) - start ))\" > {}",
            q(&dir.join(format!("{target}.exit")))
        );
    }
    // The agent leaves a refused program's whole verifier log in the guest's /tmp.
    let _ = writeln!(
        s,
        "find /tmp -maxdepth 2 -name 'unidler-verifier-*.log' -exec cp {{}} {} ';'",
        q(dir)
    );
    let _ = writeln!(s, "touch {}", q(&dir.join("finished")));
    s
}

/// `text` quoted for `sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn shell_quote_path(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

/// Prints libtest's progress lines (`running N tests`, `test ... ok`) from the guest's logs as
/// they grow, so that a CI log shows where the guest is.
struct LogFollower {
    tag: String,
    /// Each log, how much of it has been read, and its last line while incomplete.
    logs: Vec<(PathBuf, u64, Vec<u8>)>,
}

impl LogFollower {
    fn new(tag: &str, logs: Vec<PathBuf>) -> Self {
        Self {
            tag: tag.to_owned(),
            logs: logs.into_iter().map(|p| (p, 0, Vec::new())).collect(),
        }
    }

    fn print_new_lines(&mut self) {
        for (path, offset, partial) in &mut self.logs {
            let Ok(mut file) = fs::File::open(&*path) else {
                continue;
            };
            if file.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let Ok(read) = file.read_to_end(partial) else {
                continue;
            };
            *offset += read as u64;
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end();
                if line.starts_with("test ") || line.starts_with("running ") {
                    let target = path.file_stem().unwrap_or_default().to_string_lossy();
                    println!("{} {target}: {line}", self.tag);
                }
            }
        }
    }
}
