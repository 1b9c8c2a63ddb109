//! `unidler`: notices the first packet sent to an idle service and reports it.

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, info, warn};
use tracing_subscriber::{EnvFilter, filter::LevelFilter};
use unidler::{
    datapath::{AttachMode, Counters, Datapath, LoadOptions},
    event::{IdleHit, iface_name},
    registry::{MapChange, VipRegistry},
    sink::{self, ControllerEventSink, SinkOptions, default_chassis_name},
    telemetry::{self, Query, Readiness, Snapshot, VipRow},
    vip::VipSpec,
    vipsource::{self, DesiredVip, VipUpdate},
};
use unidler_common::{Counter, RateLimitConfig, VIP_FLAG_PASS_WHEN_IDLE};

#[derive(Parser)]
#[command(
    name = "unidler",
    version,
    about = "Wakes idled services: an XDP datapath notices the first packet sent to a \
             load-balancer VIP with no backends and reports it.",
    long_about = None
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
    /// Show the most recent idle hits a running agent saw.
    Events(ClientArgs),
}

#[derive(Args)]
struct ClientArgs {
    /// The agent's --metrics-addr.
    #[arg(long, env = "UNIDLER_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long, env = "UNIDLER_JSON")]
    json: bool,
}

/// Loopback only by default: the endpoint exposes the node's VIP table.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// Idle hits kept for `unidler events`.
const RECENT_EVENTS: usize = 100;

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
    /// Interface to attach to; repeat for several.
    #[arg(
        long = "iface",
        required = true,
        env = "UNIDLER_IFACE",
        value_delimiter = ','
    )]
    ifaces: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, env = "UNIDLER_XDP_MODE", default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// A VIP, `IP:PORT/PROTO[=BACKENDS]` (IPv6 as `[IP]:PORT/PROTO`); no `=BACKENDS` means
    /// zero backends, an idle service. Repeat for several.
    #[arg(long = "vip", env = "UNIDLER_VIP", value_delimiter = ',')]
    vips: Vec<VipSpec>,
    /// A file listing VIPs (TOML, see the README), reloaded when it changes or on SIGHUP;
    /// for nodes without OVN. A malformed file is rejected and the last good VIPs stay.
    #[arg(long, env = "UNIDLER_VIPS_FILE", conflicts_with = "vips")]
    vips_file: Option<PathBuf>,
    /// What to do with the opening packet to an idle VIP: drop it (as OVN does) or pass it on.
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
    /// Events all VIPs together may raise back to back.
    #[arg(long, env = "UNIDLER_EVENT_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    event_burst: u32,
    /// OVN Southbound database remotes (`unix:PATH`, `tcp:HOST:PORT`, `ssl:HOST:PORT`,
    /// comma-separated). With it, idle hits become Controller_Event rows there (without it,
    /// they are printed on standard output as JSON lines), and, unless --vip or --vips-file
    /// is given, the VIPs come from its Load_Balancer table.
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
    /// Most idle hits waiting for the database; beyond it they are dropped (and counted).
    #[arg(long, env = "UNIDLER_EVENT_QUEUE_SIZE", default_value_t = 10_000)]
    event_queue_size: usize,
    /// Where state that outlives the process is kept (the last Controller_Event seq_num).
    #[arg(long, env = "UNIDLER_STATE_DIR", default_value = "/var/lib/unidler")]
    state_dir: PathBuf,
    /// Address of the HTTP endpoint: /metrics (Prometheus), /healthz, /readyz, /api/vips,
    /// /api/events.
    #[arg(long, env = "UNIDLER_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
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

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 30s, 5m, 500ms)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_logging(&cli.logging) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(*args))),
        Command::Vips(args) => show_vips(&args),
        Command::Events(args) => show_events(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(args: &LoggingArgs) -> Result<()> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(&args.log_level)
        .with_context(|| format!("bad --log-level {:?}", args.log_level))?;
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

async fn run(args: RunArgs) -> Result<()> {
    // Fail on a typo before touching the kernel.
    for iface in &args.ifaces {
        unidler::datapath::ifindex_of(iface)?;
    }
    let kernel_log_level = match LevelFilter::current() {
        l if l >= LevelFilter::DEBUG => 4,
        _ => 3,
    };
    let mut datapath = Datapath::load(&LoadOptions {
        rate_limits: RateLimitConfig::new(
            args.vip_event_rate,
            args.vip_event_burst,
            args.event_rate,
            args.event_burst,
        ),
        kernel_log_level,
    })?;

    // The Southbound connection, shared by the event sink and the OVN VIP source.
    let source = vip_source(&args);
    let southbound = match &args.ovnsb_db {
        Some(remotes) => Some(connect_southbound(&args, remotes, source == Source::Ovn).await?),
        None => None,
    };
    let sink = southbound.as_ref().map(|(client, chassis)| {
        ControllerEventSink::start(
            client.clone(),
            SinkOptions {
                chassis: chassis.clone(),
                queue_capacity: args.event_queue_size,
                state_dir: Some(args.state_dir.clone()),
            },
        )
    });

    // Health and metrics from now on; /readyz says what is still missing.
    let readiness = Arc::new(Readiness::default());
    let (query_tx, mut queries) = mpsc::channel(16);
    let bound = telemetry::serve(args.metrics_addr, query_tx, readiness.clone(), sink.clone())
        .await
        .with_context(|| format!("serving --metrics-addr {}", args.metrics_addr))?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz, /api/vips, /api/events");

    // VIPs: from a file, from --vip flags, or from OVN.
    let flags = match args.idle_action {
        IdleAction::Drop => 0,
        IdleAction::Pass => VIP_FLAG_PASS_WHEN_IDLE,
    };
    let mut registry = VipRegistry::new();
    let (vip_tx, mut vip_updates) = mpsc::unbounded_channel();
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    // Static VIPs go in before attaching; a bad file fails the start. (The file's time is
    // read first, so a change made while it loads is picked up by the file source.)
    let file_loaded_at = match &source {
        Source::File(path) => vipsource::modified(path),
        _ => None,
    };
    let initial = match &source {
        Source::File(path) => Some(
            vipsource::load(path)
                .map_err(|e| anyhow::anyhow!("--vips-file {}: {e}", path.display()))?,
        ),
        Source::Flags => Some(
            args.vips
                .iter()
                .map(|s| DesiredVip {
                    vip: s.vip,
                    backends: s.backends,
                    load_balancer: s.load_balancer.as_deref().map(Into::into),
                })
                .collect(),
        ),
        Source::Ovn | Source::None => None,
    };
    if let Some(vips) = initial {
        apply_vips(
            &mut datapath,
            &mut registry,
            VipUpdate::Replace(vips),
            flags,
        )?;
    }
    match source.clone() {
        Source::File(path) => vipsource::spawn_file_source(
            path,
            file_loaded_at,
            Duration::from_secs(1),
            reload_rx,
            vip_tx,
        ),
        Source::Ovn => {
            let (client, _) = southbound.as_ref().expect("OVN source needs --ovnsb-db");
            vipsource::spawn_ovn_source(client.clone(), vip_tx);
        }
        Source::Flags => {}
        Source::None => {
            warn!(
                "no VIPs (--vip, --vips-file or --ovnsb-db): every packet passes, nothing is reported"
            )
        }
    }

    for iface in &args.ifaces {
        let ifindex = datapath.attach(iface, args.xdp_mode)?;
        info!(iface, ifindex, mode = ?args.xdp_mode, "XDP program attached");
    }
    readiness.attached.store(true, Ordering::Relaxed);
    if source != Source::Ovn {
        // Static VIPs were applied before attaching.
        readiness.vips_synced.store(true, Ordering::Relaxed);
    }
    let names: HashMap<u32, String> = datapath
        .attached()
        .map(|(name, index)| (index, name.to_owned()))
        .collect();
    info!(
        vips = registry.len(),
        idle = registry.idle_count(),
        "watching for connection attempts to idle VIPs"
    );

    let mut events = readable(datapath.take_events().context("event ring already taken")?)
        .context("registering the event ring with epoll")?;
    let mut logger = match datapath.take_logger() {
        Some(logger) => Some(readable(logger).context("registering the kernel log ring")?),
        None => None,
    };
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut summary = (!args.summary_interval.is_zero()).then(|| {
        tokio::time::interval_at(
            tokio::time::Instant::now() + args.summary_interval,
            args.summary_interval,
        )
    });
    let mut last_summary = datapath.counters()?;
    let mut stdout = io::stdout().lock();

    let mut recent: VecDeque<IdleHit> = VecDeque::with_capacity(RECENT_EVENTS);
    let mut events_received = 0u64;

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                let mut write_err = None;
                ring.drain(|event| {
                    let Some(hit) = IdleHit::resolve(&event, &registry, |i| {
                        names.get(&i).cloned().unwrap_or_else(|| iface_name(i))
                    }) else {
                        warn!(vip_id = event.vip_id, proto = event.vip.proto, "event for an unknown VIP");
                        return;
                    };
                    debug!(vip = %hit.vip, protocol = %hit.protocol, src = %hit.src, iface = %hit.iface, "idle hit");
                    events_received += 1;
                    if recent.len() == RECENT_EVENTS {
                        recent.pop_front();
                    }
                    recent.push_back(hit.clone());
                    if let Some(sink) = &sink {
                        sink.submit(&hit);
                    } else if write_err.is_none()
                        && let Err(e) = serde_json::to_writer(&mut stdout, &hit)
                            .map_err(io::Error::from)
                            .and_then(|()| stdout.write_all(b"\n"))
                    {
                        write_err = Some(e);
                    }
                });
                guard.clear_ready();
                if let Some(e) = write_err.or_else(|| stdout.flush().err()) {
                    bail!("writing events to standard output: {e}");
                }
            }
            guard = async { logger.as_mut().expect("guarded by if").readable_mut().await }, if logger.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = async { summary.as_mut().expect("guarded by if").tick().await }, if summary.is_some() => {
                let now = datapath.counters()?;
                log_summary("last interval", &now.since(&last_summary));
                last_summary = now;
                if let Some(sink) = &sink {
                    log_sink_totals(sink);
                }
            }
            Some(update) = vip_updates.recv() => {
                if matches!(update, VipUpdate::Replace(_)) {
                    readiness.vips_synced.store(true, Ordering::Relaxed);
                }
                apply_vips(&mut datapath, &mut registry, update, flags)?;
            }
            Some(query) = queries.recv() => match query {
                Query::Snapshot(reply) => {
                    let idle = registry.idle_count() as u64;
                    let _ = reply.send(Snapshot {
                        kernel: datapath.counters()?,
                        vips_idle: idle,
                        vips_active: registry.len() as u64 - idle,
                        events_received,
                    });
                }
                Query::Vips(reply) => {
                    let mut rows: Vec<VipRow> = registry
                        .entries()
                        .map(|e| VipRow {
                            vip: e.vip.endpoint(),
                            protocol: e.vip.protocol.to_string(),
                            backends: e.backends,
                            state: if e.backends == 0 { "idle" } else { "active" }.into(),
                            hits: datapath.vip(&e.vip.key()).map_or(0, |s| s.hits),
                            load_balancer: e.load_balancer.as_deref().map(str::to_owned),
                        })
                        .collect();
                    rows.sort_by(|a, b| (&a.vip, &a.protocol).cmp(&(&b.vip, &b.protocol)));
                    let _ = reply.send(rows);
                }
                Query::Events(reply) => {
                    let _ = reply.send(recent.iter().cloned().collect());
                }
            },
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the VIPs file");
                let _ = reload_tx.send(());
            }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
        }
    }
    let totals = datapath.counters()?;
    datapath.detach_all();
    log_summary("totals", &totals);
    if let Some(sink) = &sink {
        if !sink.flush(Duration::from_secs(2)).await {
            warn!(
                waiting = sink.queue_depth(),
                "exiting with idle hits not yet written"
            );
        }
        log_sink_totals(sink);
    }
    Ok(())
}

fn log_sink_totals(sink: &ControllerEventSink) {
    let s = sink.stats();
    info!(
        received = s.received.load(Ordering::Relaxed),
        written = s.written.load(Ordering::Relaxed),
        deduplicated = s.deduplicated.load(Ordering::Relaxed),
        dropped_overflow = s.dropped_overflow.load(Ordering::Relaxed),
        failed = s.failed.load(Ordering::Relaxed),
        queued = sink.queue_depth(),
        connected = sink.client().is_connected(),
        "Controller_Event totals"
    );
}

/// Where the VIPs come from; the first that applies: `--vips-file`, `--vip`, `--ovnsb-db`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Flags,
    Ovn,
    None,
}

fn vip_source(args: &RunArgs) -> Source {
    match (&args.vips_file, args.vips.is_empty(), &args.ovnsb_db) {
        (Some(path), _, _) => Source::File(path.clone()),
        (None, false, _) => Source::Flags,
        (None, true, Some(_)) => Source::Ovn,
        (None, true, None) => Source::None,
    }
}

/// Applies a VIP update to the registry and the kernel map, and says what changed.
fn apply_vips(
    datapath: &mut Datapath,
    registry: &mut VipRegistry,
    update: VipUpdate,
    flags: u32,
) -> Result<()> {
    let started = std::time::Instant::now();
    let full = matches!(update, VipUpdate::Replace(_));
    let changes = registry.apply(update, flags);
    for change in &changes {
        match change {
            MapChange::Upsert(key, state) => datapath.upsert_vip(*key, *state)?,
            MapChange::Remove(key) => datapath.remove_vip(key)?,
        }
    }
    let elapsed_us = started.elapsed().as_micros() as u64;
    if full {
        // A full sync parses and builds large transient structures (the monitor reply of
        // every load balancer); give the freed memory back to the system once they are gone.
        #[cfg(target_env = "gnu")]
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // SAFETY: malloc_trim only releases free heap memory; mallinfo2 only reads.
            let heap = unsafe {
                libc::malloc_trim(0);
                libc::mallinfo2()
            };
            debug!(
                in_use = heap.uordblks + heap.hblkhd,
                free = heap.fordblks,
                "heap trimmed after a full VIP sync"
            );
        });
        info!(
            vips = registry.len(),
            idle = registry.idle_count(),
            changes = changes.len(),
            elapsed_us,
            "VIP map synced"
        );
    } else {
        debug!(changes = changes.len(), elapsed_us, "VIP map updated");
    }
    Ok(())
}

/// Connects to the Southbound database with what the sink (and, for an OVN VIP source, the
/// VIP source) monitors; returns the client and our chassis name.
async fn connect_southbound(
    args: &RunArgs,
    remotes: &str,
    with_vips: bool,
) -> Result<(ovsdb::Client, String)> {
    let remotes = ovsdb::Remote::parse_list(remotes).context("--ovnsb-db")?;
    let tls = match (
        &args.ovnsb_private_key,
        &args.ovnsb_certificate,
        &args.ovnsb_ca_cert,
    ) {
        (Some(key), Some(cert), Some(ca)) => Some(ovsdb::TlsFiles {
            private_key: key.clone(),
            certificate: cert.clone(),
            ca_certificate: ca.clone(),
        }),
        _ => None,
    };
    let chassis = match &args.chassis {
        Some(name) => name.clone(),
        None => default_chassis_name(&args.ovs_db).await,
    };
    let mut monitors = sink::monitors(&chassis);
    if with_vips {
        monitors.extend(vipsource::ovn_monitors());
    }
    info!(
        %chassis,
        db = ?remotes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vips_from_ovn = with_vips,
        "writing Controller_Event rows"
    );
    let client = sink::connect_southbound(remotes, tls, monitors)
        .context("connecting to the Southbound database")?;
    Ok((client, chassis))
}

fn show_vips(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.metrics_addr, "/api/vips").map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<VipRow> = serde_json::from_str(&body).context("agent's VIP table")?;
    let table: Vec<[String; 6]> = rows
        .into_iter()
        .map(|r| {
            [
                r.vip,
                r.protocol,
                r.state,
                r.backends.to_string(),
                r.hits.to_string(),
                r.load_balancer.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        ["VIP", "PROTO", "STATE", "BACKENDS", "HITS", "LOAD BALANCER"],
        &table,
    );
    Ok(())
}

fn show_events(args: &ClientArgs) -> Result<()> {
    let body = telemetry::http_get(args.metrics_addr, "/api/events").map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).context("agent's events")?;
    let field = |v: &serde_json::Value, k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|e| {
            [
                field(e, "timestamp_ns"),
                field(e, "vip"),
                field(e, "protocol"),
                field(e, "src"),
                field(e, "iface"),
                field(e, "action"),
            ]
        })
        .collect();
    print_table(
        [
            "TIME (MONOTONIC NS)",
            "VIP",
            "PROTO",
            "SOURCE",
            "IFACE",
            "ACTION",
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

/// Registers a ring buffer with the runtime's epoll for readability.
fn readable<T: std::os::fd::AsRawFd>(ring: T) -> Result<AsyncFd<T>> {
    // SAFETY: `ring` owns its file descriptor and keeps it open until it is dropped, which
    // happens only when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn log_summary(what: &str, c: &Counters) {
    info!(
        packets = c.get(Counter::Packets),
        vip_hits = c.get(Counter::VipHits),
        idle_hits = c.get(Counter::IdleHits),
        events = c.get(Counter::EventsWritten),
        rate_limited = c.get(Counter::RateLimitedVip) + c.get(Counter::RateLimitedGlobal),
        ring_full = c.get(Counter::RingFull),
        fragments = c.get(Counter::Fragments),
        parse_failures = c.parse_failures(),
        "kernel counters ({what})"
    );
}
