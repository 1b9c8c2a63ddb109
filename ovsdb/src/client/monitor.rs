//! What the client monitors: [`MonitorRequest`]s, the data monitor's request, and the named
//! monitors (a table monitored again with other columns and conditions), fetched and applied.

use super::*;

/// A table to monitor.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorRequest {
    /// Table name.
    pub table: String,
    /// Columns to replicate; `None` for all.
    pub columns: Option<Vec<String>>,
    /// Only rows matching any of these (conditional monitoring: ovsdb-server takes a
    /// monitor's conditions as a disjunction, unlike a transaction's); empty for all rows.
    pub conditions: Vec<Condition>,
    /// Where the table's rows go instead of the replica (see [`TableConsumer`]); `None`
    /// replicates them.
    pub consumer: Option<ConsumerHandle>,
    /// Set by [`MonitorRequest::named`]: a monitor of its own under this name.
    pub name: Option<String>,
    /// Set by [`MonitorRequest::optional_columns`].
    pub optional_columns: Vec<String>,
}

impl MonitorRequest {
    /// All rows and columns of `table`.
    pub fn table(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            columns: None,
            conditions: Vec::new(),
            consumer: None,
            name: None,
            optional_columns: Vec::new(),
        }
    }

    /// A monitor of its own (its own monitor id on the session), so that a table can be
    /// monitored again with other columns or conditions: its rows are known by `name` in the
    /// replica and change sets. Meant for a few rows of a large table: ovsdb-server builds a
    /// monitor's first reply from every row of the table, whatever its conditions, so this
    /// monitor asks for no initial rows; a session resumes it from its last transaction
    /// where the server still has it (`monitor_cond_since`, clustered databases), else loads
    /// its rows with a `select` per condition. Its conditions are fixed
    /// ([`Client::set_conditions`] refuses them). Unnamed monitors share one monitor id and
    /// are known by their table's name. Give it other columns than the other monitors of
    /// its table: ovsdb-server 3.1, which shares one change tracker between monitors of the
    /// same columns, was seen to lose a row that started matching a named monitor's
    /// conditions when its columns were those of an unconditional monitor.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// What its rows are known by: its name, else its table's.
    pub fn key(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.table)
    }

    /// Also these columns, where the server's schema has them (a newer schema adds columns,
    /// and asking for one it lacks fails the monitor): each session asks for them, and asks
    /// again without those the server refuses. With [`MonitorRequest::columns`]; named
    /// monitors ignore them.
    pub fn optional_columns(mut self, columns: &[&str]) -> Self {
        self.optional_columns = columns.iter().map(|c| (*c).to_owned()).collect();
        self
    }

    /// Only these columns.
    pub fn columns(mut self, columns: &[&str]) -> Self {
        self.columns = Some(columns.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    /// Also rows matching `condition` (repeatable: a row matching any of them is monitored).
    pub fn matching(mut self, condition: Condition) -> Self {
        self.conditions.push(condition);
        self
    }

    /// Hands the table's rows to `consumer` as they arrive, instead of replicating them: the
    /// replica and change sets leave the table out.
    pub fn consumed_by(mut self, consumer: ConsumerHandle) -> Self {
        self.consumer = Some(consumer);
        self
    }

    fn to_json(&self) -> Json {
        let mut req = json!({});
        if let Some(columns) = &self.columns {
            req["columns"] = json!(columns);
        }
        if !self.conditions.is_empty() {
            req["where"] = Json::Array(self.conditions.iter().map(Condition::to_json).collect());
        }
        if self.name.is_some() {
            // Loaded by select (see MonitorRequest::named).
            req["select"] = json!({"initial": false});
        }
        json!([req])
    }

    /// The selects that load a named monitor: one per condition (a monitor's conditions are
    /// a disjunction, a select's a conjunction), or one of every row.
    fn load_operations(&self) -> Vec<Operation> {
        let mut columns = self.columns.clone();
        if let Some(columns) = &mut columns {
            columns.push("_uuid".to_owned());
        }
        let select = |conditions: Vec<Condition>| Operation::Select {
            table: self.table.clone(),
            conditions,
            columns: columns.clone(),
        };
        if self.conditions.is_empty() {
            vec![select(Vec::new())]
        } else {
            self.conditions
                .iter()
                .map(|c| select(vec![c.clone()]))
                .collect()
        }
    }
}

/// The data monitor's requests: the unnamed monitors, by table.
pub(super) fn data_requests(monitors: &[MonitorRequest]) -> Json {
    Json::Object(
        monitors
            .iter()
            .filter(|m| m.name.is_none())
            .map(|m| (m.table.clone(), m.to_json()))
            .collect(),
    )
}

/// If the server refused a monitor request for an optional column (`details`: "COLUMN is not
/// a valid column name"), leaves that column out of the monitors that asked for it and
/// returns it; None for any other refusal.
pub(super) fn leave_out_refused(monitors: &mut [MonitorRequest], details: &str) -> Option<String> {
    let column = details.strip_suffix(" is not a valid column name")?;
    let mut left_out = false;
    for monitor in monitors {
        if let Some(at) = monitor.optional_columns.iter().position(|c| c == column) {
            monitor.optional_columns.remove(at);
            if let Some(columns) = &mut monitor.columns {
                columns.retain(|c| c != column);
            }
            left_out = true;
        }
    }
    left_out.then(|| column.to_owned())
}

/// A named monitor as a session set it up: what its reply and selects brought, to be
/// applied after the data monitor's reply.
pub(super) struct NamedFetched {
    /// The changes since the last transaction (if `found`), else nothing.
    pub(super) changes: CollectedRows,
    /// The selects' results, if not resumed.
    pub(super) selected: Vec<OpResult>,
    /// The transaction to resume from.
    pub(super) txn: String,
}

/// Sets up a named monitor (see [`MonitorRequest::named`]) and fetches what brings its rows
/// up to date: the changes since transaction `since` if the server still has them, else
/// every matching row, by select (the monitor sends no initial rows).
pub(super) async fn fetch_named(
    database: &str,
    conn: &Connection,
    monitor: &MonitorRequest,
    since: Option<String>,
) -> Result<NamedFetched, Error> {
    let name = monitor.key();
    let monitor_request = conn.call_raw(
        "monitor_cond_since",
        json!([
            database,
            name,
            { &monitor.table: monitor.to_json() },
            since.as_deref().unwrap_or(NO_TXN)
        ]),
    );
    let ops = monitor.load_operations();
    let select = || async {
        let mut params = vec![json!(database)];
        params.extend(ops.iter().map(Operation::to_json));
        let reply = conn.call("transact", Json::Array(params)).await?;
        parse_results(&reply, ops.len())
    };
    // The server answers in order: the monitor is in place before the selects run, and the
    // updates of the transactions they see come before their reply. With nothing to resume
    // from, the selects are asked at once, behind the monitor request (and behind the data
    // monitor's, which the server answers first): their reply is there when the data
    // monitor's has been applied.
    let (reply, early) = if since.is_none() {
        let (reply, selected) = tokio::join!(monitor_request, select());
        (reply?, Some(selected?))
    } else {
        (monitor_request.await?, None)
    };
    let mut changes = CollectedRows::default();
    let txn = parse_monitor_since_reply(reply.get(), &mut changes)?
        .ok_or_else(|| Error::Protocol(format!("{name}: no transaction id")))?;
    let selected = match (changes.found, early) {
        (true, _) => Vec::new(),
        (false, Some(selected)) => selected,
        (false, None) => select().await?,
    };
    Ok(NamedFetched {
        changes,
        selected,
        txn,
    })
}

/// Applies what [`fetch_named`] brought as one batch; returns the transaction to resume from.
pub(super) fn apply_named(
    shared: &Shared,
    monitors: &[MonitorRequest],
    monitor: &MonitorRequest,
    fetched: NamedFetched,
) -> Result<String, Error> {
    let name = monitor.key();
    let found = fetched.changes.found;
    let loaded = Applier::lock(shared, monitors, Some(name)).load(|applier| {
        applier.begin(found)?;
        for (table, uuid, update) in fetched.changes.rows {
            applier.row(&table, uuid, update)?;
        }
        // A row matching several conditions comes once per select: given once.
        let mut seen = std::collections::HashSet::new();
        for row in fetched.selected.iter().flat_map(OpResult::rows) {
            let mut row = row.clone();
            let uuid = row
                .remove("_uuid")
                .and_then(|u| u.atom()?.as_uuid().cloned())
                .ok_or_else(|| Error::Protocol(format!("{name}: a row without _uuid")))?;
            row.remove("_version");
            if seen.insert(uuid.clone()) {
                applier.row(&monitor.table, uuid, RowUpdate::Initial(row))?;
            }
        }
        Ok((found, None))
    })?;
    shared.publish(!loaded.found, loaded.changes);
    Ok(fetched.txn)
}

/// The rows of a (small) monitor reply, kept to be applied later.
#[derive(Default)]
pub(super) struct CollectedRows {
    pub(super) found: bool,
    pub(super) rows: Vec<(String, Uuid, RowUpdate)>,
}

impl RowSink for CollectedRows {
    fn begin(&mut self, found: bool) -> Result<(), Error> {
        self.found = found;
        Ok(())
    }

    fn row(&mut self, table: &str, uuid: Uuid, update: RowUpdate) -> Result<(), Error> {
        self.rows.push((table.to_owned(), uuid, update));
        Ok(())
    }
}
