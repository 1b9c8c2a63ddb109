//! OVSDB's JSON-RPC framing: the messages found in a stream, and whether it fails, are the
//! same however the stream is cut (the first byte of the input says where); nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovsdb::rpc::Framer;

/// The largest message accepted, small so that the limit is reached too.
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let whole = Framer::default().push(input, LIMIT);
    let at = usize::from(cut).min(input.len());
    let mut framer = Framer::default();
    let first = framer.push(&input[..at], LIMIT);
    let pieces = first.and_then(|mut messages| {
        messages.extend(framer.push(&input[at..], LIMIT)?);
        Ok(messages)
    });
    match (whole, pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "cut at {at}"),
        (Err(_), Err(_)) => {}
        (whole, pieces) => panic!("cut at {at}: whole {whole:?}, in pieces {pieces:?}"),
    }
});
