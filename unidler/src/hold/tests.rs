//! The hold's unit tests, against a fake kernel.

use super::*;

const MS: u64 = 1_000_000;

#[derive(Default)]
struct FakeKernel {
    replays: Vec<(Vec<u8>, u32)>,
    watched: HashSet<FlowKey>,
    answered: HashSet<FlowKey>,
    released: Vec<FlowKey>,
    /// The kernel's counts as last written: per VIP, and in all.
    held: HashMap<VipKey, u32>,
    total: u32,
}

impl HoldKernel for FakeKernel {
    type Error = std::convert::Infallible;
    fn replay(&mut self, frame: &[u8], ifindex: u32) -> Result<(), Self::Error> {
        self.replays.push((frame.to_vec(), ifindex));
        Ok(())
    }
    fn watch(&mut self, flow: &FlowKey, _ifindex: u32) -> Result<(), Self::Error> {
        self.watched.insert(*flow);
        Ok(())
    }
    fn answered(&self, flow: &FlowKey) -> bool {
        self.answered.contains(flow)
    }
    fn release(&mut self, flow: &FlowKey, _watching_left: bool) -> Result<(), Self::Error> {
        self.watched.remove(flow);
        self.released.push(*flow);
        Ok(())
    }
    fn set_held(&mut self, vips: &[(VipKey, u32)], total: u32) -> Result<(), Self::Error> {
        for (vip, n) in vips {
            match n {
                0 => self.held.remove(vip),
                n => self.held.insert(*vip, *n),
            };
        }
        self.total = total;
        Ok(())
    }
    fn held_in_kernel(&self) -> (Vec<(VipKey, u32)>, u32) {
        (
            self.held.iter().map(|(v, n)| (*v, *n)).collect(),
            self.total,
        )
    }
}

fn vip() -> VipKey {
    let mut key = VipKey {
        port_be: 80u16.to_be(),
        proto: 6,
        family: unidler_common::FAMILY_IPV4,
        ..VipKey::default()
    };
    key.addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
    key
}

/// A TCP SYN (or UDP datagram, `proto` 17) from 10.0.0.1:`sport` to 10.0.0.2:80.
fn packet(sport: u16, proto: u8, seen_ns: u64) -> HeldBytes {
    packet_to(sport, 80, proto, seen_ns)
}

/// A TCP SYN (or UDP datagram, `proto` 17) from 10.0.0.1:`sport` to 10.0.0.2:`dport`,
/// as the kernel hands it over.
fn packet_to(sport: u16, dport: u16, proto: u8, seen_ns: u64) -> HeldBytes {
    let l4_len: usize = if proto == 6 { 20 } else { 8 };
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4_len) as u16;
    f.extend_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        l4[12] = 0x50;
        l4[13] = 0x02;
    } else {
        l4[4..6].copy_from_slice(&8u16.to_be_bytes());
    }
    f.extend_from_slice(&l4);
    let flow = frame::parse(&f).expect("a frame the parser reads").flow;
    HeldBytes {
        timestamp_ns: seen_ns,
        flow,
        ifindex: 7,
        frame: f,
    }
}

fn limits() -> HoldLimits {
    HoldLimits {
        per_vip: 3,
        total: 5,
        max_age: Duration::from_secs(60),
        replay_after: Duration::ZERO,
    }
}

fn count(hold: &HeldPackets, outcome: &'static str) -> u64 {
    hold.metrics
        .packets
        .get_or_create(&[("outcome", outcome)])
        .get()
}

#[test]
fn retransmissions_and_packets_over_the_limits_are_counted_not_held() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    hold.hold(packet(1000, 6, 0), 0);
    hold.hold(packet(1000, 6, MS), MS);
    assert_eq!((hold.len(), count(&hold, "retransmission")), (1, 1));
    for sport in 1001..1005 {
        hold.hold(packet(sport, 6, 2 * MS), 2 * MS);
    }
    assert_eq!((hold.len(), count(&hold, "over_limit_vip")), (3, 2));
    for (i, port) in [81u16, 82, 83].iter().enumerate() {
        hold.hold(packet_to(2000 + i as u16, *port, 6, 0), 0);
    }
    assert_eq!((hold.len(), count(&hold, "over_limit_total")), (5, 1));
}

#[test]
fn the_kernels_counts_follow_what_is_held() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    // The kernel copied four of one VIP (it counted four); the hold keeps three.
    for sport in 1000..1004 {
        hold.hold(packet(sport, 6, 0), 0);
    }
    hold.replay_due(MS, &mut kernel);
    assert_eq!(
        kernel.held.get(&vip()),
        Some(&3),
        "written down to what is kept"
    );
    assert_eq!(kernel.total, 3);
    let refused = packet(1003, 6, 0).flow;
    assert_eq!(kernel.released, vec![refused], "the refused flow let go");
    // Nothing changed: nothing written.
    kernel.total = 99;
    hold.replay_due(2 * MS, &mut kernel);
    assert_eq!(kernel.total, 99);
    // Replayed and answered: every flow let go, the counts at zero.
    hold.backends_appeared(&HoldKey::node_wide(vip()), 10 * MS);
    hold.replay_due(10 * MS, &mut kernel);
    kernel.answered.extend(kernel.watched.iter().copied());
    hold.replay_due(20 * MS, &mut kernel);
    assert!(hold.is_empty());
    assert_eq!((kernel.held.get(&vip()), kernel.total), (None, 0));
    assert_eq!(kernel.released.len(), 4);
}

/// A count the kernel kept for a copy it could not make (or a VIP the hold never saw) is
/// written down once it stayed so between two reconciliations; counts at or below the
/// hold's stay.
#[test]
fn stale_kernel_counts_are_written_down() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    hold.hold(packet(1000, 6, 0), 0);
    hold.replay_due(MS, &mut kernel);
    let other = packet_to(1000, 81, 6, 0).vip();
    kernel.held.insert(vip(), 1);
    kernel.held.insert(other, 1);
    kernel.total = 2;
    let every = RECONCILE_EVERY.as_nanos() as u64;
    hold.reconcile_kernel(every, &mut kernel);
    assert_eq!(
        kernel.total, 2,
        "left alone at first: it may be what waits in the ring"
    );
    hold.reconcile_kernel(every + MS, &mut kernel);
    assert_eq!(kernel.total, 2, "not again so soon");
    hold.reconcile_kernel(2 * every, &mut kernel);
    assert_eq!(kernel.held.get(&vip()), Some(&1));
    assert_eq!(kernel.held.get(&other), None, "a VIP the hold never saw");
    assert_eq!(kernel.total, 1);
    // Nothing above the hold's: nothing written.
    kernel.total = 0;
    hold.reconcile_kernel(4 * every, &mut kernel);
    assert_eq!(kernel.total, 0);
}

#[test]
fn tcp_is_replayed_with_backoff_until_answered_udp_once() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    hold.hold(packet(1000, 6, 0), 0);
    hold.hold(packet(1001, 17, 0), 0);
    hold.replay_due(10 * MS, &mut kernel);
    assert!(kernel.replays.is_empty(), "nothing replayed while idle");
    hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
    let udp_vip = packet(1001, 17, 0).vip();
    hold.backends_appeared(&HoldKey::node_wide(udp_vip), 100 * MS);
    assert_eq!(hold.next_due_ns(), Some(100 * MS));
    hold.replay_due(100 * MS, &mut kernel);
    assert_eq!(
        kernel.replays.len(),
        2,
        "both replayed at once, oldest first"
    );
    assert_eq!(
        hold.len(),
        1,
        "the datagram is delivered once, the SYN waits for its answer"
    );
    assert_eq!(
        hold.next_due_ns(),
        Some(100 * MS + answer_poll(1).as_nanos() as u64),
        "the answer is looked for within milliseconds, well before the next replay"
    );
    hold.replay_due(120 * MS, &mut kernel);
    assert_eq!(
        kernel.replays.len(),
        2,
        "no second replay before the backoff"
    );
    hold.replay_due(150 * MS, &mut kernel);
    assert_eq!(
        kernel.replays.len(),
        3,
        "replayed again after 50 ms, unanswered"
    );
    let flow = *kernel
        .watched
        .iter()
        .next()
        .expect("the SYN's flow is watched");
    kernel.answered.insert(flow);
    hold.replay_due(400 * MS, &mut kernel);
    assert_eq!(kernel.replays.len(), 3);
    assert_eq!((hold.len(), count(&hold, "answered")), (0, 1));
    assert!(kernel.watched.is_empty(), "no flow watched once answered");
    assert_eq!(hold.next_due_ns(), None);
}

#[test]
fn an_unanswered_syn_is_replayed_a_bounded_number_of_times_within_a_bounded_time() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    hold.hold(packet(1000, 6, 0), 0);
    hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
    // Never answered (a spoofed source): replayed every time it is due, up to the cap.
    let mut now = 100 * MS;
    while let Some(due) = hold.next_due_ns() {
        now = due.max(now);
        hold.replay_due(now, &mut kernel);
        now += MS;
        assert!(
            now < 100 * MS + 2 * REPLAY_WINDOW.as_nanos() as u64,
            "never given up"
        );
    }
    assert_eq!(kernel.replays.len() as u32, MAX_REPLAYS_PER_FLOW);
    assert_eq!((hold.len(), count(&hold, "abandoned")), (0, 1));
    assert!(kernel.watched.is_empty(), "no flow watched once given up");

    // A backend that appears late in the packet's life: replays stop at the window.
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    hold.hold(packet(1001, 6, 0), 0);
    hold.backends_appeared(&HoldKey::node_wide(vip()), 100 * MS);
    hold.replay_due(100 * MS, &mut kernel);
    let after_window = 100 * MS + REPLAY_WINDOW.as_nanos() as u64 + MS;
    hold.replay_due(after_window, &mut kernel);
    assert_eq!(kernel.replays.len(), 1);
    assert_eq!(count(&hold, "abandoned"), 1);
}

#[test]
fn old_packets_expire_and_a_deleted_vips_are_discarded() {
    let mut hold = HeldPackets::new(limits(), HoldMetrics::default());
    let mut kernel = FakeKernel::default();
    hold.hold(packet(1000, 6, 0), 0);
    hold.hold(packet(1001, 6, 30_000 * MS), 30_000 * MS);
    hold.replay_due(60_000 * MS + 1, &mut kernel);
    assert_eq!((hold.len(), count(&hold, "expired")), (1, 1));
    hold.vip_removed(&vip(), &mut kernel);
    assert_eq!((hold.len(), count(&hold, "discarded")), (0, 1));
    assert!(kernel.replays.is_empty());
}

#[test]
fn nothing_is_held_with_a_max_age_of_zero() {
    let mut hold = HeldPackets::new(
        HoldLimits {
            max_age: Duration::ZERO,
            ..limits()
        },
        HoldMetrics::default(),
    );
    hold.hold(packet(1000, 6, 0), 0);
    assert!(hold.is_empty());
}
