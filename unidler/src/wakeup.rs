//! Wake-ups: one per idle VIP that someone tried to reach, followed phase by phase from its
//! first packet until its held packets are gone (or it expires), then logged, counted and
//! kept for `unidler wakeups`.
//!
//! Each phase is timed from the first packet (the kernel's timestamp) and reached at most
//! once:
//! - `committed`: our Controller_Event row committed;
//! - `consumed`: that row deleted by someone else (the CMS acted on it);
//! - `backend`: the VIP has a backend in its source;
//! - `forwarding`: the node's forwarding carries the backend (on OVN, the load-balancing
//!   flows);
//! - `replayed`: the first held packet replayed;
//! - `finished`: the wake-up's end, with its [`Outcome`].
//!
//! The agent feeds it from its handlers; it keeps no clock of its own.

use std::{collections::VecDeque, fmt, time::Duration};

use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};
use serde::{Deserialize, Serialize};
use tracing::info;
use unidler_common::VipKey;

use crate::{
    fast_hash::FastMap,
    hold::{HoldKey, PacketNews},
    vip::{Protocol, Vip},
};

/// Finished wake-ups kept for `unidler wakeups`.
pub const RECENT_WAKEUPS: usize = 100;

/// A phase of a wake-up, in the order they are normally reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Our Controller_Event row committed.
    Committed,
    /// Our row deleted by the CMS.
    Consumed,
    /// A backend in the VIP's source.
    Backend,
    /// The node's forwarding carries the backend.
    Forwarding,
    /// The first held packet replayed.
    Replayed,
    /// The end.
    Finished,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 6] = [
        Phase::Committed,
        Phase::Consumed,
        Phase::Backend,
        Phase::Forwarding,
        Phase::Replayed,
        Phase::Finished,
    ];

    /// Its name in metrics and the API.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Committed => "committed",
            Phase::Consumed => "consumed",
            Phase::Backend => "backend",
            Phase::Forwarding => "forwarding",
            Phase::Replayed => "replayed",
            Phase::Finished => "finished",
        }
    }
}

/// How a wake-up ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A replayed TCP SYN was answered: the client connected.
    Connected,
    /// A held UDP datagram or SCTP INIT was replayed, once.
    Delivered,
    /// Packets were replayed and never answered, or could not be replayed, or the VIP was
    /// deleted.
    Abandoned,
    /// The VIP had no backend in time: its held packets aged out (or, with none held,
    /// the wake-up did).
    Expired,
    /// Nothing was held (holding off, or every packet refused): the VIP got its backend and
    /// the client's own retransmission is on its way.
    NotHeld,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 5] = [
        Outcome::Connected,
        Outcome::Delivered,
        Outcome::Abandoned,
        Outcome::Expired,
        Outcome::NotHeld,
    ];

    /// Its name in metrics and the API.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::Delivered => "delivered",
            Outcome::Abandoned => "abandoned",
            Outcome::Expired => "expired",
            Outcome::NotHeld => "not_held",
        }
    }

    /// The outcome of a packet that left the hold, by the hold's name for it.
    fn of_packet(left: &str) -> Self {
        match left {
            "answered" => Outcome::Connected,
            "delivered" => Outcome::Delivered,
            "expired" => Outcome::Expired,
            _ => Outcome::Abandoned,
        }
    }
}

/// What the wake-ups export (cheap to clone: the values are shared).
#[derive(Clone, Debug)]
pub struct WakeupMetrics {
    /// Seconds from the first packet to each phase.
    pub phase_seconds: Family<[(&'static str, &'static str); 1], Histogram>,
    /// Finished wake-ups by outcome.
    pub finished: Family<[(&'static str, &'static str); 1], Counter>,
    /// Seconds from the backend to the answer, of connected wake-ups.
    pub connect_after_backend_seconds: Histogram,
}

impl Default for WakeupMetrics {
    fn default() -> Self {
        let metrics = Self {
            phase_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0,
                ])
            }),
            finished: Family::default(),
            connect_after_backend_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        };
        // Every series from the start, at zero.
        for phase in Phase::ALL {
            let _ = metrics
                .phase_seconds
                .get_or_create(&[("phase", phase.name())]);
        }
        for outcome in Outcome::ALL {
            let _ = metrics
                .finished
                .get_or_create(&[("outcome", outcome.name())]);
        }
        metrics
    }
}

/// One wake-up, as `/api/wakeups` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WakeupRow {
    /// The VIP in OVN's spelling.
    pub vip: String,
    /// tcp, udp or sctp.
    pub protocol: String,
    /// The load balancer its row names, if known.
    pub load_balancer: Option<String>,
    /// When its first packet arrived, wall-clock (RFC 3339).
    pub started: String,
    /// How it ended; None while it goes on.
    pub outcome: Option<String>,
    /// Packets held.
    pub held: u32,
    /// Replays.
    pub replayed: u32,
    /// Seconds from the first packet to each phase reached, in order.
    pub phases: Vec<(String, f64)>,
}

/// A wake-up going on.
#[derive(Clone, Debug)]
struct Wakeup {
    vip: VipKey,
    /// Where its first packet came in (for a scoped VIP, the interface's scope; else 0): the
    /// backend that counts is the VIP's there.
    scope: u32,
    load_balancer: Option<String>,
    first_packet_ns: u64,
    phases: Vec<(Phase, u64)>,
    held: u32,
    /// Held packets that have not left the hold.
    in_hold: u32,
    replayed: u32,
    /// The best outcome of a packet that left the hold.
    best: Option<Outcome>,
}

impl Wakeup {
    fn reached(&self, phase: Phase) -> bool {
        self.phases.iter().any(|(p, _)| *p == phase)
    }

    fn row(&self, outcome: Option<Outcome>, wall_clock: impl Fn(u64) -> String) -> WakeupRow {
        let vip = Vip::from_key(&self.vip);
        WakeupRow {
            vip: vip.map(|v| v.endpoint()).unwrap_or_default(),
            protocol: vip.map(|v| v.protocol.to_string()).unwrap_or_default(),
            load_balancer: self.load_balancer.clone(),
            started: wall_clock(self.first_packet_ns),
            outcome: outcome.map(|o| o.name().to_owned()),
            held: self.held,
            replayed: self.replayed,
            phases: self
                .phases
                .iter()
                .map(|(p, at)| (p.name().to_owned(), seconds(*at - self.first_packet_ns)))
                .collect(),
        }
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A finished wake-up, as shown, and what [`Wakeups::fate_of`] looks up.
#[derive(Debug)]
struct Ended {
    row: WakeupRow,
    vip: VipKey,
    outcome: Outcome,
    /// When its first packet was seen and when it ended (monotonic ns).
    started_ns: u64,
    ended_ns: u64,
}

/// Every wake-up going on, and the last ones finished.
#[derive(Debug)]
pub struct Wakeups {
    open: FastMap<VipKey, Wakeup>,
    /// Open wake-ups by the spelling of their rows (`vip`, `protocol`).
    by_row: FastMap<(String, Protocol), VipKey>,
    /// Finished wake-ups, oldest first.
    recent: VecDeque<Ended>,
    /// How long a wake-up may go on.
    timeout: Duration,
    metrics: WakeupMetrics,
}

/// The log line of a finished wake-up.
struct Finished<'a>(&'a WakeupRow);

impl fmt::Display for Finished<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = self.0;
        write!(
            f,
            "wake-up of {}/{}{} {}:",
            row.vip,
            row.protocol,
            row.load_balancer
                .as_ref()
                .map(|lb| format!(" ({lb})"))
                .unwrap_or_default(),
            row.outcome.as_deref().unwrap_or("going on"),
        )?;
        for (i, (phase, at)) in row.phases.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{phase} {}", Millis(*at))?;
        }
        write!(f, "; held {}, replayed {}", row.held, row.replayed)
    }
}

/// Seconds shown as milliseconds below 10 s.
struct Millis(f64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 10.0 {
            write!(f, "{:.0} ms", self.0 * 1e3)
        } else {
            write!(f, "{:.1} s", self.0)
        }
    }
}

impl Wakeups {
    /// No wake-ups; one that goes on longer than `timeout` ends as expired.
    pub fn new(timeout: Duration, metrics: WakeupMetrics) -> Self {
        Self {
            open: FastMap::default(),
            by_row: FastMap::default(),
            recent: VecDeque::with_capacity(RECENT_WAKEUPS),
            timeout,
            metrics,
        }
    }

    /// Wake-ups going on.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// A packet to idle `vip` seen by the kernel at `at_ns` on `scope` (0: node-wide): starts
    /// its wake-up, unless one goes on (an earlier timestamp moves its start). Returns whether
    /// it started one.
    pub fn first_packet(&mut self, vip: VipKey, scope: u32, at_ns: u64) -> bool {
        match self.open.entry(vip) {
            std::collections::hash_map::Entry::Occupied(mut open) => {
                let wakeup = open.get_mut();
                if at_ns < wakeup.first_packet_ns && wakeup.phases.is_empty() {
                    wakeup.first_packet_ns = at_ns;
                }
                false
            }
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(Wakeup {
                    vip,
                    scope,
                    load_balancer: None,
                    first_packet_ns: at_ns,
                    phases: Vec::new(),
                    held: 0,
                    in_hold: 0,
                    replayed: 0,
                    best: None,
                });
                if let Some(v) = Vip::from_key(&vip) {
                    self.by_row.insert((v.endpoint(), v.protocol), vip);
                }
                true
            }
        }
    }

    /// The load balancer named by the row of `vip`'s wake-up, once known.
    pub fn named(&mut self, vip: &VipKey, load_balancer: Option<&str>) {
        if let Some(wakeup) = self.open.get_mut(vip)
            && wakeup.load_balancer.is_none()
        {
            wakeup.load_balancer = load_balancer.map(str::to_owned);
        }
    }

    /// `vip`'s wake-up reached `phase` at `at_ns` (only the first time counts).
    pub fn reached(&mut self, vip: &VipKey, phase: Phase, at_ns: u64) {
        let Some(wakeup) = self.open.get_mut(vip) else {
            return;
        };
        if wakeup.reached(phase) {
            return;
        }
        let at_ns = at_ns.max(wakeup.first_packet_ns);
        wakeup.phases.push((phase, at_ns));
        self.metrics
            .phase_seconds
            .get_or_create(&[("phase", phase.name())])
            .observe(seconds(at_ns - wakeup.first_packet_ns));
        // Its held packets expired before the backend came: it ends now, with all its phases.
        if phase == Phase::Backend && wakeup.held > 0 && wakeup.in_hold == 0 {
            let outcome = wakeup.best.unwrap_or(Outcome::Expired);
            self.finish(vip, outcome, at_ns);
        }
    }

    /// The scope of `vip`'s wake-up, if one goes on.
    pub fn scope_of(&self, vip: &VipKey) -> Option<u32> {
        self.open.get(vip).map(|w| w.scope)
    }

    /// The wake-up whose row reads `vip` and `protocol` reached `phase`.
    pub fn row_reached(&mut self, vip: &str, protocol: &str, phase: Phase, at_ns: u64) {
        let Ok(protocol) = protocol.parse::<Protocol>() else {
            return;
        };
        if let Some(key) = self.by_row.get(&(vip.to_owned(), protocol)).copied() {
            self.reached(&key, phase, at_ns);
        }
    }

    /// Whether `vip` has a wake-up going on.
    pub fn is_open(&self, vip: &VipKey) -> bool {
        self.open.contains_key(vip)
    }

    /// The VIPs with a wake-up going on that have not reached `phase`.
    pub fn short_of(&self, phase: Phase) -> Vec<VipKey> {
        self.open
            .values()
            .filter(|w| !w.reached(phase))
            .map(|w| w.vip)
            .collect()
    }

    /// What befell held packets (from the hold, in order), at `now_ns`.
    pub fn follow_hold(&mut self, news: &[(HoldKey, PacketNews)], now_ns: u64) {
        for (key, what) in news {
            let vip = &key.vip;
            match what {
                PacketNews::Held => {
                    // A packet held for a VIP without a wake-up starts one (its idle hit was
                    // rate-limited, or is still in its ring).
                    self.first_packet(*vip, key.scope, now_ns);
                    if let Some(wakeup) = self.open.get_mut(vip) {
                        wakeup.held += 1;
                        wakeup.in_hold += 1;
                    }
                }
                PacketNews::Replayed => {
                    self.reached(vip, Phase::Replayed, now_ns);
                    if let Some(wakeup) = self.open.get_mut(vip) {
                        wakeup.replayed += 1;
                    }
                }
                PacketNews::Left(outcome) => {
                    let Some(wakeup) = self.open.get_mut(vip) else {
                        continue;
                    };
                    wakeup.in_hold = wakeup.in_hold.saturating_sub(1);
                    let outcome = Outcome::of_packet(outcome);
                    wakeup.best = Some(wakeup.best.map_or(outcome, |b| b.min(outcome)));
                    // Expired packets leave the wake-up waiting for its backend (or its
                    // timeout): the phases of a slow scale-up are still recorded.
                    let waiting = outcome == Outcome::Expired && !wakeup.reached(Phase::Backend);
                    if wakeup.in_hold == 0 && !waiting {
                        self.finish(vip, outcome, now_ns);
                    }
                }
            }
        }
    }

    /// Ends, at `now_ns`, the wake-ups that are done without held packets: those that held
    /// none and reached `ready`, and those older than the timeout that hold none now.
    pub fn finish_due(&mut self, now_ns: u64, ready: Phase) {
        let timeout = self.timeout.as_nanos() as u64;
        let due: Vec<(VipKey, Outcome, u64)> = self
            .open
            .values()
            .filter_map(|w| {
                let ready_at = w.phases.iter().find(|(p, _)| *p == ready).map(|p| p.1);
                if let Some(at) = ready_at.filter(|_| w.held == 0) {
                    Some((w.vip, Outcome::NotHeld, at))
                } else if w.in_hold == 0 && now_ns.saturating_sub(w.first_packet_ns) > timeout {
                    // (While packets are held it goes on: each leaves by its own age.)
                    Some((w.vip, w.best.unwrap_or(Outcome::Expired), now_ns))
                } else {
                    None
                }
            })
            .collect();
        for (vip, outcome, at) in due {
            self.finish(&vip, outcome, at);
        }
    }

    /// The VIP was deleted: its wake-up is abandoned.
    pub fn vip_removed(&mut self, vip: &VipKey, now_ns: u64) {
        if self.open.contains_key(vip) {
            self.finish(vip, Outcome::Abandoned, now_ns);
        }
    }

    /// Ends `vip`'s wake-up: its best packet's outcome (or `outcome`) counted, logged, kept.
    fn finish(&mut self, vip: &VipKey, outcome: Outcome, now_ns: u64) {
        let Some(mut wakeup) = self.open.remove(vip) else {
            return;
        };
        if let Some(v) = Vip::from_key(vip) {
            self.by_row.remove(&(v.endpoint(), v.protocol));
        }
        let outcome = wakeup.best.unwrap_or(outcome);
        let at = now_ns.max(wakeup.first_packet_ns);
        wakeup.phases.push((Phase::Finished, at));
        self.metrics
            .phase_seconds
            .get_or_create(&[("phase", Phase::Finished.name())])
            .observe(seconds(at - wakeup.first_packet_ns));
        self.metrics
            .finished
            .get_or_create(&[("outcome", outcome.name())])
            .inc();
        if outcome == Outcome::Connected
            && let Some((_, backend)) = wakeup.phases.iter().find(|(p, _)| *p == Phase::Backend)
        {
            self.metrics
                .connect_after_backend_seconds
                .observe(seconds(at.saturating_sub(*backend)));
        }
        let row = wakeup.row(Some(outcome), wall_clock);
        info!("{}", Finished(&row));
        if self.recent.len() == RECENT_WAKEUPS {
            self.recent.pop_front();
        }
        self.recent.push_back(Ended {
            row,
            vip: *vip,
            outcome,
            started_ns: wakeup.first_packet_ns,
            ended_ns: at,
        });
    }

    /// What became of a packet to `vip` seen at `at_ns`: the outcome of the wake-up it was
    /// part of, `waking` while that goes on; None if it was part of none kept.
    pub fn fate_of(&self, vip: &VipKey, at_ns: u64) -> Option<&'static str> {
        if let Some(open) = self.open.get(vip)
            && at_ns >= open.first_packet_ns
        {
            return Some("waking");
        }
        self.recent
            .iter()
            .rev()
            .find(|e| e.vip == *vip && (e.started_ns..=e.ended_ns).contains(&at_ns))
            .map(|e| e.outcome.name())
    }

    /// The last finished wake-ups, then those going on, oldest first.
    pub fn rows(&self) -> Vec<WakeupRow> {
        let mut open: Vec<&Wakeup> = self.open.values().collect();
        open.sort_by_key(|w| w.first_packet_ns);
        self.recent
            .iter()
            .map(|e| e.row.clone())
            .chain(open.into_iter().map(|w| w.row(None, wall_clock)))
            .collect()
    }
}

fn wall_clock(ns: u64) -> String {
    crate::clock::rfc3339(crate::clock::wall_clock_of(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn vip(spec: &str) -> VipKey {
        spec.parse::<crate::vip::VipSpec>().unwrap().vip.key()
    }

    fn phases(row: &WakeupRow) -> Vec<&str> {
        row.phases.iter().map(|(p, _)| p.as_str()).collect()
    }

    #[test]
    fn a_wakeup_follows_its_phases_to_the_answer() {
        let mut wakeups = Wakeups::new(Duration::from_secs(60), WakeupMetrics::default());
        let web = vip("10.96.0.10:80/tcp");
        wakeups.first_packet(web, 0, 1_000 * MS);
        wakeups.named(&web, Some("web"));
        wakeups.follow_hold(&[(HoldKey::node_wide(web), PacketNews::Held)], 1_001 * MS);
        wakeups.row_reached("10.96.0.10:80", "tcp", Phase::Committed, 1_003 * MS);
        wakeups.row_reached("10.96.0.10:80", "tcp", Phase::Consumed, 1_200 * MS);
        wakeups.reached(&web, Phase::Backend, 9_000 * MS);
        wakeups.reached(&web, Phase::Forwarding, 9_050 * MS);
        wakeups.follow_hold(
            &[(HoldKey::node_wide(web), PacketNews::Replayed)],
            9_051 * MS,
        );
        wakeups.follow_hold(
            &[(HoldKey::node_wide(web), PacketNews::Replayed)],
            9_101 * MS,
        );
        assert_eq!(wakeups.open_count(), 1);
        wakeups.follow_hold(
            &[(HoldKey::node_wide(web), PacketNews::Left("answered"))],
            9_102 * MS,
        );
        assert_eq!(wakeups.open_count(), 0);
        let rows = wakeups.rows();
        let [row] = rows.as_slice() else {
            panic!("{rows:?}")
        };
        assert_eq!(row.vip, "10.96.0.10:80");
        assert_eq!(row.load_balancer.as_deref(), Some("web"));
        assert_eq!(row.outcome.as_deref(), Some("connected"));
        assert_eq!((row.held, row.replayed), (1, 2));
        assert_eq!(
            phases(row),
            [
                "committed",
                "consumed",
                "backend",
                "forwarding",
                "replayed",
                "finished"
            ]
        );
        assert_eq!(row.phases[0].1, 0.003);
        assert_eq!(row.phases[5].1, 8.102);
        assert_eq!(wakeups.fate_of(&web, 1_000 * MS), Some("connected"));
        assert_eq!(wakeups.fate_of(&web, 999 * MS), None);
        let line = Finished(row).to_string();
        assert!(
            line.starts_with("wake-up of 10.96.0.10:80/tcp (web) connected: committed 3 ms,"),
            "{line}"
        );
    }

    #[test]
    fn the_best_packet_decides_and_the_last_one_ends_it() {
        let mut wakeups = Wakeups::new(Duration::from_secs(60), WakeupMetrics::default());
        let web = vip("[fd00::10]:80/tcp");
        wakeups.first_packet(web, 0, 0);
        wakeups.follow_hold(
            &[
                (HoldKey::node_wide(web), PacketNews::Held),
                (HoldKey::node_wide(web), PacketNews::Held),
            ],
            MS,
        );
        wakeups.follow_hold(
            &[(HoldKey::node_wide(web), PacketNews::Left("answered"))],
            2 * MS,
        );
        assert_eq!(wakeups.open_count(), 1, "one packet still held");
        wakeups.follow_hold(
            &[(HoldKey::node_wide(web), PacketNews::Left("abandoned"))],
            3 * MS,
        );
        let rows = wakeups.rows();
        assert_eq!(rows[0].outcome.as_deref(), Some("connected"));
        assert_eq!(rows[0].vip, "[fd00::10]:80");
    }

    #[test]
    fn without_held_packets_it_ends_when_ready_or_expires() {
        let mut wakeups = Wakeups::new(Duration::from_secs(60), WakeupMetrics::default());
        let (a, b) = (vip("10.96.0.1:53/udp"), vip("10.96.0.2:80/tcp"));
        wakeups.first_packet(a, 0, 0);
        wakeups.first_packet(b, 0, 0);
        wakeups.reached(&a, Phase::Backend, 5_000 * MS);
        wakeups.finish_due(5_000 * MS, Phase::Backend);
        assert_eq!(wakeups.rows()[0].outcome.as_deref(), Some("not_held"));
        assert!(wakeups.is_open(&b));
        wakeups.finish_due(60_001 * MS, Phase::Backend);
        assert!(!wakeups.is_open(&b));
        assert_eq!(wakeups.rows()[1].outcome.as_deref(), Some("expired"));
        let expired = wakeups
            .metrics
            .finished
            .get_or_create(&[("outcome", "expired")])
            .get();
        assert_eq!(expired, 1);
    }

    #[test]
    fn expired_packets_wait_for_the_backend_to_end_the_wakeup() {
        let mut wakeups = Wakeups::new(Duration::from_secs(120), WakeupMetrics::default());
        let web = vip("10.96.0.10:80/tcp");
        let key = HoldKey::node_wide(web);
        wakeups.first_packet(web, 0, 0);
        wakeups.follow_hold(&[(key, PacketNews::Held)], MS);
        wakeups.row_reached("10.96.0.10:80", "tcp", Phase::Committed, 2 * MS);
        wakeups.follow_hold(&[(key, PacketNews::Left("expired"))], 60_000 * MS);
        assert!(
            wakeups.is_open(&web),
            "a slow scale-up's later phases still count"
        );
        wakeups.row_reached("10.96.0.10:80", "tcp", Phase::Consumed, 61_000 * MS);
        wakeups.reached(&web, Phase::Backend, 90_000 * MS);
        let rows = wakeups.rows();
        assert_eq!(rows[0].outcome.as_deref(), Some("expired"));
        assert_eq!(
            phases(&rows[0]),
            ["committed", "consumed", "backend", "finished"]
        );
        assert_eq!(rows[0].phases[3].1, 90.0);
    }

    #[test]
    fn a_wakeup_with_packets_still_held_does_not_time_out() {
        let mut wakeups = Wakeups::new(Duration::from_secs(90), WakeupMetrics::default());
        let web = vip("10.96.0.10:80/tcp");
        let key = HoldKey::node_wide(web);
        wakeups.first_packet(web, 0, 0);
        // A second client's packet, held 50 s after the first.
        wakeups.follow_hold(&[(key, PacketNews::Held)], 50_000 * MS);
        wakeups.finish_due(91_000 * MS, Phase::Backend);
        assert!(wakeups.is_open(&web), "a packet is still held");
        wakeups.reached(&web, Phase::Backend, 95_000 * MS);
        wakeups.follow_hold(&[(key, PacketNews::Replayed)], 95_001 * MS);
        wakeups.follow_hold(&[(key, PacketNews::Left("answered"))], 95_010 * MS);
        assert_eq!(wakeups.rows()[0].outcome.as_deref(), Some("connected"));
    }

    #[test]
    fn a_phase_counts_once_and_a_deleted_vip_abandons() {
        let mut wakeups = Wakeups::new(Duration::from_secs(60), WakeupMetrics::default());
        let web = vip("10.96.0.10:80/sctp");
        wakeups.first_packet(web, 0, 0);
        wakeups.reached(&web, Phase::Backend, MS);
        wakeups.reached(&web, Phase::Backend, 2 * MS);
        wakeups.vip_removed(&web, 3 * MS);
        let rows = wakeups.rows();
        assert_eq!(
            rows[0].phases,
            [("backend".into(), 0.001), ("finished".into(), 0.003)]
        );
        assert_eq!(rows[0].outcome.as_deref(), Some("abandoned"));
    }
}
