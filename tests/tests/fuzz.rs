//! Fuzzing everything the agent parses from outside: OVSDB messages (framing, JSON-RPC
//! replies, typed values, update2/update3 notifications applied to a replica) and the VIPs
//! file. (The XDP parser is fuzzed against its reference model in `packet_fuzz.rs`.)
//!
//! Each target starts from a fixed corpus of real inputs and applies seeded mutations (bit
//! flips, byte insertions and deletions, splices of JSON tokens, truncations). Properties:
//! nothing panics, and the stateful parsers give the same answer however their input is cut.
//! `cargo xtask test` runs a bounded number of cases from fixed seeds, the same every run;
//! `cargo xtask fuzz [--seconds N]` runs each target for longer from a random seed and prints
//! it, so that a failure can be replayed with `UNIDLER_FUZZ_SEED`.

use std::time::{Duration, Instant};

use ovsdb::{Replica, Value, rpc::Framer};
use serde_json::Value as Json;
use unidler::vipsource::file::parse_vips_file;
use unidler_tests::rng::Rng;

/// Tokens worth splicing in: the structure of OVSDB JSON and of TOML.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "\\",
    "\\\"",
    "null",
    "true",
    "-1",
    "1e999",
    "0.5",
    "\"uuid\"",
    "\"named-uuid\"",
    "\"set\"",
    "\"map\"",
    "[\"set\",[]]",
    "[\"map\",[]]",
    "\"initial\"",
    "\"insert\"",
    "\"modify\"",
    "\"delete\"",
    "\"id\"",
    "\"method\"",
    "\"params\"",
    "\"result\"",
    "\"error\"",
    "\"update2\"",
    "\"update3\"",
    "[[vip]]",
    "vip = ",
    "\"10.0.0.1:80\"",
    "\"[fd00::1]:53\"",
    "protocol = ",
    "backends = ",
    "\n",
    "=",
    "#",
    "\u{00e9}",
    "\u{10ffff}",
];

/// One mutation of `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.insert(at, rng.next_u64() as u8),
            2 if at < out.len() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
            4 if !out.is_empty() => {
                let from = rng.below(out.len());
                let len = (1 + rng.below(16)).min(out.len() - from);
                let chunk = out[from..from + len].to_vec();
                out.splice(at..at, chunk);
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// How a target is run: cases from fixed seeds by default, or for a time from a random seed.
struct Budget {
    seed: u64,
    cases: usize,
    until: Option<Instant>,
}

impl Budget {
    fn from_env(default_cases: usize) -> Self {
        let seconds = std::env::var("UNIDLER_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        let seed = std::env::var("UNIDLER_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| match seconds {
                Some(_) => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64 | 1),
                None => 0x5eed_0001,
            });
        eprintln!("fuzz seed {seed} (replay with UNIDLER_FUZZ_SEED={seed})");
        Self {
            seed,
            cases: default_cases,
            until: seconds.map(|s| Instant::now() + Duration::from_secs(s)),
        }
    }

    /// Runs `check` on mutations of the corpus entries; each case is given its bytes.
    fn run(&self, corpus: &[&[u8]], mut check: impl FnMut(&[u8], &mut Rng)) {
        let mut rng = Rng(self.seed);
        for entry in corpus {
            check(entry, &mut rng);
        }
        let mut case = 0usize;
        loop {
            match self.until {
                Some(until) if Instant::now() >= until => break,
                None if case >= self.cases => break,
                _ => {}
            }
            let entry = corpus[rng.below(corpus.len())];
            let input = mutate(&mut rng, entry);
            check(&input, &mut rng);
            case += 1;
        }
    }
}

const OVSDB_MESSAGES: &[&str] = &[
    r#"{"id":1,"result":[{"uuid":["uuid","0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0a"]}],"error":null}"#,
    r#"{"id":2,"result":null,"error":{"error":"constraint violation","details":"x"}}"#,
    r#"{"id":"echo","method":"echo","params":[]}"#,
    r#"{"id":null,"method":"update2","params":["data",{"Load_Balancer":{"0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0a":{"insert":{"vips":["map",[["10.96.0.10:80",""]]],"protocol":["set",["tcp"]],"options":["map",[["event","true"]]]}}}}]}"#,
    r#"{"id":null,"method":"update3","params":["data","5f3c1a2b-0000-4000-8000-000000000001",{"Controller_Event":{"0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0b":{"modify":{"seq_num":2}},"0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0c":{"delete":null}}}]}"#,
    r#"{"id":3,"result":[true,"5f3c1a2b-0000-4000-8000-000000000001",{"Chassis":{"0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0d":{"initial":{"name":"chassis-1","encaps":["uuid","0b6c5a5d-5d3e-4c1f-9c59-3b5b6f0d1f0e"]}}}}],"error":null}"#,
    r#"[1, 2, {"nested": ["a", {"b": "}]\"[{"}]}]"#,
];

/// The framer never panics, and gives the same messages (and the same error, at the same
/// point) however the stream is cut into reads.
#[test]
fn fuzz_ovsdb_framing_is_the_same_however_the_stream_is_cut() {
    let corpus: Vec<Vec<u8>> = (0..OVSDB_MESSAGES.len())
        .map(|i| {
            // Two or three messages back to back, with white space between.
            let mut bytes = OVSDB_MESSAGES[i].as_bytes().to_vec();
            bytes.extend_from_slice(b" \n");
            bytes.extend_from_slice(OVSDB_MESSAGES[(i + 1) % OVSDB_MESSAGES.len()].as_bytes());
            bytes
        })
        .collect();
    let corpus: Vec<&[u8]> = corpus.iter().map(Vec::as_slice).collect();
    const LIMIT: usize = 4096;
    Budget::from_env(20_000).run(&corpus, |input, rng| {
        let whole = Framer::default().push(input, LIMIT);
        let mut framer = Framer::default();
        let mut pieces = Vec::new();
        let mut failed = None;
        let mut at = 0;
        while at < input.len() {
            let end = (at + 1 + rng.below(64)).min(input.len());
            match framer.push(&input[at..end], LIMIT) {
                Ok(messages) => pieces.extend(messages),
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
            at = end;
        }
        match whole {
            Ok(messages) => {
                assert_eq!(failed, None, "input {:?}", String::from_utf8_lossy(input));
                assert_eq!(
                    messages,
                    pieces,
                    "input {:?}",
                    String::from_utf8_lossy(input)
                );
            }
            Err(e) => assert!(
                failed.is_some(),
                "whole: {e}; in pieces: fine; input {:?}",
                String::from_utf8_lossy(input)
            ),
        }
    });
}

/// Typed values, transaction results and monitor updates from any JSON the server might
/// send: errors, never panics; a replica that accepted an update can take it again.
#[test]
fn fuzz_ovsdb_values_results_and_updates_never_panic() {
    let corpus: Vec<&[u8]> = OVSDB_MESSAGES.iter().map(|m| m.as_bytes()).collect();
    Budget::from_env(20_000).run(&corpus, |input, _| {
        let Ok(json) = serde_json::from_slice::<Json>(input) else {
            return;
        };
        let _ = Value::from_json(&json);
        for part in json_parts(&json) {
            let _ = Value::from_json(part);
            let _ = ovsdb::op::parse_results(part, 1);
            let mut replica = Replica::default();
            let _ = replica.load_update2(part);
            let _ = replica.apply_update2(part);
            let _ = replica.apply_update2(part);
        }
    });
}

/// Every value nested in `json`, the whole included (depth-first, bounded).
fn json_parts(json: &Json) -> Vec<&Json> {
    let mut parts = vec![json];
    let mut at = 0;
    while at < parts.len() && parts.len() < 256 {
        let children: Vec<&Json> = match parts[at] {
            Json::Array(items) => items.iter().collect(),
            Json::Object(fields) => fields.values().collect(),
            _ => Vec::new(),
        };
        parts.extend(children);
        at += 1;
    }
    parts
}

/// The VIPs file parser: errors, never panics, and what it accepts names only valid VIPs.
#[test]
fn fuzz_vips_files_never_panic() {
    let corpus: &[&[u8]] = &[
        b"[[vip]]\nvip = \"10.96.0.10:80\"\n",
        b"[[vip]]\nvip = \"[fd00::10]:53\"\nprotocol = \"udp\"\nbackends = 2\nload_balancer = \"lb-1\"\n",
        b"# comment\n[[vip]]\nvip = \"10.0.0.1:80\"\nprotocol = \"sctp\"\n\n[[vip]]\nvip = \"10.0.0.2:80\"\n",
        b"",
    ];
    Budget::from_env(20_000).run(corpus, |input, _| {
        let Ok(text) = std::str::from_utf8(input) else {
            return;
        };
        if let Ok(vips) = parse_vips_file(text) {
            for desired in vips {
                assert!(
                    desired
                        .vip
                        .endpoint()
                        .parse::<std::net::SocketAddr>()
                        .is_ok(),
                    "{text:?} gave {desired:?}"
                );
            }
        }
    });
}
