//! Many entries into a BPF hash map with one system call (`BPF_MAP_UPDATE_BATCH`, Linux
//! 5.6+), which aya does not offer: a full VIP sync writes 100,000s of entries.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `enum bpf_cmd`'s `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// At most this many entries per call: the kernel copies them in one go.
const CHUNK: usize = 8192;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why [`update`] stopped.
#[derive(Debug)]
pub struct BatchError {
    /// How many entries were written before the one that failed (the one at this index).
    pub done: usize,
    /// The failure; `EINVAL` means the kernel refused the command (before 5.6 it has none):
    /// `done` then counts only the calls before (what it may have written, writing again
    /// is harmless).
    pub error: io::Error,
}

/// Inserts or replaces `keys[i]` → `values[i]` in the hash map `map`, in order. `K` and `V`
/// must be the map's key and value types (plain `#[repr(C)]` data of the map's sizes).
pub fn update<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut done = 0;
    while done < keys.len() {
        let end = (done + CHUNK).min(keys.len());
        let mut attr = BatchAttr {
            keys: keys[done..end].as_ptr() as u64,
            values: values[done..end].as_ptr() as u64,
            count: (end - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid batch attribute of the size passed; the kernel reads
        // `count` keys and values from the slices it points to (both that long, of the map's
        // key and value sizes) and writes back only `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc < 0 {
            let error = io::Error::last_os_error();
            // The kernel writes back how many it wrote, except when it refused the command
            // itself (EINVAL: no batch updates, or bad attributes): then count none.
            let written = if error.raw_os_error() == Some(libc::EINVAL) {
                0
            } else {
                (attr.count as usize).min(end - done)
            };
            return Err(BatchError {
                done: done + written,
                error,
            });
        }
        done = end;
    }
    Ok(())
}
