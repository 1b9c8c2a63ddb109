//! This node's logical datapaths and their scopes, from the replicated Port_Binding,
//! Datapath_Binding and Logical_DP_Group tables.

use ovsdb::{Atom, Replica, Row, Value};

use super::{
    PortScopes,
    ids::{DatapathIds, RowKey},
};
use crate::fast_hash::FastMap;

/// This node's logical datapaths: those of the Port_Bindings bound to our chassis (VIFs,
/// gateway routers' ports), from the replicated `Port_Binding`, `Datapath_Binding` and
/// `Logical_DP_Group` tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct LocalDatapaths {
    /// Each local datapath: its id and tunnel key (the scope the kernel keys it by).
    pub(super) datapaths: Vec<LocalDatapath>,
    /// For each datapath group (by id), the local datapaths in it.
    pub(super) groups: FastMap<u32, Vec<u32>>,
    /// The scopes of this node's ports and of its gateway router.
    pub(super) port_scopes: PortScopes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LocalDatapath {
    pub(super) id: u32,
    pub(super) tunnel_key: u32,
}

impl LocalDatapaths {
    pub(super) fn from_replica(replica: &Replica, ids: &mut DatapathIds) -> Self {
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
