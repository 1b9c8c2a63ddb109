//! `update2` notifications applied to a replica whose column kinds come from a schema: no
//! panic whatever the rows, and a replica never holds a row whose apply failed halfway in a
//! way that panics later (it is read back whole).
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use ovsdb::{ColumnKinds, Replica};

/// A schema with a column of every kind.
static KINDS: LazyLock<Arc<ColumnKinds>> = LazyLock::new(|| {
    Arc::new(ColumnKinds::from_schema(&serde_json::json!({
        "tables": {
            "T": {"columns": {
                "s": {"type": "string"},
                "o": {"type": {"key": "string", "min": 0, "max": 1}},
                "set": {"type": {"key": "integer", "min": 0, "max": "unlimited"}},
                "m": {"type": {"key": "string", "value": "string", "min": 0, "max": "unlimited"}}
            }}
        }
    })))
});

fuzz_target!(|data: &[u8]| {
    let mut replica = Replica::default();
    replica.set_column_kinds(KINDS.clone());
    // Several notifications, one per line.
    for line in data.split(|b| *b == b'\n') {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let _ = replica.apply_update2(&json);
    }
    for (_, row) in replica.rows("T") {
        for value in row.values() {
            let _ = value.to_json();
        }
    }
});
