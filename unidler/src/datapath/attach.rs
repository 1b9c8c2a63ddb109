//! Where the datapath runs: the hook for each interface, attaching and detaching, and the
//! attachments pinned to outlive the process.

use std::os::fd::AsFd as _;

use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, XdpMode,
    links::{FdLink, LinkError},
    tc::{
        NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError, TcHandle,
    },
    xdp::XdpLinkId,
};
use unidler_common::TC_PROGRAM_NAME;

use super::{Datapath, DatapathError};
use crate::{
    caps,
    pinning::{self, PinnedAttachment},
};

/// Where the datapath goes on an interface. Both hooks run the same parser with the same
/// maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// TC ingress on virtual interfaces (veths, every pod's interface: native XDP there would
    /// turn segmentation offloads off on the peer and slow every pod), native XDP on physical
    /// ones (TC where the driver refuses native XDP).
    #[default]
    Auto,
    /// XDP in the driver (fastest); fails if the driver has no XDP support.
    Xdp,
    /// XDP in the generic network stack (works on every interface, slower).
    XdpGeneric,
    /// XDP, native where the driver supports it, else generic (the kernel chooses).
    #[value(skip)]
    XdpAny,
    /// TC ingress (TCX links on kernels 6.6 and later, the clsact qdisc before).
    Tc,
}

impl Hook {
    /// The hook for `iface`: [`Hook::Auto`] becomes TC or XDP by the kind of interface.
    pub fn for_interface(self, iface: &str) -> Hook {
        match self {
            Hook::Auto if is_virtual(iface) => Hook::Tc,
            Hook::Auto => Hook::Xdp,
            other => other,
        }
    }

    /// Its name in logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Auto => "auto",
            Hook::Xdp => "xdp",
            Hook::XdpGeneric => "xdp-generic",
            Hook::XdpAny => "xdp-any",
            Hook::Tc => "tc",
        }
    }
}

/// Whether `iface` is a virtual interface (no device behind it in sysfs: veth, bridge, ...).
fn is_virtual(iface: &str) -> bool {
    !std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
}

/// One attachment of the datapath.
pub(super) struct Attachment {
    iface: String,
    ifindex: u32,
    hook: Hook,
    link: Link,
    _lock: InterfaceLock,
}

/// This process's claim on an interface, held while the datapath is on it: an abstract unix
/// socket named after the interface's index. Abstract names belong to a network namespace,
/// as interfaces do, and the kernel frees one with its process, a crash included: a second
/// agent on the interface cannot take it, and a filter left by a dead agent is told from a
/// live agent's without opening any program (which would need `CAP_SYS_ADMIN`).
struct InterfaceLock {
    _socket: std::os::unix::net::UnixDatagram,
}

impl InterfaceLock {
    /// Claims interface `ifindex`; None if another process holds it.
    fn take(ifindex: u32) -> Result<Option<Self>, String> {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("unidler/datapath/{ifindex}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| e.to_string())?;
        match std::os::unix::net::UnixDatagram::bind_addr(&addr) {
            Ok(socket) => Ok(Some(Self { _socket: socket })),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(format!("claiming the interface: {e}")),
        }
    }
}

/// The refusal of an interface another unidler is on.
const ANOTHER_AGENT: &str =
    "another unidler is running on it (one agent per interface: stop it first)";

/// How an attachment is held: a link of this process, or a pinned one.
enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
    /// A link pinned in the pin directory: outlives the process.
    Pinned(PinnedAttachment),
}

/// The priority of unidler's filter on an interface's clsact ingress (kernels without TCX).
/// A fixed slot: a second filter of ours cannot pile up behind the first.
pub const CLSACT_PRIORITY: u16 = 0x7a1e;
/// The handle of unidler's filter in [`CLSACT_PRIORITY`].
pub const CLSACT_HANDLE: u16 = 1;

/// Attaches the TC program to `iface`'s clsact ingress (kernels without TCX), in unidler's
/// fixed slot. The caller holds the interface's claim ([`InterfaceLock`]), so a filter already
/// in that slot was left there by an agent that did not exit cleanly (a filter is no BPF link:
/// it does not go with its process): this program takes its place atomically, and the
/// takeover is logged.
fn attach_clsact(
    program: &mut SchedClassifier,
    iface: &str,
) -> Result<SchedClassifierLinkId, ProgramError> {
    // The qdisc may be there already.
    let _ = aya::programs::tc::qdisc_add_clsact(iface);
    let handle = TcHandle::new(0, CLSACT_HANDLE);
    let slot = TcAttachOptions::Netlink(NlOptions {
        priority: CLSACT_PRIORITY,
        handle,
        classid: None,
    });
    match program.attach_with_options(iface, TcAttachType::Ingress, slot) {
        Err(ProgramError::TcError(TcError::NetlinkError(err)))
            if err.raw_os_error() == Some(libc::EEXIST) =>
        {
            let left = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                CLSACT_PRIORITY,
                handle,
                None,
            )
            .map_err(|e| ProgramError::TcError(TcError::IoError(e)))?;
            tracing::warn!(
                iface,
                "took over the TC filter that an earlier unidler left on the interface (it did \
                 not exit cleanly)"
            );
            program.attach_to_link(left)
        }
        other => other,
    }
}

/// A link taken from its program (XDP or TC), as a file-descriptor link that can be pinned.
fn fd_link<L>(taken: Result<L, ProgramError>) -> Result<FdLink, DatapathError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let pin_error = |e: &dyn std::fmt::Display| DatapathError::Pin(e.to_string());
    FdLink::try_from(taken.map_err(|e| pin_error(&e))?).map_err(|e| pin_error(&e))
}

/// What a driver's refusal of native XDP says (in [`attach_hint`]'s reason).
const NO_NATIVE_XDP: &str = "the driver does not support native XDP";

/// The hook to try when `chosen` (what `requested` chose for the interface) failed for
/// `reason`: with [`Hook::Auto`], native XDP refused by a NIC's driver (no XDP support, or not
/// at its MTU) falls back to TC ingress, which every interface takes. Any other refusal
/// (another program there, another agent) stands.
fn fallback(requested: Hook, chosen: Hook, reason: &str) -> Option<Hook> {
    (requested == Hook::Auto && chosen == Hook::Xdp && reason.contains(NO_NATIVE_XDP))
        .then_some(Hook::Tc)
}

impl Datapath {
    /// Attaches the datapath to `iface` with `hook` ([`Hook::Auto`] chooses by the kind of
    /// interface, and falls back to TC where a NIC refuses native XDP). Returns the interface
    /// index and the hook used.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> Result<(u32, Hook), DatapathError> {
        let chosen = hook.for_interface(iface);
        match self.attach_with(iface, chosen) {
            Err(DatapathError::Attach {
                iface: name,
                hook: tried,
                reason,
            }) if fallback(hook, chosen, &reason).is_some() => {
                tracing::info!(iface, "native XDP refused ({reason}): TC ingress instead");
                self.attach_with(iface, Hook::Tc)
                    .map_err(|tc| DatapathError::Attach {
                        iface: name,
                        hook: tried,
                        reason: format!("{reason}; and TC ingress: {tc}"),
                    })
            }
            other => other,
        }
    }

    /// Attaches the datapath to `iface` with `hook`, resolved (not [`Hook::Auto`]).
    fn attach_with(&mut self, iface: &str, hook: Hook) -> Result<(u32, Hook), DatapathError> {
        let ifindex = ifindex_of(iface)?;
        let failed = |err: ProgramError| DatapathError::Attach {
            iface: iface.to_owned(),
            hook,
            reason: attach_hint(&err, hook),
        };
        let refused = |reason: &str| DatapathError::Attach {
            iface: iface.to_owned(),
            hook,
            reason: reason.to_owned(),
        };
        let claim = InterfaceLock::take(ifindex).map_err(|e| refused(&e))?;
        let link = match hook {
            Hook::Tc => {
                // TC takes several programs (and a clsact filter outlives its agent): the
                // claim is what keeps a second agent off, which would report every hit twice.
                if claim.is_none() {
                    return Err(refused(&format!(
                        "the interface already has unidler's TC program: {ANOTHER_AGENT}"
                    )));
                }
                let tcx = self.features.tcx;
                if tcx
                    && let Ok((_, programs)) =
                        SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
                    && programs
                        .iter()
                        .any(|p| p.name() == TC_PROGRAM_NAME.as_bytes())
                {
                    // A TCX link of ours that no agent holds: pinned by an agent with another
                    // --pin-dir (seen only with CAP_SYS_ADMIN, which names other programs).
                    return Err(refused(
                        "the interface already has unidler's TC program, pinned by an agent \
                         with another --pin-dir (`unidler detach --pin-dir DIR` removes it)",
                    ));
                }
                let program = self.tc_program_mut()?;
                let link = if tcx {
                    program.attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                } else {
                    attach_clsact(program, iface)
                };
                Link::Tc(link.map_err(failed)?)
            }
            xdp => {
                let mode = match xdp {
                    Hook::XdpGeneric => XdpMode::Skb,
                    Hook::XdpAny => XdpMode::Default,
                    _ => XdpMode::Driver,
                };
                Link::Xdp(
                    self.program_mut()?
                        .attach_to_if_index(ifindex, mode)
                        .map_err(failed)?,
                )
            }
        };
        let Some(lock) = claim else {
            // XDP: the kernel let this program on, so the other agent is there with TC.
            let _ = self.detach_link(link);
            return Err(refused(ANOTHER_AGENT));
        };
        let link = self.pin_link(iface, hook, link)?;
        self.attached.push(Attachment {
            iface: iface.to_owned(),
            ifindex,
            hook,
            link,
            _lock: lock,
        });
        Ok((ifindex, hook))
    }

    /// With a pin directory, pins a new attachment's link so that it outlives the process.
    fn pin_link(&mut self, iface: &str, hook: Hook, link: Link) -> Result<Link, DatapathError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(link);
        };
        let path = pins.link_path(hook.name(), iface);
        let fd_link = match link {
            Link::Xdp(id) => fd_link(self.program_mut()?.take_link(id))?,
            // A clsact filter is no BPF link: it goes with the agent.
            tc @ Link::Tc(_) if !self.features.tcx => return Ok(tc),
            Link::Tc(id) => fd_link(self.tc_program_mut()?.take_link(id))?,
            pinned @ Link::Pinned(_) => return Ok(pinned),
        };
        let pinned = fd_link
            .pin(&path)
            .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))?;
        // The pin holds the link from here on; our handle on it is the pin's.
        drop(pinned);
        PinnedAttachment::open(path)
            .map(Link::Pinned)
            .map_err(|e| DatapathError::Pin(e.to_string()))
    }

    /// Adopts the attachments pinned by an earlier agent: each whose interface is still the
    /// one it was attached to gets this agent's program, swapped in atomically; one whose
    /// interface is gone is unpinned. Returns the adopted ones as (interface, ifindex, hook).
    pub fn adopt_pinned_links(&mut self) -> Vec<(String, u32, Hook)> {
        let Some(pins) = self.pins.clone() else {
            return Vec::new();
        };
        let links = match pins.links() {
            Ok(links) => links,
            Err(e) => {
                tracing::warn!("cannot read the pinned attachments: {e}");
                return Vec::new();
            }
        };
        let mut adopted = Vec::new();
        for (hook_name, iface, path) in links {
            let hook = match hook_name.as_str() {
                "tc" => Hook::Tc,
                "xdp-generic" => Hook::XdpGeneric,
                "xdp-any" => Hook::XdpAny,
                _ => Hook::Xdp,
            };
            let result = (|| -> Result<u32, String> {
                let attachment = PinnedAttachment::open(path.clone()).map_err(|e| e.to_string())?;
                let linked = pinning::link_ifindex(attachment.fd()).map_err(|e| e.to_string())?;
                let now = ifindex_of(&iface).ok();
                if linked == 0 || now != Some(linked) {
                    let _ = attachment.unpin();
                    return Err("its interface is gone".into());
                }
                let program = match hook {
                    Hook::Tc => self
                        .typed::<SchedClassifier>(TC_PROGRAM_NAME, "TC program")
                        .map_err(|e| e.to_string())?
                        .fd(),
                    _ => self.program().map_err(|e| e.to_string())?.fd(),
                }
                .map_err(|e| e.to_string())?;
                let lock = InterfaceLock::take(linked)?.ok_or(ANOTHER_AGENT)?;
                pinning::update_link(attachment.fd(), program.as_fd())
                    .map_err(|e| e.to_string())?;
                self.attached.push(Attachment {
                    iface: iface.clone(),
                    ifindex: linked,
                    hook,
                    link: Link::Pinned(attachment),
                    _lock: lock,
                });
                Ok(linked)
            })();
            match result {
                Ok(ifindex) => adopted.push((iface, ifindex, hook)),
                Err(why) => {
                    tracing::info!(%iface, hook = hook.name(), "pinned attachment dropped: {why}")
                }
            }
        }
        adopted
    }

    /// Detaches the datapath from every interface it is attached to; pinned attachments are
    /// only let go of (they stay attached: see [`crate::pinning`]).
    pub fn detach_all(&mut self) {
        for attachment in std::mem::take(&mut self.attached) {
            let iface = attachment.iface.clone();
            let result = match attachment.link {
                Link::Pinned(_) => Ok(()),
                _ => self.detach(attachment),
            };
            if let Err(err) = result {
                tracing::warn!(iface, "detaching failed: {err}");
            }
        }
    }

    fn detach(&mut self, attachment: Attachment) -> Result<(), DatapathError> {
        self.detach_link(attachment.link)
    }

    /// Detaches one link of this process (a pinned one: unpins it, which detaches it).
    fn detach_link(&mut self, link: Link) -> Result<(), DatapathError> {
        let result = match link {
            Link::Xdp(link) => self.program_mut()?.detach(link),
            Link::Tc(link) => self.tc_program_mut()?.detach(link),
            Link::Pinned(pinned) => {
                return pinned
                    .unpin()
                    .map_err(|e| DatapathError::Pin(e.to_string()));
            }
        };
        result.map_err(|e| DatapathError::Load(Box::new(e)))
    }

    /// Attachments whose interface is gone, or has been re-created under its name (a new
    /// ifindex: the attachment died with the old one). Each as (name, old ifindex, the
    /// name's ifindex now, if any).
    pub fn stale_attachments(&self) -> Vec<(String, u32, Option<u32>)> {
        self.attached
            .iter()
            .filter_map(|a| {
                let now = ifindex_of(&a.iface).ok();
                (now != Some(a.ifindex)).then(|| (a.iface.clone(), a.ifindex, now))
            })
            .collect()
    }

    /// Forgets the attachment to `iface` (one that died with its interface).
    pub fn forget_attachment(&mut self, iface: &str) {
        if let Some(at) = self.attached.iter().position(|a| a.iface == iface) {
            let attachment = self.attached.remove(at);
            // The link went with its interface; detaching it is only bookkeeping.
            let _ = self.detach(attachment);
        }
    }

    /// Interfaces the datapath is attached to, as (name, ifindex, hook).
    pub fn attached(&self) -> impl Iterator<Item = (&str, u32, Hook)> {
        self.attached
            .iter()
            .map(|a| (a.iface.as_str(), a.ifindex, a.hook))
    }

    /// What holds the attachment to `iface` in the kernel: `xdp link`, `tcx link` or
    /// `clsact filter`, and `, pinned` where a pin holds it beyond the process.
    pub fn attachment_kind(&self, iface: &str) -> Option<String> {
        let attachment = self.attached.iter().find(|a| a.iface == iface)?;
        let kind = match (attachment.hook, self.features.tcx) {
            (Hook::Tc, true) => "tcx link",
            (Hook::Tc, false) => "clsact filter",
            _ => "xdp link",
        };
        Some(match attachment.link {
            Link::Pinned(_) => format!("{kind}, pinned"),
            _ => kind.to_owned(),
        })
    }
}

/// Every network interface of this namespace, as (ifindex, name).
pub fn interfaces() -> Vec<(u32, String)> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut at = list;
        while (*at).if_index != 0 && !(*at).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*at).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*at).if_index, name));
            at = at.add(1);
        }
        libc::if_freenameindex(list);
        out
    }
}

/// The index of `iface`, or a clear error.
pub fn ifindex_of(iface: &str) -> Result<u32, DatapathError> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| DatapathError::UnknownInterface(iface.to_owned()))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DatapathError::UnknownInterface(iface.to_owned())),
        index => Ok(index),
    }
}

fn attach_hint(err: &ProgramError, hook: Hook) -> String {
    let errno = match err {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EBUSY) | Some(libc::EEXIST) if hook != Hook::Tc => format!(
            "{err}: the interface already has an XDP program (another unidler, or something else: `ip link show` says which)"
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if hook == Hook::Xdp => {
            format!("{err}: {NO_NATIVE_XDP}; use --hook tc, xdp-generic or auto")
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            caps::explain_missing().unwrap_or_else(|| err.to_string())
        }
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_tc_where_a_nic_refuses_native_xdp() {
        let refused = format!("Operation not supported: {NO_NATIVE_XDP}; use --hook tc");
        assert_eq!(fallback(Hook::Auto, Hook::Xdp, &refused), Some(Hook::Tc));
        assert_eq!(fallback(Hook::Auto, Hook::Tc, &refused), None);
        assert_eq!(
            fallback(Hook::Xdp, Hook::Xdp, &refused),
            None,
            "a forced hook is not changed"
        );
        assert_eq!(
            fallback(
                Hook::Auto,
                Hook::Xdp,
                "the interface already has an XDP program"
            ),
            None,
            "someone else's program there is not the driver refusing"
        );
    }
}
