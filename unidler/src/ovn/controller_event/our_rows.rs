//! Our chassis' rows in the Controller_Event table, indexed from the replica.

use std::collections::HashMap;

use ovsdb::{Atom, Client, Row, RowChange, Uuid, Value};

use super::{EVENT_TYPE, EventKey};
use crate::ovn::southbound::CONTROLLER_EVENT;

/// Our chassis' `empty_lb_backends` rows as the replica shows them, kept up to date from its
/// change sets: looking one up costs O(1), where a scan per transaction would cost O(rows),
/// and a wake-up storm makes thousands of rows.
#[derive(Default)]
pub struct OurRows {
    /// The chassis the index is for; None until built.
    pub chassis: Option<Uuid>,
    /// Index every chassis' rows, not only ours (for cluster-wide deduplication).
    every_chassis: bool,
    /// uuid → key, seq_num. (The default, keyed hash: with cluster-wide deduplication the
    /// keys are any chassis' rows, whose `vip` and `load_balancer` others chose.)
    by_uuid: HashMap<Uuid, (EventKey, i64)>,
    /// key → its rows (normally one): uuid, seq_num.
    by_key: HashMap<EventKey, Vec<(Uuid, i64)>>,
}

impl OurRows {
    /// An index of every chassis' rows (built by [`OurRows::rebuild`] like ours).
    pub fn every_chassis() -> Self {
        Self {
            every_chassis: true,
            ..Self::default()
        }
    }

    /// Rebuilds the index for `chassis` from the whole replica.
    pub fn rebuild(&mut self, client: &Client, chassis: &Uuid) {
        *self = OurRows {
            chassis: Some(chassis.clone()),
            every_chassis: self.every_chassis,
            ..OurRows::default()
        };
        let replica = client.replica();
        for (uuid, row) in replica.rows(CONTROLLER_EVENT) {
            self.insert(uuid, row);
        }
    }

    /// Applies one change of a Controller_Event row; returns the key of an indexed row
    /// that was deleted.
    pub fn apply(&mut self, uuid: &Uuid, change: &RowChange) -> Option<EventKey> {
        match change {
            RowChange::Insert(row) => self.insert(uuid, row),
            RowChange::Modify { new, .. } => self.insert(uuid, new),
            RowChange::Delete(_) => return self.remove(uuid),
        }
        None
    }

    /// Indexes `row` if it is ours (or any, for an index of every chassis; idempotent: a
    /// change the index already holds is harmless).
    fn insert(&mut self, uuid: &Uuid, row: &Row) {
        self.remove(uuid);
        let ours = self.every_chassis
            || row
                .get("chassis")
                .and_then(Value::atom)
                .and_then(Atom::as_uuid)
                .is_some_and(|c| Some(c) == self.chassis.as_ref());
        let typed = row
            .get("event_type")
            .and_then(Value::atom)
            .and_then(Atom::as_str)
            == Some(EVENT_TYPE);
        if !(ours && typed) {
            return;
        }
        let Some(key) = EventKey::from_row(row) else {
            return;
        };
        let seq = row
            .get("seq_num")
            .and_then(Value::atom)
            .and_then(Atom::as_i64)
            .unwrap_or(0);
        self.by_key
            .entry(key.clone())
            .or_default()
            .push((uuid.clone(), seq));
        self.by_uuid.insert(uuid.clone(), (key, seq));
    }

    /// Removes the row `uuid` from the index; returns its key if it was there.
    fn remove(&mut self, uuid: &Uuid) -> Option<EventKey> {
        let (key, _) = self.by_uuid.remove(uuid)?;
        if let Some(rows) = self.by_key.get_mut(&key) {
            rows.retain(|(u, _)| u != uuid);
            if rows.is_empty() {
                self.by_key.remove(&key);
            }
        }
        Some(key)
    }

    /// Whether a row for `key` exists.
    pub fn contains(&self, key: &EventKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Whether a row for `key` with exactly `seq` exists.
    pub fn has_seq(&self, key: &EventKey, seq: i64) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|rows| rows.iter().any(|r| r.1 == seq))
    }

    pub fn max_seq(&self) -> Option<i64> {
        self.by_uuid.values().map(|r| r.1).max()
    }
}
