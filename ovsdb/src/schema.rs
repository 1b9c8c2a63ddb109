//! What the client reads of a database's schema: each column's kind, which says how an
//! `update2` "modify" of it applies. ovsdb-server sends a column that can hold more than one
//! element (a set or a map whose `max` is above 1) as the elements that changed, and any
//! other column (a scalar, an optional value) as its new value (ovsdb-server(7);
//! `ovsdb_datum_diff`). The two cannot be told apart from the values alone: `{a}` and a diff
//! `{b}` is `{a, b}` for a set and `{b}` for an optional value.

use std::collections::HashMap;

use serde_json::Value as Json;

/// How a column's diff applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// At most one element (a scalar, or an optional value): the diff is the new value.
    Scalar,
    /// A set that can hold more than one element: the diff's elements are toggled.
    Set,
    /// A map that can hold more than one pair: a diff pair with the current value removes
    /// the key, with another value replaces it, and an absent key is added.
    Map,
}

impl ColumnKind {
    /// The kind of a column of type `column_type` (the schema's `type`).
    pub fn of(column_type: &Json) -> Self {
        let Json::Object(t) = column_type else {
            // An atomic type's name: one value.
            return ColumnKind::Scalar;
        };
        let composite = match t.get("max") {
            None => false,
            Some(Json::String(s)) => s == "unlimited",
            Some(max) => max.as_u64().is_some_and(|n| n > 1),
        };
        match (composite, t.contains_key("value")) {
            (false, _) => ColumnKind::Scalar,
            (true, false) => ColumnKind::Set,
            (true, true) => ColumnKind::Map,
        }
    }
}

/// The kind of every column of every table of a schema.
#[derive(Clone, Debug, Default)]
pub struct ColumnKinds {
    tables: HashMap<String, HashMap<String, ColumnKind>>,
}

impl ColumnKinds {
    /// Reads them from a schema as `get_schema` returns it.
    pub fn from_schema(schema: &Json) -> Self {
        let mut kinds = Self::default();
        let Some(tables) = schema.get("tables").and_then(Json::as_object) else {
            return kinds;
        };
        for (table, def) in tables {
            let columns = def
                .get("columns")
                .and_then(Json::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(name, c)| Some((name.clone(), ColumnKind::of(c.get("type")?))))
                .collect();
            kinds.tables.insert(table.clone(), columns);
        }
        kinds
    }

    /// The kind of `table`'s `column`, if the schema has it.
    pub fn get(&self, table: &str, column: &str) -> Option<ColumnKind> {
        self.tables.get(table)?.get(column).copied()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn kinds_follow_max() {
        assert_eq!(ColumnKind::of(&json!("string")), ColumnKind::Scalar);
        assert_eq!(
            ColumnKind::of(&json!({"key": "string"})),
            ColumnKind::Scalar
        );
        let optional =
            json!({"key": {"type": "string", "enum": ["set", ["tcp", "udp"]]}, "min": 0, "max": 1});
        assert_eq!(ColumnKind::of(&optional), ColumnKind::Scalar);
        let set = json!({"key": {"type": "uuid"}, "min": 0, "max": "unlimited"});
        assert_eq!(ColumnKind::of(&set), ColumnKind::Set);
        assert_eq!(
            ColumnKind::of(&json!({"key": "integer", "max": 4})),
            ColumnKind::Set
        );
        let map = json!({"key": "string", "value": "string", "min": 0, "max": "unlimited"});
        assert_eq!(ColumnKind::of(&map), ColumnKind::Map);
        let one_pair = json!({"key": "string", "value": "string", "min": 0, "max": 1});
        assert_eq!(ColumnKind::of(&one_pair), ColumnKind::Scalar);
    }

    #[test]
    fn every_column_of_a_real_schema() {
        let schema: Json = serde_json::from_str(
            &std::fs::read_to_string("/usr/share/ovn/ovn-sb.ovsschema").unwrap(),
        )
        .unwrap();
        let kinds = ColumnKinds::from_schema(&schema);
        let lb = |c| kinds.get("Load_Balancer", c);
        assert_eq!(lb("protocol"), Some(ColumnKind::Scalar));
        assert_eq!(lb("datapath_group"), Some(ColumnKind::Scalar));
        assert_eq!(lb("datapaths"), Some(ColumnKind::Set));
        assert_eq!(lb("vips"), Some(ColumnKind::Map));
        assert_eq!(lb("name"), Some(ColumnKind::Scalar));
        assert_eq!(
            kinds.get("Port_Binding", "chassis"),
            Some(ColumnKind::Scalar)
        );
        assert_eq!(kinds.get("Nope", "chassis"), None);
    }
}
