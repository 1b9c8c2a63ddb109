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
//!
//! Its rooms: [`connect`] and the source here; what it monitors ([`monitors`]); one load
//! balancer's record ([`load_balancer`]); this node's logical datapaths
//! ([`local_datapaths`]); the VIPs combined over every load balancer ([`vip_index`]); row
//! references as keys and small ids ([`ids`]).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use ovsdb::{Changed, ConsumerHandle, Error as DbError, Replica, RowUpdate, TableConsumer, Uuid};
use tokio::sync::{mpsc, watch};

pub use self::monitors::{COLUMNS, OPTIONAL_COLUMNS, TABLE};
use self::{
    ids::RowKey, load_balancer::LbRecord, local_datapaths::LocalDatapaths, vip_index::OvnVips,
};
use crate::{
    fast_hash::FastSet,
    ovn::southbound::{Southbound, SouthboundConfig},
    vip::{Vip, VipUpdate},
};

mod ids;
mod load_balancer;
mod local_datapaths;
mod monitors;
#[cfg(test)]
mod tests;
mod vip_index;

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
    /// How many load balancers the source knows.
    pub load_balancers: Arc<AtomicUsize>,
    /// The local logical ports' scopes, as they change.
    pub port_scopes: watch::Receiver<Arc<PortScopes>>,
}

/// Connects to the Southbound database with the source's monitors beside the connection's
/// own, and starts the source, which sends the VIP map's updates to `updates`.
pub async fn connect(
    config: &SouthboundConfig,
    updates: mpsc::UnboundedSender<VipUpdate>,
) -> Result<(Southbound, SourceHandles), DbError> {
    let (source, handles) = LoadBalancerSource::new(updates);
    let southbound =
        Southbound::connect(config, monitors::requests(ConsumerHandle::new(source))).await?;
    tokio::spawn(monitors::follow_local_ports(southbound.clone()));
    Ok((southbound, handles))
}

/// Follows the Southbound Load_Balancer table (as the client's consumer of it) and sends the
/// VIP map's updates: the whole set after each full load (and when this node's logical
/// datapaths change), the VIPs a batch changed otherwise. The tables of this node's
/// datapaths are replicated by the same client ([`monitors`]).
struct LoadBalancerSource {
    vips: OvnVips,
    updates: mpsc::UnboundedSender<VipUpdate>,
    /// A full load is under way: rows are recorded, and indexed once it is complete.
    loading: bool,
    /// VIPs this batch may have changed.
    touched: FastSet<Vip>,
    load_balancers: Arc<AtomicUsize>,
    port_scopes: watch::Sender<Arc<PortScopes>>,
}

impl LoadBalancerSource {
    /// A source sending to `updates`, and what the agent reads of it.
    fn new(updates: mpsc::UnboundedSender<VipUpdate>) -> (Self, SourceHandles) {
        let load_balancers = Arc::new(AtomicUsize::new(0));
        let (port_scopes, port_scopes_rx) = watch::channel(Arc::default());
        let source = Self {
            vips: OvnVips::default(),
            updates,
            loading: false,
            touched: FastSet::default(),
            load_balancers: load_balancers.clone(),
            port_scopes,
        };
        let handles = SourceHandles {
            load_balancers,
            port_scopes: port_scopes_rx,
        };
        (source, handles)
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
        let datapaths_changed = monitors::REPLICATED
            .iter()
            .any(|(table, _)| changed.contains(*table));
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
        if self.loading || changed.contains(monitors::SB_GLOBAL) {
            let global_event = monitors::global_event(replica);
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
