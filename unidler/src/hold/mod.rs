//! Held packets: connection-opening packets to idle VIPs, kept (bounded) until their VIP has
//! a backend, then replayed, oldest first, into the stack of the interface each arrived on.
//!
//! - The kernel drops an opening packet to an idle VIP and copies it, whole, to the held-frame
//!   ring ([`HeldBytes`]); every one, not only those its event rate limiters let through.
//! - [`HeldPackets::hold`] keeps it, unless it repeats a held flow (a SYN retransmission) or a
//!   limit is reached (per VIP, in total): each outcome counted.
//! - When the VIP gets a backend ([`HeldPackets::backends_appeared`]), its packets are due
//!   after `replay_after`; [`HeldPackets::replay_due`] replays them through the kernel ([`HoldKernel`],
//!   which the datapath serves). A TCP SYN is replayed until its flow is answered (the client's ACK, seen by
//!   the kernel), with backoff, within the age limit: a replay that reached forwarding not yet
//!   carrying the backend is not lost. A UDP datagram or an SCTP INIT is replayed once: it
//!   shows no answer, and must not be delivered twice.
//! - Packets older than `max_age`, and those of a VIP that is deleted, are discarded (counted).

pub mod frame;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use tracing::{debug, info, warn};
use unidler_common::{FlowKey, IPPROTO_TCP, VipKey};

/// How much may be held, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most packets held for one VIP.
    pub per_vip: usize,
    /// Most packets held in all.
    pub total: usize,
    /// Age (from the kernel's timestamp) after which a held packet is discarded; zero turns
    /// holding off.
    pub max_age: Duration,
    /// Wait between a VIP's backend appearing in its source and the first replay (the time
    /// the node's forwarding needs to carry it).
    pub replay_after: Duration,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            per_vip: 64,
            total: 8_192,
            max_age: Duration::from_secs(60),
            replay_after: Duration::ZERO,
        }
    }
}

/// What the hold needs of the kernel: to replay a held packet, to watch for its answer, and
/// to keep the kernel's counts of what is held. The datapath serves it
/// (`datapath/replay.rs`); tests use a fake.
pub trait HoldKernel {
    /// Why the kernel could not do what was asked.
    type Error: std::fmt::Display;
    /// Hands `frame` to interface `ifindex`'s stack as if just received.
    fn replay(&mut self, frame: &[u8], ifindex: u32) -> Result<(), Self::Error>;
    /// Starts watching for the answer to `flow`, which must come in on `ifindex`.
    fn watch(&mut self, flow: &FlowKey, ifindex: u32) -> Result<(), Self::Error>;
    /// Whether `flow` was answered.
    fn answered(&self, flow: &FlowKey) -> bool;
    /// Lets `flow` go: the kernel may hold its next opening packet. `watching_left`: some
    /// other flow still waits for its answer.
    fn release(&mut self, flow: &FlowKey, watching_left: bool) -> Result<(), Self::Error>;
    /// What is held now: per VIP (among them, those with none), and in all.
    fn set_held(&mut self, vips: &[(VipKey, u32)], total: u32) -> Result<(), Self::Error>;
    /// The kernel's counts: per VIP, and in all.
    fn held_in_kernel(&self) -> (Vec<(VipKey, u32)>, u32);
}

/// A held frame as the agent keeps it: where it arrived, when, for which VIP, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBytes {
    /// When the kernel saw it, `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
    /// Its flow, as the kernel keyed it: the held packet's identity on both sides (its
    /// destination is the VIP, [`HeldBytes::vip`]).
    pub flow: FlowKey,
    /// The interface it arrived on.
    pub ifindex: u32,
    /// The frame, from its Ethernet header.
    pub frame: Vec<u8>,
}

impl HeldBytes {
    /// The VIP it was sent to.
    pub fn vip(&self) -> VipKey {
        self.flow.vip()
    }
}

/// What the hold counts, exported as metrics (cheap to clone: the values are shared).
#[derive(Clone, Debug)]
pub struct HoldMetrics {
    /// Packets held now.
    pub held_now: Gauge,
    /// Held packets by what became of them (`held`, `retransmission`, `over_limit_vip`,
    /// `over_limit_total`, `replayed`, `answered`, `abandoned`, `expired`, `discarded`,
    /// `replay_failed`).
    pub packets: Family<[(&'static str, &'static str); 1], Counter>,
    /// Seconds from the first packet held for a VIP to its first replay.
    pub wait_seconds: Histogram,
}

impl Default for HoldMetrics {
    fn default() -> Self {
        let metrics = Self {
            held_now: Gauge::default(),
            packets: Family::default(),
            wait_seconds: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        };
        // Every series from the start, at zero.
        for outcome in [
            "held",
            "replayed",
            "answered",
            "abandoned",
            "expired",
            "discarded",
            "replay_failed",
            "retransmission",
            "over_limit_vip",
            "over_limit_total",
            "not_understood",
        ] {
            metrics.count(outcome, 0);
        }
        metrics
    }
}

impl HoldMetrics {
    fn count(&self, outcome: &'static str, n: u64) {
        self.packets
            .get_or_create(&[("outcome", outcome)])
            .inc_by(n);
    }
}

/// One held packet.
#[derive(Debug)]
struct HeldPacket {
    flow: FlowKey,
    frame: Vec<u8>,
    ifindex: u32,
    /// When the kernel saw it (`CLOCK_MONOTONIC` ns).
    seen_ns: u64,
    /// Replays so far.
    replays: u32,
    /// When it is next replayed, once its VIP has a backend.
    next_replay_ns: u64,
}

/// The packets held for one VIP.
#[derive(Debug, Default)]
struct VipHold {
    packets: VecDeque<HeldPacket>,
    /// Since when the VIP has a backend: its packets are being replayed.
    waking_since_ns: Option<u64>,
    /// Whether this wake-up's first replay was measured.
    wait_observed: bool,
}

/// What held packets wait on together: a VIP, on one scope (the logical datapath of the
/// interfaces they arrived on, for a scoped VIP), or node-wide (scope 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldKey {
    /// The VIP.
    pub vip: VipKey,
    /// The scope; 0: node-wide.
    pub scope: u32,
}

impl HoldKey {
    /// `vip`, node-wide.
    pub fn node_wide(vip: VipKey) -> Self {
        Self { vip, scope: 0 }
    }
}

/// The held packets of every VIP.
pub struct HeldPackets {
    limits: HoldLimits,
    vips: HashMap<HoldKey, VipHold>,
    /// Packets held per VIP (over its scopes).
    per_vip: HashMap<VipKey, usize>,
    /// Flows held now (a retransmission of one is not held again).
    flows: HashSet<FlowKey>,
    /// Flows whose answer the kernel watches.
    watched: HashSet<FlowKey>,
    total: usize,
    /// The scopes each VIP has packets held on: the keys of `vips`, by VIP.
    scopes_of: HashMap<VipKey, Vec<u32>>,
    /// The keys whose VIP has a backend: their packets are being replayed.
    waking: HashSet<HoldKey>,
    /// The keys with a replayed flow whose answer is watched (answered, it leaves the hold
    /// even if its VIP went idle again meanwhile).
    watching: HashSet<HoldKey>,
    /// When the oldest held packet was seen (`u64::MAX`: none), so that neither the next
    /// due time nor a pass over what is due costs a look at every packet while nothing is
    /// waking or expiring (a flood holds thousands).
    oldest_seen_ns: u64,
    /// Whether a packet left since `oldest_seen_ns` was computed.
    oldest_stale: bool,
    /// What the kernel counts differently from the hold until the next
    /// [`HeldPackets::sync_kernel`]: the VIPs whose count fell, and flows it copied that the
    /// hold did not keep.
    unsynced: Unsynced,
    /// See [`HeldPackets::reconcile_kernel`].
    kernel_suspects: KernelSuspects,
    /// When the kernel's counts were last reconciled.
    reconciled_ns: u64,
    /// When replayed flows' answers were last looked at (see [`answer_poll`]).
    answers_checked_ns: u64,
    /// What befell held packets since the last [`HeldPackets::take_news`].
    news: Vec<(HoldKey, PacketNews)>,
    metrics: HoldMetrics,
}

/// What befell one held packet of a VIP (for the wake-ups, [`crate::wakeup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketNews {
    /// Kept.
    Held,
    /// Replayed (once more).
    Replayed,
    /// Gone from the hold: `answered`, `delivered`, `abandoned`, `expired`, `discarded` or
    /// `replay_failed`.
    Left(&'static str),
}

/// Kernel counts seen above the hold's at the last [`HeldPackets::reconcile_kernel`].
#[derive(Debug, Default)]
struct KernelSuspects {
    vips: HashMap<VipKey, u32>,
    total: Option<u32>,
}

/// See [`HeldPackets::sync_kernel`].
#[derive(Debug, Default)]
struct Unsynced {
    vips: HashSet<VipKey>,
    refused_flows: Vec<FlowKey>,
    /// The total, though no VIP's count changed.
    total: bool,
}

/// Most replays of one unanswered SYN: a client that is there answers the first; a spoofed
/// source never does, and each replay makes the server send a SYN-ACK to it.
pub const MAX_REPLAYS_PER_FLOW: u32 = 6;
/// How long after its VIP's backend appeared a SYN is replayed at the most (the client's own
/// retransmission takes over after it).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(3);

/// How often the kernel's counts of held packets are checked against the hold's (see
/// [`HeldPackets::reconcile_kernel`]).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// How often replayed flows' answers are looked at while some wait for one: every 5 ms, so
/// that a connection is seen within milliseconds of its answer (not at the next replay), and
/// 5 µs longer per flow watched, so that a wake-up of thousands of flows costs no more than a
/// lookup per flow every few tens of milliseconds.
fn answer_poll(watched: usize) -> Duration {
    Duration::from_millis(5) + Duration::from_micros(5 * watched as u64)
}

/// Backoff between replays of an unanswered SYN: 50 ms, doubling, at most one second.
fn backoff(replays: u32) -> Duration {
    Duration::from_millis(50u64 << replays.min(5).saturating_sub(1)).min(Duration::from_secs(1))
}

impl HeldPackets {
    /// An empty hold with `limits`, counting into `metrics`.
    pub fn new(limits: HoldLimits, metrics: HoldMetrics) -> Self {
        Self {
            limits,
            vips: HashMap::new(),
            per_vip: HashMap::new(),
            flows: HashSet::new(),
            watched: HashSet::new(),
            total: 0,
            scopes_of: HashMap::new(),
            waking: HashSet::new(),
            watching: HashSet::new(),
            oldest_seen_ns: u64::MAX,
            oldest_stale: false,
            unsynced: Unsynced::default(),
            kernel_suspects: KernelSuspects::default(),
            reconciled_ns: 0,
            answers_checked_ns: 0,
            news: Vec::new(),
            metrics,
        }
    }

    /// What befell held packets since the last call, in order.
    pub fn take_news(&mut self) -> Vec<(HoldKey, PacketNews)> {
        std::mem::take(&mut self.news)
    }

    /// Whether packets are held at all (`--hold-max-age` not zero).
    pub fn enabled(&self) -> bool {
        !self.limits.max_age.is_zero()
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Packets held now for `vip`.
    pub fn held_for(&self, vip: &VipKey) -> usize {
        self.per_vip.get(vip).copied().unwrap_or(0)
    }

    /// The scopes `vip` has packets held on (0: node-wide).
    pub fn scopes_held(&self, vip: &VipKey) -> Vec<u32> {
        self.scopes_of.get(vip).cloned().unwrap_or_default()
    }

    /// A dropped opening packet from the kernel, waiting node-wide (see [`HeldPackets::hold_in`]).
    pub fn hold(&mut self, held: HeldBytes, now_ns: u64) {
        self.hold_in(held, 0, now_ns);
    }

    /// A dropped opening packet from the kernel, waiting on `scope` (0: node-wide): kept
    /// unless it repeats a held flow or a limit is reached. The kernel copies only what fits
    /// its own count of the same limits, so a refusal here is rare (the counts are written
    /// back at the next [`HeldPackets::sync_kernel`]).
    pub fn hold_in(&mut self, held: HeldBytes, scope: u32, now_ns: u64) {
        let held_vip = held.vip();
        let refused = if !self.enabled() {
            Some("disabled")
        } else if self.flows.contains(&held.flow) {
            // The kernel lost the flow (an adopted ring): it still counted the copy.
            self.metrics.count("retransmission", 1);
            self.unsynced.vips.insert(held_vip);
            return;
        } else if self.held_for(&held_vip) >= self.limits.per_vip {
            Some("over_limit_vip")
        } else if self.total >= self.limits.total {
            Some("over_limit_total")
        } else if frame::parse(&held.frame).is_none() {
            debug!(
                len = held.frame.len(),
                "held frame not understood: not kept"
            );
            Some("not_understood")
        } else {
            None
        };
        if let Some(outcome) = refused {
            if outcome != "disabled" {
                self.metrics.count(outcome, 1);
            }
            self.unsynced.vips.insert(held_vip);
            self.unsynced.refused_flows.push(held.flow);
            return;
        }
        let flow = held.flow;
        let replay_after = self.limits.replay_after.as_nanos() as u64;
        *self.per_vip.entry(held_vip).or_default() += 1;
        let key = HoldKey {
            vip: held_vip,
            scope,
        };
        let vip = self.vips.entry(key).or_insert_with(|| {
            self.scopes_of.entry(key.vip).or_default().push(scope);
            VipHold::default()
        });
        // A packet that the kernel held just before the agent learnt of the backend is due
        // with the others (or at once, if they are).
        let next_replay_ns = vip
            .waking_since_ns
            .map_or(now_ns, |since| since + replay_after);
        vip.packets.push_back(HeldPacket {
            flow,
            frame: held.frame,
            ifindex: held.ifindex,
            seen_ns: held.timestamp_ns,
            replays: 0,
            next_replay_ns,
        });
        self.oldest_seen_ns = self.oldest_seen_ns.min(held.timestamp_ns);
        self.flows.insert(flow);
        self.total += 1;
        self.news.push((key, PacketNews::Held));
        self.metrics.count("held", 1);
        self.metrics.held_now.set(self.total as i64);
    }

    /// `key` has a backend now: its packets are replayed from `replay_after` on.
    pub fn backends_appeared(&mut self, key: &HoldKey, now_ns: u64) {
        let Some(hold) = self.vips.get_mut(key) else {
            return;
        };
        if hold.waking_since_ns.is_some() {
            return;
        }
        hold.waking_since_ns = Some(now_ns);
        hold.wait_observed = false;
        self.waking.insert(*key);
        let first = now_ns + self.limits.replay_after.as_nanos() as u64;
        for packet in &mut hold.packets {
            packet.next_replay_ns = first;
        }
        debug!(
            vip = %crate::vip::Spelt(&key.vip),
            scope = key.scope,
            held = hold.packets.len(),
            "VIP has a backend: replaying its held packets"
        );
    }

    /// `key` is idle again: its packets wait for the next backend.
    pub fn backends_gone(&mut self, key: &HoldKey) {
        if let Some(hold) = self.vips.get_mut(key) {
            hold.waking_since_ns = None;
        }
        self.waking.remove(key);
    }

    /// `vip` was deleted: its packets (on every scope) are discarded.
    pub fn vip_removed(&mut self, vip: &VipKey, kernel: &mut impl HoldKernel) {
        for scope in self.scopes_of.remove(vip).unwrap_or_default() {
            let key = HoldKey { vip: *vip, scope };
            self.waking.remove(&key);
            self.watching.remove(&key);
            let Some(hold) = self.vips.remove(&key) else {
                continue;
            };
            let n = hold.packets.len();
            for packet in hold.packets {
                self.release(vip, &packet, kernel);
                self.news.push((key, PacketNews::Left("discarded")));
            }
            self.metrics.count("discarded", n as u64);
            self.metrics.held_now.set(self.total as i64);
            if n > 0 {
                info!(vip = %crate::vip::Spelt(vip), discarded = n, "VIP deleted: its held packets are discarded");
            }
        }
        self.sync_kernel(kernel);
    }

    /// Replays what is due at `now_ns` and discards what is too old.
    pub fn replay_due(&mut self, now_ns: u64, kernel: &mut impl HoldKernel) {
        self.answers_checked_ns = now_ns;
        let max_age = self.limits.max_age.as_nanos() as u64;
        let mut done: Vec<(HoldKey, usize, &'static str)> = Vec::new();
        // Every key only when some packet is old enough to expire; else only those waking.
        let expiring = now_ns.saturating_sub(self.oldest_seen_ns) > max_age;
        let keys: Vec<HoldKey> = match expiring {
            true => self.vips.keys().copied().collect(),
            false => self.waking.union(&self.watching).copied().collect(),
        };
        for key in keys {
            let Some(hold) = self.vips.get_mut(&key) else {
                continue;
            };
            let first_seen = hold.packets_first_seen();
            for (at, packet) in hold.packets.iter_mut().enumerate() {
                let answered = self.watched.contains(&packet.flow) && kernel.answered(&packet.flow);
                if answered {
                    done.push((key, at, "answered"));
                    continue;
                }
                if now_ns.saturating_sub(packet.seen_ns) > max_age {
                    done.push((key, at, "expired"));
                    continue;
                }
                let Some(waking_since) = hold.waking_since_ns else {
                    continue;
                };
                if packet.replays >= MAX_REPLAYS_PER_FLOW
                    || now_ns.saturating_sub(waking_since) > REPLAY_WINDOW.as_nanos() as u64
                {
                    // Unanswered: given up (amplification of spoofed SYNs is capped).
                    done.push((key, at, "abandoned"));
                    continue;
                }
                if packet.next_replay_ns > now_ns {
                    continue;
                }
                if !hold.wait_observed {
                    hold.wait_observed = true;
                    self.metrics
                        .wait_seconds
                        .observe(now_ns.saturating_sub(first_seen) as f64 / 1e9);
                    debug!(
                        since_backend_ms = (now_ns - waking_since) / 1_000_000,
                        "first replay"
                    );
                }
                let tcp = packet.flow.proto == IPPROTO_TCP;
                if tcp && packet.replays == 0 && self.watched.insert(packet.flow) {
                    self.watching.insert(key);
                    if let Err(e) = kernel.watch(&packet.flow, packet.ifindex) {
                        warn!("cannot watch a replayed flow's answer: {e}");
                    }
                }
                let mut frame = packet.frame.clone();
                if let Some(parsed) = frame::parse(&frame) {
                    frame::complete_checksum(&mut frame, &parsed);
                }
                if let Err(e) = kernel.replay(&frame, packet.ifindex) {
                    // Its interface is gone (a pod deleted meanwhile), or the kernel refused:
                    // another try would fare no better.
                    warn!(
                        ifindex = packet.ifindex,
                        "replay failed, packet discarded: {e}"
                    );
                    done.push((key, at, "replay_failed"));
                    continue;
                }
                packet.replays += 1;
                self.news.push((key, PacketNews::Replayed));
                self.metrics.count("replayed", 1);
                if tcp {
                    packet.next_replay_ns = now_ns + backoff(packet.replays).as_nanos() as u64;
                } else {
                    done.push((key, at, "delivered"));
                }
            }
        }
        // Removed back to front, so that the indexes of a VIP's earlier packets hold.
        done.sort_by_key(|d| std::cmp::Reverse(d.1));
        let touched: HashSet<HoldKey> = done.iter().map(|(key, _, _)| *key).collect();
        for (key, at, outcome) in done {
            let Some(hold) = self.vips.get_mut(&key) else {
                continue;
            };
            let Some(packet) = hold.packets.remove(at) else {
                continue;
            };
            if outcome != "delivered" {
                self.metrics.count(outcome, 1);
            }
            self.news.push((key, PacketNews::Left(outcome)));
            self.release(&key.vip, &packet, kernel);
        }
        // Only the keys that lost packets can be empty now.
        for key in touched {
            if self
                .vips
                .get(&key)
                .is_some_and(|hold| hold.packets.is_empty())
            {
                self.forget_key(&key);
            }
        }
        if self.oldest_stale {
            self.oldest_stale = false;
            self.oldest_seen_ns = self
                .vips
                .values()
                .flat_map(|hold| hold.packets.iter().map(|p| p.seen_ns))
                .min()
                .unwrap_or(u64::MAX);
        }
        self.metrics.held_now.set(self.total as i64);
        self.sync_kernel(kernel);
    }

    /// Removes an empty key and its place in the indexes.
    fn forget_key(&mut self, key: &HoldKey) {
        self.vips.remove(key);
        self.waking.remove(key);
        self.watching.remove(key);
        if let Some(scopes) = self.scopes_of.get_mut(&key.vip) {
            scopes.retain(|s| *s != key.scope);
            if scopes.is_empty() {
                self.scopes_of.remove(&key.vip);
            }
        }
    }

    /// Writes the kernel's counts down to what the hold keeps, for the VIPs whose count fell
    /// (packets let go, or refused here after the kernel counted them), and lets go of the
    /// flows the kernel copied that the hold refused. The kernel counts up as it copies; it
    /// never counts more than the hold keeps plus what waits in the ring.
    pub fn sync_kernel(&mut self, kernel: &mut impl HoldKernel) {
        let total = std::mem::take(&mut self.unsynced.total);
        if self.unsynced.vips.is_empty() && self.unsynced.refused_flows.is_empty() && !total {
            return;
        }
        let watching_left = !self.watched.is_empty();
        for flow in std::mem::take(&mut self.unsynced.refused_flows) {
            if !self.flows.contains(&flow)
                && let Err(e) = kernel.release(&flow, watching_left)
            {
                warn!("cannot let a refused flow go in the kernel: {e}");
            }
        }
        let vips: Vec<(VipKey, u32)> = std::mem::take(&mut self.unsynced.vips)
            .into_iter()
            .map(|vip| (vip, self.held_for(&vip) as u32))
            .collect();
        if let Err(e) = kernel.set_held(&vips, self.total as u32) {
            warn!("cannot write the held counts to the kernel: {e}");
        }
    }

    /// Writes down every kernel count that stayed above what the hold keeps since the last
    /// call, and removes the kernel's counts of VIPs it holds nothing for: what a race or a
    /// lost write left (the kernel's count of a copy it then could not make, a write that
    /// failed). Run now and then. A count above the hold's that changed since the last call
    /// is left alone: the kernel also counts what waits in the ring, which the hold has not
    /// read yet.
    pub fn reconcile_kernel(&mut self, now_ns: u64, kernel: &mut impl HoldKernel) {
        if !self.enabled()
            || now_ns.saturating_sub(self.reconciled_ns) < RECONCILE_EVERY.as_nanos() as u64
        {
            return;
        }
        self.reconciled_ns = now_ns;
        let (per_vip, total) = kernel.held_in_kernel();
        let mut suspects = HashMap::new();
        for (vip, held) in per_vip {
            if held as usize > self.held_for(&vip) {
                if self.kernel_suspects.vips.get(&vip) == Some(&held) {
                    self.unsynced.vips.insert(vip);
                } else {
                    suspects.insert(vip, held);
                }
            }
        }
        let total_suspect = (total as usize > self.total).then_some(total);
        if total_suspect.is_some() && self.kernel_suspects.total == total_suspect {
            self.unsynced.total = true;
        }
        self.kernel_suspects = KernelSuspects {
            vips: suspects,
            total: total_suspect.filter(|_| !self.unsynced.total),
        };
        if self.unsynced.total || !self.unsynced.vips.is_empty() {
            debug!("held counts in the kernel above the hold's since the last look: written down");
            self.unsynced.total = true;
            self.sync_kernel(kernel);
        }
    }

    /// Forgets a packet of `vip` that left the hold; the kernel lets its flow go now, and
    /// its counts follow at the next [`HeldPackets::sync_kernel`].
    fn release(&mut self, vip: &VipKey, packet: &HeldPacket, kernel: &mut impl HoldKernel) {
        self.total -= 1;
        if let Some(n) = self.per_vip.get_mut(vip) {
            *n -= 1;
            if *n == 0 {
                self.per_vip.remove(vip);
            }
        }
        self.unsynced.vips.insert(*vip);
        self.oldest_stale |= packet.seen_ns <= self.oldest_seen_ns;
        self.flows.remove(&packet.flow);
        self.watched.remove(&packet.flow);
        if let Err(e) = kernel.release(&packet.flow, !self.watched.is_empty()) {
            warn!("cannot let a held flow go in the kernel: {e}");
        }
    }

    /// When [`HeldPackets::replay_due`] has something to do next (a replay, or a packet to
    /// discard), in `CLOCK_MONOTONIC` ns; None while nothing is held.
    pub fn next_due_ns(&self) -> Option<u64> {
        if self.vips.is_empty() {
            return None;
        }
        let max_age = self.limits.max_age.as_nanos() as u64;
        let expiry = self.oldest_seen_ns.saturating_add(max_age + 1);
        let replay = self
            .waking
            .iter()
            .filter_map(|key| self.vips.get(key))
            .flat_map(|hold| hold.packets.iter().map(|p| p.next_replay_ns))
            .min();
        let due = replay.map_or(expiry, |replay| replay.min(expiry));
        if self.watched.is_empty() {
            return Some(due);
        }
        let poll = self.answers_checked_ns + answer_poll(self.watched.len()).as_nanos() as u64;
        Some(due.min(poll))
    }
}

impl VipHold {
    fn packets_first_seen(&self) -> u64 {
        self.packets.iter().map(|p| p.seen_ns).min().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[derive(Default)]
    struct FakeKernel {
        replays: Vec<(Vec<u8>, u32)>,
        watched: HashSet<FlowKey>,
        answered: HashSet<FlowKey>,
        released: Vec<FlowKey>,
        /// The kernel's counts as last written: per VIP, and in all.
        held: HashMap<VipKey, u32>,
        total: u32,
    }

    impl HoldKernel for FakeKernel {
        type Error = std::convert::Infallible;
        fn replay(&mut self, frame: &[u8], ifindex: u32) -> Result<(), Self::Error> {
            self.replays.push((frame.to_vec(), ifindex));
            Ok(())
        }
        fn watch(&mut self, flow: &FlowKey, _ifindex: u32) -> Result<(), Self::Error> {
            self.watched.insert(*flow);
            Ok(())
        }
        fn answered(&self, flow: &FlowKey) -> bool {
            self.answered.contains(flow)
        }
        fn release(&mut self, flow: &FlowKey, _watching_left: bool) -> Result<(), Self::Error> {
            self.watched.remove(flow);
            self.released.push(*flow);
            Ok(())
        }
        fn set_held(&mut self, vips: &[(VipKey, u32)], total: u32) -> Result<(), Self::Error> {
            for (vip, n) in vips {
                match n {
                    0 => self.held.remove(vip),
                    n => self.held.insert(*vip, *n),
                };
            }
            self.total = total;
            Ok(())
        }
        fn held_in_kernel(&self) -> (Vec<(VipKey, u32)>, u32) {
            (
                self.held.iter().map(|(v, n)| (*v, *n)).collect(),
                self.total,
            )
        }
    }

    fn vip() -> VipKey {
        let mut key = VipKey {
            port_be: 80u16.to_be(),
            proto: 6,
            family: unidler_common::FAMILY_IPV4,
            ..VipKey::default()
        };
        key.addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        key
    }

    /// A TCP SYN (or UDP datagram, `proto` 17) from 10.0.0.1:`sport` to 10.0.0.2:80.
    fn packet(sport: u16, proto: u8, seen_ns: u64) -> HeldBytes {
        packet_to(sport, 80, proto, seen_ns)
    }

    /// A TCP SYN (or UDP datagram, `proto` 17) from 10.0.0.1:`sport` to 10.0.0.2:`dport`,
    /// as the kernel hands it over.
    fn packet_to(sport: u16, dport: u16, proto: u8, seen_ns: u64) -> HeldBytes {
        let l4_len: usize = if proto == 6 { 20 } else { 8 };
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + l4_len) as u16;
        f.extend_from_slice(&[
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let mut l4 = vec![0u8; l4_len];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        if proto == 6 {
            l4[12] = 0x50;
            l4[13] = 0x02;
        } else {
            l4[4..6].copy_from_slice(&8u16.to_be_bytes());
        }
        f.extend_from_slice(&l4);
        let flow = frame::parse(&f).expect("a frame the parser reads").flow;
        HeldBytes {
            timestamp_ns: seen_ns,
            flow,
            ifindex: 7,
            frame: f,
        }
    }

    fn limits() -> HoldLimits {
        HoldLimits {
            per_vip: 3,
            total: 5,
            max_age: Duration::from_secs(60),
            replay_after: Duration::ZERO,
        }
    }

    fn count(hold: &HeldPackets, outcome: &'static str) -> u64 {
        hold.metrics
            .packets
            .get_or_create(&[("outcome", outcome)])
            .get()
    }

    #[test]
    fn retransmissions_and_packets_over_the_limits_are_counted_not_held() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        hold.hold(packet(1000, 6, 0), 0);
        hold.hold(packet(1000, 6, MS), MS);
        assert_eq!((hold.len(), count(&hold, "retransmission")), (1, 1));
        for sport in 1001..1005 {
            hold.hold(packet(sport, 6, 2 * MS), 2 * MS);
        }
        assert_eq!((hold.len(), count(&hold, "over_limit_vip")), (3, 2));
        for (i, port) in [81u16, 82, 83].iter().enumerate() {
            hold.hold(packet_to(2000 + i as u16, *port, 6, 0), 0);
        }
        assert_eq!((hold.len(), count(&hold, "over_limit_total")), (5, 1));
    }

    #[test]
    fn the_kernels_counts_follow_what_is_held() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        // The kernel copied four of one VIP (it counted four); the hold keeps three.
        for sport in 1000..1004 {
            hold.hold(packet(sport, 6, 0), 0);
        }
        hold.replay_due(MS, &mut kernel);
        assert_eq!(
            kernel.held.get(&vip()),
            Some(&3),
            "written down to what is kept"
        );
        assert_eq!(kernel.total, 3);
        let refused = packet(1003, 6, 0).flow;
        assert_eq!(kernel.released, vec![refused], "the refused flow let go");
        // Nothing changed: nothing written.
        kernel.total = 99;
        hold.replay_due(2 * MS, &mut kernel);
        assert_eq!(kernel.total, 99);
        // Replayed and answered: every flow let go, the counts at zero.
        hold.backends_appeared(&HoldKey::node_wide(vip()), 10 * MS);
        hold.replay_due(10 * MS, &mut kernel);
        kernel.answered.extend(kernel.watched.iter().copied());
        hold.replay_due(20 * MS, &mut kernel);
        assert!(hold.is_empty());
        assert_eq!((kernel.held.get(&vip()), kernel.total), (None, 0));
        assert_eq!(kernel.released.len(), 4);
    }

    /// A count the kernel kept for a copy it could not make (or a VIP the hold never saw) is
    /// written down once it stayed so between two reconciliations; counts at or below the
    /// hold's stay.
    #[test]
    fn stale_kernel_counts_are_written_down() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        hold.hold(packet(1000, 6, 0), 0);
        hold.replay_due(MS, &mut kernel);
        let other = packet_to(1000, 81, 6, 0).vip();
        kernel.held.insert(vip(), 1);
        kernel.held.insert(other, 1);
        kernel.total = 2;
        let every = RECONCILE_EVERY.as_nanos() as u64;
        hold.reconcile_kernel(every, &mut kernel);
        assert_eq!(
            kernel.total, 2,
            "left alone at first: it may be what waits in the ring"
        );
        hold.reconcile_kernel(every + MS, &mut kernel);
        assert_eq!(kernel.total, 2, "not again so soon");
        hold.reconcile_kernel(2 * every, &mut kernel);
        assert_eq!(kernel.held.get(&vip()), Some(&1));
        assert_eq!(kernel.held.get(&other), None, "a VIP the hold never saw");
        assert_eq!(kernel.total, 1);
        // Nothing above the hold's: nothing written.
        kernel.total = 0;
        hold.reconcile_kernel(4 * every, &mut kernel);
        assert_eq!(kernel.total, 0);
    }

    #[test]
    fn tcp_is_replayed_with_backoff_until_answered_udp_once() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        hold.hold(packet(1000, 6, 0), 0);
        hold.hold(packet(1001, 17, 0), 0);
        hold.replay_due(10 * MS, &mut kernel);
        assert!(kernel.replays.is_empty(), "nothing replayed while idle");
        hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
        let udp_vip = packet(1001, 17, 0).vip();
        hold.backends_appeared(&HoldKey::node_wide(udp_vip), 100 * MS);
        assert_eq!(hold.next_due_ns(), Some(100 * MS));
        hold.replay_due(100 * MS, &mut kernel);
        assert_eq!(
            kernel.replays.len(),
            2,
            "both replayed at once, oldest first"
        );
        assert_eq!(
            hold.len(),
            1,
            "the datagram is delivered once, the SYN waits for its answer"
        );
        assert_eq!(
            hold.next_due_ns(),
            Some(100 * MS + answer_poll(1).as_nanos() as u64),
            "the answer is looked for within milliseconds, well before the next replay"
        );
        hold.replay_due(120 * MS, &mut kernel);
        assert_eq!(
            kernel.replays.len(),
            2,
            "no second replay before the backoff"
        );
        hold.replay_due(150 * MS, &mut kernel);
        assert_eq!(
            kernel.replays.len(),
            3,
            "replayed again after 50 ms, unanswered"
        );
        let flow = *kernel
            .watched
            .iter()
            .next()
            .expect("the SYN's flow is watched");
        kernel.answered.insert(flow);
        hold.replay_due(400 * MS, &mut kernel);
        assert_eq!(kernel.replays.len(), 3);
        assert_eq!((hold.len(), count(&hold, "answered")), (0, 1));
        assert!(kernel.watched.is_empty(), "no flow watched once answered");
        assert_eq!(hold.next_due_ns(), None);
    }

    #[test]
    fn an_unanswered_syn_is_replayed_a_bounded_number_of_times_within_a_bounded_time() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        hold.hold(packet(1000, 6, 0), 0);
        hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
        // Never answered (a spoofed source): replayed every time it is due, up to the cap.
        let mut now = 100 * MS;
        while let Some(due) = hold.next_due_ns() {
            now = due.max(now);
            hold.replay_due(now, &mut kernel);
            now += MS;
            assert!(
                now < 100 * MS + 2 * REPLAY_WINDOW.as_nanos() as u64,
                "never given up"
            );
        }
        assert_eq!(kernel.replays.len() as u32, MAX_REPLAYS_PER_FLOW);
        assert_eq!((hold.len(), count(&hold, "abandoned")), (0, 1));
        assert!(kernel.watched.is_empty(), "no flow watched once given up");

        // A backend that appears late in the packet's life: replays stop at the window.
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        hold.hold(packet(1001, 6, 0), 0);
        hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
        hold.replay_due(100 * MS, &mut kernel);
        let after_window = 100 * MS + REPLAY_WINDOW.as_nanos() as u64 + MS;
        hold.replay_due(after_window, &mut kernel);
        assert_eq!(kernel.replays.len(), 1);
        assert_eq!(count(&hold, "abandoned"), 1);
    }

    #[test]
    fn old_packets_expire_and_a_deleted_vips_are_discarded() {
        let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
        let mut kernel = FakeKernel::default();
        hold.hold(packet(1000, 6, 0), 0);
        hold.hold(packet(1001, 6, 30_000 * MS), 30_000 * MS);
        hold.replay_due(60_000 * MS + 1, &mut kernel);
        assert_eq!((hold.len(), count(&hold, "expired")), (1, 1));
        hold.vip_removed(&vip(), &mut kernel);
        assert_eq!((hold.len(), count(&hold, "discarded")), (0, 1));
        assert!(kernel.replays.is_empty());
    }

    #[test]
    fn nothing_is_held_with_a_max_age_of_zero() {
        let mut hold = HeldPackets::new(
            HoldLimits {
                max_age: Duration::ZERO,
                ..limits()
            },
            HoldMetrics::default(),
        );
        hold.hold(packet(1000, 6, 0), 0);
        assert!(hold.is_empty());
    }
}
