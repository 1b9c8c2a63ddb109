//! Network namespaces joined by a veth pair, made for one test and removed on drop.
//!
//! ```text
//!   netns <tag>-c                          netns <tag>-s
//!   <tag>c  10.77.0.1/24  fd77::1/64  <==>  <tag>s  10.77.0.2/24  fd77::2/64
//! ```
//! Every name carries a tag unique to the process and the call, so tests run in parallel.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
};

/// Client side address (IPv4).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Server side address (IPv4).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Client side address (IPv6).
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// Server side address (IPv6).
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
/// MAC of the client's veth end.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
/// MAC of the server's veth end.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];

/// Runs a command and panics with its output if it fails.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub use ovsdb_harness::unique_tag;

/// A TCP SYN frame from `src:sport`, behind the client's MAC, to the server's address and MAC
/// on `dport`: what [`send_frames`] injects as the client's connection attempt.
pub fn syn_to_server(src: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut frame = crate::frames::Frame::tcp_syn(src, sport, SERVER_V4.into(), dport);
    frame.src_mac = CLIENT_MAC;
    frame.dst_mac = SERVER_MAC;
    frame.build()
}

/// Two namespaces, a client and a server, joined by a veth pair with fixed addresses.
pub struct Topology {
    /// Client namespace name.
    pub client_ns: String,
    /// Server namespace name (where the program is attached).
    pub server_ns: String,
    /// Client veth end.
    pub client_if: String,
    /// Server veth end.
    pub server_if: String,
}

impl Topology {
    /// Creates the namespaces and the veth pair, sets addresses and brings links up.
    #[track_caller]
    pub fn new(prefix: &str) -> Self {
        let tag = unique_tag(prefix);
        let topo = Topology {
            client_ns: format!("{tag}-c"),
            server_ns: format!("{tag}-s"),
            client_if: format!("{tag}c"),
            server_if: format!("{tag}s"),
        };
        // From here on, Drop cleans up whatever was made, even if a step below fails.
        namespaces_with_veth(
            (&topo.client_ns, &topo.client_if, CLIENT_MAC),
            (&topo.server_ns, &topo.server_if, SERVER_MAC),
        );
        topo.configure_link();
        topo
    }

    /// Addresses, links up, static neighbours.
    fn configure_link(&self) {
        for (ns, ifname, v4, v6) in [
            (&self.client_ns, &self.client_if, CLIENT_V4, CLIENT_V6),
            (&self.server_ns, &self.server_if, SERVER_V4, SERVER_V6),
        ] {
            let ip = |args: &[&str]| {
                let mut full = vec!["ip", "-n", ns.as_str()];
                full.extend_from_slice(args);
                sh(&full);
            };
            ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ip(&["addr", "add", &format!("{v6}/64"), "dev", ifname, "nodad"]);
            ip(&["link", "set", "lo", "up"]);
            ip(&["link", "set", ifname, "up"]);
        }
        // Static neighbours: no ARP/ND round trip before the first packet.
        sh(&[
            "ip",
            "-n",
            &self.client_ns,
            "neigh",
            "replace",
            &SERVER_V4.to_string(),
            "lladdr",
            &mac(SERVER_MAC),
            "dev",
            &self.client_if,
        ]);
        sh(&[
            "ip",
            "-n",
            &self.client_ns,
            "neigh",
            "replace",
            &SERVER_V6.to_string(),
            "lladdr",
            &mac(SERVER_MAC),
            "dev",
            &self.client_if,
        ]);
    }

    /// Deletes the veth pair (both ends).
    #[track_caller]
    pub fn delete_link(&self) {
        sh(&["ip", "-n", &self.server_ns, "link", "del", &self.server_if]);
    }

    /// Makes the veth pair again under the same names (new ifindexes), as a pod's
    /// interface is re-created, after [`Topology::delete_link`].
    #[track_caller]
    pub fn recreate_link(&self) {
        sh(&[
            "ip",
            "-n",
            &self.client_ns,
            "link",
            "add",
            &self.client_if,
            "address",
            &mac(CLIENT_MAC),
            "type",
            "veth",
            "peer",
            "name",
            &self.server_if,
            "netns",
            &self.server_ns,
            "address",
            &mac(SERVER_MAC),
        ]);
        self.configure_link();
    }

    /// A TCP listener on the server's address at `port`, accepting in the background: a
    /// connection to it succeeds exactly when nothing drops the SYN.
    pub fn listen(&self, port: u16) -> std::net::TcpListener {
        let listener = self.in_server(|| {
            std::net::TcpListener::bind(std::net::SocketAddr::new(SERVER_V4.into(), port)).unwrap()
        });
        let accepting = listener.try_clone().unwrap();
        std::thread::spawn(move || for _ in accepting.incoming() {});
        listener
    }

    /// Whether a TCP connection from the client to the server's address on `port` is
    /// established within 300 ms (with a listener there: exactly when nothing drops the SYN).
    pub fn connects(&self, port: u16) -> bool {
        self.in_client(|| {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(SERVER_V4.into(), port),
                std::time::Duration::from_millis(300),
            )
            .is_ok()
        })
    }

    /// Runs `f` on a thread that has entered the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.client_ns, f)
    }

    /// Runs `f` on a thread that has entered the server namespace.
    pub fn in_server<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.server_ns, f)
    }

    /// The XDP program attached to the server's veth end, as `ip link` shows it, if any.
    pub fn server_xdp(&self) -> Option<String> {
        let out = sh(&[
            "ip",
            "-n",
            &self.server_ns,
            "-d",
            "link",
            "show",
            &self.server_if,
        ]);
        out.lines()
            .find(|l| l.trim_start().starts_with("prog/xdp"))
            .map(|l| l.trim().to_owned())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair with it.
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

/// Creates namespaces `a.0` and `b.0` joined by a veth pair: end `a.1` with MAC `a.2` in the
/// first, end `b.1` with MAC `b.2` in the second. Deleting the namespaces deletes the pair.
#[track_caller]
pub fn namespaces_with_veth(a: (&str, &str, [u8; 6]), b: (&str, &str, [u8; 6])) {
    sh(&["ip", "netns", "add", a.0]);
    sh(&["ip", "netns", "add", b.0]);
    sh(&[
        "ip",
        "link",
        "add",
        a.1,
        "netns",
        a.0,
        "address",
        &mac(a.2),
        "type",
        "veth",
        "peer",
        "name",
        b.1,
        "netns",
        b.0,
        "address",
        &mac(b.2),
    ]);
}

/// Creates a veth pair `a`–`b` inside namespace `ns`, both ends up (in tests, one end is the
/// node's interface the agent follows, the other plays the pod or the outside world).
#[track_caller]
pub fn veth_in(ns: &str, a: &str, b: &str) {
    sh(&[
        "ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b,
    ]);
    sh(&["ip", "-n", ns, "link", "set", a, "up"]);
    sh(&["ip", "-n", ns, "link", "set", b, "up"]);
}

/// Runs `f` on a scoped thread inside network namespace `name`; sockets it creates stay
/// in that namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid fd; affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `aa:bb:..` spelling of a MAC.
pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends raw Ethernet frames out of `ifname` (in the calling thread's namespace) through an
/// AF_PACKET socket. Returns how many were sent.
pub fn send_frames(ifname: &str, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
    let ifindex = {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid C string.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    assert_ne!(ifindex, 0, "no interface {ifname}");
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    let mut sent = 0;
    for frame in frames {
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc >= 0 {
            sent += 1;
        }
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    sent
}

/// The IPv4 and IPv6 server addresses.
pub fn server_addrs() -> [IpAddr; 2] {
    [IpAddr::V4(SERVER_V4), IpAddr::V6(SERVER_V6)]
}

/// Sets the TCP SYN retransmission schedule of namespace `ns`: `linear_timeouts` 0 backs off
/// exponentially (1, 3, 7, 15 s after the first SYN: RHEL 8/9 kernels); 4 is this kernel's
/// default (1, 2, 3, 4, 5 s, then exponential). Kernels before 6.7 have no such setting and
/// always back off exponentially: 0 is what they do already; another value fails there.
#[track_caller]
pub fn syn_backoff(ns: &str, linear_timeouts: u8) {
    let setting = std::path::Path::new("/proc/sys/net/ipv4/tcp_syn_linear_timeouts");
    if !setting.exists() {
        assert_eq!(
            linear_timeouts, 0,
            "this kernel has no net.ipv4.tcp_syn_linear_timeouts: SYNs back off exponentially"
        );
        return;
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("net.ipv4.tcp_syn_linear_timeouts={linear_timeouts}"),
    ]);
}

/// A TCP echo server on `addr` in namespace `ns`, in the background; returns how many
/// connections it has accepted.
pub fn tcp_echo_server(
    ns: &str,
    addr: std::net::SocketAddr,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{Read as _, Write as _};
    let listener = in_netns(ns, || std::net::TcpListener::bind(addr).unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    accepted
}

/// One `connect` to `to` from namespace `ns` (the kernel retransmits the SYN on its own
/// schedule), in the background, waiting up to `timeout`; the thread returns when the
/// connection was established, and the stream.
pub fn connect_in_background(
    ns: &str,
    to: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::thread::JoinHandle<(std::time::Instant, std::net::TcpStream)> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        in_netns(&ns, || {
            let stream = std::net::TcpStream::connect_timeout(&to, timeout)
                .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
            (std::time::Instant::now(), stream)
        })
    })
}

/// Sends a few bytes on `stream` and reads them back (from a [`tcp_echo_server`]): whether the
/// connection carries data both ways.
pub fn echoes(stream: &mut std::net::TcpStream) -> bool {
    use std::io::{Read as _, Write as _};
    let mut reply = [0u8; 4];
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .is_ok()
        && stream.write_all(b"ping").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"ping"
}
