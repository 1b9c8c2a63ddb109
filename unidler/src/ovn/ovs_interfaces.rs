//! The interfaces of this node that OVN uses, from the local Open_vSwitch database, followed
//! as ports are added and removed:
//! - VIFs: every `Interface` that OVN binds to a logical port (`external_ids:iface-id` set)
//!   and that is a system interface (a veth, a tap: type `""` or `system`);
//! - uplinks: the system interfaces of the bridges named in the `Open_vSwitch` row's
//!   `external_ids:ovn-bridge-mappings` (`physnet:br-ex,...`), where external traffic to
//!   NodePort and LoadBalancer VIPs arrives.
//!
//! Internal, tunnel and patch interfaces, and ports without `iface-id`, are left alone.

use std::collections::BTreeSet;

use ovsdb::{Client, ClientOptions, MonitorRequest, Remote, Replica, Row, Uuid, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::warn;

/// The names of the interfaces to attach to.
pub type InterfaceNames = BTreeSet<String>;

/// OVN's interfaces of this node, sent whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OvnInterfaces {
    /// The interfaces to attach to (VIFs, uplinks).
    pub names: InterfaceNames,
    /// The VIFs' logical ports (`external_ids:iface-id`), by interface name.
    pub iface_ids: std::collections::BTreeMap<String, String>,
}

/// Which of OVN's interfaces to follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Follow {
    /// The VIFs (pods, VMs).
    pub vifs: bool,
    /// The uplinks of the bridge mappings.
    pub uplinks: bool,
}

/// Whether an `Interface` row is an OVN VIF the datapath should be on.
pub fn is_vif(row: &Row) -> bool {
    let iface_id = row
        .get("external_ids")
        .map(Value::as_string_map)
        .is_some_and(|ids| ids.get("iface-id").is_some_and(|id| !id.is_empty()));
    iface_id && is_system(row)
}

/// Whether an `Interface` row is a system interface (not internal, a tunnel or a patch).
fn is_system(row: &Row) -> bool {
    row.get("type")
        .and_then(Value::atom)
        .and_then(|a| a.as_str())
        .is_none_or(|t| t.is_empty() || t == "system")
}

/// Follows the Open_vSwitch database at `remotes`, sending the names of the interfaces to
/// follow whenever they change, until the receiver goes away.
pub fn spawn(
    remotes: Vec<Remote>,
    follow: Follow,
    updates: mpsc::UnboundedSender<OvnInterfaces>,
) -> Result<(), ovsdb::Error> {
    let mut options = ClientOptions::new(remotes, "Open_vSwitch");
    options.leader_only = false;
    options.monitors = vec![
        MonitorRequest::table("Interface").columns(&["name", "type", "external_ids"]),
        MonitorRequest::table("Open_vSwitch").columns(&["external_ids"]),
        MonitorRequest::table("Bridge").columns(&["name", "ports"]),
        MonitorRequest::table("Port").columns(&["name", "interfaces"]),
    ];
    let client = Client::start(options)?;
    let mut changes = client.subscribe();
    tokio::spawn(async move {
        let mut last: Option<OvnInterfaces> = None;
        // A load published before the subscription is in the replica only.
        if client.loads() > 0 && !send_if_changed(&client, follow, &updates, &mut last) {
            return;
        }
        loop {
            // Every change set (a full load after each connection included) is applied to the
            // replica before it is announced: the replica says what the table holds now.
            match changes.recv().await {
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    warn!(
                        missed = n,
                        "VIF source fell behind; reading the whole table"
                    );
                }
                Err(RecvError::Closed) => return,
            }
            if !send_if_changed(&client, follow, &updates, &mut last) {
                return;
            }
        }
    });
    Ok(())
}

/// Sends the interfaces to follow if they differ from the `last` sent; false once the
/// receiver is gone.
fn send_if_changed(
    client: &Client,
    follow: Follow,
    updates: &mpsc::UnboundedSender<OvnInterfaces>,
    last: &mut Option<OvnInterfaces>,
) -> bool {
    let now = followed(&client.replica(), follow);
    if last.as_ref() == Some(&now) {
        return true;
    }
    let sent = updates.send(now.clone()).is_ok();
    *last = Some(now);
    sent
}

/// The interfaces to follow, as the replica has them now.
fn followed(replica: &Replica, follow: Follow) -> OvnInterfaces {
    let name = |row: &Row| {
        row.get("name")
            .and_then(Value::atom)
            .and_then(|a| a.as_str())
            .map(str::to_owned)
    };
    let mut names = InterfaceNames::new();
    let mut iface_ids = std::collections::BTreeMap::new();
    if follow.vifs {
        for (_, row) in replica.rows("Interface").filter(|(_, row)| is_vif(row)) {
            let Some(iface) = name(row) else { continue };
            if let Some(id) = row
                .get("external_ids")
                .and_then(|ids| ids.as_string_map().remove("iface-id"))
            {
                iface_ids.insert(iface.clone(), id);
            }
            names.insert(iface);
        }
    }
    if follow.uplinks {
        let mapped: BTreeSet<String> = replica
            .rows("Open_vSwitch")
            .filter_map(|(_, row)| {
                row.get("external_ids")?
                    .as_string_map()
                    .remove("ovn-bridge-mappings")
            })
            .flat_map(|mappings| {
                mappings
                    .split(',')
                    .filter_map(|m| Some(m.split_once(':')?.1.trim().to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let refs = |row: &Row, column: &str| -> Vec<Uuid> {
            row.get(column)
                .map(|v| {
                    v.atoms()
                        .iter()
                        .filter_map(|a| a.as_uuid().cloned())
                        .collect()
                })
                .unwrap_or_default()
        };
        for (_, bridge) in replica.rows("Bridge") {
            let Some(bridge_name) = name(bridge).filter(|n| mapped.contains(n)) else {
                continue;
            };
            for port in refs(bridge, "ports") {
                let Some(port) = replica.row("Port", &port) else {
                    continue;
                };
                for iface in refs(port, "interfaces") {
                    if let Some(iface) = replica.row("Interface", &iface)
                        && is_system(iface)
                        && let Some(iface_name) = name(iface)
                        && iface_name != bridge_name
                    {
                        names.insert(iface_name);
                    }
                }
            }
        }
    }
    OvnInterfaces { names, iface_ids }
}

#[cfg(test)]
mod tests {
    use ovsdb::Atom;

    use super::*;

    fn row(name: &str, kind: &str, iface_id: Option<&str>) -> Row {
        Row::from([
            ("name".to_owned(), Value::Atom(Atom::from(name))),
            ("type".to_owned(), Value::Atom(Atom::from(kind))),
            (
                "external_ids".to_owned(),
                Value::string_map(iface_id.map(|id| ("iface-id", id))),
            ),
        ])
    }

    #[test]
    fn only_system_interfaces_bound_to_a_logical_port_are_vifs() {
        assert!(is_vif(&row("veth1", "", Some("pod-a"))));
        assert!(is_vif(&row("tap1", "system", Some("vm-b"))));
        assert!(!is_vif(&row("veth2", "", None)), "no iface-id");
        assert!(!is_vif(&row("veth3", "", Some(""))), "empty iface-id");
        assert!(!is_vif(&row("br-int", "internal", Some("x"))));
        assert!(!is_vif(&row("ovn-abc-0", "geneve", Some("x"))));
        assert!(!is_vif(&row("patch-a", "patch", Some("x"))));
    }
}
