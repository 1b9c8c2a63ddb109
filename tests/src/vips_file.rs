//! A `--vips-file` in a temp dir, rewritten atomically: how tests and benchmarks give a VIP
//! backends without OVN. Pair a rewrite with SIGHUP to the agent for an immediate reload.

use std::path::{Path, PathBuf};

use crate::ovsdb_server::TempDir;

/// A VIPs file with one VIP.
pub struct VipsFile {
    dir: TempDir,
    vip: String,
    protocol: String,
}

impl VipsFile {
    /// The file, with `vip` (`IP:PORT`, IPv6 as `[IP]:PORT`) over `protocol` idle.
    pub fn new(vip: &str, protocol: &str) -> Self {
        let file = Self {
            dir: TempDir::new("vipsfile"),
            vip: vip.to_owned(),
            protocol: protocol.to_owned(),
        };
        file.set_backends(0);
        file
    }

    /// Where it is.
    pub fn path(&self) -> PathBuf {
        Path::new(self.dir.path_str()).join("vips.toml")
    }

    /// [`VipsFile::path`] as a string, for an agent's arguments.
    pub fn path_string(&self) -> String {
        self.path().display().to_string()
    }

    /// Rewrites the file with the VIP's backend count.
    pub fn set_backends(&self, backends: u32) {
        let (vip, protocol) = (&self.vip, &self.protocol);
        self.replace(&format!(
            "[[vip]]\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nbackends = {backends}\n"
        ));
    }

    /// Rewrites the file with `text` (atomically: a rename).
    pub fn replace(&self, text: &str) {
        let tmp = Path::new(self.dir.path_str()).join("vips.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}
