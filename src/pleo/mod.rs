//! The Pleo Export API client: the only module that speaks HTTP to Pleo (its JSON is read
//! into the wire model, [`crate::wire`], re-exported here).
//!
//! Invariants: every request has a connect and an overall timeout; 429, 5xx and transport
//! errors are retried with capped exponential backoff and full jitter, honouring
//! `Retry-After`, and nothing else is retried; Pleo's `{type, message}` error body is kept in
//! the error; the credential never appears in a log line or an error message.

pub mod net;
pub mod oauth;

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::clock::{Millis, SharedClock};

pub use crate::pleo::net::check_base_url;
pub use crate::wire::{
    ITEM_FAILURE_TYPES, ITEM_STATUSES, JOB_EVENT_TYPES, JOB_EVENTS, JOB_FAILURE_TYPES,
    JOB_STATUSES, Job, JobEvent, JobEventKind, PleoError, Secret, is_job_event, refuses, status,
};

/// How requests are retried. Every bound carries its unit.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts_max: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// A `Retry-After` longer than this is cut to it.
    pub retry_after_cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 5,
            backoff_base_ms: 500,
            backoff_cap_ms: 30_000,
            retry_after_cap_ms: 120_000,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Auth {
    /// HTTP Basic with the key as user name and an empty password.
    ApiKey(Secret),
    /// A fixed OAuth 2.0 access token.
    Bearer(Secret),
    /// OAuth 2.0 with refresh and rotation.
    OAuth(std::sync::Arc<crate::pleo::oauth::TokenSource>),
}

impl Auth {
    fn header(&self) -> Result<String, PleoError> {
        use base64::Engine;
        Ok(match self {
            Auth::ApiKey(k) => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{}:", k.expose()))
            ),
            Auth::Bearer(t) => format!("Bearer {}", t.expose()),
            Auth::OAuth(src) => format!("Bearer {}", src.bearer()?.expose()),
        })
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub base_url: String,
    pub auth: Auth,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    /// Jobs per listing page (ours: 100).
    pub page_size: u32,
    /// Seed for backoff jitter; fixed in replays so they are deterministic.
    pub jitter_seed: u64,
    /// At most this many requests per second (a token bucket holding one second's worth);
    /// `None`: unpaced.
    pub requests_per_sec_max: Option<f64>,
}

impl ClientConfig {
    pub fn new(base_url: &str, auth: Auth) -> ClientConfig {
        ClientConfig {
            base_url: base_url.trim_end_matches('/').to_owned(),
            auth,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            page_size: 100,
            jitter_seed: 0x9E37_79B9_7F4A_7C15,
            requests_per_sec_max: None,
        }
    }
}

/// What `PUT /v3/export-jobs/{id}/items` answered: the items it updated and per-item errors.
#[derive(Debug, Default, Clone)]
pub struct ItemUpdateOutcome {
    pub updated: Vec<Value>,
    pub errors: Vec<Value>,
}

/// One page of a listing, and how many pages were read.
#[derive(Debug, Default)]
pub struct Listing {
    pub jobs: Vec<Job>,
    pub pages: u32,
    /// Entries that are not a readable job (the id if it has one, and why): skipped, so one
    /// bad entry never hides the company's other jobs.
    pub rejected: Vec<(Option<String>, String)>,
}

/// The clients of a service, one per credential: companies with credentials of their own use
/// theirs, all others the default.
#[derive(Debug)]
pub struct Clients {
    default: std::sync::Arc<PleoClient>,
    by_company: std::collections::HashMap<String, std::sync::Arc<PleoClient>>,
}

impl Clients {
    pub fn new(
        default: std::sync::Arc<PleoClient>,
        by_company: std::collections::HashMap<String, std::sync::Arc<PleoClient>>,
    ) -> std::sync::Arc<Clients> {
        std::sync::Arc::new(Clients {
            default,
            by_company,
        })
    }

    /// One client for every company.
    pub fn single(client: std::sync::Arc<PleoClient>) -> std::sync::Arc<Clients> {
        Clients::new(client, Default::default())
    }

    /// The client holding `company`'s credential (`None`: the default).
    pub fn for_company(&self, company: Option<&str>) -> &PleoClient {
        company
            .and_then(|c| self.by_company.get(c))
            .unwrap_or(&self.default)
    }
}

/// What [`PleoClient::ensure_subscription`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionChange {
    Created,
    /// One for the URL existed, active, with every event type: used as it is.
    Reused,
    /// One for the URL existed: made ACTIVE and given the missing event types.
    Updated,
}

impl SubscriptionChange {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionChange::Created => "created",
            SubscriptionChange::Reused => "reused",
            SubscriptionChange::Updated => "updated",
        }
    }
}

fn text_field(v: &Value, k: &str) -> Result<String, PleoError> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| PleoError::Decode(format!("subscription lacks string field `{k}`")))
}

/// Which failures a request may be sent again after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// 429, 5xx and transport errors: for reads and requests that are safe to repeat.
    Transient,
    /// Only after an answer that says the request was not applied ([`refuses`]). A lost
    /// answer (timeout, reset, cut-off body) or a 504 leaves the outcome unknown, and
    /// repeating would act twice.
    UnappliedOnly,
}

pub struct PleoClient {
    agent: ureq::Agent,
    cfg: ClientConfig,
    clock: SharedClock,
    rng: Mutex<u64>,
    /// Token bucket for `requests_per_sec_max`: (tokens, when last refilled).
    bucket: Mutex<(f64, Millis)>,
    progress: Option<std::sync::Arc<crate::health::Progress>>,
    metrics: Option<std::sync::Arc<crate::health::Metrics>>,
    /// Pleo's clock minus ours, in ms, from the `Date` of Pleo's last answer (`i64::MIN`:
    /// no answer with a date yet).
    pleo_offset_ms: std::sync::atomic::AtomicI64,
}

impl fmt::Debug for PleoClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PleoClient")
            .field("base_url", &self.cfg.base_url)
            .finish_non_exhaustive()
    }
}

struct Reply {
    status: u16,
    body: String,
}

fn cfg_rate_burst(cfg: &ClientConfig) -> f64 {
    cfg.requests_per_sec_max.unwrap_or(1.0).max(1.0)
}

impl PleoClient {
    pub fn new(cfg: ClientConfig, clock: SharedClock) -> Result<PleoClient, PleoError> {
        check_base_url(&cfg.base_url).map_err(PleoError::Config)?;
        let agent = crate::pleo::net::agent(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(cfg.connect_timeout))
                .timeout_global(Some(cfg.request_timeout))
                .max_redirects(0)
                .user_agent(concat!("jobmirror/", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let seed = cfg.jitter_seed | 1;
        let bucket = Mutex::new((cfg_rate_burst(&cfg), clock.now()));
        Ok(PleoClient {
            agent,
            cfg,
            clock,
            rng: Mutex::new(seed),
            bucket,
            progress: None,
            metrics: None,
            pleo_offset_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        })
    }

    /// Now on Pleo's clock, as its last answer's `Date` showed it (second precision, so within
    /// about a second), or our clock's now before any such answer. Deadlines are Pleo's
    /// `lastUpdatedAt + expiresIn`: compared with this, a host clock that is off never makes
    /// jobmirror give up on a job, nor claim one it thinks has time when it has none.
    pub fn pleo_now(&self) -> Millis {
        let now = self.clock.now();
        match self
            .pleo_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            i64::MIN => now,
            off => Millis(now.0.saturating_add(off)),
        }
    }

    /// Beats `progress` before each attempt and counts each answer in `metrics`.
    pub fn with_health(
        mut self,
        progress: std::sync::Arc<crate::health::Progress>,
        metrics: std::sync::Arc<crate::health::Metrics>,
    ) -> PleoClient {
        self.progress = Some(progress);
        self.metrics = Some(metrics);
        self
    }

    pub fn base_url(&self) -> &str {
        &self.cfg.base_url
    }

    /// Lists a company's jobs in the given statuses, following `after` cursors to the last page.
    pub fn list_jobs(&self, company_id: &str, statuses: &[&str]) -> Result<Listing, PleoError> {
        let mut query: Vec<(&str, String)> = vec![("company_id", company_id.to_owned())];
        for s in statuses {
            query.push(("statuses", (*s).to_owned()));
        }
        let (rows, pages) = self.all_pages("/v3/export-jobs", query, "job listing")?;
        let mut jobs = Vec::with_capacity(rows.len());
        let mut rejected = Vec::new();
        for row in rows {
            let id = row.get("id").and_then(Value::as_str).map(str::to_owned);
            match Job::from_value(row) {
                Ok(j) => jobs.push(j),
                Err(e) => rejected.push((id, e.to_string())),
            }
        }
        Ok(Listing {
            jobs,
            pages,
            rejected,
        })
    }

    /// Every job item of a job (the control layer), all pages.
    pub fn list_job_items(&self, job_id: &str) -> Result<Vec<Value>, PleoError> {
        let path = format!("/v3/export-jobs/{}/items", path_segment(job_id)?);
        Ok(self.all_pages(&path, Vec::new(), "job item listing")?.0)
    }

    /// Every export item of a job (the data layer), all pages.
    pub fn list_export_items(&self, job_id: &str) -> Result<Vec<Value>, PleoError> {
        let query = vec![("job_id", job_id.to_owned())];
        Ok(self
            .all_pages("/v3/export-items", query, "export item listing")?
            .0)
    }

    /// Reports item results (at most 100). A 200 may still carry per-item `errors`.
    pub fn put_items(
        &self,
        job_id: &str,
        updates: &[Value],
    ) -> Result<ItemUpdateOutcome, PleoError> {
        if updates.len() > 100 {
            return Err(PleoError::Config(format!(
                "{} item updates in one request; the limit is 100",
                updates.len()
            )));
        }
        let path = format!("/v3/export-jobs/{}/items", path_segment(job_id)?);
        let body = serde_json::to_vec(updates).map_err(|e| PleoError::Decode(e.to_string()))?;
        // Reporting an item twice is a fault: after an answer that leaves the outcome unknown
        // the caller re-reads the job items instead of sending the batch again.
        let v = ok_json(self.send_with("PUT", &path, &[], Some(&body), Retry::UnappliedOnly)?)?;
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        Ok(ItemUpdateOutcome {
            updated: list("data"),
            errors: list("errors"),
        })
    }

    /// GETs `path` page by page (`limit`, then `after` cursors) until the last page.
    fn all_pages(
        &self,
        path: &str,
        base: Vec<(&str, String)>,
        what: &str,
    ) -> Result<(Vec<Value>, u32), PleoError> {
        // A bound on pages so a server that never says "last page" cannot loop us forever.
        const PAGES_MAX: u32 = 100_000;
        let mut rows = Vec::new();
        let mut pages = 0u32;
        let mut after: Option<String> = None;
        loop {
            let mut query = base.clone();
            query.push(("limit", self.cfg.page_size.to_string()));
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page = ok_json(self.send("GET", path, &query, None)?)?;
            pages += 1;
            let data = page
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| PleoError::Decode(format!("{what} lacks `data` array")))?;
            let empty = data.is_empty();
            rows.extend(data.iter().cloned());
            let pagination = page.get("pagination");
            let has_next = pagination
                .and_then(|p| p.get("hasNextPage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let end_cursor = pagination
                .and_then(|p| p.get("endCursor"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            match (has_next, end_cursor) {
                (true, Some(c)) if Some(&c) != after.as_ref() && !empty => after = Some(c),
                (true, _) => {
                    return Err(PleoError::Decode(format!(
                        "{what} says hasNextPage but gives no new endCursor"
                    )));
                }
                (false, _) => return Ok((rows, pages)),
            }
            if pages >= PAGES_MAX {
                return Err(PleoError::Decode(format!(
                    "{what} exceeded {PAGES_MAX} pages"
                )));
            }
        }
    }

    /// Reads one job.
    pub fn get_job(&self, job_id: &str) -> Result<Job, PleoError> {
        let path = format!("/v3/export-jobs/{}", path_segment(job_id)?);
        let v = ok_json(self.send("GET", &path, &[], None)?)?;
        let data = v
            .get("data")
            .cloned()
            .ok_or_else(|| PleoError::Decode("job reply lacks `data`".into()))?;
        Job::from_value(data)
    }

    /// Sends a job event. Success is 202 (any 2xx is accepted; no body is required).
    pub fn post_event(&self, event: &JobEvent) -> Result<(), PleoError> {
        let body = serde_json::to_vec(event).map_err(|e| PleoError::Decode(e.to_string()))?;
        // Never repeated after an unknown outcome (a lost answer, a 504): `started` is the
        // claim, and a second one would meet our own claim (422) and read as a conflict; a
        // terminal event may have landed. The caller reads the job instead.
        let reply = self.send_with(
            "POST",
            "/v3/export-job-events",
            &[],
            Some(&body),
            Retry::UnappliedOnly,
        )?;
        ok_status(reply).map(|_| ())
    }

    /// Makes sure `endpoint_url` has a subscription for `event_types` and fetches its signing
    /// secret (see [`PleoClient::ensure_subscription`]).
    pub fn subscribe(
        &self,
        endpoint_url: &str,
        event_types: &[String],
    ) -> Result<(String, Secret), PleoError> {
        self.ensure_subscription(endpoint_url, event_types)
            .map(|(id, secret, _)| (id, secret))
    }

    /// Idempotent: a subscription whose `endpointUrl` is `endpoint_url` is reused (updated to
    /// ACTIVE with the missing event types added, if need be), else one is created. Returns its
    /// id, its signing secret and what was done.
    pub fn ensure_subscription(
        &self,
        endpoint_url: &str,
        event_types: &[String],
    ) -> Result<(String, Secret, SubscriptionChange), PleoError> {
        let existing = self
            .list_subscriptions()?
            .into_iter()
            .find(|s| s["endpointUrl"].as_str() == Some(endpoint_url));
        let (id, change) = match existing {
            Some(sub) => {
                let id = text_field(&sub, "id")?;
                let mut types: Vec<String> = sub["eventTypes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let missing: Vec<&String> =
                    event_types.iter().filter(|t| !types.contains(t)).collect();
                if missing.is_empty() && sub["status"] == "ACTIVE" {
                    (id, SubscriptionChange::Reused)
                } else {
                    types.extend(missing.into_iter().cloned());
                    let body = serde_json::to_vec(&serde_json::json!({
                        "endpointUrl": endpoint_url, "eventTypes": types, "status": "ACTIVE"
                    }))
                    .map_err(|e| PleoError::Decode(e.to_string()))?;
                    let path = format!("/v1/subscriptions/{}", path_segment(&id)?);
                    ok_json(self.send("PUT", &path, &[], Some(&body))?)?;
                    (id, SubscriptionChange::Updated)
                }
            }
            None => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "endpointUrl": endpoint_url, "eventTypes": event_types, "status": "ACTIVE"
                }))
                .map_err(|e| PleoError::Decode(e.to_string()))?;
                // Not repeated after a lost answer: it could create a second subscription.
                let created = ok_json(self.send_with(
                    "POST",
                    "/v1/subscriptions",
                    &[],
                    Some(&body),
                    Retry::UnappliedOnly,
                )?)?;
                (
                    text_field(&created["data"], "id")?,
                    SubscriptionChange::Created,
                )
            }
        };
        let path = format!("/v1/subscriptions/{}/secret", path_segment(&id)?);
        let secret = ok_json(self.send("GET", &path, &[], None)?)?;
        let key = secret["data"]["secretKey"]
            .as_str()
            .ok_or_else(|| PleoError::Decode("secret reply lacks data.secretKey".into()))?;
        Ok((id, Secret::new(key), change))
    }

    /// Every webhook subscription of this credential (all pages).
    pub fn list_subscriptions(&self) -> Result<Vec<Value>, PleoError> {
        Ok(self
            .all_pages("/v1/subscriptions", Vec::new(), "subscription listing")?
            .0)
    }

    /// Deletes subscription `id` (a 404 is an error: nothing was deleted).
    pub fn delete_subscription(&self, id: &str) -> Result<(), PleoError> {
        let path = format!("/v1/subscriptions/{}", path_segment(id)?);
        ok_status(self.send("DELETE", &path, &[], None)?).map(|_| ())
    }

    /// Sends one request with the retry policy. Returns the final reply (any status that is not
    /// retried, or the last one) or the last transport error.
    fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<Reply, PleoError> {
        self.send_with(method, path, query, body, Retry::Transient)
    }

    fn send_with(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
        mode: Retry,
    ) -> Result<Reply, PleoError> {
        let policy = &self.cfg.retry;
        let mut attempt: u32 = 0;
        let mut refreshed = false;
        loop {
            attempt += 1;
            self.pace();
            if let Some(p) = &self.progress {
                p.beat();
            }
            let outcome = self.send_once(method, path, query, body);
            if let Some(m) = &self.metrics {
                let status = match &outcome {
                    Ok((reply, _)) => Some(reply.status),
                    Err(_) => None,
                };
                m.api_request(method, path, status);
            }
            // An access token refused before it expired (revoked, clock skew): refresh it once.
            if let (Ok((reply, _)), Auth::OAuth(src)) = (&outcome, &self.cfg.auth)
                && reply.status == 401
                && !refreshed
            {
                refreshed = true;
                src.invalidate();
                continue;
            }
            let (retry, wait) = match &outcome {
                Ok((reply, retry_after))
                    if refuses(reply.status)
                        || (reply.status >= 500 && mode == Retry::Transient) =>
                {
                    (
                        true,
                        retry_after
                            .map(|d| d.min(Duration::from_millis(policy.retry_after_cap_ms))),
                    )
                }
                Ok(_) => (false, None),
                Err(PleoError::Transport(_)) => (mode == Retry::Transient, None),
                Err(_) => (false, None),
            };
            if !retry || attempt >= policy.attempts_max.max(1) {
                return outcome.map(|(r, _)| r);
            }
            let wait = wait.unwrap_or_else(|| self.backoff(attempt));
            match &outcome {
                Ok((reply, _)) => log::warn!(
                    "{method} {path}: Pleo answered {}, retrying in {} ms (attempt {attempt} of {})",
                    reply.status,
                    wait.as_millis(),
                    policy.attempts_max
                ),
                Err(e) => log::warn!(
                    "{method} {path}: {e}, retrying in {} ms (attempt {attempt} of {})",
                    wait.as_millis(),
                    policy.attempts_max
                ),
            }
            self.clock.sleep(wait);
        }
    }

    /// Waits for a token of the request budget (on the injected clock, so replays stay fast).
    /// The bucket is shared by every thread using this client: together they keep the pace.
    fn pace(&self) {
        let Some(rate) = self.cfg.requests_per_sec_max.filter(|r| *r > 0.0) else {
            return;
        };
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        // A clock stepping backwards refills nothing.
        let elapsed = (now.0 - b.1.0).max(0);
        b.0 = (b.0 + elapsed as f64 / 1000.0 * rate).min(rate.max(1.0));
        b.1 = now.max(b.1);
        if b.0 < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - b.0) / rate);
            self.clock.sleep(wait);
            b.0 = 0.0;
            b.1 = b.1.plus(wait);
        } else {
            b.0 -= 1.0;
        }
    }

    /// Full jitter: uniform in [cap/2, cap] where cap = min(base * 2^(attempt-1), backoff cap).
    fn backoff(&self, attempt: u32) -> Duration {
        let p = &self.cfg.retry;
        let exp = p
            .backoff_base_ms
            .saturating_mul(1u64 << (attempt - 1).min(30))
            .min(p.backoff_cap_ms);
        let mut s = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let half = exp / 2;
        Duration::from_millis(half + if half == 0 { 0 } else { r % (exp - half + 1) })
    }

    fn send_once(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<(Reply, Option<Duration>), PleoError> {
        let url = format!("{}{}", self.cfg.base_url, path);
        let auth = self.cfg.auth.header()?;
        let result = match method {
            "GET" => {
                let mut req = self.agent.get(&url).header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Accept", "application/json").call()
            }
            "DELETE" => {
                let mut req = self.agent.delete(&url).header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Accept", "application/json").call()
            }
            "POST" | "PUT" => {
                let mut req = if method == "POST" {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                req = req.header("Authorization", &auth);
                for (k, v) in query {
                    req = req.query(*k, v);
                }
                req.header("Content-Type", "application/json")
                    .header("Accept", "application/json")
                    .send(body.unwrap_or(b""))
            }
            other => return Err(PleoError::Config(format!("unsupported method {other}"))),
        };
        let mut resp = result.map_err(|e| PleoError::Transport(describe_ureq_error(&e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|h| h.to_str().ok())
            .and_then(|s| parse_retry_after(s, self.clock.now()));
        if let Some(date) = resp
            .headers()
            .get("date")
            .and_then(|h| h.to_str().ok())
            .and_then(Millis::parse_http_date)
        {
            // Cut to the second: this underestimates Pleo's now by less than a second.
            let off = date.0 - self.clock.now().0;
            self.pleo_offset_ms
                .store(off, std::sync::atomic::Ordering::Relaxed);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| {
                PleoError::Transport(format!(
                    "reading {method} {path} reply: {}",
                    describe_ureq_error(&e)
                ))
            })?;
        log::debug!("{method} {path} -> {status} ({} bytes)", body.len());
        Ok((Reply { status, body }, retry_after))
    }
}

fn describe_ureq_error(e: &ureq::Error) -> String {
    // ureq's messages never contain request headers, so the credential cannot leak here.
    e.to_string()
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: Millis) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = Millis::parse_http_date(v)?;
    Some(Duration::from_millis(now.until(at).max(0) as u64))
}

fn path_segment(id: &str) -> Result<&str, PleoError> {
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(id)
    } else {
        Err(PleoError::Config(format!(
            "job id {id:?} is not a valid path segment"
        )))
    }
}

fn api_error(reply: &Reply) -> PleoError {
    let parsed: Option<Value> = serde_json::from_str(&reply.body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    PleoError::Api {
        status: reply.status,
        kind: field("type").unwrap_or_else(|| "UNKNOWN".into()),
        message: field("message").unwrap_or_else(|| truncate(&reply.body, 200)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn ok_status(reply: Reply) -> Result<Reply, PleoError> {
    if (200..300).contains(&reply.status) {
        Ok(reply)
    } else {
        Err(api_error(&reply))
    }
}

fn ok_json(reply: Reply) -> Result<Value, PleoError> {
    let reply = ok_status(reply)?;
    serde_json::from_str(&reply.body).map_err(|e| {
        // A 2xx with a body that does not parse is most often a cut connection.
        PleoError::Transport(format!("reply body is not complete JSON: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_rules() {
        assert!(check_base_url("https://external.pleo.io").is_ok());
        assert!(check_base_url("http://127.0.0.1:8080").is_ok());
        assert!(check_base_url("http://localhost:1/v").is_ok());
        assert!(check_base_url("http://[::1]:9000").is_ok());
        let e = check_base_url("http://external.pleo.io").unwrap_err();
        assert!(e.contains("https"), "{e}");
        assert!(check_base_url("http://10.0.0.1").is_err());
        assert!(check_base_url("ftp://x").is_err());
        assert!(check_base_url("external.pleo.io").is_err());
    }

    #[test]
    fn retry_after_forms() {
        let now = Millis::parse_rfc3339("2026-11-24T10:00:00Z").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn api_key_is_basic_with_empty_password_and_hidden_in_debug() {
        let a = Auth::ApiKey(Secret::new("k3y"));
        assert_eq!(a.header().unwrap(), "Basic azN5Og==");
        assert!(!format!("{a:?}").contains("k3y"));
    }

    #[test]
    fn job_keeps_unknown_fields_and_computes_expiry() {
        let v = serde_json::json!({
            "id": "j1", "companyId": "c1", "status": "pending",
            "createdAt": "2026-11-24T10:00:00Z", "lastUpdatedAt": "2026-11-24T10:05:00.5Z",
            "expiresIn": 3600, "numberOfItems": 3, "isInteractive": true,
            "vendorBasedBookkeeping": false, "somethingNew": {"x": 1}
        });
        let j = Job::from_value(v).unwrap();
        assert_eq!(j.raw["somethingNew"]["x"], 1);
        assert_eq!(j.expires_at().to_rfc3339(), "2026-11-24T11:05:00.500Z");
        let bad = Job::from_value(serde_json::json!({"id": "j"})).unwrap_err();
        assert!(bad.to_string().contains("companyId"));
    }
}
