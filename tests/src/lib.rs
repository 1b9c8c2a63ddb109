//! Test harness for unidler's integration tests (and the xtask demo): namespaces joined by
//! veth pairs, a frame builder, a reference model of the datapath, and a wrapper that runs
//! the real agent binary.

pub mod agent;
pub mod frames;
pub mod load_balancers;
pub mod netns;
pub mod oracle;
pub mod ovn_chassis;
pub mod ovsdb_server;

/// Panics unless the process runs as root: these tests load BPF programs and create network
/// namespaces, and CI runs them as root, so they fail loudly rather than skip.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, XDP, network namespaces): run `sudo -E cargo xtask test`"
    );
}

/// Makes a child process die with the test (thread) that started it, so that a test killed
/// mid-way leaves no servers or agents behind. Every harness spawn goes through this.
pub fn die_with_parent(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}
