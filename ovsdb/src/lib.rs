//! An OVSDB client (RFC 7047), with nothing OVN-specific in it.
//!
//! - [`Remote`]: `unix:PATH`, `tcp:HOST:PORT`, `ssl:HOST:PORT` (HOST an IP or a DNS name; TLS with PEM key, certificate and
//!   CA certificate, as OVS PKI makes them), several comma-separated;
//! - [`rpc::Connection`]: one JSON-RPC session with request/reply matching, notifications,
//!   echo answered and an inactivity probe, and a size limit on server messages;
//! - [`Client`]: a long-lived client of one database that connects to the cluster leader
//!   (watching `_Server` to follow it), keeps `monitor_cond_since`/`monitor_cond` monitors
//!   (named ones too, to monitor a table again with other columns or conditions; optional
//!   columns, where the schema has them) and a [`Replica`] current, reconnects with exponential backoff, and runs transactions
//!   built from [`Operation`]s on typed [`Value`]s;
//! - [`TableConsumer`]: a table followed in the client's own form instead of the replica;
//! - [`Error`]: typed errors, RFC 7047's error strings included.

pub mod client;
pub mod consumer;
pub mod error;
pub mod op;
pub mod remote;
pub mod replica;
pub mod rpc;
pub mod schema;
pub mod update;
pub mod value;

pub use client::{Client, ClientOptions, MonitorRequest, Status};
pub use consumer::{Changed, ConsumerHandle, TableConsumer};
pub use error::{Error, ErrorKind};
pub use op::{Condition, Mutation, OpResult, Operation};
pub use remote::{Endpoint, Remote, TlsFiles};
pub use replica::{ChangeSet, Replica, RowChange};
pub use schema::{ColumnKind, ColumnKinds};
pub use update::RowUpdate;
pub use value::{Atom, Row, Uuid, Value};
