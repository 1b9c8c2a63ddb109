//! The agent's handlers that move wake-ups ([`crate::wakeup`]) from phase to phase.

use std::time::Duration;

use super::Agent;
use crate::{
    clock,
    hold::HoldLimits,
    ovn::controller_event::{RowFate, RowNews},
    registry::MapChange,
    wakeup::Phase,
};

/// How long a wake-up may go on: as long as a held packet may wait (at least a minute), and
/// the replays after it.
pub(super) fn timeout(hold: &HoldLimits) -> Duration {
    hold.max_age.max(Duration::from_secs(60)) + Duration::from_secs(30)
}

impl Agent {
    /// One of our rows was committed, or consumed by the CMS.
    pub(super) fn on_row(&mut self, row: RowNews) {
        let phase = match row.fate {
            RowFate::Committed => Phase::Committed,
            RowFate::Consumed => Phase::Consumed,
        };
        self.wakeups
            .row_reached(&row.vip, &row.protocol, phase, clock::monotonic_ns());
    }

    /// A VIP of a wake-up that got a backend where the wake-up's first packet came in (its
    /// scope, for a scoped VIP) reached that phase; one deleted ends its wake-up.
    pub(super) fn wakeups_follow_vips(&mut self, changes: &[MapChange]) {
        if self.wakeups.open_count() == 0 {
            return;
        }
        let now = clock::monotonic_ns();
        for change in changes {
            match change {
                MapChange::Upsert(key, _) | MapChange::Scopes { key, .. } => {
                    let Some(scope) = self.wakeups.scope_of(key) else {
                        continue;
                    };
                    if self.has_backends(key, scope) {
                        self.wakeups.reached(key, Phase::Backend, now);
                    }
                }
                MapChange::Remove(key) => self.wakeups.vip_removed(key, now),
            }
        }
    }

    /// What befell held packets since the last input moves their wake-ups on.
    pub(super) fn wakeups_follow_hold(&mut self) {
        let news = self.held.take_news();
        if !news.is_empty() {
            self.wakeups.follow_hold(&news, clock::monotonic_ns());
        }
    }
}
