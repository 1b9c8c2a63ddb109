//! Many Southbound Load_Balancer rows, written straight into the database with our OVSDB
//! client (no ovn-northd), for scale tests and benchmarks, and an agent following them.

use std::time::{Duration, Instant};

use ovsdb::{Client, ClientOptions, Condition, Operation, Remote, Row, Value};

use crate::{
    agent::{Agent, southbound_args},
    netns::Topology,
    ovsdb_server::{self, OvsdbServer, SB_DB, TempDir},
};

/// Load balancers `lb0`, `lb1`, ... with `per_lb` VIPs each; VIP `n` (counting over all load
/// balancers) is `10.(100 + n/65536).(n/256 % 256).(n % 256):80/tcp`; `external_ids:lb_id` is
/// [`LoadBalancers::lb_id`]. The first `idle` ones
/// are idle services' (no backends, `options:event=true`), the others active services' (a
/// backend, no options), as ovn-kubernetes makes them.
pub struct LoadBalancers {
    rt: tokio::runtime::Runtime,
    client: Client,
    per_lb: u32,
    idle: u32,
}

impl LoadBalancers {
    /// Connects to `sb` and inserts `total / per_lb` load balancers, all idle, in one transaction.
    #[track_caller]
    pub fn insert(sb: &OvsdbServer, total: u32, per_lb: u32) -> Self {
        Self::insert_some_idle(sb, total, per_lb, total / per_lb)
    }

    /// As [`LoadBalancers::insert`], with only the first `idle` load balancers idle.
    #[track_caller]
    pub fn insert_some_idle(sb: &OvsdbServer, total: u32, per_lb: u32, idle: u32) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let mut o = ClientOptions::new(Remote::parse_list(&sb.unix_remote()).unwrap(), SB_DB);
            o.leader_only = false;
            let c = Client::start(o).unwrap();
            c.wait_connected(Duration::from_secs(10)).await.unwrap();
            c
        });
        let lbs = Self {
            rt,
            client,
            per_lb,
            idle,
        };
        let ops: Vec<Operation> = (0..total / per_lb)
            .map(|i| Operation::Insert {
                table: "Load_Balancer".into(),
                row: lbs.row(i, if i < idle { "" } else { "10.0.0.1:8080" }),
                uuid_name: None,
            })
            .collect();
        lbs.rt.block_on(lbs.client.transact(&ops)).unwrap();
        lbs
    }

    /// Gives every VIP of load balancer `index` the backends `backends` (one transaction).
    #[track_caller]
    pub fn set_backends(&self, index: u32, backends: &str) {
        let vips = self.row(index, backends).remove("vips").unwrap();
        self.rt
            .block_on(self.client.transact(&[Operation::Update {
                table: "Load_Balancer".into(),
                conditions: vec![Condition::eq("name", format!("lb{index}").as_str())],
                row: Row::from([("vips".to_owned(), vips)]),
            }]))
            .unwrap();
    }

    /// The Northbound UUID of load balancer `index` (its `external_ids:lb_id`).
    pub fn lb_id(index: u32) -> String {
        format!("4e420000-0000-4000-8000-{index:012x}")
    }

    fn row(&self, index: u32, backends: &str) -> Row {
        let vips: Vec<(String, String)> = (0..self.per_lb)
            .map(|j| {
                let n = index * self.per_lb + j;
                let vip = format!("10.{}.{}.{}:80", 100 + n / 65536, (n / 256) % 256, n % 256);
                (vip, backends.to_owned())
            })
            .collect();
        Row::from([
            (
                "name".to_owned(),
                Value::from(format!("lb{index}").as_str()),
            ),
            (
                "vips".to_owned(),
                Value::string_map(vips.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            ),
            ("protocol".to_owned(), Value::from("tcp")),
            // As northd writes it: the Northbound load balancer's UUID.
            (
                "external_ids".to_owned(),
                Value::string_map([("lb_id", Self::lb_id(index).as_str())]),
            ),
            (
                "options".to_owned(),
                if index < self.idle {
                    Value::string_map([("event", "true")])
                } else {
                    Value::string_map([])
                },
            ),
        ])
    }
}

/// An agent following the VIPs of [`LoadBalancers`] in a Southbound server of its own, on the
/// server end of a namespace pair, with debug logs (its map updates are logged).
pub struct FollowingAgent {
    /// The agent (declared first: it goes before what it uses).
    pub agent: Agent,
    /// The load balancers, to change.
    pub lbs: LoadBalancers,
    /// Its namespaces.
    pub topo: Topology,
    /// How long the agent took to sync.
    pub sync: SyncTime,
    /// The VIPs its map holds once synced.
    total: u32,
    db: String,
    state: TempDir,
    _sb: OvsdbServer,
}

/// How long an agent took from its start to its map synced with every VIP, and how much of
/// that the database spent answering its monitor request (composing and sending the reply).
#[derive(Clone, Copy, Debug)]
pub struct SyncTime {
    /// Start to synced.
    pub total: Duration,
    /// From the monitor request to its reply, as the agent logged it.
    pub server: Option<Duration>,
}

impl FollowingAgent {
    /// Inserts the load balancers, starts the agent and waits (at most a minute) until its
    /// map holds all `total` VIPs.
    #[track_caller]
    pub fn start(prefix: &str, total: u32, per_lb: u32) -> Self {
        Self::start_some_idle(prefix, total, per_lb, total / per_lb)
    }

    /// As [`FollowingAgent::start`], with only the first `idle` load balancers idle (see
    /// [`LoadBalancers::insert_some_idle`]): the map holds their VIPs only.
    #[track_caller]
    pub fn start_some_idle(prefix: &str, total: u32, per_lb: u32, idle: u32) -> Self {
        let topo = Topology::new(prefix);
        let sb = ovsdb_server::southbound_with_chassis();
        let lbs = LoadBalancers::insert_some_idle(&sb, total, per_lb, idle);
        let state = TempDir::new("fstate");
        let db = sb.unix_remote();
        let watched = idle * per_lb;
        let (agent, sync) = Self::run_agent(&topo, &db, &state, watched);
        Self {
            agent,
            lbs,
            topo,
            sync,
            total: watched,
            db,
            state,
            _sb: sb,
        }
    }

    /// Stops the agent (SIGTERM) and starts another against the same database; returns how
    /// long the new one took to sync.
    #[track_caller]
    pub fn restart(&mut self) -> SyncTime {
        self.agent.signal(libc::SIGTERM);
        let (agent, sync) = Self::run_agent(&self.topo, &self.db, &self.state, self.total);
        let old = std::mem::replace(&mut self.agent, agent);
        old.wait(Duration::from_secs(10));
        self.sync = sync;
        sync
    }

    #[track_caller]
    fn run_agent(topo: &Topology, db: &str, state: &TempDir, total: u32) -> (Agent, SyncTime) {
        let started = Instant::now();
        let mut args = southbound_args(&topo.server_if, db, state.path_str());
        args.extend(["--log-level", "info,unidler=debug,ovsdb=debug"]);
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log(&format!("vips={total} "), Duration::from_secs(60));
        let total = started.elapsed();
        let server = agent
            .log_lines()
            .find(|l| l.contains("monitor reply"))
            .and_then(|l| l.split("waited=").nth(1))
            .and_then(|w| w.split_whitespace().next())
            .and_then(parse_debug_duration);
        (agent, SyncTime { total, server })
    }
}

/// Parses a `Duration`'s `Debug` form (`1.5s`, `823.4ms`, `12µs`, `7ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, unit_secs) = [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)]
        .iter()
        .find_map(|(unit, secs)| Some((text.strip_suffix(unit)?, *secs)))?;
    Some(Duration::from_secs_f64(
        number.parse::<f64>().ok()? * unit_secs,
    ))
}
