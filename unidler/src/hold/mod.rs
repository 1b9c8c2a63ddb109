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
mod kernel_counts;
mod metrics;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use tracing::{debug, info, warn};
use unidler_common::{FlowKey, IPPROTO_TCP, VipKey};

use self::kernel_counts::{KernelSuspects, Unsynced};
pub use self::{kernel_counts::RECONCILE_EVERY, metrics::HoldMetrics};

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

/// Most replays of one unanswered SYN: a client that is there answers the first; a spoofed
/// source never does, and each replay makes the server send a SYN-ACK to it.
pub const MAX_REPLAYS_PER_FLOW: u32 = 6;
/// How long after its VIP's backend appeared a SYN is replayed at the most (the client's own
/// retransmission takes over after it).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(3);

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
