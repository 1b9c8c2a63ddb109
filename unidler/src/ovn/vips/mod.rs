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

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use ovsdb::{Changed, ConsumerHandle, Error as DbError, Replica, RowUpdate, TableConsumer, Uuid};
use tokio::sync::mpsc;

use self::{
    load_balancer::{LbRecord, RowKey},
    local_datapaths::LocalDatapaths,
    vip_index::OvnVips,
};
use crate::{
    fast_hash::FastSet,
    vip::{Vip, VipUpdate},
};

/// The Southbound table the source follows.
pub const TABLE: &str = "Load_Balancer";
/// Its columns the source reads (of `options`, only `event` and `reject` are kept). Not
/// `external_ids`: its
/// `lb_id`, the name events give, is read for the few load balancers that are hit, when they
/// are ([`crate::ovn::lb_names`]); with 100,000s of load balancers the column is a fifth of what
/// the server composes at every agent's start.
pub const COLUMNS: [&str; 5] = ["vips", "protocol", "datapaths", "datapath_group", "options"];

/// Its columns the source reads where the schema has them: from OVN 23.09, northd puts a
/// load balancer's logical switches and routers in these two groups (and leaves
/// `datapath_group` empty) once every chassis can read them.
pub const OPTIONAL_COLUMNS: [&str; 2] = ["ls_datapath_group", "lr_datapath_group"];

/// The columns naming a load balancer's datapath group, in [`LbRecord::dp_groups`]' order.
pub(crate) const GROUP_COLUMNS: [&str; 3] =
    ["datapath_group", "ls_datapath_group", "lr_datapath_group"];

mod load_balancer;
mod local_datapaths;
#[cfg(test)]
mod tests;
mod vip_index;

/// The Southbound tables the source reads besides `Load_Balancer` (replicated by the same
/// client), for this node's logical datapaths: `Port_Binding` (only ours: see
/// [`crate::ovn::southbound`]), `Datapath_Binding` and `Logical_DP_Group`; and `SB_Global`.
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
            let global_event = crate::ovn::southbound::global_event(replica);
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
