//! The names events give OVN load balancers, read from the Southbound database when a hit
//! first needs one.
//!
//! A `Controller_Event` row names the Northbound load balancer (`event_info:load_balancer`),
//! which northd writes in the Southbound row's `external_ids:lb_id` when it inserts it and
//! never changes. The VIP source does not monitor that column: with 100,000s of idle load
//! balancers it is a fifth of what the server composes for every agent that starts, and only
//! the few load balancers that are hit need it. So a hit names its load balancer by row
//! ([`LoadBalancerName::SouthboundRow`]) until one select by UUID has read the row's
//! `lb_id`; the name is kept from then on.

use std::time::Duration;

use ovsdb::{Client, Condition, OpResult, Operation, Uuid, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use unidler_common::VipKey;

use crate::{
    event::IdleHit,
    fast_hash::{FastMap, FastSet},
    vip::LoadBalancerName,
};

/// Names read: each Southbound row with the name events give its load balancer.
pub type NamesRead = Vec<([u64; 2], LoadBalancerName)>;

/// Rows read in one transaction at most.
const ROWS_PER_READ: usize = 64;
/// Names kept at most (they are forgotten all at once beyond: read again when needed).
const KNOWN_MAX: usize = 100_000;
/// What became of a hit handed to [`LoadBalancerNames::name`].
#[derive(Debug)]
pub enum Naming {
    /// Named, or needing no name: to be reported now.
    Named(IdleHit),
    /// Waits for its load balancer's name: [`LoadBalancerNames::learn`] returns it.
    Waits,
    /// A hit of the same VIP and load balancer waits already: it would add no row.
    Duplicate,
    /// As many hits wait as the limit allows (the database has not answered for long):
    /// dropped, as the writer drops hits beyond its queue.
    Dropped,
}

/// The names known so far, and the hits waiting for theirs.
pub struct LoadBalancerNames {
    known: FastMap<[u64; 2], LoadBalancerName>,
    /// Hits whose name is being read, oldest first: one per VIP and load balancer row.
    waiting: Vec<IdleHit>,
    /// What each waiting hit is for: its VIP (protocol included) and load balancer row. A
    /// row is written per VIP, so only a hit of the same VIP and row is a duplicate.
    waiting_for: FastSet<(VipKey, [u64; 2])>,
    /// Hits that may wait at most (`--event-queue-size`, as for the writer's queue).
    capacity: usize,
    /// The rows being read.
    asked: FastSet<[u64; 2]>,
    /// Whether hits beyond `capacity` were logged (until the waiting ones are named).
    overflow_warned: bool,
    /// Rows to read; None without a database (a row is then named by its UUID at once).
    reader: Option<mpsc::UnboundedSender<[u64; 2]>>,
}

impl LoadBalancerNames {
    /// Reads names through `client`; the names read come on the returned receiver, for the
    /// agent's loop to hand to [`LoadBalancerNames::learn`]. At most `capacity` hits wait.
    pub fn start(client: Client, capacity: usize) -> (Self, mpsc::UnboundedReceiver<NamesRead>) {
        let (ask, asks) = mpsc::unbounded_channel();
        let (answer, answers) = mpsc::unbounded_channel();
        tokio::spawn(read_names(client, asks, answer));
        (
            Self {
                known: FastMap::default(),
                waiting: Vec::new(),
                waiting_for: FastSet::default(),
                capacity: capacity.max(1),
                asked: FastSet::default(),
                overflow_warned: false,
                reader: Some(ask),
            },
            answers,
        )
    }

    /// Without a database: names from a row are its UUID.
    pub fn without_database() -> (Self, mpsc::UnboundedReceiver<NamesRead>) {
        let (_, answers) = mpsc::unbounded_channel();
        (
            Self {
                known: FastMap::default(),
                waiting: Vec::new(),
                waiting_for: FastSet::default(),
                capacity: 1,
                asked: FastSet::default(),
                overflow_warned: false,
                reader: None,
            },
            answers,
        )
    }

    /// `hit` named by its load balancer, if the name is known (or not needed); else the hit
    /// waits, and [`LoadBalancerNames::learn`] returns it once the name is read (unless it
    /// is a duplicate of a waiting hit, or too many wait).
    pub fn name(&mut self, mut hit: IdleHit) -> Naming {
        let Some(row) = hit.load_balancer_row else {
            return Naming::Named(hit);
        };
        if let Some(name) = self.known.get(&row) {
            hit.load_balancer = Some(name.to_string());
            hit.load_balancer_row = None;
            return Naming::Named(hit);
        }
        let Some(reader) = &self.reader else {
            return Naming::Named(named_by_row(hit));
        };
        let waiting_for = (hit.key, row);
        if self.waiting_for.contains(&waiting_for) {
            return Naming::Duplicate;
        }
        if self.waiting.len() >= self.capacity {
            if !self.overflow_warned {
                warn!(
                    waiting = self.waiting.len(),
                    "idle hits keep waiting for load balancer names (database unreachable?): \
                     further hits are dropped (counted as dropped_overflow) until names are read"
                );
                self.overflow_warned = true;
            }
            return Naming::Dropped;
        }
        if self.asked.insert(row) {
            // The reader is gone only when the runtime stops.
            let _ = reader.send(row);
        }
        self.waiting_for.insert(waiting_for);
        self.waiting.push(hit);
        Naming::Waits
    }

    /// How many hits wait for names.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Keeps `names`; returns the hits that waited for them, oldest first.
    pub fn learn(&mut self, names: NamesRead) -> Vec<IdleHit> {
        if self.known.len() + names.len() > KNOWN_MAX {
            self.known.clear();
        }
        for (row, name) in names {
            self.asked.remove(&row);
            self.known.insert(row, name);
        }
        let (named, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|h| {
                h.load_balancer_row
                    .is_some_and(|r| self.known.contains_key(&r))
            });
        self.waiting = waiting;
        for hit in &named {
            if let Some(row) = hit.load_balancer_row {
                self.waiting_for.remove(&(hit.key, row));
            }
        }
        self.overflow_warned &= !self.waiting.is_empty();
        named
            .into_iter()
            .map(|mut hit| {
                let row = hit
                    .load_balancer_row
                    .take()
                    .expect("waits for a row's name");
                hit.load_balancer = Some(self.known[&row].to_string());
                hit
            })
            .collect()
    }

    /// Whether hits wait for names.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The hits still waiting, each named by its row's UUID (when the agent stops).
    pub fn give_up(&mut self) -> Vec<IdleHit> {
        self.asked.clear();
        self.waiting_for.clear();
        self.waiting.drain(..).map(named_by_row).collect()
    }

    /// The name to show for `name`: None for a row whose name has not been read.
    pub fn shown(&self, name: &LoadBalancerName) -> Option<String> {
        match name.southbound_row() {
            Some(row) => self.known.get(&row).map(ToString::to_string),
            None => Some(name.to_string()),
        }
    }
}

/// `hit` named by its load balancer's Southbound row UUID (as OVN names one without
/// `lb_id`).
fn named_by_row(mut hit: IdleHit) -> IdleHit {
    if let Some(row) = hit.load_balancer_row.take() {
        hit.load_balancer = Some(LoadBalancerName::Uuid(row).to_string());
    }
    hit
}

fn row_uuid([high, low]: [u64; 2]) -> Uuid {
    Uuid::from_u128((u128::from(high) << 64) | u128::from(low))
}

/// The name in a row read by UUID: `external_ids:lb_id`, else the row's UUID (also for a
/// row deleted since: the hit is still reported).
fn name_in(row: [u64; 2], result: &OpResult) -> LoadBalancerName {
    result
        .rows()
        .first()
        .and_then(|r| r.get("external_ids"))
        .and_then(|ids| ids.as_string_map().remove("lb_id"))
        .map(|lb_id| LoadBalancerName::new(&lb_id))
        .unwrap_or(LoadBalancerName::Uuid(row))
}

/// Reads the rows asked for, a batch per transaction, until the agent stops. A read that
/// fails is tried again on the next session (or after a second).
async fn read_names(
    client: Client,
    mut asks: mpsc::UnboundedReceiver<[u64; 2]>,
    answers: mpsc::UnboundedSender<NamesRead>,
) {
    let mut wanted: Vec<[u64; 2]> = Vec::new();
    let mut warned = false;
    loop {
        if wanted.is_empty() {
            match asks.recv().await {
                Some(row) => wanted.push(row),
                None => return,
            }
        }
        while let Ok(row) = asks.try_recv() {
            wanted.push(row);
        }
        let batch = &wanted[..wanted.len().min(ROWS_PER_READ)];
        let ops: Vec<Operation> = batch
            .iter()
            .map(|row| Operation::Select {
                table: crate::ovn::vips::TABLE.into(),
                conditions: vec![Condition::eq("_uuid", Value::from(row_uuid(*row)))],
                columns: Some(vec!["external_ids".into()]),
            })
            .collect();
        let session = client.session_count();
        match client.transact(&ops).await {
            Ok(results) => {
                let names: NamesRead = batch
                    .iter()
                    .zip(&results)
                    .map(|(row, result)| (*row, name_in(*row, result)))
                    .collect();
                debug!(rows = names.len(), "load balancer names read");
                wanted.drain(..names.len());
                warned = false;
                if answers.send(names).is_err() {
                    return;
                }
            }
            Err(e) => {
                if !warned {
                    warn!("reading load balancer names failed (tried again): {e}");
                    warned = true;
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), client.wait_new_session(session))
                        .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vip::Protocol;

    fn hit(row: Option<u8>) -> IdleHit {
        IdleHit {
            key: Default::default(),
            vip: "10.0.0.1:80".into(),
            protocol: Protocol::Tcp,
            src: "10.1.0.1:4000".into(),
            iface: "eth0".into(),
            ifindex: 2,
            load_balancer: row.is_none().then(|| "lb-file".into()),
            load_balancer_row: row.map(|n| [0, u64::from(n)]),
            action: "dropped",
            timestamp_ns: 1,
        }
    }

    /// The named hit, if `naming` is one.
    fn named(naming: Naming) -> Option<IdleHit> {
        match naming {
            Naming::Named(hit) => Some(hit),
            _ => None,
        }
    }

    /// Names read through a reader the test holds (rows asked come on the receiver).
    fn with_reader(capacity: usize) -> (LoadBalancerNames, mpsc::UnboundedReceiver<[u64; 2]>) {
        let (mut names, _answers) = LoadBalancerNames::without_database();
        let (ask, asks) = mpsc::unbounded_channel();
        names.reader = Some(ask);
        names.capacity = capacity;
        (names, asks)
    }

    /// A hit of row `row` for VIP `10.0.0.1:port`.
    fn hit_of_vip(row: u8, port: u16) -> IdleHit {
        let mut hit = hit(Some(row));
        hit.key.port_be = port.to_be();
        hit.vip = format!("10.0.0.1:{port}");
        hit
    }

    #[test]
    fn a_row_is_named_once_read_and_hits_wait_for_it() {
        let (mut names, mut asks) = with_reader(100);
        assert_eq!(
            named(names.name(hit(None))).and_then(|h| h.load_balancer),
            Some("lb-file".into()),
            "a name from a file needs no reading"
        );
        assert!(matches!(names.name(hit_of_vip(1, 80)), Naming::Waits));
        assert!(matches!(names.name(hit_of_vip(1, 81)), Naming::Waits));
        assert!(
            matches!(names.name(hit_of_vip(1, 80)), Naming::Duplicate),
            "the same VIP of the same row waits already"
        );
        assert!(matches!(names.name(hit_of_vip(2, 80)), Naming::Waits));
        assert_eq!(names.waiting(), 3);
        assert_eq!(
            (
                asks.try_recv().ok(),
                asks.try_recv().ok(),
                asks.try_recv().ok()
            ),
            (Some([0, 1]), Some([0, 2]), None),
            "each row is asked for once"
        );
        let named_hits = names.learn(vec![([0, 1], LoadBalancerName::new("nb-1"))]);
        assert_eq!(
            named_hits
                .iter()
                .map(|h| h.vip.as_str())
                .collect::<Vec<_>>(),
            ["10.0.0.1:80", "10.0.0.1:81"],
            "both VIPs of row 1, in order"
        );
        assert!(
            named_hits
                .iter()
                .all(|h| h.load_balancer.as_deref() == Some("nb-1"))
        );
        assert!(named_hits.iter().all(|h| h.load_balancer_row.is_none()));
        assert!(names.has_waiting(), "row 2's hit still waits");
        assert_eq!(
            named(names.name(hit_of_vip(1, 80))).and_then(|h| h.load_balancer),
            Some("nb-1".into()),
            "known from then on"
        );
        assert_eq!(
            names.shown(&LoadBalancerName::SouthboundRow([0, 1])),
            Some("nb-1".into())
        );
        assert_eq!(names.shown(&LoadBalancerName::SouthboundRow([0, 2])), None);
        let left = names.give_up();
        assert_eq!(
            left[0].load_balancer.as_deref(),
            Some("00000000-0000-0000-0000-000000000002"),
            "given up: named by its row's UUID"
        );
        assert!(!names.has_waiting() && names.waiting_for.is_empty());
    }

    /// A storm over the VIPs of one load balancer whose name is not read yet: each VIP waits
    /// (a row is written per VIP), once; beyond the limit hits are dropped, never named
    /// otherwise than the waiting ones (that would write a second row for a VIP later).
    #[test]
    fn every_vip_of_a_load_balancer_waits_once_up_to_the_limit() {
        let (mut names, _asks) = with_reader(3);
        for port in 0..3 {
            assert!(matches!(names.name(hit_of_vip(1, port)), Naming::Waits));
        }
        assert!(
            matches!(names.name(hit_of_vip(1, 1)), Naming::Duplicate),
            "a VIP waiting already"
        );
        assert!(
            matches!(names.name(hit_of_vip(1, 3)), Naming::Dropped),
            "a fourth VIP, beyond the limit"
        );
        assert!(matches!(names.name(hit_of_vip(2, 3)), Naming::Dropped));
        assert!(names.overflow_warned);
        let named_hits = names.learn(vec![([0, 1], LoadBalancerName::new("nb-1"))]);
        assert_eq!(named_hits.len(), 3);
        assert!(
            named_hits
                .iter()
                .all(|h| h.load_balancer.as_deref() == Some("nb-1"))
        );
        assert!(!names.overflow_warned && !names.has_waiting());
        assert!(names.waiting_for.is_empty(), "named hits wait no longer");
        assert_eq!(
            named(names.name(hit_of_vip(1, 3))).and_then(|h| h.load_balancer),
            Some("nb-1".into()),
            "the VIP dropped before is named by lb_id at its next hit"
        );
    }

    #[test]
    fn without_a_database_a_row_names_itself() {
        let (mut names, _answers) = LoadBalancerNames::without_database();
        assert_eq!(
            named(names.name(hit(Some(3)))).and_then(|h| h.load_balancer),
            Some("00000000-0000-0000-0000-000000000003".into())
        );
    }

    #[test]
    fn the_name_is_lb_id_else_the_row_uuid() {
        let row = |ids: &[(&str, &str)]| {
            OpResult::Rows(vec![ovsdb::Row::from([(
                "external_ids".to_owned(),
                Value::string_map(ids.iter().copied()),
            )])])
        };
        assert_eq!(
            name_in([0, 9], &row(&[("lb_id", "nb-9"), ("other", "x")])).to_string(),
            "nb-9"
        );
        assert_eq!(
            name_in([0, 9], &row(&[])).to_string(),
            "00000000-0000-0000-0000-000000000009"
        );
        assert_eq!(
            name_in([0, 9], &OpResult::Rows(Vec::new())).to_string(),
            "00000000-0000-0000-0000-000000000009",
            "a row deleted since"
        );
    }
}
