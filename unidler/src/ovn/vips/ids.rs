//! Southbound row references as the source keeps them: a UUID as two words ([`RowKey`]), and
//! logical datapaths and datapath groups as small ids ([`DatapathIds`]).

use ovsdb::{Atom, Uuid};

use crate::fast_hash::FastMap;

/// A Southbound row's UUID (a load balancer's, a logical datapath's or a datapath group's), as
/// two words (8-byte aligned: smaller tables than `u128`). Ordered as the UUID's text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct RowKey(pub(super) [u64; 2]);

impl RowKey {
    pub(super) fn new(uuid: &Uuid) -> Self {
        let n = uuid.as_u128();
        Self([(n >> 64) as u64, n as u64])
    }

    pub(super) fn uuid(self) -> Uuid {
        Uuid::from_u128((u128::from(self.0[0]) << 64) | u128::from(self.0[1]))
    }
}

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
