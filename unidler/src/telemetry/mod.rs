//! What an operator sees: Prometheus metrics at `/metrics` ([`metrics`]), `/healthz`,
//! `/readyz`, and JSON for the `unidler vips` and `unidler events` commands at `/api/vips` and
//! `/api/events`.
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

use crate::{event::IdleHit, sink::ControllerEventSink};

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

/// A question for the agent's loop.
pub enum Query {
    /// The VIP table.
    Vips(oneshot::Sender<Vec<VipRow>>),
    /// The most recent idle hits, oldest first.
    Events(oneshot::Sender<Vec<IdleHit>>),
}

/// Readiness, set by the agent's loop.
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
    metrics: Arc<Registry>,
}

/// Serves the endpoints on `addr` until the process ends. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    queries: mpsc::Sender<Query>,
    ready: Arc<Readiness>,
    sink: Option<ControllerEventSink>,
    metrics: Registry,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/vips", get(vips))
        .route("/api/events", get(events))
        .with_state(AppState {
            queries,
            ready,
            sink,
            metrics: Arc::new(metrics),
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
        && !sink.southbound().client().is_connected()
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

async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    if encode(&mut body, &state.metrics).is_err() {
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

/// Why asking a running agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentQueryError {
    /// Nothing answered at the address.
    #[error("cannot reach the agent at {addr} ({source}); is it running with this --metrics-addr?")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// Not an HTTP response.
    #[error("malformed HTTP response")]
    Malformed,
    /// An answer other than 200, with its status line.
    #[error("{path}: {status}")]
    Status {
        /// The path asked for.
        path: String,
        /// The status line.
        status: String,
    },
}

/// `GET path` on the agent's endpoint; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, AgentQueryError> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| AgentQueryError::Unreachable { addr, source })?;
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
        });
    }
    Ok(body.to_owned())
}
