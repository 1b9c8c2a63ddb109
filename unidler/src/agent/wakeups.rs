//! The wake-ups ([`crate::wakeup`]) moved from phase to phase by what the other parts see:
//! our rows committed or consumed, the VIP map's changes, and what befell held packets.

use std::time::Duration;

use super::{held::Holding, vip_map::VipMap};
use crate::{
    clock,
    hold::HoldLimits,
    ovn::controller_event::{RowFate, RowNews},
    registry::MapChange,
    wakeup::{Phase, Wakeups},
};

/// How long a wake-up may go on: as long as a held packet may wait (at least a minute), and
/// the replays after it.
pub(super) fn timeout(hold: &HoldLimits) -> Duration {
    hold.max_age.max(Duration::from_secs(60)) + Duration::from_secs(30)
}

/// One of our rows was committed, or consumed by the CMS.
pub(super) fn on_row(wakeups: &mut Wakeups, row: RowNews) {
    let phase = match row.fate {
        RowFate::Committed => Phase::Committed,
        RowFate::Consumed => Phase::Consumed,
    };
    wakeups.row_reached(&row.vip, &row.protocol, phase, clock::monotonic_ns());
}

/// A VIP of a wake-up that got a backend where the wake-up's first packet came in (its
/// scope, for a scoped VIP) reached that phase; one deleted ends its wake-up.
pub(super) fn follow_map(wakeups: &mut Wakeups, changes: &[MapChange], vips: &VipMap) {
    if wakeups.open_count() == 0 {
        return;
    }
    let now = clock::monotonic_ns();
    for change in changes {
        match change {
            MapChange::Upsert(key, _) | MapChange::Scopes { key, .. } => {
                let Some(scope) = wakeups.scope_of(key) else {
                    continue;
                };
                if vips.has_backends(key, scope) {
                    wakeups.reached(key, Phase::Backend, now);
                }
            }
            MapChange::Remove(key) => wakeups.vip_removed(key, now),
        }
    }
}

/// What befell held packets since the last input moves their wake-ups on.
pub(super) fn follow_hold(wakeups: &mut Wakeups, holding: &mut Holding) {
    let news = holding.take_news();
    if !news.is_empty() {
        wakeups.follow_hold(&news, clock::monotonic_ns());
    }
}
