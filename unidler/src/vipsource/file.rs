//! VIPs from a static TOML file (`--vips-file`), for nodes without OVN: reloaded when it
//! changes or on demand (SIGHUP); a malformed file is rejected and the last good set stays.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

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
            scoped: None,
        });
    }
    Ok(out)
}

/// A VIPs file followed for changes: reloaded whenever its content changes (compared, not
/// inferred from the modification time, which two quick writes can share) or on demand. A
/// file whose metadata has not changed since a read that can be trusted is not read again.
pub struct VipsFileSource {
    path: PathBuf,
    /// The content last loaded or rejected: neither is done twice.
    last_seen: Option<String>,
    /// The metadata of `last_seen`'s file, once it is old enough to be trusted.
    last_stamp: Option<FileStamp>,
    /// Whether the last content loaded had VIPs (an empty file after it is said so).
    had_vips: bool,
    /// Reads of the file's content (for tests).
    reads: u64,
}

/// What a file's metadata says of its content: any write changes the change time (`ctime`,
/// which, unlike the modification time, cannot be set back), and a replaced file has a new
/// inode. A stamp taken less than [`RACY`] after the last change is not trusted: a write in
/// the same tick of the file system's clock would leave it as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long after its last change a file's metadata is not trusted to show the next one.
const RACY: Duration = Duration::from_secs(2);

impl FileStamp {
    /// The stamp of `meta`, if its last change is at least [`RACY`] old.
    fn trusted(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let changed = std::time::UNIX_EPOCH
            + Duration::new(
                meta.ctime().max(0) as u64,
                meta.ctime_nsec().clamp(0, 999_999_999) as u32,
            );
        let age = std::time::SystemTime::now().duration_since(changed).ok()?;
        (age >= RACY).then(|| Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// One look at the file.
enum Look {
    /// Its metadata is the trusted stamp's: not read.
    Unchanged,
    /// Its content, and its stamp if trusted.
    Read(String, Option<FileStamp>),
}

/// The largest VIPs file read (far more than any node's VIPs: about 60 bytes each).
pub const VIPS_FILE_MAX_BYTES: u64 = 64 << 20;

/// Reads the VIPs file at `path`: a regular file (opened without blocking, so that a FIFO or
/// a device is refused rather than waited on or read forever) of at most
/// [`VIPS_FILE_MAX_BYTES`].
pub fn read_vips_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a pipe, a device or a directory is not read)",
        ));
    }
    let mut text = String::new();
    file.take(VIPS_FILE_MAX_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > VIPS_FILE_MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            VIPS_FILE_MAX_BYTES >> 20
        )));
    }
    Ok(text)
}

/// How long a changed file must stay the same before it is loaded: a file being written in
/// place is read again rather than applied half-written.
const SETTLE: Duration = Duration::from_millis(100);

impl VipsFileSource {
    /// A source for the file at `path` (nothing read yet).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            last_seen: None,
            last_stamp: None,
            had_vips: false,
            reads: 0,
        }
    }

    /// Reads and parses the file now (at start, where a bad file is fatal).
    pub fn load(&mut self) -> Result<Vec<DesiredVip>, VipsFileError> {
        let text = read_vips_file(&self.path)?;
        let vips = parse_vips_file(&text);
        self.had_vips = vips.as_ref().is_ok_and(|v| !v.is_empty());
        self.last_seen = Some(text);
        vips
    }

    /// Reads the file off the runtime's threads.
    async fn read(&mut self) -> std::io::Result<String> {
        match self.look(None).await? {
            Look::Read(text, _) => Ok(text),
            Look::Unchanged => unreachable!("no stamp to compare with"),
        }
    }

    /// Looks at the file off the runtime's threads: reads it unless its metadata is `known`.
    async fn look(&mut self, known: Option<FileStamp>) -> std::io::Result<Look> {
        let path = self.path.clone();
        let look = tokio::task::spawn_blocking(move || {
            let stamp = std::fs::metadata(&path)
                .ok()
                .and_then(|meta| FileStamp::trusted(&meta));
            if known.is_some() && stamp == known {
                return Ok(Look::Unchanged);
            }
            read_vips_file(&path).map(|text| Look::Read(text, stamp))
        })
        .await
        .map_err(std::io::Error::other)??;
        if matches!(look, Look::Read(..)) {
            self.reads += 1;
        }
        Ok(look)
    }

    /// Follows the file: checks it every `poll` and whenever `reload` fires (SIGHUP), and
    /// sends every new good version; a malformed one is logged and the last good set stays.
    pub fn spawn(
        mut self,
        poll: Duration,
        mut reload: mpsc::UnboundedReceiver<()>,
        updates: mpsc::UnboundedSender<VipUpdate>,
    ) {
        tokio::spawn(async move {
            let mut forced = false;
            loop {
                if let Some(vips) = self.changed(forced).await
                    && updates.send(VipUpdate::Replace(vips)).is_err()
                {
                    return;
                }
                forced = false;
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

    /// The file's VIPs if its content changed since last seen (or `forced`) and has settled.
    async fn changed(&mut self, forced: bool) -> Option<Vec<DesiredVip>> {
        let path = self.path.display().to_string();
        let known = if forced { None } else { self.last_stamp };
        let (text, stamp) = match self.look(known).await {
            Ok(Look::Unchanged) => return None,
            Ok(Look::Read(text, stamp)) => (text, stamp),
            Err(e) => {
                if forced || self.last_seen.is_some() {
                    warn!(%path, "VIPs file unreadable, keeping the last good VIPs: {e}");
                    self.last_seen = None;
                }
                self.last_stamp = None;
                return None;
            }
        };
        if !forced && self.last_seen.as_ref() == Some(&text) {
            self.last_stamp = stamp;
            return None;
        }
        // Trusted only once this content is the one last seen (below).
        self.last_stamp = None;
        // A change found by polling may be half written: looked at again after a moment. A
        // reload asked for (SIGHUP) is read as it is: the asker has finished writing.
        if !forced {
            tokio::time::sleep(SETTLE).await;
        }
        if !forced && self.read().await.ok().as_ref() != Some(&text) {
            // Still being written: looked at again at the next check.
            return None;
        }
        let parsed = parse_vips_file(&text);
        self.last_seen = Some(text);
        self.last_stamp = stamp;
        match parsed {
            Ok(vips) => {
                if vips.is_empty() && self.had_vips {
                    warn!(%path, "VIPs file now lists no VIP: every VIP is removed");
                } else {
                    info!(%path, vips = vips.len(), "VIPs file loaded");
                }
                self.had_vips = !vips.is_empty();
                Some(vips)
            }
            Err(e) => {
                warn!(%path, "VIPs file rejected, keeping the last good VIPs: {e}");
                None
            }
        }
    }
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
        assert_eq!(vips[1].load_balancer, Some("lb-1".into()));

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

    #[tokio::test]
    async fn a_change_is_seen_even_when_the_modification_time_is_the_same() {
        let dir = std::env::temp_dir().join(format!("unidler-vipsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vips.toml");
        let one = "[[vip]]\nvip = \"10.0.0.1:80\"\n";
        let two = "[[vip]]\nvip = \"10.0.0.1:80\"\n[[vip]]\nvip = \"10.0.0.2:80\"\n";
        std::fs::write(&path, one).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut source = VipsFileSource::new(path.clone());
        assert_eq!(source.load().unwrap().len(), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_reload_tx, reload_rx) = mpsc::unbounded_channel();
        source.spawn(Duration::from_millis(20), reload_rx, tx);
        // Rewritten in place within the same modification time (two quick writes, or a
        // coarse clock).
        std::fs::write(&path, two).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let update = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the new content is loaded")
            .unwrap();
        assert!(matches!(update, VipUpdate::Replace(v) if v.len() == 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file whose metadata has not changed since a trusted look is not read again; a
    /// write is seen at the next look.
    #[tokio::test]
    async fn an_unchanged_file_is_not_read_again() {
        let dir = std::env::temp_dir().join(format!("unidler-vipsstamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vips.toml");
        std::fs::write(&path, "[[vip]]\nvip = \"10.0.0.1:80\"\n").unwrap();
        let mut source = VipsFileSource::new(path.clone());
        assert_eq!(source.load().unwrap().len(), 1);
        // Just written: its metadata is not trusted yet, the file is read.
        assert!(source.changed(false).await.is_none());
        assert_eq!(source.reads, 1);
        tokio::time::sleep(RACY + Duration::from_millis(100)).await;
        assert!(source.changed(false).await.is_none());
        assert_eq!(source.reads, 2, "read once more, its stamp now trusted");
        for _ in 0..3 {
            assert!(source.changed(false).await.is_none());
        }
        assert_eq!(source.reads, 2, "not read while unchanged");
        std::fs::write(
            &path,
            "[[vip]]\nvip = \"10.0.0.1:80\"\n[[vip]]\nvip = \"10.0.0.2:80\"\n",
        )
        .unwrap();
        assert_eq!(source.changed(false).await.map(|v| v.len()), Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
