//! The source's tests: rows and diffs as the monitor sends them.

use ovsdb::{Atom, Row, Value};

use super::{vip_index::*, *};
use crate::vip::DesiredVip;

/// A load balancer row as the monitor sends it, one that reports (`options:event=true`;
/// [`Driven::silent`] takes the option out).
fn lb_row(vips: &[(&str, &str)], protocol: &str) -> Row {
    Row::from([
        ("vips".to_owned(), Value::string_map(vips.iter().copied())),
        ("protocol".to_owned(), Value::Atom(Atom::from(protocol))),
        ("options".to_owned(), Value::string_map([("event", "true")])),
    ])
}

/// A diff of a load balancer's `vips` (a pair equal to the current one removes it).
fn vips_diff(pairs: &[(&str, &str)]) -> RowUpdate {
    RowUpdate::Modify(Row::from([(
        "vips".to_owned(),
        Value::string_map(pairs.iter().copied()),
    )]))
}

/// A diff of a load balancer's options (a pair equal to the current one removes it).
fn options_diff(pairs: &[(&str, &str)]) -> RowUpdate {
    RowUpdate::Modify(Row::from([(
        "options".to_owned(),
        Value::string_map(pairs.iter().copied()),
    )]))
}

/// The name events give the load balancer of row `uuid(n)`, until it is read.
fn row_name(n: u8) -> String {
    format!("sb-row:{}", uuid(n).0)
}

fn uuid(n: u8) -> Uuid {
    Uuid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
}

/// The source as the client drives it, with the replica's SB_Global.
struct Driven {
    source: LoadBalancerSource,
    updates: mpsc::UnboundedReceiver<VipUpdate>,
    replica: Replica,
    /// Replicated tables changed since the last batch.
    changed: Changed,
    /// Load balancers loaded or inserted without their `options:event=true`.
    silent: FastSet<u8>,
}

impl Driven {
    fn new() -> Self {
        let (tx, updates) = mpsc::unbounded_channel();
        Self {
            source: LoadBalancerSource {
                vips: OvnVips::default(),
                updates: tx,
                loading: false,
                touched: FastSet::default(),
                load_balancers: Arc::default(),
                port_scopes: tokio::sync::watch::channel(Arc::default()).0,
            },
            updates,
            replica: Replica::default(),
            changed: Changed::new(),
            silent: FastSet::default(),
        }
    }

    /// Load balancer `n` has no `options:event=true` (from its next load or insert on).
    fn silent(&mut self, n: u8) {
        self.silent.insert(n);
    }

    /// The row as the monitor would send it for load balancer `n`.
    fn as_sent(&self, n: u8, update: RowUpdate) -> RowUpdate {
        let strip = |mut row: Row| {
            if self.silent.contains(&n) {
                row.remove("options");
            }
            row
        };
        match update {
            RowUpdate::Initial(row) => RowUpdate::Initial(strip(row)),
            RowUpdate::Insert(row) => RowUpdate::Insert(strip(row)),
            other => other,
        }
    }

    /// A full load of these rows; returns the whole VIP set.
    #[track_caller]
    fn load(&mut self, rows: &[(u8, Row)]) -> Vec<DesiredVip> {
        self.source.reset();
        for (n, row) in rows {
            let row = self.as_sent(*n, RowUpdate::Initial(row.clone()));
            self.source.row(&uuid(*n), row).unwrap();
        }
        match self.done() {
            Some(VipUpdate::Replace(mut all)) => {
                all.sort_by_key(|d| d.vip);
                all
            }
            other => panic!("a full load sends the whole set, not {other:?}"),
        }
    }

    /// One batch of one row's update; returns (upserted, removed), sorted.
    #[track_caller]
    fn batch(&mut self, n: u8, update: RowUpdate) -> (Vec<DesiredVip>, Vec<Vip>) {
        let update = self.as_sent(n, update);
        self.source.row(&uuid(n), update).unwrap();
        match self.done() {
            Some(VipUpdate::Changes {
                mut upsert,
                mut remove,
            }) => {
                upsert.sort_by_key(|d| d.vip);
                remove.sort();
                (upsert, remove)
            }
            None => (Vec::new(), Vec::new()),
            other => panic!("an incremental batch sends changes, not {other:?}"),
        }
    }

    fn done(&mut self) -> Option<VipUpdate> {
        let changed = std::mem::take(&mut self.changed);
        self.source.batch_done(&self.replica, &changed);
        self.updates.try_recv().ok()
    }

    /// A row of a replicated table, as the client would apply it.
    fn replicate(&mut self, table: &str, n: u8, row: Row) {
        self.replica
            .apply_row(table, uuid(n), RowUpdate::Insert(row), false)
            .unwrap();
        self.changed.insert(table.to_owned());
    }
}

fn name(d: &DesiredVip) -> String {
    d.load_balancer
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn endpoints(vips: &[DesiredVip]) -> Vec<(String, u32)> {
    vips.iter()
        .map(|d| (d.vip.to_string(), d.backends))
        .collect()
}

#[test]
fn vips_are_told_apart_by_their_text_not_a_hash_of_it() {
    // Keys (and values) whose fast hashes collided: identity is the text.
    let (backed, idle) = ("10.203.1.20:10319", "10.203.1.20:10394");
    let mut d = Driven::new();
    let all = d.load(&[(1, lb_row(&[(backed, backed), (idle, "")], "tcp"))]);
    assert_eq!(
        endpoints(&all),
        [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 0)],
        "the backed VIP stays backed"
    );
    // Equal values: each key is its own.
    let all = d.load(&[(
        1,
        lb_row(&[(backed, "10.0.0.9:80"), (idle, "10.0.0.9:80")], "tcp"),
    )]);
    assert_eq!(
        endpoints(&all),
        [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 1)]
    );
    // A diff pair removes exactly its key, and only with the exact current value.
    let (up, rm) = d.batch(1, vips_diff(&[(idle, "10.0.0.8:80,10.0.0.9:80")]));
    assert!(rm.is_empty());
    assert_eq!(
        endpoints(&up),
        [(format!("{backed}/tcp"), 1), (format!("{idle}/tcp"), 2)]
    );
    let (up, rm) = d.batch(1, vips_diff(&[(idle, "10.0.0.8:80,10.0.0.9:80")]));
    assert_eq!(endpoints(&up), [(format!("{backed}/tcp"), 1)]);
    assert_eq!(
        rm.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [format!("{idle}/tcp")]
    );
}

#[test]
fn every_vip_with_a_port_is_watched_and_named_after_its_row() {
    let vips = [
        ("192.168.1.100:80", ""),
        ("[fd00::1]:53", "10.0.0.1:53,10.0.0.2:53"),
        ("10.0.0.9", ""),
    ];
    let mut d = Driven::new();
    let all = d.load(&[(1, lb_row(&vips, "udp"))]);
    assert_eq!(
        endpoints(&all),
        [
            ("192.168.1.100:80/udp".to_owned(), 0),
            ("[fd00::1]:53/udp".to_owned(), 2)
        ],
        "the port-less VIP is left out"
    );
    assert_eq!(name(&all[0]), row_name(1));
    assert_eq!(d.source.load_balancers.load(Ordering::Relaxed), 1);
}

#[test]
fn a_load_balancer_that_also_rejects_does_not_count() {
    let mut d = Driven::new();
    let shared = [("10.0.0.1:80", "")];
    let all = d.load(&[(1, lb_row(&shared, "tcp")), (2, lb_row(&shared, "tcp"))]);
    assert_eq!(
        name(&all[0]),
        row_name(1),
        "the first by UUID names the VIP"
    );
    // ... until it rejects: only the VIPs of the load balancer whose options changed.
    d.source
        .row(&uuid(1), options_diff(&[("reject", "TRUE")]))
        .unwrap();
    match d.done() {
        Some(VipUpdate::Changes { upsert, remove }) => {
            assert!(remove.is_empty());
            assert_eq!(upsert.iter().map(name).collect::<Vec<_>>(), [row_name(2)]);
        }
        other => panic!("the rejecting set changing updates the VIP: {other:?}"),
    }
    d.source
        .row(&uuid(2), options_diff(&[("reject", "true")]))
        .unwrap();
    match d.done() {
        Some(VipUpdate::Changes { upsert, remove }) => {
            assert!(upsert.is_empty(), "{upsert:?}");
            assert_eq!(remove.len(), 1, "no load balancer that reports has it");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn incremental_updates_touch_only_their_vips_and_shared_vips_combine() {
    let mut d = Driven::new();
    let a = lb_row(&[("10.0.0.1:80", ""), ("10.0.0.2:80", "")], "tcp");
    assert_eq!(d.load(&[(1, a)]).len(), 2);
    // A second LB with one of the VIPs, with backends: that VIP is active.
    let b = lb_row(&[("10.0.0.2:80", "10.1.1.1:80")], "tcp");
    let (up, rm) = d.batch(2, RowUpdate::Insert(b));
    assert!(rm.is_empty());
    assert_eq!(endpoints(&up), [("10.0.0.2:80/tcp".to_owned(), 1)]);
    // The first LB drops a VIP: a diff pair with the current value removes the key.
    let drop_one = Row::from([("vips".to_owned(), Value::string_map([("10.0.0.1:80", "")]))]);
    let (up, rm) = d.batch(1, RowUpdate::Modify(drop_one));
    assert_eq!(
        rm.iter().map(Vip::endpoint).collect::<Vec<_>>(),
        ["10.0.0.1:80"]
    );
    assert_eq!(up.len(), 1, "the shared VIP is recomputed: {up:?}");
    // The second LB goes away: the shared VIP is idle again.
    let (up, rm) = d.batch(2, RowUpdate::Delete);
    assert!(rm.is_empty());
    assert_eq!(endpoints(&up), [("10.0.0.2:80/tcp".to_owned(), 0)]);
    // And the first: nothing is left.
    let (up, rm) = d.batch(1, RowUpdate::Delete);
    assert_eq!((up.len(), rm.len()), (0, 1));
    assert!(d.source.vips.lbs_of.is_empty() && d.source.vips.by_lb.is_empty());
}

#[test]
fn diffs_of_every_column_apply_as_the_server_sends_them() {
    let mut d = Driven::new();
    let row = lb_row(&[("10.0.0.1:80", "")], "tcp");
    d.load(&[(1, row)]);
    let modify =
        |column: &str, value: Value| RowUpdate::Modify(Row::from([(column.to_owned(), value)]));
    // The protocol changed: an optional column comes as its new value (ovsdb-server sends
    // only columns that can hold more than one element as the elements that changed).
    let (up, rm) = d.batch(1, modify("protocol", Value::from("udp")));
    assert_eq!(
        rm.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.0.0.1:80/tcp"]
    );
    assert_eq!(endpoints(&up), [("10.0.0.1:80/udp".to_owned(), 0)]);
    assert_eq!(name(&up[0]), row_name(1));
    // Emptied: the empty set, and TCP again.
    let (up, rm) = d.batch(1, modify("protocol", Value::set([])));
    assert_eq!(
        rm.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.0.0.1:80/udp"]
    );
    assert_eq!(endpoints(&up), [("10.0.0.1:80/tcp".to_owned(), 0)]);
    // The datapath group, optional too, moved to another group, then emptied.
    let group = |n: u8| Value::from(uuid(0x40 + n));
    d.source
        .row(&uuid(1), modify("datapath_group", group(1)))
        .unwrap();
    let record = |d: &Driven| d.source.vips.by_lb[&ids::RowKey::new(&uuid(1))].clone();
    let first = record(&d).dp_groups[0];
    assert_ne!(first, 0);
    d.source
        .row(&uuid(1), modify("datapath_group", group(2)))
        .unwrap();
    let second = record(&d).dp_groups[0];
    assert!(second != 0 && second != first, "moved, not toggled");
    d.source
        .row(&uuid(1), modify("datapath_group", Value::set([])))
        .unwrap();
    assert_eq!(record(&d).dp_groups[0], 0);
    // A set of one grows by a diff of one element.
    d.source
        .row(&uuid(1), modify("datapaths", Value::from(uuid(0x51))))
        .unwrap();
    d.source
        .row(&uuid(1), modify("datapaths", Value::from(uuid(0x52))))
        .unwrap();
    assert_eq!(record(&d).dp_list.len(), 2);
    d.done();
    // A modify of a row never seen fails the batch (the client loads afresh).
    assert!(
        d.source
            .row(&uuid(7), RowUpdate::Modify(Row::new()))
            .is_err()
    );
}

fn with_datapaths(mut row: Row, datapaths: &[u8], group: Option<u8>) -> Row {
    let refs = |ns: &[u8]| Value::set(ns.iter().map(|n| Atom::Uuid(uuid(*n))));
    row.insert("datapaths".into(), refs(datapaths));
    row.insert("datapath_group".into(), refs(group.as_slice()));
    row
}

fn scopes(d: &DesiredVip) -> Option<Vec<(u32, u32, String)>> {
    d.scoped.as_ref().map(|s| {
        s.iter()
            .map(|e| {
                let name = e.load_balancer.as_ref().map(ToString::to_string);
                (e.scope, e.backends, name.unwrap_or_default())
            })
            .collect()
    })
}

#[test]
fn the_switch_and_router_groups_of_newer_ovn_scope_as_datapath_group_does() {
    let mut d = Driven::new();
    // Switches 1 (a local port) and 2 (none); a group of each.
    for (n, key) in [(0x41, 1), (0x42, 2)] {
        d.replicate(
            "Datapath_Binding",
            n,
            Row::from([("tunnel_key".to_owned(), Value::from(key))]),
        );
    }
    d.replicate(
        "Port_Binding",
        0x51,
        Row::from([
            ("logical_port".to_owned(), Value::from("pod-a")),
            ("datapath".to_owned(), Value::from(uuid(0x41))),
        ]),
    );
    for (group, dp) in [(0x61, 0x41), (0x62, 0x42)] {
        d.replicate(
            "Logical_DP_Group",
            group,
            Row::from([("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(dp))]))]),
        );
    }
    let in_group = |vip: &str, column: &str, group: u8| {
        let mut row = lb_row(&[(vip, "")], "tcp");
        row.insert(column.into(), Value::set([Atom::Uuid(uuid(group))]));
        row
    };
    let all = d.load(&[
        (1, in_group("10.0.0.1:80", "ls_datapath_group", 0x61)),
        (2, in_group("10.0.0.2:80", "lr_datapath_group", 0x61)),
        (3, in_group("10.0.0.3:80", "ls_datapath_group", 0x62)),
    ]);
    assert_eq!(
        endpoints(&all),
        [
            ("10.0.0.1:80/tcp".to_owned(), 0),
            ("10.0.0.2:80/tcp".to_owned(), 0)
        ],
        "the third is on a switch without a local port"
    );
    // Its group moves to the local switch (a set diff: both elements toggled).
    let moved = Row::from([(
        "ls_datapath_group".to_owned(),
        Value::set([Atom::Uuid(uuid(0x61)), Atom::Uuid(uuid(0x62))]),
    )]);
    let (up, _) = d.batch(3, RowUpdate::Modify(moved));
    assert_eq!(endpoints(&up), [("10.0.0.3:80/tcp".to_owned(), 0)]);
}

#[test]
fn a_vip_forwarded_by_a_load_balancer_that_does_not_report_is_not_idle_there() {
    let mut d = Driven::new();
    // lba (options:event=true) has X idle on switch 1; lbb, without event, has X with a
    // backend on switch 2; lbc, without event, has Y idle.
    d.silent(2);
    d.silent(3);
    for (n, key) in [(0x41, 1), (0x42, 2)] {
        d.replicate(
            "Datapath_Binding",
            n,
            Row::from([("tunnel_key".to_owned(), Value::from(key))]),
        );
    }
    let lba = with_datapaths(lb_row(&[("10.86.0.100:7000", "")], "tcp"), &[0x41], None);
    let lbb = with_datapaths(
        lb_row(&[("10.86.0.100:7000", "10.1.1.1:7000")], "tcp"),
        &[0x42],
        None,
    );
    let lbc = with_datapaths(lb_row(&[("10.86.0.101:7000", "")], "tcp"), &[0x41], None);
    // The node's datapaths not known yet: every load balancer applies, and X has a
    // backend.
    let all = d.load(&[(1, lba.clone()), (2, lbb.clone()), (3, lbc.clone())]);
    assert_eq!(
        endpoints(&all),
        [("10.86.0.100:7000/tcp".to_owned(), 1)],
        "X is forwarded by lbb; Y is reported by no load balancer: not watched"
    );
    // A port on each switch: X is idle on switch 1 only.
    for (n, port, dp) in [(0x51, "pod-a", 0x41), (0x52, "pod-b", 0x42)] {
        d.replicate(
            "Port_Binding",
            n,
            Row::from([
                ("logical_port".to_owned(), Value::from(port)),
                ("datapath".to_owned(), Value::from(uuid(dp))),
            ]),
        );
    }
    match d.done() {
        Some(VipUpdate::Replace(all)) => assert_eq!(
            scopes(&all[0]),
            Some(vec![(1, 0, row_name(1)), (2, 1, row_name(2))]),
            "idle where lba applies, forwarded where lbb does"
        ),
        other => panic!("{other:?}"),
    }
    // lbb gets options:event=true too: nothing changes but who may report.
    d.source
        .row(&uuid(2), options_diff(&[("event", "true")]))
        .unwrap();
    match d.done() {
        Some(VipUpdate::Changes { upsert, .. }) => {
            assert_eq!(endpoints(&upsert), [("10.86.0.100:7000/tcp".to_owned(), 1)])
        }
        other => panic!("{other:?}"),
    }
    // lba stops reporting: X is no longer watched.
    for n in [1, 2] {
        d.source
            .row(&uuid(n), options_diff(&[("event", "true")]))
            .unwrap();
    }
    match d.done() {
        Some(VipUpdate::Changes { upsert, remove }) => {
            assert!(upsert.is_empty(), "{upsert:?}");
            assert_eq!(remove.len(), 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tenants_reusing_a_vip_see_their_own_load_balancer() {
    let mut d = Driven::new();
    // Three logical switches (tunnel keys 1, 2, 3); this node has a port on 1 and 2.
    for (n, key) in [(0x41, 1), (0x42, 2), (0x43, 3)] {
        d.replicate(
            "Datapath_Binding",
            n,
            Row::from([("tunnel_key".to_owned(), Value::from(key))]),
        );
    }
    for (n, port, dp) in [(0x51, "pod-a", 0x41), (0x52, "pod-b", 0x42)] {
        d.replicate(
            "Port_Binding",
            n,
            Row::from([
                ("logical_port".to_owned(), Value::from(port)),
                ("datapath".to_owned(), Value::from(uuid(dp))),
            ]),
        );
    }
    d.replicate(
        "Logical_DP_Group",
        0x61,
        Row::from([(
            "datapaths".to_owned(),
            Value::set([0x41, 0x42, 0x43].map(|n| Atom::Uuid(uuid(n)))),
        )]),
    );
    // Tenant A's service at X is idle; tenant B's at the same X has a backend.
    let a = with_datapaths(lb_row(&[("10.0.0.5:80", "")], "tcp"), &[0x41], None);
    let b = with_datapaths(
        lb_row(&[("10.0.0.5:80", "10.1.1.1:80")], "tcp"),
        &[0x42],
        None,
    );
    // Y is on every switch (a group, as ovn-kubernetes makes them); Z only on a switch
    // this node has no port on.
    let y = with_datapaths(lb_row(&[("10.0.0.6:80", "")], "tcp"), &[], Some(0x61));
    let z = with_datapaths(lb_row(&[("10.0.0.7:80", "")], "tcp"), &[0x43], None);
    let all = d.load(&[(1, a), (2, b), (3, y), (4, z)]);
    assert_eq!(
        endpoints(&all),
        [
            ("10.0.0.5:80/tcp".to_owned(), 1),
            ("10.0.0.6:80/tcp".to_owned(), 0)
        ],
        "Z applies on no local switch: not in the map"
    );
    assert_eq!(
        scopes(&all[0]),
        Some(vec![(1, 0, row_name(1)), (2, 1, row_name(2))]),
        "X differs between the switches"
    );
    assert_eq!(scopes(&all[1]), None, "Y is the same everywhere");
    assert_eq!(
        *d.source.port_scopes.borrow().as_ref(),
        PortScopes {
            ports: [("pod-a".to_owned(), 1), ("pod-b".to_owned(), 2)].into(),
            gateway: None,
        }
    );

    // Another pod on A's switch: its scope is published, no VIP changes.
    d.replicate(
        "Port_Binding",
        0x53,
        Row::from([
            ("logical_port".to_owned(), Value::from("pod-a2")),
            ("datapath".to_owned(), Value::from(uuid(0x41))),
        ]),
    );
    assert!(d.done().is_none(), "a pod on a known switch changes no VIP");
    assert_eq!(d.source.port_scopes.borrow().ports.get("pod-a2"), Some(&1));

    // B's backend goes: both idle, but each names its own load balancer.
    let drained = Row::from([("vips".to_owned(), Value::string_map([("10.0.0.5:80", "")]))]);
    let (up, _) = d.batch(2, RowUpdate::Modify(drained));
    assert_eq!(
        scopes(&up[0]),
        Some(vec![(1, 0, row_name(1)), (2, 0, row_name(2))])
    );
    // A's load balancer moves to the group: on switch 2 both apply now.
    let moved = Row::from([
        ("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(0x41))])),
        (
            "datapath_group".to_owned(),
            Value::set([Atom::Uuid(uuid(0x61))]),
        ),
    ]);
    let (up, _) = d.batch(1, RowUpdate::Modify(moved));
    assert_eq!(
        (scopes(&up[0]), name(&up[0])),
        (None, row_name(1)),
        "the same on both switches now: idle, named after the first idle one by UUID"
    );
    // Back on switch 1 only (scoped again); then this node's port on switch 2 goes: only
    // switch 1 is local, and X is the same everywhere there is.
    // (A set's diff is the elements that changed; the optional group's, its new value.)
    let back = Row::from([
        ("datapaths".to_owned(), Value::set([Atom::Uuid(uuid(0x41))])),
        ("datapath_group".to_owned(), Value::set([])),
    ]);
    let (up, _) = d.batch(1, RowUpdate::Modify(back));
    assert_eq!(
        scopes(&up[0]),
        Some(vec![(1, 0, row_name(1)), (2, 0, row_name(2))])
    );
    d.replica
        .apply_row("Port_Binding", uuid(0x52), RowUpdate::Delete, false)
        .unwrap();
    d.changed.insert("Port_Binding".into());
    match d.done() {
        Some(VipUpdate::Replace(all)) => {
            assert!(all.iter().all(|v| v.scoped.is_none()), "{all:?}");
        }
        other => panic!("new local datapaths re-index everything: {other:?}"),
    }
}
