//! A held frame as the kernel copies it: parsed (Ethernet, VLAN tags, IPv4 or IPv6, the L4
//! header) or refused, never a panic; a parsed frame's checksum is completed in place within
//! its bounds, twice to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unidler::hold::frame::{complete_checksum, parse};

fuzz_target!(|data: &[u8]| {
    let Some(parsed) = parse(data) else {
        return;
    };
    let mut frame = data.to_vec();
    complete_checksum(&mut frame, &parsed);
    assert_eq!(frame.len(), data.len());
    let once = frame.clone();
    complete_checksum(&mut frame, &parsed);
    assert_eq!(
        frame, once,
        "completing a checksum twice changes nothing more"
    );
});
