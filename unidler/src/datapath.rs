//! The kernel side, seen from the agent: loads the embedded programs (XDP and TC ingress,
//! one parser, shared maps), attaches them to interfaces, and owns the maps (VIPs, counters,
//! rate limits, heartbeat, event ring).
//!
//! Without a pin directory, dropping a [`Datapath`] detaches the program everywhere:
//! attachments are BPF links owned by this process, so a crash detaches them too and the next
//! run starts clean. With one ([`LoadOptions::pin_dir`], see [`crate::pinning`]), maps and
//! links are pinned: they outlive the process, and the next [`Datapath::load`] adopts them.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp,
        XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use aya_log::EbpfLogger;
use thiserror::Error;
use unidler_common::{
    ADDRESS_FILTER_WORDS, Counter, FlowKey, Heartbeat, HeldHeader, HoldConfig, IdleHitEvent,
    PROGRAM_NAME, REPLAY_PROGRAM_NAME, RateLimitConfig, ScopedVip, TC_PROGRAM_NAME, VipKey,
    VipState, address_bucket,
};

use crate::{
    caps,
    fast_hash::{FastMap, FastSet},
    map_batch,
    pinning::{self, MapFate, MapShape, PinDir, PinnedAttachment},
};

/// The eBPF object (XDP and TC programs, their maps) built by `build.rs` from
/// `unidler-ebpf`, embedded in the binary.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/unidler"));

/// Where the datapath goes on an interface. Both hooks run the same parser with the same
/// maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress on virtual interfaces (veths, every pod's interface: native XDP there would
    /// turn segmentation offloads off on the peer and slow every pod), native XDP on physical
    /// ones.
    #[default]
    Auto,
    /// XDP in the driver (fastest); fails if the driver has no XDP support.
    Xdp,
    /// XDP in the generic network stack (works on every interface, slower).
    XdpGeneric,
    /// XDP, native where the driver supports it, else generic (the kernel chooses).
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
struct Attachment {
    iface: String,
    ifindex: u32,
    hook: Hook,
    link: Link,
}

enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
    /// A link pinned in the pin directory: outlives the process.
    Pinned(PinnedAttachment),
}

/// Settings fixed when the program is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Event rate limits enforced in the kernel.
    pub rate_limits: RateLimitConfig,
    /// Most verbose aya-log level the kernel emits (1 error … 5 trace).
    pub kernel_log_level: u8,
    /// How long the heartbeat may go unrenewed ([`Datapath::renew_heartbeat`]) before idle
    /// VIPs fail open; zero: never (the default here; the agent sets `--fail-open-after`).
    pub fail_open_after: Duration,
    /// Capacity of the VIP map (each entry costs the kernel about 100 bytes).
    pub max_vips: u32,
    /// Where maps and links are pinned (on a bpffs), so that the datapath outlives the
    /// process; None: it goes with the process.
    pub pin_dir: Option<std::path::PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            rate_limits: RateLimitConfig::new(1, 5, 1000, 1000),
            kernel_log_level: 3,
            fail_open_after: Duration::ZERO,
            max_vips: unidler_common::VIP_MAP_CAPACITY,
            pin_dir: None,
        }
    }
}

/// The maps pinned with `--pin-dir`, by name, with the shape the program needs.
fn pinned_maps(max_vips: u32) -> [(&'static str, MapShape); 12] {
    use unidler_common::{
        ADDRESS_FILTER_WORDS, ANSWERED_FLOWS_CAPACITY, EVENT_RING_BYTES, HELD_RING_BYTES,
        IFACE_SCOPES_CAPACITY, VIP_SCOPES_CAPACITY,
    };
    let shape = |map_type, key_size: usize, value_size: usize, max_entries| MapShape {
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    };
    [
        (
            "VIPS",
            shape(
                MapType::Hash,
                size_of::<VipKey>(),
                size_of::<VipState>(),
                max_vips,
            ),
        ),
        (
            "VIP_ADDRESS_FILTER",
            shape(MapType::Array, 4, 8, ADDRESS_FILTER_WORDS),
        ),
        ("EVENTS", shape(MapType::RingBuf, 0, 0, EVENT_RING_BYTES)),
        ("HELD", shape(MapType::RingBuf, 0, 0, HELD_RING_BYTES)),
        (
            "COUNTERS",
            shape(MapType::PerCpuArray, 4, 8, Counter::COUNT),
        ),
        (
            "CONFIG",
            shape(MapType::Array, 4, size_of::<RateLimitConfig>(), 1),
        ),
        (
            "HEARTBEAT",
            shape(MapType::Array, 4, size_of::<Heartbeat>(), 1),
        ),
        ("GLOBAL_LIMITER", shape(MapType::Array, 4, 8, 1)),
        ("HOLD", shape(MapType::Array, 4, size_of::<HoldConfig>(), 1)),
        (
            "ANSWERED_FLOWS",
            shape(
                MapType::Hash,
                size_of::<FlowKey>(),
                4,
                ANSWERED_FLOWS_CAPACITY,
            ),
        ),
        (
            "IFACE_SCOPES",
            shape(MapType::Hash, 4, 4, IFACE_SCOPES_CAPACITY),
        ),
        (
            "VIP_SCOPES",
            shape(
                MapType::Hash,
                size_of::<ScopedVip>(),
                4,
                VIP_SCOPES_CAPACITY,
            ),
        ),
    ]
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of the kernel's timestamps
/// (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What can go wrong with the datapath, each said so that an operator knows what to do.
#[derive(Debug, Error)]
pub enum DatapathError {
    /// The process lacks capabilities the kernel requires.
    #[error("{0}")]
    Privileges(String),
    /// The kernel refused to load the program.
    #[error("the kernel refused the XDP program: {0}")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The object lacks something the agent expects: a build problem.
    #[error("the embedded XDP object has no {0}; rebuild with `cargo xtask build`")]
    Missing(&'static str),
    /// No such interface.
    #[error("no network interface named {0:?} (see `ip link show`)")]
    UnknownInterface(String),
    /// Attaching to an interface failed.
    #[error("could not attach the datapath ({} hook) to {iface}: {reason}", hook.name())]
    Attach {
        /// The interface.
        iface: String,
        /// The hook that was tried.
        hook: Hook,
        /// Why, with a hint.
        reason: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// The error.
        #[source]
        source: aya::maps::MapError,
    },
    /// The VIP map has no room for another VIP.
    #[error("the VIP map is full ({capacity} VIPs); raise --max-vips")]
    VipMapFull {
        /// Its capacity.
        capacity: u32,
    },
    /// A test run of the program failed.
    #[error("BPF_PROG_TEST_RUN failed: {0}")]
    TestRun(#[source] ProgramError),
    /// The pin directory could not be used.
    #[error("--pin-dir: {0}")]
    Pin(String),
}

/// Forwards the program's aya-log records to `log` (and so to the agent's log).
pub type KernelLogger = EbpfLogger<&'static dyn log::Log>;

/// The loaded XDP program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipState>,
    address_filter: Array<MapData, u64>,
    /// Keys in `vips`, and how many of them fall in each address bucket: the prefilter's
    /// bit for a bucket is set exactly while its count is non-zero.
    keys: FastSet<VipKey>,
    bucket_counts: FastMap<u32, u32>,
    /// The prefilter's words as written to the kernel (`ADDRESS_FILTER_WORDS` of them).
    filter_words: Vec<u64>,
    /// Whether the kernel takes batch updates (until it says it does not).
    batch_updates: bool,
    counters: CounterReader,
    heartbeat: Array<MapData, Heartbeat>,
    fail_open_after_ns: u64,
    max_vips: u32,
    /// The pin directory, if the datapath outlives the process.
    pins: Option<PinDir>,
    events: Option<RingBuf<MapData>>,
    held: Option<RingBuf<MapData>>,
    hold: Array<MapData, HoldConfig>,
    hold_config: HoldConfig,
    answered: HashMap<MapData, FlowKey, u32>,
    /// Interface index → scope, for the interfaces that have one.
    iface_scopes: HashMap<MapData, u32, u32>,
    /// Scoped VIPs' backends per scope, and (mirror) the scopes written for each `vip_id`.
    vip_scopes: HashMap<MapData, ScopedVip, u32>,
    scopes_of: FastMap<u32, Vec<u32>>,
    logger: Option<KernelLogger>,
    attached: Vec<Attachment>,
}

impl Datapath {
    /// Loads the program into the kernel (without attaching it) and writes its configuration.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        let max_vips = options.max_vips.max(1);
        let pins = match &options.pin_dir {
            Some(dir) => Some(PinDir::open(dir).map_err(|e| DatapathError::Pin(e.to_string()))?),
            None => None,
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &options.kernel_log_level, false)
            .map_max_entries("VIPS", max_vips);
        let mut adopted_vips = false;
        let mut adopted_heartbeat = false;
        if let Some(pins) = &pins {
            for (name, shape) in pinned_maps(max_vips) {
                if name == "VIP_ADDRESS_FILTER" && !adopted_vips {
                    // The prefilter describes the VIP map: a new VIP map gets a new one.
                    let _ = std::fs::remove_file(pins.map_path(name));
                }
                let fate = pins
                    .prepare_map(name, shape)
                    .map_err(|e| DatapathError::Pin(format!("map {name}: {e}")))?;
                match &fate {
                    MapFate::Adopted => tracing::debug!(map = name, "pinned map adopted"),
                    MapFate::Created => tracing::debug!(map = name, "map created and pinned"),
                    MapFate::Recreated(why) => tracing::warn!(
                        map = name,
                        "pinned map has another shape: re-created empty ({why})"
                    ),
                }
                adopted_vips |= name == "VIPS" && fate == MapFate::Adopted;
                adopted_heartbeat |= name == "HEARTBEAT" && fate == MapFate::Adopted;
                loader.map_pin_path(name, pins.map_path(name));
            }
        }
        let mut ebpf = loader
            .load(PROGRAM_OBJECT)
            .map_err(|err| match privileges_error(&err) {
                Some(msg) => DatapathError::Privileges(msg),
                None => DatapathError::Load(Box::new(err)),
            })?;
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            // No log statements compiled in (e.g. stripped); not fatal.
            Err(err) => {
                tracing::debug!("kernel-side logging unavailable: {err}");
                None
            }
        };
        let loaded = |err: ProgramError| match privileges_error(&err) {
            Some(msg) => DatapathError::Privileges(msg),
            None => DatapathError::Load(Box::new(err)),
        };
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::Missing("XDP program"))?
            .try_into()
            .map_err(|e: ProgramError| DatapathError::Load(Box::new(e)))?;
        program.load().map_err(loaded)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM_NAME)
            .ok_or(DatapathError::Missing("TC program"))?
            .try_into()
            .map_err(|e: ProgramError| DatapathError::Load(Box::new(e)))?;
        program.load().map_err(loaded)?;
        let program: &mut Xdp = ebpf
            .program_mut(REPLAY_PROGRAM_NAME)
            .ok_or(DatapathError::Missing("replay program"))?
            .try_into()
            .map_err(|e: ProgramError| DatapathError::Load(Box::new(e)))?;
        program.load().map_err(loaded)?;

        let mut config: Array<_, RateLimitConfig> = take_map(&mut ebpf, "CONFIG")?;
        config
            .set(0, options.rate_limits, 0)
            .map_err(|source| DatapathError::Map {
                map: "CONFIG",
                source,
            })?;
        let mut heartbeat: Array<_, Heartbeat> = take_map(&mut ebpf, "HEARTBEAT")?;
        let fail_open_after_ns = options.fail_open_after.as_nanos() as u64;
        if adopted_heartbeat {
            // The map is adopted: the last agent's heartbeat stands (idle VIPs keep failing
            // open if it is old) until this agent can vouch for the map.
            let renewed_ns = heartbeat.get(&0, 0).map_or(0, |h| h.renewed_ns);
            heartbeat
                .set(
                    0,
                    Heartbeat {
                        renewed_ns,
                        fail_open_after_ns,
                    },
                    0,
                )
                .map_err(|source| DatapathError::Map {
                    map: "HEARTBEAT",
                    source,
                })?;
        } else {
            write_heartbeat(&mut heartbeat, fail_open_after_ns)?;
        }
        let vips: HashMap<MapData, VipKey, VipState> = take_map(&mut ebpf, "VIPS")?;
        let mut keys = FastSet::default();
        let mut bucket_counts = FastMap::default();
        if adopted_vips {
            // What the last agent left in the map: the prefilter already has these bits.
            for key in vips.keys().flatten() {
                *bucket_counts
                    .entry(address_bucket(&key.addr))
                    .or_insert(0u32) += 1;
                keys.insert(key);
            }
        }
        let mut filter_words = vec![0u64; ADDRESS_FILTER_WORDS as usize];
        for bucket in bucket_counts.keys() {
            filter_words[(bucket / 64) as usize] |= 1 << (bucket % 64);
        }
        let address_filter = take_map(&mut ebpf, "VIP_ADDRESS_FILTER")?;
        let counters = CounterReader(Arc::new(take_map(&mut ebpf, "COUNTERS")?));
        let events = Some(take_map(&mut ebpf, "EVENTS")?);
        let held = Some(take_map(&mut ebpf, "HELD")?);
        let hold = take_map(&mut ebpf, "HOLD")?;
        let answered = take_map(&mut ebpf, "ANSWERED_FLOWS")?;
        let iface_scopes = take_map(&mut ebpf, "IFACE_SCOPES")?;
        let vip_scopes: HashMap<MapData, ScopedVip, u32> = take_map(&mut ebpf, "VIP_SCOPES")?;
        // What an earlier agent left: the scopes written for each VIP id.
        let mut scopes_of: FastMap<u32, Vec<u32>> = FastMap::default();
        for key in vip_scopes.keys().flatten() {
            scopes_of.entry(key.vip_id).or_default().push(key.scope);
        }
        Ok(Self {
            ebpf,
            vips,
            address_filter,
            keys,
            bucket_counts,
            filter_words,
            batch_updates: true,
            counters,
            heartbeat,
            fail_open_after_ns,
            max_vips,
            pins,
            events,
            held,
            hold,
            hold_config: HoldConfig::default(),
            answered,
            iface_scopes,
            vip_scopes,
            scopes_of,
            logger,
            attached: Vec::new(),
        })
    }

    /// Attaches the datapath to `iface` with `hook` ([`Hook::Auto`] chooses by the kind of
    /// interface). Returns the interface index and the hook used.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> Result<(u32, Hook), DatapathError> {
        let ifindex = ifindex_of(iface)?;
        let hook = hook.for_interface(iface);
        let failed = |err: ProgramError| DatapathError::Attach {
            iface: iface.to_owned(),
            hook,
            reason: attach_hint(&err, hook),
        };
        let link = match hook {
            Hook::Tc => {
                let tcx = aya::util::KernelVersion::new(6, 6, 0);
                if aya::util::KernelVersion::current().is_ok_and(|v| v < tcx) {
                    // Before TCX, TC programs hang off the clsact qdisc (may be there already).
                    let _ = aya::programs::tc::qdisc_add_clsact(iface);
                } else if let Ok((_, programs)) =
                    SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
                    && programs
                        .iter()
                        .any(|p| p.name() == TC_PROGRAM_NAME.as_bytes())
                {
                    // TCX takes several programs: a second agent would report every hit twice.
                    return Err(DatapathError::Attach {
                        iface: iface.to_owned(),
                        hook,
                        reason: "the interface already has unidler's TC program (another \
                                 unidler is running on it)"
                            .into(),
                    });
                }
                Link::Tc(
                    self.tc_program_mut()?
                        .attach(iface, TcAttachType::Ingress)
                        .map_err(failed)?,
                )
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
        let link = self.pin_link(iface, hook, link)?;
        self.attached.push(Attachment {
            iface: iface.to_owned(),
            ifindex,
            hook,
            link,
        });
        Ok((ifindex, hook))
    }

    /// With a pin directory, pins a new attachment's link so that it outlives the process.
    fn pin_link(&mut self, iface: &str, hook: Hook, link: Link) -> Result<Link, DatapathError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(link);
        };
        let path = pins.link_path(hook.name(), iface);
        let fd_link: Result<aya::programs::links::FdLink, _> = match link {
            Link::Xdp(id) => self
                .program_mut()?
                .take_link(id)
                .map_err(|e| DatapathError::Pin(e.to_string()))
                .and_then(|l| {
                    l.try_into().map_err(|e: aya::programs::links::LinkError| {
                        DatapathError::Pin(e.to_string())
                    })
                }),
            Link::Tc(id) => self
                .tc_program_mut()?
                .take_link(id)
                .map_err(|e| DatapathError::Pin(e.to_string()))
                .and_then(|l| {
                    l.try_into().map_err(|e: aya::programs::links::LinkError| {
                        DatapathError::Pin(e.to_string())
                    })
                }),
            pinned @ Link::Pinned(_) => return Ok(pinned),
        };
        let pinned = fd_link?
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
                pinning::update_link(attachment.fd(), program.as_fd())
                    .map_err(|e| e.to_string())?;
                self.attached.push(Attachment {
                    iface: iface.clone(),
                    ifindex: linked,
                    hook,
                    link: Link::Pinned(attachment),
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

    /// Whether maps and links are pinned (the datapath outlives the process).
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Removes from the VIP map every VIP that `keep` does not want (what an earlier agent
    /// left there, once this agent's VIP source has synced).
    pub fn retain_vips(&mut self, keep: impl Fn(&VipKey) -> bool) -> Result<usize, DatapathError> {
        let stale: Vec<VipKey> = self.keys.iter().filter(|k| !keep(k)).copied().collect();
        self.apply_vips(&[], &stale)?;
        Ok(stale.len())
    }

    /// Sets (or, with None, clears) the scope of interface `ifindex`.
    pub fn set_iface_scope(
        &mut self,
        ifindex: u32,
        scope: Option<u32>,
    ) -> Result<(), DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: "IFACE_SCOPES",
            source,
        };
        match scope {
            Some(scope) => self
                .iface_scopes
                .insert(ifindex, scope, 0)
                .map_err(map_error),
            None => remove_entry(&mut self.iface_scopes, &ifindex, "IFACE_SCOPES"),
        }
    }

    /// The interfaces that have a scope, with it.
    pub fn iface_scopes(&self) -> Vec<(u32, u32)> {
        self.iface_scopes.iter().flatten().collect()
    }

    /// Writes the per-scope backends of the VIP with id `vip_id` (`(scope, backends)`; empty:
    /// the VIP is not scoped), removing the scopes it no longer has. Its entry in the VIP map
    /// must carry [`unidler_common::VIP_FLAG_SCOPED`] while it has any.
    pub fn set_vip_scopes(
        &mut self,
        vip_id: u32,
        scopes: &[(u32, u32)],
    ) -> Result<(), DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: "VIP_SCOPES",
            source,
        };
        for &(scope, backends) in scopes {
            self.vip_scopes
                .insert(ScopedVip { vip_id, scope }, backends, 0)
                .map_err(map_error)?;
        }
        let old = match scopes.is_empty() {
            true => self.scopes_of.remove(&vip_id).unwrap_or_default(),
            false => self
                .scopes_of
                .insert(vip_id, scopes.iter().map(|(s, _)| *s).collect())
                .unwrap_or_default(),
        };
        for scope in old {
            if scopes.iter().any(|(s, _)| *s == scope) {
                continue;
            }
            remove_entry(
                &mut self.vip_scopes,
                &ScopedVip { vip_id, scope },
                "VIP_SCOPES",
            )?;
        }
        Ok(())
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
        let result = match attachment.link {
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

    /// Inserts or replaces a VIP. The entry's rate limiter starts full; the kernel's hit
    /// count of an entry being replaced is kept (`state.hits` is ignored).
    pub fn upsert_vip(&mut self, key: VipKey, state: VipState) -> Result<(), DatapathError> {
        match self.apply_vips(&[(key, state)], &[])?.as_slice() {
            [] => Ok(()),
            _ => Err(DatapathError::VipMapFull {
                capacity: self.max_vips,
            }),
        }
    }

    /// Removes a VIP; removing one that is not there is not an error.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        self.apply_vips(&[], std::slice::from_ref(key)).map(drop)
    }

    /// Removes `removes`, then inserts or replaces `upserts` (as [`Datapath::upsert_vip`]
    /// does); returns the keys that did not fit (the map is full). The prefilter's words are
    /// written once per batch: each bit goes up before its entry goes in and comes down after
    /// it is gone, so the filter may pass a packet whose lookup then misses, but never hides a
    /// VIP.
    pub fn apply_vips(
        &mut self,
        upserts: &[(VipKey, VipState)],
        removes: &[VipKey],
    ) -> Result<Vec<VipKey>, DatapathError> {
        let mut dirty = std::collections::BTreeSet::new();
        for key in removes {
            remove_entry(&mut self.vips, key, "VIPS")?;
            if self.keys.remove(key) {
                self.count_in_bucket(key, -1, &mut dirty);
            }
        }
        self.write_filter_words(&mut dirty)?;
        let new: Vec<bool> = upserts
            .iter()
            .map(|(key, _)| {
                let new = self.keys.insert(*key);
                if new {
                    self.count_in_bucket(key, 1, &mut dirty);
                }
                new
            })
            .collect();
        self.write_filter_words(&mut dirty)?;
        let mut unfit = Vec::new();
        // New entries in batches; replaced ones one by one, keeping their hit counts.
        let mut batch_keys = Vec::new();
        let mut batch_values = Vec::new();
        for (&(key, state), new) in upserts.iter().zip(new) {
            if new {
                batch_keys.push(key);
                batch_values.push(VipState { hits: 0, ..state });
            } else {
                let hits = self.vip(&key).map_or(0, |old| old.hits);
                self.insert_vip(
                    key,
                    VipState { hits, ..state },
                    false,
                    &mut unfit,
                    &mut dirty,
                )?;
            }
        }
        let mut from = 0;
        while from < batch_keys.len() {
            if !self.batch_updates {
                for (key, state) in batch_keys[from..].iter().zip(&batch_values[from..]) {
                    self.insert_vip(*key, *state, true, &mut unfit, &mut dirty)?;
                }
                break;
            }
            let fd = IterableMap::map(&self.vips).fd().as_fd();
            match map_batch::update(fd, &batch_keys[from..], &batch_values[from..]) {
                Ok(()) => break,
                Err(failed) => {
                    if failed.error.raw_os_error() == Some(libc::EINVAL) {
                        // A kernel without batch updates (before 5.6): one by one.
                        tracing::debug!("no BPF_MAP_UPDATE_BATCH: VIPs written one by one");
                        self.batch_updates = false;
                        from += failed.done;
                        continue;
                    }
                    // The entry that failed, alone: it says why (a full map, typically).
                    let at = from + failed.done;
                    self.insert_vip(
                        batch_keys[at],
                        batch_values[at],
                        true,
                        &mut unfit,
                        &mut dirty,
                    )?;
                    from = at + 1;
                }
            }
        }
        self.write_filter_words(&mut dirty)?;
        Ok(unfit)
    }

    /// Writes one entry; a full map adds `key` to `unfit` (and, for a `new` key, takes it back
    /// out of the keys and the prefilter count).
    fn insert_vip(
        &mut self,
        key: VipKey,
        state: VipState,
        new: bool,
        unfit: &mut Vec<VipKey>,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        match self.vips.insert(key, state, 0) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                unfit.push(key);
                if new {
                    self.keys.remove(&key);
                    self.count_in_bucket(&key, -1, dirty);
                }
                Ok(())
            }
            Err(source) => {
                self.write_filter_words(dirty)?;
                Err(DatapathError::Map {
                    map: "VIPS",
                    source,
                })
            }
        }
    }

    /// Counts `key`'s address in (`delta` 1) or out of (-1) its prefilter bucket; when the
    /// bucket turns non-empty or empty, flips its bit and marks its word `dirty`.
    fn count_in_bucket(
        &mut self,
        key: &VipKey,
        delta: i32,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) {
        let bucket = address_bucket(&key.addr);
        let count = self.bucket_counts.entry(bucket).or_default();
        *count = count.saturating_add_signed(delta);
        let bit = 1u64 << (bucket % 64);
        let word = &mut self.filter_words[(bucket / 64) as usize];
        if *count == 0 {
            self.bucket_counts.remove(&bucket);
            *word &= !bit;
        } else {
            *word |= bit;
        }
        dirty.insert(bucket / 64);
    }

    /// Writes the prefilter's `dirty` words to the kernel.
    fn write_filter_words(
        &mut self,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        let indexes: Vec<u32> = std::mem::take(dirty).into_iter().collect();
        if indexes.len() > 1 && self.batch_updates {
            let words: Vec<u64> = indexes
                .iter()
                .map(|i| self.filter_words[*i as usize])
                .collect();
            let fd = self.address_filter.map().fd().as_fd();
            if map_batch::update(fd, &indexes, &words).is_ok() {
                return Ok(());
            }
            // Written one by one below (again, for any the batch did write).
        }
        for word_index in indexes {
            self.address_filter
                .set(word_index, self.filter_words[word_index as usize], 0)
                .map_err(|source| DatapathError::Map {
                    map: "VIP_ADDRESS_FILTER",
                    source,
                })?;
        }
        Ok(())
    }

    /// Vouches for the VIP map now: idle VIPs keep dropping for another `fail_open_after`.
    pub fn renew_heartbeat(&mut self) -> Result<(), DatapathError> {
        write_heartbeat(&mut self.heartbeat, self.fail_open_after_ns)
    }

    /// A second, read-only handle on the VIP map, for reading hit counts off the agent's loop.
    pub fn vip_hits_reader(&self) -> Result<VipHitsReader, DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: "VIPS",
            source,
        };
        let id = self.vips.map().info().map_err(map_error)?.id();
        let data = MapData::from_id(id).map_err(map_error)?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_error)?;
        Ok(VipHitsReader(Arc::new(map)))
    }

    /// The VIP entry for `key`, if present.
    pub fn vip(&self, key: &VipKey) -> Option<VipState> {
        self.vips.get(key, 0).ok()
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        self.counters.read()
    }

    /// A reader of the kernel's counters for other tasks (the metrics endpoint).
    pub fn counter_reader(&self) -> CounterReader {
        self.counters.clone()
    }

    /// Hands out the event ring buffer; only once.
    pub fn take_events(&mut self) -> Option<EventRing> {
        self.events.take().map(|ring| EventRing { ring })
    }

    /// Hands out the held-frame ring buffer; only once.
    pub fn take_held(&mut self) -> Option<HeldRing> {
        self.held.take().map(|ring| HeldRing { ring })
    }

    /// Turns holding on or off: whether the kernel copies dropped opening packets to the
    /// held-frame ring.
    pub fn set_holding(&mut self, holding: bool) -> Result<(), DatapathError> {
        self.hold_config.holding = u32::from(holding);
        self.write_hold_config()
    }

    fn write_hold_config(&mut self) -> Result<(), DatapathError> {
        self.hold
            .set(0, self.hold_config, 0)
            .map_err(|source| DatapathError::Map {
                map: "HOLD",
                source,
            })
    }

    /// Starts watching for the answer to a replayed flow (the client's next segment of it).
    pub fn watch_answer(&mut self, flow: &FlowKey) -> Result<(), DatapathError> {
        self.answered
            .insert(flow, 0, 0)
            .map_err(|source| DatapathError::Map {
                map: "ANSWERED_FLOWS",
                source,
            })?;
        if self.hold_config.watching_answers == 0 {
            self.hold_config.watching_answers = 1;
            self.write_hold_config()?;
        }
        Ok(())
    }

    /// Whether the kernel has seen the answer to a watched flow.
    pub fn is_answered(&self, flow: &FlowKey) -> bool {
        self.answered
            .get(flow, 0)
            .is_ok_and(|answered| answered != 0)
    }

    /// Stops watching a flow; `none_left` says that no other flow is watched (the kernel
    /// then stops looking TCP segments up).
    pub fn forget_answer(&mut self, flow: &FlowKey, none_left: bool) -> Result<(), DatapathError> {
        remove_entry(&mut self.answered, flow, "ANSWERED_FLOWS")?;
        if none_left && self.hold_config.watching_answers != 0 {
            self.hold_config.watching_answers = 0;
            self.write_hold_config()?;
        }
        Ok(())
    }

    /// Hands `frame` to the network stack of interface `ifindex` as if it had just been
    /// received there (`BPF_PROG_TEST_RUN` of the replay program with live frames, kernel
    /// 5.18 and later). The frame carries the replay mark, so the TC hook lets it through.
    pub fn replay(&self, frame: &[u8], ifindex: u32) -> Result<(), DatapathError> {
        let program: &Xdp = self.typed(REPLAY_PROGRAM_NAME, "replay program")?;
        let ctx = xdp_md(frame, ifindex);
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: 1,
                attrs: TestRunAttrs::new().xdp_live_frames(1),
                ..TestRunOptions::default()
            })
            .map_err(DatapathError::TestRun)?;
        Ok(())
    }

    /// Whether this kernel can replay held frames (`BPF_F_TEST_XDP_LIVE_FRAMES`, 5.18 and
    /// later): replays a frame no protocol takes (a local experimental EtherType) into
    /// loopback. The error says why not.
    pub fn probe_replay(&self) -> Result<(), DatapathError> {
        let mut frame = [0u8; 60];
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        self.replay(&frame, ifindex_of("lo")?)
    }

    /// Hands out the kernel logger (forwarding aya-log records to `log`); only once.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN`, as if it had arrived on
    /// interface `ifindex` (which must exist; 1 is loopback). Returns the XDP verdict.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> Result<u32, DatapathError> {
        self.test_run_repeat(frame, ifindex, 1)
            .map(|(verdict, _)| verdict)
    }

    /// Like [`Datapath::test_run`], `repeat` times in the kernel; also returns the mean time
    /// per run that the kernel measured, in nanoseconds.
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, u64), DatapathError> {
        run_repeat(self.program()?, frame, ifindex, repeat)
    }

    /// Loads the do-nothing baseline program from the same object and runs it like
    /// [`Datapath::test_run_repeat`]: what an XDP program costs before it does anything.
    pub fn baseline_test_run(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, u64), DatapathError> {
        let program: &mut Xdp =
            self.typed_mut(unidler_common::BASELINE_PROGRAM_NAME, "baseline program")?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| DatapathError::Load(Box::new(e)))?;
        }
        run_repeat(program, frame, ifindex, repeat)
    }

    /// The program called `name` in the object, as a `T` (`Xdp`, `SchedClassifier`).
    fn typed<'a, T>(&'a self, name: &str, what: &'static str) -> Result<&'a T, DatapathError>
    where
        &'a T: TryFrom<&'a aya::programs::Program>,
    {
        self.ebpf
            .program(name)
            .and_then(|p| <&T>::try_from(p).ok())
            .ok_or(DatapathError::Missing(what))
    }

    /// Like [`Datapath::typed`], mutable.
    fn typed_mut<'a, T>(
        &'a mut self,
        name: &str,
        what: &'static str,
    ) -> Result<&'a mut T, DatapathError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut T>::try_from(p).ok())
            .ok_or(DatapathError::Missing(what))
    }

    fn program(&self) -> Result<&Xdp, DatapathError> {
        self.typed(PROGRAM_NAME, "XDP program")
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.typed_mut(PROGRAM_NAME, "XDP program")
    }

    fn tc_program_mut(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.typed_mut(TC_PROGRAM_NAME, "TC program")
    }

    /// Runs the TC program `repeat` times on `frame` through `BPF_PROG_TEST_RUN` (as an skb
    /// received on loopback). Returns the TC verdict (`TC_ACT_OK` 0, `TC_ACT_SHOT` 2) and the
    /// mean time per run in nanoseconds.
    pub fn tc_test_run_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, u64), DatapathError> {
        tc_run_repeat(self.typed(TC_PROGRAM_NAME, "TC program")?, frame, repeat)
    }

    /// Like [`Datapath::baseline_test_run`] for the TC hook's do-nothing program.
    pub fn tc_baseline_test_run(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, u64), DatapathError> {
        let program: &mut SchedClassifier = self.typed_mut(
            unidler_common::BASELINE_TC_PROGRAM_NAME,
            "TC baseline program",
        )?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| DatapathError::Load(Box::new(e)))?;
        }
        tc_run_repeat(program, frame, repeat)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Reads the kernel's per-VIP hit counts; cheap to clone. Each read is a syscall: use it off
/// the agent's loop.
#[derive(Clone)]
pub struct VipHitsReader(Arc<HashMap<MapData, VipKey, VipState>>);

impl VipHitsReader {
    /// Connection-opening packets the kernel has seen for `key` (0 if it is not in the map).
    pub fn hits(&self, key: &VipKey) -> u64 {
        self.0.get(key, 0).map_or(0, |state| state.hits)
    }
}

/// Reads the kernel's per-CPU counters; cheap to clone.
#[derive(Clone)]
pub struct CounterReader(Arc<PerCpuArray<MapData, u64>>);

impl CounterReader {
    /// Sums each counter over the CPUs.
    pub fn read(&self) -> Result<Counters, DatapathError> {
        let mut values = [0u64; Counter::COUNT as usize];
        for (i, value) in values.iter_mut().enumerate() {
            let per_cpu = self
                .0
                .get(&(i as u32), 0)
                .map_err(|source| DatapathError::Map {
                    map: "COUNTERS",
                    source,
                })?;
            *value = per_cpu.iter().sum();
        }
        Ok(Counters(values))
    }
}

/// Sums of the kernel's per-CPU counters, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Connection-opening packets to a VIP with no backends: the kernel counts only their
    /// outcomes (one counter less on the idle path), dropped, passed and failed open.
    pub fn idle_hits(&self) -> u64 {
        self.get(Counter::IdleDropped)
            + self.get(Counter::IdlePassed)
            + self.get(Counter::IdleFailedOpen)
    }

    /// All parse failures together.
    pub fn parse_failures(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_parse_failure())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Each counter minus its value in `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut out = *self;
        for (o, e) in out.0.iter_mut().zip(earlier.0) {
            *o = o.wrapping_sub(e);
        }
        out
    }
}

/// The ring buffer of [`IdleHitEvent`]s written by the kernel.
pub struct EventRing {
    ring: RingBuf<MapData>,
}

impl EventRing {
    /// Takes every event now in the ring, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(IdleHitEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<IdleHitEvent>() {
                // SAFETY: the kernel wrote a whole IdleHitEvent; read_unaligned copes with any
                // alignment of the ring's data.
                each(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<IdleHitEvent>()) });
                n += 1;
            }
        }
        n
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// The `struct xdp_md` of a test run of `frame` arriving on `ifindex`.
fn xdp_md(frame: &[u8], ifindex: u32) -> [u8; 24] {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The ring buffer of held frames written by the kernel ([`unidler_common::HeldFrame`]s of
/// two sizes).
pub struct HeldRing {
    ring: RingBuf<MapData>,
}

/// A held frame as the agent keeps it: where it arrived, when, for which VIP, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBytes {
    /// When the kernel saw it, `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
    /// The VIP it was sent to.
    pub vip: VipKey,
    /// The interface it arrived on.
    pub ifindex: u32,
    /// The frame, from its Ethernet header.
    pub frame: Vec<u8>,
}

impl HeldRing {
    /// Takes every held frame now in the ring, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(HeldBytes)) -> usize {
        let mut n = 0;
        let header_len = size_of::<HeldHeader>();
        while let Some(item) = self.ring.next() {
            if item.len() < header_len {
                continue;
            }
            // SAFETY: every entry starts with a HeldHeader; read_unaligned copes with any
            // alignment of the ring's data.
            let header = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<HeldHeader>()) };
            let Some(frame) = item.get(header_len..header_len + header.len as usize) else {
                continue;
            };
            each(HeldBytes {
                timestamp_ns: header.timestamp_ns,
                vip: header.vip,
                ifindex: header.ifindex,
                frame: frame.to_vec(),
            });
            n += 1;
        }
        n
    }
}

impl AsRawFd for HeldRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

fn run_repeat(
    program: &Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, u64), DatapathError> {
    let ctx = xdp_md(frame, ifindex);
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(DatapathError::TestRun)?;
    Ok((result.return_value, result.duration.as_nanos() as u64))
}

fn tc_run_repeat(
    program: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
) -> Result<(i32, u64), DatapathError> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(DatapathError::TestRun)?;
    Ok((
        result.return_value as i32,
        result.duration.as_nanos() as u64,
    ))
}

/// Writes a heartbeat renewed now.
fn write_heartbeat(
    map: &mut Array<MapData, Heartbeat>,
    fail_open_after_ns: u64,
) -> Result<(), DatapathError> {
    let heartbeat = Heartbeat {
        renewed_ns: monotonic_ns(),
        fail_open_after_ns,
    };
    map.set(0, heartbeat, 0)
        .map_err(|source| DatapathError::Map {
            map: "HEARTBEAT",
            source,
        })
}

/// Removes `key` from the map named `name` (in errors); a key already gone is no error.
fn remove_entry<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(DatapathError::Map { map: name, source }),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
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

/// If `err` is EPERM/EACCES, says which capabilities are missing.
fn privileges_error(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return Some(caps::explain_missing().unwrap_or_else(|| {
                format!("the kernel denied a BPF operation ({io}) although the process seems to have the capabilities; is BPF restricted (kernel.unprivileged_bpf_disabled, a LSM, a seccomp profile)?")
            }));
        }
        if let Some(ProgramError::LoadError { io_error, .. }) = e.downcast_ref::<ProgramError>()
            && matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return caps::explain_missing();
        }
        source = e.source();
    }
    None
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
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if hook == Hook::Xdp => format!(
            "{err}: the driver does not support native XDP; use --hook tc, xdp-generic or auto"
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            caps::explain_missing().unwrap_or_else(|| err.to_string())
        }
        _ => err.to_string(),
    }
}
