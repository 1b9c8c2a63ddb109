//! The VIPs file (`--vips-file`): any text is refused or gives VIPs, never a panic; the
//! VIPs it gives are the same when it is read again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unidler::vipsource::file::parse_vips_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = parse_vips_file(text);
    let second = parse_vips_file(text);
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Ok(a), Ok(b)) = (first, second) {
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
});
