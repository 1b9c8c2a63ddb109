//! A BPF file system of a test's own, for datapaths pinned with `--pin-dir`.

use std::process::Command;

use ovsdb_harness::TempDir;

/// A BPF file system mounted on a temp dir (outside /sys, which `ip netns exec` remounts),
/// unmounted on drop: whatever is pinned there goes with it.
pub struct BpfFs {
    dir: TempDir,
}

impl BpfFs {
    /// Mounts one.
    #[track_caller]
    pub fn mount() -> Self {
        let dir = TempDir::new("bpffs");
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", dir.path_str()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t bpf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    /// The pin directory inside it.
    pub fn pin_dir(&self) -> String {
        format!("{}/unidler", self.dir.path_str())
    }

    /// Where the agent pins the map `name` (`--pin-dir`'s layout).
    pub fn map_path(&self, name: &str) -> String {
        format!("{}/maps/{name}", self.pin_dir())
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path_str()).output();
    }
}
