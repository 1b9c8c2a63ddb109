//! OVN's VIFs on this node, from the local Open_vSwitch database: every `Interface` that
//! OVN binds to a logical port (`external_ids:iface-id` set) and that is a system interface
//! (a veth, a tap: type `""` or `system`), followed as ports are added and removed. Internal,
//! tunnel and patch interfaces, and ports without `iface-id`, are left alone.

use std::collections::BTreeSet;

use ovsdb::{Client, ClientOptions, MonitorRequest, Remote, Row, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::warn;

/// The names of the VIFs to attach to, sent whole on every change.
pub type VifNames = BTreeSet<String>;

/// Whether an `Interface` row is an OVN VIF the datapath should be on.
pub fn is_vif(row: &Row) -> bool {
    let iface_id = row
        .get("external_ids")
        .map(Value::as_string_map)
        .is_some_and(|ids| ids.get("iface-id").is_some_and(|id| !id.is_empty()));
    let system = row
        .get("type")
        .and_then(Value::atom)
        .and_then(|a| a.as_str())
        .is_none_or(|t| t.is_empty() || t == "system");
    iface_id && system
}

/// Follows the `Interface` table of the Open_vSwitch database at `remotes`, sending the VIF
/// names whenever they change, until the receiver goes away.
pub fn spawn(
    remotes: Vec<Remote>,
    updates: mpsc::UnboundedSender<VifNames>,
) -> Result<(), ovsdb::Error> {
    let mut options = ClientOptions::new(remotes, "Open_vSwitch");
    options.leader_only = false;
    options.monitors =
        vec![MonitorRequest::table("Interface").columns(&["name", "type", "external_ids"])];
    let client = Client::start(options)?;
    tokio::spawn(async move {
        let mut changes = client.subscribe();
        let mut last: Option<VifNames> = None;
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
            let now = vif_names(&client);
            if last.as_ref() != Some(&now) {
                if updates.send(now.clone()).is_err() {
                    return;
                }
                last = Some(now);
            }
        }
    });
    Ok(())
}

fn vif_names(client: &Client) -> VifNames {
    client
        .replica()
        .rows("Interface")
        .filter(|(_, row)| is_vif(row))
        .filter_map(|(_, row)| {
            row.get("name")
                .and_then(Value::atom)
                .and_then(|a| a.as_str())
                .map(str::to_owned)
        })
        .collect()
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
