//! The agent's handlers for held packets: frames from the kernel's held ring, VIPs that got a
//! backend, the node's forwarding checked, replays due.

use std::collections::HashSet;

use tracing::warn;
use unidler_common::VipKey;

use super::Agent;
use crate::{
    clock,
    hold::{HeldBytes, HoldKey},
    ovn::forwarding::{self, ForwardingCheck, Waiting},
    registry::MapChange,
    vip::{Spelt, Vip},
    wakeup::Phase,
};

impl Agent {
    /// Opening packets the kernel dropped for idle VIPs: held (within the limits), a scoped
    /// VIP's on the scope of the interface each arrived on.
    pub(super) fn on_held_packets(&mut self, frames: Vec<HeldBytes>) {
        let now = clock::monotonic_ns();
        let vips: HashSet<VipKey> = frames.iter().map(HeldBytes::vip).collect();
        for frame in frames {
            let scope = self.hold_scope(&frame.vip(), frame.ifindex);
            self.held.hold_in(frame, scope, now);
        }
        // Frames the kernel held just before their VIP got a backend.
        for vip in vips {
            self.held_follow(vip);
        }
        self.held.replay_due(now, &mut self.datapath);
    }

    /// What a held packet of `vip` from interface `ifindex` waits on: for a scoped VIP the
    /// interface's scope, else the VIP node-wide (0).
    pub(super) fn hold_scope(&self, vip: &VipKey, ifindex: u32) -> u32 {
        let scoped = Vip::from_key(vip).is_some_and(|v| self.registry.scopes(&v).is_some());
        match scoped {
            true => self.iface_scopes.get(&ifindex).copied().unwrap_or(0),
            false => 0,
        }
    }

    /// Whether `vip` has backends now for packets waiting on `scope` (0: node-wide): on a
    /// scope, the VIP's backends there, or, if it is not there (any more), yes: the kernel
    /// passes such packets on.
    pub(super) fn has_backends(&self, vip: &VipKey, scope: u32) -> bool {
        let Some(vip) = Vip::from_key(vip) else {
            return false;
        };
        if scope != 0
            && let Some(scopes) = self.registry.scopes(&vip)
        {
            return scopes
                .iter()
                .find(|s| s.scope == scope)
                .is_none_or(|s| s.backends > 0);
        }
        self.registry.get(&vip).is_some_and(|e| e.backends > 0)
    }

    /// Tells each of `vip`'s waiting groups whether it has a backend now.
    fn held_follow(&mut self, vip: VipKey) {
        for scope in self.held.scopes_held(&vip) {
            let key = HoldKey { vip, scope };
            if self.has_backends(&vip, scope) {
                self.backends_appeared(key);
            } else {
                self.held.backends_gone(&key);
            }
        }
    }

    /// `key` has a backend: its held packets are due once the node's forwarding carries the
    /// VIP on their logical datapath (read off the loop, with VIPs from OVN), else at once.
    pub(super) fn backends_appeared(&mut self, key: HoldKey) {
        match &self.forwarding {
            Some(reader) => {
                let waiting = Waiting {
                    vip: key.vip,
                    datapath: key.scope,
                };
                if self.forwarding_pending.insert(waiting) {
                    reader.wait_for(waiting);
                }
            }
            None => self.held.backends_appeared(&key, clock::monotonic_ns()),
        }
    }

    /// The node's forwarding was read for a VIP on a datapath: its held packets there are
    /// due (if it still has a backend).
    pub(super) fn on_forwarding_checked(&mut self, waiting: Waiting, readiness: ForwardingCheck) {
        self.forwarding_pending.remove(&waiting);
        let vip = waiting.vip;
        match readiness {
            ForwardingCheck::Ready => {
                self.wakeups
                    .reached(&vip, Phase::Forwarding, clock::monotonic_ns())
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
        if self.has_backends(&vip, key.scope) {
            self.held.backends_appeared(&key, now);
        }
        self.held.replay_due(now, &mut self.datapath);
    }

    /// Held packets due: replayed, or discarded when too old.
    pub(super) fn on_replay_due(&mut self) {
        self.held
            .replay_due(clock::monotonic_ns(), &mut self.datapath);
    }

    /// Tells the held packets what the map changes mean for them: a VIP with a backend now
    /// replays, one idle again waits, a deleted one discards.
    pub(super) fn hold_follows(&mut self, changes: &[MapChange]) {
        if self.held.is_empty() {
            return;
        }
        let now = clock::monotonic_ns();
        for change in changes {
            match change {
                MapChange::Upsert(key, _) | MapChange::Scopes { key, .. } => {
                    self.held_follow(*key);
                }
                MapChange::Remove(key) => self.held.vip_removed(key, &mut self.datapath),
            }
        }
        self.held.replay_due(now, &mut self.datapath);
    }
}
