//! The questions behind `/api` (`unidler vips`, `events`, `wakeups`, `interfaces`), answered
//! from the parts that keep what is asked; nothing here changes them.

use unidler_common::VipKey;

use super::Agent;
use crate::telemetry::{Query, ScopeRow, VipRow};

impl Agent {
    /// A question from the HTTP endpoint. (A gone asker is not an error.)
    pub(super) fn on_query(&self, query: Query) {
        match query {
            Query::Vips(reply) => {
                let _ = reply.send(self.vip_rows());
            }
            Query::Events(reply) => {
                let _ = reply.send(self.hits.rows(&self.wakeups));
            }
            Query::Wakeups(reply) => {
                let _ = reply.send(self.wakeups.rows());
            }
            Query::Interfaces(reply) => {
                let _ = reply.send(self.interfaces.rows(&self.datapath));
            }
        }
    }

    /// The VIP table for `unidler vips`, sorted by VIP, from the VIP map and the hold: the
    /// HTTP task fills in the kernel's hit counts by key.
    fn vip_rows(&self) -> Vec<(VipKey, VipRow)> {
        let registry = self.vips.registry();
        let mut rows: Vec<(VipKey, VipRow)> = self
            .vips
            .entries()
            .map(|e| {
                let row = VipRow {
                    vip: e.vip.endpoint(),
                    protocol: e.vip.protocol.to_string(),
                    backends: e.backends,
                    state: if e.backends == 0 { "idle" } else { "active" }.into(),
                    hits: 0,
                    held: self.holding.held_for(&e.vip.key()),
                    load_balancer: e.load_balancer.as_ref().and_then(|n| self.hits.shown(n)),
                    scopes: registry
                        .scopes(&e.vip)
                        .unwrap_or_default()
                        .iter()
                        .map(|s| ScopeRow {
                            scope: s.scope,
                            backends: s.backends,
                            load_balancer: s
                                .load_balancer
                                .as_ref()
                                .and_then(|n| self.hits.shown(n)),
                        })
                        .collect(),
                };
                (e.vip.key(), row)
            })
            .collect();
        rows.sort_by(|(_, a), (_, b)| (&a.vip, &a.protocol).cmp(&(&b.vip, &b.protocol)));
        rows
    }
}
