//! The agent's connection to the OVN Southbound database: what it monitors there, and which
//! Chassis row is this node's (named by `--chassis`, else by `external_ids:system-id` of the
//! local Open_vSwitch database, as ovn-controller names it). One connection serves both the
//! event sink and the OVN VIP source.

use std::time::Duration;

use ovsdb::{
    Atom, Client, ClientOptions, Condition, Error as DbError, MonitorRequest, Operation, Remote,
    TlsFiles, Uuid, Value,
};
use tracing::debug;

/// The Southbound database's name.
pub const DATABASE: &str = "OVN_Southbound";
/// The table the sink writes and the CMS consumes.
pub const CONTROLLER_EVENT: &str = "Controller_Event";

/// How to reach the Southbound database and who we are there.
#[derive(Clone, Debug)]
pub struct SouthboundConfig {
    /// Cluster members (the client follows the leader).
    pub remotes: Vec<Remote>,
    /// Key, certificate and CA for `ssl:` remotes.
    pub tls: Option<TlsFiles>,
    /// Our Chassis row's name; None: ask the local Open_vSwitch database.
    pub chassis: Option<String>,
    /// The local Open_vSwitch database, asked for `system-id`.
    pub ovs_db: String,
}

/// The Southbound client and our chassis name. Cheap to clone.
#[derive(Clone)]
pub struct Southbound {
    client: Client,
    chassis: String,
}

impl Southbound {
    /// Resolves our chassis name and starts the client (connecting in the background),
    /// monitoring what the sink needs and, with `with_vips`, what the OVN VIP source reads.
    pub async fn connect(config: &SouthboundConfig, with_vips: bool) -> Result<Self, DbError> {
        let chassis = match &config.chassis {
            Some(name) => name.clone(),
            None => default_chassis_name(&config.ovs_db).await,
        };
        let mut options = ClientOptions::new(config.remotes.clone(), DATABASE);
        options.tls = config.tls.clone();
        options.monitors = monitors(&chassis, with_vips);
        let client = Client::start(options)?;
        Ok(Self { client, chassis })
    }

    /// The database client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Our Chassis row's name.
    pub fn chassis_name(&self) -> &str {
        &self.chassis
    }

    /// Our Chassis row, once the replica has it.
    pub fn chassis_uuid(&self) -> Option<Uuid> {
        let replica = self.client.replica();
        replica
            .rows("Chassis")
            .find(|(_, row)| {
                row.get("name").and_then(Value::atom).and_then(Atom::as_str)
                    == Some(self.chassis.as_str())
            })
            .map(|(uuid, _)| uuid.clone())
    }
}

/// What the agent monitors: our Chassis row (by name) and the Controller_Event table for the
/// sink; with `with_vips`, the Load_Balancer columns the OVN VIP source reads and
/// `SB_Global:options`.
pub fn monitors(chassis: &str, with_vips: bool) -> Vec<MonitorRequest> {
    let mut monitors = vec![
        MonitorRequest::table("Chassis")
            .columns(&["name"])
            .matching(Condition::eq("name", chassis)),
        MonitorRequest::table(CONTROLLER_EVENT),
    ];
    if with_vips {
        monitors.extend([
            MonitorRequest::table("Load_Balancer").columns(&[
                "vips",
                "protocol",
                "options",
                "external_ids",
            ]),
            MonitorRequest::table("SB_Global").columns(&["options"]),
        ]);
    }
    monitors
}

/// The chassis name ovn-controller uses on this node: `external_ids:system-id` of the local
/// Open_vSwitch database when it answers within a second or two, else the hostname.
pub async fn default_chassis_name(ovs_db: &str) -> String {
    match system_id(ovs_db).await {
        Some(id) => id,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            debug!(%host, "no system-id from {ovs_db}; using the hostname as chassis name");
            host
        }
    }
}

async fn system_id(ovs_db: &str) -> Option<String> {
    let mut options = ClientOptions::new(Remote::parse_list(ovs_db).ok()?, "Open_vSwitch");
    options.leader_only = false;
    let client = Client::start(options).ok()?;
    client.wait_connected(Duration::from_secs(2)).await.ok()?;
    let results = client
        .transact(&[Operation::Select {
            table: "Open_vSwitch".into(),
            conditions: vec![],
            columns: Some(vec!["external_ids".into()]),
        }])
        .await
        .ok()?;
    results
        .first()?
        .rows()
        .first()?
        .get("external_ids")?
        .as_string_map()
        .remove("system-id")
}
