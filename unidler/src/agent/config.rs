//! What the agent is told to do, typed: built by the CLI (or a test) and handed to
//! [`Agent::start`](super::Agent::start).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use unidler_common::{RateLimitConfig, VIP_FLAG_PASS_WHEN_IDLE};

use crate::{datapath::Hook, ovn::southbound::SouthboundConfig, vip::DesiredVip};

/// The agent's whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Interfaces to attach the program to: names (which must exist at start, and are
    /// attached again if re-created) and shell-style patterns (followed as interfaces come
    /// and go).
    pub interfaces: Vec<InterfaceSelector>,
    /// Which hook to attach with.
    pub hook: Hook,
    /// The local Open_vSwitch database, and which of OVN's interfaces the datapath follows
    /// there (VIFs, uplinks), if any.
    pub ovn_interfaces: Option<(Vec<ovsdb::Remote>, crate::ovn::ovs_interfaces::Follow)>,
    /// Where the VIPs come from.
    pub vips: VipSourceConfig,
    /// Capacity of the kernel's VIP map; VIPs beyond it are not watched (and reported).
    pub max_vips: u32,
    /// Where the datapath's maps and links are pinned (a bpffs directory), so that it outlives
    /// the agent and the next agent adopts it; None: it goes with the agent.
    pub pin_dir: Option<PathBuf>,
    /// What the datapath does with an opening packet to an idle VIP.
    pub idle_action: IdleAction,
    /// Event rate limits enforced in the kernel.
    pub rate_limits: RateLimitConfig,
    /// How long the agent may be unable to vouch for the VIP map (its VIP source out of
    /// sync, or the agent gone) before idle VIPs fail open in the kernel; zero: never.
    pub fail_open_after: Duration,
    /// Holding opening packets to idle VIPs and replaying them once the VIP has a backend.
    pub hold: crate::hold::HoldLimits,
    /// Where the node's forwarding is read before a replay, with VIPs from OVN: held packets
    /// of a VIP are replayed once the integration bridge's flows carry its backend. None:
    /// replayed as soon as the VIP source says so.
    pub forwarding: Option<crate::ovn::forwarding::FlowReader>,
    /// The Southbound database: with it, idle hits become Controller_Event rows there;
    /// without it, they are printed on standard output as JSON lines.
    pub southbound: Option<SouthboundConfig>,
    /// Most idle hits waiting for the database.
    pub event_queue_size: usize,
    /// Whose rows make a hit a duplicate: ours (as ovn-controller), or any chassis'.
    pub dedup: crate::ovn::controller_event::Dedup,
    /// Where state that outlives the process is kept (the last Controller_Event seq_num).
    pub state_dir: PathBuf,
    /// Address of the metrics and health endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub metrics_addr: SocketAddr,
    /// Address of the inspection API (`/api/vips`, `/api/events`).
    pub api_addr: SocketAddr,
    /// How often to log a summary of the kernel counters (zero: never).
    pub summary_interval: Duration,
    /// Most verbose aya-log level the kernel emits (1 error … 5 trace).
    pub kernel_log_level: u8,
}

/// Which interfaces the program goes on.
#[derive(Clone, Debug)]
pub enum InterfaceSelector {
    /// One interface by name.
    Name(String),
    /// Every interface whose name matches (`*`, `?`, `[...]`).
    Pattern(glob::Pattern),
}

impl InterfaceSelector {
    /// A pattern if `text` has a `*`, `?` or `[`, else a name.
    pub fn parse(text: &str) -> Result<Self, glob::PatternError> {
        if text.contains(['*', '?', '[']) {
            Ok(Self::Pattern(glob::Pattern::new(text)?))
        } else {
            Ok(Self::Name(text.to_owned()))
        }
    }
}

/// Where the VIPs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VipSourceConfig {
    /// A TOML file, followed (`--vips-file`).
    File(PathBuf),
    /// A fixed list (`--vip`).
    Static(Vec<DesiredVip>),
    /// The Southbound `Load_Balancer` table (needs [`Config::southbound`]).
    Ovn,
    /// None: every packet passes, nothing is reported.
    None,
}

/// What the datapath does with the opening packet to an idle VIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IdleAction {
    /// Drop it, as OVN does (and hold it for replay).
    #[default]
    Drop,
    /// Pass it on to OVN's own path.
    Pass,
}

impl IdleAction {
    /// The `VIP_FLAG_*` bits every VIP gets.
    pub fn vip_flags(self) -> u32 {
        match self {
            IdleAction::Drop => 0,
            IdleAction::Pass => VIP_FLAG_PASS_WHEN_IDLE,
        }
    }
}
