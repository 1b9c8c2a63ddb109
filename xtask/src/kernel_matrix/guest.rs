//! The guest: the script it runs, booting it under virtme-ng, and following its logs while it
//! runs.

use std::{
    fmt::Write as _,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
};

use super::*;

/// Boots `kernel` and runs `plan` in it; what happened, whether or not the tests passed.
pub(super) fn run_in_guest(
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
pub(super) fn verifier_logs_in(dir: &Path) -> Vec<PathBuf> {
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

pub(super) fn log_path(dir: &Path, planned: &PlannedSuite) -> PathBuf {
    dir.join(format!("{}.log", planned.suite.target))
}

/// The script the guest runs: bpffs mounted, then each executable on its tests (exact names,
/// one at a time, killed at its time limit), its output to `<target>.log` and its exit status
/// and run time to `<target>.exit`; the verifier logs the agent left in `/tmp`, then `finished`
/// last. Meanwhile `memory.log` samples `MemAvailable` (kB) every 2 s.
pub(super) fn guest_script(
    dir: &Path,
    agent: &Path,
    env: &[(&str, &str)],
    plan: &[PlannedSuite],
) -> String {
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
pub(super) fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

pub(super) fn shell_quote_path(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

/// Prints libtest's progress lines (`running N tests`, `test ... ok`) from the guest's logs as
/// they grow, so that a CI log shows where the guest is.
pub(super) struct LogFollower {
    pub(super) tag: String,
    /// Each log, how much of it has been read, and its last line while incomplete.
    pub(super) logs: Vec<(PathBuf, u64, Vec<u8>)>,
}

impl LogFollower {
    pub(super) fn new(tag: &str, logs: Vec<PathBuf>) -> Self {
        Self {
            tag: tag.to_owned(),
            logs: logs.into_iter().map(|p| (p, 0, Vec::new())).collect(),
        }
    }

    pub(super) fn print_new_lines(&mut self) {
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
