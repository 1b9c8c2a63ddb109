//! The client's operations against a real `ovsdb-server` with the OVN Southbound schema:
//! every operation and the errors the server returns.

mod common;

use common::*;

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
