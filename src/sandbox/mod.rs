//! The fake Pleo: a real HTTP server implementing the Export API contract of
//! `../shared/pleo-export-api.md`, for tests, the demo and offline replays.
//!
//! Invariants: it follows the contract's transition table exactly (anything else is
//! `422 INVALID_EXPORT_JOB_STATUS_CHANGE`); jobs expire `expiresIn` seconds after
//! `lastUpdatedAt` on its injected clock, and only state-changing calls refresh
//! `lastUpdatedAt`; every request it receives is logged, faults included; a request Pleo's
//! OpenAPI files call invalid is refused before it touches the world ([`rules`]); it sorts a
//! listing only by the sorting keys asked for (otherwise insertion order, which fixtures may
//! shuffle).
//!
//! Its parts: the types and the world's state here; [`world`] (claims, expiry, generated
//! jobs and items), [`http`] (authentication, faults, routing, paging), [`jobs`] (the Export
//! API operations), [`subscriptions`] (subscriptions and the webhook sender), [`oauth`] (the
//! token endpoint), [`api`] (what tests and the demo do to the fake).

pub mod rules;

mod api;
mod http;
mod jobs;
mod oauth;
mod subscriptions;
mod world;

use http::*;
use jobs::*;
use oauth::*;
use subscriptions::*;
use world::*;

use std::collections::{HashSet, VecDeque};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::clock::{Millis, SharedClock};
use crate::edge::httpd::{self, Handler, Head, Request, Response, Server};
use rules::{Page, Query, error};

/// The default API key of the fake when neither the fixture nor the command line names one.
pub const DEFAULT_API_KEY: &str = "fake-pleo-key";

#[derive(Clone, Debug, PartialEq)]
pub struct FakeJob {
    pub id: String,
    pub company_id: String,
    pub status: String,
    pub created_at: Millis,
    pub last_updated_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub expired_at: Option<Millis>,
    pub expires_in_secs: i64,
    pub is_interactive: bool,
    pub vendor_based_bookkeeping: bool,
    pub created_by: Option<String>,
    pub failure_reason: Option<String>,
    pub failure_reason_type: Option<String>,
    /// Fields the fake does not model, passed through as given.
    pub extra: Map<String, Value>,
    /// `createdAt` exactly as served, when a test wants a malformed one (e.g. no offset).
    pub served_created_at: Option<String>,
    pub items: Vec<FakeItem>,
    pub export_items: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FakeItem {
    #[serde(default)]
    pub export_job_id: String,
    pub accounting_entry_id: String,
    pub status: String,
    pub exported_at: Option<String>,
    pub external_id: Option<String>,
    pub external_url: Option<String>,
    pub failure_reason: Option<String>,
    /// Not nullable in Pleo's OpenAPI file: omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason_type: Option<String>,
}

impl FakeJob {
    fn is_open(&self) -> bool {
        self.status == "pending" || self.status == "in_progress"
    }
    pub fn expires_at(&self) -> Millis {
        self.last_updated_at
            .unwrap_or(self.created_at)
            .plus_secs(self.expires_in_secs)
    }
    pub fn to_json(&self) -> Value {
        let t = |m: Option<Millis>| m.map_or(Value::Null, |m| json!(m.to_rfc3339()));
        let mut o = self.extra.clone();
        let fields = json!({
            "id": self.id,
            "companyId": self.company_id,
            "status": self.status,
            "createdAt": self.created_at.to_rfc3339(),
            "lastUpdatedAt": t(self.last_updated_at),
            "startedAt": t(self.started_at),
            "completedAt": t(self.completed_at),
            "expiredAt": t(self.expired_at),
            "expiresIn": self.expires_in_secs,
            "isInteractive": self.is_interactive,
            "numberOfItems": self.items.len(),
            "vendorBasedBookkeeping": self.vendor_based_bookkeeping,
            "createdBy": self.created_by,
            "failureReason": self.failure_reason,
        });
        if let Value::Object(f) = fields {
            o.extend(f);
        }
        if let Some(c) = &self.served_created_at {
            o.insert("createdAt".into(), json!(c));
        }
        // Pleo's OpenAPI file does not mark failureReasonType nullable: leave it out when unset.
        if let Some(t) = &self.failure_reason_type {
            o.insert("failureReasonType".into(), json!(t));
        }
        Value::Object(o)
    }
}

/// A fault applied to a request instead of (or on top of) its normal answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429 with `Retry-After: secs`; the request is not applied.
    TooManyRequests { retry_after_secs: u64 },
    /// 500; the request is not applied.
    ServerError,
    /// The request is applied; the answer is sent after `millis`.
    Slow { millis: u64 },
    /// The request is applied; the answer's body is cut in half and the connection closed.
    Truncate,
    /// The request is applied; the connection is closed with no answer at all (to the client
    /// this is a timeout: it cannot know whether the request took effect).
    HangUp,
    /// The request is applied; the answer is a 504 (a gateway gave up waiting for it).
    GatewayTimeout,
    /// The request is refused with this status (a 401 for a revoked key, a 403, ...) and
    /// Pleo's `{type, message}` body; it is not applied.
    Refused { status: u16 },
    /// The connection is closed before the request is read: not applied, and no answer (to
    /// the client, a lost answer like `HangUp`).
    Dropped,
}

/// A scripted fault: consumed by the first request that matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    pub fault: Fault,
    /// Let this many matching requests through first.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub skip: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// Faults by rate, drawn from a seeded generator (so a run is repeatable).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultRates {
    pub too_many_requests: f64,
    pub server_error: f64,
    pub slow: f64,
    pub truncate: f64,
    #[serde(default)]
    pub hang_up: f64,
    pub retry_after_secs: u64,
    pub slow_millis: u64,
}

/// The fake's OAuth token endpoint: refresh tokens rotate, each works once.
#[derive(Debug, Default)]
struct FakeOAuth {
    client_id: String,
    client_secret: String,
    /// Live refresh tokens, and the company each was granted for (`None`: the default
    /// credential's, good for every company).
    refresh_tokens: std::collections::HashMap<String, Option<String>>,
    /// Every refresh token ever issued for a company (so a refused one is still attributed).
    issued_to: std::collections::HashMap<String, String>,
    /// Live access tokens: expiry and company.
    access: std::collections::HashMap<String, (Millis, Option<String>)>,
    ttl_secs: i64,
    issued: u64,
    grants: Vec<TokenGrant>,
}

/// One call of the token endpoint, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenGrant {
    pub at: Millis,
    /// The refresh token offered (the fake's own tokens are not secrets).
    pub refresh_token: String,
    pub ok: bool,
    /// The company the offered token was granted for, if it was one of a company's.
    pub company: Option<String>,
}

/// Who moved a job to `in_progress`, as the fake saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Claimant {
    /// A `started` event through the API (jobmirror, in tests).
    Api,
    /// Another integration, between two of jobmirror's steps.
    Other,
    /// Another integration, right after jobmirror's single-job GET (the race the lock settles).
    OtherAfterGet,
}

/// One claim as the fake saw it: every `started` that reached the transition table (faults
/// that refuse a request never get there) and every claim by another integration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClaimRecord {
    pub at: Millis,
    /// Requests logged before this claim (it affects requests with a larger `seq`).
    pub after_requests: u64,
    pub job_id: String,
    pub by: Claimant,
    pub prior_status: String,
    /// Who held the job if it was `in_progress` (None: unknown, e.g. loaded that way).
    pub prior_holder: Option<Claimant>,
    pub accepted: bool,
    /// The company's other jobs that were `pending` at Pleo at that moment and older (by
    /// `createdAt`, then id): (id, createdAt, expires at).
    pub older_pending: Vec<(String, Millis, Millis)>,
    /// The company's other jobs `in_progress` at that moment, with their holder (None: loaded
    /// that way, i.e. an interrupted workflow of ours).
    pub in_progress: Vec<(String, Option<Claimant>)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoggedRequest {
    pub seq: u64,
    pub at: Millis,
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub status: u16,
    pub fault: Option<String>,
}

#[derive(Debug)]
struct World {
    jobs: Vec<FakeJob>,
    api_keys: Vec<String>,
    expires_in_secs: i64,
    requests: Vec<LoggedRequest>,
    script: VecDeque<FaultRule>,
    rates: FaultRates,
    rng: u64,
    steal_on_get: HashSet<String>,
    /// Item updates that reached an item Pleo already showed finished (`job/entry: from -> to`).
    stale_item_updates: Vec<String>,
    /// Job listings' cursors are positions (see `http::paginate`).
    offset_cursors: bool,
    /// Jobs another integration starts (`false`) or fails (`true`) right after the next first
    /// page of a job listing.
    claim_after_first_page: Vec<(String, bool)>,
    /// The OAuth token endpoint's state, when enabled.
    oauth: Option<FakeOAuth>,
    /// API keys that belong to one company (403 for any other company's jobs).
    key_companies: std::collections::HashMap<String, String>,
    /// Requests left before the fake stops answering (a crash of its client, as Pleo sees
    /// it: nothing more arrives). `Some(0)`: every request is dropped unapplied.
    blackout_after: Option<u32>,
    /// Added to every API answer (a stand-in for a real network's round trip).
    latency: std::time::Duration,
    claims: Vec<ClaimRecord>,
    holders: std::collections::HashMap<String, Claimant>,
    next_id: u64,
    subscriptions: Vec<Subscription>,
    webhook_options: WebhookOptions,
    webhook_log: Vec<WebhookAttempt>,
    outbox: Option<crossbeam_channel::Sender<Outgoing>>,
    next_msg: u64,
    /// Item updates to refuse inside a 200, by accounting entry id, and how many more times.
    refuse_updates: std::collections::HashMap<String, u32>,
    /// Indexes into `jobs`, per company, in insertion order (`jobs` only grows).
    by_company: std::collections::HashMap<String, Vec<usize>>,
    /// Index into `jobs` by job id.
    by_id: std::collections::HashMap<String, usize>,
    /// No open job expires before this (so most requests skip the expiry scan).
    next_expiry: Millis,
}

/// A webhook subscription held by the fake.
#[derive(Clone, Debug)]
struct Subscription {
    id: String,
    endpoint_url: String,
    event_types: Vec<String>,
    status: String,
    secret: String,
    created_at: Millis,
    updated_at: Millis,
    /// The company whose own credential made it (`None`: the default credential's, which
    /// hears of every company's jobs).
    company: Option<String>,
}

impl Subscription {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id, "endpointUrl": self.endpoint_url, "eventTypes": self.event_types,
            "status": self.status, "createdAt": self.created_at.to_rfc3339(),
            "updatedAt": self.updated_at.to_rfc3339(),
        })
    }
}

/// How the fake delivers webhooks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "snake_case")]
pub struct WebhookOptions {
    /// Send every delivery twice (same webhook-id), as senders do after a lost 2xx.
    pub duplicate: bool,
    /// Wait this long before the first attempt.
    pub delay_millis: u64,
    /// Attempts per delivery before giving up.
    pub attempts_max: u32,
    /// The event type spelling to send (default: the subscription's first job-created type).
    pub event_type: Option<String>,
    /// Use `svix-*` header names instead of `webhook-*`.
    pub svix_headers: bool,
    /// Wrap the webhook object in `{"payload": {...}}`, as Pleo's events list shows it.
    pub payload_envelope: bool,
    /// Spell the job's status in upper case (`PENDING`), as some of Pleo's pages do.
    pub upper_case_status: bool,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            duplicate: false,
            delay_millis: 0,
            attempts_max: 5,
            event_type: None,
            svix_headers: false,
            payload_envelope: false,
            upper_case_status: false,
        }
    }
}

/// One delivery attempt, as the fake's log keeps it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WebhookAttempt {
    pub webhook_id: String,
    pub url: String,
    pub job_id: String,
    /// The receiver's status, or None for a transport error.
    pub status: Option<u16>,
}

struct Outgoing {
    url: String,
    secret: String,
    webhook_id: String,
    job_id: String,
    body: String,
    options: WebhookOptions,
}

/// Inputs for a fake job; unset times default from the clock.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub company_id: String,
    #[serde(default = "pending")]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Alternative to `createdAt`: this many seconds before the fake starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_secs_ago: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_secs_ago: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    /// How many items to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    /// Another integration claims the job right after jobmirror reads it (the conflict path).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub steal_on_verify: bool,
    /// Serve `createdAt` as this string (malformed-data tests); the fake's own clock uses
    /// `createdAt`/`createdSecsAgo` as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_created_at: Option<String>,
    /// The last this-many items have no GL account (an ERP import refuses them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub items_without_account: usize,
    /// Recorded job items (as Pleo lists them), instead of generated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_items: Option<Vec<Value>>,
    /// Recorded export items (as Pleo lists them), instead of generated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_items: Option<Vec<Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn pending() -> String {
    "pending".into()
}

/// The fixture file: a versioned description of the Pleo side of a world.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixture {
    pub version: u32,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub expires_in: Option<i64>,
    #[serde(default)]
    pub jobs: Vec<JobSpec>,
}

impl Fixture {
    pub fn load(path: &Path) -> anyhow::Result<Fixture> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("fixture {}: {e}", path.display()))?;
        let f: Fixture = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("fixture {}: {e}", path.display()))?;
        if f.version != 1 {
            anyhow::bail!(
                "fixture {}: version {} is not supported (expected 1)",
                path.display(),
                f.version
            );
        }
        Ok(f)
    }
    /// Job and company ids that are not UUIDs. Pleo's ids are; readable ids are a test
    /// convenience the fake accepts back, but answers that carry them are outside the schema.
    pub fn readable_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for j in &self.jobs {
            for id in j.id.iter().chain(std::iter::once(&j.company_id)) {
                if !rules::is_uuid(id) && !out.contains(id) {
                    out.push(id.clone());
                }
            }
        }
        out
    }

    /// Company ids in the order they first appear.
    pub fn companies(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for j in &self.jobs {
            if !out.contains(&j.company_id) {
                out.push(j.company_id.clone());
            }
        }
        out
    }
}

#[derive(Clone, Debug)]
pub struct FakeConfig {
    pub api_keys: Vec<String>,
    pub expires_in_secs: i64,
    pub seed: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            api_keys: vec![DEFAULT_API_KEY.into()],
            expires_in_secs: 3600,
            seed: 42,
        }
    }
}

/// A running fake Pleo. Dropping it stops the server.
pub struct FakePleo {
    shared: Arc<Shared>,
    server: Server,
}

struct Shared {
    world: Mutex<World>,
    clock: SharedClock,
    /// Notified after every logged request, for [`FakePleo::wait_for_requests`].
    logged: std::sync::Condvar,
    /// Called for each claim through the API, before the client gets its answer.
    claim_hook: Mutex<Option<ClaimHook>>,
    /// Asked before each token request is processed, outside the world's lock.
    token_hook: Mutex<Option<Arc<TokenHook>>>,
}

/// See [`FakePleo::on_token_request`]: given the company of the refresh token offered, answers
/// whether the request is processed (`false`: dropped unprocessed, as when its sender died
/// before the token endpoint acted on it).
pub type TokenHook = Box<dyn Fn(Option<&str>) -> bool + Send + Sync>;

/// See [`FakePleo::on_api_claim`].
pub type ClaimHook = Box<dyn Fn(&ClaimRecord) + Send + Sync>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakePleo {
    fn drop(&mut self) {
        // Closing the outbox ends the webhook sender thread.
        self.shared.lock().outbox = None;
    }
}

impl std::fmt::Debug for FakePleo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePleo")
            .field("addr", &self.server.local_addr())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_round_trip_in_pleo_cursor_alphabet() {
        for s in [
            "",
            "a",
            "ab",
            "abcde",
            "00000000-0000-4000-8000-000000000001",
        ] {
            let c = base32(s.as_bytes());
            assert!(
                c.bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b) || b == b'=')
            );
            assert_eq!(unbase32(&c).unwrap(), s.as_bytes());
        }
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }
}
