//! What the packet-level tests share: a loaded program with a model of its VIPs
//! ([`Harness`]), frames, and the reference model's check.

#![allow(dead_code, unused_imports)]

pub use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

pub use unidler::{
    datapath::{Counters, Datapath, EventRing, LoadOptions},
    vip::{Vip, VipSpec, ip_to_bytes},
};
pub use unidler_common::{
    Counter, EventAction, IdleHitEvent, RateLimitConfig, VIP_FLAG_PASS_WHEN_IDLE, VipState,
};
pub use unidler_tests::{
    frames::{
        Frame, Ipv6Ext, L4, SCTP_DATA, SCTP_INIT, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
    },
    oracle::{self, VipModel, XDP_DROP, XDP_PASS},
    require_root,
    rng::Rng,
};

/// Loopback's ifindex: test runs need an existing interface.
pub const LO: u32 = 1;
pub const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 1, 7));
pub const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
pub const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7));
pub const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10));

/// A loaded program with the VIPs a test gave it and a model of them for the oracle.
pub struct Harness {
    pub datapath: Datapath,
    pub events: EventRing,
    pub model: VipModel,
    pub next_id: u32,
}

/// What one run of the program did.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub events: Vec<IdleHitEvent>,
    pub counters: Counters,
}

impl Harness {
    /// Rate limits high enough never to interfere.
    #[track_caller]
    pub fn new() -> Self {
        Self::with_limits(RateLimitConfig::new(
            1_000_000, 1_000_000, 1_000_000, 1_000_000,
        ))
    }

    #[track_caller]
    pub fn with_limits(rate_limits: RateLimitConfig) -> Self {
        Self::with_options(LoadOptions {
            rate_limits,
            kernel_log_level: 0,
            ..LoadOptions::default()
        })
    }

    #[track_caller]
    pub fn with_options(options: LoadOptions) -> Self {
        require_root();
        let mut datapath =
            Datapath::load(&options).unwrap_or_else(|e| panic!("loading the XDP program: {e}"));
        let events = datapath.take_events().expect("event ring");
        Self {
            datapath,
            events,
            model: VipModel::new(),
            next_id: 100,
        }
    }

    /// The VIPs the frame fuzzers run against (`packet_fuzz.rs`, `fuzz/` `xdp_parser`): idle
    /// and with backends, IPv4 and IPv6, every protocol, and one that passes when idle.
    #[track_caller]
    pub fn with_fuzzed_vips() -> Self {
        let mut h = Self::new();
        h.vip("10.96.0.10:80/tcp");
        h.vip("10.96.0.10:53/udp");
        h.vip("10.96.0.10:3868/sctp");
        h.vip("10.96.0.10:443/tcp=2");
        h.vip("[fd00:96::10]:443/tcp");
        h.vip("[fd00:96::10]:53/udp");
        h.vip_with_flags("10.96.0.10:8080/tcp", VIP_FLAG_PASS_WHEN_IDLE);
        h
    }

    /// Adds a VIP from `IP:PORT/PROTO[=BACKENDS]`; returns its id.
    #[track_caller]
    pub fn vip(&mut self, spec: &str) -> u32 {
        self.vip_with_flags(spec, 0)
    }

    #[track_caller]
    pub fn vip_with_flags(&mut self, spec: &str, flags: u32) -> u32 {
        let spec: VipSpec = spec.parse().unwrap();
        self.next_id += 1;
        let key = spec.vip.key();
        self.datapath
            .upsert_vip(
                key,
                VipState {
                    backends: spec.backends,
                    vip_id: self.next_id,
                    flags,
                    ..VipState::default()
                },
            )
            .unwrap();
        self.model
            .insert(key, (spec.backends, flags & VIP_FLAG_PASS_WHEN_IDLE != 0));
        self.next_id
    }

    #[track_caller]
    pub fn run(&mut self, frame: &[u8]) -> Run {
        let before = self.datapath.counters().unwrap();
        let verdict = self
            .datapath
            .test_run(frame, LO)
            .unwrap_or_else(|e| panic!("test run on {} bytes: {e}", frame.len()));
        let mut events = Vec::new();
        self.events.drain(|e| events.push(e));
        let counters = self.datapath.counters().unwrap().since(&before);
        Run {
            verdict,
            events,
            counters,
        }
    }

    /// Runs `frame` and checks verdict, event and counters against the reference model.
    #[track_caller]
    pub fn check_against_model(&mut self, frame: &[u8]) -> Run {
        let want = oracle::expected(frame, &self.model);
        let run = self.run(frame);
        let ctx = || format!("frame {:02x?}\nexpected {want:?}\ngot {run:?}", frame);
        assert_eq!(run.verdict, want.verdict, "verdict\n{}", ctx());
        assert_eq!(run.counters.get(Counter::Packets), 1, "{}", ctx());
        match want.failure {
            Some(counter) => {
                assert_eq!(run.counters.get(counter), 1, "{counter:?}\n{}", ctx());
                let failures = run.counters.parse_failures() + run.counters.get(Counter::Fragments);
                assert_eq!(failures, 1, "exactly one failure counted\n{}", ctx());
            }
            None => assert_eq!(
                run.counters.parse_failures() + run.counters.get(Counter::Fragments),
                0,
                "no failure counted\n{}",
                ctx()
            ),
        }
        match want.event {
            Some((vip, src, sport)) => {
                assert_eq!(run.events.len(), 1, "one event\n{}", ctx());
                let e = &run.events[0];
                assert_eq!(e.vip, vip, "{}", ctx());
                assert_eq!(e.src_addr, src, "{}", ctx());
                assert_eq!(e.src_port_be, sport, "{}", ctx());
                assert_eq!(e.ifindex, LO, "{}", ctx());
                assert_eq!(run.counters.idle_hits(), 1, "{}", ctx());
            }
            None => {
                assert!(run.events.is_empty(), "no event\n{}", ctx());
                assert_eq!(run.counters.idle_hits(), 0, "{}", ctx());
            }
        }
        run
    }
}

pub fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Frame {
    Frame::tcp_syn(src, 40000, dst, dport)
}

pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16, flags: u8) -> Frame {
    Frame::new(
        src,
        dst,
        L4::Tcp {
            src: 40000,
            dst: dport,
            flags,
        },
    )
}

pub fn frame_vip_key(frame: &Frame) -> unidler_common::VipKey {
    let port = match frame.l4 {
        L4::Tcp { dst, .. } | L4::Udp { dst, .. } | L4::Sctp { dst, .. } => dst,
        L4::Other { .. } => 0,
    };
    unidler_common::VipKey {
        addr: ip_to_bytes(frame.dst),
        port_be: port.to_be(),
        proto: 6,
        family: match frame.dst {
            IpAddr::V4(_) => unidler_common::FAMILY_IPV4,
            IpAddr::V6(_) => unidler_common::FAMILY_IPV6,
        },
    }
}

pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
