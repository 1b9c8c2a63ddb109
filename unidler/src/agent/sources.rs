//! The agent loop's inputs. Each source is one field of [`Sources`]; [`Sources::next`] waits
//! for whichever is ready first and says what happened as an [`Input`], which the agent
//! handles. A new input is a new field here, a new variant, and a new handler.

use std::{pin::Pin, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    time::{Instant, Interval, Sleep, interval_at},
};
use unidler_common::IdleHitEvent;

use crate::{
    datapath::{EventRing, HeldRing},
    hold::HeldBytes,
    links::LinkChanges,
    ovn::controller_event::RowNews,
    ovn::forwarding::{ForwardingCheck, Waiting},
    ovn::lb_names::NamesRead,
    ovn::ovs_interfaces::OvnInterfaces,
    ovn::vips::PortScopes,
    telemetry::Query,
    vip::VipUpdate,
};

/// Something for the agent to handle.
pub enum Input {
    /// The kernel reported idle hits (every event that was in the ring, oldest first).
    IdleHits(Vec<IdleHitEvent>),
    /// The kernel held opening packets (every frame that was in the held ring, oldest first).
    HeldPackets(Vec<HeldBytes>),
    /// Time to replay held packets (or discard old ones).
    ReplayDue,
    /// The node's forwarding was checked for a VIP that got a backend.
    ForwardingChecked(Waiting, ForwardingCheck),
    /// A VIP source's update.
    Vips(VipUpdate),
    /// Load balancers' names read from the database, for hits that wait for them.
    NamesRead(NamesRead),
    /// One of our Controller_Event rows was committed, or consumed.
    Row(RowNews),
    /// A question from the HTTP endpoint.
    Query(Query),
    /// Time for the periodic summary.
    SummaryDue,
    /// Time to renew the kernel's heartbeat (if the agent can vouch for the VIP map).
    HeartbeatDue,
    /// Time to look at the interfaces again: a link changed (or the safety-net timer): new
    /// ones to follow, gone or re-created ones.
    InterfacesDue,
    /// OVN's interfaces (VIFs, uplinks) the local Open_vSwitch database lists now.
    Vifs(OvnInterfaces),
    /// The scopes of this node's logical ports changed (the OVN VIP source says).
    PortScopes,
    /// SIGHUP: reload what can be reloaded.
    Reload,
    /// SIGINT or SIGTERM (named): detach and exit.
    Stop(&'static str),
}

/// Where the inputs come from.
pub struct Sources {
    /// The kernel's event ring, readable when it holds events.
    pub ring: AsyncFd<EventRing>,
    /// The kernel's held-frame ring, readable when it holds frames.
    pub held: AsyncFd<HeldRing>,
    /// When held packets are next due (armed by the agent after each input).
    pub replay: ReplayTimer,
    /// Results of forwarding checks.
    pub forwarding: mpsc::UnboundedReceiver<(Waiting, ForwardingCheck)>,
    /// VIP sources' updates.
    pub vip_updates: mpsc::UnboundedReceiver<VipUpdate>,
    /// The HTTP endpoint's questions.
    pub queries: mpsc::Receiver<Query>,
    /// The summary timer; None when summaries are off.
    pub summary: Option<Interval>,
    /// The heartbeat timer.
    pub heartbeat: Interval,
    /// The interface check timer (a safety net: link notifications come first).
    pub interfaces: Interval,
    /// The kernel's link notifications.
    pub links: AsyncFd<LinkChanges>,
    /// Updates of OVN's interfaces (never ready without `--ovn-vifs` or `--ovn-uplinks`).
    pub vifs: mpsc::UnboundedReceiver<OvnInterfaces>,
    /// The local logical ports' scopes (with VIPs from OVN).
    pub port_scopes: Option<watch::Receiver<Arc<PortScopes>>>,
    /// Load balancers' names as they are read ([`crate::ovn::lb_names`]).
    pub names_read: mpsc::UnboundedReceiver<NamesRead>,
    /// What became of our Controller_Event rows (never ready without the writer).
    pub rows: mpsc::UnboundedReceiver<RowNews>,
    /// Signals.
    pub signals: Signals,
}

/// A timer set to when held packets are next due, or unarmed.
pub struct ReplayTimer {
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl ReplayTimer {
    /// An unarmed timer.
    pub fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        }
    }

    /// Fires at `deadline`, or never (None).
    pub fn arm(&mut self, deadline: Option<Instant>) {
        self.armed = deadline.is_some();
        if let Some(deadline) = deadline {
            self.sleep.as_mut().reset(deadline);
        }
    }
}

impl Default for ReplayTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// The signals the agent acts on.
pub struct Signals {
    hangup: Signal,
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> Result<Self> {
        Ok(Self {
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
        })
    }
}

impl Sources {
    /// A summary timer that first fires one `every` from now (None for zero).
    pub fn summary_timer(every: Duration) -> Option<Interval> {
        (!every.is_zero()).then(|| interval_at(Instant::now() + every, every))
    }

    /// Waits for the next input.
    pub async fn next(&mut self) -> Result<Input> {
        let Self {
            ring,
            held,
            replay,
            forwarding,
            vip_updates,
            queries,
            summary,
            heartbeat,
            interfaces,
            links,
            vifs,
            port_scopes,
            names_read,
            rows,
            signals,
        } = self;
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the event ring")?;
                let mut events = Vec::new();
                guard.get_inner_mut().drain(|event| events.push(event));
                guard.clear_ready();
                Ok(Input::IdleHits(events))
            }
            guard = held.readable_mut() => {
                let mut guard = guard.context("waiting on the held-frame ring")?;
                let mut frames = Vec::new();
                guard.get_inner_mut().drain(|frame| frames.push(frame));
                guard.clear_ready();
                Ok(Input::HeldPackets(frames))
            }
            _ = replay.sleep.as_mut(), if replay.armed => {
                replay.armed = false;
                Ok(Input::ReplayDue)
            }
            Some((waiting, readiness)) = forwarding.recv() => Ok(Input::ForwardingChecked(waiting, readiness)),
            Some(update) = vip_updates.recv() => Ok(Input::Vips(update)),
            Some(names) = names_read.recv() => Ok(Input::NamesRead(names)),
            Some(row) = rows.recv() => Ok(Input::Row(row)),
            Some(query) = queries.recv() => Ok(Input::Query(query)),
            _ = async { summary.as_mut().expect("guarded by if").tick().await }, if summary.is_some() => {
                Ok(Input::SummaryDue)
            }
            _ = heartbeat.tick() => Ok(Input::HeartbeatDue),
            _ = interfaces.tick() => Ok(Input::InterfacesDue),
            guard = links.readable_mut() => {
                let mut guard = guard.context("waiting on link notifications")?;
                guard.get_inner_mut().drain();
                guard.clear_ready();
                Ok(Input::InterfacesDue)
            }
            Some(names) = vifs.recv() => Ok(Input::Vifs(names)),
            Ok(()) = async { port_scopes.as_mut().expect("guarded by if").changed().await }, if port_scopes.is_some() => {
                Ok(Input::PortScopes)
            }
            _ = signals.hangup.recv() => Ok(Input::Reload),
            _ = signals.interrupt.recv() => Ok(Input::Stop("SIGINT")),
            _ = signals.terminate.recv() => Ok(Input::Stop("SIGTERM")),
        }
    }
}
