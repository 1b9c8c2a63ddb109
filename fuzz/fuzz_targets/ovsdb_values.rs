//! OVSDB's typed values (RFC 7047 atoms, sets, maps): any JSON that parses as a value writes
//! back as JSON that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovsdb::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(value) = Value::from_json(&json) {
        let again = Value::from_json(&value.to_json()).expect("its own JSON parses");
        assert_eq!(value, again);
    }
    // The streaming deserializer agrees with the tree one.
    let streamed = serde_json::from_slice::<Value>(data).ok();
    assert_eq!(streamed, Value::from_json(&json).ok());
});
