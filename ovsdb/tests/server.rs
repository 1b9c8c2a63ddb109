//! The client against real `ovsdb-server`s with the real OVN Southbound schema.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use ovsdb::{
    Atom, ChangeSet, Client, ClientOptions, Condition, Error, ErrorKind, MonitorRequest, Mutation,
    OpResult, Operation, Remote, Row, TlsFiles, Value,
};
use ovsdb_harness::{Cluster, Listen, OvsdbServer, Pki, TempDir, free_port};

const WAIT: Duration = Duration::from_secs(15);

/// A real, rich schema to test against: OVN's Southbound database, as Debian installs it.
const SB_SCHEMA: &str = "/usr/share/ovn/ovn-sb.ovsschema";
const SB_DB: &str = "OVN_Southbound";

/// A standalone Southbound server, started.
#[track_caller]
fn southbound(listen: Listen) -> OvsdbServer {
    OvsdbServer::standalone("sb", SB_SCHEMA, listen)
}

/// `ovn-sbctl` against a standalone server (`--no-leader-only`) or a cluster.
trait Sbctl {
    fn sbctl(&self, args: &[&str]) -> String;
}

impl Sbctl for OvsdbServer {
    #[track_caller]
    fn sbctl(&self, args: &[&str]) -> String {
        let mut all = vec!["--no-leader-only"];
        all.extend_from_slice(args);
        self.ctl("ovn-sbctl", &all)
    }
}

impl Sbctl for Cluster {
    #[track_caller]
    fn sbctl(&self, args: &[&str]) -> String {
        self.ctl("ovn-sbctl", args)
    }
}

/// Client options for these tests, with the client's logs captured per test (shown when it
/// fails; `RUST_LOG` overrides the default `ovsdb=debug`).
fn options(remotes: &str) -> ClientOptions {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ovsdb=debug".into()),
        )
        .try_init();
    let mut o = ClientOptions::new(Remote::parse_list(remotes).unwrap(), SB_DB);
    o.backoff_max = Duration::from_millis(500);
    o
}

#[track_caller]
fn row(pairs: &[(&str, Value)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Inserts an Encap and a Chassis referring to it, as one transaction.
fn add_chassis_ops(name: &str, ip: &str) -> Vec<Operation> {
    vec![
        Operation::Insert {
            table: "Encap".into(),
            row: row(&[
                ("type", "geneve".into()),
                // (type, ip) is an index: one address per chassis.
                ("ip", ip.into()),
                ("chassis_name", name.into()),
            ]),
            uuid_name: Some("encap".into()),
        },
        Operation::Insert {
            table: "Chassis".into(),
            row: row(&[
                ("name", name.into()),
                ("hostname", "node".into()),
                ("encaps", Value::Atom(Atom::NamedUuid("encap".into()))),
            ]),
            uuid_name: None,
        },
    ]
}

/// A Southbound server with three Chassis rows, `ch-a`, `ch-b` and `ch-c`.
#[track_caller]
fn southbound_with_three_chassis() -> OvsdbServer {
    let server = southbound(Listen::default());
    for (name, ip) in [
        ("ch-a", "127.0.0.1"),
        ("ch-b", "127.0.0.2"),
        ("ch-c", "127.0.0.3"),
    ] {
        server.sbctl(&["chassis-add", name, "geneve", ip]);
    }
    server
}

/// The `name` column of the rows the client keeps under `key` (a table or a named monitor),
/// sorted.
fn names_in(client: &Client, key: &str) -> Vec<String> {
    let mut names: Vec<String> = client
        .replica()
        .rows(key)
        .filter_map(|(_, r)| r.get("name")?.atom()?.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Polls `check` until it holds or `WAIT` passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next change set that `wanted` accepts (those before it are skipped), at most `WAIT`
/// from now. Change sets are published after the replica has them: a test that saw the
/// replica change waits here for the announcement.
async fn next_change(
    changes: &mut broadcast::Receiver<Arc<ChangeSet>>,
    what: &str,
    wanted: impl Fn(&ChangeSet) -> bool,
) -> Arc<ChangeSet> {
    let found = async {
        loop {
            match changes.recv().await {
                Ok(set) if wanted(&set) => return set,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    };
    match tokio::time::timeout(WAIT, found).await {
        Ok(set) => set,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_dbs_and_get_schema() {
    let server = southbound(Listen::default());
    let client = Client::start(options(&server.unix_remote())).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let dbs = client.list_dbs().await.unwrap();
    assert!(dbs.contains(&SB_DB.to_owned()), "{dbs:?}");
    let schema = client.get_schema(SB_DB).await.unwrap();
    assert_eq!(schema["name"], SB_DB);
    assert!(schema["tables"]["Controller_Event"].is_object());
    let err = client.get_schema("Nope").await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Rpc {
                kind: ErrorKind::UnknownDatabase,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_against_the_real_server() {
    let server = southbound(Listen {
        tcp: Some(free_port()),
        ssl: None,
    });
    let client = Client::start(options(&server.tcp_remote().unwrap())).unwrap();
    client.wait_connected(WAIT).await.unwrap();

    // insert (with named-uuid) + comment
    let mut ops = add_chassis_ops("ch-1", "127.0.0.1");
    ops.push(Operation::Comment("unidler test".into()));
    let results = client.transact(&ops).await.unwrap();
    let chassis = results[1].uuid().unwrap().clone();
    assert_eq!(results[2], OpResult::Empty);

    // select
    let by_name = vec![Condition::eq("name", "ch-1")];
    let sel = Operation::Select {
        table: "Chassis".into(),
        conditions: by_name.clone(),
        columns: Some(vec!["_uuid".into(), "hostname".into()]),
    };
    let rows = client.transact(std::slice::from_ref(&sel)).await.unwrap();
    assert_eq!(rows[0].rows().len(), 1);
    assert_eq!(rows[0].rows()[0]["hostname"], Value::from("node"));
    assert_eq!(rows[0].rows()[0]["_uuid"], Value::from(chassis.clone()));

    // update + mutate
    let results = client
        .transact(&[
            Operation::Update {
                table: "Chassis".into(),
                conditions: by_name.clone(),
                row: row(&[("hostname", "node-2".into())]),
            },
            Operation::Mutate {
                table: "Chassis".into(),
                conditions: by_name.clone(),
                mutations: vec![
                    Mutation::insert("external_ids", Value::string_map([("k", "v")])),
                    Mutation::add("nb_cfg", 5),
                ],
            },
        ])
        .await
        .unwrap();
    assert_eq!(results[0].count(), Some(1));
    assert_eq!(results[1].count(), Some(1));
    let shown = server.sbctl(&[
        "--bare",
        "--columns=hostname,external_ids,nb_cfg",
        "list",
        "Chassis",
    ]);
    assert!(
        shown.contains("node-2") && shown.contains("k=v") && shown.contains('5'),
        "{shown}"
    );

    // wait: holds, then times out
    let wait = |hostname: &str, timeout| Operation::Wait {
        table: "Chassis".into(),
        conditions: by_name.clone(),
        columns: vec!["hostname".into()],
        equal: true,
        rows: vec![row(&[("hostname", hostname.into())])],
        timeout,
    };
    client
        .transact(&[wait("node-2", Duration::ZERO)])
        .await
        .unwrap();
    let err = client
        .transact(&[wait("other", Duration::ZERO)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Transaction {
                index: Some(0),
                kind: ErrorKind::TimedOut,
                ..
            }
        ),
        "{err:?}"
    );

    // constraint violation: a second Chassis with the same (indexed) name
    let err = client
        .transact(&add_chassis_ops("ch-1", "127.0.0.1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Transaction {
                kind: ErrorKind::ConstraintViolation,
                ..
            }
        ),
        "{err:?}"
    );
    // referential integrity: deleting the Encap the Chassis needs (min 1)
    let err = client
        .transact(&[Operation::Delete {
            table: "Encap".into(),
            conditions: vec![],
        }])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Transaction {
                kind: ErrorKind::ConstraintViolation | ErrorKind::ReferentialIntegrity,
                ..
            }
        ),
        "{err:?}"
    );
    // a malformed operation
    let err = client
        .transact(&[Operation::Select {
            table: "NoSuchTable".into(),
            conditions: vec![],
            columns: None,
        }])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Transaction { .. } | Error::Rpc { .. }),
        "{err:?}"
    );

    // delete
    let results = client
        .transact(&[
            Operation::Delete {
                table: "Chassis".into(),
                conditions: by_name.clone(),
            },
            Operation::Delete {
                table: "Encap".into(),
                conditions: vec![],
            },
        ])
        .await
        .unwrap();
    assert_eq!(results[0].count(), Some(1));
    assert_eq!(
        server
            .sbctl(&["--bare", "--columns=name", "list", "Chassis"])
            .trim(),
        ""
    );
}

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
async fn reconnects_after_a_restart_and_resyncs() {
    let mut server = southbound(Listen::default());
    let mut opts = options(&server.unix_remote());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    server.kill();
    eventually("the client to notice", || !client.is_connected()).await;
    let err = client
        .transact(&[Operation::Comment("x".into())])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotConnected), "{err:?}");
    // Changed while the client was away.
    server.start();
    server.sbctl(&["chassis-add", "ch-new", "geneve", "127.0.0.1"]);
    client.wait_connected(WAIT).await.unwrap();
    eventually("the resync", || client.replica().len("Chassis") == 1).await;
    client
        .transact(&[Operation::Comment("back".into())])
        .await
        .unwrap();
    assert!(
        client
            .stats()
            .disconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_of_a_raft_cluster() {
    let mut cluster = Cluster::start(3, SB_SCHEMA, SB_DB);
    let mut opts = options(&cluster.remotes());
    opts.monitors = vec![MonitorRequest::table("Chassis").columns(&["name"])];
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    let leader = cluster.leader().unwrap();
    let connected_to = |client: &Client| match &*client.status().borrow() {
        ovsdb::Status::Connected(r) => r.to_string(),
        other => panic!("not connected: {other:?}"),
    };
    assert_eq!(
        connected_to(&client),
        cluster.servers[leader].tcp_remote().unwrap()
    );
    client
        .transact(&add_chassis_ops("ch-1", "127.0.0.1"))
        .await
        .unwrap();

    cluster.servers[leader].kill();
    eventually("the client to leave the dead leader", || {
        !client.is_connected()
    })
    .await;
    client.wait_connected(WAIT).await.unwrap();
    let new_leader = cluster.wait_for_leader(WAIT);
    assert_ne!(new_leader, leader);
    eventually("the client to sit on the new leader", || {
        client.is_connected()
            && connected_to(&client) == cluster.servers[new_leader].tcp_remote().unwrap()
    })
    .await;
    client
        .transact(&add_chassis_ops("ch-2", "127.0.0.2"))
        .await
        .unwrap();
    eventually("both rows in the replica", || {
        client.replica().len("Chassis") == 2
    })
    .await;
    assert_eq!(
        cluster
            .sbctl(&["--bare", "--columns=name", "list", "Chassis"])
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_is_not_used_for_leader_only_connections() {
    let cluster = Cluster::start(3, SB_SCHEMA, SB_DB);
    let leader = cluster.leader().unwrap();
    let follower = (leader + 1) % 3;
    // Only a follower given: the client must refuse to settle there.
    let client = Client::start(options(&cluster.servers[follower].tcp_remote().unwrap())).unwrap();
    assert!(client.wait_connected(Duration::from_secs(2)).await.is_err());
    assert!(
        client
            .stats()
            .leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // Without leader-only, a follower is fine.
    let mut opts = options(&cluster.servers[follower].tcp_remote().unwrap());
    opts.leader_only = false;
    let any = Client::start(opts).unwrap();
    any.wait_connected(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_ovs_pki_certificates_and_a_wrong_ca_is_refused() {
    let tmp = TempDir::new("pki");
    let pki = Pki::new(&tmp.0);
    let port = free_port();
    let server = southbound(Listen {
        tcp: None,
        ssl: Some((port, pki.server.clone())),
    });
    let files = |f: &[std::path::PathBuf; 3]| TlsFiles {
        private_key: f[0].clone(),
        certificate: f[1].clone(),
        ca_certificate: f[2].clone(),
    };
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(files(&pki.client));
    let client = Client::start(opts).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    assert!(client.list_dbs().await.unwrap().contains(&SB_DB.to_owned()));

    // A client that trusts another CA must not connect.
    let other_tmp = TempDir::new("pki2");
    let other = Pki::new(&other_tmp.0);
    let mut wrong = files(&pki.client);
    wrong.ca_certificate = other.client[2].clone();
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(wrong);
    let client = Client::start(opts).unwrap();
    assert!(client.wait_connected(Duration::from_secs(2)).await.is_err());
    let status = client.status().borrow().clone();
    assert!(
        matches!(&status, ovsdb::Status::Disconnected(Some(why)) if why.contains("TLS")),
        "{status:?}"
    );
    // Unreadable TLS files are refused up front.
    let mut opts = options(&server.ssl_remote().unwrap());
    opts.tls = Some(TlsFiles {
        private_key: "/nonexistent".into(),
        certificate: "/nonexistent".into(),
        ca_certificate: "/nonexistent".into(),
    });
    assert!(matches!(Client::start(opts), Err(Error::Tls(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_remote_is_resolved() {
    let port = free_port();
    let _server = southbound(Listen {
        tcp: Some(port),
        ssl: None,
    });
    let client = Client::start(options(&format!("tcp:localhost:{port}"))).unwrap();
    client.wait_connected(WAIT).await.unwrap();
    assert!(client.list_dbs().await.unwrap().contains(&SB_DB.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_accepts_and_never_speaks_does_not_hold_up_the_others() {
    let tmp = TempDir::new("silent");
    let pki = Pki::new(&tmp.0);
    let server = southbound(Listen {
        tcp: None,
        ssl: Some((free_port(), pki.server.clone())),
    });
    // The kernel completes the TCP handshake for a listener that never accepts: the peer
    // "accepts" and never says a word of TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_remote = format!("ssl:{}", silent.local_addr().unwrap());
    let mut opts = options(&format!("{silent_remote},{}", server.ssl_remote().unwrap()));
    opts.tls = Some(TlsFiles {
        private_key: pki.client[0].clone(),
        certificate: pki.client[1].clone(),
        ca_certificate: pki.client[2].clone(),
    });
    opts.connect_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let client = Client::start(opts).unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("the second remote must be tried once the first times out");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
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
