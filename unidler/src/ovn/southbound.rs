//! The agent's connection to the OVN Southbound database: what it monitors there, and which
//! Chassis row is this node's (named by `--chassis`, else by `external_ids:system-id` of the
//! local Open_vSwitch database, as ovn-controller names it). One connection serves both the
//! event writer and the OVN VIP source, which brings its own monitors ([`crate::ovn::vips`]).

use std::time::Duration;

use ovsdb::{
    Atom, Client, ClientOptions, Error as DbError, MonitorRequest, Operation, Remote, TlsFiles,
    Uuid, Value,
};
use tokio::sync::watch;
use tracing::{info, warn};

/// The Southbound database's name.
pub const DATABASE: &str = "OVN_Southbound";
/// The table the writer writes and the CMS consumes.
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
    /// Largest message accepted from the database (the first monitor reply carries every
    /// load balancer).
    pub max_message_bytes: usize,
    /// Talk only to the leader of a clustered database (true), or to any member (false: the
    /// members share the monitors' load; writes are forwarded to the leader).
    pub leader_only: bool,
}

/// The Southbound client and our chassis name. Cheap to clone.
#[derive(Clone)]
pub struct Southbound {
    client: Client,
    /// Our Chassis row's name: `--chassis`, else `system-id` once the local Open_vSwitch
    /// database has answered (the hostname until then).
    chassis: watch::Receiver<String>,
}

impl Southbound {
    /// Resolves our chassis name and starts the client (connecting in the background),
    /// monitoring what the writer needs (Chassis names, Controller_Event) and `monitors`,
    /// those of the connection's other users.
    /// Without `--chassis`, the name is `system-id` from the local Open_vSwitch database; if
    /// that does not answer within a second or two, the hostname stands in while a
    /// background task keeps asking (the database may simply not be up yet).
    pub async fn connect(
        config: &SouthboundConfig,
        monitors: Vec<MonitorRequest>,
    ) -> Result<Self, DbError> {
        let mut options = ClientOptions::new(config.remotes.clone(), DATABASE);
        options.tls = config.tls.clone();
        options.rpc.max_message_bytes = config.max_message_bytes;
        options.monitors = vec![
            // Every Chassis name: ours may be learned late, and a condition on it could not
            // follow; a name per node is little.
            MonitorRequest::table("Chassis").columns(&["name"]),
            MonitorRequest::table(CONTROLLER_EVENT),
        ];
        options.monitors.extend(monitors);
        options.leader_only = config.leader_only;
        let client = Client::start(options)?;
        let chassis = match &config.chassis {
            Some(name) => watch::channel(name.clone()).1,
            None => match system_id(&config.ovs_db).await {
                Some(id) => watch::channel(id).1,
                None => {
                    let host = hostname();
                    warn!(
                        ovs_db = %config.ovs_db,
                        %host,
                        "no system-id from the local Open_vSwitch database yet: using the \
                         hostname as chassis name until it answers"
                    );
                    let (tx, rx) = watch::channel(host);
                    tokio::spawn(follow_system_id(config.ovs_db.clone(), tx));
                    rx
                }
            },
        };
        Ok(Self { client, chassis })
    }

    /// The database client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Our Chassis row's name (as known now).
    pub fn chassis_name(&self) -> String {
        self.chassis.borrow().clone()
    }

    /// Our Chassis row, once the replica has it.
    pub fn chassis_uuid(&self) -> Option<Uuid> {
        let name = self.chassis.borrow();
        let replica = self.client.replica();
        replica
            .rows("Chassis")
            .find(|(_, row)| {
                row.get("name").and_then(Value::atom).and_then(Atom::as_str) == Some(name.as_str())
            })
            .map(|(uuid, _)| uuid.clone())
    }
}

/// Asks the local Open_vSwitch database for `system-id` every few seconds until it answers,
/// then names our chassis after it.
async fn follow_system_id(ovs_db: String, chassis: watch::Sender<String>) {
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if chassis.is_closed() {
            return;
        }
        if let Some(id) = system_id(&ovs_db).await {
            info!(chassis = %id, "chassis name from the local Open_vSwitch database's system-id");
            chassis.send_replace(id);
            return;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// `external_ids:system-id` of the local Open_vSwitch database, the name ovn-controller gives
/// this node's chassis, if the database answers within a second or two.
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
