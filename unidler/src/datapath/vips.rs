//! The VIP map as the agent writes it: VIPs with their state, their scopes, and the address
//! prefilter that describes them.

use std::{os::fd::AsFd as _, sync::Arc};

use aya::maps::{HashMap, IterableMap, MapData};
use unidler_common::{ScopedVip, VipKey, VipState, address_bucket, map_names};

use super::{Datapath, DatapathError, remove_entry};
use crate::map_batch;

impl Datapath {
    /// Removes from the VIP map every VIP that `keep` does not want (what an earlier agent
    /// left there, once this agent's VIP source has synced).
    pub fn retain_vips(&mut self, keep: impl Fn(&VipKey) -> bool) -> Result<usize, DatapathError> {
        let stale: Vec<VipKey> = self.keys.iter().filter(|k| !keep(k)).copied().collect();
        self.apply_vips(&[], &stale)?;
        Ok(stale.len())
    }

    /// Sets (or, with None, clears) the scope of interface `ifindex`.
    pub fn set_iface_scope(
        &mut self,
        ifindex: u32,
        scope: Option<u32>,
    ) -> Result<(), DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: map_names::IFACE_SCOPES,
            source,
        };
        match scope {
            Some(scope) => self
                .iface_scopes
                .insert(ifindex, scope, 0)
                .map_err(map_error),
            None => remove_entry(&mut self.iface_scopes, &ifindex, map_names::IFACE_SCOPES),
        }
    }

    /// The interfaces that have a scope, with it.
    pub fn iface_scopes(&self) -> Vec<(u32, u32)> {
        self.iface_scopes.iter().flatten().collect()
    }

    /// Writes the per-scope backends of the VIP with id `vip_id` (`(scope, backends)`; empty:
    /// the VIP is not scoped), removing the scopes it no longer has. Its entry in the VIP map
    /// must carry [`unidler_common::VIP_FLAG_SCOPED`] while it has any.
    pub fn set_vip_scopes(
        &mut self,
        vip_id: u32,
        scopes: &[(u32, u32)],
    ) -> Result<(), DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: map_names::VIP_SCOPES,
            source,
        };
        for &(scope, backends) in scopes {
            self.vip_scopes
                .insert(ScopedVip { vip_id, scope }, backends, 0)
                .map_err(map_error)?;
        }
        let old = match scopes.is_empty() {
            true => self.scopes_of.remove(&vip_id).unwrap_or_default(),
            false => self
                .scopes_of
                .insert(vip_id, scopes.iter().map(|(s, _)| *s).collect())
                .unwrap_or_default(),
        };
        for scope in old {
            if scopes.iter().any(|(s, _)| *s == scope) {
                continue;
            }
            remove_entry(
                &mut self.vip_scopes,
                &ScopedVip { vip_id, scope },
                map_names::VIP_SCOPES,
            )?;
        }
        Ok(())
    }

    /// Inserts or replaces a VIP. The entry's rate limiter starts full; the kernel's hit
    /// count of an entry being replaced is kept (`state.hits` is ignored).
    pub fn upsert_vip(&mut self, key: VipKey, state: VipState) -> Result<(), DatapathError> {
        match self.apply_vips(&[(key, state)], &[])?.as_slice() {
            [] => Ok(()),
            _ => Err(DatapathError::VipMapFull {
                capacity: self.max_vips,
            }),
        }
    }

    /// Removes a VIP; removing one that is not there is not an error.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        self.apply_vips(&[], std::slice::from_ref(key)).map(drop)
    }

    /// Removes `removes`, then inserts or replaces `upserts` (as [`Datapath::upsert_vip`]
    /// does); returns the keys that did not fit (the map is full). The prefilter's words are
    /// written once per batch: each bit goes up before its entry goes in and comes down after
    /// it is gone, so the filter may pass a packet whose lookup then misses, but never hides a
    /// VIP.
    pub fn apply_vips(
        &mut self,
        upserts: &[(VipKey, VipState)],
        removes: &[VipKey],
    ) -> Result<Vec<VipKey>, DatapathError> {
        let mut dirty = std::collections::BTreeSet::new();
        for key in removes {
            remove_entry(&mut self.vips, key, map_names::VIPS)?;
            if self.keys.remove(key) {
                self.count_in_bucket(key, -1, &mut dirty);
            }
        }
        self.write_filter_words(&mut dirty)?;
        let new: Vec<bool> = upserts
            .iter()
            .map(|(key, _)| {
                let new = self.keys.insert(*key);
                if new {
                    self.count_in_bucket(key, 1, &mut dirty);
                }
                new
            })
            .collect();
        self.write_filter_words(&mut dirty)?;
        let mut unfit = Vec::new();
        // New entries in batches; replaced ones one by one, keeping their hit counts.
        let mut batch_keys = Vec::new();
        let mut batch_values = Vec::new();
        for (&(key, state), new) in upserts.iter().zip(new) {
            if new {
                batch_keys.push(key);
                batch_values.push(VipState { hits: 0, ..state });
            } else {
                let hits = self.vip(&key).map_or(0, |old| old.hits);
                self.insert_vip(
                    key,
                    VipState { hits, ..state },
                    false,
                    &mut unfit,
                    &mut dirty,
                )?;
            }
        }
        let mut from = 0;
        while from < batch_keys.len() {
            if !self.batch_updates {
                for (key, state) in batch_keys[from..].iter().zip(&batch_values[from..]) {
                    self.insert_vip(*key, *state, true, &mut unfit, &mut dirty)?;
                }
                break;
            }
            let fd = IterableMap::map(&self.vips).fd().as_fd();
            match map_batch::update(fd, &batch_keys[from..], &batch_values[from..]) {
                Ok(()) => break,
                Err(failed) => {
                    if failed.error.raw_os_error() == Some(libc::EINVAL) {
                        // A kernel without batch updates (before 5.6): one by one.
                        tracing::debug!("no BPF_MAP_UPDATE_BATCH: VIPs written one by one");
                        self.batch_updates = false;
                        from += failed.done;
                        continue;
                    }
                    // The entry that failed, alone: it says why (a full map, typically).
                    let at = from + failed.done;
                    self.insert_vip(
                        batch_keys[at],
                        batch_values[at],
                        true,
                        &mut unfit,
                        &mut dirty,
                    )?;
                    from = at + 1;
                }
            }
        }
        self.write_filter_words(&mut dirty)?;
        Ok(unfit)
    }

    /// Writes one entry; a full map adds `key` to `unfit` (and, for a `new` key, takes it back
    /// out of the keys and the prefilter count).
    fn insert_vip(
        &mut self,
        key: VipKey,
        state: VipState,
        new: bool,
        unfit: &mut Vec<VipKey>,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        match self.vips.insert(key, state, 0) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                unfit.push(key);
                if new {
                    self.keys.remove(&key);
                    self.count_in_bucket(&key, -1, dirty);
                }
                Ok(())
            }
            Err(source) => {
                self.write_filter_words(dirty)?;
                Err(DatapathError::Map {
                    map: map_names::VIPS,
                    source,
                })
            }
        }
    }

    /// Counts `key`'s address in (`delta` 1) or out of (-1) its prefilter bucket; when the
    /// bucket turns non-empty or empty, flips its bit and marks its word `dirty`.
    fn count_in_bucket(
        &mut self,
        key: &VipKey,
        delta: i32,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) {
        let bucket = address_bucket(&key.addr);
        let count = self.bucket_counts.entry(bucket).or_default();
        *count = count.saturating_add_signed(delta);
        let bit = 1u64 << (bucket % 64);
        let word = &mut self.filter_words[(bucket / 64) as usize];
        if *count == 0 {
            self.bucket_counts.remove(&bucket);
            *word &= !bit;
        } else {
            *word |= bit;
        }
        dirty.insert(bucket / 64);
    }

    /// Writes the prefilter's `dirty` words to the kernel.
    fn write_filter_words(
        &mut self,
        dirty: &mut std::collections::BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        let indexes: Vec<u32> = std::mem::take(dirty).into_iter().collect();
        if indexes.len() > 1 && self.batch_updates {
            let words: Vec<u64> = indexes
                .iter()
                .map(|i| self.filter_words[*i as usize])
                .collect();
            let fd = self.address_filter.map().fd().as_fd();
            if map_batch::update(fd, &indexes, &words).is_ok() {
                return Ok(());
            }
            // Written one by one below (again, for any the batch did write).
        }
        for word_index in indexes {
            self.address_filter
                .set(word_index, self.filter_words[word_index as usize], 0)
                .map_err(|source| DatapathError::Map {
                    map: map_names::VIP_ADDRESS_FILTER,
                    source,
                })?;
        }
        Ok(())
    }

    /// A second, read-only handle on the VIP map, for reading hit counts off the agent's loop.
    pub fn vip_hits_reader(&self) -> Result<VipHitsReader, DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: map_names::VIPS,
            source,
        };
        // A duplicate of the handle this process owns: opening the map by its id instead
        // needs CAP_SYS_ADMIN, which the agent is not granted.
        let fd = self
            .vips
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_error(aya::maps::MapError::IoError(e)))?;
        let data = MapData::from_fd(fd).map_err(map_error)?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_error)?;
        Ok(VipHitsReader(Arc::new(map)))
    }

    /// The VIP entry for `key`, if present.
    pub fn vip(&self, key: &VipKey) -> Option<VipState> {
        self.vips.get(key, 0).ok()
    }
}

/// Reads the kernel's per-VIP hit counts; cheap to clone. Each read is a syscall: use it off
/// the agent's loop.
#[derive(Clone)]
pub struct VipHitsReader(Arc<HashMap<MapData, VipKey, VipState>>);

impl VipHitsReader {
    /// Connection-opening packets the kernel has seen for `key` (0 if it is not in the map).
    pub fn hits(&self, key: &VipKey) -> u64 {
        self.0.get(key, 0).map_or(0, |state| state.hits)
    }
}
