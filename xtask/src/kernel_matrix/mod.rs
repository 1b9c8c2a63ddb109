//! `cargo xtask test --kernel <series>` and `--kernels`: a selection of the tests run inside
//! Debian's kernels, booted under qemu (TCG) by virtme-ng.
//!
//! The test executables are built on the host; the guest sees the host's filesystem read-only
//! (virtme-ng) and runs them from `target/`. It writes each test target's output and exit status
//! into `target/kernel-matrix/<series>/`, the one folder it may write to on the host, which is
//! followed while the guest runs and read when it is gone: a kernel passes only if every test of
//! its selection ran and passed. [`MATRIX`] says what each kernel runs.

mod guest;
mod outcome;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{guest::*, outcome::*};

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
    pub(super) suite: &'static Suite,
    pub(super) executable: PathBuf,
    /// Exact test names, in the order the executable lists them.
    pub(super) tests: Vec<String>,
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
