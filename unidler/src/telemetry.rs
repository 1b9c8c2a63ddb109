//! What an operator sees: Prometheus metrics at `/metrics`, `/healthz`, `/readyz`, and JSON
//! for the `unidler vips` and `unidler events` commands at `/api/vips` and `/api/events`.
//!
//! The kernel's maps and the VIP registry belong to the agent's main loop; the HTTP
//! handlers ask it for a [`Snapshot`] over a channel, so nothing is shared behind locks.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use unidler_common::Counter as KernelCounter;

use crate::{datapath::Counters, event::IdleHit, sink::ControllerEventSink};

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
    /// Northbound load balancer, if known.
    pub load_balancer: Option<String>,
}

/// What the main loop reports when asked.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Kernel counters, summed over CPUs.
    pub kernel: Counters,
    /// VIPs in the map with zero backends.
    pub vips_idle: u64,
    /// VIPs in the map with backends.
    pub vips_active: u64,
    /// Idle hits the agent received from the ring buffer.
    pub events_received: u64,
}

/// A question for the main loop.
pub enum Query {
    /// Counters and VIP totals.
    Snapshot(oneshot::Sender<Snapshot>),
    /// The VIP table.
    Vips(oneshot::Sender<Vec<VipRow>>),
    /// The most recent idle hits, oldest first.
    Events(oneshot::Sender<Vec<IdleHit>>),
}

/// Readiness, set by the main loop.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The program is attached to every interface.
    pub attached: AtomicBool,
    /// The VIP source has delivered its first full set.
    pub vips_synced: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    queries: mpsc::Sender<Query>,
    ready: Arc<Readiness>,
    sink: Option<ControllerEventSink>,
}

/// Serves the endpoints on `addr` until the process ends. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    queries: mpsc::Sender<Query>,
    ready: Arc<Readiness>,
    sink: Option<ControllerEventSink>,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/vips", get(vips))
        .route("/api/events", get(events))
        .with_state(AppState {
            queries,
            ready,
            sink,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(bound)
}

async fn ask<T>(state: &AppState, query: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    state.queries.send(query(tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()
}

async fn vips(State(state): State<AppState>) -> impl IntoResponse {
    match ask(&state, Query::Vips).await {
        Some(rows) => Json(rows).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn events(State(state): State<AppState>) -> impl IntoResponse {
    match ask(&state, Query::Events).await {
        Some(rows) => Json(rows).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut missing = Vec::new();
    if !state.ready.attached.load(Ordering::Relaxed) {
        missing.push("XDP program not attached");
    }
    if !state.ready.vips_synced.load(Ordering::Relaxed) {
        missing.push("VIP source not synced");
    }
    if let Some(sink) = &state.sink
        && !sink.client().is_connected()
    {
        missing.push("Southbound database not connected");
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

type Labels = Vec<(&'static str, String)>;

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let Some(snap) = ask(&state, Query::Snapshot).await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let mut registry = Registry::default();
    let k = |c: KernelCounter| snap.kernel.get(c);

    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    let family = |registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>| {
        let f = Family::<Labels, Counter>::default();
        for (labels, v) in values {
            f.get_or_create(&labels).inc_by(v);
        }
        registry.register(name, help, f);
    };
    let gauge = |registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, i64)>| {
        let f = Family::<Labels, Gauge>::default();
        for (labels, v) in values {
            f.get_or_create(&labels).set(v);
        }
        registry.register(name, help, f);
    };

    let single_gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };

    let dropped = k(KernelCounter::IdleDropped);
    family(
        &mut registry,
        "unidler_kernel_packets",
        "Packets the XDP program ran on, by verdict",
        vec![
            (
                vec![("verdict", "pass".into())],
                k(KernelCounter::Packets) - dropped,
            ),
            (vec![("verdict", "drop".into())], dropped),
        ],
    );
    counter(
        &mut registry,
        "unidler_kernel_vip_hits",
        "Connection-opening packets to a VIP",
        k(KernelCounter::VipHits),
    );
    counter(
        &mut registry,
        "unidler_kernel_idle_hits",
        "Connection-opening packets to a VIP with no backends",
        k(KernelCounter::IdleHits),
    );
    counter(
        &mut registry,
        "unidler_kernel_events_written",
        "Events the kernel wrote to the ring buffer",
        k(KernelCounter::EventsWritten),
    );
    family(
        &mut registry,
        "unidler_kernel_events_rate_limited",
        "Events the kernel suppressed, by rate limit",
        vec![
            (
                vec![("limit", "vip".into())],
                k(KernelCounter::RateLimitedVip),
            ),
            (
                vec![("limit", "global".into())],
                k(KernelCounter::RateLimitedGlobal),
            ),
        ],
    );
    counter(
        &mut registry,
        "unidler_kernel_ring_full",
        "Events lost because the ring buffer was full",
        k(KernelCounter::RingFull),
    );
    counter(
        &mut registry,
        "unidler_kernel_fragments",
        "Non-first IP fragments passed unmatched",
        k(KernelCounter::Fragments),
    );
    family(
        &mut registry,
        "unidler_kernel_parse_failures",
        "Frames passed because they could not be parsed, by reason",
        KernelCounter::ALL
            .iter()
            .filter(|c| c.is_parse_failure())
            .map(|c| (vec![("reason", c.name().to_owned())], k(*c)))
            .collect(),
    );
    gauge(
        &mut registry,
        "unidler_vips",
        "VIPs in the kernel map, by state",
        vec![
            (vec![("state", "idle".into())], snap.vips_idle as i64),
            (vec![("state", "active".into())], snap.vips_active as i64),
        ],
    );

    let mut stages = vec![(vec![("stage", "received".into())], snap.events_received)];
    if let Some(sink) = &state.sink {
        let s = sink.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        stages.extend([
            (
                vec![("stage", "deduplicated".into())],
                load(&s.deduplicated),
            ),
            (vec![("stage", "written".into())], load(&s.written)),
            (
                vec![("stage", "dropped_overflow".into())],
                load(&s.dropped_overflow),
            ),
            (vec![("stage", "failed".into())], load(&s.failed)),
        ]);
        single_gauge(
            &mut registry,
            "unidler_event_queue_depth",
            "Idle hits waiting for the database",
            sink.queue_depth() as i64,
        );
        let db = sink.client();
        single_gauge(
            &mut registry,
            "unidler_ovsdb_connected",
            "1 while connected to the Southbound database (the leader, if clustered)",
            i64::from(db.is_connected()),
        );
        counter(
            &mut registry,
            "unidler_ovsdb_reconnects",
            "Southbound sessions that ended",
            load(&db.stats().disconnects),
        );
        counter(
            &mut registry,
            "unidler_ovsdb_leader_changes",
            "Times the Southbound cluster leader was lost or a follower refused",
            load(&db.stats().leader_changes),
        );
        registry.register(
            "unidler_ovsdb_transaction_duration_seconds",
            "Time for Controller_Event transactions to commit",
            s.transaction_seconds.clone(),
        );
        registry.register(
            "unidler_event_latency_seconds",
            "Time from the kernel seeing the packet to its Controller_Event row committed",
            s.event_latency_seconds.clone(),
        );
    }
    family(
        &mut registry,
        "unidler_events",
        "Idle hits in the agent, by stage",
        stages,
    );

    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `GET path` on the agent's endpoint; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| {
            format!(
                "cannot reach the agent at {addr} ({e}); is it running with this --metrics-addr?"
            )
        })?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("{path}: {status}"));
    }
    Ok(body.to_owned())
}
