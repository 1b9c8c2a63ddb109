//! The kernel side, seen from the agent: loads the embedded programs (XDP and TC ingress,
//! one parser, shared maps), attaches them to interfaces, and owns the maps (VIPs, counters,
//! rate limits, heartbeat, event ring).
//!
//! Without a pin directory, dropping a [`Datapath`] detaches the program everywhere:
//! attachments are BPF links owned by this process, so a crash detaches them too and the next
//! run starts clean; on kernels without TCX a TC attachment is a clsact filter, which a crash
//! leaves behind and the next agent on the interface takes over. With one ([`LoadOptions::pin_dir`], see [`crate::pinning`]), maps and
//! links are pinned: they outlive the process, and the next [`Datapath::load`] adopts them.

use std::{io, sync::Arc, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapType, RingBuf},
    programs::{Program, ProgramError, SchedClassifier, Xdp},
};
use aya_log::EbpfLogger;
use thiserror::Error;
use unidler_common::{
    ADDRESS_FILTER_WORDS, Counter, FlowKey, Heartbeat, HoldConfig, PROGRAM_NAME,
    REPLAY_PROGRAM_NAME, RateLimitConfig, ScopedVip, TC_PROGRAM_NAME, VipKey, VipState,
    address_bucket, map_names,
};

mod attach;
mod features;
mod output;
mod replay;
mod vips;

use attach::Attachment;
pub use attach::{Hook, ifindex_of, interfaces};
pub use features::{Feature, KernelFeatures, Unsupported, kernel_release};
pub use output::{CounterReader, Counters, EventRing, HeldRing};
pub use vips::VipHitsReader;

use crate::{
    caps,
    fast_hash::{FastMap, FastSet},
    pinning::{MapFate, MapShape, PinDir},
};

/// The eBPF object (XDP and TC programs, their maps) built by `build.rs` from
/// `unidler-ebpf`, embedded in the binary.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/unidler"));

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
    /// Where the verifier's log of a refused program is written (the temporary directory
    /// if None, or if it cannot be written there).
    pub log_dir: Option<std::path::PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            rate_limits: RateLimitConfig::new(1, 5, 1000, 1000),
            kernel_log_level: 3,
            fail_open_after: Duration::ZERO,
            max_vips: unidler_common::VIP_MAP_CAPACITY,
            pin_dir: None,
            log_dir: None,
        }
    }
}

/// The maps pinned with `--pin-dir`, by name, with the shape the program needs.
fn pinned_maps(max_vips: u32) -> [(&'static str, MapShape); 15] {
    use unidler_common::{
        ADDRESS_FILTER_WORDS, EVENT_RING_BYTES, HELD_FLOWS_CAPACITY, HELD_RING_BYTES,
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
            map_names::VIPS,
            shape(
                MapType::Hash,
                size_of::<VipKey>(),
                size_of::<VipState>(),
                max_vips,
            ),
        ),
        (
            map_names::VIP_ADDRESS_FILTER,
            shape(MapType::Array, 4, 8, ADDRESS_FILTER_WORDS),
        ),
        (
            map_names::EVENTS,
            shape(MapType::RingBuf, 0, 0, EVENT_RING_BYTES),
        ),
        (
            map_names::HELD,
            shape(MapType::RingBuf, 0, 0, HELD_RING_BYTES),
        ),
        (
            map_names::COUNTERS,
            shape(MapType::PerCpuArray, 4, 8, Counter::COUNT),
        ),
        (
            map_names::CONFIG,
            shape(MapType::Array, 4, size_of::<RateLimitConfig>(), 1),
        ),
        (
            map_names::HEARTBEAT,
            shape(MapType::Array, 4, size_of::<Heartbeat>(), 1),
        ),
        (map_names::GLOBAL_LIMITER, shape(MapType::Array, 4, 8, 1)),
        (
            map_names::HOLD,
            shape(MapType::Array, 4, size_of::<HoldConfig>(), 1),
        ),
        (
            map_names::HELD_FLOWS,
            shape(MapType::Hash, size_of::<FlowKey>(), 4, HELD_FLOWS_CAPACITY),
        ),
        (
            map_names::HELD_PER_VIP,
            shape(MapType::Hash, size_of::<VipKey>(), 8, HELD_FLOWS_CAPACITY),
        ),
        (map_names::HELD_TOTAL, shape(MapType::Array, 4, 8, 1)),
        (map_names::LAYOUT, shape(MapType::Array, 4, 4, 1)),
        (
            map_names::IFACE_SCOPES,
            shape(MapType::Hash, 4, 4, IFACE_SCOPES_CAPACITY),
        ),
        (
            map_names::VIP_SCOPES,
            shape(
                MapType::Hash,
                size_of::<ScopedVip>(),
                4,
                VIP_SCOPES_CAPACITY,
            ),
        ),
    ]
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
    /// The kernel lacks a feature the datapath requires.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The verifier refused a program: its last words, and where its whole log is.
    #[error(
        "the kernel's verifier ({release}) refused the {what}: {last_words}\n  its whole log \
         ({log_bytes} bytes) is in {log_path} (also at --log-level debug)"
    )]
    Verifier {
        /// Which program.
        what: &'static str,
        /// The running kernel.
        release: String,
        /// The log's last lines, which say why.
        last_words: String,
        /// The size of the whole log.
        log_bytes: usize,
        /// Where the whole log was written.
        log_path: String,
    },
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
    /// This build carries no eBPF program (built with `UNIDLER_NO_EBPF=1`, for the fuzz
    /// targets).
    #[error(
        "this agent was built without its eBPF program (UNIDLER_NO_EBPF=1): rebuild it without"
    )]
    NoProgram,
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
    held_flows: HashMap<MapData, FlowKey, u32>,
    held_per_vip: HashMap<MapData, VipKey, u64>,
    held_total: Array<MapData, u64>,
    /// Interface index → scope, for the interfaces that have one.
    iface_scopes: HashMap<MapData, u32, u32>,
    /// Scoped VIPs' backends per scope, and (mirror) the scopes written for each `vip_id`.
    vip_scopes: HashMap<MapData, ScopedVip, u32>,
    scopes_of: FastMap<u32, Vec<u32>>,
    logger: Option<KernelLogger>,
    attached: Vec<Attachment>,
    features: KernelFeatures,
}

impl Datapath {
    /// Loads the program into the kernel (without attaching it) and writes its configuration.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(DatapathError::NoProgram);
        }
        let max_vips = options.max_vips.max(1);
        let pins = match &options.pin_dir {
            Some(dir) => Some(PinDir::open(dir).map_err(|e| DatapathError::Pin(e.to_string()))?),
            None => None,
        };
        // Missing privileges first: the probes would take them for missing features.
        if let Some(msg) = caps::explain_missing() {
            return Err(DatapathError::Privileges(msg));
        }
        let features = KernelFeatures::probe().map_err(|err| match privileges_error(&err) {
            Some(msg) => DatapathError::Privileges(msg),
            None => DatapathError::Load(Box::new(err)),
        })?;
        features.check_required()?;
        let holding_available = u8::from(features.holding().is_ok());
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &options.kernel_log_level, false)
            .override_global("HOLDING_AVAILABLE", &holding_available, true)
            .map_max_entries(map_names::VIPS, max_vips);
        let mut adopted_vips = false;
        let mut adopted_heartbeat = false;
        if let Some(pins) = &pins {
            if let Some(why) = pins
                .check_layout(unidler_common::LAYOUT_VERSION)
                .map_err(|e| DatapathError::Pin(format!("layout version: {e}")))?
            {
                tracing::warn!(
                    "pinned maps hold records of another layout: all re-created empty ({why})"
                );
            }
            for (name, shape) in pinned_maps(max_vips) {
                if name == map_names::VIP_ADDRESS_FILTER && !adopted_vips {
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
                adopted_vips |= name == map_names::VIPS && fate == MapFate::Adopted;
                adopted_heartbeat |= name == map_names::HEARTBEAT && fate == MapFate::Adopted;
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
        // The kernel's verifier runs here: most of the load's time.
        for (name, what) in [
            (PROGRAM_NAME, "XDP program"),
            (TC_PROGRAM_NAME, "TC program"),
            (REPLAY_PROGRAM_NAME, "replay program"),
        ] {
            let started = std::time::Instant::now();
            let program = ebpf.program_mut(name).ok_or(DatapathError::Missing(what))?;
            match program {
                Program::Xdp(program) => program.load(),
                Program::SchedClassifier(program) => program.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            }
            .map_err(|err| refused(err, what, &features.release, options))?;
            tracing::debug!(
                program = name,
                elapsed = ?started.elapsed(),
                verified_insns = program.info().ok().and_then(|i| i.verified_instruction_count()),
                "program verified"
            );
        }

        let mut config: Array<_, RateLimitConfig> = take_map(&mut ebpf, map_names::CONFIG)?;
        config
            .set(0, options.rate_limits, 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::CONFIG,
                source,
            })?;
        let mut heartbeat: Array<_, Heartbeat> = take_map(&mut ebpf, map_names::HEARTBEAT)?;
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
                    map: map_names::HEARTBEAT,
                    source,
                })?;
        } else {
            write_heartbeat(&mut heartbeat, fail_open_after_ns)?;
        }
        let vips: HashMap<MapData, VipKey, VipState> = take_map(&mut ebpf, map_names::VIPS)?;
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
        let address_filter = take_map(&mut ebpf, map_names::VIP_ADDRESS_FILTER)?;
        let counters = CounterReader(Arc::new(take_map(&mut ebpf, map_names::COUNTERS)?));
        let events = Some(take_map(&mut ebpf, map_names::EVENTS)?);
        let held = Some(take_map(&mut ebpf, map_names::HELD)?);
        let mut hold: Array<MapData, HoldConfig> = take_map(&mut ebpf, map_names::HOLD)?;
        // Off until this agent turns it on: an adopted map keeps what the last agent wrote.
        hold.set(0, HoldConfig::default(), 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::HOLD,
                source,
            })?;
        let mut held_flows: HashMap<MapData, FlowKey, u32> =
            take_map(&mut ebpf, map_names::HELD_FLOWS)?;
        let mut held_per_vip: HashMap<MapData, VipKey, u64> =
            take_map(&mut ebpf, map_names::HELD_PER_VIP)?;
        let mut held_total: Array<MapData, u64> = take_map(&mut ebpf, map_names::HELD_TOTAL)?;
        if pins.is_some() {
            // What an earlier agent held went with it: its flows and counts are void.
            for flow in held_flows.keys().flatten().collect::<Vec<_>>() {
                remove_entry(&mut held_flows, &flow, map_names::HELD_FLOWS)?;
            }
            for vip in held_per_vip.keys().flatten().collect::<Vec<_>>() {
                remove_entry(&mut held_per_vip, &vip, map_names::HELD_PER_VIP)?;
            }
            held_total
                .set(0, 0, 0)
                .map_err(|source| DatapathError::Map {
                    map: map_names::HELD_TOTAL,
                    source,
                })?;
        }
        let mut layout: Array<MapData, u32> = take_map(&mut ebpf, map_names::LAYOUT)?;
        layout
            .set(0, unidler_common::LAYOUT_VERSION, 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::LAYOUT,
                source,
            })?;
        let iface_scopes = take_map(&mut ebpf, map_names::IFACE_SCOPES)?;
        let vip_scopes: HashMap<MapData, ScopedVip, u32> =
            take_map(&mut ebpf, map_names::VIP_SCOPES)?;
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
            held_flows,
            held_per_vip,
            held_total,
            iface_scopes,
            vip_scopes,
            scopes_of,
            logger,
            attached: Vec::new(),
            features,
        })
    }

    /// What the running kernel offers, as probed when the datapath was loaded.
    pub fn features(&self) -> &KernelFeatures {
        &self.features
    }

    /// Whether maps and links are pinned (the datapath outlives the process).
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Vouches for the VIP map now: idle VIPs keep dropping for another `fail_open_after`.
    pub fn renew_heartbeat(&mut self) -> Result<(), DatapathError> {
        write_heartbeat(&mut self.heartbeat, self.fail_open_after_ns)
    }

    /// Hands out the kernel logger (forwarding aya-log records to `log`); only once.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
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
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Writes a heartbeat renewed now.
fn write_heartbeat(
    map: &mut Array<MapData, Heartbeat>,
    fail_open_after_ns: u64,
) -> Result<(), DatapathError> {
    let heartbeat = Heartbeat {
        renewed_ns: crate::clock::monotonic_ns(),
        fail_open_after_ns,
    };
    map.set(0, heartbeat, 0)
        .map_err(|source| DatapathError::Map {
            map: map_names::HEARTBEAT,
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

/// The error for a program the kernel would not load: missing privileges, or the verifier's
/// refusal, whose whole log goes to a file and the debug log, and whose last lines say why.
fn refused(
    err: ProgramError,
    what: &'static str,
    release: &str,
    options: &LoadOptions,
) -> DatapathError {
    if let Some(msg) = privileges_error(&err) {
        return DatapathError::Privileges(msg);
    }
    let ProgramError::LoadError { verifier_log, .. } = &err else {
        return DatapathError::Load(Box::new(err));
    };
    let log = verifier_log.to_string();
    tracing::debug!(program = what, "verifier log:\n{log}");
    let file = format!("unidler-verifier-{}.log", what.replace(' ', "-"));
    let written = options
        .log_dir
        .iter()
        .cloned()
        .chain([std::env::temp_dir()])
        .map(|dir| dir.join(&file))
        .find(|path| std::fs::write(path, &log).is_ok());
    let last_words = log
        .lines()
        .rev()
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("verification time")
                && !line.starts_with("stack depth")
        })
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" / ");
    DatapathError::Verifier {
        what,
        release: release.to_owned(),
        last_words,
        log_bytes: log.len(),
        log_path: written.map_or_else(
            || "no file (none could be written)".into(),
            |path| path.display().to_string(),
        ),
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
