//! Notice when network interfaces appear, disappear or change: a netlink socket subscribed to
//! the kernel's link notifications (`RTMGRP_LINK`). What changed is not parsed: the agent
//! looks at its interfaces again, so a pod's veth is covered as it appears.

use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};

/// A netlink socket that is readable whenever a link changed.
pub struct LinkChanges(OwnedFd);

impl LinkChanges {
    /// Subscribes to link notifications in this network namespace.
    pub fn subscribe() -> std::io::Result<Self> {
        // SAFETY: plain socket(2) and bind(2) calls on a sockaddr_nl we own; the fd is
        // owned from here on.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = libc::RTMGRP_LINK as u32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            );
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self(fd))
        }
    }

    /// Reads and discards every pending notification; true if there was any.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: recv(2) into a buffer we own, non-blocking.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                // Would block, or an overrun (ENOBUFS): either way, look again.
                return any || n < 0;
            }
            any = true;
        }
    }
}

impl AsRawFd for LinkChanges {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
