//! The Southbound database as the generator writes it: one transaction per step, each also
//! flipping the canary.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use ovsdb::{Atom, Client, ClientOptions, Condition, Operation, Remote, Row, Uuid, Value};

use super::{
    model::{Expected, key_of, local_scopes, model, protocol_number},
    world::{LBS, PORTS, Step, TUNNEL_KEYS, World},
};

/// The Southbound database as the generator writes it: its rows' UUIDs.
pub struct Database {
    pub client: Client,
    pub rt: tokio::runtime::Runtime,
    pub datapaths: Vec<Uuid>,
    pub ports: Vec<Uuid>,
    pub chassis: Uuid,
    pub global: Uuid,
    pub lbs: BTreeMap<usize, Uuid>,
    pub groups: BTreeMap<usize, Uuid>,
    /// The canary load balancer: every step's transaction flips its VIP's backends, so that
    /// the agent showing the new state says it applied the step (one transaction, one
    /// update, one batch), even where the step changes nothing the model sees.
    pub canary: Uuid,
    /// Whether the canary's VIP has a backend now.
    pub canary_backed: bool,
}

/// The canary's VIP: on no address the generator uses, on every datapath, reporting.
pub const CANARY_VIP: &str = "10.99.0.1:1";

pub fn uuid_set(uuids: impl IntoIterator<Item = Uuid>) -> Value {
    Value::set(uuids.into_iter().map(Atom::Uuid))
}

pub fn string_map(pairs: &[(&str, &str)]) -> Value {
    Value::string_map(pairs.iter().copied())
}

impl Database {
    /// Connects to `remote`, writes the datapaths, the ports (none bound) and `SB_Global`.
    pub fn connect(remote: &str, chassis: Uuid) -> Self {
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
    pub fn expected(&self, world: &World) -> Expected {
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
    pub fn transact(&self, ops: Vec<Operation>) -> Vec<Uuid> {
        if ops.is_empty() {
            return Vec::new();
        }
        let results = self
            .rt
            .block_on(self.client.transact(&ops))
            .unwrap_or_else(|e| panic!("transaction {ops:?}: {e}"));
        results.iter().filter_map(|r| r.uuid().cloned()).collect()
    }

    pub fn port_row(&self, i: usize, world: &World) -> Row {
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

    pub fn by_uuid(uuid: &Uuid) -> Vec<Condition> {
        vec![Condition::eq("_uuid", Value::from(uuid.clone()))]
    }

    /// Writes `step` (the world already changed by it) in one transaction.
    pub fn write(&mut self, step: &Step, world: &World) {
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
    pub fn reset(&mut self) {
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
