//! What the tests against real `ovsdb-server`s share: a Southbound server, client options,
//! rows, and waiting for changes.

#![allow(dead_code, unused_imports)]

pub use std::sync::Arc;
pub use std::time::{Duration, Instant};

pub use tokio::sync::broadcast;

pub use ovsdb::{
    Atom, ChangeSet, Client, ClientOptions, Condition, Error, ErrorKind, MonitorRequest, Mutation,
    OpResult, Operation, Remote, Row, TlsFiles, Uuid, Value,
};
pub use ovsdb_harness::{Cluster, Listen, OvsdbServer, Pki, TempDir, free_port};

pub const WAIT: Duration = Duration::from_secs(15);

/// A real, rich schema to test against: OVN's Southbound database, as Debian installs it.
pub const SB_SCHEMA: &str = "/usr/share/ovn/ovn-sb.ovsschema";
pub const SB_DB: &str = "OVN_Southbound";

/// A standalone Southbound server, started.
#[track_caller]
pub fn southbound(listen: Listen) -> OvsdbServer {
    OvsdbServer::standalone("sb", SB_SCHEMA, listen)
}

/// `ovn-sbctl` against a standalone server (`--no-leader-only`) or a cluster.
pub trait Sbctl {
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
pub fn options(remotes: &str) -> ClientOptions {
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
pub fn row(pairs: &[(&str, Value)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Inserts an Encap and a Chassis referring to it, as one transaction.
pub fn add_chassis_ops(name: &str, ip: &str) -> Vec<Operation> {
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
pub fn southbound_with_three_chassis() -> OvsdbServer {
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
pub fn names_in(client: &Client, key: &str) -> Vec<String> {
    let mut names: Vec<String> = client
        .replica()
        .rows(key)
        .filter_map(|(_, r)| r.get("name")?.atom()?.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Polls `check` until it holds or `WAIT` passes.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next change set that `wanted` accepts (those before it are skipped), at most `WAIT`
/// from now. Change sets are published after the replica has them: a test that saw the
/// replica change waits here for the announcement.
pub async fn next_change(
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
