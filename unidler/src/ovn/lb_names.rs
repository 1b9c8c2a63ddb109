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
/// Hits waiting for names at most (the kernel rate-limits hits; beyond this the database has
/// not answered for a long time).
const WAITING_MAX: usize = 8192;

/// The names known so far, and the hits waiting for theirs.
pub struct LoadBalancerNames {
    known: FastMap<[u64; 2], LoadBalancerName>,
    /// Hits whose name is being read, oldest first.
    waiting: Vec<IdleHit>,
    /// What each waiting hit is for: its VIP (protocol included) and load balancer row. A
    /// row is written per VIP, so only a hit of the same VIP and row is a duplicate.
    waiting_for: FastSet<(VipKey, [u64; 2])>,
    /// The rows being read.
    asked: FastSet<[u64; 2]>,
    /// Whether hits beyond [`WAITING_MAX`] were logged (until the waiting ones are named).
    overflow_warned: bool,
    /// Rows to read; None without a database (a row is then named by its UUID at once).
    reader: Option<mpsc::UnboundedSender<[u64; 2]>>,
}

impl LoadBalancerNames {
    /// Reads names through `client`; the names read come on the returned receiver, for the
    /// agent's loop to hand to [`LoadBalancerNames::learn`].
    pub fn start(client: Client) -> (Self, mpsc::UnboundedReceiver<NamesRead>) {
        let (ask, asks) = mpsc::unbounded_channel();
        let (answer, answers) = mpsc::unbounded_channel();
        tokio::spawn(read_names(client, asks, answer));
        (
            Self {
                known: FastMap::default(),
                waiting: Vec::new(),
                waiting_for: FastSet::default(),
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
                asked: FastSet::default(),
                overflow_warned: false,
                reader: None,
            },
            answers,
        )
    }

    /// `hit` with its load balancer's name, if known (or not needed); else None: the hit
    /// waits, and [`LoadBalancerNames::learn`] returns it once the name is read.
    pub fn name(&mut self, mut hit: IdleHit) -> Option<IdleHit> {
        let Some(row) = hit.load_balancer_row else {
            return Some(hit);
        };
        if let Some(name) = self.known.get(&row) {
            hit.load_balancer = Some(name.to_string());
            hit.load_balancer_row = None;
            return Some(hit);
        }
        let Some(reader) = &self.reader else {
            return Some(named_by_row(hit));
        };
        let waiting_for = (hit.key, row);
        if self.waiting.len() >= WAITING_MAX {
            if !self.overflow_warned {
                warn!(
                    waiting = self.waiting.len(),
                    "idle hits keep waiting for load balancer names (database unreachable?): \
                     further hits name their Southbound row, but for VIPs already waiting"
                );
                self.overflow_warned = true;
            }
            // The same VIP of the same load balancer waiting already: it adds no row.
            return (!self.waiting_for.contains(&waiting_for)).then(|| named_by_row(hit));
        }
        if self.asked.insert(row) {
            // The reader is gone only when the runtime stops.
            let _ = reader.send(row);
        }
        self.waiting_for.insert(waiting_for);
        self.waiting.push(hit);
        None
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
            .map(|hit| self.name(hit).expect("its name is known"))
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

    #[test]
    fn a_row_is_named_once_read_and_hits_wait_for_it() {
        let (mut names, _answers) = LoadBalancerNames::without_database();
        let (ask, mut asks) = mpsc::unbounded_channel();
        names.reader = Some(ask);
        assert_eq!(
            names.name(hit(None)).and_then(|h| h.load_balancer),
            Some("lb-file".into()),
            "a name from a file needs no reading"
        );
        assert!(names.name(hit(Some(1))).is_none());
        assert!(names.name(hit(Some(1))).is_none());
        assert!(names.name(hit(Some(2))).is_none());
        assert_eq!(
            (
                asks.try_recv().ok(),
                asks.try_recv().ok(),
                asks.try_recv().ok()
            ),
            (Some([0, 1]), Some([0, 2]), None),
            "each row is asked for once"
        );
        let named = names.learn(vec![([0, 1], LoadBalancerName::new("nb-1"))]);
        assert_eq!(named.len(), 2, "both hits of row 1");
        assert!(
            named
                .iter()
                .all(|h| h.load_balancer.as_deref() == Some("nb-1"))
        );
        assert!(named.iter().all(|h| h.load_balancer_row.is_none()));
        assert!(names.has_waiting(), "row 2's hit still waits");
        assert_eq!(
            names.name(hit(Some(1))).and_then(|h| h.load_balancer),
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
        assert!(!names.has_waiting());
    }

    /// A hit of row `row` for VIP `10.0.0.1:port`.
    fn hit_of_vip(row: u8, port: u16) -> IdleHit {
        let mut hit = hit(Some(row));
        hit.key.port_be = port.to_be();
        hit.vip = format!("10.0.0.1:{port}");
        hit
    }

    #[test]
    fn beyond_the_waiting_limit_only_duplicates_drop_and_other_hits_name_their_row() {
        let (mut names, _answers) = LoadBalancerNames::without_database();
        let (ask, _asks) = mpsc::unbounded_channel();
        names.reader = Some(ask);
        // One load balancer of many VIPs, each hit once (a storm): the limit is reached.
        for port in 0..WAITING_MAX as u16 {
            assert!(names.name(hit_of_vip(1, port)).is_none());
        }
        assert!(
            names.name(hit_of_vip(1, 7)).is_none(),
            "this VIP of row 1 is waiting: a duplicate"
        );
        assert_eq!(
            names
                .name(hit_of_vip(1, WAITING_MAX as u16))
                .and_then(|h| h.load_balancer),
            Some("00000000-0000-0000-0000-000000000001".into()),
            "another VIP of the waiting row is its own row: named by the row's UUID, not lost"
        );
        assert_eq!(
            names.name(hit(Some(2))).and_then(|h| h.load_balancer),
            Some("00000000-0000-0000-0000-000000000002".into()),
            "a row not waiting is named by its UUID"
        );
        assert_eq!(
            names.waiting.len(),
            WAITING_MAX,
            "none kept beyond the limit"
        );
        assert_eq!(
            names
                .learn(vec![([0, 1], LoadBalancerName::new("nb-1"))])
                .len(),
            WAITING_MAX
        );
        assert!(!names.overflow_warned && !names.has_waiting());
        assert!(names.waiting_for.is_empty(), "named hits wait no longer");
    }

    #[test]
    fn without_a_database_a_row_names_itself() {
        let (mut names, _answers) = LoadBalancerNames::without_database();
        assert_eq!(
            names.name(hit(Some(3))).and_then(|h| h.load_balancer),
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
