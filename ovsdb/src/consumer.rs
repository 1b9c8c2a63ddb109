//! [`TableConsumer`]: the way to follow a table without replicating it. The client hands the
//! consumer each row's update as it parses them, and the consumer keeps what it needs in its
//! own form.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use crate::{error::Error, replica::Replica, update::RowUpdate, value::Uuid};

/// Follows one monitored table instead of the replica: for a client that keeps its own compact
/// form of a large table (a generic replica row costs far more than the few facts a client
/// needs of it). Called on the session's task, in the order the server sent the rows; a batch
/// is one monitor reply or one update notification.
pub trait TableConsumer: Send {
    /// A full load begins: forget every row; they all follow as [`RowUpdate::Initial`].
    fn reset(&mut self);
    /// One row's update. A modify's columns apply by their kind in the schema (the consumer
    /// knows the columns it reads: see [`crate::ColumnKind`]). An error (say, a modify of a
    /// row never seen) ends the session; the next one loads the table afresh.
    fn row(&mut self, uuid: &Uuid, update: RowUpdate) -> Result<(), Error>;
    /// A batch has been applied, to the consumer and to `replica` (the replicated tables);
    /// `changed` names the replicated tables it changed (all of them after a full load).
    fn batch_done(&mut self, replica: &Replica, changed: &Changed);
}

/// The replicated tables a batch changed.
pub type Changed = std::collections::BTreeSet<String>;

/// A [`TableConsumer`] shared between the client and its owner.
#[derive(Clone)]
pub struct ConsumerHandle(pub Arc<Mutex<dyn TableConsumer>>);

impl ConsumerHandle {
    /// Wraps `consumer`.
    pub fn new(consumer: impl TableConsumer + 'static) -> Self {
        Self(Arc::new(Mutex::new(consumer)))
    }
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TableConsumer")
    }
}

impl PartialEq for ConsumerHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
