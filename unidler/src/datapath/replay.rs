//! Held packets: holding on and off, the answers watched for replayed flows, and frames run
//! through `BPF_PROG_TEST_RUN` (replays, and the same runs for tests and benchmarks).

use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use unidler_common::{
    FLOW_ANSWERED, FlowKey, REPLAY_PROGRAM_NAME, TC_PROGRAM_NAME, VipKey, map_names,
};

use super::{Datapath, DatapathError, remove_entry};
use crate::{hold::HoldKernel, map_batch};

impl Datapath {
    /// Turns holding on: the kernel copies the first dropped opening packet of each flow to
    /// an idle VIP to the held-frame ring, at most `per_vip` per VIP and `total` in all
    /// (`--hold-per-vip`, `--hold-total`; counted with what the agent writes back through
    /// [`Datapath::set_held`]).
    pub fn start_holding(&mut self, per_vip: u32, total: u32) -> Result<(), DatapathError> {
        self.hold_config.holding = 1;
        self.hold_config.per_vip = per_vip;
        self.hold_config.total = total;
        self.write_hold_config()
    }

    fn write_hold_config(&mut self) -> Result<(), DatapathError> {
        self.hold
            .set(0, self.hold_config, 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::HOLD,
                source,
            })
    }

    /// Starts watching for the answer to a replayed flow (the client's next segment of it,
    /// on interface `ifindex`, where its opening packet came in).
    pub fn watch_answer(&mut self, flow: &FlowKey, ifindex: u32) -> Result<(), DatapathError> {
        // A flow the kernel held is there already, with that interface; rewriting it would
        // replace its element while the kernel may still write to the old one.
        if self.held_flows.get(flow, 0).is_err() {
            self.held_flows
                .insert(flow, ifindex, 0)
                .map_err(|source| DatapathError::Map {
                    map: map_names::HELD_FLOWS,
                    source,
                })?;
        }
        if self.hold_config.watching_answers == 0 {
            self.hold_config.watching_answers = 1;
            self.write_hold_config()?;
        }
        Ok(())
    }

    /// Whether the kernel holds opening packets to idle VIPs now (as the `HOLD` map says).
    pub fn is_holding(&self) -> bool {
        self.hold.get(&0, 0).is_ok_and(|h| h.holding != 0)
    }

    /// How many flows the kernel has as held (its packet copied, not yet let go).
    pub fn held_flows(&self) -> usize {
        self.held_flows.keys().flatten().count()
    }

    /// The kernel's counts of held packets: per VIP, and in all.
    pub fn held_counts(&self) -> (Vec<(VipKey, u32)>, u32) {
        // Thousands of counts in a flood: one system call, not two per entry.
        let entries = map_batch::lookup_all(&self.held_per_vip).unwrap_or_else(|e| {
            if e.raw_os_error() != Some(libc::EINVAL) {
                tracing::warn!("reading the held counts in one batch failed ({e}); one by one");
            }
            self.held_per_vip.iter().flatten().collect()
        });
        let per_vip = entries
            .into_iter()
            .map(|(vip, held)| (vip, held as u32))
            .collect();
        (per_vip, self.held_total.get(&0, 0).unwrap_or(0) as u32)
    }

    /// Whether the kernel has seen the answer to a watched flow.
    pub fn is_answered(&self, flow: &FlowKey) -> bool {
        self.held_flows
            .get(flow, 0)
            .is_ok_and(|answered| answered == FLOW_ANSWERED)
    }

    /// Lets a held flow go: the kernel may hold its next opening packet. `watching_left`
    /// says whether some other flow still waits for its answer (if none, the kernel stops
    /// looking TCP segments up).
    pub fn release_flow(
        &mut self,
        flow: &FlowKey,
        watching_left: bool,
    ) -> Result<(), DatapathError> {
        remove_entry(&mut self.held_flows, flow, map_names::HELD_FLOWS)?;
        if !watching_left && self.hold_config.watching_answers != 0 {
            self.hold_config.watching_answers = 0;
            self.write_hold_config()?;
        }
        Ok(())
    }

    /// Writes what the agent holds into the kernel's counts: `vips`, each with its packets
    /// held now (a VIP with none is removed), and `total`. The kernel counts up as it copies;
    /// the agent writes them down as packets leave.
    pub fn set_held(&mut self, vips: &[(VipKey, u32)], total: u32) -> Result<(), DatapathError> {
        for (vip, held) in vips {
            if *held == 0 {
                remove_entry(&mut self.held_per_vip, vip, map_names::HELD_PER_VIP)?;
            } else {
                self.held_per_vip
                    .insert(vip, u64::from(*held), 0)
                    .map_err(|source| DatapathError::Map {
                        map: map_names::HELD_PER_VIP,
                        source,
                    })?;
            }
        }
        self.held_total
            .set(0, u64::from(total), 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::HELD_TOTAL,
                source,
            })
    }

    /// Hands `frame` to the network stack of interface `ifindex` as if it had just been
    /// received there (`BPF_PROG_TEST_RUN` of the replay program with live frames, kernel
    /// 5.18 and later). The frame carries the replay mark, so the TC hook lets it through.
    pub fn replay(&self, frame: &[u8], ifindex: u32) -> Result<(), DatapathError> {
        let program: &Xdp = self.typed(REPLAY_PROGRAM_NAME, "replay program")?;
        let ctx = xdp_md(frame, ifindex);
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: 1,
                attrs: TestRunAttrs::new().xdp_live_frames(1),
                ..TestRunOptions::default()
            })
            .map_err(DatapathError::TestRun)?;
        Ok(())
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN`, as if it had arrived on
    /// interface `ifindex` (which must exist; 1 is loopback). Returns the XDP verdict.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> Result<u32, DatapathError> {
        self.test_run_repeat(frame, ifindex, 1)
            .map(|(verdict, _)| verdict)
    }

    /// Like [`Datapath::test_run`], `repeat` times in the kernel; also returns the mean time
    /// per run that the kernel measured, in nanoseconds.
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, u64), DatapathError> {
        run_repeat(self.program()?, frame, ifindex, repeat)
    }

    /// Loads the do-nothing baseline program from the same object and runs it like
    /// [`Datapath::test_run_repeat`]: what an XDP program costs before it does anything.
    pub fn baseline_test_run(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, u64), DatapathError> {
        let program: &mut Xdp =
            self.typed_mut(unidler_common::BASELINE_PROGRAM_NAME, "baseline program")?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| DatapathError::Load(Box::new(e)))?;
        }
        run_repeat(program, frame, ifindex, repeat)
    }

    /// Runs the TC program `repeat` times on `frame` through `BPF_PROG_TEST_RUN` (as an skb
    /// received on loopback). Returns the TC verdict (`TC_ACT_OK` 0, `TC_ACT_SHOT` 2) and the
    /// mean time per run in nanoseconds.
    pub fn tc_test_run_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, u64), DatapathError> {
        tc_run_repeat(self.typed(TC_PROGRAM_NAME, "TC program")?, frame, repeat)
    }

    /// Like [`Datapath::baseline_test_run`] for the TC hook's do-nothing program.
    pub fn tc_baseline_test_run(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, u64), DatapathError> {
        let program: &mut SchedClassifier = self.typed_mut(
            unidler_common::BASELINE_TC_PROGRAM_NAME,
            "TC baseline program",
        )?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| DatapathError::Load(Box::new(e)))?;
        }
        tc_run_repeat(program, frame, repeat)
    }
}

/// The `struct xdp_md` of a test run of `frame` arriving on `ifindex`.
fn xdp_md(frame: &[u8], ifindex: u32) -> [u8; 24] {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn run_repeat(
    program: &Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, u64), DatapathError> {
    let ctx = xdp_md(frame, ifindex);
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(DatapathError::TestRun)?;
    Ok((result.return_value, result.duration.as_nanos() as u64))
}

fn tc_run_repeat(
    program: &SchedClassifier,
    frame: &[u8],
    repeat: u32,
) -> Result<(i32, u64), DatapathError> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .map_err(DatapathError::TestRun)?;
    Ok((
        result.return_value as i32,
        result.duration.as_nanos() as u64,
    ))
}

/// The datapath serves the hold: replays, watches answers, keeps the held counts.
impl HoldKernel for Datapath {
    type Error = DatapathError;
    fn replay(&mut self, frame: &[u8], ifindex: u32) -> Result<(), DatapathError> {
        Datapath::replay(self, frame, ifindex)
    }
    fn watch(&mut self, flow: &FlowKey, ifindex: u32) -> Result<(), DatapathError> {
        self.watch_answer(flow, ifindex)
    }
    fn answered(&self, flow: &FlowKey) -> bool {
        self.is_answered(flow)
    }
    fn release(&mut self, flow: &FlowKey, watching_left: bool) -> Result<(), DatapathError> {
        self.release_flow(flow, watching_left)
    }
    fn set_held(&mut self, vips: &[(VipKey, u32)], total: u32) -> Result<(), DatapathError> {
        Datapath::set_held(self, vips, total)
    }
    fn held_in_kernel(&self) -> (Vec<(VipKey, u32)>, u32) {
        self.held_counts()
    }
}
