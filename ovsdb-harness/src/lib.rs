//! Real `ovsdb-server` processes for tests, whatever the schema: a standalone server on a unix
//! socket (and, if asked, loopback TCP or TLS with certificates from `ovs-pki`), or a RAFT
//! cluster on loopback. Everything lives in a temp dir removed on drop, and every process dies
//! with the test that started it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A tag no other call in any process uses now: short, as interface names have 15 bytes.
pub fn unique_tag(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Makes a child process die with the test (thread) that started it, so that a test killed
/// mid-way leaves no servers behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under /tmp named after `prefix`.
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ovsdb-{}", unique_tag(prefix)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Its path as text (what agent arguments take).
    pub fn path_str(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback TCP port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command; panics with its output on failure; returns stdout.
#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// TLS material made with `ovs-pki` for one server and one client.
pub struct Pki {
    /// Server private key, certificate, and the CA that signed the client.
    pub server: [PathBuf; 3],
    /// Client private key, certificate, and the CA that signed the server.
    pub client: [PathBuf; 3],
}

impl Pki {
    /// A fresh PKI in `dir`.
    pub fn new(dir: &Path) -> Self {
        let pki = dir.join("pki");
        run(Command::new("ovs-pki")
            .arg(format!("--dir={}", pki.display()))
            .arg("--force")
            .arg("init"));
        for who in ["server", "client"] {
            run(Command::new("ovs-pki")
                .current_dir(dir)
                .arg(format!("--dir={}", pki.display()))
                .args(["--force", "req+sign", who, "switch"]));
        }
        let ca = pki.join("switchca/cacert.pem");
        let files = |who: &str| {
            [
                dir.join(format!("{who}-privkey.pem")),
                dir.join(format!("{who}-cert.pem")),
                ca.clone(),
            ]
        };
        Pki {
            server: files("server"),
            client: files("client"),
        }
    }
}

/// How a server listens.
#[derive(Clone, Debug, Default)]
pub struct Listen {
    /// Also listen on this loopback TCP port.
    pub tcp: Option<u16>,
    /// Also listen with TLS on this loopback port, with the server's key, cert and CA.
    pub ssl: Option<(u16, [PathBuf; 3])>,
}

/// One `ovsdb-server` process serving one database file.
pub struct OvsdbServer {
    /// Its files' directory (shared with the rest of a cluster).
    pub dir: PathBuf,
    /// Base name of its files (`<name>.db`, `.sock`, `.ctl`, `.log`).
    pub name: String,
    listen: Listen,
    child: Option<Child>,
    _tmp: Option<TempDir>,
}

impl OvsdbServer {
    /// A standalone server named `name` for `schema`, in a temp dir of its own, started.
    #[track_caller]
    pub fn standalone(name: &str, schema: &str, listen: Listen) -> Self {
        let tmp = TempDir::new(name);
        let dir = tmp.0.clone();
        run(Command::new("ovsdb-tool")
            .arg("create")
            .arg(dir.join(format!("{name}.db")))
            .arg(schema));
        let mut server = OvsdbServer {
            dir,
            name: name.into(),
            listen,
            child: None,
            _tmp: Some(tmp),
        };
        server.start();
        server
    }

    /// `unix:` remote of this server.
    pub fn unix_remote(&self) -> String {
        format!(
            "unix:{}",
            self.dir.join(format!("{}.sock", self.name)).display()
        )
    }

    /// `tcp:` remote, if it listens on TCP.
    pub fn tcp_remote(&self) -> Option<String> {
        self.listen.tcp.map(|p| format!("tcp:127.0.0.1:{p}"))
    }

    /// `ssl:` remote, if it listens with TLS.
    pub fn ssl_remote(&self) -> Option<String> {
        self.listen
            .ssl
            .as_ref()
            .map(|(p, _)| format!("ssl:127.0.0.1:{p}"))
    }

    /// Starts (or restarts) the process and waits until it answers.
    #[track_caller]
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let file = |ext: &str| self.dir.join(format!("{}.{ext}", self.name));
        let _ = std::fs::remove_file(file("sock"));
        let mut cmd = Command::new("ovsdb-server");
        cmd.arg("--no-chdir")
            .arg(format!("--log-file={}", file("log").display()))
            .arg(format!("--unixctl={}", file("ctl").display()))
            .arg(format!("--remote=punix:{}", file("sock").display()));
        if let Some(port) = self.listen.tcp {
            cmd.arg(format!("--remote=ptcp:{port}:127.0.0.1"));
        }
        if let Some((port, [key, cert, ca])) = &self.listen.ssl {
            cmd.arg(format!("--remote=pssl:{port}:127.0.0.1"))
                .arg(format!("--private-key={}", key.display()))
                .arg(format!("--certificate={}", cert.display()))
                .arg(format!("--ca-cert={}", ca.display()));
        }
        cmd.arg(file("db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(
            die_with_parent(&mut cmd)
                .spawn()
                .expect("ovsdb-server runs"),
        );
        poll(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || (file("sock").exists() && file("ctl").exists()).then_some(()),
            || {
                format!(
                    "ovsdb-server {} did not come up; log:\n{}",
                    self.name,
                    std::fs::read_to_string(file("log")).unwrap_or_default()
                )
            },
        );
    }

    /// Kills the process (SIGKILL: nothing flushed, as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs a `*-ctl` or client program with `--db=` this server's unix remote first;
    /// returns stdout.
    #[track_caller]
    pub fn ctl(&self, program: &str, args: &[&str]) -> String {
        run(Command::new(program)
            .arg(format!("--db={}", self.unix_remote()))
            .args(args))
    }

    /// Runs `ovs-appctl` against this server; returns stdout.
    #[track_caller]
    pub fn appctl(&self, args: &[&str]) -> String {
        run(Command::new("ovs-appctl")
            .arg("-t")
            .arg(self.dir.join(format!("{}.ctl", self.name)))
            .args(args))
    }
}

impl Drop for OvsdbServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A RAFT cluster on loopback, every member also listening on TCP.
pub struct Cluster {
    /// The members.
    pub servers: Vec<OvsdbServer>,
    /// The clustered database's name.
    pub database: String,
    _tmp: TempDir,
}

impl Cluster {
    /// Creates and starts an `n`-member cluster of database `database` (named so in
    /// `schema`); waits until it has a leader.
    #[track_caller]
    pub fn start(n: usize, schema: &str, database: &str) -> Self {
        let tmp = TempDir::new("raft");
        let raft_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let raft = |i: usize| format!("tcp:127.0.0.1:{}", raft_ports[i]);
        let db = |i: usize| tmp.join(&format!("db{i}.db"));
        run(Command::new("ovsdb-tool")
            .arg("create-cluster")
            .arg(db(0))
            .arg(schema)
            .arg(raft(0)));
        for i in 1..n {
            run(Command::new("ovsdb-tool")
                .arg("join-cluster")
                .arg(db(i))
                .arg(database)
                .arg(raft(i))
                .arg(raft(0)));
        }
        let servers = (0..n)
            .map(|i| {
                let mut s = OvsdbServer {
                    dir: tmp.0.clone(),
                    name: format!("db{i}"),
                    listen: Listen {
                        tcp: Some(free_port()),
                        ssl: None,
                    },
                    child: None,
                    _tmp: None,
                };
                s.start();
                s
            })
            .collect();
        let cluster = Cluster {
            servers,
            database: database.to_owned(),
            _tmp: tmp,
        };
        cluster.wait_for_leader(Duration::from_secs(20));
        cluster.wait_for_members(Duration::from_secs(20));
        cluster
    }

    /// Comma-separated `tcp:` remotes of every member.
    pub fn remotes(&self) -> String {
        self.servers
            .iter()
            .filter_map(OvsdbServer::tcp_remote)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Comma-separated `unix:` remotes of every member (usable from any network namespace).
    pub fn unix_remotes(&self) -> String {
        self.servers
            .iter()
            .map(OvsdbServer::unix_remote)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the current leader among running members, if one says it is.
    pub fn leader(&self) -> Option<usize> {
        (0..self.servers.len()).find(|&i| self.cluster_status(i).contains("Role: leader"))
    }

    /// `cluster/status` of member `i` (empty when it is not running or does not answer).
    pub fn cluster_status(&self, i: usize) -> String {
        let s = &self.servers[i];
        if !s.is_running() {
            return String::new();
        }
        Command::new("ovs-appctl")
            .arg("-t")
            .arg(s.dir.join(format!("{}.ctl", s.name)))
            .args(["cluster/status", &self.database])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Waits until every member has joined: before that, the cluster's configuration may
    /// count fewer members, and losing the leader can leave the rest without a majority.
    #[track_caller]
    pub fn wait_for_members(&self, timeout: Duration) {
        let statuses = || (0..self.servers.len()).map(|i| self.cluster_status(i));
        // Each poll asks every member through ovs-appctl.
        poll(
            timeout,
            Duration::from_millis(50),
            || {
                statuses()
                    .all(|s| s.contains("Status: cluster member"))
                    .then_some(())
            },
            || {
                format!(
                    "not every server joined the cluster within {timeout:?}: {:?}",
                    statuses().collect::<Vec<_>>()
                )
            },
        );
    }

    /// Waits until some running member is leader; returns its index.
    #[track_caller]
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        poll(
            timeout,
            Duration::from_millis(50),
            || self.leader(),
            || format!("no cluster leader within {timeout:?}"),
        )
    }

    /// Runs a `*-ctl` program with `--db=` every member's TCP remote first (it finds the
    /// leader itself) and a 20 s timeout; returns stdout.
    #[track_caller]
    pub fn ctl(&self, program: &str, args: &[&str]) -> String {
        run(Command::new(program)
            .arg(format!("--db={}", self.remotes()))
            .arg("--timeout=20")
            .args(args))
    }
}

/// Calls `check` every `every` until it gives a value; panics with `failure()` after
/// `timeout`.
#[track_caller]
fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
    failure: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{}", failure());
        std::thread::sleep(every);
    }
}
