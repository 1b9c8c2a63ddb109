//! `seq_num` of our Controller_Event rows: it only ever increases, also across restarts.
//!
//! Numbers are reserved in the state file a block at a time ([`SEQ_BLOCK`]), before use, so
//! the file is written once per block and never on the way of a row; on a clean shutdown it
//! records exactly the last number used, and after a crash the next run skips the rest of the
//! block. At start the sequence continues from the larger of the file and our rows in the
//! database.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use tracing::{debug, warn};

/// seq_nums reserved in the state file at a time.
pub const SEQ_BLOCK: i64 = 1024;

/// The state file's name inside `--state-dir`.
const FILE_NAME: &str = "seq_num";

/// The sequence: the last number used and how far the state file lets us go.
#[derive(Debug)]
pub struct SeqNumbers {
    file: Option<PathBuf>,
    /// Last seq_num used; None until recovered (file and database consulted).
    last: Option<i64>,
    /// Highest seq_num the state file lets us use without writing it again.
    reserved: i64,
    /// The last seq_num used, shared with [`SeqNumbers::checkpoint`].
    last_used: Arc<AtomicI64>,
}

/// What shutdown needs to record the exact last number: the file and the last number used.
#[derive(Clone, Debug)]
pub struct SeqCheckpoint {
    file: Option<PathBuf>,
    last_used: Arc<AtomicI64>,
}

impl SeqNumbers {
    /// A sequence kept in `<state_dir>/seq_num` (or only in memory without a state dir).
    pub fn new(state_dir: Option<&Path>) -> Self {
        Self {
            file: state_dir.map(|d| d.join(FILE_NAME)),
            last: None,
            reserved: 0,
            last_used: Arc::default(),
        }
    }

    /// Whether [`SeqNumbers::recover`] has run.
    pub fn is_recovered(&self) -> bool {
        self.last.is_some()
    }

    /// Continues from the larger of the state file and `in_database` (the largest of our
    /// rows' seq_num there).
    pub fn recover(&mut self, in_database: i64) {
        let from_file = self.read_file();
        self.last = Some(from_file.max(in_database));
        debug!(from_file, in_database, "seq_num continues");
    }

    /// The next number; reserves a new block in the state file first when the last is used
    /// up. A block whose reservation could not be saved is not counted as reserved: the next
    /// number tries again (the row is written all the same; only a crash before a save
    /// succeeds could repeat its number).
    pub fn take_next(&mut self) -> i64 {
        let seq = self.last.unwrap_or(0) + 1;
        self.last = Some(seq);
        self.last_used.store(seq, Ordering::Relaxed);
        if seq > self.reserved {
            let block_end = seq + SEQ_BLOCK - 1;
            let saved = match &self.file {
                Some(path) => save(path, block_end).is_ok(),
                None => true,
            };
            if saved {
                self.reserved = block_end;
            }
        }
        seq
    }

    /// A handle that records the exact last number used (for a clean shutdown).
    pub fn checkpoint(&self) -> SeqCheckpoint {
        SeqCheckpoint {
            file: self.file.clone(),
            last_used: self.last_used.clone(),
        }
    }

    fn read_file(&self) -> i64 {
        let Some(path) = &self.file else { return 0 };
        match std::fs::read_to_string(path) {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| {
                warn!(path = %path.display(), "unreadable seq_num state; starting from the database");
                0
            }),
            Err(_) => 0,
        }
    }
}

impl SeqCheckpoint {
    /// Writes the last number used into the state file, so that the next run goes on without
    /// a gap. Only when nothing is being written (the writer is drained).
    pub fn save(&self) {
        let last = self.last_used.load(Ordering::Relaxed);
        if let Some(path) = &self.file
            && last > 0
        {
            let _ = save(path, last);
        }
    }
}

/// Writes `seq` into the state file at `path` durably: a temp file written and synced, renamed
/// over the old one, and the directory synced, so that after a power loss the file holds the
/// old number or the new one, never nothing. A failure is logged and returned.
fn save(path: &Path, seq: i64) -> std::io::Result<()> {
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{seq}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().inspect_err(|e| warn!(path = %path.display(), "cannot save seq_num: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_that_could_not_be_saved_is_tried_again() {
        let dir = std::env::temp_dir().join(format!("unidler-seq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The state "directory" is a file: nothing can be saved in it.
        let blocked = dir.join("blocked");
        std::fs::write(&blocked, "").unwrap();
        let mut seq = SeqNumbers::new(Some(&blocked));
        seq.recover(0);
        assert_eq!(seq.take_next(), 1);
        assert_eq!(seq.reserved, 0, "an unsaved block is not reserved");
        // Once the directory is usable, the next number saves the block.
        std::fs::remove_file(&blocked).unwrap();
        assert_eq!(seq.take_next(), 2);
        assert_eq!(seq.reserved, 2 + SEQ_BLOCK - 1);
        let saved = std::fs::read_to_string(blocked.join(FILE_NAME)).unwrap();
        assert_eq!(saved.trim().parse::<i64>().unwrap(), seq.reserved);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
