//! VIPs from a static TOML file (`--vips-file`), for nodes without OVN: reloaded when it
//! changes or on demand (SIGHUP); a malformed file is rejected and the last good set stays.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::vip::{DesiredVip, Protocol, Vip, VipUpdate};

/// The `--vips-file` format (TOML):
///
/// ```toml
/// # One table per VIP.
/// [[vip]]
/// vip = "10.96.0.10:80"        # IP:PORT, IPv6 as "[fd00::10]:80"
/// protocol = "tcp"             # tcp (default), udp or sctp
/// backends = 0                 # 0 (default) means idle
/// load_balancer = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7"   # optional
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipsFile {
    #[serde(default)]
    vip: Vec<VipsFileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipsFileEntry {
    vip: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    backends: u32,
    #[serde(default)]
    load_balancer: Option<String>,
}

/// Why a VIPs file was rejected.
#[derive(Debug, Error)]
pub enum VipsFileError {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    /// Not valid TOML, or not the format.
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// An entry is wrong; `line` is where it is, when it can be told.
    #[error("{}{problem}", line.map_or(String::new(), |l| format!("line {l}: ")))]
    Entry {
        /// 1-based line of the entry's offending value.
        line: Option<usize>,
        /// What is wrong.
        problem: String,
    },
}

/// Parses a VIPs file; errors name the line and the reason.
pub fn parse_vips_file(text: &str) -> Result<Vec<DesiredVip>, VipsFileError> {
    let file: VipsFile = toml::from_str(text)?;
    let entry_error = |needle: &str, problem: String| VipsFileError::Entry {
        line: text.lines().position(|l| l.contains(needle)).map(|i| i + 1),
        problem,
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for entry in file.vip {
        let addr: SocketAddr = entry.vip.parse().map_err(|e| {
            entry_error(
                &entry.vip,
                format!(
                    "bad vip {:?} ({e}); expected IP:PORT or [IPv6]:PORT",
                    entry.vip
                ),
            )
        })?;
        let protocol = match &entry.protocol {
            Some(p) => p
                .parse::<Protocol>()
                .map_err(|e| entry_error(p, e.to_string()))?,
            None => Protocol::Tcp,
        };
        let vip = Vip::new(addr, protocol);
        if !seen.insert(vip) {
            return Err(entry_error(&entry.vip, format!("{vip} is listed twice")));
        }
        out.push(DesiredVip {
            vip,
            backends: entry.backends,
            load_balancer: entry.load_balancer.map(Into::into),
        });
    }
    Ok(out)
}

/// When `path` was last modified, if it can be told.
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Follows `path`, which the caller loaded when its modification time was `loaded_at`: loads
/// it again whenever it changes (checked every `poll`) or `reload` fires (SIGHUP); a
/// malformed file is logged and the last good set stays.
pub fn spawn(
    path: PathBuf,
    loaded_at: Option<SystemTime>,
    poll: Duration,
    mut reload: mpsc::UnboundedReceiver<()>,
    updates: mpsc::UnboundedSender<VipUpdate>,
) {
    tokio::spawn(async move {
        let mut last_seen = loaded_at;
        let mut forced = false;
        loop {
            let modified = modified(&path);
            if forced || modified != last_seen {
                last_seen = modified;
                forced = false;
                match load(&path) {
                    Ok(vips) => {
                        info!(path = %path.display(), vips = vips.len(), "VIPs file loaded");
                        if updates.send(VipUpdate::Replace(vips)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(path = %path.display(), "VIPs file rejected, keeping the last good VIPs: {e}")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                r = reload.recv() => {
                    if r.is_none() { return; }
                    forced = true;
                }
            }
        }
    });
}

/// Reads and parses a VIPs file.
pub fn load(path: &Path) -> Result<Vec<DesiredVip>, VipsFileError> {
    parse_vips_file(&std::fs::read_to_string(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_file_parses_and_errors_name_the_line() {
        let good = r#"
[[vip]]
vip = "10.96.0.10:80"

[[vip]]
vip = "[fd00::10]:53"
protocol = "udp"
backends = 2
load_balancer = "lb-1"
"#;
        let vips = parse_vips_file(good).unwrap();
        assert_eq!(vips.len(), 2);
        assert_eq!(vips[0].backends, 0);
        assert_eq!(vips[0].vip.protocol, Protocol::Tcp);
        assert_eq!(vips[1].load_balancer.as_deref(), Some("lb-1"));

        let bad_vip = "[[vip]]\nvip = \"10.0.0.1\"\n";
        let err = parse_vips_file(bad_vip).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("bad vip"), "{err}");
        let bad_proto = "[[vip]]\nvip = \"10.0.0.1:80\"\nprotocol = \"icmp\"\n";
        assert!(
            parse_vips_file(bad_proto)
                .unwrap_err()
                .to_string()
                .contains("line 3")
        );
        let bad_toml = "[[vip]]\nvip = \n";
        assert!(
            parse_vips_file(bad_toml)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
        let unknown = "[[vip]]\nvip = \"10.0.0.1:80\"\nbackend = 1\n";
        assert!(
            parse_vips_file(unknown)
                .unwrap_err()
                .to_string()
                .contains("backend")
        );
        let twice = "[[vip]]\nvip = \"10.0.0.1:80\"\n[[vip]]\nvip = \"10.0.0.1:80\"\n";
        assert!(
            parse_vips_file(twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
