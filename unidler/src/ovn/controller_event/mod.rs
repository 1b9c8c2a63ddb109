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
//!   database ([`seq_num`]).
//!
//! The Southbound connection itself (monitors, our Chassis) is [`crate::ovn::southbound`]'s.

mod our_rows;
pub mod seq_num;

use std::{
    collections::VecDeque,
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ovsdb::{ChangeSet, Error as DbError, OpResult, Operation, Row, Uuid, Value};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{Notify, broadcast, mpsc};
use tracing::{debug, warn};

use self::{
    our_rows::OurRows,
    seq_num::{SeqCheckpoint, SeqNumbers},
};
use crate::{
    clock::monotonic_ns,
    event::IdleHit,
    fast_hash::{FastMap, FastSet},
    ovn::southbound::{CONTROLLER_EVENT, Southbound},
    pace::Pacer,
};

const EVENT_TYPE: &str = "empty_lb_backends";
/// Most rows written in one transaction.
const BATCH_MAX: usize = 256;
/// How soon after a small transaction the next one is sent while hits keep coming at
/// [`WRITE_BUSY_PER_SECOND`] or more ([`Pacer`]): hits that arrive one by one in a flood
/// (hundreds a second) go out together, many per transaction, instead of one transaction
/// each, while a hit that comes alone, a few together, or a backlog of full batches are
/// written at once.
const WRITE_PACE: Duration = Duration::from_millis(20);
/// See [`WRITE_PACE`].
const WRITE_BUSY_PER_SECOND: u32 = 250;
/// Longest wait for a new session before rows in doubt are looked at again.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Settings of the writer.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Most hits waiting to be written.
    pub queue_capacity: usize,
    /// Where `seq_num` is kept across restarts (`<dir>/seq_num`), if anywhere.
    pub state_dir: Option<PathBuf>,
    /// Whose rows keep a hit from being written again.
    pub dedup: Dedup,
    /// Where to say when our rows are committed and consumed, if anywhere.
    pub news: Option<mpsc::UnboundedSender<RowNews>>,
}

/// What became of one of our rows: for the wake-ups ([`crate::wakeup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowNews {
    /// The row's `vip`, as written.
    pub vip: String,
    /// Its `protocol`.
    pub protocol: String,
    /// What became of it.
    pub fate: RowFate,
}

/// See [`RowNews`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFate {
    /// Committed.
    Committed,
    /// Deleted by someone else (the CMS consumed it), as the replica shows.
    Consumed,
}

/// Which existing rows make a new hit for the same (vip, protocol, load_balancer) a
/// duplicate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Dedup {
    /// Our chassis' rows, as ovn-controller does: each node reports once.
    #[default]
    Chassis,
    /// Any chassis' row: a wake-up storm across many nodes writes about one row (the CMS
    /// reads only `vip` and `protocol`, and deletes the row once it has acted).
    Cluster,
}

/// What the writer has done, for logs and metrics.
#[derive(Debug)]
pub struct WriterStats {
    /// Hits handed to the writer.
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

impl Default for WriterStats {
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

impl WriterStats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
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

/// Hits between the agent's loop and the writer.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<EventKey>,
    /// Keys waiting or being written, with the kernel timestamp of their first hit: a
    /// second hit for one of them is a duplicate.
    pending: FastMap<EventKey, u64>,
    /// Hits dropped here because the queue was full (the log's cadence; the stats'
    /// `dropped_overflow` also counts hits dropped before they reached the writer).
    dropped_full: u64,
}

/// The queue, shared by the handle and the writer task.
#[derive(Clone, Default)]
struct SharedQueue(Arc<Mutex<Queue>>);

impl SharedQueue {
    /// The queue. Its invariants hold between statements, so a panic elsewhere while it was
    /// held (a poisoned lock) leaves nothing half-done: the writer goes on with it.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Done with `key`; returns the kernel timestamp of its first hit.
    fn release(&self, key: &EventKey) -> Option<u64> {
        self.lock().pending.remove(key)
    }
}

/// Hands idle hits to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct ControllerEventWriter {
    queue: SharedQueue,
    wake: Arc<Notify>,
    capacity: usize,
    stats: Arc<WriterStats>,
    southbound: Southbound,
    seq_checkpoint: SeqCheckpoint,
}

impl ControllerEventWriter {
    /// Starts the writer on `southbound`, which monitors what the writer needs.
    pub fn start(southbound: Southbound, options: WriterOptions) -> Self {
        let seq = SeqNumbers::new(options.state_dir.as_deref());
        let handle = Self {
            queue: SharedQueue::default(),
            wake: Arc::default(),
            capacity: options.queue_capacity.max(1),
            stats: Arc::default(),
            southbound: southbound.clone(),
            seq_checkpoint: seq.checkpoint(),
        };
        let writer = Writer {
            changes: southbound.client().subscribe(),
            southbound,
            queue: handle.queue.clone(),
            wake: handle.wake.clone(),
            stats: handle.stats.clone(),
            seq,
            in_doubt: FastMap::default(),
            committed_unseen: FastMap::default(),
            ours: OurRows::default(),
            every_chassis: (options.dedup == Dedup::Cluster).then(OurRows::every_chassis),
            warned_no_chassis: false,
            news: options.news,
            pacer: Pacer::new(WRITE_PACE, WRITE_BUSY_PER_SECOND, BATCH_MAX),
        };
        tokio::spawn(writer.run());
        handle
    }

    /// Queues a hit; never blocks. Duplicates of a waiting hit are dropped here.
    pub fn submit(&self, hit: &IdleHit) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let key = EventKey::of(hit);
        let mut queue = self.queue.lock();
        if queue.pending.contains_key(&key) {
            self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if queue.waiting.len() >= self.capacity {
            self.stats.dropped_overflow.fetch_add(1, Ordering::Relaxed);
            queue.dropped_full += 1;
            let dropped = queue.dropped_full;
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
        self.queue.lock().waiting.len()
    }

    /// Counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The Southbound connection (status, stats).
    pub fn southbound(&self) -> &Southbound {
        &self.southbound
    }

    /// Waits until nothing is waiting or being written, at most `timeout`; true if drained.
    /// Then the state file records exactly the last seq_num used.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.queue.lock().pending.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.seq_checkpoint.save();
        true
    }
}

impl fmt::Debug for ControllerEventWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerEventWriter")
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

/// A row to insert: its key and seq_num.
type PendingRow = (EventKey, i64);

/// The task that writes rows: settles transactions in doubt, takes fresh hits, commits.
struct Writer {
    southbound: Southbound,
    /// Replica changes, followed to learn when our committed rows show up or go away.
    changes: broadcast::Receiver<Arc<ChangeSet>>,
    queue: SharedQueue,
    wake: Arc<Notify>,
    stats: Arc<WriterStats>,
    seq: SeqNumbers,
    /// Rows sent in a transaction whose outcome is unknown: key → seq_num.
    in_doubt: FastMap<EventKey, i64>,
    /// Rows we committed that the replica has not shown yet: uuid → key.
    committed_unseen: FastMap<Uuid, EventKey>,
    /// Our rows as the replica shows them.
    ours: OurRows,
    /// With cluster-wide deduplication, every chassis' rows.
    every_chassis: Option<OurRows>,
    warned_no_chassis: bool,
    /// Where to say what became of our rows.
    news: Option<mpsc::UnboundedSender<RowNews>>,
    /// When the next transaction may be sent.
    pacer: Pacer,
}

impl Writer {
    async fn run(mut self) {
        loop {
            self.observe_changes();
            self.monitor_only_ours().await;
            // Wait for work and a connection; replica changes can settle earlier writes.
            if !self.southbound.client().is_connected() || self.nothing_to_do() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    set = self.changes.recv() => self.observe(set),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let Some(chassis) = self.southbound.chassis_uuid() else {
                if !self.warned_no_chassis {
                    warn!(chassis = %self.southbound.chassis_name(), "no Chassis row with this name in the Southbound database yet; events wait");
                    self.warned_no_chassis = true;
                }
                tokio::select! {
                    set = self.changes.recv() => self.observe(set),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            };
            self.warned_no_chassis = false;
            if let Some(at) = self.pacer.not_before() {
                // More hits gather meanwhile; the batch takes them all.
                tokio::time::sleep_until(at).await;
                continue;
            }
            self.write_batch(&chassis).await;
        }
    }

    /// With per-chassis deduplication, narrows the Controller_Event monitor to our Chassis'
    /// rows once that row is known (again when it changes): it needs no other rows, and a
    /// wake-up storm across N nodes is not fanned out to every node. Cluster-wide
    /// deduplication follows every chassis' rows.
    async fn monitor_only_ours(&mut self) {
        if !self.southbound.client().is_connected() {
            return;
        }
        let wanted = if self.every_chassis.is_some() {
            None
        } else {
            let Some(chassis) = self.southbound.chassis_uuid() else {
                return;
            };
            Some(chassis)
        };
        let conditions = wanted
            .iter()
            .map(|chassis| ovsdb::Condition::eq("chassis", Value::from(chassis.clone())))
            .collect();
        match self
            .southbound
            .client()
            .set_conditions(CONTROLLER_EVENT, conditions)
            .await
        {
            Ok(true) => debug!(only_ours = wanted.is_some(), "Controller_Event monitor set"),
            Ok(false) => {}
            Err(e) => debug!("setting the Controller_Event monitor failed (tried again): {e}"),
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
                    if table == CONTROLLER_EVENT {
                        self.committed_unseen.remove(uuid);
                        if self.ours.chassis.is_some()
                            && let Some(gone) = self.ours.apply(uuid, change)
                        {
                            self.tell(&gone, RowFate::Consumed);
                        }
                        if let Some(all) = &mut self.every_chassis
                            && all.chassis.is_some()
                        {
                            all.apply(uuid, change);
                        }
                    }
                }
            }
            // A rebuilt replica (or missed changes): what it has now is the truth.
            _ => {
                self.committed_unseen.clear();
                self.ours = OurRows::default();
                if let Some(all) = &mut self.every_chassis {
                    *all = OurRows::every_chassis();
                }
            }
        }
    }

    /// Says what became of the row for `key`, if anyone listens.
    fn tell(&self, key: &EventKey, fate: RowFate) {
        if let Some(news) = &self.news {
            let _ = news.send(RowNews {
                vip: key.vip.clone(),
                protocol: key.protocol.clone(),
                fate,
            });
        }
    }

    fn nothing_to_do(&self) -> bool {
        self.in_doubt.is_empty() && self.queue.lock().waiting.is_empty()
    }

    /// One round: settle what is in doubt, take fresh hits, commit them together.
    async fn write_batch(&mut self, chassis: &Uuid) {
        self.observe_changes();
        if self.ours.chassis.as_ref() != Some(chassis) {
            self.ours.rebuild(self.southbound.client(), chassis);
            if let Some(all) = &mut self.every_chassis {
                all.rebuild(self.southbound.client(), chassis);
            }
        }
        if !self.seq.is_recovered() {
            self.seq.recover(self.ours.max_seq().unwrap_or(0));
        }
        let mut batch = self.settle_in_doubt();
        self.take_fresh(&mut batch);
        if !batch.is_empty() {
            let rows = batch.len();
            self.commit(chassis, batch).await;
            self.pacer.taken(rows, tokio::time::Instant::now());
        }
    }

    /// Rows whose transaction's outcome was unknown: present in the replica means committed
    /// (written, or deduplicated if a row of another seq_num is there); the others are
    /// returned to be written again with the same seq_num.
    fn settle_in_doubt(&mut self) -> Vec<PendingRow> {
        let mut again = Vec::new();
        for (key, seq) in std::mem::take(&mut self.in_doubt) {
            if !self.ours.contains(&key) {
                again.push((key, seq));
                continue;
            }
            let counter = if self.ours.has_seq(&key, seq) {
                self.tell(&key, RowFate::Committed);
                &self.stats.written
            } else {
                &self.stats.deduplicated
            };
            WriterStats::add(counter, 1);
            self.queue.release(&key);
        }
        again
    }

    /// Fresh hits from the queue, up to a full batch, each with a new seq_num; VIPs whose row
    /// is present (ours, or with cluster-wide deduplication anyone's) or just committed are
    /// passed over (deduplicated).
    fn take_fresh(&mut self, batch: &mut Vec<PendingRow>) {
        let taken: Vec<EventKey> = {
            let mut queue = self.queue.lock();
            let room = BATCH_MAX
                .saturating_sub(batch.len())
                .min(queue.waiting.len());
            queue.waiting.drain(..room).collect()
        };
        let just_committed: FastSet<&EventKey> = self.committed_unseen.values().collect();
        for key in taken {
            let elsewhere = self
                .every_chassis
                .as_ref()
                .is_some_and(|all| all.contains(&key));
            if self.ours.contains(&key) || elsewhere || just_committed.contains(&key) {
                WriterStats::add(&self.stats.deduplicated, 1);
                self.queue.release(&key);
            } else {
                batch.push((key, self.seq.take_next()));
            }
        }
    }

    /// Inserts `batch` in one transaction and sorts out the outcome. With cluster-wide
    /// deduplication each insert is guarded, in the same transaction, by a `wait` that no row
    /// for the same VIP exists: the database itself keeps agents that hit the same VIP at the
    /// same moment (a wake-up storm across the cluster) from each writing one. A guarded insert
    /// that meets a row is deduplicated, and the rest of the batch tried again.
    async fn commit(&mut self, chassis: &Uuid, mut batch: Vec<PendingRow>) {
        let guarded = self.every_chassis.is_some();
        let ops: Vec<Operation> = batch
            .iter()
            .flat_map(|(key, seq)| {
                let guard = guarded.then(|| Operation::Wait {
                    table: CONTROLLER_EVENT.into(),
                    conditions: vec![ovsdb::Condition::eq("event_info", key.event_info())],
                    columns: vec!["event_info".into()],
                    equal: true,
                    rows: Vec::new(),
                    timeout: Duration::ZERO,
                });
                let insert = Operation::Insert {
                    table: CONTROLLER_EVENT.into(),
                    row: Row::from([
                        ("event_type".to_owned(), Value::from(EVENT_TYPE)),
                        ("event_info".to_owned(), key.event_info()),
                        ("chassis".to_owned(), Value::from(chassis.clone())),
                        ("seq_num".to_owned(), Value::from(*seq)),
                    ]),
                    uuid_name: None,
                };
                guard.into_iter().chain([insert])
            })
            .collect();
        let client = self.southbound.client().clone();
        let session = client.session_count();
        let started = std::time::Instant::now();
        match client.transact(&ops).await {
            Ok(results) if guarded => {
                let inserts: Vec<OpResult> = results.into_iter().skip(1).step_by(2).collect();
                self.committed(&batch, &inserts, started)
            }
            Ok(results) => self.committed(&batch, &results, started),
            Err(DbError::Transaction {
                index: Some(at),
                kind: ovsdb::ErrorKind::TimedOut,
                ..
            }) if guarded && at % 2 == 0 && at / 2 < batch.len() => {
                // Another chassis' row for this VIP: nothing was written; the rest again.
                let (key, _) = batch.remove(at / 2);
                debug!(vip = %key.vip, "a row for this VIP exists (another chassis): deduplicated");
                WriterStats::add(&self.stats.deduplicated, 1);
                self.queue.release(&key);
                if !batch.is_empty() {
                    Box::pin(self.commit(chassis, batch)).await;
                }
            }
            Err(err) if err.outcome_unknown() => {
                warn!(
                    rows = batch.len(),
                    "outcome of a transaction unknown ({err}); settling against the database"
                );
                self.in_doubt.extend(batch);
                // Settled once the replica is current again: after the next session (a lost
                // connection; a canceled request comes with a database conversion, which
                // ends the monitors too), or at the latest a few seconds from now.
                let _ = tokio::time::timeout(SETTLE_WAIT, client.wait_new_session(session)).await;
            }
            Err(DbError::NotConnected) => {
                // Not sent: the rows wait in doubt (they keep their seq_num) for the next
                // session. Waiting here, not looping: on a single-threaded runtime a writer
                // that retried at once would never let the session task reconnect.
                self.in_doubt.extend(batch);
                let _ = tokio::time::timeout(SETTLE_WAIT, client.wait_new_session(session)).await;
            }
            Err(err) => {
                warn!(
                    rows = batch.len(),
                    "database rejected Controller_Event rows: {err}"
                );
                WriterStats::add(&self.stats.failed, batch.len());
                for (key, _) in &batch {
                    self.queue.release(key);
                }
            }
        }
    }

    /// Records a committed batch: counts, latency, and the rows to expect in the replica.
    fn committed(
        &mut self,
        batch: &[PendingRow],
        results: &[OpResult],
        started: std::time::Instant,
    ) {
        WriterStats::add(&self.stats.transactions, 1);
        WriterStats::add(&self.stats.written, batch.len());
        for ((key, seq), result) in batch.iter().zip(results) {
            debug!(vip = %key.vip, protocol = %key.protocol, seq, "Controller_Event row written");
            if let Some(uuid) = result.uuid() {
                self.committed_unseen.insert(uuid.clone(), key.clone());
            }
            self.tell(key, RowFate::Committed);
            if let Some(first_hit) = self.queue.release(key) {
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
}
