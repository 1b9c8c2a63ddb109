//! The VIP map: what the VIP sources want ([`VipRegistry`]), what of it is in the kernel's
//! map, and what waits for room there (`--max-vips`).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{debug, info, warn};
use unidler_common::VipKey;

use crate::{
    datapath::Datapath,
    registry::{MapChange, VipEntry, VipRegistry},
    telemetry::{Readiness, metrics::AgentMetrics},
    vip::{DesiredVip, Vip, VipUpdate},
};

/// The VIPs the agent watches, in the registry and the kernel's map.
pub(super) struct VipMap {
    registry: VipRegistry,
    /// `VIP_FLAG_*` bits every VIP gets.
    flags: u32,
    /// VIPs the sources want that do not fit the kernel map, waiting for room.
    unfit: HashMap<Vip, DesiredVip>,
    /// How many of them were last reported (to log changes once).
    unfit_reported: usize,
    /// Capacity of the kernel's VIP map.
    max_vips: u32,
    /// Whether the sources have delivered a full set.
    synced: bool,
    readiness: Arc<Readiness>,
    metrics: AgentMetrics,
}

/// What one update did.
pub(super) struct Applied {
    /// The registry's changes, as written to the kernel.
    pub changes: Vec<MapChange>,
    /// It was a full set (the first, or a re-sync).
    pub full: bool,
}

impl VipMap {
    /// An empty map of at most `max_vips` VIPs, each with the `flags` bits.
    pub(super) fn new(
        flags: u32,
        max_vips: u32,
        readiness: Arc<Readiness>,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            registry: VipRegistry::new(),
            flags,
            unfit: HashMap::new(),
            unfit_reported: 0,
            max_vips,
            synced: false,
            readiness,
            metrics,
        }
    }

    /// Applies a source's update to the registry and the kernel's map. VIPs that do not fit
    /// wait, and are tried again once others have left. After a full set, what an earlier
    /// agent left in an adopted map and the source no longer has is removed.
    pub(super) fn apply(&mut self, update: VipUpdate, datapath: &mut Datapath) -> Result<Applied> {
        let started = Instant::now();
        let full = matches!(update, VipUpdate::Replace(_));
        // What the source no longer wants need not wait for room any more.
        match &update {
            VipUpdate::Replace(_) => self.unfit.clear(),
            VipUpdate::Changes { remove, .. } => {
                for vip in remove {
                    self.unfit.remove(vip);
                }
            }
        }
        let changes = self.registry.apply(update, self.flags);
        let freed = self.write(&changes, datapath)?;
        if freed && !self.unfit.is_empty() {
            let retry = VipUpdate::Changes {
                upsert: self.unfit.drain().map(|(_, d)| d).collect(),
                remove: Vec::new(),
            };
            let retried = self.registry.apply(retry, self.flags);
            self.write(&retried, datapath)?;
        }
        let idle = self.registry.idle_count();
        self.metrics.set_vips(
            idle,
            self.registry.len().saturating_sub(idle),
            self.unfit.len(),
        );
        self.readiness
            .vips_unfit
            .store(self.unfit.len() as u64, Ordering::Relaxed);
        let elapsed_us = started.elapsed().as_micros() as u64;
        if full {
            let stale = datapath.retain_vips(|key| {
                Vip::from_key(key).is_some_and(|v| self.registry.contains(&v))
            })?;
            if stale > 0 {
                info!(stale, "VIPs left in the adopted map removed");
            }
            self.set_synced();
            trim_heap_soon();
            info!(
                vips = self.registry.len(),
                idle,
                changes = changes.len(),
                elapsed_us,
                "VIP map synced"
            );
        } else {
            debug!(changes = changes.len(), elapsed_us, "VIP map updated");
        }
        self.report_unfit();
        Ok(Applied { changes, full })
    }

    /// Marks the map synced without a source (static VIPs, or none).
    pub(super) fn set_synced(&mut self) {
        self.synced = true;
        self.readiness.vips_synced.store(true, Ordering::Relaxed);
    }

    /// Whether the sources have delivered a full set.
    pub(super) fn is_synced(&self) -> bool {
        self.synced
    }

    /// The registry (read-only).
    pub(super) fn registry(&self) -> &VipRegistry {
        &self.registry
    }

    /// Every VIP's entry.
    pub(super) fn entries(&self) -> impl Iterator<Item = VipEntry> + '_ {
        self.registry.entries()
    }

    /// What a packet of `vip` that came in on an interface of scope `iface_scope` waits on:
    /// for a scoped VIP that scope (0 if the interface has none), else the VIP node-wide (0).
    pub(super) fn scope_for(&self, vip: &VipKey, iface_scope: Option<u32>) -> u32 {
        let scoped = Vip::from_key(vip).is_some_and(|v| self.registry.scopes(&v).is_some());
        match scoped {
            true => iface_scope.unwrap_or(0),
            false => 0,
        }
    }

    /// Whether `vip` has backends now for packets waiting on `scope` (0: node-wide): on a
    /// scope, the VIP's backends there, or, if it is not there (any more), yes: the kernel
    /// passes such packets on.
    pub(super) fn has_backends(&self, vip: &VipKey, scope: u32) -> bool {
        let Some(vip) = Vip::from_key(vip) else {
            return false;
        };
        if scope != 0
            && let Some(scopes) = self.registry.scopes(&vip)
        {
            return scopes
                .iter()
                .find(|s| s.scope == scope)
                .is_none_or(|s| s.backends > 0);
        }
        self.registry.get(&vip).is_some_and(|e| e.backends > 0)
    }

    /// Writes registry changes to the kernel map. A new VIP that does not fit leaves the
    /// registry and waits in `unfit` (the agent keeps running with what fits). Returns
    /// whether any VIP left the map.
    fn write(&mut self, changes: &[MapChange], datapath: &mut Datapath) -> Result<bool> {
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        for change in changes {
            match change {
                MapChange::Upsert(key, state) => upserts.push((*key, *state)),
                MapChange::Remove(key) => removes.push(*key),
                MapChange::Scopes { .. } => {}
            }
        }
        let unfit = datapath.apply_vips(&upserts, &removes)?;
        for key in &unfit {
            if let Some(vip) = Vip::from_key(key) {
                let scoped = self.registry.scopes(&vip).map(Into::into);
                if let Some(entry) = self.registry.remove(&vip) {
                    self.unfit.insert(
                        vip,
                        DesiredVip {
                            vip,
                            backends: entry.backends,
                            load_balancer: entry.load_balancer,
                            scoped,
                        },
                    );
                }
            }
        }
        for change in changes {
            // A VIP that did not fit has no entry to scope, and leaves the registry with its
            // id: entries written for that id would only stay behind.
            if let MapChange::Scopes {
                key,
                vip_id,
                scopes,
            } = change
                && !unfit.contains(key)
            {
                datapath.set_vip_scopes(*vip_id, scopes)?;
            }
        }
        Ok(!removes.is_empty())
    }

    /// Logs a change in how many VIPs do not fit, once.
    fn report_unfit(&mut self) {
        if self.unfit.len() == self.unfit_reported {
            return;
        }
        if !self.unfit.is_empty() {
            warn!(
                not_watched = self.unfit.len(),
                max_vips = self.max_vips,
                "the VIP map is full: some VIPs are not watched (OVN's own path handles \
                 them); raise --max-vips"
            );
        } else {
            info!("every VIP fits the VIP map again");
        }
        self.unfit_reported = self.unfit.len();
    }
}

/// A full sync parses and builds large transient structures (the monitor reply of every load
/// balancer); gives the freed memory back to the system a second later, once they are gone.
fn trim_heap_soon() {
    #[cfg(target_env = "gnu")]
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // SAFETY: malloc_trim only releases free heap memory; mallinfo2 only reads.
        let heap = unsafe {
            libc::malloc_trim(0);
            libc::mallinfo2()
        };
        debug!(
            in_use = heap.uordblks + heap.hblkhd,
            free = heap.fordblks,
            "heap trimmed after a full VIP sync"
        );
    });
}
