//! OVN's databases on real `ovsdb-server`s (the generic servers are `ovsdb-harness`'s): the
//! Southbound database standalone or as a RAFT cluster, its Controller_Event rows as
//! `ovn-sbctl` shows them, and OVN's central pieces (Northbound, Southbound, `ovn-northd`).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

pub use ovsdb_harness::{Cluster, Listen, OvsdbServer, Pki, TempDir, free_port, run};

/// The OVN Southbound schema Debian installs.
pub const SB_SCHEMA: &str = "/usr/share/ovn/ovn-sb.ovsschema";
/// Its database name.
pub const SB_DB: &str = "OVN_Southbound";
/// The name of the tests' node in the Southbound Chassis table.
pub const CHASSIS: &str = "chassis-1";

/// A Southbound database, standalone or clustered: `ovn-sbctl` and the Controller_Event rows.
pub trait Southbound {
    /// Runs `ovn-sbctl` against it; returns stdout.
    fn sbctl(&self, args: &[&str]) -> String;

    /// The UUID of the Chassis row named `name`.
    #[track_caller]
    fn chassis_uuid(&self, name: &str) -> String {
        let out = self.sbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Chassis",
            &format!("name={name}"),
        ]);
        out.trim().to_owned()
    }

    /// The Controller_Event rows.
    #[track_caller]
    fn event_rows(&self) -> Vec<EventRow> {
        parse_event_rows(&self.sbctl(&["--format=json", EVENT_COLUMNS, "list", "Controller_Event"]))
    }
}

impl Southbound for OvsdbServer {
    #[track_caller]
    fn sbctl(&self, args: &[&str]) -> String {
        let mut all = vec!["--no-leader-only"];
        all.extend_from_slice(args);
        self.ctl("ovn-sbctl", &all)
    }
}

impl Southbound for Cluster {
    #[track_caller]
    fn sbctl(&self, args: &[&str]) -> String {
        self.ctl("ovn-sbctl", args)
    }
}

/// A node's local Open_vSwitch database without ovs-vswitchd (what the agent reads to follow
/// OVN's interfaces): `br-int`, and `br-ex` mapped as `physnet:br-ex` in
/// `external_ids:ovn-bridge-mappings`.
pub struct LocalOvs {
    /// The server.
    pub server: OvsdbServer,
}

impl LocalOvs {
    /// Starts the server and sets up both bridges.
    #[track_caller]
    pub fn start() -> Self {
        let ovs = Self {
            server: OvsdbServer::standalone(
                "ovs",
                "/usr/share/openvswitch/vswitch.ovsschema",
                Listen::default(),
            ),
        };
        ovs.vsctl(&["init"]);
        ovs.vsctl(&["add-br", "br-int"]);
        ovs.vsctl(&["add-br", "br-ex"]);
        ovs.vsctl(&[
            "set",
            "Open_vSwitch",
            ".",
            "external_ids:ovn-bridge-mappings=physnet:br-ex",
        ]);
        ovs
    }

    /// Runs `ovs-vsctl --no-wait` (nothing to wait for without ovs-vswitchd); returns stdout.
    #[track_caller]
    pub fn vsctl(&self, args: &[&str]) -> String {
        let mut all = vec!["--no-wait"];
        all.extend_from_slice(args);
        self.server.ctl("ovs-vsctl", &all)
    }

    /// Its `unix:` remote.
    pub fn remote(&self) -> String {
        self.server.unix_remote()
    }
}

/// A standalone OVN Southbound server on a unix socket (plus `listen`), started.
#[track_caller]
pub fn southbound(listen: Listen) -> OvsdbServer {
    OvsdbServer::standalone("sb", SB_SCHEMA, listen)
}

/// A standalone Southbound server with a Chassis row named [`CHASSIS`] (the node's chassis in
/// the tests), as ovn-controller would have registered it.
#[track_caller]
pub fn southbound_with_chassis() -> OvsdbServer {
    let sb = southbound(Listen::default());
    sb.sbctl(&["chassis-add", CHASSIS, "geneve", "127.0.0.1"]);
    sb
}

/// A Southbound RAFT cluster of `n` members on loopback, with a leader.
#[track_caller]
pub fn southbound_cluster(n: usize) -> Cluster {
    Cluster::start(n, SB_SCHEMA, SB_DB)
}

/// One `Controller_Event` row as `ovn-sbctl --format=json list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    /// Row UUID.
    pub uuid: String,
    /// `event_type`.
    pub event_type: String,
    /// `event_info`, sorted.
    pub event_info: std::collections::BTreeMap<String, String>,
    /// UUID of the referenced Chassis, if any.
    pub chassis: Option<String>,
    /// `seq_num`.
    pub seq_num: i64,
}

/// Parses `ovn-sbctl --format=json --columns=_uuid,event_type,event_info,chassis,seq_num
/// list Controller_Event` output.
pub fn parse_event_rows(json: &str) -> Vec<EventRow> {
    let doc: serde_json::Value = serde_json::from_str(json).expect("ovn-sbctl JSON");
    let uuid_of = |v: &serde_json::Value| v.get(1).and_then(|u| u.as_str()).map(str::to_owned);
    doc["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|r| EventRow {
            uuid: uuid_of(&r[0]).expect("uuid"),
            event_type: r[1].as_str().expect("event_type").to_owned(),
            event_info: r[2][1]
                .as_array()
                .expect("map")
                .iter()
                .map(|p| {
                    (
                        p[0].as_str().unwrap().to_owned(),
                        p[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            chassis: if r[3][0] == "uuid" {
                uuid_of(&r[3])
            } else {
                None
            },
            seq_num: r[4].as_i64().expect("seq_num"),
        })
        .collect()
}

/// The `--columns` argument matching [`parse_event_rows`].
pub const EVENT_COLUMNS: &str = "--columns=_uuid,event_type,event_info,chassis,seq_num";

/// The OVN Northbound schema Debian installs.
pub const NB_SCHEMA: &str = "/usr/share/ovn/ovn-nb.ovsschema";

/// OVN's central pieces: Northbound and Southbound `ovsdb-server`s and a real `ovn-northd`
/// translating one into the other.
pub struct OvnCentral {
    /// Northbound server.
    pub nb: OvsdbServer,
    /// Southbound server.
    pub sb: OvsdbServer,
    northd: Child,
    log: PathBuf,
}

impl OvnCentral {
    /// Starts NB, SB and ovn-northd; initialises both databases.
    #[track_caller]
    pub fn start() -> Self {
        let nb = OvsdbServer::standalone("nb", NB_SCHEMA, Listen::default());
        let sb = southbound(Listen::default());
        let log = sb.dir.join("northd.log");
        let northd = ovsdb_harness::die_with_parent(&mut Command::new("ovn-northd"))
            .arg("--no-chdir")
            .arg(format!("--log-file={}", log.display()))
            .arg(format!("--unixctl={}", sb.dir.join("northd.ctl").display()))
            .arg(format!("--ovnnb-db={}", nb.unix_remote()))
            .arg(format!("--ovnsb-db={}", sb.unix_remote()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ovn-northd runs");
        let central = OvnCentral {
            nb,
            sb,
            northd,
            log,
        };
        central.nbctl(&["init"]);
        central
    }

    /// Runs `ovn-nbctl` (waiting for ovn-northd to catch up with `--wait=sb`).
    #[track_caller]
    pub fn nbctl(&self, args: &[&str]) -> String {
        run(Command::new("ovn-nbctl")
            .arg(format!("--db={}", self.nb.unix_remote()))
            .arg("--timeout=20")
            .args(args))
    }

    /// OVN central with chassis [`CHASSIS`], a logical switch `sw0` and on it load balancer
    /// `lb0` with the TCP VIP `vip` (`IP:PORT`), no backends and `options:event=true`, as
    /// ovn-kubernetes leaves an idled service; in the Southbound database once this returns.
    #[track_caller]
    pub fn with_idle_load_balancer(vip: &str) -> Self {
        let ovn = Self::start();
        ovn.sb
            .sbctl(&["chassis-add", CHASSIS, "geneve", "127.0.0.1"]);
        ovn.nbctl(&["ls-add", "sw0"]);
        ovn.nbctl(&["lb-add", "lb0", vip, "", "tcp"]);
        ovn.nbctl(&["set", "load_balancer", "lb0", "options:event=true"]);
        ovn.nbctl(&["--wait=sb", "ls-lb-add", "sw0", "lb0"]);
        ovn
    }

    /// Sets the backends of `lb0`'s VIP `vip` (`""` for none: idle), waiting for the
    /// Southbound database.
    #[track_caller]
    pub fn set_backends(&self, vip: &str, backends: &str) {
        self.nbctl(&[
            "--wait=sb",
            "--may-exist",
            "lb-add",
            "lb0",
            vip,
            backends,
            "tcp",
        ]);
    }

    /// ovn-northd's log so far.
    pub fn northd_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OvnCentral {
    fn drop(&mut self) {
        let _ = self.northd.kill();
        let _ = self.northd.wait();
    }
}
