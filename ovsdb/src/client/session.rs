//! A session and the loop over them: connect to a usable server, set up monitors, follow
//! updates; on failure, the next remote after a backoff with jitter.

use super::*;

/// Why a session could not be set up or ended.
pub(super) enum SessionEnd {
    /// The server is a follower (or not connected to its cluster).
    NotLeader,
    /// Anything else.
    Failed(Arc<Error>),
    /// The client was dropped.
    Stopped,
}

pub(super) async fn session_loop(
    shared: Arc<Shared>,
    tls: Option<Tls>,
    mut stop: mpsc::Receiver<()>,
) {
    let remotes = shared.options.remotes.clone();
    let mut backoff = shared.options.backoff_min;
    let mut next = 0usize;
    let mut failures_this_round = 0usize;
    // Members of this round that refused as followers.
    let mut followers_this_round = 0usize;
    // When each failure to connect was last logged as a warning.
    let mut warned: HashMap<String, tokio::time::Instant> = HashMap::new();
    // monitor_cond_since lets a reconnect fetch only what changed since these transactions.
    let mut resume = Resume::default();
    // Seeded per client: the clock and this client's address.
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (Arc::as_ptr(&shared) as u64)
        | 1;
    if !shared.options.leader_only {
        // Any member serves: clients that start together spread over the members.
        next = (jitter(Duration::from_secs(1), &mut rng).as_nanos() as usize) % remotes.len();
    }
    loop {
        let remote = &remotes[next % remotes.len()];
        next += 1;
        if shared.conditions_changed.swap(false, Ordering::Relaxed) {
            resume.data = None;
        }
        let end = tokio::select! {
            end = session(&shared, remote, tls.as_ref(), &mut resume) => end,
            _ = stop.recv() => SessionEnd::Stopped,
        };
        shared.conn.send_replace(None);
        let reason = match &end {
            SessionEnd::Stopped => return,
            SessionEnd::NotLeader => {
                shared.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
                format!("{remote} is not the cluster leader")
            }
            SessionEnd::Failed(e) => format!("{remote}: {e}"),
        };
        if let SessionEnd::Failed(e) = &end
            && let Error::Oversized { limit } = **e
        {
            // Every attempt would download the same message again and fail the same way:
            // say so loudly, and wait as long as the backoff allows before the next one.
            tracing::warn!(
                limit,
                "{reason}: raise the client's message size limit; retrying in {:?}",
                shared.options.backoff_max
            );
            shared
                .status
                .send_replace(Status::Disconnected(Some(reason.clone())));
            tokio::select! {
                _ = tokio::time::sleep(shared.options.backoff_max) => {}
                _ = stop.recv() => return,
            }
            continue;
        }
        let was_connected = matches!(*shared.status.borrow(), Status::Connected(_));
        shared
            .status
            .send_replace(Status::Disconnected(Some(reason.clone())));
        if was_connected {
            shared.stats.disconnects.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("OVSDB connection lost: {reason}");
            // A session that worked: try the others at once, no backoff, but not all clients
            // of a server that went away in the same millisecond: a jitter of up to the
            // shortest backoff spreads the reconnect storm.
            backoff = shared.options.backoff_min;
            failures_this_round = 0;
            followers_this_round = 0;
            tokio::select! {
                _ = tokio::time::sleep(jitter(shared.options.backoff_min, &mut rng)) => {}
                _ = stop.recv() => return,
            }
            continue;
        }
        let now = tokio::time::Instant::now();
        let searching_leader = matches!(end, SessionEnd::NotLeader);
        if !searching_leader {
            shared
                .stats
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        match warned.get(&reason) {
            // A follower refusing is the search for the leader (counted as a leader change).
            _ if searching_leader => tracing::debug!("OVSDB connection attempt: {reason}"),
            Some(at) if now.duration_since(*at) < REPEAT_WARNING_AFTER => {
                tracing::debug!("OVSDB connection attempt failed: {reason}")
            }
            _ => {
                tracing::warn!("cannot connect to the database: {reason} (retrying)");
                warned.retain(|_, at| now.duration_since(*at) < REPEAT_WARNING_AFTER);
                warned.insert(reason, now);
            }
        }
        failures_this_round += 1;
        followers_this_round += usize::from(searching_leader);
        if failures_this_round >= remotes.len() {
            if followers_this_round == remotes.len() {
                // Every member refused as a follower: the cluster has no leader now.
                let key = "no leader".to_owned();
                if warned
                    .get(&key)
                    .is_none_or(|at| now.duration_since(*at) >= REPEAT_WARNING_AFTER)
                {
                    tracing::warn!(
                        "no member of the cluster is its leader (a quorum lost?); retrying"
                    );
                    warned.insert(key, now);
                }
            }
            failures_this_round = 0;
            followers_this_round = 0;
            // Half the backoff, plus a random share of the other half: clients that failed
            // together do not retry together.
            let wait = backoff / 2 + jitter(backoff / 2, &mut rng);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.recv() => return,
            }
            backoff = (backoff * 2).min(shared.options.backoff_max);
        }
    }
}

/// A random duration up to `max` (xorshift64 on `state`).
pub(super) fn jitter(max: Duration, state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    max.mul_f64((*state >> 11) as f64 / (1u64 << 53) as f64)
}

pub(super) const DATA_MONITOR: &str = "data";
pub(super) const SERVER_MONITOR: &str = "server";
pub(super) const NO_TXN: &str = "00000000-0000-0000-0000-000000000000";

/// Where a new session resumes the monitors from (`monitor_cond_since`): the last transaction
/// applied, of the data monitor and of each named one.
#[derive(Default)]
pub(super) struct Resume {
    pub(super) data: Option<String>,
    pub(super) named: HashMap<String, String>,
}

/// One session: connect, check leadership, set up monitors, then follow updates until the
/// connection ends or the server stops being the leader.
pub(super) async fn session(
    shared: &Shared,
    remote: &Remote,
    tls: Option<&Tls>,
    resume: &mut Resume,
) -> SessionEnd {
    let opts = &shared.options;
    let stream =
        match tokio::time::timeout(opts.connect_timeout, remote::connect(remote, tls)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return SessionEnd::Failed(Arc::new(e)),
            Err(_) => return SessionEnd::Failed(Arc::new(Error::Timeout(opts.connect_timeout))),
        };
    let (conn, mut notifications) = Connection::start(stream, opts.rpc);
    // A request fails with Disconnected when the session ends; the session knows why.
    let fail = async |e: Error| match e {
        Error::Disconnected => SessionEnd::Failed(conn.closed().await),
        e => SessionEnd::Failed(Arc::new(e)),
    };

    // Leadership, from the server's own _Server database.
    if opts.leader_only {
        match watch_leadership(&conn, &opts.database).await {
            Ok(true) => {}
            Ok(false) => return SessionEnd::NotLeader,
            Err(e) => return fail(e).await,
        }
    }

    let mut monitors = shared.monitors().clone();
    // Until this reply is applied whole, a reconnect must not resume from an older
    // transaction: what was cleared or half applied would stay missing.
    let since = resume.data.take().unwrap_or_else(|| NO_TXN.to_owned());
    // The named monitors are set up alongside (their requests go out behind the data
    // monitor's) and applied after it.
    let named: Vec<MonitorRequest> = monitors
        .iter()
        .filter(|m| m.name.is_some())
        .cloned()
        .collect();
    let named_since: Vec<Option<String>> =
        named.iter().map(|m| resume.named.remove(m.key())).collect();
    let fetch_named_all = async {
        let mut fetched = Vec::new();
        for (monitor, since) in named.iter().zip(named_since) {
            fetched.push(fetch_named(&opts.database, &conn, monitor, since).await?);
        }
        Ok::<_, Error>(fetched)
    };
    // How each column's diffs apply, from the schema, at every session (a conversion may
    // have changed it; the server then ends the session): asked alongside the monitors, and
    // needed only for the changes that follow their replies.
    let (data, named_fetched, schema) = tokio::join!(
        load_data(shared, &conn, &mut monitors, since),
        fetch_named_all,
        conn.call("get_schema", json!([opts.database]))
    );
    match schema {
        Ok(schema) => shared
            .replica
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set_column_kinds(Arc::new(ColumnKinds::from_schema(&schema))),
        Err(e) => return fail(e).await,
    }
    let found = match data {
        Ok(Loaded {
            found,
            changes,
            txn,
        }) => {
            // Only now: a reconnect asks for changes since the last update applied.
            resume.data = txn;
            shared.publish(!found, changes);
            found
        }
        Err(e) => return fail(e).await,
    };
    let named_fetched = match named_fetched {
        Ok(fetched) => fetched,
        Err(e) => return fail(e).await,
    };
    for (monitor, fetched) in named.iter().zip(named_fetched) {
        match apply_named(shared, &monitors, monitor, fetched) {
            Ok(txn) => {
                resume.named.insert(monitor.key().to_owned(), txn);
            }
            Err(e) => return fail(e).await,
        }
    }
    shared.conn.send_replace(Some(conn.clone()));
    shared.stats.connects.fetch_add(1, Ordering::Relaxed);
    shared
        .status
        .send_replace(Status::Connected(remote.clone()));
    tracing::info!(%remote, incremental = found, "connected to {}", opts.database);

    loop {
        tokio::select! {
            n = notifications.recv() => {
                let Some(n) = n else { return fail(Error::Disconnected).await };
                match handle_notification(shared, &monitors, &opts.database, n, resume) {
                    Ok(true) => {}
                    Ok(false) => return SessionEnd::NotLeader,
                    Err(e) => return fail(e).await,
                }
            }
            reason = conn.closed() => return SessionEnd::Failed(reason),
        }
    }
}

/// Applies one notification. Ok(false) means the server is no longer the leader.
pub(super) fn handle_notification(
    shared: &Shared,
    monitors: &[MonitorRequest],
    database: &str,
    n: Notification,
    resume: &mut Resume,
) -> Result<bool, Error> {
    let with_txn = match n.method.as_str() {
        "update2" => false,
        "update3" => true,
        // The server dropped our monitors (it converted or replaced the database): the
        // replica would go stale, so the session ends and the next one monitors afresh.
        "monitor_canceled" => {
            return Err(Error::Protocol(format!(
                "the server canceled monitor {}",
                n.params
            )));
        }
        _ => return Ok(true),
    };
    let mut applier = Applier::lock(shared, monitors, None);
    let parsed = parse_update_params(n.params.get(), with_txn, DATA_MONITOR, &mut applier);
    let txn = match parsed {
        Ok(UpdateParams::Streamed { txn }) => txn,
        Ok(UpdateParams::Other {
            monitor,
            txn,
            updates,
        }) => {
            drop(applier);
            let Some(named) = monitors
                .iter()
                .find(|m| m.name.is_some() && monitor.as_str() == Some(m.key()))
            else {
                return Ok(still_leader(&updates, database));
            };
            // A named monitor's (small) update.
            let name = named.key();
            let mut applier = Applier::lock(shared, monitors, Some(name));
            if let Err(e) = parse_table_updates(&updates.to_string(), &mut applier) {
                // Half applied: the next session loads it afresh.
                resume.named.remove(name);
                return Err(e);
            }
            let changes = applier.finish();
            if let Some(txn) = txn {
                resume.named.insert(name.to_owned(), txn);
            }
            shared.publish(false, changes);
            return Ok(true);
        }
        Err(e) => {
            // Half applied: the next session loads afresh.
            resume.data = None;
            return Err(e);
        }
    };
    let changes = applier.finish();
    // Recorded once applied: after a failed apply, a reconnect asks for this update again.
    if let Some(txn) = txn {
        resume.data = Some(txn);
    }
    shared.publish(false, changes);
    Ok(true)
}
