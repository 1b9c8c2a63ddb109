//! Errors, typed after RFC 7047's error strings.

use std::io;

use thiserror::Error;

/// The error kinds RFC 7047 (and ovsdb-server) name for a failed operation or transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `referential integrity violation`: a strong reference would dangle.
    ReferentialIntegrity,
    /// `constraint violation`: a value or row count breaks the schema, or an index is duplicated.
    ConstraintViolation,
    /// `resources exhausted`.
    ResourcesExhausted,
    /// `I/O error`: the server could not commit to storage.
    IoError,
    /// `duplicate uuid-name`.
    DuplicateUuidName,
    /// `domain error`: arithmetic on a column went out of its domain.
    DomainError,
    /// `range error`: a mutation went out of range.
    RangeError,
    /// `timed out`: a `wait` operation's condition did not hold in time.
    TimedOut,
    /// `not supported`: the operation is not supported (e.g. on a replica or by this server).
    NotSupported,
    /// `aborted`: an `abort` operation ran.
    Aborted,
    /// `not owner`: an `assert` named a lock this client does not own.
    NotOwner,
    /// `syntax error` or `unknown column`/`unknown table` and the like: a malformed request.
    Syntax,
    /// `unknown database`.
    UnknownDatabase,
    /// `unknown method`.
    UnknownMethod,
    /// `canceled`: the server gave up on a pending request (a `transact` pending while the
    /// database is converted or replaced); it may still have committed.
    Canceled,
    /// Anything else the server said.
    Other(String),
}

impl ErrorKind {
    /// Maps the server's error string onto a kind.
    pub fn from_server(s: &str) -> Self {
        match s {
            "referential integrity violation" => ErrorKind::ReferentialIntegrity,
            "constraint violation" => ErrorKind::ConstraintViolation,
            "resources exhausted" => ErrorKind::ResourcesExhausted,
            "I/O error" => ErrorKind::IoError,
            "duplicate uuid-name" => ErrorKind::DuplicateUuidName,
            "domain error" => ErrorKind::DomainError,
            "range error" => ErrorKind::RangeError,
            "timed out" => ErrorKind::TimedOut,
            "not supported" => ErrorKind::NotSupported,
            "aborted" => ErrorKind::Aborted,
            "not owner" => ErrorKind::NotOwner,
            "unknown database" => ErrorKind::UnknownDatabase,
            "unknown method" => ErrorKind::UnknownMethod,
            "canceled" => ErrorKind::Canceled,
            s if s.contains("syntax error") || s.starts_with("unknown ") => ErrorKind::Syntax,
            other => ErrorKind::Other(other.to_owned()),
        }
    }
}

/// Everything that can go wrong talking to an OVSDB server.
#[derive(Debug, Error)]
pub enum Error {
    /// A remote string could not be parsed.
    #[error(
        "bad remote {0:?}: expected unix:PATH, tcp:HOST:PORT or ssl:HOST:PORT (HOST an IP address or a DNS name)"
    )]
    BadRemote(String),
    /// Connecting or reading/writing the socket failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// Setting up TLS failed (bad key, certificate or CA file), or the handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server sent something that is not valid OVSDB JSON-RPC.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server sent a message larger than the configured limit.
    #[error("server message exceeds {limit} bytes")]
    Oversized {
        /// The limit in bytes.
        limit: usize,
    },
    /// The connection closed (or was closed) before the reply came.
    #[error("connection closed")]
    Disconnected,
    /// No connection to a usable server right now.
    #[error("not connected to the database")]
    NotConnected,
    /// No reply within the inactivity probe interval.
    #[error("server did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The server answered a request with a JSON-RPC error.
    #[error("server error: {kind:?}{}", details.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rpc {
        /// What kind.
        kind: ErrorKind,
        /// The server's details, if any.
        details: Option<String>,
    },
    /// A transaction failed; `index` is the failing operation (None for a commit failure).
    #[error("transaction failed at {}: {kind:?}{}", index.map(|i| format!("operation {i}")).unwrap_or_else(|| "commit".into()), details.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Transaction {
        /// Index of the operation that failed, or None if the commit itself failed.
        index: Option<usize>,
        /// What kind.
        kind: ErrorKind,
        /// The server's details, if any.
        details: Option<String>,
    },
}

impl Error {
    /// Whether the outcome of a transaction that failed with this error is unknown: the
    /// request may or may not have been committed (the connection dropped or timed out before
    /// the reply, or the server canceled the request).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Error::Disconnected
                | Error::Io(_)
                | Error::Timeout(_)
                | Error::Rpc {
                    kind: ErrorKind::Canceled,
                    ..
                }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canceled_transaction_may_have_committed() {
        let canceled = Error::Rpc {
            kind: ErrorKind::from_server("canceled"),
            details: None,
        };
        assert!(canceled.outcome_unknown());
        let refused = Error::Rpc {
            kind: ErrorKind::from_server("not supported"),
            details: None,
        };
        assert!(!refused.outcome_unknown());
    }
}
