//! This node's logical datapaths, and the small ids load balancers' records use for
//! datapaths and groups.

use ovsdb::{Atom, Replica, Row, Uuid, Value};

use super::{PortScopes, load_balancer::RowKey};
use crate::fast_hash::FastMap;

/// Row references to logical datapaths and datapath groups, as small ids (from 1; 0 is none),
/// so that a load balancer's record keeps 4 bytes per reference instead of 16. Ids are never
/// given back while the source runs: there are as many as datapaths and groups ever seen.
#[derive(Default)]
pub(super) struct DatapathIds {
    pub(super) ids: FastMap<RowKey, u32>,
    pub(super) uuids: Vec<Uuid>,
}

impl DatapathIds {
    pub(super) fn id(&mut self, uuid: &Uuid) -> u32 {
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
    pub(super) fn get(&self, uuid: &Uuid) -> Option<u32> {
        self.ids.get(&RowKey::new(uuid)).copied()
    }

    /// The UUIDs of `ids` (0 skipped), as atoms.
    pub(super) fn uuids(&self, ids: &[u32]) -> Vec<Atom> {
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
