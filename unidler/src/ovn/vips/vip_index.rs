//! Every load balancer's record, and which load balancers that count have each VIP: what
//! the VIP map gets.

use std::collections::hash_map::Entry;

use ovsdb::{Error as DbError, RowUpdate};
use tracing::warn;

use super::{
    ids::{DatapathIds, RowKey},
    load_balancer::LbRecord,
    local_datapaths::LocalDatapaths,
};
use crate::{
    fast_hash::{FastMap, FastSet},
    vip::{DesiredVip, LoadBalancerName, ScopeEntry, Vip},
};

/// Every load balancer's record, and which load balancers that count have each VIP.
#[derive(Default)]
pub(super) struct OvnVips {
    pub(super) ids: DatapathIds,
    pub(super) local: LocalDatapaths,
    pub(super) by_lb: FastMap<RowKey, LbRecord>,
    /// `SB_Global`'s `options:controller_event=true`: every load balancer reports.
    pub(super) global_event: bool,
    /// The local load balancers having each watchable VIP.
    pub(super) lbs_of: FastMap<Vip, LbSet>,
}

impl OvnVips {
    /// Re-indexes every record (after a full load, or when the local datapaths or the
    /// rejecting load balancers changed) and returns every VIP.
    pub(super) fn reindex(&mut self) -> Vec<DesiredVip> {
        self.lbs_of.clear();
        let mut index: FastMap<Vip, LbSet> =
            FastMap::with_capacity_and_hasher(self.by_lb.len(), Default::default());
        let mut unwatchable = 0usize;
        for (key, record) in &self.by_lb {
            if !record.is_local(&self.local) {
                continue;
            }
            for vip in record.watchable_vips() {
                add_lb_of(&mut index, vip, *key);
            }
            unwatchable += record
                .vips
                .as_slice()
                .iter()
                .filter(|v| v.vip.is_none())
                .count();
        }
        if unwatchable > 0 {
            warn!(
                vips = unwatchable,
                "VIPs without a port (or templates) are not watched: OVN, not unidler, reports them"
            );
        }
        index.shrink_to_fit();
        self.lbs_of = index;
        self.by_lb.shrink_to_fit();
        self.lbs_of
            .keys()
            .filter_map(|v| self.combined(v))
            .collect()
    }

    /// Applies one row's update incrementally; adds the VIPs whose state may have changed
    /// to `touched`.
    pub(super) fn update(
        &mut self,
        key: RowKey,
        update: RowUpdate,
        touched: &mut FastSet<Vip>,
    ) -> Result<(), DbError> {
        if let Some(old) = self.by_lb.get(&key).filter(|r| r.is_local(&self.local)) {
            for vip in old.watchable_vips() {
                touched.insert(vip);
                if let Some(lbs) = self.lbs_of.get_mut(&vip)
                    && lbs.remove(key)
                {
                    self.lbs_of.remove(&vip);
                }
            }
        }
        let record = match update {
            RowUpdate::Initial(row) | RowUpdate::Insert(row) => {
                self.by_lb
                    .insert(key, LbRecord::from_row(&row, &mut self.ids));
                self.by_lb.get(&key)
            }
            RowUpdate::Modify(diff) => {
                let record = self.by_lb.get_mut(&key).ok_or_else(|| {
                    DbError::Protocol(format!("modify of unknown Load_Balancer {}", key.uuid()))
                })?;
                record.apply_diff(&diff, &mut self.ids);
                Some(&*record)
            }
            RowUpdate::Delete => {
                self.by_lb.remove(&key);
                None
            }
        };
        if let Some(record) = record.filter(|r| r.is_local(&self.local)) {
            for vip in record.watchable_vips() {
                touched.insert(vip);
                add_lb_of(&mut self.lbs_of, vip, key);
            }
        }
        Ok(())
    }

    /// Whether load balancer `key` reports its empty VIPs ([`LbRecord::reports`]).
    pub(super) fn reports(&self, key: &RowKey) -> bool {
        self.by_lb
            .get(key)
            .is_some_and(|r| r.reports(self.global_event))
    }

    /// One VIP over every local load balancer that has it: watched if one of them reports
    /// (None otherwise: OVN forwards or drops it without an event), active if any of them
    /// has backends; the first (by UUID) idle one that reports is the one events name. Where
    /// the local datapaths see it differently (not every load balancer applies on each), the
    /// VIP is scoped: its state on each datapath, over the load balancers applying there;
    /// a datapath where no load balancer that reports has it, and none forwards it, has no
    /// entry (the datapath lets the packet pass).
    pub(super) fn combined(&self, vip: &Vip) -> Option<DesiredVip> {
        let lbs = self.lbs_of.get(vip)?;
        if !lbs.iter().any(|key| self.reports(key)) {
            // Not one the agent watches: OVN forwards it, or drops it without an event.
            return None;
        }
        let (backends, name) = self.combine(vip, lbs.iter())?;
        let mut scoped = Vec::new();
        let mut differs = false;
        // With one local datapath every load balancer indexed here applies on it: nothing
        // can differ.
        let datapaths = match self.local.datapaths.as_slice() {
            [_, _, ..] => self.local.datapaths.as_slice(),
            _ => &[],
        };
        for dp in datapaths {
            let here = self.combine(
                vip,
                lbs.iter().filter(|key| {
                    self.by_lb
                        .get(key)
                        .is_some_and(|r| r.applies_on(dp.id, &self.local))
                }),
            );
            differs |= here.as_ref().map(|(b, n)| (*b > 0, n)) != Some((backends > 0, &name));
            if let Some((backends, name)) = here {
                scoped.push(ScopeEntry {
                    scope: dp.tunnel_key,
                    backends,
                    load_balancer: Some(name),
                });
            }
        }
        scoped.sort_by_key(|e| e.scope);
        Some(DesiredVip {
            vip: *vip,
            backends,
            load_balancer: Some(name),
            scoped: differs.then(|| scoped.into_boxed_slice()),
        })
    }

    /// The backends and the name of `vip` over the load balancers `lbs` (see
    /// [`OvnVips::combined`]): the most backends any of them has, and the first idle one
    /// that reports (else the first that reports, else, for a VIP only forwarded, the first
    /// that forwards it). None if no load balancer among them that reports has it and none
    /// forwards it.
    pub(super) fn combine<'a>(
        &self,
        vip: &Vip,
        lbs: impl Iterator<Item = &'a RowKey>,
    ) -> Option<(u32, LoadBalancerName)> {
        let mut backends = 0;
        let mut named: Option<(RowKey, u32)> = None;
        let mut forwarding: Option<RowKey> = None;
        for key in lbs {
            let Some(record) = self.by_lb.get(key) else {
                continue;
            };
            let Some(v) = record.vips.find(vip) else {
                continue;
            };
            backends = backends.max(v.backends);
            if v.backends > 0 {
                forwarding.get_or_insert(*key);
            }
            if record.reports(self.global_event)
                && named.is_none_or(|(_, b)| b > 0 && v.backends == 0)
            {
                named = Some((*key, v.backends));
            }
        }
        let key = named.map(|(key, _)| key).or(forwarding)?;
        Some((backends, LbRecord::name(key)))
    }
}

pub(super) fn add_lb_of(index: &mut FastMap<Vip, LbSet>, vip: Vip, lb: RowKey) {
    match index.entry(vip) {
        Entry::Vacant(e) => {
            e.insert(LbSet::One(lb));
        }
        Entry::Occupied(mut e) => e.get_mut().insert(lb),
    }
}

/// The load balancers having one VIP, sorted: almost always exactly one, kept without an
/// allocation of its own.
#[derive(Debug)]
pub(super) enum LbSet {
    One(RowKey),
    Many(Vec<RowKey>),
}

impl LbSet {
    pub(super) fn insert(&mut self, lb: RowKey) {
        match self {
            LbSet::One(only) if *only == lb => {}
            LbSet::One(only) => {
                let mut all = vec![*only, lb];
                all.sort();
                *self = LbSet::Many(all);
            }
            LbSet::Many(all) => {
                if let Err(at) = all.binary_search(&lb) {
                    all.insert(at, lb);
                }
            }
        }
    }

    /// Removes `lb`; true when no load balancer is left.
    pub(super) fn remove(&mut self, lb: RowKey) -> bool {
        match self {
            LbSet::One(only) => *only == lb,
            LbSet::Many(all) => {
                all.retain(|l| *l != lb);
                match all.as_slice() {
                    [] => true,
                    [only] => {
                        *self = LbSet::One(*only);
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &RowKey> {
        match self {
            LbSet::One(only) => std::slice::from_ref(only).iter(),
            LbSet::Many(all) => all.iter(),
        }
    }
}
