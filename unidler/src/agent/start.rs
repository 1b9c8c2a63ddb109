//! Start-up: from the configuration to a running agent, in order. Every step that fails here
//! is one the operator must fix first (an unknown interface, a bad VIPs file, missing
//! privileges); from then on the agent keeps going.

use std::{
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use super::{
    Agent, Config, InterfaceSelector, VipSourceConfig,
    heartbeat::Heartbeat,
    held::Holding,
    hits::{HitOutput, Hits},
    interfaces::Interfaces,
    sources::{PacedRing, ReplayTimer, Signals, Sources, ring_pacer},
    vip_map::VipMap,
    wakeups,
};
use crate::{
    datapath::{self, Datapath, Feature, LoadOptions},
    hold::{HeldPackets, HoldLimits},
    links::LinkChanges,
    ovn::{
        controller_event::{ControllerEventWriter, WriterOptions},
        lb_names::LoadBalancerNames,
        ovs_interfaces,
        southbound::{Southbound, SouthboundConfig},
        vips::{self, SourceHandles},
    },
    telemetry::{
        self, Readiness,
        metrics::{self, AgentMetrics},
    },
    vip::VipUpdate,
    vipsource,
    wakeup::Wakeups,
};

/// How often the VIPs file is checked for changes.
const VIPS_FILE_POLL: Duration = Duration::from_secs(1);
/// How often the interfaces are looked at even without a link notification (a safety net:
/// notifications come first, and a lost one is caught here).
const INTERFACES_EVERY: Duration = Duration::from_secs(10);

impl Agent {
    /// Loads and attaches the datapath, connects to the Southbound database, starts the VIP
    /// source and the HTTP endpoint. Fails on anything the operator must fix first (an
    /// unknown interface, a bad VIPs file, missing privileges).
    pub async fn start(config: Config) -> Result<Self> {
        // Signals first: a SIGTERM from here on stops the agent in order (detaching, or, with
        // --pin-dir, leaving the datapath pinned), never by the default action.
        let signals = Signals::install()?;
        // Fail on a typo before touching the kernel.
        let mut named = Vec::new();
        let mut patterns = Vec::new();
        for selector in &config.interfaces {
            match selector {
                InterfaceSelector::Name(name) => {
                    datapath::ifindex_of(name)?;
                    named.push(name.clone());
                }
                InterfaceSelector::Pattern(pattern) => patterns.push(pattern.clone()),
            }
        }
        // The Southbound connection first: the database composing its first monitor reply
        // (seconds, with 100,000s of load balancers) overlaps with loading the datapath; VIP
        // updates wait in the channel.
        let (vip_tx, vip_updates) = mpsc::unbounded_channel();
        let (southbound, ovn_vips) = match &config.southbound {
            Some(sb) => {
                let (southbound, ovn_vips) =
                    connect_southbound(sb, config.vips == VipSourceConfig::Ovn, &vip_tx).await?;
                (Some(southbound), ovn_vips)
            }
            None => (None, None),
        };
        let mut datapath = load_datapath(&config).await?;

        let (rows_tx, rows) = mpsc::unbounded_channel();
        let writer = southbound.clone().map(|southbound| {
            ControllerEventWriter::start(
                southbound,
                WriterOptions {
                    queue_capacity: config.event_queue_size,
                    state_dir: Some(config.state_dir.clone()),
                    dedup: config.dedup,
                    news: Some(rows_tx),
                },
            )
        });

        // Health and metrics from now on; /readyz says what is still missing.
        let readiness = Arc::new(Readiness::default());
        let metrics = AgentMetrics::default();
        let (query_tx, queries) = mpsc::channel(16);
        let bound = telemetry::serve_health(
            config.metrics_addr,
            readiness.clone(),
            writer.clone(),
            metrics::registry(
                datapath.counter_reader(),
                metrics.clone(),
                writer.clone(),
                ovn_vips.as_ref().map(|h| h.load_balancers.clone()),
            ),
        )
        .await
        .with_context(|| format!("serving --metrics-addr {}", config.metrics_addr))?;
        info!(addr = %bound, "serving /metrics, /healthz, /readyz");
        let bound = telemetry::serve_api(config.api_addr, query_tx, datapath.vip_hits_reader()?)
            .await
            .with_context(|| format!("serving --api-addr {}", config.api_addr))?;
        info!(addr = %bound, "serving /api/vips, /api/events, /api/interfaces");

        let events = datapath.take_events().context("event ring already taken")?;
        let held_ring = datapath
            .take_held()
            .context("held-frame ring already taken")?;
        let hold = start_holding(&mut datapath, config.hold)?;
        let (lb_names, names_read) = match &writer {
            Some(writer) => LoadBalancerNames::start(
                writer.southbound().client().clone(),
                config.event_queue_size,
            ),
            None => LoadBalancerNames::without_database(),
        };
        let (forwarding_tx, forwarding) = mpsc::unbounded_channel();
        let forwarding_reader = match config.forwarding.clone() {
            Some(reader) if config.vips == VipSourceConfig::Ovn => Some(
                reader
                    .start(forwarding_tx)
                    .context("starting the forwarding reader's thread")?,
            ),
            _ => None,
        };
        let port_scopes = ovn_vips.as_ref().map(|h| h.port_scopes.clone());
        let mut agent = Self {
            vips: VipMap::new(
                config.idle_action.vip_flags(),
                config.max_vips,
                readiness.clone(),
                metrics.clone(),
            ),
            interfaces: Interfaces::new(
                config.hook,
                named,
                patterns,
                port_scopes.clone(),
                readiness.clone(),
                metrics.clone(),
            ),
            hits: Hits::new(
                match writer {
                    Some(writer) => HitOutput::Rows(writer),
                    None => HitOutput::Stdout(io::stdout()),
                },
                lb_names,
                datapath.counters()?,
                metrics.clone(),
            ),
            holding: Holding::new(
                HeldPackets::new(hold, metrics.hold.clone()),
                forwarding_reader,
            ),
            wakeups: Wakeups::new(wakeups::timeout(&hold), metrics.wakeups.clone()),
            heartbeat: Heartbeat::new(
                config.fail_open_after,
                southbound
                    .as_ref()
                    .filter(|_| ovn_vips.is_some())
                    .map(|sb| sb.client().clone()),
                metrics,
            ),
            readiness,
            datapath,
            reload_vips_file: None,
            sources: None,
        };

        // VIPs: static ones go in before attaching; a bad file fails the start.
        match &config.vips {
            VipSourceConfig::File(path) => {
                let mut file = vipsource::file::VipsFileSource::new(path.clone());
                let vips = file
                    .load()
                    .map_err(|e| anyhow!("--vips-file {}: {e}", path.display()))?;
                agent.on_vips(VipUpdate::Replace(vips))?;
                let (reload_tx, reload_rx) = mpsc::unbounded_channel();
                file.spawn(VIPS_FILE_POLL, reload_rx, vip_tx);
                agent.reload_vips_file = Some(reload_tx);
            }
            VipSourceConfig::Static(vips) => agent.on_vips(VipUpdate::Replace(vips.clone()))?,
            // The source runs in the Southbound client (connect_southbound).
            VipSourceConfig::Ovn => {
                ovn_vips
                    .as_ref()
                    .context("VIPs from OVN need the Southbound database")?;
            }
            VipSourceConfig::None => {
                warn!(
                    "no VIPs (--vip, --vips-file or --ovnsb-db): every packet passes, nothing \
                     is reported"
                );
                agent.vips.set_synced();
            }
        }

        // What an earlier agent left pinned runs this agent's program now, with no gap;
        // named interfaces must take it; patterns are followed from here on.
        agent.interfaces.attach_named(&mut agent.datapath)?;
        if config.ovn_interfaces.is_none() {
            // Every source of interfaces is known now (OVN's arrive later, and prune then).
            agent.interfaces.prune_adopted(&mut agent.datapath);
        }
        agent.interfaces.follow(&mut agent.datapath);
        agent.readiness.attached.store(true, Ordering::Relaxed);
        info!(
            vips = agent.vips.registry().len(),
            idle = agent.vips.registry().idle_count(),
            "watching for connection attempts to idle VIPs"
        );

        let (vif_tx, vifs) = mpsc::unbounded_channel();
        if let Some((remotes, follow)) = &config.ovn_interfaces {
            ovs_interfaces::spawn(remotes.clone(), *follow, vif_tx)
                .context("following the Open_vSwitch database's interfaces")?;
            info!(
                vifs = follow.vifs,
                uplinks = follow.uplinks,
                "following OVN's interfaces in the local Open_vSwitch database"
            );
        }
        agent.sources = Some(Sources {
            ring: PacedRing::new(
                readable(events).context("registering the event ring with epoll")?,
                ring_pacer(),
            ),
            held: PacedRing::new(
                readable(held_ring).context("registering the held-frame ring with epoll")?,
                ring_pacer(),
            ),
            replay: ReplayTimer::new(),
            forwarding,
            vip_updates,
            queries,
            summary: Sources::summary_timer(config.summary_interval),
            heartbeat: tokio::time::interval(agent.heartbeat.period()),
            interfaces: tokio::time::interval(INTERFACES_EVERY),
            links: readable(LinkChanges::subscribe().context("subscribing to link notifications")?)
                .context("registering link notifications with epoll")?,
            vifs,
            port_scopes,
            names_read,
            rows,
            signals,
        });
        Ok(agent)
    }
}

/// Connects to the Southbound database, shared by the event writer and, with `ovn_vips`, the
/// OVN VIP source (which sends to `vip_tx`).
async fn connect_southbound(
    config: &SouthboundConfig,
    ovn_vips: bool,
    vip_tx: &mpsc::UnboundedSender<VipUpdate>,
) -> Result<(Southbound, Option<SourceHandles>)> {
    const CONNECTING: &str = "connecting to the Southbound database";
    let (southbound, handles) = match ovn_vips {
        true => {
            let (southbound, handles) = vips::connect(config, vip_tx.clone())
                .await
                .context(CONNECTING)?;
            (southbound, Some(handles))
        }
        false => (
            Southbound::connect(config, Vec::new())
                .await
                .context(CONNECTING)?,
            None,
        ),
    };
    info!(
        chassis = %southbound.chassis_name(),
        db = ?config.remotes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vips_from_ovn = ovn_vips,
        "writing Controller_Event rows"
    );
    Ok((southbound, handles))
}

/// Loads (and the kernel verifies) the datapath, off the runtime's thread so that the
/// Southbound client sets up its monitors meanwhile; its log records are forwarded.
async fn load_datapath(config: &Config) -> Result<Datapath> {
    let load = LoadOptions {
        rate_limits: config.rate_limits,
        kernel_log_level: config.kernel_log_level,
        fail_open_after: config.fail_open_after,
        max_vips: config.max_vips,
        pin_dir: config.pin_dir.clone(),
        log_dir: Some(config.state_dir.clone()),
    };
    let loading = std::time::Instant::now();
    let mut datapath = tokio::task::spawn_blocking(move || Datapath::load(&load))
        .await
        .context("loading the datapath")??;
    // Most of it is the kernel's verifier, the agent's largest fixed start-up cost.
    debug!(elapsed = ?loading.elapsed(), "datapath loaded and verified");
    if let Some(logger) = datapath.take_logger() {
        spawn_kernel_log_pump(logger)?;
    }
    Ok(datapath)
}

/// Starts holding opening packets in the kernel, if `hold` asks for it and the kernel can;
/// returns the limits in force (a zero age: not holding). Says what the kernel offers.
fn start_holding(datapath: &mut Datapath, mut hold: HoldLimits) -> Result<HoldLimits> {
    let features = datapath.features();
    info!(
        kernel = %features.release,
        tc = features.tc_attachment(),
        holding = features.holding().is_ok(),
        "kernel features probed"
    );
    if !features.tcx {
        info!(
            "this kernel lacks {} (Linux {}): TC programs hang off the clsact qdisc{}",
            Feature::Tcx.name(),
            Feature::Tcx.since(),
            if datapath.is_pinned() {
                ", and TC attachments go with the agent (only XDP ones stay pinned)"
            } else {
                ""
            }
        );
    }
    if hold.max_age.is_zero() {
        info!("holding is off (--hold-max-age 0): clients wait for their own retransmission");
    } else if let Err(missing) = features.holding() {
        info!(
            "holding is off: this kernel lacks {} (Linux {}); opening packets to idle VIPs \
             are dropped and clients wait for their own retransmission",
            missing.name(),
            missing.since()
        );
        hold.max_age = Duration::ZERO;
    } else {
        datapath.start_holding(hold.per_vip as u32, hold.total as u32)?;
        info!(
            per_vip = hold.per_vip,
            total = hold.total,
            max_age = ?hold.max_age,
            "holding opening packets to idle VIPs, replayed once the VIP has a backend"
        );
    }
    Ok(hold)
}

/// Forwards the kernel's aya-log records to the log as they arrive.
fn spawn_kernel_log_pump(logger: datapath::KernelLogger) -> Result<()> {
    let mut logger = readable(logger).context("registering the kernel log ring")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Registers a ring buffer with the runtime's epoll for readability.
pub(super) fn readable<T: std::os::fd::AsRawFd>(ring: T) -> Result<AsyncFd<T>> {
    // SAFETY: `ring` owns its file descriptor and keeps it open until it is dropped, which
    // happens only when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("{e}"))
}
