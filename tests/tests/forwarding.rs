//! The forwarding reader (what decides when held packets of an OVN VIP are replayed), against a
//! stand-in `ovs-ofctl` first on `PATH` that logs each run: one reader serves every waking
//! VIP, one `ovs-ofctl` at a time and one per VIP address and round; a VIP is judged on the
//! logical datapath its packets came in on. (The real bridge is read in `ovn_hold.rs`.)

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use unidler::{
    ovn::forwarding::{FlowReader, ForwardingCheck, ForwardingReader, Waiting},
    vip::VipSpec,
};
use unidler_tests::ovsdb_server::TempDir;

/// The stand-in's directory; installed once for the process.
static DIR: OnceLock<String> = OnceLock::new();

/// Installs the stand-in `ovs-ofctl`: it logs `start` and `end` with a nanosecond clock around
/// 20 ms of work, in a log named after the bridge it is asked about (one per test), and prints
/// flows for 10.96.9.9 where datapath 1 punts every port and datapath 2 load-balances them; no
/// flows for other addresses; asked for all of TCP, flows that load-balance 10.96.10.1-20:8080
/// on datapath 2. Returns where the logs go.
fn stand_in() -> String {
    DIR.get_or_init(|| {
        let dir = TempDir::new("fakeofctl");
        let dir = std::mem::ManuallyDrop::new(dir);
        let logs = dir.path_str().to_owned();
        let script = format!(
            r#"#!/bin/sh
for a in "$@"; do case "$a" in unix:*) target="$a";; esac; last="$a"; done
log="{logs}/$(basename "$target").log"
echo "start $(date +%s%N)" >> "$log"
sleep 0.02
case "$last" in
  tcp)
    for n in $(seq 1 20); do
      echo " table=20, priority=120,ct_state=+new+trk,tcp,metadata=0x2,nw_dst=10.96.10.$n,tp_dst=8080 actions=group:$n"
    done;;
  *nw_dst=10.96.9.9)
    for port in $(seq 8000 8300); do
      echo " table=13, priority=130,tcp,metadata=0x1,nw_dst=10.96.9.9,tp_dst=$port actions=controller(userdata=00.00)"
      echo " table=20, priority=120,ct_state=+new+trk,tcp,metadata=0x2,nw_dst=10.96.9.9,tp_dst=$port actions=group:7"
    done;;
esac
echo "end $(date +%s%N)" >> "$log"
"#
        );
        let path = format!("{}/ovs-ofctl", dir.path_str());
        std::fs::write(&path, script).unwrap();
        std::process::Command::new("chmod")
            .args(["+x", &path])
            .status()
            .unwrap();
        let old = std::env::var("PATH").unwrap_or_default();
        // SAFETY: set once, before any thread of this test binary reads the environment
        // (the reader's threads start after it).
        unsafe { std::env::set_var("PATH", format!("{logs}:{old}")) };
        logs
    })
    .clone()
}

/// A reader of the stand-in's bridge `name` (its runs logged in `name.mgmt.log`).
fn start_reader(
    name: &str,
    max_wait: Duration,
) -> (
    ForwardingReader,
    mpsc::UnboundedReceiver<(Waiting, ForwardingCheck)>,
) {
    let (done, outcomes) = mpsc::unbounded_channel();
    let reader = FlowReader {
        target: format!("unix:/nonexistent/{name}.mgmt"),
        max_wait,
    }
    .start(done)
    .unwrap();
    (reader, outcomes)
}

fn waiting(vip: &str, datapath: u32) -> Waiting {
    let spec: VipSpec = format!("{vip}/tcp").parse().unwrap();
    Waiting {
        vip: spec.vip.key(),
        datapath,
    }
}

/// The runs the stand-in logged: (start, end) in ns.
fn runs(log: &str) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut starts = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("start", t)) => starts.push(t.parse::<u64>().unwrap()),
            Some(("end", t)) => out.push((starts.remove(0), t.parse::<u64>().unwrap())),
            _ => {}
        }
    }
    out
}

/// 200 VIPs waking at once on one address, and one elsewhere: one `ovs-ofctl` at a time, one
/// per address and round, however many wait (it was one blocking task per VIP, each running
/// `ovs-ofctl` every 5 ms: 1,642 runs for one VIP, up to 512 at once).
#[test]
fn one_reader_serves_every_waking_vip() {
    let log = format!("{}/one.mgmt.log", stand_in());
    let (reader, mut outcomes) = start_reader("one", Duration::from_millis(600));
    let started = Instant::now();
    for port in 8000..8200 {
        reader.wait_for(waiting(&format!("10.96.9.9:{port}"), 1));
    }
    reader.wait_for(waiting("10.96.9.10:80", 1));
    for _ in 0..201 {
        let (_, outcome) = outcomes.blocking_recv().expect("an outcome for each");
        assert_eq!(outcome, ForwardingCheck::TimedOut);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "timed out after {elapsed:?}, before the wait was over"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let runs = runs(&log);
    // Two addresses: at most two runs a round, a round at least every 5 ms plus its runs.
    assert!(
        runs.len() <= 2 * (elapsed.as_millis() as usize / 45 + 2),
        "{} runs of ovs-ofctl in {elapsed:?} for two addresses",
        runs.len()
    );
    let mut sorted = runs.clone();
    sorted.sort();
    for pair in sorted.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two ovs-ofctl at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
}

/// A scoped VIP whose packets came in on datapath 2 is ready as soon as datapath 2's flows
/// carry it, though datapath 1 still punts it (it waited the full time for every datapath).
#[test]
fn a_vip_is_ready_on_its_own_datapath_whatever_another_does() {
    stand_in();
    let (reader, mut outcomes) = start_reader("two", Duration::from_secs(5));
    let started = Instant::now();
    let on_two = waiting("10.96.9.9:8080", 2);
    reader.wait_for(on_two);
    let (w, outcome) = outcomes.blocking_recv().unwrap();
    assert_eq!((w, outcome), (on_two, ForwardingCheck::Ready));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Node-wide (every datapath): not while datapath 1 punts.
    reader.wait_for(waiting("10.96.9.9:8080", 0));
    std::thread::sleep(Duration::from_millis(300));
    assert!(outcomes.try_recv().is_err(), "ready while datapath 1 punts");
}

/// Many addresses waking at once (1,000 VIPs of 1,000 services): one dump of the whole
/// protocol serves them all, instead of one process per address and round.
#[test]
fn many_addresses_share_one_dump() {
    let log = format!("{}/three.mgmt.log", stand_in());
    let (reader, mut outcomes) = start_reader("three", Duration::from_secs(5));
    for n in 1..=20 {
        reader.wait_for(waiting(&format!("10.96.10.{n}:8080"), 2));
    }
    for _ in 1..=20 {
        let (_, outcome) = outcomes.blocking_recv().unwrap();
        assert_eq!(outcome, ForwardingCheck::Ready);
    }
    let runs = runs(&log);
    assert!(runs.len() <= 3, "{} runs for 20 addresses", runs.len());
}
