//! A local copy of the monitored rows, kept current from `update2`/`update3` notifications.

use std::{collections::HashMap, sync::Arc};

use serde_json::Value as Json;

use crate::{
    error::Error,
    schema::{ColumnKind, ColumnKinds},
    update::{RowSink, RowUpdate},
    value::{Row, Uuid},
};

/// What happened to one row.
#[derive(Clone, Debug, PartialEq)]
pub enum RowChange {
    /// A new row (or one present when the monitor started).
    Insert(Row),
    /// A row changed: old and new contents.
    Modify {
        /// Before.
        old: Row,
        /// After.
        new: Row,
    },
    /// A row went away: its last contents.
    Delete(Row),
}

/// One batch of changes, as one notification (or one monitor reply) brought them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeSet {
    /// True when the replica was rebuilt from scratch (first connection, or a reconnect the
    /// server could not serve incrementally): readers should reconcile against it whole.
    /// Such a set carries no row changes (a copy of every row would be large).
    pub resync: bool,
    /// (table, row UUID, change), in the order the server sent them.
    pub changes: Vec<(String, Uuid, RowChange)>,
    /// When the client had applied them to the replica (None for sets made elsewhere): the
    /// moment the rows reached this client, whenever a reader gets to see the set.
    pub applied_at: Option<std::time::Instant>,
}

/// Monitored tables: table name → row UUID → row.
#[derive(Clone, Debug, Default)]
pub struct Replica {
    tables: HashMap<String, HashMap<Uuid, Row>>,
    /// How each column's diffs apply (from the database's schema).
    kinds: Arc<ColumnKinds>,
}

impl Replica {
    /// Applies diffs by the column kinds of `kinds` from now on.
    pub fn set_column_kinds(&mut self, kinds: Arc<ColumnKinds>) {
        self.kinds = kinds;
    }

    /// The rows of `table` (none if it is not monitored).
    pub fn rows(&self, table: &str) -> impl Iterator<Item = (&Uuid, &Row)> {
        self.tables.get(table).into_iter().flat_map(|t| t.iter())
    }

    /// One row.
    pub fn row(&self, table: &str, uuid: &Uuid) -> Option<&Row> {
        self.tables.get(table)?.get(uuid)
    }

    /// Number of rows in `table`.
    pub fn len(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, HashMap::len)
    }

    /// Whether no table has rows.
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(HashMap::is_empty)
    }

    /// Empties the replica.
    pub fn clear(&mut self) {
        self.tables.clear();
    }

    /// Empties one table (or named monitor).
    pub fn clear_table(&mut self, table: &str) {
        self.tables.remove(table);
    }

    /// Applies a `<table-updates2>` object; returns what changed.
    pub fn apply_update2(
        &mut self,
        updates: &Json,
    ) -> Result<Vec<(String, Uuid, RowChange)>, Error> {
        self.apply(updates, true)
    }

    /// Applies a `<table-updates2>` object without recording the changes: for a full load,
    /// after which readers reconcile against the whole replica (no copy of every row).
    pub fn load_update2(&mut self, updates: &Json) -> Result<(), Error> {
        self.apply(updates, false).map(drop)
    }

    fn apply(
        &mut self,
        updates: &Json,
        record: bool,
    ) -> Result<Vec<(String, Uuid, RowChange)>, Error> {
        let mut changes = Vec::new();
        crate::update::parse_table_updates(
            &updates.to_string(),
            &mut RecordingSink {
                replica: self,
                record,
                changes: &mut changes,
            },
        )?;
        Ok(changes)
    }

    /// Applies one row's update; with `record`, returns the change (with the old and new rows).
    pub fn apply_row(
        &mut self,
        table: &str,
        uuid: Uuid,
        update: RowUpdate,
        record: bool,
    ) -> Result<Option<RowChange>, Error> {
        self.apply_row_kept_as(table, table, uuid, update, record)
    }

    /// Applies one row's update of `table`, kept under `key` (a named monitor's rows are kept
    /// under its name); its diffs apply by `table`'s column kinds.
    pub fn apply_row_kept_as(
        &mut self,
        key: &str,
        table: &str,
        uuid: Uuid,
        update: RowUpdate,
        record: bool,
    ) -> Result<Option<RowChange>, Error> {
        let replica = match self.tables.get_mut(key) {
            Some(t) => t,
            None => self.tables.entry(key.to_owned()).or_default(),
        };
        Ok(match update {
            RowUpdate::Initial(row) | RowUpdate::Insert(row) => {
                if !record {
                    replica.insert(uuid, row);
                    return Ok(None);
                }
                replica.insert(uuid, row.clone());
                Some(RowChange::Insert(row))
            }
            RowUpdate::Modify(diff) => {
                let row = replica.get_mut(&uuid).ok_or_else(|| {
                    Error::Protocol(format!("modify of unknown row {uuid} in {table}"))
                })?;
                let old = record.then(|| row.clone());
                for (column, d) in diff {
                    let kind = self
                        .kinds
                        .get(table, &column)
                        .unwrap_or_else(|| guessed_kind(&d));
                    match row.get_mut(&column) {
                        Some(value) => value.apply_diff(&d, kind),
                        None => {
                            let mut value = match kind {
                                ColumnKind::Map => crate::value::Value::Map(Vec::new()),
                                _ => crate::value::Value::Set(Vec::new()),
                            };
                            value.apply_diff(&d, kind);
                            row.insert(column, value);
                        }
                    }
                }
                old.map(|old| RowChange::Modify {
                    old,
                    new: row.clone(),
                })
            }
            RowUpdate::Delete => match replica.remove(&uuid) {
                Some(old) if record => Some(RowChange::Delete(old)),
                _ => None,
            },
        })
    }
}

/// Applies parsed rows to a replica, recording the changes.
struct RecordingSink<'a> {
    replica: &'a mut Replica,
    record: bool,
    changes: &'a mut Vec<(String, Uuid, RowChange)>,
}

impl RowSink for RecordingSink<'_> {
    fn begin(&mut self, _found: bool) -> Result<(), Error> {
        Ok(())
    }
    fn row(&mut self, table: &str, uuid: Uuid, update: RowUpdate) -> Result<(), Error> {
        if let Some(change) = self
            .replica
            .apply_row(table, uuid.clone(), update, self.record)?
        {
            self.changes.push((table.to_owned(), uuid, change));
        }
        Ok(())
    }
}

/// The kind of a column the schema does not name (none is monitored; a replica applied
/// before a schema was read): a map's diff patches it, anything else is taken as the new
/// value.
fn guessed_kind(diff: &crate::value::Value) -> ColumnKind {
    match diff {
        crate::value::Value::Map(_) => ColumnKind::Map,
        _ => ColumnKind::Scalar,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::value::Value;

    const U1: &str = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";

    #[test]
    fn a_full_load_fills_the_replica_and_records_nothing() {
        let mut r = Replica::default();
        r.load_update2(&json!({"Chassis": {U1: {"initial": {"name": "a"}}}}))
            .unwrap();
        let (_, row) = r.rows("Chassis").next().unwrap();
        assert_eq!(row.get("name"), Some(&Value::from("a")));
        // Later updates apply on top, recorded as usual.
        let changes = r
            .apply_update2(&json!({"Chassis": {U1: {"modify": {"name": "b"}}}}))
            .unwrap();
        assert!(matches!(&changes[0].2, RowChange::Modify { old, new }
            if old.get("name") == Some(&Value::from("a")) && new.get("name") == Some(&Value::from("b"))));
    }

    #[test]
    fn applies_initial_modify_delete() {
        let mut r = Replica::default();
        r.apply_update2(
            &json!({"T": {U1: {"initial": {"name": "a", "ids": ["map", [["k", "v"]]]}}}}),
        )
        .unwrap();
        let uuid = Uuid::parse(U1).unwrap();
        assert_eq!(r.row("T", &uuid).unwrap()["name"], Value::from("a"));
        let changes = r
            .apply_update2(&json!({"T": {U1: {"modify": {"name": "b", "ids": ["map", [["k", "v"], ["k2", "v2"]]]}}}}))
            .unwrap();
        let row = r.row("T", &uuid).unwrap();
        assert_eq!(row["name"], Value::from("b"));
        assert_eq!(row["ids"], Value::string_map([("k2", "v2")]));
        assert!(matches!(changes[0].2, RowChange::Modify { .. }));
        r.apply_update2(&json!({"T": {U1: {"delete": null}}}))
            .unwrap();
        assert_eq!(r.len("T"), 0);
        assert!(
            r.apply_update2(&json!({"T": {U1: {"modify": {}}}}))
                .is_err()
        );
        assert!(r.apply_update2(&json!(["not", "an", "object"])).is_err());
    }
}
