//! Test harness for unidler's integration tests (and the xtask demo): namespaces joined by
//! veth pairs, a frame builder, a reference model of the datapath, and a wrapper that runs
//! the real agent binary.

pub mod agent;
pub mod bpffs;
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

/// How many times slower than on real hardware the tests run: `$UNIDLER_TEST_TIME_SCALE`, a
/// number of at least 1 (default 1). The kernel matrix (`cargo xtask test --kernel`) sets it in
/// its guests, whose CPUs qemu emulates without KVM. The harness stretches its own waits by it
/// (for the agent's logs, events and exit, and [`eventually`]); a test's claims about how fast
/// something happens are the test's, and stay as they are.
pub fn time_scale() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("UNIDLER_TEST_TIME_SCALE") {
        Err(_) => 1.0,
        Ok(text) => text
            .parse::<f64>()
            .ok()
            .filter(|scale| scale.is_finite() && *scale >= 1.0)
            .unwrap_or_else(|| {
                panic!("UNIDLER_TEST_TIME_SCALE={text:?} is not a number of at least 1")
            }),
    })
}

/// `wait` stretched by [`time_scale`]: how long to wait for what takes at most `wait` on real
/// hardware.
pub fn scaled(wait: std::time::Duration) -> std::time::Duration {
    wait.mul_f64(time_scale())
}

/// Waits until `check` holds, at most `timeout` ([`scaled`]); panics naming `what` otherwise.
#[track_caller]
pub fn eventually(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
