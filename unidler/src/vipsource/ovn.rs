//! VIPs from the OVN Southbound `Load_Balancer` table: every VIP OVN itself would report an
//! empty-backend event for. Every load balancer is followed: one that does not report
//! (no `options:event=true`) but has backends for a VIP keeps that VIP active wherever it
//! applies, as OVN forwards there. Which load balancers report, and which reject, each
//! record keeps from its `options` (only `event` and `reject`, compared as northd does,
//! without case).
//!
//! The table is followed as an [`ovsdb::TableConsumer`], not replicated: per load balancer the
//! source keeps a compact record of the few facts it needs ([`LbRecord`]), updated in place
//! from the server's diffs, and the rows of the first monitor reply are taken one by one as
//! the client parses them. 100,000 load balancers cost a few hundred bytes each.

use std::{
    collections::hash_map::Entry,
    hash::Hash,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ovsdb::{
    Atom, Changed, ConsumerHandle, Error as DbError, Replica, Row, RowUpdate, TableConsumer, Uuid,
    Value,
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    fast_hash::{FastMap, FastSet},
    vip::{DesiredVip, LoadBalancerName, Protocol, ScopeEntry, Vip, VipUpdate},
};

/// The Southbound table the source follows.
pub const TABLE: &str = "Load_Balancer";
/// Its columns the source reads (of `options`, only `event` and `reject` are kept). Not
/// `external_ids`: its
/// `lb_id`, the name events give, is read for the few load balancers that are hit, when they
/// are ([`crate::lb_names`]); with 100,000s of load balancers the column is a fifth of what
/// the server composes at every agent's start.
pub const COLUMNS: [&str; 5] = ["vips", "protocol", "datapaths", "datapath_group", "options"];

/// Its columns the source reads where the schema has them: from OVN 23.09, northd puts a
/// load balancer's logical switches and routers in these two groups (and leaves
/// `datapath_group` empty) once every chassis can read them.
pub const OPTIONAL_COLUMNS: [&str; 2] = ["ls_datapath_group", "lr_datapath_group"];

/// The columns naming a load balancer's datapath group, in [`LbRecord::dp_groups`]' order.
const GROUP_COLUMNS: [&str; 3] = ["datapath_group", "ls_datapath_group", "lr_datapath_group"];

/// A Southbound row's UUID (a load balancer's, a logical datapath's or a datapath group's), as
/// two words (8-byte aligned: smaller tables than `u128`). Ordered as the UUID's text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RowKey([u64; 2]);

impl RowKey {
    fn new(uuid: &Uuid) -> Self {
        let n = uuid.as_u128();
        Self([(n >> 64) as u64, n as u64])
    }

    fn uuid(self) -> Uuid {
        Uuid::from_u128((u128::from(self.0[0]) << 64) | u128::from(self.0[1]))
    }
}

/// One VIP of a load balancer: the `vips` map's key and value, exactly as the server sent
/// them (a map diff is applied by comparing them: a pair whose value equals the current one
/// removes the key), and what they mean.
#[derive(Clone, Debug)]
struct VipRecord {
    /// The key (`10.0.0.5:80`), then the value (the backends), in one allocation.
    text: Box<str>,
    /// Length of the key in `text`.
    key_len: u32,
    /// The VIP; None for keys the datapath cannot watch (no port, templates).
    vip: Option<Vip>,
    /// Number of backends.
    backends: u32,
}

impl VipRecord {
    fn new(key: &str, backends: &str, protocol: Protocol) -> Self {
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
    fn key(&self) -> &str {
        &self.text[..self.key_len as usize]
    }

    /// The `vips` value.
    fn value(&self) -> &str {
        &self.text[self.key_len as usize..]
    }

    /// The same key with another value.
    fn with_value(&self, backends: &str) -> Self {
        Self {
            text: [self.key(), backends].concat().into_boxed_str(),
            key_len: self.key_len,
            vip: self.vip,
            backends: count_backends(backends),
        }
    }
}

fn count_backends(backends: &str) -> u32 {
    backends.split(',').filter(|b| !b.trim().is_empty()).count() as u32
}

/// What the source keeps of one Southbound Load_Balancer row: enough to tell its VIPs and
/// where they apply, and to apply the server's diffs of the columns it reads. Events name it
/// by its row ([`LbRecord::name`]).
#[derive(Clone, Debug, Default)]
struct LbRecord {
    /// The `protocol` column (absent: TCP).
    protocol: Option<Protocol>,
    /// `datapath_group`, `ls_datapath_group` and `lr_datapath_group` ([`GROUP_COLUMNS`]), as
    /// [`DatapathIds`] ids (0: none).
    dp_groups: [u32; 3],
    /// `datapaths`, as [`DatapathIds`] ids.
    dp_list: Box<[u32]>,
    vips: VipRecords,
    /// `options:event`, as the server sent it (kept whole: a diff pair removes it only if it
    /// equals it).
    event: OptionValue,
    /// `options:reject`, likewise.
    reject: OptionValue,
}

/// One value of a load balancer's `options`, exactly as sent: `true` (by far the most
/// common, kept without an allocation: 100,000 load balancers of idle services have it),
/// another text, or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum OptionValue {
    #[default]
    Absent,
    True,
    Other(Box<str>),
}

impl OptionValue {
    /// Applies a map diff pair's `value` (RFC 7047 `update2`): the same value removes it.
    fn apply(&mut self, value: &str) {
        *self = if self.is(value) {
            OptionValue::Absent
        } else if value == "true" {
            OptionValue::True
        } else {
            OptionValue::Other(value.into())
        };
    }

    /// Whether it is exactly `value`.
    fn is(&self, value: &str) -> bool {
        match self {
            OptionValue::Absent => false,
            OptionValue::True => value == "true",
            OptionValue::Other(text) => **text == *value,
        }
    }

    /// Whether northd reads it as true (without case).
    fn is_true(&self) -> bool {
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
enum VipRecords {
    One(VipRecord),
    Many(Box<[VipRecord]>),
}

impl Default for VipRecords {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl VipRecords {
    fn as_slice(&self) -> &[VipRecord] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::Many(all) => all,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [VipRecord] {
        match self {
            Self::One(one) => std::slice::from_mut(one),
            Self::Many(all) => all,
        }
    }

    fn into_vec(self) -> Vec<VipRecord> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(all) => all.into_vec(),
        }
    }

    /// Sorted by VIP, so that [`VipRecords::find`] costs a binary search, not a pass: a
    /// load balancer with 100,000 VIPs has each of them looked up at every change of it.
    fn from_vec(mut all: Vec<VipRecord>) -> Self {
        match all.len() {
            1 => Self::One(all.pop().expect("one")),
            _ => {
                all.sort_unstable_by_key(|v| v.vip);
                Self::Many(all.into_boxed_slice())
            }
        }
    }

    /// The record of `vip` (one of them, if two keys spell it).
    fn find(&self, vip: &Vip) -> Option<&VipRecord> {
        let all = self.as_slice();
        let at = all.binary_search_by_key(&Some(*vip), |v| v.vip).ok()?;
        all.get(at)
    }
}

/// Up to this many pairs in a `vips` diff, each is looked up by a pass over the VIPs.
const FEW_PAIRS: usize = 4;

/// Applies one pair of a `vips` map diff to `all`: a new key is added, an existing one takes
/// the pair's value, or is removed if it already has it (RFC 7047's `update2` diff).
fn apply_pair(all: &mut Vec<VipRecord>, key: &str, value: &str, protocol: Protocol) {
    match all.iter().position(|v| v.key() == key) {
        Some(i) if all[i].value() == value => {
            all.swap_remove(i);
        }
        Some(i) => all[i] = all[i].with_value(value),
        None => all.push(VipRecord::new(key, value, protocol)),
    }
}

impl LbRecord {
    fn from_row(row: &Row, ids: &mut DatapathIds) -> Self {
        let mut record = Self::default();
        record.apply_diff(row, ids);
        record
    }

    /// Applies an `update2` modify (only the changed columns, maps as diffs); from an empty
    /// record, a whole row applies the same way.
    fn apply_diff(&mut self, diff: &Row, ids: &mut DatapathIds) {
        // Sets of row references: the diff's elements are toggled.
        for (column, slot) in GROUP_COLUMNS.iter().zip(&mut self.dp_groups) {
            if let Some(group) = diff.get(*column) {
                let mut current = Value::Set(ids.uuids(&[*slot]));
                current.apply_diff(group);
                *slot = current
                    .atoms()
                    .first()
                    .and_then(Atom::as_uuid)
                    .map_or(0, |u| ids.id(u));
            }
        }
        if let Some(datapaths) = diff.get("datapaths") {
            let mut current = Value::Set(ids.uuids(&self.dp_list));
            current.apply_diff(datapaths);
            self.dp_list = current
                .atoms()
                .iter()
                .filter_map(Atom::as_uuid)
                .map(|u| ids.id(u))
                .collect();
        }
        if let Some(protocol) = diff.get("protocol") {
            let mut current = Value::Set(
                self.protocol
                    .map(|p| Atom::from(p.as_str()))
                    .into_iter()
                    .collect(),
            );
            current.apply_diff(protocol);
            let protocol = current
                .atom()
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

    fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::Tcp)
    }

    /// Whether OVN reports its empty VIPs (it has `options:event=true`, or `global_event`
    /// makes every load balancer report) rather than rejecting them (`options:reject=true`);
    /// northd reads both without case.
    fn reports(&self, global_event: bool) -> bool {
        (global_event || self.event.is_true()) && !self.reject.is_true()
    }

    /// Its VIPs the datapath can watch (an address and a port; not templates).
    fn watchable_vips(&self) -> impl Iterator<Item = Vip> + '_ {
        self.vips.as_slice().iter().filter_map(|v| v.vip)
    }

    /// Whether it applies on the local datapath `dp` (a [`DatapathIds`] id).
    fn applies_on(&self, dp: u32, local: &LocalDatapaths) -> bool {
        self.dp_list.contains(&dp)
            || self.dp_groups.iter().any(|group| {
                *group != 0 && local.groups.get(group).is_some_and(|g| g.contains(&dp))
            })
    }

    /// Whether it applies on any of this node's datapaths (all of them while those are not
    /// known).
    fn is_local(&self, local: &LocalDatapaths) -> bool {
        local.datapaths.is_empty() || local.datapaths.iter().any(|d| self.applies_on(d.id, local))
    }

    /// The name events give: the row's `lb_id` (else its UUID), read when an event needs it.
    /// northd sets `lb_id` when it inserts the row and never changes it.
    fn name(key: RowKey) -> LoadBalancerName {
        LoadBalancerName::SouthboundRow(key.0)
    }
}

/// Row references to logical datapaths and datapath groups, as small ids (from 1; 0 is none),
/// so that a load balancer's record keeps 4 bytes per reference instead of 16. Ids are never
/// given back while the source runs: there are as many as datapaths and groups ever seen.
#[derive(Default)]
struct DatapathIds {
    ids: FastMap<RowKey, u32>,
    uuids: Vec<Uuid>,
}

impl DatapathIds {
    fn id(&mut self, uuid: &Uuid) -> u32 {
        let key = RowKey::new(uuid);
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        self.uuids.push(uuid.clone());
        let id = self.uuids.len() as u32;
        self.ids.insert(key, id);
        id
    }

    /// The id of `uuid` if it has one.
    fn get(&self, uuid: &Uuid) -> Option<u32> {
        self.ids.get(&RowKey::new(uuid)).copied()
    }

    /// The UUIDs of `ids` (0 skipped), as atoms.
    fn uuids(&self, ids: &[u32]) -> Vec<Atom> {
        ids.iter()
            .filter(|id| **id != 0)
            .filter_map(|id| self.uuids.get(*id as usize - 1))
            .map(|u| Atom::Uuid(u.clone()))
            .collect()
    }
}

/// This node's logical datapaths: those of the Port_Bindings bound to our chassis (VIFs,
/// gateway routers' ports), from the replicated `Port_Binding`, `Datapath_Binding` and
/// `Logical_DP_Group` tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LocalDatapaths {
    /// Each local datapath: its id and tunnel key (the scope the kernel keys it by).
    datapaths: Vec<LocalDatapath>,
    /// For each datapath group (by id), the local datapaths in it.
    groups: FastMap<u32, Vec<u32>>,
    /// The scopes of this node's ports and of its gateway router.
    port_scopes: PortScopes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LocalDatapath {
    id: u32,
    tunnel_key: u32,
}

impl LocalDatapaths {
    fn from_replica(replica: &Replica, ids: &mut DatapathIds) -> Self {
        let column_uuid = |row: &Row, c: &str| row.get(c)?.atom()?.as_uuid().cloned();
        let tunnel_keys: FastMap<RowKey, u32> = replica
            .rows("Datapath_Binding")
            .filter_map(|(uuid, row)| {
                let key = row.get("tunnel_key")?.atom()?.as_i64()?;
                Some((RowKey::new(uuid), u32::try_from(key).ok()?))
            })
            .collect();
        let mut local = Self::default();
        let mut gateways = std::collections::BTreeSet::new();
        for (_, row) in replica.rows("Port_Binding") {
            let Some(datapath) = column_uuid(row, "datapath") else {
                continue;
            };
            let Some(tunnel_key) = tunnel_keys.get(&RowKey::new(&datapath)).copied() else {
                continue;
            };
            if let Some(port) = row
                .get("logical_port")
                .and_then(Value::atom)
                .and_then(Atom::as_str)
            {
                local.port_scopes.ports.insert(port.to_owned(), tunnel_key);
            }
            let kind = row.get("type").and_then(Value::atom).and_then(Atom::as_str);
            if kind == Some("l3gateway") {
                gateways.insert(tunnel_key);
            }
            let id = ids.id(&datapath);
            if !local.datapaths.iter().any(|d| d.id == id) {
                local.datapaths.push(LocalDatapath { id, tunnel_key });
            }
        }
        local.datapaths.sort_by_key(|d| d.id);
        // The uplinks lead to this node's gateway router: its scope, if there is one.
        if gateways.len() == 1 {
            local.port_scopes.gateway = gateways.pop_first();
        }
        for (uuid, row) in replica.rows("Logical_DP_Group") {
            let members: Vec<u32> = row
                .get("datapaths")
                .map(Value::atoms)
                .unwrap_or_default()
                .iter()
                .filter_map(Atom::as_uuid)
                .filter_map(|u| ids.get(u))
                .filter(|id| local.datapaths.iter().any(|d| d.id == *id))
                .collect();
            if !members.is_empty() {
                local.groups.insert(ids.id(uuid), members);
            }
        }
        local
    }
}

/// Every load balancer's record, and which load balancers that count have each VIP.
#[derive(Default)]
struct OvnVips {
    ids: DatapathIds,
    local: LocalDatapaths,
    by_lb: FastMap<RowKey, LbRecord>,
    /// `SB_Global`'s `options:controller_event=true`: every load balancer reports.
    global_event: bool,
    /// The local load balancers having each watchable VIP.
    lbs_of: FastMap<Vip, LbSet>,
}

impl OvnVips {
    /// Re-indexes every record (after a full load, or when the local datapaths or the
    /// rejecting load balancers changed) and returns every VIP.
    fn reindex(&mut self) -> Vec<DesiredVip> {
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
    fn update(
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
    fn reports(&self, key: &RowKey) -> bool {
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
    fn combined(&self, vip: &Vip) -> Option<DesiredVip> {
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
    fn combine<'a>(
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

fn add_lb_of(index: &mut FastMap<Vip, LbSet>, vip: Vip, lb: RowKey) {
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
enum LbSet {
    One(RowKey),
    Many(Vec<RowKey>),
}

impl LbSet {
    fn insert(&mut self, lb: RowKey) {
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
    fn remove(&mut self, lb: RowKey) -> bool {
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

    fn iter(&self) -> impl Iterator<Item = &RowKey> {
        match self {
            LbSet::One(only) => std::slice::from_ref(only).iter(),
            LbSet::Many(all) => all.iter(),
        }
    }
}

/// The Southbound tables the source reads besides `Load_Balancer` (replicated by the same
/// client), for this node's logical datapaths: `Port_Binding` (only ours: see
/// [`crate::southbound`]), `Datapath_Binding` and `Logical_DP_Group`; and `SB_Global`.
pub const REPLICATED: [(&str, &[&str]); 3] = [
    (
        "Port_Binding",
        &["logical_port", "datapath", "chassis", "type"],
    ),
    ("Datapath_Binding", &["tunnel_key"]),
    ("Logical_DP_Group", &["datapaths"]),
];

/// The scopes of this node's interfaces as OVN sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortScopes {
    /// Each local logical port's scope (the tunnel key of its logical datapath), by name
    /// (an interface's `iface-id`).
    pub ports: std::collections::BTreeMap<String, u32>,
    /// The scope of this node's gateway router (the datapath of its `l3gateway` port), where
    /// the uplinks lead; None if there is not exactly one.
    pub gateway: Option<u32>,
}

/// What the agent gets of a running source.
pub struct SourceHandles {
    /// To register with the client's Load_Balancer monitor
    /// ([`ovsdb::MonitorRequest::consumed_by`]).
    pub consumer: ConsumerHandle,
    /// How many load balancers the source knows.
    pub load_balancers: Arc<AtomicUsize>,
    /// The local logical ports' scopes, as they change.
    pub port_scopes: tokio::sync::watch::Receiver<Arc<PortScopes>>,
}

/// Follows the Southbound Load_Balancer table (as the client's consumer of it) and sends the
/// VIP map's updates: the whole set after each full load (and when this node's logical
/// datapaths change), the VIPs a batch changed otherwise. The [`REPLICATED`] tables must be monitored by the same client.
pub struct LoadBalancerSource {
    vips: OvnVips,
    updates: mpsc::UnboundedSender<VipUpdate>,
    /// A full load is under way: rows are recorded, and indexed once it is complete.
    loading: bool,
    /// VIPs this batch may have changed.
    touched: FastSet<Vip>,
    load_balancers: Arc<AtomicUsize>,
    port_scopes: tokio::sync::watch::Sender<Arc<PortScopes>>,
}

impl LoadBalancerSource {
    /// A source sending to `updates`.
    pub fn start(updates: mpsc::UnboundedSender<VipUpdate>) -> SourceHandles {
        let load_balancers = Arc::new(AtomicUsize::new(0));
        let (port_scopes, port_scopes_rx) = tokio::sync::watch::channel(Arc::default());
        let source = Self {
            vips: OvnVips::default(),
            updates,
            loading: false,
            touched: FastSet::default(),
            load_balancers: load_balancers.clone(),
            port_scopes,
        };
        SourceHandles {
            consumer: ConsumerHandle::new(source),
            load_balancers,
            port_scopes: port_scopes_rx,
        }
    }
}

impl TableConsumer for LoadBalancerSource {
    fn reset(&mut self) {
        self.vips.by_lb.clear();
        self.vips.lbs_of.clear();
        self.touched.clear();
        self.loading = true;
    }

    fn row(&mut self, uuid: &Uuid, update: RowUpdate) -> Result<(), DbError> {
        let key = RowKey::new(uuid);
        if self.loading {
            // Indexed once the load is complete.
            match update {
                RowUpdate::Initial(row) | RowUpdate::Insert(row) => {
                    let record = LbRecord::from_row(&row, &mut self.vips.ids);
                    self.vips.by_lb.insert(key, record);
                }
                RowUpdate::Modify(_) | RowUpdate::Delete => {
                    return Err(DbError::Protocol(format!(
                        "a full load of {TABLE} modified or deleted {uuid}"
                    )));
                }
            }
            return Ok(());
        }
        self.vips.update(key, update, &mut self.touched)
    }

    fn batch_done(&mut self, replica: &Replica, changed: &Changed) {
        self.load_balancers
            .store(self.vips.by_lb.len(), Ordering::Relaxed);
        let datapaths_changed = ["Port_Binding", "Datapath_Binding", "Logical_DP_Group"]
            .iter()
            .any(|t| changed.contains(*t));
        let mut reindex_all = false;
        if datapaths_changed {
            let local = LocalDatapaths::from_replica(replica, &mut self.vips.ids);
            if local.port_scopes != self.vips.local.port_scopes {
                self.port_scopes
                    .send_replace(Arc::new(local.port_scopes.clone()));
            }
            // Pods come and go on the same switches: only new datapaths (or groups) change
            // which load balancers apply, and so every VIP.
            reindex_all = local.datapaths != self.vips.local.datapaths
                || local.groups != self.vips.local.groups;
            self.vips.local = local;
        }
        if self.loading || changed.contains("SB_Global") {
            let global_event = crate::southbound::global_event(replica);
            // Rare: every load balancer reports, or no longer does.
            reindex_all |= global_event != self.vips.global_event;
            self.vips.global_event = global_event;
        }
        let update = if self.loading || reindex_all {
            self.loading = false;
            self.touched = FastSet::default();
            VipUpdate::Replace(self.vips.reindex())
        } else if self.touched.is_empty() {
            return;
        } else {
            let mut upsert = Vec::new();
            let mut remove = Vec::new();
            for vip in self.touched.drain() {
                match self.vips.combined(&vip) {
                    Some(d) => upsert.push(d),
                    None => remove.push(vip),
                }
            }
            VipUpdate::Changes { upsert, remove }
        };
        // The receiver gone means the agent is stopping.
        let _ = self.updates.send(update);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load balancer row as the monitor sends it, one that reports (`options:event=true`;
    /// [`Driven::silent`] takes the option out).
    fn lb_row(vips: &[(&str, &str)], protocol: &str) -> Row {
        Row::from([
            ("vips".to_owned(), Value::string_map(vips.iter().copied())),
            ("protocol".to_owned(), Value::Atom(Atom::from(protocol))),
            ("options".to_owned(), Value::string_map([("event", "true")])),
        ])
    }

    /// A diff of a load balancer's `vips` (a pair equal to the current one removes it).
    fn vips_diff(pairs: &[(&str, &str)]) -> RowUpdate {
        RowUpdate::Modify(Row::from([(
            "vips".to_owned(),
            Value::string_map(pairs.iter().copied()),
        )]))
    }

    /// A diff of a load balancer's options (a pair equal to the current one removes it).
    fn options_diff(pairs: &[(&str, &str)]) -> RowUpdate {
        RowUpdate::Modify(Row::from([(
            "options".to_owned(),
            Value::string_map(pairs.iter().copied()),
        )]))
    }

    /// The name events give the load balancer of row `uuid(n)`, until it is read.
    fn row_name(n: u8) -> String {
        format!("sb-row:{}", uuid(n).0)
    }

    fn uuid(n: u8) -> Uuid {
        Uuid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
    }

    /// The source as the client drives it, with the replica's SB_Global.
    struct Driven {
        source: LoadBalancerSource,
        updates: mpsc::UnboundedReceiver<VipUpdate>,
        replica: Replica,
        /// Replicated tables changed since the last batch.
        changed: Changed,
        /// Load balancers loaded or inserted without their `options:event=true`.
        silent: FastSet<u8>,
    }

    impl Driven {
        fn new() -> Self {
            let (tx, updates) = mpsc::unbounded_channel();
            Self {
                source: LoadBalancerSource {
                    vips: OvnVips::default(),
                    updates: tx,
                    loading: false,
                    touched: FastSet::default(),
                    load_balancers: Arc::default(),
                    port_scopes: tokio::sync::watch::channel(Arc::default()).0,
                },
                updates,
                replica: Replica::default(),
                changed: Changed::new(),
                silent: FastSet::default(),
            }
        }

        /// Load balancer `n` has no `options:event=true` (from its next load or insert on).
        fn silent(&mut self, n: u8) {
            self.silent.insert(n);
        }

        /// The row as the monitor would send it for load balancer `n`.
        fn as_sent(&self, n: u8, update: RowUpdate) -> RowUpdate {
            let strip = |mut row: Row| {
                if self.silent.contains(&n) {
                    row.remove("options");
                }
                row
            };
            match update {
                RowUpdate::Initial(row) => RowUpdate::Initial(strip(row)),
                RowUpdate::Insert(row) => RowUpdate::Insert(strip(row)),
                other => other,
            }
        }

        /// A full load of these rows; returns the whole VIP set.
        #[track_caller]
        fn load(&mut self, rows: &[(u8, Row)]) -> Vec<DesiredVip> {
            self.source.reset();
            for (n, row) in rows {
                let row = self.as_sent(*n, RowUpdate::Initial(row.clone()));
                self.source.row(&uuid(*n), row).unwrap();
            }
            match self.done() {
                Some(VipUpdate::Replace(mut all)) => {
                    all.sort_by_key(|d| d.vip);
                    all
                }
                other => panic!("a full load sends the whole set, not {other:?}"),
            }
        }

        /// One batch of one row's update; returns (upserted, removed), sorted.
        #[track_caller]
        fn batch(&mut self, n: u8, update: RowUpdate) -> (Vec<DesiredVip>, Vec<Vip>) {
            let update = self.as_sent(n, update);
            self.source.row(&uuid(n), update).unwrap();
            match self.done() {
                Some(VipUpdate::Changes {
                    mut upsert,
                    mut remove,
                }) => {
                    upsert.sort_by_key(|d| d.vip);
                    remove.sort();
                    (upsert, remove)
                }
                None => (Vec::new(), Vec::new()),
                other => panic!("an incremental batch sends changes, not {other:?}"),
            }
        }

        fn done(&mut self) -> Option<VipUpdate> {
            let changed = std::mem::take(&mut self.changed);
            self.source.batch_done(&self.replica, &changed);
            self.updates.try_recv().ok()
        }

        /// A row of a replicated table, as the client would apply it.
        fn replicate(&mut self, table: &str, n: u8, row: Row) {
            self.replica
                .apply_row(table, uuid(n), RowUpdate::Insert(row), false)
                .unwrap();
            self.changed.insert(table.to_owned());
        }
    }

    fn name(d: &DesiredVip) -> String {
        d.load_balancer
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    fn endpoints(vips: &[DesiredVip]) -> Vec<(String, u32)> {
        vips.iter()
            .map(|d| (d.vip.to_string(), d.backends))
            .collect()
    }

    #[test]
    fn vips_are_told_apart_by_their_text_not_a_hash_of_it() {
        // Keys (and values) whose fast hashes collided: identity is the text.
        let (backed, idle) = ("10.203.1.20:10319", "10.203.1.20:10394");
        let mut d = Driven::new();
        let all = d.load(&[(1, lb_row(&[(backed, backed), (idle, "")], "tcp"))]);
        assert_eq!(
            endpoints(&all),
            [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 0)],
            "the backed VIP stays backed"
        );
        // Equal values: each key is its own.
        let all = d.load(&[(
            1,
            lb_row(&[(backed, "10.0.0.9:80"), (idle, "10.0.0.9:80")], "tcp"),
        )]);
        assert_eq!(
            endpoints(&all),
            [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 1)]
        );
        // A diff pair removes exactly its key, and only with the exact current value.
        let (up, rm) = d.batch(1, vips_diff(&[(idle, "10.0.0.8:80,10.0.0.9:80")]));
        assert!(rm.is_empty());
        assert_eq!(
            endpoints(&up),
            [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 2)]
        );
        let (up, rm) = d.batch(1, vips_diff(&[(idle, "10.0.0.8:80,10.0.0.9:80")]));
        assert_eq!(endpoints(&up), [(format!("{backed}/tcp"), 1)]);
        assert_eq!(
            rm.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!("{idle}/tcp")]
        );
    }

    #[test]
    fn every_vip_with_a_port_is_watched_and_named_after_its_row() {
        let vips = [
            ("192.168.1.100:80", ""),
            ("[fd00::1]:53", "10.0.0.1:53,10.0.0.2:53"),
            ("10.0.0.9", ""),
        ];
        let mut d = Driven::new();
        let all = d.load(&[(1, lb_row(&vips, "udp"))]);
        assert_eq!(
            endpoints(&all),
            [
                ("192.168.1.100:80/udp".to_owned(), 0),
                ("[fd00::1]:53/udp".to_owned(), 2)
            ],
            "the port-less VIP is left out"
        );
        assert_eq!(name(&all[0]), row_name(1));
        assert_eq!(d.source.load_balancers.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_load_balancer_that_also_rejects_does_not_count() {
        let mut d = Driven::new();
        let shared = [("10.0.0.1:80", "")];
        let all = d.load(&[(1, lb_row(&shared, "tcp")), (2, lb_row(&shared, "tcp"))]);
        assert_eq!(
            name(&all[0]),
            row_name(1),
            "the first by UUID names the VIP"
        );
        // ... until it rejects: only the VIPs of the load balancer whose options changed.
        d.source
            .row(&uuid(1), options_diff(&[("reject", "TRUE")]))
            .unwrap();
        match d.done() {
            Some(VipUpdate::Changes { upsert, remove }) => {
                assert!(remove.is_empty());
                assert_eq!(upsert.iter().map(name).collect::<Vec<_>>(), [row_name(2)]);
            }
            other => panic!("the rejecting set changing updates the VIP: {other:?}"),
        }
        d.source
            .row(&uuid(2), options_diff(&[("reject", "true")]))
            .unwrap();
        match d.done() {
            Some(VipUpdate::Changes { upsert, remove }) => {
                assert!(upsert.is_empty(), "{upsert:?}");
                assert_eq!(remove.len(), 1, "no load balancer that reports has it");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn incremental_updates_touch_only_their_vips_and_shared_vips_combine() {
        let mut d = Driven::new();
        let a = lb_row(&[("10.0.0.1:80", ""), ("10.0.0.2:80", "")], "tcp");
        assert_eq!(d.load(&[(1, a)]).len(), 2);
        // A second LB with one of the VIPs, with backends: that VIP is active.
        let b = lb_row(&[("10.0.0.2:80", "10.1.1.1:80")], "tcp");
        let (up, rm) = d.batch(2, RowUpdate::Insert(b));
        assert!(rm.is_empty());
        assert_eq!(endpoints(&up), [("10.0.0.2:80/tcp".to_owned(), 1)]);
        // The first LB drops a VIP: a diff pair with the current value removes the key.
        let drop_one = Row::from([("vips".to_owned(), Value::string_map([("10.0.0.1:80", "")]))]);
        let (up, rm) = d.batch(1, RowUpdate::Modify(drop_one));
        assert_eq!(
            rm.iter().map(Vip::endpoint).collect::<Vec<_>>(),
            ["10.0.0.1:80"]
        );
        assert_eq!(up.len(), 1, "the shared VIP is recomputed: {up:?}");
        // The second LB goes away: the shared VIP is idle again.
        let (up, rm) = d.batch(2, RowUpdate::Delete);
        assert!(rm.is_empty());
        assert_eq!(endpoints(&up), [("10.0.0.2:80/tcp".to_owned(), 0)]);
        // And the first: nothing is left.
        let (up, rm) = d.batch(1, RowUpdate::Delete);
        assert_eq!((up.len(), rm.len()), (0, 1));
        assert!(d.source.vips.lbs_of.is_empty() && d.source.vips.by_lb.is_empty());
    }

    #[test]
    fn diffs_of_every_column_apply_as_the_server_sends_them() {
        let mut d = Driven::new();
        let row = lb_row(&[("10.0.0.1:80", "")], "tcp");
        d.load(&[(1, row)]);
        // The protocol changed (a set diff: both elements toggled).
        let (up, rm) = d.batch(
            1,
            RowUpdate::Modify(Row::from([(
                "protocol".to_owned(),
                Value::set([Atom::from("tcp"), Atom::from("udp")]),
            )])),
        );
        assert_eq!(
            rm.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.0.1:80/tcp"]
        );
        assert_eq!(endpoints(&up), [("10.0.0.1:80/udp".to_owned(), 0)]);
        assert_eq!(name(&up[0]), row_name(1));
        // A modify of a row never seen fails the batch (the client loads afresh).
        assert!(
            d.source
                .row(&uuid(7), RowUpdate::Modify(Row::new()))
                .is_err()
        );
    }

    fn with_datapaths(mut row: Row, datapaths: &[u8], group: Option<u8>) -> Row {
        let refs = |ns: &[u8]| Value::set(ns.iter().map(|n| Atom::Uuid(uuid(*n))));
        row.insert("datapaths".into(), refs(datapaths));
        row.insert("datapath_group".into(), refs(group.as_slice()));
        row
    }

    fn scopes(d: &DesiredVip) -> Option<Vec<(u32, u32, String)>> {
        d.scoped.as_ref().map(|s| {
            s.iter()
                .map(|e| {
                    let name = e.load_balancer.as_ref().map(ToString::to_string);
                    (e.scope, e.backends, name.unwrap_or_default())
                })
                .collect()
        })
    }

    #[test]
    fn the_switch_and_router_groups_of_newer_ovn_scope_as_datapath_group_does() {
        let mut d = Driven::new();
        // Switches 1 (a local port) and 2 (none); a group of each.
        for (n, key) in [(0x41, 1), (0x42, 2)] {
            d.replicate(
                "Datapath_Binding",
                n,
                Row::from([("tunnel_key".to_owned(), Value::from(key))]),
            );
        }
        d.replicate(
            "Port_Binding",
            0x51,
            Row::from([
                ("logical_port".to_owned(), Value::from("pod-a")),
                ("datapath".to_owned(), Value::from(uuid(0x41))),
            ]),
        );
        for (group, dp) in [(0x61, 0x41), (0x62, 0x42)] {
            d.replicate(
                "Logical_DP_Group",
                group,
                Row::from([("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(dp))]))]),
            );
        }
        let in_group = |vip: &str, column: &str, group: u8| {
            let mut row = lb_row(&[(vip, "")], "tcp");
            row.insert(column.into(), Value::set([Atom::Uuid(uuid(group))]));
            row
        };
        let all = d.load(&[
            (1, in_group("10.0.0.1:80", "ls_datapath_group", 0x61)),
            (2, in_group("10.0.0.2:80", "lr_datapath_group", 0x61)),
            (3, in_group("10.0.0.3:80", "ls_datapath_group", 0x62)),
        ]);
        assert_eq!(
            endpoints(&all),
            [
                ("10.0.0.1:80/tcp".to_owned(), 0),
                ("10.0.0.2:80/tcp".to_owned(), 0)
            ],
            "the third is on a switch without a local port"
        );
        // Its group moves to the local switch (a set diff: both elements toggled).
        let moved = Row::from([(
            "ls_datapath_group".to_owned(),
            Value::set([Atom::Uuid(uuid(0x61)), Atom::Uuid(uuid(0x62))]),
        )]);
        let (up, _) = d.batch(3, RowUpdate::Modify(moved));
        assert_eq!(endpoints(&up), [("10.0.0.3:80/tcp".to_owned(), 0)]);
    }

    #[test]
    fn a_vip_forwarded_by_a_load_balancer_that_does_not_report_is_not_idle_there() {
        let mut d = Driven::new();
        // lba (options:event=true) has X idle on switch 1; lbb, without event, has X with a
        // backend on switch 2; lbc, without event, has Y idle.
        d.silent(2);
        d.silent(3);
        for (n, key) in [(0x41, 1), (0x42, 2)] {
            d.replicate(
                "Datapath_Binding",
                n,
                Row::from([("tunnel_key".to_owned(), Value::from(key))]),
            );
        }
        let lba = with_datapaths(lb_row(&[("10.86.0.100:7000", "")], "tcp"), &[0x41], None);
        let lbb = with_datapaths(
            lb_row(&[("10.86.0.100:7000", "10.1.1.1:7000")], "tcp"),
            &[0x42],
            None,
        );
        let lbc = with_datapaths(lb_row(&[("10.86.0.101:7000", "")], "tcp"), &[0x41], None);
        // The node's datapaths not known yet: every load balancer applies, and X has a
        // backend.
        let all = d.load(&[(1, lba.clone()), (2, lbb.clone()), (3, lbc.clone())]);
        assert_eq!(
            endpoints(&all),
            [("10.86.0.100:7000/tcp".to_owned(), 1)],
            "X is forwarded by lbb; Y is reported by no load balancer: not watched"
        );
        // A port on each switch: X is idle on switch 1 only.
        for (n, port, dp) in [(0x51, "pod-a", 0x41), (0x52, "pod-b", 0x42)] {
            d.replicate(
                "Port_Binding",
                n,
                Row::from([
                    ("logical_port".to_owned(), Value::from(port)),
                    ("datapath".to_owned(), Value::from(uuid(dp))),
                ]),
            );
        }
        match d.done() {
            Some(VipUpdate::Replace(all)) => assert_eq!(
                scopes(&all[0]),
                Some(vec![(1, 0, row_name(1)), (2, 1, row_name(2))]),
                "idle where lba applies, forwarded where lbb does"
            ),
            other => panic!("{other:?}"),
        }
        // lbb gets options:event=true too: nothing changes but who may report.
        d.source
            .row(&uuid(2), options_diff(&[("event", "true")]))
            .unwrap();
        match d.done() {
            Some(VipUpdate::Changes { upsert, .. }) => {
                assert_eq!(endpoints(&upsert), [("10.86.0.100:7000/tcp".to_owned(), 1)])
            }
            other => panic!("{other:?}"),
        }
        // lba stops reporting: X is no longer watched.
        for n in [1, 2] {
            d.source
                .row(&uuid(n), options_diff(&[("event", "true")]))
                .unwrap();
        }
        match d.done() {
            Some(VipUpdate::Changes { upsert, remove }) => {
                assert!(upsert.is_empty(), "{upsert:?}");
                assert_eq!(remove.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tenants_reusing_a_vip_see_their_own_load_balancer() {
        let mut d = Driven::new();
        // Three logical switches (tunnel keys 1, 2, 3); this node has a port on 1 and 2.
        for (n, key) in [(0x41, 1), (0x42, 2), (0x43, 3)] {
            d.replicate(
                "Datapath_Binding",
                n,
                Row::from([("tunnel_key".to_owned(), Value::from(key))]),
            );
        }
        for (n, port, dp) in [(0x51, "pod-a", 0x41), (0x52, "pod-b", 0x42)] {
            d.replicate(
                "Port_Binding",
                n,
                Row::from([
                    ("logical_port".to_owned(), Value::from(port)),
                    ("datapath".to_owned(), Value::from(uuid(dp))),
                ]),
            );
        }
        d.replicate(
            "Logical_DP_Group",
            0x61,
            Row::from([(
                "datapaths".to_owned(),
                Value::set([0x41, 0x42, 0x43].map(|n| Atom::Uuid(uuid(n)))),
            )]),
        );
        // Tenant A's service at X is idle; tenant B's at the same X has a backend.
        let a = with_datapaths(lb_row(&[("10.0.0.5:80", "")], "tcp"), &[0x41], None);
        let b = with_datapaths(
            lb_row(&[("10.0.0.5:80", "10.1.1.1:80")], "tcp"),
            &[0x42],
            None,
        );
        // Y is on every switch (a group, as ovn-kubernetes makes them); Z only on a switch
        // this node has no port on.
        let y = with_datapaths(lb_row(&[("10.0.0.6:80", "")], "tcp"), &[], Some(0x61));
        let z = with_datapaths(lb_row(&[("10.0.0.7:80", "")], "tcp"), &[0x43], None);
        let all = d.load(&[(1, a), (2, b), (3, y), (4, z)]);
        assert_eq!(
            endpoints(&all),
            [
                ("10.0.0.5:80/tcp".to_owned(), 1),
                ("10.0.0.6:80/tcp".to_owned(), 0)
            ],
            "Z applies on no local switch: not in the map"
        );
        assert_eq!(
            scopes(&all[0]),
            Some(vec![(1, 0, row_name(1)), (2, 1, row_name(2))]),
            "X differs between the switches"
        );
        assert_eq!(scopes(&all[1]), None, "Y is the same everywhere");
        assert_eq!(
            *d.source.port_scopes.borrow().as_ref(),
            PortScopes {
                ports: [("pod-a".to_owned(), 1), ("pod-b".to_owned(), 2)].into(),
                gateway: None,
            }
        );

        // Another pod on A's switch: its scope is published, no VIP changes.
        d.replicate(
            "Port_Binding",
            0x53,
            Row::from([
                ("logical_port".to_owned(), Value::from("pod-a2")),
                ("datapath".to_owned(), Value::from(uuid(0x41))),
            ]),
        );
        assert!(d.done().is_none(), "a pod on a known switch changes no VIP");
        assert_eq!(d.source.port_scopes.borrow().ports.get("pod-a2"), Some(&1));

        // B's backend goes: both idle, but each names its own load balancer.
        let drained = Row::from([("vips".to_owned(), Value::string_map([("10.0.0.5:80", "")]))]);
        let (up, _) = d.batch(2, RowUpdate::Modify(drained));
        assert_eq!(
            scopes(&up[0]),
            Some(vec![(1, 0, row_name(1)), (2, 0, row_name(2))])
        );
        // A's load balancer moves to the group: on switch 2 both apply now.
        let moved = Row::from([
            ("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(0x41))])),
            (
                "datapath_group".to_owned(),
                Value::set([Atom::Uuid(uuid(0x61))]),
            ),
        ]);
        let (up, _) = d.batch(1, RowUpdate::Modify(moved));
        assert_eq!(
            (scopes(&up[0]), name(&up[0])),
            (None, row_name(1)),
            "the same on both switches now: idle, named after the first idle one by UUID"
        );
        // Back on switch 1 only (scoped again); then this node's port on switch 2 goes: only
        // switch 1 is local, and X is the same everywhere there is.
        let back = Row::from([
            ("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(0x41))])),
            (
                "datapath_group".to_owned(),
                Value::set([Atom::Uuid(uuid(0x61))]),
            ),
        ]);
        let (up, _) = d.batch(1, RowUpdate::Modify(back));
        assert_eq!(
            scopes(&up[0]),
            Some(vec![(1, 0, row_name(1)), (2, 0, row_name(2))])
        );
        d.replica
            .apply_row("Port_Binding", uuid(0x52), RowUpdate::Delete, false)
            .unwrap();
        d.changed.insert("Port_Binding".into());
        match d.done() {
            Some(VipUpdate::Replace(all)) => {
                assert!(all.iter().all(|v| v.scoped.is_none()), "{all:?}");
            }
            other => panic!("new local datapaths re-index everything: {other:?}"),
        }
    }
}
