//! The agent's handlers for held packets: frames from the kernel's held ring, VIPs that got a
//! backend, the node's forwarding checked, replays due.

use std::collections::HashSet;

use tracing::warn;
use unidler_common::VipKey;

use super::Agent;
use crate::{
    datapath::{self, HeldBytes},
    forwarding::{self, ForwardingCheck},
    registry::MapChange,
    vip::Vip,
};

impl Agent {
    /// Opening packets the kernel dropped for idle VIPs: held (within the limits).
    pub(super) fn on_held_packets(&mut self, frames: Vec<HeldBytes>) {
        let now = datapath::monotonic_ns();
        let vips: HashSet<VipKey> = frames.iter().map(|f| f.vip).collect();
        for frame in frames {
            self.held.hold(frame, now);
        }
        // Frames the kernel held just before their VIP got a backend.
        for vip in vips {
            if self.has_backends(&vip) {
                self.backends_appeared(vip);
            }
        }
        self.held.replay_due(now, &mut self.datapath);
    }

    /// Whether the registry gives `vip` backends now.
    pub(super) fn has_backends(&self, vip: &VipKey) -> bool {
        Vip::from_key(vip)
            .and_then(|v| self.registry.get(&v))
            .is_some_and(|e| e.backends > 0)
    }

    /// `vip` has a backend: its held packets are due once the node's forwarding carries it
    /// (checked off the loop, with VIPs from OVN), else at once.
    pub(super) fn backends_appeared(&mut self, vip: VipKey) {
        if self.held.held_for(&vip) == 0 {
            return;
        }
        match &self.forwarding {
            Some((reader, done)) => {
                if self.forwarding_pending.insert(vip) {
                    reader.wait_for(vip, done.clone());
                }
            }
            None => self.held.backends_appeared(&vip, datapath::monotonic_ns()),
        }
    }

    /// The node's forwarding was checked for `vip`: its held packets are due (if it still has
    /// a backend).
    pub(super) fn on_forwarding_checked(&mut self, vip: VipKey, readiness: ForwardingCheck) {
        self.forwarding_pending.remove(&vip);
        match readiness {
            ForwardingCheck::Ready => {}
            ForwardingCheck::TimedOut => warn!(
                vip = ?Vip::from_key(&vip).map(|v| v.to_string()),
                "the integration bridge's flows do not carry the backend yet: replaying anyway"
            ),
            ForwardingCheck::Unknown => {
                if let Some((reader, _)) = &self.forwarding {
                    forwarding::warn_unknown_once(&mut self.forwarding_warned, &reader.target);
                }
            }
        }
        if self.has_backends(&vip) {
            let now = datapath::monotonic_ns();
            self.held.backends_appeared(&vip, now);
            self.held.replay_due(now, &mut self.datapath);
        }
    }

    /// Held packets due: replayed, or discarded when too old.
    pub(super) fn on_replay_due(&mut self) {
        self.held
            .replay_due(datapath::monotonic_ns(), &mut self.datapath);
    }

    /// Tells the held packets what the map changes mean for them: a VIP with a backend now
    /// replays, one idle again waits, a deleted one discards.
    pub(super) fn hold_follows(&mut self, changes: &[MapChange]) {
        if self.held.is_empty() {
            return;
        }
        let now = datapath::monotonic_ns();
        for change in changes {
            match change {
                MapChange::Upsert(key, state) if state.backends > 0 => self.backends_appeared(*key),
                MapChange::Upsert(key, _) => self.held.backends_gone(key),
                MapChange::Remove(key) => self.held.vip_removed(key, &mut self.datapath),
                MapChange::Scopes { .. } => {}
            }
        }
        self.held.replay_due(now, &mut self.datapath);
    }
}
