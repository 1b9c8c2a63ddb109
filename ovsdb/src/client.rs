//! A long-lived client of one database: picks a usable server among several remotes (the
//! leader, for a clustered database), keeps monitors and a replica current, follows leader
//! changes, and reconnects with exponential backoff and jitter.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, RwLock, RwLockReadGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    consumer::{Changed, ConsumerHandle, TableConsumer},
    error::{Error, ErrorKind},
    op::{Condition, OpResult, Operation, parse_results},
    remote::{self, Remote, Tls, TlsFiles},
    replica::{ChangeSet, Replica, RowChange},
    rpc::{Connection, Notification, RpcOptions},
    update::{
        RowSink, RowUpdate, UpdateParams, parse_monitor_since_reply, parse_table_updates,
        parse_update_params,
    },
    value::Uuid,
};

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

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Servers to try, in order (rotating).
    pub remotes: Vec<Remote>,
    /// Database name, e.g. `OVN_Southbound`.
    pub database: String,
    /// For a clustered database, only use the leader (as ovn-controller and ovn-northd do
    /// for writes), and move on when it stops being the leader.
    pub leader_only: bool,
    /// Key, certificate and CA for `ssl:` remotes.
    pub tls: Option<TlsFiles>,
    /// Session settings (probe, message limit).
    pub rpc: RpcOptions,
    /// First delay between connection rounds after failures; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest delay between connection rounds.
    pub backoff_max: Duration,
    /// Longest wait for a connection to be set up: TCP connect and, for `ssl:`, the TLS
    /// handshake (a black-holed remote or a peer that accepts and never speaks must not hold
    /// up the other remotes).
    pub connect_timeout: Duration,
    /// Tables to monitor into the replica.
    pub monitors: Vec<MonitorRequest>,
}

impl ClientOptions {
    /// Defaults for `database` at `remotes`: leader-only, 5 s probe, 100 ms to 8 s backoff,
    /// 10 s to connect.
    pub fn new(remotes: Vec<Remote>, database: &str) -> Self {
        Self {
            remotes,
            database: database.to_owned(),
            leader_only: true,
            tls: None,
            rpc: RpcOptions::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(10),
            monitors: Vec::new(),
        }
    }
}

/// Connection state, as [`Client::status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not connected (yet, or any more); the reason of the last failure, if any.
    Disconnected(Option<String>),
    /// Connected to this remote, monitors in place and the replica current.
    Connected(Remote),
}

/// Counters about the connection's history.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions established (the first one included).
    pub connects: AtomicU64,
    /// Sessions that ended (lost connection, leader change, probe timeout).
    pub disconnects: AtomicU64,
    /// Times a session ended because the server stopped being the cluster leader, or a
    /// server refused us because it was not the leader.
    pub leader_changes: AtomicU64,
    /// Attempts to connect that failed before a session was established (refused,
    /// unreachable, TLS; a follower refusing is a leader change).
    pub connect_failures: AtomicU64,
}

/// How often the same failure to connect is logged as a warning (in between, at debug).
const REPEAT_WARNING_AFTER: Duration = Duration::from_secs(60);

struct Shared {
    options: ClientOptions,
    /// The monitors as they are now: [`ClientOptions::monitors`], with the conditions
    /// [`Client::set_conditions`] changed since.
    monitors: Mutex<Vec<MonitorRequest>>,
    /// Set when conditions changed: the next session cannot resume from the last
    /// transaction (rows that match only now would be missing), it loads afresh.
    conditions_changed: AtomicBool,
    replica: RwLock<Replica>,
    conn: watch::Sender<Option<Connection>>,
    status: watch::Sender<Status>,
    changes: broadcast::Sender<Arc<ChangeSet>>,
    /// Full loads published so far, counted before each is sent (see [`Client::loads`]).
    loads: AtomicU64,
    stats: Stats,
}

impl Shared {
    /// The monitors as they are now.
    fn monitors(&self) -> std::sync::MutexGuard<'_, Vec<MonitorRequest>> {
        self.monitors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the subscribers about a batch just applied (a full load when `resync`).
    fn publish(&self, resync: bool, changes: Vec<(String, Uuid, RowChange)>) {
        if resync {
            // Before the send: a subscriber that comes after it sees the count (the channel's
            // lock orders the two).
            self.loads.fetch_add(1, Ordering::SeqCst);
        }
        // No subscriber is no error.
        let _ = self.changes.send(Arc::new(ChangeSet {
            resync,
            changes,
            applied_at: Some(std::time::Instant::now()),
        }));
    }
}

/// A client. Cloning shares the session; the session stops when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _stop: Arc<mpsc::Sender<()>>,
}

impl Client {
    /// Starts connecting in the background; fails only for unusable options (bad TLS files,
    /// no remotes). Must be called within a tokio runtime.
    pub fn start(options: ClientOptions) -> Result<Self, Error> {
        if options.remotes.is_empty() {
            return Err(Error::BadRemote(String::new()));
        }
        let tls = options.tls.as_ref().map(Tls::load).transpose()?;
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            monitors: Mutex::new(options.monitors.clone()),
            conditions_changed: AtomicBool::new(false),
            options,
            replica: RwLock::new(Replica::default()),
            conn: watch::channel(None).0,
            status: watch::channel(Status::Disconnected(None)).0,
            changes,
            loads: AtomicU64::new(0),
            stats: Stats::default(),
        });
        let (stop_tx, stop_rx) = mpsc::channel(1);
        tokio::spawn(session_loop(shared.clone(), tls, stop_rx));
        Ok(Self {
            shared,
            _stop: Arc::new(stop_tx),
        })
    }

    /// Runs a transaction on the current server.
    ///
    /// Fails with [`Error::NotConnected`] when there is none; with [`Error::Disconnected`]
    /// (see [`Error::outcome_unknown`]) when the connection drops before the reply.
    pub async fn transact(&self, ops: &[Operation]) -> Result<Vec<OpResult>, Error> {
        let conn = self.connection()?;
        let mut params = vec![json!(self.shared.options.database)];
        params.extend(ops.iter().map(Operation::to_json));
        let reply = conn.call("transact", Json::Array(params)).await?;
        parse_results(&reply, ops.len())
    }

    /// Any request on the current server (`list_dbs`, `get_schema`, ...).
    pub async fn call(&self, method: &str, params: Json) -> Result<Json, Error> {
        self.connection()?.call(method, params).await
    }

    /// The database names the current server has.
    pub async fn list_dbs(&self) -> Result<Vec<String>, Error> {
        let reply = self.call("list_dbs", json!([])).await?;
        serde_json::from_value(reply).map_err(|e| Error::Protocol(format!("list_dbs reply: {e}")))
    }

    /// The schema of `database`, as JSON.
    pub async fn get_schema(&self, database: &str) -> Result<Json, Error> {
        self.call("get_schema", json!([database])).await
    }

    /// Changes which rows of a monitored table are replicated (conditional monitoring): from
    /// now on only rows matching any of `conditions` (every row for none). Not for named
    /// monitors, whose conditions are fixed. Sent to the server
    /// at once if connected (`monitor_cond_change`: rows that stop matching leave the replica,
    /// rows that start matching enter it, as a change set), and used by every later session.
    /// Returns whether they changed (false: they were already these, nothing is sent). If
    /// the server refuses the change (or the session ends before it answers), the conditions
    /// stay as they were: calling again sends them again.
    pub async fn set_conditions(
        &self,
        table: &str,
        conditions: Vec<Condition>,
    ) -> Result<bool, Error> {
        let previous = {
            let mut monitors = self.shared.monitors();
            let Some(monitor) = monitors
                .iter_mut()
                .find(|m| m.table == table && m.name.is_none())
            else {
                return Err(Error::Protocol(format!("{table} is not monitored")));
            };
            if monitor.conditions == conditions {
                return Ok(false);
            }
            std::mem::replace(&mut monitor.conditions, conditions.clone())
        };
        let Ok(conn) = self.connection() else {
            // The next session asks with the new conditions, and loads afresh: resuming from
            // the last transaction would miss rows that match only now.
            self.shared
                .conditions_changed
                .store(true, Ordering::Relaxed);
            return Ok(true);
        };
        let mut request = json!({});
        request["where"] = if conditions.is_empty() {
            json!([true])
        } else {
            Json::Array(conditions.iter().map(Condition::to_json).collect())
        };
        // Sent on the live session, the server sends the rows that start or stop matching,
        // and later transactions count from there: a resumed session stays exact.
        let changed = conn
            .call(
                "monitor_cond_change",
                json!([DATA_MONITOR, DATA_MONITOR, { table: [request] }]),
            )
            .await;
        if changed.is_err()
            && let Some(monitor) = self
                .shared
                .monitors()
                .iter_mut()
                .find(|m| m.table == table && m.name.is_none())
            && monitor.conditions == conditions
        {
            // Not in place: the server refused them, or the session ended and its monitors
            // with it. The monitor keeps the old ones, which the next session asks with.
            monitor.conditions = previous;
        }
        changed.map(|_| true)
    }

    /// The replica of the monitored tables.
    pub fn replica(&self) -> RwLockReadGuard<'_, Replica> {
        self.shared
            .replica
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every change applied to the replica from now on. What was applied before is in the
    /// replica only: a subscriber that must not miss the first load checks [`Client::loads`]
    /// after subscribing.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeSet>> {
        self.shared.changes.subscribe()
    }

    /// How many full loads of the replica (change sets with `resync`) have been published.
    /// Read after [`Client::subscribe`]: if it is not 0, the replica holds a load the new
    /// receiver may not hear of, and the subscriber reads the replica before waiting.
    pub fn loads(&self) -> u64 {
        self.shared.loads.load(Ordering::SeqCst)
    }

    /// The connection state, as a watch.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Whether a session is up (monitors in place, replica current) and its connection open:
    /// a request made now is sent.
    pub fn is_connected(&self) -> bool {
        matches!(*self.shared.status.borrow(), Status::Connected(_)) && self.connection().is_ok()
    }

    /// Waits until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut status = self.status();
        let wait = status.wait_for(|s| matches!(s, Status::Connected(_)));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::NotConnected),
        }
    }

    /// How many sessions have been established so far: a number that changes with every
    /// reconnect, so a caller can tell a new session from the one it saw fail.
    pub fn session_count(&self) -> u64 {
        self.shared.stats.connects.load(Ordering::Relaxed)
    }

    /// Waits until a session later than session number `after` is up.
    pub async fn wait_new_session(&self, after: u64) {
        let mut status = self.status();
        let _ = status
            .wait_for(|s| matches!(s, Status::Connected(_)) && self.session_count() > after)
            .await;
    }

    /// Connection history counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    fn connection(&self) -> Result<Connection, Error> {
        self.shared
            .conn
            .borrow()
            .clone()
            .filter(|c| !c.is_closed())
            .ok_or(Error::NotConnected)
    }
}

/// Why a session could not be set up or ended.
enum SessionEnd {
    /// The server is a follower (or not connected to its cluster).
    NotLeader,
    /// Anything else.
    Failed(Arc<Error>),
    /// The client was dropped.
    Stopped,
}

async fn session_loop(shared: Arc<Shared>, tls: Option<Tls>, mut stop: mpsc::Receiver<()>) {
    let remotes = shared.options.remotes.clone();
    let mut backoff = shared.options.backoff_min;
    let mut next = 0usize;
    let mut failures_this_round = 0usize;
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
        if failures_this_round >= remotes.len() {
            failures_this_round = 0;
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
fn jitter(max: Duration, state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    max.mul_f64((*state >> 11) as f64 / (1u64 << 53) as f64)
}

const DATA_MONITOR: &str = "data";
const SERVER_MONITOR: &str = "server";
const NO_TXN: &str = "00000000-0000-0000-0000-000000000000";

/// Where a new session resumes the monitors from (`monitor_cond_since`): the last transaction
/// applied, of the data monitor and of each named one.
#[derive(Default)]
struct Resume {
    data: Option<String>,
    named: HashMap<String, String>,
}

/// One session: connect, check leadership, set up monitors, then follow updates until the
/// connection ends or the server stops being the leader.
async fn session(
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
    let (data, named_fetched) = tokio::join!(
        load_data(shared, &conn, &mut monitors, since),
        fetch_named_all
    );
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

/// Sets up the data monitor (the unnamed monitors; `monitor_cond_since` from transaction
/// `since` where the server has it, else `monitor_cond`) and applies its reply. Optional
/// columns are asked for; one the server refuses is left out of `monitors` and the request
/// made again (a refusal costs the server next to nothing; reading the schema first would cost
/// it as much as a small monitor, on every session; the copy of the schema in `_Server` is not
/// updated by a conversion in ovsdb-server 3.1, so it cannot tell that a column is missing).
async fn load_data(
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

/// The data monitor's requests: the unnamed monitors, by table.
fn data_requests(monitors: &[MonitorRequest]) -> Json {
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
fn leave_out_refused(monitors: &mut [MonitorRequest], details: &str) -> Option<String> {
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
struct NamedFetched {
    /// The changes since the last transaction (if `found`), else nothing.
    changes: CollectedRows,
    /// The selects' results, if not resumed.
    selected: Vec<OpResult>,
    /// The transaction to resume from.
    txn: String,
}

/// Sets up a named monitor (see [`MonitorRequest::named`]) and fetches what brings its rows
/// up to date: the changes since transaction `since` if the server still has them, else
/// every matching row, by select (the monitor sends no initial rows).
async fn fetch_named(
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
fn apply_named(
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
struct CollectedRows {
    found: bool,
    rows: Vec<(String, Uuid, RowUpdate)>,
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

/// Asks `_Server` whether this server can serve `database` as leader, and monitors the
/// answer. Returns false for a follower (or a member cut off from its cluster).
async fn watch_leadership(conn: &Connection, database: &str) -> Result<bool, Error> {
    let reply = conn
        .call(
            "monitor_cond",
            json!(["_Server", SERVER_MONITOR, {"Database": [{
                "columns": ["name", "model", "leader", "connected"],
                "where": [["name", "==", database]],
            }]}]),
        )
        .await;
    let reply = match reply {
        Ok(r) => r,
        // Servers without _Server (very old) have no clusters either.
        Err(Error::Rpc {
            kind: ErrorKind::UnknownDatabase,
            ..
        }) => return Ok(true),
        Err(e) => return Err(e),
    };
    let rows = reply
        .get("Database")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::Protocol(format!("server has no database {database:?}")))?;
    let Some(row) = rows
        .values()
        .filter_map(|u| u.get("initial"))
        .find(|r| r.get("name").and_then(Json::as_str) == Some(database))
    else {
        return Err(Error::Rpc {
            kind: ErrorKind::UnknownDatabase,
            details: Some(database.to_owned()),
        });
    };
    Ok(is_usable(row))
}

/// Whether a whole `_Server.Database` row says the server can serve writes: standalone, or
/// clustered, connected and leader. The server leaves out booleans that are false.
fn is_usable(row: &Json) -> bool {
    let clustered = row.get("model").and_then(Json::as_str) == Some("clustered");
    let flag = |c: &str| row.get(c).and_then(Json::as_bool).unwrap_or(false);
    !clustered || (flag("leader") && flag("connected"))
}

/// Applies one notification. Ok(false) means the server is no longer the leader.
fn handle_notification(
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

/// Whether an update of the `_Server` monitor leaves the server usable as leader.
fn still_leader(updates: &Json, database: &str) -> bool {
    updates
        .get("Database")
        .and_then(Json::as_object)
        .map(|rows| {
            rows.values().all(|u| {
                if let Some(diff) = u.get("modify") {
                    // A modify carries only changed columns: absent ones keep their value.
                    diff.get("leader").and_then(Json::as_bool) != Some(false)
                        && diff.get("connected").and_then(Json::as_bool) != Some(false)
                } else if let Some(row) = u.get("insert").or(u.get("initial")) {
                    row.get("name").and_then(Json::as_str) != Some(database) || is_usable(row)
                } else {
                    u.get("delete").is_none()
                }
            })
        })
        .unwrap_or(true)
}

/// A monitor reply, applied.
#[derive(Default)]
struct Loaded {
    /// The server resumed from our last transaction (only changes since were sent).
    found: bool,
    /// The replica's changes (none recorded for a full load).
    changes: Vec<(String, Uuid, RowChange)>,
    /// The last transaction id, to resume from.
    txn: Option<String>,
}

/// Applies parsed rows of one batch (a monitor reply or a notification): rows of consumed
/// tables to their consumer, the others to the replica. Holds the replica's write lock and
/// the consumers' locks for the batch, so readers never see half of one.
struct Applier<'a> {
    /// The monitor the batch is of: a named one (its rows are known by its name), or None
    /// for the data monitor (by their table's name).
    scope: Option<&'a str>,
    replica: std::sync::RwLockWriteGuard<'a, Replica>,
    consumers: Vec<(
        &'a str,
        std::sync::MutexGuard<'a, dyn TableConsumer + 'static>,
    )>,
    /// Whether the server resumed from our last transaction (a monitor reply), or sends
    /// changes (a notification): then the replica's changes are recorded.
    found: bool,
    changes: Vec<(String, Uuid, RowChange)>,
    /// The replicated tables (and named monitors) this batch changed.
    changed: Changed,
    /// The keys of the batch's monitor that are replicated.
    replicated: Vec<String>,
    /// The keys of the batch's monitor that are consumed.
    consumed: Vec<String>,
}

impl<'a> Applier<'a> {
    /// Locks the replica and every consumer (each sees every batch done) for a batch of
    /// the monitor `scope` (see [`Applier::scope`]).
    fn lock(shared: &'a Shared, monitors: &'a [MonitorRequest], scope: Option<&'a str>) -> Self {
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
    fn load(
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
    fn finish(mut self) -> Vec<(String, Uuid, RowChange)> {
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
        let table = self.scope.unwrap_or(table);
        if let Some((_, consumer)) = self.consumers.iter_mut().find(|(t, _)| *t == table) {
            return consumer.row(&uuid, update);
        }
        if !self.changed.contains(table) {
            self.changed.insert(table.to_owned());
        }
        if let Some(change) = self
            .replica
            .apply_row(table, uuid.clone(), update, self.found)?
        {
            self.changes.push((table.to_owned(), uuid, change));
        }
        Ok(())
    }
}
