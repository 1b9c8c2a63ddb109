//! What a kernel's run came to: each suite's verdicts read from the guest's logs, the
//! kernel's outcome, and the report.

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use super::*;

/// What happened to one test target's tests in the guest.
pub(super) struct SuiteOutcome {
    pub(super) target: &'static str,
    pub(super) planned: Vec<String>,
    /// Test name to libtest's verdict (`ok`, `FAILED`, `ignored`).
    pub(super) verdicts: BTreeMap<String, String>,
    /// The executable's exit status and its run time in the guest, if it finished.
    pub(super) exit: Option<(i32, u64)>,
    pub(super) time_limit: Duration,
    pub(super) log: PathBuf,
}

impl SuiteOutcome {
    pub(super) fn passed(&self) -> Vec<&str> {
        self.with_verdict(|v| v == "ok")
    }

    /// Tests that ran and did not pass (ignored ones included: nothing is skipped quietly).
    pub(super) fn failed(&self) -> Vec<&str> {
        self.with_verdict(|v| v != "ok")
    }

    /// Tests with no verdict: not started, or stopped before they ended.
    pub(super) fn unfinished(&self) -> Vec<&str> {
        self.planned
            .iter()
            .filter(|t| !self.verdicts.contains_key(*t))
            .map(String::as_str)
            .collect()
    }

    pub(super) fn with_verdict(&self, keep: impl Fn(&str) -> bool) -> Vec<&str> {
        self.planned
            .iter()
            .filter(|t| self.verdicts.get(*t).is_some_and(|v| keep(v)))
            .map(String::as_str)
            .collect()
    }

    pub(super) fn ok(&self) -> bool {
        self.exit.is_some_and(|(code, _)| code == 0) && self.passed().len() == self.planned.len()
    }

    /// Why the executable ended abnormally, if it did.
    pub(super) fn abnormal_end(&self) -> Option<String> {
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
pub(super) struct KernelOutcome {
    pub(super) kernel: &'static str,
    pub(super) release: String,
    /// Why the kernel's tests could not run at all, if they could not.
    pub(super) could_not_run: Option<String>,
    pub(super) suites: Vec<SuiteOutcome>,
    /// Whether the guest got to the end of its script.
    pub(super) guest_finished: bool,
    pub(super) wall_time: Duration,
    pub(super) console_log: Option<PathBuf>,
    /// The guest's lowest `MemAvailable` seen, in kB.
    pub(super) lowest_available_kb: Option<u64>,
    /// The verifier logs of refused programs, copied out of the guest.
    pub(super) verifier_logs: Vec<PathBuf>,
}

impl KernelOutcome {
    pub(super) fn could_not_run(kernel: &'static str, k: &Kernel, why: String) -> Self {
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

    pub(super) fn passed(&self) -> bool {
        self.could_not_run.is_none() && self.guest_finished && self.suites.iter().all(|s| s.ok())
    }

    pub(super) fn count(&self, of: impl Fn(&SuiteOutcome) -> usize) -> usize {
        self.suites.iter().map(of).sum()
    }

    /// Per target: counts, failed tests with the end of their output, abnormal ends.
    pub(super) fn print_details(&self) {
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

pub(super) fn print_lines(tag: &str, text: &str) {
    for line in text.lines() {
        println!("{tag}   | {line}");
    }
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// libtest's captured output of a failed `test` (`---- <test> stdout ----` up to the next
/// section), or nothing.
pub(super) fn failure_output(log: &str, test: &str) -> String {
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

pub(super) fn print_summary(outcomes: &[KernelOutcome]) {
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
pub(super) fn print_kernel_figures(outcomes: &[KernelOutcome]) {
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

/// `<exit status> <seconds>`, as the guest script writes it.
pub(super) fn read_exit(path: &Path) -> Option<(i32, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let code = fields.next()?.parse().ok()?;
    let secs = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((code, secs))
}

/// libtest's `test <name> ... <verdict>` lines.
pub(super) fn verdicts(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| {
            let (name, verdict) = l.strip_prefix("test ")?.split_once(" ...")?;
            let verdict = verdict.trim();
            (!verdict.is_empty()).then(|| (name.to_owned(), verdict.to_owned()))
        })
        .collect()
}

/// The test libtest had started and not finished when its output ends, if any.
pub(super) fn unfinished_test(log: &str) -> Option<&str> {
    let last = log.lines().rev().find(|l| l.starts_with("test "))?;
    let (name, verdict) = last.strip_prefix("test ")?.split_once(" ...")?;
    verdict.trim().is_empty().then_some(name)
}
