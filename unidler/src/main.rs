//! `unidler`: notices the first packet sent to an idle service and reports it.

use std::{io, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::{EnvFilter, filter::LevelFilter};
use unidler::{
    agent::{self, Agent, Config, InterfaceSelector, VipSourceConfig},
    datapath::Hook,
    southbound::SouthboundConfig,
    telemetry::{self, EventRow, InterfaceRow, VipRow, WakeupRow},
    vip::VipSpec,
};
use unidler_common::RateLimitConfig;

#[derive(Parser)]
#[command(
    name = "unidler",
    version,
    about = "Wakes idled services: an XDP datapath notices the first packet sent to a \
             load-balancer VIP with no backends and reports it.",
    long_about = None,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(flatten)]
    logging: LoggingArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to interfaces, and report idle hits.
    ///
    /// Each event is written to standard output as one JSON object per line; logs go to
    /// standard error. SIGINT or SIGTERM detaches the program and exits.
    Run(Box<RunArgs>),
    /// Show the VIP table of a running agent: backends, state, hits, load balancer.
    Vips(ClientArgs),
    /// Show the most recent idle hits a running agent saw, and what became of each.
    Events(ClientArgs),
    /// Show a running agent's last wake-ups: each phase's time from the first packet (our
    /// row committed, consumed by the CMS, a backend, the forwarding ready, the first replay,
    /// the end) and the outcome.
    Wakeups(ClientArgs),
    /// Show the interfaces a running agent's datapath is on, and with which hook.
    Interfaces(ClientArgs),
    /// Remove a datapath left pinned by `run --pin-dir`: its attachments (detached once no agent
    /// holds them: stop the agent first) and its maps, and the directory.
    Detach(DetachArgs),
    /// Print this message or the help of the given subcommand.
    Help {
        /// The subcommand.
        command: Option<String>,
    },
}

#[derive(Args)]
struct DetachArgs {
    /// The agent's --pin-dir.
    #[arg(long, env = "UNIDLER_PIN_DIR")]
    pin_dir: PathBuf,
}

#[derive(Args)]
struct ClientArgs {
    /// The agent's --api-addr.
    #[arg(long, env = "UNIDLER_API_ADDR", default_value = DEFAULT_API_ADDR)]
    api_addr: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long, env = "UNIDLER_JSON")]
    json: bool,
}

/// Metrics and health: loopback by default; the DaemonSet serves them on the node's address.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// The inspection API exposes the node's VIP table and client addresses: loopback by default.
const DEFAULT_API_ADDR: &str = "127.0.0.1:9478";

#[derive(Args)]
struct LoggingArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, global = true, env = "UNIDLER_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "UNIDLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Args)]
struct RunArgs {
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
    /// off; native XDP on physical ones), xdp (native), xdp-generic, or tc.
    #[arg(long, value_enum, env = "UNIDLER_HOOK", default_value_t = HookArg::Auto)]
    hook: HookArg,
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
    /// A file listing VIPs (TOML, see the README), reloaded when it changes or on SIGHUP;
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
    #[arg(long, value_enum, env = "UNIDLER_DEDUP", default_value_t = DedupArg::Chassis)]
    dedup: DedupArg,
    /// Most idle hits waiting for the database; beyond it they are dropped (and counted).
    #[arg(long, env = "UNIDLER_EVENT_QUEUE_SIZE", default_value_t = 10_000)]
    event_queue_size: usize,
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IdleAction {
    /// Drop the packet (`XDP_DROP`).
    Drop,
    /// Pass the packet on (`XDP_PASS`).
    Pass,
}

impl From<IdleAction> for agent::IdleAction {
    fn from(action: IdleAction) -> Self {
        match action {
            IdleAction::Drop => agent::IdleAction::Drop,
            IdleAction::Pass => agent::IdleAction::Pass,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DedupArg {
    /// Our chassis' rows.
    Chassis,
    /// Any chassis' rows.
    Cluster,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HookArg {
    /// TC on virtual interfaces, native XDP on physical ones.
    Auto,
    /// XDP in the driver.
    Xdp,
    /// XDP in the generic network stack.
    XdpGeneric,
    /// TC ingress.
    Tc,
}

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
fn hook(hook: HookArg, xdp_mode: Option<XdpMode>) -> Hook {
    match (hook, xdp_mode) {
        (HookArg::Auto, None) => Hook::Auto,
        (HookArg::Xdp, _) | (HookArg::Auto, Some(XdpMode::Native)) => Hook::Xdp,
        (HookArg::XdpGeneric, _) | (HookArg::Auto, Some(XdpMode::Generic)) => Hook::XdpGeneric,
        (HookArg::Tc, _) => Hook::Tc,
        (HookArg::Auto, Some(XdpMode::Auto)) => Hook::XdpAny,
    }
}

/// A duration: a number and a unit (ms, s, m, h, d), or several (`1h30m`); a bare number is
/// seconds.
fn humantime_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?} (e.g. 500ms, 30s, 5m, 1h, 1h30m)");
    if s.is_empty() {
        return Err(bad());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let unit = &rest[digits..digits + unit_len];
        let one = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3_600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        total = u32::try_from(n)
            .ok()
            .and_then(|n| one.checked_mul(n))
            .and_then(|d| total.checked_add(d))
            .ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// A size in bytes: a number, with an optional unit: KiB, MiB, GiB (or Ki, Mi, Gi, K, M, G:
/// powers of 1024) or kB, MB, GB (powers of 1000).
fn byte_size(s: &str) -> Result<usize, String> {
    let bad = || format!("bad size {s:?} (e.g. 67108864, 64MiB, 64Mi, 100MB)");
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..at].parse().map_err(|_| bad())?;
    let unit: usize = match s[at..].trim() {
        "" | "B" => 1,
        "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

/// An address to listen on: `IP:PORT`, `[IP]:PORT`, or `:PORT` for every address (`[::]`,
/// which takes IPv4 too; the endpoint falls back to 0.0.0.0 on a node without IPv6).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in {s:?} (e.g. :9477)"))?;
        return Ok(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            port,
        ));
    }
    s.parse().map_err(|_| {
        format!("bad address {s:?} (IP:PORT, [IPv6]:PORT, or :PORT for every address)")
    })
}

/// Keeps glibc's malloc from raising its mmap threshold as it does by default once a large
/// block is freed: after the first monitor reply (15 MB with 100,000 load balancers), the
/// tables built next would otherwise come from the heap, where what a sync frees in between
/// stays resident. With a fixed threshold, every block over 256 KiB is its own mapping,
/// given back whole when freed.
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator settings, before any thread is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_logging(&cli.logging) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => {
            if let Some(usage) = usage_error(&args) {
                eprintln!("error: {usage}");
                return ExitCode::from(2);
            }
            fixed_mmap_threshold();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")
                .and_then(|rt| rt.block_on(run(*args)))
        }
        Command::Vips(args) => show_vips(&args),
        Command::Events(args) => show_events(&args),
        Command::Wakeups(args) => show_wakeups(&args),
        Command::Interfaces(args) => show_interfaces(&args),
        Command::Detach(args) => detach(&args),
        Command::Help { command } => print_help(command.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Said whatever the filter: the reason the agent stops is never hidden.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `unidler help [COMMAND]`: the same text as `--help`.
fn print_help(command: Option<&str>) -> Result<()> {
    use clap::CommandFactory as _;
    let mut cli = Cli::command();
    // Built, so that a subcommand's usage names the binary (`unidler run`).
    cli.build();
    let help = match command {
        None => cli.render_long_help(),
        Some(name) => cli
            .find_subcommand_mut(name)
            .with_context(|| format!("no subcommand {name:?} (see `unidler --help`)"))?
            .render_long_help(),
    };
    print!("{help}");
    Ok(())
}

/// What clap cannot see is wrong with `run`'s options, said as a usage error.
fn usage_error(args: &RunArgs) -> Option<String> {
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

/// The log levels `--log-level` takes by name (`warning` as `warn`).
const LOG_LEVELS: [&str; 7] = ["off", "error", "warn", "warning", "info", "debug", "trace"];

fn init_logging(args: &LoggingArgs) -> Result<()> {
    let text = args.log_level.trim();
    let bad = |why: String| {
        anyhow::anyhow!(
            "bad log level {text:?} (--log-level, UNIDLER_LOG_LEVEL): {why}; expected one of \
             off, error, warn, info, debug, trace, or tracing directives (TARGET=LEVEL,...)"
        )
    };
    // A bare word is a level: tracing would take an unknown one for a target, and log
    // nothing else, errors included.
    let text = if text.contains(['=', ',']) {
        text.to_owned()
    } else {
        match text.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_owned(),
            level if LOG_LEVELS.contains(&level) => level.to_owned(),
            _ => return Err(bad("not a level".into())),
        }
    };
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(&text)
        .map_err(|e| {
            bad(e
                .to_string()
                .split(": ")
                .next()
                .unwrap_or_default()
                .to_owned())
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
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
            let follow = unidler::ovs_interfaces::Follow {
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
        idle_action: args.idle_action.into(),
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
        forwarding: (!args.openflow_bridge.is_empty()).then(|| unidler::forwarding::FlowReader {
            target: args.openflow_bridge.clone(),
            max_wait: Duration::from_secs(10),
        }),
        southbound,
        event_queue_size: args.event_queue_size,
        dedup: match args.dedup {
            DedupArg::Chassis => unidler::sink::Dedup::Chassis,
            DedupArg::Cluster => unidler::sink::Dedup::Cluster,
        },
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

async fn run(args: RunArgs) -> Result<()> {
    Agent::start(config(args)?).await?.run().await
}

fn detach(args: &DetachArgs) -> Result<()> {
    let detached = unidler::pinning::remove(&args.pin_dir)
        .with_context(|| format!("--pin-dir {}", args.pin_dir.display()))?;
    for iface in &detached {
        println!("detached from {iface}");
    }
    println!(
        "removed {} ({} attachments, and the maps)",
        args.pin_dir.display(),
        detached.len()
    );
    Ok(())
}

fn show_vips(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.api_addr, "/api/vips")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<VipRow> = serde_json::from_str(&body).context("agent's VIP table")?;
    let table: Vec<[String; 8]> = rows
        .into_iter()
        .map(|r| {
            // A scoped VIP's state per scope: `scope:backends`.
            let scopes = if r.scopes.is_empty() {
                "-".to_owned()
            } else {
                r.scopes
                    .iter()
                    .map(|s| format!("{}:{}", s.scope, s.backends))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            [
                r.vip,
                r.protocol,
                r.state,
                r.backends.to_string(),
                r.hits.to_string(),
                r.held.to_string(),
                r.load_balancer.unwrap_or_else(|| "-".into()),
                scopes,
            ]
        })
        .collect();
    print_table(
        [
            "VIP",
            "PROTO",
            "STATE",
            "BACKENDS",
            "HITS",
            "HELD",
            "LOAD BALANCER",
            "SCOPES",
        ],
        &table,
    );
    Ok(())
}

fn show_interfaces(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.api_addr, "/api/interfaces")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<InterfaceRow> = serde_json::from_str(&body).context("agent's interfaces")?;
    let table: Vec<[String; 5]> = rows
        .into_iter()
        .map(|r| {
            let scope = r.scope.map_or_else(|| "-".into(), |s| s.to_string());
            [r.iface, r.ifindex.to_string(), r.hook, scope, r.attachment]
        })
        .collect();
    print_table(
        ["INTERFACE", "IFINDEX", "HOOK", "SCOPE", "ATTACHMENT"],
        &table,
    );
    Ok(())
}

fn show_events(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.api_addr, "/api/events")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<EventRow> = serde_json::from_str(&body).context("agent's events")?;
    let table: Vec<[String; 7]> = rows
        .into_iter()
        .map(|e| {
            [
                e.time,
                e.vip,
                e.protocol,
                e.src,
                e.iface,
                e.action,
                e.wakeup.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        [
            "TIME", "VIP", "PROTO", "SOURCE", "IFACE", "ACTION", "WAKE-UP",
        ],
        &table,
    );
    Ok(())
}

fn show_wakeups(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.api_addr, "/api/wakeups")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<WakeupRow> = serde_json::from_str(&body).context("agent's wake-ups")?;
    let phase = |row: &WakeupRow, name: &str| {
        row.phases
            .iter()
            .find(|(p, _)| p == name)
            .map_or_else(|| "-".into(), |(_, s)| format!("{s:.3}"))
    };
    let table: Vec<[String; 13]> = rows
        .iter()
        .map(|r| {
            [
                r.started.clone(),
                r.vip.clone(),
                r.protocol.clone(),
                r.load_balancer.clone().unwrap_or_else(|| "-".into()),
                r.outcome.clone().unwrap_or_else(|| "waking".into()),
                r.held.to_string(),
                r.replayed.to_string(),
                phase(r, "committed"),
                phase(r, "consumed"),
                phase(r, "backend"),
                phase(r, "forwarding"),
                phase(r, "replayed"),
                phase(r, "finished"),
            ]
        })
        .collect();
    println!("Seconds from the first packet to each phase:");
    print_table(
        [
            "STARTED",
            "VIP",
            "PROTO",
            "LOAD BALANCER",
            "OUTCOME",
            "HELD",
            "REPLAYED",
            "COMMITTED",
            "CONSUMED",
            "BACKEND",
            "FORWARDING",
            "REPLAYED AT",
            "FINISHED",
        ],
        &table,
    );
    Ok(())
}

/// Prints rows under a header with every column aligned.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_every_unit_and_combinations() {
        let d = |s| humantime_duration(s);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(d("15"), Ok(Duration::from_secs(15)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(d("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "s", "1x", "1h30", "-1s", "99999999999999999999s"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(byte_size("67108864"), Ok(64 << 20));
        assert_eq!(byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(byte_size("64Mi"), Ok(64 << 20));
        assert_eq!(byte_size("100MB"), Ok(100_000_000));
        assert_eq!(byte_size("1GiB"), Ok(1 << 30));
        for bad in ["", "MiB", "64 XB", "1.5MiB"] {
            assert!(byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_addresses_take_a_bare_port_for_every_address() {
        assert_eq!(listen_addr(":9477"), Ok("[::]:9477".parse().unwrap()));
        assert_eq!(
            listen_addr("127.0.0.1:9477"),
            Ok("127.0.0.1:9477".parse().unwrap())
        );
        assert_eq!(
            listen_addr("[fd00::1]:9477"),
            Ok("[fd00::1]:9477".parse().unwrap())
        );
        assert!(listen_addr("fd00::1:9477").is_err());
        assert!(listen_addr(":http").is_err());
    }

    #[test]
    fn the_older_xdp_mode_applies_only_while_the_hook_is_auto() {
        assert_eq!(hook(HookArg::Auto, None), Hook::Auto);
        assert_eq!(hook(HookArg::Auto, Some(XdpMode::Native)), Hook::Xdp);
        assert_eq!(hook(HookArg::Tc, Some(XdpMode::Native)), Hook::Tc);
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
