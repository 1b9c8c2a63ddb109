//! `unidler run`: its options, and the agent's configuration made from them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use tracing_subscriber::filter::LevelFilter;
use unidler::{
    agent::{Agent, Config, IdleAction, InterfaceSelector, VipSourceConfig},
    datapath::Hook,
    ovn::controller_event::Dedup,
    ovn::southbound::SouthboundConfig,
    vip::VipSpec,
};
use unidler_common::RateLimitConfig;

use super::values::{byte_size, humantime_duration, listen_addr};

/// Metrics and health: loopback by default; the DaemonSet serves them on the node's address.
pub(crate) const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// The inspection API exposes the node's VIP table and client addresses: loopback by default.
pub(crate) const DEFAULT_API_ADDR: &str = "127.0.0.1:9478";

/// `unidler run`'s options.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Interface to attach to: a name (it must exist; attached again if re-created), or a
    /// shell-style pattern (`'veth*'`, followed as interfaces come and go; one that refuses
    /// the program is logged and counted). Repeat for several.
    #[arg(
        long = "iface",
        required_unless_present_any = ["ovn_vifs", "ovn_uplinks"],
        env = "UNIDLER_IFACE",
        value_delimiter = ','
    )]
    ifaces: Vec<String>,
    /// Follow every OVN VIF of this node: the system interfaces that the local Open_vSwitch
    /// database (--ovs-db) binds to a logical port (`external_ids:iface-id`), attached as
    /// ports are added and detached as they go.
    #[arg(long, env = "UNIDLER_OVN_VIFS")]
    ovn_vifs: bool,
    /// Follow the uplinks of OVN's bridge mappings: the system interfaces of the bridges
    /// named in the local Open_vSwitch database's `external_ids:ovn-bridge-mappings`, where
    /// external traffic to NodePort and LoadBalancer VIPs arrives.
    #[arg(long, env = "UNIDLER_OVN_UPLINKS")]
    ovn_uplinks: bool,
    /// Where the datapath goes on each interface: auto (TC ingress on virtual interfaces such
    /// as pods' veths, where native XDP would slow every pod by turning segmentation offloads
    /// off; native XDP on physical ones, or TC where their driver refuses it), xdp (native),
    /// xdp-generic, or tc.
    #[arg(long, value_enum, env = "UNIDLER_HOOK", default_value_t = Hook::Auto)]
    hook: Hook,
    /// The older spelling of --hook, kept working but not listed: native is --hook xdp,
    /// generic --hook xdp-generic, auto XDP native where the driver supports it. Applies only
    /// while --hook is auto.
    #[arg(long, value_enum, env = "UNIDLER_XDP_MODE", hide = true)]
    xdp_mode: Option<XdpMode>,
    /// A VIP, `IP:PORT/PROTO[=BACKENDS][@LOAD_BALANCER]` (IPv6 as `[IP]:PORT/PROTO`): no
    /// `=BACKENDS` means zero backends, an idle service; `@LOAD_BALANCER` is the Northbound
    /// Load_Balancer (UUID) its Controller_Event rows name. Repeat for several.
    #[arg(long = "vip", env = "UNIDLER_VIP", value_delimiter = ',')]
    vips: Vec<VipSpec>,
    /// A file listing VIPs (TOML, see docs/agent.md), reloaded when it changes or on SIGHUP;
    /// for nodes without OVN. A malformed file is rejected and the last good VIPs stay.
    #[arg(long, env = "UNIDLER_VIPS_FILE", conflicts_with = "vips")]
    vips_file: Option<PathBuf>,
    /// Capacity of the kernel's VIP map (about 100 bytes of kernel memory each). VIPs beyond
    /// it are not watched, and reported (log, metric, /readyz); the agent keeps running.
    #[arg(long, env = "UNIDLER_MAX_VIPS", default_value_t = unidler_common::VIP_MAP_CAPACITY, value_parser = clap::value_parser!(u32).range(1..))]
    max_vips: u32,
    /// A directory on a BPF file system where the datapath's maps and attachments are pinned:
    /// it then outlives the agent (SIGTERM and crashes leave it attached and dropping), and
    /// the next agent with the same directory adopts it, swapping its program in atomically,
    /// keeping the VIP map, counters and rate limiters, and reporting the hits the kernel saw
    /// meanwhile. Without it, the datapath goes with the agent.
    #[arg(long, env = "UNIDLER_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// What to do with the opening packet to an idle VIP: drop it (as OVN does, and hold it
    /// for replay), or pass it on to OVN's own path, which handles it as without unidler
    /// (for trying unidler out beside OVN: hits are reported, traffic is unchanged).
    #[arg(long, value_enum, env = "UNIDLER_IDLE_ACTION", default_value_t = IdleAction::Drop)]
    idle_action: IdleAction,
    /// Events per second per VIP, once the burst is spent (enforced in the kernel).
    #[arg(long, env = "UNIDLER_VIP_EVENT_RATE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    vip_event_rate: u32,
    /// Events a VIP may raise back to back.
    #[arg(long, env = "UNIDLER_VIP_EVENT_BURST", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    vip_event_burst: u32,
    /// Events per second over all VIPs, once the burst is spent (enforced in the kernel).
    #[arg(long, env = "UNIDLER_EVENT_RATE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    event_rate: u32,
    /// How long the agent may be unable to vouch for the VIP map (its VIP source out of
    /// sync, e.g. the Southbound database unreachable, or the agent hung or gone) before the
    /// kernel lets opening packets to idle VIPs pass instead of dropping them, so that OVN's
    /// own path handles them (0 never fails open).
    #[arg(long, env = "UNIDLER_FAIL_OPEN_AFTER", default_value = "15s", value_parser = humantime_duration)]
    fail_open_after: Duration,
    /// How long an opening packet to an idle VIP is held, to be replayed into the stack of the
    /// interface it arrived on once the VIP has a backend (so the client's first attempt
    /// succeeds instead of waiting for its retransmission); older ones are discarded. 0 turns
    /// holding off: packets are dropped, as OVN does.
    #[arg(long, env = "UNIDLER_HOLD_MAX_AGE", default_value = "60s", value_parser = humantime_duration)]
    hold_max_age: Duration,
    /// Most opening packets held for one VIP (more are dropped, and counted).
    #[arg(long, env = "UNIDLER_HOLD_PER_VIP", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    hold_per_vip: u32,
    /// Most opening packets held in all (more are dropped, and counted).
    #[arg(long, env = "UNIDLER_HOLD_TOTAL", default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..=unidler_common::HELD_FLOWS_CAPACITY as i64))]
    hold_total: u32,
    /// How long after a VIP's backend appears its held packets are first replayed: the time
    /// the node's forwarding needs to carry the backend (a TCP SYN is replayed again until
    /// answered; a UDP datagram only once). With VIPs from OVN and --openflow-bridge the
    /// agent reads the forwarding itself and 0 is right; raise it where nothing reads it
    /// (VIPs from a file, or another forwarding plane that lags its VIP source).
    #[arg(long, env = "UNIDLER_REPLAY_AFTER", default_value = "0s", value_parser = humantime_duration)]
    replay_after: Duration,
    /// The OVN integration bridge's OpenFlow management socket (`ovs-ofctl` target). With VIPs
    /// from OVN, held packets of a VIP are replayed once the bridge's flows carry its new
    /// backend (read with `ovs-ofctl`): a replay that met ovn-controller's old flows would be
    /// dropped and punted to ovn-controller. Empty: replay as soon as the Southbound database
    /// has the backend.
    #[arg(
        long,
        env = "UNIDLER_OPENFLOW_BRIDGE",
        default_value = "unix:/var/run/openvswitch/br-int.mgmt"
    )]
    openflow_bridge: String,
    /// Events all VIPs together may raise back to back.
    #[arg(long, env = "UNIDLER_EVENT_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    event_burst: u32,
    /// OVN Southbound database remotes (`unix:PATH`, `tcp:HOST:PORT`, `ssl:HOST:PORT`,
    /// comma-separated). With it, idle hits become Controller_Event rows there (without it,
    /// they are printed on standard output as JSON lines), and, unless --vip or --vips-file
    /// is given, the VIPs come from its Load_Balancer table (the load balancers with
    /// options:event=true, every one with SB_Global options:controller_event=true; never
    /// those with options:reject=true, as in OVN).
    #[arg(long, env = "UNIDLER_OVNSB_DB")]
    ovnsb_db: Option<String>,
    /// Name of this node's Chassis row. Default: `external_ids:system-id` of the local
    /// Open_vSwitch database (see --ovs-db), else the hostname.
    #[arg(long, env = "UNIDLER_CHASSIS")]
    chassis: Option<String>,
    /// The local Open_vSwitch database, asked for the default chassis name.
    #[arg(
        long,
        env = "UNIDLER_OVS_DB",
        default_value = "unix:/var/run/openvswitch/db.sock"
    )]
    ovs_db: String,
    /// Private key (PEM) for `ssl:` Southbound remotes, as ovn-controller's -p.
    #[arg(long, env = "UNIDLER_OVNSB_PRIVATE_KEY", requires_all = ["ovnsb_certificate", "ovnsb_ca_cert"])]
    ovnsb_private_key: Option<PathBuf>,
    /// Certificate (PEM) for `ssl:` Southbound remotes, as ovn-controller's -c.
    #[arg(
        long,
        env = "UNIDLER_OVNSB_CERTIFICATE",
        requires = "ovnsb_private_key"
    )]
    ovnsb_certificate: Option<PathBuf>,
    /// CA certificate (PEM) for `ssl:` Southbound remotes, as ovn-controller's -C.
    #[arg(long, env = "UNIDLER_OVNSB_CA_CERT", requires = "ovnsb_private_key")]
    ovnsb_ca_cert: Option<PathBuf>,
    /// Largest message accepted from the Southbound database, in bytes. The first monitor
    /// reply carries every load balancer (about 200 bytes each); a larger
    /// one is refused,
    /// logged, and asked for again after the longest backoff.
    #[arg(long, env = "UNIDLER_OVSDB_MAX_MESSAGE_SIZE", default_value = "64MiB", value_parser = byte_size)]
    ovsdb_max_message_size: usize,
    /// With a clustered Southbound database, connect to any member instead of the leader only:
    /// the members (or OVSDB relays) share the load of every node's monitors; writes are
    /// forwarded to the leader. (ovn-controller connects this way too.)
    #[arg(long, env = "UNIDLER_OVNSB_ANY_MEMBER")]
    ovnsb_any_member: bool,
    /// Which existing Controller_Event rows make a hit a duplicate: this chassis' (as
    /// ovn-controller: every node reports once) or any chassis' (a wake-up storm across the
    /// cluster writes about one row; ovn-kubernetes consumes it unchanged).
    #[arg(long, value_enum, env = "UNIDLER_DEDUP", default_value_t = Dedup::Chassis)]
    dedup: Dedup,
    /// Most idle hits waiting to be written, and, separately, most waiting for their load
    /// balancer's name (one per VIP); beyond either, hits are dropped and counted
    /// (dropped_overflow).
    #[arg(long, env = "UNIDLER_EVENT_QUEUE_SIZE", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    event_queue_size: u64,
    /// Where state that outlives the process is kept (the last Controller_Event seq_num).
    #[arg(long, env = "UNIDLER_STATE_DIR", default_value = "/var/lib/unidler")]
    state_dir: PathBuf,
    /// Address of the metrics and health endpoint: /metrics (Prometheus), /healthz, /readyz.
    /// `IP:PORT` (`[IP]:PORT` for IPv6), or `:PORT` for every address of the node, IPv4 and
    /// IPv6.
    #[arg(long, env = "UNIDLER_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR, value_parser = listen_addr)]
    metrics_addr: SocketAddr,
    /// Address of the inspection API (/api/vips, /api/events, /api/wakeups,
    /// /api/interfaces: the VIP table and client addresses), which `unidler vips`, `events`,
    /// `wakeups` and `interfaces` ask. Keep it on loopback unless every client that can reach
    /// it may see that.
    #[arg(long, env = "UNIDLER_API_ADDR", default_value = DEFAULT_API_ADDR, value_parser = listen_addr)]
    api_addr: SocketAddr,
    /// How often to log a summary of the kernel counters (0 turns it off).
    #[arg(long, env = "UNIDLER_SUMMARY_INTERVAL", default_value = "60s", value_parser = humantime_duration)]
    summary_interval: Duration,
}

/// `--xdp-mode`'s values.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdpMode {
    /// Native where the driver supports it, else generic.
    Auto,
    /// In the driver.
    Native,
    /// In the generic network stack.
    Generic,
}

/// The hook from `--hook`, or, while that is auto, the older `--xdp-mode`.
fn hook(hook: Hook, xdp_mode: Option<XdpMode>) -> Hook {
    match (hook, xdp_mode) {
        (Hook::Auto, Some(XdpMode::Native)) => Hook::Xdp,
        (Hook::Auto, Some(XdpMode::Generic)) => Hook::XdpGeneric,
        (Hook::Auto, Some(XdpMode::Auto)) => Hook::XdpAny,
        (hook, _) => hook,
    }
}

/// Keeps glibc's malloc from raising its mmap threshold as it does by default once a large
/// block is freed: after the first monitor reply (15 MB with 100,000 load balancers), the
/// tables built next would otherwise come from the heap, where what a sync frees in between
/// stays resident. With a fixed threshold, every block over 256 KiB is its own mapping,
/// given back whole when freed.
pub(crate) fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator settings, before any thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// What clap cannot see is wrong with `run`'s options, said as a usage error.
pub(crate) fn usage_error(args: &RunArgs) -> Option<String> {
    if args.ifaces.is_empty() && !args.ovn_vifs && !args.ovn_uplinks {
        // Clap counts UNIDLER_OVN_VIFS=false as given.
        return Some(
            "no interfaces: give --iface, --ovn-vifs or --ovn-uplinks (UNIDLER_IFACE, \
             UNIDLER_OVN_VIFS=true, UNIDLER_OVN_UPLINKS=true)"
                .to_owned(),
        );
    }
    let ssl = args
        .ovnsb_db
        .as_deref()?
        .split(',')
        .map(str::trim)
        .find(|r| r.starts_with("ssl:"))?;
    args.ovnsb_private_key.is_none().then(|| {
        format!(
            "--ovnsb-db {ssl}: an ssl: remote needs --ovnsb-private-key, --ovnsb-certificate \
             and --ovnsb-ca-cert (the files ovn-controller takes as -p, -c and -C)"
        )
    })
}

/// The agent's configuration from the command line.
fn config(args: RunArgs) -> Result<Config> {
    let vips = match (args.vips_file, args.vips.is_empty(), &args.ovnsb_db) {
        (Some(path), _, _) => VipSourceConfig::File(path),
        (None, false, _) => {
            VipSourceConfig::Static(args.vips.iter().map(VipSpec::desired).collect())
        }
        (None, true, Some(_)) => VipSourceConfig::Ovn,
        (None, true, None) => VipSourceConfig::None,
    };
    let southbound = match &args.ovnsb_db {
        Some(remotes) => Some(SouthboundConfig {
            remotes: ovsdb::Remote::parse_list(remotes).context("--ovnsb-db")?,
            tls: match (
                args.ovnsb_private_key,
                args.ovnsb_certificate,
                args.ovnsb_ca_cert,
            ) {
                (Some(private_key), Some(certificate), Some(ca_certificate)) => {
                    Some(ovsdb::TlsFiles {
                        private_key,
                        certificate,
                        ca_certificate,
                    })
                }
                _ => None,
            },
            chassis: args.chassis,
            ovs_db: args.ovs_db.clone(),
            max_message_bytes: args.ovsdb_max_message_size,
            leader_only: !args.ovnsb_any_member,
        }),
        None => None,
    };
    let interfaces = args
        .ifaces
        .iter()
        .map(|i| InterfaceSelector::parse(i).with_context(|| format!("--iface {i:?}")))
        .collect::<Result<_>>()?;
    Ok(Config {
        interfaces,
        hook: hook(args.hook, args.xdp_mode),
        ovn_interfaces: if args.ovn_vifs || args.ovn_uplinks {
            let remotes = ovsdb::Remote::parse_list(&args.ovs_db).context("--ovs-db")?;
            let follow = unidler::ovn::ovs_interfaces::Follow {
                vifs: args.ovn_vifs,
                uplinks: args.ovn_uplinks,
            };
            Some((remotes, follow))
        } else {
            None
        },
        vips,
        max_vips: args.max_vips,
        pin_dir: args.pin_dir,
        idle_action: args.idle_action,
        rate_limits: RateLimitConfig::new(
            args.vip_event_rate,
            args.vip_event_burst,
            args.event_rate,
            args.event_burst,
        ),
        fail_open_after: args.fail_open_after,
        hold: unidler::hold::HoldLimits {
            per_vip: args.hold_per_vip as usize,
            total: args.hold_total as usize,
            max_age: args.hold_max_age,
            replay_after: args.replay_after,
        },
        forwarding: (!args.openflow_bridge.is_empty()).then(|| {
            unidler::ovn::forwarding::FlowReader {
                target: args.openflow_bridge.clone(),
                max_wait: Duration::from_secs(10),
            }
        }),
        southbound,
        event_queue_size: usize::try_from(args.event_queue_size).unwrap_or(usize::MAX),
        dedup: args.dedup,
        state_dir: args.state_dir,
        metrics_addr: args.metrics_addr,
        api_addr: args.api_addr,
        summary_interval: args.summary_interval,
        kernel_log_level: match LevelFilter::current() {
            l if l >= LevelFilter::DEBUG => 4,
            _ => 3,
        },
    })
}

/// Runs the agent until SIGINT or SIGTERM.
pub(crate) async fn run(args: RunArgs) -> Result<()> {
    Agent::start(config(args)?).await?.run().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_older_xdp_mode_applies_only_while_the_hook_is_auto() {
        assert_eq!(hook(Hook::Auto, None), Hook::Auto);
        assert_eq!(hook(Hook::Auto, Some(XdpMode::Native)), Hook::Xdp);
        assert_eq!(hook(Hook::Tc, Some(XdpMode::Native)), Hook::Tc);
    }
}
