//! The world the generator changes and the model reads: load balancers, this node's ports,
//! datapath groups and `SB_Global`, and the steps that change them.

use std::collections::BTreeMap;

/// Logical datapaths (switches and routers), by index; their tunnel keys.
pub const TUNNEL_KEYS: [u32; 4] = [101, 102, 103, 104];
/// Logical ports, by index, each on a datapath and bound to our chassis or not.
pub const PORTS: usize = 4;
/// Datapath groups, by index (a group exists in the database only while a load balancer
/// refers to it: `Logical_DP_Group` is not a root table).
pub const GROUPS: usize = 3;
/// Load balancers, by index.
pub const LBS: usize = 6;

/// VIP keys as OVN takes them: IPv4; IPv6 compressed, uncompressed and in capitals (the same
/// VIP); IPv4-mapped IPv6 in two spellings (an IPv6 VIP, not the IPv4 one); keys that collide
/// in the agent's fast hash (`10.203.1.20:10319` and `:10394`); and keys the datapath cannot
/// watch (no port, templates), which OVN reports itself.
pub const KEYS: [&str; 14] = [
    "10.96.0.1:80",
    "10.96.0.1:8080",
    "10.96.0.2:80",
    "10.203.1.20:10319",
    "10.203.1.20:10394",
    "[fd00::1]:80",
    "[fd00:0:0:0:0:0:0:1]:80",
    "[FD00::1]:80",
    "[fd00::2]:80",
    "[::ffff:10.96.0.1]:80",
    "[::ffff:a60:1]:80",
    "10.96.0.1",
    "^vip_a:^port_a",
    "[fd00::1]",
];

/// Backends values: none, in several spellings, one, two.
pub const BACKENDS: [&str; 7] = [
    "",
    " ",
    ",",
    "10.0.0.5:8080",
    "10.0.0.5:8080,",
    "10.0.0.5:8080,10.0.0.6:8080",
    "[fd00::5]:8080",
];

/// Values of `options:event` and `options:reject` (northd reads them without case).
pub const OPTION_VALUES: [Option<&str>; 6] = [
    None,
    Some("true"),
    Some("TRUE"),
    Some("True"),
    Some("false"),
    Some("yes"),
];

/// The `protocol` column (absent: TCP).
pub const PROTOCOLS: [Option<&str>; 4] = [None, Some("tcp"), Some("udp"), Some("sctp")];

/// One load balancer as northd writes it to the Southbound database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbSpec {
    pub vips: Vec<(&'static str, &'static str)>,
    pub protocol: Option<&'static str>,
    pub datapaths: Vec<usize>,
    pub group: Option<usize>,
    pub event: Option<&'static str>,
    pub reject: Option<&'static str>,
}

/// One logical port: its datapath, and whether it is bound to our chassis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub datapath: usize,
    pub bound: bool,
}

/// One change, absolute (so that any subsequence of a failing sequence is still one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Load balancer `i` is now `spec` (inserted if it is not there).
    SetLb(usize, LbSpec),
    /// Load balancer `i` is deleted (its next `SetLb` inserts a new row).
    DeleteLb(usize),
    /// Port `i` is now on that datapath, bound or not.
    SetPort(usize, PortSpec),
    /// Group `i` now holds these datapaths.
    SetGroup(usize, Vec<usize>),
    /// `SB_Global`'s `options:controller_event`.
    SetGlobalEvent(Option<&'static str>),
}

/// Everything the model reads: the whole world after the steps so far.
#[derive(Clone, Debug)]
pub struct World {
    pub lbs: BTreeMap<usize, LbSpec>,
    pub ports: [PortSpec; PORTS],
    pub groups: [Vec<usize>; GROUPS],
    pub global_event: Option<&'static str>,
}

impl Default for World {
    fn default() -> Self {
        Self {
            lbs: BTreeMap::new(),
            ports: std::array::from_fn(|i| PortSpec {
                datapath: i % TUNNEL_KEYS.len(),
                bound: false,
            }),
            groups: Default::default(),
            global_event: None,
        }
    }
}

impl World {
    pub fn apply(&mut self, step: &Step) {
        match step {
            Step::SetLb(i, spec) => {
                self.lbs.insert(*i, spec.clone());
            }
            Step::DeleteLb(i) => {
                self.lbs.remove(i);
            }
            Step::SetPort(i, spec) => self.ports[*i] = *spec,
            Step::SetGroup(i, dps) => self.groups[*i] = dps.clone(),
            Step::SetGlobalEvent(value) => self.global_event = *value,
        }
    }
}
