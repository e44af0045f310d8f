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
    let head = match parse_head(head) {
        Some(h) => h,
        None => return 400,
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

/// A request head parsed with `httparse` (the parser hyper runs), as the edge sees it.
fn parse_head(bytes: &[u8]) -> Option<crate::edge::httpd::Head> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    let content_length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    Some(crate::edge::httpd::Head {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        content_length,
        peer: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    })
}
