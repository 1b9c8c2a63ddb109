//! The kernel's counts of held packets (per VIP, in all), which bound what it copies, kept in
//! step with what the hold keeps: written down when packets leave ([`HeldPackets::sync_kernel`]),
//! and checked now and then for what a race or a lost write left
//! ([`HeldPackets::reconcile_kernel`]).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tracing::{debug, warn};
use unidler_common::{FlowKey, VipKey};

use super::{HeldPackets, HoldKernel};

/// How often the kernel's counts of held packets are checked against the hold's (see
/// [`HeldPackets::reconcile_kernel`]).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Kernel counts seen above the hold's at the last [`HeldPackets::reconcile_kernel`].
#[derive(Debug, Default)]
pub(super) struct KernelSuspects {
    pub(super) vips: HashMap<VipKey, u32>,
    pub(super) total: Option<u32>,
}

/// See [`HeldPackets::sync_kernel`].
#[derive(Debug, Default)]
pub(super) struct Unsynced {
    pub(super) vips: HashSet<VipKey>,
    pub(super) refused_flows: Vec<FlowKey>,
    /// The total, though no VIP's count changed.
    pub(super) total: bool,
}

impl HeldPackets {
    /// Writes the kernel's counts down to what the hold keeps, for the VIPs whose count fell
    /// (packets let go, or refused here after the kernel counted them), and lets go of the
    /// flows the kernel copied that the hold refused. The kernel counts up as it copies; it
    /// never counts more than the hold keeps plus what waits in the ring.
    pub fn sync_kernel(&mut self, kernel: &mut impl HoldKernel) {
        let total = std::mem::take(&mut self.unsynced.total);
        if self.unsynced.vips.is_empty() && self.unsynced.refused_flows.is_empty() && !total {
            return;
        }
        let watching_left = !self.watched.is_empty();
        for flow in std::mem::take(&mut self.unsynced.refused_flows) {
            if !self.flows.contains(&flow)
                && let Err(e) = kernel.release(&flow, watching_left)
            {
                warn!("cannot let a refused flow go in the kernel: {e}");
            }
        }
        let vips: Vec<(VipKey, u32)> = std::mem::take(&mut self.unsynced.vips)
            .into_iter()
            .map(|vip| (vip, self.held_for(&vip) as u32))
            .collect();
        if let Err(e) = kernel.set_held(&vips, self.total as u32) {
            warn!("cannot write the held counts to the kernel: {e}");
        }
    }

    /// Writes down every kernel count that stayed above what the hold keeps since the last
    /// call, and removes the kernel's counts of VIPs it holds nothing for: what a race or a
    /// lost write left (the kernel's count of a copy it then could not make, a write that
    /// failed). Run now and then. A count above the hold's that changed since the last call
    /// is left alone: the kernel also counts what waits in the ring, which the hold has not
    /// read yet.
    pub fn reconcile_kernel(&mut self, now_ns: u64, kernel: &mut impl HoldKernel) {
        if !self.enabled()
            || now_ns.saturating_sub(self.reconciled_ns) < RECONCILE_EVERY.as_nanos() as u64
        {
            return;
        }
        self.reconciled_ns = now_ns;
        let (per_vip, total) = kernel.held_in_kernel();
        let mut suspects = HashMap::new();
        for (vip, held) in per_vip {
            if held as usize > self.held_for(&vip) {
                if self.kernel_suspects.vips.get(&vip) == Some(&held) {
                    self.unsynced.vips.insert(vip);
                } else {
                    suspects.insert(vip, held);
                }
            }
        }
        let total_suspect = (total as usize > self.total).then_some(total);
        if total_suspect.is_some() && self.kernel_suspects.total == total_suspect {
            self.unsynced.total = true;
        }
        self.kernel_suspects = KernelSuspects {
            vips: suspects,
            total: total_suspect.filter(|_| !self.unsynced.total),
        };
        if self.unsynced.total || !self.unsynced.vips.is_empty() {
            debug!("held counts in the kernel above the hold's since the last look: written down");
            self.unsynced.total = true;
            self.sync_kernel(kernel);
        }
    }
}
