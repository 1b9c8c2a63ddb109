//! The client's monitors against a real `ovsdb-server`: the replica, conditions changed at
//! run time, optional columns, named monitors, schema conversions, table consumers.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_keeps_a_replica_of_changes_made_by_others() {
    let mut server = southbound(Listen::default());
    server.sbctl(&["chassis-add", "ch-a", "geneve", "127.0.0.1"]);
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![
        MonitorRequest::table("Chassis").columns(&["name", "external_ids"]),
        MonitorRequest::table("Controller_Event"),
    ];
    // A subscriber hears of the change sets applied after it subscribed: the server is down
    // until the subscription is in place, so the first session's load is among them.
    server.kill();
    let client = Client::start(opts).unwrap();
    let mut changes = client.subscribe();
    server.start();
    client.wait_connected(WAIT).await.unwrap();
    assert_eq!(client.replica().len("Chassis"), 1);
    let first = next_change(&mut changes, "the first load", |_| true).await;
    assert!(first.resync, "{first:?}");
    // One who subscribes now hears of no load, and is told there was one.
    let _late = client.subscribe();
    assert_eq!(client.loads(), 1);

    server.sbctl(&["chassis-add", "ch-b", "geneve", "127.0.0.2"]);
    server.sbctl(&["set", "Chassis", "ch-a", "external_ids:zone=1"]);
    eventually("the replica to follow", || {
        let r = client.replica();
        r.len("Chassis") == 2
            && r.rows("Chassis").any(|(_, row)| {
                // Columns at their default value (an empty map here) are left out.
                row.get("external_ids").is_some_and(|ids| {
                    ids.as_string_map().get("zone").map(String::as_str) == Some("1")
                })
            })
    })
    .await;
    server.sbctl(&["chassis-del", "ch-b"]);
    eventually("the delete", || client.replica().len("Chassis") == 1).await;
    // Columns not asked for are not replicated.
    let r = client.replica();
    let (_, row) = r.rows("Chassis").next().unwrap();
    assert!(row.get("hostname").is_none(), "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_changed_at_run_time_narrow_the_replica_and_survive_a_reconnect() {
    let mut server = southbound_with_three_chassis();
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    assert_eq!(client.replica().len("Chassis"), 3);
    let names = |client: &Client| names_in(client, "Chassis");

    client
        .set_conditions("Chassis", vec![Condition::eq("name", "ch-b")])
        .await
        .unwrap();
    eventually("rows that no longer match to leave", || {
        names(&client) == ["ch-b"]
    })
    .await;
    // Rows that start matching later enter; others do not.
    server.sbctl(&["set", "Chassis", "ch-c", "hostname=x"]);
    server.sbctl(&["chassis-add", "ch-d", "geneve", "127.0.0.4"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(names(&client), ["ch-b"]);

    // A new session asks with the conditions as they are now.
    server.kill();
    eventually("the client to notice", || !client.is_connected()).await;
    server.start();
    client.wait_connected(WAIT).await.unwrap();
    assert_eq!(names(&client), ["ch-b"]);
    // Back to every row, loaded afresh.
    assert!(client.set_conditions("Chassis", Vec::new()).await.unwrap());
    eventually("every row again", || names(&client).len() == 4).await;
    assert!(
        !client.set_conditions("Chassis", Vec::new()).await.unwrap(),
        "the same conditions again: unchanged"
    );
    assert!(client.set_conditions("Nope", Vec::new()).await.is_err());

    // Conditions the server refuses are not taken as in place: asking again asks the server
    // again (and is refused again), and the monitor keeps following what it followed.
    let bad = vec![Condition::eq("no_such_column", "x")];
    for attempt in 0..2 {
        let refused = client.set_conditions("Chassis", bad.clone()).await;
        assert!(refused.is_err(), "attempt {attempt}: {refused:?}");
    }
    assert!(client.is_connected());
    server.sbctl(&["chassis-add", "ch-e", "geneve", "127.0.0.5"]);
    eventually("a new row still followed", || names(&client).len() == 5).await;
}

/// Optional columns are asked for where the server's schema has them, left out where not (a
/// column the schema lacks would fail the monitor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_columns_the_schema_lacks_are_left_out() {
    let server = southbound(Listen::default());
    server.sbctl(&["chassis-add", "ch-a", "geneve", "127.0.0.1"]);
    server.sbctl(&["set", "Chassis", "ch-a", "hostname=h"]);
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![
        MonitorRequest::table("Chassis")
            .columns(&["name"])
            .optional_columns(&["hostname", "no_such_column"]),
    ];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let row = client
        .replica()
        .rows("Chassis")
        .map(|(_, r)| r.clone())
        .next()
        .unwrap();
    assert_eq!(row.keys().collect::<Vec<_>>(), ["hostname", "name"]);
}

/// An optional column a schema conversion adds is monitored from the next session on (the
/// conversion ends the session; the next one asks for the column again), by a leader-only
/// client, which monitors `_Server` (whose copy of the schema the conversion leaves as it
/// was: it must not be trusted to say that a column is missing)...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_column_a_schema_conversion_adds_is_monitored_after_it() {
    optional_column_added_by_a_conversion(true).await;
}

/// ... and by a client of any member, which does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_column_the_server_refuses_is_asked_for_again_after_a_conversion() {
    optional_column_added_by_a_conversion(false).await;
}

async fn optional_column_added_by_a_conversion(leader_only: bool) {
    let server = southbound(Listen::default());
    server.sbctl(&["chassis-add", "ch-a", "geneve", "127.0.0.1"]);
    let mut opts = options(&server.unix_remote());
    opts.leader_only = leader_only;
    opts.monitors = vec![
        MonitorRequest::table("Chassis")
            .columns(&["name"])
            .optional_columns(&["added"]),
    ];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let columns = |client: &Client| {
        client
            .replica()
            .rows("Chassis")
            .map(|(_, r)| r.keys().cloned().collect::<Vec<_>>())
            .next()
            .unwrap_or_default()
    };
    assert_eq!(columns(&client), ["name"]);

    let dir = TempDir::new("newer-schema");
    let mut schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SB_SCHEMA).unwrap()).unwrap();
    schema["tables"]["Chassis"]["columns"]["added"] = serde_json::json!({"type": "string"});
    let newer = dir.join("newer.ovsschema");
    std::fs::write(&newer, schema.to_string()).unwrap();
    ovsdb_harness::run(
        std::process::Command::new("ovsdb-client")
            .arg("convert")
            .arg(server.unix_remote())
            .arg(&newer),
    );
    ovsdb_harness::run(std::process::Command::new("ovsdb-client").args([
        "transact",
        &server.unix_remote(),
        r#"["OVN_Southbound", {"op": "update", "table": "Chassis",
            "where": [["name", "==", "ch-a"]], "row": {"added": "yes"}}]"#,
    ]));
    eventually("the added column in the replica", || {
        columns(&client) == ["added", "name"]
    })
    .await;
}

/// A table monitored twice, the second time by a named monitor with other conditions (any of
/// them): each keeps its rows under its own key, the named one loaded by select and followed
/// from there, and both reload after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_monitor_follows_the_same_table_under_its_own_conditions() {
    let mut server = southbound_with_three_chassis();
    server.sbctl(&["set", "Chassis", "ch-a", "hostname=x"]);
    server.sbctl(&["set", "Chassis", "ch-b", "hostname=x"]);
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![
        MonitorRequest::table("Chassis").columns(&["name"]),
        // Other columns than the first monitor's (see MonitorRequest::named).
        MonitorRequest::table("Chassis")
            .columns(&["name", "hostname"])
            .matching(Condition::eq("hostname", "x"))
            .matching(Condition::eq("name", "ch-b"))
            .named("on_x"),
    ];
    let client = Client::start(opts).unwrap();
    let mut changes = client.subscribe();
    client.wait_connected(WAIT).await.unwrap();
    assert_eq!(names_in(&client, "Chassis"), ["ch-a", "ch-b", "ch-c"]);
    assert_eq!(
        names_in(&client, "on_x"),
        ["ch-a", "ch-b"],
        "ch-b matches both"
    );
    let row = client
        .replica()
        .rows("on_x")
        .map(|(_, r)| r.clone())
        .next()
        .unwrap();
    assert_eq!(
        row.keys().collect::<Vec<_>>(),
        ["hostname", "name"],
        "its columns only"
    );

    // A row that starts matching enters the named monitor only, as a change under its name.
    while changes.try_recv().is_ok() {}
    server.sbctl(&["set", "Chassis", "ch-c", "hostname=x"]);
    eventually("ch-c on x", || {
        names_in(&client, "on_x") == ["ch-a", "ch-b", "ch-c"]
    })
    .await;
    let set = next_change(&mut changes, "ch-c's change", |set| !set.changes.is_empty()).await;
    let keys: Vec<_> = set.changes.iter().map(|(key, _, _)| key.as_str()).collect();
    assert_eq!(keys, ["on_x"], "{set:?}");
    assert_eq!(names_in(&client, "Chassis"), ["ch-a", "ch-b", "ch-c"]);
    // One that stops matching leaves it.
    server.sbctl(&["set", "Chassis", "ch-a", "hostname=y"]);
    eventually("ch-a off x", || {
        names_in(&client, "on_x") == ["ch-b", "ch-c"]
    })
    .await;
    assert!(
        client.set_conditions("on_x", Vec::new()).await.is_err(),
        "a named monitor's conditions are fixed"
    );

    // A new session reloads both.
    server.kill();
    eventually("the client to notice", || !client.is_connected()).await;
    server.start();
    client.wait_connected(WAIT).await.unwrap();
    assert_eq!(names_in(&client, "on_x"), ["ch-b", "ch-c"]);
    server.sbctl(&["chassis-del", "ch-b"]);
    eventually("ch-b gone from both", || {
        names_in(&client, "on_x") == ["ch-c"] && names_in(&client, "Chassis") == ["ch-a", "ch-c"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_canceled_by_a_schema_conversion_are_set_up_again() {
    let server = southbound(Listen::default());
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    // Converting the database (to the same schema) cancels every monitor on it.
    ovsdb_harness::run(
        std::process::Command::new("ovsdb-client")
            .arg("convert")
            .arg(server.unix_remote())
            .arg(SB_SCHEMA),
    );
    server.sbctl(&["chassis-add", "ch-after", "geneve", "127.0.0.3"]);
    eventually(
        "the row inserted after the conversion in the replica",
        || {
            client
                .replica()
                .rows("Chassis")
                .any(|(_, r)| r.get("name") == Some(&Value::from("ch-after")))
        },
    )
    .await;
}

/// What a test consumer saw, one line per call.
#[derive(Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ovsdb::TableConsumer for Recorder {
    fn reset(&mut self) {
        self.0.lock().unwrap().push("reset".into());
    }
    fn row(&mut self, _uuid: &ovsdb::Uuid, update: ovsdb::RowUpdate) -> Result<(), Error> {
        let name = |row: &Row| {
            row.get("name")
                .and_then(Value::atom)
                .and_then(Atom::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        let line = match update {
            ovsdb::RowUpdate::Initial(row) => format!("initial {}", name(&row)),
            ovsdb::RowUpdate::Insert(row) => format!("insert {}", name(&row)),
            ovsdb::RowUpdate::Modify(diff) => format!("modify {:?}", diff.get("vips")),
            ovsdb::RowUpdate::Delete => "delete".into(),
        };
        self.0.lock().unwrap().push(line);
        Ok(())
    }
    fn batch_done(&mut self, replica: &ovsdb::Replica, _changed: &ovsdb::Changed) {
        self.0
            .lock()
            .unwrap()
            .push(format!("done chassis={}", replica.len("Chassis")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_follows_a_table_without_a_replica_and_resumes_after_a_leader_change() {
    let mut cluster = Cluster::start(3, SB_SCHEMA, SB_DB);
    cluster.sbctl(&[
        "create",
        "Load_Balancer",
        "name=a",
        r#"vips={"10.0.0.1:80"=""}"#,
    ]);
    cluster.sbctl(&["chassis-add", "ch-a", "geneve", "127.0.0.1"]);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumer = ovsdb::ConsumerHandle::new(Recorder(seen.clone()));
    let mut opts = options(&cluster.remotes());
    opts.monitors = vec![
        MonitorRequest::table("Load_Balancer")
            .columns(&["name", "vips"])
            .consumed_by(consumer),
        MonitorRequest::table("Chassis").columns(&["name"]),
        // Resumed as the data monitor is.
        MonitorRequest::table("Load_Balancer")
            .columns(&["name", "protocol"])
            .matching(Condition::eq("name", "b"))
            .matching(Condition::eq("name", "c"))
            .named("b_or_c"),
    ];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let lines = || seen.lock().unwrap().clone();
    let named = |client: &Client| names_in(client, "b_or_c");
    // The full load: reset, the row, then the batch, with the replicated table already in.
    // (Every batch is done for every consumer: the named monitor's load is one too.)
    assert_eq!(
        lines(),
        ["reset", "initial a", "done chassis=1", "done chassis=1"]
    );
    assert_eq!(client.replica().len("Load_Balancer"), 0, "not replicated");

    // A modify carries the diff: a changed map value is the key with its new value.
    cluster.sbctl(&[
        "set",
        "Load_Balancer",
        "a",
        r#"vips:"10.0.0.1:80"="10.1.1.1:8080""#,
    ]);
    let expected = format!(
        "modify {:?}",
        Some(Value::string_map([("10.0.0.1:80", "10.1.1.1:8080")]))
    );
    eventually("the modify", || lines().contains(&expected)).await;
    cluster.sbctl(&["create", "Load_Balancer", "name=b"]);
    cluster.sbctl(&["destroy", "Load_Balancer", "a"]);
    eventually("the insert and the delete", || {
        let l = lines();
        l.contains(&"insert b".to_owned()) && l.contains(&"delete".to_owned())
    })
    .await;

    eventually("b in the named monitor", || named(&client) == ["b"]).await;

    // The leader goes: the client resumes on the new one from its last transaction, so the
    // consumer is not reset, and what changed meanwhile comes as changes.
    let mut changes = client.subscribe();
    let sessions = client.session_count();
    let leader = cluster.leader().unwrap();
    cluster.servers[leader].kill();
    cluster.wait_for_leader(WAIT);
    cluster.sbctl(&["create", "Load_Balancer", "name=c"]);
    client.wait_new_session(sessions).await;
    eventually("the row made meanwhile", || {
        lines().contains(&"insert c".to_owned())
    })
    .await;
    let l = lines();
    assert_eq!(
        l.iter().filter(|x| *x == "reset").count(),
        1,
        "resumed, not loaded afresh: {l:?}"
    );
    assert!(!l.iter().any(|x| x.starts_with("initial c")), "{l:?}");
    // The named monitor too: c as a change, nothing loaded afresh.
    eventually("c in the named monitor", || named(&client) == ["b", "c"]).await;
    while let Ok(set) = changes.try_recv() {
        assert!(!set.resync, "a monitor was loaded afresh: {set:?}");
    }
}

/// A column's value as a set of atoms (a map as its pairs), however it is spelt: an atom, a
/// set of one, a set.
fn normalized(value: Option<&Value>) -> Vec<String> {
    let mut out: Vec<String> = match value {
        None => Vec::new(),
        Some(Value::Map(pairs)) => pairs.iter().map(|(k, v)| format!("{k:?}={v:?}")).collect(),
        Some(v) => v.atoms().iter().map(|a| format!("{a:?}")).collect(),
    };
    out.sort();
    out
}

/// The replica applies each `update2` diff as ovsdb-server means it: an optional column
/// (at most one element) and a scalar come as their new value, a set of more as the elements
/// that changed. After every kind of change, the replica's row is the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_column_change_leaves_the_replica_as_the_server_has_it() {
    let server = southbound(Listen::default());
    let columns = ["protocol", "datapaths", "datapath_group", "vips", "name"];
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![
        MonitorRequest::table("Load_Balancer").columns(&columns),
        MonitorRequest::table("Logical_DP_Group").columns(&["datapaths"]),
    ];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let inserted = client
        .transact(&[
            Operation::Insert {
                table: "Datapath_Binding".into(),
                row: row(&[("tunnel_key", Value::from(1))]),
                uuid_name: None,
            },
            Operation::Insert {
                table: "Datapath_Binding".into(),
                row: row(&[("tunnel_key", Value::from(2))]),
                uuid_name: None,
            },
        ])
        .await
        .unwrap();
    let dp: Vec<Uuid> = inserted.iter().map(|r| r.uuid().unwrap().clone()).collect();
    let uuids = |ids: &[usize]| Value::set(ids.iter().map(|i| Atom::Uuid(dp[*i].clone())));
    let group = |ids: &[usize]| Operation::Insert {
        table: "Logical_DP_Group".into(),
        row: row(&[("datapaths", uuids(ids))]),
        uuid_name: Some("group".into()),
    };
    let named_group = Value::Atom(Atom::NamedUuid("group".into()));
    let lb = client
        .transact(&[
            group(&[0]),
            Operation::Insert {
                table: "Load_Balancer".into(),
                row: row(&[
                    ("name", Value::from("lb")),
                    ("protocol", Value::from("sctp")),
                    ("datapaths", uuids(&[0])),
                    ("datapath_group", named_group.clone()),
                    ("vips", Value::string_map([("10.0.0.1:80", "")])),
                ]),
                uuid_name: None,
            },
        ])
        .await
        .unwrap()[1]
        .uuid()
        .unwrap()
        .clone();
    let by_uuid = |uuid: &Uuid| vec![Condition::eq("_uuid", Value::from(uuid.clone()))];
    // Each change, then the replica against the server's own rows.
    let changes: Vec<(&str, Vec<Operation>)> = vec![
        (
            "an optional column emptied, a set of one grown",
            vec![Operation::Update {
                table: "Load_Balancer".into(),
                conditions: by_uuid(&lb),
                row: row(&[("protocol", Value::set([])), ("datapaths", uuids(&[0, 1]))]),
            }],
        ),
        (
            "an optional column set again",
            vec![Operation::Update {
                table: "Load_Balancer".into(),
                conditions: by_uuid(&lb),
                row: row(&[("protocol", Value::from("udp"))]),
            }],
        ),
        (
            "an optional column changed, a set shrunk to one other",
            vec![Operation::Update {
                table: "Load_Balancer".into(),
                conditions: by_uuid(&lb),
                row: row(&[("protocol", Value::from("tcp")), ("datapaths", uuids(&[1]))]),
            }],
        ),
        (
            "an optional reference moved to another row",
            vec![
                group(&[1]),
                Operation::Update {
                    table: "Load_Balancer".into(),
                    conditions: by_uuid(&lb),
                    row: row(&[("datapath_group", named_group.clone())]),
                },
            ],
        ),
        (
            "an optional reference emptied, a set of one replaced by another one",
            vec![Operation::Update {
                table: "Load_Balancer".into(),
                conditions: by_uuid(&lb),
                row: row(&[
                    ("datapath_group", Value::set([])),
                    ("datapaths", uuids(&[0])),
                ]),
            }],
        ),
    ];
    for (what, ops) in changes {
        client.transact(&ops).await.unwrap();
        let select = |table: &str, columns: &[&str]| Operation::Select {
            table: table.into(),
            conditions: Vec::new(),
            columns: Some(
                std::iter::once("_uuid")
                    .chain(columns.iter().copied())
                    .map(str::to_owned)
                    .collect(),
            ),
        };
        let truth = client
            .transact(&[
                select("Load_Balancer", &columns),
                select("Logical_DP_Group", &["datapaths"]),
            ])
            .await
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let mismatch = {
                let replica = client.replica();
                let mut mismatch = None;
                for (table, result) in ["Load_Balancer", "Logical_DP_Group"].iter().zip(&truth) {
                    assert_eq!(replica.len(table), result.rows().len(), "{what}: {table}");
                    for want in result.rows() {
                        let uuid = want["_uuid"].atom().and_then(Atom::as_uuid).unwrap();
                        let Some(got) = replica.row(table, uuid) else {
                            mismatch = Some(format!("{table} {uuid} missing"));
                            continue;
                        };
                        for (column, value) in want.iter().filter(|(c, _)| *c != "_uuid") {
                            if normalized(got.get(column)) != normalized(Some(value)) {
                                mismatch = Some(format!(
                                    "{table}.{column}: replica {:?}, server {:?}",
                                    got.get(column),
                                    value
                                ));
                            }
                        }
                    }
                }
                mismatch
            };
            match mismatch {
                None => break,
                Some(m) if Instant::now() > deadline => panic!("{what}: {m}"),
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// The sorted strings of `column` in the rows the client keeps under `key` whose `name` is
/// `name` (a set column, however it is spelt).
fn strings_of(client: &Client, key: &str, name: &str, column: &str) -> Vec<String> {
    let replica = client.replica();
    let mut out: Vec<String> = replica
        .rows(key)
        .find(|(_, r)| r.get("name").and_then(Value::atom).and_then(Atom::as_str) == Some(name))
        .and_then(|(_, r)| r.get(column).cloned())
        .map(|v| {
            v.atoms()
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A named monitor applies a set's diff by the kind of its table's column, as the data
/// monitor does (its rows are kept under its own name, not the table's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_monitor_applies_set_diffs_as_the_data_monitor_does() {
    let server = southbound_with_three_chassis();
    server.sbctl(&["set", "Chassis", "ch-a", "transport_zones=tz1"]);
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![
        MonitorRequest::table("Chassis").columns(&["name", "transport_zones"]),
        MonitorRequest::table("Chassis")
            .columns(&["name", "transport_zones", "hostname"])
            .matching(Condition::eq("name", "ch-a"))
            .named("mine"),
    ];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let zones = |key: &str| strings_of(&client, key, "ch-a", "transport_zones");
    eventually("the load", || {
        zones("mine") == ["tz1"] && zones("Chassis") == ["tz1"]
    })
    .await;
    server.sbctl(&["add", "Chassis", "ch-a", "transport_zones", "tz2"]);
    eventually("the data monitor", || zones("Chassis") == ["tz1", "tz2"]).await;
    eventually("the named monitor", || zones("mine") == ["tz1", "tz2"]).await;
}

/// After the server converts its database, diffs apply by the new schema's column kinds: a
/// column that became a set, and a set column the conversion added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffs_after_a_schema_conversion_apply_by_the_new_schema() {
    let dir = TempDir::new("kinds-schema");
    let table = |columns: serde_json::Value| {
        serde_json::json!({"name": "R", "version": "1.0.0",
            "tables": {"T": {"columns": columns, "isRoot": true}}})
    };
    let older = dir.join("older.ovsschema");
    let newer = dir.join("newer.ovsschema");
    std::fs::write(
        &older,
        table(serde_json::json!({
            "name": {"type": "string"},
            "tags": {"type": {"key": "string", "min": 0, "max": 1}}}))
        .to_string(),
    )
    .unwrap();
    let mut converted = table(serde_json::json!({
        "name": {"type": "string"},
        "tags": {"type": {"key": "string", "min": 0, "max": "unlimited"}},
        "zones": {"type": {"key": "string", "min": 0, "max": "unlimited"}}}));
    converted["version"] = "1.1.0".into();
    std::fs::write(&newer, converted.to_string()).unwrap();
    let server = OvsdbServer::standalone("kinds", older.to_str().unwrap(), Listen::default());
    let remote = server.unix_remote();
    let transact = |ops: &str| {
        ovsdb_harness::run(
            std::process::Command::new("ovsdb-client").args(["transact", &remote, ops]),
        )
    };
    transact(r#"["R",{"op":"insert","table":"T","row":{"name":"a","tags":"x"}}]"#);
    let mut opts = options(&remote);
    opts.database = "R".into();
    opts.leader_only = false;
    opts.monitors = vec![MonitorRequest::table("T")];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let column = |c: &str| strings_of(&client, "T", "a", c);
    eventually("the load", || column("tags") == ["x"]).await;
    let sessions = client.session_count();
    ovsdb_harness::run(
        std::process::Command::new("ovsdb-client")
            .args(["convert", &remote])
            .arg(&newer),
    );
    client.wait_new_session(sessions).await;
    eventually("the load after the conversion", || column("tags") == ["x"]).await;
    transact(
        r#"["R",{"op":"mutate","table":"T","where":[],"mutations":[["tags","insert",["set",["y"]]],["zones","insert",["set",["z1"]]]]}]"#,
    );
    transact(
        r#"["R",{"op":"mutate","table":"T","where":[],"mutations":[["zones","insert",["set",["z2"]]]]}]"#,
    );
    eventually("both sets as the server has them", || {
        column("tags") == ["x", "y"] && column("zones") == ["z1", "z2"]
    })
    .await;
}
