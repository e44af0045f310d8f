//! The fake Pleo: a real HTTP server implementing the Export API contract of
//! `../shared/pleo-export-api.md`, for tests, the demo and offline replays.
//!
//! Invariants: it follows the contract's transition table exactly (anything else is
//! `422 INVALID_EXPORT_JOB_STATUS_CHANGE`); jobs expire `expiresIn` seconds after
//! `lastUpdatedAt` on its injected clock, and only state-changing calls refresh
//! `lastUpdatedAt`; every request it receives is logged, faults included; it never sorts
//! listings for the client (it returns jobs in insertion order, which fixtures may shuffle).

pub mod rules;

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
    refresh_tokens: HashSet<String>,
    access: std::collections::HashMap<String, Millis>,
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
}

fn form_pairs(body: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (httpd::percent_decode(k), httpd::percent_decode(v)))
        .collect()
}

fn token_endpoint(w: &mut World, body: &[u8], now: Millis) -> Response {
    let Some(o) = w.oauth.as_mut() else {
        return error(404, "NOT_FOUND", "OAuth is not enabled on this fake");
    };
    let f = form_pairs(body);
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    if get("client_id") != o.client_id || get("client_secret") != o.client_secret {
        return Response::json(401, &json!({"error": "invalid_client"}));
    }
    if get("grant_type") != "refresh_token" {
        return Response::json(400, &json!({"error": "unsupported_grant_type"}));
    }
    let offered = get("refresh_token");
    let ok = o.refresh_tokens.remove(&offered);
    o.grants.push(TokenGrant {
        at: now,
        refresh_token: offered,
        ok,
    });
    if !ok {
        return Response::json(400, &json!({"error": "invalid_grant"}));
    }
    o.issued += 1;
    let access = format!("fake-access-{:04}", o.issued);
    let refresh = format!("fake-refresh-{:04}", o.issued);
    o.access.insert(access.clone(), now.plus_secs(o.ttl_secs));
    o.refresh_tokens.insert(refresh.clone());
    Response::json(
        200,
        &json!({"access_token": access, "refresh_token": refresh, "token_type": "bearer", "expires_in": o.ttl_secs}),
    )
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
    /// The OAuth token endpoint's state, when enabled.
    oauth: Option<FakeOAuth>,
    /// API keys that belong to one company (403 for any other company's jobs).
    key_companies: std::collections::HashMap<String, String>,
    /// Requests left before the fake stops answering (a crash of its client, as Pleo sees
    /// it: nothing more arrives). `Some(0)`: every request is dropped unapplied.
    blackout_after: Option<u32>,
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
    /// Indexes into `jobs`, per company, in insertion order.
    by_company: std::collections::HashMap<String, Vec<usize>>,
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

impl World {
    /// Queues `v1.export-job.created` (or the configured spelling) for every active subscription.
    fn announce(&mut self, job: &FakeJob) {
        let Some(outbox) = self.outbox.clone() else {
            return;
        };
        let opts = self.webhook_options.clone();
        for sub in self
            .subscriptions
            .clone()
            .iter()
            .filter(|s| s.status == "ACTIVE")
        {
            let event_type = opts.event_type.clone().or_else(|| {
                sub.event_types
                    .iter()
                    .find(|t| crate::edge::webhook::is_job_event(t))
                    .cloned()
            });
            let Some(event_type) = event_type else {
                continue;
            };
            self.next_msg += 1;
            let mut data = job.to_json();
            if opts.upper_case_status {
                data["status"] = json!(job.status.to_ascii_uppercase());
            }
            let mut body = json!({"data": data, "eventId": format!("evt_{:08}", self.next_msg), "eventType": event_type});
            if opts.payload_envelope {
                body = json!({ "payload": body });
            }
            let _ = outbox.try_send(Outgoing {
                url: sub.endpoint_url.clone(),
                secret: sub.secret.clone(),
                webhook_id: format!("msg_fake{:08}", self.next_msg),
                job_id: job.id.clone(),
                body: body.to_string(),
                options: opts.clone(),
            });
        }
    }

    /// `pending` -> `in_progress` by `by`, logged whatever the outcome (false: refused).
    fn claim(&mut self, id: &str, by: Claimant, now: Millis) -> bool {
        let prior_holder = self.holders.get(id).copied();
        // What else the company had at Pleo at this moment (for invariants on claims).
        let (mut older_pending, mut in_progress) = (Vec::new(), Vec::new());
        if let Some(me) = self.jobs.iter().find(|j| j.id == id) {
            for o in self
                .jobs
                .iter()
                .filter(|o| o.company_id == me.company_id && o.id != id)
            {
                if o.status == "pending" && (o.created_at, &o.id) < (me.created_at, &me.id) {
                    older_pending.push((o.id.clone(), o.created_at, o.expires_at()));
                } else if o.status == "in_progress" {
                    in_progress.push((o.id.clone(), self.holders.get(&o.id).copied()));
                }
            }
        }
        let Some(j) = self.job_mut(id) else {
            return false;
        };
        let prior_status = j.status.clone();
        let accepted = prior_status == "pending";
        if accepted {
            j.status = "in_progress".into();
            j.started_at = Some(now);
            j.last_updated_at = Some(now);
            self.holders.insert(id.to_owned(), by);
        }
        let after_requests = self.requests.len() as u64;
        self.claims.push(ClaimRecord {
            at: now,
            after_requests,
            job_id: id.to_owned(),
            by,
            prior_status: prior_status.clone(),
            prior_holder: if prior_status == "in_progress" {
                prior_holder
            } else {
                None
            },
            accepted,
            older_pending,
            in_progress,
        });
        accepted
    }

    fn rand(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn job_mut(&mut self, id: &str) -> Option<&mut FakeJob> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }
    fn new_id(&mut self, kind: u16) -> String {
        self.next_id += 1;
        format!(
            "{:08x}-{kind:04x}-4000-8000-{:012x}",
            0xfa4e_0000u32, self.next_id
        )
    }
    fn expire_due(&mut self, now: Millis) {
        // No open job can expire before `next_expiry`: skip the scan (listings stay cheap).
        if now < self.next_expiry {
            return;
        }
        let mut next = Millis(i64::MAX);
        for j in self.jobs.iter_mut().filter(|j| j.is_open()) {
            let at = j.expires_at();
            if now >= at {
                j.status = "failed".into();
                j.failure_reason_type = Some("job_expired".into());
                j.failure_reason = Some("The export job expired before it was completed.".into());
                j.expired_at = Some(at);
                j.last_updated_at = Some(at);
                for it in j.items.iter_mut() {
                    if it.status == "pending" || it.status == "in_progress" {
                        it.status = "abandoned".into();
                    }
                }
            } else {
                next = next.min(at);
            }
        }
        self.next_expiry = next;
    }

    /// Adds a job, keeping the company index and the expiry bound.
    fn push_job(&mut self, job: FakeJob) {
        self.next_expiry = self.next_expiry.min(job.expires_at());
        self.by_company
            .entry(job.company_id.clone())
            .or_default()
            .push(self.jobs.len());
        self.jobs.push(job);
    }
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
}

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

impl FakePleo {
    /// Starts the fake on `listen` (e.g. `127.0.0.1:0`).
    pub fn start(listen: &str, cfg: FakeConfig, clock: SharedClock) -> anyhow::Result<FakePleo> {
        let listener = TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("fake-pleo cannot listen on {listen}: {e}"))?;
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                jobs: Vec::new(),
                api_keys: cfg.api_keys,
                expires_in_secs: cfg.expires_in_secs,
                requests: Vec::new(),
                script: VecDeque::new(),
                rates: FaultRates::default(),
                rng: cfg.seed | 1,
                steal_on_get: HashSet::new(),
                claims: Vec::new(),
                blackout_after: None,
                oauth: None,
                key_companies: std::collections::HashMap::new(),
                holders: std::collections::HashMap::new(),
                next_id: 0,
                subscriptions: Vec::new(),
                webhook_options: WebhookOptions::default(),
                webhook_log: Vec::new(),
                outbox: None,
                next_msg: 0,
                refuse_updates: std::collections::HashMap::new(),
                by_company: std::collections::HashMap::new(),
                next_expiry: Millis(i64::MIN),
            }),
            clock,
            logged: std::sync::Condvar::new(),
            claim_hook: Mutex::new(None),
        });
        let (outbox_tx, outbox_rx) = crossbeam_channel::bounded::<Outgoing>(10_000);
        shared.lock().outbox = Some(outbox_tx);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("fake-pleo-webhooks".into())
            .spawn(move || deliver_webhooks(outbox_rx, weak))?;
        let limits = httpd::Limits {
            connections_max: 512,
            body_bytes_max: 16 * 1024 * 1024,
            ..httpd::Limits::default()
        };
        let server = Server::start(
            listener,
            limits,
            Arc::new(FakeHandler(shared.clone())),
            "fake-pleo",
        )?;
        Ok(FakePleo { shared, server })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.local_addr())
    }

    pub fn api_key(&self) -> String {
        self.shared
            .lock()
            .api_keys
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// Adds the fixture's jobs (times relative to the fake's clock where the fixture says so).
    pub fn load_fixture(&self, f: &Fixture) -> anyhow::Result<Vec<String>> {
        {
            let mut w = self.shared.lock();
            if !f.api_keys.is_empty() {
                w.api_keys = f.api_keys.clone();
            }
            if let Some(e) = f.expires_in {
                w.expires_in_secs = e;
            }
        }
        f.jobs.iter().map(|j| self.add_job(j.clone())).collect()
    }

    /// Adds one job; returns its id.
    pub fn add_job(&self, spec: JobSpec) -> anyhow::Result<String> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        let id = match spec.id.clone() {
            Some(id) => id,
            None => w.new_id(1),
        };
        if w.jobs.iter().any(|j| j.id == id) {
            anyhow::bail!("job {id} already exists");
        }
        let created_at = match (&spec.created_at, spec.created_secs_ago) {
            (Some(s), _) => Millis::parse_rfc3339(s)
                .ok_or_else(|| anyhow::anyhow!("job {id}: bad createdAt {s:?}"))?,
            (None, Some(ago)) => now.plus_secs(-ago),
            (None, None) => now,
        };
        let last_updated_at = match (
            spec.extra.get("lastUpdatedAt").and_then(Value::as_str),
            spec.last_updated_secs_ago,
        ) {
            (Some(s), _) => Some(
                Millis::parse_rfc3339(s)
                    .ok_or_else(|| anyhow::anyhow!("job {id}: bad lastUpdatedAt {s:?}"))?,
            ),
            (None, Some(ago)) => Some(now.plus_secs(-ago)),
            (None, None) => Some(created_at),
        };
        let mut extra = spec.extra.clone();
        let take_str = |extra: &mut Map<String, Value>, k: &str| {
            extra.remove(k).and_then(|v| v.as_str().map(str::to_owned))
        };
        let started_at = take_str(&mut extra, "startedAt").and_then(|s| Millis::parse_rfc3339(&s));
        let created_by = take_str(&mut extra, "createdBy");
        let failure_reason = take_str(&mut extra, "failureReason");
        let failure_reason_type = take_str(&mut extra, "failureReasonType");
        let is_interactive = extra
            .remove("isInteractive")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let vbb = extra
            .remove("vendorBasedBookkeeping")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        for k in [
            "lastUpdatedAt",
            "completedAt",
            "expiredAt",
            "numberOfItems",
            "expiresIn",
            "companyId",
            "status",
        ] {
            extra.remove(k);
        }
        let status = if spec.status.is_empty() {
            "pending".to_owned()
        } else {
            spec.status.clone()
        };
        if ![
            "pending",
            "in_progress",
            "failed",
            "completed",
            "completed_with_errors",
        ]
        .contains(&status.as_str())
        {
            anyhow::bail!("job {id}: unknown status {status:?}");
        }
        let n_items = spec.items.unwrap_or(1);
        let mut job = FakeJob {
            id: id.clone(),
            company_id: spec.company_id.clone(),
            status: status.clone(),
            created_at,
            last_updated_at,
            started_at: if status == "in_progress" {
                started_at.or(last_updated_at)
            } else {
                started_at
            },
            completed_at: None,
            expired_at: None,
            expires_in_secs: spec.expires_in.unwrap_or(w.expires_in_secs),
            is_interactive,
            vendor_based_bookkeeping: vbb,
            created_by,
            failure_reason,
            failure_reason_type,
            extra,
            served_created_at: spec.served_created_at.clone(),
            items: Vec::new(),
            export_items: Vec::new(),
        };
        if let Some(recorded) = &spec.job_items {
            for v in recorded {
                let mut item: FakeItem = serde_json::from_value(v.clone())
                    .map_err(|e| anyhow::anyhow!("job {id}: bad job item: {e}"))?;
                item.export_job_id = id.clone();
                job.items.push(item);
            }
            job.export_items = spec.export_items.clone().unwrap_or_default();
        } else {
            for i in 0..n_items {
                let entry = format!("{:08x}-{:04x}-4000-8000-{:012x}", hash32(&id), 0xe17u16, i);
                job.items.push(new_item(&id, &entry));
                let with_account = i + spec.items_without_account < n_items;
                job.export_items
                    .push(export_item(&job, &entry, i, with_account));
            }
        }
        if spec.steal_on_verify {
            w.steal_on_get.insert(id.clone());
        }
        w.announce(&job);
        w.push_job(job);
        Ok(id)
    }

    /// A snapshot of one job as the fake holds it (expiry applied).
    pub fn job(&self, id: &str) -> Option<FakeJob> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.jobs.iter().find(|j| j.id == id).cloned()
    }

    /// Every job, in insertion order (expiry applied).
    pub fn jobs(&self) -> Vec<FakeJob> {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.jobs.clone()
    }

    /// Another integration claims the job now (as if it sent `started`).
    pub fn claim_as_other(&self, id: &str) -> bool {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        w.claim(id, Claimant::Other, now)
    }

    /// After `n` more API requests, drop every request unapplied (what Pleo sees when its
    /// client crashes mid-step); `None` ends it.
    pub fn black_out_after(&self, n: Option<u32>) {
        self.shared.lock().blackout_after = n;
    }

    /// Calls `hook` for every `started` that reaches the transition table, while its sender
    /// still waits for the answer (so the sender's state can be inspected at that moment).
    pub fn on_api_claim(&self, hook: ClaimHook) {
        *self
            .shared
            .claim_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Turns the token endpoint on (`POST /oauth/token`): `refresh_token` works once, and so
    /// does every refresh token it issues; access tokens live `access_ttl_secs`.
    pub fn enable_oauth(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
        access_ttl_secs: i64,
    ) {
        self.shared.lock().oauth = Some(FakeOAuth {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_tokens: [refresh_token.to_owned()].into(),
            ttl_secs: access_ttl_secs,
            ..FakeOAuth::default()
        });
    }

    /// Every call of the token endpoint.
    pub fn token_grants(&self) -> Vec<TokenGrant> {
        self.shared
            .lock()
            .oauth
            .as_ref()
            .map(|o| o.grants.clone())
            .unwrap_or_default()
    }

    /// Accepts `key` too, for `company` only: other companies' jobs answer 403.
    pub fn add_company_key(&self, key: &str, company: &str) {
        let mut w = self.shared.lock();
        w.api_keys.push(key.to_owned());
        w.key_companies.insert(key.to_owned(), company.to_owned());
    }

    /// Revokes every access token issued so far (the API answers 401 to them).
    pub fn revoke_access_tokens(&self) {
        if let Some(o) = self.shared.lock().oauth.as_mut() {
            o.access.clear();
        }
    }

    /// Issues a fresh refresh token, as an operator re-authorizing would get one.
    pub fn authorize_again(&self) -> Option<String> {
        let mut w = self.shared.lock();
        let o = w.oauth.as_mut()?;
        o.issued += 1;
        let t = format!("fake-refresh-{:04}", o.issued);
        o.refresh_tokens.insert(t.clone());
        Some(t)
    }

    /// Every claim the fake saw, in order.
    pub fn claims(&self) -> Vec<ClaimRecord> {
        self.shared.lock().claims.clone()
    }

    /// The holder of an `in_progress` job completes it (as its `completed` event would).
    pub fn complete(&self, id: &str) -> bool {
        let now = self.shared.clock.now();
        let mut w = self.shared.lock();
        w.expire_due(now);
        match w.job_mut(id) {
            Some(j) if j.status == "in_progress" => {
                j.status = "completed".into();
                j.completed_at = Some(now);
                j.last_updated_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Every webhook delivery attempt so far.
    pub fn webhook_log(&self) -> Vec<WebhookAttempt> {
        self.shared.lock().webhook_log.clone()
    }

    pub fn set_webhook_options(&self, o: WebhookOptions) {
        self.shared.lock().webhook_options = o;
    }

    /// The next `times` updates of this item are refused inside a 200 (`errors`).
    pub fn refuse_item_updates(&self, accounting_entry_id: &str, times: u32) {
        self.shared
            .lock()
            .refuse_updates
            .insert(accounting_entry_id.to_owned(), times);
    }

    /// Every item update the fake accepted a request for, in order: (entry, status).
    pub fn item_updates(&self, job_id: &str) -> Vec<(String, String)> {
        let path = format!("/v3/export-jobs/{job_id}/items");
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT" && r.path == path && r.status == 200)
            .flat_map(|r| serde_json::from_str::<Vec<Value>>(&r.body).unwrap_or_default())
            .map(|u| {
                (
                    u["accountingEntryId"].as_str().unwrap_or("").to_owned(),
                    u["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// After the next single-job GET of `id` is answered, another integration claims it.
    pub fn steal_after_next_get(&self, id: &str) {
        self.shared.lock().steal_on_get.insert(id.to_owned());
    }

    pub fn push_fault(&self, rule: FaultRule) {
        self.shared.lock().script.push_back(rule);
    }

    pub fn set_fault_rates(&self, rates: FaultRates) {
        self.shared.lock().rates = rates;
    }

    /// The requests received after the first `n`, in order.
    pub fn requests_since(&self, n: usize) -> Vec<LoggedRequest> {
        let w = self.shared.lock();
        w.requests.get(n..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Blocks until `pred` holds for the request log, or `timeout` passes; returns whether it
    /// held. Woken by each request, so tests wait for events instead of sleeping.
    pub fn wait_for_requests(
        &self,
        timeout: Duration,
        pred: impl Fn(&[LoggedRequest]) -> bool,
    ) -> bool {
        self.wait_until(timeout, |w| pred(&w.requests))
    }

    /// Blocks until `pred` holds for the webhook delivery log, or `timeout` passes.
    pub fn wait_for_webhooks(
        &self,
        timeout: Duration,
        pred: impl Fn(&[WebhookAttempt]) -> bool,
    ) -> bool {
        self.wait_until(timeout, |w| pred(&w.webhook_log))
    }

    fn wait_until(&self, timeout: Duration, holds: impl Fn(&World) -> bool) -> bool {
        let deadline = crate::clock::monotonic() + timeout;
        let mut w = self.shared.lock();
        loop {
            if holds(&w) {
                return true;
            }
            let left = deadline.saturating_duration_since(crate::clock::monotonic());
            if left.is_zero() {
                return false;
            }
            w = self
                .shared
                .logged
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// `started` events received for a job (whatever the answer).
    pub fn started_events_for(&self, job_id: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v3/export-job-events")
            .filter(|r| {
                serde_json::from_str::<Value>(&r.body)
                    .map(|v| v["event"] == "started" && v["jobId"] == job_id)
                    .unwrap_or(false)
            })
            .count()
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }
}

fn hash32(s: &str) -> u32 {
    // FNV-1a: stable item ids from a job id.
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn new_item(job_id: &str, entry: &str) -> FakeItem {
    FakeItem {
        export_job_id: job_id.to_owned(),
        accounting_entry_id: entry.to_owned(),
        status: "pending".into(),
        exported_at: None,
        external_id: None,
        external_url: None,
        failure_reason: None,
        failure_reason_type: None,
    }
}

/// The id of an export item's one line: a UUID derived from the entry's id.
fn line_id(entry: &str) -> String {
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        hash32(entry),
        0x11e,
        u64::from(hash32(&format!("{entry}/1")))
    )
}

fn export_item(job: &FakeJob, entry: &str, i: usize, with_account: bool) -> Value {
    let minor = 1_000 + (i as i64 * 137) % 90_000;
    let account = if with_account {
        json!({"id": "0000acc0-0000-4000-8000-000000004000", "code": "4000", "identifier": "4000", "name": "Office supplies"})
    } else {
        Value::Null
    };
    json!({
        "_links": {"self": {"href": format!("/v3/export-items/{entry}")}},
        "accountingEntryId": entry,
        "accountingEntryLines": [{
            "accountingEntryLineId": line_id(entry),
            "account": account,
            "lineAmount": {"inSupplierCurrency": {"currency": "DKK", "value": minor},
                           "inWalletCurrency": {"currency": "DKK", "value": minor}},
            "netAmount": {"inSupplierCurrency": {"currency": "DKK", "value": minor * 4 / 5},
                          "inWalletCurrency": {"currency": "DKK", "value": minor * 4 / 5}},
        }],
        "additionalInformation": {"reconciliationId": format!("rec-{}-{i}", &job.id)},
        "amount": {"inSupplierCurrency": {"currency": "DKK", "value": minor},
                   "inWalletCurrency": {"currency": "DKK", "value": minor}},
        "companyId": job.company_id,
        "date": job.created_at.to_rfc3339(),
        "type": "card_purchase",
        "note": null,
        "files": [],
    })
}

/// RFC 4648 base32 (alphabet A-Z2-7, `=` padding): Pleo's cursor alphabet.
fn base32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let n = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(A[((n >> (35 - i * 5)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase32(s: &str) -> Option<Vec<u8>> {
    let mut bits: u64 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        bits = (bits << 5) | u64::from(v);
        nbits += 5;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

fn cursor_for(id: &str) -> String {
    base32(id.as_bytes())
}

fn id_from_cursor(c: &str) -> Option<String> {
    unbase32(c).and_then(|b| String::from_utf8(b).ok())
}

/// A page of `items` (already filtered and in the order asked for), keyed by `key` for
/// cursors, as `page` (checked by [`Query::page`]) asks.
fn paginate<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> String,
    page: &Page,
    params: Map<String, Value>,
) -> Result<(Vec<T>, Value), Response> {
    let limit = page.limit;
    let position = |c: &str| -> Result<usize, Response> {
        let id =
            id_from_cursor(c).ok_or_else(|| error(400, "INVALID_CURSOR", "cursor is not valid"))?;
        items.iter().position(|i| key(i) == id).ok_or_else(|| {
            error(
                400,
                "INVALID_CURSOR",
                "cursor does not point into this listing",
            )
        })
    };
    let (start, end) = if let Some(a) = &page.after {
        let p = position(a)? + 1;
        (p, (p + limit).min(items.len()))
    } else if let Some(b) = &page.before {
        let p = position(b)?;
        (p.saturating_sub(limit), p)
    } else {
        let s = usize::try_from(page.offset.unwrap_or(0).max(0))
            .unwrap_or(usize::MAX)
            .min(items.len());
        (s, s.saturating_add(limit).min(items.len()))
    };
    let rows = items[start..end].to_vec();
    let mut current = json!({"parameters": params, "limit": limit});
    if let Some(a) = &page.after {
        current["after"] = json!(a);
    }
    if let Some(b) = &page.before {
        current["before"] = json!(b);
    }
    if let Some(o) = page.offset {
        current["offset"] = json!(o);
    }
    if !page.sort.is_empty() {
        current["sortingKeys"] = json!(page.sort.iter().map(|(k, _)| k).collect::<Vec<_>>());
        current["sortingOrder"] = json!(page.sort.iter().map(|(_, o)| o).collect::<Vec<_>>());
    }
    let mut pagination = json!({
        "currentRequestPagination": current,
        "hasNextPage": end < items.len(),
        "hasPreviousPage": start > 0,
        "total": items.len(),
    });
    if let (Some(f), Some(l)) = (rows.first(), rows.last()) {
        pagination["startCursor"] = json!(cursor_for(&key(f)));
        pagination["endCursor"] = json!(cursor_for(&key(l)));
    }
    Ok((rows, pagination))
}

/// A time as text that sorts as the time does (fixed-width milliseconds).
fn sortable_time(t: Option<Millis>) -> Option<String> {
    t.map(|t| format!("{:020}", t.0.saturating_add(i64::MAX / 2)))
}

struct FakeHandler(Arc<Shared>);

impl Handler for FakeHandler {
    fn handle(&self, req: Request) -> Response {
        let now = self.0.clock.now();
        let mut w = self.0.lock();
        let claims_before = w.claims.len();
        let dropped = match &mut w.blackout_after {
            Some(0) => !req.head.path.starts_with("/_fake/"),
            Some(n) if !req.head.path.starts_with("/_fake/") => {
                *n -= 1;
                false
            }
            _ => false,
        };
        let fault = if dropped {
            Some(Fault::HangUp)
        } else {
            choose_fault(&mut w, &req.head)
        };
        let mut resp = match &fault {
            _ if dropped => Response::empty(0),
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                error(429, "TOO_MANY_REQUESTS", "rate limit exceeded")
                    .with_header("Retry-After", &retry_after_secs.to_string())
            }
            Some(Fault::ServerError) => error(500, "INTERNAL_SERVER_ERROR", "injected failure"),
            Some(Fault::Refused { status }) => {
                error(*status, "INJECTED_REFUSAL", "injected refusal")
            }
            _ => {
                w.expire_due(now);
                route(&mut w, &req, now)
            }
        };
        // As any origin server with a clock: the time of the answer, on the fake's clock.
        resp = resp.with_header("Date", &now.to_http_date());
        match &fault {
            Some(Fault::Slow { millis }) => resp.delay = Some(Duration::from_millis(*millis)),
            Some(Fault::Truncate) => resp.truncate_at = Some(resp.body.len() / 2),
            Some(Fault::HangUp) => resp.hang_up = true,
            Some(Fault::GatewayTimeout) => {
                resp = error(504, "GATEWAY_TIMEOUT", "the gateway gave up waiting")
                    .with_header("Date", &now.to_http_date());
            }
            _ => {}
        }
        let seq = w.requests.len() as u64 + 1;
        w.requests.push(LoggedRequest {
            seq,
            at: now,
            method: req.head.method.clone(),
            path: req.head.path.clone(),
            query: req.head.query.clone(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            status: resp.status,
            fault: if dropped {
                Some("Blackout".into())
            } else {
                fault.map(|f| format!("{f:?}"))
            },
        });
        let new_claims: Vec<ClaimRecord> = w.claims[claims_before..]
            .iter()
            .filter(|c| c.by == Claimant::Api)
            .cloned()
            .collect();
        drop(w);
        if !new_claims.is_empty()
            && let Some(hook) = self
                .0
                .claim_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            for c in &new_claims {
                hook(c);
            }
        }
        self.0.logged.notify_all();
        resp
    }
}

fn choose_fault(w: &mut World, head: &Head) -> Option<Fault> {
    if head.path.starts_with("/_fake/") {
        return None;
    }
    let hit = w.script.iter().position(|r| {
        r.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&head.method))
            && r.path_prefix
                .as_deref()
                .is_none_or(|p| head.path.starts_with(p))
    });
    if let Some(i) = hit {
        if w.script[i].skip > 0 {
            w.script[i].skip -= 1;
        } else {
            return w.script.remove(i).map(|r| r.fault);
        }
    }
    let rates = w.rates.clone();
    let roll = w.rand();
    let mut edge = rates.too_many_requests;
    if roll < edge {
        return Some(Fault::TooManyRequests {
            retry_after_secs: rates.retry_after_secs,
        });
    }
    edge += rates.server_error;
    if roll < edge {
        return Some(Fault::ServerError);
    }
    edge += rates.slow;
    if roll < edge {
        return Some(Fault::Slow {
            millis: rates.slow_millis,
        });
    }
    edge += rates.truncate;
    if roll < edge {
        return Some(Fault::Truncate);
    }
    edge += rates.hang_up;
    if roll < edge {
        return Some(Fault::HangUp);
    }
    None
}

/// The API key of a Basic authorization header.
fn basic_user(head: &Head) -> Option<String> {
    use base64::Engine;
    let b64 = head.header("authorization")?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    Some(text.split_once(':')?.0.to_owned())
}

fn authorized(w: &World, head: &Head, now: Millis) -> bool {
    use base64::Engine;
    let Some(h) = head.header("authorization") else {
        return false;
    };
    if let (Some(t), Some(o)) = (h.strip_prefix("Bearer "), &w.oauth) {
        return o.access.get(t.trim()).is_some_and(|exp| *exp > now);
    }
    let Some(b64) = h.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(raw) else {
        return false;
    };
    let Some((user, pass)) = text.split_once(':') else {
        return false;
    };
    pass.is_empty() && w.api_keys.iter().any(|k| k == user)
}

fn route(w: &mut World, req: &Request, now: Millis) -> Response {
    let head = &req.head;
    let segs: Vec<&str> = head.path.trim_matches('/').split('/').collect();
    if segs.first() == Some(&"_fake") {
        return control(w, req, &segs);
    }
    if head.method == "POST" && segs == ["oauth", "token"] {
        return token_endpoint(w, &req.body, now);
    }
    if !authorized(w, head, now) {
        return error(401, "UNAUTHORIZED", "missing or invalid credentials");
    }
    let q = head.query_pairs();
    if let Some(allowed) = basic_user(head).and_then(|k| w.key_companies.get(&k).cloned()) {
        let job_company = |id: &str| {
            w.jobs
                .iter()
                .find(|j| j.id == id)
                .map(|j| j.company_id.clone())
        };
        let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let touched = match segs.as_slice() {
            ["v3", "export-jobs"] => param("company_id"),
            ["v3", "export-jobs", id, ..] => job_company(id),
            ["v3", "export-items"] => param("job_id").and_then(|j| job_company(&j)),
            ["v3", "export-job-events"] => serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|v| v["jobId"].as_str().and_then(job_company)),
            _ => None,
        };
        if touched.is_some_and(|c| c != allowed) {
            return error(403, "FORBIDDEN", "this API key belongs to another company");
        }
    }
    match (head.method.as_str(), segs.as_slice()) {
        ("GET", ["v3", "export-jobs"]) => list_jobs(w, &q),
        ("POST", ["v3", "export-jobs"]) => create_job(w, &req.body, now),
        ("GET", ["v3", "export-jobs", id]) => get_job(w, id, now),
        ("POST", ["v3", "export-job-events"]) => job_event(w, &req.body, now),
        ("GET", ["v3", "export-jobs", id, "items"]) => list_items(w, id, &q),
        ("PUT", ["v3", "export-jobs", id, "items"]) => put_items(w, id, &req.body, now),
        ("GET", ["v3", "export-items"]) => list_export_items(w, &q),
        ("POST", ["v1", "subscriptions"]) => create_subscription(w, &req.body, now),
        ("GET" | "PUT" | "DELETE", ["v1", "subscriptions", id])
        | ("GET", ["v1", "subscriptions", id, "secret"])
            if !rules::is_uuid(id) =>
        {
            error(400, "INVALID_PARAMETER", "id must be a UUID")
        }
        ("GET", ["v1", "subscriptions"]) => list_subscriptions(w, &q),
        ("GET", ["v1", "subscriptions", id]) => {
            match w.subscriptions.iter().find(|s| s.id == *id) {
                Some(sub) => Response::json(200, &json!({"data": sub.to_json()})),
                None => subscription_not_found(),
            }
        }
        ("PUT", ["v1", "subscriptions", id]) => update_subscription(w, id, &req.body, now),
        ("DELETE", ["v1", "subscriptions", id]) => {
            let before = w.subscriptions.len();
            w.subscriptions.retain(|s| s.id != *id);
            if w.subscriptions.len() < before {
                Response::empty(204)
            } else {
                subscription_not_found()
            }
        }
        (_, ["v1", "subscriptions"]) => not_allowed("GET, POST"),
        (_, ["v1", "subscriptions", _]) => not_allowed("GET, PUT, DELETE"),
        ("GET", ["v1", "subscriptions", id, "secret"]) => {
            match w.subscriptions.iter().find(|s| s.id == *id) {
                Some(sub) => Response::json(200, &json!({"data": {"secretKey": sub.secret}})),
                None => error(
                    404,
                    "SUBSCRIPTION_NOT_FOUND",
                    "The subscription secret record could not be found.",
                ),
            }
        }
        (_, ["v1", "subscriptions", _, "secret"]) => not_allowed("GET"),
        (_, ["v3", "export-jobs"]) => not_allowed("GET, POST"),
        (_, ["v3", "export-jobs", _]) => not_allowed("GET"),
        (_, ["v3", "export-job-events"]) => not_allowed("POST"),
        (_, ["v3", "export-jobs", _, "items"]) => not_allowed("GET, PUT"),
        (_, ["v3", "export-items"]) => not_allowed("GET"),
        _ => error(404, "NOT_FOUND", "no such endpoint"),
    }
}

/// 405 with the methods the path serves (RFC 9110 requires `Allow`).
fn not_allowed(allow: &str) -> Response {
    error(405, "METHOD_NOT_ALLOWED", "method not allowed").with_header("Allow", allow)
}

fn control(w: &mut World, req: &Request, segs: &[&str]) -> Response {
    match (req.head.method.as_str(), segs) {
        ("GET", ["_fake", "requests"]) => Response::json(200, &json!(w.requests)),
        ("GET", ["_fake", "webhooks"]) => Response::json(200, &json!(w.webhook_log)),
        ("POST", ["_fake", "webhook-options"]) => {
            match serde_json::from_slice::<WebhookOptions>(&req.body) {
                Ok(o) => {
                    w.webhook_options = o;
                    Response::empty(204)
                }
                Err(e) => error(400, "INVALID_BODY", &e.to_string()),
            }
        }
        ("POST", ["_fake", "fault-rates"]) => match serde_json::from_slice::<FaultRates>(&req.body)
        {
            Ok(r) => {
                w.rates = r;
                Response::empty(204)
            }
            Err(e) => error(400, "INVALID_BODY", &e.to_string()),
        },
        ("POST", ["_fake", "faults"]) => match serde_json::from_slice::<FaultRule>(&req.body) {
            Ok(rule) => {
                w.script.push_back(rule);
                Response::empty(204)
            }
            Err(e) => error(400, "INVALID_BODY", &e.to_string()),
        },
        _ => error(404, "NOT_FOUND", "no such fake control endpoint"),
    }
}

fn subscription_not_found() -> Response {
    error(
        404,
        "SUBSCRIPTION_NOT_FOUND",
        "The subscription record could not be found.",
    )
}

/// A `SubscriptionRequest` as Pleo's OpenAPI file has it: `endpointUrl` (string) and
/// `eventTypes` (unique strings) required, `status` ACTIVE (default) or INACTIVE,
/// `customHeaders` an object of strings, `endpointAuth` an object with `type` NONE or BASIC.
/// Nothing more: a URL the fake cannot deliver to is taken, and its deliveries fail.
/// Returns (url, event types, status) or a 400.
fn subscription_request(body: &[u8]) -> Result<(String, Vec<String>, String), Response> {
    let bad = |m: &str| error(400, "INVALID_BODY", m);
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(&format!("body is not JSON: {e}")))?;
    let url = match v.get("endpointUrl") {
        Some(Value::String(u)) => u.clone(),
        _ => return Err(bad("endpointUrl is required and must be a string")),
    };
    let mut types: Vec<String> = Vec::new();
    match v.get("eventTypes") {
        Some(Value::Array(a)) => {
            for t in a {
                match t {
                    Value::String(t) if types.contains(t) => {
                        return Err(bad("eventTypes must not repeat a type (uniqueItems)"));
                    }
                    Value::String(t) => types.push(t.clone()),
                    _ => return Err(bad("eventTypes must hold strings")),
                }
            }
        }
        _ => {
            return Err(bad(
                "eventTypes is required and must be an array of strings",
            ));
        }
    }
    // Nothing here is nullable in the file: null is a wrong type, not an absent field.
    let status = match v.get("status") {
        None => "ACTIVE".to_owned(),
        Some(Value::String(s)) if s == "ACTIVE" || s == "INACTIVE" => s.clone(),
        _ => return Err(bad("status must be ACTIVE or INACTIVE")),
    };
    match v.get("customHeaders") {
        None => {}
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {}
        _ => return Err(bad("customHeaders must be an object of strings")),
    }
    let credentials_ok = |c: &Value| {
        c.as_object().is_some_and(|c| {
            ["password", "token", "username"]
                .iter()
                .all(|k| c.get(*k).is_none_or(Value::is_string))
        })
    };
    match v.get("endpointAuth") {
        None => {}
        Some(Value::Object(m))
            if m.get("type").is_none_or(|t| t == "NONE" || t == "BASIC")
                && m.get("credentials").is_none_or(credentials_ok) => {}
        _ => {
            return Err(bad(
                "endpointAuth must be an object with type NONE or BASIC and credentials of strings",
            ));
        }
    }
    Ok((url, types, status))
}

fn create_subscription(w: &mut World, body: &[u8], now: Millis) -> Response {
    let (url, event_types, status) = match subscription_request(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    use base64::Engine;
    let mut key = [0u8; 24];
    for chunk in key.chunks_mut(8) {
        let r = (w.rand() * u64::MAX as f64) as u64;
        chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
    }
    let sub = Subscription {
        id: w.new_id(3),
        endpoint_url: url,
        event_types,
        status,
        secret: format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
        created_at: now,
        updated_at: now,
    };
    let out = json!({"data": sub.to_json()});
    w.subscriptions.push(sub);
    Response::json(200, &out)
}

fn update_subscription(w: &mut World, id: &str, body: &[u8], now: Millis) -> Response {
    let (url, event_types, status) = match subscription_request(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(sub) = w.subscriptions.iter_mut().find(|s| s.id == id) else {
        return subscription_not_found();
    };
    sub.endpoint_url = url;
    sub.event_types = event_types;
    sub.status = status;
    sub.updated_at = now;
    Response::json(200, &json!({"data": sub.to_json()}))
}

/// `GET /v1/subscriptions`: filtered by `status` (any text: one no subscription has lists
/// none) and `event_types` (repeated, unique), paginated as every listing.
fn list_subscriptions(w: &World, q: &[(String, String)]) -> Response {
    let q = Query(q);
    let checked = (|| {
        let status = q.single("status")?;
        let types: Vec<&str> =
            q.0.iter()
                .filter(|(k, _)| k == "event_types")
                .map(|(_, v)| v.as_str())
                .collect();
        if types
            .iter()
            .enumerate()
            .any(|(i, t)| types[..i].contains(t))
        {
            return Err(error(
                400,
                "INVALID_PARAMETER",
                "event_types must not repeat a type",
            ));
        }
        Ok((status, types, q.page(SUBSCRIPTION_SORT_KEYS, None)?))
    })();
    let (status, types, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut subs: Vec<&Subscription> = w
        .subscriptions
        .iter()
        .filter(|s| status.is_none_or(|st| s.status == st))
        .filter(|s| types.is_empty() || s.event_types.iter().any(|t| types.contains(&t.as_str())))
        .collect();
    page.sort(&mut subs, |s, key| match key {
        "createdAt" => sortable_time(Some(s.created_at)),
        _ => Some(s.id.clone()),
    });
    let mut params = Map::new();
    if let Some(st) = status {
        params.insert("status".into(), json!([st]));
    }
    if !types.is_empty() {
        params.insert("event_types".into(), json!(types));
    }
    match paginate(&subs, |s| s.id.clone(), &page, params) {
        Ok((rows, pagination)) => Response::json(
            200,
            &json!({"data": rows.iter().map(|s| s.to_json()).collect::<Vec<_>>(), "pagination": pagination}),
        ),
        Err(resp) => resp,
    }
}

/// The fake's webhook sender: signs with the fake's clock, retries failures with a short
/// real-time backoff (the fake is a test double; a real sender retries for a day).
fn deliver_webhooks(
    outbox: crossbeam_channel::Receiver<Outgoing>,
    shared: std::sync::Weak<Shared>,
) {
    let agent = crate::pleo::net::agent(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    );
    for out in outbox {
        if out.options.delay_millis > 0 {
            std::thread::sleep(Duration::from_millis(out.options.delay_millis));
        }
        let copies = if out.options.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            for attempt in 0..out.options.attempts_max.max(1) {
                let Some(world) = shared.upgrade() else {
                    return;
                };
                let ts = world.clock.now().0.div_euclid(1000);
                drop(world);
                let key = crate::edge::webhook::Secrets::parse(&out.secret).ok();
                let sig = key
                    .as_ref()
                    .map(|k| {
                        crate::edge::webhook::sign_with(k, &out.webhook_id, ts, out.body.as_bytes())
                    })
                    .unwrap_or_default();
                let p = if out.options.svix_headers {
                    "svix"
                } else {
                    "webhook"
                };
                let status = agent
                    .post(&out.url)
                    .header(format!("{p}-id"), &out.webhook_id)
                    .header(format!("{p}-timestamp"), ts.to_string())
                    .header(format!("{p}-signature"), &sig)
                    .header("Content-Type", "application/json")
                    .send(out.body.as_bytes())
                    .ok()
                    .map(|r| r.status().as_u16());
                if let Some(world) = shared.upgrade() {
                    world.lock().webhook_log.push(WebhookAttempt {
                        webhook_id: out.webhook_id.clone(),
                        url: out.url.clone(),
                        job_id: out.job_id.clone(),
                        status,
                    });
                    world.logged.notify_all();
                }
                if status.is_some_and(|s| (200..300).contains(&s)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50 << attempt.min(6)));
            }
        }
    }
}

fn list_jobs(w: &World, q: &[(String, String)]) -> Response {
    let q = Query(q);
    let checked = (|| {
        let company = q.id("company_id", &|c| w.by_company.contains_key(c))?;
        let statuses = rules::job_statuses(&q)?;
        let page = q.page(JOB_SORT_KEYS, Some(0))?;
        Ok::<_, Response>((company, statuses, page))
    })();
    let (company, statuses, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let candidates: Box<dyn Iterator<Item = &FakeJob>> = match company {
        Some(c) => Box::new(
            w.by_company
                .get(c)
                .into_iter()
                .flatten()
                .map(|i| &w.jobs[*i]),
        ),
        None => Box::new(w.jobs.iter()),
    };
    let mut matching: Vec<&FakeJob> = candidates
        .filter(|j| statuses.is_empty() || statuses.contains(&j.status.as_str()))
        .collect();
    page.sort(&mut matching, |j, key| match key {
        "createdAt" => sortable_time(Some(j.created_at)),
        "lastUpdatedAt" => sortable_time(j.last_updated_at),
        _ => Some(j.id.clone()),
    });
    let mut params = Map::new();
    if let Some(c) = company {
        params.insert("company_id".into(), json!([c]));
    }
    if !statuses.is_empty() {
        params.insert("statuses".into(), json!(statuses));
    }
    match paginate(&matching, |j| j.id.clone(), &page, params) {
        Ok((rows, pagination)) => Response::json(
            200,
            &json!({"data": rows.iter().map(|j| j.to_json()).collect::<Vec<_>>(), "pagination": pagination}),
        ),
        Err(r) => r,
    }
}

/// The keys job listings sort by (the files name none; these are `ExportJobV3` fields).
const JOB_SORT_KEYS: &[&str] = &["createdAt", "lastUpdatedAt", "id"];
/// The keys job item listings sort by (`ExportJobItemV3` fields).
const ITEM_SORT_KEYS: &[&str] = &["accountingEntryId", "status"];
/// The keys export item listings sort by (`ExportItemV3` fields).
const EXPORT_ITEM_SORT_KEYS: &[&str] = &["accountingEntryId", "date"];
/// The keys subscription listings sort by (`SubscriptionModel` fields).
const SUBSCRIPTION_SORT_KEYS: &[&str] = &["createdAt", "id"];

/// Whether `id` names a job the world holds (fixtures may use readable ids).
fn known_job(w: &World, id: &str) -> bool {
    w.jobs.iter().any(|j| j.id == id)
}

fn get_job(w: &mut World, id: &str, now: Millis) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let Some(j) = w.jobs.iter().find(|j| j.id == id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let resp = Response::json(200, &json!({"data": j.to_json()}));
    if w.steal_on_get.remove(id) {
        w.claim(id, Claimant::OtherAfterGet, now);
    }
    resp
}

fn create_job(w: &mut World, body: &[u8], now: Millis) -> Response {
    let v = match rules::json_body(body).and_then(|v| {
        rules::check_object(&v, rules::CREATE_EXPORT_JOB, "body", &|c| {
            w.by_company.contains_key(c)
        })?;
        Ok(v)
    }) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let company = v["companyId"].as_str().unwrap_or_default().to_owned();
    let entries: Vec<String> = v["accountingEntryIds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    if w.jobs
        .iter()
        .any(|j| j.company_id == company && j.status == "in_progress")
    {
        return error(
            409,
            "EXPORT_ALREADY_IN_PROGRESS",
            "Export Job already in progress for this company.",
        );
    }
    let id = w.new_id(2);
    let mut job = FakeJob {
        id: id.clone(),
        company_id: company,
        status: "pending".into(),
        created_at: now,
        last_updated_at: Some(now),
        started_at: None,
        completed_at: None,
        expired_at: None,
        expires_in_secs: w.expires_in_secs,
        is_interactive: v
            .get("isInteractive")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        vendor_based_bookkeeping: v["options"]["vendorBasedBookkeeping"]
            .as_bool()
            .unwrap_or(false),
        created_by: v
            .get("employeeId")
            .and_then(Value::as_str)
            .map(str::to_owned),
        failure_reason: None,
        failure_reason_type: None,
        extra: Map::new(),
        served_created_at: None,
        items: Vec::new(),
        export_items: Vec::new(),
    };
    for (i, e) in entries.iter().enumerate() {
        job.items.push(new_item(&id, e));
        job.export_items.push(export_item(&job, e, i, true));
    }
    let out = json!({"data": job.to_json()});
    w.announce(&job);
    w.push_job(job);
    Response::json(201, &out)
}

fn job_event(w: &mut World, body: &[u8], now: Millis) -> Response {
    let v = match rules::json_body(body).and_then(|v| {
        rules::check_object(&v, rules::CREATE_EXPORT_JOB_EVENT, "body", &|j| {
            known_job(w, j)
        })?;
        Ok(v)
    }) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let event = v["event"].as_str().unwrap_or_default();
    let job_id = v["jobId"].as_str().unwrap_or_default();
    if event == "started" {
        return if w.claim(job_id, Claimant::Api, now) {
            Response::empty(202)
        } else if w.jobs.iter().any(|j| j.id == job_id) {
            error(
                422,
                "INVALID_EXPORT_JOB_STATUS_CHANGE",
                "Export Job status change failed",
            )
        } else {
            error(404, "EXPORT_NOT_FOUND", "Export job not found.")
        };
    }
    let Some(j) = w.job_mut(job_id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let to = match (j.status.as_str(), event) {
        ("pending", "started") => "in_progress",
        ("pending", "failed") => "failed",
        ("in_progress", "completed") => "completed",
        ("in_progress", "completed_with_errors") => "completed_with_errors",
        ("in_progress", "failed") => "failed",
        _ => {
            return error(
                422,
                "INVALID_EXPORT_JOB_STATUS_CHANGE",
                "Export Job status change failed",
            );
        }
    };
    j.status = to.into();
    j.last_updated_at = Some(now);
    if to == "in_progress" {
        j.started_at = Some(now);
    } else {
        j.completed_at = Some(now);
    }
    if to == "failed" {
        j.failure_reason = v
            .get("failureReason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        j.failure_reason_type = v
            .get("failureReasonType")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    Response::empty(202)
}

fn list_items(w: &World, id: &str, q: &[(String, String)]) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let q = Query(q);
    let checked =
        (|| Ok::<_, Response>((rules::item_status(&q)?, q.page(ITEM_SORT_KEYS, Some(0))?)))();
    let (status, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(j) = w.jobs.iter().find(|j| j.id == id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    let mut items: Vec<&FakeItem> = j
        .items
        .iter()
        .filter(|i| status.is_none_or(|s| i.status == s))
        .collect();
    page.sort(&mut items, |i, key| match key {
        "status" => Some(i.status.clone()),
        _ => Some(i.accounting_entry_id.clone()),
    });
    let mut params = Map::new();
    if let Some(s) = status {
        params.insert("status".into(), json!([s]));
    }
    match paginate(&items, |i| i.accounting_entry_id.clone(), &page, params) {
        Ok((rows, pagination)) => {
            Response::json(200, &json!({"data": rows, "pagination": pagination}))
        }
        Err(r) => r,
    }
}

fn put_items(w: &mut World, id: &str, body: &[u8], now: Millis) -> Response {
    if !rules::is_uuid(id) && !known_job(w, id) {
        return error(400, "INVALID_PARAMETER", "jobId must be a UUID");
    }
    let known_entry = |e: &str| {
        w.jobs
            .iter()
            .find(|j| j.id == id)
            .is_some_and(|j| j.items.iter().any(|i| i.accounting_entry_id == e))
    };
    let updates: Vec<Value> = match rules::json_body(body).and_then(|v| {
        rules::check_item_updates(&v, &known_entry)?;
        Ok(v)
    }) {
        Ok(Value::Array(a)) => a,
        Ok(_) => return error(400, "INVALID_BODY", "body must be a JSON array"),
        Err(r) => return r,
    };
    let mut refuse = std::mem::take(&mut w.refuse_updates);
    let result = put_items_inner(w, id, &updates, now, &mut refuse);
    w.refuse_updates = refuse;
    result
}

fn put_items_inner(
    w: &mut World,
    id: &str,
    updates: &[Value],
    now: Millis,
    refuse: &mut std::collections::HashMap<String, u32>,
) -> Response {
    let Some(j) = w.job_mut(id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    if updates.len() > 100 {
        return error(
            413,
            "EXPORT_JOB_ITEMS_UPDATE_LIMIT",
            "Number of items to update is more than 100.",
        );
    }
    if !j.is_open() {
        return error(
            422,
            "EXPORT_JOB_STATUS_UNPROCESSABLE",
            "Export job is finished.",
        );
    }
    let mut data = Vec::new();
    let mut errors = Vec::new();
    for u in updates {
        let entry = u
            .get("accountingEntryId")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(left) = refuse.get_mut(entry).filter(|n| **n > 0) {
            *left -= 1;
            errors.push(json!({"accountingEntryId": entry, "type": "EXPORT_ENTRY_STATUS_UPDATE_FAILED", "message": "injected failure"}));
            continue;
        }
        // The body was checked against UpdateExportJobItemV3 before this.
        let status = u.get("status").and_then(Value::as_str).unwrap_or("");
        let Some(item) = j.items.iter_mut().find(|i| i.accounting_entry_id == entry) else {
            errors.push(json!({"accountingEntryId": entry, "type": "ACCOUNTING_ENTRY_DOES_NOT_EXIST", "message": "Accounting entry does not exist."}));
            continue;
        };
        let s = |k: &str| u.get(k).and_then(Value::as_str).map(str::to_owned);
        item.status = status.into();
        item.exported_at = s("exportedAt").or(item.exported_at.take());
        item.external_id = s("externalId").or(item.external_id.take());
        item.external_url = s("externalUrl").or(item.external_url.take());
        item.failure_reason = s("failureReason");
        item.failure_reason_type = s("failureReasonType");
        data.push(json!(item));
    }
    j.last_updated_at = Some(now);
    Response::json(200, &json!({"data": data, "errors": errors}))
}

fn list_export_items(w: &World, q: &[(String, String)]) -> Response {
    let q = Query(q);
    let checked = (|| {
        let job = q.id("job_id", &|j| known_job(w, j))?;
        Ok::<_, Response>((job, q.page(EXPORT_ITEM_SORT_KEYS, Some(0))?))
    })();
    let (job_id, page) = match checked {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The files make job_id optional; export items only exist within a job, so without one
    // there is nothing to list (a decision: README.md, "Contract decisions").
    let Some(job_id) = job_id else {
        return error(400, "INVALID_PARAMETER", "job_id is required");
    };
    let Some(j) = w.jobs.iter().find(|j| j.id == job_id) else {
        return error(404, "EXPORT_NOT_FOUND", "Export job not found.");
    };
    if !j.is_open() {
        return error(
            422,
            "EXPORT_JOB_STATUS_UNPROCESSABLE",
            "Export Job is finished and can no longer be processed.",
        );
    }
    let mut items: Vec<&Value> = j.export_items.iter().collect();
    page.sort(&mut items, |v, key| v[key].as_str().map(str::to_owned));
    let mut params = Map::new();
    params.insert("job_id".into(), json!([job_id]));
    let key = |v: &&Value| v["accountingEntryId"].as_str().unwrap_or("").to_owned();
    match paginate(&items, key, &page, params) {
        Ok((rows, pagination)) => {
            Response::json(200, &json!({"data": rows, "pagination": pagination}))
        }
        Err(r) => r,
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
