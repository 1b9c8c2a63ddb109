//! Many agents on one clustered Southbound database: `n` agents' worth of Southbound clients
//! (each its own connection, the agent's own monitors, its own Chassis row, and, for the
//! wake-up, its own Controller_Event sink) against a real 3-member RAFT Southbound cluster with
//! `lbs` load balancers. Shared by `tests/tests/fleet.rs` (small, asserting) and the benchmark's
//! section 10 (large, reporting); included in both with `#[path]`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ovsdb::{Client, ClientOptions, MonitorRequest, Remote};
use unidler::{
    event::IdleHit,
    ovn::controller_event::{ControllerEventWriter, Dedup, WriterOptions},
    ovn::southbound::{Southbound, SouthboundConfig},
    vip::Protocol,
};
use unidler_tests::{
    load_balancers::LoadBalancers,
    ovsdb_server::{Cluster, southbound_cluster},
    process::{cpu_seconds, rss_mb},
};

/// The agents, the cluster, and a CMS client watching Controller_Event.
pub struct Fleet {
    pub rt: tokio::runtime::Runtime,
    pub cluster: Cluster,
    pub agents: Vec<Southbound>,
    /// How many load balancers each agent's VIP source follows.
    followed_by: Vec<Arc<AtomicUsize>>,
    cms: Client,
    /// The load balancers each agent follows (all of them).
    followed: u32,
    _load_balancers: LoadBalancers,
}

/// What the database paid for something, and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Seconds until every agent was done.
    pub seconds: f64,
    /// CPU seconds of the three `ovsdb-server`s meanwhile.
    pub db_cpu_seconds: f64,
    /// CPU seconds of the busiest of them meanwhile.
    pub busiest_cpu_seconds: f64,
    /// Resident memory of the three `ovsdb-server`s afterwards, MB.
    pub db_rss_mb: f64,
}

/// A wake-up storm: the same idle VIP hit on every chassis at once.
#[derive(Debug, Clone, Copy)]
pub struct WakeUp {
    /// Controller_Event rows written.
    pub rows: usize,
    /// Seconds until the CMS saw the first row.
    pub first_row_seconds: f64,
    /// Seconds until every agent had written or deduplicated its hit.
    pub all_done_seconds: f64,
    /// CPU seconds of the three `ovsdb-server`s meanwhile.
    pub db_cpu_seconds: f64,
}

const WAIT: Duration = Duration::from_secs(600);

impl Fleet {
    /// Starts the cluster, inserts `lbs` load balancers (one VIP each) and `n` Chassis rows,
    /// then connects the `n` agents (to the leader only, or with `any_member` to any member);
    /// returns once every agent has every load balancer and its Chassis row, with what that
    /// cost.
    pub fn start(n: usize, lbs: u32, any_member: bool) -> (Self, Cost) {
        Self::start_some_idle(n, lbs, lbs, any_member)
    }

    /// As [`Fleet::start`], with only `idle` of the load balancers idle services' (see
    /// [`LoadBalancers::insert_some_idle`]). The agents follow every load balancer (a VIP with
    /// backends in one that does not report is never dropped), so all `lbs` must arrive.
    pub fn start_some_idle(n: usize, lbs: u32, idle: u32, any_member: bool) -> (Self, Cost) {
        let cluster = southbound_cluster(3);
        cluster.wait_for_leader(Duration::from_secs(30));
        let load_balancers = LoadBalancers::insert_some_idle(&cluster.servers[0], lbs, 1, idle);
        for first in (0..n).step_by(50) {
            let mut args: Vec<String> = Vec::new();
            for i in first..(first + 50).min(n) {
                if !args.is_empty() {
                    args.push("--".into());
                }
                args.extend([
                    "chassis-add".into(),
                    format!("fleet-{i}"),
                    "geneve".into(),
                    format!("127.1.{}.{}", i / 250, i % 250 + 1),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.ctl("ovn-sbctl", &args);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let remotes = Remote::parse_list(&cluster.unix_remotes()).unwrap();
        let cms = rt.block_on(async {
            let mut o = ClientOptions::new(remotes.clone(), "OVN_Southbound");
            o.monitors = vec![MonitorRequest::table("Controller_Event").columns(&["event_info"])];
            let c = Client::start(o).unwrap();
            c.wait_connected(Duration::from_secs(30)).await.unwrap();
            c
        });
        let cpu_before = per_server_cpu(&cluster);
        let started = Instant::now();
        let agents = rt.block_on(async {
            let mut agents = Vec::new();
            for i in 0..n {
                let config = SouthboundConfig {
                    remotes: remotes.clone(),
                    tls: None,
                    chassis: Some(format!("fleet-{i}")),
                    ovs_db: String::new(),
                    max_message_bytes: 64 << 20,
                    leader_only: !any_member,
                };
                // Each agent's VIP source, its updates drained.
                let (vips, mut updates) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move { while updates.recv().await.is_some() {} });
                agents.push(unidler::ovn::vips::connect(&config, vips).await.unwrap());
            }
            agents
        });
        let (agents, followed_by): (Vec<Southbound>, Vec<Arc<AtomicUsize>>) = agents
            .into_iter()
            .map(|(sb, handles)| (sb, handles.load_balancers))
            .unzip();
        let mut fleet = Self {
            rt,
            cluster,
            agents,
            followed_by,
            cms,
            followed: lbs,
            _load_balancers: load_balancers,
        };
        fleet.wait_all_synced(&vec![0; n]);
        let cost = fleet.cost(started, cpu_before);
        (fleet, cost)
    }

    /// Whether agent `i` is connected with every (idle) load balancer and its Chassis row, in a
    /// session after `after`.
    fn synced(&self, i: usize, after: u64) -> bool {
        let sb = &self.agents[i];
        let client = sb.client();
        client.is_connected()
            && client.session_count() > after
            && self.followed_by[i].load(Ordering::Relaxed) == self.followed as usize
            && sb.chassis_uuid().is_some()
    }

    fn wait_all_synced(&mut self, sessions_before: &[u64]) {
        let deadline = Instant::now() + WAIT;
        for (i, before) in sessions_before.iter().enumerate() {
            while !self.synced(i, *before) {
                assert!(Instant::now() < deadline, "agent {i} did not sync");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn cost(&self, started: Instant, cpu_before: Vec<f64>) -> Cost {
        let spent: Vec<f64> = per_server_cpu(&self.cluster)
            .iter()
            .zip(&cpu_before)
            .map(|(now, before)| (now - before).max(0.0))
            .collect();
        Cost {
            seconds: started.elapsed().as_secs_f64(),
            db_cpu_seconds: spent.iter().sum(),
            busiest_cpu_seconds: spent.iter().copied().fold(0.0, f64::max),
            db_rss_mb: self
                .cluster
                .servers
                .iter()
                .filter_map(|s| s.pid())
                .map(rss_mb)
                .sum(),
        }
    }

    /// Every agent reports a hit on the same idle VIP at once, deduplicating per chassis or
    /// cluster-wide; the rows are deleted again afterwards.
    pub fn wake_up(&self, dedup: Dedup) -> WakeUp {
        let sinks: Vec<ControllerEventWriter> = self.rt.block_on(async {
            self.agents
                .iter()
                .map(|sb| {
                    ControllerEventWriter::start(
                        sb.clone(),
                        WriterOptions {
                            queue_capacity: 16,
                            state_dir: None,
                            dedup,
                            news: None,
                        },
                    )
                })
                .collect()
        });
        let hit = IdleHit {
            key: Default::default(),
            vip: "10.100.0.0:80".into(),
            protocol: Protocol::Tcp,
            src: "10.128.0.5:40000".into(),
            iface: "eth0".into(),
            ifindex: 2,
            load_balancer: Some("lb0".into()),
            load_balancer_row: None,
            action: "dropped",
            timestamp_ns: unidler::clock::monotonic_ns(),
        };
        // Let every sink see the (empty) table first, as running agents would have.
        std::thread::sleep(Duration::from_secs(1));
        let cpu_before = db_cpu(&self.cluster);
        let started = Instant::now();
        for sink in &sinks {
            sink.submit(&hit);
        }
        let mut first_row = None;
        let deadline = started + WAIT;
        loop {
            if first_row.is_none() && self.cms.replica().len("Controller_Event") > 0 {
                first_row = Some(started.elapsed());
            }
            let done = sinks.iter().all(|s| {
                let st = s.stats();
                st.written.load(std::sync::atomic::Ordering::Relaxed)
                    + st.deduplicated.load(std::sync::atomic::Ordering::Relaxed)
                    >= 1
            });
            if done && first_row.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "the wake-up did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
        let all_done = started.elapsed();
        let db_cpu_seconds = db_cpu(&self.cluster) - cpu_before;
        // The CMS has every row once the written ones reached it.
        let written: u64 = sinks
            .iter()
            .map(|s| s.stats().written.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        while (self.cms.replica().len("Controller_Event") as u64) < written {
            assert!(Instant::now() < deadline, "rows not seen by the CMS");
            std::thread::sleep(Duration::from_millis(5));
        }
        let rows = self.cms.replica().len("Controller_Event");
        self.rt
            .block_on(self.cms.transact(&[ovsdb::Operation::Delete {
                table: "Controller_Event".into(),
                conditions: vec![],
            }]))
            .unwrap();
        drop(sinks);
        WakeUp {
            rows,
            first_row_seconds: first_row.unwrap().as_secs_f64(),
            all_done_seconds: all_done.as_secs_f64(),
            db_cpu_seconds,
        }
    }

    /// Stops and restarts the whole cluster; with `failover`, kills the new leader too while
    /// the agents reconnect. Returns once every agent has resynced, with what that cost.
    pub fn restart_cluster(&mut self, failover: bool) -> Cost {
        let sessions: Vec<u64> = self
            .agents
            .iter()
            .map(|sb| sb.client().session_count())
            .collect();
        for server in &mut self.cluster.servers {
            server.kill();
        }
        for server in &mut self.cluster.servers {
            server.start();
        }
        let started = Instant::now();
        let cpu_before = per_server_cpu(&self.cluster);
        let mut killed = None;
        if failover {
            let leader = self.cluster.wait_for_leader(Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(300));
            self.cluster.servers[leader].kill();
            killed = Some(leader);
        }
        self.wait_all_synced(&sessions);
        let cost = self.cost(started, cpu_before);
        if let Some(leader) = killed {
            self.cluster.servers[leader].start();
        }
        cost
    }
}

/// CPU seconds of the cluster's servers so far.
fn db_cpu(cluster: &Cluster) -> f64 {
    per_server_cpu(cluster).iter().sum()
}

/// CPU seconds of each of the cluster's servers so far (0 for one that is down).
fn per_server_cpu(cluster: &Cluster) -> Vec<f64> {
    cluster
        .servers
        .iter()
        .map(|s| s.pid().map_or(0.0, cpu_seconds))
        .collect()
}
