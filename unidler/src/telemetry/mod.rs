//! What an operator sees: Prometheus metrics at `/metrics` ([`metrics`]), `/healthz` and
//! `/readyz` on one endpoint (`--metrics-addr`), and on another, loopback by default
//! (`--api-addr`), JSON for the `unidler vips`, `events`, `wakeups` and `interfaces`
//! commands at `/api/vips`, `/api/events`, `/api/wakeups` and `/api/interfaces`. Both cap
//! their connections and time out slow clients.
//!
//! The VIP registry and the recent events belong to the agent's loop; the HTTP handlers ask
//! it over a channel ([`Query`]), so nothing is shared behind locks.

pub mod metrics;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use unidler_common::VipKey;

pub use crate::wakeup::WakeupRow;
use crate::{datapath::VipHitsReader, ovn::controller_event::ControllerEventWriter};

/// One row of `unidler events`: an idle hit, and what became of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRow {
    /// When the kernel saw the packet, wall-clock (RFC 3339).
    pub time: String,
    /// The VIP in OVN's spelling.
    pub vip: String,
    /// tcp, udp or sctp.
    pub protocol: String,
    /// The client: `IP:PORT` (`[IP]:PORT` for IPv6).
    pub src: String,
    /// The interface it arrived on.
    pub iface: String,
    /// The load balancer its row names, if known.
    pub load_balancer: Option<String>,
    /// What the datapath did with it: `dropped` or `passed`.
    pub action: String,
    /// The outcome of the wake-up it was part of (`waking` while that goes on).
    pub wakeup: Option<String>,
    /// When the kernel saw it, `CLOCK_MONOTONIC` nanoseconds.
    pub timestamp_ns: u64,
}

/// One row of `unidler interfaces`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceRow {
    /// Its name.
    pub iface: String,
    /// Its index.
    pub ifindex: u32,
    /// The hook the datapath is attached with (`xdp`, `xdp-generic`, `xdp-any`, `tc`).
    pub hook: String,
    /// What holds it in the kernel: `xdp link`, `tcx link` (TC, Linux 6.6 and later) or
    /// `clsact filter` (TC before TCX), with `, pinned` where it outlives the agent.
    #[serde(default)]
    pub attachment: String,
    /// Its scope (in OVN, the tunnel key of its logical datapath), if it has one.
    #[serde(default)]
    pub scope: Option<u32>,
}

/// One row of `unidler vips`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VipRow {
    /// `IP:PORT` (`[IP]:PORT` for IPv6).
    pub vip: String,
    /// tcp, udp or sctp.
    pub protocol: String,
    /// Backend count.
    pub backends: u32,
    /// `idle` or `active`.
    pub state: String,
    /// Connection-opening packets the kernel saw for it.
    pub hits: u64,
    /// Opening packets held for it now, to replay once it has a backend.
    #[serde(default)]
    pub held: usize,
    /// Northbound load balancer, if known.
    pub load_balancer: Option<String>,
    /// For a VIP that differs between this node's logical datapaths: its state on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<ScopeRow>,
}

/// A scoped VIP's state on one scope, in `unidler vips`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopeRow {
    /// The scope (in OVN, a logical datapath's tunnel key).
    pub scope: u32,
    /// The VIP's backends there.
    pub backends: u32,
    /// The load balancer events name there.
    pub load_balancer: Option<String>,
}

/// A question for the agent's loop.
pub enum Query {
    /// The VIP table, each row with the VIP's kernel key (hit counts not filled in).
    Vips(oneshot::Sender<Vec<(VipKey, VipRow)>>),
    /// The interfaces the datapath is on.
    Interfaces(oneshot::Sender<Vec<InterfaceRow>>),
    /// The most recent idle hits, oldest first.
    Events(oneshot::Sender<Vec<EventRow>>),
    /// The last wake-ups finished, then those going on.
    Wakeups(oneshot::Sender<Vec<WakeupRow>>),
}

/// Readiness, set by the agent's loop.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The program is attached to every interface.
    pub attached: AtomicBool,
    /// How many interfaces have the program.
    pub interfaces: std::sync::atomic::AtomicUsize,
    /// The VIP source has delivered its first full set.
    pub vips_synced: AtomicBool,
    /// VIPs that do not fit the kernel's VIP map (`--max-vips`).
    pub vips_unfit: std::sync::atomic::AtomicU64,
    /// Interfaces the program should be on but is not (gone, or could not be re-attached).
    pub detached: std::sync::Mutex<Vec<String>>,
}

/// What the health and metrics endpoint reads.
#[derive(Clone)]
struct HealthState {
    ready: Arc<Readiness>,
    writer: Option<ControllerEventWriter>,
    metrics: Arc<Registry>,
}

/// What the inspection API reads.
#[derive(Clone)]
struct ApiState {
    queries: mpsc::Sender<Query>,
    hits: VipHitsReader,
}

/// Most connections an endpoint serves at once as usual (keep-alive, [`HEADER_READ_TIMEOUT`]);
/// a slow or stuck client must not use up the agent's file descriptors, which its database
/// connections need too.
const MAX_CONNECTIONS: usize = 32;
/// Beyond [`MAX_CONNECTIONS`], this many more are served one request each, with
/// [`OVERFLOW_TIMEOUT`] for all of it: idle clients holding every usual slot must not make
/// the kubelet's probes (1 s) fail. Beyond these too, a connection is closed at once.
const OVERFLOW_CONNECTIONS: usize = 64;
/// How long an overflow connection may take, request and answer.
const OVERFLOW_TIMEOUT: Duration = Duration::from_millis(900);
/// Longest time a client may take to send its request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` (where Prometheus and the kubelet
/// reach them) until the process ends. Returns the bound address.
pub async fn serve_health(
    addr: SocketAddr,
    ready: Arc<Readiness>,
    writer: Option<ControllerEventWriter>,
    metrics: Registry,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HealthState {
            ready,
            writer,
            metrics: Arc::new(metrics),
        });
    serve(addr, app).await
}

/// Serves the inspection API, `/api/vips`, `/api/events`, `/api/wakeups` and
/// `/api/interfaces` (client addresses, the node's VIP table), on `addr`: loopback unless the operator says otherwise. Returns the bound
/// address.
pub async fn serve_api(
    addr: SocketAddr,
    queries: mpsc::Sender<Query>,
    hits: VipHitsReader,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/api/vips", get(vips))
        .route("/api/events", get(events))
        .route("/api/wakeups", get(wakeups))
        .route("/api/interfaces", get(interfaces))
        .with_state(ApiState { queries, hits });
    serve(addr, app).await
}

/// Serves `app` on `addr`: [`MAX_CONNECTIONS`] connections at once as usual, each given
/// [`HEADER_READ_TIMEOUT`] for its headers and [`CONNECTION_TIMEOUT`] in all; then
/// [`OVERFLOW_CONNECTIONS`] more, one request each within [`OVERFLOW_TIMEOUT`]; others are
/// closed at once. Every connection is accepted as it comes, so a probe never waits in the
/// backlog behind idle clients.
async fn serve(addr: SocketAddr, app: Router) -> std::io::Result<SocketAddr> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        service::TowerToHyperService,
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        // `[::]` (`:PORT`) on a node without IPv6: every IPv4 address instead.
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && is_no_ipv6(&e) => {
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, addr.port())).await?
        }
        other => other?,
    };
    let bound = listener.local_addr()?;
    let usual = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let overflow = Arc::new(tokio::sync::Semaphore::new(OVERFLOW_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(%bound, "accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (slot, keep_alive, header_timeout, timeout) =
                match usual.clone().try_acquire_owned() {
                    Ok(slot) => (slot, true, HEADER_READ_TIMEOUT, CONNECTION_TIMEOUT),
                    Err(_) => match overflow.clone().try_acquire_owned() {
                        Ok(slot) => (slot, false, OVERFLOW_TIMEOUT, OVERFLOW_TIMEOUT),
                        // Every slot taken: closed at once.
                        Err(_) => continue,
                    },
                };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(keep_alive)
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(timeout, connection).await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// Whether binding failed because the node has no IPv6.
fn is_no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

async fn ask<T>(
    queries: &mpsc::Sender<Query>,
    query: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    queries.send(query(tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()
}

/// The VIP table from the agent's own registry; the kernel's hit counts are read off the
/// agent's loop (one lookup per VIP).
async fn vips(State(state): State<ApiState>) -> impl IntoResponse {
    let Some(rows) = ask(&state.queries, Query::Vips).await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let hits = state.hits.clone();
    let rows = tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .map(|(key, row)| VipRow {
                hits: hits.hits(&key),
                ..row
            })
            .collect::<Vec<_>>()
    })
    .await;
    match rows {
        Ok(rows) => Json(rows).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn interfaces(State(state): State<ApiState>) -> impl IntoResponse {
    match ask(&state.queries, Query::Interfaces).await {
        Some(rows) => Json(rows).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn events(State(state): State<ApiState>) -> impl IntoResponse {
    match ask(&state.queries, Query::Events).await {
        Some(rows) => Json(rows).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn wakeups(State(state): State<ApiState>) -> impl IntoResponse {
    match ask(&state.queries, Query::Wakeups).await {
        Some(rows) => Json(rows).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    let mut missing = Vec::new();
    if !state.ready.attached.load(Ordering::Relaxed) {
        missing.push("XDP program not attached".to_owned());
    } else if state.ready.interfaces.load(Ordering::Relaxed) == 0 {
        missing.push(
            "the program is on no interface: no --iface matches one, or OVN's interfaces are \
             not known (is the Open_vSwitch database at --ovs-db reachable?)"
                .to_owned(),
        );
    }
    if !state.ready.vips_synced.load(Ordering::Relaxed) {
        missing.push("VIP source not synced".to_owned());
    }
    let detached = state
        .ready
        .detached
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .join(", ");
    if !detached.is_empty() {
        missing.push(format!("XDP program not attached to {detached}"));
    }
    let unfit = state.ready.vips_unfit.load(Ordering::Relaxed);
    if unfit > 0 {
        missing.push(format!(
            "{unfit} VIPs do not fit the VIP map and are not watched (raise --max-vips)"
        ));
    }
    if let Some(writer) = &state.writer {
        let southbound = writer.southbound();
        if !southbound.client().is_connected() {
            missing.push("Southbound database not connected".to_owned());
        } else if southbound.chassis_uuid().is_none() {
            missing.push(format!(
                "no Chassis row named {:?} in the Southbound database (events wait)",
                southbound.chassis_name()
            ));
        }
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}

async fn scrape(State(state): State<HealthState>) -> impl IntoResponse {
    let mut body = String::new();
    if encode(&mut body, &state.metrics).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Why asking a running agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentQueryError {
    /// Nothing answered at the address.
    #[error("cannot reach the agent at {addr} ({reason}); is it running with this --api-addr?")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// Why (said in the message, not as a source: said once).
        reason: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// Not an HTTP response.
    #[error("malformed HTTP response")]
    Malformed,
    /// An answer other than 200, with its status line and body.
    #[error("{path}: {status}: {}", body.trim())]
    Status {
        /// The path asked for.
        path: String,
        /// The status line.
        status: String,
        /// What the agent said.
        body: String,
    },
}

/// `GET path` on the agent's endpoint; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, AgentQueryError> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|reason| AgentQueryError::Unreachable { addr, reason })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(AgentQueryError::Malformed)?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(AgentQueryError::Status {
            path: path.to_owned(),
            status: status.to_owned(),
            body: body.to_owned(),
        });
    }
    Ok(body.to_owned())
}
