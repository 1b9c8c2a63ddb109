//! The packet as either hook sees it ([`Packet`], for XDP and TC), and bounded reads of it.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use unidler_common::REPLAY_MARK;

/// A packet as either hook sees it: its bytes, and the interface it arrived on.
pub(crate) trait Packet: EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// The whole frame's length (beyond `data_end` for an skb with paged data).
    fn frame_len(&self) -> u32;
    /// Copies `len` bytes of the frame from its start to `to`; false if it could not.
    ///
    /// # Safety
    /// `to` is valid for `len` bytes of writes.
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool;
    /// Whether the frame is one of the agent's replays ([`REPLAY_MARK`] in its metadata).
    fn is_replay(&self) -> bool;
    /// The VLAN tag the kernel took off the frame before the hook (TPID as in the frame,
    /// TCI), if it did.
    fn stripped_vlan(&self) -> Option<(u16, u16)>;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a plain field of the context the kernel hands us.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
    #[inline(always)]
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool {
        // SAFETY: as the caller promises; the helper checks the frame's bounds.
        unsafe { bpf_xdp_load_bytes(self.ctx, 0, to.cast(), len) == 0 }
    }
    #[inline(always)]
    fn is_replay(&self) -> bool {
        // Replays enter the stack through netif_receive_skb: native XDP never sees them.
        false
    }
    #[inline(always)]
    fn stripped_vlan(&self) -> Option<(u16, u16)> {
        // XDP sees the frame's bytes, tags included (a NIC that strips tags in hardware
        // leaves no trace of them here).
        None
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a plain field of the __sk_buff the kernel hands us.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        self.len()
    }
    #[inline(always)]
    unsafe fn copy_frame(&self, to: *mut u8, len: u32) -> bool {
        // SAFETY: as the caller promises; the helper checks the skb's bounds.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), 0, to.cast(), len) == 0 }
    }
    #[inline(always)]
    fn is_replay(&self) -> bool {
        // SAFETY: a plain field of the __sk_buff; the metadata ends where the frame starts.
        let meta = unsafe { (*self.skb.skb).data_meta } as usize;
        let data = self.data();
        if meta + 4 > data {
            return false;
        }
        // The replay program puts the mark at the start of the metadata.
        // SAFETY: bounds checked just above.
        unsafe { core::ptr::read_unaligned(meta as *const u32) == REPLAY_MARK }
    }
    #[inline(always)]
    fn stripped_vlan(&self) -> Option<(u16, u16)> {
        // SAFETY: plain fields of the __sk_buff; vlan_proto is the TPID as the frame had it.
        let skb = unsafe { &*self.skb.skb };
        (skb.vlan_present != 0).then_some((skb.vlan_proto as u16, skb.vlan_tci as u16))
    }
}

/// A reference to a `T` (a header, or a byte array) in the packet at `offset`, or `None` if
/// the packet is shorter. Every type used here has alignment 1 or 2, which packet data has.
#[inline(always)]
pub(crate) fn header_at<T, P: Packet>(ctx: &P, offset: usize) -> Option<&T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { &*(start as *const T) })
}
