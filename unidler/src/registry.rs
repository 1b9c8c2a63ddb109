//! The agent's view of the VIP map: which VIPs exist, their ids, backends and load balancer.
//!
//! The kernel keys VIPs by [`VipKey`] and reports a `vip_id`; this registry hands out those ids
//! and turns them back into the VIP and its load balancer when an event arrives.

use std::collections::HashMap;

use unidler_common::{VipKey, VipState};

use crate::vip::Vip;

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
    /// UUID of the Northbound Load_Balancer the VIP belongs to, when known.
    pub load_balancer: Option<String>,
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
            },
        )
    }
}

/// VIPs by id and by address, with ids that are never reused while the agent runs.
#[derive(Debug, Default)]
pub struct VipRegistry {
    by_vip: HashMap<Vip, u32>,
    by_id: HashMap<u32, VipEntry>,
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
        load_balancer: Option<String>,
    ) -> &VipEntry {
        let id = *self.by_vip.entry(vip).or_insert_with(|| {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            id
        });
        let entry = VipEntry {
            vip,
            vip_id: id,
            backends,
            flags,
            load_balancer,
        };
        self.by_id.insert(id, entry);
        &self.by_id[&id]
    }

    /// Forgets a VIP; returns its entry if it was known.
    pub fn remove(&mut self, vip: &Vip) -> Option<VipEntry> {
        let id = self.by_vip.remove(vip)?;
        self.by_id.remove(&id)
    }

    /// The entry a kernel event's `vip_id` refers to.
    pub fn by_id(&self, vip_id: u32) -> Option<&VipEntry> {
        self.by_id.get(&vip_id)
    }

    /// Number of VIPs.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no VIPs.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &VipEntry> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(reg.by_id(a).unwrap().backends, 3);
        reg.remove(&vip("10.0.0.1:80/tcp")).unwrap();
        assert!(reg.by_id(a).is_none());
        let c = reg.upsert(vip("10.0.0.1:80/tcp"), 0, 0, None).vip_id;
        assert!(c != a && c != b);
        assert_eq!(reg.len(), 2);
    }
}
