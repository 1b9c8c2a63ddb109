//! Loading a monitor's reply, first or after a reconnect, into the replica and the table
//! consumers.

use super::*;

/// Sets up the data monitor (the unnamed monitors; `monitor_cond_since` from transaction
/// `since` where the server has it, else `monitor_cond`) and applies its reply. Optional
/// columns are asked for; one the server refuses is left out of `monitors` and the request
/// made again (a refusal costs the server next to nothing; reading the schema first would cost
/// it as much as a small monitor, on every session; the copy of the schema in `_Server` is not
/// updated by a conversion in ovsdb-server 3.1, so it cannot tell that a column is missing).
pub(super) async fn load_data(
    shared: &Shared,
    conn: &Connection,
    monitors: &mut [MonitorRequest],
    since: String,
) -> Result<Loaded, Error> {
    if monitors.iter().all(|m| m.name.is_some()) {
        return Ok(Loaded::default());
    }
    let database = &shared.options.database;
    for monitor in monitors.iter_mut().filter(|m| m.name.is_none()) {
        if let Some(columns) = &mut monitor.columns {
            columns.extend(monitor.optional_columns.iter().cloned());
        }
    }
    let (reply, asked) = loop {
        let asked = std::time::Instant::now();
        let reply = conn
            .call_raw(
                "monitor_cond_since",
                json!([database, DATA_MONITOR, data_requests(monitors), since]),
            )
            .await;
        if let Err(Error::Rpc {
            kind: ErrorKind::Syntax,
            details: Some(details),
        }) = &reply
            && let Some(column) = leave_out_refused(monitors, details)
        {
            tracing::debug!(column, "not in the server's schema: not monitored");
            continue;
        }
        break (reply, asked);
    };
    match reply {
        // Parsed row by row into the replica and the consumers: with 100,000s of rows the
        // reply is large, and never becomes a JSON tree.
        Ok(reply) => {
            let received = std::time::Instant::now();
            let applied = Applier::lock(shared, monitors, None).load(|applier| {
                let txn = parse_monitor_since_reply(reply.get(), applier)?;
                Ok((applier.found, txn))
            });
            tracing::debug!(
                bytes = reply.get().len(),
                waited = ?received - asked,
                applied_in = ?received.elapsed(),
                "monitor reply"
            );
            applied
        }
        Err(Error::Rpc {
            kind: ErrorKind::UnknownMethod,
            ..
        }) => {
            let reply = conn
                .call_raw(
                    "monitor_cond",
                    json!([database, DATA_MONITOR, data_requests(monitors)]),
                )
                .await?;
            Applier::lock(shared, monitors, None).load(|applier| {
                applier.begin(false)?;
                parse_table_updates(reply.get(), applier)?;
                Ok((false, None))
            })
        }
        Err(e) => Err(e),
    }
}

/// A monitor reply, applied.
#[derive(Default)]
pub(super) struct Loaded {
    /// The server resumed from our last transaction (only changes since were sent).
    pub(super) found: bool,
    /// The replica's changes (none recorded for a full load).
    pub(super) changes: Vec<(String, Uuid, RowChange)>,
    /// The last transaction id, to resume from.
    pub(super) txn: Option<String>,
}

/// Applies parsed rows of one batch (a monitor reply or a notification): rows of consumed
/// tables to their consumer, the others to the replica. Holds the replica's write lock and
/// the consumers' locks for the batch, so readers never see half of one.
pub(super) struct Applier<'a> {
    /// The monitor the batch is of: a named one (its rows are known by its name), or None
    /// for the data monitor (by their table's name).
    pub(super) scope: Option<&'a str>,
    pub(super) replica: std::sync::RwLockWriteGuard<'a, Replica>,
    pub(super) consumers: Vec<(
        &'a str,
        std::sync::MutexGuard<'a, dyn TableConsumer + 'static>,
    )>,
    /// Whether the server resumed from our last transaction (a monitor reply), or sends
    /// changes (a notification): then the replica's changes are recorded.
    pub(super) found: bool,
    pub(super) changes: Vec<(String, Uuid, RowChange)>,
    /// The replicated tables (and named monitors) this batch changed.
    pub(super) changed: Changed,
    /// The keys of the batch's monitor that are replicated.
    pub(super) replicated: Vec<String>,
    /// The keys of the batch's monitor that are consumed.
    pub(super) consumed: Vec<String>,
}

impl<'a> Applier<'a> {
    /// Locks the replica and every consumer (each sees every batch done) for a batch of
    /// the monitor `scope` (see [`Applier::scope`]).
    pub(super) fn lock(
        shared: &'a Shared,
        monitors: &'a [MonitorRequest],
        scope: Option<&'a str>,
    ) -> Self {
        let replica = shared
            .replica
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let consumers = monitors
            .iter()
            .filter_map(|m| {
                let consumer = m.consumer.as_ref()?;
                Some((
                    m.key(),
                    consumer.0.lock().unwrap_or_else(PoisonError::into_inner),
                ))
            })
            .collect();
        let in_scope = |m: &&MonitorRequest| m.name.as_deref() == scope;
        Self {
            scope,
            replica,
            consumers,
            found: true,
            changes: Vec::new(),
            changed: Default::default(),
            replicated: monitors
                .iter()
                .filter(in_scope)
                .filter(|m| m.consumer.is_none())
                .map(|m| m.key().to_owned())
                .collect(),
            consumed: monitors
                .iter()
                .filter(in_scope)
                .filter(|m| m.consumer.is_some())
                .map(|m| m.key().to_owned())
                .collect(),
        }
    }

    /// Applies a monitor reply with `parse` (which returns whether the server resumed, and
    /// the last transaction id), and tells the consumers the batch is done.
    pub(super) fn load(
        mut self,
        parse: impl FnOnce(&mut Self) -> Result<(bool, Option<String>), Error>,
    ) -> Result<Loaded, Error> {
        let (found, txn) = parse(&mut self)?;
        Ok(Loaded {
            found,
            changes: self.finish(),
            txn,
        })
    }

    /// Tells the consumers the batch is done; returns the replica's changes.
    pub(super) fn finish(mut self) -> Vec<(String, Uuid, RowChange)> {
        for (_, consumer) in &mut self.consumers {
            consumer.batch_done(&self.replica, &self.changed);
        }
        self.changes
    }
}

impl RowSink for Applier<'_> {
    fn begin(&mut self, found: bool) -> Result<(), Error> {
        self.found = found;
        if !found {
            // A full load (of the batch's monitor) is announced as a resync, without a copy
            // of every row; each of its replicated tables counts as changed (empty ones
            // included).
            for key in &self.replicated {
                self.replica.clear_table(key);
            }
            self.changed.extend(self.replicated.iter().cloned());
            for (key, consumer) in &mut self.consumers {
                if self.consumed.iter().any(|c| c == key) {
                    consumer.reset();
                }
            }
        }
        Ok(())
    }

    fn row(&mut self, table: &str, uuid: Uuid, update: RowUpdate) -> Result<(), Error> {
        // The rows of a named monitor are kept under its name; their diffs apply by their
        // table's column kinds.
        let key = self.scope.unwrap_or(table);
        if let Some((_, consumer)) = self.consumers.iter_mut().find(|(t, _)| *t == key) {
            return consumer.row(&uuid, update);
        }
        if !self.changed.contains(key) {
            self.changed.insert(key.to_owned());
        }
        if let Some(change) =
            self.replica
                .apply_row_kept_as(key, table, uuid.clone(), update, self.found)?
        {
            self.changes.push((key.to_owned(), uuid, change));
        }
        Ok(())
    }
}
