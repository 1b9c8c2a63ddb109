//! Held packets, from the kernel's held ring to their replay: each held on its VIP (and, for a
//! scoped VIP, the scope of the interface it came in on); due once that VIP has a backend
//! there and, with VIPs from OVN, once the node's forwarding carries it; replayed through the
//! datapath, or discarded when too old.

use std::collections::HashSet;

use tracing::warn;
use unidler_common::VipKey;

use super::{interfaces::Interfaces, vip_map::VipMap};
use crate::{
    clock,
    datapath::Datapath,
    hold::{HeldBytes, HeldPackets, HoldKey, PacketNews},
    ovn::forwarding::{self, ForwardingCheck, ForwardingReader, Waiting},
    registry::MapChange,
    vip::Spelt,
    wakeup::{Phase, Wakeups},
};

/// The held packets and what their replays wait for.
pub(super) struct Holding {
    packets: HeldPackets,
    /// Reads the node's forwarding before a replay (VIPs from OVN), and where it says so.
    forwarding: Option<ForwardingReader>,
    /// What waits for the node's forwarding now.
    waiting: HashSet<Waiting>,
    /// Whether unreadable forwarding was logged.
    forwarding_warned: bool,
}

impl Holding {
    /// Holds `packets`; with a `forwarding` reader, replays wait for the node's forwarding.
    pub(super) fn new(packets: HeldPackets, forwarding: Option<ForwardingReader>) -> Self {
        Self {
            packets,
            forwarding,
            waiting: HashSet::new(),
            forwarding_warned: false,
        }
    }

    /// Opening packets the kernel dropped for idle VIPs: held (within the limits), a scoped
    /// VIP's on the scope of the interface each arrived on.
    pub(super) fn on_held_packets(
        &mut self,
        frames: Vec<HeldBytes>,
        datapath: &mut Datapath,
        vips: &VipMap,
        interfaces: &Interfaces,
    ) {
        let now = clock::monotonic_ns();
        let held_vips: HashSet<VipKey> = frames.iter().map(HeldBytes::vip).collect();
        for frame in frames {
            let scope = vips.scope_for(&frame.vip(), interfaces.scope_of(frame.ifindex));
            self.packets.hold_in(frame, scope, now);
        }
        // Frames the kernel held just before their VIP got a backend.
        for vip in held_vips {
            self.follow_vip(vip, vips);
        }
        self.packets.replay_due(now, datapath);
    }

    /// The node's forwarding was read for a VIP on a datapath: its held packets there are
    /// due (if it still has a backend), and its wake-up reached forwarding.
    pub(super) fn on_forwarding_checked(
        &mut self,
        waiting: Waiting,
        check: ForwardingCheck,
        datapath: &mut Datapath,
        vips: &VipMap,
        wakeups: &mut Wakeups,
    ) {
        self.waiting.remove(&waiting);
        let vip = waiting.vip;
        match check {
            ForwardingCheck::Ready => {
                wakeups.reached(&vip, Phase::Forwarding, clock::monotonic_ns())
            }
            ForwardingCheck::TimedOut => warn!(
                vip = %Spelt(&vip),
                datapath = waiting.datapath,
                "the integration bridge's flows do not carry the backend yet: replaying anyway"
            ),
            ForwardingCheck::Unknown => {
                if let Some(reader) = &self.forwarding {
                    forwarding::warn_unknown_once(&mut self.forwarding_warned, &reader.target);
                }
            }
        }
        let now = clock::monotonic_ns();
        let key = HoldKey {
            vip,
            scope: waiting.datapath,
        };
        if vips.has_backends(&vip, key.scope) {
            self.packets.backends_appeared(&key, now);
        }
        self.packets.replay_due(now, datapath);
    }

    /// Held packets due: replayed, or discarded when too old.
    pub(super) fn on_replay_due(&mut self, datapath: &mut Datapath) {
        self.packets.replay_due(clock::monotonic_ns(), datapath);
    }

    /// Now and then, the kernel's counts of held packets are checked against the hold's.
    pub(super) fn on_heartbeat(&mut self, datapath: &mut Datapath) {
        self.packets
            .reconcile_kernel(clock::monotonic_ns(), datapath);
    }

    /// Tells the held packets what the map changes mean for them: a VIP with a backend now
    /// replays, one idle again waits, a deleted one discards.
    pub(super) fn follow_map(
        &mut self,
        changes: &[MapChange],
        datapath: &mut Datapath,
        vips: &VipMap,
    ) {
        if self.packets.is_empty() {
            return;
        }
        let now = clock::monotonic_ns();
        for change in changes {
            match change {
                MapChange::Upsert(key, _) | MapChange::Scopes { key, .. } => {
                    self.follow_vip(*key, vips);
                }
                MapChange::Remove(key) => self.packets.vip_removed(key, datapath),
            }
        }
        self.packets.replay_due(now, datapath);
    }

    /// When held packets are next due, on the monotonic clock.
    pub(super) fn next_due_ns(&self) -> Option<u64> {
        self.packets.next_due_ns()
    }

    /// What befell held packets since the last call.
    pub(super) fn take_news(&mut self) -> Vec<(HoldKey, PacketNews)> {
        self.packets.take_news()
    }

    /// How many packets of `vip` are held.
    pub(super) fn held_for(&self, vip: &VipKey) -> usize {
        self.packets.held_for(vip)
    }

    /// Tells each of `vip`'s waiting groups whether it has a backend now.
    fn follow_vip(&mut self, vip: VipKey, vips: &VipMap) {
        for scope in self.packets.scopes_held(&vip) {
            let key = HoldKey { vip, scope };
            if vips.has_backends(&vip, scope) {
                self.backends_appeared(key);
            } else {
                self.packets.backends_gone(&key);
            }
        }
    }

    /// `key` has a backend: its held packets are due once the node's forwarding carries the
    /// VIP on their logical datapath (read off the loop, with VIPs from OVN), else at once.
    fn backends_appeared(&mut self, key: HoldKey) {
        match &self.forwarding {
            Some(reader) => {
                let waiting = Waiting {
                    vip: key.vip,
                    datapath: key.scope,
                };
                if self.waiting.insert(waiting) {
                    reader.wait_for(waiting);
                }
            }
            None => self.packets.backends_appeared(&key, clock::monotonic_ns()),
        }
    }
}
