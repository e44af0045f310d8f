//! Entry points for fuzzing the webhook edge: `fuzz/` (cargo fuzz) and the property test in
//! `tests/integration/reliability.rs` call them with arbitrary bytes.
//!
//! Invariant: whatever the bytes, these return (no panic, no unbounded work): the parsers they
//! drive are the ones the receiver uses on every request.

use crate::clock::Millis;
use crate::edge::webhook::{Secrets, signature_headers, verify};

/// The fixed key the fuzzed requests are checked against (a test secret).
pub const FUZZ_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One raw request: the head parser, the signature headers, the signature check (at a fixed
/// time) and the payload parser, as the receiver runs them. Returns the status the receiver
/// would answer with, as far as these steps decide it (200: accepted by all of them).
pub fn webhook_request(data: &[u8]) -> u16 {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len(), |p| p + 4);
    let (head, body) = data.split_at(split);
    let head = match crate::edge::httpd::parse_head_bytes(head) {
        Ok(h) => h,
        Err(resp) => return resp.status,
    };
    let Ok(secrets) = Secrets::parse(FUZZ_SECRET) else {
        return 500;
    };
    let now = Millis(1_795_507_200_000);
    let checked = signature_headers(&head)
        .and_then(|(id, ts, sig)| verify(&secrets, &id, &ts, &sig, body, now).map(|ts| (id, ts)));
    if checked.is_err() {
        return 401;
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(_)) => 200,
        _ => 400,
    }
}
