//! What the kernel side reports: per-CPU counters, the event ring, the held-frame ring.

use std::{os::fd::AsRawFd, sync::Arc};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use unidler_common::{Counter, HeldHeader, IdleHitEvent, map_names};

use super::{Datapath, DatapathError};
use crate::hold::HeldBytes;

impl Datapath {
    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        self.counters.read()
    }

    /// A reader of the kernel's counters for other tasks (the metrics endpoint).
    pub fn counter_reader(&self) -> CounterReader {
        self.counters.clone()
    }

    /// Hands out the event ring buffer; only once.
    pub fn take_events(&mut self) -> Option<EventRing> {
        self.events.take().map(|ring| EventRing { ring })
    }

    /// Hands out the held-frame ring buffer; only once.
    pub fn take_held(&mut self) -> Option<HeldRing> {
        self.held.take().map(|ring| HeldRing { ring })
    }
}

/// Reads the kernel's per-CPU counters; cheap to clone.
#[derive(Clone)]
pub struct CounterReader(pub(super) Arc<PerCpuArray<MapData, u64>>);

impl CounterReader {
    /// Sums each counter over the CPUs.
    pub fn read(&self) -> Result<Counters, DatapathError> {
        let mut values = [0u64; Counter::COUNT as usize];
        for (i, value) in values.iter_mut().enumerate() {
            let per_cpu = self
                .0
                .get(&(i as u32), 0)
                .map_err(|source| DatapathError::Map {
                    map: map_names::COUNTERS,
                    source,
                })?;
            *value = per_cpu.iter().sum();
        }
        Ok(Counters(values))
    }
}

/// Sums of the kernel's per-CPU counters, indexed by [`Counter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Connection-opening packets to a VIP with no backends: the kernel counts only their
    /// outcomes (one counter less on the idle path), dropped, passed and failed open.
    pub fn idle_hits(&self) -> u64 {
        self.get(Counter::IdleDropped)
            + self.get(Counter::IdlePassed)
            + self.get(Counter::IdleFailedOpen)
    }

    /// All parse failures together.
    pub fn parse_failures(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_parse_failure())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Each counter minus its value in `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut out = *self;
        for (o, e) in out.0.iter_mut().zip(earlier.0) {
            *o = o.wrapping_sub(e);
        }
        out
    }
}

/// The ring buffer of [`IdleHitEvent`]s written by the kernel.
pub struct EventRing {
    ring: RingBuf<MapData>,
}

impl EventRing {
    /// Takes every event now in the ring, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(IdleHitEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<IdleHitEvent>() {
                // SAFETY: the kernel wrote a whole IdleHitEvent; read_unaligned copes with any
                // alignment of the ring's data.
                each(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<IdleHitEvent>()) });
                n += 1;
            }
        }
        n
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// The ring buffer of held frames written by the kernel ([`unidler_common::HeldFrame`]s of
/// two sizes).
pub struct HeldRing {
    ring: RingBuf<MapData>,
}

/// The destination and source MAC addresses that lead a frame, before any VLAN tag.
const MAC_ADDRESSES_LEN: usize = 12;
/// An 802.1Q or 802.1ad tag: TPID and TCI.
const VLAN_TAG_LEN: usize = 4;

impl HeldRing {
    /// Takes every held frame now in the ring, oldest first, with any VLAN tag the kernel
    /// took off before the hook put back in its place.
    pub fn drain(&mut self, mut each: impl FnMut(HeldBytes)) -> usize {
        let mut n = 0;
        let header_len = size_of::<HeldHeader>();
        while let Some(item) = self.ring.next() {
            if item.len() < header_len {
                continue;
            }
            // SAFETY: every entry starts with a HeldHeader; read_unaligned copes with any
            // alignment of the ring's data.
            let header = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<HeldHeader>()) };
            let Some(bytes) = item.get(header_len..header_len + header.len as usize) else {
                continue;
            };
            let mut frame = Vec::with_capacity(bytes.len() + VLAN_TAG_LEN);
            frame.extend_from_slice(bytes);
            if header.vlan_proto_be != 0 && frame.len() >= MAC_ADDRESSES_LEN {
                // The tag the kernel took off before the hook: the frame as it came in has it
                // after the MAC addresses, and so must its replay.
                let mut tag = [0u8; VLAN_TAG_LEN];
                tag[..2].copy_from_slice(&header.vlan_proto_be.to_ne_bytes());
                tag[2..].copy_from_slice(&header.vlan_tci.to_be_bytes());
                frame.splice(MAC_ADDRESSES_LEN..MAC_ADDRESSES_LEN, tag);
            }
            each(HeldBytes {
                timestamp_ns: header.timestamp_ns,
                flow: header.flow,
                ifindex: header.ifindex,
                frame,
            });
            n += 1;
        }
        n
    }
}

impl AsRawFd for HeldRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}
