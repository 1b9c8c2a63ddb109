//! Many entries of a BPF hash map with one system call (`BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_LOOKUP_BATCH`, Linux 5.6+), which aya does not offer: a full VIP sync writes
//! 100,000s of entries, and the hold reads thousands of counts now and then.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd},
};

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Runs the batch command `cmd` with `attr`, into which the kernel writes back (`count`,
/// and the buffers `attr` points to).
///
/// # Safety
/// `attr`'s pointers must be valid for `cmd`: `keys` and `values` for `count` entries of the
/// map's key and value sizes (read for an update, written for a lookup), and the batch
/// positions, when set, for 8 bytes each.
unsafe fn batch_command(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: a batch attribute of the size passed, valid as the caller promises.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        // SAFETY: the kernel reads `count` keys and values from the slices `attr` points to
        // (both that long, of the map's key and value sizes).
        if let Err(error) = unsafe { batch_command(BPF_MAP_UPDATE_BATCH, &mut attr) } {
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

/// Every entry of the hash map `map`, read `CHUNK` at a time (aya's typed map: its key and
/// value sizes are `K`'s and `V`'s). An entry added or changed meanwhile may be missed; none
/// is read twice. `EINVAL` on the first call means the kernel has no batch lookups (before
/// 5.6): read the map one entry at a time instead.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
) -> io::Result<Vec<(K, V)>> {
    let map = aya::maps::IterableMap::map(map).fd().as_fd();
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    let mut entries = Vec::new();
    // The hash map's position between calls (none: from the start): a bucket index (a u32),
    // opaque to us.
    let (mut position_in, mut position_out) = (None::<u64>, 0u64);
    loop {
        let mut attr = BatchAttr {
            in_batch: position_in
                .as_ref()
                .map_or(0, |position| position as *const u64 as u64),
            out_batch: &mut position_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values into the buffers `attr`
        // points to (each with room for `CHUNK` of the map's key and value sizes), and the
        // position into `position_out`.
        let end = match unsafe { batch_command(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(()) => false,
            // The end of the map, with the last entries (if any) in the buffers.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let read = (attr.count as usize).min(CHUNK);
        // SAFETY: the kernel wrote `read` whole keys and values (plain data of these types).
        unsafe {
            keys.set_len(read);
            values.set_len(read);
        }
        entries.extend(keys.drain(..).zip(values.drain(..)));
        if end {
            return Ok(entries);
        }
        position_in = Some(position_out);
    }
}
