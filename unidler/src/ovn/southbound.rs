//! The agent's connection to the OVN Southbound database: what it monitors there, and which
//! Chassis row is this node's (named by `--chassis`, else by `external_ids:system-id` of the
//! local Open_vSwitch database, as ovn-controller names it). One connection serves both the
//! event writer and the OVN VIP source.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use ovsdb::{
    Atom, Client, ClientOptions, Condition, ConsumerHandle, Error as DbError, MonitorRequest,
    Operation, Remote, Replica, TlsFiles, Uuid, Value,
};
use tokio::sync::{mpsc, watch};

use crate::{ovn::vips::PortScopes, vip::VipUpdate};
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
    /// How many load balancers the OVN VIP source knows, if it runs.
    load_balancers: Option<Arc<AtomicUsize>>,
    /// The local logical ports' scopes, from the OVN VIP source.
    port_scopes: Option<watch::Receiver<Arc<PortScopes>>>,
}

impl Southbound {
    /// Resolves our chassis name and starts the client (connecting in the background),
    /// monitoring what the writer needs and, with `vips`, the Load_Balancer table for the OVN
    /// VIP source, which sends its updates there.
    /// Without `--chassis`, the name is `system-id` from the local Open_vSwitch database; if
    /// that does not answer within a second or two, the hostname stands in while a
    /// background task keeps asking (the database may simply not be up yet).
    pub async fn connect(
        config: &SouthboundConfig,
        vips: Option<mpsc::UnboundedSender<VipUpdate>>,
    ) -> Result<Self, DbError> {
        let mut options = ClientOptions::new(config.remotes.clone(), DATABASE);
        options.tls = config.tls.clone();
        options.rpc.max_message_bytes = config.max_message_bytes;
        let (source, load_balancers, port_scopes) = match vips {
            Some(updates) => {
                let handles = crate::ovn::vips::LoadBalancerSource::start(updates);
                (
                    Some(handles.consumer),
                    Some(handles.load_balancers),
                    Some(handles.port_scopes),
                )
            }
            None => (None, None, None),
        };
        let conditional = source.is_some();
        options.monitors = monitors(source);
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
        let southbound = Self {
            client,
            chassis,
            load_balancers,
            port_scopes,
        };
        if conditional {
            tokio::spawn(follow_conditions(southbound.clone()));
        }
        Ok(southbound)
    }

    /// This node's logical ports' scopes, from the OVN VIP source (None if it does not run).
    pub fn port_scopes(&self) -> Option<watch::Receiver<Arc<PortScopes>>> {
        self.port_scopes.clone()
    }

    /// How many load balancers the OVN VIP source knows (None if it does not run).
    pub fn load_balancers(&self) -> Option<usize> {
        self.load_balancers
            .as_ref()
            .map(|n| n.load(Ordering::Relaxed))
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

/// What the agent monitors: the Chassis names (ours may be learned late, and a condition
/// on it could not follow; a name per node is little) and the Controller_Event table for the
/// rows we write; with a VIP source, the Load_Balancer columns it reads of every load
/// balancer (given to it, not replicated: one that does not report may keep a VIP active),
/// `SB_Global`'s options (the global `controller_event`), and what
/// [`crate::ovn::vips::REPLICATED`] lists.
pub fn monitors(vip_source: Option<ConsumerHandle>) -> Vec<MonitorRequest> {
    let mut monitors = vec![
        MonitorRequest::table("Chassis").columns(&["name"]),
        MonitorRequest::table(CONTROLLER_EVENT),
    ];
    if let Some(source) = vip_source {
        use crate::ovn::vips::{COLUMNS, OPTIONAL_COLUMNS, REPLICATED, TABLE};
        // Every load balancer: one without `options:event` that has backends for a VIP
        // keeps that VIP active where it applies.
        monitors.push(
            MonitorRequest::table(TABLE)
                .columns(&COLUMNS)
                .optional_columns(&OPTIONAL_COLUMNS)
                .consumed_by(source),
        );
        monitors.push(MonitorRequest::table(SB_GLOBAL).columns(&["options"]));
        for (table, columns) in REPLICATED {
            let mut monitor = MonitorRequest::table(table).columns(columns);
            if table == PORT_BINDING {
                // Ours only: none until our Chassis row is known (follow_conditions).
                monitor = monitor.matching(Condition::eq("logical_port", ""));
            }
            monitors.push(monitor);
        }
    }
    monitors
}

const PORT_BINDING: &str = "Port_Binding";
const SB_GLOBAL: &str = "SB_Global";

/// Whether `SB_Global`'s `options:controller_event` is true (as northd reads it, in any
/// case), which makes every load balancer report.
pub fn global_event(replica: &Replica) -> bool {
    replica.rows(SB_GLOBAL).any(|(_, r)| {
        r.get("options")
            .map(Value::as_string_map)
            .and_then(|o| o.get("controller_event").cloned())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    })
}

/// Keeps the Port_Binding monitor's conditions in step with the replica ([`narrow_ports`]),
/// on every change and every second (a failed change is tried again).
async fn follow_conditions(southbound: Southbound) {
    let mut changes = southbound.client.subscribe();
    loop {
        if southbound.client.is_connected() {
            narrow_ports(&southbound).await;
        }
        tokio::select! {
            change = changes.recv() => {
                if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Narrows the Port_Binding monitor to the ports bound to our Chassis row (VIFs and gateway
/// ports of this node) once that row is known, and again whenever it changes.
async fn narrow_ports(southbound: &Southbound) {
    let Some(chassis) = southbound.chassis_uuid() else {
        return;
    };
    let conditions = vec![Condition::eq("chassis", Value::from(chassis.clone()))];
    match southbound
        .client
        .set_conditions(PORT_BINDING, conditions)
        .await
    {
        Ok(true) => info!(%chassis, "following the logical ports bound to this chassis"),
        Ok(false) => {}
        Err(e) => warn!("narrowing the Port_Binding monitor failed (tried again): {e}"),
    }
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
