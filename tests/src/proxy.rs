//! A unix-socket proxy between a client and a server that the test can cut: while cut, it
//! keeps every connection open but moves nothing, so what either side sends waits (a
//! partition, as both ends see it: silence, and nothing lost once it heals).

use std::{
    io::{Read as _, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// A running proxy; it stops with the test process.
pub struct UnixProxy {
    path: PathBuf,
    cut: Arc<AtomicBool>,
}

impl UnixProxy {
    /// Listens on `path` and forwards each connection to the unix socket `target`.
    #[track_caller]
    pub fn start(path: &Path, target: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("binding {path:?}: {e}"));
        let cut = Arc::new(AtomicBool::new(false));
        let (target, flag) = (target.to_path_buf(), cut.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = UnixStream::connect(&target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Self {
            path: path.to_path_buf(),
            cut,
        }
    }

    /// Its `unix:` remote.
    pub fn remote(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// Stops forwarding (connections stay open, data waits).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream, cut: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 64 * 1024];
    loop {
        if cut.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Read just as the cut came: held until it heals.
                while cut.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
