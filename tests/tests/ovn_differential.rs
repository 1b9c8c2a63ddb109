//! Differential tests of the OVN VIP source. A generator changes the Southbound tables as
//! ovn-northd and ovn-controller would (load balancers with VIPs in every spelling OVN takes,
//! options in any case, datapaths and datapath groups, this node's ports, `SB_Global`), one
//! transaction per step, on a real `ovsdb-server`. The real agent follows them through its own
//! monitor. After every step, its VIP table (`/api/vips`) and the kernel maps it wrote (pinned
//! with `--pin-dir`, read here directly) are compared with a plain model computed from the
//! whole world, as the README promises OVN's decisions are kept: a VIP is watched where a load
//! balancer that reports has it, dropped only where no load balancer that applies there has a
//! backend for it, and passed where none that applies there reports or forwards it.
//!
//! Every step's transaction also flips a canary load balancer's backends: the agent showing
//! the canary's new state has applied the step, so a step is never judged on the state before
//! it. (OVN 23.03's schema has no `ls_datapath_group` and `lr_datapath_group`: those columns
//! are covered by the VIP source's unit tests.)
//!
//! A failing sequence is shrunk to a minimal one and printed as Rust, to be kept in
//! `kept()`. `UNIDLER_DIFFERENTIAL_SECONDS` runs seeds for that long
//! (`cargo xtask fuzz --differential --minutes N`); `UNIDLER_DIFFERENTIAL_SEED` starts from a
//! given seed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ovsdb::{Atom, Client, ClientOptions, Condition, Operation, Remote, Row, Uuid, Value};
use unidler_common::{ScopedVip, VIP_FLAG_SCOPED, VipKey, VipState, map_names};
use unidler_tests::{
    agent::{Agent, southbound_args},
    bpffs::BpfFs,
    netns::Topology,
    ovsdb_server::{self, CHASSIS, Southbound as _, TempDir},
    require_root,
    rng::Rng,
    scaled,
};

/// Logical datapaths (switches and routers), by index; their tunnel keys.
const TUNNEL_KEYS: [u32; 4] = [101, 102, 103, 104];
/// Logical ports, by index, each on a datapath and bound to our chassis or not.
const PORTS: usize = 4;
/// Datapath groups, by index (a group exists in the database only while a load balancer
/// refers to it: `Logical_DP_Group` is not a root table).
const GROUPS: usize = 3;
/// Load balancers, by index.
const LBS: usize = 6;

/// VIP keys as OVN takes them: IPv4; IPv6 compressed, uncompressed and in capitals (the same
/// VIP); IPv4-mapped IPv6 in two spellings (an IPv6 VIP, not the IPv4 one); keys that collide
/// in the agent's fast hash (`10.203.1.20:10319` and `:10394`); and keys the datapath cannot
/// watch (no port, templates), which OVN reports itself.
const KEYS: [&str; 14] = [
    "10.96.0.1:80",
    "10.96.0.1:8080",
    "10.96.0.2:80",
    "10.203.1.20:10319",
    "10.203.1.20:10394",
    "[fd00::1]:80",
    "[fd00:0:0:0:0:0:0:1]:80",
    "[FD00::1]:80",
    "[fd00::2]:80",
    "[::ffff:10.96.0.1]:80",
    "[::ffff:a60:1]:80",
    "10.96.0.1",
    "^vip_a:^port_a",
    "[fd00::1]",
];

/// Backends values: none, in several spellings, one, two.
const BACKENDS: [&str; 7] = [
    "",
    " ",
    ",",
    "10.0.0.5:8080",
    "10.0.0.5:8080,",
    "10.0.0.5:8080,10.0.0.6:8080",
    "[fd00::5]:8080",
];

/// Values of `options:event` and `options:reject` (northd reads them without case).
const OPTION_VALUES: [Option<&str>; 6] = [
    None,
    Some("true"),
    Some("TRUE"),
    Some("True"),
    Some("false"),
    Some("yes"),
];

/// The `protocol` column (absent: TCP).
const PROTOCOLS: [Option<&str>; 4] = [None, Some("tcp"), Some("udp"), Some("sctp")];

/// One load balancer as northd writes it to the Southbound database.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LbSpec {
    vips: Vec<(&'static str, &'static str)>,
    protocol: Option<&'static str>,
    datapaths: Vec<usize>,
    group: Option<usize>,
    event: Option<&'static str>,
    reject: Option<&'static str>,
}

/// One logical port: its datapath, and whether it is bound to our chassis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortSpec {
    datapath: usize,
    bound: bool,
}

/// One change, absolute (so that any subsequence of a failing sequence is still one).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// Load balancer `i` is now `spec` (inserted if it is not there).
    SetLb(usize, LbSpec),
    /// Load balancer `i` is deleted (its next `SetLb` inserts a new row).
    DeleteLb(usize),
    /// Port `i` is now on that datapath, bound or not.
    SetPort(usize, PortSpec),
    /// Group `i` now holds these datapaths.
    SetGroup(usize, Vec<usize>),
    /// `SB_Global`'s `options:controller_event`.
    SetGlobalEvent(Option<&'static str>),
}

/// Everything the model reads: the whole world after the steps so far.
#[derive(Clone, Debug)]
struct World {
    lbs: BTreeMap<usize, LbSpec>,
    ports: [PortSpec; PORTS],
    groups: [Vec<usize>; GROUPS],
    global_event: Option<&'static str>,
}

impl Default for World {
    fn default() -> Self {
        Self {
            lbs: BTreeMap::new(),
            ports: std::array::from_fn(|i| PortSpec {
                datapath: i % TUNNEL_KEYS.len(),
                bound: false,
            }),
            groups: Default::default(),
            global_event: None,
        }
    }
}

impl World {
    fn apply(&mut self, step: &Step) {
        match step {
            Step::SetLb(i, spec) => {
                self.lbs.insert(*i, spec.clone());
            }
            Step::DeleteLb(i) => {
                self.lbs.remove(i);
            }
            Step::SetPort(i, spec) => self.ports[*i] = *spec,
            Step::SetGroup(i, dps) => self.groups[*i] = dps.clone(),
            Step::SetGlobalEvent(value) => self.global_event = *value,
        }
    }
}

/// A VIP as the model and the comparison name it: protocol number, family, address, port.
type Key = (u8, u8, [u8; 16], u16);

fn protocol_number(protocol: Option<&str>) -> u8 {
    match protocol {
        None | Some("tcp") => 6,
        Some("udp") => 17,
        Some("sctp") => 132,
        Some(other) => panic!("protocol {other}"),
    }
}

/// The key of `addr` (IPv4 stored IPv4-mapped, as the kernel map keeps it; the family tells
/// them apart).
fn key_of(addr: SocketAddr, protocol: u8) -> Key {
    let (family, bytes) = match addr.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    (protocol, family, bytes, addr.port())
}

fn spelt(key: &Key) -> String {
    let ip = match key.1 {
        4 => IpAddr::V4(std::net::Ipv6Addr::from(key.2).to_ipv4_mapped().unwrap()),
        _ => IpAddr::V6(std::net::Ipv6Addr::from(key.2)),
    };
    format!("{}/{}", SocketAddr::new(ip, key.3), key.0)
}

/// How many backends a `vips` value lists.
fn count_backends(value: &str) -> u32 {
    value.split(',').filter(|b| !b.trim().is_empty()).count() as u32
}

/// What the agent should show and the kernel should do: each watched VIP's backends, and,
/// for each, whether it is dropped as idle on each local datapath (by tunnel key) and on an
/// interface without a scope (None).
#[derive(Default, PartialEq, Eq)]
struct Expected {
    backends: BTreeMap<Key, u32>,
    idle: BTreeMap<(Key, Option<u32>), bool>,
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (key, backends) in &self.backends {
            let idle: Vec<String> = self
                .idle
                .iter()
                .filter(|((k, _), idle)| k == key && **idle)
                .map(|((_, scope), _)| scope.map_or("unscoped".to_owned(), |s| s.to_string()))
                .collect();
            writeln!(
                f,
                "{}: {backends} backends, idle on [{}]",
                spelt(key),
                idle.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The model: computed from the whole world, by the rules the README states, without any of
/// the agent's incremental machinery.
fn model(world: &World) -> Expected {
    let true_ish = |v: Option<&str>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let global = true_ish(world.global_event);
    let local: BTreeSet<usize> = world
        .ports
        .iter()
        .filter(|p| p.bound)
        .map(|p| p.datapath)
        .collect();
    let applies = |lb: &LbSpec, dp: usize| {
        lb.datapaths.contains(&dp) || lb.group.is_some_and(|g| world.groups[g].contains(&dp))
    };
    // (reports, backends, datapaths it applies on) of every local load balancer, per VIP.
    let mut having: BTreeMap<Key, Vec<(bool, u32, BTreeSet<usize>)>> = BTreeMap::new();
    for lb in world.lbs.values() {
        let on: BTreeSet<usize> = local.iter().copied().filter(|d| applies(lb, *d)).collect();
        if !local.is_empty() && on.is_empty() {
            continue;
        }
        let reports = (global || true_ish(lb.event)) && !true_ish(lb.reject);
        for (key, value) in &lb.vips {
            let Ok(addr) = key.parse::<SocketAddr>() else {
                continue;
            };
            having
                .entry(key_of(addr, protocol_number(lb.protocol)))
                .or_default()
                .push((reports, count_backends(value), on.clone()));
        }
    }
    let mut expected = Expected::default();
    for (key, lbs) in having {
        if !lbs.iter().any(|(reports, _, _)| *reports) {
            continue;
        }
        let backends = lbs.iter().map(|(_, b, _)| *b).max().unwrap_or(0);
        expected.backends.insert(key, backends);
        expected.idle.insert((key, None), backends == 0);
        for dp in &local {
            let here: Vec<_> = lbs.iter().filter(|(_, _, on)| on.contains(dp)).collect();
            let idle = if here.iter().any(|(reports, b, _)| *reports || *b > 0) {
                here.iter().all(|(_, b, _)| *b == 0)
            } else {
                false
            };
            expected.idle.insert((key, Some(TUNNEL_KEYS[*dp])), idle);
        }
    }
    expected
}

/// The local datapaths' tunnel keys in `world`.
fn local_scopes(world: &World) -> BTreeSet<u32> {
    world
        .ports
        .iter()
        .filter(|p| p.bound)
        .map(|p| TUNNEL_KEYS[p.datapath])
        .collect()
}

/// The agent's VIP table as `/api/vips` shows it, read as [`Expected`] for `scopes`.
fn agent_table(topo: &Topology, scopes: &BTreeSet<u32>) -> Result<Expected, String> {
    let body = topo
        .in_server(|| unidler::telemetry::http_get("127.0.0.1:9478".parse().unwrap(), "/api/vips"))
        .map_err(|e| format!("/api/vips: {e}"))?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&body).map_err(|e| format!("/api/vips: {e}: {body}"))?;
    let mut table = Expected::default();
    for row in rows {
        let addr: SocketAddr = row["vip"].as_str().unwrap_or_default().parse().unwrap();
        let protocol = protocol_number(row["protocol"].as_str());
        let key = key_of(addr, protocol);
        let backends = row["backends"].as_u64().unwrap() as u32;
        table.backends.insert(key, backends);
        table.idle.insert((key, None), backends == 0);
        let by_scope: BTreeMap<u32, u32> = row["scopes"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|s| {
                        (
                            s["scope"].as_u64().unwrap() as u32,
                            s["backends"].as_u64().unwrap() as u32,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for scope in scopes {
            let idle = match by_scope.is_empty() {
                true => backends == 0,
                false => by_scope.get(scope).is_some_and(|b| *b == 0),
            };
            table.idle.insert((key, Some(*scope)), idle);
        }
    }
    Ok(table)
}

/// What the kernel maps say, read from their pins, as [`Expected`] for `scopes`; and the
/// scope entries no VIP uses.
fn kernel_maps(bpffs: &BpfFs, scopes: &BTreeSet<u32>) -> Result<(Expected, usize), String> {
    let open = |name: &str| {
        MapData::from_pin(bpffs.map_path(name)).map_err(|e| format!("pinned {name}: {e}"))
    };
    let vips: BpfHashMap<MapData, VipKey, VipState> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::VIPS)?)).map_err(|e| e.to_string())?;
    let vip_scopes: BpfHashMap<MapData, ScopedVip, u32> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::VIP_SCOPES)?))
            .map_err(|e| e.to_string())?;
    let by_scope: BTreeMap<(u32, u32), u32> = vip_scopes
        .iter()
        .filter_map(Result::ok)
        .map(|(k, backends)| ((k.vip_id, k.scope), backends))
        .collect();
    let mut kernel = Expected::default();
    let mut scoped_ids = BTreeSet::new();
    for (vip, state) in vips.iter().filter_map(Result::ok) {
        let key: Key = (vip.proto, vip.family, vip.addr, u16::from_be(vip.port_be));
        kernel.backends.insert(key, state.backends);
        kernel.idle.insert((key, None), state.backends == 0);
        let scoped = state.flags & VIP_FLAG_SCOPED != 0;
        if scoped {
            scoped_ids.insert(state.vip_id);
        }
        for scope in scopes {
            let idle = match scoped {
                true => by_scope
                    .get(&(state.vip_id, *scope))
                    .is_some_and(|b| *b == 0),
                false => state.backends == 0,
            };
            kernel.idle.insert((key, Some(*scope)), idle);
        }
    }
    let leftovers = by_scope
        .keys()
        .filter(|(id, _)| !scoped_ids.contains(id))
        .count();
    Ok((kernel, leftovers))
}

/// The differences between `want` and `got`, one line each.
fn differences(want: &Expected, got: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    for (key, b) in &want.backends {
        match got.backends.get(key) {
            None => out.push(format!("{} missing (want {b} backends)", spelt(key))),
            Some(g) if g != b => out.push(format!("{}: {g} backends, want {b}", spelt(key))),
            _ => {}
        }
    }
    for key in got
        .backends
        .keys()
        .filter(|k| !want.backends.contains_key(k))
    {
        out.push(format!("{} present, should not be watched", spelt(key)));
    }
    for ((key, scope), idle) in &want.idle {
        if let Some(g) = got.idle.get(&(*key, *scope))
            && g != idle
        {
            out.push(format!(
                "{} on {}: {}, want {}",
                spelt(key),
                scope.map_or("an unscoped interface".to_owned(), |s| format!("scope {s}")),
                if *g { "dropped as idle" } else { "passed" },
                if *idle { "dropped as idle" } else { "passed" },
            ));
        }
    }
    out
}

/// The generator: random steps over a small world, so that VIPs meet often.
struct Generator {
    rng: Rng,
    world: World,
}

impl Generator {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.below(from.len())]
    }

    fn datapaths(&mut self) -> Vec<usize> {
        (0..TUNNEL_KEYS.len())
            .filter(|_| self.rng.below(3) == 0)
            .collect()
    }

    /// VIPs for one load balancer: up to four, no two of them the same VIP (two spellings
    /// of one VIP in one load balancer are ambiguous in OVN too).
    fn vips(&mut self) -> Vec<(&'static str, &'static str)> {
        let mut vips: Vec<(&'static str, &'static str)> = Vec::new();
        for _ in 0..1 + self.rng.below(4) {
            let key = self.pick(&KEYS);
            let same = |k: &str| match (k.parse::<SocketAddr>(), key.parse::<SocketAddr>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => k == key,
            };
            if vips.iter().any(|(k, _)| same(k)) {
                continue;
            }
            let value = self.pick(&BACKENDS);
            vips.push((key, value));
        }
        vips
    }

    fn lb(&mut self) -> LbSpec {
        LbSpec {
            vips: self.vips(),
            protocol: self.pick(&PROTOCOLS),
            datapaths: self.datapaths(),
            group: (self.rng.below(2) == 0).then(|| self.rng.below(GROUPS)),
            event: match self.rng.below(3) {
                0 => None,
                _ => self.pick(&OPTION_VALUES),
            },
            reject: match self.rng.below(4) {
                0 => self.pick(&OPTION_VALUES),
                _ => None,
            },
        }
    }

    /// A change to load balancer `i` as it is: one VIP's backends, a VIP added or removed,
    /// its options, its datapaths.
    fn changed_lb(&mut self, mut lb: LbSpec) -> LbSpec {
        match self.rng.below(5) {
            0 if !lb.vips.is_empty() => {
                let at = self.rng.below(lb.vips.len());
                lb.vips[at].1 = self.pick(&BACKENDS);
            }
            1 => {
                let extra = self.vips();
                for (key, value) in extra {
                    let same = |k: &str| match (k.parse::<SocketAddr>(), key.parse::<SocketAddr>())
                    {
                        (Ok(a), Ok(b)) => a == b,
                        _ => k == key,
                    };
                    if !lb.vips.iter().any(|(k, _)| same(k)) {
                        lb.vips.push((key, value));
                    }
                }
            }
            2 if !lb.vips.is_empty() => {
                let at = self.rng.below(lb.vips.len());
                lb.vips.remove(at);
            }
            3 => {
                lb.event = self.pick(&OPTION_VALUES);
                lb.reject = self.pick(&OPTION_VALUES);
            }
            _ => {
                lb.datapaths = self.datapaths();
                lb.group = (self.rng.below(2) == 0).then(|| self.rng.below(GROUPS));
            }
        }
        lb
    }

    fn step(&mut self) -> Step {
        let step = match self.rng.below(20) {
            0..=5 => Step::SetLb(self.rng.below(LBS), self.lb()),
            6..=10 => {
                let i = self.rng.below(LBS);
                match self.world.lbs.get(&i).cloned() {
                    Some(lb) => Step::SetLb(i, self.changed_lb(lb)),
                    None => Step::SetLb(i, self.lb()),
                }
            }
            11..=12 => Step::DeleteLb(self.rng.below(LBS)),
            13..=15 => Step::SetPort(
                self.rng.below(PORTS),
                PortSpec {
                    datapath: self.rng.below(TUNNEL_KEYS.len()),
                    bound: self.rng.below(5) < 3,
                },
            ),
            16..=18 => Step::SetGroup(self.rng.below(GROUPS), self.datapaths()),
            _ => Step::SetGlobalEvent(match self.rng.below(3) {
                0 => self.pick(&OPTION_VALUES),
                _ => None,
            }),
        };
        self.world.apply(&step);
        step
    }
}

/// The Southbound database as the generator writes it: its rows' UUIDs.
struct Database {
    client: Client,
    rt: tokio::runtime::Runtime,
    datapaths: Vec<Uuid>,
    ports: Vec<Uuid>,
    chassis: Uuid,
    global: Uuid,
    lbs: BTreeMap<usize, Uuid>,
    groups: BTreeMap<usize, Uuid>,
    /// The canary load balancer: every step's transaction flips its VIP's backends, so that
    /// the agent showing the new state says it applied the step (one transaction, one
    /// update, one batch), even where the step changes nothing the model sees.
    canary: Uuid,
    /// Whether the canary's VIP has a backend now.
    canary_backed: bool,
}

/// The canary's VIP: on no address the generator uses, on every datapath, reporting.
const CANARY_VIP: &str = "10.99.0.1:1";

fn uuid_set(uuids: impl IntoIterator<Item = Uuid>) -> Value {
    Value::set(uuids.into_iter().map(Atom::Uuid))
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    Value::string_map(pairs.iter().copied())
}

impl Database {
    /// Connects to `remote`, writes the datapaths, the ports (none bound) and `SB_Global`.
    fn connect(remote: &str, chassis: Uuid) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let client = Client::start(ClientOptions::new(
                Remote::parse_list(remote).unwrap(),
                "OVN_Southbound",
            ))
            .unwrap();
            client
                .wait_connected(Duration::from_secs(10))
                .await
                .unwrap();
            client
        });
        let mut db = Self {
            client,
            rt,
            datapaths: Vec::new(),
            ports: Vec::new(),
            chassis,
            global: Uuid::from_u128(0),
            lbs: BTreeMap::new(),
            groups: BTreeMap::new(),
            canary: Uuid::from_u128(0),
            canary_backed: false,
        };
        let ops: Vec<Operation> = TUNNEL_KEYS
            .iter()
            .map(|key| Operation::Insert {
                table: "Datapath_Binding".into(),
                row: Row::from([("tunnel_key".to_owned(), Value::from(i64::from(*key)))]),
                uuid_name: None,
            })
            .collect();
        db.datapaths = db.transact(ops);
        // ovn-sbctl made the one SB_Global row.
        let global = db
            .rt
            .block_on(db.client.transact(&[Operation::Select {
                table: "SB_Global".into(),
                conditions: Vec::new(),
                columns: Some(vec!["_uuid".into()]),
            }]))
            .unwrap();
        db.global = global[0].rows()[0]["_uuid"]
            .atom()
            .and_then(Atom::as_uuid)
            .expect("the SB_Global row")
            .clone();
        let world = World::default();
        let ops = (0..PORTS)
            .map(|i| Operation::Insert {
                table: "Port_Binding".into(),
                row: db.port_row(i, &world),
                uuid_name: None,
            })
            .collect();
        db.ports = db.transact(ops);
        let canary = Operation::Insert {
            table: "Load_Balancer".into(),
            row: Row::from([
                ("name".to_owned(), Value::from("canary")),
                ("vips".to_owned(), string_map(&[(CANARY_VIP, "")])),
                (
                    "datapaths".to_owned(),
                    uuid_set(db.datapaths.iter().cloned()),
                ),
                ("options".to_owned(), string_map(&[("event", "true")])),
            ]),
            uuid_name: None,
        };
        db.canary = db.transact(vec![canary])[0].clone();
        db
    }

    /// The model of `world`, with the canary as it is now.
    fn expected(&self, world: &World) -> Expected {
        let mut expected = model(world);
        let key = key_of(CANARY_VIP.parse().unwrap(), protocol_number(None));
        let backends = u32::from(self.canary_backed);
        expected.backends.insert(key, backends);
        expected.idle.insert((key, None), backends == 0);
        for scope in local_scopes(world) {
            expected.idle.insert((key, Some(scope)), backends == 0);
        }
        expected
    }

    /// Runs `ops` in one transaction; returns the inserted rows' UUIDs.
    #[track_caller]
    fn transact(&self, ops: Vec<Operation>) -> Vec<Uuid> {
        if ops.is_empty() {
            return Vec::new();
        }
        let results = self
            .rt
            .block_on(self.client.transact(&ops))
            .unwrap_or_else(|e| panic!("transaction {ops:?}: {e}"));
        results.iter().filter_map(|r| r.uuid().cloned()).collect()
    }

    fn port_row(&self, i: usize, world: &World) -> Row {
        let port = world.ports[i];
        let mut row = Row::from([
            (
                "logical_port".to_owned(),
                Value::from(format!("port-{i}").as_str()),
            ),
            ("tunnel_key".to_owned(), Value::from(i as i64 + 1)),
            ("type".to_owned(), Value::from("")),
            (
                "chassis".to_owned(),
                uuid_set(port.bound.then(|| self.chassis.clone())),
            ),
        ]);
        if let Some(dp) = self.datapaths.get(port.datapath) {
            row.insert("datapath".to_owned(), Value::from(dp.clone()));
        }
        row
    }

    fn by_uuid(uuid: &Uuid) -> Vec<Condition> {
        vec![Condition::eq("_uuid", Value::from(uuid.clone()))]
    }

    /// Writes `step` (the world already changed by it) in one transaction.
    fn write(&mut self, step: &Step, world: &World) {
        let mut ops = Vec::new();
        let mut inserted_lb = None;
        match step {
            Step::SetLb(i, lb) => {
                let mut row = Row::from([
                    ("name".to_owned(), Value::from(format!("lb-{i}").as_str())),
                    ("vips".to_owned(), string_map(&lb.vips)),
                    (
                        "protocol".to_owned(),
                        Value::set(lb.protocol.map(Atom::from)),
                    ),
                    (
                        "datapaths".to_owned(),
                        uuid_set(lb.datapaths.iter().map(|d| self.datapaths[*d].clone())),
                    ),
                    (
                        "options".to_owned(),
                        string_map(
                            &[("event", lb.event), ("reject", lb.reject)]
                                .into_iter()
                                .filter_map(|(k, v)| Some((k, v?)))
                                .collect::<Vec<_>>(),
                        ),
                    ),
                ]);
                let group = match lb.group {
                    None => Value::set([]),
                    Some(g) => match self.groups.get(&g) {
                        Some(uuid) => Value::from(uuid.clone()),
                        None => {
                            // Not in the database (no load balancer refers to it): inserted
                            // with the load balancer that does.
                            ops.push(Operation::Insert {
                                table: "Logical_DP_Group".into(),
                                row: Row::from([(
                                    "datapaths".to_owned(),
                                    uuid_set(
                                        world.groups[g].iter().map(|d| self.datapaths[*d].clone()),
                                    ),
                                )]),
                                uuid_name: Some("new_group".into()),
                            });
                            Value::Atom(Atom::NamedUuid("new_group".into()))
                        }
                    },
                };
                row.insert("datapath_group".to_owned(), group);
                match self.lbs.get(i) {
                    Some(uuid) => ops.push(Operation::Update {
                        table: "Load_Balancer".into(),
                        conditions: Self::by_uuid(uuid),
                        row,
                    }),
                    None => {
                        inserted_lb = Some(*i);
                        ops.push(Operation::Insert {
                            table: "Load_Balancer".into(),
                            row,
                            uuid_name: None,
                        });
                    }
                }
            }
            Step::DeleteLb(i) => {
                if let Some(uuid) = self.lbs.remove(i) {
                    ops.push(Operation::Delete {
                        table: "Load_Balancer".into(),
                        conditions: Self::by_uuid(&uuid),
                    });
                }
            }
            Step::SetPort(i, _) => ops.push(Operation::Update {
                table: "Port_Binding".into(),
                conditions: Self::by_uuid(&self.ports[*i]),
                row: self.port_row(*i, world),
            }),
            Step::SetGroup(i, dps) => {
                if let Some(uuid) = self.groups.get(i) {
                    ops.push(Operation::Update {
                        table: "Logical_DP_Group".into(),
                        conditions: Self::by_uuid(uuid),
                        row: Row::from([(
                            "datapaths".to_owned(),
                            uuid_set(dps.iter().map(|d| self.datapaths[*d].clone())),
                        )]),
                    });
                }
            }
            Step::SetGlobalEvent(value) => ops.push(Operation::Update {
                table: "SB_Global".into(),
                conditions: Self::by_uuid(&self.global),
                row: Row::from([(
                    "options".to_owned(),
                    string_map(
                        &value
                            .map(|v| ("controller_event", v))
                            .into_iter()
                            .collect::<Vec<_>>(),
                    ),
                )]),
            }),
        }
        self.canary_backed = !self.canary_backed;
        let backends = if self.canary_backed { "10.0.0.9:1" } else { "" };
        ops.push(Operation::Update {
            table: "Load_Balancer".into(),
            conditions: Self::by_uuid(&self.canary),
            row: Row::from([("vips".to_owned(), string_map(&[(CANARY_VIP, backends)]))]),
        });
        let group_inserted = ops
            .iter()
            .any(|op| matches!(op, Operation::Insert { table, .. } if table == "Logical_DP_Group"));
        let uuids = self.transact(ops);
        let mut uuids = uuids.into_iter();
        if group_inserted && let (Step::SetLb(_, lb), Some(uuid)) = (step, uuids.next()) {
            self.groups.insert(lb.group.expect("a group"), uuid);
        }
        if let (Some(i), Some(uuid)) = (inserted_lb, uuids.next()) {
            self.lbs.insert(i, uuid);
        }
        // A group no load balancer refers to any more is gone from the database.
        let referred: BTreeSet<usize> = world.lbs.values().filter_map(|lb| lb.group).collect();
        self.groups.retain(|g, _| referred.contains(g));
    }

    /// Back to the start: no load balancer, no port bound, no global option.
    fn reset(&mut self) {
        let world = World::default();
        for i in 0..LBS {
            self.write(&Step::DeleteLb(i), &world);
        }
        for i in 0..PORTS {
            self.write(&Step::SetPort(i, world.ports[i]), &world);
        }
        self.write(&Step::SetGlobalEvent(None), &world);
    }
}

/// A real Southbound server, the agent on a veth of its own with its datapath pinned, and
/// the generator's connection.
struct Rig {
    topo: Topology,
    bpffs: BpfFs,
    _sb: ovsdb_server::OvsdbServer,
    _state: TempDir,
    agent: Agent,
    db: Database,
}

impl Rig {
    fn start() -> Self {
        require_root();
        let topo = Topology::new("df");
        let sb = ovsdb_server::southbound_with_chassis();
        let chassis = sb.sbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Chassis",
            &format!("name={CHASSIS}"),
        ]);
        let chassis = Uuid::parse(chassis.trim()).unwrap();
        let db = Database::connect(&sb.unix_remote(), chassis);
        let state = TempDir::new("dfstate");
        let bpffs = BpfFs::mount();
        let remote = sb.unix_remote();
        let pin_dir = bpffs.pin_dir();
        let mut args = southbound_args(&topo.server_if, &remote, state.path_str());
        args.extend(["--pin-dir", &pin_dir]);
        let mut agent = Agent::start(&topo.server_ns, &args);
        agent.wait_for_log("VIP map synced", scaled(Duration::from_secs(30)));
        Self {
            topo,
            bpffs,
            _sb: sb,
            _state: state,
            agent,
            db,
        }
    }

    /// Waits until the agent's table and the kernel maps agree with the model of `world`;
    /// the differences at the end if they never do.
    fn converges(&mut self, world: &World, timeout: Duration) -> Result<(), Vec<String>> {
        let want = self.db.expected(world);
        let scopes = local_scopes(world);
        let deadline = Instant::now() + timeout;
        loop {
            let mut problems = Vec::new();
            match agent_table(&self.topo, &scopes) {
                Ok(table) => problems.extend(
                    differences(&want, &table)
                        .into_iter()
                        .map(|d| format!("agent's table: {d}")),
                ),
                Err(e) => problems.push(e),
            }
            match kernel_maps(&self.bpffs, &scopes) {
                Ok((kernel, leftovers)) => {
                    problems.extend(
                        differences(&want, &kernel)
                            .into_iter()
                            .map(|d| format!("kernel maps: {d}")),
                    );
                    if leftovers > 0 {
                        problems.push(format!(
                            "kernel maps: {leftovers} VIP_SCOPES entries of no scoped VIP"
                        ));
                    }
                }
                Err(e) => problems.push(e),
            }
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(problems);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Replays `steps` from the start, checking only at the end: whether it fails.
    fn fails(&mut self, steps: &[Step]) -> bool {
        self.db.reset();
        if self
            .converges(&World::default(), scaled(Duration::from_secs(5)))
            .is_err()
        {
            return true;
        }
        let mut world = World::default();
        for step in steps {
            world.apply(step);
            self.db.write(step, &world);
        }
        self.converges(&world, scaled(Duration::from_secs(2)))
            .is_err()
    }

    /// The smallest subsequence of `steps` that still fails (ddmin, removing chunks).
    fn shrink(&mut self, mut steps: Vec<Step>) -> Vec<Step> {
        let mut chunk = steps.len().div_ceil(2);
        while chunk >= 1 {
            let mut at = 0;
            let mut removed = false;
            while at < steps.len() {
                let candidate: Vec<Step> = steps[..at]
                    .iter()
                    .chain(steps[(at + chunk).min(steps.len())..].iter())
                    .cloned()
                    .collect();
                if !candidate.is_empty() && self.fails(&candidate) {
                    steps = candidate;
                    removed = true;
                } else {
                    at += chunk;
                }
            }
            if !removed {
                if chunk == 1 {
                    break;
                }
                chunk = chunk.div_ceil(2);
            }
        }
        steps
    }

    /// Runs `steps`, checking after each; on a failure, shrinks and panics with the case.
    fn check(&mut self, what: &str, steps: &[Step]) {
        self.db.reset();
        let mut world = World::default();
        self.converges(&world, scaled(Duration::from_secs(10)))
            .unwrap_or_else(|p| panic!("{what}: the agent did not return to the start: {p:#?}"));
        for (n, step) in steps.iter().enumerate() {
            world.apply(step);
            self.db.write(step, &world);
            if let Err(problems) = self.converges(&world, scaled(Duration::from_secs(3))) {
                let minimal = self.shrink(steps[..=n].to_vec());
                let mut end = World::default();
                for step in &minimal {
                    end.apply(step);
                }
                panic!(
                    "{what}: after step {n} the agent disagrees with the model:\n  {}\n\
                     minimal case ({} steps; keep it in KEPT):\n{minimal:#?}\n\
                     its world: {end:#?}\nthe model wants: {:#?}",
                    problems.join("\n  "),
                    minimal.len(),
                    model(&end),
                );
            }
        }
        assert!(self.agent.is_running(), "{what}: the agent exited");
    }
}

fn lb(vips: &[(&'static str, &'static str)], event: Option<&'static str>) -> LbSpec {
    LbSpec {
        vips: vips.to_vec(),
        protocol: None,
        datapaths: Vec::new(),
        group: None,
        event,
        reject: None,
    }
}

/// Cases kept: the defects of the red-team pass in this shape, and every minimal case a
/// run found.
fn kept() -> Vec<(&'static str, Vec<Step>)> {
    let bound = |i: usize, datapath: usize| {
        Step::SetPort(
            i,
            PortSpec {
                datapath,
                bound: true,
            },
        )
    };
    vec![
        (
            "two VIPs whose keys collide in the fast hash, one backed",
            vec![Step::SetLb(
                0,
                lb(
                    &[
                        ("10.203.1.20:10319", "10.0.0.5:8080"),
                        ("10.203.1.20:10394", ""),
                    ],
                    Some("true"),
                ),
            )],
        ),
        (
            "a VIP idle in a load balancer that reports, backed in one that does not",
            vec![
                Step::SetLb(0, lb(&[("10.96.0.1:80", "")], Some("true"))),
                Step::SetLb(1, lb(&[("10.96.0.1:80", "10.0.0.5:8080")], None)),
                Step::DeleteLb(1),
                Step::SetLb(1, lb(&[("10.96.0.1:80", "10.0.0.6:8080")], None)),
            ],
        ),
        (
            "one VIP in two spellings, in two load balancers",
            vec![
                Step::SetLb(0, lb(&[("[fd00::1]:80", "")], Some("TRUE"))),
                Step::SetLb(1, lb(&[("[FD00:0:0:0:0:0:0:1]:80", "[fd00::5]:80")], None)),
            ],
        ),
        (
            "an IPv4-mapped IPv6 VIP is not the IPv4 one",
            vec![
                Step::SetLb(0, lb(&[("[::ffff:10.96.0.1]:80", "")], Some("true"))),
                Step::SetLb(1, lb(&[("10.96.0.1:80", "10.0.0.5:8080")], Some("true"))),
            ],
        ),
        (
            "tenants reusing a VIP on two local datapaths, one through a group",
            vec![
                bound(0, 0),
                bound(1, 1),
                Step::SetGroup(0, vec![1, 2]),
                Step::SetLb(
                    0,
                    LbSpec {
                        datapaths: vec![0],
                        ..lb(&[("10.96.0.2:80", "")], Some("true"))
                    },
                ),
                Step::SetLb(
                    1,
                    LbSpec {
                        group: Some(0),
                        ..lb(&[("10.96.0.2:80", "10.0.0.5:8080")], None)
                    },
                ),
                Step::SetGroup(0, vec![2]),
                Step::SetGroup(0, vec![0, 1]),
            ],
        ),
        (
            "the protocol of a load balancer emptied (an optional column's new value)",
            vec![
                Step::SetLb(
                    5,
                    LbSpec {
                        protocol: Some("sctp"),
                        ..lb(&[("[FD00::1]:80", "[fd00::5]:8080")], None)
                    },
                ),
                Step::SetLb(
                    5,
                    lb(
                        &[("[::ffff:a60:1]:80", ""), ("[FD00::1]:80", " ")],
                        Some("true"),
                    ),
                ),
            ],
        ),
        (
            "a load balancer's datapath group moved to another, then emptied",
            vec![
                bound(0, 0),
                bound(1, 1),
                Step::SetGroup(0, vec![0]),
                Step::SetGroup(1, vec![1]),
                Step::SetLb(
                    0,
                    LbSpec {
                        group: Some(0),
                        ..lb(&[("10.96.0.1:80", "")], Some("true"))
                    },
                ),
                Step::SetLb(
                    1,
                    LbSpec {
                        group: Some(1),
                        ..lb(&[("10.96.0.1:80", "10.0.0.5:8080")], None)
                    },
                ),
                Step::SetLb(
                    0,
                    LbSpec {
                        group: Some(1),
                        ..lb(&[("10.96.0.1:80", "")], Some("true"))
                    },
                ),
                Step::SetLb(0, lb(&[("10.96.0.1:80", "")], Some("true"))),
            ],
        ),
        (
            "the global controller_event, and a rejecting load balancer",
            vec![
                Step::SetLb(0, lb(&[("10.96.0.1:8080", "")], None)),
                Step::SetGlobalEvent(Some("True")),
                Step::SetLb(
                    0,
                    LbSpec {
                        reject: Some("TRUE"),
                        ..lb(&[("10.96.0.1:8080", "")], None)
                    },
                ),
                Step::SetGlobalEvent(None),
            ],
        ),
    ]
}

#[test]
fn the_vip_map_follows_the_model_through_random_changes() {
    let mut rig = Rig::start();
    for (what, steps) in kept() {
        rig.check(what, &steps);
    }
    let seed: u64 = std::env::var("UNIDLER_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let budget = std::env::var("UNIDLER_DIFFERENTIAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let (mut runs, mut total_steps) = (0u64, 0usize);
    // In the suite: twenty sequences; on request, as many as fit the time.
    while runs < 20 || budget.is_some_and(|b| started.elapsed() < b) {
        let run_seed = seed.wrapping_add(runs) | 1;
        let mut generator = Generator {
            rng: Rng(run_seed),
            world: World::default(),
        };
        let steps: Vec<Step> = (0..200).map(|_| generator.step()).collect();
        rig.check(
            &format!("seed {run_seed} (UNIDLER_DIFFERENTIAL_SEED={run_seed})"),
            &steps,
        );
        runs += 1;
        total_steps += steps.len();
        if budget.is_none() && runs >= 20 {
            break;
        }
    }
    eprintln!(
        "differential: {runs} sequences, {total_steps} steps, from seed {seed}, in {:?}",
        started.elapsed()
    );
}
