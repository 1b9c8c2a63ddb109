//! The kernel's heartbeat: renewed while the agent can vouch for the VIP map (the VIP source
//! has synced and, for OVN, is still connected). Without it, idle VIPs fail open (pass to
//! OVN's own path) once the heartbeat is `--fail-open-after` old.

use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{info, warn};

use crate::{datapath::Datapath, telemetry::metrics::AgentMetrics};

/// How often the kernel's heartbeat is renewed (more often for a short `--fail-open-after`).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Whether the agent vouches for the VIP map, and since when it has not.
pub(super) struct Heartbeat {
    /// How long idle VIPs keep dropping without a renewed heartbeat (zero: forever).
    fail_open_after: Duration,
    /// When the kernel's heartbeat was last renewed (at load, then here).
    renewed: Instant,
    /// Since when the agent has not vouched for the map, once it had (to log changes once).
    out_of_sync_since: Option<Instant>,
    /// The OVN VIP source's database connection: the map can be vouched for only while it is
    /// connected.
    source_connection: Option<ovsdb::Client>,
    metrics: AgentMetrics,
}

impl Heartbeat {
    /// The heartbeat as the datapath was loaded with it (renewed just now).
    pub(super) fn new(
        fail_open_after: Duration,
        source_connection: Option<ovsdb::Client>,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            fail_open_after,
            renewed: Instant::now(),
            out_of_sync_since: None,
            source_connection,
            metrics,
        }
    }

    /// How often to renew the heartbeat: every second, or three times within a shorter
    /// `fail_open_after`.
    pub(super) fn period(&self) -> Duration {
        if self.fail_open_after.is_zero() {
            return HEARTBEAT_EVERY;
        }
        HEARTBEAT_EVERY
            .min(self.fail_open_after / 3)
            .max(Duration::from_millis(10))
    }

    /// Renews the kernel's heartbeat if the map `synced` and its source is connected; says
    /// when idle VIPs start or stop failing open.
    pub(super) fn on_due(&mut self, synced: bool, datapath: &mut Datapath) -> Result<()> {
        let connected = self
            .source_connection
            .as_ref()
            .is_none_or(ovsdb::Client::is_connected);
        self.metrics
            .vip_source_synced
            .set(i64::from(synced && connected));
        let failing_open =
            !self.fail_open_after.is_zero() && self.renewed.elapsed() > self.fail_open_after;
        if failing_open != (self.metrics.fail_open.get() == 1) {
            self.metrics.fail_open.set(i64::from(failing_open));
            match failing_open {
                true => warn!(
                    fail_open_after = ?self.fail_open_after,
                    "failing open: idle VIPs pass to OVN's own path until the VIP source is back"
                ),
                false => info!("no longer failing open"),
            }
        }
        if synced && connected {
            datapath.renew_heartbeat()?;
            self.renewed = Instant::now();
            if let Some(since) = self.out_of_sync_since.take() {
                info!(
                    after = ?since.elapsed(),
                    "VIP source back in sync: idle VIPs drop again"
                );
            }
        } else if synced && self.out_of_sync_since.is_none() {
            self.out_of_sync_since = Some(Instant::now());
            if !self.fail_open_after.is_zero() {
                warn!(
                    fail_open_after = ?self.fail_open_after,
                    "VIP source out of sync: idle VIPs fail open (pass) unless it is back in time"
                );
            }
        }
        Ok(())
    }
}
