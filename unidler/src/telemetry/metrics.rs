//! The Prometheus metrics, registered once at start. What the agent's loop counts lives in
//! [`AgentMetrics`]; the kernel's counters, the writer's and the database connection's are read
//! at each scrape by collectors, so nothing is copied between scrapes.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use unidler_common::Counter as KernelCounter;

use crate::{
    datapath::{CounterReader, Counters},
    ovn::controller_event::ControllerEventWriter,
};

/// What the agent's loop counts and sets; cheap to clone (the values are shared).
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// VIPs by state: in the kernel map `idle` or `active`, or `not_watched` (no room).
    pub vips: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Idle hits the agent received from the ring buffer.
    pub events_received: Counter,
    /// Idle hits waiting for their load balancer's name from the database.
    pub hits_waiting_for_names: Gauge,
    /// Interfaces by state: `attached`, or `failed` (should have the program and do not).
    pub attachments: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Attempts to attach the program that failed.
    pub attach_failures: Counter,
    /// Held packets: how many now, what became of them, how long they waited.
    pub hold: crate::hold::HoldMetrics,
    /// Wake-ups: their phases and outcomes.
    pub wakeups: crate::wakeup::WakeupMetrics,
    /// 1 while idle VIPs fail open: the heartbeat is older than `--fail-open-after`.
    pub fail_open: Gauge,
    /// 1 while the VIP source is synced (and, for OVN, connected).
    pub vip_source_synced: Gauge,
}

impl AgentMetrics {
    /// Sets the attachment gauges.
    pub fn set_attachments(&self, attached: usize, failed: usize) {
        for (state, n) in [("attached", attached), ("failed", failed)] {
            self.attachments
                .get_or_create(&[("state", state)])
                .set(n as i64);
        }
    }

    /// Sets the VIP gauges.
    pub fn set_vips(&self, idle: usize, active: usize, not_watched: usize) {
        for (state, n) in [
            ("idle", idle),
            ("active", active),
            ("not_watched", not_watched),
        ] {
            self.vips.get_or_create(&[("state", state)]).set(n as i64);
        }
    }
}

/// Builds the registry: every metric of the agent, registered once.
pub fn registry(
    kernel: CounterReader,
    agent: AgentMetrics,
    writer: Option<ControllerEventWriter>,
    ovn_load_balancers: Option<Arc<AtomicUsize>>,
) -> Registry {
    let mut registry = Registry::default();
    // Every labelled series from the start, at zero.
    agent.set_attachments(0, 0);
    agent.set_vips(0, 0, 0);
    registry.register(
        "unidler_build_info",
        "The agent's version, as a label; always 1",
        build_info(),
    );
    registry.register_collector(Box::new(ProcessCollector));
    registry.register(
        "unidler_fail_open",
        "1 while idle VIPs fail open (pass to OVN's own path): the agent has not vouched for \
         its VIP map for longer than --fail-open-after",
        agent.fail_open.clone(),
    );
    registry.register(
        "unidler_events_waiting_for_names",
        "Idle hits waiting for their load balancer's name (read from the Southbound database \
         at the first hit of each), at most --event-queue-size",
        agent.hits_waiting_for_names.clone(),
    );
    registry.register(
        "unidler_vip_source_synced",
        "1 while the VIP source is synced (and, for OVN, connected)",
        agent.vip_source_synced.clone(),
    );
    registry.register_collector(Box::new(KernelCollector(kernel)));
    registry.register(
        "unidler_attachments",
        "Interfaces the program should be on, by state: attached, or failed",
        agent.attachments.clone(),
    );
    registry.register(
        "unidler_attach_failures",
        "Attempts to attach the program to an interface that failed",
        agent.attach_failures.clone(),
    );
    registry.register(
        "unidler_held_packets",
        "Opening packets to idle VIPs held now, to replay once the VIP has a backend",
        agent.hold.held_now.clone(),
    );
    registry.register(
        "unidler_hold_packets",
        "Opening packets the kernel handed to the agent, by what became of them: held, \
         replayed (each replay), answered (a replayed SYN the client acknowledged), abandoned \
         (never answered), expired, discarded (VIP deleted), replay_failed (its interface \
         gone); rarely, refused by the agent after the kernel's own limits let them through: \
         retransmission, over_limit_vip, over_limit_total, not_understood",
        agent.hold.packets.clone(),
    );
    registry.register(
        "unidler_hold_wait_seconds",
        "Time from the first packet held for a VIP to its first replay",
        agent.hold.wait_seconds.clone(),
    );
    registry.register(
        "unidler_wakeup_phase_seconds",
        "Time from a wake-up's first packet to each of its phases: committed (our \
         Controller_Event row), consumed (the row deleted by the CMS), backend (in the VIP's \
         source), forwarding (the node's flows carry it), replayed (the first held packet), \
         finished",
        agent.wakeups.phase_seconds.clone(),
    );
    registry.register(
        "unidler_wakeups",
        "Wake-ups finished, by outcome: connected (a replayed SYN answered), delivered (a \
         held datagram or INIT replayed), abandoned (replays unanswered, or the VIP deleted), \
         expired (no backend in time), not_held (nothing held; the VIP got its backend)",
        agent.wakeups.finished.clone(),
    );
    registry.register(
        "unidler_wakeup_connect_after_backend_seconds",
        "Time from a VIP's backend appearing to its replayed SYN answered (connected wake-ups)",
        agent.wakeups.connect_after_backend_seconds.clone(),
    );
    registry.register(
        "unidler_vips",
        "VIPs in the kernel map, by state",
        agent.vips.clone(),
    );
    if let Some(writer) = &writer {
        registry.register(
            "unidler_ovsdb_transaction_duration_seconds",
            "Time for Controller_Event transactions to commit",
            writer.stats().transaction_seconds.clone(),
        );
        registry.register(
            "unidler_event_latency_seconds",
            "Time from the kernel seeing the packet to its Controller_Event row committed",
            writer.stats().event_latency_seconds.clone(),
        );
    }
    registry.register_collector(Box::new(EventCollector {
        agent,
        writer,
        ovn_load_balancers,
    }));
    registry
}

/// Where one kernel counter goes in `/metrics`.
struct Exported {
    metric: &'static str,
    help: &'static str,
    label: Option<(&'static str, &'static str)>,
}

/// How each kernel counter is exported. `None`: not on its own (`packets` is split by
/// verdict, and the idle outcomes make `idle_hits`; see [`KernelCollector`]).
fn exported(counter: KernelCounter) -> Option<Exported> {
    use KernelCounter as C;
    let plain = |metric, help| Exported {
        metric,
        help,
        label: None,
    };
    let labeled = |metric, help, label| Exported {
        metric,
        help,
        label: Some(label),
    };
    let rate_limited = "Events the kernel suppressed, by rate limit";
    let not_held = |reason| {
        labeled(
            "unidler_kernel_not_held",
            "Dropped opening packets the kernel did not hand to the agent, by reason",
            ("reason", reason),
        )
    };
    Some(match counter {
        C::Packets | C::IdleDropped | C::IdlePassed => return None,
        C::IdleFailedOpen => plain(
            "unidler_kernel_idle_failed_open",
            "Opening packets to idle VIPs passed because the agent's heartbeat had expired",
        ),
        C::VipHits => plain(
            "unidler_kernel_vip_hits",
            "Connection-opening packets to a VIP",
        ),
        C::EventsWritten => plain(
            "unidler_kernel_events_written",
            "Events the kernel wrote to the ring buffer",
        ),
        C::RateLimitedVip => labeled(
            "unidler_kernel_events_rate_limited",
            rate_limited,
            ("limit", "vip"),
        ),
        C::RateLimitedGlobal => labeled(
            "unidler_kernel_events_rate_limited",
            rate_limited,
            ("limit", "global"),
        ),
        C::RingFull => plain(
            "unidler_kernel_ring_full",
            "Events lost because the ring buffer was full",
        ),
        C::Held => plain(
            "unidler_kernel_held",
            "Dropped opening packets the kernel handed to the agent to hold",
        ),
        C::HoldTooLarge => not_held("too_large"),
        C::HoldRingFull => not_held("ring_full"),
        C::HoldRetransmission => not_held("retransmission"),
        C::HoldOverLimitVip => not_held("over_limit_vip"),
        C::HoldOverLimitTotal => not_held("over_limit_total"),
        C::ReplayedToIdle => plain(
            "unidler_kernel_replayed_to_idle",
            "Replayed packets that found their VIP idle again (let through, not held again)",
        ),
        C::ReplaysAnswered => plain(
            "unidler_kernel_replays_answered",
            "Replayed TCP SYNs whose client answered (its ACK seen)",
        ),
        C::Fragments => plain(
            "unidler_kernel_fragments",
            "Non-first IP fragments passed unmatched",
        ),
        parse_failure => labeled(
            "unidler_kernel_parse_failures",
            "Frames passed because they could not be parsed, by reason",
            ("reason", parse_failure.name()),
        ),
    })
}

/// The kernel's per-CPU counters, summed at each scrape.
struct KernelCollector(CounterReader);

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // An unreadable map leaves the kernel's metrics out of this scrape.
        let Ok(kernel) = self.0.read() else {
            return Ok(());
        };
        let [passed, dropped] = packets_by_verdict(&kernel);
        encode_counters(
            &mut encoder,
            "unidler_kernel_packets",
            "Packets the XDP program ran on, by verdict",
            &[
                (Some(("verdict", "pass")), passed),
                (Some(("verdict", "drop")), dropped),
            ],
        )?;
        encode_counters(
            &mut encoder,
            "unidler_kernel_idle_hits",
            "Connection-opening packets to a VIP with no backends",
            &[(None, kernel.idle_hits())],
        )?;
        // Counters exported under one metric name are adjacent in the counter list.
        let mut exported_counters = KernelCounter::ALL
            .iter()
            .filter_map(|&c| exported(c).map(|e| (e, kernel.get(c))))
            .peekable();
        while let Some((first, value)) = exported_counters.next() {
            let mut values = vec![(first.label, value)];
            while let Some((next, value)) =
                exported_counters.next_if(|(e, _)| e.metric == first.metric)
            {
                values.push((next.label, value));
            }
            encode_counters(&mut encoder, first.metric, first.help, &values)?;
        }
        Ok(())
    }
}

/// Packets passed and dropped. The per-CPU slots are read one after another while packets
/// keep arriving, so a drop can be counted after its packet was: the difference saturates
/// (a counter must never go backwards, let alone wrap to 2^64).
fn packets_by_verdict(kernel: &Counters) -> [u64; 2] {
    let dropped = kernel.get(KernelCounter::IdleDropped);
    [
        kernel.get(KernelCounter::Packets).saturating_sub(dropped),
        dropped,
    ]
}

/// Idle hits through the agent and the writer, and the database connection.
#[derive(Debug)]
struct EventCollector {
    agent: AgentMetrics,
    writer: Option<ControllerEventWriter>,
    /// How many load balancers the OVN VIP source follows, if it runs.
    ovn_load_balancers: Option<Arc<AtomicUsize>>,
}

impl Collector for EventCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut stages = vec![(
            Some(("stage", "received")),
            self.agent.events_received.get(),
        )];
        let Some(writer) = &self.writer else {
            return encode_counters(
                &mut encoder,
                "unidler_events",
                "Idle hits in the agent, by stage",
                &stages,
            );
        };
        let s = writer.stats();
        stages.extend([
            (Some(("stage", "deduplicated")), load(&s.deduplicated)),
            (Some(("stage", "written")), load(&s.written)),
            (
                Some(("stage", "dropped_overflow")),
                load(&s.dropped_overflow),
            ),
            (Some(("stage", "failed")), load(&s.failed)),
        ]);
        encode_counters(
            &mut encoder,
            "unidler_events",
            "Idle hits in the agent, by stage",
            &stages,
        )?;
        encode_gauge(
            &mut encoder,
            "unidler_ovn_load_balancers",
            "Southbound load balancers the agent follows (every one; 0 with VIPs not from OVN)",
            self.ovn_load_balancers
                .as_ref()
                .map_or(0, |n| n.load(Ordering::Relaxed)) as i64,
        )?;
        let db = writer.southbound().client();
        encode_gauge(
            &mut encoder,
            "unidler_event_queue_depth",
            "Idle hits waiting for the database",
            writer.queue_depth() as i64,
        )?;
        encode_gauge(
            &mut encoder,
            "unidler_ovsdb_connected",
            "1 while connected to the Southbound database (the leader, if clustered)",
            i64::from(db.is_connected()),
        )?;
        encode_counters(
            &mut encoder,
            "unidler_ovsdb_reconnects",
            "Southbound sessions that ended",
            &[(None, load(&db.stats().disconnects))],
        )?;
        encode_counters(
            &mut encoder,
            "unidler_ovsdb_connect_failures",
            "Attempts to connect to the Southbound database that failed (refused, unreachable, \
             TLS)",
            &[(None, load(&db.stats().connect_failures))],
        )?;
        encode_counters(
            &mut encoder,
            "unidler_ovsdb_leader_changes",
            "Times the Southbound cluster leader was lost or a follower refused",
            &[(None, load(&db.stats().leader_changes))],
        )
    }
}

/// `unidler_build_info{version}`, 1.
fn build_info() -> Family<[(&'static str, &'static str); 1], Gauge> {
    let info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    info
}

/// The process's CPU time, memory, file descriptors and start time, read from `/proc` at each
/// scrape (the names every Prometheus client library uses).
#[derive(Debug)]
struct ProcessCollector;

/// What [`ProcessCollector`] reads.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: u64,
}

impl ProcessStats {
    /// Parses `/proc/self/stat`; `ticks` per second, `page` bytes, `boot_time` the system's
    /// boot in seconds since the epoch.
    fn parse(stat: &str, ticks: u64, page: u64, boot_time: u64) -> Option<Self> {
        // Fields after the command, which is in parentheses and may hold anything.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks as f64,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            start_time_seconds: boot_time + field(22)? / ticks,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        Self::parse(&stat, ticks as u64, page as u64, boot_time)
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if let Some(stats) = ProcessStats::read() {
            ConstCounter::new(stats.cpu_seconds).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?)?;
            encode_gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_bytes as i64,
            )?;
            encode_gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_bytes as i64,
            )?;
            encode_gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                stats.start_time_seconds as i64,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            encode_gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as i64,
            )?;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            encode_gauge(
                &mut encoder,
                "process_max_fds",
                "Most open file descriptors allowed",
                limit.rlim_cur as i64,
            )?;
        }
        Ok(())
    }
}

/// One counter metric: a single value (no label) or a family with one label per value.
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Option<(&str, &str)>, u64)],
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(None, value)] = values {
        return ConstCounter::new(*value).encode(metric);
    }
    for (label, value) in values {
        if let Some(label) = label {
            ConstCounter::new(*value).encode(metric.encode_family(&[*label])?)?;
        }
    }
    Ok(())
}

/// One gauge without labels.
fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_past_any_command_name() {
        let stat = "4242 (un) idler) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 3 0 \
                    1000 52428800 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0";
        assert_eq!(
            ProcessStats::parse(stat, 100, 4096, 1_700_000_000),
            Some(ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 3000 * 4096,
                virtual_bytes: 52_428_800,
                start_time_seconds: 1_700_000_010,
            })
        );
        assert!(ProcessStats::read().is_some_and(|s| s.resident_bytes > 0));
    }

    #[test]
    fn passed_packets_never_go_below_zero() {
        // Read while a flood runs: the drop counter read later than the packet counter.
        let mut kernel = Counters::default();
        kernel.0[KernelCounter::Packets as usize] = 1_000;
        kernel.0[KernelCounter::IdleDropped as usize] = 1_003;
        assert_eq!(packets_by_verdict(&kernel), [0, 1_003]);
        kernel.0[KernelCounter::Packets as usize] = 5_000;
        assert_eq!(packets_by_verdict(&kernel), [3_997, 1_003]);
    }
}
