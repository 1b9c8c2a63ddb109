//! The unidler datapath: one parser and one set of maps behind two entry points, an XDP
//! program (`unidler`, for physical interfaces) and a TC ingress classifier (`unidler_tc`, for
//! veths and other virtual interfaces, where native XDP would turn segmentation offloads off).
//!
//! For every frame: parse Ethernet, up to two VLAN tags, IPv4 or IPv6 (with extension
//! headers), then TCP, UDP or SCTP. A connection-opening packet (TCP SYN without ACK, any UDP
//! datagram, SCTP INIT) whose destination is a VIP with zero backends raises an event in the
//! `EVENTS` ring buffer, rate-limited per VIP and globally, and is dropped (or passed, if the
//! VIP says so). A dropped opening packet is also copied, whole, to the `HELD` ring, for the
//! agent to replay once the VIP has a backend; a replayed frame carries [`REPLAY_MARK`] in
//! its metadata and is let through. While replayed TCP flows wait for their answer, the
//! client's segments of those flows are looked up and marked answered. Every other frame passes (`XDP_PASS`, `TC_ACT_OK`). Anything the parser cannot read is
//! passed untouched and counted. All loops and offsets are bounded.
#![no_std]
#![no_main]
// Compare-and-swap for the rate limiters: the BPF target exposes no stable RMW atomics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod hold;
mod idle;
mod limiter;
mod maps;
mod packet;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use unidler_common::{Counter, REPLAY_MARK};

use crate::{
    hold::on_answer,
    idle::on_opening_packet,
    maps::count,
    packet::Packet,
    parse::{MAX_L4_OFFSET, Parsed, classify},
};

/// What the datapath decided for a packet; each entry point says it in its own terms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// What the datapath does with a classified packet, whichever the hook.
#[inline(always)]
fn act<P: Packet>(ctx: &P, classified: Result<Option<Parsed>, Counter>) -> Verdict {
    match classified {
        Ok(Some(parsed)) if parsed.opening => on_opening_packet(ctx, &parsed.flow, parsed.tagged),
        Ok(Some(parsed)) => {
            on_answer(&parsed.flow, ctx.ingress_ifindex());
            Verdict::Pass
        }
        Ok(None) => Verdict::Pass,
        Err(reason) => {
            count(reason);
            Verdict::Pass
        }
    }
}

#[xdp]
pub fn unidler(ctx: XdpContext) -> u32 {
    count(Counter::Packets);
    match act(&ctx, classify(&ctx)) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Headers the TC hook pulls into the linear part of an skb when they are not all there:
/// the furthest L4 header and the bytes of it the parser reads.
const TC_LINEAR_BYTES: u32 = (MAX_L4_OFFSET + 64) as u32;

#[classifier]
pub fn unidler_tc(ctx: TcContext) -> i32 {
    count(Counter::Packets);
    let mut classified = classify(&ctx);
    // An skb may carry headers beyond its linear part (GRO, some drivers). Only a packet
    // whose headers ran out there is pulled and looked at again: pulling every skb would
    // cost TCP streams dearly.
    if let Err(reason) = classified
        && is_cut_short(reason)
        && ctx.len() as usize > ctx.data_end() - ctx.data()
    {
        let wanted = if ctx.len() < TC_LINEAR_BYTES {
            ctx.len()
        } else {
            TC_LINEAR_BYTES
        };
        if ctx.pull_data(wanted).is_ok() {
            classified = classify(&ctx);
        }
    }
    match act(&ctx, classified) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Whether a parse failure may only mean that the headers were not all in the buffer.
#[inline(always)]
fn is_cut_short(reason: Counter) -> bool {
    matches!(
        reason,
        Counter::TruncatedEthernet
            | Counter::TruncatedVlan
            | Counter::BadIpv4Header
            | Counter::BadIpv6Header
            | Counter::TruncatedL4
    )
}

/// An XDP program that passes everything and does nothing else: the baseline the benchmarks
/// compare the real program with. Never attached.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The TC hook's baseline: passes everything, does nothing else. Never attached.
#[classifier]
pub fn baseline_pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Replays a held frame: run by the agent through `BPF_PROG_TEST_RUN` with live frames and
/// the frame's ingress interface, so that `XDP_PASS` hands it to that interface's stack as
/// if just received. Marks it as a replay ([`REPLAY_MARK`] in the metadata) so that the TC
/// hook on the interface lets it through. Never attached.
#[xdp]
pub fn unidler_replay(ctx: XdpContext) -> u32 {
    // SAFETY: the helper moves data_meta within the frame's headroom, or fails.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } == 0 {
        let (meta, data) = (ctx.metadata(), ctx.data());
        if meta + 4 <= data {
            // SAFETY: bounds checked just above.
            unsafe { core::ptr::write_unaligned(meta as *mut u32, REPLAY_MARK) };
        }
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The program calls only helpers open to any license; GPL is declared so that aya-log's
/// helpers load everywhere.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
