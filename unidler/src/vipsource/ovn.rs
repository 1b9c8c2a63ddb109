//! VIPs from the OVN Southbound `Load_Balancer` table: every VIP OVN itself would report an
//! empty-backend event for, kept incrementally per load balancer.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    net::SocketAddr,
    sync::Arc,
};

use ovsdb::{ChangeSet, Client, Row, RowChange, Uuid, Value};
use tokio::sync::mpsc;
use tracing::warn;

use crate::vip::{DesiredVip, Protocol, Vip, VipUpdate};

/// What the agent needs of one Southbound Load_Balancer row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancerVips {
    /// Whether OVN reports this load balancer's empty VIPs: it has `options:event=true` or
    /// the global `options:controller_event=true` is set, and not `options:reject=true`
    /// (reject wins: the packet goes on to OVN, which rejects it).
    pub reports: bool,
    /// Its VIPs that matter: all of them if it reports; otherwise only those with backends,
    /// which make a VIP it shares with a reporting load balancer active.
    pub vips: Vec<DesiredVip>,
}

/// The VIPs of one Southbound Load_Balancer row. A VIP no reporting load balancer has stays
/// out of the map, so the datapath passes its packets. VIPs without a port (and templates,
/// `^VAR`) cannot be keyed by the datapath: they are left out, with a warning.
pub fn load_balancer_vips(uuid: &Uuid, row: &Row, global_event: bool) -> LoadBalancerVips {
    let map = |c: &str| row.get(c).map(Value::as_string_map).unwrap_or_default();
    let options = map("options");
    let flag = |k: &str| options.get(k).is_some_and(|v| v == "true");
    let reports = !flag("reject") && (flag("event") || global_event);
    let protocol = row
        .get("protocol")
        .and_then(Value::atom)
        .and_then(|a| a.as_str())
        .and_then(|p| p.parse::<Protocol>().ok())
        .unwrap_or(Protocol::Tcp);
    let load_balancer: Arc<str> = map("external_ids")
        .remove("lb_id")
        .unwrap_or_else(|| uuid.to_string())
        .into();
    let Some(vips) = row.get("vips") else {
        return LoadBalancerVips::default();
    };
    let mut unwatchable = Vec::new();
    let vips = vips
        .pairs()
        .iter()
        .filter_map(|(vip, backends)| {
            let (vip, backends) = (vip.as_str()?, backends.as_str()?);
            let backends = backends.split(',').filter(|b| !b.trim().is_empty()).count() as u32;
            if !reports && backends == 0 {
                return None;
            }
            let Ok(addr) = vip.parse::<SocketAddr>() else {
                unwatchable.push(vip);
                return None;
            };
            Some(DesiredVip {
                vip: Vip::new(addr, protocol),
                backends,
                load_balancer: Some(load_balancer.clone()),
            })
        })
        .collect();
    if reports && !unwatchable.is_empty() {
        warn!(
            %load_balancer,
            vips = ?unwatchable,
            "VIPs without a port (or templates) are not watched: OVN, not unidler, reports them"
        );
    }
    LoadBalancerVips { reports, vips }
}

/// The OVN source's state: every load balancer's VIPs, and which load balancers share a VIP.
/// Sized for 100,000s of VIPs: a load balancer's id is allocated once and shared.
#[derive(Default)]
struct OvnVips {
    global_event: bool,
    /// Southbound Load_Balancer UUID → its VIPs (load balancers with none left out).
    by_lb: HashMap<Arc<str>, LoadBalancerVips>,
    /// The load balancers having each VIP.
    lbs_of: HashMap<Vip, LbSet>,
}

impl OvnVips {
    /// Rebuilds everything from the replica.
    fn rebuild(&mut self, client: &Client) -> Vec<DesiredVip> {
        let replica = client.replica();
        self.global_event = global_event(replica.rows("SB_Global").map(|(_, r)| r));
        self.by_lb.clear();
        self.lbs_of.clear();
        for (uuid, row) in replica.rows("Load_Balancer") {
            let lb_vips = load_balancer_vips(uuid, row, self.global_event);
            if lb_vips.vips.is_empty() {
                continue;
            }
            let lb: Arc<str> = uuid.0.as_str().into();
            for d in &lb_vips.vips {
                self.add_lb_of(d.vip, &lb);
            }
            self.by_lb.insert(lb, lb_vips);
        }
        self.by_lb.shrink_to_fit();
        self.lbs_of.shrink_to_fit();
        self.lbs_of
            .keys()
            .filter_map(|v| self.combined(v))
            .collect()
    }

    fn add_lb_of(&mut self, vip: Vip, lb: &Arc<str>) {
        match self.lbs_of.entry(vip) {
            Entry::Vacant(e) => {
                e.insert(LbSet::One(lb.clone()));
            }
            Entry::Occupied(mut e) => e.get_mut().insert(lb),
        }
    }

    /// Applies one load balancer's new row (None: deleted); returns the changed VIPs.
    fn update_lb(&mut self, uuid: &Uuid, row: Option<&Row>) -> (Vec<DesiredVip>, Vec<Vip>) {
        let new = row.map_or_else(LoadBalancerVips::default, |r| {
            load_balancer_vips(uuid, r, self.global_event)
        });
        let (lb, old) = match self.by_lb.remove_entry(uuid.0.as_str()) {
            Some((lb, old)) => (lb, old.vips),
            None => (uuid.0.as_str().into(), Vec::new()),
        };
        let mut affected: BTreeSet<Vip> = old.iter().map(|d| d.vip).collect();
        for d in &old {
            if let Some(lbs) = self.lbs_of.get_mut(&d.vip)
                && lbs.remove(&lb)
            {
                self.lbs_of.remove(&d.vip);
            }
        }
        for d in &new.vips {
            affected.insert(d.vip);
            self.add_lb_of(d.vip, &lb);
        }
        if !new.vips.is_empty() {
            self.by_lb.insert(lb, new);
        }
        let mut upsert = Vec::new();
        let mut remove = Vec::new();
        for vip in affected {
            match self.combined(&vip) {
                Some(d) => upsert.push(d),
                None => remove.push(vip),
            }
        }
        (upsert, remove)
    }

    /// One VIP over every load balancer that has it: in the map only if a reporting one has
    /// it; active if any has backends (reporting or not: OVN forwards to them); the first (by
    /// UUID) idle reporting load balancer is the one events name.
    fn combined(&self, vip: &Vip) -> Option<DesiredVip> {
        let lbs = self.lbs_of.get(vip)?;
        let entries: Vec<(bool, &DesiredVip)> = lbs
            .iter()
            .filter_map(|lb| {
                let lb = self.by_lb.get(lb)?;
                Some((lb.reports, lb.vips.iter().find(|d| d.vip == *vip)?))
            })
            .collect();
        let reporting = || entries.iter().filter(|(reports, _)| *reports).map(|e| e.1);
        let named = reporting()
            .find(|d| d.backends == 0)
            .or_else(|| reporting().next())?;
        let backends = entries.iter().map(|(_, d)| d.backends).max()?;
        Some(DesiredVip {
            vip: *vip,
            backends,
            load_balancer: named.load_balancer.clone(),
        })
    }
}

/// The load balancers (Southbound UUIDs) having one VIP, sorted: almost always exactly one,
/// which is kept without an allocation of its own.
#[derive(Debug)]
enum LbSet {
    One(Arc<str>),
    Many(Vec<Arc<str>>),
}

impl LbSet {
    fn insert(&mut self, lb: &Arc<str>) {
        match self {
            LbSet::One(only) if only == lb => {}
            LbSet::One(only) => {
                let mut all = vec![only.clone(), lb.clone()];
                all.sort();
                *self = LbSet::Many(all);
            }
            LbSet::Many(all) => {
                if let Err(at) = all.binary_search(lb) {
                    all.insert(at, lb.clone());
                }
            }
        }
    }

    /// Removes `lb`; true when no load balancer is left.
    fn remove(&mut self, lb: &str) -> bool {
        match self {
            LbSet::One(only) => &**only == lb,
            LbSet::Many(all) => {
                all.retain(|l| &**l != lb);
                match all.len() {
                    0 => true,
                    1 => {
                        let only = all[0].clone();
                        *self = LbSet::One(only);
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        match self {
            LbSet::One(only) => std::slice::from_ref(only).iter(),
            LbSet::Many(all) => all.iter(),
        }
    }
}

fn global_event<'a>(mut rows: impl Iterator<Item = &'a Row>) -> bool {
    rows.any(|r| {
        r.get("options")
            .map(Value::as_string_map)
            .and_then(|o| o.get("controller_event").cloned())
            .is_some_and(|v| v == "true")
    })
}

/// Follows the Southbound Load_Balancer table through `client` (which must monitor what
/// [`crate::southbound::monitors`] asks for VIPs) and sends updates until the receiver goes away.
pub fn spawn(client: Client, updates: mpsc::UnboundedSender<VipUpdate>) {
    tokio::spawn(async move {
        let mut changes = client.subscribe();
        let mut state = OvnVips::default();
        // A session may already be up (its first change set sent before we subscribed).
        if client.is_connected() {
            let all = state.rebuild(&client);
            if updates.send(VipUpdate::Replace(all)).is_err() {
                return;
            }
        }
        loop {
            let set: Arc<ChangeSet> = match changes.recv().await {
                Ok(set) => set,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(
                        missed = n,
                        "VIP source fell behind; rebuilding from the replica"
                    );
                    Arc::new(ChangeSet {
                        resync: true,
                        ..ChangeSet::default()
                    })
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let global_changed = set.changes.iter().any(|(t, _, _)| t == "SB_Global")
                && global_event(client.replica().rows("SB_Global").map(|(_, r)| r))
                    != state.global_event;
            let update = if set.resync || global_changed {
                VipUpdate::Replace(state.rebuild(&client))
            } else {
                let mut upsert = Vec::new();
                let mut remove = Vec::new();
                for (table, uuid, change) in &set.changes {
                    if table != "Load_Balancer" {
                        continue;
                    }
                    let row = match change {
                        RowChange::Insert(r) | RowChange::Modify { new: r, .. } => Some(r),
                        RowChange::Delete(_) => None,
                    };
                    let (u, r) = state.update_lb(uuid, row);
                    upsert.extend(u);
                    remove.extend(r);
                }
                if upsert.is_empty() && remove.is_empty() {
                    continue;
                }
                VipUpdate::Changes { upsert, remove }
            };
            if updates.send(update).is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use ovsdb::Atom;

    use super::*;

    fn lb_row(vips: &[(&str, &str)], options: &[(&str, &str)], protocol: &str) -> Row {
        Row::from([
            ("vips".to_owned(), Value::string_map(vips.iter().copied())),
            (
                "options".to_owned(),
                Value::string_map(options.iter().copied()),
            ),
            ("protocol".to_owned(), Value::Atom(Atom::from(protocol))),
            (
                "external_ids".to_owned(),
                Value::string_map([("lb_id", "nb-uuid")]),
            ),
        ])
    }

    fn uuid(n: u8) -> Uuid {
        Uuid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
    }

    #[test]
    fn only_what_ovn_would_report() {
        let vips = [
            ("192.168.1.100:80", ""),
            ("[fd00::1]:53", "10.0.0.1:53,10.0.0.2:53"),
            ("10.0.0.9", ""),
        ];
        let event = lb_row(&vips, &[("event", "true")], "udp");
        let got = load_balancer_vips(&uuid(1), &event, false);
        assert!(got.reports);
        let got = got.vips;
        assert_eq!(got.len(), 2, "the port-less VIP is left out: {got:?}");
        let idle = got
            .iter()
            .find(|d| d.vip.endpoint() == "192.168.1.100:80")
            .unwrap();
        assert_eq!(idle.backends, 0);
        assert_eq!(idle.vip.protocol, Protocol::Udp);
        assert_eq!(idle.load_balancer.as_deref(), Some("nb-uuid"));
        let active = got
            .iter()
            .find(|d| d.vip.endpoint() == "[fd00::1]:53")
            .unwrap();
        assert_eq!(active.backends, 2);

        // Without event, only the VIPs with backends matter (they can make a shared VIP
        // active); the idle one is left out.
        let no_event = lb_row(&vips, &[], "tcp");
        let got = load_balancer_vips(&uuid(1), &no_event, false);
        assert!(!got.reports);
        assert_eq!(
            got.vips
                .iter()
                .map(|d| d.vip.endpoint())
                .collect::<Vec<_>>(),
            ["[fd00::1]:53"]
        );
        let global = load_balancer_vips(&uuid(1), &no_event, true);
        assert!(global.reports, "global option");
        assert_eq!(global.vips.len(), 2);
        let reject = lb_row(&vips, &[("event", "true"), ("reject", "true")], "tcp");
        assert!(
            !load_balancer_vips(&uuid(1), &reject, true).reports,
            "reject wins"
        );
    }

    #[test]
    fn a_vip_with_backends_through_a_load_balancer_without_event_is_active() {
        let mut s = OvnVips::default();
        let idle = lb_row(&[("10.0.0.5:80", "")], &[("event", "true")], "tcp");
        let (up, _) = s.update_lb(&uuid(1), Some(&idle));
        assert_eq!((up.len(), up[0].backends), (1, 0));
        // The same VIP with backends in a load balancer that reports nothing (as most
        // services are): OVN forwards, so the VIP must not be idle.
        let active = lb_row(&[("10.0.0.5:80", "10.1.1.1:8080")], &[], "tcp");
        let (up, rm) = s.update_lb(&uuid(2), Some(&active));
        assert!(rm.is_empty());
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].backends, 1, "{up:?}");
        // Its backends go: idle again, named after the reporting load balancer.
        let drained = lb_row(&[("10.0.0.5:80", "")], &[], "tcp");
        let (up, _) = s.update_lb(&uuid(2), Some(&drained));
        assert_eq!((up.len(), up[0].backends), (1, 0));
        // A VIP only a non-reporting load balancer has stays out of the map.
        let other = lb_row(&[("10.0.0.6:80", "10.1.1.2:80")], &[], "tcp");
        let (up, rm) = s.update_lb(&uuid(3), Some(&other));
        assert!(up.is_empty() && rm.len() == 1, "{up:?} {rm:?}");
    }

    #[test]
    fn incremental_updates_touch_only_their_vips_and_shared_vips_combine() {
        let mut s = OvnVips::default();
        let a = lb_row(
            &[("10.0.0.1:80", ""), ("10.0.0.2:80", "")],
            &[("event", "true")],
            "tcp",
        );
        let (up, rm) = s.update_lb(&uuid(1), Some(&a));
        assert_eq!((up.len(), rm.len()), (2, 0));
        // A second LB with one of the VIPs, with backends: that VIP is active.
        let b = lb_row(
            &[("10.0.0.2:80", "10.1.1.1:80")],
            &[("event", "true")],
            "tcp",
        );
        let (up, rm) = s.update_lb(&uuid(2), Some(&b));
        assert_eq!(rm.len(), 0);
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].backends, 1);
        // The first LB drops a VIP.
        let a2 = lb_row(&[("10.0.0.2:80", "")], &[("event", "true")], "tcp");
        let (up, rm) = s.update_lb(&uuid(1), Some(&a2));
        assert_eq!(
            rm.iter().map(Vip::endpoint).collect::<Vec<_>>(),
            ["10.0.0.1:80"]
        );
        assert_eq!(up.len(), 1);
        // The second LB goes away: the shared VIP is idle again.
        let (up, rm) = s.update_lb(&uuid(2), None);
        assert!(rm.is_empty());
        assert_eq!((up.len(), up[0].backends), (1, 0));
        // And the first: nothing is left.
        let (up, rm) = s.update_lb(&uuid(1), None);
        assert_eq!((up.len(), rm.len()), (0, 1));
        assert!(s.lbs_of.is_empty() && s.by_lb.is_empty());
    }
}
