//! The Pleo Export API client: the only module that speaks HTTP to Pleo (its JSON is read
//! into the wire model, [`crate::wire`], re-exported here).
//!
//! Invariants: every request has a connect and an overall timeout; 429, 5xx and transport
//! errors are retried with capped exponential backoff and full jitter, honouring
//! `Retry-After`, and nothing else is retried; Pleo's `{type, message}` error body is kept in
//! the error; the credential never appears in a log line or an error message.
//!
//! Files: this one holds the client's configuration, credentials and the per-company set of
//! clients; `api` the endpoints (one method each), `transport` one request sent with pacing
//! and retries, `oauth` the token source, and `net` the HTTP agent and base-URL rules.

pub mod api;
pub mod net;
pub mod oauth;
pub mod pacer;
pub mod transport;

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
/// theirs, all others the default. The per-company ones can be replaced while the service runs
/// (a reload that adds or removes companies).
#[derive(Debug)]
pub struct Clients {
    default: std::sync::Arc<PleoClient>,
    by_company: std::sync::RwLock<ByCompany>,
    /// What a company's own OAuth pair needs (the OAuth app's settings and the token store
    /// every pair shares), when OAuth is configured.
    oauth: Option<CompanyOAuth>,
}

/// The OAuth settings and token store the companies' own pairs share.
#[derive(Debug)]
pub struct CompanyOAuth {
    pub cfg: crate::pleo::oauth::OAuthConfig,
    pub store: std::sync::Arc<Mutex<crate::store::Store>>,
}

/// A credential of a company's own.
#[derive(Clone, Debug)]
pub enum OwnCredential {
    ApiKey(Secret),
    /// Its token pair in the database.
    OAuth,
}

type ByCompany = std::collections::HashMap<String, std::sync::Arc<PleoClient>>;

impl Clients {
    pub fn new(
        default: std::sync::Arc<PleoClient>,
        by_company: ByCompany,
    ) -> std::sync::Arc<Clients> {
        std::sync::Arc::new(Clients {
            default,
            by_company: std::sync::RwLock::new(by_company),
            oauth: None,
        })
    }

    /// As [`Clients::new`], with what companies' own OAuth pairs need.
    pub fn with_oauth(default: std::sync::Arc<PleoClient>, oauth: Option<CompanyOAuth>) -> Clients {
        Clients {
            default,
            by_company: Default::default(),
            oauth,
        }
    }

    /// A client for `company` with a credential of its own (same pool, clock and health as
    /// the default's; a request budget of its own).
    pub fn own_client(
        &self,
        company: &str,
        credential: &OwnCredential,
    ) -> Result<std::sync::Arc<PleoClient>, PleoError> {
        let auth = match credential {
            OwnCredential::ApiKey(k) => Auth::ApiKey(k.clone()),
            OwnCredential::OAuth => {
                let Some(o) = &self.oauth else {
                    return Err(PleoError::Config(format!(
                        "company {company} has an OAuth token pair of its own, but OAuth is not configured (set pleo_auth = \"oauth\" with pleo_oauth_token_url, pleo_oauth_client_id and its secret)"
                    )));
                };
                Auth::OAuth(std::sync::Arc::new(
                    crate::pleo::oauth::TokenSource::for_company(
                        o.cfg.clone(),
                        o.store.clone(),
                        self.default.clock.clone(),
                        company,
                    )?,
                ))
            }
        };
        Ok(std::sync::Arc::new(self.default.with_credential(auth)))
    }

    /// One client for every company.
    pub fn single(client: std::sync::Arc<PleoClient>) -> std::sync::Arc<Clients> {
        Clients::new(client, Default::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ByCompany> {
        self.by_company.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `company` has a credential of its own (else it shares the default).
    pub fn has_own(&self, company: &str) -> bool {
        self.read().contains_key(company)
    }

    /// The client holding `company`'s credential (`None`: the default).
    pub fn for_company(&self, company: Option<&str>) -> std::sync::Arc<PleoClient> {
        company
            .and_then(|c| self.read().get(c).cloned())
            .unwrap_or_else(|| self.default.clone())
    }

    /// The default credential's client.
    pub fn default_client(&self) -> &std::sync::Arc<PleoClient> {
        &self.default
    }

    /// Replaces the per-company clients (a reload): the new set of companies with keys of
    /// their own, and their clients.
    pub fn replace_companies(&self, by_company: ByCompany) {
        *self.by_company.write().unwrap_or_else(|p| p.into_inner()) = by_company;
    }

    /// The per-company clients now.
    pub fn companies(&self) -> ByCompany {
        self.read().clone()
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

pub struct PleoClient {
    agent: ureq::Agent,
    cfg: ClientConfig,
    clock: SharedClock,
    rng: Mutex<u64>,
    /// The request budget (`requests_per_sec_max`), shared by every thread using this client.
    pacer: Option<crate::pleo::pacer::Pacer>,
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

/// Idle connections a pool keeps open for reuse (to Pleo: one host), at most.
pub const IDLE_CONNECTIONS_MAX: usize = 32;

impl PleoClient {
    /// A client with a connection pool of its own.
    pub fn new(cfg: ClientConfig, clock: SharedClock) -> Result<PleoClient, PleoError> {
        let agent = PleoClient::agent_for(&cfg);
        PleoClient::with_agent(cfg, clock, agent)
    }

    /// The HTTP agent (and so the connection pool) for clients with `cfg`'s timeouts. Clones
    /// of it share one pool: the service gives one to every credential's client, so the
    /// connections it holds are bounded by its threads and [`IDLE_CONNECTIONS_MAX`], not by
    /// the number of credentials.
    pub fn agent_for(cfg: &ClientConfig) -> ureq::Agent {
        crate::pleo::net::agent(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(cfg.connect_timeout))
                .timeout_global(Some(cfg.request_timeout))
                .max_redirects(0)
                .max_idle_connections(IDLE_CONNECTIONS_MAX)
                .max_idle_connections_per_host(IDLE_CONNECTIONS_MAX)
                .user_agent(concat!("jobmirror/", env!("CARGO_PKG_VERSION")))
                .build(),
        )
    }

    /// A client that sends through `agent` (see [`PleoClient::agent_for`]); the credential
    /// travels with each request, so one agent serves any number of credentials.
    pub fn with_agent(
        cfg: ClientConfig,
        clock: SharedClock,
        agent: ureq::Agent,
    ) -> Result<PleoClient, PleoError> {
        check_base_url(&cfg.base_url).map_err(PleoError::Config)?;
        let seed = cfg.jitter_seed | 1;
        let pacer = cfg
            .requests_per_sec_max
            .filter(|r| *r > 0.0)
            .map(|r| crate::pleo::pacer::Pacer::new(r, clock.now().0));
        Ok(PleoClient {
            agent,
            cfg,
            clock,
            rng: Mutex::new(seed),
            pacer,
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

    /// A client like this one (same pool, clock, timeouts, budget size and health) that sends
    /// with `auth` instead, with a request budget of its own.
    pub fn with_credential(&self, auth: Auth) -> PleoClient {
        let mut cfg = self.cfg.clone();
        cfg.auth = auth;
        let pacer = cfg
            .requests_per_sec_max
            .filter(|r| *r > 0.0)
            .map(|r| crate::pleo::pacer::Pacer::new(r, self.clock.now().0));
        PleoClient {
            agent: self.agent.clone(),
            cfg,
            clock: self.clock.clone(),
            rng: Mutex::new(self.cfg.jitter_seed | 1),
            pacer,
            progress: self.progress.clone(),
            metrics: self.metrics.clone(),
            pleo_offset_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.cfg.base_url
    }

    /// The OAuth token source this client sends with, if it uses one.
    pub fn token_source(&self) -> Option<&std::sync::Arc<crate::pleo::oauth::TokenSource>> {
        match &self.cfg.auth {
            Auth::OAuth(t) => Some(t),
            _ => None,
        }
    }
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
