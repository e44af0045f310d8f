//! Header parsing, signature checking and payload parsing of the webhook edge, on arbitrary
//! bytes: `cargo fuzz run webhook_request` (see RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = jobmirror::edge::fuzzing::webhook_request(data);
});
