//! What the source keeps of one load balancer ([`LbRecord`]): its VIPs, options and
//! datapaths, updated in place from the server's diffs.

use std::net::SocketAddr;

use ovsdb::{Atom, ColumnKind, Row, Value};

use super::{
    ids::{DatapathIds, RowKey},
    local_datapaths::LocalDatapaths,
    monitors::GROUP_COLUMNS,
};
use crate::{
    fast_hash::FastMap,
    vip::{LoadBalancerName, Protocol, Vip},
};

/// One VIP of a load balancer: the `vips` map's key and value, exactly as the server sent
/// them (a map diff is applied by comparing them: a pair whose value equals the current one
/// removes the key), and what they mean.
#[derive(Clone, Debug)]
pub(super) struct VipRecord {
    /// The key (`10.0.0.5:80`), then the value (the backends), in one allocation.
    pub(super) text: Box<str>,
    /// Length of the key in `text`.
    pub(super) key_len: u32,
    /// The VIP; None for keys the datapath cannot watch (no port, templates).
    pub(super) vip: Option<Vip>,
    /// Number of backends.
    pub(super) backends: u32,
}

impl VipRecord {
    pub(super) fn new(key: &str, backends: &str, protocol: Protocol) -> Self {
        Self {
            text: [key, backends].concat().into_boxed_str(),
            key_len: key.len() as u32,
            vip: key
                .parse::<SocketAddr>()
                .ok()
                .map(|addr| Vip::new(addr, protocol)),
            backends: count_backends(backends),
        }
    }

    /// The `vips` key.
    pub(super) fn key(&self) -> &str {
        &self.text[..self.key_len as usize]
    }

    /// The `vips` value.
    pub(super) fn value(&self) -> &str {
        &self.text[self.key_len as usize..]
    }

    /// The same key with another value.
    pub(super) fn with_value(&self, backends: &str) -> Self {
        Self {
            text: [self.key(), backends].concat().into_boxed_str(),
            key_len: self.key_len,
            vip: self.vip,
            backends: count_backends(backends),
        }
    }
}

pub(super) fn count_backends(backends: &str) -> u32 {
    backends.split(',').filter(|b| !b.trim().is_empty()).count() as u32
}

/// What the source keeps of one Southbound Load_Balancer row: enough to tell its VIPs and
/// where they apply, and to apply the server's diffs of the columns it reads. Events name it
/// by its row ([`LbRecord::name`]).
#[derive(Clone, Debug, Default)]
pub(super) struct LbRecord {
    /// The `protocol` column (absent: TCP).
    pub(super) protocol: Option<Protocol>,
    /// `datapath_group`, `ls_datapath_group` and `lr_datapath_group` ([`GROUP_COLUMNS`]), as
    /// [`DatapathIds`] ids (0: none).
    pub(super) dp_groups: [u32; 3],
    /// `datapaths`, as [`DatapathIds`] ids.
    pub(super) dp_list: Box<[u32]>,
    pub(super) vips: VipRecords,
    /// `options:event`, as the server sent it (kept whole: a diff pair removes it only if it
    /// equals it).
    pub(super) event: OptionValue,
    /// `options:reject`, likewise.
    pub(super) reject: OptionValue,
}

/// One value of a load balancer's `options`, exactly as sent: `true` (by far the most
/// common, kept without an allocation: 100,000 load balancers of idle services have it),
/// another text, or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum OptionValue {
    #[default]
    Absent,
    True,
    Other(Box<str>),
}

impl OptionValue {
    /// Applies a map diff pair's `value` (RFC 7047 `update2`): the same value removes it.
    pub(super) fn apply(&mut self, value: &str) {
        *self = if self.is(value) {
            OptionValue::Absent
        } else if value == "true" {
            OptionValue::True
        } else {
            OptionValue::Other(value.into())
        };
    }

    /// Whether it is exactly `value`.
    pub(super) fn is(&self, value: &str) -> bool {
        match self {
            OptionValue::Absent => false,
            OptionValue::True => value == "true",
            OptionValue::Other(text) => **text == *value,
        }
    }

    /// Whether northd reads it as true (without case).
    pub(super) fn is_true(&self) -> bool {
        match self {
            OptionValue::Absent => false,
            OptionValue::True => true,
            OptionValue::Other(text) => text.eq_ignore_ascii_case("true"),
        }
    }
}

/// A load balancer's VIPs. One (as ovn-kubernetes makes them: a load balancer per service)
/// is kept inline: no allocation per load balancer, and none left scattered over the heap
/// between the transient ones of parsing a large monitor reply.
#[derive(Clone, Debug)]
pub(super) enum VipRecords {
    One(VipRecord),
    Many(Box<[VipRecord]>),
}

impl Default for VipRecords {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl VipRecords {
    pub(super) fn as_slice(&self) -> &[VipRecord] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::Many(all) => all,
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [VipRecord] {
        match self {
            Self::One(one) => std::slice::from_mut(one),
            Self::Many(all) => all,
        }
    }

    pub(super) fn into_vec(self) -> Vec<VipRecord> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(all) => all.into_vec(),
        }
    }

    /// Sorted by VIP, so that [`VipRecords::find`] costs a binary search, not a pass: a
    /// load balancer with 100,000 VIPs has each of them looked up at every change of it.
    pub(super) fn from_vec(mut all: Vec<VipRecord>) -> Self {
        match all.len() {
            1 => Self::One(all.pop().expect("one")),
            _ => {
                all.sort_unstable_by_key(|v| v.vip);
                Self::Many(all.into_boxed_slice())
            }
        }
    }

    /// The record of `vip` (one of them, if two keys spell it).
    pub(super) fn find(&self, vip: &Vip) -> Option<&VipRecord> {
        let all = self.as_slice();
        let at = all.binary_search_by_key(&Some(*vip), |v| v.vip).ok()?;
        all.get(at)
    }
}

/// Up to this many pairs in a `vips` diff, each is looked up by a pass over the VIPs.
pub(super) const FEW_PAIRS: usize = 4;

/// Applies one pair of a `vips` map diff to `all`: a new key is added, an existing one takes
/// the pair's value, or is removed if it already has it (RFC 7047's `update2` diff).
pub(super) fn apply_pair(all: &mut Vec<VipRecord>, key: &str, value: &str, protocol: Protocol) {
    match all.iter().position(|v| v.key() == key) {
        Some(i) if all[i].value() == value => {
            all.swap_remove(i);
        }
        Some(i) => all[i] = all[i].with_value(value),
        None => all.push(VipRecord::new(key, value, protocol)),
    }
}

impl LbRecord {
    pub(super) fn from_row(row: &Row, ids: &mut DatapathIds) -> Self {
        let mut record = Self::default();
        record.apply_diff(row, ids);
        record
    }

    /// Applies an `update2` modify (only the changed columns, each as its kind in OVN's
    /// schema has it: `protocol` and the groups, optional, as their new value; `datapaths`, a
    /// set, as the elements that changed; `vips` and `options`, maps, as the pairs that did);
    /// from an empty record, a whole row applies the same way.
    pub(super) fn apply_diff(&mut self, diff: &Row, ids: &mut DatapathIds) {
        for (column, slot) in GROUP_COLUMNS.iter().zip(&mut self.dp_groups) {
            if let Some(group) = diff.get(*column) {
                *slot = group
                    .atoms()
                    .first()
                    .and_then(Atom::as_uuid)
                    .map_or(0, |u| ids.id(u));
            }
        }
        if let Some(datapaths) = diff.get("datapaths") {
            let mut current = Value::Set(ids.uuids(&self.dp_list));
            current.apply_diff(datapaths, ColumnKind::Set);
            self.dp_list = current
                .atoms()
                .iter()
                .filter_map(Atom::as_uuid)
                .map(|u| ids.id(u))
                .collect();
        }
        if let Some(protocol) = diff.get("protocol") {
            let protocol = protocol
                .atoms()
                .first()
                .and_then(Atom::as_str)
                .and_then(|p| p.parse().ok());
            if protocol != self.protocol {
                self.protocol = protocol;
                let protocol = self.protocol();
                for v in self.vips.as_mut_slice() {
                    if let Some(vip) = &mut v.vip {
                        vip.protocol = protocol;
                    }
                }
            }
        }
        if let Some(options) = diff.get("options") {
            for (key, value) in options.pairs() {
                let slot = match key.as_str() {
                    Some("event") => &mut self.event,
                    Some("reject") => &mut self.reject,
                    _ => continue,
                };
                slot.apply(value.as_str().unwrap_or_default());
            }
        }
        if let Some(vips) = diff.get("vips") {
            let protocol = self.protocol();
            let mut all = std::mem::take(&mut self.vips).into_vec();
            let pairs = vips.pairs().iter().map(|(key, value)| {
                (
                    key.as_str().unwrap_or_default(),
                    value.as_str().unwrap_or_default(),
                )
            });
            if all.is_empty() {
                // A whole row (or the first VIPs): every pair is new.
                all.extend(pairs.map(|(key, value)| VipRecord::new(key, value, protocol)));
            } else if vips.pairs().len() <= FEW_PAIRS {
                for (key, value) in pairs {
                    apply_pair(&mut all, key, value, protocol);
                }
            } else {
                // Many pairs against many VIPs: one pass over each, not one over the VIPs for
                // every pair.
                let mut changes: FastMap<&str, &str> = pairs.clone().collect();
                all.retain_mut(|v| match changes.remove(v.key()) {
                    None => true,
                    Some(value) if value == v.value() => false,
                    Some(value) => {
                        *v = v.with_value(value);
                        true
                    }
                });
                all.extend(pairs.filter_map(|(key, _)| {
                    let value = changes.remove(key)?;
                    Some(VipRecord::new(key, value, protocol))
                }));
            }
            self.vips = VipRecords::from_vec(all);
        }
    }

    pub(super) fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::Tcp)
    }

    /// Whether OVN reports its empty VIPs (it has `options:event=true`, or `global_event`
    /// makes every load balancer report) rather than rejecting them (`options:reject=true`);
    /// northd reads both without case.
    pub(super) fn reports(&self, global_event: bool) -> bool {
        (global_event || self.event.is_true()) && !self.reject.is_true()
    }

    /// Its VIPs the datapath can watch (an address and a port; not templates).
    pub(super) fn watchable_vips(&self) -> impl Iterator<Item = Vip> + '_ {
        self.vips.as_slice().iter().filter_map(|v| v.vip)
    }

    /// Whether it applies on the local datapath `dp` (a [`DatapathIds`] id).
    pub(super) fn applies_on(&self, dp: u32, local: &LocalDatapaths) -> bool {
        self.dp_list.contains(&dp)
            || self.dp_groups.iter().any(|group| {
                *group != 0 && local.groups.get(group).is_some_and(|g| g.contains(&dp))
            })
    }

    /// Whether it applies on any of this node's datapaths (all of them while those are not
    /// known).
    pub(super) fn is_local(&self, local: &LocalDatapaths) -> bool {
        local.datapaths.is_empty() || local.datapaths.iter().any(|d| self.applies_on(d.id, local))
    }

    /// The name events give: the row's `lb_id` (else its UUID), read when an event needs it.
    /// northd sets `lb_id` when it inserts the row and never changes it.
    pub(super) fn name(key: RowKey) -> LoadBalancerName {
        LoadBalancerName::SouthboundRow(key.0)
    }
}
