//! The kernel program's packet parser against its reference model (`tests/src/oracle.rs`),
//! through BPF_PROG_TEST_RUN: for every frame the XDP program's verdict, event and counters
//! are the model's, and the TC program decides as the XDP program does.
//!
//! Needs root, and the real eBPF object embedded (`cargo xtask fuzz` builds the targets with
//! `UNIDLER_EBPF_OBJECT`; see unidler/build.rs). libFuzzer sees the coverage of the model and
//! of the harness, not of the kernel program: the model's branches follow the parser's, so
//! what is new to the model is, nearly always, new to the parser too.
#![no_main]

#[path = "../../tests/packet_common/mod.rs"]
mod common;

use std::sync::{Mutex, OnceLock};

use common::*;
use libfuzzer_sys::fuzz_target;

/// TC verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// The program, loaded once, with the VIPs every input runs against (the same set as
/// `packet_fuzz.rs`'s).
fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| Mutex::new(Harness::with_fuzzed_vips()))
}

/// Whether the kernel's skb test run may refuse `frame` (EINVAL): since a 2026 fix (in
/// stable kernels too) it wants a whole IP header after an IPv4 or IPv6 EtherType. XDP's test
/// run takes such frames; TC ingress sees them too, and the TC program shares the XDP
/// program's parser.
fn skb_test_run_may_refuse(frame: &[u8]) -> bool {
    let l3 = frame.len() - 14;
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => l3 < 20,
        0x86dd => l3 < 40,
        _ => false,
    }
}

/// Whether `err` comes from an EINVAL of the kernel's.
fn is_einval(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.raw_os_error() == Some(libc::EINVAL);
        }
        cause = e.source();
    }
    false
}

/// The longest frame tried: the parser reads L4 headers that begin up to 512 bytes in
/// (`MAX_L4_OFFSET` in unidler-ebpf/src/parse.rs), and nothing beyond them.
const MAX_FRAME: usize = 512 + 64;

fuzz_target!(|frame: &[u8]| {
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
    if frame.len() < 14 || frame.len() > MAX_FRAME {
        return;
    }
    let mut h = harness().lock().unwrap_or_else(|e| e.into_inner());
    let xdp = h.check_against_model(frame);
    let before = h.datapath.counters().expect("counters");
    let verdict = match h.datapath.tc_test_run_repeat(frame, 1) {
        Ok((verdict, _)) => verdict,
        Err(e) if skb_test_run_may_refuse(frame) && is_einval(&e) => return,
        Err(e) => panic!("TC test run of a frame the kernel takes: {e}"),
    };
    let mut events = Vec::new();
    h.events.drain(|e| events.push(e));
    let counters = h.datapath.counters().expect("counters").since(&before);
    let expected = if xdp.verdict == XDP_DROP {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    };
    assert_eq!(verdict, expected, "TC verdict, frame {frame:02x?}");
    assert_eq!(
        events.len(),
        xdp.events.len(),
        "TC events, frame {frame:02x?}"
    );
    if let (Some(t), Some(x)) = (events.first(), xdp.events.first()) {
        assert_eq!(
            (t.vip, t.src_addr, t.src_port_be, t.action),
            (x.vip, x.src_addr, x.src_port_be, x.action),
            "TC event, frame {frame:02x?}"
        );
    }
    assert_eq!(counters, xdp.counters, "TC counters, frame {frame:02x?}");
});
