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

mod leader;
mod load;
mod monitor;
mod session;

pub use self::monitor::MonitorRequest;
use self::{leader::*, load::*, monitor::*, session::*};
use crate::{
    consumer::{Changed, ConsumerHandle, TableConsumer},
    error::{Error, ErrorKind},
    op::{Condition, OpResult, Operation, parse_results},
    remote::{self, Remote, Tls, TlsFiles},
    replica::{ChangeSet, Replica, RowChange},
    rpc::{Connection, Notification, RpcOptions},
    schema::ColumnKinds,
    update::{
        RowSink, RowUpdate, UpdateParams, parse_monitor_since_reply, parse_table_updates,
        parse_update_params,
    },
    value::Uuid,
};

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
