//! Transaction operations (RFC 7047 §5.2) and their results.

use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::{
    error::{Error, ErrorKind},
    value::{Row, Uuid, Value, row_from_json, row_to_json},
};

/// A comparison in a `where` clause: `[column, function, value]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    /// Column name (`_uuid` for the row's UUID).
    pub column: String,
    /// `==`, `!=`, `<`, `<=`, `>`, `>=`, `includes` or `excludes`.
    pub function: &'static str,
    /// The value compared with.
    pub value: Value,
}

impl Condition {
    /// `column == value`.
    pub fn eq(column: &str, value: impl Into<Value>) -> Self {
        Self {
            column: column.to_owned(),
            function: "==",
            value: value.into(),
        }
    }

    /// `column includes value`.
    pub fn includes(column: &str, value: impl Into<Value>) -> Self {
        Self {
            column: column.to_owned(),
            function: "includes",
            value: value.into(),
        }
    }

    /// `column excludes value`: for a map, none of `value`'s key-value pairs is in the column.
    pub fn excludes(column: &str, value: impl Into<Value>) -> Self {
        Self {
            column: column.to_owned(),
            function: "excludes",
            value: value.into(),
        }
    }

    /// JSON notation.
    pub fn to_json(&self) -> Json {
        json!([self.column, self.function, self.value.to_json()])
    }
}

/// A mutation: `[column, mutator, value]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    /// Column name.
    pub column: String,
    /// `+=`, `-=`, `*=`, `/=`, `%=`, `insert` or `delete`.
    pub mutator: &'static str,
    /// The operand.
    pub value: Value,
}

impl Mutation {
    /// Inserts elements (or map pairs) into a set or map column.
    pub fn insert(column: &str, value: Value) -> Self {
        Self {
            column: column.to_owned(),
            mutator: "insert",
            value,
        }
    }

    /// Deletes elements (or map keys/pairs) from a set or map column.
    pub fn delete(column: &str, value: Value) -> Self {
        Self {
            column: column.to_owned(),
            mutator: "delete",
            value,
        }
    }

    /// Adds to an integer column.
    pub fn add(column: &str, n: i64) -> Self {
        Self {
            column: column.to_owned(),
            mutator: "+=",
            value: n.into(),
        }
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    /// Insert a row; `uuid_name` lets later operations refer to it.
    Insert {
        /// Table.
        table: String,
        /// Column values.
        row: Row,
        /// Name for `named-uuid` references.
        uuid_name: Option<String>,
    },
    /// Select rows matching `conditions`, returning `columns` (all if None).
    Select {
        /// Table.
        table: String,
        /// Conditions, all of which must hold.
        conditions: Vec<Condition>,
        /// Columns to return.
        columns: Option<Vec<String>>,
    },
    /// Set columns of the matching rows.
    Update {
        /// Table.
        table: String,
        /// Conditions.
        conditions: Vec<Condition>,
        /// New column values.
        row: Row,
    },
    /// Mutate columns of the matching rows.
    Mutate {
        /// Table.
        table: String,
        /// Conditions.
        conditions: Vec<Condition>,
        /// Mutations.
        mutations: Vec<Mutation>,
    },
    /// Delete the matching rows.
    Delete {
        /// Table.
        table: String,
        /// Conditions.
        conditions: Vec<Condition>,
    },
    /// Wait until the matching rows' `columns` equal (or differ from) `rows`.
    Wait {
        /// Table.
        table: String,
        /// Conditions.
        conditions: Vec<Condition>,
        /// Columns compared.
        columns: Vec<String>,
        /// `true` for `==`, `false` for `!=`.
        equal: bool,
        /// The expected rows.
        rows: Vec<Row>,
        /// How long the server may wait; zero checks once.
        timeout: Duration,
    },
    /// A comment recorded in the server's log.
    Comment(String),
}

impl Operation {
    /// JSON notation.
    pub fn to_json(&self) -> Json {
        let conds = |c: &[Condition]| Json::Array(c.iter().map(Condition::to_json).collect());
        match self {
            Operation::Insert {
                table,
                row,
                uuid_name,
            } => {
                let mut op = json!({"op": "insert", "table": table, "row": row_to_json(row)});
                if let Some(name) = uuid_name {
                    op["uuid-name"] = json!(name);
                }
                op
            }
            Operation::Select {
                table,
                conditions,
                columns,
            } => {
                let mut op = json!({"op": "select", "table": table, "where": conds(conditions)});
                if let Some(columns) = columns {
                    op["columns"] = json!(columns);
                }
                op
            }
            Operation::Update {
                table,
                conditions,
                row,
            } => {
                json!({"op": "update", "table": table, "where": conds(conditions), "row": row_to_json(row)})
            }
            Operation::Mutate {
                table,
                conditions,
                mutations,
            } => json!({
                "op": "mutate", "table": table, "where": conds(conditions),
                "mutations": mutations.iter().map(|m| json!([m.column, m.mutator, m.value.to_json()])).collect::<Vec<_>>(),
            }),
            Operation::Delete { table, conditions } => {
                json!({"op": "delete", "table": table, "where": conds(conditions)})
            }
            Operation::Wait {
                table,
                conditions,
                columns,
                equal,
                rows,
                timeout,
            } => json!({
                "op": "wait", "table": table, "where": conds(conditions), "columns": columns,
                "until": if *equal { "==" } else { "!=" },
                "rows": rows.iter().map(row_to_json).collect::<Vec<_>>(),
                "timeout": timeout.as_millis() as u64,
            }),
            Operation::Comment(text) => json!({"op": "comment", "comment": text}),
        }
    }
}

/// The result of one successful operation.
#[derive(Clone, Debug, PartialEq)]
pub enum OpResult {
    /// An insert: the new row's UUID.
    Inserted(Uuid),
    /// A select: the rows.
    Rows(Vec<Row>),
    /// An update, mutate or delete: how many rows it touched.
    Count(u64),
    /// Anything else (wait, comment).
    Empty,
}

impl OpResult {
    /// The UUID of an insert.
    pub fn uuid(&self) -> Option<&Uuid> {
        match self {
            OpResult::Inserted(u) => Some(u),
            _ => None,
        }
    }

    /// The rows of a select.
    pub fn rows(&self) -> &[Row] {
        match self {
            OpResult::Rows(r) => r,
            _ => &[],
        }
    }

    /// The count of an update, mutate or delete.
    pub fn count(&self) -> Option<u64> {
        match self {
            OpResult::Count(n) => Some(*n),
            _ => None,
        }
    }
}

/// Parses a `transact` reply: one result per operation, or the first error.
pub fn parse_results(reply: &Json, ops: usize) -> Result<Vec<OpResult>, Error> {
    let results = reply
        .as_array()
        .ok_or_else(|| Error::Protocol(format!("transact reply is not an array: {reply}")))?;
    // Errors first: an operation's error, or a trailing commit error.
    for (i, r) in results.iter().enumerate() {
        if let Some(err) = r.get("error").and_then(Json::as_str) {
            return Err(Error::Transaction {
                index: (i < ops).then_some(i),
                kind: ErrorKind::from_server(err),
                details: r.get("details").and_then(Json::as_str).map(str::to_owned),
            });
        }
    }
    if results.len() < ops {
        return Err(Error::Protocol(format!(
            "transact reply has {} results for {ops} operations",
            results.len()
        )));
    }
    results[..ops]
        .iter()
        .map(|r| {
            if let Some(uuid) = r.get("uuid") {
                let atom = crate::value::Atom::from_json(uuid)?;
                atom.as_uuid()
                    .cloned()
                    .map(OpResult::Inserted)
                    .ok_or_else(|| Error::Protocol(format!("bad insert result {r}")))
            } else if let Some(rows) = r.get("rows").and_then(Json::as_array) {
                rows.iter()
                    .map(row_from_json)
                    .collect::<Result<_, _>>()
                    .map(OpResult::Rows)
            } else if let Some(n) = r.get("count").and_then(Json::as_u64) {
                Ok(OpResult::Count(n))
            } else {
                Ok(OpResult::Empty)
            }
        })
        .collect()
}
