//! The webhook receiver: the HTTP edge of the event thread ([`crate::service::events`]).
//!
//! `POST /webhooks/pleo` is checked in this order: method and path (405/404), body size (413),
//! signature (401), JSON (400). A verified delivery goes through a bounded queue to the one
//! `jm-events` thread, which commits a batch of deliveries in one transaction and only then
//! lets their 2xx go out. A full queue is 503 with `Retry-After`; a failed commit is 503.
//!
//! Invariants: nothing is acknowledged before it is committed; a repeated `webhook-id` is
//! acknowledged and stored once; signature checking is a pure function of secrets, headers,
//! body and `now`, comparing in constant time; a webhook is only a hint: the named job is read
//! again through the API (by the sync thread) before anything acts on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use crossbeam_channel::{Sender, TrySendError, bounded};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::clock::{Millis, SharedClock};
use crate::edge::httpd::{Handler, Head, Request, Response};

pub const PATH: &str = "/webhooks/pleo";

/// Standard base64, padding optional (a `whsec_` secret is taken with or without it).
const SECRET_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);
/// How far a `webhook-timestamp` may be from our clock.
pub const TOLERANCE_SECS: i64 = 300;

pub use crate::wire::{JOB_EVENT_TYPES, is_job_event};

/// The webhook object of a body: at the top level, or wrapped in `{"payload": {...}}` (Pleo's
/// pages show both).
pub fn event_object(body: &Value) -> &Value {
    match body.get("payload") {
        Some(p @ Value::Object(_)) if body.get("eventType").is_none() => p,
        _ => body,
    }
}

/// What a verified body names: (event type, event id, job id, company id). Only an export-job
/// event names a job: another event's `data.id` (a vendor's, say) is never taken for one.
pub fn describe(
    body: &Value,
) -> (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    let ev = event_object(body);
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let event_type = text(&ev["eventType"]);
    let job_event = event_type.as_deref().is_some_and(is_job_event);
    let job_id = if job_event {
        text(&ev["data"]["id"])
    } else {
        None
    };
    let company_id = text(&ev["data"]["companyId"]);
    (event_type, text(&ev["eventId"]), job_id, company_id)
}

/// The signing secrets in force (several during a rotation). Never printed.
#[derive(Clone, Default)]
pub struct Secrets(Vec<Vec<u8>>);

impl Secrets {
    /// The same keys, in the same order.
    pub fn same_as(&self, other: &Secrets) -> bool {
        self.0 == other.0
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} keys)", self.0.len())
    }
}

impl Secrets {
    /// Parses `whsec_<base64>` entries separated by whitespace or commas.
    pub fn parse(list: &str) -> Result<Secrets, String> {
        let mut keys = Vec::new();
        for (i, entry) in list
            .split([',', ' ', '\n', '\t', '\r'])
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let b64 = entry
                .strip_prefix("whsec_")
                .ok_or_else(|| format!("secret #{} does not start with whsec_", i + 1))?;
            // Padded or not, as the Standard Webhooks libraries take it.
            let key = SECRET_BASE64
                .decode(b64.trim_end_matches('='))
                .map_err(|_| format!("secret #{} is not valid base64 after whsec_", i + 1))?;
            if key.is_empty() {
                return Err(format!("secret #{} is empty", i + 1));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no secret given".into());
        }
        Ok(Secrets(keys))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a delivery was refused with 401. The reason text is short and fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    MissingHeaders,
    BadTimestamp,
    StaleTimestamp,
    BadSignature,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::MissingHeaders => "missing signature headers",
            Rejection::BadTimestamp => "invalid timestamp",
            Rejection::StaleTimestamp => "timestamp outside tolerance",
            Rejection::BadSignature => "invalid signature",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MissingHeaders => "missing_headers",
            Rejection::BadTimestamp => "bad_timestamp",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::BadSignature => "bad_signature",
        }
    }
}

/// The three signature headers, under `webhook-*` or `svix-*` names.
pub fn signature_headers(head: &Head) -> Result<(String, String, String), Rejection> {
    let pick = |name: &str| {
        head.header(&format!("webhook-{name}"))
            .or_else(|| head.header(&format!("svix-{name}")))
            .map(str::to_owned)
    };
    match (pick("id"), pick("timestamp"), pick("signature")) {
        (Some(id), Some(ts), Some(sig)) if !id.is_empty() => Ok((id, ts, sig)),
        _ => Err(Rejection::MissingHeaders),
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` for one key.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Signs with the first of `secrets` (for senders: the fake and tests).
pub fn sign_with(secrets: &Secrets, id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .0
        .first()
        .map(|k| sign(k, id, timestamp, body))
        .unwrap_or_default()
}

/// Entries read from one `webhook-signature` header at most (a sender lists one per secret
/// in force: two during a rotation); the rest is not looked at.
pub const SIGNATURE_ENTRIES_MAX: usize = 16;

/// Checks a delivery: timestamp within [`TOLERANCE_SECS`] of `now`, and some `v1,` entry of
/// the signature header matching some secret. The cost is bounded before anything is known
/// about the sender: one HMAC per secret (each compared in constant time with every entry), and
/// at most [`SIGNATURE_ENTRIES_MAX`] entries read.
pub fn verify(
    secrets: &Secrets,
    id: &str,
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: Millis,
) -> Result<i64, Rejection> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Rejection::BadTimestamp)?;
    let now_secs = now.0.div_euclid(1000);
    // Checked: a timestamp near either end of i64 must not wrap into the window.
    match now_secs.checked_sub(ts) {
        Some(d) if d.unsigned_abs() <= TOLERANCE_SECS.unsigned_abs() => {}
        _ => return Err(Rejection::StaleTimestamp),
    }
    let candidates: Vec<Vec<u8>> = signature
        .split(' ')
        .filter(|e| !e.is_empty())
        .take(SIGNATURE_ENTRIES_MAX)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        // An HMAC-SHA256 is 32 bytes: 44 characters of base64.
        .filter(|b64| b64.len() == 44)
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .collect();
    if candidates.is_empty() {
        return Err(Rejection::BadSignature);
    }
    for key in &secrets.0 {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        // Every entry is compared, whatever matched: the time taken says nothing.
        let matched = candidates
            .iter()
            .fold(false, |any, sig| any | constant_time_eq(&tag, sig));
        if std::hint::black_box(matched) {
            return Ok(ts);
        }
    }
    Err(Rejection::BadSignature)
}

/// Equality whose time depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub use crate::health::Counters;
pub use crate::store::{Delivery, Stored};

impl Counters {
    fn rejected(&self, r: Rejection) -> &AtomicU64 {
        match r {
            Rejection::MissingHeaders => &self.rejected_missing_headers,
            Rejection::BadTimestamp => &self.rejected_bad_timestamp,
            Rejection::StaleTimestamp => &self.rejected_stale_timestamp,
            Rejection::BadSignature => &self.rejected_bad_signature,
        }
    }
}

/// A delivery and where to send the outcome of its commit.
pub type Job = (Delivery, Sender<Result<Stored, String>>);

/// The HTTP edge: verifies and enqueues; answers after the event thread's commit.
pub struct WebhookReceiver {
    secrets: Secrets,
    /// The secrets of companies' own subscriptions (`subscribe --company/--all`), by company,
    /// kept by the service as they change: a company's own secret verifies only deliveries
    /// that name that company (and `secrets` those of the other companies).
    company_secrets: Arc<std::sync::RwLock<CompanySecrets>>,
    clock: SharedClock,
    queue: Sender<Job>,
    pub counters: Arc<Counters>,
    commit_wait: Duration,
    /// Refusals are logged a few a second at most (all are counted).
    log_gate: crate::edge::LogGate,
}

impl WebhookReceiver {
    pub fn new(
        secrets: Secrets,
        clock: SharedClock,
        queue: Sender<Job>,
        counters: Arc<Counters>,
    ) -> WebhookReceiver {
        WebhookReceiver {
            secrets,
            company_secrets: Arc::default(),
            clock,
            queue,
            counters,
            commit_wait: Duration::from_secs(10),
            log_gate: crate::edge::LogGate::default(),
        }
    }
}

impl WebhookReceiver {
    /// Where the service puts the companies' own subscription secrets.
    pub fn company_secrets(&self) -> Arc<std::sync::RwLock<CompanySecrets>> {
        self.company_secrets.clone()
    }
}

/// Companies' own webhook secrets, by company id.
pub type CompanySecrets = std::collections::HashMap<String, Secrets>;

impl Secrets {
    /// The companies' own secrets that parse, by company (a bad one is skipped and named in the
    /// log by company).
    pub fn by_company(list: &[(String, String)]) -> CompanySecrets {
        let mut out = CompanySecrets::new();
        for (company, s) in list {
            match Secrets::parse(s) {
                Ok(k) => {
                    out.insert(company.clone(), k);
                }
                Err(e) => log::warn!("company {company}: its webhook secret is skipped: {e}"),
            }
        }
        out
    }
}

fn reply(status: u16, message: &str) -> Response {
    Response::json(status, &json!({"message": message}))
}

impl Handler for WebhookReceiver {
    fn check_head(&self, head: &Head) -> Option<Response> {
        if head.path != PATH {
            return Some(reply(404, "not found"));
        }
        if head.method != "POST" {
            return Some(reply(405, "method not allowed").with_header("Allow", "POST"));
        }
        None
    }

    fn handle(&self, req: Request) -> Response {
        let now = self.clock.now();
        // The company the delivery names picks the secret (its own, or the default ones):
        // one company's secret never opens another's. The body is read for that before it is
        // verified; it is bounded (`webhook_body_bytes_max`) and only the company id is used.
        let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
        let company = parsed.as_ref().and_then(|v| describe(v).3);
        let checked = signature_headers(&req.head).and_then(|(id, ts, sig)| {
            let own = self
                .company_secrets
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let secrets = company
                .as_ref()
                .and_then(|c| own.get(c))
                .unwrap_or(&self.secrets);
            verify(secrets, &id, &ts, &sig, &req.body, now).map(|ts| (id, ts))
        });
        let (webhook_id, ts) = match checked {
            Ok(x) => x,
            Err(r) => {
                self.counters.rejected(r).fetch_add(1, Ordering::Relaxed);
                self.log_gate.warn(|| {
                    format!(
                        "webhook from {} refused: {}",
                        req.head.peer.ip(),
                        r.reason()
                    )
                });
                return reply(401, r.reason());
            }
        };
        let parsed: Value = match parsed {
            Some(v @ Value::Object(_)) => v,
            _ => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.log_gate
                    .warn(|| format!("webhook {webhook_id}: body is not a JSON object"));
                return reply(400, "body is not a JSON object");
            }
        };
        let (event_type, event_id, job_id, company_id) = describe(&parsed);
        let headers: serde_json::Map<String, Value> = req
            .head
            .headers
            .iter()
            .filter(|(k, _)| {
                !k.eq_ignore_ascii_case("authorization") && !k.eq_ignore_ascii_case("cookie")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), json!(v)))
            .collect();
        let delivery = Delivery {
            webhook_id: webhook_id.clone(),
            signed_at: Millis::from_secs(ts),
            event_type,
            event_id,
            job_id,
            company_id,
            // from_slice succeeded, so the body is valid UTF-8.
            body: String::from_utf8_lossy(&req.body).into_owned(),
            headers: Value::Object(headers),
        };
        let (tx, rx) = bounded(1);
        match self.queue.try_send((delivery, tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                self.log_gate
                    .warn(|| format!("webhook {webhook_id}: queue full, answering 503"));
                return reply(503, "busy, retry later").with_header("Retry-After", "5");
            }
            Err(TrySendError::Disconnected(_)) => {
                return reply(503, "shutting down, retry later").with_header("Retry-After", "5");
            }
        }
        match rx.recv_timeout(self.commit_wait) {
            Ok(Ok(Stored::OverQuota { company })) => {
                let (c, status, what) = if company {
                    (&self.counters.rejected_company_quota, 429, "this company's")
                } else {
                    (&self.counters.rejected_storage_quota, 503, "all")
                };
                c.fetch_add(1, Ordering::Relaxed);
                self.log_gate.warn(|| {
                    format!("webhook {webhook_id}: not stored, {what} stored deliveries are at their bound")
                });
                reply(status, "stored deliveries are at their bound, retry later")
                    .with_header("Retry-After", "60")
            }
            Ok(Ok(stored)) => {
                let c = if stored == Stored::New {
                    &self.counters.accepted
                } else {
                    &self.counters.duplicates
                };
                c.fetch_add(1, Ordering::Relaxed);
                Response::json(
                    200,
                    &json!({"received": true, "duplicate": stored == Stored::Duplicate}),
                )
            }
            Ok(Err(_)) | Err(_) => {
                self.counters.store_failed.fetch_add(1, Ordering::Relaxed);
                reply(503, "could not store the delivery, retry later")
                    .with_header("Retry-After", "5")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &str) -> Secrets {
        Secrets::parse(s).unwrap()
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_refused_not_wrapped() {
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let now = Millis::from_secs(1_795_507_200);
        let body = b"{}";
        for ts in [i64::MIN, i64::MIN + 1_795_507_200, i64::MAX, -1] {
            let sig = sign(&s.0[0], "m", ts, body);
            assert_eq!(
                verify(&s, "m", &ts.to_string(), &sig, body, now),
                Err(Rejection::StaleTimestamp),
                "{ts}"
            );
        }
        let ok = sign(&s.0[0], "m", 1_795_507_200 - 299, body);
        assert!(verify(&s, "m", "1795506901", &ok, body, now).is_ok());
    }

    #[test]
    fn only_the_first_sixteen_entries_of_a_signature_header_are_read() {
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let now = Millis::from_secs(1_795_507_200);
        let body = b"{}";
        let good = sign(&s.0[0], "m", 1_795_507_200, body);
        let junk = |n: usize| vec!["v1,AA=="; n].join(" ");
        let within = format!("{} {good}", junk(SIGNATURE_ENTRIES_MAX - 1));
        assert!(verify(&s, "m", "1795507200", &within, body, now).is_ok());
        let past = format!("{} {good}", junk(SIGNATURE_ENTRIES_MAX));
        assert_eq!(
            verify(&s, "m", "1795507200", &past, body, now),
            Err(Rejection::BadSignature)
        );
        // Two thousand entries cost what sixteen do: nothing past them is decoded.
        let flood = format!("{} {good}", junk(2000));
        assert_eq!(
            verify(&s, "m", "1795507200", &flood, body, now),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn published_vector_one() {
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let key = &s.0[0];
        assert_eq!(
            sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let now = Millis::from_secs(1614265330);
        assert_eq!(
            verify(
                &s,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                body,
                now
            ),
            Ok(1614265330)
        );
    }

    #[test]
    fn published_vector_two() {
        let s = secrets("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        assert_eq!(
            sign(&s.0[0], "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body),
            sig
        );
        assert!(
            verify(
                &s,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                "1649367553",
                sig,
                body,
                Millis::from_secs(1649367553)
            )
            .is_ok()
        );
    }

    #[test]
    fn tolerance_is_300_seconds_either_way() {
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = b"{}";
        let sig = sign(&s.0[0], "m", 1_000_000, body);
        let at = |secs| verify(&s, "m", "1000000", &sig, body, Millis::from_secs(secs));
        assert!(at(1_000_299).is_ok());
        assert_eq!(at(1_000_301), Err(Rejection::StaleTimestamp));
        assert!(at(999_701).is_ok());
        assert_eq!(at(999_699), Err(Rejection::StaleTimestamp));
        assert_eq!(
            verify(&s, "m", "soon", &sig, body, Millis::from_secs(1_000_000)),
            Err(Rejection::BadTimestamp)
        );
    }

    #[test]
    fn entries_are_tried_in_turn_and_odd_ones_skipped() {
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = b"{}";
        let good = sign(&s.0[0], "m", 5, body);
        let now = Millis::from_secs(5);
        let header = format!("v1a,abc v2,xyz v1, v1,!!notbase64 v1,AAAA {good}");
        assert!(verify(&s, "m", "5", &header, body, now).is_ok());
        assert_eq!(
            verify(&s, "m", "5", "v1,", body, now),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify(&s, "m", "5", &good, b"{ }", now),
            Err(Rejection::BadSignature),
            "tampered body"
        );
        assert_eq!(
            verify(&s, "other", "5", &good, body, now),
            Err(Rejection::BadSignature),
            "other id"
        );
    }

    #[test]
    fn a_full_queue_is_503_with_retry_after_and_holds_nothing() {
        use crate::clock::ManualClock;
        use crate::edge::httpd::{Handler, Head, Request};
        let s = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let clock = ManualClock::new(Millis::from_secs(1_000));
        let (tx, rx) = bounded(1);
        let counters = Arc::new(Counters::default());
        let r = WebhookReceiver::new(s.clone(), clock, tx.clone(), counters.clone());
        // Nobody consumes: fill the only slot.
        let (dummy, _keep) = bounded(1);
        let filler = Delivery {
            webhook_id: "x".into(),
            signed_at: Millis(0),
            event_type: None,
            event_id: None,
            job_id: None,
            company_id: None,
            body: "{}".into(),
            headers: json!({}),
        };
        tx.try_send((filler, dummy)).unwrap();
        let body = br#"{"eventType":"v1.export-job.created","data":{"id":"j"}}"#.to_vec();
        let head = Head {
            method: "POST".into(),
            path: PATH.into(),
            query: String::new(),
            headers: vec![
                ("webhook-id".into(), "m".into()),
                ("webhook-timestamp".into(), "1000".into()),
                ("webhook-signature".into(), sign_with(&s, "m", 1000, &body)),
            ],
            content_length: body.len(),
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        let resp = r.handle(Request { head, body });
        assert_eq!(resp.status, 503);
        assert!(
            resp.headers
                .iter()
                .any(|(k, v)| k == "Retry-After" && v == "5")
        );
        assert_eq!(counters.queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(rx.len(), 1, "the queue never grows past its bound");
    }

    #[test]
    fn rotation_accepts_any_configured_secret() {
        let old = secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let both = secrets(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD, whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        );
        let sig = sign(&old.0[0], "m", 5, b"{}");
        assert!(verify(&both, "m", "5", &sig, b"{}", Millis::from_secs(5)).is_ok());
        assert_eq!(both.len(), 2);
        assert!(Secrets::parse("nope").is_err());
        assert!(Secrets::parse("whsec_***").is_err());
        assert!(!format!("{both:?}").contains("whsec"));
    }
}
