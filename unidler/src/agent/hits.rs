//! The idle hits and where they go: each resolved against the VIP map, named by its load
//! balancer, and sent on (as a Controller_Event row, or a JSON line on standard output); the
//! last ones kept for `unidler events`; those read before the VIP source synced kept until it
//! has; and the periodic summary of what the kernel counted.

use std::{
    collections::VecDeque,
    io::{self, Write as _},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use unidler_common::{Counter, IdleHitEvent};

use super::{interfaces::Interfaces, vip_map::VipMap};
use crate::{
    clock,
    datapath::{Counters, Datapath},
    event::IdleHit,
    ovn::{
        controller_event::{ControllerEventWriter, WriterStats},
        lb_names::{LoadBalancerNames, NamesRead, Naming},
    },
    telemetry::{EventRow, metrics::AgentMetrics},
    vip::LoadBalancerName,
    wakeup::Wakeups,
};

/// Idle hits kept for `unidler events`.
const RECENT_EVENTS: usize = 100;
/// Most idle hits kept while the VIP source has not synced yet (an adopted ring's hits).
const PENDING_HITS: usize = 16_384;

/// Where idle hits go: Controller_Event rows, or JSON lines on standard output.
pub(super) enum HitOutput {
    /// Rows written to the Southbound database.
    Rows(ControllerEventWriter),
    /// JSON lines.
    Stdout(io::Stdout),
}

/// The hits, from the ring to where they go.
pub(super) struct Hits {
    output: HitOutput,
    /// The last idle hits, for `unidler events`.
    recent: VecDeque<IdleHit>,
    /// Load balancers' names as events give them, read from the database when first needed.
    lb_names: LoadBalancerNames,
    /// Idle hits read before the VIP source synced, reported once it has.
    pending: Vec<IdleHitEvent>,
    /// Kernel counters at the last summary.
    last_summary: Counters,
    metrics: AgentMetrics,
}

impl Hits {
    /// Hits go to `output`; `counters` are the kernel's now (the first summary counts from
    /// them).
    pub(super) fn new(
        output: HitOutput,
        lb_names: LoadBalancerNames,
        counters: Counters,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            output,
            recent: VecDeque::with_capacity(RECENT_EVENTS),
            lb_names,
            pending: Vec::new(),
            last_summary: counters,
            metrics,
        }
    }

    /// The writer, if hits become rows.
    pub(super) fn writer(&self) -> Option<&ControllerEventWriter> {
        match &self.output {
            HitOutput::Rows(writer) => Some(writer),
            HitOutput::Stdout(_) => None,
        }
    }

    /// Kernel events: resolved against the VIP map, remembered, and sent on; each one starts
    /// or joins its VIP's wake-up. Until the VIP source has synced (an adopted ring holds hits
    /// from before this agent), they wait.
    pub(super) fn on_idle_hits(
        &mut self,
        events: &[IdleHitEvent],
        vips: &VipMap,
        interfaces: &Interfaces,
        wakeups: &mut Wakeups,
    ) -> Result<()> {
        if !vips.is_synced() {
            let room = PENDING_HITS.saturating_sub(self.pending.len());
            self.pending.extend(events.iter().take(room).copied());
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
                vips.registry(),
                |i| interfaces.name_of(i),
                |i| interfaces.scope_of(i),
            ) else {
                debug!(
                    vip_id = event.vip_id,
                    "idle hit for a VIP that has left the map since: not reported"
                );
                continue;
            };
            debug!(vip = %hit.vip, protocol = %hit.protocol, src = %hit.src, iface = %hit.iface, "idle hit");
            self.metrics.events_received.inc();
            let scope = vips.scope_for(&event.vip, interfaces.scope_of(event.ifindex));
            if wakeups.first_packet(event.vip, scope, event.timestamp_ns) {
                debug!(
                    "wake-up of {}/{} started: first packet from {} on {} ({})",
                    hit.vip, hit.protocol, hit.src, hit.iface, hit.action
                );
            }
            match self.lb_names.name(hit) {
                Naming::Named(hit) => self.report(hit, wakeups)?,
                Naming::Waits => {}
                Naming::Duplicate => self.count_unsubmitted(|s| &s.deduplicated),
                Naming::Dropped => self.count_unsubmitted(|s| &s.dropped_overflow),
            }
        }
        self.metrics
            .hits_waiting_for_names
            .set(self.lb_names.waiting() as i64);
        Ok(())
    }

    /// Counts a hit that never reached the writer (a duplicate of one waiting for its load
    /// balancer's name, or one beyond those that may wait) in the writer's `stat`.
    fn count_unsubmitted(&self, stat: impl Fn(&WriterStats) -> &AtomicU64) {
        if let Some(writer) = self.writer() {
            stat(writer.stats()).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The VIP source synced: the hits that waited for it.
    pub(super) fn take_pending(&mut self) -> Vec<IdleHitEvent> {
        std::mem::take(&mut self.pending)
    }

    /// Load balancers' names read: the hits that waited for them are reported.
    pub(super) fn on_names_read(&mut self, names: NamesRead, wakeups: &mut Wakeups) -> Result<()> {
        for hit in self.lb_names.learn(names) {
            self.report(hit, wakeups)?;
        }
        self.metrics
            .hits_waiting_for_names
            .set(self.lb_names.waiting() as i64);
        Ok(())
    }

    /// A load balancer's name as `unidler vips` shows it, if known.
    pub(super) fn shown(&self, name: &LoadBalancerName) -> Option<String> {
        self.lb_names.shown(name)
    }

    /// The recent idle hits for `unidler events`, each with the wall-clock time and what
    /// became of its wake-up.
    pub(super) fn rows(&self, wakeups: &Wakeups) -> Vec<EventRow> {
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
                wakeup: wakeups
                    .fate_of(&hit.key, hit.timestamp_ns)
                    .map(str::to_owned),
                timestamp_ns: hit.timestamp_ns,
            })
            .collect()
    }

    /// Logs what the kernel counted since the last summary, if anything (an idle node says
    /// nothing).
    pub(super) fn on_summary_due(&mut self, datapath: &Datapath) -> Result<()> {
        let now = datapath.counters()?;
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
        if let Some(writer) = self.writer() {
            log_writer_totals(writer);
        }
        Ok(())
    }

    /// At the agent's stop, after the last hits were read: gives the database a moment to
    /// name the hits waiting for their load balancer's name, reports them (named by their
    /// Southbound row otherwise: the consumer reads only the VIP), logs the totals, and gives
    /// the writer a moment to write what is queued.
    pub(super) async fn finish(
        &mut self,
        names_read: &mut mpsc::UnboundedReceiver<NamesRead>,
        datapath: &Datapath,
        wakeups: &mut Wakeups,
    ) -> Result<()> {
        let named_by = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.lb_names.has_waiting() {
            match tokio::time::timeout_at(named_by, names_read.recv()).await {
                Ok(Some(names)) => self.on_names_read(names, wakeups)?,
                _ => break,
            }
        }
        for hit in self.lb_names.give_up() {
            self.report(hit, wakeups)?;
        }
        self.metrics.hits_waiting_for_names.set(0);
        log_kernel_counters("totals", &datapath.counters()?);
        if let Some(writer) = self.writer() {
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

    /// Sends a named hit on (to the writer, or standard output) and remembers it.
    fn report(&mut self, hit: IdleHit, wakeups: &mut Wakeups) -> Result<()> {
        wakeups.named(&hit.key, hit.load_balancer.as_deref());
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
}

fn write_json_line(out: &mut io::Stdout, hit: &IdleHit) -> io::Result<()> {
    let mut out = out.lock();
    serde_json::to_writer(&mut out, hit)?;
    out.write_all(b"\n")
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
