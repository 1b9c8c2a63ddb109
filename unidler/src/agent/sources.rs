//! The agent loop's inputs. Each source is one field of [`Sources`]; [`Sources::next`] waits
//! for whichever is ready first and says what happened as an [`Input`], which the agent
//! handles. A new input is a new field here, a new variant, and a new handler.

use std::{io, os::fd::AsRawFd, pin::Pin, sync::Arc, time::Duration};

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
    pace::Pacer,
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
    /// The kernel's event ring, read when it holds events.
    pub ring: PacedRing<EventRing>,
    /// The kernel's held-frame ring, read when it holds frames.
    pub held: PacedRing<HeldRing>,
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

/// How the kernel rings are read under load: at once while records come slowly, few at a
/// time or in bulk; at most every 10 ms while they keep coming at 250 a second or more in
/// batches under 64 (a flood within the kernel's limits), so that each wake-up reads many.
/// Records meanwhile wait in the ring (1 MiB each, which such a flood takes far longer than
/// this to fill).
pub fn ring_pacer() -> Pacer {
    Pacer::new(Duration::from_millis(10), 250, 64)
}

/// A kernel ring buffer, read as its [`Pacer`] says.
pub struct PacedRing<T: AsRawFd> {
    ring: AsyncFd<T>,
    pacer: Pacer,
}

impl<T: AsRawFd> PacedRing<T> {
    /// `ring`, registered with the runtime's epoll, read as `pacer` says.
    pub fn new(ring: AsyncFd<T>, pacer: Pacer) -> Self {
        Self { ring, pacer }
    }

    /// The ring itself (to drain it without waiting, at exit).
    pub fn get_mut(&mut self) -> &mut T {
        self.ring.get_mut()
    }

    /// Waits until the pacer allows a read and the ring has records, then reads them all
    /// with `drain`. Cancel-safe: records are taken only once the ring is readable, without
    /// an await in between.
    async fn read<R>(&mut self, drain: impl FnOnce(&mut T) -> Vec<R>) -> io::Result<Vec<R>> {
        if let Some(at) = self.pacer.not_before() {
            tokio::time::sleep_until(at).await;
        }
        let mut guard = self.ring.readable_mut().await?;
        let records = drain(guard.get_inner_mut());
        guard.clear_ready();
        self.pacer.taken(records.len(), Instant::now());
        Ok(records)
    }
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
            events = ring.read(|ring| {
                let mut events = Vec::new();
                ring.drain(|event| events.push(event));
                events
            }) => Ok(Input::IdleHits(events.context("waiting on the event ring")?)),
            frames = held.read(|ring| {
                let mut frames = Vec::new();
                ring.drain(|frame| frames.push(frame));
                frames
            }) => Ok(Input::HeldPackets(frames.context("waiting on the held-frame ring")?)),
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

#[cfg(test)]
mod tests {
    use std::{io::Read as _, io::Write as _, os::unix::net::UnixStream};

    use super::*;

    /// A record every millisecond for 200 ms: after the first few, read in batches, at most one
    /// read per pace; every record read. After a quiet spell, the next record is read without
    /// waiting for the pace.
    #[tokio::test(flavor = "current_thread")]
    async fn a_ring_that_keeps_bringing_records_is_read_in_batches() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let mut ring = PacedRing::new(
            super::super::start::readable(reader).unwrap(),
            Pacer::new(Duration::from_millis(100), 250, 64),
        );
        let drain = |r: &mut UnixStream| {
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while let Ok(n @ 1..) = r.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got
        };
        let feeder = std::thread::spawn(move || {
            for i in 0..200u32 {
                writer.write_all(&[i as u8]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            writer
        });
        let (mut reads, mut records) = (0, 0);
        while records < 200 {
            records += ring.read(drain).await.unwrap().len();
            reads += 1;
        }
        let mut writer = feeder.join().unwrap();
        // The first 13 (250 a second over 50 ms) read as they come, then one read per 100 ms;
        // unpaced, about one read per record.
        assert!(reads <= 40, "{reads} reads for 200 records");

        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.write_all(&[1]).unwrap();
        let started = Instant::now();
        assert_eq!(ring.read(drain).await.unwrap().len(), 1);
        assert!(
            started.elapsed() < Duration::from_millis(60),
            "the first record after a quiet spell waited for the pace"
        );
    }
}
