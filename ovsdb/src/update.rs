//! Table updates (`<table-updates2>`, RFC 7047 as extended by ovsdb-server(7)) taken row by
//! row as they are parsed, without a JSON tree of the whole message: a monitor reply of a
//! table with 100,000s of rows costs one row's tree at a time.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use crate::{
    error::Error,
    value::{Row, Uuid},
};

/// One row's update, as the server sent it.
#[derive(Clone, Debug, PartialEq)]
pub enum RowUpdate {
    /// A row present when the monitor started (a full load).
    Initial(Row),
    /// A row inserted since.
    Insert(Row),
    /// A row changed: only the changed columns, each as an `update2` diff to apply to the
    /// old value as its [`crate::ColumnKind`] says ([`crate::Value::apply_diff`]): a scalar
    /// or optional column's new value, a set's elements that changed, a map's pairs that did.
    Modify(Row),
    /// A row deleted.
    Delete,
}

/// Reads `{"initial"|"insert"|"modify": <row>}` or `{"delete": null}` straight from the
/// parser.
impl<'de> serde::Deserialize<'de> for RowUpdate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RowUpdateVisitor)
    }
}

struct RowUpdateVisitor;

impl<'de> Visitor<'de> for RowUpdateVisitor {
    type Value = RowUpdate;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a row-update2 object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RowUpdate, A::Error> {
        let kind: String = map
            .next_key()?
            .ok_or_else(|| de::Error::custom("empty row-update2"))?;
        let update = match kind.as_str() {
            "initial" => RowUpdate::Initial(map.next_value()?),
            "insert" => RowUpdate::Insert(map.next_value()?),
            "modify" => RowUpdate::Modify(map.next_value()?),
            "delete" => {
                map.next_value::<de::IgnoredAny>()?;
                RowUpdate::Delete
            }
            other => return Err(de::Error::custom(format!("unknown row update {other:?}"))),
        };
        if map.next_key::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("row-update2 with more than one member"));
        }
        Ok(update)
    }
}

/// Where parsed row updates go.
pub(crate) trait RowSink {
    /// Before the first row of a monitor reply: whether the server resumes from the last
    /// transaction (`found`), or loads everything afresh.
    fn begin(&mut self, found: bool) -> Result<(), Error>;
    /// One row's update.
    fn row(&mut self, table: &str, uuid: Uuid, update: RowUpdate) -> Result<(), Error>;
}

/// What [`parse_update_params`] found in an `update2`/`update3` notification.
pub(crate) enum UpdateParams {
    /// Updates of monitor `monitor`, given to the sink; the transaction id of `update3`.
    Streamed { txn: Option<String> },
    /// Updates of another monitor (small: the `_Server` monitor, named monitors), left as
    /// JSON.
    Other {
        /// The monitor's id.
        monitor: Json,
        /// The transaction id of `update3`.
        txn: Option<String>,
        /// Its `<table-updates2>`.
        updates: Json,
    },
}

/// Parses a `<table-updates2>` object, giving each row to `sink`.
pub(crate) fn parse_table_updates(text: &str, sink: &mut dyn RowSink) -> Result<(), Error> {
    let mut failure = None;
    let seed = TableUpdates {
        sink,
        failure: &mut failure,
    };
    finish(
        seed.deserialize(&mut serde_json::Deserializer::from_str(text)),
        failure,
    )
}

/// Parses a `monitor_cond_since` reply, `[found, last-txn-id, <table-updates2>]`, giving each
/// row to `sink` (after `begin(found)`). Returns the transaction id.
pub(crate) fn parse_monitor_since_reply(
    text: &str,
    sink: &mut dyn RowSink,
) -> Result<Option<String>, Error> {
    let mut failure = None;
    let visitor = SinceReply {
        sink,
        failure: &mut failure,
    };
    finish(
        serde_json::Deserializer::from_str(text).deserialize_seq(visitor),
        failure,
    )
}

/// Parses the params of an `update2` (`[monitor, updates]`) or `update3` (`[monitor, txn,
/// updates]`) notification; the updates of `streamed_monitor` go to `sink`, row by row.
pub(crate) fn parse_update_params(
    text: &str,
    with_txn: bool,
    streamed_monitor: &str,
    sink: &mut dyn RowSink,
) -> Result<UpdateParams, Error> {
    let mut failure = None;
    let visitor = NotificationParams {
        sink,
        failure: &mut failure,
        with_txn,
        streamed_monitor,
    };
    finish(
        serde_json::Deserializer::from_str(text).deserialize_seq(visitor),
        failure,
    )
}

/// Our own error if a callback failed, else the parser's.
fn finish<T>(parsed: Result<T, serde_json::Error>, failure: Option<Error>) -> Result<T, Error> {
    match (parsed, failure) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(Error::Protocol(format!("table updates: {e}"))),
    }
}

/// Keeps a callback's error to return it as is, and stops the parser.
fn stash<E: de::Error>(failure: &mut Option<Error>, e: Error) -> E {
    let text = e.to_string();
    *failure = Some(e);
    E::custom(text)
}

struct TableUpdates<'a, 'f> {
    sink: &'a mut dyn RowSink,
    failure: &'f mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for TableUpdates<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TableUpdates<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a table-updates2 object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut tables: A) -> Result<(), A::Error> {
        while let Some(table) = tables.next_key::<String>()? {
            tables.next_value_seed(TableRows {
                table: &table,
                sink: &mut *self.sink,
                failure: &mut *self.failure,
            })?;
        }
        Ok(())
    }
}

struct TableRows<'a, 'f> {
    table: &'a str,
    sink: &'a mut dyn RowSink,
    failure: &'f mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for TableRows<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TableRows<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a table-update2 object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut rows: A) -> Result<(), A::Error> {
        while let Some(uuid) = rows.next_key_seed(UuidKey)? {
            // One row at a time, read straight into its values.
            let update: RowUpdate = rows.next_value()?;
            let applied = uuid.and_then(|uuid| self.sink.row(self.table, uuid, update));
            if let Err(e) = applied {
                return Err(stash(self.failure, e));
            }
        }
        Ok(())
    }
}

/// A row's UUID, parsed from the key's text where it lies (no string of its own first).
struct UuidKey;

impl<'de> DeserializeSeed<'de> for UuidKey {
    type Value = Result<Uuid, Error>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for UuidKey {
    type Value = Result<Uuid, Error>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a row UUID")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Uuid::parse(v))
    }
}

struct SinceReply<'a, 'f> {
    sink: &'a mut dyn RowSink,
    failure: &'f mut Option<Error>,
}

impl<'de> Visitor<'de> for SinceReply<'_, '_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("[found, last-txn-id, table-updates2]")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let missing = || de::Error::custom("monitor_cond_since reply is not of three elements");
        let found: bool = seq.next_element()?.ok_or_else(missing)?;
        let txn: Json = seq.next_element()?.ok_or_else(missing)?;
        if let Err(e) = self.sink.begin(found) {
            return Err(stash(self.failure, e));
        }
        seq.next_element_seed(TableUpdates {
            sink: self.sink,
            failure: self.failure,
        })?
        .ok_or_else(missing)?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(missing());
        }
        Ok(txn.as_str().map(str::to_owned))
    }
}

struct NotificationParams<'a, 'f> {
    sink: &'a mut dyn RowSink,
    failure: &'f mut Option<Error>,
    with_txn: bool,
    streamed_monitor: &'a str,
}

impl<'de> Visitor<'de> for NotificationParams<'_, '_> {
    type Value = UpdateParams;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("update2 or update3 params")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let missing = || de::Error::custom("too few update params");
        let monitor: Json = seq.next_element()?.ok_or_else(missing)?;
        let txn = if self.with_txn {
            let txn: Json = seq.next_element()?.ok_or_else(missing)?;
            txn.as_str().map(str::to_owned)
        } else {
            None
        };
        let params = if monitor.as_str() == Some(self.streamed_monitor) {
            seq.next_element_seed(TableUpdates {
                sink: self.sink,
                failure: self.failure,
            })?
            .ok_or_else(missing)?;
            UpdateParams::Streamed { txn }
        } else {
            let updates: Json = seq.next_element()?.ok_or_else(missing)?;
            UpdateParams::Other {
                monitor,
                txn,
                updates,
            }
        };
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("too many update params"));
        }
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    const U1: &str = "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";
    const U2: &str = "6b3cfb03-2143-4e8a-9067-dac1ef7ec6d7";

    #[derive(Default)]
    struct Collect {
        begun: Option<bool>,
        rows: Vec<(String, Uuid, RowUpdate)>,
        fail_on: Option<&'static str>,
    }

    impl RowSink for Collect {
        fn begin(&mut self, found: bool) -> Result<(), Error> {
            self.begun = Some(found);
            Ok(())
        }
        fn row(&mut self, table: &str, uuid: Uuid, update: RowUpdate) -> Result<(), Error> {
            if self.fail_on == Some(table) {
                return Err(Error::Protocol(format!("refused {table}")));
            }
            self.rows.push((table.to_owned(), uuid, update));
            Ok(())
        }
    }

    #[test]
    fn rows_come_one_by_one_in_order() {
        let text = format!(
            r#"{{"A":{{"{U1}":{{"initial":{{"name":"a"}}}},"{U2}":{{"delete":null}}}},"B":{{"{U1}":{{"modify":{{"ids":["map",[["k","v"]]]}}}}}}}}"#
        );
        let mut sink = Collect::default();
        parse_table_updates(&text, &mut sink).unwrap();
        let u1 = Uuid::parse(U1).unwrap();
        assert_eq!(
            sink.rows,
            vec![
                (
                    "A".into(),
                    u1.clone(),
                    RowUpdate::Initial(Row::from([("name".into(), Value::from("a"))]))
                ),
                ("A".into(), Uuid::parse(U2).unwrap(), RowUpdate::Delete),
                (
                    "B".into(),
                    u1,
                    RowUpdate::Modify(Row::from([("ids".into(), Value::string_map([("k", "v")]))]))
                ),
            ]
        );
    }

    #[test]
    fn a_since_reply_begins_before_its_rows() {
        let text = format!(r#"[false,"txn-1",{{"A":{{"{U1}":{{"initial":{{}}}}}}}}]"#);
        let mut sink = Collect::default();
        let txn = parse_monitor_since_reply(&text, &mut sink).unwrap();
        assert_eq!(txn.as_deref(), Some("txn-1"));
        assert_eq!(sink.begun, Some(false));
        assert_eq!(sink.rows.len(), 1);
        for bad in ["[true]", r#"[true,"t",{},1]"#, "{}", r#"[true,"t",[]]"#] {
            assert!(
                parse_monitor_since_reply(bad, &mut Collect::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn notifications_stream_only_the_data_monitor() {
        let data = format!(r#"["data","txn-2",{{"A":{{"{U1}":{{"insert":{{}}}}}}}}]"#);
        let mut sink = Collect::default();
        let parsed = parse_update_params(&data, true, "data", &mut sink).unwrap();
        assert!(matches!(parsed, UpdateParams::Streamed { txn: Some(t) } if t == "txn-2"));
        assert_eq!(sink.rows.len(), 1);
        let server = r#"["server",{"Database":{}}]"#;
        let mut sink = Collect::default();
        let parsed = parse_update_params(server, false, "data", &mut sink).unwrap();
        assert!(
            matches!(parsed, UpdateParams::Other { monitor, updates, .. } if monitor == "server" && updates["Database"].is_object())
        );
        assert!(sink.rows.is_empty());
    }

    #[test]
    fn a_sink_error_is_returned_as_is_and_bad_rows_fail() {
        let text = format!(r#"{{"A":{{"{U1}":{{"insert":{{}}}}}}}}"#);
        let mut sink = Collect {
            fail_on: Some("A"),
            ..Collect::default()
        };
        let err = parse_table_updates(&text, &mut sink).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol(m) if m == "refused A"),
            "{err}"
        );
        for bad in [
            r#"{"A":{"not-a-uuid":{"insert":{}}}}"#.to_owned(),
            format!(r#"{{"A":{{"{U1}":{{"upsert":{{}}}}}}}}"#),
            format!(r#"{{"A":{{"{U1}":{{"insert":[]}}}}}}"#),
            r#"{"A":[]}"#.to_owned(),
        ] {
            assert!(
                parse_table_updates(&bad, &mut Collect::default()).is_err(),
                "{bad}"
            );
        }
    }
}
