//! What the running kernel offers the datapath, probed at start rather than read off its
//! version (distributions backport BPF features: RHEL 9's 5.14 has many of 6.x's).
//!
//! Two features are required: without them the agent refuses to start, naming the missing
//! feature and the first mainline version that has it. The others degrade one function each,
//! said once at info level: TCX links (6.6) fall back to the `clsact` qdisc; holding and
//! replay (5.18) fall back to clients waiting for their own retransmission.

use std::{fmt, io, os::fd::FromRawFd as _, os::fd::OwnedFd};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};

use crate::pinning::bpf;

/// A BPF feature the datapath uses, with the first mainline Linux version that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `BPF_MAP_TYPE_RINGBUF`: events and held frames reach the agent through ring buffers.
    RingBuffer,
    /// BPF atomic compare-and-exchange (`BPF_CMPXCHG`): the kernel's rate limiters.
    AtomicCompareExchange,
    /// `bpf_xdp_load_bytes`: copies a held frame out of an XDP buffer.
    XdpLoadBytes,
    /// `BPF_F_TEST_XDP_LIVE_FRAMES`: replays a held frame into an interface's stack.
    LiveFrames,
    /// TCX links: TC programs attached as BPF links (pinnable, several programs in order).
    Tcx,
}

impl Feature {
    /// What it is, as an operator reads it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::RingBuffer => "the BPF ring buffer (BPF_MAP_TYPE_RINGBUF)",
            Feature::AtomicCompareExchange => "BPF atomic compare-and-exchange (BPF_CMPXCHG)",
            Feature::XdpLoadBytes => "the bpf_xdp_load_bytes helper",
            Feature::LiveFrames => "live-frame test runs (BPF_F_TEST_XDP_LIVE_FRAMES)",
            Feature::Tcx => "TCX links",
        }
    }

    /// The first mainline Linux version that has it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::RingBuffer => "5.8",
            Feature::AtomicCompareExchange => "5.12",
            Feature::XdpLoadBytes | Feature::LiveFrames => "5.18",
            Feature::Tcx => "6.6",
        }
    }
}

/// The features this kernel has, as probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// The running kernel's release (`uname -r`).
    pub release: String,
    /// [`Feature::RingBuffer`] (required).
    pub ring_buffer: bool,
    /// [`Feature::AtomicCompareExchange`] (required).
    pub atomic_compare_exchange: bool,
    /// [`Feature::XdpLoadBytes`] (holding).
    pub xdp_load_bytes: bool,
    /// [`Feature::LiveFrames`] (holding).
    pub live_frames: bool,
    /// [`Feature::Tcx`] (TC attachments as links; else the clsact qdisc).
    pub tcx: bool,
}

/// The refusal of a kernel that lacks a required feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The running kernel's release.
    pub release: String,
    /// The features it lacks.
    pub missing: Vec<Feature>,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this kernel ({}) cannot run the datapath: it lacks ",
            self.release
        )?;
        for (i, feature) in self.missing.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(
                f,
                "{} (Linux {} and later)",
                feature.name(),
                feature.since()
            )?;
        }
        let floor = self.missing.iter().map(|f| f.since()).max_by(|a, b| {
            let parse = |v: &str| {
                v.split('.')
                    .map(|n| n.parse::<u32>().unwrap_or(0))
                    .collect::<Vec<_>>()
            };
            parse(a).cmp(&parse(b))
        });
        if let Some(floor) = floor {
            write!(
                f,
                ". unidler needs Linux {floor} or later, or a kernel with these features backported"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Unsupported {}

impl KernelFeatures {
    /// Probes the running kernel (loads a few tiny programs and maps, and drops them). An
    /// error is the kernel refusing the probes themselves (missing privileges, BPF restricted
    /// by a seccomp profile or an LSM), not a missing feature.
    pub fn probe() -> io::Result<Self> {
        Ok(Self {
            release: kernel_release(),
            ring_buffer: is_map_supported(MapType::RingBuf).map_err(|e| e.io_error)?,
            atomic_compare_exchange: probe_compare_exchange()?,
            xdp_load_bytes: is_helper_supported(
                ProgramType::Xdp,
                BpfHelper::BPF_FUNC_xdp_load_bytes,
            )
            .unwrap_or(false),
            live_frames: probe_live_frames(),
            tcx: probe_tcx()?,
        })
    }

    /// The required features this kernel lacks, as a refusal; `Ok` if it has them all.
    pub fn check_required(&self) -> Result<(), Unsupported> {
        let missing: Vec<Feature> = [
            (Feature::RingBuffer, self.ring_buffer),
            (Feature::AtomicCompareExchange, self.atomic_compare_exchange),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(feature, _)| feature)
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Unsupported {
                release: self.release.clone(),
                missing,
            })
        }
    }

    /// Whether opening packets can be held and replayed on this kernel; if not, the first
    /// feature missing.
    pub fn holding(&self) -> Result<(), Feature> {
        if !self.xdp_load_bytes {
            Err(Feature::XdpLoadBytes)
        } else if !self.live_frames {
            Err(Feature::LiveFrames)
        } else {
            Ok(())
        }
    }

    /// How TC programs are attached on this kernel: `tcx` or `clsact`.
    pub fn tc_attachment(&self) -> &'static str {
        if self.tcx { "tcx" } else { "clsact" }
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates the release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_DROP: i32 = 1;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes: class | size/op | mode/source.
const BPF_ALU64_MOV_K: u8 = 0x07 | 0xb0;
const BPF_STX_MEM_DW: u8 = 0x03 | 0x18 | 0x60;
const BPF_STX_ATOMIC_DW: u8 = 0x03 | 0x18 | 0xc0;
const BPF_JMP_EXIT: u8 = 0x05 | 0x90;
const BPF_CMPXCHG: i32 = 0xf0 | 0x01;

/// Loads an XDP program of `insns`; the error is the kernel's.
fn load_xdp(insns: &[Insn]) -> io::Result<OwnedFd> {
    /// The head of `bpf_attr` for `BPF_PROG_LOAD`, as far as a probe needs it.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    let fd = bpf(BPF_PROG_LOAD, &attr)?;
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the kernel answers a count-only `BPF_PROG_QUERY` of TCX ingress on loopback (6.6;
/// before, the attach type is unknown: EINVAL). Counting opens no program, so it needs no
/// more than `CAP_NET_ADMIN`.
fn probe_tcx() -> io::Result<bool> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    /// The head of `bpf_attr` for `BPF_PROG_QUERY`.
    #[repr(C)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
    }
    let attr = Query {
        target_ifindex: 1,
        attach_type: BPF_TCX_INGRESS,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        count: 0,
        _pad: 0,
    };
    match bpf(BPF_PROG_QUERY, &attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the verifier takes a 64-bit compare-and-exchange on the stack (5.12; older
/// verifiers say "BPF_STX uses reserved fields", EINVAL).
fn probe_compare_exchange() -> io::Result<bool> {
    match load_xdp(&[
        insn(BPF_ALU64_MOV_K, 1, 0, 0, 0),
        insn(BPF_STX_MEM_DW, 10, 1, -8, 0),
        insn(BPF_ALU64_MOV_K, 0, 0, 0, 0),
        insn(BPF_STX_ATOMIC_DW, 10, 1, -8, BPF_CMPXCHG),
        insn(BPF_ALU64_MOV_K, 0, 0, 0, XDP_DROP),
        insn(BPF_JMP_EXIT, 0, 0, 0, 0),
    ]) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether live-frame test runs work: runs a program that drops everything once, with live
/// frames, on a frame for loopback (nothing reaches any stack).
fn probe_live_frames() -> bool {
    let Ok(program) = load_xdp(&[
        insn(BPF_ALU64_MOV_K, 0, 0, 0, XDP_DROP),
        insn(BPF_JMP_EXIT, 0, 0, 0, 0),
    ]) else {
        return false;
    };
    /// The `bpf_attr` of `BPF_PROG_TEST_RUN`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let frame = [0u8; 60];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; loopback is interface 1.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, 1, 0, 0];
    use std::os::fd::AsRawFd as _;
    let mut attr = TestRun {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ctx_size_in: size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRun::default()
    };
    // SAFETY: a valid attribute of the size passed; the kernel writes its results into it
    // (through the pointer from a unique borrow) and reads the buffers it points to.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRun,
            size_of::<TestRun>() as u32,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_kernel_each_missing_feature_and_the_floor() {
        let refusal = Unsupported {
            release: "5.10.0-46-amd64".into(),
            missing: vec![Feature::AtomicCompareExchange],
        };
        assert_eq!(
            refusal.to_string(),
            "this kernel (5.10.0-46-amd64) cannot run the datapath: it lacks BPF atomic \
             compare-and-exchange (BPF_CMPXCHG) (Linux 5.12 and later). unidler needs Linux \
             5.12 or later, or a kernel with these features backported"
        );
        let both = Unsupported {
            release: "5.4.0".into(),
            missing: vec![Feature::RingBuffer, Feature::AtomicCompareExchange],
        };
        assert!(both.to_string().contains("needs Linux 5.12 or later"));
    }
}
