//! Idle hits → `Controller_Event` rows in the OVN Southbound database, exactly as
//! ovn-controller writes them, so that ovn-kubernetes consumes them unchanged:
//!
//! ```text
//! event_type  : empty_lb_backends
//! event_info  : {load_balancer="<NB uuid>", protocol=tcp, vip="192.168.1.100:80"}
//! chassis     : <our Chassis row>
//! seq_num     : <increasing, also across restarts>
//! ```
//!
//! - At most one row per (chassis, vip, protocol, load_balancer) exists at a time: while ours
//!   is present (in the replica, or just committed), further hits insert nothing.
//! - Hits wait in a bounded queue while the database is unreachable or has no leader; an
//!   overflow is counted and logged. Waiting hits go out in few, batched transactions.
//! - A transaction whose outcome is unknown (the connection dropped before the reply) is
//!   settled after reconnecting, against the resynced replica: rows that exist were
//!   committed; the others are written again with the same `seq_num`. (One window remains:
//!   a row committed, then consumed and deleted by the CMS before we reconnect, is written
//!   again. The CMS then wakes an already waking service, which is harmless.)
//! - `seq_num` continues from the larger of a state file (which reserves numbers a block at a
//!   time, so it is written once per block and never on the way of a row) and our rows in the
//!   database.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use ovsdb::{
    Atom, Client, ClientOptions, Condition, Error as DbError, MonitorRequest, Operation, Remote,
    Row, TlsFiles, Uuid, Value,
};
use ovsdb::{ChangeSet, RowChange};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{Notify, broadcast};
use tracing::{debug, warn};

use crate::event::IdleHit;

/// The Southbound database's name.
pub const SOUTHBOUND: &str = "OVN_Southbound";
const EVENT_TABLE: &str = "Controller_Event";
const EVENT_TYPE: &str = "empty_lb_backends";
/// Most rows written in one transaction.
const BATCH_MAX: usize = 256;
/// seq_nums reserved in the state file at a time (a restart skips what a block left unused:
/// seq_num must only increase).
const SEQ_BLOCK: i64 = 1024;

/// Settings of the sink.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Name of our Chassis row.
    pub chassis: String,
    /// Most hits waiting to be written.
    pub queue_capacity: usize,
    /// Where `seq_num` is kept across restarts (`<dir>/seq_num`), if anywhere.
    pub state_dir: Option<PathBuf>,
}

/// What the sink has done, for logs and metrics.
#[derive(Debug)]
pub struct SinkStats {
    /// Hits handed to the sink.
    pub received: AtomicU64,
    /// Hits not written because a row (or a waiting hit) for the same VIP already existed.
    pub deduplicated: AtomicU64,
    /// Hits dropped because the queue was full.
    pub dropped_overflow: AtomicU64,
    /// Rows committed.
    pub written: AtomicU64,
    /// Hits given up after the database rejected their transaction.
    pub failed: AtomicU64,
    /// Transactions committed.
    pub transactions: AtomicU64,
    /// Time for a Controller_Event transaction to commit, seconds.
    pub transaction_seconds: Histogram,
    /// Time from the kernel seeing a packet to its row committed, seconds.
    pub event_latency_seconds: Histogram,
}

impl Default for SinkStats {
    fn default() -> Self {
        // 50 µs .. ~3 s.
        let buckets = || exponential_buckets(50e-6, 2.0, 17);
        Self {
            received: AtomicU64::default(),
            deduplicated: AtomicU64::default(),
            dropped_overflow: AtomicU64::default(),
            written: AtomicU64::default(),
            failed: AtomicU64::default(),
            transactions: AtomicU64::default(),
            transaction_seconds: Histogram::new(buckets()),
            event_latency_seconds: Histogram::new(buckets()),
        }
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of the kernel's event timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The identity of a row: ovn-controller keeps one per (vip, protocol, load_balancer).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    vip: String,
    protocol: String,
    load_balancer: String,
}

impl EventKey {
    fn of(hit: &IdleHit) -> Self {
        Self {
            vip: hit.vip.clone(),
            protocol: hit.protocol.as_str().to_owned(),
            load_balancer: hit.load_balancer.clone().unwrap_or_default(),
        }
    }

    fn from_row(row: &Row) -> Option<Self> {
        let info = row.get("event_info")?.as_string_map();
        Some(Self {
            vip: info.get("vip")?.clone(),
            protocol: info.get("protocol")?.clone(),
            load_balancer: info.get("load_balancer").cloned().unwrap_or_default(),
        })
    }

    fn event_info(&self) -> Value {
        Value::string_map([
            ("load_balancer", self.load_balancer.as_str()),
            ("protocol", self.protocol.as_str()),
            ("vip", self.vip.as_str()),
        ])
    }
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<EventKey>,
    /// Keys waiting or being written, with the kernel timestamp of their first hit: a
    /// second hit for one of them is a duplicate.
    pending: HashMap<EventKey, u64>,
}

/// Hands idle hits to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct ControllerEventSink {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    capacity: usize,
    stats: Arc<SinkStats>,
    client: Client,
    seq_file: Option<PathBuf>,
    /// The last seq_num the writer used (0: none yet), saved exactly on a clean shutdown.
    last_seq_used: Arc<AtomicI64>,
}

impl ControllerEventSink {
    /// Starts the writer on `client`, which must monitor what [`monitors`] asks for.
    pub fn start(client: Client, options: SinkOptions) -> Self {
        let sink = Self {
            queue: Arc::default(),
            wake: Arc::default(),
            capacity: options.queue_capacity.max(1),
            stats: Arc::default(),
            client: client.clone(),
            seq_file: options.state_dir.map(|d| d.join("seq_num")),
            last_seq_used: Arc::default(),
        };
        let writer = Writer {
            changes: client.subscribe(),
            client,
            queue: sink.queue.clone(),
            wake: sink.wake.clone(),
            stats: sink.stats.clone(),
            chassis_name: options.chassis,
            seq_file: sink.seq_file.clone(),
            last_seq_used: sink.last_seq_used.clone(),
            last_seq: None,
            seq_reserved: 0,
            in_doubt: HashMap::new(),
            committed_unseen: HashMap::new(),
            ours: OurRows::default(),
            warned_no_chassis: false,
        };
        tokio::spawn(writer.run());
        sink
    }

    /// Queues a hit; never blocks. Duplicates of a waiting hit are dropped here.
    pub fn submit(&self, hit: &IdleHit) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let key = EventKey::of(hit);
        let mut queue = self.queue.lock().expect("queue lock");
        if queue.pending.contains_key(&key) {
            self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if queue.waiting.len() >= self.capacity {
            let dropped = self.stats.dropped_overflow.fetch_add(1, Ordering::Relaxed) + 1;
            // Log the first and then every 1000th, so an outage cannot flood the log.
            if dropped == 1 || dropped.is_multiple_of(1000) {
                warn!(
                    dropped,
                    capacity = self.capacity,
                    "event queue full (database unreachable?): dropping idle hits"
                );
            }
            return;
        }
        queue.pending.insert(key.clone(), hit.timestamp_ns);
        queue.waiting.push_back(key);
        drop(queue);
        self.wake.notify_one();
    }

    /// Hits waiting to be written.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().expect("queue lock").waiting.len()
    }

    /// Counters.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// The database client (status, stats).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Waits until nothing is waiting or being written, at most `timeout`; true if drained.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.queue.lock().expect("queue lock").pending.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Nothing is being written: the state file can say exactly where we are, so that the
        // next run goes on without a gap (after a crash it skips the rest of a block).
        let last = self.last_seq_used.load(Ordering::Relaxed);
        if let Some(path) = &self.seq_file
            && last > 0
        {
            save_seq(path, last);
        }
        true
    }
}

/// What the sink needs replicated: our Chassis row (by name) and the Controller_Event table.
pub fn monitors(chassis: &str) -> Vec<MonitorRequest> {
    vec![
        MonitorRequest::table("Chassis")
            .columns(&["name"])
            .matching(Condition::eq("name", chassis)),
        MonitorRequest::table(EVENT_TABLE),
    ]
}

/// Connects to the Southbound database with `monitors` (in the background).
pub fn connect_southbound(
    remotes: Vec<Remote>,
    tls: Option<TlsFiles>,
    monitors: Vec<MonitorRequest>,
) -> Result<Client, DbError> {
    let mut options = ClientOptions::new(remotes, SOUTHBOUND);
    options.tls = tls;
    options.monitors = monitors;
    Client::start(options)
}

struct Writer {
    client: Client,
    /// Replica changes, followed to learn when our committed rows show up or go away.
    changes: broadcast::Receiver<Arc<ChangeSet>>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    stats: Arc<SinkStats>,
    chassis_name: String,
    seq_file: Option<PathBuf>,
    /// Last seq_num used; None until known (state file and database consulted).
    last_seq: Option<i64>,
    /// Shared with the sink: the last seq_num used.
    last_seq_used: Arc<AtomicI64>,
    /// Highest seq_num the state file allows us to use without writing it again: numbers are
    /// reserved in blocks, so the file is written once per [`SEQ_BLOCK`] rows, before use,
    /// and never on the way of a row.
    seq_reserved: i64,
    /// Rows sent in a transaction whose outcome is unknown: key → seq_num.
    in_doubt: HashMap<EventKey, i64>,
    /// Rows we committed that the replica has not shown yet: uuid → key.
    committed_unseen: HashMap<Uuid, EventKey>,
    /// Our rows as the replica shows them.
    ours: OurRows,
    warned_no_chassis: bool,
}

/// Our chassis' `empty_lb_backends` rows as the replica shows them, kept up to date from its
/// change sets: looking one up costs O(1), where a scan per transaction would cost O(rows),
/// and a wake-up storm makes thousands of rows.
#[derive(Default)]
struct OurRows {
    /// The chassis the index is for; None until built.
    chassis: Option<Uuid>,
    by_uuid: HashMap<Uuid, (EventKey, i64)>,
    /// key → its rows (normally one): uuid, seq_num.
    by_key: HashMap<EventKey, Vec<(Uuid, i64)>>,
}

impl OurRows {
    /// Rebuilds the index for `chassis` from the whole replica.
    fn rebuild(&mut self, client: &Client, chassis: &Uuid) {
        *self = OurRows {
            chassis: Some(chassis.clone()),
            ..OurRows::default()
        };
        let replica = client.replica();
        for (uuid, row) in replica.rows(EVENT_TABLE) {
            self.insert(uuid, row);
        }
    }

    /// Applies one change of a Controller_Event row.
    fn apply(&mut self, uuid: &Uuid, change: &RowChange) {
        match change {
            RowChange::Insert(row) => self.insert(uuid, row),
            RowChange::Modify { new, .. } => self.insert(uuid, new),
            RowChange::Delete(_) => self.remove(uuid),
        }
    }

    /// Indexes `row` if it is ours (idempotent: a change the index already holds is harmless).
    fn insert(&mut self, uuid: &Uuid, row: &Row) {
        self.remove(uuid);
        let ours = row
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

    fn remove(&mut self, uuid: &Uuid) {
        let Some((key, _)) = self.by_uuid.remove(uuid) else {
            return;
        };
        if let Some(rows) = self.by_key.get_mut(&key) {
            rows.retain(|(u, _)| u != uuid);
            if rows.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    /// Whether a row for `key` exists.
    fn contains(&self, key: &EventKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Whether a row for `key` with exactly `seq` exists.
    fn has_seq(&self, key: &EventKey, seq: i64) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|rows| rows.iter().any(|r| r.1 == seq))
    }

    fn max_seq(&self) -> Option<i64> {
        self.by_uuid.values().map(|r| r.1).max()
    }
}

impl Writer {
    async fn run(mut self) {
        loop {
            self.observe_changes();
            // Wait for work and a connection; replica changes can settle earlier writes.
            if !self.client.is_connected() || self.nothing_to_do() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    set = self.changes.recv() => self.observe(set),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let Some(chassis) = self.chassis_uuid() else {
                if !self.warned_no_chassis {
                    warn!(chassis = %self.chassis_name, "no Chassis row with this name in the Southbound database yet; events wait");
                    self.warned_no_chassis = true;
                }
                tokio::select! {
                    set = self.changes.recv() => self.observe(set),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            };
            self.warned_no_chassis = false;
            self.write_batch(&chassis).await;
        }
    }

    fn observe_changes(&mut self) {
        loop {
            match self.changes.try_recv() {
                Err(
                    broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed,
                ) => return,
                other => self.observe(other.map_err(|e| match e {
                    broadcast::error::TryRecvError::Lagged(n) => {
                        broadcast::error::RecvError::Lagged(n)
                    }
                    _ => broadcast::error::RecvError::Closed,
                })),
            }
        }
    }

    /// Follows the replica: keeps the index of our rows, and forgets committed rows once the
    /// replica has shown them (inserted) or their deletion: from then on the replica alone
    /// says whether they exist.
    fn observe(&mut self, set: Result<Arc<ChangeSet>, broadcast::error::RecvError>) {
        match set {
            Ok(set) if !set.resync => {
                for (table, uuid, change) in &set.changes {
                    if table == EVENT_TABLE {
                        self.committed_unseen.remove(uuid);
                        if self.ours.chassis.is_some() {
                            self.ours.apply(uuid, change);
                        }
                    }
                }
            }
            // A rebuilt replica (or missed changes): what it has now is the truth.
            _ => {
                self.committed_unseen.clear();
                self.ours = OurRows::default();
            }
        }
    }

    fn nothing_to_do(&self) -> bool {
        self.in_doubt.is_empty() && self.queue.lock().expect("queue lock").waiting.is_empty()
    }

    fn chassis_uuid(&self) -> Option<Uuid> {
        let replica = self.client.replica();
        replica
            .rows("Chassis")
            .find(|(_, row)| {
                row.get("name").and_then(Value::atom).and_then(Atom::as_str)
                    == Some(self.chassis_name.as_str())
            })
            .map(|(uuid, _)| uuid.clone())
    }

    async fn write_batch(&mut self, chassis: &Uuid) {
        self.observe_changes();
        if self.ours.chassis.as_ref() != Some(chassis) {
            self.ours.rebuild(&self.client, chassis);
        }
        let existing = &self.ours;
        if self.last_seq.is_none() {
            let from_file = self.read_seq_file();
            let from_db = existing.max_seq().unwrap_or(0);
            self.last_seq = Some(from_file.max(from_db));
            debug!(from_file, from_db, "seq_num continues");
        }

        // First settle rows in doubt: present means committed.
        let mut batch: Vec<(EventKey, i64)> = Vec::new();
        for (key, seq) in std::mem::take(&mut self.in_doubt) {
            if !existing.contains(&key) {
                batch.push((key, seq));
                continue;
            }
            let counter = if existing.has_seq(&key, seq) {
                &self.stats.written
            } else {
                &self.stats.deduplicated
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.release(&key);
        }
        // Then new hits, passing over VIPs whose row is present or just committed.
        let just_committed: HashSet<&EventKey> = self.committed_unseen.values().collect();
        let mut taken = Vec::new();
        {
            let mut queue = self.queue.lock().expect("queue lock");
            while batch.len() + taken.len() < BATCH_MAX {
                let Some(key) = queue.waiting.pop_front() else {
                    break;
                };
                taken.push(key);
            }
        }
        let mut fresh = Vec::with_capacity(taken.len());
        for key in taken {
            if existing.contains(&key) || just_committed.contains(&key) {
                self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                self.release(&key);
            } else {
                fresh.push(key);
            }
        }
        for key in fresh {
            let seq = self.next_seq();
            batch.push((key, seq));
        }
        if batch.is_empty() {
            return;
        }

        let ops: Vec<Operation> = batch
            .iter()
            .map(|(key, seq)| Operation::Insert {
                table: EVENT_TABLE.into(),
                row: Row::from([
                    ("event_type".to_owned(), Value::from(EVENT_TYPE)),
                    ("event_info".to_owned(), key.event_info()),
                    ("chassis".to_owned(), Value::from(chassis.clone())),
                    ("seq_num".to_owned(), Value::from(*seq)),
                ]),
                uuid_name: None,
            })
            .collect();
        let session = self.client.session_count();
        let started = std::time::Instant::now();
        match self.client.transact(&ops).await {
            Ok(results) => {
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for ((key, seq), result) in batch.iter().zip(&results) {
                    debug!(vip = %key.vip, protocol = %key.protocol, seq, "Controller_Event row written");
                    if let Some(uuid) = result.uuid() {
                        self.committed_unseen.insert(uuid.clone(), key.clone());
                    }
                    if let Some(first_hit) = self.release(key) {
                        let latency = monotonic_ns().saturating_sub(first_hit);
                        self.stats
                            .event_latency_seconds
                            .observe(latency as f64 / 1e9);
                    }
                }
                self.stats
                    .transaction_seconds
                    .observe(started.elapsed().as_secs_f64());
                debug!(
                    rows = batch.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "Controller_Event rows written"
                );
            }
            Err(err) if err.outcome_unknown() => {
                warn!(
                    rows = batch.len(),
                    "connection lost during a transaction ({err}); settling after reconnect"
                );
                self.in_doubt.extend(batch);
                self.client.wait_new_session(session).await;
            }
            Err(DbError::NotConnected) => {
                // Not sent: put the rows back in doubt (they keep their seq_num).
                self.in_doubt.extend(batch);
            }
            Err(err) => {
                warn!(
                    rows = batch.len(),
                    "database rejected Controller_Event rows: {err}"
                );
                self.stats
                    .failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for (key, _) in &batch {
                    self.release(key);
                }
            }
        }
    }

    /// Done with `key`; returns the kernel timestamp of its first hit.
    fn release(&self, key: &EventKey) -> Option<u64> {
        self.queue.lock().expect("queue lock").pending.remove(key)
    }

    fn read_seq_file(&self) -> i64 {
        let Some(path) = &self.seq_file else { return 0 };
        match std::fs::read_to_string(path) {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| {
                warn!(path = %path.display(), "unreadable seq_num state; starting from the database");
                0
            }),
            Err(_) => 0,
        }
    }

    /// The next seq_num; reserves a new block in the state file first when the last is used up.
    fn next_seq(&mut self) -> i64 {
        let seq = self.last_seq.unwrap_or(0) + 1;
        self.last_seq = Some(seq);
        self.last_seq_used.store(seq, Ordering::Relaxed);
        if seq > self.seq_reserved {
            self.seq_reserved = seq + SEQ_BLOCK - 1;
            if let Some(path) = &self.seq_file {
                save_seq(path, self.seq_reserved);
            }
        }
        seq
    }
}

/// Writes `seq` into the state file at `path` (atomically: a temp file renamed over it).
fn save_seq(path: &std::path::Path, seq: i64) {
    let tmp = path.with_extension("tmp");
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, format!("{seq}\n")))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        warn!(path = %path.display(), "cannot save seq_num: {e}");
    }
}

/// The chassis name ovn-controller uses on this node: `external_ids:system-id` of the local
/// Open_vSwitch database when it answers within a second or two, else the hostname.
pub async fn default_chassis_name(ovs_db: &str) -> String {
    match system_id(ovs_db).await {
        Some(id) => id,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            debug!(%host, "no system-id from {ovs_db}; using the hostname as chassis name");
            host
        }
    }
}

async fn system_id(ovs_db: &str) -> Option<String> {
    let mut options = ClientOptions::new(Remote::parse_list(ovs_db).ok()?, "Open_vSwitch");
    options.leader_only = false;
    let client = Client::start(options).ok()?;
    client.wait_connected(Duration::from_secs(2)).await.ok()?;
    let results = client
        .transact(&[Operation::Select {
            table: "Open_vSwitch".into(),
            conditions: vec![],
            columns: Some(vec!["external_ids".into()]),
        }])
        .await
        .ok()?;
    results
        .first()?
        .rows()
        .first()?
        .get("external_ids")?
        .as_string_map()
        .remove("system-id")
}
