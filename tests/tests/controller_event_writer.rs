//! The Controller_Event writer itself (the library's sink), on the agent's single-threaded
//! runtime, against a real Southbound server whose connections keep being dropped.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use unidler::{
    clock::monotonic_ns,
    event::IdleHit,
    ovn::controller_event::{ControllerEventWriter, WriterOptions},
    ovn::southbound::{Southbound, SouthboundConfig},
    vip::Protocol,
};
use unidler_tests::ovsdb_server::{self, CHASSIS, Southbound as _, TempDir};

/// An idle hit for VIP `10.96.<n / 250>.<n % 250 + 1>:80/tcp`.
fn hit(n: u32) -> IdleHit {
    IdleHit {
        key: Default::default(),
        vip: format!("10.96.{}.{}:80", n / 250, n % 250 + 1),
        protocol: Protocol::Tcp,
        src: "10.1.1.1:40000".into(),
        iface: "eth0".into(),
        ifindex: 2,
        load_balancer: Some("lb".into()),
        load_balancer_row: None,
        action: "dropped",
        timestamp_ns: monotonic_ns(),
    }
}

/// A writer for our Chassis on the Southbound server at `remote`, as the agent starts it.
async fn start_writer(
    remote: &str,
    state_dir: Option<std::path::PathBuf>,
) -> ControllerEventWriter {
    let config = SouthboundConfig {
        remotes: ovsdb::Remote::parse_list(remote).unwrap(),
        tls: None,
        chassis: Some(CHASSIS.into()),
        ovs_db: "unix:/nonexistent".into(),
        max_message_bytes: 64 << 20,
        leader_only: true,
    };
    let southbound = Southbound::connect(&config, Vec::new()).await.unwrap();
    ControllerEventWriter::start(
        southbound,
        WriterOptions {
            queue_capacity: 100_000,
            state_dir,
            dedup: Default::default(),
            news: None,
        },
    )
}

/// While the server drops every client connection again and again, hits keep coming: the
/// writer must never keep the runtime from running its other tasks (a heartbeat task is the
/// watchdog), and every hit lands exactly once in the end.
#[test]
fn dropped_connections_never_freeze_the_runtime_and_lose_nothing() {
    const DROPS: usize = 300;
    let sb = ovsdb_server::southbound_with_chassis();
    let state = TempDir::new("sinkspin");
    let beats = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = {
        let (remote, state_dir) = (sb.unix_remote(), state.0.clone());
        let (beats, submitted, stop) = (beats.clone(), submitted.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::spawn(async move {
                    loop {
                        beats.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
                let sink = start_writer(&remote, Some(state_dir)).await;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    sink.submit(&hit(n));
                    n += 1;
                    submitted.store(u64::from(n), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                sink.flush(Duration::from_secs(20)).await
            })
        })
    };

    let mut last = beats.load(Ordering::Relaxed);
    for round in 0..DROPS {
        sb.appctl(&["ovsdb-server/reconnect"]);
        std::thread::sleep(Duration::from_millis(3 + (round % 7) as u64));
        // The watchdog: the heartbeat must have moved within a second.
        let deadline = Instant::now() + Duration::from_secs(1);
        while beats.load(Ordering::Relaxed) == last {
            assert!(
                Instant::now() < deadline,
                "the agent's runtime froze after connection drop {round}: the heartbeat stopped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        last = beats.load(Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    let drained = runtime.join().expect("runtime thread");
    assert!(drained, "the sink did not drain within 20 s");

    let hits = submitted.load(Ordering::Relaxed) as u32;
    let rows = sb.event_rows();
    let mut per_vip: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *per_vip.entry(row.event_info["vip"].clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_vip.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows written twice: {twice:?}");
    let missing: Vec<String> = (0..hits)
        .map(|n| hit(n).vip)
        .filter(|vip| !per_vip.contains_key(vip))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {hits} hits have no row: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Writes `hits` hits `apart` from each other through a writer on its own runtime; returns
/// the rows written and the transactions that wrote them.
fn write_spaced_hits(sb: &ovsdb_server::OvsdbServer, hits: u32, apart: Duration) -> (u64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let writer = start_writer(&sb.unix_remote(), None).await;
        // Connected, with our Chassis known, before the first hit.
        writer.submit(&hit(100_000));
        assert!(writer.flush(Duration::from_secs(20)).await, "not drained");
        let stats = writer.stats();
        let before = stats.transactions.load(Ordering::Relaxed);
        for n in 0..hits {
            writer.submit(&hit(n));
            tokio::time::sleep(apart).await;
        }
        assert!(writer.flush(Duration::from_secs(20)).await, "not drained");
        (
            stats.written.load(Ordering::Relaxed) - 1,
            stats.transactions.load(Ordering::Relaxed) - before,
        )
    })
}

/// Hits that arrive one by one, as a flood over many idle VIPs lets them through, go out many
/// per transaction rather than one transaction each: what costs the agent and the database is
/// the transaction. Each is still written exactly once.
#[test]
fn hits_arriving_one_by_one_go_out_together() {
    const HITS: u32 = 300;
    let sb = ovsdb_server::southbound_with_chassis();
    let (written, transactions) = write_spaced_hits(&sb, HITS, Duration::from_millis(1));
    assert_eq!(written, u64::from(HITS));
    assert_eq!(sb.event_rows().len(), HITS as usize + 1);
    // Over at least 300 ms at no more than one small transaction per 20 ms; one each would
    // be 300.
    assert!(
        transactions <= 50,
        "{transactions} transactions for {HITS} hits arriving 1 ms apart"
    );
}

/// A hit that comes on its own (hits far slower than a flood's) is written at once, in a
/// transaction of its own: batching costs a lone hit no waiting. (A few hits close together
/// are not paced either: `pace.rs`'s tests.)
#[test]
fn hits_that_come_slowly_are_each_written_at_once() {
    const HITS: u32 = 20;
    let sb = ovsdb_server::southbound_with_chassis();
    let (written, transactions) = write_spaced_hits(&sb, HITS, Duration::from_millis(10));
    assert_eq!(written, u64::from(HITS));
    // Paced after each, they would go out in twos (about 10 transactions); a commit late
    // by over 10 ms on a loaded machine merges two.
    assert!(
        transactions >= 14,
        "{transactions} transactions for {HITS} hits arriving 10 ms apart"
    );
}
