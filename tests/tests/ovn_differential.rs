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

#[path = "../ovn_differential/mod.rs"]
mod differential;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ovsdb::Uuid;
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

use self::differential::{
    database::Database,
    generator::Generator,
    model::{Expected, Key, differences, key_of, local_scopes, model, protocol_number},
    world::{LbSpec, PortSpec, Step, World},
};

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
        let chassis = Uuid::parse(&sb.chassis_uuid(CHASSIS)).unwrap();
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
