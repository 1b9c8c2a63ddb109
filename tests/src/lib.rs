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
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod rng;
pub mod vips_file;

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

pub use ovsdb_harness::die_with_parent;

/// Waits until `check` holds, at most `timeout`; panics naming `what` otherwise.
#[track_caller]
pub fn eventually(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
