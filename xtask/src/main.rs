//! `cargo xtask`: bootstrap, build, run, test, lint and demo unidler.

mod demo;
mod kernel_matrix;
mod kernels;
mod setup;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for unidler", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: rust-src, bpf-linker, Debian packages.
    Setup,
    /// Build the agent (with the XDP program embedded).
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
    },
    /// Build the agent and run it as root: `cargo xtask run -- run --iface eth0 ...`.
    Run {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
        /// Arguments for the agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the whole test suite (needs root: namespaces, XDP, BPF); with `--kernel` or
    /// `--kernels`, a selection of it inside Debian's kernels under qemu instead.
    Test {
        /// Run the kernel matrix's selection inside this Debian kernel (6.1, 6.12, 5.10),
        /// booted under qemu without KVM (downloads its package into .tools/kernels/).
        #[arg(long, conflicts_with = "kernels")]
        kernel: Option<String>,
        /// Run the kernel matrix: every kernel `--kernel` takes, one after the other.
        #[arg(long)]
        kernels: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter; with `--kernel` or
        /// `--kernels`, words that narrow the selection to tests whose names contain one.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the benchmarks (needs root); e.g. `cargo xtask bench -- 1 3` for sections 1 and 3.
    Bench {
        /// Also start real OVN (ovn-northd, ovs-vswitchd, ovn-controller) and measure its own
        /// path side by side (section 6).
        #[arg(long)]
        vs_ovn: bool,
        /// Sections to run (default: all).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Fuzz the parsers (OVSDB messages, VIPs file, the XDP parser against its model) for
    /// longer than the test suite does, from a random seed it prints (needs root); with
    /// `--differential`, the OVN VIP source against its model instead.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Run the differential test of the OVN VIP source (random Southbound changes, the
        /// agent's VIP table and kernel maps against a model) for `--minutes`.
        #[arg(long)]
        differential: bool,
        /// Minutes of the differential run.
        #[arg(long, default_value_t = 10, requires = "differential")]
        minutes: u64,
    },
    /// The chaos test for `--minutes` (needs root): member kills, connection cuts, agent
    /// restarts, a SYN flood and replays; every hit must land once.
    Chaos {
        /// Minutes to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Check formatting and run clippy with warnings denied, the eBPF crate included.
    Lint,
    /// Show the datapath catching the first packet to an idle service, in namespaces of its own.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::ensure_all().map(drop),
        Task::Build { release } => build(&setup::ensure_build_tools()?, release).map(drop),
        Task::Run { release, args } => {
            let agent = build(&setup::ensure_build_tools()?, release)?;
            run(as_root(&agent).args(args))
        }
        Task::Test {
            kernel,
            kernels,
            args,
        } => {
            let matrix = match (kernel, kernels) {
                (Some(kernel), _) => vec![kernel],
                (None, true) => kernel_matrix::all_kernels()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                (None, false) => return test(args),
            };
            let narrowing = args
                .into_iter()
                .map(|a| {
                    a.into_string()
                        .map_err(|a| anyhow::anyhow!("{a:?} is not UTF-8"))
                })
                .collect::<Result<Vec<_>>>()?;
            let matrix: Vec<&str> = matrix.iter().map(String::as_str).collect();
            kernel_matrix::test(&matrix, &narrowing)
        }
        Task::Lint => lint(),
        Task::Fuzz {
            differential: true,
            minutes,
            ..
        } => fuzz_differential(minutes),
        Task::Fuzz { seconds, .. } => fuzz(seconds),
        Task::Bench { vs_ovn, args } => bench(vs_ovn, args),
        Task::Chaos { minutes } => chaos(minutes),
        Task::Demo => {
            let agent = build(&setup::ensure_all()?, false)?;
            demo::run(&agent)
        }
    }
}

/// Builds the agent with the bootstrapped tools; returns the path of its binary.
fn build(tools: &Path, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo(tools);
    cmd.args(["build", "--package", "unidler", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("unidler"))
}

/// Builds the agent (debug) and returns the path of the eBPF object its build embedded, as
/// cargo reports the build script's output folder.
fn ebpf_object(tools: &Path) -> Result<PathBuf> {
    let out = output_of(
        cargo(tools)
            .args([
                "build",
                "--package",
                "unidler",
                "--lib",
                "--message-format=json",
            ])
            // The object built here, not one a caller's environment names.
            .env_remove("UNIDLER_EBPF_OBJECT")
            .env_remove("UNIDLER_NO_EBPF"),
    )?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "build-script-executed")
        .filter(|msg| {
            msg["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("/unidler#") || id.starts_with("unidler "))
        })
        .find_map(|msg| {
            msg["out_dir"]
                .as_str()
                .map(|dir| Path::new(dir).join("unidler"))
        })
        .filter(|object| object.metadata().is_ok_and(|m| m.len() > 0))
        .context("cargo did not say where the agent's build left its eBPF object")
}

fn test(args: Vec<OsString>) -> Result<()> {
    let tools = setup::ensure_all()?;
    if !is_root() {
        bail!(
            "the tests load XDP programs and create network namespaces: run them as root \
             (sudo -E cargo xtask test)"
        );
    }
    let agent = build(&tools, false)?;
    let mut cmd = cargo(&tools);
    // The eBPF crate builds only for the BPF target; its behaviour is tested through the agent.
    cmd.args(["test", "--workspace", "--exclude", "unidler-ebpf"])
        .args(&args)
        .env("UNIDLER_BIN", &agent);
    run(&mut cmd)?;
    // The whole suite (no filter): a short pass of every coverage-guided target too.
    if args.is_empty() {
        libfuzzer(&tools, FuzzBudget::Runs(LIBFUZZER_RUNS_IN_SUITE))?;
    } else {
        eprintln!("[fuzz] the libFuzzer targets run with the whole suite only (not filtered)");
    }
    Ok(())
}

/// How many inputs the test suite runs through each libFuzzer target (seconds each at these
/// targets' rates).
const LIBFUZZER_RUNS_IN_SUITE: u64 = 100_000;

/// The coverage-guided fuzz targets (`fuzz/fuzz_targets/`), each driven by libFuzzer over
/// its corpus in `fuzz/corpus/<target>/`.
const FUZZ_TARGETS: [&str; 6] = [
    "ovsdb_framing",
    "ovsdb_values",
    "ovsdb_updates",
    "vips_file",
    "held_frame",
    "xdp_parser",
];

fn fuzz(seconds: u64) -> Result<()> {
    let tools = setup::ensure_all()?;
    if !is_root() {
        bail!("the XDP parser is fuzzed through BPF_PROG_TEST_RUN: run as root");
    }
    libfuzzer(&tools, FuzzBudget::Seconds(seconds))?;
    let agent = build(&tools, true)?;
    run(cargo(&tools)
        .args([
            "test",
            "--release",
            "--package",
            "unidler-tests",
            "--test",
            "fuzz",
            "--test",
            "packet_fuzz",
            "--",
            "--nocapture",
            "--test-threads",
            "1",
            "fuzz_",
        ])
        .env("UNIDLER_FUZZ_SECONDS", seconds.to_string())
        .env("UNIDLER_BIN", &agent))
}

/// How long each libFuzzer target runs.
#[derive(Clone, Copy)]
enum FuzzBudget {
    /// For this many seconds, from a random seed, adding what it finds to the corpus in the
    /// repository (`cargo fuzz cmin` before committing it).
    Seconds(u64),
    /// This many inputs from seed 1, the repository's corpus read only: the same inputs every
    /// run (the test suite's pass).
    Runs(u64),
}

/// Builds the libFuzzer targets (ASan, nightly) and runs each as `budget` says; says, per
/// target, how many inputs ran and the coverage reached. A crash fails it; its input is left
/// in `fuzz/artifacts/<target>/`.
fn libfuzzer(tools: &Path, budget: FuzzBudget) -> Result<()> {
    // The BPF target cannot take the sanitizers' flags: the targets embed the object of the
    // agent's own build (see unidler/build.rs), which the packet parser's target runs.
    let object = ebpf_object(tools)?;
    eprintln!("[fuzz] UNIDLER_EBPF_OBJECT={}", object.display());
    eprintln!("[fuzz] building the targets (cargo fuzz, ASan; minutes the first time)");
    run(cargo(tools)
        .args(["+nightly", "fuzz", "build"])
        .env("UNIDLER_EBPF_OBJECT", &object))?;
    let scratch = target_dir().join("fuzz-scratch");
    let mut figures = Vec::new();
    for target in FUZZ_TARGETS {
        let corpus = workspace_root().join("fuzz/corpus").join(target);
        let mut cmd = cargo(tools);
        cmd.args(["+nightly", "fuzz", "run", target]);
        match budget {
            FuzzBudget::Seconds(seconds) => {
                eprintln!("[fuzz] {target}: {seconds} s over {}", corpus.display());
                cmd.arg(&corpus)
                    .args(["--", &format!("-max_total_time={seconds}")]);
            }
            FuzzBudget::Runs(runs) => {
                // New inputs go to a scratch folder, the first one libFuzzer is given.
                let found = scratch.join(target);
                let _ = std::fs::remove_dir_all(&found);
                std::fs::create_dir_all(&found)?;
                eprintln!("[fuzz] {target}: {runs} inputs from seed 1 over its corpus");
                cmd.arg(&found)
                    .arg(&corpus)
                    .args(["--", &format!("-runs={runs}"), "-seed=1"]);
            }
        }
        let out = cmd
            .arg("-print_final_stats=1")
            .env("UNIDLER_EBPF_OBJECT", &object)
            .output()
            .with_context(|| format!("running cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            bail!("fuzz target {target} failed (its input is in fuzz/artifacts/{target}/)");
        }
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| "?".into())
        };
        let coverage = log
            .lines()
            .rev()
            .find_map(|l| l.split(" cov: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        figures.push((
            target,
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            coverage,
        ));
    }
    eprintln!("[fuzz] target, inputs run, per second, coverage (edges)");
    for (target, runs, rate, coverage) in figures {
        eprintln!("[fuzz] {target:14} {runs:>12} {rate:>8} {coverage:>6}");
    }
    Ok(())
}

/// The differential test of the OVN VIP source, as many sequences as fit in `minutes`.
fn fuzz_differential(minutes: u64) -> Result<()> {
    long_run("ovn_differential", "UNIDLER_DIFFERENTIAL_SECONDS", minutes)
}

/// The chaos test (`tests/tests/chaos.rs`) for `minutes`.
fn chaos(minutes: u64) -> Result<()> {
    long_run("chaos", "UNIDLER_CHAOS_SECONDS", minutes)
}

/// Runs the test target `test` (root, namespaces) for `minutes`, told by `seconds_var`.
fn long_run(test: &str, seconds_var: &str, minutes: u64) -> Result<()> {
    let tools = setup::ensure_all()?;
    if !is_root() {
        bail!("{test} runs the agent in network namespaces: run it as root");
    }
    let agent = build(&tools, false)?;
    run(cargo(&tools)
        .args(["test", "--package", "unidler-tests", "--test", test])
        .args(["--", "--nocapture"])
        .env(seconds_var, (minutes * 60).to_string())
        .env("UNIDLER_BIN", &agent))
}

fn bench(vs_ovn: bool, args: Vec<OsString>) -> Result<()> {
    let tools = setup::ensure_all()?;
    if !is_root() {
        bail!("the benchmarks load XDP programs and create namespaces: run them as root");
    }
    let agent = build(&tools, true)?;
    run(cargo(&tools)
        .args([
            "bench",
            "--package",
            "unidler-tests",
            "--bench",
            "bench",
            "--",
        ])
        .args(vs_ovn.then_some("--vs-ovn"))
        .args(args)
        .env("UNIDLER_BIN", &agent))
}

fn lint() -> Result<()> {
    let tools = setup::ensure_build_tools()?;
    setup::ensure_fuzz_build_tools()?;
    run(cargo(&tools).args(["fmt", "--all", "--check"]))?;
    run(cargo(&tools).args([
        "clippy",
        "--workspace",
        "--exclude",
        "unidler-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate builds only for the BPF target, with the nightly and build-std.
    run(cargo(&tools)
        .args([
            "+nightly",
            "clippy",
            "--package",
            "unidler-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", target_dir().join("ebpf-clippy")))?;
    // The fuzz targets, a workspace of their own (the library without its eBPF object).
    let fuzz = workspace_root().join("fuzz/Cargo.toml");
    run(cargo(&tools)
        .args(["fmt", "--check", "--manifest-path"])
        .arg(&fuzz))?;
    run(cargo(&tools)
        .args(["clippy", "--manifest-path"])
        .arg(&fuzz)
        .args(["--", "-D", "warnings"])
        .env("UNIDLER_NO_EBPF", "1")
        .env("CARGO_TARGET_DIR", target_dir().join("fuzz-clippy")))
}

/// A `cargo` command with the bootstrapped tools first on PATH.
fn cargo(tools_bin: &Path) -> Command {
    // The rustup proxy, not $CARGO (the toolchain's own binary), so that `+nightly` works.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env("PATH", path_with(tools_bin));
    cmd
}

fn path_with(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries are valid")
}

/// `program` run as root: directly when we are root, else through sudo.
fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs a command, inheriting stdio; fails with the command line if it does not succeed.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
