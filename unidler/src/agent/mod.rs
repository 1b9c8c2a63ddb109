//! The agent: owns the datapath, the VIP registry, the recent events and where idle hits go
//! (the Controller_Event writer, or standard output), and runs one loop over its [`Sources`].
//!
//! The flows, each with one handler:
//! - ring readable → [`Input::IdleHits`] → resolved against the registry → writer or stdout;
//! - VIP source → [`Input::Vips`] → registry → kernel map changes, and held packets of VIPs
//!   that got a backend due for replay;
//! - held-frame ring readable → [`Input::HeldPackets`] → [`HeldPackets`] (bounded);
//! - replay timer → [`Input::ReplayDue`] → replays through the datapath, expiry;
//! - forwarding check of a VIP that got a backend (OVN) → [`Input::ForwardingChecked`] → its
//!   held packets due;
//! - our Controller_Event rows committed or consumed (the writer) → [`Input::Row`] → the
//!   wake-ups' phases ([`crate::wakeup`], which also follow the hold and the VIP map);
//! - HTTP endpoint → [`Input::Query`] → answers;
//! - summary timer and signals.

mod config;
mod held;
mod sources;
mod wakeups;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    io::{self, Write as _},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};
use unidler_common::{Counter, IdleHitEvent, VipKey};

pub use self::config::{Config, IdleAction, InterfaceSelector, VipSourceConfig};
use self::sources::{Input, ReplayTimer, Signals, Sources};
use crate::{
    clock,
    datapath::{self, Counters, Datapath, Feature, Hook, LoadOptions},
    event::{IdleHit, iface_name},
    hold::HeldPackets,
    links::LinkChanges,
    ovn::controller_event::{ControllerEventWriter, WriterOptions},
    ovn::forwarding::{ForwardingReader, Waiting},
    ovn::lb_names::{LoadBalancerNames, NamesRead},
    ovn::ovs_interfaces::{self, InterfaceNames, OvnInterfaces},
    ovn::southbound::Southbound,
    registry::{MapChange, VipRegistry},
    telemetry::{
        self, EventRow, InterfaceRow, Query, Readiness, ScopeRow, VipRow,
        metrics::{self, AgentMetrics},
    },
    vip::{DesiredVip, Vip, VipUpdate},
    vipsource,
    wakeup::Wakeups,
};

/// Idle hits kept for `unidler events`.
const RECENT_EVENTS: usize = 100;
/// Most idle hits kept while the VIP source has not synced yet (an adopted ring's hits).
const PENDING_HITS: usize = 16_384;
/// How often the VIPs file is checked for changes.
const VIPS_FILE_POLL: Duration = Duration::from_secs(1);
/// How often the interfaces are looked at even without a link notification (a safety net:
/// notifications come first, and a lost one is caught here).
const INTERFACES_EVERY: Duration = Duration::from_secs(10);
/// How often the kernel's heartbeat is renewed (more often for a short `--fail-open-after`).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A running agent: the program attached, its sources started.
pub struct Agent {
    datapath: Datapath,
    registry: VipRegistry,
    /// Opening packets to idle VIPs, held until their VIP has a backend.
    held: HeldPackets,
    /// The wake-ups going on, and the last ones finished.
    wakeups: Wakeups,
    /// Reads the node's forwarding before a replay (VIPs from OVN), and where it says so.
    forwarding: Option<ForwardingReader>,
    /// What waits for the node's forwarding now.
    forwarding_pending: HashSet<Waiting>,
    /// Whether unreadable forwarding was logged.
    forwarding_warned: bool,
    /// `VIP_FLAG_*` bits every VIP gets.
    vip_flags: u32,
    /// Where idle hits go.
    output: HitOutput,
    /// The last idle hits, for `unidler events`.
    recent: VecDeque<IdleHit>,
    /// Load balancers' names as events give them, read from the database when first needed.
    lb_names: LoadBalancerNames,
    /// Idle hits read before the VIP source synced, reported once it has.
    pending_hits: Vec<IdleHitEvent>,
    /// Names of the interfaces we attached to, by ifindex.
    iface_names: HashMap<u32, String>,
    readiness: Arc<Readiness>,
    metrics: AgentMetrics,
    /// The file VIP source's reload trigger (SIGHUP), if it runs.
    reload_vips_file: Option<mpsc::UnboundedSender<()>>,
    /// Kernel counters at the last summary.
    last_summary: Counters,
    /// The Southbound connection, when the VIPs come from it: the map can be vouched for
    /// only while it is connected.
    ovn_vips: Option<Southbound>,
    /// How long idle VIPs keep dropping without a renewed heartbeat (zero: forever).
    fail_open_after: Duration,
    /// VIPs the sources want that do not fit the kernel map (`--max-vips`), waiting for room.
    unfit: HashMap<Vip, DesiredVip>,
    /// How many of them were last reported (to log changes once).
    unfit_reported: usize,
    /// Capacity of the kernel's VIP map.
    max_vips: u32,
    /// Which hook the datapath is attached with.
    hook: Hook,
    /// Interfaces the program should be on and is not (their attachment died with them),
    /// with whether a failure to attach again was logged.
    detached: BTreeMap<String, bool>,
    /// Interface name patterns to follow.
    patterns: Vec<glob::Pattern>,
    /// Interfaces named with `--iface`.
    named: Vec<String>,
    /// OVN's interfaces to follow (VIFs, uplinks; from the local Open_vSwitch database).
    vifs: InterfaceNames,
    /// The VIFs' logical ports (`iface-id`), by interface name.
    iface_ids: std::collections::BTreeMap<String, String>,
    /// The local logical ports' scopes, from the OVN VIP source.
    port_scopes: Option<tokio::sync::watch::Receiver<Arc<crate::ovn::vips::PortScopes>>>,
    /// The scope written to the kernel for each attached interface that has one.
    iface_scopes: HashMap<u32, u32>,
    /// Followed interfaces that refused the program, by name, with the ifindex
    /// that refused (tried again only if the interface is re-created).
    refused: HashMap<String, u32>,
    /// Since when the agent has not vouched for the map, once it had (to log changes once).
    out_of_sync_since: Option<Instant>,
    /// When the kernel's heartbeat was last renewed (at load, then by the loop).
    heartbeat_renewed: Instant,
    sources: Option<Sources>,
}

/// Where idle hits go: Controller_Event rows, or JSON lines on standard output.
enum HitOutput {
    Rows(ControllerEventWriter),
    Stdout(io::Stdout),
}

impl Agent {
    /// Loads and attaches the datapath, connects to the Southbound database, starts the VIP
    /// source and the HTTP endpoint. Fails on anything the operator must fix first (an
    /// unknown interface, a bad VIPs file, missing privileges).
    pub async fn start(config: Config) -> Result<Self> {
        // Signals first: a SIGTERM from here on stops the agent in order (detaching, or, with
        // --pin-dir, leaving the datapath pinned), never by the default action.
        let signals = Signals::install()?;
        // Fail on a typo before touching the kernel.
        let mut names = Vec::new();
        let mut patterns = Vec::new();
        for selector in &config.interfaces {
            match selector {
                InterfaceSelector::Name(name) => {
                    datapath::ifindex_of(name)?;
                    names.push(name.clone());
                }
                InterfaceSelector::Pattern(pattern) => patterns.push(pattern.clone()),
            }
        }
        // The Southbound connection, shared by the event writer and the OVN VIP source, first:
        // the database composing its first monitor reply (seconds, with 100,000s of load
        // balancers) overlaps with loading the datapath; VIP updates wait in the channel.
        let (vip_tx, vip_updates) = mpsc::unbounded_channel();
        let southbound = match &config.southbound {
            Some(sb) => {
                let with_vips = config.vips == VipSourceConfig::Ovn;
                let southbound = Southbound::connect(sb, with_vips.then(|| vip_tx.clone()))
                    .await
                    .context("connecting to the Southbound database")?;
                info!(
                    chassis = %southbound.chassis_name(),
                    db = ?sb.remotes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    vips_from_ovn = with_vips,
                    "writing Controller_Event rows"
                );
                Some(southbound)
            }
            None => None,
        };
        // Off the runtime's thread, so the Southbound client sets up its monitors meanwhile.
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
            metrics::registry(datapath.counter_reader(), metrics.clone(), writer.clone()),
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
        let mut hold = config.hold;
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
        let last_summary = datapath.counters()?;
        let (lb_names, names_read) = match &writer {
            Some(writer) => LoadBalancerNames::start(writer.southbound().client().clone()),
            None => LoadBalancerNames::without_database(),
        };
        let (forwarding_tx, forwarding_rx) = mpsc::unbounded_channel();
        let mut agent = Self {
            datapath,
            registry: VipRegistry::new(),
            held: HeldPackets::new(hold, metrics.hold.clone()),
            wakeups: Wakeups::new(wakeups::timeout(&hold), metrics.wakeups.clone()),
            forwarding: match config.forwarding.clone() {
                Some(reader) if config.vips == VipSourceConfig::Ovn => Some(
                    reader
                        .start(forwarding_tx)
                        .context("starting the forwarding reader's thread")?,
                ),
                _ => None,
            },
            forwarding_pending: HashSet::new(),
            forwarding_warned: false,
            vip_flags: config.idle_action.vip_flags(),
            output: match writer {
                Some(writer) => HitOutput::Rows(writer),
                None => HitOutput::Stdout(io::stdout()),
            },
            recent: VecDeque::with_capacity(RECENT_EVENTS),
            lb_names,
            pending_hits: Vec::new(),
            iface_names: HashMap::new(),
            readiness,
            metrics,
            reload_vips_file: None,
            last_summary,
            ovn_vips: None,
            fail_open_after: config.fail_open_after,
            unfit: HashMap::new(),
            unfit_reported: 0,
            max_vips: config.max_vips,
            hook: config.hook,
            detached: BTreeMap::new(),
            patterns: Vec::new(),
            named: names.clone(),
            vifs: InterfaceNames::new(),
            iface_ids: Default::default(),
            port_scopes: southbound.as_ref().and_then(Southbound::port_scopes),
            iface_scopes: HashMap::new(),
            refused: HashMap::new(),
            out_of_sync_since: None,
            heartbeat_renewed: Instant::now(),
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
            VipSourceConfig::Ovn => {
                // The source runs in the Southbound client (Southbound::connect above).
                let southbound = southbound
                    .as_ref()
                    .context("VIPs from OVN need the Southbound database")?;
                agent.ovn_vips = Some(southbound.clone());
            }
            VipSourceConfig::None => warn!(
                "no VIPs (--vip, --vips-file or --ovnsb-db): every packet passes, nothing is reported"
            ),
        }

        // What an earlier agent left pinned: this agent's program swapped in, no gap.
        for (iface, ifindex, hook) in agent.datapath.adopt_pinned_links() {
            info!(%iface, ifindex, hook = hook.name(), "adopted the pinned attachment (program replaced atomically)");
            agent.iface_names.insert(ifindex, iface);
        }
        // Named interfaces must take the program now; patterns are followed from here on.
        for iface in &names {
            if agent.iface_names.values().any(|n| n == iface) {
                continue;
            }
            let (ifindex, hook) = agent.datapath.attach(iface, config.hook)?;
            info!(iface, ifindex, hook = hook.name(), "datapath attached");
            agent.iface_names.insert(ifindex, iface.clone());
        }
        agent.patterns = patterns;
        if config.ovn_interfaces.is_none() {
            // Every source of interfaces is known now (OVN's arrive later, and prune then).
            agent.prune_adopted();
        }
        agent.follow_interfaces();
        agent.readiness.attached.store(true, Ordering::Relaxed);
        if config.vips != VipSourceConfig::Ovn {
            // Static VIPs were applied before attaching.
            agent.readiness.vips_synced.store(true, Ordering::Relaxed);
        }
        info!(
            vips = agent.registry.len(),
            idle = agent.registry.idle_count(),
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
            ring: readable(events).context("registering the event ring with epoll")?,
            held: readable(held_ring).context("registering the held-frame ring with epoll")?,
            replay: ReplayTimer::new(),
            forwarding: forwarding_rx,
            vip_updates,
            queries,
            summary: Sources::summary_timer(config.summary_interval),
            heartbeat: tokio::time::interval(heartbeat_period(config.fail_open_after)),
            interfaces: tokio::time::interval(INTERFACES_EVERY),
            links: readable(LinkChanges::subscribe().context("subscribing to link notifications")?)
                .context("registering link notifications with epoll")?,
            vifs,
            port_scopes: agent.port_scopes.clone(),
            names_read,
            rows,
            signals,
        });
        Ok(agent)
    }

    /// Runs until SIGINT or SIGTERM, then detaches and writes what is still queued.
    pub async fn run(mut self) -> Result<()> {
        let mut sources = self.sources.take().context("the agent runs once")?;
        loop {
            match sources.next().await? {
                Input::IdleHits(events) => self.on_idle_hits(&events)?,
                Input::HeldPackets(frames) => self.on_held_packets(frames),
                Input::ReplayDue => self.on_replay_due(),
                Input::ForwardingChecked(waiting, readiness) => {
                    self.on_forwarding_checked(waiting, readiness)
                }
                Input::Vips(update) => self.on_vips(update)?,
                Input::NamesRead(names) => self.on_names_read(names)?,
                Input::Row(row) => self.on_row(row),
                Input::Query(query) => self.on_query(query),
                Input::SummaryDue => self.on_summary_due()?,
                Input::HeartbeatDue => self.on_heartbeat_due()?,
                Input::InterfacesDue => self.on_interfaces_due(),
                Input::Vifs(names) => self.on_vifs(names),
                Input::PortScopes => self.sync_iface_scopes(),
                Input::Reload => self.on_reload(),
                Input::Stop(signal) => {
                    info!("{signal}: detaching");
                    break;
                }
            }
            self.wakeups_follow_hold();
            sources.replay.arm(self.held.next_due_ns().map(|due| {
                tokio::time::Instant::now()
                    + Duration::from_nanos(due.saturating_sub(clock::monotonic_ns()))
            }));
        }
        self.shut_down(sources).await
    }

    /// Kernel events: resolved against the registry, remembered, and sent on. Until the VIP
    /// source has synced (an adopted ring holds hits from before this agent), they wait.
    fn on_idle_hits(&mut self, events: &[IdleHitEvent]) -> Result<()> {
        if !self.readiness.vips_synced.load(Ordering::Relaxed) {
            let room = PENDING_HITS.saturating_sub(self.pending_hits.len());
            self.pending_hits.extend(events.iter().take(room).copied());
            if events.len() > room {
                warn!(
                    lost = events.len() - room,
                    "idle hits before the VIP sync beyond {PENDING_HITS}: not reported"
                );
            }
            return Ok(());
        }
        for event in events {
            let Some(hit) = IdleHit::resolve(
                event,
                &self.registry,
                |i| {
                    self.iface_names
                        .get(&i)
                        .cloned()
                        .unwrap_or_else(|| iface_name(i))
                },
                |i| self.iface_scopes.get(&i).copied(),
            ) else {
                debug!(
                    vip_id = event.vip_id,
                    "idle hit for a VIP that has left the map since: not reported"
                );
                continue;
            };
            debug!(vip = %hit.vip, protocol = %hit.protocol, src = %hit.src, iface = %hit.iface, "idle hit");
            self.metrics.events_received.inc();
            let scope = self.hold_scope(&event.vip, event.ifindex);
            if self
                .wakeups
                .first_packet(event.vip, scope, event.timestamp_ns)
            {
                debug!(
                    "wake-up of {}/{} started: first packet from {} on {} ({})",
                    hit.vip, hit.protocol, hit.src, hit.iface, hit.action
                );
            }
            if let Some(hit) = self.lb_names.name(hit) {
                self.report(hit)?;
            }
        }
        Ok(())
    }

    /// Load balancers' names read: the hits that waited for them are reported.
    fn on_names_read(&mut self, names: NamesRead) -> Result<()> {
        for hit in self.lb_names.learn(names) {
            self.report(hit)?;
        }
        Ok(())
    }

    /// Sends a named hit on (to the writer, or standard output) and remembers it.
    fn report(&mut self, hit: IdleHit) -> Result<()> {
        self.wakeups.named(&hit.key, hit.load_balancer.as_deref());
        match &mut self.output {
            HitOutput::Rows(writer) => writer.submit(&hit),
            HitOutput::Stdout(stdout) => {
                write_json_line(stdout, &hit).context("writing events to standard output")?;
                stdout
                    .flush()
                    .context("writing events to standard output")?;
            }
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(hit);
        Ok(())
    }

    /// A VIP update: applied to the registry and the kernel map.
    fn on_vips(&mut self, update: VipUpdate) -> Result<()> {
        let started = Instant::now();
        let full = matches!(update, VipUpdate::Replace(_));
        // What the source no longer wants need not wait for room any more.
        match &update {
            VipUpdate::Replace(_) => self.unfit.clear(),
            VipUpdate::Changes { remove, .. } => {
                for vip in remove {
                    self.unfit.remove(vip);
                }
            }
        }
        let changes = self.registry.apply(update, self.vip_flags);
        let freed = self.apply_map_changes(&changes)?;
        self.hold_follows(&changes);
        self.wakeups_follow_vips(&changes);
        // VIPs that did not fit are tried again once others have left.
        if freed && !self.unfit.is_empty() {
            let retry = VipUpdate::Changes {
                upsert: self.unfit.drain().map(|(_, d)| d).collect(),
                remove: Vec::new(),
            };
            let changes = self.registry.apply(retry, self.vip_flags);
            self.apply_map_changes(&changes)?;
        }
        let idle = self.registry.idle_count();
        self.metrics.set_vips(
            idle,
            self.registry.len().saturating_sub(idle),
            self.unfit.len(),
        );
        self.readiness
            .vips_unfit
            .store(self.unfit.len() as u64, Ordering::Relaxed);
        let elapsed_us = started.elapsed().as_micros() as u64;
        if full {
            // What an earlier agent left in an adopted map and the source no longer has.
            let stale = self.datapath.retain_vips(|key| {
                Vip::from_key(key).is_some_and(|v| self.registry.contains(&v))
            })?;
            if stale > 0 {
                info!(stale, "VIPs left in the adopted map removed");
            }
            self.readiness.vips_synced.store(true, Ordering::Relaxed);
            let pending = std::mem::take(&mut self.pending_hits);
            if !pending.is_empty() {
                info!(
                    hits = pending.len(),
                    "reporting idle hits seen before the VIP sync"
                );
                self.on_idle_hits(&pending)?;
            }
            trim_heap_soon();
            info!(
                vips = self.registry.len(),
                idle,
                changes = changes.len(),
                elapsed_us,
                "VIP map synced"
            );
        } else {
            debug!(changes = changes.len(), elapsed_us, "VIP map updated");
        }
        if self.unfit.len() != self.unfit_reported {
            if !self.unfit.is_empty() {
                warn!(
                    not_watched = self.unfit.len(),
                    max_vips = self.max_vips,
                    "the VIP map is full: some VIPs are not watched (OVN's own path handles \
                     them); raise --max-vips"
                );
            } else {
                info!("every VIP fits the VIP map again");
            }
            self.unfit_reported = self.unfit.len();
        }
        Ok(())
    }

    /// Writes registry changes to the kernel map. A new VIP that does not fit leaves the
    /// registry and waits in `unfit` (the agent keeps running with what fits). Returns
    /// whether any VIP left the map.
    fn apply_map_changes(&mut self, changes: &[MapChange]) -> Result<bool> {
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        for change in changes {
            match change {
                MapChange::Upsert(key, state) => upserts.push((*key, *state)),
                MapChange::Remove(key) => removes.push(*key),
                MapChange::Scopes { .. } => {}
            }
        }
        let unfit = self.datapath.apply_vips(&upserts, &removes)?;
        for key in &unfit {
            if let Some(vip) = Vip::from_key(key) {
                let scoped = self.registry.scopes(&vip).map(Into::into);
                if let Some(entry) = self.registry.remove(&vip) {
                    self.unfit.insert(
                        vip,
                        DesiredVip {
                            vip,
                            backends: entry.backends,
                            load_balancer: entry.load_balancer,
                            scoped,
                        },
                    );
                }
            }
        }
        for change in changes {
            // A VIP that did not fit has no entry to scope, and leaves the registry with its
            // id: entries written for that id would only stay behind.
            if let MapChange::Scopes {
                key,
                vip_id,
                scopes,
            } = change
                && !unfit.contains(key)
            {
                self.datapath.set_vip_scopes(*vip_id, scopes)?;
            }
        }
        Ok(!removes.is_empty())
    }

    /// A question from the HTTP endpoint. (A gone asker is not an error.)
    fn on_query(&self, query: Query) {
        match query {
            Query::Vips(reply) => {
                let _ = reply.send(self.vip_rows());
            }
            Query::Events(reply) => {
                let _ = reply.send(self.event_rows());
            }
            Query::Wakeups(reply) => {
                let _ = reply.send(self.wakeups.rows());
            }
            Query::Interfaces(reply) => {
                let mut rows: Vec<InterfaceRow> = self
                    .datapath
                    .attached()
                    .map(|(iface, ifindex, hook)| InterfaceRow {
                        iface: iface.to_owned(),
                        ifindex,
                        hook: hook.name().to_owned(),
                        attachment: self.datapath.attachment_kind(iface).unwrap_or_default(),
                        scope: self.iface_scopes.get(&ifindex).copied(),
                    })
                    .collect();
                rows.sort_by(|a, b| a.iface.cmp(&b.iface));
                let _ = reply.send(rows);
            }
        }
    }

    /// The recent idle hits for `unidler events`, each with the wall-clock time and what
    /// became of its wake-up.
    fn event_rows(&self) -> Vec<EventRow> {
        self.recent
            .iter()
            .map(|hit| EventRow {
                time: clock::rfc3339(clock::wall_clock_of(hit.timestamp_ns)),
                vip: hit.vip.clone(),
                protocol: hit.protocol.to_string(),
                src: hit.src.clone(),
                iface: hit.iface.clone(),
                load_balancer: hit.load_balancer.clone(),
                action: hit.action.to_owned(),
                wakeup: self
                    .wakeups
                    .fate_of(&hit.key, hit.timestamp_ns)
                    .map(str::to_owned),
                timestamp_ns: hit.timestamp_ns,
            })
            .collect()
    }

    /// The VIP table for `unidler vips`, sorted by VIP, from the registry alone: the HTTP
    /// task fills in the kernel's hit counts by key.
    fn vip_rows(&self) -> Vec<(VipKey, VipRow)> {
        let mut rows: Vec<(VipKey, VipRow)> = self
            .registry
            .entries()
            .map(|e| {
                let row = VipRow {
                    vip: e.vip.endpoint(),
                    protocol: e.vip.protocol.to_string(),
                    backends: e.backends,
                    state: if e.backends == 0 { "idle" } else { "active" }.into(),
                    hits: 0,
                    held: self.held.held_for(&e.vip.key()),
                    load_balancer: e
                        .load_balancer
                        .as_ref()
                        .and_then(|n| self.lb_names.shown(n)),
                    scopes: self
                        .registry
                        .scopes(&e.vip)
                        .unwrap_or_default()
                        .iter()
                        .map(|s| ScopeRow {
                            scope: s.scope,
                            backends: s.backends,
                            load_balancer: s
                                .load_balancer
                                .as_ref()
                                .and_then(|n| self.lb_names.shown(n)),
                        })
                        .collect(),
                };
                (e.vip.key(), row)
            })
            .collect();
        rows.sort_by(|(_, a), (_, b)| (&a.vip, &a.protocol).cmp(&(&b.vip, &b.protocol)));
        rows
    }

    /// Logs what the kernel counted since the last summary, if anything (an idle node says
    /// nothing).
    fn on_summary_due(&mut self) -> Result<()> {
        let now = self.datapath.counters()?;
        let interval = now.since(&self.last_summary);
        self.last_summary = now;
        // Worth a line: hits on idle VIPs, events lost, failing open, frames not understood
        // (traffic to active VIPs alone is not).
        let notable = interval.idle_hits()
            + interval.get(Counter::RingFull)
            + interval.get(Counter::IdleFailedOpen)
            + interval.parse_failures();
        if notable == 0 {
            return Ok(());
        }
        log_kernel_counters("last interval", &interval);
        if let HitOutput::Rows(writer) = &self.output {
            log_writer_totals(writer);
        }
        Ok(())
    }

    /// Renews the kernel's heartbeat while the VIP map can be vouched for: the VIP source
    /// has synced and, for OVN, is still connected. Otherwise idle VIPs fail open once the
    /// heartbeat is `fail_open_after` old.
    fn on_heartbeat_due(&mut self) -> Result<()> {
        // Now and then, the kernel's counts of held packets are checked against the hold's.
        let now = clock::monotonic_ns();
        self.held.reconcile_kernel(now, &mut self.datapath);
        self.wakeups.finish_due(now, crate::wakeup::Phase::Backend);
        let synced = self.readiness.vips_synced.load(Ordering::Relaxed);
        let connected = self
            .ovn_vips
            .as_ref()
            .is_none_or(|sb| sb.client().is_connected());
        self.metrics
            .vip_source_synced
            .set(i64::from(synced && connected));
        let failing_open = !self.fail_open_after.is_zero()
            && self.heartbeat_renewed.elapsed() > self.fail_open_after;
        if failing_open != (self.metrics.fail_open.get() == 1) {
            self.metrics.fail_open.set(i64::from(failing_open));
            match failing_open {
                true => warn!(
                    fail_open_after = ?self.fail_open_after,
                    "failing open: idle VIPs pass to OVN's own path until the VIP source is back"
                ),
                false => info!("no longer failing open"),
            }
        }
        if synced && connected {
            self.datapath.renew_heartbeat()?;
            self.heartbeat_renewed = Instant::now();
            if let Some(since) = self.out_of_sync_since.take() {
                info!(
                    after = ?since.elapsed(),
                    "VIP source back in sync: idle VIPs drop again"
                );
            }
        } else if synced && self.out_of_sync_since.is_none() {
            self.out_of_sync_since = Some(Instant::now());
            if !self.fail_open_after.is_zero() {
                warn!(
                    fail_open_after = ?self.fail_open_after,
                    "VIP source out of sync: idle VIPs fail open (pass) unless it is back in time"
                );
            }
        }
        Ok(())
    }

    /// An interface attached to that is gone or was re-created under its name (a pod's
    /// veth, say) lost the program with its old ifindex: the program is attached again
    /// wherever that name is now; until then the agent is not ready and says which.
    fn on_interfaces_due(&mut self) {
        for (iface, old, _) in self.datapath.stale_attachments() {
            self.iface_names.remove(&old);
            self.datapath.forget_attachment(&iface);
            if self.is_followed(&iface) {
                // A followed interface that left: nothing is missing (pods come and go).
                debug!(%iface, ifindex = old, "interface gone: detached");
                continue;
            }
            warn!(%iface, ifindex = old, "interface gone or re-created: its XDP program went with it");
            self.detached.insert(iface, false);
        }
        self.follow_interfaces();
        self.sync_iface_scopes();
        if self.detached.is_empty() {
            self.publish_attachments();
            return;
        }
        for (iface, warned) in std::mem::take(&mut self.detached) {
            if datapath::ifindex_of(&iface).is_err() {
                self.detached.insert(iface, warned);
                continue;
            }
            match self.datapath.attach(&iface, self.hook) {
                Ok((ifindex, hook)) => {
                    info!(%iface, ifindex, hook = hook.name(), "XDP program attached again");
                    self.iface_names.insert(ifindex, iface);
                }
                Err(e) => {
                    if !warned {
                        warn!(%iface, "the XDP program could not be attached again: {e}");
                        self.metrics.attach_failures.inc();
                    }
                    self.detached.insert(iface, true);
                }
            }
        }
        *self
            .readiness
            .detached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            self.detached.keys().cloned().collect();
        self.publish_attachments();
    }

    /// Whether `iface` is followed (a pattern or an OVN VIF) rather than named.
    fn is_followed(&self, iface: &str) -> bool {
        self.vifs.contains(iface) || self.patterns.iter().any(|p| p.matches(iface))
    }

    /// OVN's interfaces changed: attach to new ones at once (a pod's first packet may follow its
    /// port by milliseconds), detach from those that left OVS.
    fn on_vifs(&mut self, interfaces: OvnInterfaces) {
        let OvnInterfaces { names, iface_ids } = interfaces;
        let left: Vec<String> = self.vifs.difference(&names).cloned().collect();
        self.vifs = names;
        self.iface_ids = iface_ids;
        for iface in left {
            if self.patterns.iter().any(|p| p.matches(&iface)) {
                continue;
            }
            let attached = self
                .datapath
                .attached()
                .find(|(n, _, _)| *n == iface)
                .map(|(_, ifindex, _)| ifindex);
            if let Some(ifindex) = attached {
                self.iface_names.remove(&ifindex);
                self.datapath.forget_attachment(&iface);
                debug!(%iface, "no longer one of OVN's interfaces: detached");
            }
            self.refused.remove(&iface);
        }
        self.prune_adopted();
        self.follow_interfaces();
        self.sync_iface_scopes();
    }

    /// Gives each attached VIF the scope of its logical port (the tunnel key of its logical
    /// switch), and each uplink its gateway router's, so that scoped VIPs are judged by the
    /// load balancers there; takes it from interfaces that lost it or went.
    fn sync_iface_scopes(&mut self) {
        let Some(port_scopes) = &self.port_scopes else {
            return;
        };
        let port_scopes = port_scopes.borrow().clone();
        let wanted: HashMap<u32, u32> = self
            .datapath
            .attached()
            .filter_map(|(iface, ifindex, _)| {
                let scope = match self.iface_ids.get(iface) {
                    Some(port) => port_scopes.ports.get(port).copied(),
                    // One of OVN's interfaces without a logical port: an uplink, which leads
                    // to the gateway router.
                    None if self.vifs.contains(iface) => port_scopes.gateway,
                    None => None,
                };
                Some((ifindex, scope?))
            })
            .collect();
        let stale: Vec<u32> = self
            .iface_scopes
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            match self.datapath.set_iface_scope(ifindex, None) {
                Ok(()) => {
                    self.iface_scopes.remove(&ifindex);
                }
                Err(e) => warn!(ifindex, "clearing an interface's scope failed: {e}"),
            }
        }
        for (ifindex, scope) in wanted {
            if self.iface_scopes.get(&ifindex) == Some(&scope) {
                continue;
            }
            match self.datapath.set_iface_scope(ifindex, Some(scope)) {
                Ok(()) => {
                    debug!(ifindex, scope, "interface scoped to its logical datapath");
                    self.iface_scopes.insert(ifindex, scope);
                }
                Err(e) => warn!(ifindex, scope, "setting an interface's scope failed: {e}"),
            }
        }
    }

    /// Detaches what an earlier agent left pinned on interfaces this one does not want (not
    /// named, matching no pattern, not one of OVN's interfaces now).
    fn prune_adopted(&mut self) {
        let unwanted: Vec<(String, u32)> = self
            .datapath
            .attached()
            .filter(|(iface, _, _)| {
                !self.named.iter().any(|n| n == iface) && !self.is_followed(iface)
            })
            .map(|(iface, ifindex, _)| (iface.to_owned(), ifindex))
            .collect();
        for (iface, ifindex) in unwanted {
            self.iface_names.remove(&ifindex);
            self.datapath.forget_attachment(&iface);
            info!(%iface, "attachment left by an earlier agent is not wanted here: detached");
        }
    }

    /// Attaches to every followed interface (matching an `--iface` pattern, or one of OVN's
    /// interfaces) that does not have the program yet. An interface that refuses it (a
    /// driver without XDP, someone else's program) is logged and counted once, and tried
    /// again only if it is re-created; the agent goes on.
    fn follow_interfaces(&mut self) {
        if self.patterns.is_empty() && self.vifs.is_empty() {
            self.publish_attachments();
            return;
        }
        let attached: std::collections::HashSet<String> = self
            .datapath
            .attached()
            .map(|(name, _, _)| name.to_owned())
            .collect();
        let present = datapath::interfaces();
        self.refused
            .retain(|name, index| present.iter().any(|(i, n)| n == name && i == index));
        for (ifindex, iface) in present {
            if attached.contains(&iface)
                || self.refused.contains_key(&iface)
                || !self.is_followed(&iface)
            {
                continue;
            }
            match self.datapath.attach(&iface, self.hook) {
                Ok((ifindex, hook)) => {
                    // Pods come and go: one line each at debug; the count is a metric.
                    debug!(%iface, ifindex, hook = hook.name(), "datapath attached to a followed interface (--iface pattern or OVN VIF)");
                    self.iface_names.insert(ifindex, iface);
                }
                Err(e) => {
                    warn!(%iface, "the XDP program could not be attached: {e}");
                    self.metrics.attach_failures.inc();
                    self.refused.insert(iface, ifindex);
                }
            }
        }
        self.publish_attachments();
    }

    /// The attachment gauges.
    fn publish_attachments(&self) {
        let attached = self.datapath.attached().count();
        self.metrics
            .set_attachments(attached, self.detached.len() + self.refused.len());
        self.readiness.interfaces.store(attached, Ordering::Relaxed);
    }

    fn on_reload(&self) {
        match &self.reload_vips_file {
            Some(reload) => {
                info!("SIGHUP: reloading the VIPs file");
                let _ = reload.send(());
            }
            None => info!("SIGHUP: nothing to reload"),
        }
    }

    /// Detaches, reads what the ring still holds, logs the totals, and gives the writer a
    /// moment to write what is queued.
    async fn shut_down(mut self, mut sources: Sources) -> Result<()> {
        if self.datapath.is_pinned() {
            info!(
                "leaving the datapath attached and pinned: the next agent with the same \
                 --pin-dir adopts it (`unidler detach --pin-dir DIR` removes it)"
            );
        }
        self.datapath.detach_all();
        // Hits the kernel reported before it was detached and the loop had not read yet.
        let mut last = Vec::new();
        sources.ring.get_mut().drain(|event| last.push(event));
        self.on_idle_hits(&last)?;
        // Hits waiting for their load balancer's name: a moment for the database to answer,
        // then named by their Southbound row (the consumer reads only the VIP).
        let named_by = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.lb_names.has_waiting() {
            match tokio::time::timeout_at(named_by, sources.names_read.recv()).await {
                Ok(Some(names)) => self.on_names_read(names)?,
                _ => break,
            }
        }
        for hit in self.lb_names.give_up() {
            self.report(hit)?;
        }
        let totals = self.datapath.counters()?;
        log_kernel_counters("totals", &totals);
        if let HitOutput::Rows(writer) = &self.output {
            if !writer.flush(Duration::from_secs(2)).await {
                warn!(
                    waiting = writer.queue_depth(),
                    "exiting with idle hits not yet written"
                );
            }
            log_writer_totals(writer);
        }
        Ok(())
    }
}

/// How often to renew the heartbeat: every second, or three times within a shorter
/// `fail_open_after`.
fn heartbeat_period(fail_open_after: Duration) -> Duration {
    if fail_open_after.is_zero() {
        return HEARTBEAT_EVERY;
    }
    HEARTBEAT_EVERY
        .min(fail_open_after / 3)
        .max(Duration::from_millis(10))
}

fn write_json_line(out: &mut io::Stdout, hit: &IdleHit) -> io::Result<()> {
    let mut out = out.lock();
    serde_json::to_writer(&mut out, hit)?;
    out.write_all(b"\n")
}

/// A full sync parses and builds large transient structures (the monitor reply of every load
/// balancer); gives the freed memory back to the system a second later, once they are gone.
fn trim_heap_soon() {
    #[cfg(target_env = "gnu")]
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // SAFETY: malloc_trim only releases free heap memory; mallinfo2 only reads.
        let heap = unsafe {
            libc::malloc_trim(0);
            libc::mallinfo2()
        };
        debug!(
            in_use = heap.uordblks + heap.hblkhd,
            free = heap.fordblks,
            "heap trimmed after a full VIP sync"
        );
    });
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
fn readable<T: std::os::fd::AsRawFd>(ring: T) -> Result<AsyncFd<T>> {
    // SAFETY: `ring` owns its file descriptor and keeps it open until it is dropped, which
    // happens only when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("{e}"))
}

fn log_writer_totals(writer: &ControllerEventWriter) {
    let s = writer.stats();
    info!(
        received = s.received.load(Ordering::Relaxed),
        written = s.written.load(Ordering::Relaxed),
        deduplicated = s.deduplicated.load(Ordering::Relaxed),
        dropped_overflow = s.dropped_overflow.load(Ordering::Relaxed),
        failed = s.failed.load(Ordering::Relaxed),
        queued = writer.queue_depth(),
        connected = writer.southbound().client().is_connected(),
        "Controller_Event totals"
    );
}

fn log_kernel_counters(what: &str, c: &Counters) {
    info!(
        packets = c.get(Counter::Packets),
        vip_hits = c.get(Counter::VipHits),
        idle_hits = c.idle_hits(),
        events = c.get(Counter::EventsWritten),
        rate_limited = c.get(Counter::RateLimitedVip) + c.get(Counter::RateLimitedGlobal),
        failed_open = c.get(Counter::IdleFailedOpen),
        ring_full = c.get(Counter::RingFull),
        fragments = c.get(Counter::Fragments),
        parse_failures = c.parse_failures(),
        "kernel counters ({what})"
    );
}
