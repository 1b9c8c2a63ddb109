//! The agent's view of the VIP map: which VIPs exist, their ids, backends and load balancer.
//!
//! The kernel keys VIPs by [`VipKey`] and reports a `vip_id`; this registry hands out those ids
//! and turns them back into the VIP and its load balancer when an event arrives.

use unidler_common::{VIP_FLAG_SCOPED, VipKey, VipState};

use crate::{
    fast_hash::{FastMap, FastSet},
    vip::{DesiredVip, LoadBalancerName, ScopeEntry, Vip, VipUpdate},
};

/// A change the kernel's VIP maps need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// Insert or replace this entry.
    Upsert(VipKey, VipState),
    /// Remove this key.
    Remove(VipKey),
    /// The per-scope backends of a VIP (`(scope, backends)`), after its entry's upsert; empty
    /// when it is no longer scoped (or removed).
    Scopes {
        /// The VIP's key.
        key: VipKey,
        /// The VIP's id.
        vip_id: u32,
        /// Its backends on each scope where it is.
        scopes: Vec<(u32, u32)>,
    },
}

/// What the agent knows about one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipEntry {
    /// The VIP.
    pub vip: Vip,
    /// Id the kernel reports in events.
    pub vip_id: u32,
    /// Backend count written to the kernel.
    pub backends: u32,
    /// `VIP_FLAG_*` bits written to the kernel.
    pub flags: u32,
    /// The load balancer its events name (the Northbound Load_Balancer's UUID), when known.
    pub load_balancer: Option<LoadBalancerName>,
}

impl VipEntry {
    /// The map key and value the kernel gets for this entry (with a full rate-limit bucket).
    pub fn to_kernel(&self) -> (VipKey, VipState) {
        (
            self.vip.key(),
            VipState {
                backends: self.backends,
                vip_id: self.vip_id,
                flags: self.flags,
                _pad: 0,
                event_tat_ns: 0,
                hits: 0,
            },
        )
    }
}

/// What the registry keeps per VIP (the VIP itself is the key).
#[derive(Clone, Debug)]
struct Slot {
    vip_id: u32,
    backends: u32,
    flags: u32,
    load_balancer: Option<LoadBalancerName>,
}

impl Slot {
    fn entry(&self, vip: Vip) -> VipEntry {
        VipEntry {
            vip,
            vip_id: self.vip_id,
            backends: self.backends,
            flags: self.flags,
            load_balancer: self.load_balancer.clone(),
        }
    }
}

/// VIPs by address, each with an id that is never reused while the agent runs. One table, as
/// it holds every VIP of the cluster (100,000s).
#[derive(Debug, Default)]
pub struct VipRegistry {
    slots: FastMap<Vip, Slot>,
    /// The scoped VIPs' states per scope (few: only VIPs that differ between datapaths).
    scoped: FastMap<Vip, Box<[ScopeEntry]>>,
    next_id: u32,
}

impl VipRegistry {
    /// An empty registry; ids start at 1.
    pub fn new() -> Self {
        Self {
            next_id: 1,
            ..Self::default()
        }
    }

    /// Adds or updates a VIP and returns its entry (a new VIP gets a fresh id).
    pub fn upsert(
        &mut self,
        vip: Vip,
        backends: u32,
        flags: u32,
        load_balancer: Option<LoadBalancerName>,
    ) -> VipEntry {
        let slot = self.slots.entry(vip).or_insert_with(|| {
            let vip_id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            Slot {
                vip_id,
                backends,
                flags,
                load_balancer: None,
            }
        });
        slot.backends = backends;
        slot.flags = flags;
        slot.load_balancer = load_balancer;
        slot.entry(vip)
    }

    /// Applies a source's update with `flags` on every VIP; returns the map changes needed,
    /// leaving out VIPs whose entry did not change (so their rate limiters keep their state).
    pub fn apply(&mut self, update: VipUpdate, flags: u32) -> Vec<MapChange> {
        let mut changes = Vec::new();
        let full = matches!(update, VipUpdate::Replace(_));
        let (upsert, remove) = match update {
            VipUpdate::Replace(all) => {
                let gone: Vec<Vip> = if self.slots.is_empty() {
                    Vec::new()
                } else {
                    let wanted: FastSet<Vip> = all.iter().map(|d| d.vip).collect();
                    self.slots
                        .keys()
                        .filter(|v| !wanted.contains(v))
                        .copied()
                        .collect()
                };
                (all, gone)
            }
            VipUpdate::Changes { upsert, remove } => (upsert, remove),
        };
        for vip in remove {
            let was_scoped = self.scoped.contains_key(&vip);
            if let Some(entry) = self.remove(&vip) {
                if was_scoped {
                    changes.push(MapChange::Scopes {
                        key: vip.key(),
                        vip_id: entry.vip_id,
                        scopes: Vec::new(),
                    });
                }
                changes.push(MapChange::Remove(vip.key()));
            }
        }
        self.slots.reserve(upsert.len());
        for DesiredVip {
            vip,
            backends,
            load_balancer,
            scoped,
        } in upsert
        {
            let flags = if scoped.is_some() {
                flags | VIP_FLAG_SCOPED
            } else {
                flags
            };
            let scopes_unchanged = self.scoped.get(&vip) == scoped.as_ref();
            let unchanged = scopes_unchanged
                && self.slots.get(&vip).is_some_and(|s| {
                    s.backends == backends && s.flags == flags && s.load_balancer == load_balancer
                });
            if unchanged {
                continue;
            }
            let entry = self.upsert(vip, backends, flags, load_balancer);
            let (key, state) = entry.to_kernel();
            changes.push(MapChange::Upsert(key, state));
            if !scopes_unchanged {
                let scopes = scoped
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| (s.scope, s.backends))
                    .collect();
                changes.push(MapChange::Scopes {
                    key,
                    vip_id: entry.vip_id,
                    scopes,
                });
                match scoped {
                    Some(scoped) => self.scoped.insert(vip, scoped),
                    None => self.scoped.remove(&vip),
                };
            }
        }
        if full {
            // After a full sync the table keeps no more room than it needs.
            self.slots.shrink_to_fit();
        }
        changes
    }

    /// Number of VIPs with zero backends.
    pub fn idle_count(&self) -> usize {
        self.slots.values().filter(|s| s.backends == 0).count()
    }

    /// Forgets a VIP; returns its entry if it was known.
    pub fn remove(&mut self, vip: &Vip) -> Option<VipEntry> {
        self.scoped.remove(vip);
        self.slots.remove(vip).map(|s| s.entry(*vip))
    }

    /// The per-scope states of a scoped VIP.
    pub fn scopes(&self, vip: &Vip) -> Option<&[ScopeEntry]> {
        self.scoped.get(vip).map(|s| &**s)
    }

    /// The load balancer events name for `vip` on `scope` (None: the interface has no
    /// scope): the scope's own for a scoped VIP, else the VIP's.
    pub fn load_balancer_on(&self, vip: &Vip, scope: Option<u32>) -> Option<LoadBalancerName> {
        if let (Some(scopes), Some(scope)) = (self.scoped.get(vip), scope)
            && let Some(entry) = scopes.iter().find(|s| s.scope == scope)
        {
            return entry.load_balancer.clone();
        }
        self.slots.get(vip)?.load_balancer.clone()
    }

    /// Whether `vip` is known.
    pub fn contains(&self, vip: &Vip) -> bool {
        self.slots.contains_key(vip)
    }

    /// The entry of `vip`, if known.
    pub fn get(&self, vip: &Vip) -> Option<VipEntry> {
        self.slots.get(vip).map(|s| s.entry(*vip))
    }

    /// Number of VIPs.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no VIPs.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = VipEntry> + '_ {
        self.slots.iter().map(|(vip, s)| s.entry(*vip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(s: &str, backends: u32) -> DesiredVip {
        DesiredVip {
            vip: vip(s),
            backends,
            load_balancer: None,
            scoped: None,
        }
    }

    #[test]
    fn apply_reconciles_and_skips_unchanged() {
        let mut reg = VipRegistry::new();
        let first = reg.apply(
            VipUpdate::Replace(vec![
                desired("10.0.0.1:80/tcp", 0),
                desired("10.0.0.2:80/tcp", 1),
            ]),
            0,
        );
        assert_eq!(first.len(), 2);
        // Same set again: nothing to do.
        let again = reg.apply(
            VipUpdate::Replace(vec![
                desired("10.0.0.1:80/tcp", 0),
                desired("10.0.0.2:80/tcp", 1),
            ]),
            0,
        );
        assert!(again.is_empty());
        // One changed, one gone.
        let next = reg.apply(VipUpdate::Replace(vec![desired("10.0.0.1:80/tcp", 3)]), 0);
        assert_eq!(next.len(), 2);
        assert!(next.contains(&MapChange::Remove(vip("10.0.0.2:80/tcp").key())));
        assert!(
            matches!(next.iter().find(|c| matches!(c, MapChange::Upsert(..))), Some(MapChange::Upsert(_, s)) if s.backends == 3)
        );
        let incremental = reg.apply(
            VipUpdate::Changes {
                upsert: vec![desired("10.0.0.3:80/tcp", 0)],
                remove: vec![vip("10.0.0.1:80/tcp")],
            },
            0,
        );
        assert_eq!(incremental.len(), 2);
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.idle_count(), 1);
    }

    fn vip(s: &str) -> Vip {
        s.parse::<crate::vip::VipSpec>().unwrap().vip
    }

    #[test]
    fn ids_are_stable_per_vip_and_fresh_after_removal() {
        let mut reg = VipRegistry::new();
        let a = reg.upsert(vip("10.0.0.1:80/tcp"), 0, 0, None).vip_id;
        let b = reg.upsert(vip("10.0.0.2:80/tcp"), 0, 0, None).vip_id;
        assert_ne!(a, b);
        let again = reg.upsert(vip("10.0.0.1:80/tcp"), 3, 0, Some("lb".into()));
        assert_eq!(again.vip_id, a);
        assert_eq!(reg.get(&vip("10.0.0.1:80/tcp")).unwrap().backends, 3);
        reg.remove(&vip("10.0.0.1:80/tcp")).unwrap();
        assert!(reg.get(&vip("10.0.0.1:80/tcp")).is_none());
        let c = reg.upsert(vip("10.0.0.1:80/tcp"), 0, 0, None).vip_id;
        assert!(c != a && c != b);
        assert_eq!(reg.len(), 2);
    }
}
