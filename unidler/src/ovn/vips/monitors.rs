//! What the OVN VIP source monitors on the Southbound connection: every load balancer (given
//! to the source, not replicated), `SB_Global`'s options, and, replicated, this node's
//! logical ports with their datapaths and datapath groups. The Port_Binding monitor is
//! narrowed to the ports bound to our Chassis row once that row is known.

use std::time::Duration;

use ovsdb::{Condition, ConsumerHandle, MonitorRequest, Replica, Value};
use tracing::{info, warn};

use crate::ovn::southbound::Southbound;

/// The Southbound table the source follows.
pub const TABLE: &str = "Load_Balancer";
/// Its columns the source reads (of `options`, only `event` and `reject` are kept). Not
/// `external_ids`: its `lb_id`, the name events give, is read for the few load balancers that
/// are hit, when they are ([`crate::ovn::lb_names`]); with 100,000s of load balancers the
/// column is a fifth of what the server composes at every agent's start.
pub const COLUMNS: [&str; 5] = ["vips", "protocol", "datapaths", "datapath_group", "options"];

/// Its columns the source reads where the schema has them: from OVN 23.09, northd puts a
/// load balancer's logical switches and routers in these two groups (and leaves
/// `datapath_group` empty) once every chassis can read them.
pub const OPTIONAL_COLUMNS: [&str; 2] = ["ls_datapath_group", "lr_datapath_group"];

/// The columns naming a load balancer's datapath group, in the record's order.
pub(super) const GROUP_COLUMNS: [&str; 3] =
    ["datapath_group", "ls_datapath_group", "lr_datapath_group"];

pub(super) const PORT_BINDING: &str = "Port_Binding";
pub(super) const SB_GLOBAL: &str = "SB_Global";

/// The tables the source reads besides `Load_Balancer`, replicated by the same client, for
/// this node's logical datapaths: `Port_Binding` (only ours), `Datapath_Binding` and
/// `Logical_DP_Group`.
pub(super) const REPLICATED: [(&str, &[&str]); 3] = [
    (
        PORT_BINDING,
        &["logical_port", "datapath", "chassis", "type"],
    ),
    ("Datapath_Binding", &["tunnel_key"]),
    ("Logical_DP_Group", &["datapaths"]),
];

/// The monitors of a source whose Load_Balancer rows go to `consumer`.
pub(super) fn requests(consumer: ConsumerHandle) -> Vec<MonitorRequest> {
    // Every load balancer: one without `options:event` that has backends for a VIP keeps
    // that VIP active where it applies.
    let mut monitors = vec![
        MonitorRequest::table(TABLE)
            .columns(&COLUMNS)
            .optional_columns(&OPTIONAL_COLUMNS)
            .consumed_by(consumer),
        MonitorRequest::table(SB_GLOBAL).columns(&["options"]),
    ];
    for (table, columns) in REPLICATED {
        let mut monitor = MonitorRequest::table(table).columns(columns);
        if table == PORT_BINDING {
            // Ours only: none until our Chassis row is known (follow_local_ports).
            monitor = monitor.matching(Condition::eq("logical_port", ""));
        }
        monitors.push(monitor);
    }
    monitors
}

/// Whether `SB_Global`'s `options:controller_event` is true (as northd reads it, in any
/// case), which makes every load balancer report.
pub(super) fn global_event(replica: &Replica) -> bool {
    replica.rows(SB_GLOBAL).any(|(_, r)| {
        r.get("options")
            .map(Value::as_string_map)
            .and_then(|o| o.get("controller_event").cloned())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    })
}

/// Keeps the Port_Binding monitor narrowed to the ports bound to our Chassis row (VIFs and
/// gateway ports of this node), on every change and every second (a failed change is tried
/// again), until the client stops.
pub(super) async fn follow_local_ports(southbound: Southbound) {
    let mut changes = southbound.client().subscribe();
    loop {
        if southbound.client().is_connected() {
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

/// Narrows the Port_Binding monitor to the ports bound to our Chassis row, once that row is
/// known (and again whenever it changes).
async fn narrow_ports(southbound: &Southbound) {
    let Some(chassis) = southbound.chassis_uuid() else {
        return;
    };
    let conditions = vec![Condition::eq("chassis", Value::from(chassis.clone()))];
    match southbound
        .client()
        .set_conditions(PORT_BINDING, conditions)
        .await
    {
        Ok(true) => info!(%chassis, "following the logical ports bound to this chassis"),
        Ok(false) => {}
        Err(e) => warn!("narrowing the Port_Binding monitor failed (tried again): {e}"),
    }
}
