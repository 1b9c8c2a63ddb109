//! The agent: the datapath and the parts that own the rest of its state, each with its
//! handlers, driven by one loop over its [`Sources`]:
//! - [`vip_map`]: what the VIP sources want, what of it is in the kernel's map (`--max-vips`);
//! - [`interfaces`]: the interfaces followed and attached to, and their scopes;
//! - [`hits`]: the idle hits and where they go (rows or stdout, recent events, names);
//! - [`held`]: the held packets and their replays;
//! - [`wakeups`]: the wake-ups, moved on by what the others see;
//! - [`heartbeat`]: whether the agent vouches for the map (or idle VIPs fail open);
//! - [`start`]: start-up; [`queries`]: the questions behind `/api`.
//!
//! The flows, each with one handler:
//! - ring readable → [`Input::IdleHits`] → hits (resolved against the VIP map) → writer or
//!   stdout; each starts or joins its VIP's wake-up;
//! - VIP source → [`Input::Vips`] → VIP map → kernel map changes, which the held packets and
//!   the wake-ups follow;
//! - held-frame ring readable → [`Input::HeldPackets`] → held packets (bounded);
//! - replay timer → [`Input::ReplayDue`] → replays through the datapath, expiry;
//! - forwarding check of a VIP that got a backend (OVN) → [`Input::ForwardingChecked`] → its
//!   held packets due;
//! - our Controller_Event rows committed or consumed (the writer) → [`Input::Row`] → the
//!   wake-ups' phases;
//! - links, the safety-net timer and OVN's interfaces → interfaces;
//! - HTTP endpoint → [`Input::Query`] → answers;
//! - summary and heartbeat timers, and signals.

mod config;
mod heartbeat;
mod held;
mod hits;
mod interfaces;
mod queries;
mod sources;
mod start;
mod vip_map;
mod wakeups;

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::info;
use unidler_common::IdleHitEvent;

pub use self::config::{Config, IdleAction, InterfaceSelector, VipSourceConfig};
use self::{
    heartbeat::Heartbeat,
    held::Holding,
    hits::Hits,
    interfaces::Interfaces,
    sources::{Input, Sources},
    vip_map::VipMap,
};
use crate::{
    clock,
    datapath::Datapath,
    telemetry::Readiness,
    vip::VipUpdate,
    wakeup::{Phase, Wakeups},
};

/// A running agent: the program attached, its sources started.
pub struct Agent {
    /// The kernel side: programs, maps, rings, attachments.
    datapath: Datapath,
    /// The VIPs watched.
    vips: VipMap,
    /// The interfaces followed and attached to.
    interfaces: Interfaces,
    /// The idle hits and where they go.
    hits: Hits,
    /// Opening packets to idle VIPs, held until their VIP has a backend.
    holding: Holding,
    /// The wake-ups going on, and the last ones finished.
    wakeups: Wakeups,
    /// The kernel's heartbeat, renewed while the VIP map can be vouched for.
    heartbeat: Heartbeat,
    /// What `/readyz` reports (the parts set their own fields).
    readiness: Arc<Readiness>,
    /// The file VIP source's reload trigger (SIGHUP), if it runs.
    reload_vips_file: Option<mpsc::UnboundedSender<()>>,
    sources: Option<Sources>,
}

impl Agent {
    /// Runs until SIGINT or SIGTERM, then detaches and writes what is still queued.
    pub async fn run(mut self) -> Result<()> {
        let mut sources = self.sources.take().context("the agent runs once")?;
        loop {
            let dp = &mut self.datapath;
            match sources.next().await? {
                Input::IdleHits(events) => self.on_idle_hits(&events)?,
                Input::HeldPackets(frames) => {
                    self.holding
                        .on_held_packets(frames, dp, &self.vips, &self.interfaces)
                }
                Input::ReplayDue => self.holding.on_replay_due(dp),
                Input::ForwardingChecked(waiting, check) => self.holding.on_forwarding_checked(
                    waiting,
                    check,
                    dp,
                    &self.vips,
                    &mut self.wakeups,
                ),
                Input::Vips(update) => self.on_vips(update)?,
                Input::NamesRead(names) => self.hits.on_names_read(names, &mut self.wakeups)?,
                Input::Row(row) => wakeups::on_row(&mut self.wakeups, row),
                Input::Query(query) => self.on_query(query),
                Input::SummaryDue => self.hits.on_summary_due(dp)?,
                Input::HeartbeatDue => {
                    self.holding.on_heartbeat(dp);
                    self.wakeups
                        .finish_due(clock::monotonic_ns(), Phase::Backend);
                    self.heartbeat.on_due(self.vips.is_synced(), dp)?;
                }
                Input::InterfacesDue => self.interfaces.on_due(dp),
                Input::Vifs(names) => self.interfaces.on_vifs(names, dp),
                Input::PortScopes => self.interfaces.sync_scopes(dp),
                Input::Reload => self.on_reload(),
                Input::Stop(signal) => {
                    info!("{signal}: detaching");
                    break;
                }
            }
            wakeups::follow_hold(&mut self.wakeups, &mut self.holding);
            sources.replay.arm(self.holding.next_due_ns().map(|due| {
                tokio::time::Instant::now()
                    + Duration::from_nanos(due.saturating_sub(clock::monotonic_ns()))
            }));
        }
        self.shut_down(sources).await
    }

    /// Idle hits from the kernel, to the hits part.
    fn on_idle_hits(&mut self, events: &[IdleHitEvent]) -> Result<()> {
        self.hits
            .on_idle_hits(events, &self.vips, &self.interfaces, &mut self.wakeups)
    }

    /// A VIP update: applied to the VIP map, then followed by the held packets and the
    /// wake-ups; after a full set, the hits that waited for it are reported.
    fn on_vips(&mut self, update: VipUpdate) -> Result<()> {
        let applied = self.vips.apply(update, &mut self.datapath)?;
        self.holding
            .follow_map(&applied.changes, &mut self.datapath, &self.vips);
        wakeups::follow_map(&mut self.wakeups, &applied.changes, &self.vips);
        if applied.full {
            let pending = self.hits.take_pending();
            if !pending.is_empty() {
                info!(
                    hits = pending.len(),
                    "reporting idle hits seen before the VIP sync"
                );
                self.on_idle_hits(&pending)?;
            }
        }
        Ok(())
    }

    /// SIGHUP: the VIPs file is read again.
    fn on_reload(&self) {
        match &self.reload_vips_file {
            Some(reload) => {
                info!("SIGHUP: reloading the VIPs file");
                let _ = reload.send(());
            }
            None => info!("SIGHUP: nothing to reload"),
        }
    }

    /// Detaches, reads what the ring still holds, and lets the hits finish (names, totals,
    /// the writer's queue).
    async fn shut_down(mut self, mut sources: Sources) -> Result<()> {
        if self.datapath.is_pinned() {
            info!(
                "leaving the datapath attached and pinned: the next agent with the same \
                 --pin-dir adopts it (`unidler detach --pin-dir DIR` removes it)"
            );
        }
        self.datapath.detach_all();
        // Hits the kernel reported before it was detached and the loop had not read yet.
        let mut last = Vec::new();
        sources.ring.get_mut().drain(|event| last.push(event));
        self.on_idle_hits(&last)?;
        self.hits
            .finish(&mut sources.names_read, &self.datapath, &mut self.wakeups)
            .await
    }
}
